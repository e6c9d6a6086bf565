"""Consistency when storage changes underneath: a blob rewritten or deleted
while open gives an error or the old bytes, never a mix (reads are pinned
to one version: the one seen at open with --strict-open, otherwise the one
whose attributes the kernel holds, as the kernel opens files itself); a
change is seen at the next open once the attribute TTL has passed; a
download of a blob rewritten mid-way fails that file rather than writing a
mix. The mount tests run both ways."""

import errno
import os
import threading
import time

import pytest
import yaml

from mountd.run import runtime
from tests.support.azurite import blob_workspace_entry
from tests.support.faultproxy import verified

KiB = 1024
SMALL = ["--block-size", "64KiB", "--memory-cache", "1MiB", "--no-disk-cache"]


@pytest.fixture
def store(blob_datastore):
    return blob_datastore


@pytest.fixture(params=[(), ("--strict-open",)], ids=["kernel-opens", "strict-open"])
def opens(request):
    """The mount flags of each way files are opened."""
    return request.param


def read_until_error(fd, size: int, chunk: int, during=None) -> tuple[bytes, int | None]:
    """Read sequentially; call during(offset) after each chunk. Returns the
    bytes read before an error, and the error's errno (None if none)."""
    got = b""
    while len(got) < size:
        try:
            piece = os.pread(fd, chunk, len(got))
        except OSError as e:
            return got, e.errno
        if not piece:
            break
        got += piece
        if during:
            during(len(got))
    return got, None


def test_rewritten_mid_read_gives_old_bytes_then_an_error_never_a_mix(store, mounter, opens):
    old, new = os.urandom(2048 * KiB), os.urandom(2048 * KiB)  # same size: only the etag tells them apart
    store.upload_blob("f.bin", old)
    mp = mounter("data", *SMALL, *opens)
    fd = os.open(mp / "f.bin", os.O_RDONLY)
    done = []

    def rewrite(offset):
        if offset >= 256 * KiB and not done:
            store.upload_blob("f.bin", new, overwrite=True)
            done.append(offset)
    try:
        got, err = read_until_error(fd, len(old), 64 * KiB, rewrite)
    finally:
        os.close(fd)
    assert done
    assert err in (None, errno.ESTALE), err  # the rest, if any, an error saying why
    if opens:  # --strict-open: the handle keeps the version it opened
        assert got == old[:len(got)]  # every byte served is the old version's
    else:
        # Kernel opens (README, "Kernel opens"): once the kernel is told the
        # new attributes, every reader of the path reads the new version,
        # one that opened before too; a read call is never a mix.
        assert got[:done[0]] == old[:done[0]]
        chunk = 64 * KiB
        for at in range(done[0], len(got), chunk):
            piece = got[at:at + chunk]
            assert piece in (old[at:at + chunk], new[at:at + chunk]), f"the read at {at} mixes the versions"
    verified(got)
    assert (mp / "f.bin").read_bytes() in (old, new)  # reopened: one whole version


def test_deleted_while_open_gives_estale_and_a_log_line(store, mounter, opens):
    data = os.urandom(512 * KiB)
    store.upload_blob("gone.bin", data)
    mp = mounter("data", *SMALL, "--readahead-blocks", "0", *opens)
    fd = os.open(mp / "gone.bin", os.O_RDONLY)
    try:
        assert os.pread(fd, 1000, 0) == data[:1000]
        store.delete_blob("gone.bin")
        with pytest.raises(OSError) as e:
            os.pread(fd, 1000, 400 * KiB)
        # When the kernel opened the file itself, a read of its own (readahead)
        # may have found it gone first; the kernel then asks for its
        # attributes before this read, and the answer is that it no longer exists.
        assert e.value.errno == errno.ESTALE or (not opens and e.value.errno == errno.ENOENT), e.value
    finally:
        os.close(fd)
    log = open(runtime.log_path(str(mp)), encoding="utf-8").read()
    # (Azurite answers a read pinned to the deleted version 412, as for a change)
    assert "gone.bin was deleted from storage while open" in log or "gone.bin changed in storage while open" in log
    if opens:
        with pytest.raises(FileNotFoundError):
            # reopening looks the name up afresh (stat may still show kernel-cached attributes)
            open(mp / "gone.bin", "rb")
    else:
        # the kernel opens a name it holds by itself (for the attribute TTL),
        # but asks again for the file's attributes before using it
        with pytest.raises(FileNotFoundError):
            os.stat(mp / "gone.bin")
        with pytest.raises(FileNotFoundError):
            with open(mp / "gone.bin", "rb") as f:
                f.read()


def test_a_change_is_seen_at_the_next_open_after_the_attribute_ttl(store, mounter, opens):
    store.upload_blob("v.txt", b"version one")
    mp = mounter("data", *SMALL, "--attribute-ttl", "1s", *opens)
    assert (mp / "v.txt").read_bytes() == b"version one"
    store.upload_blob("v.txt", b"version two, longer", overwrite=True)
    time.sleep(1.5)
    assert (mp / "v.txt").read_bytes() == b"version two, longer"
    assert os.stat(mp / "v.txt").st_size == len(b"version two, longer")


def test_within_the_attribute_ttl_an_open_sees_one_whole_version(store, mounter, opens):
    old = os.urandom(300 * KiB)
    store.upload_blob("t.bin", old)
    mp = mounter("data", *SMALL, "--attribute-ttl", "60s", *opens)
    assert os.stat(mp / "t.bin").st_size == len(old)
    new = os.urandom(200 * KiB)
    store.upload_blob("t.bin", new, overwrite=True)
    assert os.stat(mp / "t.bin").st_size == len(old)  # attributes are trusted for the TTL, as documented
    try:
        got = (mp / "t.bin").read_bytes()
    except OSError as e:
        assert e.errno == errno.ESTALE  # the old version is gone: said so
    else:
        assert got == old  # or served whole from what was cached


def test_download_of_a_blob_rewritten_midway_fails_that_file(store, azurite, fault_proxy, tmp_path, mountd_cli,
                                                            monkeypatch):
    old = os.urandom(3 << 20)
    store.upload_blob("moving.bin", old)
    store.upload_blob("still.bin", b"still")
    proxy = fault_proxy(azurite.port, throttle=1 << 20)  # 1 MiB/s: the rewrite lands mid-download
    entry = blob_workspace_entry(azurite, store.container_name)
    entry["endpoint"] = proxy.url(azurite.account_url)
    ws = tmp_path / "ws2.yaml"
    ws.write_text(yaml.safe_dump({"datastores": {"slow": entry}}))
    monkeypatch.setenv("MOUNTD_WORKSPACE", str(ws))
    def rewrite_and_break():
        store.upload_blob("moving.bin", os.urandom(3 << 20), overwrite=True)
        proxy.cut()  # the GET in flight breaks; its resumption asks for the old version
    threading.Timer(1.0, rewrite_and_break).start()
    r = mountd_cli("download", "slow", tmp_path / "dst", "--no-progress")
    assert r.code == 3, r
    assert "download of moving.bin failed: " in r.err and "changed in storage" in r.err, r.err
    assert sorted(os.listdir(tmp_path / "dst")) == ["still.bin"]  # no mix, no partial file
