"""The seed's Python calls, written as the seed writes them, against Azurite
and the local datastore."""

import os
import stat

import pytest

from mountd.api import Datastore, Workspace
from mountd.errors import MountdError, TransferFailed, UsageError
from tests.conftest import KEY


def test_seed_workflow_with_blob_container(tmp_path, azurite, container, monkeypatch):
    # no workspace file yet, at the default location: registering creates it
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    ws = Workspace.from_config()
    ds = Datastore.register_azure_blob_container(workspace=ws,
                                                 datastore_name="your_datastore",
                                                 container_name="seed-container",
                                                 account_name="devstoreaccount1",
                                                 account_key=KEY,
                                                 endpoint=azurite.account_url,
                                                 create_if_not_exists=True)
    assert ds.datastore_type == "AzureBlob"
    # the literal key went to a private file, not into the workspace file
    text = (tmp_path / "xdg" / "mountd" / "workspace.yaml").read_text()
    assert KEY not in text and "account_key_file" in text
    secret_file = tmp_path / "xdg" / "mountd" / "secrets" / "your_datastore.account_key"
    assert stat.S_IMODE(os.stat(secret_file).st_mode) == 0o600

    ws = Workspace.from_config()
    assert set(ws.datastores) == {"your_datastore", "workspacelocalstore"}
    ws.set_default_datastore("your_datastore")
    ds = ws.get_default_datastore()
    assert ds.name == "your_datastore"

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"a")
    (src / "sub" / "b.txt").write_bytes(b"b")
    assert ds.upload(src_dir=str(src), target_path="your target path", overwrite=True, show_progress=True) == 2
    assert ds.upload(src_dir=str(src), target_path="your target path", show_progress=False) == 0  # skipped
    assert ds.upload_files(files=[str(src / "sub" / "b.txt")], relative_root=str(src),
                           target_path="files", show_progress=False) == 1
    got = Datastore.get(ws, datastore_name="YOUR_DATASTORE").download(
        target_path=str(tmp_path / "dl"), prefix="your target path", show_progress=False)
    assert got == 2
    assert (tmp_path / "dl" / "your target path" / "sub" / "b.txt").read_bytes() == b"b"
    assert Datastore.get(ws, "your_datastore").download(str(tmp_path / "dl2"), prefix="files/sub",
                                                        show_progress=False) == 1


def test_seed_workflow_with_file_share(tmp_path, fileshare, monkeypatch):
    from azure.storage.fileshare import ShareServiceClient
    # no workspace file yet, at the default location: registering creates it
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    ws = Workspace.from_config()
    ds = Datastore.register_azure_file_share(workspace=ws,
                                             datastore_name="your_datastore",
                                             file_share_name="seed-share",
                                             account_name="devstoreaccount1",
                                             account_key=KEY,
                                             endpoint=fileshare.account_url,
                                             create_if_not_exists=True)
    share = ShareServiceClient.from_connection_string(fileshare.connection_string).get_share_client("seed-share")
    try:
        assert ds.datastore_type == "AzureFile"
        assert KEY not in (tmp_path / "xdg" / "mountd" / "workspace.yaml").read_text()
        src = tmp_path / "src"
        (src / "sub").mkdir(parents=True)
        (src / "a.txt").write_bytes(b"a")
        (src / "sub" / "b.txt").write_bytes(b"b")
        assert ds.upload(src_dir=str(src), target_path="your target path", overwrite=True) == 2
        assert share.get_file_client("your target path/sub/b.txt").download_file().readall() == b"b"
        ds = Datastore.get(Workspace.from_config(), "YOUR_DATASTORE")
        assert ds.download(target_path=str(tmp_path / "dl"), prefix="your target path", show_progress=False) == 2
        assert (tmp_path / "dl" / "your target path" / "a.txt").read_bytes() == b"a"
    finally:
        share.delete_share()


def test_default_local_datastore_needs_no_account(tmp_path):
    ws = Workspace.from_config()  # no file at the default location
    ds = ws.get_default_datastore()
    assert ds.name == "workspacelocalstore" and ds.datastore_type == "Local"
    src = tmp_path / "src"
    src.mkdir()
    (src / "x.bin").write_bytes(os.urandom(5000))
    assert ds.upload(str(src), target_path="data", show_progress=False) == 1
    assert ds.download(str(tmp_path / "out"), prefix="data/", show_progress=False) == 1
    assert (tmp_path / "out" / "data" / "x.bin").read_bytes() == (src / "x.bin").read_bytes()


def test_failed_registration_keeps_no_secret(tmp_path, azurite):
    ws = Workspace.from_config(str(tmp_path / "ws.yaml"), create=True)
    with pytest.raises(MountdError):
        Datastore.register_azure_blob_container(ws, "nope", "no-such-container", "devstoreaccount1",
                                                account_key=KEY, endpoint=azurite.account_url)
    assert not (tmp_path / "secrets" / "nope.account_key").exists()
    assert not (tmp_path / "ws.yaml").exists()


