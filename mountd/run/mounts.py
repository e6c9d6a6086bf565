"""Starting, waiting for and stopping mount workers.

`start` returns only once the kernel has the mount (the worker says "ready"
on a pipe) or with the worker's own error message. `stop` detaches the mount
with fusermount3 and waits until the worker has exited.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import select
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

from mountd.errors import MountdError, UsageError
from mountd.run import runtime

log = logging.getLogger(__name__)

_OCTAL = re.compile(r"\\([0-7]{3})")  # mountinfo writes space, tab, newline, backslash as \ooo
READY_TIMEOUT = 60.0  # seconds for a worker to open its store and mount
EXIT_TIMEOUT = 30.0  # seconds for a worker to finish after its mount is detached


def fuse_problem() -> str | None:
    """Why FUSE mounts cannot work here, or None if they can."""
    if os.environ.get("MOUNTD_NO_FUSE"):
        return "MOUNTD_NO_FUSE is set"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (in a container: --device /dev/fuse --cap-add SYS_ADMIN)"
    if not shutil.which("fusermount3"):
        return "fusermount3 is not installed (Debian package fuse3)"
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
        os.close(fd)
    except OSError as e:
        return f"/dev/fuse cannot be opened: {e.strerror}"
    return None


def _mountinfo() -> list[tuple[str, str]]:
    """(mount point, "major:minor") of every mount of this process's mount
    namespace, from /proc/self/mountinfo: nothing is stat'ed, so a hung FUSE
    mount cannot block the question."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        fields = (line.split() for line in f)
        return [(_OCTAL.sub(lambda m: chr(int(m.group(1), 8)), x[4]), x[2]) for x in fields if len(x) > 4]


def mount_points() -> list[str]:
    return [point for point, _ in _mountinfo()]


def mount_device(path: str) -> str | None:
    """The "major:minor" of the mount at `path` (the last one mounted there)."""
    found = [dev for point, dev in _mountinfo() if point == path]
    return found[-1] if found else None


def mount_type(path: str) -> str | None:
    """The filesystem type ("fuse.mountd", "tmpfs", ...) of the last mount at
    `path`, from /proc/self/mountinfo (nothing is stat'ed); None if none."""
    path = os.path.abspath(path)
    real = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            head, sep, tail = line.partition(" - ")
            x = head.split()
            if sep and len(x) > 4 and _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), x[4]) == real:
                found = (tail.split() or [""])[0]
    return found


MOUNTD_FSTYPE = "fuse.mountd"  # the subtype the mount worker gives its FUSE mounts


def is_mounted(path: str) -> bool:
    # Resolve symbolic links in the parent only: stat'ing the mountpoint
    # itself would wait on the filesystem mounted there.
    path = os.path.abspath(path)
    real = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    try:
        return real in mount_points()
    except OSError:
        return False


def check_mountpoint(mountpoint: str) -> str:
    """The absolute mountpoint, or UsageError saying why it cannot be used."""
    path = os.path.abspath(mountpoint)
    if not os.path.exists(path):
        raise UsageError(f"mountpoint {path} does not exist")
    if not os.path.isdir(path):
        raise UsageError(f"mountpoint {path} is not a directory")
    if is_mounted(path):
        raise UsageError(f"{path} is already a mountpoint")
    try:
        if os.listdir(path):
            raise UsageError(f"mountpoint {path} is not empty")
    except PermissionError:
        raise UsageError(f"mountpoint {path} cannot be read") from None
    problem = fuse_problem()
    if problem:
        raise UsageError(f"FUSE is not available: {problem}")
    return path


@dataclass
class Worker:
    mountpoint: str
    pid: int
    process: subprocess.Popen | None = None  # None when we are not its parent
    supervisor_fd: int | None = None  # our end of the supervisor pipe
    spec: dict | None = None  # what it was started with, to start it again


