"""Real FUSE mounts through `mountd mount`, over Azurite (blob), the Files
emulator (file share) and a local datastore: every byte through the mount,
offsets and block boundaries, concurrent readers, markers and empty
directories, change detection, unmount and its failures."""

import errno
import hashlib
import json
import mmap
import os
import random
import signal
import subprocess
import threading
import time

import pytest
import yaml

from mountd.run import control, mounts, runtime
from tests.conftest import KEY, KEY_ENV
from tests.support.remotes import BlobRemote, ShareRemote

pytestmark = [pytest.mark.fuse, pytest.mark.usefixtures("fuse_available")]

BLOCK = 64 * 1024
TREE = {
    "plain.txt": b"plain",
    "with space/file name.txt": b"space" * 100,
    "unicode/é日本/データ.bin": os.urandom(3000),
    "pct/100%.txt": b"pct",
    "hash/#1.txt": b"hash",
    "plus/a+b.txt": b"plus",
    "empty.bin": b"",
    "blocks/exact.bin": os.urandom(4 * BLOCK),
    "blocks/odd.bin": os.urandom(5 * BLOCK + 7),
    "deep/a/b/c/d.txt": b"deep",
}


@pytest.fixture(params=["blob", "file", "local"])
def datastore(request, tmp_path, monkeypatch):
    """A workspace whose datastore `data` holds TREE and the empty directory
    `marked` (a marker blob on blob storage); yields its kind."""
    ws = tmp_path / "ws.yaml"
    if request.param in ("blob", "file"):
        if request.param == "blob":
            remote = BlobRemote(request.getfixturevalue("azurite"), request.getfixturevalue("container"))
        else:
            remote = ShareRemote(request.getfixturevalue("fileshare"), request.getfixturevalue("share"))
        for name, data in TREE.items():
            remote.put(name, data)
        remote.mkdir("marked")
        entry = remote.entry(KEY_ENV)
    else:
        root = tmp_path / "localroot"
        for name, data in TREE.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
        (root / "marked").mkdir()
        entry = {"type": "local", "root": str(root)}
        request.node.root = root
    ws.write_text(yaml.safe_dump({"datastores": {"data": entry}}))
    monkeypatch.setenv("MOUNTD_WORKSPACE", str(ws))
    monkeypatch.setenv(KEY_ENV, KEY)
    return request.param


@pytest.fixture
def mount(tmp_path, mounter):
    """mount(target, *flags) -> mountpoint, with small blocks and caches."""
    def do(target="data", *flags, expect_ok=True):
        return mounter(target, "--cache-dir", tmp_path / "cache", "--block-size", "64KiB", "--memory-cache", "1MiB",
                       *flags, expect_ok=expect_ok)
    return do


def tree_bytes(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            full = os.path.join(dirpath, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, root)] = fh.read()
    return out


def test_every_byte_of_the_tree_through_the_mount(datastore, mount, mountd_cli):
    mp = mount()
    assert tree_bytes(mp) == TREE
    assert os.path.isdir(mp / "marked") and os.listdir(mp / "marked") == []
    st = os.stat(mp / "blocks" / "odd.bin")
    assert st.st_size == len(TREE["blocks/odd.bin"]) and st.st_mode & 0o777 == 0o444
    with pytest.raises(FileNotFoundError):
        os.stat(mp / "no-such-file")
    r = mountd_cli("unmount", mp)
    assert r.code == 0, r
    assert not mounts.is_mounted(str(mp))


def test_pread_at_random_offsets_and_block_boundaries(datastore, mount):
    mp = mount()
    data = TREE["blocks/odd.bin"]
    offsets = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK - 3, len(data) - 1, len(data), len(data) + 5]
    rng = random.Random(7)
    offsets += [rng.randrange(len(data)) for _ in range(100)]
    fd = os.open(mp / "blocks" / "odd.bin", os.O_RDONLY)
    try:
        for off in offsets:
            size = rng.choice([1, 7, 4096, BLOCK, BLOCK + 1, 3 * BLOCK])
            assert os.pread(fd, size, off) == data[off:off + size], (off, size)
    finally:
        os.close(fd)


def test_concurrent_readers_of_one_file(datastore, mount):
    mp = mount()
    data = TREE["blocks/odd.bin"]
    want = hashlib.sha256(data).hexdigest()
    results, errors = [], []

    def reader(seed):
        try:
            rng = random.Random(seed)
            with open(mp / "blocks" / "odd.bin", "rb") as f:
                if seed % 2:
                    results.append(hashlib.sha256(f.read()).hexdigest())
                else:
                    for _ in range(50):
                        off = rng.randrange(len(data))
                        f.seek(off)
                        assert f.read(5000) == data[off:off + 5000]
                    results.append(want)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and results == [want] * 8


