"""A fault-injecting HTTP proxy for tests: sits between mountd and a storage
emulator (Azurite, the Files emulator: anything speaking HTTP/1.1 on a TCP
port) and, for each request at set rates, resets the connection part-way
through the response, stalls the response for a while, answers 503 with
Retry-After or 500 itself without forwarding, or throttles bandwidth.

It understands just enough HTTP to know where each request and response
ends (Content-Length, chunked, HEAD), so faults are chosen per request even
on kept-alive connections, and a reset lands at a random byte of the
response: in the head, or part-way through the body. Faults are drawn from a
seeded generator, so a failing run can be repeated with the same seed (thread
timing still varies), and every fault injected is counted.

Beyond rates: `outage()` makes storage unreachable (every request reset, or
held unanswered) until `restore()`; `rewrite` turns the proxy into a hostile
server that changes response bodies (listings naming `../x`).

    proxy = FaultProxy(("127.0.0.1", azurite.port), seed=1, reset=0.2, stall=0.1).start()
    entry = blob_workspace_entry(azurite, container)  # then point it at the proxy:
    entry["endpoint"] = proxy.url(azurite.account_url)
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, fields
from urllib.parse import urlsplit, urlunsplit

from tests.support.relay import Relay

# Everything every proxy of this process injected and relayed, and what the
# tests verified: the figures printed at the end of a test run.
TOTALS: Counter = Counter()
NOTES: list[str] = []  # other figures worth a line at the end (throughput of the load test)

MAX_HEAD = 64 * 1024
PIECE = 64 * 1024  # bytes relayed per send


@dataclass
class Rates:
    """Fractions of requests that get each fault (their sum at most 1)."""

    reset: float = 0.0  # the response is cut by a TCP reset at a random byte
    stall: float = 0.0  # the response pauses for `stall_seconds` at a random byte
    error_503: float = 0.0  # answered "503 Server Busy" with Retry-After, not forwarded
    error_500: float = 0.0  # answered "500 Internal Error", not forwarded
    stall_seconds: float = 1.0
    retry_after: float = 1.0  # seconds, in the 503's Retry-After
    throttle: int = 0  # bytes per second per connection for responses; 0 = unlimited


class _Closed(Exception):
    """A side of the connection went away."""


class _Reader:
    """Buffered reads from a socket. (socket.makefile would hold a reference
    that keeps the socket open after close(), and a reset must close it.)"""

    def __init__(self, sock: socket.socket):
        self.sock, self.buf = sock, b""

    def _fill(self) -> bool:
        data = self.sock.recv(PIECE)
        self.buf += data
        return bool(data)

    def readline(self, limit: int) -> bytes:
        while b"\n" not in self.buf and len(self.buf) < limit and self._fill():
            pass
        end = self.buf.find(b"\n") + 1 or len(self.buf)
        line, self.buf = self.buf[:end], self.buf[end:]
        return line

    def read(self, n: int) -> bytes:
        """Up to n bytes (fewer as they arrive); b"" at end of stream."""
        if not self.buf:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data


def _read_head(reader) -> bytes:
    head = b""
    while True:
        line = reader.readline(MAX_HEAD)
        if not line:
            raise _Closed()
        head += line
        if line in (b"\r\n", b"\n"):
            return head
        if len(head) > MAX_HEAD:
            raise _Closed()


def _headers(head: bytes) -> dict:
    out = {}
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            out[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return out


def _body_pieces(reader, headers: dict, no_body: bool = False):
    """The raw bytes of a message body as they arrive (chunk framing kept),
    then None. Raises _Closed if the peer goes away part-way."""
    if no_body:
        return
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = reader.readline(MAX_HEAD)
            if not size_line:
                raise _Closed()
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            yield size_line
            yield from _exactly(reader, size + 2)  # data and its CRLF
            if size == 0:
                return  # (trailers are not used by storage services)
    elif "content-length" in headers:
        yield from _exactly(reader, int(headers["content-length"]))
    else:
        while data := reader.read(PIECE):
            yield data


def _exactly(reader, left: int):
    while left:
        data = reader.read(min(left, PIECE))
        if not data:
            raise _Closed()
        left -= len(data)
        yield data


class FaultProxy(Relay):
    thread_name = "faultproxy"

    def __init__(self, upstream: tuple[str, int], seed: int = 0, rewrite=None, **rates):
        super().__init__()
        self.upstream = upstream
        self.rates = Rates(**rates)
        self.rewrite = rewrite  # f(method, target, body: bytes) -> bytes | None, for hostile answers
        self.only = None  # f(method, target) -> bool: the requests faults may strike (default all)
        self.limit: int | None = None  # faults left to inject (None: no limit)
        self.counts: Counter = Counter()
        self._rng = random.Random(seed)
        self._outage: str | None = None
        self._outage_over = threading.Event()
        self._outage_over.set()

    # -- control -----------------------------------------------------------------
    def url(self, account_url: str) -> str:
        """`account_url` with its host and port replaced by the proxy's."""
        parts = urlsplit(account_url)
        return urlunsplit((parts.scheme, f"127.0.0.1:{self.port}", parts.path, parts.query, parts.fragment))

    def set(self, **rates) -> None:
        """Change rates while running (unnamed ones keep their values)."""
        with self._lock:
            for f in fields(Rates):
                if f.name in rates:
                    setattr(self.rates, f.name, rates.pop(f.name))
        if rates:
            raise TypeError(f"unknown rates: {sorted(rates)}")

    def outage(self, mode: str = "reset") -> None:
        """Storage goes away: 'reset' answers every request with a reset;
        'stall' takes requests and never answers them until restore()."""
        assert mode in ("reset", "stall")
        self._outage_over.clear()
        self._outage = mode
        if mode == "reset":
            self._cut_all()

    def cut(self) -> None:
        """Reset every open connection now (requests in flight break)."""
        self._cut_all()

    def restore(self) -> None:
        self._outage = None
        self._outage_over.set()

    def injected(self) -> int:
        """Faults injected so far (requests that did not get a clean answer)."""
        return sum(self.counts[k] for k in ("reset", "stall", "error_503", "error_500", "outage"))

    def stop(self) -> None:
        if not self._stop.is_set():
            TOTALS.update(self.counts)
        self._outage_over.set()
        super().stop()

    # -- the work ----------------------------------------------------------------
    def _before_cut(self, conn: socket.socket) -> None:
        # the serving thread then closes the socket with a reset, as SO_LINGER 0 asks
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] += n

    def _choose(self, method: str, target: str) -> tuple[str | None, float]:
        """(fault, where): the fault for one request and the fraction of the
        response at which it strikes."""
        only = self.only
        if only is not None and not only(method, target):
            return None, 0.0
        with self._lock:
            roll, where = self._rng.random(), self._rng.random()
            if self.limit is not None and self.limit <= 0:
                return None, where
            r = self.rates
            for name, rate in (("reset", r.reset), ("stall", r.stall), ("error_503", r.error_503),
                               ("error_500", r.error_500)):
                if roll < rate:
                    if self.limit is not None:
                        self.limit -= 1
                    return name, where
                roll -= rate
        return None, where

    def _serve(self, client: socket.socket) -> None:
        upstream = None
        creader = _Reader(client)
        ureader = None
        try:
            while not self._stop.is_set():
                head = _read_head(creader)
                headers = _headers(head)
                method = head.split(b" ", 1)[0].decode("latin-1")
                target = head.split(b" ", 2)[1].decode("latin-1") if head.count(b" ") >= 2 else "/"
                framed = "content-length" in headers or "transfer-encoding" in headers
                body = b"".join(_body_pieces(creader, headers, no_body=not framed))  # a request without is bodiless
                self._count("requests", 1)
                self._count("bytes_up", len(head) + len(body))
                if self._outage:
                    self._count("outage", 1)
                    if self._outage == "stall":
                        self._outage_over.wait()
                    _reset(client)
                    return
                fault, where = self._choose(method, target)
                if fault in ("error_503", "error_500"):
                    self._count(fault, 1)
                    client.sendall(self._error_answer(fault))
                    continue
                if upstream is None:
                    upstream = socket.create_connection(self.upstream, timeout=120)
                    upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    ureader = _Reader(upstream)
                upstream.sendall(head + body)
                rhead = _read_head(ureader)
                rheaders = _headers(rhead)
                status = int(rhead.split(b" ", 2)[1])
                no_body = method == "HEAD" or status in (204, 304) or 100 <= status < 200
                pieces = _body_pieces(ureader, rheaders, no_body)
                if self.rewrite is not None and not no_body:
                    raw = b"".join(pieces)
                    if "chunked" in rheaders.get("transfer-encoding", "").lower():
                        raw = _unchunk(raw)
                    new = self.rewrite(method, target, raw)
                    if new is not None:
                        self._count("rewritten", 1)
                        rhead = _with_length(rhead, len(new))
                        raw = new
                    elif "chunked" in rheaders.get("transfer-encoding", "").lower():
                        rhead = _with_length(rhead, len(raw))
                    pieces = iter([raw])
                length = len(rhead) + int(rheaders.get("content-length", 0) if not no_body else 0)
                if not self._relay(client, rhead, pieces, fault, int(where * max(length, 1))):
                    upstream.close()
                    return
                if rheaders.get("connection", "").lower() == "close" or \
                        headers.get("connection", "").lower() == "close":
                    return
        except (_Closed, OSError, ValueError):
            pass  # either side went away, or the proxy cut it: the connection ends
        finally:
            self._forget(client, client, upstream)

    def _error_answer(self, fault: str) -> bytes:
        if fault == "error_503":
            return (b"HTTP/1.1 503 The server is busy.\r\nx-ms-error-code: ServerBusy\r\n"
                    b"Retry-After: %d\r\nContent-Length: 0\r\n\r\n" % max(0, round(self.rates.retry_after)))
        return (b"HTTP/1.1 500 Operation could not be completed within the specified time.\r\n"
                b"x-ms-error-code: InternalError\r\nContent-Length: 0\r\n\r\n")

    def _relay(self, client: socket.socket, head: bytes, pieces, fault: str | None, at: int) -> bool:
        """Send a response, striking `fault` at byte `at`; False if the
        connection was cut."""
        sent, started = 0, time.monotonic()
        if fault:
            self._count(fault, 1)
        for piece in _chain(head, pieces):
            while piece:
                if fault and sent <= at < sent + len(piece):
                    cut = at - sent
                    if cut:
                        client.sendall(piece[:cut])
                        sent += cut
                        piece = piece[cut:]
                    if fault == "reset":
                        _reset(client)
                        return False
                    self._stop.wait(self.rates.stall_seconds)  # "stall": then go on
                    fault = None
                    continue
                client.sendall(piece)
                sent += len(piece)
                self._count("bytes_down", len(piece))
                piece = b""
                if self.rates.throttle:
                    ahead = sent / self.rates.throttle - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
        if fault == "reset":  # the strike point was past the end (a body of unknown length)
            _reset(client)
            return False
        return True


def verified(data_or_count) -> None:
    """Count bytes a test has compared with what they must be."""
    n = data_or_count if isinstance(data_or_count, int) else len(data_or_count)
    TOTALS["bytes_verified"] += n
    TOTALS["files_verified"] += 0 if isinstance(data_or_count, int) else 1


def _chain(head: bytes, pieces):
    yield head
    yield from pieces


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (RST), not an orderly FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass


def _unchunk(raw: bytes) -> bytes:
    out, pos = [], 0
    while True:
        end = raw.index(b"\r\n", pos)
        size = int(raw[pos:end].split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(raw[end + 2:end + 2 + size])
        pos = end + 2 + size + 2


def _with_length(head: bytes, length: int) -> bytes:
    lines = [line for line in head.split(b"\r\n")[:-2]
             if not line.lower().startswith((b"content-length:", b"transfer-encoding:", b"content-md5:"))]
    return b"\r\n".join(lines + [b"Content-Length: %d" % length, b"", b""])
