"""Soak test, run by hand (not collected by pytest): hours of mixed load
through a fault proxy in front of a private Azurite, every byte checked.

    python -m tests.soak --hours 4 [--files 10000] [--readers 32] [--reset 0.2] [--stall 0.1] [--seed 1]

One mount with readers going over the files, `mountd download` of a prefix
and `mountd upload` of fresh outputs in a loop, all through a proxy that
resets and stalls connections at the given rates, with a short outage every
ten minutes. Prints a line of figures every minute and a summary at the
end; exits 1 on the first wrong byte, or if a transient fault surfaced as
an error outside an outage. Loopback only; stops by itself.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import yaml

from tests.support.azurite import KEY, Azurite, blob_workspace_entry, bulk_put
from tests.support.faultproxy import FaultProxy

OUTAGE_EVERY, OUTAGE_FOR = 600.0, 5.0  # seconds


def content(name: str) -> bytes:
    seed = hashlib.sha256(name.encode()).digest()
    return seed * (32 + seed[0] % 224)


class Soak:
    def __init__(self, args):
        self.args = args
        self.stop = threading.Event()
        self.outage_until = 0.0
        self.lock = threading.Lock()
        self.figures = {"files_read": 0, "bytes_verified": 0, "downloads": 0, "uploads": 0, "errors_in_outage": 0,
                        "errors": 0}
        self.failures: list[str] = []

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.figures[key] += n

    def error(self, what: str) -> None:
        if time.monotonic() < self.outage_until + 10:  # an outage and the retries after it
            self.count("errors_in_outage")
        else:
            self.count("errors")
            self.failures.append(what)

    def cli(self, *args) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mountd", *map(str, args)], capture_output=True, text=True,
                              env=self.env, timeout=3600)

    def reader(self, mp: str, names: list[str], seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            name = rng.choice(names)
            try:
                with open(os.path.join(mp, name), "rb") as f:
                    data = f.read()
            except OSError as e:
                self.error(f"read {name}: {e}")
                continue
            if data != content(name):
                self.failures.append(f"WRONG BYTES in {name}")
                self.stop.set()
                return
            self.count("files_read")
            self.count("bytes_verified", len(data))

    def downloader(self, work: str, names: list[str]) -> None:
        n = 0
        while not self.stop.is_set():
            dst = os.path.join(work, f"dl{n % 2}")
            shutil.rmtree(dst, ignore_errors=True)
            r = self.cli("download", "soak", dst, "--prefix", "d0", "--no-progress")
            if r.returncode != 0:
                self.error(f"download: {r.stderr.strip()[-300:]}")
            else:
                for name in (x for x in names if x.startswith("d0")):
                    with open(os.path.join(dst, name), "rb") as f:
                        if f.read() != content(name):
                            self.failures.append(f"WRONG BYTES downloaded in {name}")
                            self.stop.set()
                            return
                    self.count("bytes_verified", len(content(name)))
                self.count("downloads")
            n += 1

    def uploader(self, work: str, container) -> None:
        n = 0
        while not self.stop.is_set():
            src = os.path.join(work, f"up{n}")
            os.makedirs(src)
            files = {f"out-{i}.bin": os.urandom(random.randrange(1, 2 << 20)) for i in range(5)}
            for name, data in files.items():
                with open(os.path.join(src, name), "wb") as f:
                    f.write(data)
            r = self.cli("upload", "soak", src, "--target-path", f"uploads/{n}", "--no-progress")
            if r.returncode != 0:
                self.error(f"upload: {r.stderr.strip()[-300:]}")
            else:
                for name, data in files.items():
                    if container.download_blob(f"uploads/{n}/{name}").readall() != data:
                        self.failures.append(f"WRONG BYTES uploaded in uploads/{n}/{name}")
                        self.stop.set()
                        return
                    self.count("bytes_verified", len(data))
                self.count("uploads")
            shutil.rmtree(src)
            n += 1

    def run(self) -> int:
        from azure.storage.blob import BlobServiceClient
        a = self.args
        work = tempfile.mkdtemp(prefix="mountd-soak-")
        azurite = Azurite().start()
        proxy = None
        mp = os.path.join(work, "mnt")
        try:
            service = BlobServiceClient.from_connection_string(azurite.connection_string)
            container = service.create_container("soak")
            names = [f"d{i % 100:02d}/f{i:05d}.bin" for i in range(a.files)]
            print(f"storing {len(names)} blobs...", flush=True)
            bulk_put(azurite, "soak", {n: content(n) for n in names})
            proxy = FaultProxy(("127.0.0.1", azurite.port), seed=a.seed, reset=a.reset, stall=a.stall,
                               stall_seconds=3.0, error_503=0.01, retry_after=1).start()
            entry = blob_workspace_entry(azurite, "soak")
            entry["endpoint"] = proxy.url(azurite.account_url)
            ws = os.path.join(work, "ws.yaml")
            with open(ws, "w") as f:
                yaml.safe_dump({"datastores": {"soak": entry}}, f)
            self.env = dict(os.environ, MOUNTD_WORKSPACE=ws, AZURITE_ACCOUNT_KEY=KEY, RUNTIME_DIRECTORY=work,
                            MOUNTD_STORAGE_READ_TIMEOUT="2s", MOUNTD_STORAGE_BACKOFF_MAX="2s",
                            MOUNTD_STORAGE_RETRIES="10")
            os.makedirs(mp)
            r = self.cli("mount", "soak", mp, "--cache-dir", os.path.join(work, "cache"), "--cache-max-size", "64MiB",
                         "--attribute-ttl", "30s")
            if r.returncode != 0:
                print(r.stderr, file=sys.stderr)
                return 1
            threads = [threading.Thread(target=self.reader, args=(mp, names, i), daemon=True)
                       for i in range(a.readers)]
            threads += [threading.Thread(target=self.downloader, args=(work, names), daemon=True),
                        threading.Thread(target=self.uploader, args=(work, container), daemon=True)]
            for t in threads:
                t.start()
            started = time.monotonic()
            end = started + a.hours * 3600
            next_outage = started + OUTAGE_EVERY
            while time.monotonic() < end and not self.stop.is_set():
                self.stop.wait(60)
                now = time.monotonic()
                if now >= next_outage:
                    self.outage_until = now + OUTAGE_FOR
                    proxy.outage("reset")
                    time.sleep(OUTAGE_FOR)
                    proxy.restore()
                    next_outage = now + OUTAGE_EVERY
                print(f"[{(now - started) / 60:.0f} min] {self.figures} faults={proxy.injected()}", flush=True)
            self.stop.set()
            for t in threads:
                t.join(120)
        finally:
            self.stop.set()
            subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True)
            if proxy:
                proxy.stop()
            azurite.stop()
            shutil.rmtree(work, ignore_errors=True)
        print(f"soak: {self.figures}; faults injected {proxy.injected() if proxy else 0} "
              f"({dict(proxy.counts) if proxy else {}})")
        for failure in self.failures[:20]:
            print("FAILED:", failure)
        return 1 if self.failures else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hours", type=float, default=1.0)
    p.add_argument("--files", type=int, default=10_000)
    p.add_argument("--readers", type=int, default=32)
    p.add_argument("--reset", type=float, default=0.2)
    p.add_argument("--stall", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1)
    return Soak(p.parse_args()).run()


if __name__ == "__main__":
    sys.exit(main())
