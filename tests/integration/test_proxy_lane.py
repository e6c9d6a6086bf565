"""mountd behind a forward proxy (HTTPS_PROXY), as on compute nodes that
reach storage only through one: downloads (the lean read path), uploads
(the SDK's path), read-only mount reads and read-write mount writes all
go through CONNECT tunnels; NO_PROXY sends storage around the proxy; a
proxy demanding credentials takes them from the HTTPS_PROXY URL and the
password shows nowhere; a proxy that is down is one line naming it.

Storage is HTTPS (the strict Azurite, the HTTPS Files emulator) trusting
the test CA through the environment. To show that every request takes
the proxy, not only some, the datastores name storage as localhost on a
port where nothing listens: only the proxy, which routes that name to the
real port, can reach it, so a request sent around it fails."""

from __future__ import annotations

import base64
import os
import uuid

import pytest
import yaml

from mountd.run import mounts, runtime
from tests.conftest import KEY, KEY_ENV
from tests.support.azurite import ACCOUNT, SDK_API_VERSION, free_port
from tests.support.proxy import ConnectProxy
from tests.support.remotes import BlobRemote, ShareRemote, datastore_entry

pytestmark = [pytest.mark.azurite, pytest.mark.fuse]

PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "ALL_PROXY")
# Outages of the proxy are failed fast: a failure is what is tested.
FAST_RETRIES = {"MOUNTD_STORAGE_RETRIES": "2", "MOUNTD_STORAGE_BACKOFF": "0.05"}


