"""TLS on the storage transport: reads from a server whose records arrive
in small TCP pieces, as real networks deliver them (no read may wait for
bytes that have already arrived: a read that does waits out the whole read
timeout); and a certificate that does not verify, which fails at once with
one line saying what to set, on the read path and the SDK's write path."""

import os
import random
import statistics
import subprocess
import sys
import threading
import time

import pytest
import yaml

from mountd.config import datastores
from mountd.config.credentials import Credential
from mountd.storage.blob import BlobStore
from mountd.storage.transport import CertificateProblem

from mountd.storage.azure_http import RangeReader, Signer
from mountd.storage.retry import StoragePolicy
from tests.support.trickle_tls import TrickleTLSServer, pattern

trustme = pytest.importorskip("trustme")

READ_TIMEOUT = 5.0
BODIES = 2000
THREADS = 4


def _untrusted_setup(tmp_path):
    """A server whose certificate comes from a CA nobody trusts."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    return TrickleTLSServer(str(cert_file), str(key_file))


@pytest.fixture
def trickle(tmp_path, monkeypatch):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):  # they would take precedence
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    server = TrickleTLSServer(str(cert_file), str(key_file))
    yield server
    server.close()


def test_thousands_of_tls_bodies_arriving_in_small_pieces_never_wait_out_a_timeout(trickle):
    reader = RangeReader(f"https://127.0.0.1:{trickle.port}/acct", Signer("acct"),
                         retry=StoragePolicy(retries=0, connect_timeout=5, read_timeout=READ_TIMEOUT))
    times, wrong, errors = [], [], []
    lock = threading.Lock()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        buf = bytearray(1 << 20)
        try:
            for _ in range(BODIES // THREADS):
                # at and above 512 KiB, where a read used to wait for the socket to fill
                size = rng.choice((520 * 1024, 600 * 1024, 1 << 20, 64 * 1024))
                offset = rng.randrange(0, 1 << 29)
                view = memoryview(buf)[:size]
                started = time.monotonic()
                got = reader.read_into("c/blob", offset, view, None)
                took = time.monotonic() - started
                ok = got == size and view == pattern(offset, size)
                with lock:
                    times.append(took)
                    if not ok:
                        wrong.append((offset, size))
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reader.close()
    assert not errors and not wrong
    assert len(times) == BODIES and trickle.requests == BODIES
    median, slowest = statistics.median(times), max(times)
    # a read that waited for bytes already there takes the read timeout
    assert slowest < max(30 * median, 1.0) < READ_TIMEOUT, (median, slowest)


def test_an_untrusted_certificate_fails_a_transfer_at_once_with_one_line(tmp_path):
    server = _untrusted_setup(tmp_path)
    ws = tmp_path / "ws.yaml"
    ws.write_text(yaml.safe_dump({"datastores": {"remote": {
        "type": "azure_blob", "account_name": "acct", "container_name": "data",
        "endpoint": f"https://127.0.0.1:{server.port}/acct", "credential": {"account_key_env": "THE_KEY"}}}}))
    env = {**os.environ, "MOUNTD_WORKSPACE": str(ws), "THE_KEY": "a2V5",
           "MOUNTD_STORAGE_BACKOFF": "2s"}
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "mountd", "download", "remote", str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, timeout=120)
    took = time.monotonic() - started
    server.close()
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("mountd: error: ") and "Traceback" not in r.stderr
    assert f"127.0.0.1:{server.port}" in lines[0] and "SSL_CERT_FILE" in lines[0] and "verify" in lines[0]
    assert took < 10  # not retried as if transient (a retry alone would wait 1-2 s, the budget ~30 s)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_an_untrusted_certificate_fails_an_sdk_write_at_once(tmp_path, monkeypatch):
    server = _untrusted_setup(tmp_path)
    monkeypatch.setenv("MOUNTD_STORAGE_BACKOFF", "2s")
    cfg = datastores.parse("remote", {"type": "azure_blob", "account_name": "acct", "container_name": "data",
                                      "endpoint": f"https://127.0.0.1:{server.port}/acct"}, "test")
    store = BlobStore(cfg, Credential("account_key", "a2V5"))
    started = time.monotonic()
    with pytest.raises(CertificateProblem, match=f"127.0.0.1:{server.port}.*SSL_CERT_FILE"):
        store.write_bytes("x.bin", b"data")
    assert time.monotonic() - started < 5
    store.close()
    server.close()
