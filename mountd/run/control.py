"""Control sockets: how `mountd status` asks a running daemon or mount worker
for its numbers.

Each daemon and each mount worker serves a unix stream socket under the
runtime directory (0700), itself 0600. The protocol is one JSON request line
(`{"request": "status"}`) answered by one JSON line, scrubbed of anything
that looks like a secret, then the connection closes. A small thread serves
it; answering reads counters without taking the read path's locks.

Socket paths are limited to 107 bytes; a longer one (deep test or runtime
directories) is reached through /proc/self/fd/N of its directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading

from mountd.redact import redact

log = logging.getLogger(__name__)

MAX_SUN_PATH = 100  # of the kernel's 108, with room for the terminating NUL
MAX_REQUEST = 4096
TIMEOUT = 2.0  # seconds for one exchange, either side


@contextlib.contextmanager
def _reachable(path: str):
    """A name for `path` short enough for sockaddr_un."""
    if len(path.encode()) <= MAX_SUN_PATH:
        yield path
        return
    fd = os.open(os.path.dirname(path) or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{os.path.basename(path)}"
    finally:
        os.close(fd)


class ControlServer:
    """Answers status requests on `path` with `status()` (a JSON-able dict)."""

    def __init__(self, path: str, status):
        self.path = path
        self.status = status
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            os.unlink(path)  # left by a process that was killed
        except FileNotFoundError:
            pass
        old = os.umask(0o177)  # never a moment with the socket open to others
        try:
            with _reachable(path) as name:
                self._sock.bind(name)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._sock.listen(8)
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            with conn:
                try:
                    conn.settimeout(TIMEOUT)
                    self._answer(conn)
                except Exception:  # noqa: BLE001 - one bad exchange must not end the server
                    log.debug("control request failed", exc_info=True)

    def _answer(self, conn: socket.socket) -> None:
        data = b""
        while b"\n" not in data and len(data) < MAX_REQUEST:
            chunk = conn.recv(MAX_REQUEST)
            if not chunk:
                break
            data += chunk
        try:
            request = json.loads(data.decode("utf-8").strip() or "{}").get("request")
        except (ValueError, AttributeError):
            request = None
        if request == "status":
            reply = {"ok": True, "status": self.status()}
        else:
            reply = {"ok": False, "error": f"unknown request {request!r} (known: status)"}
        # Status is built to hold no secret; scrubbing the reply as well
        # keeps one that slipped into an error message from leaving.
        conn.sendall(redact(json.dumps(reply, default=str)).encode() + b"\n")

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def query(path: str, request: str = "status", timeout: float = TIMEOUT) -> dict:
    """Ask the server at `path`; its reply's "status". OSError if nobody
    answers (no socket, a dead process, a timeout)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        with _reachable(path) as name:
            s.connect(name)
        s.sendall(json.dumps({"request": request}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    try:
        reply = json.loads(data)
    except ValueError:
        raise OSError(f"malformed answer from {path}") from None
    if not reply.get("ok"):
        raise OSError(reply.get("error") or f"refused by {path}")
    return reply["status"]
