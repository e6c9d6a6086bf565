"""Load through one mount: 32 parallel readers over 10 000 files, every
byte checked, no error, within a bounded time; prints the throughput.

Over a local datastore with 10 000 files; over Azurite with 2 000, since
Azurite stores and lists 10 000 blobs in about 30 s, more than this suite
can spend (MOUNTD_LOAD_BLOB_FILES=10000 runs the full count). The hours-long
mixed version is tests/soak.py, run by hand."""

import concurrent.futures
import hashlib
import os
import queue
import random
import threading
import time

import pytest
import yaml

from tests.conftest import KEY, KEY_ENV
from tests.support.azurite import blob_workspace_entry, bulk_put
from tests.support.faultproxy import NOTES, verified

FILES = {"local": 10_000, "blob": int(os.environ.get("MOUNTD_LOAD_BLOB_FILES", "2000"))}
READERS = 32
BOUND = 60.0  # seconds the readers may take at most (CI machines are shared and noisy)


def content(name: str) -> bytes:
    """What file `name` holds: 1-8 KiB derived from its name, so readers can
    check every byte without keeping 10 000 files in memory."""
    seed = hashlib.sha256(name.encode()).digest()
    return seed * (32 + seed[0] % 224)


@pytest.fixture(params=["blob", "local"])
def many_files(request, tmp_path, monkeypatch):
    names = [f"d{i % 100:02d}/f{i:05d}.bin" for i in range(FILES[request.param])]
    if request.param == "blob":
        azurite = request.getfixturevalue("azurite")
        container = request.getfixturevalue("container")
        bulk_put(azurite, container.container_name, {n: content(n) for n in names})
        entry = blob_workspace_entry(azurite, container.container_name)
        monkeypatch.setenv(KEY_ENV, KEY)
    else:
        root = tmp_path / "root"
        for name in names:
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content(name))
        entry = {"type": "local", "root": str(root)}
    ws = tmp_path / "ws.yaml"
    ws.write_text(yaml.safe_dump({"datastores": {"data": entry}}))
    monkeypatch.setenv("MOUNTD_WORKSPACE", str(ws))
    return request.param, names


def test_32_readers_over_10000_files(many_files, tmp_path, mounter):
    kind, names = many_files
    mp = mounter("data", "--cache-dir", tmp_path / "cache")
    todo: queue.Queue = queue.Queue()
    shuffled = list(names)
    random.Random(9).shuffle(shuffled)
    for name in shuffled:
        todo.put(name)
    errors, done, moved = [], [0], [0]
    lock = threading.Lock()
    deadline = time.monotonic() + BOUND

    def reader():
        while time.monotonic() < deadline:
            try:
                name = todo.get_nowait()
            except queue.Empty:
                return
            try:
                with open(os.path.join(mp, name), "rb") as f:
                    data = f.read()
                if data != content(name):
                    errors.append(f"{name}: wrong bytes")
            except OSError as e:
                errors.append(f"{name}: {e}")
                continue
            with lock:
                done[0] += 1
                moved[0] += len(data)

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(READERS) as pool:
        for future in [pool.submit(reader) for _ in range(READERS)]:
            future.result()
    seconds = time.monotonic() - started
    assert errors == []
    assert done[0] == len(names), f"{done[0]} of {len(names)} files read in {BOUND:.0f} s"
    verified(moved[0])
    line = (f"load ({kind}): {READERS} readers, {len(names)} files, {moved[0] / 2**20:.1f} MiB through one mount "
            f"in {seconds:.1f} s: {len(names) / seconds:.0f} files/s, {moved[0] / 2**20 / seconds:.1f} MiB/s, 0 errors")
    NOTES.append(line)
    print("\n" + line)
