"""`mountd daemon` under a harness that plays systemd's part: a real
NOTIFY_SOCKET (an abstract-namespace datagram socket) collecting what the
daemon tells the service manager, Azurite behind the datastores, real FUSE
mounts, real signals; `mountd status` read as a user would."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
import yaml

from mountd.run import mounts
from tests.conftest import KEY
from mountd.config import datastores
from mountd.journal import Journal, datastore_record
from tests.support.azurite import blob_workspace_entry, blobs, job_workspace

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INPUTS = {"a.txt": b"alpha", "dir/b.bin": os.urandom(300_000)}


class FakeSystemd:
    """The service manager's end of $NOTIFY_SOCKET. `check_ready` runs in
    the receiving thread the moment READY=1 arrives, so what it sees is the
    state of the node when the daemon declared itself ready."""

    def __init__(self, check_ready=None):
        self.address = f"@mountd-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.address[1:])
        self.sock.settimeout(0.2)
        self.messages: list[dict] = []
        self.check_ready = check_ready
        self.at_ready = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            if fields.get("READY") == "1" and self.check_ready:
                self.at_ready = self.check_ready()
            self.messages.append(fields)

    def wait_for(self, key, value="1", timeout=90.0, proc=None):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(m.get(key) == value for m in self.messages):
                return True
            if proc is not None and proc.poll() is not None:
                return False
            time.sleep(0.05)
        return False

    def values(self, key):
        return [m[key] for m in self.messages if key in m]

    def close(self):
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def service(tmp_path, azurite, container, monkeypatch):
    """Inputs in Azurite, a workspace, and start(manifest_changes, env) ->
    (process, fake systemd, paths). Everything is stopped afterwards."""
    job_workspace(tmp_path, azurite, container, monkeypatch, INPUTS)
    work = tmp_path / "work"
    paths = {"mount": work / "mounts" / "inputs", "staged": work / "downloads" / "staged",
             "outputs": work / "uploads" / "outputs", "work": work, "stderr": tmp_path / "daemon.stderr"}
    started = []

    def start(changes=None, env=None, check_ready=None, manifest_only=False):
        body = {
            "run_id": "svc1",
            "data_references": {
                "inputs": {"datastore": "blob", "path_on_datastore": "datasets/in", "mode": "mount"},
                "staged": {"datastore": "blob", "path_on_datastore": "datasets/in", "mode": "download"},
                "outputs": {"datastore": "blob", "path_on_datastore": "runs/{run_id}/out/{node_rank}",
                            "mode": "upload"},
            },
            "work_dir": str(work),
            "cache": {"dir": str(tmp_path / "cache")},
        }
        for key, value in (changes or {}).items():
            if value is None:
                body["data_references"].pop(key, None)
            elif key in body["data_references"]:
                body["data_references"][key] = value
            else:
                body[key] = value
        manifest = tmp_path / "svc.yaml"
        manifest.write_text(yaml.safe_dump(body))
        if manifest_only:
            return manifest
        systemd = FakeSystemd(check_ready)
        full_env = dict(os.environ, NOTIFY_SOCKET=systemd.address, **(env or {}))
        with open(paths["stderr"], "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "mountd", "daemon", str(manifest)], cwd=REPO,
                                    env=full_env, stdout=subprocess.DEVNULL, stderr=err)
        started.append((proc, systemd))
        return proc, systemd

    start.paths = paths
    start.container = container
    yield start
    for proc, systemd in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        systemd.close()
    if mounts.is_mounted(str(paths["mount"])):
        subprocess.run(["fusermount3", "-u", "-z", str(paths["mount"])])


def status_json():
    r = subprocess.run([sys.executable, "-m", "mountd", "status", "--json"], capture_output=True, text=True,
                       cwd=REPO, timeout=30)
    assert r.returncode == 0, r.stderr
    assert KEY not in r.stdout and KEY[:20] not in r.stdout
    return json.loads(r.stdout)


def parse_prometheus(text):
    """{(name, frozenset(labels)): value}; fails on any malformed line."""
    import re
    sample = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (-?[0-9.e+]+|NaN)$')
    label = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')
    out, typed = {}, set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge") and name not in typed
            typed.add(name)
            continue
        if line.startswith("# HELP "):
            continue
        m = sample.match(line)
        assert m, f"not a Prometheus sample: {line!r}"
        labels = frozenset(label.findall(m.group(2) or ""))
        assert m.group(1) in typed
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def wait_until(predicate, timeout=60.0, step=0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


@pytest.mark.fuse
def test_daemon_lifecycle_under_a_notify_socket(service):
    problem = mounts.fuse_problem()
    if problem:
        pytest.fail(problem) if os.environ.get("CI") else pytest.skip(problem)
    p = service.paths

    def at_ready():
        staged = p["staged"] / "dir" / "b.bin"
        return {"mounted": mounts.is_mounted(str(p["mount"])),
                "staged": staged.exists() and staged.read_bytes() == INPUTS["dir/b.bin"]}

    proc, systemd = service(env={"WATCHDOG_USEC": "1000000"}, check_ready=at_ready)
    assert systemd.wait_for("READY", proc=proc), p["stderr"].read_text()
    # READY=1 came only once the mount was live and the download on disk
    assert systemd.at_ready == {"mounted": True, "staged": True}
    statuses = systemd.values("STATUS")
    assert any(s.startswith("staging") for s in statuses) and any(s.startswith("ready:") for s in statuses)
    assert systemd.messages.index(next(m for m in systemd.messages if m.get("READY") == "1")) > 0

    # reading through the mount shows in `mountd status`
    assert (p["mount"] / "dir" / "b.bin").read_bytes() == INPUTS["dir/b.bin"]
    report = status_json()
    [daemon] = report["daemons"]
    assert daemon["phase"] == "ready" and daemon["run_id"] == "svc1" and daemon["pid"] == proc.pid
    assert [s["name"] for s in daemon["staging"]] == ["staged"] and daemon["staging"][0]["done"]
    assert daemon["staging"][0]["files_total"] == 2 and daemon["staging"][0]["bytes"] == 300_005
    assert daemon["uploads"][0]["path"] == "runs/svc1/out/0" and daemon["uploads"][0]["state"] == "at stop"
    [mount] = report["mounts"]
    assert mount["mountpoint"] == str(p["mount"]) and mount["datastore"] == "blob"
    assert mount["path"] == "datasets/in" and mount["mode"] == "ro" and mount["owner"] == proc.pid
    assert mount["bytes_served"] >= 300_000 and mount["cache"]["bytes_from_storage"] >= 300_000
    assert mount["cache"]["misses"] >= 1 and mount["cache"]["memory_used"] > 0
    assert 0 < mount["cache"]["memory_max"] and mount["cache"]["disk_max"] > 0

    prom = subprocess.run([sys.executable, "-m", "mountd", "status", "--prometheus"], capture_output=True,
                          text=True, cwd=REPO, timeout=30)
    samples = parse_prometheus(prom.stdout)
    labels = frozenset({("mountpoint", str(p["mount"])), ("datastore", "blob"), ("path", "datasets/in")})
    assert samples[("mountd_mount_bytes_served_total", labels)] == mount["bytes_served"] or \
        samples[("mountd_mount_bytes_served_total", labels)] >= 300_000
    assert samples[("mountd_mount_up", labels)] == 1
    daemon_labels = frozenset({("manifest", daemon["manifest"]), ("run_id", "svc1")})
    assert samples[("mountd_daemon_ready", daemon_labels)] == 1
    assert samples[("mountd_staging_bytes", daemon_labels | {("reference", "staged")})] == 300_005

    assert wait_until(lambda: len(systemd.values("WATCHDOG")) >= 2, timeout=10)

    # a mount worker killed outright is replaced, and the mount works again
    old_pid = mount["pid"]
    os.kill(old_pid, signal.SIGKILL)

    def restarted():
        mounts_now = status_json()["mounts"]
        return mounts_now and mounts_now[0]["pid"] != old_pid and mounts_now
    assert wait_until(restarted, timeout=60), p["stderr"].read_text()
    assert (p["mount"] / "a.txt").read_bytes() == b"alpha"
    log = p["stderr"].read_text()
    assert f"mount worker {old_pid} for inputs on {p['mount']} died (killed by SIGKILL); restarting it" in log
    assert status_json()["daemons"][0]["mounts"][0]["restarts"] == 1

    # SIGTERM: STOPPING=1, unmount, upload, exit 0
    (p["outputs"] / "model.bin").write_bytes(b"\x02" * 1000)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 0, p["stderr"].read_text()
    assert systemd.wait_for("STOPPING", timeout=5)
    assert blobs(service.container, "runs/svc1/out/0/") == {"model.bin": b"\x02" * 1000}
    assert not mounts.is_mounted(str(p["mount"]))
    assert status_json() == {"daemons": [], "mounts": []}
    log = p["stderr"].read_text()
    assert KEY not in log and "Traceback" not in log
    # its last line says what went where
    last = log.strip().splitlines()[-1]
    assert "stopped with exit code 0: mounts detached; outputs: outputs: 1 file (1000 B) to http" in last, last
    assert last.endswith(f"/{service.container.container_name}/runs/svc1/out/0"), last


def test_a_run_on_the_daemons_work_dir_is_refused_naming_the_daemon(service):
    proc, systemd = service({"inputs": None}, env={"MOUNTD_NO_FUSE": "1"})
    assert systemd.wait_for("READY", proc=proc), service.paths["stderr"].read_text()
    manifest = service.paths["work"].parent / "svc.yaml"
    r = subprocess.run([sys.executable, "-m", "mountd", "run", str(manifest), "--", sys.executable, "-c", "pass"],
                       capture_output=True, text=True, cwd=REPO, timeout=60, env=dict(os.environ, MOUNTD_NO_FUSE="1"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == (f"mountd: error: work dir {service.paths['work']} is in use by another mountd "
                                f"(pid {proc.pid} (mountd daemon {manifest})): wait for it to finish, or give this "
                                "run another --work-dir or run_id"), r.stderr
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0


def test_failed_upload_exits_3_with_a_clear_line(service, azurite):
    # FUSE left out: this is about the stop path
    proc, systemd = service({"datastores": {"gone": blob_workspace_entry(azurite, "no-such-container")},
                             "outputs": {"datastore": "gone", "path_on_datastore": "out", "mode": "upload"}},
                            env={"MOUNTD_NO_FUSE": "1"})
    assert systemd.wait_for("READY", proc=proc), service.paths["stderr"].read_text()
    (service.paths["outputs"] / "result.txt").write_text("kept")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 3
    log = service.paths["stderr"].read_text()
    assert "stopped with exit code 3: 1 step(s) failed (first: upload outputs:" in log, log
    assert (service.paths["outputs"] / "result.txt").read_text() == "kept"
    (job,) = Journal(service.paths["work"]).pending()
    assert job.origin == "upload reference outputs" and job.remaining()[0][1] == "out/result.txt"


def test_pending_uploads_of_an_earlier_run_are_resumed_at_start(service, azurite, container):
    outputs = service.paths["outputs"]
    outputs.mkdir(parents=True)
    (outputs / "left.txt").write_text("from the crashed run")
    cfg = datastores.parse("blob", blob_workspace_entry(azurite, container.container_name), "test")
    Journal(service.paths["work"]).add(datastore_record(cfg), [(str(outputs / "left.txt"), "earlier/out/left.txt")],
                                       origin="upload reference outputs", run_id="svc1")  # as a crashed run left it
    proc, systemd = service({"inputs": None}, env={"MOUNTD_NO_FUSE": "1"})
    assert systemd.wait_for("READY", proc=proc), service.paths["stderr"].read_text()
    assert blobs(service.container, "earlier/out/") == {"left.txt": b"from the crashed run"}
    assert not Journal(service.paths["work"]).pending()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    assert "left.txt" in blobs(service.container, "runs/svc1/out/0/")


def test_staging_failure_never_sends_ready(service):
    proc, systemd = service({"staged": {"datastore": "blob", "path_on_datastore": "datasets/missing",
                                        "mode": "download"}}, env={"MOUNTD_NO_FUSE": "1"})
    assert proc.wait(120) == 3
    assert not systemd.wait_for("READY", timeout=0.5)
    assert "datasets/missing" in service.paths["stderr"].read_text()


def test_bad_manifest_is_one_line_exit_2_and_touches_nothing(service):
    manifest = service({"inputs": {"datastore": "nope", "mode": "mount"}}, manifest_only=True)
    r = subprocess.run([sys.executable, "-m", "mountd", "daemon", str(manifest)], capture_output=True, text=True,
                       cwd=REPO, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("mountd: error: ")
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not service.paths["work"].exists()


def test_stop_timeout_from_the_environment_is_checked(service):
    manifest = service({"inputs": None}, manifest_only=True)
    r = subprocess.run([sys.executable, "-m", "mountd", "daemon", str(manifest)], capture_output=True, text=True,
                       cwd=REPO, timeout=60, env=dict(os.environ, DATASET_UNMOUNT_TIMEOUT_SECONDS="soon"))
    assert r.returncode == 2 and "DATASET_UNMOUNT_TIMEOUT_SECONDS" in r.stderr
    assert not service.paths["work"].exists()
