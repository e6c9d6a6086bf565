"""Dataset prefetch (`mountd mount --prefetch`, `prefetch: true`) over real
Azurite and real FUSE mounts: it fills the disk cache so that reads make no
storage requests, holds the cache's cap and reserve on a dataset larger than
the cache, never serves a blob changed after it was prefetched, shows its
progress in `mountd status`, and is refused where it cannot work. Its runs
through storage faults are in test_faults.py."""

import concurrent.futures
import os
import random
import subprocess
import time

import pytest
import yaml

from mountd.run import control, runtime
from tests.conftest import KEY, KEY_ENV
from tests.integration.test_mount import tree_bytes
from tests.support.azurite import blob_workspace_entry

pytestmark = [pytest.mark.fuse, pytest.mark.usefixtures("fuse_available")]


def put_all(container, files: dict) -> None:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda item: container.upload_blob(item[0], item[1], overwrite=True), files.items()))


def a_dataset(seed: int, count: int, size: int, big: int = 0) -> dict:
    """Image-like files under class directories, and optionally one file
    of several blocks."""
    rng = random.Random(seed)
    files = {f"ds/class{i % 5}/img{i:04d}.jpg": rng.randbytes(rng.randrange(size // 2, size * 3 // 2))
             for i in range(count)}
    if big:
        files["ds/shard.bin"] = rng.randbytes(big)
    return files


def status(mp) -> dict:
    return control.query(runtime.control_path(str(mp)))


def wait_prefetched(mp, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = status(mp)["prefetch"]
        if p["state"] in ("done", "stopped"):
            return p
        time.sleep(0.1)
    raise AssertionError(f"prefetch not finished after {timeout} s: {status(mp)['prefetch']}")


def log_of(mp) -> str:
    with open(runtime.log_path(str(mp)), encoding="utf-8") as f:
        return f.read()


@pytest.fixture
def prefetch_mount(tmp_path, mounter, blob_datastore):
    def do(*flags, cache_dir=None):
        return mounter("data:ds", "--prefetch", "--cache-dir", cache_dir or tmp_path / "cache",
                       "--block-size", "256KiB", "--memory-cache", "4MiB", *flags)
    return do


def test_prefetch_fills_the_cache_and_reads_then_make_no_storage_requests(blob_datastore, prefetch_mount,
                                                                          mountd_cli):
    files = a_dataset(1, 60, 40_000, big=(1 << 20) + 4321)  # the shard: 5 blocks, the last one short
    put_all(blob_datastore, files)
    mp = prefetch_mount()
    p = wait_prefetched(mp)
    total = sum(map(len, files.values()))
    assert p["state"] == "done" and not p["stopped"], p
    assert (p["files"], p["files_listed"], p["bytes"], p["bytes_listed"]) == (61, 61, total, total), p
    assert p["bytes_from_storage"] == total and p["files_failed"] == 0 and p["eta"] == 0, p
    before = status(mp)["cache"]
    assert before["misses"] == 0 and before["bytes_from_storage"] == 0, before  # the job has read nothing yet
    got = {f"ds/{k}": v for k, v in tree_bytes(mp).items()}
    assert got == files
    after = status(mp)["cache"]
    # every block came from the disk tier: no read went to storage
    assert after["misses"] == 0 and after["bytes_from_storage"] == 0, after
    assert after["bytes_from_disk"] >= total, after
    assert "dataset prefetch done: prefetched 61 of 61 files" in log_of(mp)

    text = mountd_cli("status")
    assert text.code == 0, text
    assert "prefetch done: 61 of 61 files" in text.out, text.out
    prom = mountd_cli("status", "--prometheus").out
    assert f'mountd_mount_prefetch_files{{mountpoint="{mp}",datastore="data",path="ds"}} 61' in prom, prom
    assert "mountd_mount_prefetch_bytes_from_storage_total{" in prom and "mountd_mount_prefetch_eta_seconds{" in prom


def test_a_second_prefetch_skips_what_is_cached(blob_datastore, prefetch_mount, mountd_cli):
    files = a_dataset(2, 30, 20_000)
    put_all(blob_datastore, files)
    mp = prefetch_mount()
    assert wait_prefetched(mp)["bytes_from_storage"] == sum(map(len, files.values()))
    assert mountd_cli("unmount", mp).code == 0
    mp2 = prefetch_mount()
    p = wait_prefetched(mp2)
    assert (p["files"], p["files_cached"], p["bytes_from_storage"]) == (30, 30, 0), p


@pytest.fixture
def small_fs(tmp_path):
    """A tmpfs of 6 MiB: a disk whose free space the reserve is about."""
    path = tmp_path / "smalldisk"
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield path
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.parametrize("limit", ["cap", "reserve"])
def test_a_dataset_larger_than_the_cache_stops_at_its_cap_and_reserve(blob_datastore, prefetch_mount, small_fs,
                                                                       monkeypatch, limit):
    files = a_dataset(3, 80, 100_000)  # ~7.6 MiB: larger than the cache either way
    put_all(blob_datastore, files)
    if limit == "cap":
        monkeypatch.setenv("DATASET_RESERVED_FREE_DISK_SPACE", "0")
        mp = prefetch_mount("--cache-max-size", "2MiB", cache_dir=small_fs / "cache")
        def within():
            c = status(mp)["cache"]
            assert c["disk_used"] <= 2 << 20, c
    else:
        monkeypatch.setenv("DATASET_RESERVED_FREE_DISK_SPACE", str(3 << 20))
        mp = prefetch_mount(cache_dir=small_fs / "cache")
        def within():
            st = os.statvfs(small_fs)
            assert st.f_bavail * st.f_frsize >= 3 << 20
    seen = []
    while (p := status(mp)["prefetch"])["state"] not in ("done", "stopped"):
        within()
        seen.append(p["files"])
        time.sleep(0.02)
    within()
    assert p["state"] == "stopped" and p["stopped"] == "the disk cache is full", p
    assert 0 < p["files"] < 80 and p["files_listed"] == 80, p
    assert f"dataset larger than the cache: prefetched {p['files']} of 80 files" in log_of(mp)
    # the job reads everything, right, while the cache keeps within its limits
    got = {f"ds/{k}": v for k, v in tree_bytes(mp).items()}
    assert got == files
    time.sleep(0.3)  # the disk writer is asynchronous
    within()
    assert "error" not in log_of(mp).lower()


def test_a_blob_changed_after_prefetch_is_refetched_at_open(blob_datastore, prefetch_mount):
    files = a_dataset(4, 10, 30_000)
    put_all(blob_datastore, files)
    mp = prefetch_mount("--attribute-ttl", "1s")
    wait_prefetched(mp)
    name = "ds/class1/img0001.jpg"
    new = os.urandom(len(files[name]))  # same size: only the etag tells the versions apart
    blob_datastore.upload_blob(name, new, overwrite=True)
    time.sleep(1.5)  # past the attribute TTL: the next open sees the new etag
    assert (mp / "class1" / "img0001.jpg").read_bytes() == new
    assert (mp / "class2" / "img0002.jpg").read_bytes() == files["ds/class2/img0002.jpg"]
    c = status(mp)["cache"]
    assert c["bytes_from_storage"] == len(new), c  # the changed file only, from storage


def test_reads_during_the_prefetch_are_right_and_fetched_once(blob_datastore, prefetch_mount):
    """The job reading while the prefetch runs: every byte right, and a
    block is fetched once, by the prefetch or by the reader."""
    files = a_dataset(5, 200, 60_000)
    put_all(blob_datastore, files)
    mp = prefetch_mount()
    names = sorted(files)
    random.Random(6).shuffle(names)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = dict(pool.map(lambda n: (n, (mp / n[3:]).read_bytes()), names))
    assert got == files
    p = wait_prefetched(mp)
    c = status(mp)["cache"]
    total = sum(map(len, files.values()))
    assert p["files"] == 200 and p["bytes_from_storage"] + c["bytes_from_storage"] == total, (p, c)


def test_the_prefetch_lists_each_directory_once_for_itself_and_the_job(blob_datastore, azurite, tmp_path):
    """The prefetch walks directory by directory through the mount's
    metadata cache: once it has listed the dataset, the job's lookups of
    every file (and of names that are not there) make no metadata request,
    and what it fetched is what those lookups' entries key."""
    from mountd.cache.blocks import BlockCache, DiskTier
    from mountd.config.datastores import parse
    from mountd.config.settings import CacheSettings
    from mountd.fs.core import FileSystemCore, FsError
    from mountd.fs.preload import DatasetPrefetch
    from mountd.storage import open_store

    files = a_dataset(7, 40, 5_000)
    files["ds/class1/deeper/more.bin"] = b"x" * 3000
    put_all(blob_datastore, files)
    settings = CacheSettings(block_size=256 * 1024, memory=4 << 20, attribute_ttl=600, negative_ttl=600)
    store = open_store(parse("data", blob_workspace_entry(azurite, blob_datastore.container_name), "test"))
    disk = DiskTier(str(tmp_path / "cache"), 1 << 30, 0)
    core = FileSystemCore(store, settings, BlockCache(settings.memory, disk, settings.threads,
                                                      settings.block_size, fill_blocks=4), prefix="ds")
    try:
        prefetch = DatasetPrefetch(core)
        prefetch.start()
        deadline = time.monotonic() + 60
        while prefetch.counters()["state"] not in ("done", "stopped") and time.monotonic() < deadline:
            time.sleep(0.05)
        p = prefetch.counters()
        assert (p["state"], p["files"], p["bytes"]) == ("done", 41, sum(map(len, files.values()))), p
        listed = core.meta.requests
        assert listed == 1 + 5 + 1, listed  # ds/, its 5 class directories and class1/deeper/
        for name, data in files.items():
            assert core.getattr("/" + name[3:])["st_size"] == len(data)
        with pytest.raises(FsError):
            core.getattr("/class2/not-there.jpg")
        assert core.meta.requests == listed  # the job's lookups answered from the prefetch's listings
        assert core.blocks.counters()["misses"] == 0
        for name, data in files.items():
            assert core.read_path_into("/" + name[3:], memoryview(bytearray(len(data))), 0) == len(data)
        assert core.blocks.counters()["bytes_from_storage"] == 0  # every block where the reads look for it
    finally:
        core.close()


# -- refused where it cannot work ------------------------------------------------------------
@pytest.mark.parametrize("flags,says", [
    (["--read-write"], "--prefetch is for read-only mounts"),
    (["--no-disk-cache"], "--prefetch fills the disk cache"),
])
def test_prefetch_where_it_cannot_work_is_exit_2(blob_datastore, tmp_path, mountd_cli, flags, says):
    mp = tmp_path / "mp"
    mp.mkdir()
    r = mountd_cli("mount", "data", mp, "--prefetch", *flags)
    assert r.code == 2 and r.err.startswith(f"mountd: error: {says}") and r.err.count("\n") == 1, r
    assert not os.listdir(mp)


@pytest.mark.parametrize("extra,error", [
    ({}, None),
    ({"prefetch": "yes"}, "data_references.images.prefetch: must be true or false, got 'yes'"),
    ({"read_write": True}, "data_references.images.prefetch: is for read-only mounts"),
    ({"mode": "download"}, "data_references.images.prefetch: is only allowed with mode mount, not download"),
])
def test_manifest_prefetch(tmp_path, mountd_cli, monkeypatch, extra, error):
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    ws = tmp_path / "ws.yaml"
    ws.write_text(yaml.safe_dump({"datastores": {"local": {"type": "local", "root": str(root)}}}))
    monkeypatch.setenv("MOUNTD_WORKSPACE", str(ws))
    ref = {"datastore": "local", "path_on_datastore": "images", "mode": "mount", "prefetch": True, **extra}
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump({"data_references": {"images": ref}, "command": ["true"]}))
    r = mountd_cli("validate", manifest, "--offline")
    if error is None:
        assert r.code == 0, r
    else:
        assert r.code == 2 and error in r.err and r.err.startswith("mountd: error: ") and r.err.count("\n") == 1, r


# A job's command: waits (up to 30 s) until the prefetch of the mount of
# reference `images` is done, then prints `PREFETCH <its state as JSON>`.
WAIT_FOR_PREFETCH = ("import json, os, time\n"
                     "from mountd.run import control, runtime\n"
                     "mp = os.environ['AZUREML_DATAREFERENCE_images']\n"
                     "for _ in range(300):\n"
                     "    p = control.query(runtime.control_path(mp))['prefetch']\n"
                     "    if p['state'] == 'done': break\n"
                     "    time.sleep(0.1)\n"
                     "print('PREFETCH', json.dumps(p))\n")


def test_a_run_with_a_prefetched_mount(tmp_path, azurite, container, monkeypatch):
    """`prefetch: true` reaches the mount worker of `mountd run`."""
    files = a_dataset(7, 20, 10_000)
    put_all(container, files)
    ws = tmp_path / "ws.yaml"
    ws.write_text(yaml.safe_dump({"datastores": {"blob": blob_workspace_entry(azurite, container.container_name)}}))
    monkeypatch.setenv("MOUNTD_WORKSPACE", str(ws))
    monkeypatch.setenv(KEY_ENV, KEY)
    script = WAIT_FOR_PREFETCH
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump({
        "work_dir": str(tmp_path / "work"), "cache": {"dir": str(tmp_path / "cache")},
        "data_references": {"images": {"datastore": "blob", "path_on_datastore": "ds", "mode": "mount",
                                       "prefetch": True}},
        "command": ["python3", "-c", script]}))
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    r = subprocess.run(["python3", "-m", "mountd", "run", str(manifest)], capture_output=True, text=True, env=env,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert '"state": "done"' in r.stdout and '"files": 20' in r.stdout, r.stdout
