"""Readahead for one open file: notices sequential reading and ramps up how
far ahead blocks are fetched, and stops on random access.

The kernel's own readahead sends several reads of one handle at once from
different FUSE threads, so "sequential" allows for reads arriving a little
out of order.
"""

from __future__ import annotations

import threading


# How far from the expected offset a read may land and still count as
# sequential: the kernel reads ahead on its own (up to 16 MiB on our mounts),
# in requests handled by several threads in any order.
SLACK = 32 * 1024 * 1024


def blocks_kept_behind(block_size: int) -> int:
    """How many blocks behind its furthest read a sequential reader keeps
    (ReadAhead.left_behind lets go of them only once SLACK behind)."""
    return -(-SLACK // block_size)


class ReadAhead:
    def __init__(self, block_size: int, max_blocks: int, file_size: int):
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.last_block = max(0, (file_size - 1) // block_size)
        self._lock = threading.Lock()
        self._expected = 0  # where the next sequential read should start
        self._window = 0  # blocks to keep in flight ahead of the reader
        self._scheduled = -1  # highest block index already asked for
        self._released = -1  # highest block index handed back by left_behind()

    def on_read(self, offset: int, size: int, streaming: bool = False) -> range:
        """Record a read; return the block indices to prefetch now.
        `streaming`: a request that takes more blocks is open (a Run), so
        the window slides a block at a time instead of being refilled in
        batches."""
        with self._lock:
            slack = max(2 * self.block_size, SLACK)
            sequential = self._expected - slack <= offset <= self._expected + slack
            if sequential:
                self._window = min(self.max_blocks, max(1, self._window * 2) if offset else 1)
            else:
                self._window = 0  # random access: fetch only what is asked
                self._scheduled = -1
                self._released = offset // self.block_size - 1
            self._expected = max(self._expected, offset + size) if sequential else offset + size
            if not self._window:
                return range(0)
            current = (offset + size - 1) // self.block_size
            ahead = self._scheduled - current
            if not streaming and self._window > 2 and ahead > 1:
                # enough is on its way and no request takes more blocks
                # (no open Run): ask again only when one block is left
                # ahead, for the rest of the window in one new request.
                # Each request costs the storage far more than its bytes do
                # (Azurite: ~10 ms of CPU), and one streamed request
                # delivers its blocks in order anyway: refilling at half
                # the window made twice the requests and a cold read 0.68x
                # curl's rate, against 0.88x (medians of 10, measured).
                return range(0)
            start = max(current + 1, self._scheduled + 1)
            stop = min(current + self._window, self.last_block) + 1
            if start >= stop:
                return range(0)
            self._scheduled = stop - 1
            return range(start, stop)

    def follows(self, offset: int) -> bool:
        """Whether a read at `offset` starts where the reading so far ended."""
        return offset == self._expected

    def left_behind(self) -> range:
        """Blocks a sequential reader has left SLACK or more behind since the
        last call. Their bytes are in the kernel's page cache (and the disk
        tier), and no read still on its way can want them: their memory can
        go to the blocks ahead, instead of fresh memory being taken for those
        (a cold read otherwise fills the whole memory cache once)."""
        with self._lock:
            if not self._window:
                return range(0)
            stop = (self._expected - SLACK) // self.block_size
            start = self._released + 1
            if stop <= start:
                return range(0)
            self._released = stop - 1
            return range(start, stop)

    @property
    def window(self) -> int:
        return self._window
