"""The storage interface, the same tests against Azurite (blob), the Files
emulator (file share) and a local directory: metadata, listing, pinned
reads, writes, directories, rename. File-share specifics are in
test_fileshare.py."""

import hashlib
import os
import time

import pytest

from mountd.config.datastores import parse
from mountd.errors import AlreadyExists, ConfigError, NotEmpty, NotFound, Stale, Unreachable
from mountd.storage import open_store
from mountd.storage.local import LocalStore
from mountd.storage import blob as blob_mod
from mountd.storage import fileshare as fileshare_mod
from tests.support.azurite import blob_workspace_entry
from tests.support.remotes import share_workspace_entry


@pytest.fixture(params=["blob", "file", "local"])
def store(request, tmp_path):
    if request.param == "blob":
        azurite = request.getfixturevalue("azurite")
        container = request.getfixturevalue("container")
        cfg = parse("s", blob_workspace_entry(azurite, container.container_name), "test")
    elif request.param == "file":
        share = request.getfixturevalue("share")
        cfg = parse("s", share_workspace_entry(request.getfixturevalue("fileshare"), share.share_name), "test")
    else:
        root = tmp_path / "root"
        root.mkdir()
        cfg = parse("s", {"type": "local", "root": str(root)}, "test")
    with open_store(cfg) as s:
        yield s


def test_write_stat_read(store, tmp_path):
    data = os.urandom(100_000)
    entry = store.write_bytes("dir/file.bin", data)
    assert entry.size == len(data) and not entry.is_dir and entry.etag
    got = store.stat("dir/file.bin")
    assert got.size == len(data) and got.etag == entry.etag and got.mtime > 0
    assert store.stat("dir").is_dir
    assert store.stat("").is_dir
    assert store.read("dir/file.bin", 0, len(data)) == data
    assert store.read("dir/file.bin", 99_990, 100) == data[99_990:]
    assert store.read("dir/file.bin", 5, 0) == b""


def test_missing_paths(store):
    with pytest.raises(NotFound):
        store.stat("no/such/thing")
    with pytest.raises(NotFound):
        list(store.list_dir("no/such"))
    with pytest.raises(NotFound):
        store.read("nope.bin", 0, 10)
    with pytest.raises(NotFound):
        store.delete("nope.bin")


def test_pinned_read_of_rewritten_object_is_stale(store):
    first = store.write_bytes("f", b"one")
    store.write_bytes("f", b"two two")
    with pytest.raises(Stale):
        store.read("f", 0, 3, etag=first.etag)
    assert store.read("f", 0, 7, etag=store.stat("f").etag) == b"two two"


def test_list_dir_one_level_with_dirs_and_files(store):
    for name in ["top.txt", "a/x.txt", "a/b/y.txt", "a/b/z.txt", "a-b.txt", "c/d/e.txt"]:
        store.write_bytes(name, name.encode())
    store.mkdir("empty")
    root = {e.path: e.is_dir for e in store.list_dir("")}
    assert root == {"top.txt": False, "a": True, "a-b.txt": False, "c": True, "empty": True}
    a = {e.path: e.is_dir for e in store.list_dir("a")}
    assert a == {"a/x.txt": False, "a/b": True}
    sizes = {e.path: e.size for e in store.list_dir("a/b")}
    assert sizes == {"a/b/y.txt": 9, "a/b/z.txt": 9}
    assert store.stat("empty").is_dir
    assert list(store.list_dir("empty")) == []


def test_walk_is_a_string_prefix(store):
    for name in ["data/1", "data/sub/2", "database", "other/3"]:
        store.write_bytes(name, b"x")
    assert sorted(e.path for e in store.walk("data") if not e.is_dir) == ["data/1", "data/sub/2", "database"]
    assert sorted(e.path for e in store.walk("data/") if not e.is_dir) == ["data/1", "data/sub/2"]
    assert sorted(e.path for e in store.walk("") if not e.is_dir) == ["data/1", "data/sub/2", "database", "other/3"]


