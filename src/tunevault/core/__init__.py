"""Value objects and environment identity; imports nothing above it."""
