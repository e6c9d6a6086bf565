"""The write path of the filesystem core driven directly, with no mount, over
a local datastore: staged copies, upload on flush, journal, errnos."""

import errno
import json
import os

import pytest

from mountd.cache.blocks import BlockCache
from mountd.config.settings import CacheSettings
from mountd.errors import MountdError
from mountd.fs.core import FileSystemCore, FsError
from mountd.fs.writeback import WriteBack
from mountd.storage.local import LocalStore


@pytest.fixture
def world(tmp_path):
    root = tmp_path / "root"
    (root / "dir").mkdir(parents=True)
    (root / "dir" / "old.txt").write_bytes(b"old content")
    cfg = CacheSettings(block_size=64 * 1024, memory=1024 * 1024, disk=False)
    store = LocalStore(str(root))
    wb = WriteBack(store, str(tmp_path / "work"), {"name": "t", "type": "local", "root": str(root)}, "mount t")
    core = FileSystemCore(store, cfg, BlockCache(cfg.memory, None, cfg.threads), read_only=False, writeback=wb)
    yield core, root, tmp_path / "work"
    core.close()


def errno_of(fn):
    with pytest.raises(OSError) as e:
        fn()
    return e.value.errno


def test_a_new_file_is_seen_at_once_and_stored_at_flush(world):
    core, root, work = world
    fh = core.create("/dir/new.bin", os.O_WRONLY | os.O_CREAT)
    assert core.write(fh, b"abc", 0) == 3
    assert core.getattr("/dir/new.bin")["st_size"] == 3
    assert "new.bin" in [n for n, _ in core.readdir("/dir")]
    assert not (root / "dir" / "new.bin").exists()
    core.flush(fh)
    assert (root / "dir" / "new.bin").read_bytes() == b"abc"
    assert not list((work / "journal").glob("*.json"))  # confirmed, forgotten
    core.release(fh)
    assert os.listdir(work / "staged") == [".lock"]  # the copy goes with the last handle


def test_open_for_writing_fills_the_copy_and_flush_of_an_unchanged_file_uploads_nothing(world):
    core, root, _ = world
    fh = core.open("/dir/old.txt", os.O_RDWR)[0]
    assert core.read(fh, 100, 0) == b"old content"
    before = os.stat(root / "dir" / "old.txt").st_mtime_ns
    core.flush(fh)
    assert os.stat(root / "dir" / "old.txt").st_mtime_ns == before
    core.write(fh, b"NEW", 0)
    core.flush(fh)
    core.release(fh)
    assert (root / "dir" / "old.txt").read_bytes() == b"NEW content"


def test_o_excl_create_of_an_existing_file_fails(world):
    core, _, _ = world
    assert errno_of(lambda: core.create("/dir/old.txt", os.O_WRONLY | os.O_CREAT | os.O_EXCL)) == errno.EEXIST


def test_errnos(world):
    core, root, _ = world
    assert errno_of(lambda: core.create("/missing/x", os.O_WRONLY | os.O_CREAT)) == errno.ENOENT
    assert errno_of(lambda: core.create("/dir/old.txt/x", os.O_WRONLY | os.O_CREAT)) == errno.ENOTDIR
    assert errno_of(lambda: core.open("/dir", os.O_WRONLY)) == errno.EISDIR
    assert errno_of(lambda: core.mkdir("/dir")) == errno.EEXIST
    assert errno_of(lambda: core.rmdir("/dir")) == errno.ENOTEMPTY
    assert errno_of(lambda: core.rmdir("/dir/old.txt")) == errno.ENOTDIR
    assert errno_of(lambda: core.unlink("/dir")) == errno.EISDIR
    assert errno_of(lambda: core.unlink("/nope")) == errno.ENOENT
    assert errno_of(lambda: core.rename("/dir", "/dir/inside")) == errno.EINVAL
    assert errno_of(lambda: core.rename("/nope", "/x")) == errno.ENOENT
    core.mkdir("/d2")
    assert errno_of(lambda: core.rename("/dir/old.txt", "/d2")) == errno.EISDIR
    assert errno_of(lambda: core.rename("/d2", "/dir/old.txt")) == errno.ENOTDIR
    assert errno_of(lambda: core.chown("/dir/old.txt", 4242, -1)) == errno.EPERM
    assert errno_of(lambda: core.rmdir("/")) == errno.EBUSY
    assert (root / "dir" / "old.txt").read_bytes() == b"old content"


