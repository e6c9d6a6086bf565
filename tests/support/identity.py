"""A managed-identity token endpoint on loopback, for the OAuth lanes.

Azure ML compute and App Service hand a process its managed identity through
two variables: IDENTITY_ENDPOINT (a local HTTP URL) and IDENTITY_HEADER (a
secret). azure-identity's ManagedIdentityCredential (via MSAL) then asks

    GET $IDENTITY_ENDPOINT?api-version=2019-08-01&resource=https://storage.azure.com
        [&client_id=... | &mi_res_id=... | &object_id=...]   (user-assigned)
    X-IDENTITY-HEADER: $IDENTITY_HEADER
    Metadata: true

and expects JSON with `access_token`, `expires_on` (epoch seconds, a string
on the real service), `resource` and `token_type`. This server speaks that
protocol and issues JWTs that Azurite's `--oauth basic` and the Files
emulator accept: they check that the token decodes, that `iat`, `nbf` and
`exp` are present and now lies within nbf..exp, that `iss` starts with a
known Entra issuer (https://sts.windows.net/...) and that `aud` is storage's
(https://storage.azure.com, its app id, or the account's own endpoint).
Neither checks the signature; tokens are signed HS256 with `SIGNING_KEY`
anyway, so they are well-formed JWTs.

For tests of token handling it counts what it issued, records every
request (client_id asked for, resource, whether the secret header was
right), refuses requests without the right header (401, as a request
without the secret must not get a token), and takes a script of faults:
`fail_next(n, status)` answers the next n requests with an error,
`stall_next(n, seconds)` holds them before answering (`release()` lets
them go early). Settings such as `lifetime`, `audience` or `issuer` can be
changed between requests to issue short-lived or unacceptable tokens.

Behaviours of the client side (azure-identity 1.27, MSAL 1.39) worth
knowing when writing such tests: azure-core's retry policy inside the
credential retries 408, 429, 500, 502, 503 and 504 answers itself, at most
3 times (at once, after 1.6 s, after 3.2 s), then raises
CredentialUnavailableError, which DefaultAzureCredential takes as "try the
next credential"; MSAL remembers a 429/5xx answer for 5 s and replays it to
the same credential without a request; and MSAL serves a cached token until
5 minutes before it expires, so a `lifetime` under 300 s means a request
to the endpoint for every token wanted."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from tests.support.background import BackgroundServer

STORAGE_RESOURCE = "https://storage.azure.com"
TENANT_ID = "72f988bf-0000-4000-8000-00000000c0de"  # made up; any GUID-looking id does
ISSUER = f"https://sts.windows.net/{TENANT_ID}/"
SYSTEM_CLIENT_ID = "5a1ce5e1-0000-4000-8000-00000000a11e"  # the system-assigned identity's app id
SIGNING_KEY = b"mountd-tests-not-a-secret"
API_VERSIONS = ("2019-08-01",)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(claims: dict, key: bytes = SIGNING_KEY) -> str:
    """An HS256-signed JWT with these claims."""
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    payload = _b64url(json.dumps(claims, separators=(",", ":")).encode())
    signature = hmac.new(key, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64url(signature)}"


def decode_jwt(token: str) -> dict:
    """The claims of a JWT, unverified (ValueError if it is not one)."""
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("not a JWT")
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error) as error:
        raise ValueError(f"not a JWT: {error}") from None
    if not isinstance(claims, dict):
        raise ValueError("not a JWT: claims are not an object")
    return claims


def storage_token(lifetime: float = 3600, audience: str = STORAGE_RESOURCE, issuer: str = ISSUER,
                  client_id: str | None = None, now: float | None = None, **extra) -> str:
    """A token of the shape Entra issues a managed identity for storage."""
    now = int(time.time() if now is None else now)
    claims = {
        "aud": audience, "iss": issuer, "iat": now, "nbf": now, "exp": int(now + lifetime),
        "appid": client_id or SYSTEM_CLIENT_ID, "appidacr": "2", "idtyp": "app",
        "oid": str(uuid.uuid5(uuid.NAMESPACE_URL, client_id or "system")),
        "sub": str(uuid.uuid5(uuid.NAMESPACE_URL, client_id or "system")),
        "tid": TENANT_ID, "uti": uuid.uuid4().hex[:22], "ver": "1.0",
    }
    claims.update(extra)
    return make_jwt(claims)


@dataclass
class TokenRequest:
    """One request the endpoint saw."""

    path: str
    params: dict                 # query parameters (first value of each)
    header_ok: bool              # X-IDENTITY-HEADER carried the secret
    status: int = 0              # what it was answered
    token: str | None = None     # the token issued, if any

    @property
    def client_id(self) -> str | None:
        return self.params.get("client_id")

    @property
    def resource(self) -> str | None:
        return self.params.get("resource")


@dataclass
class _Fault:
    kind: str           # "fail" or "stall"
    status: int = 500
    seconds: float = 0.0
    body: dict = field(default_factory=dict)


class IdentityEndpoint(BackgroundServer):
    """The token server; `start()` it (or use `with`), read `env()`."""

    thread_name = "identity-endpoint"

    def __init__(self, secret: str | None = None, lifetime: float = 3600, audience: str | None = None,
                 issuer: str = ISSUER, path: str = "/msi/token"):
        self.secret = secret or uuid.uuid4().hex
        self.lifetime = lifetime        # seconds a token lives; under 300 MSAL refetches every time
        self.audience = audience        # None: the resource asked for (what Entra does)
        self.issuer = issuer
        self.path = path
        self.requests: list[TokenRequest] = []
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        self._release = threading.Event()
        super().__init__()

    # ----- lifecycle --------------------------------------------------------

    def _make_server(self):
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.endpoint = self
        return server

    def stop(self) -> None:
        self._release.set()  # stalled requests end now
        super().stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def env(self) -> dict[str, str]:
        """The variables by which a process finds this endpoint."""
        return {"IDENTITY_ENDPOINT": self.url, "IDENTITY_HEADER": self.secret}

    # ----- what happened ----------------------------------------------------

    @property
    def tokens_issued(self) -> int:
        with self._lock:
            return sum(1 for r in self.requests if r.token)

    @property
    def tokens(self) -> list[str]:
        with self._lock:
            return [r.token for r in self.requests if r.token]

    @property
    def client_ids(self) -> list[str | None]:
        """The client_id of each request with the right secret (None: the
        system-assigned identity), in order."""
        with self._lock:
            return [r.client_id for r in self.requests if r.header_ok]

    @property
    def refused(self) -> int:
        """Requests turned away for a missing or wrong secret header."""
        with self._lock:
            return sum(1 for r in self.requests if not r.header_ok)

    # ----- scripted faults --------------------------------------------------

    def fail_next(self, n: int = 1, status: int = 500, message: str = "scripted failure") -> None:
        """Answer the next n requests (with the right secret) with `status`."""
        with self._lock:
            self._faults += [_Fault("fail", status=status, body={"statusCode": status, "message": message})
                             for _ in range(n)]

    def stall_next(self, n: int = 1, seconds: float = 60.0) -> None:
        """Hold the next n requests `seconds` (or until `release()`) before
        answering them normally; a client with a shorter timeout gives up."""
        with self._lock:
            self._release.clear()
            self._faults += [_Fault("stall", seconds=seconds) for _ in range(n)]

    def release(self) -> None:
        """Let stalled requests go now."""
        self._release.set()

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    # ----- the protocol -----------------------------------------------------

    def _answer(self, record: TokenRequest) -> tuple[int, dict]:
        if not record.header_ok:
            return 401, {"statusCode": 401, "message": "X-IDENTITY-HEADER is missing or wrong"}
        with self._lock:
            fault = self._faults.pop(0) if self._faults else None
        if fault is not None and fault.kind == "fail":
            return fault.status, fault.body
        if fault is not None and fault.kind == "stall":
            self._release.wait(fault.seconds)
        if urlsplit(self.url).path.rstrip("/") != record.path.rstrip("/"):
            return 404, {"statusCode": 404, "message": f"no such path {record.path}"}
        if record.params.get("api-version") not in API_VERSIONS:
            return 400, {"statusCode": 400, "message": "api-version is missing or not supported"}
        resource = record.resource
        if not resource:
            return 400, {"statusCode": 400, "message": "resource is required"}
        lifetime = self.lifetime
        token = storage_token(lifetime=lifetime, audience=self.audience or resource, issuer=self.issuer,
                              client_id=record.client_id)
        record.token = token
        expires_on = int(time.time() + lifetime)
        return 200, {"access_token": token, "expires_on": str(expires_on), "resource": resource,
                     "token_type": "Bearer", "client_id": record.client_id or SYSTEM_CLIENT_ID}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ThreadingHTTPServer

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - signature from the base class
        pass

    def do_GET(self) -> None:
        endpoint: IdentityEndpoint = self.server.endpoint
        target = urlsplit(self.path)
        params = {name: values[0] for name, values in parse_qs(target.query, keep_blank_values=True).items()}
        given = self.headers.get("X-IDENTITY-HEADER")
        record = TokenRequest(target.path, params, header_ok=given is not None and
                              hmac.compare_digest(given, endpoint.secret))
        with endpoint._lock:
            endpoint.requests.append(record)
        status, body = endpoint._answer(record)
        record.status = status
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up on a stalled answer

    do_POST = do_GET
