"""A forward HTTP proxy on loopback, for tests of traffic that must go
through one (as it often must on real compute nodes, via HTTPS_PROXY).

It understands the two things clients ask of a proxy:

* `CONNECT host:port`: a tunnel, for https; the proxy sees no more than the
  target, and relays bytes both ways until either side closes.
* absolute-URI requests (`GET http://host:port/path HTTP/1.1`), for plain
  http; each is forwarded on a new upstream connection with the hop-by-hop
  headers removed, and the answer relayed back on the client's keep-alive
  connection.

Every request is logged (`log`: method, host, port, path for plain HTTP,
the status the proxy answered or got). With `auth=(user, password)` the
proxy demands `Proxy-Authorization: Basic ...` and answers 407 without it.
Only loopback targets are allowed (403 otherwise), so a misconfigured test
cannot reach out; `routes` maps other host:port names onto loopback ports,
which lets a test use production-style host names through the proxy."""

from __future__ import annotations

import base64
import hmac
import http.client
import selectors
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from tests.support.background import BackgroundServer

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# Headers that concern one connection, not the request (RFC 9110 7.6.1).
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
              "te", "trailer", "transfer-encoding", "upgrade"}
CHUNK = 64 * 1024


@dataclass
class ProxyRecord:
    method: str
    host: str
    port: int
    path: str | None      # None for CONNECT (the proxy cannot see inside the tunnel)
    status: int = 0       # what the proxy answered (CONNECT) or relayed (plain HTTP)

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"


