"""What the Azure backends (blob, file share) share without the SDK: storage
answers as mountd's errors, content types, the parallel upload of pieces.

What needs the SDK is in `sdk`."""

from __future__ import annotations

import hashlib
import mimetypes
import threading
from concurrent.futures import FIRST_EXCEPTION, Executor, wait
from typing import BinaryIO, Callable

from mountd.errors import AlreadyExists, ConfigError, MountdError, NotEmpty, NotFound, Stale, StorageError, Unreachable


def content_type(path: str) -> str:
    """The content type stored with an uploaded file, from its extension."""
    guessed, _ = mimetypes.guess_type(path)
    return guessed or "application/octet-stream"


def raise_for_status(status: int | None, code: str | None, what: str, where: str, request_id: str | None = None,
                     detail: str = ""):
    """The mountd error for a failed storage answer, by HTTP status and the
    service's error code, for the SDK's calls and the lean data path alike.
    `what` names the object, `where` the container or share; the request's
    x-ms-client-request-id, when known, ends the message (Azure support
    finds the request by it) and is kept as the error's `request_id`."""
    error = _error_for(status, code or "", what, where, detail)
    if request_id:
        error.args = (f"{error.args[0]} (request id {request_id})",)
    error.request_id = request_id
    raise error


def _error_for(status: int | None, code: str, what: str, where: str, detail: str) -> MountdError:
    if status == 412:
        return Stale(f"{what} changed in storage while it was being read")
    if status == 404:
        if code in ("ContainerNotFound", "ShareNotFound"):
            return ConfigError(f"{where} does not exist")
        if code == "ParentNotFound":
            return NotFound(f"{what}: parent directory does not exist")
        return NotFound(f"{what} does not exist")
    if status == 409:
        if code == "DirectoryNotEmpty":
            return NotEmpty(f"{what} is not empty")
        return AlreadyExists(f"{what} already exists")
    if status in (401, 403):
        return Unreachable(f"{where} refused the credentials ({code or status})")
    return StorageError(f"{what}: storage answered {status} {code}".rstrip() + (f": {detail}" if detail else ""))


def upload_pieces(pool: Executor, slots: threading.BoundedSemaphore, source: BinaryIO, piece_size: int,
                  send: Callable[[int, int, bytes], None], progress=None) -> tuple[bytes, int]:
    """Read `source` in pieces of `piece_size` and hand each to
    `send(index, offset, data)` on `pool`, as many at once as `slots` allows
    (the reader waits for a slot, so memory stays bounded). Stops reading at
    the first failure and re-raises it once the pieces in flight are done.
    Returns (MD5 of everything read, number of pieces)."""
    md5 = hashlib.md5()
    futures = []
    failed = threading.Event()

    def one(index: int, offset: int, data: bytes) -> None:
        try:
            if failed.is_set():
                return
            send(index, offset, data)
            if progress:
                progress(len(data))
        except BaseException:
            failed.set()
            raise
        finally:
            slots.release()

    offset = index = 0
    while not failed.is_set():
        data = source.read(piece_size)
        if not data:
            break
        md5.update(data)
        slots.acquire()
        futures.append(pool.submit(one, index, offset, data))
        offset += len(data)
        index += 1
    wait(futures, return_when=FIRST_EXCEPTION)
    for fut in futures:
        fut.result()  # re-raise the first failure
    return md5.digest(), index
