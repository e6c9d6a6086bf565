"""Metadata cache, block cache (memory and disk tiers) and readahead, without
FUSE or a server: a local directory store stands in for storage."""

import errno
import os
import threading
import time

import pytest

from mountd.cache.blocks import BlockCache, DiskTier
from mountd.cache.meta import MetadataCache
from mountd.cache.prefetch import ReadAhead
from mountd.errors import NotFound
from mountd.storage.local import LocalStore
from tests.support.blocks import settled

MiB = 1 << 20


class CountingStore(LocalStore):
    def __init__(self, root):
        super().__init__(root)
        self.calls = {"stat": 0, "list_dir": 0}

    def stat(self, path):
        self.calls["stat"] += 1
        return super().stat(path)

    def list_dir(self, path):
        self.calls["list_dir"] += 1
        return super().list_dir(path)


@pytest.fixture
def store(tmp_path):
    root = tmp_path / "root"
    (root / "dir").mkdir(parents=True)
    (root / "dir" / "a.txt").write_bytes(b"aaa")
    (root / "dir" / "b.txt").write_bytes(b"bbbb")
    return CountingStore(str(root))


# -- metadata --------------------------------------------------------------------------

def test_stat_is_cached(store):
    meta = MetadataCache(store, ttl=60, negative_ttl=60)
    meta.list_parents = False
    assert meta.stat("dir/a.txt").size == 3
    assert meta.stat("dir/a.txt").size == 3
    assert store.calls["stat"] == 1