class ConnectProxy(BackgroundServer):
    """The proxy; `start()` it (or use `with`), give clients `url`."""

    thread_name = "connect-proxy"

    def __init__(self, auth: tuple[str, str] | None = None, routes: dict[str, tuple[str, int]] | None = None,
                 timeout: float = 30.0):
        self.auth = auth
        self.routes = dict(routes or {})   # "name:port" -> (loopback host, port)
        self.timeout = timeout
        self.log: list[ProxyRecord] = []
        self._lock = threading.Lock()
        super().__init__()

    def _make_server(self):
        return _Server(("127.0.0.1", 0), self)

    def _cut(self, server) -> None:
        server.close_all()  # open connections and tunnels too

    @property
    def url(self) -> str:
        """http://127.0.0.1:PORT, with the credentials in it when auth is on
        (the form HTTPS_PROXY and requests' `proxies` take)."""
        creds = f"{self.auth[0]}:{self.auth[1]}@" if self.auth else ""
        return f"http://{creds}127.0.0.1:{self.port}"

    @property
    def bare_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def records(self, method: str | None = None) -> list[ProxyRecord]:
        with self._lock:
            return [r for r in self.log if method is None or r.method == method]

    def targets(self, method: str | None = None) -> list[str]:
        """host:port of each logged request (of `method`), in order."""
        return [r.target for r in self.records(method)]

    def clear(self) -> None:
        with self._lock:
            self.log.clear()

    def _record(self, record: ProxyRecord) -> ProxyRecord:
        with self._lock:
            self.log.append(record)
        return record

    def _authorized(self, header: str | None) -> bool:
        if self.auth is None:
            return True
        scheme, _, value = (header or "").partition(" ")
        if scheme.lower() != "basic":
            return False
        expected = base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
        return hmac.compare_digest(value.strip(), expected)

    def _resolve(self, host: str, port: int) -> tuple[str, int] | None:
        """Where to connect for host:port, or None when not allowed."""
        if f"{host}:{port}" in self.routes:
            return self.routes[f"{host}:{port}"]
        return (host, port) if host in LOOPBACK else None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, proxy: ConnectProxy):
        self.proxy = proxy
        self._sockets: set[socket.socket] = set()
        self._sockets_lock = threading.Lock()
        super().__init__(address, _Handler)

    def track(self, sock: socket.socket, add: bool = True) -> None:
        with self._sockets_lock:
            (self._sockets.add if add else self._sockets.discard)(sock)

    def process_request(self, request, client_address) -> None:
        self.track(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        self.track(request, add=False)
        super().shutdown_request(request)

    def close_all(self) -> None:
        with self._sockets_lock:
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address) -> None:
        pass  # a client or upstream hanging up is traffic, not a proxy bug


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - signature from the base class
        pass

    def _refuse(self, status: int, reason: str, extra: dict | None = None) -> None:
        body = f"{status} {reason}\n".encode()
        self.send_response(status, reason)
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _check_auth(self, record: ProxyRecord) -> bool:
        if self.server.proxy._authorized(self.headers.get("Proxy-Authorization")):
            return True
        record.status = 407
        self._drain_body()
        self._refuse(407, "Proxy Authentication Required", {"Proxy-Authenticate": 'Basic realm="test proxy"'})
        return False

    def _drain_body(self) -> None:
        length = self.headers.get("Content-Length")
        if length and length.isdigit():
            self.rfile.read(int(length))
        elif "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self._read_chunked()

    # ----- CONNECT ------------------------------------------------------------

    def do_CONNECT(self) -> None:
        proxy = self.server.proxy
        host, _, port_text = self.path.rpartition(":")
        host = host.strip("[]")
        record = proxy._record(ProxyRecord("CONNECT", host, int(port_text) if port_text.isdigit() else 0, None))
        if not self._check_auth(record):
            return
        destination = proxy._resolve(host, record.port) if record.port else None
        if destination is None:
            record.status = 403
            self._refuse(403, "Forbidden")
            return
        try:
            upstream = socket.create_connection(destination, timeout=proxy.timeout)
        except OSError:
            record.status = 502
            self._refuse(502, "Bad Gateway")
            return
        record.status = 200
        self.send_response(200, "Connection Established")
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        self.server.track(upstream)
        try:
            self._relay(self.connection, upstream)
        finally:
            self.server.track(upstream, add=False)
            upstream.close()

    def _relay(self, client: socket.socket, upstream: socket.socket) -> None:
        # Bytes the request parser already buffered belong to the tunnel
        # (clients wait for the 200 before sending any, but need not). Peek
        # without blocking: only what is there already.
        client.setblocking(False)
        try:
            buffered = self.rfile.peek(0)
        except OSError:
            buffered = b""
        finally:
            client.setblocking(True)
        if buffered:
            upstream.sendall(self.rfile.read(len(buffered)))
        with selectors.DefaultSelector() as selector:
            selector.register(client, selectors.EVENT_READ, upstream)
            selector.register(upstream, selectors.EVENT_READ, client)
            while True:
                for key, _ in selector.select(timeout=self.server.proxy.timeout) or [(None, None)]:
                    if key is None:
                        return  # idle beyond the timeout
                    try:
                        data = key.fileobj.recv(CHUNK)
                    except OSError:
                        return
                    if not data:
                        return
                    try:
                        key.data.sendall(data)
                    except OSError:
                        return

    # ----- plain HTTP ---------------------------------------------------------

    def _forward(self) -> None:
        proxy = self.server.proxy
        target = urlsplit(self.path)
        if target.scheme != "http" or not target.hostname:
            self._drain_body()
            proxy._record(ProxyRecord(self.command, "", 0, self.path, status=400))
            self._refuse(400, "Bad Request")
            return
        port = target.port or 80
        path = (target.path or "/") + (f"?{target.query}" if target.query else "")
        record = proxy._record(ProxyRecord(self.command, target.hostname, port, path))
        if not self._check_auth(record):
            return
        body = self._read_body()
        destination = proxy._resolve(target.hostname, port)
        if destination is None:
            record.status = 403
            self._refuse(403, "Forbidden")
            return
        headers = {name: value for name, value in self.headers.items() if name.lower() not in HOP_BY_HOP}
        if body is not None:
            headers["Content-Length"] = str(len(body))
        upstream = http.client.HTTPConnection(*destination, timeout=proxy.timeout)
        try:
            upstream.request(self.command, path, body=body, headers=headers)
            response = upstream.getresponse()
        except OSError:
            upstream.close()
            record.status = 502
            self._refuse(502, "Bad Gateway")
            return
        record.status = response.status
        try:
            self._relay_response(response)
        finally:
            upstream.close()

    def _read_body(self) -> bytes | None:
        length = self.headers.get("Content-Length")
        if length is not None:
            return self.rfile.read(int(length))
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return self._read_chunked()
        return None

    def _read_chunked(self) -> bytes:
        chunks = []
        while True:
            size = int(self.rfile.readline(1024).split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline(1024).strip():
                    pass  # trailers
                return b"".join(chunks)
            chunks.append(self.rfile.read(size))
            self.rfile.readline(16)

    def _relay_response(self, response: http.client.HTTPResponse) -> None:
        no_body = self.command == "HEAD" or response.status in (204, 304) or 100 <= response.status < 200
        headers = [(n, v) for n, v in response.getheaders() if n.lower() not in HOP_BY_HOP]
        length = response.getheader("Content-Length")
        self.send_response(response.status, response.reason)
        for name, value in headers:
            self.send_header(name, value)
        if no_body:
            self.end_headers()
            return
        if length is None:
            # The upstream chunked or closed to end the body; re-send it
            # with a length so the client's connection stays usable.
            data = response.read()
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.end_headers()
        while True:
            data = response.read(CHUNK)
            if not data:
                break
            self.wfile.write(data)

    def do_GET(self) -> None:
        self._forward()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = do_GET