def test_mount_a_subdirectory(datastore, mount):
    mp = mount("data:blocks")
    assert sorted(os.listdir(mp)) == ["exact.bin", "odd.bin"]
    assert (mp / "exact.bin").read_bytes() == TREE["blocks/exact.bin"]


def test_mount_is_read_only(datastore, mount):
    mp = mount()
    for attempt in (lambda: open(mp / "new.txt", "wb"), lambda: open(mp / "plain.txt", "ab"),
                    lambda: os.mkdir(mp / "newdir"), lambda: os.unlink(mp / "plain.txt")):
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EROFS


def test_file_rewritten_while_open_gives_an_error_never_mixed_bytes(remote, tmp_path, monkeypatch, mount):
    old = os.urandom(8 * BLOCK)
    remote.put("changing.bin", old)
    ws = tmp_path / "ws.yaml"
    ws.write_text(yaml.safe_dump({"datastores": {"data": remote.entry(KEY_ENV)}}))
    monkeypatch.setenv("MOUNTD_WORKSPACE", str(ws))
    mp = mount("data", "--readahead-blocks", "0", "--no-disk-cache")
    fd = os.open(mp / "changing.bin", os.O_RDONLY)
    try:
        assert os.pread(fd, 100, 0) == old[:100]
        remote.put("changing.bin", os.urandom(8 * BLOCK))  # a file share's file is rewritten in place
        try:
            got = os.pread(fd, 100, 6 * BLOCK)
        except OSError as e:
            assert e.errno in (errno.ESTALE, errno.EIO)
        else:
            assert got == old[6 * BLOCK:6 * BLOCK + 100]  # the kernel may still hold old pages: old bytes only
    finally:
        os.close(fd)
    log = runtime.log_path(str(mp))
    assert "changed in storage while open" in open(log, encoding="utf-8").read()


def test_zero_byte_and_listing_attributes(datastore, mount):
    mp = mount()
    assert (mp / "empty.bin").read_bytes() == b""
    names = sorted(os.listdir(mp))
    assert names == sorted({"plain.txt", "with space", "unicode", "pct", "hash", "plus", "empty.bin", "blocks",
                            "deep", "marked"})


def test_unmount_with_open_file_is_refused_then_lazy_works(datastore, mount, mountd_cli):
    mp = mount()
    f = open(mp / "plain.txt", "rb")
    try:
        r = mountd_cli("unmount", mp)
        assert r.code == 1 and "busy" in r.err and len(r.err.strip().splitlines()) == 1, r
        assert mounts.is_mounted(str(mp))
        assert f.read() == b"plain"
        r = mountd_cli("unmount", mp, "--lazy")
        assert r.code == 0, r
        assert not mounts.is_mounted(str(mp))
    finally:
        f.close()


def test_worker_killed_leaves_no_dead_mount(datastore, mount):
    mp = mount()
    record = runtime.read_record(str(mp))
    os.kill(record["pid"], signal.SIGKILL)
    # the supervisor detaches the dead mount; on a loaded 2-core host that
    # took over 10 s now and then (the suite's other FUSE workers compete)
    deadline = time.time() + 30
    while mounts.is_mounted(str(mp)) and time.time() < deadline:
        time.sleep(0.1)
    assert not mounts.is_mounted(str(mp))
    assert os.listdir(mp) == []  # an empty directory again, not "Transport endpoint is not connected"


def test_unmount_never_kills_a_process_that_took_a_dead_workers_pid(datastore, mount, mountd_cli):
    mp = mount()
    record = runtime.read_record(str(mp))
    assert record["pid_start"] == runtime.process_start(record["pid"])
    # the record names a pid that is another process's now (as after the
    # worker died and the pid was reused)
    stranger = subprocess.Popen(["sleep", "300"])
    try:
        runtime.write_record(str(mp), dict(record, pid=stranger.pid))
        r = mountd_cli("unmount", mp)
        assert r.code == 0, r
        assert not mounts.is_mounted(str(mp))
        assert stranger.poll() is None  # alive: not killed, not waited for
    finally:
        stranger.kill()
        stranger.wait()


