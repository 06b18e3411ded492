"""The ``tunevault`` command line: each command family lives in its own module."""
