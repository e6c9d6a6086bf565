"""Azure ML v1 run configurations as azureml-core's RunConfiguration.save()
writes them (tests/data/runconfigs, made by tests/data/make_runconfigs.py
with two versions of the library): accepted as saved, the settings mountd
uses honoured, those that would change the job refused, the rest named once."""

import glob
import os
import re
import subprocess
import sys

import pytest
import yaml

from mountd.config.manifest import load_manifest
from mountd.config.workspace import Workspace
from mountd.errors import UsageError

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DATA = os.path.join(REPO, "tests", "data", "runconfigs")
TRAIN = sorted(glob.glob(os.path.join(DATA, "*", "train.runconfig")))
# saved with separate_environment_yaml=True: `environment: .azureml/environment.yml`
TRAIN_PROJECT = sorted(glob.glob(os.path.join(DATA, "*", "project", ".azureml", "train")))
SCORE = sorted(glob.glob(os.path.join(DATA, "*", "project", ".azureml", "score")))
IGNORED = re.compile(r"^mountd: info: .*: Azure ML v1 settings ignored .*?: (.*)$", re.M)


def _id(path: str) -> str:
    return os.path.relpath(path, DATA)


def _version(path: str) -> str:
    return _id(path).split(os.sep)[0]


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """The workspace the configurations name (workspaceblobstore, never
    contacted), and a current directory of the test's own."""
    path = tmp_path / "workspace.yaml"
    path.write_text(yaml.safe_dump({
        "default_datastore": "workspaceblobstore",
        "datastores": {"workspaceblobstore": {"type": "azure_blob", "account_name": "wsacct",
                                              "container_name": "azureml",
                                              "credential": {"account_key_env": "WS_BLOB_KEY"}}},
    }))
    monkeypatch.setenv("WS_BLOB_KEY", "c2VjcmV0")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return str(path)


def validate(ws: str, manifest: str):
    env = dict(os.environ, WS_BLOB_KEY="c2VjcmV0", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "mountd", "validate", "--offline", "--workspace", ws, manifest],
                          capture_output=True, text=True, env=env, timeout=120, cwd=os.getcwd())


def edited(tmp_path, source: str, old: str, new: str) -> str:
    """A copy of a saved configuration with one line changed, as a user would."""
    with open(source, encoding="utf-8") as f:
        text = f.read()
    assert re.search(old, text, re.M), old
    path = tmp_path / os.path.basename(source)
    path.write_text(re.sub(old, new, text, count=1, flags=re.M), encoding="utf-8")
    return str(path)


def test_fixtures_come_from_several_versions():
    versions = {_version(p) for p in TRAIN}
    assert len(versions) >= 2
    assert versions == {_version(p) for p in SCORE} == {_version(p) for p in TRAIN_PROJECT}


@pytest.mark.parametrize("path", TRAIN + TRAIN_PROJECT, ids=_id)
def test_a_saved_run_configuration_is_honoured(ws, path):
    m = load_manifest(path, Workspace.load(ws), environ={})
    assert m.command == ["/usr/bin/python3", "train.py", "--data-folder", "$AZUREML_DATAREFERENCE_input_data",
                         "--epochs", "3", "--output", "$AZUREML_DATAREFERENCE_results"]
    # environment.environmentVariables, and the run's own environmentVariables
    # on top (azureml-core 1.35 saves those empty)
    run_variables = {} if _version(path) == "1.35.0" else {"EPOCHS": "3"}
    assert m.environment == {"DATA_FORMAT": "png", **run_variables}
    refs = {name: (r.datastore.name, r.path_on_datastore, r.mode, r.overwrite) for name, r in m.references.items()}
    assert refs == {"input_data": ("workspaceblobstore", "datasets/mnist", "mount", False),
                    "pretrained": ("workspaceblobstore", "models/resnet50", "download", False),
                    "results": ("workspaceblobstore", "runs/outputs", "upload", True)}
    assert m.references["input_data"].path_on_compute == os.path.join(m.work_dir, "mounts", "input_data")
    assert m.references["pretrained"].path_on_compute.endswith(os.sep + "pretrained")
    assert m.references["results"].path_on_compute.endswith(os.sep + "outputs")


