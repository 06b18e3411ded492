"""Where decisions live: the Store protocol and its backends (memory, SQLite, Redis, layered, bundles)."""
