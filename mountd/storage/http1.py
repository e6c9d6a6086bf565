"""A small HTTP/1.1 client for the data path: requests on kept-alive
connections, response bodies read straight into the caller's buffers.

Reading a blob is one request and one body; a node reading thousands of
small files, or a large one at the storage's full speed, spends its CPU on
what the client does around that. urllib3 and http.client build a response
object and parse its headers through the email package: 0.8 ms of CPU per
request here, against 0.35 ms for this (measured, 256 KiB reads from
Azurite, both including the kernel's work). It speaks just what storage
answers: a status line, headers, and a body framed by Content-Length,
chunked encoding or the end of the connection; TLS through the standard
library; no redirects, no proxies.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
from urllib.parse import urlsplit

HEAD_LIMIT = 64 * 1024  # longest status line and headers accepted
RECV = 64 * 1024  # bytes asked of the socket for a head
# A body read waits until this much has arrived (SO_RCVLOWAT) rather than
# waking for each packet's worth: 1 GiB then takes 2 000 reads instead of
# 17 000, and 0.3 s less CPU (measured). Kept well below what the slowest
# link a read timeout allows delivers in that time.
LOW_WATER = 512 * 1024


class ProtocolError(OSError):
    """The server's answer is not HTTP/1.1 as expected (retried like a reset)."""


def _tls_context() -> ssl.SSLContext:
    # the CA bundle the SDK's transport (requests) uses, so both paths trust the same servers
    cafile = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE")
    if not cafile:
        try:
            import certifi
            cafile = certifi.where()
        except ImportError:
            cafile = None
    return ssl.create_default_context(cafile=cafile)


