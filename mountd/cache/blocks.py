"""Block cache: fixed-size pieces of files, keyed by (path, etag, index), in
a memory LRU bounded in bytes over a disk tier (`disk`), fetched once each.

The disk tier lives under the cache directory, capped in bytes and never
allowed to eat into a reserved amount of free disk. A block being fetched is fetched once however many readers want it.
Keying by etag means a changed object never serves old blocks: its new
version has new keys, and the old ones age out.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, cast

from cachetools import LRUCache

from mountd.cache.buffers import Block, BufferPool, copy_into
from mountd.cache.disk import BlockKey, DiskTier, DiskWriter
from mountd.cache.runs import Run, RunEnded

log = logging.getLogger(__name__)

WRITER_DEPTH = 2  # blocks waiting for the disk writer
DEMAND_BLOCKS = 2  # blocks being fetched by readers themselves, outside the pool
Fetch = Callable[[], "Block | bytes"]


def as_block(data) -> Block:
    """A fetch's result as a Block (fetches may return plain bytes)."""
    return data if isinstance(data, Block) else Block(data, len(data))


class _Pending(Future):
    """A block being fetched: its Future, and how many readers wait for it
    (counted under the cache's lock), each handed a lease of its own."""
    waiters = 0


class _Memory(LRUCache):
    """The memory tier: holds a lease on each block, released when the
    block is evicted, dropped or replaced."""

    def popitem(self):
        key, block = super().popitem()
        block.release()
        return key, block

    def __setitem__(self, key, block) -> None:
        self.discard(key)
        super().__setitem__(key, block)

    def discard(self, key) -> None:
        block = self.pop(key, None)
        if block is not None:
            block.release()


@dataclass
class CacheStats:
    memory_hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    bytes_from_storage: int = 0
    bytes_from_disk: int = 0
    prefetches: int = 0

    @property
    def hit_ratio(self) -> float:
        total = self.memory_hits + self.disk_hits + self.misses
        return (self.memory_hits + self.disk_hits) / total if total else 0.0


class _FillFailed(Exception):
    """A dataset prefetch's fetch of a block failed: a reader that waited
    for it fetches the block itself (the prefetch's error is not its own)."""


