"""Datastore names, definitions, credentials and the workspace file."""

import os
import stat

import pytest
import yaml

from mountd.config import credentials, datastores
from mountd.config.names import check_name
from mountd.config.workspace import LOCAL_STORE_NAME, Workspace
from mountd.errors import ConfigError, UsageError

BLOB = {"type": "azure_blob", "account_name": "acct", "container_name": "data",
        "credential": {"account_key_env": "KEY_VAR"}}


@pytest.mark.parametrize("name", ["training", "Training_2", "_x", "a" * 255])
def test_valid_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "with-dash", "with space", "dot.name", "ü", "a" * 256, None, 3])
def test_invalid_names(name):
    with pytest.raises(UsageError):
        check_name(name)


def test_parse_blob_datastore_defaults_to_public_cloud_url():
    cfg = datastores.parse("training", BLOB, "ws")
    assert cfg.account_url() == "https://acct.blob.core.windows.net"
    assert cfg.location == "https://acct.blob.core.windows.net/data"
    assert cfg.label == "AzureBlob"


def test_parse_sovereign_cloud_suffix():
    cfg = datastores.parse("x", dict(BLOB, endpoint_suffix="core.chinacloudapi.cn"), "ws")
    assert cfg.account_url() == "https://acct.blob.core.chinacloudapi.cn"


@pytest.mark.parametrize("raw, fragment", [
    ({"type": "s3"}, "type must be one of"),
    (dict(BLOB, colour="blue"), "unknown field 'colour'"),
    ({k: v for k, v in BLOB.items() if k != "container_name"}, "container_name is required"),
    (dict(BLOB, container_name="Bad_Name"), "invalid container_name"),
    (dict(BLOB, container_name="a--b"), "invalid container_name"),
    (dict(BLOB, endpoint="ftp://x"), "endpoint must be an http(s) URL"),
    (dict(BLOB, endpoint="http://h/acct?sig=abc"), "must not carry a query string"),
    (dict(BLOB, credential={"account_key_env": "A", "sas_token_env": "B"}), "give one credential"),
    (dict(BLOB, credential={"password": "x"}), "unknown credential key 'password'"),
    (dict(BLOB, credential={"anonymous": "yes"}), "must be true"),
    (dict(BLOB, credential="key"), "credential must be a mapping"),
    ({"type": "local", "root": "relative/dir"}, "root must be an absolute path"),
    ({"type": "local"}, "root is required"),
    ("just a string", "must be a mapping"),
])
def test_parse_rejects(raw, fragment):
    with pytest.raises(ConfigError) as exc:
        datastores.parse("ds", raw, "ws.yaml")
    assert fragment in str(exc.value)
    assert "ds" in str(exc.value)


def test_resolve_env_credential(monkeypatch):
    monkeypatch.setenv("KEY_VAR", " c2VjcmV0LXZhbHVl \n")
    cred = credentials.resolve({"account_key_env": "KEY_VAR"}, "ds")
    assert (cred.kind, cred.secret) == ("account_key", "c2VjcmV0LXZhbHVl")
    assert "c2VjcmV0LXZhbHVl" not in repr(cred)


def test_resolve_missing_and_empty_env(monkeypatch):
    monkeypatch.delenv("KEY_VAR", raising=False)
    with pytest.raises(ConfigError, match="KEY_VAR .* is not set"):
        credentials.resolve({"account_key_env": "KEY_VAR"}, "ds")
    monkeypatch.setenv("KEY_VAR", "  ")
    with pytest.raises(ConfigError, match="is empty"):
        credentials.resolve({"account_key_env": "KEY_VAR"}, "ds")


def test_resolve_file_credential(tmp_path):
    f = tmp_path / "sas"
    f.write_text("?sv=1&sig=abc\n")
    assert credentials.resolve({"sas_token_file": str(f)}, "ds").secret == "?sv=1&sig=abc"
    with pytest.raises(ConfigError, match="cannot read sas_token file"):
        credentials.resolve({"sas_token_file": str(tmp_path / "missing")}, "ds")


def test_token_kinds_are_told_apart():
    """managed_identity: true is the node's identity alone; no credential
    named is the default chain: two kinds, so neither stands in for the other."""
    assert credentials.resolve({}, "ds").kind == "default"
    assert credentials.resolve({"client_id": "cid"}, "ds").client_id == "cid"
    mi = credentials.resolve({"managed_identity": True, "client_id": "cid"}, "datastore 'ds'")
    assert (mi.kind, mi.client_id, mi.where) == ("managed_identity", "cid", "datastore 'ds'")
    assert credentials.resolve({"anonymous": True}, "ds").kind == "anonymous"
    assert set(credentials.TOKEN_KINDS) == {"managed_identity", "default"}
    assert "managed identity of the node (client id cid)" == credentials.describe(
        {"managed_identity": True, "client_id": "cid"})
    assert credentials.describe({}).startswith("none: the default chain (AZURE_CLIENT_* service principal")


def test_describe_never_shows_inline_secret():
    text = credentials.describe({"account_key": "TOPSECRET"})
    assert "TOPSECRET" not in text and "redacted" in text