@pytest.mark.parametrize("case", ["missing", "not-empty", "file", "unknown-datastore", "bad-size", "already"])
def test_mount_refuses_bad_input_with_exit_2(datastore, tmp_path, mount, mountd_cli, case):
    target, mp = "data", tmp_path / "mp"
    extra = []
    if case == "missing":
        mp = tmp_path / "absent"
    elif case == "not-empty":
        mp.mkdir()
        (mp / "x").write_text("x")
    elif case == "file":
        mp.write_text("x")
    elif case == "unknown-datastore":
        mp.mkdir()
        target = "nosuch"
    elif case == "bad-size":
        mp.mkdir()
        extra = ["--memory-cache", "lots"]
    else:
        mp = mount()
    r = mountd_cli("mount", target, mp, *extra)
    assert r.code == 2, r
    assert r.err.startswith("mountd: error: ") and len(r.err.strip().splitlines()) == 1, r
    assert "Traceback" not in r.err
    if case != "already":
        assert not mounts.is_mounted(str(mp))


def test_mount_of_unreachable_store_fails_cleanly(tmp_path, mountd_cli, monkeypatch):
    from tests.support.azurite import free_port
    ws = tmp_path / "ws.yaml"
    ws.write_text(yaml.safe_dump({"datastores": {"dead": {
        "type": "azure_blob", "account_name": "devstoreaccount1", "container_name": "cont",
        "endpoint": f"http://127.0.0.1:{free_port()}/devstoreaccount1", "credential": {"account_key_env": KEY_ENV}}}}))
    mp = tmp_path / "mp"
    mp.mkdir()
    r = mountd_cli("--workspace", ws, "mount", "dead", mp, env={KEY_ENV: KEY})
    assert r.code == 2 and "cannot reach" in r.err, r
    assert not mounts.is_mounted(str(mp)) and os.listdir(mp) == []


def test_unmount_of_something_not_mounted(tmp_path, mountd_cli):
    r = mountd_cli("unmount", tmp_path)
    assert r.code == 2 and "is not mounted" in r.err


def test_disk_cache_serves_a_remount(datastore, tmp_path, mount, mountd_cli):
    mp = mount()
    assert (mp / "blocks" / "odd.bin").read_bytes() == TREE["blocks/odd.bin"]
    time.sleep(0.5)  # the disk writer is asynchronous
    assert mountd_cli("unmount", mp).code == 0
    cache_files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.name != ".lock"]
    assert cache_files, "the disk tier kept nothing"
    mp2 = mount()
    assert (mp2 / "blocks" / "odd.bin").read_bytes() == TREE["blocks/odd.bin"]


def test_record_shows_the_mount(datastore, mount):
    mp = mount()
    record = runtime.read_record(str(mp))
    assert record["datastore"] == "data" and record["mode"] == "ro" and runtime.pid_alive(record["pid"])
    assert KEY not in json.dumps(record)


def test_foreground_mount_stops_cleanly_on_ctrl_c(datastore, tmp_path):
    import sys
    mp = tmp_path / "fg"
    mp.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "mountd", "mount", "data", str(mp), "--foreground",
                             "--no-disk-cache"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not mounts.is_mounted(str(mp)) and time.time() < deadline:
        time.sleep(0.1)
    assert mounts.is_mounted(str(mp))
    assert (mp / "plain.txt").read_bytes() == b"plain"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert not mounts.is_mounted(str(mp)) and "error" not in err


def _fuse_connections() -> str:
    """The fusectl directory of FUSE connections, mounted if it is not."""
    path = "/sys/fs/fuse/connections"
    if os.path.isdir(path) and not os.listdir(path):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", path], capture_output=True)
    return path


def test_the_kernel_reads_ahead_far_with_many_requests_in_flight(tmp_path, monkeypatch, mounter):
    """The tuning a cold sequential read depends on reaches the kernel:
    16 MiB of readahead for the mount (not the kernel's 128 KiB), and up
    to 64 requests in flight (not 12, which stops readahead at 9 MiB)."""
    from mountd.fs.fuse_ops import CONGESTION_THRESHOLD, MAX_BACKGROUND, MAX_READAHEAD
    root = tmp_path / "localroot"
    root.mkdir()
    ws = tmp_path / "ws.yaml"
    ws.write_text(yaml.safe_dump({"datastores": {"data": {"type": "local", "root": str(root)}}}))
    monkeypatch.setenv("MOUNTD_WORKSPACE", str(ws))
    mp = mounter("data")
    dev = os.stat(mp).st_dev
    with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb") as f:
        assert int(f.read()) == MAX_READAHEAD // 1024
    conn = os.path.join(_fuse_connections(), str(dev))
    if not os.path.isdir(conn):
        pytest.skip("fusectl (/sys/fs/fuse/connections) is not available here")
    with open(os.path.join(conn, "max_background")) as f:
        assert int(f.read()) == MAX_BACKGROUND
    with open(os.path.join(conn, "congestion_threshold")) as f:
        assert int(f.read()) == CONGESTION_THRESHOLD


