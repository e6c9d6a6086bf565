"""Every code block of the seed (shared/seed/datastores-how-to.nl.md), as
written there, in mountd.api spelling: `azureml.core`, `azureml.data` and
`azureml.train.estimator` become `mountd.api`, and the placeholders ('your
datastore name', 'your storage account key', ...) get real values: Azurite,
the Files emulator and local directories. One test per block, in the seed's
order; the Estimator examples run their script on this node."""

import json
import os
import uuid

import pytest

from tests.conftest import KEY

# The seed's train.py: reads what mountd put where the references say, and
# writes ./bar.pkl where it runs.
TRAIN = r'''
import argparse, json, os, sys
parser = argparse.ArgumentParser()
parser.add_argument("--data_dir")
args = parser.parse_args()
seen = {}
for name, path in sorted(os.environ.items()):
    if name.startswith("AZUREML_DATAREFERENCE_") and os.path.exists(path):
        seen[name] = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)
report = {"data_dir": args.data_dir, "cwd": os.getcwd(), "seen": seen,
          "data": open(os.path.join(args.data_dir, "data.txt")).read() if args.data_dir else None,
          "mounted": os.path.ismount(args.data_dir) if args.data_dir else None}
open("bar.pkl", "w").write(json.dumps(report))
sys.exit(int(os.environ.get("EXIT_WITH", "0")))
'''


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """Workspace.from_config() finds this workspace file; the tests run in
    tmp_path, as a user's notebook would in its project directory."""
    path = tmp_path / "cfg" / "workspace.yaml"  # the workspace's config.json, as the portal would give it
    path.parent.mkdir()
    path.write_text("{}\n")
    monkeypatch.setenv("MOUNTD_WORKSPACE", str(path))
    monkeypatch.chdir(tmp_path)
    from mountd.api import Workspace
    return Workspace.from_config()


def register_blob(ws, azurite, name="your_datastore", container=None):
    from mountd.api import Datastore
    return Datastore.register_azure_blob_container(workspace=ws, datastore_name=name,
                                                   container_name=container or f"c{uuid.uuid4().hex[:12]}",
                                                   account_name="devstoreaccount1", account_key=KEY,
                                                   endpoint=azurite.account_url, create_if_not_exists=True)


def register_share(ws, fileshare, name="your_datastore", share=None):
    from mountd.api import Datastore
    return Datastore.register_azure_file_share(workspace=ws, datastore_name=name,
                                               file_share_name=share or f"s{uuid.uuid4().hex[:12]}",
                                               account_name="devstoreaccount1", account_key=KEY,
                                               endpoint=fileshare.account_url, create_if_not_exists=True)


def local_store(ws, name, files=None):
    from mountd.api import Datastore
    root = os.path.abspath(f"stores/{name}")
    for rel, data in (files or {}).items():
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        open(os.path.join(root, rel), "w").write(data)
    return Datastore.register_local(ws, name, root, create_if_not_exists=True)


# -- Vereisten ---------------------------------------------------------------------------
def test_workspace_from_config(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "workspace.yaml").write_text("{}\n")
    monkeypatch.setenv("MOUNTD_WORKSPACE", str(tmp_path / "cfg" / "workspace.yaml"))
    import mountd.api  # noqa: F401 (the seed's `import azureml.data`)
    from mountd.api import Workspace, Datastore

    ws = Workspace.from_config()

    assert ws.path == str(tmp_path / "cfg" / "workspace.yaml")
    assert mountd.api.Datastore is Datastore and "workspacelocalstore" in ws.datastores


# -- Een gegevensarchief kiezen ------------------------------------------------------------
def test_get_default_datastore(ws):
    ds = ws.get_default_datastore()

    # with nothing registered, the built-in local datastore serves, and it works
    assert ds.name == "workspacelocalstore"
    os.makedirs("src")
    open("src/a.txt", "w").write("a")
    assert ds.upload("src", target_path="t", show_progress=False) == 1


def test_register_azure_blob_container(ws, azurite):
    from mountd.api import AzureBlobDatastore, Datastore
    from azure.storage.blob import BlobServiceClient
    name = f"c{uuid.uuid4().hex[:12]}"

    ds = Datastore.register_azure_blob_container(workspace=ws,
                                                 datastore_name='your_datastore_name',
                                                 container_name=name,
                                                 account_name='devstoreaccount1',
                                                 account_key=KEY,
                                                 endpoint=azurite.account_url,
                                                 create_if_not_exists=True)

    assert isinstance(ds, AzureBlobDatastore) and ds.datastore_type == "AzureBlob"
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    assert service.get_container_client(name).exists()  # created
    assert KEY not in open(ws.path).read()
    service.delete_container(name)