@pytest.fixture(autouse=True)
def _no_proxy_here(monkeypatch):
    """The test process and its own SDK clients talk to storage directly;
    mountd gets its proxy settings from `proxy_env` only."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def proxy_env(proxy_url: str, no_proxy: str = "") -> dict[str, str]:
    """The environment of a mountd behind `proxy_url`: NO_PROXY set
    explicitly (some environments list 127.0.0.1 in it), both cases."""
    env = {"HTTPS_PROXY": proxy_url, "https_proxy": proxy_url, "HTTP_PROXY": "", "http_proxy": "",
           "ALL_PROXY": "", "all_proxy": "", "NO_PROXY": no_proxy, "no_proxy": no_proxy}
    return {**env, **FAST_RETRIES}


@pytest.fixture(params=["blob", "file"])
def tls_remote(request, trust_test_ca):
    """A new container of the HTTPS Azurite or share of the HTTPS Files
    emulator (made with the key, directly), holding `in/a.txt`."""
    if request.param == "blob":
        server = request.getfixturevalue("azurite_tls")
        service = server.blob_service()
        remote = BlobRemote(server, service.create_container(f"t{uuid.uuid4().hex[:16]}"))
    else:
        from azure.storage.fileshare import ShareServiceClient
        server = request.getfixturevalue("fileshare_tls")
        service = ShareServiceClient.from_connection_string(server.connection_string, api_version=SDK_API_VERSION)
        remote = ShareRemote(server, service.create_share(f"t{uuid.uuid4().hex[:16]}"))
    remote.server = server
    remote.put("in/a.txt", b"alpha" * 1000)
    yield remote
    remote.delete()
    service.close()


def storage_port(remote) -> int:
    return remote.server.port


def workspace(tmp_path, monkeypatch, remote, endpoint: str | None = None):
    """$MOUNTD_WORKSPACE with datastore `p` over `remote` (the key from
    $AZURITE_ACCOUNT_KEY), at `endpoint` if given."""
    entry = datastore_entry(remote.server, remote.name, KEY_ENV)
    if endpoint:
        entry["endpoint"] = endpoint
    ws = tmp_path / "ws.yaml"
    ws.write_text(yaml.safe_dump({"datastores": {"p": entry}}))
    ws.chmod(0o600)
    monkeypatch.setenv("MOUNTD_WORKSPACE", str(ws))
    monkeypatch.setenv(KEY_ENV, KEY)


@pytest.fixture
def routed(tls_remote, tmp_path, monkeypatch):
    """(remote, proxy, name): storage reachable only through the proxy, as
    `name` (localhost:PORT, nothing listening there), the workspace's
    datastore `p` naming it."""
    name = f"localhost:{free_port()}"
    with ConnectProxy(routes={name: ("127.0.0.1", storage_port(tls_remote))}) as proxy:
        workspace(tmp_path, monkeypatch, tls_remote, f"https://{name}/{ACCOUNT}")
        yield tls_remote, proxy, name


def tunnels(proxy) -> list:
    return proxy.records("CONNECT")


def assert_through(proxy, name: str, what: str) -> None:
    connects = tunnels(proxy)
    assert connects, f"{what}: nothing went through the proxy"
    assert {r.target for r in connects} == {name}, f"{what}: {proxy.log}"
    assert all(r.status == 200 for r in connects), f"{what}: {proxy.log}"
    assert not [r for r in proxy.records() if r.method != "CONNECT"], f"{what}: storage traffic in the clear"


def test_every_kind_of_request_goes_through_the_proxy(routed, tmp_path, mountd_cli, mounter):
    remote, proxy, name = routed
    env = proxy_env(proxy.url)

    down = mountd_cli("download", "p", tmp_path / "dl", "--prefix", "in/", "--no-progress", env=env)
    assert down.code == 0, down
    assert (tmp_path / "dl/in/a.txt").read_bytes() == b"alpha" * 1000
    assert_through(proxy, name, "download")

    proxy.clear()
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.bin").write_bytes(body := os.urandom(9 * 1024 * 1024 + 5))  # in blocks, on the SDK's path
    up = mountd_cli("upload", "p", src, "--target-path", "up", "--no-progress", env=env)
    assert up.code == 0, up
    assert remote.get("up/model.bin") == body
    assert_through(proxy, name, "upload")

    proxy.clear()
    ro = mounter("p", env=env)
    assert (ro / "in/a.txt").read_bytes() == b"alpha" * 1000
    assert_through(proxy, name, "read-only mount")
    assert mountd_cli("unmount", ro, env=env).code == 0

    proxy.clear()
    rw = mounter("p", "--read-write", "--work-dir", tmp_path / "work", env=env)
    with open(rw / "written.bin", "wb") as f:
        f.write(written := os.urandom(2 * 1024 * 1024))
    assert remote.get("written.bin") == written  # uploaded on close
    assert_through(proxy, name, "read-write mount")
    assert mountd_cli("unmount", rw, env=env).code == 0


# What follows is the transport's, the same for both kinds: over blob storage.
blob_only = pytest.mark.parametrize("tls_remote", ["blob"], indirect=True)


@blob_only
def test_no_proxy_sends_storage_around_the_proxy(tls_remote, tmp_path, monkeypatch, mountd_cli, mounter,
                                                 connect_proxy):
    workspace(tmp_path, monkeypatch, tls_remote)  # the real address, 127.0.0.1:PORT
    target = f"127.0.0.1:{storage_port(tls_remote)}"
    # The control: without NO_PROXY the same download takes the proxy.
    r = mountd_cli("download", "p", tmp_path / "via", "--no-progress", env=proxy_env(connect_proxy.url))
    assert r.code == 0, r
    assert {r.target for r in tunnels(connect_proxy)} == {target}

    connect_proxy.clear()
    env = proxy_env(connect_proxy.url, no_proxy="127.0.0.1")
    r = mountd_cli("download", "p", tmp_path / "direct", "--no-progress", env=env)
    assert r.code == 0, r
    assert (tmp_path / "direct/in/a.txt").read_bytes() == b"alpha" * 1000
    (tmp_path / "src").mkdir()
    (tmp_path / "src/x.txt").write_bytes(b"x")
    assert mountd_cli("upload", "p", tmp_path / "src", "--no-progress", env=env).code == 0
    assert tls_remote.get("x.txt") == b"x"
    mp = mounter("p", env=env)
    assert (mp / "in/a.txt").read_bytes() == b"alpha" * 1000
    assert connect_proxy.log == []


def secret_forms(user: str, password: str) -> list[str]:
    return [password, base64.b64encode(f"{user}:{password}".encode()).decode()]


def files_text(*roots) -> str:
    """Everything mountd wrote under these directories, as text."""
    out = []
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for n in names:
                try:
                    with open(os.path.join(dirpath, n), "rb") as f:
                        out.append(f.read().decode("utf-8", "replace"))
                except OSError:
                    pass
    return "\n".join(out)


@blob_only
def test_a_proxy_asking_for_credentials_gets_them_and_the_password_shows_nowhere(tls_remote, tmp_path, monkeypatch,
                                                                                  mountd_cli, mounter):
    user, password = "mountd-user", f"pw-{uuid.uuid4().hex}"
    name = f"localhost:{free_port()}"
    with ConnectProxy(auth=(user, password), routes={name: ("127.0.0.1", storage_port(tls_remote))}) as proxy:
        workspace(tmp_path, monkeypatch, tls_remote, f"https://{name}/{ACCOUNT}")
        env = proxy_env(proxy.url)
        assert password in env["HTTPS_PROXY"]
        results = [mountd_cli("--debug", "download", "p", tmp_path / "dl", "--no-progress", env=env)]
        (tmp_path / "src").mkdir()
        (tmp_path / "src/x.txt").write_bytes(b"x")
        results.append(mountd_cli("--debug", "upload", "p", tmp_path / "src", "--no-progress", env=env))
        for r in results:
            assert r.code == 0, r
        mp = mounter("p", "--log-level", "debug", env=env)
        assert (mp / "in/a.txt").read_bytes() == b"alpha" * 1000
        assert tls_remote.get("x.txt") == b"x"
        assert [r.status for r in tunnels(proxy)].count(200) >= 3
        results.append(mountd_cli("--debug", "unmount", mp, env=env))
        assert results[-1].code == 0, results[-1]
        log = open(runtime.log_path(str(mp))).read()
        assert log.strip()  # the worker did log, at debug level
        written = files_text(tmp_path / "config", tmp_path / "data", tmp_path / "run")
        for secret in secret_forms(user, password):
            for r in results:
                assert secret not in r.out and secret not in r.err
            assert secret not in log
            assert secret not in written


@blob_only
def test_a_proxy_that_is_down_is_one_line_naming_it(tls_remote, tmp_path, monkeypatch, mountd_cli, mounter):
    port = free_port()  # nothing listens there
    password = f"pw-{uuid.uuid4().hex}"
    workspace(tmp_path, monkeypatch, tls_remote)
    env = proxy_env(f"http://someone:{password}@127.0.0.1:{port}")
    (tmp_path / "src").mkdir()
    (tmp_path / "src/x.txt").write_bytes(b"x")
    runs = {
        "download": mountd_cli("download", "p", tmp_path / "dl", "--no-progress", env=env),
        "upload": mountd_cli("upload", "p", tmp_path / "src", "--no-progress", env=env),
    }
    mp, runs["mount"] = mounter("p", expect_ok=False, env=env)
    assert not mounts.is_mounted(str(mp))
    for what, r in runs.items():
        assert r.code in (2, 3), (what, r)
        lines = r.err.strip().splitlines()
        errors = [line for line in lines if line.startswith("mountd: error:")]
        assert len(errors) == 1, (what, r)
        assert f"127.0.0.1:{port}" in errors[0] and "proxy" in errors[0], (what, r)
        assert "internal error" not in r.err and "Traceback" not in r.err, (what, r)
        for secret in secret_forms("someone", password):
            assert secret not in r.err and secret not in r.out, (what, r)
