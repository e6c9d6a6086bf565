"""Read-write mounts through real FUSE over Azurite and a local datastore:
what is written, appended, truncated, renamed and deleted through the mount
is what storage holds; writes reach storage on close; failures give EIO and
keep the data for `mountd resume`."""

import errno
import hashlib
import json
import os
import signal
import subprocess
import threading
import time

import pytest
import yaml

from mountd.run import mounts, runtime
from tests.conftest import KEY, KEY_ENV
from tests.support.remotes import BlobRemote, LocalRemote, ShareRemote

pytestmark = [pytest.mark.fuse, pytest.mark.usefixtures("fuse_available")]

MiB = 1024 * 1024


@pytest.fixture(params=["blob", "file", "local"])
def storage(request, tmp_path, monkeypatch):
    """The workspace's datastore `data`: a container, a share or a local
    directory, seen through its SDK (or the file system) behind the mount."""
    if request.param == "blob":
        remote = BlobRemote(request.getfixturevalue("azurite"), request.getfixturevalue("container"))
    elif request.param == "file":
        remote = ShareRemote(request.getfixturevalue("fileshare"), request.getfixturevalue("share"))
    else:
        (tmp_path / "localroot").mkdir()
        remote = LocalRemote(tmp_path / "localroot")
    ws = tmp_path / "ws.yaml"
    ws.write_text(yaml.safe_dump({"datastores": {"data": remote.entry(KEY_ENV)}}))
    monkeypatch.setenv("MOUNTD_WORKSPACE", str(ws))
    monkeypatch.setenv(KEY_ENV, KEY)
    return remote


@pytest.fixture
def rw_mount(tmp_path, mountd_cli):
    """rw_mount(*flags) -> mountpoint of a read-write mount of `data`."""
    made = []

    def do(*flags, work_dir=None):
        mp = tmp_path / f"rw{len(made)}"
        mp.mkdir()
        work = work_dir or tmp_path / "work"
        r = mountd_cli("mount", "data", mp, "--read-write", "--work-dir", work, "--cache-dir", tmp_path / "cache",
                       "--block-size", "1MiB", *flags)
        assert r.code == 0, r
        assert "read-write" in r.out
        made.append(mp)
        return mp

    yield do
    for mp in made:
        if mounts.is_mounted(str(mp)):
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)


def unmount(mountd_cli, mp):
    r = mountd_cli("unmount", mp)
    assert r.code == 0, r


def test_files_written_reach_storage_on_close(storage, rw_mount, mountd_cli):
    mp = rw_mount()
    sizes = {"empty.bin": 0, "small.txt": 11, "one-block.bin": MiB, "odd.bin": 3 * MiB + 17,
             "nested/deeper/x.bin": 5000, "large.bin": 40 * MiB + 3}  # large: block upload
    data = {name: os.urandom(n) for name, n in sizes.items()}
    os.makedirs(mp / "nested" / "deeper")
    for name, body in data.items():
        with open(mp / name, "wb") as f:
            for i in range(0, len(body), 300_000):  # many writes, crossing blocks
                f.write(body[i:i + 300_000])
        assert storage.files().get(name) == body, f"{name} not in storage after close"
    assert {k: len(v) for k, v in storage.files().items()} == sizes
    assert os.path.getsize(mp / "large.bin") == sizes["large.bin"]
    unmount(mountd_cli, mp)
    assert storage.files() == data


def test_append_random_write_and_truncate(storage, rw_mount, mountd_cli):
    base = os.urandom(2 * MiB + 5)
    storage.put("f.bin", base)
    storage.put("g.bin", b"0123456789")
    mp = rw_mount()
    model = bytearray(base)
    with open(mp / "f.bin", "ab") as f:
        f.write(b"tail")
    model += b"tail"
    assert storage.files()["f.bin"] == model
    with open(mp / "f.bin", "r+b") as f:  # random writes in an existing file
        for offset in (0, MiB - 2, 2 * MiB + 3, 100):
            f.seek(offset)
            f.write(b"XYZ")
            model[offset:offset + 3] = b"XYZ"
        f.seek(0)
        assert f.read() == model  # the handle reads its own writes
    assert storage.files()["f.bin"] == model
    os.truncate(mp / "g.bin", 4)
    assert storage.files()["g.bin"] == b"0123"
    os.truncate(mp / "g.bin", 6)  # grows with zeros
    assert storage.files()["g.bin"] == b"0123\0\0"
    with open(mp / "g.bin", "r+b") as f:
        f.truncate(1)
        f.write(b"!")  # position 0 after open: overwrites
    assert storage.files()["g.bin"] == b"!"
    with open(mp / "f.bin", "wb") as f:  # O_TRUNC
        f.write(b"new")
    unmount(mountd_cli, mp)
    assert storage.files() == {"f.bin": b"new", "g.bin": b"!"}


