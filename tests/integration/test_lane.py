"""The lane the session runs in is the one it says (MOUNTD_TEST_LANE, see
tests/conftest.py): in the TLS lane the storage fixtures are HTTPS and
mountd trusts them only through the CA the environment names, so the
storage, mount and run tests run over verified HTTPS, not around it."""

from __future__ import annotations

import os

import pytest

from tests.conftest import LANE, TRUST_VARIABLES

pytestmark = pytest.mark.azurite


def test_the_storage_fixtures_are_those_of_the_lane(azurite, fileshare, test_ca):
    scheme = "https" if LANE == "tls" else "http"
    assert azurite.account_url.startswith(f"{scheme}://127.0.0.1:")
    assert fileshare.account_url.startswith(f"{scheme}://127.0.0.1:")
    if LANE == "tls":
        assert "--skipApiVersionCheck" not in azurite.flags() and "--loose" not in azurite.flags()
        assert os.environ["REQUESTS_CA_BUNDLE"] == os.environ["SSL_CERT_FILE"] == test_ca.ca_path
        assert not os.environ.get("CURL_CA_BUNDLE") and not os.environ.get("SSL_CERT_DIR")


@pytest.mark.skipif(LANE != "tls", reason="the TLS lane's trust")
def test_without_the_lanes_trust_mountd_refuses_the_certificate(remote, store_workspace, tmp_path, mountd_cli):
    remote.put("f.txt", b"data")
    ok = mountd_cli("--workspace", store_workspace, "download", "store", tmp_path / "ok", "--no-progress")
    assert ok.code == 0, ok
    assert (tmp_path / "ok" / "f.txt").read_bytes() == b"data"
    system = {name: "" for name in TRUST_VARIABLES}  # the OS store, which does not know the test CA
    r = mountd_cli("--workspace", store_workspace, "download", "store", tmp_path / "no", "--no-progress",
                   env=system)
    assert r.code == 2, r
    assert "does not verify" in r.err and "Traceback" not in r.err
