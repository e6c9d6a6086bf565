"""A TLS server on loopback that answers ranged GETs the way a real network
delivers them: each TLS record (up to 16 KiB) sent in small TCP pieces with
the socket flushed between them, so the client's TLS layer often holds part
of a record while the socket has less than a whole one. A client that
waits for the socket to fill up before reading (SO_RCVLOWAT) can then wait
out its whole read timeout while the bytes it needs are already there.

The objects it serves are a deterministic pattern: byte i of any object is
`pattern(i)`, so a test checks what it read without storing anything."""

from __future__ import annotations

import re
import socket
import ssl

from tests.support.relay import Relay

SIZE = 1 << 30  # every object's size
_BLOCK = bytes(range(256)) * 256  # 64 KiB


def pattern(offset: int, length: int) -> bytes:
    """Bytes [offset, offset+length) of every object."""
    start = offset % len(_BLOCK)
    out = bytearray()
    while len(out) < length:
        out += _BLOCK[start:start + length - len(out)]
        start = 0
    return bytes(out)


class TrickleTLSServer(Relay):
    """Started at once; `close()` stops it."""

    thread_name = "trickle-tls"

    def __init__(self, cert_file: str, key_file: str, piece: int = 1500):
        super().__init__()
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert_file, key_file)
        self.piece = piece
        self.requests = 0
        self.start()

    def _serve(self, conn: socket.socket):
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self.ctx.wrap_bio(incoming, outgoing, server_side=True)
        try:
            with conn:
                self._handshake(conn, tls, incoming, outgoing)
                buf = b""
                while True:
                    while b"\r\n\r\n" not in buf:
                        data = self._recv(conn, tls, incoming, outgoing)
                        if not data:
                            return
                        buf += data
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    self.requests += 1
                    lo, hi = map(int, re.search(rb"x-ms-range: bytes=(\d+)-(\d+)", head, re.I).groups())
                    hi = min(hi, SIZE - 1)
                    body = pattern(lo, hi - lo + 1)
                    answer = (f"HTTP/1.1 206 Partial Content\r\nContent-Length: {len(body)}\r\n"
                              f"Content-Range: bytes {lo}-{hi}/{SIZE}\r\nETag: \"0x1\"\r\n\r\n").encode() + body
                    for i in range(0, len(answer), 16384):  # one TLS record each
                        tls.write(answer[i:i + 16384])
                        self._trickle(conn, outgoing.read())
        except (OSError, ssl.SSLError):
            return

    def _trickle(self, conn: socket.socket, data: bytes) -> None:
        for i in range(0, len(data), self.piece):
            conn.sendall(data[i:i + self.piece])

    def _handshake(self, conn, tls, incoming, outgoing):
        while True:
            try:
                tls.do_handshake()
                conn.sendall(outgoing.read())
                return
            except ssl.SSLWantReadError:
                conn.sendall(outgoing.read())
                data = conn.recv(65536)
                if not data:
                    raise OSError("client left during the handshake") from None
                incoming.write(data)

    def _recv(self, conn, tls, incoming, outgoing) -> bytes:
        while True:
            try:
                return tls.read(65536)
            except ssl.SSLWantReadError:
                data = conn.recv(65536)
                if not data:
                    return b""
                incoming.write(data)
            except ssl.SSLZeroReturnError:
                return b""

    def close(self):
        self.stop()
