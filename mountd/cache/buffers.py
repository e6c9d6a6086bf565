"""Block buffers: the memory a block's bytes live in, reused from block to
block.

A mount reading at storage speed goes through a block every few
milliseconds. Fresh memory for each would cost a page fault and a zeroed
page for every 4 KiB (on a VM whose host reclaims freed memory, the larger
part of a cold read's CPU, measured), so full-size blocks take a buffer from
a pool and give it back when the block is gone. Smaller blocks (a small
file, the end of a file) are allocated to size: a pooled buffer would keep a
whole block's memory resident for a few bytes.

A Block gives its buffer back when the last reference to it goes (CPython
frees at once). So whoever reads a block's `view` holds the Block itself
until done: a view alone does not keep the buffer from being reused.
"""

from __future__ import annotations

import collections
import ctypes

from mountd.fileio import aligned_buffer


class Block:
    """The first `size` bytes of `buffer`."""

    __slots__ = ("buffer", "size", "_pool")

    def __init__(self, buffer, size: int, pool: "BufferPool | None" = None):
        self.buffer = buffer
        self.size = size
        self._pool = pool

    @property
    def view(self) -> memoryview:
        return memoryview(self.buffer)[:self.size]

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return bytes(self.view)

    def __del__(self):
        pool = self._pool
        if pool is not None:
            self._pool = None
            pool.give(self.buffer)


class BufferPool:
    """Page-aligned buffers of `size` bytes, at most `keep` of them idle."""

    def __init__(self, size: int, keep: int):
        self.size = size
        self.keep = keep
        # deque: append and pop are atomic, so a Block freed in any thread,
        # even one inside this pool, can give its buffer back without a lock
        self._idle: collections.deque = collections.deque()
        self.created = 0

    def buffer(self, size: int):
        """A buffer for `size` bytes: a pooled one for a full block, else
        one of exactly that size."""
        if size != self.size or not size:
            return bytearray(size)
        try:
            return self._idle.pop()
        except IndexError:
            self.created += 1
            return aligned_buffer(self.size)

    def block(self, buffer, size: int) -> Block:
        """A Block of the first `size` bytes of a buffer from `buffer()`."""
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
