"""Starting and stopping a real Azurite blob service on a free port, for the
tests and the benchmarks: over plain HTTP with the account key (the default),
or over HTTPS (`cert`/`key`, e.g. from tests/support/tls.py), optionally
accepting bearer tokens (`oauth=True`, Azurite's `--oauth basic`), and
optionally `strict`: without --skipApiVersionCheck and --loose, so requests
with an API version Azurite does not know, or with headers of features it
does not emulate (CRC64 range reads, customer-provided keys), are refused
instead of waved through."""

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
# An API version both this Azurite (3.37 knows up to 2026-06-06) and the
# installed SDK know. The SDK sends its newest version by default
# (2026-10-06 for azure-storage-blob 12.31), which a strict Azurite refuses
# with 400 InvalidHeaderValue, so SDK clients of a strict instance pin this
# (`Azurite.blob_service` does).
SDK_API_VERSION = "2025-11-05"


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
    def __init__(self, location: str | None = None, *, cert: str | None = None, key: str | None = None,
                 oauth: bool = False, strict: bool = False, ca: str | None = None):
        if (cert is None) != (key is None):
            raise ValueError("cert and key go together")
        if oauth and cert is None:
            # Azurite refuses bearer tokens over HTTP, as Azure does.
            raise ValueError("oauth needs HTTPS (cert and key)")
        self.binary = shutil.which("azurite-blob")
        self.location = location or tempfile.mkdtemp(prefix="azurite-")
        self.cert, self.key, self.oauth, self.strict = cert, key, oauth, strict
        self.ca = ca  # the CA that signed cert, for clients (connection_verify)
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def tls(self) -> bool:
        return self.cert is not None

    @property
    def account_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/{ACCOUNT}"

    @property
    def connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol={'https' if self.tls else 'http'};AccountName={ACCOUNT};"
                f"AccountKey={KEY};BlobEndpoint={self.account_url};")

    def flags(self) -> list[str]:
        """The command-line flags beyond host, port and location."""
        flags = ["--silent"]
        if not self.strict:
            flags += ["--skipApiVersionCheck", "--loose"]
        if self.tls:
            flags += ["--cert", self.cert, "--key", self.key]
        if self.oauth:
            flags += ["--oauth", "basic"]
        return flags

    def blob_service(self, credential=None, **kwargs):
        """A BlobServiceClient of this instance: the account key unless
        `credential` is given, trusting `ca` over HTTPS, with an API version
        a strict instance accepts."""
        from azure.storage.blob import BlobServiceClient
        if self.ca is not None:
            kwargs.setdefault("connection_verify", self.ca)
        kwargs.setdefault("api_version", SDK_API_VERSION)
        if credential is None:
            credential = {"account_name": ACCOUNT, "account_key": KEY}
        return BlobServiceClient(self.account_url, credential=credential, **kwargs)

    def start(self) -> "Azurite":
        if not self.binary:
            raise RuntimeError("azurite-blob is not installed (npm install -g azurite)")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [self.binary, "--blobHost", "127.0.0.1", "--blobPort", str(self.port), "--location", self.location,
             *self.flags()],
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


def credential_entry(key_env: str = "AZURITE_ACCOUNT_KEY", managed_identity: bool = False,
                     client_id: str | None = None) -> dict:
    """The `credential` mapping of a workspace-file datastore: the account key
    from $key_env, or a managed identity (user-assigned with `client_id`)."""
    if managed_identity or client_id:
        return {"managed_identity": True, **({"client_id": client_id} if client_id else {})}
    return {"account_key_env": key_env}


def blob_workspace_entry(azurite: Azurite, container: str, key_env: str = "AZURITE_ACCOUNT_KEY", *,
                         managed_identity: bool = False, client_id: str | None = None) -> dict:
    """A workspace-file datastore mapping for a container of this Azurite."""
    return {"type": "azure_blob", "account_name": ACCOUNT, "container_name": container,
            "endpoint": azurite.account_url,
            "credential": credential_entry(key_env, managed_identity, client_id)}


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
