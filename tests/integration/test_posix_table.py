"""A POSIX conformance table of our own, case by case after the groups of
pjdfstest this project's users meet (open, truncate, ftruncate, unlink,
mkdir, rmdir, rename): the errno each misuse gets, and what a success
changes. Every case runs on a read-write mount of blob, file share and a
local directory; a case the README documents as object-store semantics is
listed in DOCUMENTED as a strict expected failure on that backend, so it
fails the suite the day it starts passing, and any other failure fails it.
(The real pjdfstest is run by hand: README, "what is tested".)"""

import errno
import importlib
import os
import subprocess
import sys
import time
import uuid

import pytest
import yaml

from tests.conftest import KEY, KEY_ENV
from tests.support.azurite import SDK_API_VERSION
from tests.support.remotes import BlobRemote, ShareRemote

pytestmark = [pytest.mark.fuse, pytest.mark.usefixtures("fuse_available")]

NAME_MAX = {"blob": 1024, "file": 255}  # local: the filesystem's own (statvfs)
BACKENDS = ["blob", "file", "local"]
# kind: (its server's fixture, the SDK module and client of a container or share, the test's view of it)
REMOTES = {"blob": ("azurite", "azure.storage.blob", "ContainerClient", BlobRemote),
           "file": ("fileshare", "azure.storage.fileshare", "ShareClient", ShareRemote)}


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request, tmp_path_factory, fuse_available):
    """(kind, mountpoint) of a read-write mount shared by the module's cases
    on that backend; each case works in a directory of its own."""
    kind = request.param
    base = tmp_path_factory.mktemp(f"posix-{kind}")
    cleanup = None
    if kind in REMOTES:
        server, module, client_class, remote_class = REMOTES[kind]
        emulator = request.getfixturevalue(server)
        client = getattr(importlib.import_module(module), client_class).from_connection_string(
            emulator.connection_string, f"p{uuid.uuid4().hex[:16]}", api_version=SDK_API_VERSION)
        remote = remote_class(emulator, client)
        remote.create()
        entry, cleanup = remote.entry(KEY_ENV), remote.delete
    else:
        (base / "root").mkdir()
        entry = {"type": "local", "root": str(base / "root")}
    ws = base / "ws.yaml"
    ws.write_text(yaml.safe_dump({"datastores": {"data": entry}}))
    mp = base / "mnt"
    mp.mkdir()
    env = dict(os.environ, MOUNTD_WORKSPACE=str(ws), **{KEY_ENV: KEY})
    r = subprocess.run([sys.executable, "-m", "mountd", "mount", "data", str(mp), "--read-write", "--work-dir",
                        str(base / "work"), "--cache-dir", str(base / "cache")], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0, r.stderr
    yield kind, mp
    subprocess.run([sys.executable, "-m", "mountd", "unmount", str(mp)], capture_output=True, env=env)
    if cleanup:
        cleanup()


def fails(name: str, fn, *args) -> None:
    """`fn(*args)` fails with errno `name`."""
    try:
        fn(*args)
    except OSError as e:
        assert errno.errorcode.get(e.errno) == name, f"{fn.__name__}{args}: {errno.errorcode.get(e.errno)}, " \
                                                     f"not {name}"
        return
    raise AssertionError(f"{fn.__name__}{args} succeeded; expected {name}")


def write(path, data: bytes = b"data") -> None:
    with open(path, "wb") as f:
        f.write(data)


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def too_long(d, kind: str) -> str:
    limit = NAME_MAX.get(kind) or os.statvfs(d).f_namemax
    return str(d / ("x" * (limit + 1)))


def tick(kind: str) -> None:
    """Wait until a file's time stamped by storage can differ: Azure keeps
    whole seconds (Last-Modified); a directory's or a local file's ns."""
    time.sleep(1.05 if kind in ("blob", "file") else 0.01)


def stamps_move(path, op, kind: str = "local") -> None:
    """`op()` moves the mtime and ctime of `path` on."""
    before = os.stat(path)
    tick(kind)
    op()
    after = os.stat(path)
    assert after.st_mtime_ns > before.st_mtime_ns and after.st_ctime_ns > before.st_ctime_ns


# -- the cases: each takes its own empty directory and the backend's kind ----------------------------------------
def open_missing(d, kind):
    fails("ENOENT", os.open, d / "none", os.O_RDONLY)
    fails("ENOENT", os.open, d / "none" / "f", os.O_WRONLY | os.O_CREAT)


def open_excl_existing(d, kind):
    write(d / "f")
    fails("EEXIST", os.open, d / "f", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    os.mkdir(d / "s")
    fails("EEXIST", os.open, d / "s", os.O_WRONLY | os.O_CREAT | os.O_EXCL)


def open_through_a_file(d, kind):
    write(d / "f")
    fails("ENOTDIR", os.open, d / "f" / "g", os.O_WRONLY | os.O_CREAT)
    fails("ENOTDIR", os.open, d / "f" / "g", os.O_RDONLY)


def open_directory_for_writing(d, kind):
    os.mkdir(d / "s")
    fails("EISDIR", os.open, d / "s", os.O_WRONLY)
    fails("EISDIR", os.open, d / "s", os.O_RDWR)


def open_name_too_long(d, kind):
    fails("ENAMETOOLONG", os.open, too_long(d, kind), os.O_WRONLY | os.O_CREAT)


def open_creates_empty_file_and_stamps_parent(d, kind):
    def create():
        os.close(os.open(d / "f", os.O_WRONLY | os.O_CREAT, 0o644))
    stamps_move(d, create)
    assert os.stat(d / "f").st_size == 0 and read(d / "f") == b""


def open_trunc_empties(d, kind):
    write(d / "f", b"0123456789")
    os.close(os.open(d / "f", os.O_WRONLY | os.O_TRUNC))
    assert os.stat(d / "f").st_size == 0


def truncate_errors(d, kind):
    fails("ENOENT", os.truncate, d / "none", 0)
    os.mkdir(d / "s")
    fails("EISDIR", os.truncate, d / "s", 0)
    write(d / "f")
    fails("EINVAL", os.truncate, d / "f", -1)
    fails("ENOTDIR", os.truncate, d / "f" / "g", 0)
    fails("ENAMETOOLONG", os.truncate, too_long(d, kind), 0)


def truncate_grows_and_shrinks(d, kind):
    write(d / "f", b"0123456789")
    os.truncate(d / "f", 4)
    assert read(d / "f") == b"0123"
    os.truncate(d / "f", 8)
    assert read(d / "f") == b"0123\0\0\0\0"


def truncate_stamps_file(d, kind):
    write(d / "f", b"0123456789")
    stamps_move(d / "f", lambda: os.truncate(d / "f", 3), kind)


def ftruncate_errors(d, kind):
    write(d / "f")
    fd = os.open(d / "f", os.O_RDONLY)
    try:
        fails("EINVAL", os.ftruncate, fd, 0)  # Linux: not open for writing
    finally:
        os.close(fd)
    fd = os.open(d / "f", os.O_RDWR)
    try:
        fails("EINVAL", os.ftruncate, fd, -1)
        os.ftruncate(fd, 2)
        assert os.fstat(fd).st_size == 2
    finally:
        os.close(fd)
    assert read(d / "f") == b"da"


def unlink_errors(d, kind):
    fails("ENOENT", os.unlink, d / "none")
    os.mkdir(d / "s")
    fails("EISDIR", os.unlink, d / "s")
    write(d / "f")
    fails("ENOTDIR", os.unlink, d / "f" / "g")
    fails("ENAMETOOLONG", os.unlink, too_long(d, kind))


def unlink_removes_and_stamps_parent(d, kind):
    write(d / "f")
    stamps_move(d, lambda: os.unlink(d / "f"))
    assert not os.path.exists(d / "f") and os.listdir(d) == []


def mkdir_errors(d, kind):
    write(d / "f")
    os.mkdir(d / "s")
    fails("EEXIST", os.mkdir, d / "f")
    fails("EEXIST", os.mkdir, d / "s")
    fails("ENOENT", os.mkdir, d / "none" / "s")
    fails("ENOTDIR", os.mkdir, d / "f" / "s")
    fails("ENAMETOOLONG", os.mkdir, too_long(d, kind))


def mkdir_makes_empty_dir_and_stamps_parent(d, kind):
    stamps_move(d, lambda: os.mkdir(d / "s"))
    st = os.stat(d / "s")
    assert os.listdir(d / "s") == [] and st.st_nlink == 2


def directory_links_count_subdirectories(d, kind):
    os.makedirs(d / "s" / "a")
    os.mkdir(d / "s" / "b")
    write(d / "s" / "f")
    assert os.stat(d / "s").st_nlink == 4  # 2 + a and b
    os.rmdir(d / "s" / "a")
    assert os.stat(d / "s").st_nlink == 3


def rmdir_errors(d, kind):
    fails("ENOENT", os.rmdir, d / "none")
    write(d / "f")
    fails("ENOTDIR", os.rmdir, d / "f")
    os.makedirs(d / "s" / "t")
    fails("ENOTEMPTY", os.rmdir, d / "s")
    write(d / "s" / "t" / "g")
    fails("ENOTEMPTY", os.rmdir, d / "s" / "t")
    fails("EINVAL", os.rmdir, f"{d}/s/.")  # (pathlib would drop the ".")
    fails("ENAMETOOLONG", os.rmdir, too_long(d, kind))


def rmdir_removes_and_stamps_parent(d, kind):
    os.mkdir(d / "s")
    stamps_move(d, lambda: os.rmdir(d / "s"))
    assert os.listdir(d) == []


def rename_errors(d, kind):
    fails("ENOENT", os.rename, d / "none", d / "other")
    os.makedirs(d / "s" / "t")
    fails("EINVAL", os.rename, d / "s", d / "s" / "t" / "u")  # into its own subdirectory
    write(d / "f")
    fails("ENOTDIR", os.rename, d / "s", d / "f")  # a directory onto a file
    os.mkdir(d / "e")
    fails("EISDIR", os.rename, d / "f", d / "e")  # a file onto a directory
    fails("ENOTEMPTY", os.rename, d / "e", d / "s")  # onto a directory that is not empty
    fails("ENAMETOOLONG", os.rename, d / "f", too_long(d, kind))
    fails("ENOTDIR", os.rename, d / "f" / "x", d / "g")


def rename_file_replaces_target(d, kind):
    write(d / "a", b"new")
    write(d / "b", b"old")
    os.rename(d / "a", d / "b")
    assert read(d / "b") == b"new" and sorted(os.listdir(d)) == ["b"]


def rename_dir_replaces_empty_dir(d, kind):
    os.mkdir(d / "a")
    write(d / "a" / "f", b"inside")
    os.mkdir(d / "b")
    os.rename(d / "a", d / "b")
    assert read(d / "b" / "f") == b"inside" and sorted(os.listdir(d)) == ["b"]


def rename_to_itself_changes_nothing(d, kind):
    write(d / "a", b"same")
    os.rename(d / "a", d / "a")
    assert read(d / "a") == b"same"


def rename_keeps_inode_and_stamps_both_parents(d, kind):
    os.mkdir(d / "x")
    os.mkdir(d / "y")
    write(d / "x" / "f")
    ino = os.stat(d / "x" / "f").st_ino
    stamps_move(d / "x", lambda: os.rename(d / "x" / "f", d / "y" / "f"))
    assert os.stat(d / "y" / "f").st_ino == ino
    write(d / "y" / "g")
    stamps_move(d / "y", lambda: os.rename(d / "y" / "g", d / "x" / "g"))


def rename_stamps_ctime_of_renamed_file(d, kind):
    write(d / "a")
    before = os.stat(d / "a").st_ctime_ns
    tick(kind)
    os.rename(d / "a", d / "b")
    assert os.stat(d / "b").st_ctime_ns > before


def rename_keeps_mtime_of_renamed_file(d, kind):
    write(d / "a")
    before = os.stat(d / "a").st_mtime_ns
    tick(kind)
    os.rename(d / "a", d / "b")
    assert os.stat(d / "b").st_mtime_ns == before


CASES = [open_missing, open_excl_existing, open_through_a_file, open_directory_for_writing, open_name_too_long,
         open_creates_empty_file_and_stamps_parent, open_trunc_empties, truncate_errors, truncate_grows_and_shrinks,
         truncate_stamps_file, ftruncate_errors, unlink_errors, unlink_removes_and_stamps_parent, mkdir_errors,
         mkdir_makes_empty_dir_and_stamps_parent, directory_links_count_subdirectories, rmdir_errors,
         rmdir_removes_and_stamps_parent, rename_errors, rename_file_replaces_target, rename_dir_replaces_empty_dir,
         rename_to_itself_changes_nothing,
         rename_keeps_inode_and_stamps_both_parents, rename_stamps_ctime_of_renamed_file,
         rename_keeps_mtime_of_renamed_file]

# What the README's POSIX table documents as object-store semantics, by case
# and backend: expected to fail (strictly: a pass means the README is out of
# date).
DOCUMENTED = {
    # storage keeps one time per file: ctime is the modification time, which
    # a local rename leaves as it is...
    ("rename_stamps_ctime_of_renamed_file", "local"): "a file's ctime is its modification time",
    # ...and Azure stamps anew (blob: a copy is a new object; Files: its rename)
    ("rename_keeps_mtime_of_renamed_file", "blob"): "a rename on blob is a copy, stamped when it is made",
    ("rename_keeps_mtime_of_renamed_file", "file"): "the File service stamps a renamed file",
    # counting a directory's subdirectories would cost a listing per stat
    ("directory_links_count_subdirectories", "blob"): "directories have 2 links",
    ("directory_links_count_subdirectories", "file"): "directories have 2 links",
}


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_posix_case(backend, case, request):
    kind, mp = backend
    reason = DOCUMENTED.get((case.__name__, kind))
    if reason:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))
    d = mp / f"{case.__name__}-{uuid.uuid4().hex[:6]}"
    os.mkdir(d)
    case(d, kind)
