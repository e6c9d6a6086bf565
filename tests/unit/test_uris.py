"""Data reference URIs: azureml://, wasbs://, https:// blob and file URLs."""

import pytest

from mountd.config import datastores
from mountd.config.uris import implied_name, parse_uri
from mountd.config.workspace import Workspace
from mountd.errors import UsageError


def _stores(**raw):
    return {name.lower(): datastores.parse(name, body, "test") for name, body in raw.items()}


STORES = _stores(
    training={"type": "azure_blob", "account_name": "acct", "container_name": "data",
              "credential": {"account_key_env": "TRAINING_KEY"}},
    files={"type": "azure_file", "account_name": "acct", "share_name": "share",
           "credential": {"sas_token_env": "FILES_SAS"}},
    china={"type": "azure_blob", "account_name": "cnacct", "container_name": "data",
           "endpoint_suffix": "core.chinacloudapi.cn", "credential": {"account_key_env": "CN_KEY"}},
    emulator={"type": "azure_blob", "endpoint": "http://127.0.0.1:10000/devstoreaccount1",
              "container_name": "emu", "credential": {"account_key_env": "EMU_KEY"}},
    private={"type": "azure_blob", "account_name": "privacct", "container_name": "data",
             "endpoint": "https://privacct.privatelink.blob.core.windows.net"},
    onprem={"type": "azure_blob", "account_name": "stackacct", "container_name": "data",
            "endpoint": "https://stackacct.blob.local.azurestack.external"},
    scratch={"type": "local", "root": "/data/scratch"},
)


@pytest.mark.parametrize("uri, store, path", [
    ("azureml://datastores/training/paths/datasets/cifar", "training", "datasets/cifar"),
    ("azureml://datastores/Training/paths/datasets/cifar/", "training", "datasets/cifar"),
    ("azureml://datastores/scratch/paths/", "scratch", ""),
    ("azureml://datastores/scratch/paths", "scratch", ""),
    ("azureml://datastores/training/paths/a%20b/c%2Fd", "training", "a b/c/d"),
    ("azureml://subscriptions/s1/resourcegroups/rg/workspaces/ws/datastores/training/paths/x", "training", "x"),
    ("azureml://subscriptions/s1/resourceGroups/rg/providers/Microsoft.MachineLearningServices/workspaces/ws/"
     "datastores/files/paths/x/y", "files", "x/y"),
])
def test_azureml_uris_name_a_datastore(uri, store, path):
    cfg, got = parse_uri(uri, STORES)
    assert (cfg.name, got) == (store, path)


@pytest.mark.parametrize("uri, store, path", [
    ("wasbs://data@acct.blob.core.windows.net/datasets/cifar", "training", "datasets/cifar"),
    ("wasb://data@acct.blob.core.windows.net/x", "training", "x"),
    ("wasbs://data@ACCT.blob.core.windows.net", "training", ""),
    ("https://acct.blob.core.windows.net/data/images/a%2Bb.png", "training", "images/a+b.png"),
    ("https://acct.file.core.windows.net/share/dir/file", "files", "dir/file"),
    ("wasbs://data@cnacct.blob.core.chinacloudapi.cn/p", "china", "p"),
    ("http://127.0.0.1:10000/devstoreaccount1/emu/some/path", "emulator", "some/path"),
    # same account and container as a datastore reached through a private endpoint
    ("https://privacct.blob.core.windows.net/data/q", "private", "q"),
    # ADLS Gen2's endpoint serves the same containers as the blob endpoint
    ("https://acct.dfs.core.windows.net/data/x/y", "training", "x/y"),
    ("https://cnacct.dfs.core.chinacloudapi.cn/data/p", "china", "p"),
    # any other host only as a registered datastore's endpoint
    ("https://stackacct.blob.local.azurestack.external/data/z", "onprem", "z"),
    ("wasbs://data@stackacct.blob.local.azurestack.external/z", "onprem", "z"),
    ("wasbs://data@privacct.privatelink.blob.core.windows.net/q", "private", "q"),
])
def test_account_uris_use_the_registered_datastore(uri, store, path):
    cfg, got = parse_uri(uri, STORES)
    assert (cfg.name, got) == (store, path)


def test_unregistered_blob_uri_implies_a_managed_identity_datastore():
    cfg, path = parse_uri("wasbs://my-container@other1.blob.core.windows.net/a/b", STORES)
    assert cfg.name == "uri_other1_my_container" == implied_name("other1", "my-container")
    assert (cfg.type, cfg.account_name, cfg.container_name) == ("azure_blob", "other1", "my-container")
    assert cfg.credential == {"managed_identity": True}
    assert cfg.endpoint_suffix == "core.windows.net"
    assert path == "a/b"


def test_unregistered_file_uri_keeps_its_cloud_suffix():
    cfg, path = parse_uri("https://other1.file.core.usgovcloudapi.net/share1/x", STORES)
    assert (cfg.type, cfg.share_name, cfg.endpoint_suffix) == ("azure_file", "share1", "core.usgovcloudapi.net")
    assert cfg.account_url() == "https://other1.file.core.usgovcloudapi.net"
    assert path == "x"


