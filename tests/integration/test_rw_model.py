"""A reference-model test of read-write mounts: random sequences of file and
directory operations are applied to a read-write mount of an Azurite
container and to a plain local directory; both must give the same results
(the same errno when an operation fails), the same tree, and storage must
hold exactly that tree."""

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
    for d, subdirs, names in os.walk(root):
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
