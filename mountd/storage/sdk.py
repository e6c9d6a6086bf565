"""Everything that needs the Azure SDK packages: their clients on the one
storage transport (`transport`: same trust, proxies, keep-alive as the
lean data path), client options, credentials, the retry policy, and the
translation of SDK errors into mountd's errors.

Importing the SDK costs a quarter of a second of CPU, and reads, listings
and metadata go through the lean data path (`azure_http`) without it; the
backends import this module only when a call needs an SDK client (a
write, a rename, creating a container).
"""

from __future__ import annotations

import base64
import contextlib
import threading

from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError
from azure.core.pipeline.transport import RequestsTransport
from azure.storage.blob._shared.policies import StorageRetryPolicy

from mountd.errors import Unreachable
from mountd.redact import redact
from mountd.storage.azure_common import raise_for_status
from mountd.storage.azure_http import API_VERSION, Signer
from mountd.storage.retry import StoragePolicy, policy, retry_after
from mountd.storage.transport import USER_AGENT, certificate_problem, transport

# The SDK reads response bodies in pieces of this size; its 4 KiB default
# costs over half the download throughput in Python.
DATA_BLOCK_SIZE = 256 * 1024


def make_transport(p: StoragePolicy | None = None) -> RequestsTransport:
    """The SDK's transport on the storage transport's connections. Connect
    and read timeouts bound every SDK call (the read timeout is the longest
    wait for a byte, not for a whole answer)."""
    p = p or policy()
    return RequestsTransport(session=transport().requests_session(), session_owner=True,
                             connection_timeout=p.connect_timeout, read_timeout=p.read_timeout,
                             connection_data_block_size=DATA_BLOCK_SIZE)


def client_options(p: StoragePolicy | None = None, **extra) -> dict:
    p = p or policy()
    # the SDK adds its own name and version after ours in User-Agent
    return dict(transport=make_transport(p), retry_policy=BackoffRetry.from_policy(p),
                connection_data_block_size=DATA_BLOCK_SIZE, user_agent=USER_AGENT, api_version=API_VERSION,
                **extra)


def client_credential(signer: Signer):
    """The SDK credential for the secret a lean-path signer holds (the same
    key, SAS or token source, so both paths authenticate alike). A SAS goes
    as a string: it then travels in the URL, and a copy or rename names its
    source with it."""
    if signer.key is not None:
        return {"account_name": signer.account_name, "account_key": base64.b64encode(signer.key).decode()}
    if signer.token_credential is not None:
        return signer.token_credential
    return signer.sas  # None: anonymous


@contextlib.contextmanager
def translated(what: str, where: str, url: str = ""):
    """Turn SDK exceptions raised inside into mountd errors naming `what`
    (`url`: the account's, for a certificate that does not verify)."""
    try:
        yield
    except (ServiceRequestError, ServiceResponseError) as e:
        if certificate_problem(e):
            raise transport().translate(e, url) from None
        raise Unreachable(f"cannot reach {where}: {type(e).__name__}: {_first_line(e)}") from None
    except HttpResponseError as e:
        raise_for_status(e.status_code, getattr(e, "error_code", None), what, where, _request_id(e))


def _request_id(error: HttpResponseError) -> str | None:
    """The x-ms-client-request-id of the request an SDK error is about (the
    service echoes it; the SDK set it on the request)."""
    response = getattr(error, "response", None)
    for headers in (getattr(response, "headers", None), getattr(getattr(response, "request", None), "headers", None)):
        if headers and headers.get("x-ms-client-request-id"):
            return headers["x-ms-client-request-id"]
    return None


class _RetriesSeen(threading.local):
    count = 0


# SDK retries made so far by the current thread: a caller can tell whether
# the call it just made was sent more than once (and so whether a "already
# exists" answer may be about its own first attempt).
RETRIES_SEEN = _RetriesSeen()


class BackoffRetry(StorageRetryPolicy):
    def __init__(self, retries: int = 6, initial: float = 0.5, maximum: float = 20.0, **kwargs):
        self.initial = initial
        self.maximum = maximum
        kwargs.setdefault("retry_connect", retries)
        kwargs.setdefault("retry_read", retries)
        kwargs.setdefault("retry_status", retries)
        super().__init__(retry_total=retries, **kwargs)

    @classmethod
    def from_policy(cls, p: StoragePolicy) -> "BackoffRetry":
        return cls(retries=p.retries, initial=p.backoff, maximum=p.backoff_max)

    def increment(self, settings, request, response=None, error=None) -> bool:
        if certificate_problem(error):
            return False  # no retry will make the certificate verify
        again = super().increment(settings, request, response=response, error=error)
        if again:
            RETRIES_SEEN.count += 1
        return again

    def get_backoff_time(self, settings) -> float:
        history = settings.get("history") or []
        response = getattr(history[-1], "http_response", None) if history else None
        if response is not None:
            after = retry_after(response.headers)
            if after is not None:
                return after
        return StoragePolicy(backoff=self.initial, backoff_max=self.maximum).backoff_time(settings["count"] + 1)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return redact(text[0][:300]) if text else ""
