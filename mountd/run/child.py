"""The training process of `mountd run`: started with the references in
its environment, its exit status turned into an exit code.

Signals are passed on to it by run/signals.py. As PID 1 (a container's
entrypoint) mountd also reaps orphaned processes, as an init must.
"""

from __future__ import annotations

import logging
import os
import subprocess

from mountd.run.signals import StopSignals

log = logging.getLogger(__name__)

def exit_code(status: int) -> int:
    """Popen's returncode to a shell-style exit code (128+N for signal N)."""
    return 128 - status if status < 0 else status


def run_child(command: list[str], env: dict, cwd: str | None, signals: StopSignals) -> int:
    """Run the command to completion; its exit code."""
    try:
        child = subprocess.Popen(command, env=env, cwd=cwd)
    except FileNotFoundError:
        log.error("command not found: %s", command[0])
        return 127
    except PermissionError:
        log.error("command not executable: %s", command[0])
        return 126
    signals.forward_to(child)
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