def test_bad_name_and_unknown_datastore(tmp_path):
    ws = Workspace.from_config(str(tmp_path / "ws.yaml"), create=True)
    with pytest.raises(UsageError):
        Datastore.register_local(ws, "bad name!", str(tmp_path))
    with pytest.raises(UsageError, match="unknown datastore"):
        Datastore.get(ws, "missing")


def test_upload_failure_raises_with_names(tmp_path):
    ws = Workspace.from_config(str(tmp_path / "ws.yaml"), create=True)
    ds = ws.get_default_datastore()
    src = tmp_path / "src"
    src.mkdir()
    (src / "outside").symlink_to("/etc/hostname")
    with pytest.raises(TransferFailed, match="outside"):
        ds.upload(str(src), show_progress=False)


def test_data_references_follow_the_seed(tmp_path):
    from mountd.api import DataReference
    ws = Workspace.from_config(str(tmp_path / "ws.yaml"), create=True)
    ds = ws.get_default_datastore()
    assert str(ds) == "$AZUREML_DATAREFERENCE_workspacelocalstore"
    assert str(ds.as_mount()) == "$AZUREML_DATAREFERENCE_workspacelocalstore"
    bar = ds.path("./bar").as_download(path_on_compute="/tmp/bar")
    assert bar.mode == "download" and bar.path_on_compute == "/tmp/bar" and bar.path_on_datastore == "bar"
    assert len(bar.data_reference_name) == 32  # a fresh hex id when the path is not the root
    assert ds.path("x").data_reference_name != ds.path("x").data_reference_name
    named = ds.path("data", data_reference_name="images")
    assert str(named) == "$AZUREML_DATAREFERENCE_images"
    with pytest.raises(UsageError):
        DataReference(ds, "bad name", mode="mount")
    with pytest.raises(UsageError):
        DataReference(ds, "ok", mode="copy")


def test_run_manifest_written_by_the_api_runs(tmp_path, monkeypatch):
    import subprocess
    import sys
    from mountd.api import RunManifest
    monkeypatch.setenv("MOUNTD_NO_FUSE", "1")  # mount falls back to download: no FUSE needed here
    ws = Workspace.from_config(str(tmp_path / "ws.yaml"), create=True)
    src = tmp_path / "src"
    (src / "data").mkdir(parents=True)
    (src / "data" / "x.txt").write_text("payload")
    store = Datastore.register_local(ws, "scratch", str(src))
    inputs = store.path("data", data_reference_name="inputs").as_mount()
    outputs = store.path("results", data_reference_name="outputs").as_upload()
    script = "import os,shutil,sys; shutil.copy(os.path.join(sys.argv[1], 'x.txt'), sys.argv[2])"
    manifest = RunManifest(command=[sys.executable, "-c", script, inputs, outputs], run_id="api1",
                           work_dir=str(tmp_path / "work")).write(str(tmp_path / "job.yaml"))
    r = subprocess.run([sys.executable, "-m", "mountd", "--workspace", str(tmp_path / "ws.yaml"), "run", manifest],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (src / "results" / "x.txt").read_text() == "payload"


def test_a_named_workspace_file_that_does_not_exist_is_refused(tmp_path):
    # Only the default location may be absent: a named file that is not there
    # must not silently become the built-in local datastore.
    with pytest.raises(UsageError, match=r"none.yaml \(named by Workspace.from_config\) does not exist"):
        Workspace.from_config(str(tmp_path / "none.yaml"))
    ws = Workspace.from_config(str(tmp_path / "new.yaml"), create=True)
    Datastore.register_local(ws, "scratch", str(tmp_path))
    assert (tmp_path / "new.yaml").exists()
    assert Workspace.from_config(str(tmp_path / "new.yaml")).datastores.keys() >= {"scratch"}


@pytest.mark.fuse
def test_a_mount_the_api_asks_to_prefetch_is_prefetched(tmp_path):
    import json
    import subprocess
    import sys
    from mountd.api import RunManifest
    from tests.integration.test_prefetch import WAIT_FOR_PREFETCH
    ws = Workspace.from_config(str(tmp_path / "ws.yaml"), create=True)
    src = tmp_path / "src"
    (src / "data").mkdir(parents=True)
    for i in range(5):
        (src / "data" / f"{i}.bin").write_bytes(bytes([i]) * 3000)
    store = Datastore.register_local(ws, "scratch", str(src))
    images = store.path("data", data_reference_name="images").as_mount(prefetch=True)
    assert images.to_manifest()["prefetch"] is True and "prefetch" not in store.as_mount().to_manifest()
    with pytest.raises(UsageError, match="read-only mounts"):
        store.as_mount(read_write=True, prefetch=True)
    manifest = RunManifest(references=[images], command=[sys.executable, "-c", WAIT_FOR_PREFETCH], run_id="api2",
                           work_dir=str(tmp_path / "work")).write(str(tmp_path / "job.yaml"))
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    r = subprocess.run([sys.executable, "-m", "mountd", "--workspace", str(tmp_path / "ws.yaml"), "run", manifest],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    [line] = [x for x in r.stdout.splitlines() if x.startswith("PREFETCH ")]
    state = json.loads(line.split(" ", 1)[1])
    assert state["state"] == "done" and state["files"] == 5, state
