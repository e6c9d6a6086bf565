"""Renames on blob storage as the real service allows them, through the
gateway that refuses what Azure refuses (tests/support/azure_rules.py):
with an account key, with a SAS and with a managed identity's token, for
small files and files over the 256 MiB a synchronous copy takes, one at a
time, as directories through the filesystem core, and through a read-write
FUSE mount. And what a rename does when storage's copy takes time, fails,
or never ends."""

import hashlib
import os
import subprocess
import time
from datetime import datetime, timedelta, timezone

import pytest
import yaml

from mountd.cache.blocks import BlockCache
from mountd.config.datastores import parse
from mountd.config.settings import CacheSettings
from mountd.errors import StorageError
from mountd.fs.core import FileSystemCore
from mountd.fs.writeback import WriteBack
from mountd.run import mounts
from mountd.storage import open_store
from tests.conftest import KEY, KEY_ENV
from tests.support import faultproxy
from tests.support.azure_rules import SYNC_COPY_MAX, AzureRules, make_certificate, put_large_blob
from tests.support.azurite import ACCOUNT, blob_workspace_entry

SAS_ENV = "AZURITE_CONTAINER_SAS"
TOKEN = "test-identity-token"
BIG = SYNC_COPY_MAX + 1024 * 1024 + 4321  # just over what a synchronous copy takes
CONTENT_TYPE = "application/x-mountd-test"

pytestmark = pytest.mark.azurite


@pytest.fixture
def gateway(azurite):
    with AzureRules(azurite.port) as g:
        yield g


def sas_for(kind: str, container_name: str) -> str:
    """A container SAS ("sas") or an account SAS ("account-sas") that may
    read, write, list and delete blobs."""
    from azure.storage.blob import (AccountSasPermissions, ContainerSasPermissions, ResourceTypes,
                                    generate_account_sas, generate_container_sas)
    expiry = datetime.now(timezone.utc) + timedelta(hours=2)
    if kind == "sas":
        return generate_container_sas(ACCOUNT, container_name, account_key=KEY, expiry=expiry,
                                      permission=ContainerSasPermissions(read=True, add=True, create=True,
                                                                         write=True, delete=True, list=True))
    return generate_account_sas(ACCOUNT, KEY, ResourceTypes(container=True, object=True),
                                AccountSasPermissions(read=True, add=True, create=True, write=True, delete=True,
                                                      list=True), expiry)


def entry_via(gateway, azurite, container, kind, monkeypatch) -> dict:
    """A workspace entry for the container through the gateway, with an
    account key ("key"), a container SAS ("sas") or an account SAS
    ("account-sas") in the environment."""
    entry = blob_workspace_entry(azurite, container.container_name, KEY_ENV)
    entry["endpoint"] = gateway.url(azurite.account_url)
    monkeypatch.setenv(KEY_ENV, KEY)
    if kind != "key":
        monkeypatch.setenv(SAS_ENV, sas_for(kind, container.container_name))
        entry["credential"] = {"sas_token_env": SAS_ENV}
    return entry


@pytest.fixture(params=["key", "sas"])
def store(request, gateway, azurite, container, monkeypatch):
    """A BlobStore for the container through the gateway, with each kind of
    secret a datastore can hold."""
    entry = entry_via(gateway, azurite, container, request.param, monkeypatch)
    with open_store(parse("data", entry, "test")) as s:
        yield s


class FakeIdentity:
    """Stands in for DefaultAzureCredential: the token of an identity the
    gateway knows."""

    def __init__(self, token: str):
        self.token = token

    def get_token(self, *scopes, **kwargs):
        from azure.core.credentials import AccessToken
        return AccessToken(self.token, int(time.time()) + 3600)


@pytest.fixture
def identity_store(azurite, container, tmp_path, monkeypatch):
    """A BlobStore with a managed identity's token over HTTPS (clients send
    tokens over nothing else), through a gateway that takes the token in
    place of Azure AD and signs for Azurite. Yields (store, gateway)."""
    pytest.importorskip("cryptography")
    from mountd.storage import identity
    ca, cert, key = make_certificate(tmp_path)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", ca)
    monkeypatch.setattr(identity, "token_credential", lambda credential: FakeIdentity(TOKEN))
    with AzureRules(azurite.port, tokens={TOKEN}, tls=(cert, key)) as g:
        entry = {"type": "azure_blob", "account_name": ACCOUNT, "container_name": container.container_name,
                 "endpoint": g.url(azurite.account_url), "credential": {"managed_identity": True}}
        with open_store(parse("data", entry, "test")) as s:
            yield s, g


def blob_md5(container, name: str) -> tuple[int, bytes]:
    """(size, MD5) of what storage holds at `name`, read whole."""
    h, size = hashlib.md5(), 0
    for chunk in container.download_blob(name, max_concurrency=2).chunks():
        h.update(chunk)
        size += len(chunk)
    return size, h.digest()


