"""Storage that misbehaves: downloads, mount reads and `mountd run` through a
proxy that resets connections part-way through responses, stalls them past
the read timeout, answers 503 with Retry-After or 500, throttles, or goes
away altogether. Every byte must still come out right; transient faults
never surface within the retry budget; a longer outage surfaces as a clear
error (EIO and a log line for a reader, a non-zero exit for a transfer) and
is recovered from without help once storage answers again; nothing hangs.

Retry budgets are made small through MOUNTD_STORAGE_* so an outage takes
seconds, not minutes."""

import concurrent.futures
import errno
import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import time

import pytest
import yaml

from mountd.journal import Journal
from mountd.run import mounts, runtime
from tests.conftest import KEY, KEY_ENV
from tests.integration.test_mount import tree_bytes as tree
from tests.support.azurite import blob_workspace_entry
from tests.support.faultproxy import verified

# Short timeouts and backoff: a stall longer than the read timeout is a
# stalled connection to give up on; retries come quickly. Ten retries: with
# 30% of requests faulty, one request in 4 000 fails 7 times in a row (the
# default budget of 6 retries), one in 500 000 fails 11 times.
FAST = {"MOUNTD_STORAGE_READ_TIMEOUT": "1s", "MOUNTD_STORAGE_CONNECT_TIMEOUT": "2s", "MOUNTD_STORAGE_RETRIES": "10",
        "MOUNTD_STORAGE_BACKOFF": "50ms", "MOUNTD_STORAGE_BACKOFF_MAX": "400ms"}
# What "done" asks to survive: 20% of requests reset part-way, 10% stalled.
HARSH = dict(reset=0.2, stall=0.1, stall_seconds=1.5)


def put_blobs(container, files: dict) -> None:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda item: container.upload_blob(item[0], item[1], overwrite=True), files.items()))


def dataset(rng: random.Random, small: int, big: int) -> dict:
    files = {f"data/part-{i:03d}.bin": rng.randbytes(rng.randrange(0, 200_000)) for i in range(small)}
    files["data/empty.bin"] = b""
    files["data/big.bin"] = rng.randbytes(big)
    return files


def assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name, data in want.items():
        assert got[name] == data, name
        verified(data)


@pytest.fixture
def flaky(tmp_path, azurite, container, fault_proxy, monkeypatch):
    """A workspace whose datastore `flaky` is the test container behind a
    fault proxy (no faults until the test sets rates) and `direct` the same
    container without it."""
    proxy = fault_proxy(azurite.port, seed=int(os.environ.get("FAULT_SEED", "1")))
    entry = blob_workspace_entry(azurite, container.container_name, KEY_ENV)
    flaky_entry = dict(entry, endpoint=proxy.url(azurite.account_url))
    ws = tmp_path / "ws.yaml"
    ws.write_text(yaml.safe_dump({"datastores": {"flaky": flaky_entry, "direct": entry}}))
    monkeypatch.setenv("MOUNTD_WORKSPACE", str(ws))
    monkeypatch.setenv(KEY_ENV, KEY)
    for var, value in FAST.items():
        monkeypatch.setenv(var, value)
    proxy.container = container
    return proxy


def open_flaky():
    from mountd.config.workspace import Workspace
    from mountd.storage import open_store
    return open_store(Workspace.load().get("flaky"))


# -- transient faults: every byte right -------------------------------------------------
def test_download_through_resets_and_stalls(flaky, tmp_path, mountd_cli):
    files = dataset(random.Random(1), small=80, big=20 << 20)
    put_blobs(flaky.container, files)
    flaky.set(**HARSH)
    r = mountd_cli("download", "flaky", tmp_path / "dst", "--no-progress")
    assert r.code == 0, r
    assert_same(tree(tmp_path / "dst"), files)
    assert flaky.counts["reset"] >= 5 and flaky.counts["stall"] >= 3, flaky.counts


