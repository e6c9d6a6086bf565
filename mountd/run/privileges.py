"""Dropping what a mount worker does not need.

A worker holds a datastore credential for as long as the mount lives, and
when started as root (a systemd service, a container entrypoint) it would
hold every capability root has. Before it opens storage or mounts, it keeps
only what mounting and unmounting take, and makes itself undumpable: no core
file with the secret in it, and other processes of the same user cannot
attach to it or read its memory through /proc.

Capabilities are per thread on Linux: this must run before the worker starts
any thread, and every thread created later inherits the reduced set.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
CAP_DAC_READ_SEARCH = 2  # reach a mountpoint or cache directory under another user's private directory
CAP_SYS_ADMIN = 21  # mount(2) and umount2(2), for libfuse and fusermount3 as root
KEEP = (CAP_DAC_READ_SEARCH, CAP_SYS_ADMIN)
_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def keep_mask(keep=KEEP) -> int:
    return sum(1 << cap for cap in keep)


def drop(keep=KEEP) -> None:
    """Keep only the capabilities in `keep` (effective, permitted and
    bounding sets; nothing inheritable) and become undumpable. Best effort:
    failures are logged, never fatal."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
    except (OSError, ValueError):
        last = 40
    # The bounding set first: dropping from it needs CAP_SETPCAP, which the
    # capset below gives up.
    for cap in range(last + 1):
        if cap not in keep:
            libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # EPERM without CAP_SETPCAP (not root): nothing to drop
    header = _CapHeader(_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    current = (_CapData * 2)()
    if libc.capget(ctypes.byref(header), current) != 0:
        return
    for i in range(2):  # keep only what we have and want: capset cannot add
        mask = (keep_mask(keep) >> (32 * i)) & 0xFFFFFFFF
        data[i].permitted = current[i].permitted & mask
        data[i].effective = current[i].effective & mask
        data[i].inheritable = 0
    if libc.capset(ctypes.byref(header), data) != 0:
        log.warning("could not drop capabilities: %s", os.strerror(ctypes.get_errno()))