def test_write_file_overwrite_rules(store, tmp_path):
    local = tmp_path / "src.bin"
    local.write_bytes(b"hello")
    store.write_file("up/src.bin", str(local))
    local.write_bytes(b"changed")
    with pytest.raises(AlreadyExists):
        store.write_file("up/src.bin", str(local), overwrite=False)
    assert store.read("up/src.bin", 0, 100) == b"hello"
    store.write_file("up/src.bin", str(local), overwrite=True)
    assert store.read("up/src.bin", 0, 100) == b"changed"


def test_large_file_in_blocks(store, tmp_path, monkeypatch):
    monkeypatch.setattr(blob_mod, "SINGLE_PUT_MAX", 1024 * 1024)
    monkeypatch.setattr(blob_mod, "BLOCK_SIZE", 256 * 1024)
    monkeypatch.setattr(fileshare_mod, "RANGE_SIZE", 256 * 1024)
    data = os.urandom(3 * 256 * 1024 + 17)
    local = tmp_path / "big.bin"
    local.write_bytes(data)
    moved = []
    entry = store.write_file("big.bin", str(local), progress=moved.append)
    assert entry.size == len(data) and sum(moved) == len(data)
    assert store.read("big.bin", 0, len(data)) == data
    if not isinstance(store, LocalStore):  # Azure keeps the whole file's MD5 for later verification
        assert entry.md5 == hashlib.md5(data).digest() == store.stat("big.bin").md5


def test_mkdir_rmdir(store):
    store.mkdir("x/y/z")
    assert store.stat("x/y/z").is_dir and store.stat("x/y").is_dir
    store.write_bytes("x/y/z/f", b"1")
    with pytest.raises(NotEmpty):
        store.rmdir("x/y/z")
    store.delete("x/y/z/f")
    store.rmdir("x/y/z")
    with pytest.raises(NotFound):
        store.stat("x/y/z")


def test_rename(store):
    store.write_bytes("old/name.txt", b"payload")
    store.rename("old/name.txt", "new/place.txt")
    assert store.read("new/place.txt", 0, 100) == b"payload"
    with pytest.raises(NotFound):
        store.stat("old/name.txt")


def test_rename_dir_moves_the_tree_with_its_empty_directories(store):
    store.write_bytes("d/a.txt", b"a")
    store.write_bytes("d/sub/b.txt", b"b")
    store.mkdir("d/empty")
    store.rename_dir("d", "moved")
    assert store.read("moved/a.txt", 0, 10) == b"a" and store.read("moved/sub/b.txt", 0, 10) == b"b"
    assert store.stat("moved/empty").is_dir
    for gone in ("d", "d/a.txt", "d/sub", "d/empty"):
        with pytest.raises(NotFound):
            store.stat(gone)


def test_awkward_names(store):
    names = ["sp ace/f i.txt", "uni/é日本.txt", "pct/100%.txt", "hash/#1.txt", "plus/a+b.txt"]
    for n in names:
        store.write_bytes(n, n.encode())
    for n in names:
        assert store.read(n, 0, 100) == n.encode()
    assert sorted(e.path for e in store.walk("") if not e.is_dir) == sorted(names)


def test_blob_marker_directories(azurite, container):
    cfg = parse("s", blob_workspace_entry(azurite, container.container_name), "test")
    container.upload_blob("marked", b"", metadata={"hdi_isfolder": "true"})
    container.upload_blob("marked/inside.txt", b"abc")
    container.upload_blob("onlymarker", b"", metadata={"hdi_isfolder": "true"})
    with open_store(cfg) as store:
        listing = {e.path: e.is_dir for e in store.list_dir("")}
        assert listing == {"marked": True, "onlymarker": True}
        assert store.stat("onlymarker").is_dir
        walked = {e.path: e.is_dir for e in store.walk("")}
        assert walked == {"marked": True, "marked/inside.txt": False, "onlymarker": True}


def test_blob_listing_pages(azurite, container, monkeypatch):
    monkeypatch.setattr(blob_mod, "LIST_PAGE", 7)
    for i in range(30):
        container.upload_blob(f"many/{i:03d}", b"x")
    cfg = parse("s", blob_workspace_entry(azurite, container.container_name), "test")
    with open_store(cfg) as store:
        assert [e.path for e in store.list_dir("many")] == [f"many/{i:03d}" for i in range(30)]
        assert len(list(store.walk("many/"))) == 30


