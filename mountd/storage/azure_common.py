"""What the Azure backends (blob, file share) share: the HTTP transport tuned
for throughput, client options, credentials, and translation of SDK errors
into mountd's errors."""

from __future__ import annotations

import contextlib

import requests
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.pipeline.transport import RequestsTransport

from mountd.config.credentials import Credential
from mountd.redact import redact
from mountd.errors import AlreadyExists, ConfigError, NotEmpty, NotFound, Stale, StorageError, Unreachable
from mountd.storage.retry import BackoffRetry

# The SDK reads response bodies in pieces of this size; its 4 KiB default
# costs over half the download throughput in Python.
DATA_BLOCK_SIZE = 256 * 1024
CONNECTION_TIMEOUT = 10  # seconds to connect
READ_TIMEOUT = 60  # seconds without a byte before a read is abandoned and retried
# Connections kept per host; above the number of threads that talk at once,
# so none is thrown away and reopened under load.
POOL_SIZE = 64


def make_transport() -> RequestsTransport:
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=POOL_SIZE, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return RequestsTransport(session=session, session_owner=True,
                             connection_timeout=CONNECTION_TIMEOUT, read_timeout=READ_TIMEOUT,
                             connection_data_block_size=DATA_BLOCK_SIZE)


def client_options(**extra) -> dict:
    return dict(transport=make_transport(), retry_policy=BackoffRetry(),
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


@contextlib.contextmanager
def translated(what: str, where: str):
    """Turn SDK exceptions raised inside into mountd errors naming `what`."""
    try:
        yield
    except ResourceModifiedError:
        raise Stale(f"{what} changed in storage while it was being read") from None
    except ResourceNotFoundError as e:
        code = getattr(e, "error_code", None) or ""
        if code in ("ContainerNotFound", "ShareNotFound"):
            raise ConfigError(f"{where} does not exist") from None
        if code == "ParentNotFound":
            raise NotFound(f"{what}: parent directory does not exist") from None
        raise NotFound(f"{what} does not exist") from None
    except ResourceExistsError as e:
        code = getattr(e, "error_code", None) or ""
        if code == "DirectoryNotEmpty":
            raise NotEmpty(f"{what} is not empty") from None
        raise AlreadyExists(f"{what} already exists") from None
    except ClientAuthenticationError as e:
        code = getattr(e, "error_code", None) or e.status_code
        raise Unreachable(f"{where} refused the credentials ({code})") from None
    except (ServiceRequestError, ServiceResponseError) as e:
        raise Unreachable(f"cannot reach {where}: {type(e).__name__}: {_first_line(e)}") from None
    except HttpResponseError as e:
        if e.status_code == 412:
            raise Stale(f"{what} changed in storage while it was being read") from None
        if e.status_code == 403:
            raise Unreachable(f"{where} refused access ({getattr(e, 'error_code', None) or 403})") from None
        code = getattr(e, "error_code", None) or ""
        raise StorageError(f"{what}: storage answered {e.status_code} {code}".rstrip()) from None


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return redact(text[0][:300]) if text else ""
