"""`mountd daemon MANIFEST`: a manifest's data held on this node as a service.

    validate -> resume pending uploads -> stage downloads -> mount
    -> READY=1 -> hold the mounts (restarting dead workers) until SIGTERM
    -> STOPPING=1 -> unmount -> upload outputs -> exit 0, or 3 if uploads failed

The steps are lifecycle's (the same code as `mountd run`); what is added here
is the service around them: sd_notify messages for a Type=notify unit
(READY only once every mount is live and every download is on disk, STATUS
lines with staging progress, more start and stop time while bytes move,
watchdog pings), a control socket for `mountd status`, supervision of the
mount workers, and a deadline for the stop (what a stop signal does when:
run/signals.py).

Training runs elsewhere and reads the mounts and staged files through the
paths in the manifest; the daemon runs no command.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field

from mountd.config.manifest import DataReference, Manifest
from mountd.errors import EXIT_OK, EXIT_TRANSFER, MountdError, UsageError
from mountd.journal import Journal
from mountd.run import control, lifecycle, mounts, runtime
from mountd.run.notify import Keepalive, Notifier
from mountd.run.signals import DAEMON_SIGNALS, StopSignals
from mountd.transfer.progress import human_size

log = logging.getLogger("mountd.daemon")

STOP_TIMEOUT = 600.0  # seconds for unmount + uploads after SIGTERM, unless told otherwise
STOP_TIMEOUT_VARIABLE = "DATASET_UNMOUNT_TIMEOUT_SECONDS"  # as the Azure ML data runtime names it
RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)  # before the 1st, 2nd, ... restart of a mount worker
RESTART_LIMIT = 5  # worker deaths within RESTART_WINDOW after which its mount is given up
RESTART_WINDOW = 600.0
POLL = 0.5  # seconds between looks at the workers


def stop_timeout_from_environment(environ=None) -> float | None:
    environ = os.environ if environ is None else environ
    value = environ.get(STOP_TIMEOUT_VARIABLE)
    if value in (None, ""):
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= 86400:
        raise UsageError(f"${STOP_TIMEOUT_VARIABLE}: expected seconds from 1 to 86400, got {value!r}")
    return seconds


@dataclass
class _Slot:
    """One mount reference and the worker holding it. Written by the
    supervising loop alone (the main thread); the control thread only reads
    it for `mountd status`, so its counters need no lock."""
    ref: DataReference
    worker: mounts.Worker | None
    spec: dict  # the worker's job, to start it again
    state: str = "live"  # live | restarting | failed
    deaths: list[float] = field(default_factory=list)  # monotonic times, within RESTART_WINDOW
    next_try: float = 0.0
    restarts: int = 0  # since the daemon started: what mountd_mount_restarts_total counts, so it never goes down


class Daemon:
    def __init__(self, manifest: Manifest, log_level: str = "info", log_format: str = "text",
                 debug: bool = False, stop_timeout: float | None = None, notifier: Notifier | None = None):
        self.manifest = manifest
        self.log_level, self.log_format, self.debug = log_level, log_format, debug
        self.stop_timeout = stop_timeout or STOP_TIMEOUT
        self.notifier = notifier or Notifier()
        self.signals = StopSignals(DAEMON_SIGNALS, ignored_note=": restart the service to read a changed manifest")
        self.state = lifecycle.RunState(manifest)
        self.plan: lifecycle.Plan | None = None
        self.slots: list[_Slot] = []
        self.phase = "starting"
        self.started = time.time()
        self.ready_at: float | None = None
        self.uploads_state = "at stop"  # at stop | uploading | done | failed
        self._server: control.ControlServer | None = None
        self._stem: str | None = None

    # -- the whole life -----------------------------------------------------------------
    def run(self) -> int:
        self.plan = lifecycle.plan(self.manifest)  # UsageError before anything is touched
        self._register()
        try:
            # one holder per work dir, as for `mountd run` (a run and a daemon
            # on one work dir would stage over and upload each other's files)
            held = lifecycle.lock_work_dir(self.manifest, f"(mountd daemon {self.manifest.path})")
        except BaseException:
            self._unregister()
            raise
        self.signals.install()
        started = False
        try:
            try:
                started = self._start()
                if started:
                    self._hold()
            except BaseException:
                self._stop(started)  # unmount and upload what can be, then let the error be reported
                raise
            return self._stop(started)
        finally:
            self.signals.restore()
            held.close()
            self._unregister()
            self.notifier.close()

    def _start(self) -> bool:
        """Everything before READY=1; False if the daemon must not become
        ready (a step failed, or a stop signal came first)."""
        assert self.plan is not None  # made first thing in run()
        self._phase("resuming uploads")
        with Keepalive(self.notifier, lambda: ("resuming uploads an earlier run left pending", None)):
            for failure in lifecycle.resume_pending(self.manifest, self.signals.abort_uploads):
                log.error("resumed upload failed: %s", failure)  # recorded again; not fatal to this start
        lifecycle.prepare_uploads(self.state, self.plan.uploads)
        if self.signals.stop.is_set():
            return False
        self._phase("staging")
        with Keepalive(self.notifier, self._staging_line):
            lifecycle.stage_downloads(self.state, self.plan.downloads)
        if self.state.failures or self.signals.stop.is_set():
            return False
        self._phase("mounting")
        with Keepalive(self.notifier, lambda: (f"mounting {len(self.plan.mounts)} reference(s)", None)):
            try:
                lifecycle.start_mounts(self.state, self.plan.mounts, self.log_level, self.debug,
                                       log_format=self.log_format, log_to_stderr=True)
            except MountdError as e:
                self.state.fail(f"mount: {e}")
                log.error("mounting failed: %s", e)
                return False
        self.slots = [_Slot(ref, worker, worker.spec) for ref, worker in zip(self.plan.mounts, self.state.workers)]
        self.ready_at = time.time()
        self.phase = "ready"
        line = self._ready_line()
        log.info("ready: %s", line)
        self.notifier.ready(f"ready: {line}")
        return True

    def _hold(self) -> None:
        """Until a stop signal: watchdog pings, and dead workers replaced."""
        while not self.signals.stop.wait(POLL):
            self.notifier.watchdog()
            for slot in self.slots:
                self._supervise(slot)

    def _stop(self, started: bool) -> int:
        assert self.plan is not None  # made first thing in run()
        self.phase = "stopping"
        self.notifier.stopping(f"stopping: unmounting {len(self.state.workers)}, "
                               f"uploading {len(self.plan.uploads)} reference(s)")
        # The deadline covers unmounting and uploading; what is not uploaded
        # by then stays on disk and journaled, for the next start or `mountd resume`.
        deadline = threading.Timer(self.stop_timeout, self._deadline)
        deadline.daemon = True
        deadline.start()
        try:
            with Keepalive(self.notifier, self._stopping_line):
                lifecycle.stop_mounts(self.state)
                upload = started or self.manifest.upload_when == "always"
                if upload and self.plan.uploads:
                    self.uploads_state = "uploading"
                    lifecycle.upload_outputs(self.state, self.plan.uploads, self.signals)
                    if self.signals.abort_uploads.is_set():
                        self.state.fail("uploads were stopped before they finished; the rest is "
                                                   f"journaled in {self.manifest.work_dir}/journal")
                    self.uploads_state = "failed" if self.state.failures else "done"
        finally:
            deadline.cancel()
        self.phase = "stopped"
        if self.state.failures:
            for failure in self.state.failures:
                log.error("failed: %s", failure)
            log.error("stopped with exit code %d: %d step(s) failed (first: %s); %s", EXIT_TRANSFER,
                      len(self.state.failures), self.state.failures[0],
                      lifecycle.outputs_summary(self.plan.uploads, self.state.outputs))
            return EXIT_TRANSFER
        log.info("stopped%s with exit code 0: mounts detached; %s", "" if started else " before becoming ready",
                 lifecycle.outputs_summary(self.plan.uploads, self.state.outputs))
        return EXIT_OK

    def _deadline(self) -> None:
        self.signals.abort(f"stop took longer than {self.stop_timeout:.0f} s ({STOP_TIMEOUT_VARIABLE})",
                           level=logging.ERROR)

    # -- mount workers ------------------------------------------------------------------
    def _supervise(self, slot: _Slot) -> None:
        now = time.monotonic()
        worker = slot.worker
        process = worker.process if worker is not None else None
        assert worker is None or process is not None  # started by this daemon, which is its parent
        if slot.state == "failed" or (process is not None and process.poll() is None):
            return
        if worker is not None and process is not None:  # it has just died
            log.error("mount worker %d for %s on %s died (%s); restarting it", worker.pid, slot.ref.name,
                      worker.mountpoint, _how_it_ended(process.returncode))
            self._clean_up_dead(worker)
            slot.worker = None
            self._count_death(slot, now)
        if slot.state == "failed" or now < slot.next_try:
            return
        with Keepalive(self.notifier, lambda: (f"restarting the mount of {slot.ref.name}", None), extend=False):
            try:
                new = mounts.start(slot.spec, supervised=True,
                                   log_level=self.log_level, debug=self.debug, log_format=self.log_format,
                                   log_to_stderr=True)
            except MountdError as e:
                log.error("restarting the mount of %s failed: %s", slot.ref.name, e)
                self._count_death(slot, now)
                return
        slot.worker, slot.state = new, "live"
        self.state.workers.append(new)
        log.info("restarted the mount of %s on %s (worker %d)", slot.ref.name, new.mountpoint, new.pid)
        self.notifier.status(f"ready: {self._ready_line()}")

    def _count_death(self, slot: _Slot, now: float) -> None:
        slot.deaths = [t for t in slot.deaths if now - t < RESTART_WINDOW] + [now]
        if len(slot.deaths) > RESTART_LIMIT:
            slot.state = "failed"
            log.error("giving up on the mount of %s: its worker failed %d times in %.0f minutes; "
                      "%s stays unmounted until the service restarts", slot.ref.name, len(slot.deaths),
                      RESTART_WINDOW / 60, slot.ref.path_on_compute)
            self.notifier.status(f"degraded: mount {slot.ref.name} given up; {self._ready_line()}")
            return
        slot.state = "restarting"
        slot.restarts += 1
        slot.next_try = now + RESTART_DELAYS[min(len(slot.deaths), len(RESTART_DELAYS)) - 1]

    def _clean_up_dead(self, worker: mounts.Worker) -> None:
        """Detach what is left of a dead worker's mount (a dead FUSE mount
        answers every access with ENOTCONN) and forget the worker."""
        try:
            mounts.stop(worker.mountpoint, lazy=True, worker=worker)
        except MountdError as e:
            log.error("cleaning up the dead mount on %s: %s", worker.mountpoint, e)
        if worker in self.state.workers:
            self.state.workers.remove(worker)

    # -- status -------------------------------------------------------------------------
    def _phase(self, phase: str) -> None:
        # lifecycle's steps log what they do; systemd gets the phase
        self.phase = phase
        self.notifier.status(phase)

    def _staging_line(self) -> tuple[str, int]:
        assert self.plan is not None  # made first thing in run()
        files = done = moved = total = 0
        for progress in list(self.state.staging.values()):
            files += progress.total_files
            done += progress.report.files + progress.report.skipped
            moved += progress.report.bytes
            total += progress.total_bytes
        text = (f"staging {len(self.plan.downloads)} reference(s): {done}/{files} files, "
                f"{human_size(moved)} of {human_size(total)}")
        return text, moved + done

    def _ready_line(self) -> str:
        assert self.plan is not None  # made first thing in run()
        live = sum(1 for s in self.slots if s.state == "live")
        return (f"{live}/{len(self.slots)} mount(s) live, {len(self.plan.downloads)} download(s) staged, "
                f"{len(self.plan.uploads)} upload(s) at stop")

    def _stopping_line(self) -> tuple[str, None]:
        assert self.plan is not None  # made first thing in run()
        return f"stopping: {self.uploads_state if self.plan.uploads else 'unmounting'}", None

    def status(self) -> dict:
        """What `mountd status` shows for this daemon: never a secret (the
        control socket scrubs the reply as well)."""
        m = self.manifest
        staging = []
        for name, progress in list(self.state.staging.items()):
            r = progress.report
            staging.append({"name": name, "files": r.files, "skipped": r.skipped, "files_total": progress.total_files,
                            "bytes": r.bytes, "bytes_total": progress.total_bytes, "failed": len(r.failed),
                            "done": r.seconds > 0})
        slots = list(self.slots)
        return {
            "kind": "daemon", "pid": os.getpid(), "manifest": m.path, "run_id": m.run_id, "node_rank": m.node_rank,
            "work_dir": m.work_dir, "phase": self.phase, "started": self.started, "ready_at": self.ready_at,
            "staging": staging,
            "mounts": [{"name": s.ref.name, "datastore": s.ref.datastore.name, "path": s.ref.path_on_datastore,
                        "mountpoint": s.ref.path_on_compute, "mode": "rw" if s.ref.read_write else "ro",
                        "state": s.state, "worker_pid": s.worker.pid if s.worker else None,
                        "restarts": s.restarts, "recent_deaths": len(s.deaths)} for s in slots],
            "downloads": [{"name": r.name, "datastore": r.datastore.name, "path": r.path_on_datastore,
                           "path_on_compute": r.path_on_compute} for r in (self.plan.downloads if self.plan else [])],
            "uploads": [{"name": r.name, "datastore": r.datastore.name, "path": r.path_on_datastore,
                         "path_on_compute": r.path_on_compute, "state": self.uploads_state}
                        for r in (self.plan.uploads if self.plan else [])],
            "pending_uploads": _pending(m),
            "failures": self.state.failed(),
        }

    def _register(self) -> None:
        """The daemon's record and control socket; one daemon per manifest."""
        self._stem = runtime.daemon_stem(self.manifest.path)
        for record in runtime.live_records("daemons"):
            if record.get("manifest") == self.manifest.path and record.get("pid") != os.getpid():
                raise UsageError(f"a daemon for {self.manifest.path} is already running (pid {record['pid']})")
        self._server = control.ControlServer(self._stem + ".sock", self.status)
        runtime.write_json(self._stem + ".json", {"pid": os.getpid(), "manifest": self.manifest.path,
                                                  "run_id": self.manifest.run_id, "started": self.started})

    def _unregister(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._stem:
            runtime.remove_files(self._stem)


def _pending(manifest: Manifest) -> list[str]:
    """What the journal still has to upload, by origin ("upload reference outputs")."""
    return [job.label for job in Journal(manifest.work_dir).pending(manifest.run_id)]


def _how_it_ended(code: int | None) -> str:
    if code is None:
        return "unknown"
    if code < 0:
        return (f"killed by {signal.Signals(-code).name}" if -code in signal.Signals._value2member_map_
                else f"signal {-code}")
    return f"exit code {code}"


def run(manifest: Manifest, log_level: str = "info", log_format: str = "text", debug: bool = False,
        stop_timeout: float | None = None) -> int:
    return Daemon(manifest, log_level, log_format, debug, stop_timeout).run()