def test_blob_file_shadowed_by_directory_of_same_name(azurite, container):
    container.upload_blob("a", b"file")
    container.upload_blob("a-1", b"file")
    container.upload_blob("a/child", b"x")
    cfg = parse("s", blob_workspace_entry(azurite, container.container_name), "test")
    with open_store(cfg) as store:
        listing = [(e.path, e.is_dir) for e in store.list_dir("")]
        assert sorted(listing) == [("a", True), ("a-1", False)]


def test_missing_container_and_bad_key_and_dead_endpoint(azurite, container, monkeypatch):
    entry = blob_workspace_entry(azurite, "doesnotexist")
    with open_store(parse("s", entry, "t")) as store, pytest.raises(ConfigError, match="does not exist"):
        store.check()
    monkeypatch.setenv("WRONG_KEY", "d3Jvbmc" + "A" * 79 + "==")  # well-formed (88 characters), not the key
    entry = blob_workspace_entry(azurite, container.container_name, key_env="WRONG_KEY")
    with open_store(parse("s", entry, "t")) as store, pytest.raises(Unreachable, match="refused"):
        store.check()
    from tests.support.azurite import free_port
    entry = dict(blob_workspace_entry(azurite, container.container_name),
                 endpoint=f"http://127.0.0.1:{free_port()}/devstoreaccount1")
    with open_store(parse("s", entry, "t")) as store, pytest.raises(Unreachable, match="cannot reach"):
        store.check()


def test_local_store_missing_root(tmp_path):
    cfg = parse("s", {"type": "local", "root": str(tmp_path / "absent")}, "t")
    with open_store(cfg) as store, pytest.raises(ConfigError, match="does not exist"):
        store.check()


def test_a_reader_pausing_mid_file_ends_its_stream_and_reads_on(store, monkeypatch, tmp_path):
    """A sequential reader's blocks come from one long request (a Run);
    when the reader stops for longer than the run waits, the request is
    dropped part way through its body, and reading on starts another that
    gives the right bytes."""
    from mountd.cache import runs
    from mountd.cache.blocks import BlockCache
    from mountd.config.settings import CacheSettings
    from mountd.fs.core import FileSystemCore
    monkeypatch.setattr(runs, "IDLE", 0.3)
    mib = 1024 * 1024
    data = os.urandom(12 * mib + 7)
    (tmp_path / "big.bin").write_bytes(data)
    store.write_file("big.bin", str(tmp_path / "big.bin"))
    cfg = CacheSettings(block_size=mib, memory=16 * mib, readahead_blocks=4, disk=False)
    core = FileSystemCore(store, cfg, BlockCache(cfg.memory, None, cfg.threads, cfg.block_size))
    fh, _ = core.open("/big.bin", os.O_RDONLY)
    got, ended = bytearray(), []
    for off in range(0, len(data), 256 * 1024):
        if off == 4 * mib:
            run = core._handles[fh].reader.run
            assert run is not None and run.open
            time.sleep(1.0)
            ended.append(not run.open)
        got += core.read(fh, 256 * 1024, off)
    assert ended == [True] and core._handles[fh].reader.run is not run
    assert bytes(got) == data
    core.release(fh)
    core.blocks.close()


UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


@pytest.mark.parametrize("kind", ["blob", "file"])
def test_error_lines_name_the_request_id_on_the_read_and_the_write_path(kind, request, tmp_path):
    # Azure support finds a request by its x-ms-client-request-id
    if kind == "blob":
        entry = blob_workspace_entry(request.getfixturevalue("azurite"),
                                     request.getfixturevalue("container").container_name)
    else:
        entry = share_workspace_entry(request.getfixturevalue("fileshare"),
                                      request.getfixturevalue("share").share_name)
    with open_store(parse("s", entry, "t")) as store:
        with pytest.raises(NotFound, match=f"nope.bin .*\\(request id {UUID}\\)"):
            store.read("nope.bin", 0, 10)  # the lean path
        store.write_bytes("there.bin", b"x")
        with pytest.raises(AlreadyExists, match=f"\\(request id {UUID}\\)"):
            source = tmp_path / "f"
            source.write_bytes(b"y")
            store.write_file("there.bin", str(source), overwrite=False)  # the SDK's path
        with pytest.raises(NotFound, match=f"\\(request id {UUID}\\)"):
            store.delete("nope.bin")
