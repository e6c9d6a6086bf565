"""The filesystem core driven directly, with no mount: attributes, listings,
reads at any offset, change detection, read-only rules."""

import errno
import os
import stat
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mountd.cache.blocks import BlockCache
from mountd.config.settings import CacheSettings
from mountd.fs.core import FileSystemCore, FsError
from mountd.storage.local import LocalStore
from tests.support.blocks import settled

BLOCK = 64 * 1024
DATA = os.urandom(5 * BLOCK + 123)


def make_core(root, **overrides):
    values = dict(block_size=BLOCK, memory=16 * BLOCK, readahead_blocks=4, attribute_ttl=60, negative_ttl=60,
                  disk=False)
    cfg = CacheSettings(**{**values, **overrides})
    return FileSystemCore(LocalStore(str(root)), cfg, BlockCache(cfg.memory, None, cfg.threads, cfg.block_size))


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "root"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "big.bin").write_bytes(DATA)
    (root / "empty").write_bytes(b"")
    (root / "sub" / "small.txt").write_bytes(b"hello")
    return root


@pytest.fixture
def core(tree):
    c = make_core(tree)
    yield c
    c.close()


def test_getattr(core):
    root = core.getattr("/")
    assert stat.S_ISDIR(root["st_mode"]) and root["st_mode"] & 0o777 == 0o555
    big = core.getattr("/big.bin")
    assert stat.S_ISREG(big["st_mode"]) and big["st_size"] == len(DATA) and big["st_mode"] & 0o777 == 0o444
    assert core.getattr("/empty")["st_size"] == 0
    with pytest.raises(FsError) as e:
        core.getattr("/missing")
    assert e.value.errno == errno.ENOENT


def test_readdir(core):
    assert {n for n, _ in core.readdir("/")} == {"big.bin", "empty", "sub"}
    attrs = dict(core.readdir("/sub"))
    assert stat.S_ISDIR(attrs["deeper"]["st_mode"]) and attrs["small.txt"]["st_size"] == 5
    with pytest.raises(FsError) as e:
        list(core.readdir("/big.bin"))
    assert e.value.errno == errno.ENOTDIR


def test_read_whole_and_across_blocks(core):
    fh, keep = core.open("/big.bin", os.O_RDONLY)
    assert keep is False
    out = b"".join(core.read(fh, 100_000, off) for off in range(0, len(DATA), 100_000))
    assert out == DATA
    assert core.read(fh, 10, len(DATA)) == b""
    assert core.read(fh, BLOCK * 2, BLOCK - 10) == DATA[BLOCK - 10:3 * BLOCK - 10]
    core.release(fh)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offset=st.integers(0, len(DATA) + 10), size=st.integers(0, 3 * BLOCK))
def test_reads_match_source_at_any_offset(core, offset, size):
    fh, _ = core.open("/big.bin", os.O_RDONLY)
    try:
        assert core.read(fh, size, offset) == DATA[offset:offset + size]
    finally:
        core.release(fh)


def test_second_open_of_unchanged_file_keeps_kernel_cache(core):
    fh1, keep1 = core.open("/sub/small.txt", os.O_RDONLY)
    fh2, keep2 = core.open("/sub/small.txt", os.O_RDONLY)
    assert (keep1, keep2) == (False, True)


def test_file_changed_after_open_gives_estale(tree):
    core = make_core(tree, readahead_blocks=0)
    fh, _ = core.open("/big.bin", os.O_RDONLY)
    assert core.read(fh, 10, 0) == DATA[:10]
    (tree / "big.bin").write_bytes(os.urandom(len(DATA)))  # new inode/mtime: a new etag
    with pytest.raises(FsError) as e:
        core.read(fh, 10, 3 * BLOCK)
    assert e.value.errno == errno.ESTALE
    assert core.read_errors == 1
    core.close()


def test_write_open_is_refused_on_read_only(core):
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND):
        with pytest.raises(FsError) as e:
            core.open("/big.bin", flags)
        assert e.value.errno == errno.EROFS


def test_open_directory_and_missing(core):
    with pytest.raises(FsError) as e:
        core.open("/sub", os.O_RDONLY)
    assert e.value.errno == errno.EISDIR
    with pytest.raises(FsError) as e:
        core.open("/nope", os.O_RDONLY)
    assert e.value.errno == errno.ENOENT