def check_moved(container, src: str, dst: str, size: int, md5: bytes, content_type: str) -> None:
    """`dst` holds the bytes, MD5 property and content type `src` had, and
    `src` is gone."""
    names = {b.name for b in container.list_blobs()}
    assert src not in names and dst in names
    props = container.get_blob_client(dst).get_blob_properties()
    assert props.size == size
    assert bytes(props.content_settings.content_md5) == md5
    assert props.content_settings.content_type == content_type
    assert blob_md5(container, dst) == (size, md5)


def put_small(container, name: str, data: bytes) -> bytes:
    from azure.storage.blob import ContentSettings
    md5 = hashlib.md5(data).digest()
    container.upload_blob(name, data, content_settings=ContentSettings(content_type=CONTENT_TYPE, content_md5=md5))
    return md5


# -- one file ----------------------------------------------------------------------------
def test_rename_small_file(store, container, gateway):
    data = os.urandom(100_000)
    md5 = put_small(container, "dir/a.txt", data)
    store.rename("dir/a.txt", "other/b.txt")
    check_moved(container, "dir/a.txt", "other/b.txt", len(data), md5, CONTENT_TYPE)
    assert gateway.refused() == []


def test_rename_replaces_the_target(store, container, gateway):
    md5 = put_small(container, "a.bin", b"new bytes")
    put_small(container, "b.bin", b"the old target, longer than the new")
    store.rename("a.bin", "b.bin")
    check_moved(container, "a.bin", "b.bin", len(b"new bytes"), md5, CONTENT_TYPE)
    assert gateway.refused() == []


def test_rename_file_over_the_synchronous_copy_limit(store, container, gateway, request):
    t0 = time.monotonic()
    md5 = put_large_blob(container, "models/big.bin", BIG, CONTENT_TYPE)
    t1 = time.monotonic()
    store.rename("models/big.bin", "models/renamed.bin")
    t2 = time.monotonic()
    check_moved(container, "models/big.bin", "models/renamed.bin", BIG, md5, CONTENT_TYPE)
    t3 = time.monotonic()
    assert gateway.refused() == []
    faultproxy.NOTES.append(f"rename of a {BIG / 2**20:.0f} MiB blob with {request.node.callspec.id}: made in "
                            f"{t1 - t0:.2f} s, renamed in {t2 - t1:.2f} s, verified in {t3 - t2:.2f} s")


def test_rename_of_a_missing_file_is_not_found(store):
    from mountd.errors import NotFound
    with pytest.raises(NotFound):
        store.rename("nope.bin", "other.bin")


# -- a managed identity's token --------------------------------------------------------------
def test_rename_with_a_managed_identity(identity_store, container):
    store, gateway = identity_store
    data = os.urandom(50_000)
    small_md5 = put_small(container, "a.txt", data)
    big_md5 = put_large_blob(container, "big.bin", BIG, CONTENT_TYPE)
    store.rename("a.txt", "moved/a.txt")
    store.rename("big.bin", "moved/big.bin")
    check_moved(container, "a.txt", "moved/a.txt", len(data), small_md5, CONTENT_TYPE)
    check_moved(container, "big.bin", "moved/big.bin", BIG, big_md5, CONTENT_TYPE)
    # What went to storage: copies signed with the identity's token alone,
    # their source named without a SAS (the token authorises reading it).
    assert [(c["op"], c["auth"], c["source_sas"], c["answer"]) for c in gateway.copies] == \
        [("copy", "Bearer", False, "forwarded")] * 2


# -- directories through the filesystem core ----------------------------------------------------
# (With an account SAS, not a container SAS: the core's stat of the root
# checks the container's properties, which a container SAS cannot grant.)
@pytest.mark.parametrize("kind", ["key", "account-sas"])
def test_directory_rename_through_the_core(kind, gateway, azurite, container, tmp_path, monkeypatch):
    tree = {"d/a.txt": os.urandom(1000), "d/sub/b.bin": os.urandom(70_000), "d/sub/deeper/c.txt": b"c"}
    md5s = {name: put_small(container, name, data) for name, data in tree.items()}
    big_md5 = put_large_blob(container, "d/sub/big.bin", BIG, CONTENT_TYPE)
    container.upload_blob("d/empty", b"", metadata={"hdi_isfolder": "true"})
    store = open_store(parse("data", entry_via(gateway, azurite, container, kind, monkeypatch), "test"))
    cfg = CacheSettings(block_size=1024 * 1024, memory=8 * 1024 * 1024, disk=False)
    wb = WriteBack(store, str(tmp_path / "work"), {"name": "data", "type": "azure_blob"}, "test")
    core = FileSystemCore(store, cfg, BlockCache(cfg.memory, None, cfg.threads), read_only=False, writeback=wb)
    try:
        core.rename("/d", "/e")
    finally:
        core.close()  # (closes the store too)
    for name, data in tree.items():
        check_moved(container, name, "e" + name[1:], len(data), md5s[name], CONTENT_TYPE)
    check_moved(container, "d/sub/big.bin", "e/sub/big.bin", BIG, big_md5, CONTENT_TYPE)
    assert not [b.name for b in container.list_blobs(name_starts_with="d/")]
    assert container.get_blob_client("e/empty").get_blob_properties().metadata == {"hdi_isfolder": "true"}
    assert gateway.refused() == []