class BlockCache:
    def __init__(self, memory_bytes: int, disk: DiskTier | None, threads: int, block_size: int = 0,
                 fill_blocks: int = 0):
        # The memory cap covers every block buffer the worker holds: blocks
        # being fetched (one per fetch thread), fetched by readers themselves,
        # queued for the disk writer, being prefetched into the disk tier
        # (`fill_blocks`, for a dataset prefetch), and the LRU. The LRU holds
        # what the readers read ahead (the file system core shares it among them).
        size = max(block_size, 1)
        spare = memory_bytes // size - DEMAND_BLOCKS - (WRITER_DEPTH if disk else 0) - fill_blocks
        # A quarter of the spare blocks at most for fetches in flight: a
        # sequential reader streams several blocks per fetch, and what it
        # needs is depth (blocks waiting ahead of it), not more fetches;
        # with 256 MiB of 16 MiB blocks, half for fetchers left readahead
        # 3 blocks deep and a cold read at 0.6x the storage's rate, against
        # 0.9x at 4 deep (measured).
        fetchers = max(1, min(threads, spare // 4))
        lru_blocks = max(1, spare - fetchers)
        self.lru_blocks = lru_blocks
        self._memory = _Memory(maxsize=lru_blocks * size if block_size else memory_bytes, getsizeof=len)
        # the memory of full blocks, reused: never more buffers than the plan has blocks
        self.buffers = BufferPool(block_size, max(1, memory_bytes // size))
        self.disk = disk
        self._writer = DiskWriter(disk, WRITER_DEPTH) if disk else None
        self._lock = threading.Lock()
        self._demand_done = threading.Condition(self._lock)  # a fill waiting for leftover concurrency waits here
        self._fill_waiting = 0
        self._fill_budget = (0, 0)  # fill()'s (budget, busy_budget), for _wake_fills
        self._filling: set[BlockKey] = set()  # blocks a dataset prefetch is fetching (in _inflight too)
        self._inflight: dict[BlockKey, _Pending] = {}
        self._queued = 0  # fetches submitted to the pool and not started yet
        self._closed = False
        self._pool = ThreadPoolExecutor(fetchers, thread_name_prefix="block-fetch")
        self.stats = CacheStats()

    @property
    def memory_used(self) -> int:
        return int(self._memory.currsize)

    @property
    def memory_max(self) -> int:
        return int(self._memory.maxsize)

    def get(self, key: BlockKey, fetch: Fetch) -> Block:
        """The block, fetching it in this thread if nobody else is: a lease
        the caller releases."""
        with self._lock:
            data = self._memory.get(key)
            if data is not None:
                self.stats.memory_hits += 1
                return data.share()
            future = self._inflight.get(key)
            mine = future is None
            if future is None:
                future = self._inflight[key] = _Pending()
            future.waiters += 1
        if mine:  # a demand read never queues behind prefetches on the pool
            self._load(key, fetch, future)
        try:
            return future.result().pop()  # one of the leases made for the waiters
        except _FillFailed:  # the dataset prefetch gave this block up: fetch it here
            return self.get(key, fetch)

    def fill(self, key: BlockKey, size: int, fetch: Fetch, budget: int, busy_budget: int) -> str:
        """Prefetch one block of `size` bytes into the disk tier (not into
        memory: the job has not asked for it) with the concurrency readers
        leave: up to `budget` fills while no reader is fetching, and while
        readers are, only as many as take the readers' fetches and the
        fills to `busy_budget` (each request the prefetch adds takes a
        share of the storage's answers from the readers' requests). A
        reader wanting the block meanwhile waits for this fetch instead of
        making its own. Returns "stored",
        "cached" (memory or disk has it, or a reader is fetching it), "full"
        (no room within the disk tier's cap and reserve) or "closed";
        raises the fetch's error."""
        with self._lock:
            self._fill_budget = (budget, busy_budget)
            while True:
                if self._closed:
                    return "closed"
                if self._held(key) or self._on_disk(key):
                    self._wake_fills()  # the slot this fill may have been woken for: another's
                    return "cached"
                if self._fill_slots() > 0:
                    break
                self._fill_waiting += 1
                self._demand_done.wait(0.5)
                self._fill_waiting -= 1
            if self.disk is None or not self.disk.has_room(size):
                self._wake_fills()
                return "full"
            future = _Pending()
            self._inflight[key] = future
            self._filling.add(key)
        data = None
        try:
            data = as_block(fetch())
            # on disk before the block leaves _inflight: a reader then finds it in one place or the other
            stored = self.disk.put(key, data, prefetched=True)
        except BaseException as e:
            if data is not None:
                data.release()
            self._end_fill(key, future, None)
            future.set_exception(_FillFailed(str(e)))
            future.exception()  # nobody may be waiting: mark it seen
            raise
        with data:
            future.set_result(self._end_fill(key, future, data))
        return "stored" if stored else "full"

    def _end_fill(self, key: BlockKey, future: _Pending, data: Block | None) -> list[Block]:
        """The fill of `key` is over; leases of `data` for the readers waiting for it."""
        with self._lock:
            self._inflight.pop(key, None)
            self._filling.discard(key)
            self._wake_fills()
            return [data.share() for _ in range(future.waiters)] if data is not None else []

    def _fill_slots(self) -> int:
        """How many more fills may start now (lock held): see fill()."""
        budget, busy_budget = self._fill_budget
        demand = len(self._inflight) - len(self._filling)
        return (budget if not demand else busy_budget - demand) - len(self._filling)

    def _wake_fills(self) -> None:
        """Wake as many waiting fills as may start now (lock held), not all
        of them: with 16 fills waiting, waking all at every fetch's end had
        each take the lock and the interpreter lock only to wait again, some
        30 000 futile wake-ups per 2 000 files, on the cores the job and the
        storage need."""
        if self._fill_waiting:
            n = min(self._fill_waiting, self._fill_slots())
            if n > 0:
                self._demand_done.notify(n)

    def let_go(self, key: BlockKey) -> None:
        """Drop a block from memory (not from the disk tier): its reader is
        done with it. Whoever still holds the Block keeps it until done."""
        with self._lock:
            self._memory.discard(key)

    def peek(self, key: BlockKey, start: int, dest: memoryview) -> int | None:
        """Fill `dest` from `start` of a block if memory or the disk tier
        has it, without loading the block whole: the bytes placed, or None
        if neither has it."""
        with self._lock:
            block = self._memory.get(key)
            if block is not None:
                self.stats.memory_hits += 1
                block = block.share()  # eviction may release the memory's lease meanwhile
        if block is not None:
            with block:
                n = max(0, min(len(dest), block.size - start))
                copy_into(dest[:n], block.view[start:start + n])
            return n
        n = self.disk.read_range(key, start, dest) if self.disk else None
        if n is not None:
            with self._lock:
                self.stats.disk_hits += 1
                self.stats.bytes_from_disk += n
        return n

    def prefetch_run(self, key_of: Callable[[int], BlockKey], wanted: range, last: int, stream,
                     fetcher) -> tuple[int, Run | None]:
        """Start fetching the blocks `wanted` of one file (key_of(i) is block
        i's key), as far as possible with one request: a Run that streams
        from the first block nobody has towards block `last`, granted the
        wanted blocks up to the next one somebody has; `extend` grants it
        more. `stream(first, count, deliver)` reads blocks first..first+count-1
        in order and calls deliver(i, data) for each; `fetcher(i)` returns a
        fetch of block i alone. Leading blocks the disk tier holds are loaded
        from it one by one. Returns (blocks started, the run or None)."""
        singles: list[int] = []
        granted: list[int] = []
        with self._lock:
            for i in wanted:
                key = key_of(i)
                if self._held(key):
                    if granted:
                        break
                    continue
                on_disk = self._on_disk(key)
                if on_disk and granted:
                    break
                (singles if on_disk else granted).append(i)
            futures = {i: _Pending() for i in singles + granted}
            self._inflight.update({key_of(i): f for i, f in futures.items()})
            self.stats.prefetches += len(futures)
            run = Run(granted[0], last) if granted else None
            for i in granted:
                assert run is not None  # made when anything is granted
                run.grant(i, futures[i])
            self._queued += len(singles) + bool(run)
        for i in singles:
            self._pool.submit(self._started, self._load, key_of(i), fetcher(i), futures[i])
        if run:
            self._pool.submit(self._started, self._load_run, key_of, run, stream)
        return len(futures), run

    def extend(self, run: Run, key_of: Callable[[int], BlockKey], wanted: range) -> bool:
        """Grant a run the next blocks `wanted`; False when it cannot take
        them all (it has ended, one of them is not its next block, or
        somebody else has one): the run is closed then, and whatever was not
        granted is left to prefetch_run."""
        with self._lock:
            for i in wanted:
                key = key_of(i)
                if self._held(key) or self._on_disk(key):
                    run.close()
                    return False
                future = _Pending()
                if not run.grant(i, future):  # ended, or not its next block (the reader skipped ahead)
                    run.close()
                    return False
                self._inflight[key] = future
                self.stats.prefetches += 1
        return True

    def _held(self, key: BlockKey) -> bool:
        """Whether memory has the block or somebody is fetching it (lock held)."""
        return key in self._inflight or key in self._memory

    def _on_disk(self, key: BlockKey) -> bool:
        return self.disk is not None and self.disk.contains(key)

    def _started(self, task, *args) -> None:
        with self._lock:
            self._queued -= 1
        task(*args)

    def _load_run(self, key_of: Callable[[int], BlockKey], run: Run, stream) -> None:
        def deliver(index: int, data) -> None:
            self._keep(key_of(index), as_block(data), cast(_Pending, run.future(index)), from_disk=False)
            if index < run.last:
                # a run waiting for its reader gives its thread up to fetches queued behind it
                run.wait_for(index + 1, lambda: self._queued > 0 or self._closed)

        error: BaseException | None = None
        started = time.monotonic()
        try:
            stream(run.first, run.last - run.first + 1, deliver)
        except RunEnded:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the blocks' waiters
            error = e
            run.why = f"failed: {e}"
        left = run.undelivered()
        log.debug("run of %s from block %d ended after %.2f s (%s), at block %d", key_of(run.first)[0],
                  run.first, time.monotonic() - started, run.why, run.delivered)
        if left and error is None:
            error = OSError(f"{len(left)} block(s) of a run were not delivered")
        for i, future in left:
            assert error is not None  # set above whenever blocks are left
            self._fail(key_of(i), cast(_Pending, future), error)

    def _load(self, key: BlockKey, fetch: Fetch, future: _Pending) -> None:
        try:
            data = self.disk.get(key, self.buffers) if self.disk else None
            from_disk = data is not None
            if data is None:
                data = as_block(fetch())
            self._keep(key, data, future, from_disk)
        except BaseException as e:
            self._fail(key, future, e)

    def _keep(self, key: BlockKey, data: Block, future: _Pending, from_disk: bool) -> None:
        """A block has arrived: count it, cache it, hand a lease to each of
        its waiters, and queue it for the disk tier if it did not come from
        there. Takes over the lease `data`."""
        with self._lock:
            if from_disk:
                self.stats.disk_hits += 1
                self.stats.bytes_from_disk += len(data)
            else:
                self.stats.misses += 1
                self.stats.bytes_from_storage += len(data)
            if len(data) <= self._memory.maxsize:
                self._memory[key] = data.share()
            self._inflight.pop(key, None)
            leases = [data.share() for _ in range(future.waiters)]  # no reader joins once it left _inflight
            self._wake_fills()
        future.set_result(leases)
        if self._writer and not from_disk:
            # While a dataset prefetch fills the disk tier, a block the
            # writer has no room for is written here: dropped, the prefetch
            # would fetch it from storage a second time.
            self._writer.submit(key, data, must=bool(self._filling))
        else:
            data.release()

    def _fail(self, key: BlockKey, future: _Pending, error: BaseException) -> None:
        with self._lock:
            self._inflight.pop(key, None)
            self._wake_fills()
        future.set_exception(error)
        future.exception()  # nobody may wait for a failed prefetch: mark it seen

    def in_flight(self) -> int:
        with self._lock:
            return len(self._inflight)

    def counters(self) -> dict:
        """Hits, misses, traffic and use against the caps, for `mountd
        status` (the stats are counted under the lock, and read under it)."""
        with self._lock:
            s = dataclasses.replace(self.stats)
        return {"hit_ratio": round(s.hit_ratio, 4), "memory_hits": s.memory_hits, "disk_hits": s.disk_hits,
                "misses": s.misses, "bytes_from_storage": s.bytes_from_storage,
                "bytes_from_disk": s.bytes_from_disk, "prefetched_blocks": s.prefetches,
                "memory_used": self.memory_used, "memory_max": self.memory_max,
                "disk_used": self.disk.used if self.disk else 0,
                "disk_max": self.disk.max_bytes if self.disk else 0}

    def close(self) -> None:
        self._closed = True  # runs waiting for their readers end now
        with self._lock:
            self._demand_done.notify_all()  # and fills waiting for a slot
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._writer:
            self._writer.close()
