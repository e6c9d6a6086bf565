"""What the blob and file share backends have in common as stores: errors
named after the store, the check and creation of their container or share,
reads through the lean data path, the upload pool, and closing."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from mountd.errors import AlreadyExists
from mountd.storage.azure_common import translated
from mountd.storage.azure_http import RangeReader, translated_reads
from mountd.storage.base import ObjectStore, normalize_path
from mountd.storage.retry import policy



class AzureStore(ObjectStore):
    """A container or share (`target`) of an SDK service client, with a lean
    reader for its account and a pool of `concurrency` threads for the pieces
    of large uploads."""

    def __init__(self, service, target: str, reader: RangeReader, description: str, concurrency: int,
                 thread_name: str):
        self.service = service
        self.target = target
        self._reader = reader
        self.description = description
        self._uploads = ThreadPoolExecutor(concurrency, thread_name_prefix=thread_name)
        # pieces read ahead of those in flight: bounds the memory of one upload
        self._upload_slots = threading.BoundedSemaphore(concurrency * 2)

    def _target_properties(self, **options) -> None:
        """Ask for the container's or share's properties."""
        raise NotImplementedError

    def _create_target(self) -> None:
        raise NotImplementedError

    def _errors(self, path: str):
        return translated(f"{path or '/'} in {self.description}", self.description)

    def _reads(self, path: str):
        return translated_reads(f"{path or '/'} in {self.description}", self.description)

    def check(self) -> None:
        # A short budget for connecting: an endpoint that refuses connections
        # at start is a configuration problem to report now, not an outage
        # to sit out. Answers that break or stall, and 5xx, get the full
        # budget: on a flaky network the check must not be what fails a job.
        with self._errors(""):
            self._target_properties(retry_connect=min(3, policy().retries))

    def create(self) -> bool:
        """Create the container or share; False if it already existed."""
        try:
            with self._errors(""):
                self._create_target()
        except AlreadyExists:
            return False
        return True

    def read(self, path: str, offset: int, length: int, etag: str | None = None) -> bytes:
        if length <= 0:
            return b""
        buf = bytearray(length)
        got = self.read_into(path, offset, memoryview(buf), etag)
        # a bytearray is returned as is: copying 8 MiB blocks doubles peak memory
        return buf if got == length else buf[:got]

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
        self._reader.close()
        self.service.close()