class Response:
    """A response whose head has been read. The body is read with
    readinto() or dropped with drain(); release() hands the connection back
    for the next request once the body is done (or closes it)."""

    __slots__ = ("status", "headers", "_conn", "_left", "_chunked", "_in_chunks", "_to_close", "_done")

    def __init__(self, conn: "Connection", status: int, headers: dict, no_body: bool):
        self.status = status
        self.headers = headers  # lower-case names
        self._conn = conn
        self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        self._in_chunks = False  # a chunk has been read (its closing CRLF comes before the next size)
        length = headers.get("content-length")
        if no_body or status in (204, 304) or 100 <= status < 200:
            self._left = 0
        elif self._chunked:
            self._left = 0  # bytes left of the current chunk
        elif length is not None:
            try:
                self._left = int(length)
            except ValueError:
                raise ProtocolError(f"bad Content-Length {length!r}") from None
        else:
            self._left = -1  # until the server closes
        self._to_close = self._left < 0 or headers.get("connection", "").lower() == "close"
        self._done = self._left == 0 and not self._chunked

    def readinto(self, view: memoryview) -> int:
        """Fill the start of `view` with body bytes; 0 at the end of the body.
        A connection that breaks part-way raises OSError."""
        if self._done or not len(view):
            return 0
        if self._chunked and self._left == 0 and not self._next_chunk():
            return 0
        want = len(view) if self._left < 0 else min(len(view), self._left)
        n = self._conn.read_into(view[:want])
        if not n:
            if self._left < 0:
                self._done = True
                return 0
            raise ProtocolError("connection closed in the middle of a response body")
        if self._left > 0:
            self._left -= n
            if self._left == 0 and not self._chunked:
                self._done = True
        return n

    def _next_chunk(self) -> bool:
        conn = self._conn
        if self._in_chunks:
            conn.read_line()  # the CRLF closing the previous chunk
        line = conn.read_line().split(b";", 1)[0].strip()
        try:
            size = int(line, 16)
        except ValueError:
            raise ProtocolError(f"bad chunk size {line[:20]!r}") from None
        self._in_chunks = True
        if size == 0:
            while conn.read_line() not in (b"", b"\r\n", b"\n"):  # trailers
                pass
            self._done = True
            return False
        self._left = size
        return True

    def read(self) -> bytes:
        """The whole (rest of the) body; for small answers such as errors."""
        out = bytearray()
        buf = memoryview(bytearray(RECV))
        while n := self.readinto(buf):
            out += buf[:n]
        return bytes(out)

    def drain(self, limit: int = 1024 * 1024) -> None:
        """Read and drop the body so the connection can be reused; a body
        longer than `limit` is not worth it: the connection is closed."""
        buf = memoryview(bytearray(min(RECV, limit)))
        dropped = 0
        try:
            while dropped <= limit and (n := self.readinto(buf)):
                dropped += n
        except OSError:
            self._to_close = True
            return
        if not self._done:
            self._to_close = True

    def release(self) -> None:
        """Give the connection back (kept alive only if this body was read to its end)."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._done and not self._to_close:
            conn.pool.put(conn)
        else:
            conn.close()

    def close(self) -> None:
        """Drop the connection without reading the rest of the body."""
        self._to_close = True
        self.release()


class Connection:
    """One socket to the pool's server, with a small buffer for what the
    socket gave beyond the head."""

    def __init__(self, pool: "ConnectionPool"):
        self.pool = pool
        self.sock = socket.create_connection((pool.host, pool.port), timeout=pool.connect_timeout)
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if pool.tls is not None:
                self.sock = pool.tls.wrap_socket(self.sock, server_hostname=pool.host)
            self.sock.settimeout(pool.read_timeout)
        except BaseException:
            self.sock.close()
            raise
        self._buf = bytearray(RECV)
        self._start = self._end = 0  # buffered, not yet consumed: _buf[_start:_end]
        self._low_water = 1  # the socket's SO_RCVLOWAT
        self.used = False  # has served a request before (a stale keep-alive may fail)

    def read_into(self, view: memoryview) -> int:
        """Body bytes: what is buffered first, then straight from the socket.
        `view` must not be longer than what is left of the body: a read of
        LOW_WATER bytes or more waits until that much has arrived."""
        if self._start < self._end:
            n = min(len(view), self._end - self._start)
            view[:n] = memoryview(self._buf)[self._start:self._start + n]
            self._start += n
            return n
        # (a smaller read is the end of a body or a small file: not worth a system call)
        self._wait_for(LOW_WATER if len(view) >= LOW_WATER else 1)
        try:
            return self.sock.recv_into(view)
        except TimeoutError:
            if self._low_water == 1:
                raise
            # less than the low-water mark in a whole read timeout: a slow
            # link, not necessarily a dead one; give it a timeout for any byte
            self._wait_for(1)
            return self.sock.recv_into(view)

    def _wait_for(self, nbytes: int) -> None:
        nbytes = max(nbytes, 1)
        if nbytes != self._low_water:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, nbytes)
            self._low_water = nbytes

    def read_line(self) -> bytes:
        while True:
            i = self._buf.find(b"\n", self._start, self._end)
            if i >= 0:
                line = bytes(self._buf[self._start:i + 1])
                self._start = i + 1
                return line
            if self._end - self._start >= HEAD_LIMIT:
                raise ProtocolError("line too long in a response")
            if not self._fill():
                raise ProtocolError("connection closed in the middle of a response")

    def _fill(self) -> bool:
        self._wait_for(1)  # a head may be a few bytes
        if self._start:
            rest = self._end - self._start
            self._buf[:rest] = self._buf[self._start:self._end]
            self._start, self._end = 0, rest
        if self._end == len(self._buf):
            self._buf.extend(bytes(len(self._buf)))
        n = self.sock.recv_into(memoryview(self._buf)[self._end:])
        self._end += n
        return n > 0

    def request(self, method: str, target: str, headers: dict, body: bytes = b"") -> Response:
        lines = [f"{method} {target} HTTP/1.1\r\nHost: {self.pool.host_header}\r\n"]
        lines += [f"{k}: {v}\r\n" for k, v in headers.items()]
        if body or method in ("PUT", "POST"):
            lines.append(f"Content-Length: {len(body)}\r\n")
        lines.append("\r\n")
        self.sock.sendall("".join(lines).encode("latin-1") + body)
        return self._read_head(no_body=method == "HEAD")

    def _read_head(self, no_body: bool) -> Response:
        while True:
            end = self._buf.find(b"\r\n\r\n", self._start, self._end)
            if end >= 0:
                break
            if self._end - self._start > HEAD_LIMIT:
                raise ProtocolError("response head too long")
            if not self._fill():
                raise ProtocolError("connection closed before a response")
        head = self._buf[self._start:end].decode("latin-1").split("\r\n")
        self._start = end + 4
        version, _, rest = head[0].partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise ProtocolError(f"not an HTTP/1.1 answer: {head[0][:60]!r}")
        headers = {}
        for line in head[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if code == "100":  # Continue: the real answer follows
            return self._read_head(no_body)
        self.used = True
        return Response(self, int(code), headers, no_body)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class ConnectionPool:
    """Kept-alive connections to one server (scheme://host:port), any
    number of threads at once; at most `maxsize` idle ones are kept."""

    def __init__(self, base_url: str, maxsize: int, connect_timeout: float, read_timeout: float):
        parts = urlsplit(base_url)
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        default_port = self.port == (443 if parts.scheme == "https" else 80)
        self.host_header = self.host if default_port else f"{self.host}:{self.port}"
        if ":" in self.host:  # IPv6 literal
            self.host_header = f"[{self.host}]" + ("" if default_port else f":{self.port}")
        self.tls = _tls_context() if parts.scheme == "https" else None
        self.maxsize = maxsize
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: list[Connection] = []
        self._lock = threading.Lock()

    def request(self, method: str, target: str, headers: dict, body: bytes = b"") -> Response:
        """Send a request and read the head of its answer. A kept-alive
        connection the server has closed meanwhile is replaced at once (that
        is not a failure of the request); anything else raises OSError."""
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            fresh = conn is None
            if fresh:
                conn = Connection(self)
            try:
                return conn.request(method, target, headers, body)
            except (ProtocolError, ConnectionError, ssl.SSLError) as e:
                conn.close()
                if fresh or not conn.used or not _stale(e):
                    raise
            except BaseException:
                conn.close()
                raise

    def put(self, conn: Connection) -> None:
        with self._lock:
            if len(self._idle) < self.maxsize:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _stale(error: Exception) -> bool:
    """A reused connection failed the way one the server closed while idle
    does: nothing came back at all."""
    return isinstance(error, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)) or \
        (isinstance(error, ProtocolError) and "before a response" in str(error))
