"""Upload throughput of mountd next to rclone, against one local Azurite:
outputs and a checkpoint uploaded after a job, and sequential writes through
a read-write mount.

Three scenarios, each run for several rounds with the tools interleaved inside
a round (the order rotates from round to round) so they share the machine's
noise. Every run writes into a fresh, empty path of the container; what landed
is checked outside the timed part (object count and total bytes, every
object's MD5 against the source: the MD5 storage keeps where the tool set one,
else the downloaded bytes, and the big files always by downloading them),
then deleted before the next run.

- outputs:    --small-count files of --small-kib KiB (400 x 1 MiB) in a local
              directory, uploaded to `outputs/rN-TOOL/` by
              * mountd:   `mountd upload bench SRC --target-path P --no-progress`
                          (its default workers), the upload engine `mountd run`
                          uses for `upload` references after the command exits;
              * mountd run (upload ref): `mountd run MANIFEST --work-dir W`, a
                          manifest whose only reference is an `upload`
                          reference of SRC and whose command is `true`, with a
                          fresh W each time: the same upload, journaled (the
                          job written durably first, each file confirmed),
                          plus manifest validation and starting the command;
              * rclone:   `rclone copy SRC az:bench/P --transfers 16 --checkers 16`
                          (rclone's defaults are --transfers 4 --checkers 8,
                          azureblob chunk size 4 MiB, upload concurrency 16
                          per multipart file).
- checkpoint: one file of --big-mib MiB (1 GiB), uploaded to
              `checkpoint/rN-TOOL/model.ckpt` by the same three tools and
              flags.
- rw-mount:   a sequential write of one --write-mib MiB file (1 GiB) with
              `dd if=SRC of=MOUNT/rw-rN-TOOL.bin bs=1M conv=fsync` into a
              fresh mount of the container (fresh cache and work dirs; the
              mounting is not timed) through
              * mountd:   `mountd mount bench MNT --read-write --work-dir W --cache-dir C`,
                          which uploads a changed file when it is fsynced or
                          closed, so dd returns once storage holds the bytes;
              * rclone:   `rclone mount az:bench MNT --vfs-cache-mode writes --cache-dir C`
                          (otherwise defaults), which uploads asynchronously
                          after the last close, --vfs-write-back (5 s) later;
              * rclone wb=0s: the same with `--vfs-write-back 0s`, uploading
                          right after the close.
              Two times per run, both from the start of dd: "until close
              returns" (dd exited) -> scenario `rw-close`, and "until in
              storage" (the blob exists with its full size, polled with the
              SDK every 50 ms) -> scenario `rw-stored`. After the unmount,
              mountd's work dir must hold no unfinished journal job and no
              staged copy.

Times are wall-clock seconds of the whole command (process start-up
included); the source files are in the page cache. The account key reaches
mountd by reference (`account_key_env` in the workspace file, the key in the
environment) and rclone through a config file of mode 0600 in the temporary
directory; neither ever sees it on its command line.

With --tls, Azurite serves HTTPS alone, with a certificate from a CA made
for the run, and mountd, rclone and the checks talk HTTPS to it trusting
that CA (see common.tool_env), as real Azure storage is HTTPS only; the
report's header says which.

Run from the repository root as root (needs azurite-blob, rclone, dd,
fusermount3 on PATH and mountd's dependencies installed; the mountd measured
is the repository's, run as `python -m mountd`):

    python -m tests.benchmarks.bench_upload                          # 400 x 1 MiB, 1 GiB, 1 GiB write; 3 rounds
    python -m tests.benchmarks.bench_upload --repeat 1 --big-mib 64 --small-count 50 --write-mib 64   # quick check
    python -m tests.benchmarks.bench_upload --skip-mount --json results.json
    python -m tests.benchmarks.bench_upload --tls                   # the same over HTTPS

This is not a pytest test; it prints a table like bench_download (medians,
MiB/s, mountd/tool throughput ratios, every round's raw seconds, how each tool
was run), then the ratios the project's goals use (mountd / rclone
throughput; the goal for uploads is at least 1.0x rclone copy); optionally
JSON. Every mount it makes is unmounted at the end, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

from tests.benchmarks.bench_download import mountd_argv, mountd_header
from tests.benchmarks.bench_mount import (MOUNT_TIMEOUT, MOUNTD_ENV_PREFIXES, MOUNTD_LOGS, MountdMount, RcloneMount,
                                          blob_service, run_session, unmount_all, worker_record)
from tests.benchmarks.common import (
    MiB, Scenario, ToolFailed, fresh_dir, is_mounted, machine_info, print_report, remove_dir,
    report_dict, run_timed, settle, storage_header, tool_env, tool_version, tree_stats, wait_mounted,
    write_random_file, write_rclone_config)
from tests.support.azurite import ACCOUNT, KEY, Azurite, blob_workspace_entry

CONTAINER = "bench"
DATASTORE = "bench"
KEY_ENV = "AZURITE_ACCOUNT_KEY"
RCLONE_REMOTE = "az"
RCLONE_COPY_FLAGS = ["--transfers", "16", "--checkers", "16"]
CHECKPOINT_NAME = "model.ckpt"
RUN_TIMEOUT = 3600
POLL_INTERVAL = 0.05
SUBJECT = "mountd"
RUN_TOOL = "mountd run (upload ref)"
RCLONE_WB0 = "rclone wb=0s"


# --- source data ------------------------------------------------------------------

@dataclass
class Source:
    """A local tree to upload and what storage must hold afterwards."""
    root: str
    md5: dict[str, str] = field(default_factory=dict)    # path relative to root ('/'-separated) -> MD5 hex
    sizes: dict[str, int] = field(default_factory=dict)  # same keys -> bytes
    big: bool = False  # check the objects by downloading them, whatever MD5 storage keeps

    @property
    def nbytes(self) -> int:
        return sum(self.sizes.values())


def make_outputs(root: str, count: int, kib: int) -> Source:
    src = Source(fresh_dir(root))
    for i in range(count):
        name = f"f{i:05d}.bin"
        data = os.urandom(kib * 1024)
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
        src.md5[name] = hashlib.md5(data).hexdigest()
        src.sizes[name] = len(data)
    return src


def make_checkpoint(root: str, mib: int) -> Source:
    src = Source(fresh_dir(root), big=True)
    src.md5[CHECKPOINT_NAME] = write_random_file(os.path.join(root, CHECKPOINT_NAME), mib)
    src.sizes[CHECKPOINT_NAME] = mib * MiB
    return src


def warm(path: str) -> None:
    """Read a file or tree once so that every tool finds it in the page cache."""
    paths = [path] if os.path.isfile(path) else [os.path.join(d, n) for d, _, ns in os.walk(path) for n in ns]
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.read(8 * MiB):
                pass


# --- checks (outside the timed part) -------------------------------------------------

def md5_hex(content_md5) -> str:
    return bytes(content_md5).hex() if content_md5 else ""


def download_md5(container, name: str) -> tuple[str, int]:
    md5, n = hashlib.md5(), 0
    for chunk in container.download_blob(name).chunks():
        md5.update(chunk)
        n += len(chunk)
    return md5.hexdigest(), n


class Checker:
    """Checks what a tool put under a prefix, remembers whether the tool let
    storage keep an MD5, and deletes the objects afterwards."""

    def __init__(self, container):
        self.container = container
        self.stored_md5: dict[str, set[bool]] = {}  # tool -> {had a stored MD5, ...}

    def objects(self, prefix: str) -> dict:
        return {b.name[len(prefix):]: b for b in self.container.list_blobs(name_starts_with=prefix)}

    def check(self, tool: str, prefix: str, src: Source) -> None:
        blobs = self.objects(prefix)
        count, total = len(blobs), sum(b.size for b in blobs.values())
        if (count, total) != (len(src.sizes), src.nbytes):
            raise ToolFailed(f"{tool}: storage holds {count} objects / {total} bytes under {prefix}, "
                             f"expected {len(src.sizes)} / {src.nbytes}")
        if set(blobs) != set(src.md5):
            odd = sorted(set(blobs) ^ set(src.md5))[:5]
            raise ToolFailed(f"{tool}: object names under {prefix} differ from the source, e.g. {odd}")
        for name, blob in blobs.items():
            if blob.size != src.sizes[name]:
                raise ToolFailed(f"{tool}: {prefix}{name} holds {blob.size} bytes, expected {src.sizes[name]}")
            stored = md5_hex(blob.content_settings.content_md5)
            self.stored_md5.setdefault(tool, set()).add(bool(stored))
            if stored and stored != src.md5[name]:
                raise ToolFailed(f"{tool}: the MD5 stored with {prefix}{name} is {stored}, the source's "
                                 f"is {src.md5[name]}")
            if src.big or not stored:
                got, n = download_md5(self.container, prefix + name)
                if (got, n) != (src.md5[name], src.sizes[name]):
                    raise ToolFailed(f"{tool}: downloaded {prefix}{name} ({n} bytes, MD5 {got}) differs from "
                                     f"the source ({src.sizes[name]} bytes, MD5 {src.md5[name]})")

    def delete(self, prefix: str) -> None:
        names = [b.name for b in self.container.list_blobs(name_starts_with=prefix)]
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(self.container.delete_blob, names))

    def summary(self) -> str:
        def word(s: set[bool]) -> str:
            return "yes" if s == {True} else "no" if s == {False} else "some"
        return ", ".join(f"{t}: {word(s)}" for t, s in self.stored_md5.items())


def unfinished_work(work_dir: str) -> list[str]:
    """Journal jobs and staged copies mountd left in a work dir (none expected
    once an upload or an unmount has returned successfully)."""
    left = []
    for sub, keep in (("journal", ()), ("staged", (".lock",))):
        d = os.path.join(work_dir, sub)
        if os.path.isdir(d):
            left += [os.path.join(sub, n) for n in sorted(os.listdir(d)) if n not in keep]
    return left


# --- read-write mounts -------------------------------------------------------------------

class RwMountdMount(MountdMount):
    def __init__(self, path: str, cache_dir: str, work_dir: str, workspace: str, env: dict):
        super().__init__(path, cache_dir, workspace, env)
        self.work_dir = work_dir

    @staticmethod
    def how(cache: str = "EMPTY_DIR") -> str:
        return (f"mountd mount {DATASTORE} MNT --read-write --work-dir EMPTY_DIR --cache-dir {cache} "
                "(otherwise defaults)")

    def start(self) -> float:
        argv = mountd_argv() + ["--workspace", self.workspace, "mount", DATASTORE, self.path, "--read-write",
                                "--work-dir", self.work_dir, "--cache-dir", self.cache_dir]
        secs = run_timed(argv, env=self.env, timeout=120)
        rec = worker_record(self.path)
        self.pid = int(rec["pid"])
        if rec.get("log"):
            MOUNTD_LOGS.add(rec["log"])
        return secs


class RwRcloneMount(RcloneMount):
    def __init__(self, tool: str, path: str, cache_dir: str, conf: str, log: str, env: dict, extra: list[str]):
        super().__init__(path, "writes", cache_dir, conf, log, env)
        self.tool, self.extra = tool, extra

    @staticmethod
    def how(extra: list[str]) -> str:
        return " ".join([f"rclone mount {RCLONE_REMOTE}:{CONTAINER} MNT --config CONF --vfs-cache-mode writes "
                         "--cache-dir EMPTY_DIR"] + extra + ["(otherwise defaults)"])

    def start(self) -> float:
        argv = ["rclone", "mount", f"{RCLONE_REMOTE}:{CONTAINER}", self.path, "--config", self.conf,
                "--vfs-cache-mode", "writes", "--cache-dir", self.cache_dir] + self.extra
        start = time.perf_counter()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        self.pid = self.proc.pid
        try:
            wait_mounted(self.path, MOUNT_TIMEOUT, self.proc)
        except ToolFailed as e:
            with open(self.log, errors="replace") as f:
                tail = f.read().strip().splitlines()[-10:]
            raise ToolFailed(f"rclone mount: {e}\n  " + "\n  ".join(tail)) from None
        return time.perf_counter() - start


RCLONE_MOUNTS = {"rclone": [], RCLONE_WB0: ["--vfs-write-back", "0s"]}


# --- the benchmark ---------------------------------------------------------------------------

@dataclass
class Results:
    outputs: Scenario | None = None
    checkpoint: Scenario | None = None
    rw_close: Scenario | None = None
    rw_stored: Scenario | None = None
    startup: dict[str, list[float]] = field(default_factory=dict)  # rw-mount tool -> mount seconds

    def scenarios(self) -> list[Scenario]:
        return [sc for sc in (self.outputs, self.checkpoint, self.rw_close, self.rw_stored) if sc]


def slug(tool: str) -> str:
    return {RUN_TOOL: "mountd-run", RCLONE_WB0: "rclone-wb0"}.get(tool, tool)


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: str, azurite: Azurite, container):
        self.args, self.tmp, self.azurite, self.container = args, tmp, azurite, container
        self.checker = Checker(container)
        self.dirs = {k: os.path.join(tmp, k) for k in ("conf", "src", "runs", "mnt", "cache", "work", "logs")}
        for d in self.dirs.values():
            os.makedirs(d, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(MOUNTD_ENV_PREFIXES)}
        self.env = {**tool_env(azurite, env), KEY_ENV: KEY}
        self.workspace = self.write_workspace()
        self.rclone_conf = write_rclone_config(os.path.join(self.dirs["conf"], "rclone.conf"), RCLONE_REMOTE,
                                               ACCOUNT, KEY, azurite.account_url)
        self.sources: dict[str, Source] = {}
        self.write_src = ""
        self.write_md5 = ""
        self.write_bytes = args.write_mib * MiB
        self.active: list = []
        self.res = Results()

    def write_workspace(self) -> str:
        """The workspace: the container as datastore `bench` (its key by
        environment variable), and the source directory as an allowed root so
        that a manifest's upload reference may point at it."""
        import yaml
        doc = {"default_datastore": DATASTORE,
               "datastores": {DATASTORE: blob_workspace_entry(self.azurite, CONTAINER, key_env=KEY_ENV)},
               "allowed_roots": [os.path.realpath(self.dirs["src"])]}
        path = os.path.join(self.dirs["conf"], "workspace.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(doc, f, sort_keys=False)
        return path

    # -- setup

    def prepare(self) -> None:
        a = self.args
        if not a.skip_outputs:
            print(f"writing {a.small_count} x {a.small_kib} KiB source files", flush=True)
            self.sources["outputs"] = make_outputs(os.path.join(self.dirs["src"], "outputs"), a.small_count,
                                                   a.small_kib)
            self.res.outputs = Scenario("outputs", a.small_count, self.sources["outputs"].nbytes)
        if not a.skip_checkpoint:
            print(f"writing a {a.big_mib} MiB checkpoint", flush=True)
            self.sources["checkpoint"] = make_checkpoint(os.path.join(self.dirs["src"], "checkpoint"), a.big_mib)
            self.res.checkpoint = Scenario("checkpoint", 1, self.sources["checkpoint"].nbytes)
        for name in self.sources:
            sc = getattr(self.res, name)
            p = f"{name}/rN-TOOL"
            sc.tools = {
                SUBJECT: f"mountd upload {DATASTORE} SRC --target-path {p} --no-progress (default workers)",
                RUN_TOOL: f"mountd run MANIFEST --work-dir EMPTY_DIR; manifest: one upload reference "
                          f"(path_on_compute SRC, path_on_datastore {p}), command [true]",
                "rclone": " ".join(["rclone copy SRC", f"{RCLONE_REMOTE}:{CONTAINER}/{p}"] + RCLONE_COPY_FLAGS),
            }
        if not a.skip_mount:
            ckpt = self.sources.get("checkpoint")
            if ckpt and a.write_mib == a.big_mib:
                self.write_src = os.path.join(ckpt.root, CHECKPOINT_NAME)
                self.write_md5 = ckpt.md5[CHECKPOINT_NAME]
            else:
                print(f"writing a {a.write_mib} MiB file for the mount writes", flush=True)
                self.write_src = os.path.join(self.dirs["src"], "write.bin")
                self.write_md5 = write_random_file(self.write_src, a.write_mib)
            dd = "; dd if=SRC of=MNT/rw-rN-TOOL.bin bs=1M conv=fsync"
            tools = {SUBJECT: RwMountdMount.how() + dd}
            tools.update({t: RwRcloneMount.how(extra) + dd for t, extra in RCLONE_MOUNTS.items()})
            self.res.rw_close = Scenario("rw-close", 1, self.write_bytes)
            self.res.rw_close.tools = {t: h + " (timed until dd exits)" for t, h in tools.items()}
            self.res.rw_stored = Scenario("rw-stored", 1, self.write_bytes)
            self.res.rw_stored.tools = {t: h + " (timed from dd's start until the blob has its full size in "
                                              "storage, polled every 50 ms)" for t, h in tools.items()}

    # -- uploads after exit (outputs, checkpoint)

    def upload(self, scenario: str, tool: str, r: int) -> None:
        src = self.sources[scenario]
        prefix = f"{scenario}/r{r + 1}-{slug(tool)}"
        if any(True for _ in self.container.list_blobs(name_starts_with=prefix + "/")):
            raise ToolFailed(f"{prefix}/ is not empty before the run")
        warm(src.root)
        settle()
        if tool == SUBJECT:
            secs = run_timed(mountd_argv() + ["--workspace", self.workspace, "upload", DATASTORE, src.root,
                                              "--target-path", prefix, "--no-progress"],
                             env=self.env, timeout=RUN_TIMEOUT)
        elif tool == RUN_TOOL:
            secs = self.mountd_run(scenario, src, prefix, r)
        else:
            secs = run_timed(["rclone", "--config", self.rclone_conf, "copy", src.root,
                              f"{RCLONE_REMOTE}:{CONTAINER}/{prefix}", "-q"] + RCLONE_COPY_FLAGS,
                             env=self.env, timeout=RUN_TIMEOUT)
        self.checker.check(tool, prefix + "/", src)
        if tree_stats(src.root) != (len(src.sizes), src.nbytes):
            raise ToolFailed(f"{tool}: the source tree {src.root} changed")
        self.checker.delete(prefix + "/")
        sc = getattr(self.res, scenario)
        sc.add(tool, secs)
        self.progress(r, scenario, tool, secs, sc.nbytes)

    def mountd_run(self, scenario: str, src: Source, prefix: str, r: int) -> float:
        import yaml
        work = os.path.join(self.dirs["runs"], f"{scenario}-r{r + 1}")
        shutil.rmtree(work, ignore_errors=True)
        manifest = os.path.join(self.dirs["conf"], f"run-{scenario}.yaml")
        doc = {"run_id": f"bench-{scenario}-r{r + 1}",
               "data_references": {"outputs": {"datastore": DATASTORE, "path_on_datastore": prefix,
                                               "mode": "upload", "path_on_compute": src.root}},
               "command": ["true"]}
        with open(manifest, "w") as f:
            yaml.safe_dump(doc, f, sort_keys=False)
        secs = run_timed(mountd_argv() + ["--workspace", self.workspace, "run", manifest, "--work-dir", work],
                         env=self.env, timeout=RUN_TIMEOUT)
        left = unfinished_work(work)
        if left:
            raise ToolFailed(f"{RUN_TOOL}: exited 0 but its work dir {work} still holds {left[:5]}")
        remove_dir(work)
        return secs

    # -- sequential write through a read-write mount

    @contextmanager
    def mounted(self, tool: str):
        """A fresh read-write mount (fresh cache and work dirs), always undone."""
        s = slug(tool)
        mp = fresh_dir(os.path.join(self.dirs["mnt"], s))
        cache = fresh_dir(os.path.join(self.dirs["cache"], s))
        work = None
        if tool == SUBJECT:
            work = os.path.join(self.dirs["work"], s)
            shutil.rmtree(work, ignore_errors=True)
            m = RwMountdMount(mp, cache, work, self.workspace, self.env)
        else:
            m = RwRcloneMount(tool, mp, cache, self.rclone_conf, os.path.join(self.dirs["logs"], f"{s}.log"),
                              self.env, RCLONE_MOUNTS[tool])
        self.active.append(m)
        try:
            self.res.startup.setdefault(tool, []).append(m.start())
            yield m
        finally:
            m.stop()
            self.active.remove(m)
            if not is_mounted(mp):
                os.rmdir(mp)
            remove_dir(cache)
        if work is not None:
            left = unfinished_work(work)
            if left:
                raise ToolFailed(f"mountd: after the unmount its work dir {work} still holds {left[:5]}")
            remove_dir(work)

    def rw_write(self, tool: str, r: int) -> None:
        name = f"rw-r{r + 1}-{slug(tool)}.bin"
        blob = self.container.get_blob_client(name)
        if blob.exists():
            raise ToolFailed(f"{name} exists before the run")
        warm(self.write_src)
        with self.mounted(tool) as m:
            settle()
            start = time.perf_counter()
            run_timed(["dd", f"if={self.write_src}", f"of={os.path.join(m.path, name)}", "bs=1M", "conv=fsync"],
                      env={**os.environ, "LC_ALL": "C"}, timeout=RUN_TIMEOUT)
            closed = time.perf_counter() - start
            stored = self.wait_stored(tool, blob, start)
        got, n = download_md5(self.container, name)
        if (got, n) != (self.write_md5, self.write_bytes):
            raise ToolFailed(f"{tool}: {name} in storage ({n} bytes, MD5 {got}) differs from what dd wrote "
                             f"({self.write_bytes} bytes, MD5 {self.write_md5})")
        stored_md5 = md5_hex(blob.get_blob_properties().content_settings.content_md5)
        self.checker.stored_md5.setdefault(f"{tool} (rw)", set()).add(bool(stored_md5))
        if stored_md5 and stored_md5 != self.write_md5:
            raise ToolFailed(f"{tool}: the MD5 stored with {name} is {stored_md5}, its bytes' is {self.write_md5}")
        blob.delete_blob()
        self.res.rw_close.add(tool, closed)
        self.res.rw_stored.add(tool, stored)
        self.progress(r, "rw-close", tool, closed, self.write_bytes)
        self.progress(r, "rw-stored", tool, stored, self.write_bytes)

    def wait_stored(self, tool: str, blob, start: float) -> float:
        """Seconds from `start` until storage holds the whole blob."""
        from azure.core.exceptions import ResourceNotFoundError
        while True:
            try:
                if blob.get_blob_properties().size == self.write_bytes:
                    return time.perf_counter() - start
            except ResourceNotFoundError:
                pass
            if time.perf_counter() - start > RUN_TIMEOUT:
                raise ToolFailed(f"{tool}: {blob.blob_name} not in storage {RUN_TIMEOUT} s after dd started")
            time.sleep(POLL_INTERVAL)

    # -- rounds

    def plan(self) -> list[list[Callable[[int], None]]]:
        """Per scenario, each tool's run; each scenario's order rotates per round."""
        phases = []
        for name in self.sources:
            phases.append([lambda r, n=name, t=t: self.upload(n, t, r) for t in (SUBJECT, RUN_TOOL, "rclone")])
        if self.res.rw_close:
            phases.append([lambda r, t=t: self.rw_write(t, r) for t in (SUBJECT, *RCLONE_MOUNTS)])
        return phases

    def run(self) -> None:
        phases = self.plan()
        for r in range(self.args.repeat):
            for runs in phases:
                shift = r % len(runs)
                for run in runs[shift:] + runs[:shift]:
                    run(r)

    def progress(self, r: int, name: str, tool: str, secs: float, nbytes: int) -> None:
        print(f"round {r + 1}/{self.args.repeat}  {name:<10} {tool:<24} {secs:8.2f} s "
              f"{nbytes / MiB / secs:9.1f} MiB/s", flush=True)

    def cleanup(self) -> list[str]:
        return unmount_all(self.active, self.tmp, self.workspace, self.env)


# --- report -----------------------------------------------------------------------------

def ratio(x: float, y: float) -> float:
    return x / y if y else float("nan")


def goals(res: Results) -> list[tuple[str, str, str]]:
    """(scenario, what, value) rows: mountd's throughput over rclone's."""
    rows = []
    for sc in (res.outputs, res.checkpoint):
        if not sc:
            continue
        rclone = sc.median_rate("rclone")
        for i, tool in enumerate((SUBJECT, RUN_TOOL)):
            x = ratio(sc.median_rate(tool), rclone)
            rows.append((sc.name if i == 0 else "", f"{'mountd upload' if tool == SUBJECT else tool} / rclone copy",
                         f"{x:.2f}x ({'meets' if x >= 1.0 else 'below'} the 1.0x goal)"))
    for sc, label in ((res.rw_close, "rw-mount, until close returns"), (res.rw_stored, "rw-mount, until in storage")):
        if not sc:
            continue
        for i, tool in enumerate(RCLONE_MOUNTS):
            rows.append((label if i == 0 else "", f"mountd / {tool}",
                         f"{ratio(sc.median_rate(SUBJECT), sc.median_rate(tool)):.2f}x"))
    return rows


def print_all(res: Results, header: dict, out=sys.stdout) -> None:
    p = lambda s="": print(s, file=out)  # noqa: E731
    print_report(res.scenarios(), subject=SUBJECT, header=header, out=out)
    if res.startup:
        p()
        p("rw-mount start-up seconds per round (not part of any timing above):")
        for tool, secs in res.startup.items():
            p(f"  {tool:<24} " + "  ".join(f"{s:7.2f}" for s in secs))
    p()
    p("goal ratios (median throughput, mountd / rclone; >1x means mountd is faster):")
    for name, what, val in goals(res):
        p(f"  {name:<30} {what:<42} {val}")


def results_json(res: Results, header: dict) -> dict:
    doc = report_dict(res.scenarios(), subject=SUBJECT, header=header)
    doc["rw_mount_startup_seconds"] = res.startup
    doc["goals"] = [{"scenario": s, "what": w, "value": v} for s, w, v in goals(res)]
    return doc


# --- main -----------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_upload",
                                description="Time mountd uploads (after exit, and through a read-write mount) "
                                            "next to rclone copy and rclone mount, against Azurite.")
    p.add_argument("--repeat", type=int, default=3, help="rounds (default 3)")
    p.add_argument("--big-mib", type=int, default=1024, help="size of the checkpoint in MiB (default 1024)")
    p.add_argument("--small-count", type=int, default=400, help="number of output files (default 400)")
    p.add_argument("--small-kib", type=int, default=1024, help="size of each output file in KiB (default 1024)")
    p.add_argument("--write-mib", type=int, default=1024,
                   help="size of the file written through the mounts in MiB (default 1024)")
    p.add_argument("--skip-outputs", action="store_true", help="leave out the many-outputs scenario")
    p.add_argument("--skip-checkpoint", action="store_true", help="leave out the checkpoint scenario")
    p.add_argument("--skip-mount", action="store_true", help="leave out the read-write mount scenario")
    p.add_argument("--tls", action="store_true",
                   help="Azurite over HTTPS (a CA made for the run), every tool over TLS to it")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--tmp-dir", metavar="DIR", help="where the temporary data goes (default: system temp dir)")
    args = p.parse_args(argv)
    if min(args.repeat, args.big_mib, args.small_count, args.small_kib, args.write_mib) < 1:
        p.error("--repeat, --big-mib, --small-count, --small-kib and --write-mib must be positive")
    if args.skip_outputs and args.skip_checkpoint and args.skip_mount:
        p.error("nothing to do with --skip-outputs, --skip-checkpoint and --skip-mount")
    return args