def test_no_workspace_file_gives_embedded_local_store(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    ws = Workspace.load()  # nothing at the default location
    assert not ws.exists
    assert ws.default.name == LOCAL_STORE_NAME
    ws = Workspace.load(str(tmp_path / "none.yaml"), missing_ok=True)
    assert not ws.exists
    assert ws.default.name == LOCAL_STORE_NAME
    assert ws.default.root.startswith(str(tmp_path / "data"))


def test_register_save_reload_case_insensitive(tmp_path):
    path = tmp_path / "cfg" / "ws.yaml"
    ws = Workspace.load(str(path), missing_ok=True)
    ws.register(datastores.parse("Training", BLOB, "t"))
    ws.set_default("TRAINING")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = Workspace.load(str(path))
    assert again.default.name == "Training"
    assert again.get("training").container_name == "data"
    with pytest.raises(UsageError, match="already registered"):
        again.register(datastores.parse("TRAINING", BLOB, "t"))
    again.remove("training")
    final = Workspace.load(str(path))
    assert final.default.name == LOCAL_STORE_NAME
    with pytest.raises(UsageError, match="unknown datastore 'training'"):
        final.get("training")


def test_unknown_default_and_unknown_keys(tmp_path):
    path = tmp_path / "ws.yaml"
    path.write_text(yaml.safe_dump({"default_datastore": "nope", "datastores": {}}))
    with pytest.raises(UsageError, match="unknown datastore 'nope'"):
        Workspace.load(str(path))
    path.write_text(yaml.safe_dump({"datastore": {}}))
    with pytest.raises(ConfigError, match="unknown key 'datastore'"):
        Workspace.load(str(path))


def test_names_differing_only_in_case_are_refused(tmp_path):
    path = tmp_path / "ws.yaml"
    path.write_text(yaml.safe_dump({"datastores": {"Data": BLOB, "data": BLOB}}))
    with pytest.raises(ConfigError, match="differ only in case"):
        Workspace.load(str(path))


def test_bad_yaml_names_line(tmp_path):
    path = tmp_path / "ws.yaml"
    path.write_text("datastores:\n  a: [unclosed\n")
    with pytest.raises(ConfigError, match=r"ws.yaml:\d+:\d+: invalid YAML"):
        Workspace.load(str(path))


def test_inline_secret_in_readable_file_warns(tmp_path, caplog):
    path = tmp_path / "ws.yaml"
    path.write_text(yaml.safe_dump({"datastores": {"d": dict(BLOB, credential={"account_key": "K"})}}))
    path.chmod(0o644)
    Workspace.load(str(path))
    assert any("other users can read it" in r.getMessage() for r in caplog.records)
    caplog.clear()
    path.chmod(0o600)
    Workspace.load(str(path))
    assert not any("other users" in r.getMessage() for r in caplog.records)


def test_embedded_store_cannot_be_removed(tmp_path):
    ws = Workspace.load(str(tmp_path / "ws.yaml"), missing_ok=True)
    with pytest.raises(UsageError, match="built in"):
        ws.remove(LOCAL_STORE_NAME)


@pytest.mark.parametrize("key", ["c2VjcmV0LXZhbHVl==x", "abc", "not a key!", "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1"
                                 "OUzFT50uSRZ6IFsuFq2UVE"])
def test_an_account_key_that_is_not_base64_is_a_config_error(monkeypatch, tmp_path, key):
    monkeypatch.setenv("KEY_VAR", key)
    with pytest.raises(ConfigError, match=r"ds: the account key from \$KEY_VAR is not valid base64: check for a "
                                          "truncated paste"):
        credentials.resolve({"account_key_env": "KEY_VAR"}, "ds")
    with pytest.raises(ConfigError, match="the inline account key is not valid base64"):
        credentials.resolve({"account_key": key}, "ds")
    with pytest.raises(ConfigError, match="the connection string's AccountKey is not valid base64"):
        credentials.connection_string_parts(f"AccountName=a;AccountKey={key}", "blob", "ds")


@pytest.mark.parametrize("url", ["http://127.0.0.1:10000", "http://127.0.0.1:10000/", "https://localhost:10004",
                                 "http://[::1]:10000"])
def test_an_emulator_endpoint_without_the_account_is_a_config_error(url):
    with pytest.raises(ConfigError, match="names no account: an emulator's endpoint must include the account"):
        datastores.parse("d", {"type": "azure_blob", "container_name": "data", "endpoint": url}, "ws")
    with pytest.raises(ConfigError, match="BlobEndpoint.*names no account"):
        credentials.connection_string_parts(f"BlobEndpoint={url};AccountKey=c2VjcmV0LXZhbHVl", "blob", "ds")
    for fine in ("http://127.0.0.1:10000/devstoreaccount1", "https://acct.blob.core.windows.net",
                 "https://acct.privatelink.blob.core.windows.net/"):
        datastores.parse("d", {"type": "azure_blob", "container_name": "data", "endpoint": fine}, "ws")


def test_a_named_workspace_file_must_exist(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"none.yaml \(named by --workspace\) does not exist: check the path"):
        Workspace.load(str(tmp_path / "none.yaml"))
    monkeypatch.setenv("MOUNTD_WORKSPACE", str(tmp_path / "none.yaml"))
    with pytest.raises(ConfigError, match=r"none.yaml \(named by \$MOUNTD_WORKSPACE\) does not exist"):
        Workspace.load()