def test_read_only_core_refuses_every_change(tmp_path):
    cfg = CacheSettings(block_size=64 * 1024, memory=1024 * 1024, disk=False)
    (tmp_path / "f").write_bytes(b"f")
    core = FileSystemCore(LocalStore(str(tmp_path)), cfg, BlockCache(cfg.memory, None, cfg.threads))
    for fn in (lambda: core.create("/n", os.O_WRONLY), lambda: core.open("/f", os.O_RDWR),
               lambda: core.mkdir("/d"), lambda: core.unlink("/f"), lambda: core.rename("/f", "/g"),
               lambda: core.truncate("/f", 0), lambda: core.chmod("/f", 0o600)):
        assert errno_of(fn) == errno.EROFS
    with pytest.raises(ValueError):
        FileSystemCore(LocalStore(str(tmp_path)), cfg, BlockCache(cfg.memory, None, cfg.threads), read_only=False)


def test_failed_upload_gives_eio_and_keeps_copy_and_job_for_the_next_try(world, monkeypatch):
    core, root, work = world
    fh = core.create("/dir/out.bin", os.O_WRONLY | os.O_CREAT)
    core.write(fh, b"precious", 0)

    def refuse(*a, **k):
        raise MountdError("storage said no")
    monkeypatch.setattr(core.store, "write_file", refuse)
    assert errno_of(lambda: core.flush(fh)) == errno.EIO
    (job_file,) = (work / "journal").glob("*.json")
    job = json.loads(job_file.read_text())
    assert job["staged"] and job["files"][0][1] == "dir/out.bin"
    assert open(job["files"][0][0], "rb").read() == b"precious"
    core.release(fh)  # the last handle goes; the copy must not
    assert os.path.exists(job["files"][0][0])
    assert errno_of(lambda: core.flush(fh)) == errno.EBADF
    monkeypatch.undo()
    assert core.writeback.close() == 0  # unmount: tries again, with the same job
    assert (root / "dir" / "out.bin").read_bytes() == b"precious"
    assert not list((work / "journal").glob("*.json"))


def test_a_second_writeback_on_the_same_work_dir_is_refused(world):
    core, root, work = world
    with pytest.raises(MountdError, match="in use by another read-write mount"):
        WriteBack(core.store, str(work), {}, "again")


def test_write_errors_reach_the_writer_with_their_errno(world, monkeypatch):
    core, _, _ = world
    fh = core.create("/full.bin", os.O_WRONLY | os.O_CREAT)

    def no_space(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "pwrite", no_space)
    assert errno_of(lambda: core.write(fh, b"x" * 10, 0)) == errno.ENOSPC


def test_fserror_is_an_oserror_with_its_errno():
    assert isinstance(FsError(errno.EIO), OSError) and FsError(errno.EIO).errno == errno.EIO


def test_a_borrowed_copy_outlives_its_last_handle(world):
    """A stat or listing that looked the copy up keeps its descriptor open
    while it reads it, even if the last handle is released meanwhile; the
    copy goes when the borrower lets go."""
    core, _, work = world
    fh = core.create("/dir/b.bin", os.O_WRONLY | os.O_CREAT)
    core.write(fh, b"12345", 0)
    core.flush(fh)
    with core.writeback.borrow("dir/b.bin") as sf:
        core.release(fh)  # the last handle, while a stat is using the copy
        assert os.fstat(sf.fd).st_size == 5
        assert core.writeback.get("dir/b.bin") is None  # no longer found by path
    assert sf.closed
    assert errno_of(lambda: os.fstat(sf.fd)) == errno.EBADF
    assert os.listdir(work / "staged") == [".lock"]
    assert core.getattr("/dir/b.bin")["st_size"] == 5  # storage's, as uploaded


def test_an_open_file_unlinked_keeps_its_bytes_under_a_private_name(world):
    core, root, work = world
    reader = core.open("/dir/old.txt", os.O_RDONLY)[0]
    writer = core.create("/dir/new.bin", os.O_WRONLY | os.O_CREAT)
    core.write(writer, b"unfinished", 0)
    core.unlink("/dir/old.txt", keep_as="/dir/.kept1")
    core.unlink("/dir/new.bin", keep_as="/dir/.kept2")
    assert not (root / "dir" / "old.txt").exists()
    assert core.read(reader, 100, 0) == b"old content"  # a copy of the version it opened
    assert core.getattr("/dir/.kept1")["st_size"] == 11
    core.write(writer, b" more", 10)
    core.truncate("/dir/.kept2", 12)
    assert core.getattr("/dir/.kept2")["st_size"] == 12
    assert [n for n, _ in core.readdir("/dir")] == []  # neither the names nor the private ones
    core.flush(writer)  # nothing to upload: the file is gone
    core.release(writer)
    core.release(reader)
    core.unlink("/dir/.kept1")  # the private names go without storage
    core.unlink("/dir/.kept2")
    core.rmdir("/dir")
    assert os.listdir(root) == []
    assert os.listdir(work / "staged") == [".lock"]
    assert not list((work / "journal").glob("*.json"))
