"""The filesystem: a core that answers POSIX-style calls from the caches and
an ObjectStore (no FUSE in it), and thin FUSE glue on top."""
