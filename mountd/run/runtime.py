"""Where running mounts and daemons record themselves, under the runtime
directory ($RUNTIME_DIRECTORY, /run/mountd for root, else
$XDG_RUNTIME_DIR/mountd, else /tmp/mountd-UID):

    mounts/<id>.json  .sock  .log    one per mount worker (record, control socket, log)
    daemons/<id>.json .sock          one per `mountd daemon` (keyed by manifest path)

A systemd instance gets its own runtime directory below /run/mountd
(RuntimeDirectory=mountd/%i), so `mountd status` also looks one level down.
Records whose process is gone (killed, crashed) are pruned when read.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

from mountd.fileio import write_atomic


def runtime_dir(create: bool = True) -> str:
    if os.environ.get("RUNTIME_DIRECTORY"):
        base = os.environ["RUNTIME_DIRECTORY"].split(":")[0]
    elif os.geteuid() == 0:
        base = "/run/mountd"
    elif os.environ.get("XDG_RUNTIME_DIR"):
        base = os.path.join(os.environ["XDG_RUNTIME_DIR"], "mountd")
    else:
        base = os.path.join(tempfile.gettempdir(), f"mountd-{os.geteuid()}")
    if create:
        os.makedirs(base, mode=0o700, exist_ok=True)
    return base


def mounts_dir(create: bool = True) -> str:
    path = os.path.join(runtime_dir(create), "mounts")
    if create:
        os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def mount_id(mountpoint: str) -> str:
    # abspath, never realpath: resolving would stat the mountpoint, and from
    # inside the worker that waits on the worker itself.
    return hashlib.sha1(os.path.abspath(mountpoint).encode("utf-8", "surrogateescape")).hexdigest()[:16]


def record_path(mountpoint: str, create: bool = True) -> str:
    return os.path.join(mounts_dir(create), mount_id(mountpoint) + ".json")


def control_path(mountpoint: str) -> str:
    return os.path.join(mounts_dir(), mount_id(mountpoint) + ".sock")


def log_path(mountpoint: str) -> str:
    return os.path.join(mounts_dir(), mount_id(mountpoint) + ".log")


def write_record(mountpoint: str, record: dict) -> None:
    write_json(record_path(mountpoint), record)


def read_record(mountpoint: str) -> dict | None:
    try:
        with open(record_path(mountpoint, create=False), encoding="utf-8") as f:  # a question writes nothing
            return json.load(f)
    except (OSError, ValueError):
        return None


def remove_record(mountpoint: str) -> None:
    remove_files(record_path(mountpoint)[:-len(".json")])


def remove_files(stem: str) -> None:
    """A record and its control socket (`stem` + .json, .sock)."""
    for suffix in (".json", ".sock"):
        try:
            os.unlink(stem + suffix)
        except FileNotFoundError:
            pass


def daemons_dir() -> str:
    path = os.path.join(runtime_dir(), "daemons")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def daemon_stem(manifest_path: str) -> str:
    """Record and socket path of the daemon serving a manifest, less the suffix."""
    key = hashlib.sha1(os.path.abspath(manifest_path).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return os.path.join(daemons_dir(), key)


def write_json(path: str, body: dict) -> None:
    """Replace a record in one step: a reader never sees half of one."""
    write_atomic(path, json.dumps(body).encode("utf-8"), mode=0o644)


def search_dirs() -> list[str]:
    """The runtime directory and those of systemd instances below it."""
    base = runtime_dir()
    out = [base]
    for entry in sorted(os.scandir(base), key=lambda e: e.name):
        if entry.is_dir(follow_symlinks=False) and entry.name not in ("mounts", "daemons") and (
                os.path.isdir(os.path.join(entry.path, "mounts"))
                or os.path.isdir(os.path.join(entry.path, "daemons"))):
            out.append(entry.path)
    return out


def live_records(kind: str) -> list[dict]:
    """Records of running processes ("mounts" or "daemons") in every search
    directory; each gains "control" (its socket). Records of processes that
    are gone are deleted on the way, with their sockets."""
    out = []
    for base in search_dirs():
        directory = os.path.join(base, kind)
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            if not name.endswith(".json"):
                continue
            stem = os.path.join(directory, name[:-len(".json")])
            try:
                with open(stem + ".json", encoding="utf-8") as f:
                    record = json.load(f)
            except (OSError, ValueError):
                continue
            if not is_mountd(record.get("pid")):
                remove_files(stem)
                continue
            record["control"] = stem + ".sock"
            out.append(record)
    return out


def is_mountd(pid) -> bool:
    """Whether `pid` is a live mountd process (not a recycled pid)."""
    if not isinstance(pid, int) or not pid_alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"mountd" in f.read()
    except OSError:
        return True  # alive, and not ours to read: leave its record alone


def process_start(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot, field 22 of
    /proc/PID/stat): with the pid it names one process, even once the pid
    has been reused by another."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(") ", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def is_process(pid: int, started: int | None) -> bool:
    """Whether `pid` is still the process that started at `started` (as
    process_start gave it); a record without one proves nothing: False."""
    return started is not None and pid_alive(pid) and process_start(pid) == started


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False
