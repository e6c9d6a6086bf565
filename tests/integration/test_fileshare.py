"""What is particular to file share datastores, through the real
azure-storage-file-share SDK against the Files emulator: real (empty)
directories, paged listings, writes through a temporary file and the
service's rename, credentials, and failures."""

import hashlib
import os
import threading
from datetime import datetime, timedelta, timezone

import pytest

from mountd.config.datastores import parse
from mountd.config.credentials import Credential
from mountd.errors import AlreadyExists, ConfigError, NotEmpty, NotFound, Stale, Unreachable
from mountd.storage import identity
from mountd.storage import fileshare as fileshare_mod
from mountd.storage import open_store
from mountd.storage.fileshare import FileShareStore
from tests.conftest import KEY, KEY_ENV
from tests.support.azurite import free_port
from tests.support.remotes import ShareRemote, share_workspace_entry


@pytest.fixture
def store(fileshare, share):
    with open_store(parse("s", share_workspace_entry(fileshare, share.share_name, KEY_ENV), "t")) as s:
        yield s


def raw_names(share, directory=""):
    """Every name in a directory, as the service lists it (hidden ones too)."""
    return sorted(i.name for i in share.get_directory_client(directory).list_directories_and_files())


def test_empty_directories_exist_in_their_own_right(store, share):
    store.mkdir("a/b/c")
    store.mkdir("a/b/c")  # exists already: fine
    store.mkdir("lonely")
    assert {e.path for e in store.walk("")} == {"a", "a/b", "a/b/c", "lonely"}
    assert all(e.is_dir for e in store.walk(""))
    assert list(store.list_dir("a/b/c")) == [] and store.stat("lonely").is_dir
    assert store.stat("a/b").mtime > 0
    store.write_bytes("a/b/c/f.txt", b"x")
    with pytest.raises(NotEmpty):
        store.rmdir("a/b/c")
    store.delete("a/b/c/f.txt")
    store.rmdir("a/b/c")  # empty again, but still there until removed
    with pytest.raises(NotFound):
        store.stat("a/b/c")
    with pytest.raises(NotFound):
        store.rmdir("a/b/c")
    assert raw_names(share, "a/b") == []


def test_walk_prefix_reaches_into_and_stops_at_directories(store):
    for name in ["data/1", "data/sub/2", "database", "dat", "other/3", "Data2/x"]:
        store.write_bytes(name, b"x")
    store.mkdir("data/empty")
    assert sorted(e.path for e in store.walk("data")) == ["data", "data/1", "data/empty", "data/sub",
                                                          "data/sub/2", "database"]
    assert sorted(e.path for e in store.walk("data/s")) == ["data/sub", "data/sub/2"]
    assert list(store.walk("absent/dir/")) == []


def test_listings_follow_markers(store, share, monkeypatch):
    monkeypatch.setattr(fileshare_mod, "LIST_PAGE", 7)
    monkeypatch.setattr(fileshare_mod, "WALK_CONCURRENCY", 2)
    remote = ShareRemote(None, share)
    for i in range(30):
        remote.put(f"many/{i:03d}", b"x")
    for i in range(9):
        remote.mkdir(f"many/d{i}/inner")
    listed = [e.path for e in store.list_dir("many")]
    assert sorted(listed) == sorted([f"many/{i:03d}" for i in range(30)] + [f"many/d{i}" for i in range(9)])
    assert len(listed) == len(set(listed))
    walked = [e.path for e in store.walk("many/")]
    assert len(walked) == len(set(walked)) == 30 + 18


def test_listing_carries_sizes_etags_and_times(store, share):
    store.write_bytes("d/f.bin", b"12345")
    [entry] = store.list_dir("d")
    props = share.get_file_client("d/f.bin").get_file_properties()
    assert entry.size == 5 and entry.etag == props.etag.strip('"')
    assert entry.mtime == props.last_modified.timestamp()
    stat = store.stat("d/f.bin")
    assert (stat.size, stat.etag, stat.mtime) == (entry.size, entry.etag, entry.mtime)
    assert stat.md5 == hashlib.md5(b"12345").digest()  # a listing does not carry the MD5; stat does