def test_prefix_mounts_a_subdirectory(tree):
    cfg = CacheSettings(block_size=BLOCK, memory=16 * BLOCK, disk=False)
    core = FileSystemCore(LocalStore(str(tree)), cfg, BlockCache(cfg.memory, None, 2), prefix="sub")
    assert {n for n, _ in core.readdir("/")} == {"small.txt", "deeper"}
    fh, _ = core.open("/small.txt", os.O_RDONLY)
    assert core.read(fh, 100, 0) == b"hello"
    core.close()


def test_sequential_read_prefetches(tree):
    core = make_core(tree)
    fh, _ = core.open("/big.bin", os.O_RDONLY)
    for off in range(0, 2 * BLOCK, 16 * 1024):
        core.read(fh, 16 * 1024, off)
    assert core.blocks.stats.prefetches >= 2
    core.close()


def test_a_sequential_reader_does_not_fill_memory_with_what_it_read(tmp_path):
    from mountd.cache.prefetch import SLACK
    mib = 1024 * 1024
    data = os.urandom(96 * mib)
    (tmp_path / "f").write_bytes(data)
    core = make_core(tmp_path, block_size=mib, memory=128 * mib, readahead_blocks=4)
    fh, _ = core.open("/f", os.O_RDONLY)
    got = bytearray()
    for off in range(0, len(data), 256 * 1024):
        got += core.read(fh, 256 * 1024, off)
    assert got == data
    # blocks SLACK behind the reader went back to the pool; the rest of the
    # file never needed memory of its own
    assert core.blocks.memory_used <= SLACK + 8 * mib
    assert core.blocks.buffers.created <= SLACK // mib + 8
    core.release(fh)
    # random reads keep what they fetched
    fh, _ = core.open("/f", os.O_RDONLY)
    for off in (90, 5, 60, 30, 75, 15):
        assert core.read(fh, 4096, off * mib) == data[off * mib:off * mib + 4096]
    assert all(core.blocks._memory.get(core.reads.key(core._handles[fh].entry, b)) is not None
               for b in (90, 60, 75))
    core.close()


