"""What the Azure backends (blob, file share) share: the HTTP transport tuned
for throughput, client options, credentials, and translation of SDK errors
into mountd's errors."""

from __future__ import annotations

import contextlib
import hashlib
import mimetypes
import threading
from concurrent.futures import FIRST_EXCEPTION, Executor, wait
from typing import BinaryIO, Callable

import requests
from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError
from azure.core.pipeline.transport import RequestsTransport

from mountd.config.credentials import Credential
from mountd.redact import redact
from mountd.errors import AlreadyExists, ConfigError, NotEmpty, NotFound, Stale, StorageError, Unreachable
from mountd.storage.retry import BackoffRetry, StoragePolicy, policy

# The SDK reads response bodies in pieces of this size; its 4 KiB default
# costs over half the download throughput in Python.
DATA_BLOCK_SIZE = 256 * 1024
# Connections kept per host; above the number of threads that talk at once,
# so none is thrown away and reopened under load.
POOL_SIZE = 64


def make_transport(p: StoragePolicy | None = None) -> RequestsTransport:
    """Connect and read timeouts bound every SDK call (the read timeout is
    the longest wait for a byte, not for a whole answer)."""
    p = p or policy()
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=POOL_SIZE, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return RequestsTransport(session=session, session_owner=True,
                             connection_timeout=p.connect_timeout, read_timeout=p.read_timeout,
                             connection_data_block_size=DATA_BLOCK_SIZE)


def client_options(p: StoragePolicy | None = None, **extra) -> dict:
    p = p or policy()
    return dict(transport=make_transport(p), retry_policy=BackoffRetry.from_policy(p),
                connection_data_block_size=DATA_BLOCK_SIZE, **extra)


def sdk_credential(cred: Credential, account_name: str | None):
    """The credential argument for an SDK client (connection strings aside)."""
    if cred.kind == "account_key":
        if not account_name:
            raise ConfigError("an account key needs account_name")
        return {"account_name": account_name, "account_key": cred.secret}
    if cred.kind == "sas_token":
        from azure.core.credentials import AzureSasCredential
        return AzureSasCredential(cred.secret.lstrip("?"))
    if cred.kind == "managed_identity":
        from azure.identity import DefaultAzureCredential
        return DefaultAzureCredential(managed_identity_client_id=cred.client_id,
                                      exclude_interactive_browser_credential=True)
    return None  # anonymous


def content_type(path: str) -> str:
    """The content type stored with an uploaded file, from its extension."""
    guessed, _ = mimetypes.guess_type(path)
    return guessed or "application/octet-stream"


def raise_for_status(status: int, code: str, what: str, where: str):
    """The mountd error for a failed storage answer, by HTTP status and the
    service's error code, for the SDK's calls and the lean data path alike.
    `what` names the object, `where` the container or share."""
    code = code or ""
    if status == 412:
        raise Stale(f"{what} changed in storage while it was being read")
    if status == 404:
        if code in ("ContainerNotFound", "ShareNotFound"):
            raise ConfigError(f"{where} does not exist")
        if code == "ParentNotFound":
            raise NotFound(f"{what}: parent directory does not exist")
        raise NotFound(f"{what} does not exist")
    if status == 409:
        if code == "DirectoryNotEmpty":
            raise NotEmpty(f"{what} is not empty")
        raise AlreadyExists(f"{what} already exists")
    if status in (401, 403):
        raise Unreachable(f"{where} refused the credentials ({code or status})")
    raise StorageError(f"{what}: storage answered {status} {code}".rstrip())


@contextlib.contextmanager
def translated(what: str, where: str):
    """Turn SDK exceptions raised inside into mountd errors naming `what`."""
    try:
        yield
    except (ServiceRequestError, ServiceResponseError) as e:
        raise Unreachable(f"cannot reach {where}: {type(e).__name__}: {_first_line(e)}") from None
    except HttpResponseError as e:
        raise_for_status(e.status_code, getattr(e, "error_code", None), what, where)


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


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return redact(text[0][:300]) if text else ""