# -- directories through a read-write mount ------------------------------------------------------
@pytest.mark.fuse
@pytest.mark.parametrize("kind", ["key", "account-sas"])
def test_directory_rename_through_a_mount(kind, gateway, azurite, container, tmp_path, monkeypatch, mountd_cli,
                                          fuse_available):
    ws = tmp_path / "ws.yaml"
    ws.write_text(yaml.safe_dump({"datastores": {"data": entry_via(gateway, azurite, container, kind, monkeypatch)}}))
    monkeypatch.setenv("MOUNTD_WORKSPACE", str(ws))
    small = os.urandom(4000)
    small_md5 = put_small(container, "run/ckpt/meta.json", small)
    big_md5 = put_large_blob(container, "run/ckpt/weights.bin", BIG, CONTENT_TYPE)
    mp = tmp_path / "mnt"
    mp.mkdir()
    r = mountd_cli("mount", "data", mp, "--read-write", "--work-dir", tmp_path / "work", "--cache-dir",
                   tmp_path / "cache", "--block-size", "1MiB")
    assert r.code == 0, r
    try:
        os.rename(mp / "run" / "ckpt", mp / "run" / "final")
        assert sorted(os.listdir(mp / "run")) == ["final"]
        assert sorted(os.listdir(mp / "run" / "final")) == ["meta.json", "weights.bin"]
        assert os.path.getsize(mp / "run" / "final" / "weights.bin") == BIG
        assert (mp / "run" / "final" / "meta.json").read_bytes() == small
        r = mountd_cli("unmount", mp)
        assert r.code == 0, r
    finally:
        if mounts.is_mounted(str(mp)):
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)
    check_moved(container, "run/ckpt/meta.json", "run/final/meta.json", len(small), small_md5, CONTENT_TYPE)
    check_moved(container, "run/ckpt/weights.bin", "run/final/weights.bin", BIG, big_md5, CONTENT_TYPE)
    assert gateway.refused() == []


# -- copies that take time, fail or never end ------------------------------------------------------
@pytest.fixture
def slow_copies(azurite, container, monkeypatch):
    """store(pending_polls, outcome) -> (store, gateway): a BlobStore whose
    copies look pending to it for that many reads, then end so."""
    made = []

    def make(pending_polls: int, outcome: str = "success"):
        gateway = AzureRules(azurite.port, pending_polls=pending_polls, copy_outcome=outcome).start()
        entry = entry_via(gateway, azurite, container, "key", monkeypatch)
        store = open_store(parse("data", entry, "test"))
        made.append((store, gateway))
        return store, gateway

    yield make
    for store, gateway in made:
        store.close()
        gateway.stop()


def test_rename_waits_for_a_copy_to_finish(slow_copies, container):
    store, gateway = slow_copies(pending_polls=3)
    md5 = put_small(container, "a.bin", b"payload")
    store.rename("a.bin", "b.bin")
    check_moved(container, "a.bin", "b.bin", len(b"payload"), md5, CONTENT_TYPE)
    [copy] = gateway.slow_copies()
    assert copy["status"] == "success" and copy["left"] == 0  # every pending answer was read, then success


def test_a_failed_copy_keeps_the_source(slow_copies, container):
    store, gateway = slow_copies(pending_polls=1, outcome="failed")
    put_small(container, "a.bin", b"payload")
    with pytest.raises(StorageError, match="failed"):
        store.rename("a.bin", "b.bin")
    assert container.download_blob("a.bin").readall() == b"payload"
    assert "b.bin" not in {b.name for b in container.list_blobs()}  # no half-made target left behind


def test_a_copy_that_does_not_end_is_aborted(slow_copies, container):
    store, gateway = slow_copies(pending_polls=10**9)
    store._copy_wait = lambda size: 0.5  # give up after half a second
    put_small(container, "a.bin", b"payload")
    with pytest.raises(StorageError, match="0.5 s"):
        store.rename("a.bin", "b.bin")
    [copy] = gateway.slow_copies()
    assert copy["status"] == "aborted"
    assert container.download_blob("a.bin").readall() == b"payload"
    assert "b.bin" not in {b.name for b in container.list_blobs()}
