"""A real HTTP server on a free port that answers what a test scripts, one
answer per request, for tests of the client side of the data path: body
framings, connection reuse, broken and hostile answers."""

from __future__ import annotations

import dataclasses
import socket
import threading

from mountd.storage import transport
from mountd.storage.retry import StoragePolicy


class ScriptedServer:
    """Accepts connections; for each request read, sends the next answer of
    `answers` (bytes, or a callable taking the socket). Counts connections."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.connections = 0
        self.requests = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            self._answer(conn)
        except OSError:  # the client went away (some tests make it)
            pass

    def _answer(self, conn):
        buf = b""
        with conn:
            while self.answers:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                self.requests.append(head.decode())
                answer = self.answers.pop(0)
                if callable(answer):
                    if answer(conn) == "close":
                        return
                else:
                    conn.sendall(answer)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def transport(self, read_timeout=5.0) -> transport.Transport:
        """A storage transport of its own (no proxy, no idle expiry surprises
        from other tests) with the given read timeout."""
        s = transport.settings({})
        return transport.Transport(dataclasses.replace(s, retry=StoragePolicy(connect_timeout=5.0,
                                                                             read_timeout=read_timeout)))

    def close(self):
        self.sock.close()
