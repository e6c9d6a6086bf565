"""The service's small parts on real sockets: sd_notify messages (path and
abstract addresses, watchdog, keepalive), control sockets (permissions, long
paths, scrubbing), pruning of dead records, status formats."""

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid

import pytest

from mountd.run import control, notify, runtime, status
from tests.conftest import KEY


def _listener(address: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + address[1:] if address.startswith("@") else address)
    s.settimeout(5)
    return s


def _fields(data: bytes) -> dict:
    return dict(line.split("=", 1) for line in data.decode().splitlines())


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_notify_sends_to_path_and_abstract_sockets_and_unsets_the_environment(kind, tmp_path):
    address = str(tmp_path / "notify") if kind == "path" else f"@mountd-unit-{uuid.uuid4().hex}"
    listener = _listener(address)
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000", "OTHER": "x"}
    n = notify.Notifier(env)
    assert env == {"OTHER": "x"}  # children must not speak for the service
    assert n.enabled and n.watchdog_interval == 1.0
    n.ready("ready: two\nlines")
    assert _fields(listener.recv(4096)) == {"READY": "1", "STATUS": "ready: two lines"}
    n.extend_timeout(30)
    assert _fields(listener.recv(4096)) == {"EXTEND_TIMEOUT_USEC": "30000000"}
    n.watchdog()
    n.watchdog()  # within the interval: not sent again
    n.stopping("bye")
    assert _fields(listener.recv(4096)) == {"WATCHDOG": "1"}
    assert _fields(listener.recv(4096)) == {"STOPPING": "1", "STATUS": "bye"}
    n.close()
    listener.close()


