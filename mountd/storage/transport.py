"""The one way storage requests reach the network: trust, proxies,
timeouts, keep-alive and connection reuse, decided once from the
environment and applied alike to the lean data path (reads, listings,
metadata) and to the Azure SDK's clients (writes), which are handed a
`requests` session whose adapter draws its connections from here.

Built on urllib3's pools. What this module adds to them:
- trust: the OS store, or the bundle the user names (precedence below);
  a certificate that does not verify fails at once as a configuration
  problem (`CertificateProblem`, exit 2), never retried as if transient;
- proxies: HTTPS_PROXY / HTTP_PROXY / NO_PROXY (and their lower-case
  forms) for every request, CONNECT tunnels for https;
- TCP keep-alive on every socket, and pooled connections idle for longer
  than `IDLE_EXPIRY` dropped before reuse: Azure's load balancers forget a
  flow that has been idle for 4 minutes without telling either end, and
  the next request on it would wait out the whole read timeout;
- interim answers (1xx other than 101) skipped, so the final answer is the
  one read and nothing of it is left on a pooled connection;
- failures of the transport raised as OSError (`TransportError`), which
  the callers' retry loops treat as transient.

Trust, in order of precedence (the first one set wins and replaces the
others): $REQUESTS_CA_BUNDLE, $CURL_CA_BUNDLE (each a bundle file or a
directory of hashed certificates), $SSL_CERT_FILE and/or $SSL_CERT_DIR,
then the operating system's store (certifi's bundle where the system has
none).
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import io
import os
import re
import socket
import ssl
import sys
import threading
import time
import types
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from mountd import __version__
from mountd.errors import ConfigError
from mountd.storage.retry import StoragePolicy, policy

# Pooled connections idle longer than this are closed rather than reused:
# below the 4 minutes after which Azure's load balancers silently drop a flow.
IDLE_EXPIRY = 180.0
# TCP keep-alive: the first probe after a minute of silence keeps a flow
# alive through load balancers and NAT, and a dead peer is noticed in ~2 min.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 60, 15, 4
# Connections kept per host: above the number of threads that talk at once,
# so none is thrown away and reopened under load.
POOL_SIZE = 64
USER_AGENT = f"mountd/{__version__} (Python {'.'.join(map(str, sys.version_info[:3]))}; urllib3 {urllib3.__version__})"

_TRUST_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
# retries=False, made once: urllib3 would build a Retry from it for every request.
_NO_RETRIES = urllib3.Retry(False, redirect=False)


class TransportError(OSError):
    """A request that failed on the way (connection, TLS, proxy, a broken
    or malformed answer): transient, retried by the caller."""


class TransportRefused(TransportError, ConnectionRefusedError):
    """Nothing accepts connections at the address (or the proxy's)."""


class CertificateProblem(ConfigError):
    """The server's certificate does not verify against the trust in force:
    retrying cannot help, the user must say which CA to trust."""


@dataclass(frozen=True)
class Settings:
    """What the environment says about the network, compared to tell
    whether a transport made earlier still applies."""

    ca_file: str | None
    ca_dir: str | None
    ca_source: str  # where the trust comes from, for messages
    http_proxy: str | None
    https_proxy: str | None
    no_proxy: str
    retry: StoragePolicy


def settings(environ=None) -> Settings:
    environ = os.environ if environ is None else environ

    def env(name: str) -> str | None:
        value = environ.get(name) or environ.get(name.lower())
        return value.strip() if value and value.strip() else None

    ca_file = ca_dir = None
    source = "the system's certificate store"
    for var in _TRUST_VARIABLES:
        value = environ.get(var)
        if value:
            if os.path.isdir(value):
                ca_dir = value
            elif os.path.isfile(value) and os.access(value, os.R_OK):
                ca_file = value
            else:
                raise ConfigError(f"${var} names {value}, which is not a readable CA bundle file or directory: "
                                  "point it at the bundle of the CA that signs your storage's certificate, or unset it")
            source = f"${var} ({value})"
            break
    else:
        for var in ("SSL_CERT_FILE", "SSL_CERT_DIR"):
            value = environ.get(var)
            if value and not os.path.exists(value):
                raise ConfigError(f"${var} names {value}, which does not exist: point it at your CA bundle "
                                  "(a file, or for $SSL_CERT_DIR a directory of hashed certificates), or unset it")
        if environ.get("SSL_CERT_FILE") or environ.get("SSL_CERT_DIR"):
            ca_file, ca_dir = environ.get("SSL_CERT_FILE") or None, environ.get("SSL_CERT_DIR") or None
            source = " and ".join(f"${v} ({environ[v]})" for v in ("SSL_CERT_FILE", "SSL_CERT_DIR") if environ.get(v))
    return Settings(ca_file, ca_dir, source, env("HTTP_PROXY"), env("HTTPS_PROXY"), env("NO_PROXY") or "",
                    policy(environ))


def _tls_context(s: Settings) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=s.ca_file, capath=s.ca_dir) if (s.ca_file or s.ca_dir) \
        else ssl.create_default_context()
    if not (s.ca_file or s.ca_dir) and not _system_store_present():
        import certifi  # a container image without ca-certificates: the bundle the SDK used to use
        ctx.load_verify_locations(cafile=certifi.where())
    return ctx