def test_rename_files_and_directories(storage, rw_mount, mountd_cli):
    tree = {"d/a.txt": b"a", "d/sub/b.txt": b"b" * 5000, "d/sub/deeper/c.txt": b"c", "other.txt": b"o",
            "target.txt": b"old target"}
    for name, body in tree.items():
        storage.put(name, body)
    mp = rw_mount()
    os.rename(mp / "other.txt", mp / "target.txt")  # replaces
    os.rename(mp / "d", mp / "e")
    os.mkdir(mp / "full")
    (mp / "full" / "x").write_bytes(b"x")
    with pytest.raises(OSError) as e:
        os.rename(mp / "e", mp / "full")
    assert e.value.errno == errno.ENOTEMPTY
    with pytest.raises(OSError) as e:
        os.rename(mp / "e", mp / "e" / "sub" / "inside")
    assert e.value.errno == errno.EINVAL
    os.mkdir(mp / "empty")
    os.rename(mp / "e" / "sub", mp / "empty" / "moved")
    assert sorted(os.listdir(mp / "e")) == ["a.txt"]
    assert (mp / "empty" / "moved" / "deeper" / "c.txt").read_bytes() == b"c"
    # a file written and renamed before it was ever closed goes up under its new name
    with open(mp / "draft.tmp", "wb") as f:
        f.write(b"draft")
        f.flush()
        os.rename(mp / "draft.tmp", mp / "final.bin")
        f.write(b" more")
    unmount(mountd_cli, mp)
    assert storage.files() == {"target.txt": b"o", "e/a.txt": b"a", "empty/moved/b.txt": b"b" * 5000,
                               "empty/moved/deeper/c.txt": b"c", "full/x": b"x", "final.bin": b"draft more"}


def test_unlink_mkdir_rmdir_and_empty_directories_persist(storage, rw_mount, mountd_cli):
    storage.put("keep/one.txt", b"1")
    storage.put("gone.txt", b"g")
    mp = rw_mount()
    os.unlink(mp / "gone.txt")
    assert "gone.txt" not in storage.files()
    with pytest.raises(FileNotFoundError):
        os.stat(mp / "gone.txt")
    os.makedirs(mp / "a" / "b" / "c")
    with pytest.raises(OSError) as e:
        os.rmdir(mp / "a")
    assert e.value.errno == errno.ENOTEMPTY
    with pytest.raises(OSError) as e:
        os.rmdir(mp / "keep")
    assert e.value.errno == errno.ENOTEMPTY
    with pytest.raises(FileExistsError):
        os.mkdir(mp / "keep")
    os.makedirs(mp / "x" / "y")
    os.rmdir(mp / "x" / "y")
    # an open file unlinked before close never reaches storage
    f = open(mp / "scratch.bin", "wb")
    f.write(b"scratch")
    os.unlink(mp / "scratch.bin")
    f.close()
    unmount(mountd_cli, mp)
    assert storage.files() == {"keep/one.txt": b"1"}
    assert {"a", "a/b", "a/b/c", "x"} <= storage.dirs()
    assert "x/y" not in storage.dirs()
    mp2 = rw_mount()
    assert os.listdir(mp2 / "a" / "b" / "c") == [] and os.listdir(mp2 / "x") == []


def test_reads_see_writes_of_other_handles_and_listing_shows_unclosed_files(storage, rw_mount):
    mp = rw_mount()
    w = open(mp / "live.txt", "wb")
    w.write(b"first")
    w.flush()
    assert "live.txt" in os.listdir(mp)
    assert os.path.getsize(mp / "live.txt") == 5
    assert (mp / "live.txt").read_bytes() == b"first"  # another handle, same mount
    assert "live.txt" not in storage.files()  # not closed yet: not in storage
    w.write(b" second")
    w.close()
    assert storage.files()["live.txt"] == b"first second"
    os.fsync(os.open(mp / "live.txt", os.O_RDONLY))


def test_many_small_files(storage, rw_mount, mountd_cli):
    mp = rw_mount()
    data = {f"many/f{i:03d}.bin": os.urandom(i * 37 % 4096) for i in range(200)}
    os.mkdir(mp / "many")
    for name, body in data.items():
        (mp / name).write_bytes(body)
    assert len(os.listdir(mp / "many")) == 200
    unmount(mountd_cli, mp)
    assert storage.files() == data


def test_what_storage_cannot_do_fails_clearly(storage, rw_mount):
    mp = rw_mount()
    (mp / "f").write_bytes(b"f")
    with pytest.raises(OSError) as e:
        os.symlink("f", mp / "link")
    assert e.value.errno == errno.ENOTSUP
    with pytest.raises(OSError) as e:
        os.link(mp / "f", mp / "hard")
    assert e.value.errno == errno.ENOTSUP
    os.chmod(mp / "f", 0o600)  # accepted, no effect: permissions are the mount's
    assert os.stat(mp / "f").st_mode & 0o777 == 0o644
    with pytest.raises(PermissionError):
        os.chown(mp / "f", 12345, 12345)
    os.utime(mp / "f")  # touch works


