"""The sd_notify protocol: telling systemd how a Type=notify service is doing.

Each message is one datagram of `KEY=VALUE` lines sent to the unix socket
named by `$NOTIFY_SOCKET` (a path, or an abstract-namespace name written with
a leading `@`). Without that variable every call does nothing, so the daemon
runs the same by hand. The variables are taken out of the environment once
read, as sd_notify's `unset_environment` does: mount workers and other
children must not speak for the service.

The watchdog (`WatchdogSec=` in the unit) is on when `$WATCHDOG_USEC` is set
and `$WATCHDOG_PID`, if set, is this process.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

log = logging.getLogger(__name__)

SEND_TIMEOUT = 2.0  # seconds


class Notifier:
    def __init__(self, environ=None):
        environ = os.environ if environ is None else environ
        address = environ.pop("NOTIFY_SOCKET", None)
        usec = environ.pop("WATCHDOG_USEC", None)
        pid = environ.pop("WATCHDOG_PID", None)
        self.address = address
        if address and address.startswith("@"):
            self.address = "\0" + address[1:]  # abstract namespace
        self.watchdog_interval = None  # seconds between pings: half the timeout, as systemd advises
        try:
            if usec and (not pid or int(pid) == os.getpid()) and int(usec) > 0:
                self.watchdog_interval = int(usec) / 2e6
        except ValueError:
            log.warning("ignoring a malformed $WATCHDOG_USEC/$WATCHDOG_PID")
        self._sock = None
        self._lock = threading.Lock()
        self._last_ping = 0.0
        if self.address and not self.address.startswith(("/", "\0")):
            log.warning("ignoring $NOTIFY_SOCKET: not an absolute path or @name")
            self.address = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields) -> bool:
        """Send one message, e.g. send(READY=1, STATUS="..."). Never raises:
        a service manager that went away must not stop the daemon."""
        if not self.address:
            return False
        text = "\n".join(f"{key}={_one_line(value)}" for key, value in fields.items())
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    # A datagram to a full queue waits for room: bounded,
                    # so a stalled service manager never stalls the daemon.
                    self._sock.settimeout(SEND_TIMEOUT)
                self._sock.sendto(text.encode("utf-8", "replace"), self.address)
                return True
            except OSError as e:
                log.debug("sd_notify failed: %s", e)
                return False

    def ready(self, status: str) -> None:
        self.send(READY=1, STATUS=status)

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    def stopping(self, status: str) -> None:
        self.send(STOPPING=1, STATUS=status)

    def extend_timeout(self, seconds: float) -> None:
        """Ask for `seconds` more before systemd's start or stop timeout hits
        (counted from now; systemd only ever extends)."""
        self.send(EXTEND_TIMEOUT_USEC=int(seconds * 1e6))

    def watchdog(self) -> None:
        """A watchdog ping, at most one per interval however often called."""
        if self.watchdog_interval is None:
            return
        now = time.monotonic()
        if now - self._last_ping >= self.watchdog_interval * 0.9:
            self._last_ping = now
            self.send(WATCHDOG=1)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


class Keepalive:
    """While a long step runs (staging, resuming or final uploads, restarting
    a worker), keep systemd informed from a thread: STATUS from `describe()`,
    and, while the step is making progress, EXTEND_TIMEOUT_USEC and watchdog
    pings.

    `describe()` returns (status text, progress token). The step counts as
    making progress while the token keeps changing (bytes still moving) and
    during its first EXTEND seconds: a step that hangs runs into the unit's
    own timeouts instead of being extended for ever."""

    TICK = 5.0  # seconds between messages
    EXTEND = 60.0  # seconds asked for each time

    def __init__(self, notifier: Notifier, describe, extend: bool = True):
        self.notifier = notifier
        self.describe = describe
        self.extend = extend
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Keepalive":
        if self.notifier.enabled:
            self._thread = threading.Thread(target=self._run, name="sd-notify-keepalive", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        started = last_change = time.monotonic()
        last_token = object()
        tick = min(self.TICK, self.notifier.watchdog_interval or self.TICK)
        while True:
            text, token = self.describe()
            now = time.monotonic()
            if token != last_token:
                last_token, last_change = token, now
            fields = {"STATUS": text}
            alive = now - last_change < self.EXTEND or now - started < self.EXTEND
            if alive and self.extend:
                fields["EXTEND_TIMEOUT_USEC"] = int(self.EXTEND * 1e6)
            self.notifier.send(**fields)
            if alive:  # a stuck step stops the pings too, and the watchdog acts
                self.notifier.watchdog()
            if self._stop.wait(tick):
                return


def _one_line(value) -> str:
    # a newline would start a new KEY=VALUE field
    return str(value).replace("\n", " ")
