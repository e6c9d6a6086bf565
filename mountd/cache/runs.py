"""A run: one streamed request reading consecutive blocks of a file for a
sequential reader, kept open as long as the reader keeps up.

Each request costs the storage far more than its bytes do (Azurite spends
~10-20 ms of CPU on one), so a reader going through a file should cost one
request, not one per readahead window. The request asks for the rest of the
file, but the run may fill a block only once it has been granted it: the
reader's readahead grants blocks as it moves on, so the run stays a window
ahead of the reader and its memory stays bounded. While the next block is not
granted the run waits, and the storage's sending pauses under TCP flow
control; a run whose reader went quiet, turned to random reads or closed the
file, or whose thread other fetches are queueing for, ends (its request is
dropped) once the blocks granted to it are delivered.

Blocks are granted one at a time and in order, and a grant is refused once the
run has ended, so a block somebody waits for always has a run (or a fetch)
that will deliver it.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from typing import Callable

# How long a run waits for its next block to be granted before it ends. A
# reader slower than this per block pays a new request per block, which is
# little next to its own pace.
IDLE = 3.0
POLL = 0.05  # how often a waiting run looks whether it should give its thread up


class RunEnded(Exception):
    """Raised from a run's delivery when it stops: unwinds the request."""


class Run:
    """The blocks `first`..`last` of one file, streamed in order."""

    def __init__(self, first: int, last: int):
        self.first = first
        self.last = last
        self._cond = threading.Condition()
        self._futures: dict[int, Future] = {}
        self._granted = first - 1  # highest block index granted
        self._closing = False  # no more grants wanted; end after those given
        self._ended = False  # grants are refused
        self.why = "done"  # why it ended, for the debug log
        self.delivered = first - 1  # the last block handed over

    def grant(self, index: int, future: Future) -> bool:
        """Let the run fill block `index` into `future`; False (and nothing
        granted) if the run has ended or `index` is not the next block."""
        with self._cond:
            if self._ended or self._closing or index != self._granted + 1 or index > self.last:
                return False
            self._futures[index] = future
            self._granted = index
            self._cond.notify()
            return True

    @property
    def open(self) -> bool:
        """Whether the run still takes grants."""
        return not (self._ended or self._closing)

    def close(self) -> None:
        """Its reader needs no more: the run ends after the blocks granted."""
        with self._cond:
            self._closing = True
            self._cond.notify()

    def future(self, index: int) -> Future:
        """The future of a granted block, handed over once (to deliver it)."""
        with self._cond:
            self.delivered = index
            return self._futures.pop(index)

    def undelivered(self) -> list[tuple[int, Future]]:
        """Once the run has ended: the granted blocks it did not deliver."""
        with self._cond:
            self._ended = True
            left, self._futures = sorted(self._futures.items()), {}
            return left

    def wait_for(self, index: int, give_up: Callable[[], bool]) -> None:
        """Return once block `index` is granted; raise RunEnded if the run
        ends first: closed, idle for IDLE seconds, or `give_up()` true."""
        deadline = time.monotonic() + IDLE
        with self._cond:
            while self._granted < index:
                why = "closed" if self._closing else "made way" if give_up() else \
                    "idle" if time.monotonic() >= deadline else None
                if why:
                    self._ended = True
                    self.why = why
                    raise RunEnded()
                self._cond.wait(POLL)