def test_upload_failure_gives_eio_keeps_data_and_resume_finishes(azurite, container, blob_datastore, tmp_path,
        rw_mount, mountd_cli):
    work = tmp_path / "work"
    mp = rw_mount(work_dir=work)
    body = os.urandom(3 * MiB)
    service = azurite.blob_service()
    f = open(mp / "out.bin", "wb")
    f.write(body)
    container.delete_container()  # storage refuses every upload from now on
    with pytest.raises(OSError) as e:
        f.close()
    assert e.value.errno == errno.EIO
    pending = list((work / "journal").glob("*.json"))
    assert len(pending) == 1
    job = json.loads(pending[0].read_text())
    staged = job["files"][0][0]
    assert open(staged, "rb").read() == body and job["files"][0][1] == "out.bin"
    assert KEY not in pending[0].read_text()
    log = open(runtime.log_path(str(mp))).read()
    assert "upload of out.bin failed" in log
    r = mountd_cli("unmount", mp)  # the unmount retries and fails too; the data stays
    assert r.code == 3 and "not uploaded: out.bin" in r.out, r
    assert os.path.exists(staged)
    r = mountd_cli("resume", "--work-dir", work, "--no-progress")
    assert r.code == 3, r
    assert "out.bin" in r.out or "out.bin" in r.err
    service.create_container(container.container_name)
    r = mountd_cli("resume", "--work-dir", work, "--no-progress")
    assert r.code == 0, r
    assert "1 finished" in r.out
    assert container.download_blob("out.bin").readall() == body
    assert not os.path.exists(staged) and not list((work / "journal").glob("*.json"))


def test_kill_9_during_flush_then_resume_uploads_the_closed_file(azurite, container, blob_datastore, tmp_path,
        rw_mount, mountd_cli):
    work = tmp_path / "work"
    mp = rw_mount(work_dir=work)
    pid = runtime.read_record(str(mp))["pid"]
    body = os.urandom(96 * MiB)
    f = open(mp / "checkpoint.bin", "wb")
    f.write(body)
    closer = threading.Thread(target=lambda: _close_quietly(f))
    closer.start()
    deadline = time.time() + 30
    while not list((work / "journal").glob("*.json")) and time.time() < deadline:
        time.sleep(0.005)
    assert list((work / "journal").glob("*.json")), "the flush never journaled its upload"
    os.kill(pid, signal.SIGKILL)  # the worker dies in the middle of the upload
    closer.join(30)
    subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)
    assert list((work / "journal").glob("*.json")), "the upload finished before the kill: nothing was tested"
    r = mountd_cli("resume", "--work-dir", work, "--no-progress")
    assert r.code == 0, r
    assert hashlib.md5(container.download_blob("checkpoint.bin").readall()).digest() == hashlib.md5(body).digest()
    assert not list((work / "journal").glob("*.json"))


def _close_quietly(f):
    try:
        f.close()
    except OSError:
        pass


def test_a_new_mount_of_the_work_dir_finishes_pending_uploads(azurite, container, blob_datastore, tmp_path,
        rw_mount, mountd_cli):
    work = tmp_path / "work"
    mp = rw_mount(work_dir=work)
    service = azurite.blob_service()
    f = open(mp / "late.txt", "wb")
    f.write(b"late")
    container.delete_container()
    with pytest.raises(OSError):
        f.close()
    assert mountd_cli("unmount", mp).code == 3  # late.txt is not uploaded
    service.create_container(container.container_name)
    rw_mount(work_dir=work)
    assert container.download_blob("late.txt").readall() == b"late"
    assert not list((work / "journal").glob("*.json"))


def test_read_only_mount_refuses_writes(storage, tmp_path, mountd_cli):
    storage.put("f", b"f")
    mp = tmp_path / "ro"
    mp.mkdir()
    r = mountd_cli("mount", "data", mp, "--cache-dir", tmp_path / "cache")
    assert r.code == 0, r
    try:
        for op in (lambda: open(mp / "f", "ab"), lambda: open(mp / "new", "wb"), lambda: os.mkdir(mp / "d"),
                   lambda: os.unlink(mp / "f"), lambda: os.rename(mp / "f", mp / "g")):
            with pytest.raises(OSError) as e:
                op()
            assert e.value.errno == errno.EROFS
    finally:
        mountd_cli("unmount", mp)


