"""`mountd upload` / `mountd download` end to end against Azurite and the
Files emulator, run as a user runs them: awkward names, block boundaries,
overwrite rules, markers, unsafe names, MD5 verification, errors and
secrecy. Tests taking `remote`/`store_workspace` run against both kinds."""

import hashlib
import os
import stat

import pytest
import yaml

from mountd.transfer import download as download_mod
from tests.conftest import KEY, KEY_ENV
from tests.support.azurite import ACCOUNT, blob_workspace_entry
from tests.support.remotes import share_workspace_entry

AWKWARD = {
    "plain.txt": b"plain",
    "with space/file name.txt": b"space",
    "unicode/é日本/データ.bin": os.urandom(1000),
    "percent/100%.txt": b"pct",
    "hash/#hash#.txt": b"hash",
    "plus/a+b=c.txt": b"plus",
    "quote/it's.txt": b"quote",
    "empty.txt": b"",
    "deep/a/b/c/d/e/f.txt": b"deep",
}


def make_tree(root, files):
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def read_tree(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            full = os.path.join(dirpath, f)
            out[os.path.relpath(full, root)] = open(full, "rb").read()
    return out


def test_round_trip_awkward_tree_byte_for_byte(tmp_path, store_workspace, remote, mountd_cli):
    src = tmp_path / "src"
    make_tree(src, AWKWARD)
    (src / "an empty dir").mkdir()
    up = mountd_cli("--workspace", store_workspace, "upload", "store", src, "--target-path", "run/1")
    assert up.code == 0, up
    assert f"uploaded {len(AWKWARD)} files" in up.out
    assert remote.files("run/1") == AWKWARD
    dst = tmp_path / "dst"
    down = mountd_cli("--workspace", store_workspace, "download", "store", dst, "--prefix", "run/1")
    assert down.code == 0, down
    assert read_tree(dst / "run" / "1") == read_tree(src)
    # a marker blob, or a real directory of the share, became a directory
    assert (dst / "run" / "1" / "an empty dir").is_dir()
    # no temporary files left behind
    assert not [n for n in read_tree(dst) if n.endswith(".partial")]


@pytest.mark.parametrize("size_name", ["chunk-1", "chunk", "chunk+1", "3chunks+5"])
def test_sizes_around_chunk_boundaries(tmp_path, store_workspace, remote, monkeypatch, size_name):
    from mountd.api import Datastore, Workspace
    chunk = 64 * 1024
    monkeypatch.setattr(download_mod, "CHUNK_SIZE", chunk)
    size = {"chunk-1": chunk - 1, "chunk": chunk, "chunk+1": chunk + 1, "3chunks+5": 3 * chunk + 5}[size_name]
    data = os.urandom(size)
    remote.put("sized/blob.bin", data)
    ds = Datastore.get(Workspace.from_config(str(store_workspace)), "store")
    assert ds.download(str(tmp_path / "out"), prefix="sized/", show_progress=False) == 1
    assert (tmp_path / "out" / "sized" / "blob.bin").read_bytes() == data


def test_overwrite_semantics(tmp_path, store_workspace, remote, mountd_cli):
    src = tmp_path / "src"
    make_tree(src, {"a.txt": b"v1", "b.txt": b"v1"})
    assert mountd_cli("--workspace", store_workspace, "upload", "store", src).code == 0
    (src / "a.txt").write_bytes(b"v2")
    again = mountd_cli("--workspace", store_workspace, "upload", "store", src)
    # b.txt is the same: skipped quietly; a.txt is not: said on the summary and in a warning
    assert again.code == 0 and "skipped 1 existing and unchanged" in again.out, again
    assert "NOT uploaded 1 that storage holds in a different version (a.txt;" in again.out, again
    assert "1 file(s) NOT uploaded: storage already holds a different version of a.txt" in again.err, again
    assert remote.get("a.txt") == b"v1"
    (src / "a.txt").write_bytes(b"v1")  # back to what storage holds: unchanged again
    assert "skipped 2 existing or unchanged" in mountd_cli("--workspace", store_workspace, "upload", "store",
                                                           src).out
    (src / "a.txt").write_bytes(b"v2")
    forced = mountd_cli("--workspace", store_workspace, "upload", "store", src, "--overwrite")
    assert forced.code == 0 and "uploaded 2 files" in forced.out
    assert remote.get("a.txt") == b"v2"

    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "a.txt").write_bytes(b"local")
    down = mountd_cli("--workspace", store_workspace, "download", "store", dst)
    assert down.code == 0 and "skipped 1 existing" in down.out
    assert (dst / "a.txt").read_bytes() == b"local" and (dst / "b.txt").read_bytes() == b"v1"
    down = mountd_cli("--workspace", store_workspace, "download", "store", dst, "--overwrite")
    assert down.code == 0 and (dst / "a.txt").read_bytes() == b"v2"


