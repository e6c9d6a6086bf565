"""A listener on a free loopback port that hands each accepted connection
to its own thread (`_serve`), and cuts them all when stopped: what the
tests' proxies in front of a storage emulator (faultproxy, azure_rules)
share. A subclass serves a connection and may cut them its own way
(`_cut_all`)."""

from __future__ import annotations

import socket
import threading


class Relay:
    thread_name = "relay"

    def __init__(self):
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self.port = 0

    def start(self):
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept_loop, name=f"{self.thread_name}-accept", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._listener:
            self._listener.close()
        self._cut_all()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _cut_all(self) -> None:
        """Wake every connection's thread (shutdown): it then closes its socket."""
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                self._before_cut(conn)
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _before_cut(self, conn: socket.socket) -> None:
        """How a connection ends when cut (e.g. with a reset)."""

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.add(client)
            threading.Thread(target=self._serve, args=(client,), name=f"{self.thread_name}-conn", daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        raise NotImplementedError

    def _forget(self, conn: socket.socket, *sockets) -> None:
        """A served connection has ended: stop tracking it and close its sockets."""
        with self._lock:
            self._conns.discard(conn)
        for s in sockets:
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass
