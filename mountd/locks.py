"""Advisory locks that say a directory is in use: a disk cache held by a
mount, a read-write mount's work dir. The lock lives as long as the process
keeps the returned file open (and goes with the process if it dies)."""

from __future__ import annotations

import fcntl
import os
from typing import IO


def try_lock(directory: str) -> IO | None:
    """Take the lock of `directory` (its `.lock` file); the open lock file,
    to keep open while the directory is in use, or None if another process
    holds it."""
    f = open(os.path.join(directory, ".lock"), "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def is_locked(directory: str) -> bool:
    """True if another process holds the lock of `directory`."""
    try:
        held = try_lock(directory)
    except OSError:
        return False
    if held is None:
        return True
    held.close()
    return False


def holder(directory: str) -> str | None:
    """What the lock file of `directory` says of its holder (`pid N ...`),
    if a holder wrote it."""
    try:
        with open(os.path.join(directory, ".lock"), encoding="utf-8", errors="replace") as f:
            return f.read(200).strip() or None
    except OSError:
        return None


def lock_as(directory: str, note: str) -> IO | None:
    """try_lock, then write `pid <pid> <note>` into the lock file so that a
    process refused the directory can name the holder."""
    f = try_lock(directory)
    if f is not None:
        f.truncate(0)
        f.write(f"pid {os.getpid()} {note}\n")
        f.flush()
    return f