def require(args: argparse.Namespace) -> None:
    needed = ["azurite-blob", "rclone"]
    if not args.skip_mount:
        if os.geteuid() != 0:
            sys.exit("run as root (or with --skip-mount): the benchmark mounts FUSE filesystems")
        needed += ["fusermount3", "dd"]
    missing = [t for t in needed if not shutil.which(t)]
    if missing:
        sys.exit(f"missing on PATH: {', '.join(missing)}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require(args)

    def body(tmp, azurite, keep):
        container = blob_service(azurite).create_container(CONTAINER)
        bench = Bench(args, tmp, azurite, container)
        keep(bench)
        header = {"storage": storage_header(azurite), **machine_info(), "mountd": mountd_header(),
                  "rclone": tool_version(["rclone", "version"], words=2), "rounds": args.repeat}
        bench.prepare()
        settle()
        bench.run()
        header["objects with a stored MD5"] = bench.checker.summary()
        header["times"] = ("wall clock of the whole command (rw-mount: from dd's start), process start-up "
                           "included, mounting excluded; sources in the page cache; median over rounds")
        print()
        print_all(bench.res, header)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results_json(bench.res, header), f, indent=2)
                f.write("\n")
            print(f"\nwrote {args.json}")

    return run_session("mountd-bench-upload-", args.tmp_dir, body, tls=args.tls)


if __name__ == "__main__":
    sys.exit(main())
