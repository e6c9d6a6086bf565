"""The one retry policy for storage calls: which answers to ask again, how
long to wait, when to give up, and the timeouts; every retry loop asks it.

The loops: the lean data path (`azure_http`), the Azure SDK clients
(`sdk.BackoffRetry`) and token requests (`identity`). The wait is a quick
exponential backoff with jitter, or what a throttling answer's Retry-After
asks.

The SDK's own storage policy waits 15 s before its first retry and ignores
Retry-After; a training node wants a connection reset retried in well under a
second and a 503 "server busy" retried when the service says so.

The budget (retries, backoff, timeouts) can be set from the environment, so
an operator can make a node give up sooner or sit out longer outages, and
tests can make an outage surface in seconds:

    MOUNTD_STORAGE_RETRIES          retries after the first try (default 6)
    MOUNTD_STORAGE_BACKOFF          first backoff (default 0.5s), doubling
    MOUNTD_STORAGE_BACKOFF_MAX      longest backoff (default 20s)
    MOUNTD_STORAGE_CONNECT_TIMEOUT  to open a connection (default 10s)
    MOUNTD_STORAGE_READ_TIMEOUT     without a byte before a request is abandoned and retried (default 60s)
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

from mountd.config.settings import parse_count, parse_duration
from mountd.errors import UsageError

MAX_RETRY_AFTER = 60.0  # seconds; a longer answer is capped rather than obeyed

# Answers worth asking again: a timeout, throttling, the service failing or
# busy. Not 501 or 505: an operation or version the service does not do
# will not be done on a second try.
TRANSIENT_STATUS = frozenset({408, 429, *range(500, 600)} - {501, 505})
# A copy's answer says when its source failed (a 4xx of the copy itself);
# these source failures pass as the others do.
_TRANSIENT_COPY_SOURCE = frozenset({"OperationTimedOut", "InternalError", "ServerBusy"})


def transient_answer(status: int, headers=None) -> bool:
    """Whether an answer with this status (and these headers, a mapping
    whose get() takes the names as sent) is worth asking again."""
    if status in TRANSIENT_STATUS:
        return True
    return (400 <= status < 500 and headers is not None
            and headers.get("x-ms-copy-source-error-code") in _TRANSIENT_COPY_SOURCE)


@dataclass(frozen=True)
class StoragePolicy:
    retries: int = 6
    backoff: float = 0.5  # seconds before the first retry (the ceiling of its jitter)
    backoff_max: float = 20.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0

    def backoff_time(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (1, 2, ...): "equal
        jitter" below a doubling ceiling, so retries spread and never reach 0."""
        ceiling = min(self.backoff * 2 ** (attempt - 1), self.backoff_max)
        return random.uniform(ceiling / 2, ceiling)

    def wait(self, attempt: int, after: float | None = None) -> float:
        """Seconds to wait before retry number `attempt`: what a throttling
        answer asked for (`after`, from retry_after(); capped), else the
        backoff."""
        return min(after, MAX_RETRY_AFTER) if after is not None else self.backoff_time(attempt)

    def spent(self, attempt: int) -> bool:
        """Whether retry number `attempt` is beyond the budget."""
        return attempt > self.retries

    def next_try(self, attempt: int, error: BaseException, after: float | None = None) -> int:
        """For a call that has made `attempt` retries and just failed with
        `error`: wait for the next one and return its number, or raise
        `error` once the budget is spent."""
        attempt += 1
        if self.spent(attempt):
            raise error
        time.sleep(self.wait(attempt, after))
        return attempt


_ENV = {  # variable -> (field, kind)
    "MOUNTD_STORAGE_RETRIES": ("retries", "count"),
    "MOUNTD_STORAGE_BACKOFF": ("backoff", "duration"),
    "MOUNTD_STORAGE_BACKOFF_MAX": ("backoff_max", "duration"),
    "MOUNTD_STORAGE_CONNECT_TIMEOUT": ("connect_timeout", "duration"),
    "MOUNTD_STORAGE_READ_TIMEOUT": ("read_timeout", "duration"),
}


def policy(environ=None) -> StoragePolicy:
    """The policy in force: defaults overridden by MOUNTD_STORAGE_* variables.
    A malformed value is a UsageError naming the variable."""
    environ = os.environ if environ is None else environ
    changes: dict[str, Any] = {}  # counts and seconds, by field
    for var, (name, kind) in _ENV.items():
        value = environ.get(var)
        if value in (None, ""):
            continue
        if kind == "count":
            changes[name] = parse_count(value, f"${var}", 0, 100)
        else:
            seconds = parse_duration(value, f"${var}")
            if seconds <= 0 and name != "backoff":
                raise UsageError(f"${var}: must be more than 0, got {value!r}")
            changes[name] = seconds
    return StoragePolicy(**changes)


def retry_after(headers) -> float | None:
    """Seconds a throttling or busy answer asks to wait, from its headers
    (any mapping whose get() takes the names as sent): `x-ms-retry-after-ms`
    (milliseconds), else `Retry-After` as seconds or as an HTTP date;
    None if neither is there or readable. Capped at MAX_RETRY_AFTER."""
    value = headers.get("x-ms-retry-after-ms")
    seconds = None
    if value:
        try:
            seconds = float(value) / 1000.0
        except ValueError:
            pass
    value = headers.get("Retry-After") if seconds is None else None
    if value:
        try:
            seconds = float(value)
        except ValueError:
            try:
                seconds = parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError):
                return None
    if seconds is None or seconds != seconds:  # absent, or NaN
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)