def _system_store_present() -> bool:
    paths = ssl.get_default_verify_paths()
    return bool((paths.cafile and os.path.isfile(paths.cafile))
                or (paths.capath and os.path.isdir(paths.capath) and os.listdir(paths.capath)))


# -- connections and pools ----------------------------------------------------
# An answer's header block that needs no more than a split of each line at
# its first colon: fields `Name: value` (a name of visible characters other
# than ':', a value on one line), then the empty line. The value is what the
# email package's compat32 policy makes of it: leading blanks dropped.
_PLAIN_BLOCK = re.compile(r"(?:[!-9;-~]+:[^\r\n]*\r?\n)*\r?\n")
_FIELD = re.compile(r"([!-9;-~]+):[ \t]*([^\r\n]*)\r?\n")


class _Fields(http.client.HTTPMessage):
    """An answer's header fields, the HTTPMessage that http.client and
    urllib3 expect, made without the email package's parser: that parser,
    and Message.get re-checking every field on each look-up, cost more CPU
    than the rest of a small ranged read's handling in urllib3 and
    http.client together (see `_parse_headers`). Look-ups scan the fields
    as Message does, first match wins, so the message stays a plain
    Message to anything that reads or changes it."""

    _headers: list[tuple[str, str]]  # Message's own list of fields (not in its type stubs)

    def get(self, name, failobj=None):
        name, size = name.lower(), len(name)
        for k, v in self._headers:
            if len(k) == size and k.lower() == name:  # (most names differ in length: no lower())
                return v
        return failobj

    def items(self):
        # Message.items passes each value through the policy, which changes
        # only values holding surrogates: latin-1 text from the wire has none.
        return list(self._headers)


def _parse_headers(fp, _class=None):
    """http.client.parse_headers, fast for the usual header block (see
    _PLAIN_BLOCK); anything else (folded lines, malformed fields, a block
    cut short) goes to http.client's own parser, defects and all. Measured
    on 4 KiB ranged reads from Azurite, medians of 8 rounds of 1 500:
    0.38 ms of CPU per request -> 0.29."""
    # its limits on line length and count (a private helper: not in the stubs)
    block = b"".join(http.client._read_headers(fp))  # type: ignore[attr-defined]
    text = block.decode("iso-8859-1")
    if not _PLAIN_BLOCK.fullmatch(text):
        return http.client.parse_headers(io.BytesIO(block))
    message = _Fields()
    message._headers = _FIELD.findall(text)
    message.set_payload("")  # as the email parser leaves it: nothing after the header block
    return message


def _with_globals(function, module, **replaced):
    """`function` (of `module`) as it is, but looking up the names in
    `replaced` as given here: a library's own method with one helper it
    calls swapped for ours, instead of a copy of its logic, and nothing
    changed for the library's other users."""
    copy = types.FunctionType(function.__code__, {**vars(module), **replaced}, function.__name__,
                              function.__defaults__, function.__closure__)
    copy.__kwdefaults__, copy.__doc__ = function.__kwdefaults__, function.__doc__
    return copy


