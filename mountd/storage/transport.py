"""The one way storage requests reach the network: trust, proxies,
timeouts, keep-alive and connection reuse, decided once from the
environment and applied alike to the lean data path (reads, listings,
metadata) and to the Azure SDK's clients (writes), which are handed a
`requests` session whose adapter draws its connections from here.

Built on urllib3's pools. What this module adds to them:
- trust: the OS store, or the bundle the user names (precedence: see
  `network`, which reads the environment);
  a certificate that does not verify fails at once as a configuration
  problem (`CertificateProblem`, exit 2), never retried as if transient;
- proxies: HTTPS_PROXY / HTTP_PROXY / NO_PROXY (and their lower-case
  forms) for every request, CONNECT tunnels for https;
- TCP keep-alive on every socket, and pooled connections idle for longer
  than `IDLE_EXPIRY` dropped before reuse: Azure's load balancers forget a
  flow that has been idle for 4 minutes without telling either end, and
  the next request on it would wait out the whole read timeout;
- answers read with interim answers skipped: the ranged reads' by a
  reader of their own, anything else by http.client (`wire`);
- failures of the transport raised as OSError (`TransportError`), which
  the callers' retry loops treat as transient.
"""

from __future__ import annotations

import base64
import http.client
import socket
import ssl
import sys
import threading
import time
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from mountd import __version__
from mountd.errors import ConfigError
from mountd.storage.network import Settings, bare_proxy, bypassed, settings, tls_context
from mountd.storage.wire import Answer, Link, Reply, encode_target, with_globals

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


# -- connections and pools ----------------------------------------------------
_SOCKET_OPTIONS = HTTPConnection.default_socket_options + [
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE),
    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL),
    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT),
]


class _Connection(HTTPConnection):
    response_class = Answer
    idle_since = 0.0
    link: Link | None = None  # how Transport.get talks on its socket


class _TLSConnection(HTTPSConnection):
    response_class = Answer
    idle_since = 0.0
    link: Link | None = None


def host_field(conn) -> str:
    """The Host field http.client's putrequest writes for `conn`."""
    host = f"[{conn.host}]" if ":" in conn.host else conn.host
    return host if conn.port == conn.default_port else f"{host}:{conn.port}"


class _Expiring:
    """Pool behaviour: a connection given back records when; one taken that
    has been idle past IDLE_EXPIRY is closed, and reconnects on use.
    urlopen is urllib3's own, with `encode_target` in place of its
    helper of that name."""

    urlopen = with_globals(HTTPConnectionPool.urlopen, urllib3.connectionpool, _encode_target=encode_target)

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
        self.ssl_context = tls_context(s)
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
        if not proxy or bypassed(parts.hostname or "", parts.port, self.settings.no_proxy):
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
        with `preload` False its body is left to read (`body_reader`,
        `release`).
        Raises CertificateProblem or TransportError."""
        origin, target = _origin_and_target(url)
        try:
            pool, absolute = self._route(origin)
            return pool.urlopen(method, url if absolute else target, body=body,
                                headers={"User-Agent": USER_AGENT, **headers}, redirect=False,
                                assert_same_host=False, retries=_NO_RETRIES, preload_content=preload,
                                decode_content=False, timeout=self.timeout)
        except urllib3.exceptions.HTTPError as e:
            raise self.translate(e, url) from None

    def get(self, url: str, headers: dict) -> Answer:
        """Send a GET (no body, no retries) and return the answer with its
        body left to read; give it back with `release`. Raises
        CertificateProblem or TransportError.

        The ranged reads' path: on a direct route it takes a connection
        from the same pool as `request` (same TLS context, socket options,
        idle expiry) and writes the request and reads the answer itself
        (`wire.Link`): urllib3's per-request wrapping, and then
        http.client's, cost more CPU than a small read's whole remaining
        handling. 4 KiB reads from Azurite, one thread, CPU per read:
        0.241 ms through urlopen, 0.205 ms through http.client's request
        and response; in later paired rounds 0.177 ms that way and 0.133
        through `wire.Link` (see `wire`). Through a proxy (CONNECT tunnels,
        absolute targets, proxy headers) it is `request`."""
        origin, target = _origin_and_target(url)
        try:
            pool, _ = self._route(origin)
            # (a pool closed meanwhile raises ClosedPoolError)
            conn = pool._get_conn() if pool.proxy is None else None
        except urllib3.exceptions.HTTPError as e:
            raise self.translate(e, url) from None
        if conn is None:  # through a proxy
            wrapper = self.request("GET", url, headers, preload=False)
            answer = cast(Answer, wrapper._fp)  # type: ignore[attr-defined]  # the http.client answer it wraps
            answer.wrapper = wrapper
            return answer
        try:
            if conn.is_closed:
                conn.timeout = self.timeout.connect_timeout
                conn.connect()
            sock = conn.sock
            if sock.gettimeout() != self.timeout.read_timeout:  # the SDK's requests may have set another
                sock.settimeout(self.timeout.read_timeout)
            link = conn.link
            if link is None or link.sock is not sock:  # a new connection, or one made again
                link = conn.link = Link(sock, host_field(conn))
            link.send_get(encode_target(target), USER_AGENT, headers)
            answer = link.answer()
        except BaseException as e:
            conn.close()
            pool._put_conn(conn)
            if isinstance(e, (OSError, http.client.HTTPException, urllib3.exceptions.HTTPError)):
                raise self.translate(e, url) from None
            raise
        answer.home = (pool, conn)
        return answer

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
        where = f" (through the proxy {bare_proxy(proxy)})" if proxy else ""
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


def _origin_and_target(url: str) -> tuple[str, str]:
    """('scheme://host:port', '/path?query') of an absolute URL, without
    parsing it again (the lean path builds every URL itself)."""
    cut = url.find("/", url.find("//") + 2)
    return (url[:cut], url[cut:]) if cut >= 0 else (url, "/")


def body_reader(response) -> Answer | Reply:
    """The answer to read a body from: an answer from `Transport.get`
    itself, or the http.client one under a urllib3 response read with
    preload=False (urllib3's own readinto reads into a new bytes object and
    copies it: a second pass over every byte, fresh memory each time)."""
    return response if isinstance(response, (Answer, Reply)) else response._fp


def release(response) -> None:
    """Give the connection of an answer (from `Transport.get`, or
    `request` with preload=False) back to its pool if the body was read to
    the end; otherwise close it (the rest is still on the wire)."""
    answer = body_reader(response)
    owner = answer.wrapper if answer is response else response  # a urllib3 response, if one owns it
    if owner is not None:
        if not answer.isclosed():
            owner.close()
        owner.release_conn()
    elif answer.home is not None:
        pool, conn = answer.home
        answer.home = None
        if not answer.reusable():
            answer.close()
            conn.close()
        pool._put_conn(conn)


def drain(response, limit: int = 1024 * 1024) -> None:
    """Read a small body (an error answer) so its connection can be reused."""
    answer = body_reader(response)
    try:
        if answer.length is None or answer.length <= limit:
            answer.read()
    except (OSError, http.client.HTTPException):
        pass


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