def test_no_progress_is_silent(tmp_path, store_workspace, remote, mountd_cli):
    remote.put("x", b"1")
    down = mountd_cli("--workspace", store_workspace, "download", "store", tmp_path / "d", "--no-progress")
    assert (down.code, down.out, down.err) == (0, "", "")


def test_unsafe_object_names_never_escape_target(tmp_path, workspace_file, container, mountd_cli):
    # Azurite itself refuses '.' and '..' segments (unit tests cover those);
    # it does store a leading '/' and empty segments, which must not be
    # taken as absolute or collapsed paths.
    for name in ["/abs-escape.txt", "x//double.txt", "ok/fine.txt"]:
        container.upload_blob(name, b"data")
    dst = tmp_path / "nested" / "dst"
    down = mountd_cli("--workspace", workspace_file, "download", "blobstore", dst)
    assert down.code == 3, down
    assert "unsafe object name" in down.err
    assert (dst / "ok" / "fine.txt").read_bytes() == b"data"
    assert not os.path.exists("/abs-escape.txt")
    assert down.err.count("unsafe object name") == 2
    assert sorted(read_tree(tmp_path / "nested")) == [os.path.join("dst", "ok", "fine.txt")]


def test_md5_mismatch_of_a_multipart_download(tmp_path, workspace_file, container, monkeypatch):
    from azure.storage.blob import ContentSettings

    from mountd.api import Datastore, Workspace
    monkeypatch.setattr(download_mod, "CHUNK_SIZE", 64 * 1024)
    container.upload_blob("big.bin", os.urandom(300 * 1024))
    container.get_blob_client("big.bin").set_http_headers(ContentSettings(content_md5=hashlib.md5(b"x").digest()))
    ds = Datastore.get(Workspace.from_config(str(workspace_file)), "blobstore")
    with pytest.raises(Exception, match="1 file"):
        ds.download(str(tmp_path / "d"), show_progress=False)
    assert os.listdir(tmp_path / "d") == []


def test_md5_mismatch_fails_and_leaves_no_file(tmp_path, workspace_file, container, mountd_cli):
    from azure.storage.blob import ContentSettings
    # storage checks an MD5 given on upload, so spoil the stored one afterwards
    container.upload_blob("bad.bin", b"actual bytes")
    container.get_blob_client("bad.bin").set_http_headers(
        ContentSettings(content_md5=hashlib.md5(b"other").digest()))
    container.upload_blob("good.bin", b"fine")
    down = mountd_cli("--workspace", workspace_file, "download", "blobstore", tmp_path / "d")
    assert down.code == 3, down
    assert "download of bad.bin failed: content MD5 does not match" in down.err
    assert sorted(os.listdir(tmp_path / "d")) == ["good.bin"]