def _served(mp) -> int:
    return control.query(runtime.control_path(str(mp)))["bytes_served"]


@pytest.mark.parametrize("direct", [False, True], ids=["page-cache", "direct-io"])
def test_direct_io_sends_every_read_to_mountd(datastore, mount, direct):
    """By default a second read of a file comes from the kernel's page cache;
    with --direct-io the kernel keeps nothing and each read reaches mountd,
    with the same bytes."""
    mp = mount("data", *(["--direct-io"] if direct else []))
    name, data = "blocks/odd.bin", TREE["blocks/odd.bin"]
    for _ in range(2):
        with open(mp / name, "rb") as f:
            assert f.read() == data
    with open(mp / name, "rb") as f:  # reads at offsets still land right
        f.seek(BLOCK - 3)
        assert f.read(10) == data[BLOCK - 3:BLOCK + 7]
    served = _served(mp)
    if direct:
        assert served >= 2 * len(data) + 10
    else:
        assert len(data) <= served < 2 * len(data)
    with open(mp / name, "rb") as f:
        with mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ) as m:
            assert m[BLOCK - 3:BLOCK + 7] == data[BLOCK - 3:BLOCK + 7]
        if direct:  # libfuse 3.14 cannot let the kernel map direct-I/O files shared
            with pytest.raises(OSError) as e:
                mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
            assert e.value.errno == errno.ENODEV
        else:
            with mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as m:
                assert m[-7:] == data[-7:]


def _calls(mp) -> dict:
    return control.query(runtime.control_path(str(mp)))["calls"]


@pytest.mark.parametrize("strict", [False, True], ids=["kernel-opens", "strict-open"])
def test_a_later_epoch_of_a_read_only_mount_reaches_mountd_no_more(datastore, mount, strict):
    """Once a file's bytes are in the page cache, opening, reading and
    closing it again costs no request to mountd: the kernel opens files
    itself and a read-only mount has nothing to do at close. With
    --strict-open every open still comes to mountd (and its release), and
    the bytes come from the page cache all the same."""
    mp = mount("data", *(["--strict-open"] if strict else []))
    assert tree_bytes(mp) == TREE  # the first epoch fills the page cache
    before = _calls(mp)
    names = sorted(TREE)
    for _ in range(2):
        for name in names:
            with open(mp / name, "rb") as f:
                assert f.read() == TREE[name]
    after = _calls(mp)
    calls = {k: after[k] - before[k] for k in after}
    assert calls["flush"] == calls["read"] == calls["getattr"] == 0, calls
    if strict:
        assert calls["open"] == 2 * len(names), calls
    else:
        assert calls["open"] == calls["release"] == 0, calls


def test_direct_io_read_write_mount_uploads_what_was_written(datastore, mount, mountd_cli):
    """Writes of any size arrive as written when the kernel caches nothing,
    and what was written reaches storage at close."""
    mp = mount("data", "--direct-io", "--read-write")
    data = os.urandom(3 * BLOCK + 11)
    with open(mp / "new.bin", "wb") as f:
        for i in range(0, len(data), 4096):
            f.write(data[i:i + 4096])
    with open(mp / "new.bin", "r+b") as f:
        f.seek(BLOCK - 1)
        f.write(b"xyz")
    data = data[:BLOCK - 1] + b"xyz" + data[BLOCK + 2:]
    assert (mp / "new.bin").read_bytes() == data
    assert mountd_cli("unmount", mp).code == 0
    assert (mount() / "new.bin").read_bytes() == data


def test_unmount_refuses_a_mount_mountd_did_not_make(tmp_path, mountd_cli):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    other = tmp_path / "tmpfs"
    other.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "mountd-test", str(other)], check=True)
    try:
        (other / "precious.txt").write_text("keep me")
        r = mountd_cli("unmount", other)
        assert r.code == 2 and r.out == "", r
        assert r.err.strip() == (f"mountd: error: {other} is a tmpfs mount that mountd did not make: mountd "
                                 "unmounts only its own (use umount for others)")
        assert mounts.is_mounted(str(other)) and (other / "precious.txt").read_text() == "keep me"
        r = mountd_cli("unmount", other, "--lazy")
        assert r.code == 2 and mounts.is_mounted(str(other)), r
    finally:
        subprocess.run(["umount", "-l", str(other)], check=False)
