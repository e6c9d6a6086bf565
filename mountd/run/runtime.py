"""Where running mounts record themselves: one JSON file per mount worker
under the runtime directory ($RUNTIME_DIRECTORY, /run/mountd for root, else
$XDG_RUNTIME_DIR/mountd, else /tmp/mountd-UID)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile


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


def log_path(mountpoint: str) -> str:
    return os.path.join(mounts_dir(), mount_id(mountpoint) + ".log")


def write_record(mountpoint: str, record: dict) -> None:
    path = record_path(mountpoint)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f)
    os.replace(tmp, path)


def read_record(mountpoint: str) -> dict | None:
    try:
        with open(record_path(mountpoint, create=False), encoding="utf-8") as f:  # a question writes nothing
            return json.load(f)
    except (OSError, ValueError):
        return None


def remove_record(mountpoint: str) -> None:
    try:
        os.unlink(record_path(mountpoint))
    except FileNotFoundError:
        pass


def all_records() -> list[dict]:
    out = []
    for name in sorted(os.listdir(mounts_dir())):
        if name.endswith(".json"):
            try:
                with open(os.path.join(mounts_dir(), name), encoding="utf-8") as f:
                    out.append(json.load(f))
            except (OSError, ValueError):
                continue
    return out


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
