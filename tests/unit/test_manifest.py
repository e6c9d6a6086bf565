"""Run manifests: parsing, defaults, the v1 run configuration, placeholders,
safety of paths, and a catalogue of bad manifests with their messages."""

import glob
import os
import re
import textwrap
from types import SimpleNamespace

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from mountd.config.manifest import (RANK_VARIABLES, DataReference, Manifest, detect_node_rank,
                                    expand_placeholders, load_manifest)
from mountd.config.settings import GiB, MiB
from mountd.config.workspace import Workspace
from mountd.errors import ConfigError, UsageError

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "examples")


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A workspace with a local default datastore, a blob and a file share
    (never contacted; their credentials come from variables), and a cwd."""
    store = tmp_path / "store"
    store.mkdir()
    ws_file = tmp_path / "workspace.yaml"
    ws_file.write_text(yaml.safe_dump({
        "default_datastore": "localdata",
        "allowed_roots": [str(tmp_path / "allowed")],
        "datastores": {
            "localdata": {"type": "local", "root": str(store)},
            "training": {"type": "azure_blob", "account_name": "acct", "container_name": "data",
                         "credential": {"account_key_env": "TRAINING_KEY"}},
            "files": {"type": "azure_file", "account_name": "acct", "share_name": "share",
                      "credential": {"sas_token_env": "FILES_SAS"}},
            "workspaceblobstore": {"type": "azure_blob", "account_name": "wsacct", "container_name": "azureml",
                                   "credential": {"account_key_env": "WS_BLOB_KEY"}},
        },
    }))
    for var in ("TRAINING_KEY", "FILES_SAS", "WS_BLOB_KEY"):
        monkeypatch.setenv(var, "c2VjcmV0")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    return SimpleNamespace(tmp=tmp_path, cwd=str(cwd), store=str(store), ws=Workspace.load(str(ws_file)),
                           manifest=str(tmp_path / "manifest.yaml"))


def write(env, text: str) -> str:
    with open(env.manifest, "w", encoding="utf-8") as f:
        f.write(textwrap.dedent(text).replace("@TMP@", str(env.tmp)))
    return env.manifest


def load(env, text: str, **kw) -> Manifest:
    kw.setdefault("environ", {})
    return load_manifest(write(env, text), env.ws, **kw)


# -- the happy paths ------------------------------------------------------------------
def test_every_field(env, monkeypatch):
    monkeypatch.setenv("EXTRA_SAS", "sv=2022&sig=x")
    (env.tmp / "job").mkdir()
    m = load(env, """\
        run_id: exp42-7
        work_dir: @TMP@/work/{run_id}
        working_dir: job
        datastores:
          extra:
            type: azure_blob
            account_name: extraacct
            container_name: things
            credential: {sas_token_env: EXTRA_SAS}
        data_references:
          images:
            datastore: training
            path_on_datastore: /datasets/cifar/
            mode: mount
            read_write: true
          labels:
            uri: azureml://datastores/extra/paths/labels/{node_rank}
            mode: download
            overwrite: true
            path_on_compute: inputs/labels
          outputs:
            datastore: localdata
            path_on_datastore: runs/{run_id}/outputs/{node_rank}
            mode: upload
            path_on_compute: @TMP@/allowed/outputs
        command: [python, train.py, --epochs, 2]
        environment: {EPOCHS: "2", RATE: 0.5, DEBUG: true, PADDED: 007}
        upload_when: on_success
        cache: {dir: @TMP@/cache, max_size: 50GB, memory: 512MB, block_size: 8MiB, readahead_blocks: 16,
                attribute_ttl: 2m}
        """, environ={"NODE_RANK": "2"})
    work = str(env.tmp / "work" / "exp42-7")
    assert m.path == env.manifest
    assert (m.run_id, m.node_rank, m.work_dir) == ("exp42-7", "2", work)
    assert list(m.references) == ["images", "labels", "outputs"]
    images, labels, outputs = m.references.values()
    assert images == DataReference("images", env.ws.get("training"), "datasets/cifar", "mount",
                                   f"{work}/mounts/images", False, True)
    assert images.env_name == "AZUREML_DATAREFERENCE_images"
    assert (labels.datastore.name, labels.datastore.account_name) == ("extra", "extraacct")
    assert (labels.path_on_datastore, labels.mode, labels.overwrite) == ("labels/2", "download", True)
    assert m.working_dir == str(env.tmp / "job")  # relative to the manifest
    assert labels.path_on_compute == str(env.tmp / "job" / "inputs" / "labels")
    assert (outputs.datastore.name, outputs.path_on_datastore) == ("localdata", "runs/exp42-7/outputs/2")
    assert outputs.path_on_compute == str(env.tmp / "allowed" / "outputs")
    assert m.command == ["python", "train.py", "--epochs", "2"]
    assert m.environment == {"EPOCHS": "2", "RATE": "0.5", "DEBUG": "true", "PADDED": "007"}
    assert m.upload_when == "on_success"
    assert (m.cache.dir, m.cache.max_size, m.cache.memory) == (str(env.tmp / "cache"), 50 * 10**9, 512 * 10**6)
    assert (m.cache.block_size, m.cache.readahead_blocks, m.cache.attribute_ttl) == (8 * MiB, 16, 120.0)
    assert set(m.allowed_roots) == {work, str(env.tmp / "cache"), str(env.tmp / "allowed"), m.working_dir}
    assert m.reference_environment()["AZUREML_DATAREFERENCE_outputs"] == outputs.path_on_compute
    assert "c2VjcmV0" not in repr(m) and "EPOCHS" not in repr(m)


def test_defaults(env):
    m = load(env, """\
        data_references:
          data: {mode: download}
          images: {datastore: training, mode: mount}
        """)
    assert re.fullmatch(r"run-\d{8}-\d{6}-[0-9a-f]{6}", m.run_id)
    assert m.work_dir == os.path.join(env.cwd, "mountd-runs", m.run_id)
    data = m.references["data"]
    assert (data.datastore.name, data.path_on_datastore) == ("localdata", "")
    assert data.path_on_compute == os.path.join(m.work_dir, "downloads", "data")
    assert m.references["images"].path_on_compute == os.path.join(m.work_dir, "mounts", "images")
    assert (data.overwrite, data.read_write) == (False, False)
    assert (m.node_rank, m.upload_when, m.command, m.environment) == ("0", "always", [], {})
    assert m.cache.max_size == 10 * GiB


def test_working_dir_is_the_base_of_relative_paths_and_work_dir_stays_mountds(env):
    m = load(env, """\
        run_id: r1
        data_references:
          model: {mode: upload, path_on_compute: ./bar.pkl}
          outputs: {mode: upload, path_on_compute: outputs}
          data: {mode: download}
        """)
    assert m.working_dir == env.cwd  # the directory mountd was started in
    assert m.work_dir == os.path.join(env.cwd, "mountd-runs", "r1")
    assert m.references["model"].path_on_compute == os.path.join(env.cwd, "bar.pkl")
    assert m.references["outputs"].path_on_compute == os.path.join(env.cwd, "outputs")
    assert m.references["data"].path_on_compute == os.path.join(m.work_dir, "downloads", "data")
    (env.tmp / "job" / "sub").mkdir(parents=True)
    m = load(env, "working_dir: job/sub/..\ndata_references:\n  o: {mode: upload, path_on_compute: ./o}\n")
    assert m.working_dir == str(env.tmp / "job")  # relative to the manifest, not to the cwd
    assert m.references["o"].path_on_compute == str(env.tmp / "job" / "o")
    m = load(env, f"working_dir: {env.tmp}/job\ndata_references:\n  o: {{mode: upload, path_on_compute: "
                  f"{env.tmp}/allowed/o}}\n")
    assert m.references["o"].path_on_compute == str(env.tmp / "allowed" / "o")


def test_a_system_directory_as_working_dir(env, monkeypatch):
    with pytest.raises(UsageError, match=r"working_dir: '/etc/x' is in /etc; choose a directory of your own"):
        load(env, "working_dir: /etc/x\n")
    with pytest.raises(UsageError, match=r"working_dir: '/' is the root directory"):
        load(env, "working_dir: /\n")
    # started in / (as a service is): the command runs there, but nothing
    # relative may be written there
    monkeypatch.chdir("/")
    m = load(env, f"work_dir: {env.tmp}/w\ndata_references:\n  o: {{mode: upload, path_on_compute: {env.tmp}/w/o}}\n")
    assert m.working_dir == "/"
    with pytest.raises(UsageError, match=r"'etc/x' is relative to the working directory '/' \(the directory mountd "
                                         r"was started in; set working_dir\), a system directory"):
        load(env, f"work_dir: {env.tmp}/w\ndata_references:\n  o: {{mode: upload, path_on_compute: etc/x}}\n")


def test_run_ids_differ():
    from mountd.config.manifest import generate_run_id
    assert generate_run_id() != generate_run_id()


def test_minimal_manifests(env):
    assert load(env, "command: python train.py --lr '0.1 0.2'\n").command == ["python", "train.py", "--lr",
                                                                              "0.1 0.2"]
    assert load(env, "data_references:\n").references == {}
    assert load(env, "run_id: 42\n").run_id == "42"


def test_work_dir_argument_overrides_the_manifest(env):
    m = load(env, "work_dir: /somewhere/else\n", work_dir=str(env.tmp / "w-{run_id}"))
    assert m.work_dir == str(env.tmp / f"w-{m.run_id}")
    assert load(env, "run_id: r\nwork_dir: rel/{run_id}\n").work_dir == os.path.join(env.cwd, "rel", "r")


def test_work_dir_argument_errors_name_the_option(env):
    with pytest.raises(UsageError, match=r"^--work-dir: '/etc/x' is in /etc"):
        load(env, "run_id: r\n", work_dir="/etc/x")


def test_inline_datastores_shadow_the_workspace_case_insensitively(env):
    other = env.tmp / "other"
    other.mkdir()
    m = load(env, f"""\
        datastores:
          LocalData: {{type: local, root: {other}}}
        data_references:
          a: {{mode: download}}
          b: {{datastore: localdata, mode: download}}
        """)
    assert m.references["a"].datastore.root == str(other)  # the default, by name, is shadowed too
    assert m.references["b"].datastore.root == str(other)


def test_unused_datastores_need_no_credentials(env, monkeypatch):
    monkeypatch.delenv("TRAINING_KEY")
    m = load(env, """\
        datastores:
          spare: {type: azure_blob, account_name: x1y, container_name: c1c, credential: {account_key_env: NOPE}}
        data_references:
          a: {mode: download}
        """)
    assert list(m.references) == ["a"]


def test_upload_to_a_missing_local_root_is_allowed(env):
    m = load(env, """\
        datastores:
          out: {type: local, root: @TMP@/allowed/not-yet}
        data_references:
          results: {datastore: out, mode: upload}
        """)
    assert m.references["results"].datastore.root == str(env.tmp / "allowed" / "not-yet")


def test_loading_writes_nothing(env):
    path = write(env, """\
        work_dir: @TMP@/new/work
        cache: {dir: @TMP@/new/cache}
        data_references:
          a: {mode: download}
          b: {datastore: localdata, mode: upload, path_on_compute: out}
        """)
    before = sorted(glob.glob(str(env.tmp / "**"), recursive=True))
    load_manifest(path, env.ws, environ={})
    assert sorted(glob.glob(str(env.tmp / "**"), recursive=True)) == before


def test_v1_run_configuration(env):
    m = load(env, """\
        script: train.py
        arguments: [--data, $AZUREML_DATAREFERENCE_input_data, --epochs, 3]
        target: cpu-cluster
        framework: Python
        nodeCount: 1
        environment:
          name: my-env
          python: {userManagedDependencies: false}
          environmentVariables: {EXAMPLE_ENV_VAR: EXAMPLE_VALUE}
        dataReferences:
          input_data:
            dataStoreName: training
            pathOnDataStore: datasets/cifar
            mode: Mount
            pathOnCompute:
            overwrite: false
          results:
            dataStoreName: localdata
            pathOnDataStore: runs/{run_id}
            mode: UPLOAD
            pathOnCompute: outputs
            overwrite: true
        """)
    assert m.command == ["python", "train.py", "--data", "$AZUREML_DATAREFERENCE_input_data", "--epochs", "3"]
    assert m.environment == {"EXAMPLE_ENV_VAR": "EXAMPLE_VALUE"}
    inp, out = m.references["input_data"], m.references["results"]
    assert (inp.datastore.name, inp.path_on_datastore, inp.mode) == ("training", "datasets/cifar", "mount")
    assert inp.path_on_compute == os.path.join(m.work_dir, "mounts", "input_data")
    assert (out.mode, out.overwrite, out.path_on_datastore) == ("upload", True, f"runs/{m.run_id}")
    assert out.path_on_compute == os.path.join(env.cwd, "outputs")


def test_v1_with_an_explicit_command_and_plain_environment(env):
    m = load(env, """\
        command: [python, x.py]
        environment: {A: b}
        dataReferences:
          d: {dataStoreName: localdata, mode: download}
        """)
    assert (m.command, m.environment) == (["python", "x.py"], {"A": "b"})


@pytest.mark.parametrize("uri, store, path", [
    ("azureml://datastores/training/paths/datasets/{run_id}", "training", "datasets/r1"),
    ("wasbs://data@acct.blob.core.windows.net/a%20b", "training", "a b"),
    ("wasb://data@acct.blob.core.windows.net/x", "training", "x"),
    ("https://acct.blob.core.windows.net/data/x/{node_rank}", "training", "x/0"),
    ("https://acct.file.core.windows.net/share/dir", "files", "dir"),
    ("https://other1.blob.core.windows.net/bucket/x", "uri_other1_bucket", "x"),
    ("https://other1.file.core.chinacloudapi.cn/share1/x", "uri_other1_share1", "x"),
])
def test_uri_references(env, uri, store, path):
    m = load(env, f"run_id: r1\ndata_references:\n  d: {{uri: '{uri}', mode: download}}\n")
    ref = m.references["d"]
    assert (ref.datastore.name, ref.path_on_datastore) == (store, path)


def test_implied_datastore_from_uri_needs_no_secret(env):
    ref = load(env, "data_references:\n  d: {uri: 'wasbs://c1c@other1.blob.core.windows.net/', mode: mount}\n") \
        .references["d"]
    assert ref.datastore.credential == {"managed_identity": True}


# -- the command's environment --------------------------------------------------------
def test_variables_holding_datastore_secrets_are_known(env):
    """Those of every datastore the workspace and the manifest define, used
    by a reference or not."""
    m = load(env, """\
        datastores:
          extra: {type: azure_blob, account_name: abc, container_name: c1c, credential: {sas_token_env: EXTRA_SAS}}
          conn: {type: azure_file, share_name: s1s, credential: {connection_string_env: CONN}}
          mi: {type: azure_blob, account_name: abc, container_name: c2c, credential: {managed_identity: true}}
          keyfile: {type: azure_blob, account_name: abc, container_name: c3c, credential: {account_key_file: /k}}
          scratch: {type: local, root: /tmp}
        data_references:
          out: {mode: upload}
        """)
    assert m.secret_variables == {"TRAINING_KEY", "FILES_SAS", "WS_BLOB_KEY", "EXTRA_SAS", "CONN"}
    assert m.pass_environment == ()


def test_the_default_chain_adds_the_secrets_azure_identity_reads(env):
    m = load(env, "datastores:\n  chain: {type: azure_blob, account_name: abc, container_name: c1c}\n"
                  "data_references:\n  out: {mode: upload}\n")
    assert {"AZURE_CLIENT_SECRET", "AZURE_CLIENT_CERTIFICATE_PASSWORD", "AZURE_PASSWORD"} <= m.secret_variables
    assert "AZURE_CLIENT_ID" not in m.secret_variables and "IDENTITY_HEADER" not in m.secret_variables


def test_child_environment_withholds_secrets_unless_passed_on(env, caplog):
    from mountd.run.lifecycle import child_environment
    environ = {"TRAINING_KEY": "k-SECRET", "FILES_SAS": "sig-SECRET", "WS_BLOB_KEY": "ws-SECRET",
               "AZURE_CLIENT_SECRET": "sp-secret", "PATH": "/bin", "EPOCHS": "1"}
    m = load(env, "data_references:\n  out: {mode: upload}\nenvironment: {EPOCHS: '2', WS_BLOB_KEY: other}\n"
                  "pass_environment: [FILES_SAS, NOT_SET]\n")
    with caplog.at_level("INFO", logger="mountd.run"):
        child = child_environment(m, environ)
    assert child == {"FILES_SAS": "sig-SECRET", "WS_BLOB_KEY": "other", "AZURE_CLIENT_SECRET": "sp-secret",
                     "PATH": "/bin", "EPOCHS": "2"}  # no datastore here uses the chain: its secret is the job's
    [line] = [r.getMessage() for r in caplog.records if "training process" in r.getMessage()]
    assert "TRAINING_KEY" in line and "pass_environment" in line
    assert "FILES_SAS" not in line and "WS_BLOB_KEY" not in line and "SECRET" not in line


# -- placeholders and node rank --------------------------------------------------------
@pytest.mark.parametrize("var", RANK_VARIABLES)
def test_node_rank_from_each_variable(env, var):
    m = load(env, "run_id: r\ndata_references:\n  o: {mode: upload, path_on_datastore: 'out/{node_rank}'}\n",
             environ={var: "5"})
    assert m.node_rank == "5"
    assert m.references["o"].path_on_datastore == "out/5"


def test_node_rank_precedence_and_sanitizing():
    assert detect_node_rank({"RANK": "3", "NODE_RANK": "1", "AZ_BATCH_NODE_ID": "x"}) == "1"
    assert detect_node_rank({"AZ_BATCH_NODE_ID": "tvm-123_4$x/y", "SLURM_PROCID": ""}) == "tvm-123_4_x_y"
    assert detect_node_rank({"NODE_RANK": ".."}) == "__"
    assert detect_node_rank({"NODE_RANK": " 7 "}) == "7"
    assert detect_node_rank({}) == "0"


@pytest.mark.parametrize("text, expected", [
    ("runs/{run_id}/{node_rank}", "runs/r1/3"),
    ("{{run_id}}", "{run_id}"),
    ("a{{b}}c", "a{b}c"),
    ("{{{run_id}}}", "{r1}"),
    ("plain", "plain"),
])
def test_expand_placeholders(text, expected):
    assert expand_placeholders(text, {"run_id": "r1", "node_rank": "3"}) == expected


@pytest.mark.parametrize("text, fragment", [
    ("{runid}", "unknown placeholder '{runid}'"), ("{}", "unknown placeholder '{}'"),
    ("a{b", "unmatched '{'"), ("a}b", "unmatched '}'"), ("{run_id:>4}", "unknown placeholder"),
])
def test_expand_placeholders_rejects(text, fragment):
    with pytest.raises(UsageError, match=re.escape(fragment)):
        expand_placeholders(text, {"run_id": "r1", "node_rank": "3"})


def test_placeholders_in_every_path_field(env):
    m = load(env, """\
        run_id: r9
        work_dir: @TMP@/w/{run_id}-{node_rank}
        data_references:
          a: {mode: download, path_on_datastore: 'in/{{literal}}/{run_id}', path_on_compute: 'in-{node_rank}'}
          b: {mode: download, uri: 'azureml://datastores/training/paths/{run_id}/{node_rank}'}
        """, environ={"RANK": "4"})
    assert m.work_dir == str(env.tmp / "w" / "r9-4")
    assert m.references["a"].path_on_datastore == "in/{literal}/r9"
    assert m.references["a"].path_on_compute == os.path.join(env.cwd, "in-4")
    assert m.references["b"].path_on_datastore == "r9/4"


# -- the catalogue of bad manifests ---------------------------------------------------
def _symlink_to_etc(env, monkeypatch):
    (env.tmp / "work").mkdir()
    os.symlink("/etc", env.tmp / "work" / "link")
    os.symlink("/etc", os.path.join(env.cwd, "link"))  # relative path_on_compute: under the working dir


def _etc_link_outside(env, monkeypatch):
    os.symlink("/etc", env.tmp / "etclink")


def _no_key(env, monkeypatch):
    monkeypatch.delenv("TRAINING_KEY")


def _empty_key(env, monkeypatch):
    monkeypatch.setenv("TRAINING_KEY", "   ")


def _work_dir_is_a_file(env, monkeypatch):
    (env.tmp / "afile").write_text("x")


REF = "data_references:\n  images:\n"  # a reference whose body follows, indented by four

BAD = [
    # (id, manifest text with the offending line marked `#<`, field named, extra setup)
    ("unknown-top-level-key", "run_id: r1\ncolour: blue  #<\n", "colour", None),
    ("non-string-top-level-key", "run_id: r1\n1: x  #<\n", "1", None),
    ("unknown-reference-key", REF + "    mode: mount\n    colour: blue  #<\n", "data_references.images.colour", None),
    ("unknown-datastore", REF + "    datastore: nosuch  #<\n    mode: mount\n", "data_references.images.datastore",
     None),
    ("invalid-datastore-name", REF + "    datastore: no-such  #<\n    mode: mount\n",
     "data_references.images.datastore", None),
    ("unknown-mode", REF + "    mode: copy  #<\n", "data_references.images.mode", None),
    ("mode-number", REF + "    mode: 3  #<\n", "data_references.images.mode", None),
    ("mode-capitalised", REF + "    mode: Mount  #<\n", "data_references.images.mode", None),
    ("mode-missing", "data_references:\n  images:  #<\n    datastore: training\n", "data_references.images.mode",
     None),
    ("overwrite-string", REF + "    mode: download\n    overwrite: 'yes'  #<\n", "data_references.images.overwrite",
     None),
    ("read-write-download", REF + "    mode: download\n    read_write: true  #<\n",
     "data_references.images.read_write", None),
    ("reference-not-mapping", "data_references:\n  images: mount  #<\n", "data_references.images", None),
    ("data-references-list", "data_references: [a, b]  #<\n", "data_references", None),
    ("command-number", "run_id: r\ncommand: 5  #<\n", "command", None),
    ("command-nested-list", "command:\n  - python\n  - [a, b]  #<\n", "command[1]", None),
    ("command-null-item", "command:\n  - python\n  -  #<\n", "command[1]", None),
    ("command-unbalanced-quote", "command: \"python 'oops\"  #<\n", "command", None),
    ("environment-list", "environment: [A, B]  #<\n", "environment", None),
    ("environment-bad-name", "environment:\n  1BAD: x  #<\n", "environment.1BAD", None),
    ("environment-mapping-value", "environment:\n  X: {a: 1}  #<\n", "environment.X", None),
    ("environment-null-value", "environment:\n  X:  #<\n", "environment.X", None),
    ("environment-sets-reference", REF + "    mode: download\nenvironment:\n  AZUREML_DATAREFERENCE_images: x  #<\n",
     "environment.AZUREML_DATAREFERENCE_images", None),
    ("bad-yaml-indent", "run_id: r1\ncommand: x\n  bad: y  #<\n", "invalid YAML", None),
    ("bad-yaml-flow", "run_id: r1\ncommand: [a, b\nenvironment: {}  #<\n", "invalid YAML", None),
    ("two-documents", "run_id: r1\n---  #<\nrun_id: r2\n", "invalid YAML", None),
    ("control-character", "run_id: r1\ncommand: \"\x07\"  #<\n", "invalid YAML", None),
    ("empty-file", "", "manifest", None),
    ("only-a-comment", "# nothing here  #<\n", "manifest", None),
    ("top-level-list", "- a  #<\n- b\n", "manifest", None),
    ("duplicate-top-level-key", "run_id: a\nrun_id: b  #<\n", "run_id", None),
    ("duplicate-nested-key", REF + "    mode: mount\n    mode: download  #<\n", "data_references.images.mode", None),
    ("duplicate-reference-case", REF + "    mode: mount\n  Images:  #<\n    mode: mount\n",
     "data_references.Images", None),
    ("invalid-reference-name", "data_references:\n  bad-name:  #<\n    mode: mount\n", "data_references.bad-name",
     None),
    ("huge-reference-name", "data_references:\n  ? " + "a" * 10_000 + "  #<\n  : {mode: mount}\n",
     "data_references.aaaa", None),
    ("huge-implicit-key", "data_references:\n  " + "a" * 2_000 + ":  #<\n    mode: mount\n", "invalid YAML", None),
    ("huge-value", REF + "    mode: download\n    path_on_datastore: '{" + "x" * 100_000 + "}'  #<\n",
     "data_references.images.path_on_datastore", None),
    ("compute-escapes-with-dotdot", REF + "    mode: download\n    path_on_compute: ../../../../outside  #<\n",
     "data_references.images.path_on_compute", None),
    ("compute-in-etc", REF + "    mode: download\n    path_on_compute: /etc/x  #<\n",
     "data_references.images.path_on_compute", None),
    ("compute-through-symlink", "work_dir: @TMP@/work\n" + REF + "    mode: download\n"
     "    path_on_compute: link/x  #<\n", "data_references.images.path_on_compute", _symlink_to_etc),
    ("compute-is-work-dir", REF + "    mode: download\n    path_on_compute: .  #<\n",
     "data_references.images.path_on_compute", None),
    ("compute-contains-work-dir", "work_dir: @TMP@/allowed/work\n" + REF + "    mode: download\n"
     "    path_on_compute: @TMP@/allowed  #<\n", "data_references.images.path_on_compute", None),
    ("compute-nested", "data_references:\n  a: {mode: mount, path_on_compute: in/a}\n"
     "  b: {mode: download, path_on_compute: in/a/b}  #<\n", "data_references.b.path_on_compute", None),
    ("compute-same", "data_references:\n  a: {mode: mount, path_on_compute: in/a}\n"
     "  b: {mode: download, path_on_compute: in/a/}  #<\n", "data_references.b.path_on_compute", None),
    ("working-dir-in-etc", "working_dir: /etc/cron.d  #<\n", "working_dir", None),
    ("working-dir-missing", "working_dir: nowhere  #<\n", "working_dir", None),
    ("working-dir-a-file", "working_dir: manifest.yaml  #<\n", "working_dir", None),
    ("working-dir-empty", "working_dir: ''  #<\n", "working_dir", None),
    ("compute-is-working-dir", REF + "    mode: upload\n    path_on_compute: ./  #<\n",
     "data_references.images.path_on_compute", None),
    ("compute-contains-working-dir", REF + "    mode: download\n    path_on_compute: ..  #<\n",
     "data_references.images.path_on_compute", None),
    ("compute-control-character", REF + "    mode: download\n    path_on_compute: \"a\\tb\"  #<\n",
     "data_references.images.path_on_compute", None),
    ("work-dir-etc", "work_dir: /etc  #<\n", "work_dir", None),
    ("work-dir-root", "work_dir: /  #<\n", "work_dir", None),
    ("work-dir-under-usr", "work_dir: /usr/local/work  #<\n", "work_dir", None),
    ("work-dir-lib64", "work_dir: /lib64/w  #<\n", "work_dir", None),
    ("work-dir-via-symlink", "work_dir: @TMP@/etclink/work  #<\n", "work_dir", _etc_link_outside),
    ("work-dir-is-a-file", "work_dir: @TMP@/afile  #<\n", "work_dir", _work_dir_is_a_file),
    ("work-dir-unknown-placeholder", "work_dir: @TMP@/{run}  #<\n", "work_dir", None),
    ("datastore-and-uri", REF + "    datastore: training\n    uri: azureml://datastores/training/paths/x  #<\n"
     "    mode: mount\n", "data_references.images.uri", None),
    ("uri-with-sas", REF + "    uri: https://acct.blob.core.windows.net/data/x?sv=2022-11-02&sig=SECRETSIG  #<\n"
     "    mode: mount\n", "data_references.images.uri", None),
    ("uri-with-user-info", REF + "    uri: https://me:SECRETSIG@acct.blob.core.windows.net/data/x  #<\n"
     "    mode: mount\n", "data_references.images.uri", None),
    ("uri-bad-scheme", REF + "    uri: ftp://acct.blob.core.windows.net/data/x  #<\n    mode: mount\n",
     "data_references.images.uri", None),
    ("uri-not-a-string", REF + "    uri: 5  #<\n    mode: mount\n", "data_references.images.uri", None),
    ("uri-host-only-looks-like-azure", REF + "    uri: https://acct.blob.core.windows.net.example.org/data/x  #<\n"
     "    mode: mount\n", "data_references.images.uri", None),
    ("wasbs-host-only-looks-like-azure", REF + "    uri: wasbs://data@acct.blob.example.org/x  #<\n"
     "    mode: download\n", "data_references.images.uri", None),
    ("pass-environment-scalar", "pass_environment: TRAINING_KEY  #<\n", "pass_environment", None),
    ("pass-environment-bad-name", "pass_environment:\n  - OK\n  - 1BAD  #<\n", "pass_environment[1]", None),
    ("pass-environment-mapping-item", "pass_environment:\n  - {A: b}  #<\n", "pass_environment[0]", None),
    ("pass-environment-also-set", "environment: {EPOCHS: '2'}\npass_environment:\n  - EPOCHS  #<\n",
     "pass_environment[0]", None),
    ("token-over-http", "datastores:\n  emu: {type: azure_blob, container_name: data, "
     "endpoint: 'http://127.0.0.1:9/acct', credential: {managed_identity: true}}\n" + REF
     + "    datastore: emu  #<\n    mode: download\n", "data_references.images.datastore", None),
    ("uri-dotdot", REF + "    uri: azureml://datastores/training/paths/a/../../b  #<\n    mode: mount\n",
     "data_references.images.uri", None),
    ("unknown-placeholder", REF + "    mode: upload\n    path_on_datastore: runs/{runid}  #<\n",
     "data_references.images.path_on_datastore", None),
    ("unmatched-brace", REF + "    mode: upload\n    path_on_compute: 'out{'  #<\n",
     "data_references.images.path_on_compute", None),
    ("datastore-path-dotdot", REF + "    mode: download\n    path_on_datastore: a/../../b  #<\n",
     "data_references.images.path_on_datastore", None),
    ("missing-credential-variable", REF + "    datastore: training  #<\n    mode: mount\n",
     "data_references.images.datastore", _no_key),
    ("empty-credential-variable", REF + "    datastore: training  #<\n    mode: mount\n",
     "data_references.images.datastore", _empty_key),
    ("cache-memory-1PB", "cache:\n  block_size: 8MiB\n  memory: 1PB  #<\n", "cache.memory", None),
    ("cache-bad-size", "cache:\n  max_size: lots  #<\n", "cache.max_size", None),
    ("cache-huge-number", "cache:\n  attribute_ttl: " + "9" * 400 + "  #<\n", "cache.attribute_ttl", None),
    ("cache-nan", "cache:\n  attribute_ttl: .nan  #<\n", "cache.attribute_ttl", None),
    ("cache-unknown-setting", "cache:\n  colour: blue  #<\n", "cache.colour", None),
    ("cache-memory-below-block", "cache:  #<\n  memory: 1MiB\n  block_size: 8MiB\n", "cache", None),
    ("cache-dir-in-etc", "cache:\n  dir: /etc/mountd-cache  #<\n", "cache.dir", None),
    ("cache-not-mapping", "cache: big  #<\n", "cache", None),
    ("bad-upload-when", "upload_when: sometimes  #<\n", "upload_when", None),
    ("run-id-with-slash", "run_id: a/b  #<\n", "run_id", None),
    ("run-id-dots", "run_id: ..  #<\n", "run_id", None),
    ("run-id-list", "run_id: [a]  #<\n", "run_id", None),
    ("both-reference-sections", "data_references: {}\ndataReferences: {}  #<\n", "dataReferences", None),
    ("v1-snake-case-key", "dataReferences:\n  d:\n    mode: Mount\n    path_on_compute: x  #<\n",
     "dataReferences.d.path_on_compute", None),
    ("v1-datasets", "dataReferences: {}\ndata:  #<\n  ds: {dataLocation: x}\n", "data", None),
    ("v1-key-without-v1", "script: train.py  #<\n", "script", None),
    ("inline-datastore-bad-type", "datastores:\n  mine: {type: s3}  #<\n", "datastores", None),
    ("inline-datastore-bad-name", "datastores:\n  my-store: {type: local, root: /x}  #<\n", "datastores.my-store",
     None),
    ("inline-datastore-secret", "datastores:\n  mine:\n    type: azure_blob\n    account_name: abc\n"
     "    container_name: c1c\n    credential: {account_key: SECRETSIG}  #<\n", "datastores.mine.credential", None),
    ("inline-datastore-case-duplicate", "datastores:\n  mine: {type: local, root: /x}\n"
     "  Mine: {type: local, root: /y}  #<\n", "datastores.Mine", None),
    ("inline-datastore-non-string-key", "datastores:\n  mine:\n    type: local\n    1: x  #<\n",
     "datastores.mine.1", None),
    ("local-root-missing-for-download", "datastores:\n  gone: {type: local, root: @TMP@/gone}\n" + REF
     + "    datastore: gone  #<\n    mode: download\n", "data_references.images.datastore", None),
    ("inline-local-upload-outside", "datastores:\n  out: {type: local, root: @TMP@/elsewhere}\n" + REF
     + "    datastore: out  #<\n    mode: upload\n", "data_references.images.datastore", None),
    ("key-file-is-a-directory", "datastores:\n  k: {type: azure_blob, account_name: abc, container_name: c1c, "
     "credential: {account_key_file: @TMP@}}\n" + REF + "    datastore: k  #<\n    mode: mount\n",
     "data_references.images.datastore", None),
    ("key-file-missing", "datastores:\n  k: {type: azure_blob, account_name: abc, container_name: c1c, "
     "credential: {account_key_file: @TMP@/nokey}}\n" + REF + "    datastore: k  #<\n    mode: mount\n",
     "data_references.images.datastore", None),
]


@pytest.mark.parametrize("text, field, setup", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_manifest(env, monkeypatch, text, field, setup):
    if setup:
        setup(env, monkeypatch)
    lines = text.replace("@TMP@", str(env.tmp)).splitlines()
    line = next((i + 1 for i, t in enumerate(lines) if t.endswith("#<")), 1)
    with pytest.raises(UsageError) as e:
        load(env, text)
    message = str(e.value)
    assert len(message.splitlines()) == 1, message
    assert f"{env.manifest}:{line}:" in message, message
    assert field in message, message
    assert "SECRETSIG" not in message and "c2VjcmV0" not in message
    assert len(message) < 1000
    assert e.value.exit_code == 2


def test_catalogue_is_big_enough():
    assert len(BAD) >= 30


@pytest.mark.parametrize("text, fragment", [
    (REF + "    mode: copy\n", "must be one of mount, download, upload, got 'copy'"),
    (REF + "    datastore: nosuch\n    mode: mount\n", "unknown datastore 'nosuch' (known: "),
    ("run_id: a\nrun_id: b\n", "duplicate key 'run_id'"),
    (REF + "    datastore: training\n    mode: mount\n", "environment variable TRAINING_KEY"),
    ("cache: {memory: 1PB}\n", "cache.memory: expected a size"),
    ("cache: {memory: 2000TB}\n", "cache.memory: '2000TB' is too large"),
    (REF + "    mode: upload\n    path_on_datastore: '{runid}'\n", "unknown placeholder '{runid}'"),
    (REF + "    mode: mount\n    uri: 'https://acct.blob.core.windows.net/data?sig=x'\n", "Register a datastore"),
])
def test_messages_say_what_is_wrong(env, monkeypatch, text, fragment):
    monkeypatch.delenv("TRAINING_KEY")
    with pytest.raises(UsageError) as e:
        load(env, text)
    assert fragment in str(e.value)


def test_credential_problems_are_config_errors(env, monkeypatch):
    monkeypatch.delenv("TRAINING_KEY")
    with pytest.raises(ConfigError):
        load(env, REF + "    datastore: training\n    mode: mount\n")


def test_missing_manifest(env):
    with pytest.raises(UsageError, match="does not exist"):
        load_manifest(str(env.tmp / "nope.yaml"), env.ws)


def test_default_work_dir_is_checked_too(env, monkeypatch):
    monkeypatch.chdir("/usr")
    with pytest.raises(UsageError, match=r":1: work_dir: '/usr/mountd-runs/r' \(the default.*is in /usr"):
        load(env, "run_id: r\n")


def test_workspace_cache_section_is_overridden_by_manifest_then_environment(env, tmp_path):
    ws_file = tmp_path / "ws3.yaml"
    ws_file.write_text(yaml.safe_dump({"cache": {"memory": "300MiB", "threads": 3, "max_size": "1GiB"}}))
    m = load_manifest(write(env, "cache: {threads: 5, max_size: 2GiB}\n"), Workspace.load(str(ws_file)),
                      environ={"DATASET_MOUNT_CACHE_SIZE": "3GiB"})
    assert (m.cache.memory, m.cache.threads, m.cache.max_size) == (300 * MiB, 5, 3 * GiB)


def test_allowed_roots_permit_system_like_work_dirs(env, tmp_path):
    ws_file = tmp_path / "ws2.yaml"
    ws_file.write_text(yaml.safe_dump({"allowed_roots": ["/usr/local/mountd"]}))
    m = load_manifest(write(env, "run_id: r\n"), Workspace.load(str(ws_file)), work_dir="/usr/local/mountd/w",
                      environ={})
    assert m.work_dir == "/usr/local/mountd/w"


# -- examples ----------------------------------------------------------------------------
@pytest.mark.parametrize("example", sorted(glob.glob(os.path.join(EXAMPLES, "*.yaml"))),
                         ids=os.path.basename)
def test_examples_parse(env, monkeypatch, example):
    for var in ("TRAINING_ACCOUNT_KEY", "TRAINING_SAS_TOKEN"):
        monkeypatch.setenv(var, "c2VjcmV0")
    m = load_manifest(example, env.ws, environ={"NODE_RANK": "1"})
    assert m.references and m.command
    modes = {ref.mode for ref in m.references.values()}
    assert modes == {"mount", "download", "upload"}
    assert any(ref.path_on_datastore.endswith("/1") for ref in m.references.values() if ref.mode == "upload")


def test_there_are_examples():
    names = {os.path.basename(p) for p in glob.glob(os.path.join(EXAMPLES, "*.yaml"))}
    assert {"blob-account-key.yaml", "blob-sas.yaml", "blob-managed-identity.yaml",
            "azureml-v1-run-config.yaml"} <= names


# -- fuzzing ------------------------------------------------------------------------------
_KEYS = ["run_id", "work_dir", "datastores", "data_references", "dataReferences", "command", "environment",
         "upload_when", "cache", "datastore", "path_on_datastore", "uri", "mode", "path_on_compute", "overwrite",
         "read_write", "dataStoreName", "pathOnDataStore", "pathOnCompute", "type", "root", "credential",
         "account_name", "container_name", "memory", "max_size", "dir", "script", "arguments", "images", "x"]
_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=12),
    st.sampled_from(["mount", "download", "upload", "Mount", "training", "localdata", "local", "azure_blob",
                     "{run_id}", "{node_rank}", "{x}", "/etc", "..", "/", ".", "~", "8MiB", "1PB",
                     "azureml://datastores/training/paths/x", "https://acct.blob.core.windows.net/data/x",
                     "wasbs://c@other1.blob.core.windows.net/p?sig=1", "always", "on_success"]))
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=6), inner, max_size=4),
                       max_leaves=16)
_REFERENCE = st.dictionaries(st.sampled_from(_KEYS[9:17]), _VALUES, max_size=6)
_DOCUMENT = st.dictionaries(
    st.sampled_from(_KEYS[:9] + ["colour"]) | st.text(max_size=4),
    _VALUES | st.dictionaries(st.sampled_from(["images", "Images", "a", "bad-name"]) | st.text(max_size=4),
                              _REFERENCE | _VALUES, max_size=3),
    max_size=6)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=_DOCUMENT | _VALUES, raw=st.booleans())
def test_fuzz_only_usage_errors(env, document, raw):
    text = yaml.safe_dump(document, allow_unicode=True) if not raw else str(document)
    with open(env.manifest, "w", encoding="utf-8", errors="surrogatepass") as f:
        f.write(text)
    try:
        result = load_manifest(env.manifest, env.ws, environ={})
    except UsageError as e:
        assert len(str(e).splitlines()) <= 1
    else:
        assert isinstance(result, Manifest)
