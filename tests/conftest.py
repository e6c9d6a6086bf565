"""Shared fixtures: a real Azurite blob service and the Files emulator, fresh
containers and shares, a `remote` of either kind for tests that hold for
both, workspace files pointing at them, and a runner for the command line.

The TLS/OAuth lanes, all on loopback: a session CA (`test_ca`), Azurite over
HTTPS with the key (`azurite_tls`) and with bearer tokens (`azurite_oauth`),
both strict; the Files emulator over HTTPS (`fileshare_tls`, takes bearer
tokens too); a managed-identity token endpoint (`identity_endpoint`), a
forward proxy (`connect_proxy`), and `trust_test_ca` for processes that
should trust the CA through the environment.

MOUNTD_TEST_LANE=tls runs the same tests over HTTPS: `azurite` is then the
strict HTTPS Azurite (`azurite_tls`) and `fileshare` the HTTPS Files
emulator (`fileshare_tls`), and for the whole session the test CA alone is
trusted through the environment (SSL_CERT_FILE and REQUESTS_CA_BUNDLE; the
other trust variables unset), which the `mountd` processes tests start
inherit. scripts/test.sh runs the storage, mount and run tests again so."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid

import pytest
import yaml

from tests.support import faultproxy
from tests.support.azurite import ACCOUNT, KEY, SDK_API_VERSION, Azurite, blob_workspace_entry
from tests.support.identity import IdentityEndpoint
from tests.support.proxy import ConnectProxy
from tests.support.remotes import BlobRemote, ShareRemote
from tests.support.tls import LocalCA, make_local_ca

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY_ENV = "AZURITE_ACCOUNT_KEY"  # the Files emulator's key is the same well-known one
# The Files emulator ends listing pages after this many entries (the service
# may too), so every test that lists a larger directory follows markers.
SHARE_PAGE_LIMIT = 250
# The lane: "plain" (HTTP, the default) or "tls" (see the docstring).
LANE = os.environ.get("MOUNTD_TEST_LANE", "").strip().lower() or "plain"
if LANE not in ("plain", "tls"):
    raise ValueError(f"MOUNTD_TEST_LANE={LANE!r}: 'tls', or unset (or 'plain') for plain HTTP")
# What decides trust for Python's ssl, urllib3, requests and mountd.
TRUST_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR")


def _need_azurite() -> None:
    if not shutil.which("azurite-blob"):
        message = "Azurite is not installed (npm install -g azurite); .ci/run installs it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session", autouse=True)
def _lane_trust(request):
    """In the TLS lane, the test CA alone is trusted through the environment
    for the whole session (tests may still change it for themselves)."""
    if LANE != "tls":
        yield
        return
    ca = request.getfixturevalue("test_ca")
    with pytest.MonkeyPatch.context() as mp:
        for name in TRUST_VARIABLES:
            mp.delenv(name, raising=False)
            mp.delenv(name.lower(), raising=False)
        for name, value in ca.env().items():
            mp.setenv(name, value)
        yield


@pytest.fixture(scope="session")
def azurite(request):
    """The Azurite of the lane: plain HTTP with the key, or in the TLS lane
    the strict HTTPS one (`azurite_tls`)."""
    if LANE == "tls":
        return request.getfixturevalue("azurite_tls")
    _need_azurite()
    server = Azurite().start()
    request.addfinalizer(server.stop)
    return server


@pytest.fixture
def container(azurite, monkeypatch):
    """A new, empty container; its account key is in $AZURITE_ACCOUNT_KEY.
    The client trusts what the environment says and pins an API version a
    strict Azurite knows."""
    from azure.storage.blob import BlobServiceClient
    name = f"t{uuid.uuid4().hex[:16]}"
    service = BlobServiceClient.from_connection_string(azurite.connection_string, api_version=SDK_API_VERSION)
    service.create_container(name)
    monkeypatch.setenv(KEY_ENV, KEY)
    client = service.get_container_client(name)
    yield client
    service.delete_container(name)
    service.close()


@pytest.fixture(scope="module")
def fuse_available():
    """Skip (fail under CI) where FUSE mounts cannot be made."""
    from mountd.run import mounts
    problem = mounts.fuse_problem()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"FUSE is required in CI: {problem}")
        pytest.skip(problem)


@pytest.fixture(scope="session")
def fileshare(request):
    """The Azure Files emulator, in this process, on a free port (in the TLS
    lane the HTTPS one, `fileshare_tls`)."""
    if LANE == "tls":
        yield request.getfixturevalue("fileshare_tls")
        return
    from tests.emulators.fileshare import FileShareEmulator
    # Reads refuse conditional headers, as the real service's do.
    with FileShareEmulator(page_limit=SHARE_PAGE_LIMIT, conditional_reads=False) as emulator:
        yield emulator


@pytest.fixture
def share(fileshare, monkeypatch):
    """A new, empty file share; its account key is in $AZURITE_ACCOUNT_KEY."""
    from azure.core.exceptions import ResourceNotFoundError
    from azure.storage.fileshare import ShareServiceClient
    service = ShareServiceClient.from_connection_string(fileshare.connection_string, api_version=SDK_API_VERSION)
    client = service.create_share(f"t{uuid.uuid4().hex[:16]}")
    monkeypatch.setenv(KEY_ENV, KEY)
    yield client
    try:
        client.delete_share()
    except ResourceNotFoundError:
        pass
    service.close()


@pytest.fixture(params=["blob", "file"])
def remote(request):
    """A new container (Azurite) or share (Files emulator), for behaviour the
    two kinds share."""
    if request.param == "blob":
        return BlobRemote(request.getfixturevalue("azurite"), request.getfixturevalue("container"))
    return ShareRemote(request.getfixturevalue("fileshare"), request.getfixturevalue("share"))


@pytest.fixture
def store_workspace(tmp_path, remote):
    """A workspace file whose default datastore `store` is the `remote`."""
    path = tmp_path / "workspace.yaml"
    path.write_text(yaml.safe_dump({"default_datastore": "store",
                                    "datastores": {"store": remote.entry(KEY_ENV)}}))
    path.chmod(0o600)
    return path


# ----- the TLS / OAuth lanes ---------------------------------------------------

@pytest.fixture(scope="session")
def test_ca(tmp_path_factory) -> LocalCA:
    """A CA made for this session and a server certificate for 127.0.0.1 and
    localhost: `ca_path`, `cert_path`, `key_path`, `env()`. Nothing trusts it
    unless told to (connection_verify=test_ca.ca_path, or `trust_test_ca`)."""
    pytest.importorskip("trustme", reason="trustme is not installed (pip install -e .[test])")
    return make_local_ca(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def trust_test_ca(test_ca, monkeypatch) -> LocalCA:
    """SSL_CERT_FILE and REQUESTS_CA_BUNDLE point at the test CA (alone) for
    this test and the processes it starts, as they would at a corporate CA."""
    for name, value in test_ca.env().items():
        monkeypatch.setenv(name, value)
    return test_ca


@pytest.fixture(scope="session")
def azurite_tls(test_ca):
    """Azurite over HTTPS with the account key, strict (no
    --skipApiVersionCheck, no --loose). `account_url` is https; SDK clients
    need `connection_verify=test_ca.ca_path` and a pinned `api_version`
    (`azurite_tls.blob_service()` sets both)."""
    _need_azurite()
    server = Azurite(cert=test_ca.cert_path, key=test_ca.key_path, ca=test_ca.ca_path, strict=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def azurite_oauth(test_ca):
    """Azurite over HTTPS taking bearer tokens (--oauth basic) besides the
    key, strict. Tokens from `identity_endpoint` pass its checks."""
    _need_azurite()
    server = Azurite(cert=test_ca.cert_path, key=test_ca.key_path, ca=test_ca.ca_path, oauth=True,
                     strict=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fileshare_tls(test_ca):
    """The Files emulator over HTTPS; takes the key, SAS, and bearer tokens
    with `x-ms-file-request-intent: backup` (token_intent="backup")."""
    from tests.emulators.fileshare import FileShareEmulator
    with FileShareEmulator(page_limit=SHARE_PAGE_LIMIT, conditional_reads=False,
                           certfile=test_ca.cert_path, keyfile=test_ca.key_path) as emulator:
        yield emulator


@pytest.fixture
def identity_endpoint(monkeypatch):
    """A managed-identity token endpoint, found through IDENTITY_ENDPOINT and
    IDENTITY_HEADER (set for this test and its child processes), so
    ManagedIdentityCredential() and DefaultAzureCredential() get tokens
    from it. See tests/support/identity.py for its records and faults."""
    # Variables that would send azure-identity elsewhere first, or instead.
    for name in ("MSI_ENDPOINT", "MSI_SECRET", "IDENTITY_SERVER_THUMBPRINT", "IMDS_ENDPOINT",
                 "AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET", "AZURE_CLIENT_CERTIFICATE_PATH",
                 "AZURE_FEDERATED_TOKEN_FILE", "AZURE_USERNAME", "AZURE_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    with IdentityEndpoint() as endpoint:
        for name, value in endpoint.env().items():
            monkeypatch.setenv(name, value)
        yield endpoint


@pytest.fixture
def connect_proxy():
    """A forward proxy on loopback (CONNECT tunnels and plain HTTP), no
    credentials; `url`, `log`, `targets("CONNECT")`. Give it to a client as
    proxies={"https": connect_proxy.url} or HTTPS_PROXY."""
    with ConnectProxy() as proxy:
        yield proxy


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Every test gets its own config and data directories."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path / "run"))  # mount records and worker logs
    monkeypatch.delenv("MOUNTD_WORKSPACE", raising=False)


@pytest.fixture
def workspace_file(tmp_path, azurite, container):
    """A workspace file with datastore `blobstore` (the test container) as default."""
    path = tmp_path / "workspace.yaml"
    path.write_text(yaml.safe_dump({
        "default_datastore": "blobstore",
        "datastores": {"blobstore": blob_workspace_entry(azurite, container.container_name, KEY_ENV)},
    }))
    path.chmod(0o600)
    return path


class CliResult:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.code, self.out, self.err = proc.returncode, proc.stdout, proc.stderr

    def __repr__(self):
        return f"CliResult(code={self.code}, out={self.out!r}, err={self.err!r})"


@pytest.fixture
def mountd_cli(tmp_path):
    """Run `python -m mountd ...` as a user would, in a subprocess."""
    def run(*args, env=None, input=None, timeout=120) -> CliResult:
        full_env = dict(os.environ)
        full_env.update(env or {})
        # this checkout's mountd whatever the current directory (not an installed copy)
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, full_env.get("PYTHONPATH")) if p)
        proc = subprocess.run([sys.executable, "-m", "mountd", *map(str, args)], capture_output=True,
                              text=True, env=full_env, input=input, timeout=timeout)
        return CliResult(proc)
    return run


@pytest.fixture
def blob_datastore(tmp_path, azurite, container, monkeypatch):
    """The test container as datastore `data` of the workspace in $MOUNTD_WORKSPACE."""
    ws = tmp_path / "ws.yaml"
    ws.write_text(yaml.safe_dump({"datastores": {"data": blob_workspace_entry(azurite, container.container_name)}}))
    monkeypatch.setenv("MOUNTD_WORKSPACE", str(ws))
    monkeypatch.setenv(KEY_ENV, KEY)
    return container


@pytest.fixture
def mounter(tmp_path, mountd_cli, fuse_available):
    """mounter(target, *flags) -> a fresh mountpoint under tmp_path with
    `mountd mount` done; whatever is still mounted is detached afterwards."""
    from mountd.run import mounts
    made = []

    def do(target, *flags, expect_ok=True, env=None):
        mp = tmp_path / f"mnt{len(made)}"
        mp.mkdir()
        r = mountd_cli("mount", target, mp, *flags, env=env)
        if expect_ok:
            assert r.code == 0, r
            assert mounts.is_mounted(str(mp))
        made.append(mp)
        return mp if expect_ok else (mp, r)

    yield do
    for mp in made:
        if mounts.is_mounted(str(mp)):
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)


@pytest.fixture
def fault_proxy():
    """fault_proxy(port, seed=..., **rates) -> a started FaultProxy in front of
    a server on 127.0.0.1:port (Azurite, the Files emulator); stopped, and
    its counts added to the session's figures, afterwards."""
    started = []

    def make(port: int, seed: int = 0, **rates) -> faultproxy.FaultProxy:
        proxy = faultproxy.FaultProxy(("127.0.0.1", port), seed=seed, **rates).start()
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()


def pytest_report_header(config):
    return f"mountd test lane: {LANE}" + (" (HTTPS, strict Azurite, the test CA trusted through the environment)"
                                          if LANE == "tls" else "")


def pytest_terminal_summary(terminalreporter):
    """The reliability figures of this run, from the fault and bad-input tests."""
    for line in faultproxy.NOTES:
        terminalreporter.write_line(line)
    t = faultproxy.TOTALS
    if not t:
        return
    kinds = ", ".join(f"{t[k]} {k.replace('_', ' ')}" for k in ("reset", "stall", "error_503", "error_500", "outage")
                      if t[k])
    terminalreporter.write_line(
        f"reliability: {sum(t[k] for k in ('reset', 'stall', 'error_503', 'error_500', 'outage'))} faults injected "
        f"({kinds or 'none'}) in {t['requests']} proxied requests; {t['bytes_verified']} bytes verified "
        f"({t['files_verified']} files); {t['bad_inputs']} bad inputs tried")


__all__ = ["ACCOUNT", "KEY", "KEY_ENV"]
