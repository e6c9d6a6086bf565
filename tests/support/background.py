"""A server of the tests' own (an emulator, a proxy, a token endpoint)
served from a daemon thread: start(), stop(), `with`, and its port. A
subclass says how to make its socketserver (`_make_server`) and, if it
keeps connections open, how to cut them when stopping (`_cut`)."""

from __future__ import annotations

import socketserver
import threading


class BackgroundServer:
    thread_name = "test-server"

    def __init__(self):
        self._server: socketserver.BaseServer | None = None
        self._thread: threading.Thread | None = None

    def _make_server(self) -> socketserver.BaseServer:
        raise NotImplementedError

    def _cut(self, server) -> None:
        """Close the connections still open (keep-alive, tunnels), if any."""

    def start(self):
        self._server = self._make_server()
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._cut(self._server)
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError(f"{self.thread_name} is not running")
        return self._server.server_address[1]