def test_writes_make_parents_set_md5_and_leave_no_temporary_file(store, share, tmp_path, monkeypatch):
    monkeypatch.setattr(fileshare_mod, "RANGE_SIZE", 64 * 1024)
    data = os.urandom(5 * 64 * 1024 + 3)
    local = tmp_path / "f.bin"
    local.write_bytes(data)
    entry = store.write_file("deep/er/than/before.bin", str(local))
    props = share.get_file_client("deep/er/than/before.bin").get_file_properties()
    assert props.size == len(data) and bytes(props.content_settings.content_md5) == hashlib.md5(data).digest()
    assert props.content_settings.content_type == "application/octet-stream"
    assert entry.etag == props.etag.strip('"') and entry.md5 == hashlib.md5(data).digest()
    assert share.get_file_client("deep/er/than/before.bin").download_file().readall() == data
    assert raw_names(share, "deep/er/than") == ["before.bin"]
    store.write_bytes("deep/note.txt", b"")
    assert store.stat("deep/note.txt").size == 0
    assert share.get_file_client("deep/note.txt").get_file_properties().content_settings.content_type == "text/plain"


def test_overwrite_false_is_decided_by_the_service(store, share, tmp_path):
    store.write_bytes("x.txt", b"first")
    with pytest.raises(AlreadyExists):
        store.write_bytes("x.txt", b"second", overwrite=False)
    assert raw_names(share) == ["x.txt"]  # the refused upload's temporary file is gone
    # Many writers racing for a new name: exactly one wins, whole.
    results = []

    def writer(i):
        try:
            store.write_bytes("race.bin", bytes([i]) * 100_000, overwrite=False)
            results.append(i)
        except AlreadyExists:
            pass

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 1
    assert store.read("race.bin", 0, 200_000) == bytes([results[0]]) * 100_000
    assert raw_names(share) == ["race.bin", "x.txt"]


def test_temporary_files_of_uploads_in_flight_are_hidden(store, share):
    store.write_bytes("d/real.txt", b"r")
    ShareRemote(None, share).put("d/.mountd-0123abcd.partial", b"half")
    assert [e.path for e in store.list_dir("d")] == ["d/real.txt"]
    assert [e.path for e in store.walk("d/")] == ["d/real.txt"]


def test_mkdir_over_a_file_and_files_into_a_file(store):
    store.write_bytes("f", b"x")
    with pytest.raises(AlreadyExists, match="exists as a file"):
        store.mkdir("f")
    with pytest.raises(AlreadyExists):
        store.write_bytes("f/child", b"y")
    with pytest.raises(AlreadyExists):
        store.mkdir("f/sub")


def test_rename_files_and_directories(store, share):
    store.write_bytes("src/a.txt", b"new")
    store.write_bytes("dst/a.txt", b"old")
    store.rename("src/a.txt", "dst/a.txt")  # replaces
    assert store.read("dst/a.txt", 0, 10) == b"new"
    with pytest.raises(NotFound):
        store.stat("src/a.txt")
    store.rename("dst/a.txt", "made/on/the/way/a.txt")  # missing parents are made
    assert store.read("made/on/the/way/a.txt", 0, 10) == b"new"
    store.mkdir("src/empty")
    store.rename("src", "moved")
    assert store.stat("moved/empty").is_dir
    with pytest.raises(NotFound):
        store.rename("nope", "other")


def test_names_kept_exactly(store, share, fileshare):
    # the service would drop a trailing dot unless told not to
    from azure.storage.fileshare import ShareServiceClient
    for name in ["run./out.", "sp ace/ü é.txt", "x/100%#+&=.txt"]:
        store.write_bytes(name, name.encode())
        assert store.read(name, 0, 100) == name.encode()
    exact = ShareServiceClient.from_connection_string(fileshare.connection_string, allow_trailing_dot=True)
    assert raw_names(exact.get_share_client(share.share_name), "run.") == ["out."]
    assert sorted(e.path for e in store.walk("") if not e.is_dir) == sorted(
        ["run./out.", "sp ace/ü é.txt", "x/100%#+&=.txt"])


def test_case_insensitive_namespace(store):
    store.write_bytes("Dir/File.TXT", b"1")
    assert store.stat("dir/file.txt").size == 1  # the service's namespace ignores case
    with pytest.raises(AlreadyExists):
        store.write_bytes("DIR/FILE.txt", b"2", overwrite=False)


