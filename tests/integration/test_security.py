"""Security rules, each tried against the real thing: secrets never on any
process's command line, in logs, messages or files mountd writes; a mount
hidden from other users unless --allow-other; mount workers without the
privileges they do not need; uploads that never follow a link out of the
outputs; downloads that never write outside their target, even when storage
lists hostile names."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from urllib.parse import quote, unquote

import pytest
import yaml

from mountd.run import mounts, runtime
from tests.conftest import KEY, KEY_ENV
from tests.support.azurite import ACCOUNT, blob_workspace_entry

SAS_ENV = "TEST_SAS_TOKEN"
NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "--"]


def sas_token(container) -> str:
    """An account SAS, as a user would put in a datastore's credential."""
    from azure.storage.blob import AccountSasPermissions, ResourceTypes, generate_account_sas
    return generate_account_sas(ACCOUNT, KEY, ResourceTypes(service=True, container=True, object=True),
                                AccountSasPermissions(read=True, write=True, list=True, create=True, add=True,
                                                      delete=True),
                                expiry=datetime.now(timezone.utc) + timedelta(hours=1))


def secret_forms(secret: str) -> list[str]:
    """The secret as it might leak: whole, URL-encoded or decoded, and its
    signature alone."""
    forms = {secret, quote(secret, safe=""), unquote(secret)}
    sig = re.search(r"sig=([^&]+)", secret)
    if sig:
        forms |= {sig.group(1), unquote(sig.group(1))}
    return sorted(f for f in forms if len(f) >= 16)


def files_containing(root, needles) -> list[str]:
    hits = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:
                continue
            if any(n.encode() in data for n in needles):
                hits.append(path)
    return hits


def cmdlines_containing(needles) -> list[str]:
    hits = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    line = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if any(n in line for n in needles):
                hits.append(f"{pid}: {line[:200]}")
    return hits


CHILD = r'''
import os, sys, time
inputs, staged, out = sys.argv[1:4]
assert open(os.path.join(inputs, "in.txt")).read() == "input"
assert open(os.path.join(staged, "in.txt")).read() == "input"
open(os.path.join(out, "result.txt"), "w").write("result")
open(os.path.join(out, ".ready"), "w").close()
while not os.path.exists(os.path.join(out, ".go")):
    time.sleep(0.05)
os.unlink(os.path.join(out, ".go")); os.unlink(os.path.join(out, ".ready"))
'''


