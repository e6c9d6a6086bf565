"""Reads of files through the block cache: a `FileReader` per open file turns
reads into block lookups, readahead and streamed runs; `Reads` makes them.

The filesystem core only asks a FileReader for bytes. What lies under it:
each file is read in blocks of `block_size`, keyed by (path, etag, index) in
the block cache; a reader going through a file sequentially gets its blocks
fetched ahead (`ReadAhead` says which), as far as possible by one streamed
request (a `Run`), and lets go of the blocks it left well behind; a small
read here and there is served from what the cache has without loading a
whole block. A FileReader reads one version of one file: a changed object
fails its reads with `Stale`, a deleted one with `NotFound`.
"""

from __future__ import annotations

import functools
import threading
from typing import Callable

from mountd.cache.blocks import BlockCache
from mountd.cache.buffers import Block, copy_into
from mountd.cache.prefetch import ReadAhead
from mountd.cache.runs import Run
from mountd.errors import Stale
from mountd.storage.base import Entry, ObjectStore

# Reads up to this size within one block are served from a cached block
# without loading it; sequential readers' requests, shaped by the kernel's
# readahead, are larger.
PEEK_MAX = 128 * 1024


class Reads:
    """The mount's side of reading: blocks of `store`'s objects through
    `blocks`, `block_size` bytes each."""

    def __init__(self, store: ObjectStore, blocks: BlockCache, block_size: int):
        self.store = store
        self.blocks = blocks
        self.block_size = block_size

    def open(self, entry: Entry, depth: int) -> FileReader:
        """A reader of the version `entry`, reading up to `depth` blocks ahead."""
        return FileReader(self, entry, depth)

    def key(self, entry: Entry, index: int) -> tuple:
        return (entry.path, entry.etag, index)

    def block_length(self, entry: Entry, index: int) -> int:
        return min(self.block_size, entry.size - index * self.block_size)

    def block_fetch(self, entry: Entry, index: int) -> tuple:
        """(key, length, fetch) of block `index` of `entry`: the dataset
        prefetch fills the cache with the blocks reads look up."""
        return self.key(entry, index), self.block_length(entry, index), self.fetcher(entry, index)

    def block(self, entry: Entry, index: int) -> Block:
        """Block `index` of `entry`: a lease the caller releases."""
        return self.blocks.get(self.key(entry, index), self.fetcher(entry, index))

    def fetcher(self, entry: Entry, index: int) -> Callable[[], Block]:
        offset = index * self.block_size
        length = self.block_length(entry, index)
        buffers = self.blocks.buffers

        def fetch() -> Block:
            buffer = buffers.buffer(length)
            got = self.store.read_into(entry.path, offset, memoryview(buffer)[:length], entry.etag)
            if got != length:  # the object shrank without its etag changing: never serve a mix
                raise Stale(f"{entry.path}: expected {length} bytes at {offset}, storage gave {got}")
            return buffers.block(buffer, length)
        return fetch

    def streamer(self, entry: Entry):
        """Fetch `count` consecutive blocks from block `first` on with one
        long ranged read: storage answers one long request faster than many
        block-sized ones. Each block is read straight into its own buffer."""
        bs = self.block_size
        buffers = self.blocks.buffers

        def stream(first: int, count: int, deliver) -> None:
            start = first * bs
            length = min(count * bs, entry.size - start)
            current = [buffers.buffer(self.block_length(entry, first))]

            def sink(offset: int, piece: memoryview):
                index = first + (offset - start) // bs
                deliver(index, buffers.block(current[0], len(piece)))  # the cache takes over the lease
                if offset + len(piece) < start + length:
                    current[0] = buffers.buffer(self.block_length(entry, index + 1))
                    return memoryview(current[0])[:bs]
                return None
            got = self.store.read_stream(entry.path, start, length, entry.etag,
                                         memoryview(current[0])[:bs], sink)
            if got != length:
                raise Stale(f"{entry.path}: expected {length} bytes at {start}, storage gave {got}")
        return stream


class FileReader:
    """Reads of one version of one file, with its readahead state and the
    run streaming blocks ahead of it."""

    def __init__(self, reads: Reads, entry: Entry, depth: int):
        self._reads = reads
        self.entry = entry
        self.readahead = ReadAhead(reads.block_size, depth, entry.size)
        self.run: Run | None = None
        self._lock = threading.Lock()  # the kernel sends one file's reads from several threads at once

    @property
    def streaming(self) -> bool:
        """Whether a run is fetching blocks ahead of this reader now."""
        run = self.run
        return run is not None and run.open

    def read_into(self, dest: memoryview, offset: int) -> int:
        """Fill `dest` from `offset`; the bytes placed (fewer only at the end
        of the file). Copies straight from the cached blocks. Raises Stale,
        NotFound or another MountdError as storage answers."""
        entry, reads = self.entry, self._reads
        if offset >= entry.size or len(dest) <= 0:
            return 0
        size = min(len(dest), entry.size - offset)
        bs = reads.block_size
        first, last = offset // bs, (offset + size - 1) // bs
        small = first == last and size <= PEEK_MAX
        # A small read counts for readahead only where it carries on from the
        # last read: a reader going through a file in small pieces gets its
        # blocks fetched ahead, while pages the kernel re-reads here and there
        # (it dropped them) must not load whole blocks.
        if not small or self.readahead.follows(offset):
            self._read_ahead(entry, offset, size)
        if small:
            # a few pages (random access, or the kernel re-reading pages it
            # dropped): from memory or the disk tier as they are, rather
            # than loading a whole block for them
            placed = reads.blocks.peek(reads.key(entry, first), offset - first * bs, dest[:size])
            if placed is not None:
                return placed
        blocks: list[Block] = []  # leases, released once copied
        try:
            for i in range(first, last + 1):
                blocks.append(reads.block(entry, i))
            placed, start = 0, offset - first * bs
            for block in blocks:
                n = min(block.size - start, size - placed)
                copy_into(dest[placed:placed + n], block.view[start:start + n])
                placed += n
                start = 0
        finally:
            for block in blocks:
                block.release()
        return placed

    def _read_ahead(self, entry: Entry, offset: int, size: int) -> None:
        """Record a read for readahead: grant the blocks it wants now to the
        open run, or start a new one for them."""
        ra, reads = self.readahead, self._reads
        key_of = functools.partial(reads.key, entry)
        with self._lock:
            run = self.run
            streaming = run is not None and run.open
            wanted = ra.on_read(offset, size, streaming)
            if run is not None and not ra.window:  # random access: the run's bytes are not wanted
                run.close()
                self.run = run = None
                streaming = False
            if wanted and not (streaming and run is not None and reads.blocks.extend(run, key_of, wanted)):
                if run is not None:
                    run.close()
                _, self.run = reads.blocks.prefetch_run(key_of, wanted, ra.last_block, reads.streamer(entry),
                                                        functools.partial(reads.fetcher, entry))
        for i in ra.left_behind():
            reads.blocks.let_go(key_of(i))

    def follow(self, entry: Entry) -> None:
        """Read `entry` from now on: the same bytes under another name (a
        rename). Blocks are cached by path and etag: the old ones go unused."""
        with self._lock:
            self.entry = entry
            self._close_run()

    def close(self) -> None:
        """No more reads: the run fetching ahead ends."""
        with self._lock:
            self._close_run()

    def _close_run(self) -> None:
        if self.run is not None:
            self.run.close()
            self.run = None