def test_secrets_never_in_output_or_workspace(tmp_path, azurite, container, mountd_cli):
    ws = tmp_path / "ws.yaml"
    env = {KEY_ENV: KEY, "MOUNTD_WORKSPACE": str(ws)}
    reg = mountd_cli("datastore", "register-blob", "sec", "--account-name", "devstoreaccount1",
                     "--container-name", container.container_name, "--endpoint", azurite.account_url,
                     "--account-key-env", KEY_ENV, "--set-default", env=env)
    assert reg.code == 0, reg
    assert stat.S_IMODE(os.stat(ws).st_mode) == 0o600
    outputs = [reg]
    outputs.append(mountd_cli("datastore", "list", env=env))
    outputs.append(mountd_cli("datastore", "show", "sec", "--json", env=env))
    outputs.append(mountd_cli("--debug", "download", "sec", tmp_path / "d", env=env))
    outputs.append(mountd_cli("--debug", "download", "sec", tmp_path / "d",
                              env=dict(env, **{KEY_ENV: "d3Jvbmc=" * 11})))
    for result in outputs:
        assert KEY not in result.out + result.err
        assert KEY[:20] not in result.out + result.err
    assert KEY not in ws.read_text() and KEY_ENV in ws.read_text()
    assert "account_key from $" + KEY_ENV in outputs[2].out


def test_register_list_show_set_default_remove(tmp_path, azurite, container, mountd_cli):
    env = {"MOUNTD_WORKSPACE": str(tmp_path / "ws.yaml"), KEY_ENV: KEY}
    common = ["--account-name", "devstoreaccount1", "--endpoint", azurite.account_url, "--account-key-env", KEY_ENV]
    r = mountd_cli("datastore", "register-blob", "Created", "--container-name", "made-by-mountd",
                   "--create-if-not-exists", *common, env=env)
    assert r.code == 0, r
    from azure.storage.blob import BlobServiceClient
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    assert service.get_container_client("made-by-mountd").exists()
    r = mountd_cli("datastore", "register-local", "scratch", "--root", tmp_path / "scratch",
                   "--create-if-not-exists", env=env)
    assert r.code == 0, r
    listing = mountd_cli("datastore", "list", env=env)
    assert "* workspacelocalstore" in listing.out and "Created" in listing.out and "scratch" in listing.out
    assert mountd_cli("datastore", "set-default", "CREATED", env=env).code == 0
    assert "* Created" in mountd_cli("datastore", "list", env=env).out
    assert mountd_cli("datastore", "remove", "created", env=env).code == 0
    assert "Created" not in mountd_cli("datastore", "list", env=env).out
    assert "* workspacelocalstore" in mountd_cli("datastore", "list", env=env).out


def test_register_file_share_end_to_end(tmp_path, fileshare, mountd_cli):
    ws = tmp_path / "ws.yaml"
    env = {KEY_ENV: KEY, "MOUNTD_WORKSPACE": str(ws)}
    common = ["--account-name", "devstoreaccount1", "--endpoint", fileshare.account_url, "--account-key-env", KEY_ENV]
    r = mountd_cli("datastore", "register-file-share", "files", "--share-name", "made-by-cli", *common, env=env)
    assert r.code == 2 and r.err.startswith("mountd: error: ") and "does not exist" in r.err, r
    r = mountd_cli("datastore", "register-file-share", "files", "--share-name", "made-by-cli",
                   "--create-if-not-exists", "--set-default", *common, env=env)
    assert r.code == 0 and "AzureFile" in r.out, r
    from azure.storage.fileshare import ShareServiceClient
    service = ShareServiceClient.from_connection_string(fileshare.connection_string)
    share = service.get_share_client("made-by-cli")
    share.get_share_properties()  # exists now
    try:
        listing = mountd_cli("datastore", "list", env=env)
        assert "* files" in listing.out and "AzureFile" in listing.out and "/made-by-cli" in listing.out
        shown = mountd_cli("datastore", "show", "files", "--json", env=env)
        assert f"account_key from ${KEY_ENV}" in shown.out and '"share_name": "made-by-cli"' in shown.out
        src = tmp_path / "src"
        make_tree(src, {"a/b.txt": b"b"})
        (src / "empty").mkdir()
        assert mountd_cli("upload", "files", src, env=env).code == 0
        assert share.get_file_client("a/b.txt").download_file().readall() == b"b"
        share.get_directory_client("empty").get_directory_properties()  # a real, empty directory
        for result in [r, listing, shown]:
            assert KEY not in result.out + result.err and KEY not in ws.read_text()
    finally:
        share.delete_share()


