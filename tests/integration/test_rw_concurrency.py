"""Read-write mounts under concurrency, through real FUSE over blob, the file
share emulator and a local datastore: what callers are told at the moment
they act is right. Writers that create, write, close, then stat and read back
see their own sizes and bytes while another thread lists the directory; the
listing shows every closed file at once (so `rm -rf` right after succeeds);
files open when unlinked or renamed keep their bytes (POSIX), and nothing
hidden is ever left in storage."""

import errno
import os
import random
import shutil
import subprocess
import threading
import time

import pytest

from tests.integration.test_rw_mount import rw_mount, storage, unmount  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.fuse, pytest.mark.usefixtures("fuse_available")]

MiB = 1024 * 1024
HIDDEN = ".fuse_hidden"


class Lister(threading.Thread):
    """Lists a directory and stats what it finds, in a loop, until stopped;
    keeps the errors other than a name gone between listing and stat."""

    def __init__(self, directory):
        super().__init__(daemon=True)
        self.directory, self.errors, self.stop, self.rounds = directory, [], threading.Event(), 0

    def run(self):
        while not self.stop.is_set():
            try:
                for name in os.listdir(self.directory):
                    try:
                        os.stat(os.path.join(self.directory, name))
                    except FileNotFoundError:
                        pass
            except OSError as e:
                self.errors.append(f"listing: {e!r}")
            self.rounds += 1

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.join(30)


def write_and_check(directory, tag: int, rounds: int, errors: list, written: dict):
    """create, write, close, then stat and read back: the sizes and bytes written."""
    rng = random.Random(tag)
    for i in range(rounds):
        name = f"w{tag}-{i:03d}.bin"
        path = os.path.join(directory, name)
        body = rng.randbytes(rng.randrange(1, 9000))
        try:
            with open(path, "wb") as f:
                f.write(body)
            size = os.stat(path).st_size
            with open(path, "rb") as f:
                back = f.read()
        except OSError as e:
            errors.append(f"{name}: {e!r}")
            continue
        if size != len(body) or back != body:
            errors.append(f"{name}: wrote {len(body)} bytes, stat said {size}, read {len(back)}"
                          f"{'' if back == body[:len(back)] else ' (different bytes)'}")
        written[name] = body


