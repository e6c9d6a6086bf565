"""What the blob and file share backends have in common as stores: reads and
metadata through the lean data path, an SDK client only when a call needs one.

Also: errors named after the store, the check and creation of their
container or share, the upload pool, and closing."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Mapping

from mountd.errors import AlreadyExists
from mountd.storage.azure_http import RangeReader, raise_for_answer, translated_reads
from mountd.paths import normalize_path
from mountd.storage.base import ObjectStore
from mountd.storage.retry import policy


class AzureStore(ObjectStore):
    """A container or share (`target`) under an account, with a lean reader
    for it and a pool of `concurrency` threads for the pieces of large
    uploads. Subclasses say how to make their SDK client (`_make_service`)
    and how to list the first entry of the target (`check_query`)."""

    account_url: str  # set by each subclass before it calls __init__

    # The check at start lists one entry rather than reading the container's
    # or share's properties: a container or share SAS grants no access to
    # those (Azure answers 403 AuthorizationFailure), while any credential a
    # job can read with may list.
    check_query: dict = {}

    def __init__(self, target: str, reader: RangeReader, description: str, concurrency: int, thread_name: str):
        self.target = target
        self._reader = reader
        self.description = description
        self._service = None
        self._service_lock = threading.Lock()
        self._uploads = ThreadPoolExecutor(concurrency, thread_name_prefix=thread_name)
        self._listing = ThreadPoolExecutor(4, thread_name_prefix="listing-ahead")
        # pieces read ahead of those in flight: bounds the memory of one upload
        self._upload_slots = threading.BoundedSemaphore(concurrency * 2)

    @property
    def service(self):
        """The SDK's service client, made at first use: importing the SDK
        costs a quarter of a second, and reads never need it."""
        with self._service_lock:
            if self._service is None:
                self._service = self._make_service()
            return self._service

    def _make_service(self):
        raise NotImplementedError

    def _create_target(self) -> None:
        raise NotImplementedError

    def _errors(self, path: str):
        from mountd.storage.sdk import translated
        return translated(f"{path or '/'} in {self.description}", self.description, self.account_url)

    def _reads(self, path: str, unreachable: bool = False):
        return translated_reads(f"{path or '/'} in {self.description}", self.description, unreachable)

    def _head(self, path: str, query: dict | None = None) -> tuple[int, Mapping[str, str]]:
        """HEAD of an object (or, with `query`, a directory or the target)
        through the lean path: (status, headers); failures other than an
        answer raise."""
        with self._reads(path):
            status, headers, _ = self._reader.call("HEAD", f"{self.target}/{path}" if path else self.target, query)
        return status, headers

    def _paged(self, fetch) -> Iterator:
        """The items of a listing whose pages come from `fetch(marker) ->
        (items, next marker)`, asking for each next page while the current
        one is being consumed: storage takes as long to make a page of a
        large listing as the consumer (a mount's `ls -l`, a download
        starting transfers) takes to use it, so the two overlap."""
        items, marker = fetch(None)
        while True:
            ahead = self._listing.submit(fetch, marker) if marker else None
            try:
                yield from items
            except GeneratorExit:
                if ahead is not None:
                    ahead.cancel()  # a consumer that stopped early leaves at most this page unread
                raise
            if ahead is None:
                return
            items, marker = ahead.result()

    def check(self) -> None:
        # A short budget for connecting: an endpoint that refuses connections
        # at start is a configuration problem to report now, not an outage
        # to sit out. Answers that break or stall, and 5xx, get the full
        # budget: on a flaky network the check must not be what fails a job.
        with self._reads("", unreachable=True):
            status, headers, _ = self._reader.call("GET", self.target, self.check_query, body=True,
                                                   connect_retries=min(3, policy().retries))
        raise_for_answer(status, headers, f"/ in {self.description}", self.description)

    def create(self) -> bool:
        """Create the container or share; False if it already existed."""
        try:
            with self._errors(""):
                self._create_target()
        except AlreadyExists:
            return False
        return True

    def read_into(self, path: str, offset: int, view: memoryview, etag: str | None = None) -> int:
        path = normalize_path(path)
        with self._reads(path):
            return self._reader.read_into(f"{self.target}/{path}", offset, view, etag)

    def read_stream(self, path: str, offset: int, length: int, etag: str | None, buf: memoryview, sink) -> int:
        path = normalize_path(path)
        with self._reads(path):
            return self._reader.stream(f"{self.target}/{path}", offset, length, etag, buf, sink)

    def close(self) -> None:
        self._uploads.shutdown(wait=False, cancel_futures=True)
        self._listing.shutdown(wait=False, cancel_futures=True)
        self._reader.close()
        if self._service is not None:
            self._service.close()