@pytest.mark.parametrize("args, env, fragment", [
    (["download", "nosuchstore", "/tmp/x"], {}, "unknown datastore 'nosuchstore'"),
    (["datastore", "register-local", "bad-name", "--root", "/tmp"], {}, "invalid datastore name 'bad-name'"),
    (["datastore", "show", "nope"], {}, "unknown datastore 'nope'"),
    (["download", "blobstore", "/tmp/x"], {KEY_ENV: None}, f"environment variable {KEY_ENV}"),
    (["upload", "blobstore", "/definitely/not/here"], {}, "does not exist"),
    (["download"], {}, "the following arguments are required"),
    (["download", "blobstore", "/tmp/x", "--workers", "0"], {}, "expected 1 to 1024"),
    (["datastore", "register-blob", "x", "--container-name", "c", "--account-name", "a",
      "--account-key-env", "A", "--sas-token-env", "B"], {}, "not allowed with argument"),
    (["datastore", "register-file-share", "x", "--share-name", "files", "--account-name", "acct",
      "--anonymous"], {}, "Azure Files has no anonymous access"),
    (["datastore", "register-file-share", "x", "--share-name", "Bad_Share", "--account-name", "acct",
      "--account-key-env", KEY_ENV], {}, "invalid share_name 'Bad_Share'"),
])
def test_bad_input_one_line_exit_2(tmp_path, workspace_file, mountd_cli, args, env, fragment):
    full_env = {"MOUNTD_WORKSPACE": str(workspace_file)}
    for k, v in env.items():
        full_env[k] = v
    if env.get(KEY_ENV, "") is None:
        full_env.pop(KEY_ENV)
        import subprocess
        import sys
        e = dict(os.environ, **{k: v for k, v in full_env.items() if v is not None})
        e.pop(KEY_ENV, None)
        proc = subprocess.run([sys.executable, "-m", "mountd", *args], capture_output=True, text=True, env=e)
        code, err = proc.returncode, proc.stderr
    else:
        r = mountd_cli(*args, env=full_env)
        code, err = r.code, r.err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mountd: error: ") and fragment in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_unreachable_endpoint_and_bad_yaml_exit_2(tmp_path, mountd_cli, monkeypatch):
    from tests.support.azurite import free_port
    ws = tmp_path / "ws.yaml"
    ws.write_text(yaml.safe_dump({"datastores": {"dead": {
        "type": "azure_blob", "account_name": "devstoreaccount1", "container_name": "cont",
        "endpoint": f"http://127.0.0.1:{free_port()}/devstoreaccount1",
        "credential": {"account_key_env": KEY_ENV}}}}))
    r = mountd_cli("--workspace", ws, "download", "dead", tmp_path / "out", env={KEY_ENV: KEY}, timeout=120)
    assert r.code == 2 and r.err.startswith("mountd: error: cannot reach") and len(r.err.splitlines()) == 1, r
    assert not (tmp_path / "out").exists()
    ws.write_text("datastores: {a: [\n")
    r = mountd_cli("--workspace", ws, "datastore", "list")
    assert r.code == 2 and "invalid YAML" in r.err and len(r.err.splitlines()) == 1, r


def test_debug_shows_traceback(tmp_path, mountd_cli):
    (tmp_path / "w.yaml").write_text("datastores: {}\n")
    r = mountd_cli("--debug", "--workspace", tmp_path / "w.yaml", "download", "nope", tmp_path / "o")
    assert r.code == 2 and "Traceback" in r.err
    assert r.err.strip().endswith("unknown datastore 'nope' (known: workspacelocalstore)")


