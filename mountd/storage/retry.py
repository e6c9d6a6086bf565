"""Retry policy for the Azure SDKs: quick exponential backoff with jitter that
honours a throttling answer's Retry-After.

The SDK's own storage policy waits 15 s before its first retry and ignores
Retry-After; a training node wants a connection reset retried in well under a
second and a 503 "server busy" retried when the service says so.
"""

from __future__ import annotations

import random

from azure.storage.blob._shared.policies import StorageRetryPolicy

MAX_RETRY_AFTER = 60.0  # seconds; a longer answer is capped rather than obeyed


class BackoffRetry(StorageRetryPolicy):
    def __init__(self, retries: int = 6, initial: float = 0.5, maximum: float = 20.0, **kwargs):
        self.initial = initial
        self.maximum = maximum
        kwargs.setdefault("retry_connect", retries)
        kwargs.setdefault("retry_read", retries)
        kwargs.setdefault("retry_status", retries)
        super().__init__(retry_total=retries, **kwargs)

    def get_backoff_time(self, settings) -> float:
        history = settings.get("history") or []
        response = getattr(history[-1], "http_response", None) if history else None
        if response is not None:
            after = response.headers.get("Retry-After") or response.headers.get("x-ms-retry-after-ms")
            if after:
                try:
                    seconds = float(after) / (1000.0 if "x-ms-retry-after-ms" in response.headers
                                              and not response.headers.get("Retry-After") else 1.0)
                    return min(max(seconds, 0.0), MAX_RETRY_AFTER)
                except ValueError:
                    pass  # an HTTP-date; fall back to our own backoff
        backoff = min(self.initial * (2 ** settings["count"]), self.maximum)
        return random.uniform(backoff / 2, backoff)  # "equal jitter": spread, never zero