class RequestCountingStore(LocalStore):
    """Counts the requests a reader makes: each read_into and read_stream
    call (the reads a read_stream makes itself are one request)."""

    def __init__(self, root):
        super().__init__(root)
        self.requests = []
        self._streaming = threading.local()

    def read_into(self, path, offset, view, etag=None):
        if not getattr(self._streaming, "on", False):
            self.requests.append(("read", offset // MIB))
        return super().read_into(path, offset, view, etag)

    def read_stream(self, path, offset, length, etag, buf, sink):
        self.requests.append(("stream", offset // MIB, length // MIB))
        self._streaming.on = True
        try:
            return super().read_stream(path, offset, length, etag, buf, sink)
        finally:
            self._streaming.on = False


MIB = 1024 * 1024


def _counting_core(tmp_path, data, **overrides):
    (tmp_path / "f").write_bytes(data)
    values = dict(block_size=MIB, memory=64 * MIB, readahead_blocks=4, attribute_ttl=60, negative_ttl=60,
                  disk=False)
    cfg = CacheSettings(**{**values, **overrides})
    store = RequestCountingStore(str(tmp_path))
    return FileSystemCore(store, cfg, BlockCache(cfg.memory, None, cfg.threads, cfg.block_size)), store


def test_a_sequential_reader_costs_one_streamed_request(tmp_path):
    data = os.urandom(48 * MIB + 5)
    core, store = _counting_core(tmp_path, data)
    fh, _ = core.open("/f", os.O_RDONLY)
    got = bytearray()
    for off in range(0, len(data), 256 * 1024):
        got += core.read(fh, 256 * 1024, off)
    assert got == data
    # block 0 read by the reader itself, the rest by one request to the end
    assert sorted(store.requests) == [("read", 0), ("stream", 1, 47)]
    core.close()


def test_random_access_ends_the_run_and_a_new_sequential_stretch_starts_another(tmp_path):
    data = os.urandom(80 * MIB)
    core, store = _counting_core(tmp_path, data)
    fh, _ = core.open("/f", os.O_RDONLY)
    for off in range(0, 4 * MIB, 256 * 1024):
        assert core.read(fh, 256 * 1024, off) == data[off:off + 256 * 1024]
    run = core._handles[fh].reader.run
    assert run is not None and run.open
    assert core.read(fh, 256 * 1024, 70 * MIB) == data[70 * MIB:70 * MIB + 256 * 1024]  # past SLACK
    assert not run.open
    for off in range(70 * MIB + 256 * 1024, 76 * MIB, 256 * 1024):
        assert core.read(fh, 256 * 1024, off) == data[off:off + 256 * 1024]
    streams = [r for r in store.requests if r[0] == "stream"]
    assert len(streams) == 2 and streams[1][1] == 71
    core.release(fh)
    assert settled(core.blocks)  # the closed run delivered what it was granted and ended
    core.close()


def test_readahead_depth_shares_the_memory_among_open_files(tmp_path):
    mib = 1024 * 1024
    for name in "abc":
        (tmp_path / name).write_bytes(b"x" * mib)
    # 1 MiB blocks: SLACK (32 MiB) keeps 32 blocks behind each reader
    core = make_core(tmp_path, block_size=mib, memory=128 * mib, readahead_blocks=200)
    lru = core.blocks.lru_blocks
    alone, _ = core.open("/a", os.O_RDONLY)
    second, _ = core.open("/b", os.O_RDONLY)
    third, _ = core.open("/c", os.O_RDONLY)
    depth = [core._handles[fh].reader.readahead.max_blocks for fh in (alone, second, third)]
    assert depth == [lru - 32, lru // 2 - 32, max(1, lru // 3 - 32)]
    core.release(second)
    core.release(third)
    again, _ = core.open("/b", os.O_RDONLY)
    assert core._handles[again].reader.readahead.max_blocks == lru // 2 - 32
    core.close()


def test_bad_handle(core):
    with pytest.raises(FsError) as e:
        core.read(999, 10, 0)
    assert e.value.errno == errno.EBADF


def test_statfs_reports_space(core):
    s = core.statfs()
    assert s["f_bavail"] > 0 and s["f_bsize"] > 0


def _disk_cached_file(tmp_path, size: int, disk_blocks: int):
    """A local file f.bin of `size` random bytes, a disk tier of
    `disk_blocks` blocks, and a maker of cores over both with room for 8
    blocks in memory: (data, disk tier, make_core)."""
    from mountd.cache.blocks import DiskTier
    data = os.urandom(size)
    (tmp_path / "f.bin").write_bytes(data)
    cfg = CacheSettings(block_size=BLOCK, memory=8 * BLOCK, readahead_blocks=4, attribute_ttl=60,
                        negative_ttl=60, disk=True)
    disk = DiskTier(str(tmp_path / "cache"), disk_blocks * BLOCK, 0)
    return data, disk, lambda: FileSystemCore(LocalStore(str(tmp_path)), cfg,
                                              BlockCache(cfg.memory, disk, 4, BLOCK))


def test_concurrent_random_reads_through_recycled_buffers(tmp_path):
    """Eight threads reading at random through a cache far smaller than the
    file, with the disk tier on: blocks are evicted, their buffers reused
    and read back from disk all the time, and no reader ever sees another
    block's bytes."""
    import random
    import threading

    data, _, new_core = _disk_cached_file(tmp_path, 50 * BLOCK + 999, disk_blocks=20)
    core = new_core()
    errors = []

    def reader(seed):
        rnd = random.Random(seed)
        fh, _ = core.open("/f.bin", os.O_RDONLY)
        try:
            for _ in range(300):
                if rnd.random() < 0.3:  # runs of sequential reads, so readahead runs too
                    offset = rnd.randrange(0, len(data))
                    for _ in range(rnd.randrange(1, 12)):
                        size = rnd.choice([4096, 65536, 131072])
                        if core.read(fh, size, offset) != data[offset:offset + size]:
                            errors.append((seed, offset, size))
                        offset += size
                else:
                    offset, size = rnd.randrange(0, len(data)), rnd.randrange(1, 3 * BLOCK)
                    if core.read(fh, size, offset) != data[offset:offset + size]:
                        errors.append((seed, offset, size))
        finally:
            core.release(fh)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    core.close()
    assert not errors
    assert core.blocks.stats.disk_hits > 0  # the disk tier was exercised


def test_scattered_small_reads_come_from_the_disk_tier_without_loading_blocks(tmp_path):
    """After a file went through once, scattered page-sized reads (the
    kernel re-reading pages it dropped) are served from the block files as
    they are: no block is loaded whole, nothing is fetched from storage."""
    import random

    block = BLOCK
    data, disk, new_core = _disk_cached_file(tmp_path, 20 * block + 5, disk_blocks=100)
    first = new_core()
    fh, _ = first.open("/f.bin", os.O_RDONLY)
    for offset in range(0, len(data), block):  # block by block: the disk writer drops what it cannot keep up with
        assert first.read(fh, block, offset) == data[offset:offset + block]
        deadline = time.time() + 5
        while disk.used < min(offset + block, len(data)) and time.time() < deadline:
            time.sleep(0.005)
    assert disk.used == len(data)
    second = new_core()
    fh, _ = second.open("/f.bin", os.O_RDONLY)
    rnd = random.Random(3)
    for _ in range(41):
        offset = rnd.randrange(block, len(data) - 4096, 4096)
        assert second.read(fh, 4096, offset) == data[offset:offset + 4096]
    stats = second.blocks.stats
    assert stats.misses == 0 and stats.disk_hits == 41 and second.blocks.memory_used == 0


def test_an_open_directory_is_read_a_buffer_at_a_time(core, tree):
    for i in range(30):
        (tree / "sub" / f"f{i:02d}").write_bytes(b"x" * i)
    core.meta.clear()
    dh = core.opendir("/sub")
    names, offset = [], 0
    while True:
        chunk = []
        for off, (name, attrs) in core.readdir_at(dh, offset):
            if len(chunk) == 7:
                break
            chunk.append((off, name, attrs))
        if not chunk:
            break
        names += [(name, attrs["st_size"] if attrs else None) for _, name, attrs in chunk]
        offset = chunk[-1][0]
    core.releasedir(dh)
    assert names[:2] == [(".", None), ("..", None)]
    assert sorted(names[2:]) == sorted([("deeper", 4096), ("small.txt", 5)] + [(f"f{i:02d}", i) for i in range(30)])
    with pytest.raises(FsError) as e:
        core.readdir_at(dh, 0)
    assert e.value.errno == errno.EBADF
    with pytest.raises(FsError) as e:
        core.opendir("/big.bin")
    assert e.value.errno == errno.ENOTDIR


def test_reads_without_a_handle_keep_one_version_until_the_kernel_is_told_the_next(tree):
    """Kernel opens: opens and closes are the kernel's, reads come by path,
    pinned to one version; once that version is gone every read fails until
    the kernel has asked for the new attributes (here: no kernel, so its
    pages count as dropped at once), never a byte of the new one before."""
    core = make_core(tree, readahead_blocks=0)
    core.kernel_opens = True
    try:
        for call in (lambda: core.open("/big.bin", os.O_RDONLY), lambda: core.flush(0)):
            with pytest.raises(FsError) as e:
                call()
            assert e.value.errno == errno.ENOSYS
        buf = memoryview(bytearray(100))
        assert core.read_path_into("/big.bin", buf, 0) == 100 and bytes(buf) == DATA[:100]
        new = os.urandom(len(DATA))
        (tree / "big.bin").write_bytes(new)
        st = os.stat(tree / "big.bin")
        os.utime(tree / "big.bin", ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10 ** 9))
        for offset in (2 * BLOCK, 0, 2 * BLOCK):  # the block read first is cached, and is not served either
            with pytest.raises(FsError) as e:
                core.read_path_into("/big.bin", buf, offset)
            assert e.value.errno == errno.ESTALE
        assert core.getattr("/big.bin")["st_mtime"] > st.st_mtime_ns  # the kernel asks: the new version
        assert core.read_path_into("/big.bin", buf, 2 * BLOCK) == 100 and bytes(buf) == new[2 * BLOCK:2 * BLOCK + 100]
        assert core.read_path_into("/big.bin", buf, 0) == 100 and bytes(buf) == new[:100]
        assert core.calls["open"] == core.calls["flush"] == 1 and core.calls["read"] == 6
    finally:
        core.close()


def test_the_etags_kept_for_keep_cache_are_bounded_and_forgetting_one_only_drops_pages(tree, monkeypatch):
    from mountd.fs import core as core_mod
    monkeypatch.setattr(core_mod, "OPENED_ETAGS_KEPT", 3)
    for i in range(10):
        (tree / f"f{i}").write_bytes(b"x" * i)
    c = make_core(tree)
    try:
        def opened(name):
            fh, keep = c.open(name, os.O_RDONLY)
            c.release(fh)
            return keep
        assert [opened(f"/f{i}") for i in range(10)] == [False] * 10
        assert len(c._opened_etags) == 3  # not one per file ever opened
        assert opened("/f9") is True  # recently opened, unchanged: the kernel keeps its pages
        assert opened("/f0") is False  # forgotten: its pages are dropped, nothing worse
    finally:
        c.close()
