"""Reference-model tests of read-write mounts.

- Random sequences of file and directory operations are applied to a
  read-write mount of an Azurite container and to a plain local directory;
  both must give the same results (the same errno when an operation fails),
  the same tree, and storage must hold exactly that tree.
- An fsx-style exerciser (`Fsx`): random data operations on one file, checked
  against an in-memory model, on blob, file share and local mounts."""

import errno
import os
import shutil
import subprocess
import uuid

import pytest
import yaml
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from tests.conftest import KEY, KEY_ENV
from tests.integration.test_rw_mount import rw_mount, storage  # noqa: F401 - fixtures
from tests.support.azurite import blob_workspace_entry

pytestmark = [pytest.mark.fuse, pytest.mark.usefixtures("fuse_available")]

# Few names, so operations meet each other's results often.
FILES = ["a", "b", "d1/a", "d1/d2/b"]
DIRS = ["d1", "d1/d2", "d3"]
files = st.sampled_from(FILES)  # file operations mostly meet files...
paths = st.sampled_from(FILES + DIRS)  # ...the others meet anything
data = st.binary(max_size=3000)
sizes = st.one_of(st.sampled_from([0, 1, 100]), st.integers(0, 4000))


@pytest.fixture(scope="module")
def rw_world(azurite, tmp_path_factory, fuse_available):
    from azure.storage.blob import BlobServiceClient
    base = tmp_path_factory.mktemp("model")
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    container = service.create_container(f"m{uuid.uuid4().hex[:16]}")
    ws = base / "ws.yaml"
    ws.write_text(yaml.safe_dump({"datastores": {"data": blob_workspace_entry(azurite, container.container_name,
                                                                               KEY_ENV)}}))
    mp = base / "mnt"
    mp.mkdir()
    env = dict(os.environ, MOUNTD_WORKSPACE=str(ws), **{KEY_ENV: KEY})
    import sys
    r = subprocess.run([sys.executable, "-m", "mountd", "mount", "data", str(mp), "--read-write", "--work-dir",
                        str(base / "work"), "--cache-dir", str(base / "cache"), "--attribute-ttl", "1s"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    yield mp, base, container
    subprocess.run([sys.executable, "-m", "mountd", "unmount", str(mp)], capture_output=True, env=env)
    service.delete_container(container.container_name)


def outcome(fn):
    try:
        return ("ok", fn())
    except OSError as e:
        return ("error", errno.errorcode.get(e.errno, e.errno))


def snapshot(root):
    files, dirs = {}, set()
    for d, _subdirs, names in os.walk(root):
        rel = os.path.relpath(d, root)
        if rel != ".":
            dirs.add(rel)
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                files[os.path.normpath(os.path.join(rel, n))] = f.read()
    return files, dirs


def test_mount_behaves_like_a_local_directory(rw_world):
    mp, base, container = rw_world

    class Model(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            case = uuid.uuid4().hex[:8]
            self.mine = mp / case
            self.ref = base / "ref" / case
            os.makedirs(self.mine)
            os.makedirs(self.ref)
            self.prefix = case + "/"

        @initialize(a=data, b=data)
        def start(self, a, b):
            """Start from a small tree, so that most operations meet something."""
            for root in (self.mine, self.ref):
                os.makedirs(root / "d1" / "d2")
                (root / "a").write_bytes(a)
                (root / "d1" / "a").write_bytes(b)

        def both(self, op, *names):
            mine = outcome(lambda: op(*[self.mine / n for n in names]))
            ref = outcome(lambda: op(*[self.ref / n for n in names]))
            assert mine == ref, f"{op.__name__}{names}: mount {mine}, local directory {ref}"

        @rule(p=files, body=data)
        def write(self, p, body):
            def write(path):
                with open(path, "wb") as f:
                    f.write(body)
            self.both(write, p)

        @rule(p=files, body=data)
        def append(self, p, body):
            def append(path):
                with open(path, "ab") as f:
                    f.write(body)
            self.both(append, p)

        @rule(p=files, offset=sizes, body=data)
        def write_at(self, p, offset, body):
            def write_at(path):
                with open(path, "r+b") as f:
                    f.seek(offset)
                    f.write(body)
            self.both(write_at, p)

        @rule(p=files, length=sizes)
        def truncate(self, p, length):
            self.both(lambda path: os.truncate(path, length), p)

        @rule(p=files)
        def read(self, p):
            def read(path):
                with open(path, "rb") as f:
                    return f.read()
            self.both(read, p)

        @rule(p=paths)
        def unlink(self, p):
            self.both(os.unlink, p)

        @rule(p=paths)
        def mkdir(self, p):
            self.both(os.mkdir, p)

        @rule(p=paths)
        def rmdir(self, p):
            self.both(os.rmdir, p)

        @rule(src=paths, dst=paths)
        def rename(self, src, dst):
            self.both(os.rename, src, dst)

        @rule(p=paths)
        def listdir(self, p):
            self.both(lambda path: sorted(os.listdir(path)), p)

        @invariant()
        def same_tree(self):
            assert snapshot(self.mine) == snapshot(self.ref)

        def teardown(self):
            files, dirs = snapshot(self.ref)
            stored, markers = {}, set()
            for b in container.list_blobs(name_starts_with=self.prefix, include=["metadata"]):
                name = b.name[len(self.prefix):]
                if (b.metadata or {}).get("hdi_isfolder") == "true":
                    markers.add(name)
                else:
                    stored[name] = container.download_blob(b.name).readall()
            implied = {os.path.dirname(n) for n in list(stored) + list(markers)} - {""}
            implied |= {os.path.dirname(d) for d in implied} - {""}
            assert stored == files, "storage does not hold what was written"
            assert markers | implied == dirs, "storage's directories differ"
            shutil.rmtree(self.ref)

    run_state_machine_as_test(Model, settings=settings(
        max_examples=int(os.environ.get("MODEL_EXAMPLES", "40")), stateful_step_count=25, deadline=None,
        suppress_health_check=list(HealthCheck), database=None))


# -- an exerciser in the spirit of fsx ----------------------------------------------------------------------------
# One file, thousands of random reads, writes, truncates, appends, mmap reads
# and writes, fsyncs, closes and reopens on a read-write mount, each checked
# against an in-memory model; after unmount storage must hold the model's
# bytes. A CI run is short; MOUNTD_FSX_OPS=100000 (and MOUNTD_FSX_SEED to
# replay one) for a long run by hand.
FSX_OPS = int(os.environ.get("MOUNTD_FSX_OPS", "2000"))
FSX_MAX_SIZE = int(os.environ.get("MOUNTD_FSX_MAX_SIZE", str(256 * 1024)))


class FsxFailure(AssertionError):
    pass


class Fsx:
    """The file under test, its model and the log of what was done."""

    def __init__(self, path, seed: int):
        import random
        self.path, self.seed = path, seed
        self.rng = random.Random(seed)
        self.model = bytearray()
        self.log: list[str] = []
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)

    def fail(self, message: str):
        recent = "\n  ".join(self.log[-15:])
        raise FsxFailure(f"fsx seed {self.seed}, op {len(self.log)}: {message}\n  last ops:\n  {recent}\n"
                         f"replay: MOUNTD_FSX_SEED={self.seed} MOUNTD_FSX_OPS={len(self.log)}")

    def check(self, offset: int, got: bytes, what: str) -> None:
        want = bytes(self.model[offset:offset + len(got)])
        if got != want:
            first = next(i for i in range(len(got)) if got[i:i + 1] != want[i:i + 1])
            self.fail(f"{what}: byte {offset + first:#x} is {got[first:first + 8].hex()}, "
                      f"the model has {want[first:first + 8].hex()}")

    def _offset_length(self, bound: int) -> tuple[int, int]:
        offset = self.rng.randrange(bound + 1)
        length = self.rng.randrange(1, max(2, min(64 * 1024, FSX_MAX_SIZE - offset) + 1))
        return offset, length

    def step(self) -> None:
        rng, size = self.rng, len(self.model)
        op = rng.choices(["read", "write", "append", "truncate", "mapread", "mapwrite", "fsync", "reopen",
                          "stat"], weights=[25, 25, 8, 8, 10, 10, 3, 3, 8])[0]
        if op == "read":
            offset, length = self._offset_length(size)
            self.log.append(f"read {offset:#x} +{length:#x} (size {size:#x})")
            got = os.pread(self.fd, length, offset)
            if len(got) != max(0, min(length, size - offset)):
                self.fail(f"read gave {len(got):#x} bytes, the model {max(0, min(length, size - offset)):#x}")
            self.check(offset, got, "read")
        elif op in ("write", "append"):
            offset, length = self._offset_length(min(size, FSX_MAX_SIZE - 1))
            data = os.urandom(length)
            if op == "append":
                offset = size
                self.log.append(f"append +{length:#x} at {offset:#x}")
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)  # another handle's close uploads: the mount's own handle must still agree
            else:
                self.log.append(f"write {offset:#x} +{length:#x}")
                os.pwrite(self.fd, data, offset)
            if offset > size:
                self.model += bytes(offset - size)
            self.model[offset:offset + length] = data
        elif op == "truncate":
            length = rng.randrange(FSX_MAX_SIZE + 1)
            self.log.append(f"truncate {length:#x} (size {size:#x})")
            os.ftruncate(self.fd, length)
            del self.model[length:]
            self.model += bytes(length - len(self.model))
        elif op in ("mapread", "mapwrite"):
            import mmap
            if size == 0:
                return
            offset = rng.randrange(size)
            length = rng.randrange(1, min(64 * 1024, size - offset) + 1)
            start = offset - offset % mmap.ALLOCATIONGRANULARITY
            self.log.append(f"{op} {offset:#x} +{length:#x}")
            with mmap.mmap(self.fd, offset + length - start, offset=start) as m:
                if op == "mapread":
                    self.check(offset, bytes(m[offset - start:offset - start + length]), "mmap read")
                else:
                    data = os.urandom(length)
                    m[offset - start:offset - start + length] = data
                    # no msync here: Python holds the GIL through it, and the
                    # fsync it sends the mount uploads to the Files emulator,
                    # a thread of this process (the real fsx, run by hand, does)
                    self.model[offset:offset + length] = data
        elif op == "fsync":
            self.log.append("fsync")
            os.fsync(self.fd)
        elif op == "reopen":
            self.log.append("close and reopen")
            os.close(self.fd)
            self.fd = os.open(self.path, os.O_RDWR)
            self.check(0, os.pread(self.fd, FSX_MAX_SIZE + 1, 0), "read after reopen")
            if os.fstat(self.fd).st_size != len(self.model):
                self.fail("size after reopen differs")
        else:
            self.log.append("stat")
            got = os.stat(self.path).st_size
            if got != size:
                self.fail(f"stat says {got:#x} bytes, the model {size:#x}")


@pytest.mark.parametrize("storage", ["blob", "file", "local"], indirect=True)
def test_fsx_exerciser_against_a_model(storage, rw_mount, mountd_cli):
    seed = int(os.environ.get("MOUNTD_FSX_SEED") or uuid.uuid4().int % 10**9)
    print(f"fsx seed {seed}, {FSX_OPS} ops on {storage.kind}")
    mp = rw_mount()
    fsx = Fsx(mp / "fsx.bin", seed)
    for _ in range(FSX_OPS):
        fsx.step()
    os.close(fsx.fd)
    assert mountd_cli("unmount", mp).code == 0
    if storage.files().get("fsx.bin") != bytes(fsx.model):
        fsx.fail("storage after unmount does not hold the model's bytes")