def test_without_retries_the_same_faults_fail(flaky, tmp_path, mountd_cli):
    # The harness bites: the download above passes because of retries.
    put_blobs(flaky.container, dataset(random.Random(2), small=40, big=0))
    flaky.set(**HARSH)
    r = mountd_cli("download", "flaky", tmp_path / "dst", "--no-progress", env={"MOUNTD_STORAGE_RETRIES": "0"})
    assert r.code in (2, 3), r
    assert r.err.startswith("mountd: ") and "Traceback" not in r.err


def test_mount_reads_through_resets_and_stalls(flaky, tmp_path, mounter):
    files = dataset(random.Random(3), small=40, big=6 << 20)
    put_blobs(flaky.container, files)
    flaky.set(**HARSH)
    mp = mounter("flaky", "--cache-dir", tmp_path / "cache", "--block-size", "256KiB", "--memory-cache", "4MiB")
    big = files["data/big.bin"]
    rng = random.Random(4)

    def random_reads(_):
        with open(mp / "data" / "big.bin", "rb") as f:
            for _ in range(30):
                off = rng.randrange(len(big))
                f.seek(off)
                assert f.read(100_000) == big[off:off + 100_000]
        verified(30 * 100_000)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = tree(mp)  # every file, sequentially, while random readers run alongside
        list(pool.map(random_reads, range(3)))
    assert_same(got, files)
    assert flaky.counts["reset"] >= 5 and flaky.counts["stall"] >= 3, flaky.counts
    log = open(runtime.log_path(str(mp)), encoding="utf-8").read()
    assert "error" not in log.lower(), log


CHILD = r'''
import hashlib, json, os, sys
inputs, staged, out = sys.argv[1:4]
def digest(root):
    return {os.path.relpath(os.path.join(d, f), root): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, fs in os.walk(root) for f in fs}
json.dump({"mounted": digest(inputs), "staged": digest(staged)}, open(os.path.join(out, "seen.json"), "w"))
rng = __import__("random").Random(5)
for i in range(20):
    open(os.path.join(out, f"shard-{i:02d}.bin"), "wb").write(rng.randbytes(rng.randrange(1, 300_000)))
open(os.path.join(out, "model.bin"), "wb").write(rng.randbytes(40 << 20))  # above one request: staged blocks
'''


