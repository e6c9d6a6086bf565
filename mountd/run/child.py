"""The training process: started with the references in its environment,
signals passed on to it, its exit status turned into an exit code. As PID 1
(a container's entrypoint) it also reaps orphaned processes, as an init must.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading

log = logging.getLogger(__name__)

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SignalState:
    """Counts stop signals across the whole run: the first one is passed to
    the child, a second one (while uploads run) aborts the uploads."""

    def __init__(self):
        self.stops = 0
        self.abort_uploads = threading.Event()
        self.child: subprocess.Popen | None = None
        self.terminal = sys.stdin.isatty() if sys.stdin else False
        self._previous = {}

    def install(self) -> None:
        for sig in FORWARDED:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if signum in STOP_SIGNALS:
            self.stops += 1
        child = self.child
        if child is not None and child.returncode is None:
            # Ctrl-C at a terminal reaches the child already (same process
            # group); passing it on again would deliver it twice.
            if not (signum == signal.SIGINT and self.terminal):
                try:
                    child.send_signal(signum)
                except ProcessLookupError:
                    pass
            log.info("passed signal %s to the training process", signal.Signals(signum).name)
        elif signum in STOP_SIGNALS:
            if self.stops >= 2 or child is not None:
                # the training process has ended (on its own, or on the first
                # signal): this one is for the uploads
                self.abort_uploads.set()
                log.warning("stop signal: aborting uploads: files not started stay journaled and the local "
                            "outputs are kept (`mountd resume` finishes them)")
            else:
                log.warning("stop signal before the training process started: stopping")
                raise KeyboardInterrupt


def exit_code(status: int) -> int:
    """Popen's returncode to a shell-style exit code (128+N for signal N)."""
    return 128 - status if status < 0 else status


def run_child(command: list[str], env: dict, cwd: str | None, signals: SignalState) -> int:
    """Run the command to completion; its exit code."""
    try:
        child = subprocess.Popen(command, env=env, cwd=cwd)
    except FileNotFoundError:
        log.error("command not found: %s", command[0])
        return 127
    except PermissionError:
        log.error("command not executable: %s", command[0])
        return 126
    signals.child = child
    if os.getpid() == 1:
        return exit_code(_wait_as_init(child))
    return exit_code(child.wait())


def _wait_as_init(child: subprocess.Popen) -> int:
    """Wait for the child while reaping every other process that ends up
    ours: as PID 1, orphans of the whole container are re-parented to us."""
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return child.wait()
        if pid == child.pid:
            child.returncode = os.waitstatus_to_exitcode(status)
            return child.returncode
        log.debug("reaped orphan %d", pid)


def reap_orphans() -> None:
    """As PID 1, collect any exited processes without blocking."""
    if os.getpid() != 1:
        return
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