def test_register_azure_file_share(ws, fileshare):
    from mountd.api import AzureFileDatastore, Datastore
    from azure.storage.fileshare import ShareServiceClient
    name = f"s{uuid.uuid4().hex[:12]}"

    ds = Datastore.register_azure_file_share(workspace=ws,
                                             datastore_name='your_datastore_name',
                                             file_share_name=name,
                                             account_name='devstoreaccount1',
                                             account_key=KEY,
                                             endpoint=fileshare.account_url,
                                             create_if_not_exists=True)

    assert isinstance(ds, AzureFileDatastore) and ds.datastore_type == "AzureFile"
    share = ShareServiceClient.from_connection_string(fileshare.connection_string).get_share_client(name)
    share.get_share_properties()  # created
    share.delete_share()


# -- Zoeken en gegevensopslag definiëren ---------------------------------------------------
def test_datastore_get(ws, azurite):
    from mountd.api import Datastore
    register_blob(ws, azurite, "your_datastore_name")

    #get named datastore from current workspace
    ds = Datastore.get(ws, datastore_name='your_datastore_name')

    assert ds.name == "your_datastore_name" and ds.datastore_type == "AzureBlob"
    assert Datastore.get(ws, datastore_name="YOUR_DATASTORE_NAME").name == ds.name  # names ignore case


def test_list_datastores(ws, azurite, fileshare, capsys):
    register_blob(ws, azurite, "blobs")
    register_share(ws, fileshare, "files")

    #list all datastores registered in current workspace
    datastores = ws.datastores
    for name, ds in datastores.items():
        print(name, ds.datastore_type)

    assert sorted(capsys.readouterr().out.splitlines()) == ["blobs AzureBlob", "files AzureFile",
                                                            "workspacelocalstore Local"]


def test_set_default_datastore(ws, azurite):
    from mountd.api import Workspace
    register_blob(ws, azurite, "your_datastore_name")

    #define default datastore for current workspace
    ws.set_default_datastore('your_datastore_name')

    assert Workspace.from_config().get_default_datastore().name == "your_datastore_name"  # kept in the file


# -- Uploaden en downloaden van gegevens -----------------------------------------------------
@pytest.mark.parametrize("kind", ["blob", "file"])
def test_upload(ws, kind, request, capsys):
    import mountd.api  # noqa: F401 (the seed's `import azureml.data`)
    from mountd.api import AzureFileDatastore, AzureBlobDatastore
    ds = register_blob(ws, request.getfixturevalue("azurite")) if kind == "blob" else \
        register_share(ws, request.getfixturevalue("fileshare"))
    os.makedirs("your source directory/sub")
    open("your source directory/a.txt", "w").write("a")
    open("your source directory/sub/b.txt", "w").write("b")

    ds.upload(src_dir='your source directory',
              target_path='your target path',
              overwrite=True,
              show_progress=True)

    assert isinstance(ds, AzureBlobDatastore if kind == "blob" else AzureFileDatastore)
    assert "2 files" in capsys.readouterr().out  # show_progress
    ds.download("check", prefix="your target path", show_progress=False)
    assert open("check/your target path/sub/b.txt").read() == "b"


@pytest.mark.parametrize("kind", ["blob", "file"])
def test_download(ws, kind, request, capsys):
    ds = register_blob(ws, request.getfixturevalue("azurite")) if kind == "blob" else \
        register_share(ws, request.getfixturevalue("fileshare"))
    os.makedirs("src/your prefix/deeper")
    open("src/your prefix/deeper/x.txt", "w").write("x")
    open("src/other.txt", "w").write("not this")
    ds.upload("src", show_progress=False)

    ds.download(target_path='your target path',
                prefix='your prefix',
                show_progress=True)

    assert open("your target path/your prefix/deeper/x.txt").read() == "x"
    assert not os.path.exists("your target path/other.txt")
    assert "1 file" in capsys.readouterr().out


# -- Toegang tot gegevensopslag tijdens de training -------------------------------------------
def test_as_mount_as_download_as_upload(ws, fuse_available):
    import mountd.api  # noqa: F401 (the seed's `import azureml.data`)
    from mountd.api import DataReference, RunManifest
    ds = local_store(ws, "your_datastore", {"data.txt": "payload"})

    mount = ds.as_mount()
    download = ds.as_download(path_on_compute='your path on compute')
    upload = ds.as_upload(path_on_compute='yourfilename')

    assert all(isinstance(r, DataReference) for r in (mount, download, upload))
    assert [r.mode for r in (mount, download, upload)] == ["mount", "download", "upload"]
    assert str(mount) == str(download) == str(upload) == "$AZUREML_DATAREFERENCE_your_datastore"
    # each on the compute target, one run each (they share the datastore's name)
    check = "import os; p = os.environ['AZUREML_DATAREFERENCE_your_datastore']; print(p); " \
            "assert open(os.path.join(p, 'data.txt')).read() == 'payload', p; assert os.path.ismount(p) == {}"
    assert RunManifest(command=["python", "-c", check.format(True)], references=[mount]).run() == 0
    assert RunManifest(command=["python", "-c", check.format(False)], references=[download]).run() == 0
    assert open("your path on compute/data.txt").read() == "payload"  # relative to where the job runs
    # 'yourfilename' has no suffix: an output directory, uploaded after the run
    assert RunManifest(command=["sh", "-c", "echo out > yourfilename/result.txt"], references=[upload]).run() == 0
    assert open("stores/your_datastore/result.txt").read() == "out\n"