def test_run_stages_mounts_and_uploads_through_faults(flaky, tmp_path):
    files = dataset(random.Random(6), small=30, big=3 << 20)
    put_blobs(flaky.container, files)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump({
        "run_id": "f1", "work_dir": str(tmp_path / "work"),
        "cache": {"dir": str(tmp_path / "cache"), "block_size": "256KiB", "memory": "4MiB"},
        "data_references": {
            "inputs": {"datastore": "flaky", "path_on_datastore": "data", "mode": "mount"},
            "staged": {"datastore": "flaky", "path_on_datastore": "data", "mode": "download"},
            "outputs": {"datastore": "flaky", "path_on_datastore": "runs/f1", "mode": "upload"}},
        "command": [sys.executable, str(script), "$AZUREML_DATAREFERENCE_inputs", "$AZUREML_DATAREFERENCE_staged",
                    "$AZUREML_DATAREFERENCE_outputs"]}))
    flaky.set(**HARSH)
    r = subprocess.run([sys.executable, "-m", "mountd", "run", str(manifest)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    want = {name[len("data/"):]: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    seen = json.loads((tmp_path / "work" / "uploads" / "outputs" / "seen.json").read_text())
    assert seen == {"mounted": want, "staged": want}
    verified(2 * sum(map(len, files.values())))
    local = tree(tmp_path / "work" / "uploads" / "outputs")
    stored = {b.name[len("runs/f1/"):]: flaky.container.download_blob(b.name).readall()
              for b in flaky.container.list_blobs(name_starts_with="runs/f1/")}
    assert_same(stored, local)
    assert "uploaded 22 files" in r.stderr and "skipped" not in r.stderr and "failed" not in r.stderr, r.stderr
    assert flaky.injected() >= 10, flaky.counts


def test_read_write_mount_writes_through_resets_and_stalls(flaky, tmp_path, mounter):
    rng = random.Random(8)
    flaky.container.upload_blob("rw/existing.bin", rng.randbytes(600_000))
    mp = mounter("flaky", "--read-write", "--work-dir", tmp_path / "work", "--cache-dir", tmp_path / "cache",
                 "--block-size", "256KiB", "--memory-cache", "4MiB")
    flaky.set(**HARSH)
    want = {f"rw/out-{i:02d}.bin": rng.randbytes(rng.randrange(1, 400_000)) for i in range(15)}
    want["rw/big.bin"] = rng.randbytes(40 << 20)  # above one request: staged blocks, committed once
    for name, data in want.items():
        (mp / name).write_bytes(data)  # close waits for storage: every close must succeed
    with open(mp / "rw" / "existing.bin", "ab") as f:  # filled from storage through the faults, then appended
        f.write(b"tail")
    os.rename(mp / "rw" / "out-00.bin", mp / "rw" / "renamed.bin")
    want["rw/renamed.bin"] = want.pop("rw/out-00.bin")
    flaky.set(reset=0, stall=0)
    stored = {b.name: flaky.container.download_blob(b.name).readall()
              for b in flaky.container.list_blobs(name_starts_with="rw/")}
    existing = stored.pop("rw/existing.bin")
    assert existing.endswith(b"tail") and len(existing) == 600_004
    assert_same(stored, want)
    assert not Journal(tmp_path / "work").pending()
    assert flaky.counts["reset"] >= 5 and flaky.counts["stall"] >= 2, flaky.counts


def test_503_retry_after_and_500_are_retried(flaky):
    flaky.container.upload_blob("a.bin", b"x" * 5000)
    flaky.set(error_503=1.0, retry_after=1)
    threading.Timer(1.3, lambda: flaky.set(error_503=0)).start()
    with open_flaky() as store:
        started = time.monotonic()
        assert bytes(store.read("a.bin", 0, 5000)) == b"x" * 5000  # the lean read path
        # Retry-After was obeyed: a second apart, not every 50 ms of our own backoff
        assert time.monotonic() - started >= 1.0 and 2 <= flaky.counts["error_503"] <= 3, flaky.counts
        flaky.set(error_503=1.0)
        threading.Timer(1.3, lambda: flaky.set(error_503=0)).start()
        store.write_bytes("b.bin", b"y" * 100)  # the SDK path
        assert flaky.counts["error_503"] <= 6, flaky.counts
        flaky.set(error_500=0.5)
        for i in range(10):
            assert bytes(store.read("a.bin", i, 10)) == b"x" * 10
        store.write_bytes("c.bin", b"z")
    assert flaky.container.download_blob("b.bin").readall() == b"y" * 100
    assert flaky.counts["error_500"] >= 2, flaky.counts


def test_throttled_storage_is_slow_not_broken(flaky, tmp_path, mountd_cli):
    data = random.Random(7).randbytes(3 << 20)
    flaky.container.upload_blob("slow.bin", data)
    flaky.set(throttle=1 << 20)  # 1 MiB/s per connection; the read timeout is 1 s
    started = time.monotonic()
    r = mountd_cli("download", "flaky", tmp_path / "dst", "--no-progress")
    assert r.code == 0, r
    assert time.monotonic() - started >= 2.5  # it was throttled...
    assert (tmp_path / "dst" / "slow.bin").read_bytes() == data  # ...and complete
    verified(data)


# -- outages: a clear error, then recovery --------------------------------------------
def test_outage_gives_eio_and_a_log_line_then_recovers(flaky, tmp_path, mounter, monkeypatch):
    monkeypatch.setenv("MOUNTD_STORAGE_RETRIES", "2")
    files = {"a.bin": os.urandom(300_000), "b.bin": os.urandom(300_000)}
    put_blobs(flaky.container, files)
    mp = mounter("flaky", "--cache-dir", tmp_path / "cache", "--block-size", "64KiB", "--memory-cache", "1MiB",
                 "--readahead-blocks", "0")
    assert sorted(os.listdir(mp)) == ["a.bin", "b.bin"]
    assert (mp / "a.bin").read_bytes() == files["a.bin"]
    flaky.outage("reset")
    started = time.monotonic()
    with pytest.raises(OSError) as e:
        (mp / "b.bin").read_bytes()
    assert e.value.errno == errno.EIO
    assert time.monotonic() - started < 15
    log = open(runtime.log_path(str(mp)), encoding="utf-8").read()
    assert "read b.bin at 0: " in log
    flaky.restore()
    assert (mp / "b.bin").read_bytes() == files["b.bin"]  # no remount, no help
    verified(files["b.bin"])


def test_outage_during_uploads_fails_clearly_and_keeps_outputs(flaky, tmp_path):
    script = tmp_path / "child.py"
    script.write_text("import os, sys, time\n"
                      "out = sys.argv[1]\n"
                      "open(os.path.join(out, 'result.bin'), 'wb').write(b'r' * 100000)\n"
                      "open(os.path.join(out, '.ready'), 'w').close()\n"
                      "while not os.path.exists(os.path.join(out, '.go')): time.sleep(0.05)\n"
                      "os.unlink(os.path.join(out, '.go')); os.unlink(os.path.join(out, '.ready'))\n")
    manifest = tmp_path / "job.yaml"
    out = tmp_path / "work" / "uploads" / "outputs"
    manifest.write_text(yaml.safe_dump({
        "run_id": "o1", "work_dir": str(tmp_path / "work"),
        "data_references": {"outputs": {"datastore": "flaky", "path_on_datastore": "runs/o1", "mode": "upload"}},
        "command": [sys.executable, str(script), "$AZUREML_DATAREFERENCE_outputs"]}))
    proc = subprocess.Popen([sys.executable, "-m", "mountd", "run", str(manifest)], stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, MOUNTD_STORAGE_RETRIES="2"))
    deadline = time.monotonic() + 60
    while not (out / ".ready").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    flaky.outage("reset")  # storage goes away while the job runs
    (out / ".go").touch()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    assert "upload" in err and "outputs" in err and "Traceback" not in err, err
    (job,) = Journal(tmp_path / "work").pending()
    assert job.origin == "upload reference outputs" and job.remaining() == [(str(out / "result.bin"),
                                                                              "runs/o1/result.bin")]
    assert (out / "result.bin").read_bytes() == b"r" * 100000  # kept locally
    flaky.restore()
    r = subprocess.run([sys.executable, "-m", "mountd", "resume", "--work-dir", str(tmp_path / "work"),
                        "--no-progress"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert flaky.container.download_blob("runs/o1/result.bin").readall() == b"r" * 100000
    assert not Journal(tmp_path / "work").pending()


def test_unmount_during_an_outage_completes(flaky, tmp_path, mounter, mountd_cli, monkeypatch):
    monkeypatch.setenv("MOUNTD_STORAGE_RETRIES", "2")
    flaky.container.upload_blob("held.bin", os.urandom(200_000))
    mp = mounter("flaky", "--cache-dir", tmp_path / "cache", "--block-size", "64KiB", "--memory-cache", "1MiB")
    assert os.listdir(mp) == ["held.bin"]
    flaky.outage("stall")  # requests are taken and never answered
    reader = subprocess.Popen([sys.executable, "-c", f"open({str(mp / 'held.bin')!r}, 'rb').read()"],
                              stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    assert reader.poll() is None  # blocked on storage
    started = time.monotonic()
    r = mountd_cli("unmount", mp, "--lazy")
    assert r.code == 0, r
    _, err = reader.communicate(timeout=30)
    assert reader.returncode != 0 and "Input/output error" in err, err
    record_gone = time.monotonic() + 30
    while runtime.read_record(str(mp)) is not None and time.monotonic() < record_gone:
        time.sleep(0.1)
    assert runtime.read_record(str(mp)) is None and not mounts.is_mounted(str(mp))
    assert time.monotonic() - started < 30
    flaky.restore()


def test_a_lost_answer_to_a_create_only_upload_is_not_a_skip_or_failure(flaky, tmp_path, mountd_cli):
    # Storage stores the blob, then the connection breaks before its answer
    # arrives; the retry finds the blob there ("409 already exists" for a
    # put, "412" for a block-list commit). It is ours: uploaded, not skipped.
    src = tmp_path / "src"
    src.mkdir()
    small, large = os.urandom(100_000), os.urandom(33 << 20)  # one request; staged blocks and a commit
    (src / "small.bin").write_bytes(small)
    (src / "large.bin").write_bytes(large)
    flaky.only = lambda method, target: method == "PUT" and ("comp=block" not in target or "blocklist" in target)
    flaky.set(reset=1.0)
    flaky.limit = 2
    r = mountd_cli("upload", "flaky", src)
    assert r.code == 0, r
    assert "uploaded 2 files" in r.out and "skipped" not in r.out, r
    assert flaky.counts["reset"] == 2
    assert flaky.container.download_blob("small.bin").readall() == small
    assert flaky.container.download_blob("large.bin").readall() == large
    verified(small), verified(large)
    # a blob that really was there before is still skipped, never replaced
    (src / "small.bin").write_bytes(b"changed")
    flaky.limit = 1
    r = mountd_cli("upload", "flaky", src)
    assert r.code == 0 and "skipped 1 existing and unchanged" in r.out, r  # large.bin
    assert "NOT uploaded 1 that storage holds in a different version (small.bin;" in r.out, r  # and said so
    assert flaky.container.download_blob("small.bin").readall() == small


# -- the dataset prefetch --------------------------------------------------------------------
def _prefetch_status(mp, timeout: float = 90) -> dict:
    from mountd.run import control
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = control.query(runtime.control_path(str(mp)))["prefetch"]
        if p["state"] in ("done", "stopped"):
            return p
        time.sleep(0.1)
    raise AssertionError(f"prefetch of {mp} not finished after {timeout} s")


def test_prefetch_through_resets_and_stalls_while_the_job_reads(flaky, tmp_path, mounter):
    files = dataset(random.Random(7), small=120, big=3 << 20)
    put_blobs(flaky.container, files)
    flaky.set(**HARSH)
    mp = mounter("flaky", "--prefetch", "--cache-dir", tmp_path / "cache", "--block-size", "256KiB",
                 "--memory-cache", "4MiB")
    got = tree(mp)  # the job reads everything while the prefetch runs: no error reaches it
    assert_same(got, files)
    p = _prefetch_status(mp)
    assert p["state"] == "done" and p["files"] == len(files) and p["files_failed"] == 0, p
    assert flaky.counts["reset"] >= 5 and flaky.counts["stall"] >= 3, flaky.counts
    log = open(runtime.log_path(str(mp)), encoding="utf-8").read()
    assert "error" not in log.lower() and "dataset prefetch done" in log, log


def test_prefetch_in_an_outage_stops_and_leaves_the_rest_to_reads(flaky, tmp_path, mounter, monkeypatch):
    monkeypatch.setenv("MOUNTD_STORAGE_RETRIES", "1")
    files = {f"data/f{i:04d}.bin": random.Random(i).randbytes(20_000) for i in range(600)}
    put_blobs(flaky.container, files)
    mp = mounter("flaky", "--prefetch", "--cache-dir", tmp_path / "cache", "--block-size", "256KiB",
                 "--memory-cache", "4MiB")
    flaky.outage("reset")
    p = _prefetch_status(mp, timeout=60)
    assert p["state"] == "stopped" and p["files"] < len(files), p
    assert "storage failed" in p["stopped"] or "cannot list" in p["stopped"], p
    log = open(runtime.log_path(str(mp)), encoding="utf-8").read()
    assert "dataset prefetch stopped" in log and "the rest is read on demand" in log, log
    flaky.restore()
    assert_same(tree(mp), files)  # on demand, without a remount