@pytest.mark.parametrize("path", SCORE, ids=_id)
def test_a_saved_project_configuration_is_honoured(ws, path):
    m = load_manifest(path, Workspace.load(ws), environ={})
    assert m.command == ["python", "score.py"]
    assert m.environment == {"EXAMPLE_ENV_VAR": "EXAMPLE_VALUE"}  # azureml-core's default environment has it
    (ref,) = m.references.values()
    assert (ref.name, ref.mode, ref.path_on_datastore) == ("model", "download", "models/best")


@pytest.mark.parametrize("path", TRAIN + TRAIN_PROJECT + SCORE, ids=_id)
def test_validate_accepts_it_and_names_the_ignored_settings_once(ws, path):
    r = validate(ws, path)
    assert r.returncode == 0, r.stderr
    assert "valid" in r.stdout and "AZUREML_DATAREFERENCE_" in r.stdout
    lines = IGNORED.findall(r.stderr)
    assert len(lines) == 1, r.stderr
    ignored = lines[0].split(", ")
    assert {"target", "framework", "docker", "history", "mpi", "environment.docker"} <= set(ignored)
    assert not {"script", "arguments", "dataReferences", "environmentVariables", "nodeCount", "data",
                "outputData", "environment.environmentVariables", "environment.python.interpreterPath"} \
        & set(ignored)


@pytest.mark.parametrize("mode, written", [("mount", "Mount"), ("download", "DOWNLOAD"), ("upload", "UpLoad")])
def test_the_mode_in_any_letter_case(ws, tmp_path, mode, written):
    path = edited(tmp_path, TRAIN[-1], rf"^(\s+mode: ){mode}$", rf"\g<1>{written}")
    modes = {r.mode for r in load_manifest(path, Workspace.load(ws), environ={}).references.values()}
    assert modes == {"mount", "download", "upload"}


@pytest.mark.parametrize("key, old, new", [
    ("data", r"^data: \{\}$", "data:\n  training_ds:\n    dataLocation:\n      dataset: {id: 0b5b0a1e}\n"
                              "    mechanism: mount\n    environmentVariableName: training_ds"),
    ("outputData", r"^outputData: \{\}$", "outputData:\n  model:\n    outputLocation:\n      dataset: {name: m}\n"
                                          "    mechanism: upload"),
    ("nodeCount", r"^nodeCount: 1$", "nodeCount: 2"),
    ("mpi.nodeCount", r"^(mpi:\n  processCountPerNode: 1\n  nodeCount:) 1$", r"\1 4"),
])
@pytest.mark.parametrize("source", [TRAIN[0], TRAIN[-1]], ids=_id)
def test_what_would_change_the_job_is_refused(ws, tmp_path, source, key, old, new):
    path = edited(tmp_path, source, old, new)
    r = validate(ws, path)
    assert r.returncode == 2, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert re.search(rf"{re.escape(path)}:\d+: {re.escape(key)}: ", line), line
    with pytest.raises(UsageError):
        load_manifest(path, Workspace.load(ws), environ={})


def test_the_top_level_variables_win_over_the_environments(ws, tmp_path):
    path = edited(tmp_path, TRAIN[-1], r"^environmentVariables:\n  EPOCHS: '3'$",
                  "environmentVariables:\n  DATA_FORMAT: jpeg")
    assert load_manifest(path, Workspace.load(ws), environ={}).environment == {"DATA_FORMAT": "jpeg"}


def test_a_bad_top_level_variable_is_named(ws, tmp_path):
    path = edited(tmp_path, TRAIN[-1], r"^environmentVariables:\n  EPOCHS: '3'$",
                  "environmentVariables:\n  AZUREML_DATAREFERENCE_results: x")
    with pytest.raises(UsageError, match=r":\d+: environmentVariables\.AZUREML_DATAREFERENCE_results: is set by"):
        load_manifest(path, Workspace.load(ws), environ={})


def test_a_separate_environment_file_that_is_missing_is_named(ws, tmp_path):
    path = edited(tmp_path, TRAIN[-1], r"^environment:\n(  .*\n)*?(?=history:)", "environment: env/missing.yml\n")
    with pytest.raises(UsageError, match=r":\d+: environment: names an environment file that does not exist: "
                                         + re.escape(str(tmp_path / "env" / "missing.yml"))):
        load_manifest(path, Workspace.load(ws), environ={})
