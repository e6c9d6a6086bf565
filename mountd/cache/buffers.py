"""Block buffers: the memory a block's bytes live in, reused from block to
block, and lent to their holders as explicit leases (`Block`).

A mount reading at storage speed goes through a block every few
milliseconds. Fresh memory for each would cost a page fault and a zeroed
page for every 4 KiB (on a VM whose host reclaims freed memory, the larger
part of a cold read's CPU, measured), so full-size blocks take a buffer from
a pool and give it back when the block is gone. Smaller blocks (a small
file, the end of a file) are allocated to size: a pooled buffer would keep a
whole block's memory resident for a few bytes.

A Block is one holder's lease on a buffer's bytes (the memory cache holds
one, each reader one, the disk writer one): whoever takes a Block releases
it (`release()`, or `with block:`), and `share()` lends the same bytes to
another holder. The buffer goes back to the pool when its last lease is
released. A released Block's `view` is released with it, so a use after
release raises ValueError instead of reading whatever block the buffer holds
next (slices taken from the view are the holder's to drop before release).
A lease dropped without release is released when collected, as a safety net.
"""

from __future__ import annotations

import collections
import ctypes
import threading

from mountd.fileio import aligned_buffer


class _Shared:
    """A buffer and the number of leases on it."""

    __slots__ = ("buffer", "pool", "leases", "lock")

    def __init__(self, buffer, pool: BufferPool | None):
        self.buffer = buffer
        self.pool = pool
        self.leases = 1
        self.lock = threading.Lock()


class Block:
    """A lease on the first `size` bytes of `buffer`."""

    __slots__ = ("size", "_shared", "_view")

    def __init__(self, buffer, size: int, pool: BufferPool | None = None, shared: _Shared | None = None):
        self.size = size
        self._view = memoryview(buffer)[:size]
        self._shared: _Shared | None = shared or _Shared(buffer, pool)

    @property
    def view(self) -> memoryview:
        """The bytes, valid until this lease is released (then it raises)."""
        return self._view

    def share(self) -> Block:
        """Another lease on the same bytes, for another holder."""
        shared = self._shared
        if shared is None:
            raise ValueError("a released block cannot be shared")
        with shared.lock:
            shared.leases += 1
        return Block(shared.buffer, self.size, shared=shared)

    def release(self) -> None:
        """The holder is done: the view goes, and with the last lease the
        buffer goes back to its pool. Releasing twice does nothing."""
        shared, self._shared = self._shared, None
        if shared is None:
            return
        self._view.release()
        with shared.lock:
            shared.leases -= 1
            last = not shared.leases
        if last and shared.pool is not None:
            shared.pool.give(shared.buffer)

    def __enter__(self) -> Block:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return bytes(self.view)

    def __del__(self):
        if getattr(self, "_shared", None) is not None:
            self.release()


class BufferPool:
    """Page-aligned buffers of `size` bytes, at most `keep` of them idle."""

    def __init__(self, size: int, keep: int):
        self.size = size
        self.keep = keep
        # deque: append and pop are atomic, so a Block released in any
        # thread, even one inside this pool, can give its buffer back without a lock
        self._idle: collections.deque = collections.deque()
        self.created = 0
        self._lock = threading.Lock()  # for `created`: buffers are made in every fetching thread

    def buffer(self, size: int):
        """A buffer for `size` bytes: a pooled one for a full block, else
        one of exactly that size."""
        if size != self.size or not size:
            return bytearray(size)
        try:
            return self._idle.pop()
        except IndexError:
            with self._lock:
                self.created += 1
            return aligned_buffer(self.size)

    def block(self, buffer, size: int) -> Block:
        """The first lease (the caller's) on the first `size` bytes of a
        buffer from `buffer()`."""
        pooled = not isinstance(buffer, bytearray) and len(buffer) >= self.size
        return Block(buffer, size, self if pooled else None)

    def give(self, buffer) -> None:
        if len(self._idle) < self.keep:
            self._idle.append(buffer)

    @property
    def idle(self) -> int:
        return len(self._idle)


def copy_into(dest: memoryview, src: memoryview) -> None:
    """dest[:] = src (same length), without holding the interpreter lock
    when both are writable memory (the FUSE threads copy in parallel then,
    instead of queueing for the lock one 1 MiB copy at a time)."""
    n = len(src)
    try:
        to = ctypes.addressof(ctypes.c_char.from_buffer(dest))
        frm = ctypes.addressof(ctypes.c_char.from_buffer(src))
    except (TypeError, ValueError):  # read-only or empty
        dest[:n] = src
        return
    ctypes.memmove(to, frm, n)
