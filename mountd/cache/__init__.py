"""Caches between the filesystem core and storage: metadata (TTL), data
blocks (memory LRU and a capped disk tier), and per-handle readahead."""