def test_path_as_download(ws):
    from mountd.api import RunManifest
    ds = local_store(ws, "ds", {"bar/one.txt": "1", "bar/two/deep.txt": "2", "other.txt": "no"})

    #download the contents of the `./bar` directory in ds to the compute target
    ref = ds.path('./bar').as_download()

    listing = "import os; p = os.environ['AZUREML_DATAREFERENCE_{}']; " \
              "print(sorted(os.path.relpath(os.path.join(d, f), p) for d, _, fs in os.walk(p) for f in fs))"
    code = RunManifest(command=["sh", "-c", f"python -c \"{listing.format(ref.data_reference_name)}\" > seen.txt"],
                       references=[ref], run_id="r1").run()
    assert code == 0
    assert open("seen.txt").read().strip() == str(["one.txt", os.path.join("two", "deep.txt")])


# -- Voorbeelden: the Estimator ------------------------------------------------------------------
@pytest.fixture
def code_directory(tmp_path):
    os.makedirs("your code directory")
    open("your code directory/train.py", "w").write(TRAIN)
    return tmp_path / "your code directory"


def test_estimator_with_script_params(ws, azurite, code_directory, fuse_available, monkeypatch):
    from mountd.api import Estimator
    ds = register_blob(ws, azurite)
    os.makedirs("data")
    open("data/data.txt", "w").write("images")
    ds.upload("data", show_progress=False)
    compute_target = "local"

    script_params = {
        '--data_dir': ds.as_mount()
    }

    est = Estimator(source_directory='your code directory',
                    entry_script='train.py',
                    script_params=script_params,
                    compute_target=compute_target
                    )

    assert est.run() == 0
    report = json.loads((code_directory / "bar.pkl").read_text())
    assert report["cwd"] == str(code_directory)  # the script runs in its source directory
    assert (report["data"], report["mounted"]) == ("images", True)  # --data_dir is the mount
    assert report["data_dir"].endswith("/mounts/your_datastore")  # in mountd's work dir, not the code's
    # the exit code is the script's
    monkeypatch.setenv("EXIT_WITH", "7")
    assert Estimator(source_directory='your code directory', entry_script='train.py',
                     script_params=script_params, compute_target=compute_target).run() == 7


def test_estimator_with_inputs(ws, azurite, fileshare, code_directory):
    from mountd.api import Estimator
    ds1 = register_blob(ws, azurite, "ds1")
    ds2 = register_share(ws, fileshare, "ds2")
    ds3 = register_blob(ws, azurite, "ds3")
    os.makedirs("in1/sub")
    open("in1/sub/x.txt", "w").write("x")
    ds1.upload("in1", show_progress=False)
    os.makedirs("in2/foo")
    open("in2/foo/f.txt", "w").write("f")
    open("in2/not-foo.txt", "w").write("n")
    ds2.upload("in2", show_progress=False)
    compute_target = "local"

    est = Estimator(source_directory='your code directory',
                    compute_target=compute_target,
                    entry_script='train.py',
                    inputs=[ds1.as_download(), ds2.path('./foo').as_download(), ds3.as_upload(path_on_compute='./bar.pkl')])  # noqa: E501 - as the seed writes it

    assert est.run() == 0
    # ./bar.pkl, written where train.py ran, is in ds3 now
    ds3.download("got", show_progress=False)
    report = json.loads(open("got/bar.pkl").read())
    assert report["cwd"] == str(code_directory)
    seen = report["seen"]
    assert seen["AZUREML_DATAREFERENCE_ds1"] == [os.path.join("sub", "x.txt")]  # all of ds1, before the script
    foo = [v for k, v in seen.items() if k not in ("AZUREML_DATAREFERENCE_ds1", "AZUREML_DATAREFERENCE_ds3")]
    assert foo == [["f.txt"]]  # ds2's ./foo only


def test_estimator_bad_input_is_refused_before_anything_runs(ws, code_directory):
    from mountd.api import Estimator, RunManifest, Workspace
    from mountd.errors import UsageError
    with pytest.raises(UsageError, match="entry_script nothere.py is not a file in .*your code directory"):
        Estimator(source_directory='your code directory', entry_script='nothere.py')
    other = Workspace.from_config(os.path.abspath("other/ws.yaml"), create=True)
    a = local_store(ws, "a").as_download()
    b = other.get_default_datastore().as_download()
    with pytest.raises(UsageError, match="different workspaces"):
        RunManifest(command=["true"], references=[a, b]).run()
    # a relative path_on_compute leading out of the working dir is refused: nothing ran, nothing made
    with pytest.raises(UsageError, match="outside the allowed roots"):
        Estimator(source_directory='your code directory', entry_script='train.py',
                  inputs=[local_store(ws, "c").as_download(path_on_compute="../../../escape")]).run()
    assert not (code_directory / "bar.pkl").exists() and not os.path.exists("mountd-runs")
