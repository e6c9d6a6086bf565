"""What a stop signal (SIGTERM, SIGINT) does at each point of a `mountd run`
or a `mountd daemon`: one state machine, shared by both.

    WORKING --stop--> STOPPING --stop--> ABORTING
       |                  ^                (uploads stopped, files kept and journaled)
       +--work done-------+

WORKING: the work is under way (a run's training process, a daemon's mounts);
a stop signal is passed to a live training process, else it asks the owner to
stop (a run raises KeyboardInterrupt before its training process started; a
daemon's loop sees `stop`). STOPPING: unmounting and uploading; the next stop
signal, or a deadline, stops the uploads (`abort_uploads`): what did not go up
stays on disk and in the journal for `mountd resume`.

The handlers only set events and forward signals: they run on the main thread
between two bytecodes, wherever it is, so they take no lock.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading

log = logging.getLogger("mountd.run")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# what a training process gets passed on (`mountd run`); SIGHUP would kill
# mountd by default, and systemd's `reload` is not offered, so it is taken too
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
DAEMON_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

WORKING, STOPPING, ABORTING = "working", "stopping", "aborting"


class StopSignals:
    """The stop-signal state of one run or daemon. `stop` is set by the first
    stop signal that is not passed to a training process; `abort_uploads` by
    the one after it (or `abort`), and is what the upload loops watch.

    `interrupt_before_work`: a first stop signal while WORKING with no live
    training process raises KeyboardInterrupt (`mountd run` has nothing to
    wait for); without it the owner polls `stop` (the daemon)."""

    def __init__(self, signals=FORWARDED, interrupt_before_work: bool = False, ignored_note: str = ""):
        self.state = WORKING
        self.stop = threading.Event()
        self.abort_uploads = threading.Event()
        self._signals = signals
        self._interrupt = interrupt_before_work
        self._ignored_note = ignored_note
        self._child: subprocess.Popen | None = None
        # Ctrl-C at a terminal reaches the training process already (same
        # process group): passing it on again would deliver it twice.
        self._terminal = sys.stdin.isatty() if sys.stdin else False
        self._previous: dict = {}

    # -- the owner's side ---------------------------------------------------------------
    def install(self) -> None:
        for sig in self._signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def forward_to(self, child: subprocess.Popen) -> None:
        """Signals go to this training process while it lives."""
        self._child = child

    def work_done(self) -> None:
        """The work has ended (a run's training process exited, or never
        ran): from now on a stop signal stops the uploads."""
        if self.state == WORKING:
            self.state = STOPPING

    def abort(self, reason: str, level: int = logging.WARNING) -> None:
        """Stop the uploads (a second stop signal, or a deadline passed)."""
        if self.state != ABORTING:
            self.state = ABORTING
            log.log(level, "%s: aborting uploads: files not started stay journaled and the local outputs are kept "
                        "(`mountd resume` finishes them)", reason)
        self.abort_uploads.set()

    # -- the handler --------------------------------------------------------------------
    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        child = self._child
        if child is not None and child.returncode is None:  # alive
            if not (signum == signal.SIGINT and self._terminal):
                try:
                    child.send_signal(signum)
                except ProcessLookupError:
                    pass
            log.info("passed signal %s to the training process", name)
            return
        if signum not in STOP_SIGNALS:
            log.info("%s ignored%s", name, self._ignored_note)
            return
        if self._child is not None:  # it has ended, on its own or on an earlier signal
            self.work_done()
        if self.state != WORKING:
            self.abort("stop signal")
            return
        self.state = STOPPING
        self.stop.set()
        if self._interrupt:
            log.warning("stop signal before the training process started: stopping")
            raise KeyboardInterrupt
        log.info("%s: stopping", name)