def test_work_dir_is_only_for_read_write_mounts(storage, tmp_path, mountd_cli):
    mp = tmp_path / "m"
    mp.mkdir()
    r = mountd_cli("mount", "data", mp, "--work-dir", tmp_path / "w")
    assert r.code == 2 and r.err.startswith("mountd: error: --work-dir is for --read-write")
    assert not mounts.is_mounted(str(mp)) and not (tmp_path / "w").exists()


def test_a_full_work_dir_disk_gives_the_writer_enospc(storage, rw_mount, tmp_path, mountd_cli):
    small = tmp_path / "small"
    small.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], capture_output=True, text=True)
    if r.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs: {r.stderr}")
        pytest.skip(f"cannot mount a tmpfs: {r.stderr}")
    try:
        mp = rw_mount(work_dir=small / "work")
        with pytest.raises(OSError) as e:
            with open(mp / "big.bin", "wb") as f:
                for _ in range(8):
                    f.write(os.urandom(MiB))
                    f.flush()
        assert e.value.errno == errno.ENOSPC
        # The kernel sends the release of a closed file after close() has
        # returned: the big copy is dropped then, not by the time close()
        # returns. Writing at once raced it (ENOSPC again, now and then).
        deadline = time.monotonic() + 10
        while os.statvfs(small).f_bavail * os.statvfs(small).f_frsize < MiB and time.monotonic() < deadline:
            time.sleep(0.05)
        (mp / "small.txt").write_bytes(b"x")  # once space is back (the big copy was dropped), writes work
        unmount(mountd_cli, mp)
        assert storage.files().get("small.txt") == b"x"
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)


def test_rename_noreplace_and_exchange(storage, rw_mount):
    import ctypes
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    at_fdcwd, noreplace, exchange = -100, 1, 2
    mp = rw_mount()
    (mp / "a").write_bytes(b"a")
    (mp / "b").write_bytes(b"b")

    def renameat2(old, new, flags):
        if libc.renameat2(at_fdcwd, str(old).encode(), at_fdcwd, str(new).encode(), flags) != 0:
            return ctypes.get_errno()
        return 0
    assert renameat2(mp / "a", mp / "b", noreplace) == errno.EEXIST
    assert renameat2(mp / "a", mp / "b", exchange) == errno.EINVAL
    assert renameat2(mp / "a", mp / "c", noreplace) == 0
    assert storage.files() == {"b": b"b", "c": b"a"}


def test_status_shows_what_a_read_write_mount_has_not_uploaded_yet(storage, rw_mount, mountd_cli):
    import sys
    mp = rw_mount()
    (mp / "done.bin").write_bytes(b"done")
    # A writer in a process of its own: a close of any copy of its descriptor
    # (as in a fork of this process) would upload it.
    writer = subprocess.Popen([sys.executable, "-c", "import sys; f = open(sys.argv[1], 'wb'); f.write(b'x');"
                               "f.flush(); print('ready', flush=True); sys.stdin.read()", str(mp / "open.bin")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "ready"
        r = mountd_cli("status", "--json")
        assert r.code == 0, r
        (m,) = [m for m in json.loads(r.out)["mounts"] if m["mountpoint"] == str(mp)]
        assert m["mode"] == "rw"
        assert m["writes"]["uploads"] == 1 and m["writes"]["pending_uploads"] == 1
        r = mountd_cli("status", "--prometheus")
        assert f'mountd_mount_pending_uploads{{mountpoint="{mp}"' in r.out
    finally:
        writer.communicate("", timeout=30)
    assert storage.files()["open.bin"] == b"x"


def test_a_read_write_mount_of_a_missing_directory_starts_empty(storage, tmp_path, mountd_cli):
    # Outputs usually do not exist yet: the mount is an empty directory, and
    # what is written there lands under the new path.
    storage.put("other.txt", b"o")
    mp = tmp_path / "out"
    mp.mkdir()
    r = mountd_cli("mount", "data:runs/7/outputs", mp, "--read-write", "--work-dir", tmp_path / "work",
                   "--cache-dir", tmp_path / "cache")
    assert r.code == 0, r
    try:
        assert os.listdir(mp) == []
        (mp / "model.bin").write_bytes(b"weights")
    finally:
        unmount(mountd_cli, mp)
    assert storage.files() == {"other.txt": b"o", "runs/7/outputs/model.bin": b"weights"}


def test_a_read_only_mount_of_a_missing_directory_is_a_usage_error(storage, tmp_path, mountd_cli):
    mp = tmp_path / "in"
    mp.mkdir()
    r = mountd_cli("mount", "data:no/such/dir", mp, "--cache-dir", tmp_path / "cache")
    assert r.code == 2 and r.err.strip().count("\n") == 0, r
    assert "no/such/dir does not exist in datastore data" in r.err and "internal error" not in r.err, r
    assert not mounts.is_mounted(str(mp))
