"""mountd with a managed identity, as on Azure ML compute: a datastore whose
credential is `managed_identity: true`, tokens from the identity endpoint
(IDENTITY_ENDPOINT/IDENTITY_HEADER), storage over HTTPS trusting the test
CA through the environment, no account key anywhere. Downloads, uploads
(the SDK's path), read-only mounts (the lean read path) and read-write
mounts (staged, uploaded on close) over Azurite with `--oauth basic` and
over the Files emulator, which takes a bearer only with the backup intent.

And when tokens do not come: a moment of endpoint failures is retried; an
outage longer than the retry budget gives a mount reader EIO and the worker
a log line, a command one `mountd: error:` line (exit 2 or 3), and reads
work again once the endpoint answers."""

from __future__ import annotations

import errno
import os
import time
import uuid

import pytest
import yaml

from mountd.run import mounts, runtime
from tests.conftest import KEY_ENV
from tests.support.remotes import BlobRemote, ShareRemote, datastore_entry

pytestmark = [pytest.mark.azurite, pytest.mark.fuse]

TREE = {
    "in/a.txt": b"alpha",
    "in/sub/b.bin": os.urandom(300_000),
    "in/with space/c.txt": b"gamma" * 1000,
}
# Variables through which a key or a secret could reach mountd some other way.
SECRET_VARIABLES = (KEY_ENV, "AZURE_STORAGE_KEY", "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_SAS_TOKEN")


@pytest.fixture(params=["blob", "file"])
def oauth_store(request, tmp_path, monkeypatch, trust_test_ca, identity_endpoint):
    """Datastore `mi` of the workspace in $MOUNTD_WORKSPACE: a new container
    of the OAuth Azurite, or a share of the HTTPS Files emulator, holding
    TREE (put there with the key, by the test), reached by mountd with a
    managed identity only. Yields the remote."""
    if request.param == "blob":
        server = request.getfixturevalue("azurite_oauth")
        service = server.blob_service()  # the key, for the test's own view
        container = service.create_container(f"t{uuid.uuid4().hex[:16]}")
        remote = BlobRemote(server, container)
    else:
        from azure.storage.fileshare import ShareServiceClient

        from tests.support.azurite import SDK_API_VERSION
        server = request.getfixturevalue("fileshare_tls")
        service = ShareServiceClient.from_connection_string(server.connection_string, api_version=SDK_API_VERSION)
        remote = ShareRemote(server, service.create_share(f"t{uuid.uuid4().hex[:16]}"))
    for name, data in TREE.items():
        remote.put(name, data)
    entry = datastore_entry(server, remote.name, managed_identity=True)
    assert entry["credential"] == {"managed_identity": True}
    ws = tmp_path / "ws.yaml"
    ws.write_text(yaml.safe_dump({"datastores": {"mi": entry}}))
    monkeypatch.setenv("MOUNTD_WORKSPACE", str(ws))
    for name in SECRET_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    yield remote
    remote.delete()
    service.close()


def tree(root) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            path = os.path.join(dirpath, n)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def bearer_was_used(remote, identity_endpoint, before: int = 0) -> None:
    """Tokens were issued for storage; the Files emulator counts the bearer
    requests it accepted (Azurite does not say, but has no key to go on)."""
    assert identity_endpoint.tokens_issued > 0
    assert all(r.resource == "https://storage.azure.com" for r in identity_endpoint.requests if r.token)
    if remote.kind == "file":
        assert remote.emulator.bearer_accepted > before


def test_download_and_upload(oauth_store, identity_endpoint, tmp_path, mountd_cli):
    before = oauth_store.emulator.bearer_accepted if oauth_store.kind == "file" else 0
    down = mountd_cli("download", "mi", tmp_path / "dl", "--prefix", "in/", "--no-progress")
    assert down.code == 0, down
    assert tree(tmp_path / "dl") == TREE
    bearer_was_used(oauth_store, identity_endpoint, before)
    issued = identity_endpoint.tokens_issued

    src = tmp_path / "src"
    written = {"out/model.bin": os.urandom(5 * 1024 * 1024 + 3), "out/log.txt": b"epoch 1\n"}
    for name, data in written.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    up = mountd_cli("upload", "mi", src, "--target-path", "run1", "--no-progress")
    assert up.code == 0, up
    assert oauth_store.files("run1") == written
    # A new process, a new token: the upload asked the endpoint too.
    assert identity_endpoint.tokens_issued > issued
    assert not identity_endpoint.refused


def test_read_only_mount_reads_through_a_token(oauth_store, identity_endpoint, mounter):
    mp = mounter("mi")
    assert sorted(os.listdir(mp / "in")) == ["a.txt", "sub", "with space"]
    assert tree(mp / "in") == {name[len("in/"):]: data for name, data in TREE.items()}
    with open(mp / "in/sub/b.bin", "rb") as f:
        f.seek(123_456)
        assert f.read(1000) == TREE["in/sub/b.bin"][123_456:124_456]
    bearer_was_used(oauth_store, identity_endpoint)