class _Answer(http.client.HTTPResponse):
    """A response that reads past interim answers: http.client skips
    100 Continue only, and would take 103 Early Hints for the answer,
    leaving the real one on the connection for the next request. Its
    header fields are read by `_parse_headers`: http.client's own begin(),
    run with that function in place of its parse_headers."""

    begin = _with_globals(http.client.HTTPResponse.begin, http.client, parse_headers=_parse_headers)

    def _read_status(self):
        while True:
            version, status, reason = super()._read_status()  # type: ignore[misc]  # private: not in the stubs
            if not (100 < status < 200) or status == 101:
                return version, status, reason
            # the interim answer's headers, read and dropped (a private helper: not in the stubs)
            http.client._read_headers(self.fp)  # type: ignore[attr-defined]


_SOCKET_OPTIONS = HTTPConnection.default_socket_options + [
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE),
    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL),
    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT),
]


class _Connection(HTTPConnection):
    response_class = _Answer
    idle_since = 0.0


class _TLSConnection(HTTPSConnection):
    response_class = _Answer
    idle_since = 0.0


# A request target that urllib3 would send as it is: RFC 3986 path and
# query characters, percent-encodings in upper case, no fragment.
_SENDABLE_TARGET = re.compile(r"/(?:[\w\-.~!$&'()*+,;=:@/]|%[0-9A-F]{2})*"
                              r"(?:\?(?:[\w\-.~!$&'()*+,;=:@/?]|%[0-9A-F]{2})*)?", re.ASCII)


def _encode_target(target: str) -> str:
    """urllib3's _encode_target, skipped for a target it would not change
    (every one the lean path builds: it quotes names itself). urllib3
    checks the target one character at a time in Python. CPU per 4 KiB
    read from Azurite, medians of 8 rounds of 1 500: with a SAS (some 150
    characters of query) 0.302 ms -> 0.260, with the account key 0.272 ->
    0.263."""
    if _SENDABLE_TARGET.fullmatch(target):
        return target
    return urllib3.connectionpool._encode_target(target)


class _Expiring:
    """Pool behaviour: a connection given back records when; one taken that
    has been idle past IDLE_EXPIRY is closed, and reconnects on use.
    urlopen is urllib3's own, with `_encode_target` in place of its
    helper of that name."""

    urlopen = _with_globals(HTTPConnectionPool.urlopen, urllib3.connectionpool, _encode_target=_encode_target)

    def _put_conn(self, conn):
        if conn is not None:
            conn.idle_since = time.monotonic()
        super()._put_conn(conn)  # type: ignore[misc]  # the pool's, after this mixin

    def _get_conn(self, timeout=None):
        conn = super()._get_conn(timeout)  # type: ignore[misc]  # the pool's, after this mixin
        if conn.idle_since and time.monotonic() - conn.idle_since > IDLE_EXPIRY:
            conn.close()
        return conn


class _Pool(_Expiring, HTTPConnectionPool):
    ConnectionCls = _Connection


class _TLSPool(_Expiring, HTTPSConnectionPool):
    ConnectionCls = _TLSConnection


_POOL_CLASSES = {"http": _Pool, "https": _TLSPool}