def test_notify_without_a_socket_does_nothing_and_watchdog_for_another_pid_is_off():
    n = notify.Notifier({})
    assert not n.enabled and n.send(READY=1) is False
    n = notify.Notifier({"NOTIFY_SOCKET": "relative/path", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"})
    assert not n.enabled and n.watchdog_interval is None


def _collect(listener, messages, stop):
    listener.settimeout(0.05)
    while not stop.is_set():
        try:
            messages.append(_fields(listener.recv(4096)))
        except socket.timeout:
            pass


def test_keepalive_extends_only_while_progress_moves(tmp_path, monkeypatch):
    listener = _listener(str(tmp_path / "n"))
    messages, stop = [], threading.Event()
    reader = threading.Thread(target=_collect, args=(listener, messages, stop))
    reader.start()
    monkeypatch.setattr(notify.Keepalive, "TICK", 0.05)
    monkeypatch.setattr(notify.Keepalive, "EXTEND", 0.3)
    moved = [0]
    n = notify.Notifier({"NOTIFY_SOCKET": str(tmp_path / "n")})
    with notify.Keepalive(n, lambda: (f"moved {moved[0]}", moved[0])):
        for _ in range(10):  # progressing
            moved[0] += 1
            time.sleep(0.05)
        time.sleep(0.8)  # stuck
    time.sleep(0.2)
    stop.set()
    reader.join()
    assert any("EXTEND_TIMEOUT_USEC" in m for m in messages[:5])
    assert all("STATUS" in m for m in messages)
    assert messages[-1].get("STATUS", "").startswith("moved") and "EXTEND_TIMEOUT_USEC" not in messages[-1]


def test_control_socket_is_private_answers_status_and_scrubs_secrets(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)  # past the 108-byte limit of socket addresses
    deep.mkdir(parents=True)
    path = str(deep / "x.sock")
    server = control.ControlServer(path, lambda: {"n": 1, "oops": f"AccountKey={KEY};"})
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        answer = control.query(path)
        assert answer["n"] == 1 and KEY not in json.dumps(answer) and "REDACTED" in answer["oops"]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(f"/proc/self/fd/{os.open(str(deep), os.O_PATH)}/x.sock")
            s.sendall(b'{"request": "shutdown"}\n')
            reply = json.loads(s.makefile().readline())
        assert reply["ok"] is False and "unknown request" in reply["error"]
        assert control.query(path)["n"] == 1  # still serving
    finally:
        server.close()
    assert not os.path.exists(path)
    with pytest.raises(OSError):
        control.query(path)


@pytest.fixture
def mountd_like():
    """A live process whose command line names mountd, as records' owners do."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "mountd"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_notify_send_to_a_full_queue_gives_up_instead_of_hanging(tmp_path, monkeypatch):
    listener = _listener(str(tmp_path / "n"))  # never read
    monkeypatch.setattr(notify, "SEND_TIMEOUT", 0.05)
    n = notify.Notifier({"NOTIFY_SOCKET": str(tmp_path / "n")})
    started = time.monotonic()
    for i in range(30):
        n.status(f"line {i}")
    assert time.monotonic() - started < 10
    assert n.send(STATUS="more") is False
    listener.close()


def test_records_of_dead_processes_are_pruned(mountd_like):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stem = os.path.join(runtime.mounts_dir(), "deadbeefdeadbeef")
    runtime.write_json(stem + ".json", {"pid": dead.pid, "mountpoint": "/gone"})
    open(stem + ".sock", "w").close()
    live_stem = os.path.join(runtime.mounts_dir(), "0123456789abcdef")
    runtime.write_json(live_stem + ".json", {"pid": mountd_like, "mountpoint": "/here"})
    recycled = os.path.join(runtime.mounts_dir(), "1111111111111111")
    runtime.write_json(recycled + ".json", {"pid": os.getpid(), "mountpoint": "/recycled"})  # not a mountd
    records = runtime.live_records("mounts")
    assert [r["mountpoint"] for r in records] == ["/here"]
    assert not os.path.exists(stem + ".json") and not os.path.exists(stem + ".sock")


def test_instance_runtime_directories_are_searched(mountd_like):
    instance = os.path.join(runtime.runtime_dir(), "train-a")
    os.makedirs(os.path.join(instance, "daemons"))
    runtime.write_json(os.path.join(instance, "daemons", "x.json"), {"pid": mountd_like, "manifest": "/m.yaml"})
    assert [r["manifest"] for r in runtime.live_records("daemons")] == ["/m.yaml"]


def test_status_formats():
    assert status.as_text({"daemons": [], "mounts": []}).startswith("nothing running")
    mount = {"mountpoint": '/a "b"\\c', "datastore": "d", "path": "", "mode": "ro", "pid": 5,
             "bytes_served": 12345678901234, "read_errors": 0, "open_files": 2,
             "cache": {"hit_ratio": 0.5, "memory_hits": 1, "disk_hits": 0, "misses": 1, "bytes_from_storage": 7,
                       "bytes_from_disk": 0, "memory_used": 1, "memory_max": 2, "disk_used": 3, "disk_max": 4}}
    text = status.as_prometheus({"daemons": [], "mounts": [mount, {"mountpoint": "/x", "pid": 9, "error": "no"}]})
    assert 'mountd_mount_bytes_served_total{mountpoint="/a \\"b\\"\\\\c",datastore="d",path=""} 12345678901234' \
        in text.splitlines()
    assert 'mountd_mount_up{mountpoint="/x",datastore="None",path=""} 0' in text.splitlines()
    assert text.count("# TYPE mountd_mount_up gauge") == 1
    lines = status.as_text({"daemons": [], "mounts": [mount]}).splitlines()
    assert "hit ratio 50.0%" in lines[1] and "2 open file(s)" in lines[2]


def test_credential_files_may_live_in_the_systemd_credentials_directory(tmp_path, monkeypatch):
    from mountd.config import credentials
    (tmp_path / "storage-key").write_text(KEY + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    cred = credentials.resolve({"account_key_file": "${CREDENTIALS_DIRECTORY}/storage-key"}, "ds")
    assert cred.kind == "account_key" and cred.secret == KEY
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(credentials.ConfigError, match="cannot read account_key file"):
        credentials.resolve({"account_key_file": "${CREDENTIALS_DIRECTORY}/storage-key"}, "ds")


def test_the_restart_counter_never_goes_down_when_old_deaths_leave_the_window(monkeypatch):
    from mountd.run import daemon
    from mountd.run.notify import Notifier

    class Ref:
        name = "inputs"
    slot = daemon._Slot(ref=Ref(), worker=None, spec={})
    d = daemon.Daemon.__new__(daemon.Daemon)
    d.notifier = Notifier()
    seen = []
    for i in range(4):  # a death every 20 minutes: never more than one in the window
        d._count_death(slot, now=i * 2 * daemon.RESTART_WINDOW)
        seen.append(slot.restarts)
    assert seen == [1, 2, 3, 4] and len(slot.deaths) == 1 and slot.state == "restarting"