def test_stat_lists_the_parent_once_for_all_siblings(store):
    meta = MetadataCache(store, ttl=60, negative_ttl=60)
    threads = [threading.Thread(target=meta.stat, args=(f"dir/{n}",)) for n in ("a.txt", "b.txt") * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert meta.stat("dir/b.txt").size == 4
    with pytest.raises(NotFound):
        meta.stat("dir/absent.txt")
    assert store.calls == {"stat": 0, "list_dir": 1}
    with pytest.raises(NotFound):
        meta.stat("nodir/x")  # no such directory: falls back to asking for the path


def test_listing_fills_children_and_answers_absent_siblings(store):
    meta = MetadataCache(store, ttl=60, negative_ttl=60)
    assert sorted(e.name for e in meta.list_dir("dir")) == ["a.txt", "b.txt"]
    assert meta.stat("dir/b.txt").size == 4
    with pytest.raises(NotFound):
        meta.stat("dir/__init__.py")  # known absent from the listing: no request
    assert store.calls["stat"] == 0
    assert sorted(e.name for e in meta.list_dir("dir")) == ["a.txt", "b.txt"]
    assert store.calls["list_dir"] == 1


def test_negative_entries_expire(store, tmp_path):
    meta = MetadataCache(store, ttl=60, negative_ttl=0.2)
    meta.list_parents = False
    with pytest.raises(NotFound):
        meta.stat("dir/new.txt")
    (tmp_path / "root" / "dir" / "new.txt").write_bytes(b"n")
    with pytest.raises(NotFound):
        meta.stat("dir/new.txt")  # still cached as absent
    time.sleep(0.3)
    assert meta.stat("dir/new.txt").size == 1


def test_attributes_expire_after_ttl(store, tmp_path):
    meta = MetadataCache(store, ttl=0.2, negative_ttl=0.2)
    assert meta.stat("dir/a.txt").size == 3
    (tmp_path / "root" / "dir" / "a.txt").write_bytes(b"longer")
    assert meta.stat("dir/a.txt").size == 3
    time.sleep(0.3)
    assert meta.stat("dir/a.txt").size == 6


def test_zero_negative_ttl_disables_negative_caching(store, tmp_path):
    meta = MetadataCache(store, ttl=60, negative_ttl=0)
    list(meta.list_dir("dir"))
    (tmp_path / "root" / "dir" / "c.txt").write_bytes(b"c")
    assert meta.stat("dir/c.txt").size == 1


def test_a_change_made_while_a_listing_runs_is_not_undone_by_it(store, tmp_path):
    """A file written here (remember) or deleted here (forget) while a
    listing of its directory was under way: the listing's older view is not
    cached over it (the file missing from the listing, or its old size, or a
    deleted file present, for a whole TTL)."""
    root = tmp_path / "root" / "dir"

    class Paged(LocalStore):
        def list_dir(self, path):
            yield from list(super().list_dir(path))  # one page, as a remote store answers: read before it is used
    store = Paged(str(tmp_path / "root"))
    meta = MetadataCache(store, ttl=60, negative_ttl=60)
    listing = meta.list_dir("dir")
    first = next(listing)  # the listing is under way
    (root / "new.txt").write_bytes(b"new file")
    meta.remember(store.stat("dir/new.txt"))  # as an upload through the mount does
    (root / "a.txt").write_bytes(b"rewritten a")
    meta.remember(store.stat("dir/a.txt"))
    (root / "b.txt").unlink()
    meta.forget("dir/b.txt")
    rest = list(listing)
    assert {e.name for e in [first, *rest]} <= {"a.txt", "b.txt", "new.txt"}
    assert [e.size for e in [first, *rest] if e.name == "a.txt"] == [11]  # not the page's older size
    assert sorted(e.name for e in meta.list_dir("dir")) == ["a.txt", "new.txt"]
    assert meta.stat("dir/new.txt").size == 8
    assert meta.stat("dir/a.txt").size == 11
    with pytest.raises(NotFound):
        meta.stat("dir/b.txt")


def test_a_stat_under_way_when_the_file_changes_here_is_not_cached_over_the_change(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "f.txt").write_bytes(b"old")
    changed = []

    class SlowStat(LocalStore):
        def stat(self, path):
            entry = super().stat(path)
            if not changed:  # the answer is on its way when the mount writes the file
                (root / "f.txt").write_bytes(b"newer bytes")
                meta.remember(super().stat(path))
                changed.append(path)
            return entry
    meta = MetadataCache(SlowStat(str(root)), ttl=60, negative_ttl=60)
    meta.list_parents = False
    meta.stat("f.txt")
    assert meta.stat("f.txt").size == 11


# -- block cache -----------------------------------------------------------------------

def test_concurrent_gets_fetch_once():
    cache = BlockCache(16 * MiB, None, threads=4)
    calls = []
    gate = threading.Event()

    def fetch():
        calls.append(1)
        gate.wait(5)
        return b"x" * 100

    results = []
    threads = [threading.Thread(target=lambda: results.append(bytes(cache.get(("p", "e", 0), fetch))))
               for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    gate.set()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [b"x" * 100] * 8
    assert cache.stats.misses == 1


def test_memory_tier_is_bounded_in_bytes():
    cache = BlockCache(3 * MiB, None, threads=2)
    for i in range(10):
        cache.get(("p", "e", i), lambda: b"\0" * MiB)
    assert cache.memory_used <= 3 * MiB
    assert cache.stats.misses == 10
    cache.get(("p", "e", 9), lambda: pytest.fail("block 9 should still be cached"))


def test_failed_fetch_is_not_cached():
    cache = BlockCache(MiB, None, threads=2)

    def broken():
        raise OSError(errno.EIO, "boom")
    with pytest.raises(OSError):
        cache.get(("p", "e", 0), broken)
    assert bytes(cache.get(("p", "e", 0), lambda: b"ok")) == b"ok"


def test_prefetch_then_get_uses_the_prefetched_block():
    cache = BlockCache(4 * MiB, None, threads=2)
    assert cache.prefetch_run(key, range(1, 2), 1, lambda first, count, deliver: deliver(1, b"pre"), None)[0] == 1
    assert cache.prefetch_run(key, range(1, 2), 1, lambda first, count, deliver: deliver(1, b"again"), None)[0] == 0
    settled(cache)
    assert bytes(cache.get(("p", "e", 1), lambda: pytest.fail("fetched twice"))) == b"pre"


def test_different_etag_is_a_different_block():
    cache = BlockCache(4 * MiB, None, threads=2)
    assert bytes(cache.get(("p", "v1", 0), lambda: b"old")) == b"old"
    assert bytes(cache.get(("p", "v2", 0), lambda: b"new")) == b"new"


def test_disk_tier_respects_cap_and_evicts_oldest(tmp_path):
    disk = DiskTier(str(tmp_path / "c"), max_bytes=3 * MiB, reserved_free=0)
    for i in range(5):
        disk.put(("p", "e", i), bytes([i]) * MiB)
    assert disk.used <= 3 * MiB
    assert disk.get(("p", "e", 0)) is None and disk.get(("p", "e", 1)) is None
    assert bytes(disk.get(("p", "e", 4))) == bytes([4]) * MiB
    on_disk = sum(f.stat().st_size for f in (tmp_path / "c").rglob("*") if f.is_file() and f.name != ".lock")
    assert on_disk <= 3 * MiB


def test_disk_tier_keeps_reserved_free_space(tmp_path, monkeypatch):
    free = {"bytes": 5 * MiB}
    monkeypatch.setattr(DiskTier, "_free_disk", lambda self: free["bytes"] - self.used)
    disk = DiskTier(str(tmp_path / "c"), max_bytes=100 * MiB, reserved_free=3 * MiB)
    for i in range(6):
        disk.put(("p", "e", i), b"\0" * MiB)
    assert disk.used <= 2 * MiB  # 5 MiB free, 3 reserved


def test_prefetched_blocks_fill_free_room_only_and_stay_until_read(tmp_path):
    """A dataset prefetch never evicts, and the job's reads never evict
    what it prefetched before reading it (a dataset larger than the cache
    would otherwise be fetched twice)."""
    disk = DiskTier(str(tmp_path / "c"), max_bytes=3 * MiB, reserved_free=0)
    assert disk.put(("old", "e", 0), b"o" * MiB)  # a block some earlier read cached
    assert [disk.put(("p", "e", i), bytes([i]) * MiB, prefetched=True) for i in range(3)] == [True, True, False]
    assert disk.get(("old", "e", 0)) is not None  # the prefetch did not push it out
    for i in range(3):  # the job's reads evict each other and the old block, never an unread prefetched one
        assert disk.put(("read", "e", i), b"r" * MiB)
    assert disk.get(("old", "e", 0)) is None and disk.get(("read", "e", 1)) is None
    assert disk.contains(("p", "e", 0)) and disk.contains(("p", "e", 1)) and disk.used <= 3 * MiB
    assert bytes(disk.get(("p", "e", 0))) == bytes([0]) * MiB  # read once, it is an ordinary cached block:
    assert disk.put(("read", "e", 3), b"r" * MiB) and disk.put(("read", "e", 4), b"r" * MiB)
    assert not disk.contains(("p", "e", 0)) and disk.contains(("p", "e", 1))  # evicted in its turn

    full = DiskTier(str(tmp_path / "d"), max_bytes=2 * MiB, reserved_free=0)
    assert all(full.put(("p", "e", i), b"p" * MiB, prefetched=True) for i in range(2))
    assert not full.put(("read", "e", 0), b"r" * MiB)  # nothing it may evict: the read's block is not cached


def test_disk_tier_stores_again_after_its_directories_are_removed(tmp_path):
    import shutil
    disk = DiskTier(str(tmp_path / "c"), max_bytes=10 * MiB, reserved_free=0)
    assert disk.put(("a", "e1", 0), b"x" * 1000)
    for entry in os.scandir(tmp_path / "c"):  # someone empties the cache directory
        if entry.is_dir():
            shutil.rmtree(entry.path)
    disk.clear()
    assert disk.put(("a", "e1", 0), b"y" * 1000)  # the fan-out directory it knew is made again
    got = disk.get(("a", "e1", 0))
    assert got is not None and bytes(got) == b"y" * 1000
    got.release()


def test_disk_tier_survives_enospc(tmp_path, monkeypatch):
    disk = DiskTier(str(tmp_path / "c"), max_bytes=10 * MiB, reserved_free=0)
    disk.put(("p", "e", 0), b"a" * 1000)
    def full_disk(*args):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "pwrite", full_disk)
    disk.put(("p", "e", 1), b"b" * 1000)  # must not raise
    monkeypatch.undo()
    assert disk.get(("p", "e", 1)) is None
    assert disk.used == sum(disk._files.values())


def test_disk_tier_is_adopted_by_the_next_mount(tmp_path):
    first = DiskTier(str(tmp_path / "c"), max_bytes=10 * MiB, reserved_free=0)
    first.put(("p", "e", 0), b"kept")
    second = DiskTier(str(tmp_path / "c"), max_bytes=10 * MiB, reserved_free=0)
    assert bytes(second.get(("p", "e", 0))) == b"kept" and second.used == 4


def test_block_cache_reads_through_disk_tier(tmp_path):
    disk = DiskTier(str(tmp_path / "c"), max_bytes=10 * MiB, reserved_free=0)
    cache = BlockCache(MiB, disk, threads=2)
    cache.get(("p", "e", 0), lambda: b"from storage")
    deadline = time.time() + 5
    while disk.get(("p", "e", 0)) is None and time.time() < deadline:
        time.sleep(0.01)  # the disk writer is asynchronous
    fresh = BlockCache(MiB, disk, threads=2)
    assert bytes(fresh.get(("p", "e", 0), lambda: pytest.fail("not from disk"))) == b"from storage"
    assert fresh.stats.disk_hits == 1


def test_slow_disk_drops_blocks_instead_of_blocking(tmp_path, monkeypatch):
    disk = DiskTier(str(tmp_path / "c"), max_bytes=100 * MiB, reserved_free=0)
    gate = threading.Event()
    monkeypatch.setattr(disk, "put", lambda key, data: gate.wait(5))
    cache = BlockCache(64 * MiB, disk, threads=2)
    start = time.time()
    for i in range(20):
        cache.get(("p", "e", i), lambda: b"x")
    assert time.time() - start < 2
    assert cache._writer.dropped > 0
    gate.set()


# -- readahead ---------------------------------------------------------------------------

def test_sequential_reads_ramp_up_readahead():
    ra = ReadAhead(block_size=MiB, max_blocks=8, file_size=100 * MiB)
    windows, scheduled = [], []
    for i in range(12):
        scheduled.extend(ra.on_read(i * MiB // 2, MiB // 2))
        windows.append(ra.window)
    assert windows[0] == 1 and max(windows) == 8 and windows == sorted(windows)
    assert len(scheduled) == len(set(scheduled))  # nothing asked for twice
    assert scheduled[0] == 1


def test_readahead_refills_its_window_in_few_long_requests_and_never_runs_dry():
    ra = ReadAhead(block_size=MiB, max_blocks=8, file_size=64 * MiB)
    requests, scheduled = [], []
    for off in range(0, 64 * MiB, MiB // 4):
        got = list(ra.on_read(off, MiB // 4))
        if got:
            requests.append(got)
            scheduled.extend(got)
        current = off // MiB
        if current < 63:
            assert max(scheduled) > current  # something is always on its way
    assert scheduled == list(range(1, 64))  # each block once, in order
    # after the ramp, each request asks for the rest of the window at once
    assert all(len(r) == 7 for r in requests[4:-1])
    assert len(requests) <= 64 // 7 + 4


def test_readahead_with_a_run_open_slides_a_block_at_a_time():
    ra = ReadAhead(block_size=MiB, max_blocks=8, file_size=64 * MiB)
    grants = []
    for off in range(0, 64 * MiB, MiB // 4):
        grants.append(list(ra.on_read(off, MiB // 4, streaming=True)))
        if off // MiB < 56:
            assert ra._scheduled == off // MiB + 8 or off < 4 * MiB  # the full window, always
    assert [i for g in grants for i in g] == list(range(1, 64))
    assert max(len(g) for g in grants[8:]) == 1


def test_random_reads_stop_readahead():
    ra = ReadAhead(block_size=MiB, max_blocks=8, file_size=100 * MiB)
    for i in range(6):
        ra.on_read(i * MiB, MiB)
    assert ra.window > 1
    assert list(ra.on_read(70 * MiB, 4096)) == []
    assert ra.window == 0
    assert list(ra.on_read(20 * MiB, 4096)) == []


def test_readahead_stops_at_end_of_file():
    ra = ReadAhead(block_size=MiB, max_blocks=8, file_size=3 * MiB)
    got = []
    for i in range(6):
        got.extend(ra.on_read(i * MiB // 2, MiB // 2))
    assert max(got) <= 2


def test_a_sequential_reader_lets_go_of_what_it_left_behind():
    from mountd.cache.prefetch import SLACK
    ra = ReadAhead(block_size=MiB, max_blocks=8, file_size=200 * MiB)
    released = []
    for i in range(100):
        ra.on_read(i * MiB, MiB)
        got = list(ra.left_behind())
        # every block let go ends at least SLACK behind the furthest read so far
        assert all((b + 1) * MiB <= (i + 1) * MiB - SLACK for b in got)
        released.extend(got)
    assert released == list(range(len(released)))  # each block once, in order
    assert len(released) == (100 * MiB - SLACK) // MiB


def test_random_reads_let_nothing_go():
    ra = ReadAhead(block_size=MiB, max_blocks=8, file_size=200 * MiB)
    for off in (150, 3, 90, 40, 170, 10, 120, 60):
        ra.on_read(off * MiB, 4096)
        assert list(ra.left_behind()) == []


def test_let_go_drops_a_block_from_memory_but_not_from_its_holder_or_the_disk_tier(tmp_path):
    tier = DiskTier(str(tmp_path / "c"), 100 * MiB, 0)
    cache = BlockCache(64 * MiB, tier, threads=2, block_size=MiB)
    key = ("p", "e", 0)
    held = cache.get(key, lambda: b"a" * MiB)
    deadline = time.time() + 5
    while not tier.contains(key) and time.time() < deadline:
        time.sleep(0.01)
    cache.let_go(key)
    assert cache.memory_used == 0
    assert bytes(held.view) == b"a" * MiB  # the holder's Block is untouched
    again = cache.get(key, lambda: pytest.fail("fetched from storage again"))
    assert bytes(again.view) == b"a" * MiB and cache.stats.disk_hits == 1
    cache.let_go(("p", "e", 99))  # not cached: nothing happens
    cache.close()


def test_slightly_out_of_order_reads_count_as_sequential():
    ra = ReadAhead(block_size=MiB, max_blocks=8, file_size=100 * MiB)
    for off in (0, 2, 1, 4, 3, 6, 5):
        ra.on_read(off * 256 * 1024, 256 * 1024)
    assert ra.window > 1




@pytest.mark.parametrize("memory_mib, disk", [(256, True), (512, True), (96, False), (96, True)])
def test_every_block_buffer_fits_the_memory_cap(tmp_path, memory_mib, disk):
    from mountd.cache.blocks import DEMAND_BLOCKS, WRITER_DEPTH
    block = 16 * MiB
    tier = DiskTier(str(tmp_path / "c"), 100 * MiB, 0) if disk else None
    cache = BlockCache(memory_mib * MiB, tier, threads=8, block_size=block)
    fetchers = cache._pool._max_workers
    total = cache._memory.maxsize + block * (fetchers + DEMAND_BLOCKS + (WRITER_DEPTH if disk else 0))
    assert total <= max(memory_mib * MiB, 4 * block)
    assert cache.lru_blocks * block == cache._memory.maxsize


def key(i):
    return ("p", "e", i)


def test_prefetch_run_fetches_consecutive_blocks_with_one_stream():
    cache = BlockCache(16 * MiB, None, threads=2)
    calls = []

    def stream(first, count, deliver):
        calls.append((first, count))
        for i in range(first, first + count):
            deliver(i, bytes([i]) * 10)
    started, run = cache.prefetch_run(key, range(4, 7), 6, stream, lambda i: pytest.fail("fetched alone"))
    assert started == 3 and run is not None
    settled(cache)
    for i in (4, 5, 6):
        assert bytes(cache.get(key(i), lambda: pytest.fail("not prefetched"))) == bytes([i]) * 10
    assert calls == [(4, 3)]


def test_prefetch_run_stops_at_a_block_already_there():
    cache = BlockCache(16 * MiB, None, threads=2)
    cache.get(key(2), lambda: b"cached")
    cache.get(key(0), lambda: b"cached too")
    runs = []

    def stream(first, count, deliver):
        runs.append((first, count))
        deliver(first, b"one")
        deliver(first + 1, b"never granted")
    assert cache.prefetch_run(key, range(0, 4), 3, stream, None)[0] == 1
    settled(cache)
    # block 0 is skipped, the run starts at block 1, and it is granted nothing from block 2 on
    assert runs == [(1, 3)]
    assert bytes(cache.get(key(1), lambda: b"refetched")) == b"one"
    assert bytes(cache.get(key(2), lambda: b"refetched")) == b"cached"
    assert bytes(cache.get(key(3), lambda: b"fetched alone")) == b"fetched alone"


def test_failed_run_leaves_the_rest_to_be_fetched_again():
    cache = BlockCache(16 * MiB, None, threads=2)

    def stream(first, count, deliver):
        deliver(0, b"first")
        raise OSError("connection reset, retries spent")
    cache.prefetch_run(key, range(0, 3), 2, stream, None)
    settled(cache)
    assert bytes(cache.get(key(0), lambda: pytest.fail("lost"))) == b"first"
    assert bytes(cache.get(key(2), lambda: b"again")) == b"again"


def test_prefetch_run_takes_blocks_the_disk_tier_holds_from_disk(tmp_path):
    disk = DiskTier(str(tmp_path / "c"), max_bytes=10 * MiB, reserved_free=0)
    disk.put(key(0), b"disk0")
    disk.put(key(1), b"disk1")
    cache = BlockCache(16 * MiB, disk, threads=2)
    streamed = []

    def stream(first, count, deliver):
        streamed.append((first, count))
        for i in range(first, first + count):
            deliver(i, b"net%d" % i)
    started, _ = cache.prefetch_run(key, range(4), 3, stream,
                                    lambda i: lambda: pytest.fail("disk block fetched from storage"))
    assert started == 4
    settled(cache)
    assert [bytes(cache.get(key(i), lambda: pytest.fail("not prefetched"))) for i in range(4)] == \
        [b"disk0", b"disk1", b"net2", b"net3"]
    assert streamed == [(2, 2)] and cache.stats.disk_hits == 2


def _streamer(calls):
    """A stream of blocks i -> bytes([i]) * 10 that records its deliveries."""
    def stream(first, count, deliver):
        calls.append(("request", first, count))
        for i in range(first, first + count):
            calls.append(("delivered", i))  # deliver() returns only once the next block is granted
            deliver(i, bytes([i]) * 10)
    return stream


def test_a_run_extended_block_by_block_is_one_request():
    cache = BlockCache(16 * MiB, None, threads=2)
    calls = []
    _, run = cache.prefetch_run(key, range(1, 2), 9, _streamer(calls), None)
    for i in range(2, 10):
        settled(cache)
        assert calls[-1] == ("delivered", i - 1)  # it waits at the next block, not past it
        assert cache.extend(run, key, range(i, i + 1))
    settled(cache)
    assert [c for c in calls if c[0] == "request"] == [("request", 1, 9)]
    assert [bytes(cache.get(key(i), lambda: pytest.fail("not streamed"))) for i in range(1, 10)] == \
        [bytes([i]) * 10 for i in range(1, 10)]


def test_a_run_ends_when_its_reader_goes_quiet(monkeypatch):
    from mountd.cache import runs
    monkeypatch.setattr(runs, "IDLE", 0.2)
    cache = BlockCache(16 * MiB, None, threads=2)
    calls = []
    _, run = cache.prefetch_run(key, range(0, 2), 9, _streamer(calls), None)
    deadline = time.time() + 5
    while run.open and time.time() < deadline:
        time.sleep(0.02)
    assert not run.open and calls[-1] == ("delivered", 1)
    assert not cache.extend(run, key, range(2, 3))  # an ended run is granted nothing...
    assert cache.in_flight() == 0  # ...and no block is left waiting for it
    started, again = cache.prefetch_run(key, range(2, 3), 9, _streamer(calls), None)
    assert started == 1 and again is not run
    settled(cache)
    assert bytes(cache.get(key(2), lambda: pytest.fail("not streamed"))) == bytes([2]) * 10


def test_a_closed_run_delivers_what_it_was_granted_and_ends():
    cache = BlockCache(16 * MiB, None, threads=2)
    gate = threading.Event()
    calls = []

    def stream(first, count, deliver):
        gate.wait(5)
        _streamer(calls)(first, count, deliver)
    _, run = cache.prefetch_run(key, range(0, 3), 9, stream, None)
    run.close()
    assert not cache.extend(run, key, range(3, 4))
    gate.set()
    settled(cache)
    assert [c[1] for c in calls if c[0] == "delivered"] == [0, 1, 2]
    assert bytes(cache.get(key(3), lambda: b"fetched alone")) == b"fetched alone"


def test_a_waiting_run_gives_its_thread_up_to_queued_fetches(monkeypatch):
    from mountd.cache import runs
    monkeypatch.setattr(runs, "IDLE", 60.0)  # so that only making way can end it within the test
    cache = BlockCache(16 * MiB, None, threads=1)
    calls = []
    _, run = cache.prefetch_run(key, range(0, 1), 9, _streamer(calls), None)
    settled(cache)
    assert run.open  # waiting for block 1 on the only fetch thread
    other = [("q", "e", 0)]
    started, _ = cache.prefetch_run(lambda i: other[i], range(0, 1), 0,
                                    lambda first, count, deliver: deliver(0, b"other"), None)
    assert started == 1
    settled(cache)  # well within the idle time: the run made way
    assert not run.open
    assert bytes(cache.get(other[0], lambda: pytest.fail("starved"))) == b"other"


def test_extend_refuses_a_block_somebody_else_has_and_closes_the_run():
    cache = BlockCache(16 * MiB, None, threads=2)
    calls = []
    _, run = cache.prefetch_run(key, range(0, 1), 9, _streamer(calls), None)
    cache.get(key(1), lambda: b"read by another")
    assert not cache.extend(run, key, range(1, 3))
    settled(cache)
    assert not run.open and [c for c in calls if c[0] == "delivered"] == [("delivered", 0)]
    assert bytes(cache.get(key(1), lambda: pytest.fail("lost"))) == b"read by another"


# -- block buffers ---------------------------------------------------------------------

def test_full_blocks_reuse_their_buffers():
    from mountd.cache.buffers import BufferPool
    pool = BufferPool(MiB, keep=4)
    first = pool.buffer(MiB)
    block = pool.block(first, MiB)
    assert pool.idle == 0
    del block  # the last reference: the buffer goes back
    assert pool.idle == 1 and pool.buffer(MiB) is first and pool.created == 1


def test_small_blocks_are_sized_to_fit_and_not_pooled():
    from mountd.cache.buffers import BufferPool
    pool = BufferPool(MiB, keep=4)
    buf = pool.buffer(1000)
    assert isinstance(buf, bytearray) and len(buf) == 1000
    block = pool.block(buf, 1000)
    del block
    assert pool.idle == 0 and pool.created == 0


def test_idle_buffers_are_capped():
    from mountd.cache.buffers import BufferPool
    pool = BufferPool(MiB, keep=2)
    blocks = [pool.block(pool.buffer(MiB), MiB) for _ in range(5)]
    del blocks
    assert pool.idle == 2


def test_a_view_kept_past_its_block_raises_instead_of_reading_the_next_blocks_bytes():
    from mountd.cache.buffers import BufferPool
    pool = BufferPool(MiB, keep=4)
    block = pool.block(pool.buffer(MiB), MiB)
    block.view[:1] = b"a"
    view = block.view
    del block  # its buffer goes back to the pool, and on to the next block
    reused = pool.block(pool.buffer(MiB), MiB)
    reused.view[:1] = b"b"
    with pytest.raises(ValueError):
        bytes(view[:1])


def test_a_block_is_leased_each_holder_releases_its_own_and_the_last_frees_the_buffer(tmp_path):
    cache = BlockCache(4 * MiB, None, threads=2, block_size=MiB)

    def fetch():
        buffer = cache.buffers.buffer(MiB)
        buffer[:MiB] = b"x" * MiB
        return cache.buffers.block(buffer, MiB)
    with cache.get(("p", "e", 0), fetch) as block:
        view = block.view
        again = cache.get(("p", "e", 0), lambda: pytest.fail("fetched twice"))  # the memory cache's, shared
    with pytest.raises(ValueError):
        bytes(view[:1])  # this holder released its lease: its view is gone
    assert bytes(again.view[:1]) == b"x" and cache.buffers.idle == 0  # the other holder's is intact
    again.release()
    cache.let_go(("p", "e", 0))
    assert cache.buffers.idle == 1  # the last lease released: the buffer is back
    cache.close()


def test_reading_through_a_small_cache_recycles_buffers(tmp_path):
    """Forty blocks read through room for eight: buffers are reused, not
    made anew for each block, and every byte is right."""
    block = 256 * 1024
    cache = BlockCache(8 * block, DiskTier(str(tmp_path / "c"), 100 * MiB, 0), threads=2, block_size=block)
    data = [os.urandom(block) for _ in range(40)]
    for _ in range(2):
        for i, want in enumerate(data):
            def fetch(i=i):
                buffer = cache.buffers.buffer(block)
                buffer[:block] = data[i]
                return cache.buffers.block(buffer, block)
            assert bytes(cache.get(("p", "e", i), fetch)) == want
    assert cache.buffers.created <= 8


def test_a_read_of_a_block_being_prefetched_waits_for_that_fetch(tmp_path):
    cache = BlockCache(4 * MiB, DiskTier(str(tmp_path / "c"), 10 * MiB, 0), threads=2)
    release, fetches = threading.Event(), []

    def slow(data):
        def fetch():
            fetches.append(data)
            release.wait(5)
            return data
        return fetch
    filler = threading.Thread(target=cache.fill, args=(("p", "e", 0), 4, slow(b"pref"), 16, 8))
    filler.start()
    while not fetches:
        time.sleep(0.01)
    got = []
    reader = threading.Thread(target=lambda: got.append(bytes(cache.get(("p", "e", 0), slow(b"mine")))))
    reader.start()
    time.sleep(0.1)
    release.set()
    filler.join(5)
    reader.join(5)
    assert got == [b"pref"] and fetches == [b"pref"]  # one fetch, shared
    assert cache.disk.contains(("p", "e", 0)) and cache.counters()["misses"] == 0


def test_a_read_whose_prefetch_fetch_fails_fetches_the_block_itself(tmp_path):
    cache = BlockCache(4 * MiB, DiskTier(str(tmp_path / "c"), 10 * MiB, 0), threads=2)
    release, started = threading.Event(), threading.Event()

    def failing():
        started.set()
        release.wait(5)
        raise OSError("connection reset")
    errors = []

    def fill():
        try:
            cache.fill(("p", "e", 0), 4, failing, 16, 8)
        except OSError as e:
            errors.append(e)
    filler = threading.Thread(target=fill)
    filler.start()
    started.wait(5)
    got = []
    reader = threading.Thread(target=lambda: got.append(bytes(cache.get(("p", "e", 0), lambda: b"mine"))))
    reader.start()
    time.sleep(0.1)
    release.set()
    filler.join(5)
    reader.join(5)
    assert got == [b"mine"] and len(errors) == 1  # the prefetch's error stays the prefetch's


def test_the_prefetch_waits_while_reads_fill_the_busy_budget(tmp_path):
    cache = BlockCache(4 * MiB, DiskTier(str(tmp_path / "c"), 10 * MiB, 0), threads=2)
    release, reading, order = threading.Event(), threading.Event(), []

    def read_fetch():
        reading.set()
        release.wait(5)
        order.append("read")
        return b"r"
    reader = threading.Thread(target=cache.get, args=(("r", "e", 0), read_fetch))
    reader.start()
    reading.wait(5)
    filler = threading.Thread(target=cache.fill, args=(("p", "e", 0), 1,
                                                       lambda: order.append("prefetch") or b"p", 16, 1))
    filler.start()
    time.sleep(0.2)
    assert order == []  # one read in flight takes the whole busy budget of 1
    release.set()
    reader.join(5)
    filler.join(5)
    assert order == ["read", "prefetch"]
    # with no read in flight the prefetch uses its full budget at once
    assert cache.fill(("p", "e", 1), 1, lambda: b"q", 16, 1) == "stored"


def test_a_fill_ending_wakes_only_as_many_waiting_fills_as_may_start(tmp_path):
    """16 fills waiting for a budget of 2: each one that ends frees one slot,
    and wakes one waiter, not all of them to find the budget taken again
    (that herd cost the mount a futex storm on the cores the job needs)."""
    cache = BlockCache(4 * MiB, DiskTier(str(tmp_path / "c"), 10 * MiB, 0), threads=2)
    waits = []
    wait = cache._demand_done.wait
    cache._demand_done.wait = lambda timeout=None: waits.append(1) or wait(timeout)
    gate = threading.Semaphore(0)

    def fetch():
        gate.acquire(timeout=5)
        return b"x"
    fills = [threading.Thread(target=cache.fill, args=(("p", "e", i), 1, fetch, 2, 2)) for i in range(16)]
    for t in fills:
        t.start()
    deadline = time.monotonic() + 5
    while cache._fill_waiting < 14 and time.monotonic() < deadline:
        time.sleep(0.01)
    waiting = len(waits)
    for _ in fills:
        gate.release()
        time.sleep(0.01)  # one ends at a time
    for t in fills:
        t.join(5)
    assert all(cache.disk.contains(("p", "e", i)) for i in range(16))
    # each of the 14 that waited went back to waiting at most about once
    # (a timeout, or a slot another took first); all woken each time, they
    # would wait again some 14 + 13 + ... times
    assert len(waits) - waiting <= 2 * 14, len(waits) - waiting