class Transport:
    """Connection pools for every storage host, directly or through the
    proxy the environment names, with one TLS context. Thread-safe."""

    def __init__(self, s: Settings):
        self.settings = s
        self.ssl_context = _tls_context(s)
        self.timeout = urllib3.Timeout(connect=s.retry.connect_timeout, read=s.retry.read_timeout)
        self._kw: dict[str, Any] = dict(num_pools=32, maxsize=POOL_SIZE, block=False, timeout=self.timeout,
                                        retries=False, ssl_context=self.ssl_context, socket_options=_SOCKET_OPTIONS)
        self.direct = self._manager(urllib3.PoolManager(**self._kw))
        self._proxied: dict[str, urllib3.ProxyManager] = {}
        self._routes: dict[str, tuple] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _manager(manager):
        manager.pool_classes_by_scheme = _POOL_CLASSES
        return manager

    # -- choosing the way -------------------------------------------------------
    def proxy_for(self, url: str) -> str | None:
        """The proxy URL a request to `url` goes through, or None."""
        parts = urlsplit(url)
        proxy = self.settings.https_proxy if parts.scheme == "https" else self.settings.http_proxy
        if not proxy or _bypassed(parts.hostname or "", parts.port, self.settings.no_proxy):
            return None
        return proxy if "://" in proxy else "http://" + proxy

    def manager_for(self, url: str) -> urllib3.PoolManager:
        proxy = self.proxy_for(url)
        if proxy is None:
            return self.direct
        with self._lock:
            manager = self._proxied.get(proxy)
            if manager is None:
                parts = urlsplit(proxy)
                if not parts.hostname:  # e.g. "http://:3128"
                    var = "$HTTPS_PROXY" if urlsplit(url).scheme == "https" else "$HTTP_PROXY"
                    raise ConfigError(f"{var} names a proxy without a host: set it to http://HOST:PORT, or unset it")
                headers = {}
                if parts.username is not None:  # user info: basic proxy authentication, never logged
                    auth = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
                    headers["Proxy-Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
                netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
                manager = self._manager(urllib3.ProxyManager(f"{parts.scheme}://{netloc}",
                                                             proxy_headers=headers, **self._kw))
                self._proxied[proxy] = manager
            return manager

    def pool_for(self, url: str):
        """The urllib3 connection pool a request to `url` is sent on."""
        return self.manager_for(url).connection_from_url(url)

    # -- sending ----------------------------------------------------------------
    def request(self, method: str, url: str, headers: dict, body: bytes | None = None,
                preload: bool = True) -> urllib3.BaseHTTPResponse:
        """Send one request (no retries, no redirects) and return the answer;
        with `preload` False its body is left to read (see `body_reader`).
        Raises CertificateProblem or TransportError."""
        cut = url.find("/", url.find("//") + 2)
        origin, target = (url[:cut], url[cut:]) if cut >= 0 else (url, "/")
        try:
            pool, absolute = self._route(origin)
            return pool.urlopen(method, url if absolute else target, body=body,
                                headers={"User-Agent": USER_AGENT, **headers}, redirect=False,
                                assert_same_host=False, retries=_NO_RETRIES, preload_content=preload,
                                decode_content=False, timeout=self.timeout)
        except urllib3.exceptions.HTTPError as e:
            raise self.translate(e, url) from None

    def _route(self, origin: str):
        """(the pool for requests to `origin`, whether they name the whole URL
        (plain HTTP through a proxy)). Remembered per origin: the pool
        manager's own look-up would parse the URL again for every request."""
        route = self._routes.get(origin)
        if route is None or route[0].pool is None:  # none yet, or closed by the manager
            pool = self.pool_for(origin + "/")
            route = self._routes[origin] = (pool, origin.startswith("http:") and self.proxy_for(origin) is not None)
        return route

    def translate(self, error: BaseException, url: str) -> Exception:
        """The mountd error for a failure of the transport (also one the SDK's
        transport raised for a request to `url`)."""
        problem = certificate_problem(error)
        if problem is not None:
            host = urlsplit(url).netloc
            return CertificateProblem(
                f"the TLS certificate of {host} does not verify ({problem}) against "
                f"{self.settings.ca_source}: if a private CA signs it, point SSL_CERT_FILE or "
                "REQUESTS_CA_BUNDLE at that CA's certificate bundle")
        proxy = self.proxy_for(url)
        where = f" (through the proxy {_bare(proxy)})" if proxy else ""
        kind = TransportRefused if _wraps(error, ConnectionRefusedError) else TransportError
        return kind(f"{_describe(error)}{where}")

    def requests_session(self):
        """A `requests` session for the Azure SDK whose connections come from
        this transport: same trust, proxies, keep-alive and idle expiry."""
        import requests
        session = requests.Session()
        session.trust_env = False  # the environment has been read here, once, for both paths
        from requests.adapters import HTTPAdapter
        adapter = cast(HTTPAdapter, _SessionAdapter(self))  # what its __new__ makes
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        return session


def release(response) -> None:
    """Give a preload=False answer's connection back if its body was read
    to the end; otherwise close it (the rest is still on the wire)."""
    if not body_reader(response).isclosed():
        response.close()
    response.release_conn()


def drain(response, limit: int = 1024 * 1024) -> None:
    """Read a small body (an error answer) so its connection can be reused."""
    body = body_reader(response)
    try:
        if body.length is None or body.length <= limit:
            body.read()
    except (OSError, http.client.HTTPException):
        pass


def body_reader(response) -> http.client.HTTPResponse:
    """The http.client response under a urllib3 answer read with
    preload=False: its readinto() fills the caller's buffer straight from
    the socket (urllib3's own readinto reads into a new bytes object and
    copies it, a second pass over every byte and fresh memory each time)."""
    return response._fp


def _chain(error: BaseException | None):
    """`error` and every exception it wraps, once each: urllib3, requests
    and azure-core each wrap the cause once more (in args, `reason`,
    `inner_exception`, or as cause or context)."""
    todo, seen = [error], set()
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]
        todo += [getattr(e, "reason", None), getattr(e, "inner_exception", None), e.__cause__, e.__context__]