def test_read_write_mount_writes_through_a_token(oauth_store, identity_endpoint, mounter, tmp_path, mountd_cli):
    mp = mounter("mi", "--read-write", "--work-dir", tmp_path / "work")
    body = os.urandom(3 * 1024 * 1024 + 11)
    os.makedirs(mp / "out")
    with open(mp / "out/checkpoint.bin", "wb") as f:
        f.write(body)
    # Closed: in storage now, not only at unmount.
    assert oauth_store.get("out/checkpoint.bin") == body
    assert (mp / "in/a.txt").read_bytes() == b"alpha"  # reads alongside
    r = mountd_cli("unmount", mp)
    assert r.code == 0, r
    assert not mounts.is_mounted(str(mp))
    assert oauth_store.files("out") == {"checkpoint.bin": body}
    bearer_was_used(oauth_store, identity_endpoint)


# ----- when tokens do not come -------------------------------------------------------------

blob_only = pytest.mark.parametrize("oauth_store", ["blob"], indirect=True)
# Storage retries kept short: the outages below outlast them on purpose.
FAST_RETRIES = {"MOUNTD_STORAGE_RETRIES": "2", "MOUNTD_STORAGE_BACKOFF": "0.05"}
LONG_OUTAGE = 1000  # scripted failures: more than any retry budget asks

def one_error_line(r) -> str:
    """The single `mountd: error:` line of a failed command (no traceback,
    no internal error)."""
    assert r.code in (2, 3), r
    assert "Traceback" not in r.err and "internal error" not in r.err, r
    errors = [line for line in r.err.splitlines() if line.startswith("mountd: error:")]
    assert len(errors) == 1, r
    return errors[0]


@blob_only
def test_a_moment_without_tokens_is_retried(oauth_store, identity_endpoint, tmp_path, mountd_cli):
    identity_endpoint.fail_next(2)
    down = mountd_cli("download", "mi", tmp_path / "dl", "--prefix", "in/", "--no-progress")
    assert down.code == 0, down
    assert tree(tmp_path / "dl") == TREE
    statuses = [r.status for r in identity_endpoint.requests]
    assert statuses[:2] == [500, 500] and 200 in statuses, statuses


@blob_only
def test_a_mount_read_during_a_long_outage_of_the_endpoint_is_eio(oauth_store, identity_endpoint, mounter):
    # Tokens that live under 5 minutes are fetched again for every request
    # (by mountd and by MSAL), so a read needs the endpoint.
    identity_endpoint.lifetime = 200
    mp = mounter("mi", env=FAST_RETRIES)
    assert sorted(os.listdir(mp / "in/sub")) == ["b.bin"]  # names and sizes known; no data read yet
    asked = len(identity_endpoint.requests)
    identity_endpoint.fail_next(LONG_OUTAGE)
    with pytest.raises(OSError) as caught:
        with open(mp / "in/sub/b.bin", "rb") as f:
            f.read()
    assert caught.value.errno == errno.EIO, caught.value
    assert len(identity_endpoint.requests) > asked  # the token was asked for, and refused
    log = open(runtime.log_path(str(mp))).read()
    assert any("b.bin" in line and any(word in line.lower() for word in ("token", "credential", "identity"))
               for line in log.splitlines()), log
    # Once the endpoint answers again, the same file reads right, no remount.
    identity_endpoint.clear_faults()
    deadline = time.monotonic() + 30
    while True:
        try:
            assert (mp / "in/sub/b.bin").read_bytes() == TREE["in/sub/b.bin"]
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


@blob_only
@pytest.mark.parametrize("command", ["download", "upload", "mount"])
def test_no_token_at_all_is_one_line_not_an_internal_error(command, oauth_store, identity_endpoint, tmp_path,
                                                          mountd_cli, mounter):
    identity_endpoint.fail_next(LONG_OUTAGE)
    if command == "download":
        r = mountd_cli("download", "mi", tmp_path / "dl", "--no-progress", env=FAST_RETRIES)
    elif command == "upload":
        (tmp_path / "src").mkdir()
        (tmp_path / "src/x.txt").write_bytes(b"x")
        r = mountd_cli("upload", "mi", tmp_path / "src", "--no-progress", env=FAST_RETRIES)
    else:
        mp, r = mounter("mi", expect_ok=False, env=FAST_RETRIES)
        assert not mounts.is_mounted(str(mp))
    line = one_error_line(r)
    assert "token" in line.lower() or "identity" in line.lower() or "credential" in line.lower(), line
    assert identity_endpoint.requests and not identity_endpoint.tokens_issued
