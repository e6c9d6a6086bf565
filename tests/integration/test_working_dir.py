"""The job's working directory: the command runs there, and a relative
path_on_compute is relative to it, as in Azure ML. The seed's
`ds3.as_upload(path_on_compute='./bar.pkl')` uploads the bar.pkl the script
wrote in the directory it ran in; mountd's own work dir keeps only its state."""

import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import KEY, KEY_ENV

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Writes where it runs, as a training script does: ./bar.pkl and ./outputs/.
TRAIN = r'''
import os, sys
open("bar.pkl", "wb").write(b"pickled model")
os.makedirs("outputs/sub", exist_ok=True)
open("outputs/metrics.json", "w").write('{"acc": 0.9}')
open("outputs/sub/log.txt", "w").write("epoch 1")
open("cwd.txt", "w").write(os.getcwd())
print("inputs at", os.environ.get("AZUREML_DATAREFERENCE_inputs"))
sys.exit(int(os.environ.get("EXIT_WITH", "0")))
'''


def mountd(*args, cwd, env=None):
    full = dict(os.environ, PYTHONPATH=REPO)  # run from elsewhere with this tree's code
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "mountd", *map(str, args)], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=180)


@pytest.fixture
def setup(tmp_path, remote, monkeypatch):
    """A workspace with datastore `store` (blob container or file share)
    holding an input; a job directory with train.py; a manifest writer."""
    remote.put("datasets/in/a.txt", b"alpha")
    ws = tmp_path / "ws.yaml"
    ws.write_text(yaml.safe_dump({"default_datastore": "store", "datastores": {"store": remote.entry(KEY_ENV)}}))
    monkeypatch.setenv("MOUNTD_WORKSPACE", str(ws))
    monkeypatch.setenv(KEY_ENV, KEY)
    job = tmp_path / "job"
    job.mkdir()
    (job / "train.py").write_text(TRAIN)

    def manifest(where, **extra):
        body = {"run_id": "r1",
                "data_references": {
                    "inputs": {"path_on_datastore": "datasets/in", "mode": "download"},
                    "model": {"path_on_datastore": "results", "mode": "upload", "path_on_compute": "./bar.pkl"},
                    "outputs": {"path_on_datastore": "results/outputs", "mode": "upload",
                                "path_on_compute": "./outputs"}},
                "command": ["python", "train.py"]}
        body.update(extra)
        path = where / "job.yaml"
        path.write_text(yaml.safe_dump(body))
        return path
    return remote, job, manifest


def test_the_script_runs_in_the_working_dir_and_its_relative_outputs_upload(setup):
    remote, job, manifest = setup
    r = mountd("run", manifest(job), cwd=job)
    assert r.returncode == 0, r.stderr
    assert (job / "cwd.txt").read_text() == str(job)
    assert remote.files("results") == {"bar.pkl": b"pickled model", "outputs/metrics.json": b'{"acc": 0.9}',
                                       "outputs/sub/log.txt": b"epoch 1"}
    assert "uploaded model: uploaded 1 file" in r.stderr and "uploaded outputs: uploaded 2 files" in r.stderr, r.stderr
    # mountd's own state stays in its work dir; the download went there, not into the job's directory
    assert (job / "mountd-runs" / "r1" / "downloads" / "inputs" / "a.txt").read_bytes() == b"alpha"
    assert not (job / "inputs").exists() and (job / "bar.pkl").is_file()


def test_working_dir_in_the_manifest_is_relative_to_it(setup, tmp_path):
    remote, job, manifest = setup
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = mountd("run", manifest(tmp_path, working_dir="job", work_dir=str(tmp_path / "state")), cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    assert (job / "cwd.txt").read_text() == str(job)
    assert set(remote.files("results")) == {"bar.pkl", "outputs/metrics.json", "outputs/sub/log.txt"}
    assert os.listdir(elsewhere) == []


def test_a_file_upload_to_a_path_naming_the_file_and_a_failed_script(setup):
    remote, job, manifest = setup
    path = manifest(job, data_references={
        "model": {"path_on_datastore": "models/best.pkl", "mode": "upload", "path_on_compute": "best.pkl"},
        "renamed": {"path_on_datastore": "models/final.pkl", "mode": "upload", "path_on_compute": "bar.pkl"}},
        command=["sh", "-c", "echo best > best.pkl && python train.py"])
    r = mountd("run", path, cwd=job, env={"EXIT_WITH": "5"})
    assert r.returncode == 5, r.stderr
    # a target ending in the file's name is the file; any other is a directory it goes into
    assert remote.files("models") == {"best.pkl": b"best\n", "final.pkl/bar.pkl": b"pickled model"}


def test_validate_shows_paths_under_the_working_dir(setup):
    remote, job, manifest = setup
    r = mountd("validate", manifest(job), cwd=job)
    assert r.returncode == 0, r.stderr
    assert f"-> {job}/bar.pkl" in r.stdout and f"-> {job}/outputs" in r.stdout, r.stdout
    assert f"  working dir: {job}\n" in r.stdout, r.stdout


def test_a_file_upload_that_is_a_link_out_of_its_directory_is_refused(setup, tmp_path):
    remote, job, manifest = setup
    (tmp_path / "secret.txt").write_text("not an output")
    path = manifest(job, data_references={
        "model": {"path_on_datastore": "models", "mode": "upload", "path_on_compute": "bar.pkl"}},
        command=["ln", "-s", str(tmp_path / "secret.txt"), "bar.pkl"])
    r = mountd("run", path, cwd=job)
    assert r.returncode == 3, r.stderr  # the command succeeded, an output did not upload
    assert f"{job}/bar.pkl: symbolic link points outside its directory" in r.stderr, r.stderr
    assert remote.files("models") == {}


def _last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def test_the_runs_last_line_says_what_went_to_which_storage_url(setup):
    remote, job, manifest = setup
    r = mountd("run", manifest(job), cwd=job)
    assert r.returncode == 0, r.stderr
    last = _last_line(r.stderr)
    target = remote.entry(KEY_ENV)
    where = target.get("container_name") or target.get("share_name")
    assert "run r1 finished with exit code 0; outputs: model: " in last, last
    assert "model: 1 file (13 B) to " in last and f"/{where}/results;" in last, last
    assert "outputs: 2 files (" in last and f"/{where}/results/outputs" in last, last
    # a re-run whose outputs changed: the last line says they did not go up
    (job / "train.py").write_text(TRAIN.replace("pickled model", "another model"))
    again = mountd("run", manifest(job), cwd=job)
    assert again.returncode == 0, again.stderr
    assert "model: 0 files (0 B) to " in _last_line(again.stderr), again.stderr
    assert "1 NOT uploaded (storage holds another version)" in _last_line(again.stderr), again.stderr


def test_the_last_line_of_a_failed_job_says_its_outputs_stayed(setup):
    remote, job, manifest = setup
    r = mountd("run", manifest(job, upload_when="on_success"), cwd=job, env={"EXIT_WITH": "4"})
    assert r.returncode == 4, r.stderr
    last = _last_line(r.stderr)
    assert ("run r1 finished with exit code 4; outputs: model: not uploaded "
            "(upload_when: on_success, exit code 4; files kept in ") in last, last
    assert remote.files("results") == {}
