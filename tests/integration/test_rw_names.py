"""Read-write mounts over blob, file share and a local directory: names the
backend would refuse are refused when they appear (ENAMETOOLONG at create,
mkdir, rename), never at close; `statfs` tells the backend's own limit;
directories' times follow the names added and removed in them; inode
numbers survive a rename; what `mountd unmount` and `mountd resume` say
when files cannot be uploaded."""

import errno
import json
import os
import time

import pytest

from tests.integration.test_rw_mount import rw_mount, storage, unmount  # noqa: F401 - fixtures

pytestmark = [pytest.mark.fuse, pytest.mark.usefixtures("fuse_available")]


def component_limit(storage) -> int:
    """The longest name of one file the backend takes."""
    if storage.kind == "local":
        return os.statvfs(storage.root).f_namemax  # 255 on ext4
    return {"blob": 1024, "file": 255}[storage.kind]


def errno_of(fn) -> str:
    try:
        fn()
    except OSError as e:
        return errno.errorcode[e.errno]
    return "ok"


def test_statfs_tells_the_backends_name_limit(storage, rw_mount):
    mp = rw_mount()
    assert os.statvfs(mp).f_namemax == component_limit(storage)


def test_too_long_names_are_refused_when_they_appear(storage, rw_mount, mountd_cli):
    mp = rw_mount()
    limit = min(component_limit(storage), 1024)  # the kernel's own cap for FUSE names is 1024 bytes
    fits = "f" * (limit if storage.kind != "blob" else 200)
    with open(mp / fits, "wb") as f:  # at the limit: written and uploaded (close says 0)
        f.write(b"x")
    if storage.kind != "blob":  # blob's component limit is its whole-path limit, tried below
        long = "n" * (limit + 1)
        assert errno_of(lambda: open(mp / long, "wb")) == "ENAMETOOLONG"
        assert errno_of(lambda: os.mkdir(mp / long)) == "ENAMETOOLONG"
        assert errno_of(lambda: os.rename(mp / fits, mp / long)) == "ENAMETOOLONG"
        assert errno_of(lambda: os.stat(mp / long)) == "ENAMETOOLONG"
    # a whole path over the backend's limit (blob 1 024 characters, Files 2 048)
    if storage.kind in ("blob", "file"):
        whole = {"blob": 1024, "file": 2048}[storage.kind]
        parts = []
        while len("/".join(parts)) + 1 + 200 <= whole:
            parts.append("d" * 200)
        deep = mp.joinpath(*parts)
        os.makedirs(deep)  # up to the limit less one name: fine
        tail = "t" * (whole - len("/".join(parts)) - 1)  # exactly the limit
        with open(deep / tail, "wb") as f:
            f.write(b"y")
        assert errno_of(lambda: open(deep / (tail + "u"), "wb")) == "ENAMETOOLONG"
        assert errno_of(lambda: os.mkdir(deep / (tail + "u"))) == "ENAMETOOLONG"
        assert errno_of(lambda: os.rename(mp / fits, deep / (tail + "u"))) == "ENAMETOOLONG"
        assert storage.files()["/".join(parts + [tail])] == b"y"
    unmount(mountd_cli, mp)
    assert storage.files()[fits] == b"x"


def test_directory_times_follow_its_names(storage, rw_mount):
    mp = rw_mount()
    os.mkdir(mp / "d")
    os.mkdir(mp / "e")

    def changed(directory, op) -> None:
        before = os.stat(directory)
        time.sleep(0.01)
        op()
        after = os.stat(directory)
        assert after.st_mtime_ns > before.st_mtime_ns, op
        assert after.st_ctime_ns > before.st_ctime_ns, op

    def create():
        with open(mp / "d" / "f", "wb") as f:
            f.write(b"1")
    changed(mp / "d", create)
    changed(mp / "d", lambda: os.mkdir(mp / "d" / "sub"))
    changed(mp / "d", lambda: os.rmdir(mp / "d" / "sub"))
    changed(mp / "e", lambda: os.rename(mp / "d" / "f", mp / "e" / "g"))  # the target's directory...
    with open(mp / "d" / "h", "wb"):
        pass
    changed(mp / "d", lambda: os.rename(mp / "d" / "h", mp / "e" / "h"))  # ...and the source's
    changed(mp / "e", lambda: os.unlink(mp / "e" / "g"))
    changed(mp, lambda: os.mkdir(mp / "top"))


def test_inode_numbers_survive_a_rename(storage, rw_mount):
    mp = rw_mount()
    os.mkdir(mp / "d")
    with open(mp / "d" / "f", "wb") as f:
        f.write(b"data")
    ino = os.stat(mp / "d" / "f").st_ino
    os.rename(mp / "d" / "f", mp / "d" / "g")
    assert os.stat(mp / "d" / "g").st_ino == ino
    dir_ino = os.stat(mp / "d").st_ino
    os.rename(mp / "d", mp / "e")
    assert os.stat(mp / "e").st_ino == dir_ino
    assert os.stat(mp / "e" / "g").st_ino == ino


# Uploads fail here because a local datastore's directory is replaced by a
# file behind the mount; what the journal, unmount and resume do with the
# failure is the same on every backend.
@pytest.mark.parametrize("storage", ["local"], indirect=True)
def test_unmount_names_the_files_it_could_not_upload_and_exits_3(storage, rw_mount, mountd_cli, tmp_path):
    work = tmp_path / "work"
    mp = rw_mount(work_dir=work)
    os.mkdir(mp / "d")
    os.rmdir(storage.root / "d")  # behind the mount: a file where the directory was
    (storage.root / "d").write_bytes(b"in the way")
    f = open(mp / "d" / "out.txt", "wb")  # the mount still knows d as a directory
    f.write(b"data")
    with pytest.raises(OSError) as e:
        f.close()
    assert e.value.errno == errno.EIO
    r = mountd_cli("unmount", mp)
    assert r.code == 3, r
    assert "not uploaded: d/out.txt" in r.out
    assert r.err.startswith("mountd: error: 1 file(s) written through the mount could not be uploaded")


@pytest.mark.parametrize("storage", ["local"], indirect=True)
def test_a_job_whose_local_file_is_gone_is_dropped_with_one_warning(storage, rw_mount, mountd_cli, tmp_path):
    work = tmp_path / "work"
    mp = rw_mount(work_dir=work)
    os.mkdir(mp / "d")
    os.rmdir(storage.root / "d")
    (storage.root / "d").write_bytes(b"in the way")
    for name in ("kept.txt", "deleted.txt"):
        f = open(mp / "d" / name, "wb")
        f.write(b"data")
        with pytest.raises(OSError):
            f.close()
    os.unlink(mp / "d" / "deleted.txt")  # deleted through the mount: nothing is left to upload
    assert mountd_cli("unmount", mp).code == 3
    jobs = [json.loads(p.read_text()) for p in (work / "journal").glob("*.json")]
    assert [job["files"][0][1] for job in jobs] == ["d/kept.txt"]
    os.unlink(jobs[0]["files"][0][0])  # the staged copy is lost (a wiped disk)
    r = mountd_cli("resume", "--work-dir", work, "--no-progress")
    assert r.code == 3, r  # data is lost: this resume says so, once
    (warning,) = [line for line in r.err.splitlines() if "local copy is gone" in line]
    assert "d/kept.txt" in warning
    assert "1 dropped" in r.out
    assert not list((work / "journal").glob("*.json"))
    r = mountd_cli("resume", "--work-dir", work, "--no-progress")
    assert r.code == 0 and "no pending uploads" in r.out, r  # and only once