def test_file_rewritten_in_place_is_stale_for_a_pinned_reader(store, share):
    first = store.write_bytes("f.bin", os.urandom(300_000))
    share.get_file_client("f.bin").upload_range(b"changed", 1000, 7)  # in place, as an SMB client writes
    with pytest.raises(Stale):
        store.read("f.bin", 0, 300_000, etag=first.etag)
    with pytest.raises(Stale):
        store.read_stream("f.bin", 0, 300_000, first.etag, memoryview(bytearray(65536)), lambda o, p: None)
    assert store.read("f.bin", 1000, 7, etag=store.stat("f.bin").etag) == b"changed"


def test_create_share(fileshare, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    cfg = parse("s", share_workspace_entry(fileshare, "made-here", KEY_ENV), "t")
    with open_store(cfg) as store, pytest.raises(ConfigError, match="does not exist"):
        store.check()
    with open_store(cfg, create=True) as store:
        store.check()
        assert store.create() is False  # there already
    from azure.storage.fileshare import ShareServiceClient
    ShareServiceClient.from_connection_string(fileshare.connection_string).delete_share("made-here")


def test_sas_token_and_connection_string(fileshare, share, monkeypatch, tmp_path):
    from azure.storage.fileshare import ShareSasPermissions, generate_share_sas
    sas = generate_share_sas(share.account_name, share.share_name, KEY,
                             permission=ShareSasPermissions(read=True, create=True, write=True, delete=True,
                                                            list=True),
                             expiry=datetime.now(timezone.utc) + timedelta(hours=1))
    monkeypatch.setenv("SHARE_SAS", sas)
    monkeypatch.setenv("SHARE_CONN", fileshare.connection_string)
    for spec in ({"sas_token_env": "SHARE_SAS"}, {"connection_string_env": "SHARE_CONN"}):
        entry = dict(share_workspace_entry(fileshare, share.share_name), credential=spec)
        if "connection_string_env" in spec:
            del entry["endpoint"], entry["account_name"]
        with open_store(parse("s", entry, "t")) as store:
            store.write_bytes("cred/a.txt", b"payload")  # create, put range, rename
            store.rename("cred/a.txt", "cred/b.txt")
            assert store.read("cred/b.txt", 0, 100) == b"payload"
            assert [e.path for e in store.walk("cred/")] == ["cred/b.txt"]
            store.delete("cred/b.txt")
            store.rmdir("cred")


def test_missing_share_bad_key_dead_endpoint(fileshare, share, monkeypatch):
    with open_store(parse("s", share_workspace_entry(fileshare, "doesnotexist"), "t")) as store, \
            pytest.raises(ConfigError, match="does not exist"):
        store.check()
    monkeypatch.setenv("WRONG_KEY", "d3Jvbmc" + "A" * 79 + "==")  # well-formed (88 characters), not the key
    entry = share_workspace_entry(fileshare, share.share_name, key_env="WRONG_KEY")
    with open_store(parse("s", entry, "t")) as store, pytest.raises(Unreachable, match="refused"):
        store.check()
    with open_store(parse("s", entry, "t")) as store, pytest.raises(Unreachable, match="refused"):
        list(store.list_dir(""))  # the lean listing path translates the same way
    entry = dict(share_workspace_entry(fileshare, share.share_name),
                 endpoint=f"http://127.0.0.1:{free_port()}/devstoreaccount1")
    with open_store(parse("s", entry, "t")) as store, pytest.raises(Unreachable, match="cannot reach"):
        store.check()


@pytest.mark.parametrize("kind", ["managed_identity", "default"])
def test_anonymous_is_refused_and_token_credentials_use_the_backup_intent(fileshare, monkeypatch, kind):
    with pytest.raises(ConfigError, match="no anonymous access"):
        parse("s", dict(share_workspace_entry(fileshare, "any-share"), credential={"anonymous": True}), "t")

    class FakeToken:  # stands in for azure-identity; never asked for a token here
        def get_token(self, *scopes, **kwargs):
            raise AssertionError("not called")

    spec = {"managed_identity": True} if kind == "managed_identity" else {}
    cfg = parse("s", {"type": "azure_file", "account_name": "myacct", "share_name": "any-share",
                      "credential": spec}, "t")  # tokens need https: no request is made
    monkeypatch.setattr(identity, "token_credential", lambda cred: FakeToken())
    store = FileShareStore(cfg, Credential(kind))
    try:
        assert store.share.get_file_client("x").file_request_intent == "backup"
        assert store._reader.headers["x-ms-file-request-intent"] == "backup"
    finally:
        store.close()
