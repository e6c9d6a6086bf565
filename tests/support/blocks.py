"""Waiting for a block cache's background fetches in tests."""

import time


def settled(cache, timeout: float = 5.0) -> bool:
    """Wait until no block of `cache` is being fetched; whether that
    happened within `timeout` seconds."""
    deadline = time.time() + timeout
    while cache.in_flight() and time.time() < deadline:
        time.sleep(0.01)
    return not cache.in_flight()