def start(spec: dict, supervised: bool = False, log_level: str = "info", debug: bool = False,
          timeout: float = READY_TIMEOUT, log_format: str = "text", log_to_stderr: bool = False) -> Worker:
    """Start a worker for `spec` and wait until its mount is live. Supervised
    workers unmount themselves when this process exits or dies. The worker
    logs to its file in the runtime directory, or with `log_to_stderr` to
    ours (under systemd: the journal)."""
    mountpoint = spec["mountpoint"]
    ready_r, ready_w = os.pipe()
    fds = [ready_w]
    sup_r = sup_w = None
    job = dict(spec, ready_fd=ready_w, log_level=log_level, debug=debug, log_format=log_format,
               owner=os.getpid() if supervised else None)
    if supervised:
        sup_r, sup_w = os.pipe()
        fds.append(sup_r)
        job["supervisor_fd"] = sup_r
    log_file = None if log_to_stderr else open(runtime.log_path(mountpoint), "ab")
    try:
        proc = subprocess.Popen([sys.executable, "-m", "mountd.run.mount_worker"], stdin=subprocess.PIPE,
                                stdout=log_file, stderr=log_file, pass_fds=fds,
                                close_fds=True, start_new_session=not supervised)
    finally:
        if log_file:
            log_file.close()
        os.close(ready_w)
        if sup_r is not None:
            os.close(sup_r)
    assert proc.stdin is not None  # stdin=PIPE
    try:
        proc.stdin.write(json.dumps(job).encode())
        proc.stdin.close()
        answer = _read_line(ready_r, timeout, proc)
    finally:
        os.close(ready_r)
    if answer != "ready":
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if sup_w is not None:
            os.close(sup_w)
        if answer.startswith("error "):
            code, _, message = answer[6:].partition(": ")
            error = UsageError(message) if code == "2" else MountdError(message)
            if code.isdigit():
                error.exit_code = int(code)  # as the worker's error said (3: storage out of reach, ...)
            raise error
        where = "its log lines above" if log_to_stderr else runtime.log_path(mountpoint)
        raise MountdError(f"mount worker for {mountpoint} did not come up ({answer or 'no answer'}); "
                          f"see {where}")
    if sup_w is not None:
        os.set_inheritable(sup_w, False)
    return Worker(mountpoint, proc.pid, proc, sup_w, spec)


def _read_line(fd: int, timeout: float, proc: subprocess.Popen) -> str:
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            return "timed out"
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break  # the worker closed the pipe (exited) without a word
            data += chunk
        elif proc.poll() is not None and not data:
            break
    return data.decode(errors="replace").strip()


def stop(mountpoint: str, lazy: bool = False, timeout: float = EXIT_TIMEOUT, worker: Worker | None = None) -> list[str]:
    """Detach the mount and wait for its worker to exit. Returns the files
    written through a read-write mount that its worker could not upload
    (their journal jobs stay in its work dir)."""
    path = os.path.abspath(mountpoint)
    record = runtime.read_record(path)
    work_dir = (worker.spec or {}).get("work_dir") if worker else (record or {}).get("work_dir")
    pid = worker.pid if worker else (record or {}).get("pid")
    if not is_mounted(path):
        if record is None and worker is None:
            raise UsageError(f"{path} is not mounted")
    else:
        kind = mount_type(path) if worker is None else MOUNTD_FSTYPE
        if kind != MOUNTD_FSTYPE:
            raise UsageError(f"{path} is a {kind or 'unknown'} mount that mountd did not make: mountd unmounts only "
                             "its own (use umount for others)")
        cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [path]
        # fusermount3 exits 1 whatever went wrong and names the errno only
        # in its message, as strerror() words it: in the C locale, so that
        # the wording of EBUSY is known.
        result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
        if result.returncode != 0:
            message = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"
            if message.endswith(os.strerror(errno.EBUSY)):
                raise MountdError(f"{path} is busy (files or directories in it are open); "
                                  "close them, or unmount with --lazy to detach it now and finish when they close")
            raise MountdError(f"cannot unmount {path}: {message}")
    if worker and worker.supervisor_fd is not None:
        os.close(worker.supervisor_fd)
        worker.supervisor_fd = None
    # After a lazy detach the worker goes on serving the files still open and
    # exits when they close: give it a moment, never kill it.
    _wait_exit(pid, worker, min(timeout, 1.0) if lazy else timeout, lazy, (record or {}).get("pid_start"))
    if pid is None or not runtime.pid_alive(pid):
        runtime.remove_record(path)
        return not_uploaded(work_dir) if work_dir else []
    return []  # still serving open files (lazy): it uploads them as they close


def not_uploaded(work_dir: str) -> list[str]:
    """Storage paths a read-write mount of `work_dir` wrote and could not
    upload: the remaining files of its journal's staged jobs."""
    from mountd.journal import Journal
    return [remote for job in Journal(work_dir).pending() if job.staged for _, remote in job.remaining()]


def _wait_exit(pid: int | None, worker: Worker | None, timeout: float, lazy: bool,
               pid_start: int | None = None) -> None:
    if worker and worker.process:
        try:
            worker.process.wait(timeout)
        except subprocess.TimeoutExpired:
            if not lazy:
                log.warning("mount worker %d did not exit in %.0f s; killing it", worker.pid, timeout)
                worker.process.kill()
                worker.process.wait()
        return
    if pid is None:
        return

    # The pid comes from a record on disk: the worker may be long gone and
    # its pid another process's now. Wait for, and kill, only the process the
    # record names (a record without a start time: a process running mountd).
    def ours() -> bool:
        return runtime.is_process(pid, pid_start) if pid_start is not None else runtime.is_mountd(pid)
    if not ours():
        return
    deadline = time.monotonic() + timeout
    while runtime.pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if runtime.pid_alive(pid) and not lazy and ours():
        log.warning("mount worker %d did not exit in %.0f s; killing it", pid, timeout)
        os.kill(pid, 9)
