"""`mountd run` end to end: real mounts, Azurite and the Files emulator, a
real child process; exit codes, uploads after success and failure, signals,
PID 1, bad input, and a manifest mixing blob and file share references.
Tests taking `job` run with the references in a blob container and in a
file share."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import KEY, KEY_ENV
from mountd.storage.fileshare import is_temporary
from tests.support.azurite import blob_workspace_entry

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# For the children: sha256 of every file under a directory, by relative name.
DIGEST = r'''
import hashlib, os
def digest(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out
'''

# The child: checks what mountd promised (env vars, arguments, bytes), writes
# outputs, exits with $EXIT_WITH.
CHILD = DIGEST + r'''
import json, sys, time
args = sys.argv[1:]
env = {k: v for k, v in os.environ.items() if k.startswith("AZUREML_DATAREFERENCE_")}
report = {"args": args, "env": env, "inputs": digest(env["AZUREML_DATAREFERENCE_inputs"]),
          "staged": digest(env["AZUREML_DATAREFERENCE_staged"]), "run_id": os.environ.get("MOUNTD_RUN_ID"),
          "epochs": os.environ.get("EPOCHS")}
out = env["AZUREML_DATAREFERENCE_outputs"]
os.makedirs(os.path.join(out, "sub"), exist_ok=True)
open(os.path.join(out, "report.json"), "w").write(json.dumps(report))
open(os.path.join(out, "sub", "model.bin"), "wb").write(b"\x01" * 300000)
if os.environ.get("SLEEP_FOR"):
    import signal
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    open(os.path.join(out, "started"), "w").write("1")
    time.sleep(float(os.environ["SLEEP_FOR"]))
sys.exit(int(os.environ.get("EXIT_WITH", "0")))
'''

INPUTS = {"a.txt": b"alpha", "dir/b.bin": os.urandom(200_000), "dir/deeper/c with space.txt": b"c"}


@pytest.fixture
def job(tmp_path, remote, monkeypatch):
    """A workspace whose datastore `blob` is the container or share of
    `remote`, inputs uploaded, a child script, and a function writing a
    manifest."""
    for name, data in INPUTS.items():
        remote.put(f"datasets/in/{name}", data)
    ws = tmp_path / "ws.yaml"
    ws.write_text(yaml.safe_dump({"datastores": {"blob": remote.entry(KEY_ENV)}}))
    monkeypatch.setenv("MOUNTD_WORKSPACE", str(ws))
    monkeypatch.setenv(KEY_ENV, KEY)
    script = tmp_path / "child.py"
    script.write_text(CHILD)

    def manifest(upload_when="always", **extra):
        body = {
            "run_id": "r1",
            "data_references": {
                "inputs": {"datastore": "blob", "path_on_datastore": "datasets/in", "mode": "mount"},
                "staged": {"datastore": "blob", "path_on_datastore": "datasets/in", "mode": "download"},
                "outputs": {"datastore": "blob", "path_on_datastore": "runs/{run_id}/out", "mode": "upload"},
            },
            "command": [sys.executable, str(script), "--data", "$AZUREML_DATAREFERENCE_inputs",
                        "--out=${AZUREML_DATAREFERENCE_outputs}"],
            "environment": {"EPOCHS": "2"},
            "upload_when": upload_when,
            "work_dir": str(tmp_path / "work"),
            "cache": {"dir": str(tmp_path / "cache")},
        }
        body.update(extra)
        path = tmp_path / "manifest.yaml"
        path.write_text(yaml.safe_dump(body))
        return path
    manifest.remote = remote
    return manifest


def run_cli(*args, env=None, timeout=180):
    full = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "mountd", *map(str, args)], capture_output=True, text=True,
                          env=full, timeout=timeout, cwd=REPO)


def no_mounts_under(root):
    with open("/proc/self/mountinfo") as f:
        return not any(str(root) in line for line in f)


def expected_digest():
    return {k: hashlib.sha256(v).hexdigest() for k, v in INPUTS.items()}


@pytest.mark.fuse
def test_run_end_to_end(job, tmp_path):
    r = run_cli("run", job())
    assert r.returncode == 0, r.stderr
    out = job.remote.files("runs/r1/out")
    report = json.loads(out["report.json"])
    assert report["inputs"] == expected_digest() and report["staged"] == expected_digest()
    assert report["env"]["AZUREML_DATAREFERENCE_inputs"] == str(tmp_path / "work" / "mounts" / "inputs")
    assert report["args"] == ["--data", str(tmp_path / "work" / "mounts" / "inputs"),
                              "--out=" + str(tmp_path / "work" / "uploads" / "outputs")]
    assert report["run_id"] == "r1" and report["epochs"] == "2"
    assert out["sub/model.bin"] == b"\x01" * 300000
    assert no_mounts_under(tmp_path)
    assert (tmp_path / "work" / "uploads" / "outputs" / "report.json").exists()  # local outputs are kept


@pytest.mark.fuse
def test_child_exit_code_passes_through_and_outputs_upload_anyway(job, tmp_path):
    r = run_cli("run", job(), env={"EXIT_WITH": "7"})
    assert r.returncode == 7, r.stderr
    assert "report.json" in job.remote.files("runs/r1/out")
    assert no_mounts_under(tmp_path)


@pytest.mark.fuse
def test_on_success_keeps_outputs_local_after_failure(job, tmp_path):
    r = run_cli("run", job(upload_when="on_success"), env={"EXIT_WITH": "5"})
    assert r.returncode == 5
    assert job.remote.files("runs/r1/out") == {}
    assert (tmp_path / "work" / "uploads" / "outputs" / "report.json").exists()


def test_command_after_double_dash_overrides_and_fuse_fallback(job, tmp_path):
    marker = tmp_path / "ran"
    r = run_cli("run", job(), "--", sys.executable, "-c",
                f"import os; open({str(marker)!r}, 'w').write(os.environ['AZUREML_DATAREFERENCE_inputs'])",
                env={"MOUNTD_NO_FUSE": "1"})
    assert r.returncode == 0, r.stderr
    assert "downloaded instead" in r.stderr
    inputs = marker.read_text()
    assert open(os.path.join(inputs, "dir", "b.bin"), "rb").read() == INPUTS["dir/b.bin"]


def test_staging_failure_does_not_run_the_child(job, tmp_path):
    manifest = job()
    body = yaml.safe_load(manifest.read_text())
    body["data_references"]["staged"]["path_on_datastore"] = "datasets/missing"
    manifest.write_text(yaml.safe_dump(body))
    r = run_cli("run", manifest, env={"MOUNTD_NO_FUSE": "1"})
    assert r.returncode == 3, r.stderr
    assert "not starting the training process" in r.stderr and "datasets/missing" in r.stderr
    assert not (tmp_path / "work" / "uploads" / "outputs" / "report.json").exists()


def test_a_source_refusing_the_credential_is_one_line_and_exit_2_before_anything(job, tmp_path):
    # (was: the same message from staging, 'not starting', and 'failed', then exit 3)
    r = run_cli("run", job(), env={"MOUNTD_NO_FUSE": "1", KEY_ENV: "d3Jvbmcta2V5LWJ1dC1iYXNlNjQ="})
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "refused the credentials" in r.stderr, r.stderr
    assert not (tmp_path / "work").exists()


def test_upload_failure_after_success_exits_3_and_keeps_outputs(job, tmp_path, azurite):
    manifest = job()
    body = yaml.safe_load(manifest.read_text())
    body["datastores"] = {"gone": dict(blob_workspace_entry(azurite, "no-such-container"))}
    body["data_references"]["outputs"]["datastore"] = "gone"
    manifest.write_text(yaml.safe_dump(body))
    r = run_cli("run", manifest, env={"MOUNTD_NO_FUSE": "1"})
    assert r.returncode == 3, r.stderr
    assert "upload outputs" in r.stderr
    assert (tmp_path / "work" / "uploads" / "outputs" / "sub" / "model.bin").exists()
    jobs = [json.loads(p.read_text()) for p in (tmp_path / "work" / "journal").glob("*.json")]
    assert [j["origin"] for j in jobs] == ["upload reference outputs"]
    assert {os.path.basename(remote) for _, remote in jobs[0]["files"]} >= {"model.bin"}


@pytest.mark.fuse
def test_sigterm_is_forwarded_and_outputs_still_upload(job, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "mountd", "run", str(job())], cwd=REPO,
                            env=dict(os.environ, SLEEP_FOR="60"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    started = tmp_path / "work" / "uploads" / "outputs" / "started"
    deadline = time.time() + 60
    while not started.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert started.exists()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "started" in job.remote.files("runs/r1/out")
    assert no_mounts_under(tmp_path)


@pytest.mark.fuse
def test_pid1_reaps_orphans_and_returns_the_code(job, tmp_path):
    if not shutil.which("unshare"):
        pytest.skip("unshare is not installed")
    # The command leaves an orphan that exits while the command still runs;
    # as PID 1 mountd must reap it, so no zombie is listed.
    cmd = "(sleep 0.2 &); sleep 1; ps -eo stat= | grep -c '^Z' > $AZUREML_DATAREFERENCE_outputs/zombies; exit 4"
    r = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "mountd", "run",
                        str(job()), "--", "sh", "-c", cmd], capture_output=True, text=True, cwd=REPO, timeout=180)
    assert r.returncode == 4, r.stderr
    assert job.remote.files("runs/r1/out")["zombies"].strip() == b"0"


MIXED_CHILD = DIGEST + r'''
import json, sys
refs = {k[len("AZUREML_DATAREFERENCE_"):]: v for k, v in os.environ.items() if k.startswith("AZUREML_DATAREFERENCE_")}
report = {name: digest(path) for name, path in refs.items() if name in ("share_mount", "blob_mount", "share_dl",
                                                                      "blob_dl")}
report["mounted_dirs"] = sorted(os.listdir(refs["share_mount"]))
for name in ("share_out", "blob_out"):
    os.makedirs(os.path.join(refs[name], "empty dir"), exist_ok=True)
    os.makedirs(os.path.join(refs[name], "model"), exist_ok=True)
    open(os.path.join(refs[name], "model", "weights.bin"), "wb").write(bytes(range(256)) * 40000)
    open(os.path.join(refs[name], "report.json"), "w").write(json.dumps(report))
'''


@pytest.mark.fuse
def test_manifest_mixing_blob_and_file_share_references(tmp_path, azurite, container, fileshare, share, monkeypatch):
    from tests.support.remotes import BlobRemote, ShareRemote
    blob, files = BlobRemote(azurite, container), ShareRemote(fileshare, share)
    for remote in (blob, files):
        for name, data in INPUTS.items():
            remote.put(f"datasets/in/{name}", data)
    files.mkdir("datasets/in/empty")  # a real, empty directory of the share
    ws = tmp_path / "ws.yaml"
    ws.write_text(yaml.safe_dump({"datastores": {"blob": blob.entry(KEY_ENV), "files": files.entry(KEY_ENV)}}))
    monkeypatch.setenv("MOUNTD_WORKSPACE", str(ws))
    monkeypatch.setenv(KEY_ENV, KEY)
    script = tmp_path / "child.py"
    script.write_text(MIXED_CHILD)
    manifest = tmp_path / "mixed.yaml"
    manifest.write_text(yaml.safe_dump({
        "run_id": "mix1",
        "data_references": {
            "share_mount": {"datastore": "files", "path_on_datastore": "datasets/in", "mode": "mount"},
            # an http URI under the share's endpoint resolves to its datastore
            "share_dl": {"uri": f"{fileshare.account_url}/{files.name}/datasets/in", "mode": "download"},
            "blob_mount": {"datastore": "blob", "path_on_datastore": "datasets/in", "mode": "mount"},
            "blob_dl": {"datastore": "blob", "path_on_datastore": "datasets/in", "mode": "download"},
            "share_out": {"datastore": "files", "path_on_datastore": "runs/{run_id}", "mode": "upload"},
            "blob_out": {"datastore": "blob", "path_on_datastore": "runs/{run_id}", "mode": "upload"},
        },
        "command": [sys.executable, str(script)],
        "work_dir": str(tmp_path / "work"),
        "cache": {"dir": str(tmp_path / "cache")},
    }))
    r = run_cli("run", manifest)
    assert r.returncode == 0, r.stderr
    weights = bytes(range(256)) * 40000
    for remote in (files, blob):
        out = remote.files("runs/mix1")
        report = json.loads(out["report.json"])
        for name in ("share_mount", "blob_mount", "share_dl", "blob_dl"):
            assert report[name] == expected_digest(), name
        assert report["mounted_dirs"] == ["a.txt", "dir", "empty"]
        assert out["model/weights.bin"] == weights
    assert files.dirs("runs/mix1") == {"runs/mix1/empty dir", "runs/mix1/model"}  # real directories
    assert (tmp_path / "work" / "downloads" / "share_dl" / "empty").is_dir()
    assert no_mounts_under(tmp_path)


BAD = {
    "unknown datastore": {"data_references": {"x": {"datastore": "nope", "mode": "download"}}},
    "unknown mode": {"data_references": {"x": {"datastore": "blob", "mode": "copy"}}},
    "path escape": {"data_references": {"x": {"datastore": "blob", "mode": "upload",
                                              "path_on_compute": "../../../etc/evil"}}},
    "system path": {"data_references": {"x": {"datastore": "blob", "mode": "download",
                                              "path_on_compute": "/etc/mountd-evil"}}},
    "missing credential": "MISSING_KEY",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_manifests_exit_2_and_touch_nothing(case, tmp_path, azurite, container, monkeypatch):
    ws = tmp_path / "ws.yaml"
    entry = blob_workspace_entry(azurite, container.container_name)
    if BAD[case] == "MISSING_KEY":
        entry["credential"] = {"account_key_env": "MOUNTD_TEST_UNSET_KEY"}
        body = {"data_references": {"x": {"datastore": "blob", "mode": "download"}}}
    else:
        body = BAD[case]
    ws.write_text(yaml.safe_dump({"datastores": {"blob": entry}}))
    body = dict(body, command=["true"], work_dir=str(tmp_path / "work"))
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump(body))
    r = run_cli("--workspace", ws, "run", manifest, env={KEY_ENV: KEY})
    assert r.returncode == 2, r
    assert r.stderr.startswith("mountd: error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "work").exists()
    assert no_mounts_under(tmp_path)


def test_a_misspelt_data_reference_in_the_command_exits_2_before_anything(job, tmp_path):
    r = run_cli("run", job(), "--", sys.executable, "-c", "pass", "--data=${AZUREML_DATAREFERENCE_inputz}")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == ("mountd: error: the command names $AZUREML_DATAREFERENCE_inputz, which is no data "
                                "reference of the manifest: did you mean $AZUREML_DATAREFERENCE_inputs?")
    r = run_cli("run", job(command=["echo", "$AZUREML_DATAREFERENCE_zzz"]))
    assert r.returncode == 2 and "the manifest's references are $AZUREML_DATAREFERENCE_inputs, " in r.stderr, r.stderr
    assert not (tmp_path / "work").exists()
    assert no_mounts_under(tmp_path)


def test_an_upload_reference_left_empty_or_removed_is_a_warning_naming_its_path(job, tmp_path):
    out = tmp_path / "work" / "uploads" / "outputs"
    r = run_cli("run", job(), "--", sys.executable, "-c", "pass", env={"MOUNTD_NO_FUSE": "1"})
    assert r.returncode == 0, r.stderr
    assert [x for x in r.stderr.splitlines() if "warning" in x and f"upload outputs: {out} is empty" in x], r.stderr
    r = run_cli("run", job(), "--", sys.executable, "-c", f"import os; os.rmdir({str(out)!r})",
                env={"MOUNTD_NO_FUSE": "1"})
    assert r.returncode == 0, r.stderr
    assert f"upload outputs: {out} does not exist" in r.stderr, r.stderr


def test_the_command_does_not_inherit_datastore_secrets(job, tmp_path):
    """The variables datastore credentials name are not passed to the
    command (the workspace's, and an inline datastore's no reference uses),
    unless the manifest lists them under pass_environment."""
    dump = tmp_path / "env.json"
    command = ["--", sys.executable, "-c", f"import json, os; json.dump(dict(os.environ), open({str(dump)!r}, 'w'))"]
    other = {"other": {"type": "azure_blob", "account_name": "otheracct", "container_name": "data",
                       "credential": {"sas_token_env": "OTHER_SAS"}}}
    env = {"MOUNTD_NO_FUSE": "1", "OTHER_SAS": "sv=2022-11-02&sig=OTHERSECRET", "UNRELATED": "kept"}

    r = run_cli("run", job(run_id="env1", datastores=other), *command, env=env)
    assert r.returncode == 0, r.stderr
    child = json.loads(dump.read_text())
    assert KEY_ENV not in child and "OTHER_SAS" not in child
    assert child["UNRELATED"] == "kept" and child["EPOCHS"] == "2" and "AZUREML_DATAREFERENCE_staged" in child
    [line] = [x for x in r.stderr.splitlines() if "not passed to the training process" in x]
    assert KEY_ENV in line and "OTHER_SAS" in line
    assert KEY not in r.stderr and "OTHERSECRET" not in r.stderr

    r = run_cli("run", job(run_id="env2", datastores=other, pass_environment=[KEY_ENV]), *command, env=env)
    assert r.returncode == 0, r.stderr
    child = json.loads(dump.read_text())
    assert child[KEY_ENV] == KEY and "OTHER_SAS" not in child


def test_bad_yaml_and_missing_manifest(tmp_path):
    m = tmp_path / "m.yaml"
    m.write_text("data_references: [\n")
    r = run_cli("run", m)
    assert r.returncode == 2 and "m.yaml:" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("run", tmp_path / "absent.yaml")
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_validate_has_no_side_effects(job, tmp_path):
    r = run_cli("validate", job())
    assert r.returncode == 0, r.stderr
    assert "AZUREML_DATAREFERENCE_inputs: mount" in r.stdout
    assert not (tmp_path / "work").exists()


def test_validate_asks_storage_unless_offline(job, tmp_path):
    body = yaml.safe_load(job().read_text())
    body["data_references"]["staged"]["path_on_datastore"] = "datasets/nope"
    body["data_references"]["scratch"] = {"datastore": "blob", "path_on_datastore": "new/dir", "mode": "mount",
                                          "read_write": True}  # a read-write mount may start empty
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump(body))
    r = run_cli("validate", manifest)
    assert r.returncode == 2 and r.stdout == "", r
    assert r.stderr.strip() == (f"mountd: error: {manifest}: data reference staged: datasets/nope does not exist "
                                "in datastore blob")
    r = run_cli("validate", "--offline", manifest)
    assert r.returncode == 0 and "file only (--offline)" in r.stdout, r
    r = run_cli("validate", job(), env={KEY_ENV: "d3Jvbmcta2V5LWJ1dC1iYXNlNjQ="})  # base64, not the key
    assert r.returncode == 2 and "refused the credentials" in r.stderr and len(r.stderr.splitlines()) == 1, r
    assert not (tmp_path / "work").exists()


def test_validate_says_when_the_run_id_is_generated(job, tmp_path):
    body = yaml.safe_load(job().read_text())
    del body["run_id"], body["work_dir"]
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump(body))
    r = run_cli("validate", manifest)
    assert r.returncode == 0, r
    first = r.stdout.splitlines()[0]
    assert "run id generated at run time" in first and f"work dir {REPO}/mountd-runs/{{run_id}};" in first, first
    assert "outputs: upload blob:runs/{run_id}/out" in r.stdout, r.stdout
    assert "run-2" not in r.stdout  # no made-up id the next run would not use


@pytest.mark.fuse
def test_quickstart_manifest(tmp_path):
    env = {"XDG_DATA_HOME": str(tmp_path / "data"), "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    r = run_cli("run", os.path.join(REPO, "configs", "quickstart.yaml"), "--work-dir", tmp_path / "work",
                env=env)
    assert r.returncode == 0, r.stderr
    assert "accuracy" in r.stdout
    runs = tmp_path / "data" / "mountd" / "workspacelocalstore" / "runs"
    metrics = list(runs.glob("*/outputs/0/metrics.json"))
    assert len(metrics) == 1 and json.loads(metrics[0].read_text())["epochs"] == 2
    assert no_mounts_under(tmp_path)


def _signal_during_uploads(proc, sig) -> str:
    """Once the command of `mountd run` (`proc`, stderr piped) has exited and
    its outputs are going up, send `sig`; wait for the end and return the
    stderr written after the signal."""
    for line in proc.stderr:
        if "training process exited" in line:
            break
    time.sleep(0.2)
    proc.send_signal(sig)
    rest = proc.stderr.read()
    proc.wait(60)
    return rest


def test_second_signal_aborts_uploads_and_keeps_outputs(job, tmp_path):
    # The child writes many outputs and exits on the first SIGTERM; the
    # second SIGTERM lands while they upload.
    script = tmp_path / "many.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "out = os.environ['AZUREML_DATAREFERENCE_outputs']\n"
        "for i in range(600):\n"
        "    open(os.path.join(out, f'o{i:04d}.bin'), 'wb').write(os.urandom(256 * 1024))\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))\n"
        "open(os.path.join(out, 'ready'), 'w').write('1')\n"
        "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-m", "mountd", "run", str(job()), "--", sys.executable, str(script)],
                            cwd=REPO, env=dict(os.environ, MOUNTD_NO_FUSE="1"), stderr=subprocess.PIPE, text=True)
    outputs = tmp_path / "work" / "uploads" / "outputs"
    deadline = time.time() + 60
    while not (outputs / "ready").exists() and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    rest = _signal_during_uploads(proc, signal.SIGTERM)
    assert proc.returncode == 143, rest
    uploaded = job.remote.files("runs/r1/out")
    assert len(uploaded) < 601, "the second signal did not stop the uploads"
    assert len(list(outputs.iterdir())) == 601  # nothing local was removed
    jobs = [json.loads(p.read_text()) for p in (tmp_path / "work" / "journal").glob("*.json")]
    assert [j["origin"] for j in jobs] == ["upload reference outputs"] and len(jobs[0]["files"]) == 601
    done = (tmp_path / "work" / "journal" / (jobs[0]["id"] + ".done")).read_text().splitlines()
    assert len(done) == len(uploaded)  # every object in storage is confirmed in the journal, no more


def _write_outputs_script(tmp_path, count, size):
    script = tmp_path / "outputs.py"
    script.write_text(
        "import os\n"
        "out = os.environ['AZUREML_DATAREFERENCE_outputs']\n"
        f"for i in range({count}):\n"
        f"    open(os.path.join(out, f'o{{i:04d}}.bin'), 'wb').write(os.urandom({size}))\n")
    return script


def test_kill_9_during_uploads_then_resume_uploads_everything(job, tmp_path):
    script = _write_outputs_script(tmp_path, 400, 1024 * 1024)
    proc = subprocess.Popen([sys.executable, "-m", "mountd", "run", str(job()), "--", sys.executable, str(script)],
                            cwd=REPO, env=dict(os.environ, MOUNTD_NO_FUSE="1"), stderr=subprocess.PIPE, text=True)
    journal = tmp_path / "work" / "journal"
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once some, not all, outputs are in storage
        done = list(journal.glob("*.done"))
        if done and len(done[0].read_text().splitlines()) >= 20:
            break
        time.sleep(0.01)
    proc.kill()
    proc.wait(30)
    outputs = tmp_path / "work" / "uploads" / "outputs"
    local = {p.name: p.read_bytes() for p in outputs.iterdir()}
    assert len(local) == 400  # nothing local was removed
    assert len(job.remote.files("runs/r1/out")) < 400, "uploads finished before the kill: nothing tested"
    r = run_cli("resume", "--work-dir", tmp_path / "work", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "1 finished" in r.stdout
    stored = job.remote.files("runs/r1/out")
    # a file share keeps the hidden temporary files of uploads killed midway (README: Azure File shares)
    assert {n: b for n, b in stored.items() if not is_temporary(n)} == local
    assert not list(journal.glob("*.json"))
    r = run_cli("resume", "--work-dir", tmp_path / "work", "--no-progress")
    assert r.returncode == 0 and "no pending uploads" in r.stdout


def test_run_finishes_an_earlier_attempts_uploads_first(job, tmp_path):
    manifest = job()
    body = yaml.safe_load(manifest.read_text())
    late = job.remote.sibling("not-yet-there")  # a container or share that does not exist yet
    body["datastores"] = {"blob": late.entry(KEY_ENV)}
    body["data_references"] = {"outputs": body["data_references"]["outputs"]}
    manifest.write_text(yaml.safe_dump(body))
    r = run_cli("run", manifest, "--", sys.executable, "-c", "import os; open(os.path.join("
                "os.environ['AZUREML_DATAREFERENCE_outputs'], 'first.txt'), 'w').write('first')",
                env={"MOUNTD_NO_FUSE": "1"})
    assert r.returncode == 3, r.stderr
    assert "mountd resume --work-dir" in r.stderr
    late.create()
    try:
        r = run_cli("run", manifest, "--", sys.executable, "-c", "pass")
        assert r.returncode == 0, r.stderr
        assert "unfinished uploads of run r1" in r.stderr
        assert late.files("runs/r1/out") == {"first.txt": b"first"}
        assert not list((tmp_path / "work" / "journal").glob("*.json"))
    finally:
        late.delete()


def test_a_resume_failure_at_the_start_of_a_run_counts_in_its_exit_code(job, tmp_path):
    manifest = job()
    body = yaml.safe_load(manifest.read_text())
    late = job.remote.sibling("not-yet-there")
    body["datastores"] = {"blob": late.entry(KEY_ENV)}
    body["data_references"] = {"outputs": body["data_references"]["outputs"]}
    manifest.write_text(yaml.safe_dump(body))
    write = ("import os; open(os.path.join(os.environ['AZUREML_DATAREFERENCE_outputs'], 'first.txt'), 'w')"
             ".write('first')")
    r = run_cli("run", manifest, "--", sys.executable, "-c", write)
    assert r.returncode == 3, r.stderr
    (tmp_path / "work" / "uploads" / "outputs" / "first.txt").unlink()  # the earlier attempt's file is gone
    late.create()
    try:
        r = run_cli("run", manifest, "--", sys.executable, "-c", "pass")
        assert r.returncode == 3, r.stderr  # the command succeeded, but an earlier output is lost
        assert "failed: resume " in r.stderr and "first.txt: local file is gone" in r.stderr, r.stderr
    finally:
        late.delete()


def test_a_second_run_on_a_work_dir_in_use_is_refused(job, tmp_path):
    manifest = job()
    go = tmp_path / "go"
    wait = f"import os, time\nwhile not os.path.exists({str(go)!r}): time.sleep(0.05)"
    first = subprocess.Popen([sys.executable, "-m", "mountd", "run", str(manifest), "--", sys.executable, "-c",
                              wait], cwd=REPO, env=dict(os.environ, MOUNTD_NO_FUSE="1"), stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "work" / "uploads").exists():  # the first run holds the work dir by then
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.05)
        r = run_cli("run", manifest, "--", sys.executable, "-c", "open('/dev/null', 'w')",
                    env={"MOUNTD_NO_FUSE": "1"})
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip() == (f"mountd: error: work dir {tmp_path / 'work'} is in use by another mountd "
                                    f"(pid {first.pid} (mountd run r1)): wait for it to finish, or give this run "
                                    "another --work-dir or run_id")
    finally:
        go.write_text("")
        assert first.wait(60) == 0, first.stderr.read()
    r = run_cli("run", manifest, "--", sys.executable, "-c", "pass", env={"MOUNTD_NO_FUSE": "1"})
    assert r.returncode == 0, r.stderr  # free again once the first one is done


@pytest.mark.fuse
def test_read_write_mount_reference_lands_in_storage(job, tmp_path):
    manifest = job()
    body = yaml.safe_load(manifest.read_text())
    body["data_references"]["scratch"] = {"datastore": "blob", "path_on_datastore": "runs/{run_id}/live",
                                          "mode": "mount", "read_write": True}
    manifest.write_text(yaml.safe_dump(body))
    job.remote.put("runs/r1/live/.keep", b"")
    r = run_cli("run", manifest, "--", sys.executable, "-c",
                "import os; d = os.environ['AZUREML_DATAREFERENCE_scratch']; os.makedirs(d + '/ckpt');"
                "open(d + '/ckpt/epoch1.pt', 'wb').write(b'weights' * 100000);"
                "os.rename(d + '/ckpt/epoch1.pt', d + '/ckpt/last.pt')")
    assert r.returncode == 0, r.stderr
    assert job.remote.files("runs/r1/live/ckpt") == {"last.pt": b"weights" * 100000}
    assert no_mounts_under(str(tmp_path))


@pytest.mark.fuse
@pytest.mark.parametrize("remote", ["blob"], indirect=True)
def test_files_a_read_write_mount_could_not_upload_fail_the_run(job, tmp_path):
    manifest = job()
    body = yaml.safe_load(manifest.read_text())
    body["data_references"] = {"scratch": {"datastore": "blob", "path_on_datastore": "live", "mode": "mount",
                                           "read_write": True}}
    manifest.write_text(yaml.safe_dump(body))
    # the command writes; storage goes away; it closes: EIO, and the unmount cannot upload it either
    written, go = tmp_path / "written", tmp_path / "go"
    write = ("import os, sys, time\n"
             "f = open(os.environ['AZUREML_DATAREFERENCE_scratch'] + '/ckpt.pt', 'wb'); f.write(b'w')\n"
             "open(sys.argv[1], 'w').close()\n"
             "while not os.path.exists(sys.argv[2]): time.sleep(0.05)\n"
             "try:\n    f.close()\nexcept OSError:\n    pass")
    proc = subprocess.Popen([sys.executable, "-m", "mountd", "run", str(manifest), "--", sys.executable, "-c", write,
                             str(written), str(go)], cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not written.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        job.remote.delete()
    finally:
        go.write_text("")
        _, stderr = proc.communicate(timeout=180)
        job.remote.create()  # for the fixture's clean-up
    r = subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)
    assert r.returncode == 3, r.stderr
    assert "1 written file(s) not uploaded (live/ckpt.pt)" in r.stderr


@pytest.mark.fuse
def test_pid1_sigterm_forwards_reaps_and_uploads(job, tmp_path):
    """As a container's entrypoint (PID 1 of a fresh PID namespace), `docker
    stop`'s SIGTERM reaches the command, orphans are reaped, the outputs are
    uploaded after the command exits, and the command's code comes back."""
    if not shutil.which("unshare"):
        pytest.skip("unshare is not installed")
    out = "$AZUREML_DATAREFERENCE_outputs"
    script = (f"trap 'sleep 0.3; ps -eo stat= | grep -c \"^Z\" > {out}/zombies; "
              f"echo term > {out}/term; exit 143' TERM; "
              f"(sleep 0.1 &); ls $AZUREML_DATAREFERENCE_inputs > {out}/listing; echo 1 > {out}/started; "
              "sleep 60 & wait")
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "mountd", "run",
                             str(job()), "--", "sh", "-c", script], cwd=REPO, stderr=subprocess.PIPE, text=True)
    started = tmp_path / "work" / "uploads" / "outputs" / "started"
    deadline = time.time() + 90
    while not started.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert started.exists()
    # mountd is the child unshare forked: PID 1 inside, an ordinary pid here
    with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
        [init] = [int(p) for p in f.read().split()]
    with open(f"/proc/{init}/status") as f:
        [nspid] = [line.split()[1:] for line in f if line.startswith("NSpid:")]
    assert nspid == [str(init), "1"]
    os.kill(init, signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, err
    uploaded = job.remote.files("runs/r1/out")
    assert uploaded["term"] == b"term\n" and uploaded["zombies"].strip() == b"0"
    assert b"a.txt" in uploaded["listing"]
    assert "passed signal SIGTERM to the training process" in err
    assert no_mounts_under(tmp_path)


def test_a_first_stop_signal_during_uploads_aborts_them_as_it_says(job, tmp_path):
    # The training process ends on its own; a Ctrl-C while its outputs go up
    # is the first stop signal of the run, and it stops the uploads (files
    # not started stay journaled for `mountd resume`).
    script = _write_outputs_script(tmp_path, 600, 256 * 1024)
    proc = subprocess.Popen([sys.executable, "-m", "mountd", "run", str(job()), "--", sys.executable, str(script)],
                            cwd=REPO, env=dict(os.environ, MOUNTD_NO_FUSE="1"), stderr=subprocess.PIPE, text=True)
    rest = _signal_during_uploads(proc, signal.SIGINT)
    assert "stop signal: aborting uploads" in rest and "second" not in rest, rest
    assert proc.returncode == 3, rest  # the job succeeded; not all of its outputs reached storage
    uploaded = job.remote.files("runs/r1/out")
    assert len(uploaded) < 600, "the uploads were not stopped"
    r = run_cli("resume", "--work-dir", tmp_path / "work", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert len({n for n in job.remote.files("runs/r1/out") if not is_temporary(n)}) == 600


@pytest.mark.parametrize("remote", ["blob"], indirect=True)
def test_uploads_show_a_progress_bar_on_a_terminal(job, tmp_path):
    import fcntl
    import pty
    import struct
    import termios
    script = _write_outputs_script(tmp_path, 40, 256 * 1024)
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal has a size
    proc = subprocess.Popen([sys.executable, "-m", "mountd", "run", str(job()), "--", sys.executable, str(script)],
                            cwd=REPO, env=dict(os.environ, MOUNTD_NO_FUSE="1"), stdin=secondary, stdout=secondary,
                            stderr=secondary)
    os.close(secondary)
    screen = b""
    while True:
        try:
            data = os.read(primary, 65536)
        except OSError:  # the terminal is gone: the run ended
            break
        if not data:
            break
        screen += data
    proc.wait(60)
    os.close(primary)
    text = screen.decode(errors="replace")
    assert proc.returncode == 0, text
    # tqdm draws "outputs:  ...%|...| n/total" for the upload reference
    assert "outputs:" in text and "%|" in text.split("training process exited", 1)[1], text
