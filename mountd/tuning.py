"""Process-wide tuning for mountd's processes, which spend their lives
moving bytes on many threads: the interpreter's switch interval, and (for a
mount worker) glibc's allocator."""

from __future__ import annotations

import ctypes
import sys

# How long a thread may hold the interpreter lock before another that wants
# it may ask for it. Threads here give the lock up on every system call
# anyway; a short interval only makes them pass it back and forth (measured:
# at 1 ms, 230 futex calls per downloaded file, and 2 000 small files took
# 10-15% longer than at 20 ms; a cold read through a mount 10% longer).
SWITCH_INTERVAL = 0.02


def for_transfers() -> None:
    sys.setswitchinterval(SWITCH_INTERVAL)


def return_freed_blocks() -> None:
    """Tune glibc's allocator for a mount worker. Large allocations (over
    2 MiB) are mapped and returned to the system when freed: glibc otherwise
    raises its mmap threshold after the first big free, and the worker's
    memory would grow well past its cache cap. Smaller ones (libfuse's 1 MiB
    reply buffers, one per request) stay in the heap when freed instead of
    being trimmed and faulted in again for the next request: that cost a
    zeroed page per 4 KiB read (measured: a tenth of a cold read's CPU)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 2 * 1024 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 * 1024 * 1024)  # M_TRIM_THRESHOLD: keep up to this much freed heap
        # (capping malloc arenas as well made the FUSE threads contend: ~8% slower reads, measured)
    except (OSError, AttributeError):
        pass