@pytest.mark.parametrize("credential", ["account_key", "sas_token"])
def test_secrets_never_on_argv_in_logs_or_in_files(credential, tmp_path, azurite, container, fault_proxy):
    if mounts.fuse_problem():
        pytest.skip(mounts.fuse_problem())
    container.upload_blob("in/in.txt", b"input")
    secret = KEY if credential == "account_key" else sas_token(container)
    needles = secret_forms(secret)
    proxy = fault_proxy(azurite.port, seed=3, reset=0.2, error_500=0.1)  # errors get logged, with their details
    entry = blob_workspace_entry(azurite, container.container_name)
    entry["endpoint"] = proxy.url(azurite.account_url)
    entry["credential"] = {f"{credential}_env": SAS_ENV if credential == "sas_token" else KEY_ENV}
    ws = tmp_path / "ws.yaml"
    ws.write_text(yaml.safe_dump({"datastores": {"store": entry}}))
    (tmp_path / "child.py").write_text(CHILD)
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump({
        "run_id": "s1", "work_dir": str(tmp_path / "work"), "cache": {"dir": str(tmp_path / "cache")},
        "data_references": {
            "inputs": {"datastore": "store", "path_on_datastore": "in", "mode": "mount"},
            "staged": {"datastore": "store", "path_on_datastore": "in", "mode": "download"},
            "outputs": {"datastore": "store", "path_on_datastore": "out", "mode": "upload"}},
        "command": [sys.executable, str(tmp_path / "child.py"), "$AZUREML_DATAREFERENCE_inputs",
                    "$AZUREML_DATAREFERENCE_staged", "$AZUREML_DATAREFERENCE_outputs"]}))
    env = dict(os.environ, MOUNTD_WORKSPACE=str(ws), MOUNTD_STORAGE_READ_TIMEOUT="1s", MOUNTD_STORAGE_BACKOFF="20ms",
               MOUNTD_STORAGE_RETRIES="10")
    env[SAS_ENV if credential == "sas_token" else KEY_ENV] = secret
    proc = subprocess.Popen([sys.executable, "-m", "mountd", "--debug", "run", str(manifest)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out_dir = tmp_path / "work" / "uploads" / "outputs"
    deadline = time.monotonic() + 60
    while not (out_dir / ".ready").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert (out_dir / ".ready").exists(), proc.communicate()
    assert cmdlines_containing(needles) == []  # mountd, its mount worker, the child: none has it
    (out_dir / ".go").touch()
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert container.download_blob("out/result.txt").readall() == b"result"
    assert "DEBUG" in stderr.upper() and len(stderr) > 1000  # the debug log was really on
    if credential == "sas_token":  # requests were logged with their query strings, scrubbed
        assert "sig=REDACTED" in stderr, stderr[-3000:]
    for needle in needles:
        assert needle not in stdout + stderr
    assert files_containing(tmp_path, needles) == []  # work dir, cache, mount records, worker logs
    assert files_containing(runtime.runtime_dir(), needles) == []


def test_secret_not_in_messages_when_storage_is_unreachable(tmp_path, azurite, container, fault_proxy, mountd_cli):
    secret = sas_token(container)
    proxy = fault_proxy(azurite.port)
    proxy.outage("reset")
    entry = blob_workspace_entry(azurite, container.container_name)
    entry["endpoint"] = proxy.url(azurite.account_url)
    entry["credential"] = {"sas_token_env": SAS_ENV}
    ws = tmp_path / "ws.yaml"
    ws.write_text(yaml.safe_dump({"datastores": {"store": entry}}))
    env = {"MOUNTD_WORKSPACE": str(ws), SAS_ENV: secret, "MOUNTD_STORAGE_RETRIES": "1",
           "MOUNTD_STORAGE_BACKOFF": "10ms"}
    for args in (["--debug", "download", "store", tmp_path / "d"], ["download", "store", tmp_path / "d"],
                 ["--debug", "upload", "store", tmp_path]):
        r = mountd_cli(*args, env=env)
        assert r.code == 2 and "cannot reach" in r.err, r
        for needle in secret_forms(secret):
            assert needle not in r.out + r.err, args


# -- who can see a mount ------------------------------------------------------------------
@pytest.fixture
def open_dir():
    """A directory other users can reach (pytest's own tmp dirs are private)."""
    path = tempfile.mkdtemp(prefix="mountd-shared-")
    os.chmod(path, 0o755)
    yield path
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if mounts.is_mounted(full):
            subprocess.run(["fusermount3", "-u", "-z", full], capture_output=True)
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("allow_other", [False, True])
def test_mount_is_private_unless_allow_other(allow_other, open_dir, tmp_path, mountd_cli, monkeypatch):
    if mounts.fuse_problem():
        pytest.skip(mounts.fuse_problem())
    if not shutil.which("setpriv") or os.geteuid() != 0:
        pytest.skip("needs root and setpriv to act as another user")
    root = tmp_path / "root"
    root.mkdir()
    (root / "f.txt").write_text("data")
    ws = tmp_path / "ws.yaml"
    ws.write_text(yaml.safe_dump({"datastores": {"loc": {"type": "local", "root": str(root)}}}))
    monkeypatch.setenv("MOUNTD_WORKSPACE", str(ws))
    control = os.path.join(open_dir, "control")
    os.mkdir(control, 0o755)
    with open(os.path.join(control, "f.txt"), "w") as f:
        f.write("data")
    os.chmod(os.path.join(control, "f.txt"), 0o444)
    # the other user can reach a plain directory here: the test can tell
    assert subprocess.run(NOBODY + ["cat", os.path.join(control, "f.txt")], capture_output=True).returncode == 0
    mp = os.path.join(open_dir, "mp")
    os.mkdir(mp, 0o755)
    flags = ["--allow-other"] if allow_other else []
    r = mountd_cli("mount", "loc", mp, "--no-disk-cache", *flags)
    assert r.code == 0, r
    options = next(line for line in open("/proc/self/mountinfo") if f" {mp} " in line)
    other = subprocess.run(NOBODY + ["cat", os.path.join(mp, "f.txt")], capture_output=True, text=True)
    listing = subprocess.run(NOBODY + ["ls", mp], capture_output=True, text=True)
    if allow_other:
        assert "allow_other" in options and "default_permissions" in options, options
        assert other.returncode == 0 and other.stdout == "data", other
        # default_permissions: the kernel checks modes; nobody may not write even where FUSE would
        assert subprocess.run(NOBODY + ["touch", os.path.join(mp, "new")], capture_output=True).returncode != 0
    else:
        assert "allow_other" not in options
        assert other.returncode != 0 and "Permission denied" in other.stderr, other
        assert listing.returncode != 0, listing
    assert open(os.path.join(mp, "f.txt")).read() == "data"  # its owner always can
    assert mountd_cli("unmount", mp).code == 0


# -- uploads and downloads stay in their trees ----------------------------------------------
def test_uploads_never_follow_a_link_out_of_the_outputs(tmp_path, workspace_file, container, monkeypatch):
    monkeypatch.setenv("MOUNTD_WORKSPACE", str(workspace_file))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not for upload")
    (outside / "deep").mkdir()
    (outside / "deep" / "also.txt").write_text("not for upload")
    script = tmp_path / "child.py"
    script.write_text(
        "import os, sys\nout, outside = sys.argv[1], sys.argv[2]\n"
        "open(os.path.join(out, 'model.bin'), 'wb').write(b'm' * 1000)\n"
        "os.symlink(os.path.join(outside, 'secret.txt'), os.path.join(out, 'leak.txt'))\n"
        "os.symlink(outside, os.path.join(out, 'leakdir'))\n"
        "os.symlink('../../../../outside/secret.txt', os.path.join(out, 'relative-leak.txt'))\n"
        "os.symlink('model.bin', os.path.join(out, 'alias.bin'))\n"  # inside: fine
        "os.makedirs(os.path.join(out, 'sub'))\n"
        "os.symlink('../model.bin', os.path.join(out, 'sub', 'up-but-inside.bin'))\n")
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump({
        "run_id": "l1", "work_dir": str(tmp_path / "work"),
        "data_references": {"outputs": {"datastore": "blobstore", "path_on_datastore": "out", "mode": "upload"}},
        "command": [sys.executable, str(script), "$AZUREML_DATAREFERENCE_outputs", str(outside)]}))
    r = subprocess.run([sys.executable, "-m", "mountd", "run", str(manifest)], capture_output=True, text=True,
                       timeout=120)
    stored = {b.name: container.download_blob(b.name).readall() for b in container.list_blobs()}
    assert sorted(stored) == ["out/alias.bin", "out/model.bin", "out/sub/up-but-inside.bin"], r.stderr
    assert all(data == b"m" * 1000 for data in stored.values())
    assert not any(b"not for upload" in data for data in stored.values())
    # the refused links are named, and the run says its outputs are incomplete
    assert r.returncode == 3, r.stderr
    assert "leak.txt: symbolic link points outside the source directory" in r.stderr
    assert "relative-leak.txt" in r.stderr


HOSTILE = {  # blob the test stores -> name the hostile listing gives it
    "evil-1.txt": "../escape-1.txt",
    "evil-2.txt": "/tmp/escape-2.txt",
    "evil-3.txt": "a\\..\\..\\escape-3.txt",
    "evil-4.txt": "a/../../escape-4.txt",
    "evil-5.txt": "..",
    "evil-6.txt": "sub/./../../../escape-6.txt",
}


@pytest.fixture
def hostile(tmp_path, azurite, container, fault_proxy, monkeypatch):
    """A datastore `hostile` whose listings name blobs `..`, `/abs`, `a\\b`:
    names real storage may hold (or a compromised endpoint may send) and
    Azurite refuses to store."""
    for name in HOSTILE:
        container.upload_blob(name, b"escaped!")
    container.upload_blob("fine/ok.txt", b"ok")

    def rewrite(method, target, body):
        if "comp=list" not in target:
            return None
        for stored, shown in HOSTILE.items():
            body = body.replace(f"<Name>{stored}</Name>".encode(), f"<Name>{shown}</Name>".encode())
        return body
    proxy = fault_proxy(azurite.port)
    proxy.rewrite = rewrite
    entry = blob_workspace_entry(azurite, container.container_name, KEY_ENV)
    entry["endpoint"] = proxy.url(azurite.account_url)
    ws = tmp_path / "ws.yaml"
    ws.write_text(yaml.safe_dump({"datastores": {"hostile": entry}}))
    monkeypatch.setenv("MOUNTD_WORKSPACE", str(ws))
    monkeypatch.setenv(KEY_ENV, KEY)
    return proxy


def escaped_files(*roots) -> list[str]:
    # where the hostile names would land from a target under tmp_path: tmp_path itself (walked), or absolute
    found = [p for p in ("/tmp/escape-2.txt", "/escape-1.txt", "/escape-4.txt", "/escape-6.txt",
                         "/tmp/escape-1.txt", "/tmp/escape-4.txt", "/tmp/escape-6.txt") if os.path.exists(p)]
    for root in roots:
        for dirpath, _, names in os.walk(root):
            found += [os.path.join(dirpath, n) for n in names if n.startswith("escape")]
    return found


def test_downloads_refuse_hostile_names(hostile, tmp_path, mountd_cli):
    dst = tmp_path / "a" / "b" / "dst"
    r = mountd_cli("download", "hostile", dst)
    assert hostile.counts["rewritten"] >= 1
    assert r.code == 3, r
    assert r.err.count("unsafe object name") == len(HOSTILE), r.err
    assert (dst / "fine" / "ok.txt").read_bytes() == b"ok"
    assert escaped_files(tmp_path) == []
    assert sorted(os.listdir(tmp_path / "a" / "b")) == ["dst"]


def test_run_download_reference_refuses_hostile_names(hostile, tmp_path):
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump({
        "run_id": "h1", "work_dir": str(tmp_path / "work"),
        "data_references": {"staged": {"datastore": "hostile", "mode": "download"}},
        "command": [sys.executable, "-c", "print('ran')"]}))
    r = subprocess.run([sys.executable, "-m", "mountd", "run", str(manifest)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 3 and "unsafe object name" in r.stderr, r.stderr
    assert "ran" not in r.stdout  # staging failed: the command is not started
    assert escaped_files(tmp_path) == []


def test_mount_of_hostile_listing_shows_no_path_tricks(hostile, tmp_path, mounter):
    mp = mounter("hostile", "--no-disk-cache")
    names = os.listdir(mp)
    assert "fine" in names
    assert not [n for n in names if "/" in n or n in (".", "..", "")], names
    raw = subprocess.run(["ls", "-a", str(mp)], capture_output=True, text=True).stdout.split()
    assert raw.count("..") == 1 and raw.count(".") == 1, raw
    for name in names:
        path = os.path.join(mp, name)
        if os.path.isfile(path):
            try:
                open(path, "rb").read()
            except OSError:
                pass  # a name storage cannot serve back: an error, never a crash
    assert (mp / "fine" / "ok.txt").read_bytes() == b"ok"  # the worker is still serving
    assert escaped_files(tmp_path) == []


# -- mount workers keep only what they need ------------------------------------------------
SUPERVISOR = r'''
import sys, time
from mountd.config import datastores
from mountd.config.settings import CacheSettings
from mountd.run import mount_worker, mounts
cfg = datastores.parse("loc", {"type": "local", "root": sys.argv[1]}, "test")
spec = mount_worker.make_spec(cfg, "", sys.argv[2], CacheSettings(disk=False))
worker = mounts.start(spec, supervised=True)
print(worker.pid, flush=True)
time.sleep(600)
'''


def _caps(pid: int) -> list[dict]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith("Cap"))
        out.append({k: int(v.strip(), 16) for k, v in fields.items()})
    return out


def test_mount_worker_keeps_only_the_capabilities_it_needs(tmp_path):
    from mountd.run import privileges
    if mounts.fuse_problem():
        pytest.skip(mounts.fuse_problem())
    root, mp = tmp_path / "root", tmp_path / "mp"
    root.mkdir()
    mp.mkdir()
    (root / "f.txt").write_text("data")
    # a supervisor that dies without a word: its worker must still unmount itself, with what it kept
    sup = subprocess.Popen([sys.executable, "-c", SUPERVISOR, str(root), str(mp)], stdout=subprocess.PIPE, text=True)
    pid = int(sup.stdout.readline())
    try:
        assert (mp / "f.txt").read_text() == "data"
        keep = privileges.keep_mask()
        tasks = _caps(pid)
        assert len(tasks) > 1  # FUSE and cache threads too: each inherited the reduced set
        for caps in tasks:
            assert caps["CapEff"] & ~keep == 0 and caps["CapPrm"] & ~keep == 0, caps
            assert caps["CapBnd"] & ~keep == 0 and caps["CapInh"] == 0, caps
            if os.geteuid() == 0:
                assert caps["CapEff"] == keep  # mounting and unmounting still work
    finally:
        sup.kill()
        sup.wait()
    deadline = time.monotonic() + 15
    while mounts.is_mounted(str(mp)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not mounts.is_mounted(str(mp))
    deadline = time.monotonic() + 15
    while runtime.pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not runtime.pid_alive(pid)
