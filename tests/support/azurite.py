"""Starting and stopping a real Azurite blob service on a free port, for the
tests and the benchmarks."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import yaml

ACCOUNT = "devstoreaccount1"
# Azurite's well-known development key (public, documented by Azurite).
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


class Azurite:
    def __init__(self, location: str | None = None):
        self.binary = shutil.which("azurite-blob")
        self.location = location or tempfile.mkdtemp(prefix="azurite-")
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def account_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{ACCOUNT}"

    @property
    def connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};"
                f"BlobEndpoint={self.account_url};")

    def start(self) -> "Azurite":
        if not self.binary:
            raise RuntimeError("azurite-blob is not installed (npm install -g azurite)")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [self.binary, "--blobHost", "127.0.0.1", "--blobPort", str(self.port), "--location", self.location,
             "--silent", "--skipApiVersionCheck", "--loose"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        wait_for_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            # Azurite lingers on SIGTERM; its data is throw-away, so kill it.
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        shutil.rmtree(self.location, ignore_errors=True)


def bulk_put(azurite: Azurite, container: str, files: dict, threads: int = 16) -> None:
    """Store many small blobs fast: signed PUTs over one connection pool,
    a fraction of the SDK's CPU per blob (for load tests of thousands)."""
    import concurrent.futures

    import urllib3

    from mountd.storage.azure_http import API_VERSION, Signer
    from urllib.parse import quote

    signer = Signer(ACCOUNT, KEY)
    pool = urllib3.HTTPConnectionPool("127.0.0.1", azurite.port, maxsize=threads)

    def put(item):
        name, data = item
        path = f"/{ACCOUNT}/{container}/{quote(name, safe='/')}"
        headers = {"x-ms-blob-type": "BlockBlob", "x-ms-version": API_VERSION, "Content-Length": str(len(data))}
        signer.sign("PUT", path, headers)
        r = pool.urlopen("PUT", path, body=data, headers=headers)
        if r.status != 201:
            raise RuntimeError(f"storing {name}: {r.status} {r.data[:200]!r}")
    try:
        with concurrent.futures.ThreadPoolExecutor(threads) as ex:
            list(ex.map(put, files.items()))
    finally:
        pool.close()


def blob_workspace_entry(azurite: Azurite, container: str, key_env: str = "AZURITE_ACCOUNT_KEY") -> dict:
    """A workspace-file datastore mapping for a container of this Azurite."""
    return {"type": "azure_blob", "account_name": ACCOUNT, "container_name": container,
            "endpoint": azurite.account_url, "credential": {"account_key_env": key_env}}


def job_workspace(directory, azurite: Azurite, container, monkeypatch, inputs: dict, prefix: str = "datasets/in/"):
    """Upload `inputs` (name -> bytes) under `prefix`, and make a workspace
    file with the container as datastore `blob` the one mountd uses."""
    for name, data in inputs.items():
        container.upload_blob(f"{prefix}{name}", data)
    ws = directory / "ws.yaml"
    ws.write_text(yaml.safe_dump({"datastores": {"blob": blob_workspace_entry(azurite, container.container_name)}}))
    monkeypatch.setenv("MOUNTD_WORKSPACE", str(ws))
    monkeypatch.setenv("AZURITE_ACCOUNT_KEY", KEY)
    return ws


def blobs(container, prefix: str) -> dict:
    """name below prefix -> bytes, for every blob under prefix."""
    return {b.name[len(prefix):]: container.download_blob(b.name).readall()
            for b in container.list_blobs(name_starts_with=prefix)}


if __name__ == "__main__":  # pragma: no cover - manual use
    a = Azurite().start()
    print(a.account_url, flush=True)
    try:
        a.proc.wait()
    finally:
        a.stop()
        os._exit(0)