def test_writers_and_a_lister_see_what_was_written_and_rm_rf_succeeds_at_once(storage, rw_mount,  # noqa: F811
                                                                              mountd_cli):
    mp = rw_mount()
    work = mp / "out"
    work.mkdir()
    errors, written = [], {}
    with Lister(work) as lister:
        writers = [threading.Thread(target=write_and_check, args=(work, t, 25, errors, written)) for t in range(4)]
        for w in writers:
            w.start()
        for w in writers:
            w.join(120)
    assert not errors, errors[:10]
    assert not lister.errors, lister.errors[:10]
    assert lister.rounds > 1
    # every closed file is listed at once, and the directory can be removed at once
    assert set(os.listdir(work)) == set(written)
    r = subprocess.run(["rm", "-rf", str(work)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not work.exists()
    unmount(mountd_cli, mp)
    assert not storage.files("out")


def test_copytree_into_the_mount_while_listed(storage, rw_mount, tmp_path, mountd_cli):  # noqa: F811
    src = tmp_path / "tree"
    rng = random.Random(7)
    tree = {}
    for i in range(200):
        rel = f"d{i % 6}/s{i % 4}/f{i:03d}.dat"
        tree[rel] = rng.randbytes(rng.randrange(0, 5000))
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(tree[rel])
    mp = rw_mount()
    (mp / "copy").mkdir()
    (mp / "copy" / "d0").mkdir()  # listed while the copy fills it
    with Lister(mp / "copy" / "d0") as lister:
        shutil.copytree(src, mp / "copy", dirs_exist_ok=True)
    assert not lister.errors, lister.errors[:10]
    seen = {}
    for dirpath, _, names in os.walk(mp / "copy"):
        for n in names:
            p = os.path.join(dirpath, n)
            seen[os.path.relpath(p, mp / "copy")] = open(p, "rb").read()
            assert os.stat(p).st_size == len(seen[os.path.relpath(p, mp / "copy")])
    assert seen == tree
    unmount(mountd_cli, mp)
    assert storage.files("copy") == tree


def no_hidden(storage):
    return [n for n in storage.files() if HIDDEN in n]


def test_an_open_file_unlinked_keeps_its_bytes_and_leaves_nothing(storage, rw_mount):  # noqa: F811
    data = os.urandom(3 * MiB + 1234)  # more than the blocks a first read brings in
    storage.put("d/gone.bin", data)
    mp = rw_mount()
    fd = os.open(mp / "d" / "gone.bin", os.O_RDONLY)
    try:
        assert os.pread(fd, 1000, 0) == data[:1000]
        os.unlink(mp / "d" / "gone.bin")
        assert "gone.bin" not in os.listdir(mp / "d")
        assert "d/gone.bin" not in storage.files()
        assert not no_hidden(storage)
        assert os.pread(fd, 5000, len(data) - 5000) == data[-5000:]
        assert os.pread(fd, len(data), 0) == data
        assert os.fstat(fd).st_size == len(data)
        os.rmdir(mp / "d")  # nothing hidden keeps the directory, even while the file is open
        assert os.pread(fd, 100, 7) == data[7:107]
    finally:
        os.close(fd)
    assert not storage.files()
    assert not (mp / "d").exists()


@pytest.mark.parametrize("how", ["renamed", "replaced"])
def test_an_open_file_renamed_or_replaced_by_a_rename_keeps_its_bytes(storage, rw_mount, how):  # noqa: F811
    data, other = os.urandom(3 * MiB + 99), os.urandom(1000)
    storage.put("f.bin", data)
    storage.put("other.bin", other)
    mp = rw_mount()
    fd = os.open(mp / "f.bin", os.O_RDONLY)
    try:
        assert os.pread(fd, 100, 0) == data[:100]
        if how == "renamed":
            os.rename(mp / "f.bin", mp / "new.bin")
        else:
            os.rename(mp / "other.bin", mp / "f.bin")
        assert os.pread(fd, 4000, 2 * MiB + 5) == data[2 * MiB + 5:2 * MiB + 4005]
        assert os.pread(fd, len(data), 0) == data
        assert os.fstat(fd).st_size == len(data)
    finally:
        os.close(fd)
    assert storage.files() == ({"new.bin": data, "other.bin": other} if how == "renamed" else {"f.bin": other})
    if how == "replaced":
        assert (mp / "f.bin").read_bytes() == other


def test_a_file_unlinked_while_open_for_writing_keeps_writing_and_leaves_nothing(storage, rw_mount):  # noqa: F811
    storage.put("d/old.bin", b"stored before")
    mp = rw_mount()
    for name in ("new.bin", "old.bin"):  # created here, and one storage held
        f = open(mp / "d" / name, "r+b" if name == "old.bin" else "w+b")
        f.write(b"x" * 5000)
        f.flush()
        os.unlink(mp / "d" / name)
        assert not no_hidden(storage)
        f.write(b"y" * 3000)
        f.flush()
        f.seek(0)
        assert f.read() == b"x" * 5000 + b"y" * 3000
        assert os.fstat(f.fileno()).st_size == 8000
        os.ftruncate(f.fileno(), 7000)
        assert os.fstat(f.fileno()).st_size == 7000
        assert os.pread(f.fileno(), 8000, 0) == b"x" * 5000 + b"y" * 2000
        f.close()
        assert "d/" + name not in storage.files()
    assert not storage.files()
    os.rmdir(mp / "d")


def test_a_file_renamed_while_open_for_writing_lands_under_its_new_name(storage, rw_mount):  # noqa: F811
    mp = rw_mount()
    f = open(mp / "a.txt", "wb")
    f.write(b"before the rename, ")
    f.flush()
    os.rename(mp / "a.txt", mp / "b.txt")
    f.write(b"after it")
    f.close()
    assert storage.files() == {"b.txt": b"before the rename, after it"}
    assert (mp / "b.txt").read_bytes() == b"before the rename, after it"
    with pytest.raises(OSError) as e:
        os.stat(mp / "a.txt")
    assert e.value.errno == errno.ENOENT


def test_a_file_unlinked_while_its_close_uploads_it_is_not_left_in_storage(storage, rw_mount):  # noqa: F811
    mp = rw_mount()
    body = os.urandom(32 * MiB)
    for attempt in range(3):
        name = f"big{attempt}.bin"
        f = open(mp / name, "wb")
        f.write(body)
        closing = threading.Thread(target=f.close)  # the close uploads the file
        closing.start()
        time.sleep(0.02 * attempt)  # the unlink lands at a different point of the upload each time
        os.unlink(mp / name)
        closing.join(120)
        assert not closing.is_alive()
        assert name not in os.listdir(mp)
    # no upload landed after its file's delete (libfuse holds the file's path
    # while its flush uploads, so the unlink waits for it; this keeps it so)
    assert not storage.files()