@pytest.mark.parametrize("kind", ["blob", "file"])
def test_a_container_or_share_sas_that_can_read_and_list_is_enough(kind, tmp_path, request, mountd_cli, mounter):
    # Azure grants a container or share SAS no access to the container's
    # or share's own properties: the check at start must not ask for them
    import datetime as dt
    expiry = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
    if kind == "blob":
        from azure.storage.blob import ContainerSasPermissions, generate_container_sas
        azurite, container = request.getfixturevalue("azurite"), request.getfixturevalue("container")
        container.upload_blob("data/a.txt", b"alpha")
        sas = generate_container_sas(ACCOUNT, container.container_name, account_key=KEY, expiry=expiry,
                                     permission=ContainerSasPermissions(read=True, list=True))
        entry = dict(blob_workspace_entry(azurite, container.container_name), credential={"sas_token_env": "THE_SAS"})
    else:
        from azure.storage.fileshare import ShareSasPermissions, generate_share_sas
        fileshare, share = request.getfixturevalue("fileshare"), request.getfixturevalue("share")
        share.create_directory("data")
        share.get_file_client("data/a.txt").upload_file(b"alpha")
        sas = generate_share_sas(ACCOUNT, share.share_name, account_key=KEY, expiry=expiry,
                                 permission=ShareSasPermissions(read=True, list=True))
        entry = dict(share_workspace_entry(fileshare, share.share_name), credential={"sas_token_env": "THE_SAS"})
    ws = tmp_path / "ws.yaml"
    ws.write_text(yaml.safe_dump({"datastores": {"sasstore": entry}}))
    env = {"MOUNTD_WORKSPACE": str(ws), "THE_SAS": sas}
    r = mountd_cli("download", "sasstore", tmp_path / "out", "--prefix", "data", "--no-progress", env=env)
    assert r.code == 0, r
    assert (tmp_path / "out" / "data" / "a.txt").read_bytes() == b"alpha"
    mp = mounter("sasstore:data", env=env)
    assert (mp / "a.txt").read_bytes() == b"alpha"


@pytest.mark.parametrize("signals", [1, 2])
def test_ctrl_c_stops_a_download_at_once_with_one_line(signals, tmp_path, azurite, container, fault_proxy):
    # Workers are in the middle of long reads (storage stalls) when Ctrl-C
    # comes: the command must not wait for them, must not report the files
    # they were writing as failed, and a second Ctrl-C must not print a
    # traceback. Nothing half-written appears under a file's name.
    import signal
    import subprocess
    import sys
    import time
    big = os.urandom(1 << 20) * 40
    for i in range(3):
        container.upload_blob(f"big/{i}.bin", big)
    for i in range(200):
        container.upload_blob(f"small/{i:03d}.bin", b"s" * 1000)
    proxy = fault_proxy(azurite.port)
    ws = tmp_path / "ws.yaml"
    ws.write_text(yaml.safe_dump({"datastores": {"slow": dict(blob_workspace_entry(azurite, container.container_name),
                                                             endpoint=proxy.url(azurite.account_url))}}))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "mountd", "download", "slow", out, "--no-progress"],
                            env={**os.environ, "MOUNTD_WORKSPACE": str(ws), KEY_ENV: KEY}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (out / "small").exists() and time.monotonic() < deadline:  # transfers under way
        time.sleep(0.02)
    proxy.outage("stall")  # every request in flight, and any new one, hangs
    time.sleep(0.5)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    if signals == 2:
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=20)
    finally:
        proxy.restore()
        if proc.poll() is None:
            proc.kill()
    took = time.monotonic() - started
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["mountd: error: interrupted"], err
    assert took < 2.5
    for f in (out / "big").glob("*") if (out / "big").exists() else ():
        assert f.read_bytes() == big  # complete, or not there at all
