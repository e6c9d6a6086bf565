"""Everything that needs the Azure SDK packages: client options and
credentials, the SDK's retry policy, and SDK errors turned into mountd's.

The clients run on the one storage transport (`transport`: same trust,
proxies, keep-alive as the lean data path); their retry policy asks
`retry.StoragePolicy`, as every retry loop does.

Importing the SDK costs a quarter of a second of CPU, and reads, listings
and metadata go through the lean data path (`azure_http`) without it; the
backends import this module only when a call needs an SDK client (a
write, a rename, creating a container).
"""

from __future__ import annotations

import base64
import contextlib
import threading
from typing import Any

from azure.core.exceptions import (AzureError, ClientAuthenticationError, HttpResponseError, ServiceRequestError,
                                   ServiceResponseError)
from azure.core.pipeline.policies import HTTPPolicy, RequestHistory
from azure.core.pipeline.transport import RequestsTransport

from mountd.errors import Unreachable, first_line
from mountd.storage.azure_common import raise_for_status
from mountd.storage.azure_http import API_VERSION, Signer
from mountd.storage.retry import StoragePolicy, policy, retry_after, transient_answer
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
        raise Unreachable(f"cannot reach {where}: {type(e).__name__}: {first_line(e)}") from None
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


# What the storage SDK's pipeline hands the retry policy in a request's
# options (its hosts policy: primary/secondary endpoints; per-call retry
# settings): consumed here, as they must not reach the transport.
_STORAGE_OPTIONS = ("hosts", "location_mode", "retry_to_secondary", "retry_hook", "retry_connect", "retry_read",
                    "retry_status")


class BackoffRetry(HTTPPolicy):
    """The SDK clients' retry policy, an azure-core pipeline policy that
    asks the one storage policy (`retry.StoragePolicy`) what to retry and
    how long to wait. It retries a connection that fails or breaks (but not
    one whose certificate does not verify) and a transient answer, within
    one budget; a streamed body is sent again from where it started, or not
    at all when it cannot be rewound. (Built on azure-core's public policy
    interface: the storage SDK's own retry classes are private, and wait 15 s
    before a first retry.)"""

    def __init__(self, retries: int = 6, initial: float = 0.5, maximum: float = 20.0,
                 policy: StoragePolicy | None = None):
        super().__init__()
        self.policy = policy or StoragePolicy(retries=retries, backoff=initial, backoff_max=maximum)

    @classmethod
    def from_policy(cls, p: StoragePolicy) -> "BackoffRetry":
        return cls(policy=p)

    def get_backoff_time(self, settings: dict) -> float:
        """Seconds before the next retry, `settings` holding the retries
        made ("count") and the failed tries ("history", RequestHistory)."""
        history = settings.get("history") or []
        response = getattr(history[-1], "http_response", None) if history else None
        after = retry_after(response.headers) if response is not None else None
        return self.policy.wait(settings["count"] + 1, after)

    def send(self, request):
        options = request.context.options
        location_mode = options.get("location_mode", "primary")
        for name in _STORAGE_OPTIONS:
            options.pop(name, None)
        budget = StoragePolicy(retries=options.pop("retry_total", self.policy.retries))  # a call may set its own
        body = request.http_request.body
        position = _position(body)
        settings: dict[str, Any] = {"count": 0, "history": []}
        while True:
            try:
                response = self.next.send(request)
            except ClientAuthenticationError:
                raise  # a request that cannot be signed, or no token: not the network
            except AzureError as e:  # the connection failed, broke off or stalled
                if certificate_problem(e):
                    raise  # no retry will make the certificate verify
                settings["history"].append(RequestHistory(request.http_request, error=e))
                if not self._again(settings, budget, body, position):
                    raise
            else:
                answer = response.http_response
                if not transient_answer(answer.status_code, answer.headers):
                    break
                settings["history"].append(RequestHistory(request.http_request, http_response=answer))
                if not self._again(settings, budget, body, position):
                    break
            request.context.transport.sleep(self.get_backoff_time(settings))
            settings["count"] += 1
            RETRIES_SEEN.count += 1
        if settings["history"]:
            response.context["history"] = settings["history"]
        response.http_response.location_mode = location_mode  # the SDK's deserializers read it
        return response

    @staticmethod
    def _again(settings: dict, budget: StoragePolicy, body, position: int | None) -> bool:
        """Whether a retry is left and the request can be sent again."""
        if budget.spent(settings["count"] + 1):
            return False
        if hasattr(body, "read"):
            if position is None:
                return False
            try:
                body.seek(position)
            except (OSError, ValueError):
                return False
        return True


def _position(body) -> int | None:
    """Where a streamed request body starts (None: not a stream that can say)."""
    if not hasattr(body, "read"):
        return None
    try:
        return body.tell()
    except (AttributeError, OSError):
        return None