def _wraps(error: BaseException | None, kind: type) -> bool:
    return any(isinstance(e, kind) for e in _chain(error))


def certificate_problem(error: BaseException | None) -> str | None:
    """The reason a certificate failed to verify, if that is what `error`
    is or wraps."""
    for e in _chain(error):
        if isinstance(e, ssl.SSLCertVerificationError):
            return e.verify_message or str(e)
        if isinstance(e, ssl.CertificateError):
            return str(e)
    return None


def _describe(error: BaseException) -> str:
    reason = getattr(error, "reason", None)
    if isinstance(reason, BaseException):
        return f"{type(reason).__name__}: {reason}"
    return f"{type(error).__name__}: {error}"


def _bare(proxy: str | None) -> str:
    """A proxy URL without its user info (which may hold a password)."""
    parts = urlsplit(proxy or "")
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


def _bypassed(host: str, port: int | None, no_proxy: str) -> bool:
    """NO_PROXY as curl and requests read it: '*', host names and domain
    suffixes (with or without a leading dot), IP addresses and CIDR ranges,
    each optionally with ':port'."""
    host = host.lower().strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*":
            return True
        name, _, entry_port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if entry_port and entry_port.isdigit() and port is not None and int(entry_port) != port:
            continue
        name = name.strip("[]")
        if address is not None:
            try:
                if address in ipaddress.ip_network(name, strict=False):
                    return True
            except ValueError:
                pass
            continue
        name = name.lstrip(".")
        if host == name or host.endswith("." + name):
            return True
    return False


class _SessionAdapter:
    """Made lazily: requests is imported only when the SDK is."""

    def __new__(cls, transport: Transport):
        from requests.adapters import HTTPAdapter

        class Adapter(HTTPAdapter):
            """requests' adapter on the transport's pools: the transport
            decides the proxy and the trust (requests would add certifi's
            bundle to every https pool and read the environment on its own)."""

            def __init__(self):
                super().__init__(pool_connections=4, pool_maxsize=POOL_SIZE, max_retries=0)

            def send(self, request, **kwargs):  # type: ignore[override]  # passes requests' own arguments on
                proxy = transport.proxy_for(request.url)
                kwargs["proxies"] = {urlsplit(request.url).scheme: proxy} if proxy else {}
                return super().send(request, **kwargs)

            def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
                return transport.pool_for(request.url)

            def cert_verify(self, conn, url, verify, cert):
                pass  # the pool's TLS context verifies

            def close(self):
                pass  # the pools are the transport's

        return Adapter()


_current: Transport | None = None
_current_lock = threading.Lock()


def transport(environ=None) -> Transport:
    """The transport for the environment in force (made again when the
    trust, proxy or timeout variables change)."""
    global _current
    s = settings(environ)
    with _current_lock:
        if _current is None or _current.settings != s:
            _current = Transport(s)
        return _current
