"""The seed's Python calls, written as the seed writes them, against Azurite
and the local datastore."""

import os
import stat

import pytest

from mountd.api import Datastore, Workspace
from mountd.errors import TransferFailed, UsageError
from tests.conftest import KEY


def test_seed_workflow_with_blob_container(tmp_path, azurite, container, monkeypatch):
    monkeypatch.setenv("MOUNTD_WORKSPACE", str(tmp_path / "cfg" / "workspace.yaml"))
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
    text = (tmp_path / "cfg" / "workspace.yaml").read_text()
    assert KEY not in text and "account_key_file" in text
    secret_file = tmp_path / "cfg" / "secrets" / "your_datastore.account_key"
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


def test_default_local_datastore_needs_no_account(tmp_path):
    ws = Workspace.from_config(str(tmp_path / "none.yaml"))
    ds = ws.get_default_datastore()
    assert ds.name == "workspacelocalstore" and ds.datastore_type == "Local"
    src = tmp_path / "src"
    src.mkdir()
    (src / "x.bin").write_bytes(os.urandom(5000))
    assert ds.upload(str(src), target_path="data", show_progress=False) == 1
    assert ds.download(str(tmp_path / "out"), prefix="data/", show_progress=False) == 1
    assert (tmp_path / "out" / "data" / "x.bin").read_bytes() == (src / "x.bin").read_bytes()


def test_failed_registration_keeps_no_secret(tmp_path, azurite):
    ws = Workspace.from_config(str(tmp_path / "ws.yaml"))
    with pytest.raises(Exception):
        Datastore.register_azure_blob_container(ws, "nope", "no-such-container", "devstoreaccount1",
                                                account_key=KEY, endpoint=azurite.account_url)
    assert not (tmp_path / "secrets" / "nope.account_key").exists()
    assert not (tmp_path / "ws.yaml").exists()


def test_bad_name_and_unknown_datastore(tmp_path):
    ws = Workspace.from_config(str(tmp_path / "ws.yaml"))
    with pytest.raises(UsageError):
        Datastore.register_local(ws, "bad name!", str(tmp_path))
    with pytest.raises(UsageError, match="unknown datastore"):
        Datastore.get(ws, "missing")


def test_upload_failure_raises_with_names(tmp_path):
    ws = Workspace.from_config(str(tmp_path / "ws.yaml"))
    ds = ws.get_default_datastore()
    src = tmp_path / "src"
    src.mkdir()
    (src / "outside").symlink_to("/etc/hostname")
    with pytest.raises(TransferFailed, match="outside"):
        ds.upload(str(src), show_progress=False)