@pytest.mark.parametrize("suffix", ["core.windows.net", "core.chinacloudapi.cn", "core.usgovcloudapi.net"])
@pytest.mark.parametrize("service, kind", [("blob", "azure_blob"), ("dfs", "azure_blob"), ("file", "azure_file")])
def test_each_azure_cloud_and_service_implies_a_datastore(suffix, service, kind):
    cfg, path = parse_uri(f"https://other1.{service}.{suffix}/c01/x", STORES)
    assert (cfg.type, cfg.account_name, cfg.endpoint_suffix, path) == (kind, "other1", suffix, "x")
    # a dfs URI is served by the blob endpoint: the token goes to the same host either way
    assert cfg.account_url() == f"https://other1.{'file' if service == 'file' else 'blob'}.{suffix}"


@pytest.mark.parametrize("uri", [
    "https://acct.blob.core.windows.net.attacker.test/data/x",
    "https://other1.blob.core.windows.net.attacker.test/c01/x",
    "wasbs://c01@other1.blob.core.windows.net.attacker.test/x",
    "https://other1.blob.attacker.test/c01/x",
    "wasbs://c01@other1.blob.attacker.test/x",
    "https://other1.file.core.windows.net.attacker.test/s1/x",
    "https://other1.dfs.attacker.test/c01/x",
    "https://other1.blob.core.cloudapi.de/c01/x",  # the retired German cloud: an endpoint if still wanted
    "https://other1.blob.core.windows.net./c01/x",
    "https://other1.blob.core.windows.net:8443/c01/x",
    "https://stackacct.blob.local.azurestack.external/other/x",  # registered host, container not
])
def test_hosts_that_only_look_like_azure_are_refused(uri):
    """The implied datastore authenticates with the node's managed identity:
    its token must never go to a host merely shaped ACCOUNT.blob.SOMETHING."""
    with pytest.raises(UsageError) as e:
        parse_uri(uri, STORES)
    message = str(e.value)
    assert "--endpoint" in message and "azureml://datastores/NAME/paths/PATH" in message
    assert "\n" not in message


def test_same_account_in_another_cloud_is_not_the_registered_one():
    cfg, _ = parse_uri("wasbs://data@acct.blob.core.chinacloudapi.cn/x", STORES)
    assert cfg.name == "uri_acct_data"


def test_a_wrong_service_does_not_match():
    # a blob URI for the account and name of a file share is a different thing
    cfg, _ = parse_uri("https://acct.blob.core.windows.net/share/x", STORES)
    assert cfg.name == "uri_acct_share" and cfg.type == "azure_blob"


def test_first_matching_store_wins():
    inline = _stores(mine={"type": "azure_blob", "account_name": "acct", "container_name": "data"})
    merged = dict(inline)
    for key, cfg in STORES.items():
        merged.setdefault(key, cfg)
    assert parse_uri("wasbs://data@acct.blob.core.windows.net/x", merged)[0].name == "mine"


def test_accepts_a_workspace(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    ws = Workspace.load(str(tmp_path / "none.yaml"), missing_ok=True)
    cfg, path = parse_uri("azureml://datastores/workspacelocalstore/paths/a", ws)
    assert cfg.type == "local" and path == "a"


@pytest.mark.parametrize("uri, fragment", [
    ("https://acct.blob.core.windows.net/data/x?sv=2022&sig=SECRETSIG", "must not carry a query string"),
    ("azureml://datastores/training/paths/x?sig=SECRETSIG", "sas_token_env"),
    ("https://acct.blob.core.windows.net/data/x#frag", "fragment"),
    ("https://user:SECRETSIG@acct.blob.core.windows.net/data/x", "user info"),
    ("wasbs://data:SECRETSIG@acct.blob.core.windows.net/x", "wasbs://CONTAINER@"),
    ("ftp://acct.blob.core.windows.net/data/x", "unsupported URI"),
    ("s3://bucket/key", "unsupported URI"),
    ("/just/a/path", "unsupported URI"),
    ("", "non-empty string"),
    (None, "non-empty string"),
    ("azureml://datastores/nosuch/paths/x", "unknown datastore 'nosuch'"),
    ("azureml://datastores/bad-name/paths/x", "invalid datastore name in the URI"),
    ("azureml://workspaces/x", "malformed URI"),
    ("azureml://datastores/training/paths/a/%2E%2E/etc", "must not contain '..'"),
    ("https://acct.blob.core.windows.net/data/../x", "must not contain '..'"),
    ("https://acct.blob.core.windows.net/", "names no container"),
    ("wasbs://data@acct.file.core.windows.net/x", "must be ACCOUNT.blob.SUFFIX"),
    ("wasbs://data@example.com/x", "must be ACCOUNT.blob.SUFFIX"),
    ("https://example.com/data/x", "no registered datastore serves"),
    ("https://acct.blob.core.windows.net:99999/data/x", "malformed URI"),
    ("https://other1.blob.core.windows.net/Bad_Container/x", "invalid container_name"),
    ("https:///data/x", "names no host"),
])
def test_bad_uris(uri, fragment):
    with pytest.raises(UsageError) as e:
        parse_uri(uri, STORES)
    message = str(e.value)
    assert fragment in message
    assert "SECRETSIG" not in message
    assert "\n" not in message
