"""A thread pool with a bounded queue, so a listing of a million objects
does not turn into a million queued tasks before the first byte moves."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor


class BoundedPool:
    def __init__(self, workers: int, name: str):
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=name)
        self._slots = threading.BoundedSemaphore(workers * 2)
        self.error: BaseException | None = None  # the first error a task let escape

    def submit(self, fn, *args) -> None:
        """Run fn(*args) on a worker; blocks while the queue is full. Tasks
        handle their own expected errors; anything else is re-raised by close()."""
        self._slots.acquire()

        def run():
            try:
                fn(*args)
            except BaseException as e:
                self.error = self.error or e
            finally:
                self._slots.release()
        self._pool.submit(run)

    def close(self, cancel: bool = False) -> None:
        """Wait for every task; with `cancel` (the caller is failing or was
        interrupted), drop the queued ones and wait for none: a task in the
        middle of a request would hold an interrupted command up for as long
        as storage takes to answer (up to the read timeout)."""
        self._pool.shutdown(wait=not cancel, cancel_futures=cancel)
        if self.error is not None and not cancel:
            raise self.error

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        self.close(cancel=exc_type is not None)
