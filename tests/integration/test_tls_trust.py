"""Trust over HTTPS, end to end: each variable that names a CA bundle
($SSL_CERT_FILE, $SSL_CERT_DIR, $REQUESTS_CA_BUNDLE as a file or a
directory, $CURL_CA_BUNDLE), set alone, is honoured alike by the SDK's path
(an upload) and the lean path (a download), against Azurite over HTTPS with
a CA made by the tests; with none of them, the CA is not trusted and the
command fails at once with one line saying what to set."""

import os
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from tests.support.azurite import blob_workspace_entry

TRUST_VARIABLES = ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


def hashed_directory(ca_path: str, directory) -> str:
    """A directory of hashed certificates (as c_rehash makes) holding the CA."""
    directory.mkdir()
    subject_hash = subprocess.run(["openssl", "x509", "-hash", "-noout", "-in", ca_path], capture_output=True,
                                  text=True, check=True).stdout.strip()
    shutil.copy(ca_path, directory / f"{subject_hash}.0")
    return str(directory)


@pytest.fixture
def tls_workspace(tmp_path, azurite_tls, test_ca):
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to hash a certificate directory")
    name = f"trust{os.getpid()}{int(time.time() * 1000) % 100000}"
    azurite_tls.blob_service().create_container(name)
    ws = tmp_path / "ws.yaml"
    ws.write_text(yaml.safe_dump({"datastores": {"tls": blob_workspace_entry(azurite_tls, name)}}))
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(3000))
    (src / "b.bin").write_bytes(os.urandom(40_000))
    return ws, src


def run(args, env):
    return subprocess.run([sys.executable, "-m", "mountd", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)


def clean_env(ws) -> dict:
    from tests.support.azurite import KEY
    env = {k: v for k, v in os.environ.items() if k not in TRUST_VARIABLES}
    env.update(MOUNTD_WORKSPACE=str(ws), AZURITE_ACCOUNT_KEY=KEY)
    return env


@pytest.mark.parametrize("variable", ["SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "REQUESTS_CA_BUNDLE dir",
                                      "CURL_CA_BUNDLE"])
def test_each_trust_variable_alone_serves_writes_and_reads_alike(variable, tls_workspace, test_ca, tmp_path):
    ws, src = tls_workspace
    env = clean_env(ws)
    name, _, form = variable.partition(" ")
    if form == "dir" or name == "SSL_CERT_DIR":
        env[name] = hashed_directory(test_ca.ca_path, tmp_path / "certs")
    else:
        env[name] = test_ca.ca_path
    up = run(["upload", "tls", src, "--target-path", "in", "--no-progress"], env)
    assert up.returncode == 0, up.stderr
    down = run(["download", "tls", tmp_path / "out", "--prefix", "in", "--no-progress"], env)
    assert down.returncode == 0, down.stderr
    for f in ("a.bin", "b.bin"):
        assert (tmp_path / "out" / "in" / f).read_bytes() == (src / f).read_bytes()


def test_without_the_ca_both_paths_fail_at_once_with_one_line(tls_workspace, tmp_path, azurite_tls):
    ws, src = tls_workspace
    env = clean_env(ws)  # the system's store: the test CA is not in it
    for args in (["upload", "tls", src, "--no-progress"], ["download", "tls", tmp_path / "out", "--no-progress"]):
        started = time.monotonic()
        r = run(args, env)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr
        assert f"127.0.0.1:{azurite_tls.port}" in lines[0] and "SSL_CERT_FILE" in lines[0]
        assert time.monotonic() - started < 15
    assert not (tmp_path / "out").exists()
