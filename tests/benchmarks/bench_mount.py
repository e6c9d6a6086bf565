"""Reading through `mountd mount` next to `rclone mount` (and curl / the
local page cache as references), against one local Azurite.

Five measurements, each run for several rounds with the tools interleaved
inside a round (the order rotates from round to round) so they share the
machine's noise. Every mount is fresh (a new mount, and for the caching modes
a new empty cache directory) and the page cache is dropped (`echo 3 >
/proc/sys/vm/drop_caches`, needs root) before every cold measurement. Only
the reading is timed, never the mounting.

- a  cold sequential read of one --big-mib MiB blob `big/blob.bin` with
     `dd bs=1M` through mountd (defaults, --memory-cache 256MiB), rclone mount
     --vfs-cache-mode off and full, and a single `curl` of its SAS URL into
     /dev/null;
- b  second epoch: the same file read again right after (a) on the same mount
     (no cache drop) through mountd and rclone full, next to a local copy
     read from the page cache (read once to warm, then timed);
- c  --small-count blobs of --small-kib KiB read by 8 threads, each reading a
     disjoint share of the files to the end in 1 MiB reads (bytes checked,
     and a sample of files' MD5 outside the timed part), through mountd and
     rclone mount (off and full);
- d  `ls -l MOUNT/list` of a directory of --list-count tiny blobs on a fresh
     mount (cold first listing), mountd and rclone mount (off); the line
     count is checked;
- e  the mountd mount worker's peak RSS (VmHWM) after the cold read of (a),
     against the memory cache + 150 MiB, and the disk cache's size after it;
     and the CPU each tool spent on the cold read of (a), in seconds per GiB
     (user + system): the mount process's (mountd's worker, rclone), from
     just before dd starts until the process is quiet after dd has ended
     (no clock tick in 0.3 s: what the read left behind, cache writes, is
     counted), and dd's own; for curl, the whole command's.

With --tls, Azurite serves HTTPS alone, with a certificate from a CA made
for the run, and mountd, rclone and curl all talk HTTPS to it trusting that
CA (see common.tool_env; curl with `--proto =https --cacert CA`), as real
Azure storage is HTTPS only; the report's header says which.

Run from the repository root as root (needs azurite-blob, rclone, curl,
fusermount3 on PATH and mountd's dependencies installed; the mountd measured
is the repository's, run as `python -m mountd`):

    python -m tests.benchmarks.bench_mount                          # full size, 3 rounds
    python -m tests.benchmarks.bench_mount --big-mib 128 --small-count 200 --list-count 2000 --repeat 1
    python -m tests.benchmarks.bench_mount --only a,e --json results.json
    python -m tests.benchmarks.bench_mount --tls                    # the same over HTTPS

This is not a pytest test; it prints tables like bench_download (medians,
MiB/s, mountd/tool ratios, every round's raw seconds, how each tool was run),
the memory figures and the ratios the project's goals use; optionally JSON.
Every mount it makes is unmounted at the end, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

from tests.benchmarks.bench_download import (BIG_BLOB, SMALL_PREFIX, mountd_argv, mountd_header, small_name,
                                             stored_md5, upload_big, upload_small)
from tests.benchmarks.common import (
    GiB, MiB, Scenario, ToolFailed, blob_sas_url, children_cpu_seconds, cpu_when_quiet, curl_tls_flags, dd_read,
    dir_bytes, drop_page_cache, file_md5, fmt_size, fresh_dir, is_mounted, machine_info, make_azurite, median,
    mounts_under, parallel_read, print_count_report, print_report, proc_status_bytes, process_cpu_seconds,
    remove_dir, report_dict, run_timed, run_timed_capture, same_edges, settle, storage_header, tool_env,
    tool_version, wait_mounted, write_curl_config, write_rclone_config, write_workspace)
from tests.support.azurite import ACCOUNT, KEY, Azurite, blob_workspace_entry

CONTAINER = "bench"
DATASTORE = "bench"
KEY_ENV = "AZURITE_ACCOUNT_KEY"
RCLONE_REMOTE = "az"
LIST_PREFIX = "list/"
LIST_BLOB = b"123456789\n"  # 10 bytes
MEMORY_CACHE = "256MiB"
MEMORY_CACHE_BYTES = 256 * MiB
# the mountd variants measured, by tool name: their extra mount flags
MOUNTD_FLAGS = {"mountd": (), "mountd-direct": ("--direct-io",), "mountd-strict-open": ("--strict-open",)}
RSS_MARGIN = 150 * MiB
READERS = 8
MD5_SAMPLE = 16  # small files whose content is checked after each timed read
MOUNT_TIMEOUT = 30.0
RUN_TIMEOUT = 3600
LETTERS = "abcde"
MOUNTD_LOGS: set[str] = set()  # the mount workers' log files this run made (removed after a clean run)
# Variables that would change mountd's defaults; the benchmark wants the defaults.
MOUNTD_ENV_PREFIXES = ("DATASET_MOUNT_", "DATASET_RESERVED_", "RSLEX_", "MOUNTD_")


def list_name(i: int) -> str:
    return f"{LIST_PREFIX}e{i:06d}.txt"


def default_disk_cap() -> int:
    try:
        from mountd.config.settings import CacheSettings
        return CacheSettings().max_size
    except Exception:  # noqa: BLE001 - mountd may be mid-edit; its documented default
        return 10 * 1024 * MiB


def mountd_records_dir() -> str:
    if os.environ.get("RUNTIME_DIRECTORY"):
        return os.path.join(os.environ["RUNTIME_DIRECTORY"].split(":")[0], "mounts")
    return "/run/mountd/mounts"


def worker_record(mountpoint: str) -> dict:
    """The record of the mountd worker holding `mountpoint` ("pid", "log", ...)."""
    want = os.path.abspath(mountpoint)
    for path in glob.glob(os.path.join(mountd_records_dir(), "*.json")):
        try:
            with open(path) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            continue
        if os.path.abspath(rec.get("mountpoint", "")) == want and rec.get("pid"):
            return rec
    raise ToolFailed(f"mountd: no record with mountpoint {want} under {mountd_records_dir()}")


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def lazy_unmount(path: str) -> None:
    subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True)


def unmount_all(active: list, tmp: str, workspace: str, env: dict) -> list[str]:
    """Undo every mount in `active` (stopping each) and any other still
    live under `tmp`; returns the mount points that would not go."""
    for m in list(active):
        try:
            m.stop()
        except Exception as e:  # noqa: BLE001 - keep cleaning up
            print(f"warning: stopping {m.tool} at {m.path}: {e}", file=sys.stderr)
        active.remove(m)
    for mp in mounts_under(tmp):
        subprocess.run(mountd_argv() + ["--workspace", workspace, "unmount", "--lazy", mp], env=env,
                       capture_output=True)
        if is_mounted(mp):
            lazy_unmount(mp)
    return mounts_under(tmp)


# --- setup ------------------------------------------------------------------------

def blob_service(azurite: Azurite, pool: int = 32):
    """A client whose connection pool is big enough for `pool` uploading
    threads (trusting the run's CA over HTTPS)."""
    import requests
    from azure.core.pipeline.transport import RequestsTransport
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=pool, pool_maxsize=pool)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    # A transport of our own takes the connection settings the client would have given the SDK's.
    transport = RequestsTransport(session=session, session_owner=False, connection_data_block_size=256 * 1024,
                                  connection_verify=azurite.ca if azurite.tls else True)
    return azurite.blob_service(transport=transport)


def upload_list(container, count: int, threads: int = 32) -> None:
    def one(i: int) -> None:
        container.upload_blob(list_name(i), LIST_BLOB, overwrite=True)

    pool = ThreadPoolExecutor(threads)
    try:
        for _ in pool.map(one, range(count)):
            pass
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


# --- mounts --------------------------------------------------------------------------

class Mount:
    """One live mount of the container at `path`."""
    tool = ""
    path = ""
    pid: int | None = None

    def start(self) -> float:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class MountdMount(Mount):
    def __init__(self, path: str, cache_dir: str, workspace: str, env: dict, tool: str = "mountd",
                 target: str = DATASTORE, flags: tuple | None = None, tree: str | None = None):
        self.tool, self.path, self.cache_dir, self.workspace, self.env = tool, path, cache_dir, workspace, env
        self.tree = tree  # another mountd source tree to run (from its root), or None: this one
        self.target = target  # DATASTORE[:PATH]
        self.flags = tuple(MOUNTD_FLAGS[tool] if flags is None else flags)

    @staticmethod
    def how(cache: str = "EMPTY_DIR", tool: str = "mountd") -> str:
        more = "".join(f" {f}" for f in MOUNTD_FLAGS[tool])
        return (f"mountd mount {DATASTORE} MNT --cache-dir {cache} --memory-cache {MEMORY_CACHE}{more} "
                "(otherwise defaults)")

    def start(self) -> float:
        argv = mountd_argv() + ["--workspace", self.workspace, "mount", self.target, self.path,
                                "--cache-dir", self.cache_dir, "--memory-cache", MEMORY_CACHE] + list(self.flags)
        secs = run_timed(argv, env=self.env, timeout=120, cwd=self.tree)
        rec = worker_record(self.path)
        self.pid = int(rec["pid"])
        if rec.get("log"):
            MOUNTD_LOGS.add(rec["log"])
        return secs

    def stop(self) -> None:
        if not is_mounted(self.path) and not pid_alive(self.pid):
            return
        try:
            run_timed(mountd_argv() + ["--workspace", self.workspace, "unmount", self.path], env=self.env,
                      timeout=90)
        except (ToolFailed, subprocess.TimeoutExpired) as e:
            print(f"warning: mountd unmount {self.path} failed ({e}); detaching lazily", file=sys.stderr)
            lazy_unmount(self.path)
        deadline = time.monotonic() + 30
        while pid_alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(self.pid):
            print(f"warning: mountd worker {self.pid} still runs after unmount; killing it", file=sys.stderr)
            os.kill(self.pid, signal.SIGKILL)


class RcloneMount(Mount):
    def __init__(self, path: str, mode: str, cache_dir: str | None, conf: str, log: str, env: dict):
        self.tool, self.path, self.mode, self.cache_dir, self.conf, self.log, self.env = \
            f"rclone-{mode}", path, mode, cache_dir, conf, log, env
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def how(mode: str) -> str:
        return (f"rclone mount {RCLONE_REMOTE}:{CONTAINER} MNT --config CONF --read-only --vfs-cache-mode {mode}"
                + (" --cache-dir EMPTY_DIR" if mode != "off" else "") + " (otherwise defaults)")

    def start(self) -> float:
        argv = ["rclone", "mount", f"{RCLONE_REMOTE}:{CONTAINER}", self.path, "--config", self.conf,
                "--read-only", "--vfs-cache-mode", self.mode]
        if self.cache_dir:
            argv += ["--cache-dir", self.cache_dir]
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

    def stop(self) -> None:
        if self.proc is None:
            return
        if is_mounted(self.path):
            subprocess.run(["fusermount3", "-u", self.path], capture_output=True)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.terminate()  # rclone unmounts on SIGTERM
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if is_mounted(self.path):
            lazy_unmount(self.path)
        self.proc = None


# --- the benchmark ----------------------------------------------------------------------

@dataclass
class MemoryRound:
    round: int
    vmhwm: int
    vmrss: int
    disk_apparent: int
    disk_allocated: int


@dataclass
class CpuRound:
    """CPU seconds one tool spent on one cold read of (a)."""
    round: int
    tool: str
    nbytes: int  # what was read
    process: float  # the mount process (mountd's worker, rclone), or curl
    reader: float | None  # dd reading through the mount; None for curl


@dataclass
class Results:
    a: Scenario | None = None
    b: Scenario | None = None
    c: Scenario | None = None
    d: Scenario | None = None
    memory: list[MemoryRound] = field(default_factory=list)
    cpu: list[CpuRound] = field(default_factory=list)
    other_hwm: dict[str, list[int]] = field(default_factory=dict)  # the other mounts' VmHWM after the cold read
    startup: dict[str, list[float]] = field(default_factory=dict)  # "scenario tool" -> mount seconds


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: str, azurite: Azurite, only: str):
        self.args, self.tmp, self.azurite, self.only = args, tmp, azurite, only
        self.big_bytes = args.big_mib * MiB
        self.small_bytes = args.small_count * args.small_kib * 1024
        self.conf = os.path.join(tmp, "conf")
        self.mnt_root = os.path.join(tmp, "mnt")
        self.cache_root = os.path.join(tmp, "cache")
        self.logs = os.path.join(tmp, "logs")
        for d in (self.conf, self.mnt_root, self.cache_root, self.logs):
            os.makedirs(d, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(MOUNTD_ENV_PREFIXES)}
        self.env = {**tool_env(azurite, env), KEY_ENV: KEY}
        self.workspace = write_workspace(
            os.path.join(self.conf, "workspace.yaml"),
            {DATASTORE: blob_workspace_entry(azurite, CONTAINER, key_env=KEY_ENV)}, default=DATASTORE)
        self.rclone_conf = write_rclone_config(os.path.join(self.conf, "rclone.conf"), RCLONE_REMOTE,
                                               ACCOUNT, KEY, azurite.account_url)
        self.local_big = os.path.join(tmp, "src", "blob.bin")
        self.small_md5: dict[str, str] = {}
        self.active: list[Mount] = []
        self.res = Results()

    # -- mounting

    @contextmanager
    def mounted(self, tool: str, label: str):
        """A fresh mount (and fresh empty cache dir) for one measurement, always undone."""
        mp = fresh_dir(os.path.join(self.mnt_root, f"{label}-{tool}"))
        cache = None
        if tool in MOUNTD_FLAGS:
            cache = fresh_dir(os.path.join(self.cache_root, f"{label}-{tool}"))
            m: Mount = MountdMount(mp, cache, self.workspace, self.env, tool)
        else:
            mode = tool.split("-", 1)[1]
            if mode != "off":
                cache = fresh_dir(os.path.join(self.cache_root, f"{label}-{tool}"))
            m = RcloneMount(mp, mode, cache, self.rclone_conf, os.path.join(self.logs, f"{label}-{tool}.log"),
                            self.env)
        self.active.append(m)
        try:
            self.res.startup.setdefault(f"{label} {tool}", []).append(m.start())
            yield m, cache
        finally:
            m.stop()
            self.active.remove(m)
            if not is_mounted(mp):
                os.rmdir(mp)
            if cache:
                remove_dir(cache)

    def cleanup(self) -> list[str]:
        return unmount_all(self.active, self.tmp, self.workspace, self.env)

    # -- scenario definitions

    def scenarios(self) -> None:
        big_how = "; drop caches; dd if=MNT/big/blob.bin of=/dev/null bs=1M (timed)"
        if "a" in self.only:
            sc = self.res.a = Scenario("a-cold", 1, self.big_bytes)
            sc.tools = {"mountd": MountdMount.how() + big_how,
                        "mountd-direct": MountdMount.how(tool="mountd-direct") + big_how,
                        "rclone-off": RcloneMount.how("off") + big_how,
                        "rclone-full": RcloneMount.how("full") + big_how,
                        "curl": " ".join(["drop caches; curl -s -S -f", *curl_tls_flags(self.azurite, ca="CA"),
                                          "-K CONF (SAS URL of the blob, output /dev/null)"])}
        if "b" in self.only:
            sc = self.res.b = Scenario("b-epoch2", 1, self.big_bytes)
            again = "the mount of a-cold right after its read, no cache drop; dd if=MNT/big/blob.bin of=/dev/null bs=1M"
            sc.tools = {"mountd": again, "mountd-direct": again, "rclone-full": again,
                        "page-cache": "local copy of the blob; dd of=/dev/null bs=1M once to warm, then timed again"}
        if "c" in self.only:
            sc = self.res.c = Scenario("c-small", self.args.small_count, self.small_bytes)
            how = (f"; drop caches; {READERS} threads, each reading a disjoint 1/{READERS} of MNT/small/* "
                   "to the end in 1 MiB reads (timed)")
            sc.tools = {"mountd": MountdMount.how() + how, "rclone-off": RcloneMount.how("off") + how,
                        "rclone-full": RcloneMount.how("full") + how}
        if "d" in self.only:
            sc = self.res.d = Scenario("d-ls", self.args.list_count, self.args.list_count * len(LIST_BLOB))
            how = "; drop caches; LC_ALL=C ls -l MNT/list (timed; stdout to a pipe, lines counted)"
            sc.tools = {"mountd": MountdMount.how() + how, "rclone-off": RcloneMount.how("off") + how}

    # -- one measurement each

    def big_mount(self, tool: str, r: int) -> None:
        """(a) cold read, then (e) CPU, and memory/cache for mountd, then (b) the second read."""
        res = self.res
        with self.mounted(tool, "big") as (m, cache):
            path = os.path.join(m.path, BIG_BLOB)
            drop_page_cache()
            cpu_before, reader_before = process_cpu_seconds(m.pid), children_cpu_seconds()
            secs, n = dd_read(path, timeout=RUN_TIMEOUT)
            reader_cpu = children_cpu_seconds() - reader_before
            if n != self.big_bytes:
                raise ToolFailed(f"{tool}: read {n} bytes of {BIG_BLOB}, expected {self.big_bytes}")
            if res.a:
                res.a.add(tool, secs)
            self.progress(r, "a-cold", tool, secs, self.big_bytes)
            res.cpu.append(CpuRound(r + 1, tool, n, cpu_when_quiet(m.pid) - cpu_before, reader_cpu))
            if tool == "mountd":
                settle()
                res.memory.append(MemoryRound(r + 1, proc_status_bytes(m.pid, "VmHWM"),
                                              proc_status_bytes(m.pid, "VmRSS"),
                                              dir_bytes(cache), dir_bytes(cache, apparent=False)))
            else:
                res.other_hwm.setdefault(tool, []).append(proc_status_bytes(m.pid, "VmHWM"))
            if res.b and tool in res.b.tools:
                secs, n = dd_read(path, timeout=RUN_TIMEOUT)
                if n != self.big_bytes:
                    raise ToolFailed(f"{tool}: second read got {n} bytes, expected {self.big_bytes}")
                res.b.add(tool, secs)
                self.progress(r, "b-epoch2", tool, secs, self.big_bytes)
            if not same_edges(path, self.local_big):
                raise ToolFailed(f"{tool}: size or first/last MiB of {BIG_BLOB} differ from the source")

    def big_curl(self, r: int) -> None:
        url = blob_sas_url(self.azurite.account_url, ACCOUNT, KEY, CONTAINER, BIG_BLOB)
        cfg = write_curl_config(os.path.join(self.conf, "big.curlrc"), [(url, "/dev/null")])
        drop_page_cache()
        cpu_before = children_cpu_seconds()
        secs, out = run_timed_capture(["curl", "-s", "-S", "-f", *curl_tls_flags(self.azurite), "-K", cfg,
                                       "-w", "%{size_download}"], timeout=RUN_TIMEOUT)
        cpu = children_cpu_seconds() - cpu_before
        if int(float(out.decode().strip() or 0)) != self.big_bytes:
            raise ToolFailed(f"curl: downloaded {out.decode().strip()} bytes, expected {self.big_bytes}")
        self.res.a.add("curl", secs)
        self.progress(r, "a-cold", "curl", secs, self.big_bytes)
        self.res.cpu.append(CpuRound(r + 1, "curl", self.big_bytes, cpu, None))

    def big_local(self, r: int) -> None:
        dd_read(self.local_big)  # warm
        secs, n = dd_read(self.local_big)
        if n != self.big_bytes:
            raise ToolFailed(f"page-cache: read {n} bytes, expected {self.big_bytes}")
        self.res.b.add("page-cache", secs)
        self.progress(r, "b-epoch2", "page-cache", secs, self.big_bytes)

    def small(self, tool: str, r: int) -> None:
        with self.mounted(tool, "small") as (m, _):
            names = sorted(self.small_md5)
            paths = [os.path.join(m.path, name) for name in names]
            drop_page_cache()
            secs, n = parallel_read(paths, READERS)
            if n != self.small_bytes:
                raise ToolFailed(f"{tool}: {READERS} readers read {n} bytes, expected {self.small_bytes}")
            step = max(1, len(names) // MD5_SAMPLE)
            for name in names[::step]:
                if file_md5(os.path.join(m.path, name)) != self.small_md5[name]:
                    raise ToolFailed(f"{tool}: {name} differs from the source")
            self.res.c.add(tool, secs)
            self.progress(r, "c-small", tool, secs, self.small_bytes)

    def listing(self, tool: str, r: int) -> None:
        with self.mounted(tool, "list") as (m, _):
            drop_page_cache()
            secs, out = run_timed_capture(["ls", "-l", os.path.join(m.path, LIST_PREFIX.rstrip("/"))],
                                          env={**os.environ, "LC_ALL": "C"}, timeout=RUN_TIMEOUT)
            lines = out.decode(errors="replace").splitlines()
            want = self.args.list_count + 1
            if len(lines) != want or not lines[0].startswith("total"):
                raise ToolFailed(f"{tool}: ls -l printed {len(lines)} lines, expected {want} (with 'total')")
            self.res.d.add(tool, secs)
            print(f"round {r + 1}/{self.args.repeat}  {'d-ls':<9} {tool:<12} {secs:8.2f} s "
                  f"{self.args.list_count / secs:9.0f} entries/s", flush=True)

    def progress(self, r: int, name: str, tool: str, secs: float, nbytes: int) -> None:
        print(f"round {r + 1}/{self.args.repeat}  {name:<9} {tool:<12} {secs:8.2f} s "
              f"{nbytes / MiB / secs:9.1f} MiB/s", flush=True)

    # -- rounds

    def plan(self) -> list[list[Callable[[int], None]]]:
        """Per phase, the tools' measurements; each phase's order rotates per round."""
        only, phases = self.only, []
        big: list[Callable[[int], None]] = []
        if only & set("abe"):
            big.append(lambda r: self.big_mount("mountd", r))
        if only & set("ab"):
            big.append(lambda r: self.big_mount("mountd-direct", r))
            big.append(lambda r: self.big_mount("rclone-full", r))
        if "a" in only:
            big.append(lambda r: self.big_mount("rclone-off", r))
            big.append(self.big_curl)
        if "b" in only:
            big.append(self.big_local)
        if big:
            phases.append(big)
        if "c" in only:
            phases.append([lambda r, t=t: self.small(t, r) for t in ("mountd", "rclone-off", "rclone-full")])
        if "d" in only:
            phases.append([lambda r, t=t: self.listing(t, r) for t in ("mountd", "rclone-off")])
        return phases

    def run(self) -> None:
        phases = self.plan()
        for r in range(self.args.repeat):
            for tools in phases:
                shift = r % len(tools)
                for run in tools[shift:] + tools[:shift]:
                    settle()
                    run(r)


# --- report -----------------------------------------------------------------------------

def ratio(x: float, y: float) -> float:
    return x / y if y else float("nan")


def cpu_per_gib(res: Results) -> dict[str, dict[str, object]]:
    """Per tool of (e), in the order first measured: the median over rounds
    of the CPU seconds per GiB of its process ("process"), of dd ("reader",
    None for curl), of both ("total"), and each round's process figure."""
    out: dict[str, dict[str, object]] = {}
    for tool in dict.fromkeys(c.tool for c in res.cpu):
        rounds = [c for c in res.cpu if c.tool == tool]
        proc = [c.process * GiB / c.nbytes for c in rounds]
        readers = [c.reader * GiB / c.nbytes for c in rounds if c.reader is not None]
        out[tool] = {"process": median(proc), "reader": median(readers) if readers else None,
                     "total": median([(c.process + (c.reader or 0)) * GiB / c.nbytes for c in rounds]),
                     "rounds": proc}
    return out


def goals(res: Results) -> list[tuple[str, str, str]]:
    """(scenario, what, value) rows of the ratios the project's goals use."""
    rows = []
    if res.a:
        a = res.a
        rows.append(("(a) cold big read", "mountd / curl throughput",
                     f"{ratio(a.median_rate('mountd'), a.median_rate('curl')):.2f}x"))
        rows.append(("", "  the same, median of per-round ratios", f"{a.paired_ratio('mountd', 'curl'):.2f}x"))
        for t in ("rclone-off", "rclone-full"):
            rows.append(("", f"mountd / {t} throughput", f"{ratio(a.median_rate('mountd'), a.median_rate(t)):.2f}x"))
        rows.append(("", "mountd --direct-io / curl throughput",
                     f"{ratio(a.median_rate('mountd-direct'), a.median_rate('curl')):.2f}x"))
        rows.append(("", "  the same, median of per-round ratios", f"{a.paired_ratio('mountd-direct', 'curl'):.2f}x"))
    if res.b:
        b = res.b
        rows.append(("(b) second epoch", "mountd 2nd / local page cache",
                     f"{ratio(b.median_rate('mountd'), b.median_rate('page-cache')):.2f}x"))
        rows.append(("", "mountd 2nd / rclone-full 2nd",
                     f"{ratio(b.median_rate('mountd'), b.median_rate('rclone-full')):.2f}x"))
        rows.append(("", "  the same, median of per-round ratios", f"{b.paired_ratio('mountd', 'rclone-full'):.2f}x"))
        rows.append(("", "mountd --direct-io 2nd / rclone-full 2nd",
                     f"{ratio(b.median_rate('mountd-direct'), b.median_rate('rclone-full')):.2f}x"))
    if res.c:
        c = res.c
        for i, t in enumerate(("rclone-off", "rclone-full")):
            rows.append(("(c) small files, 8 readers" if i == 0 else "", f"mountd / {t} throughput",
                         f"{ratio(c.median_rate('mountd'), c.median_rate(t)):.2f}x"))
    if res.d:
        d = res.d
        rows.append(("(d) ls -l, cold", "rclone-off s / mountd s",
                     f"{ratio(d.median_seconds('rclone-off'), d.median_seconds('mountd')):.2f}x"))
    if res.memory:
        peak = max(m.vmhwm for m in res.memory)
        limit = MEMORY_CACHE_BYTES + RSS_MARGIN
        rows.append(("(e) worker peak RSS", f"max VmHWM vs memory cache + {RSS_MARGIN // MiB} MiB",
                     f"{peak / MiB:.0f} / {limit / MiB:.0f} MiB ({'ok' if peak <= limit else 'OVER'})"))
    cpu = cpu_per_gib(res)
    if "curl" in cpu:
        first = True
        for t in (t for t in MOUNTD_FLAGS if t in cpu):
            rows.append(("(e) CPU per cold GiB" if first else "", f"curl s / {t} worker s",
                         f"{ratio(cpu['curl']['process'], cpu[t]['process']):.2f}x "
                         f"({cpu['curl']['process']:.2f} / {cpu[t]['process']:.2f} s)"))
            first = False
    return rows


def print_memory(res: Results, disk_cap: int, out=sys.stdout) -> None:
    p = lambda s="": print(s, file=out)  # noqa: E731
    limit = MEMORY_CACHE_BYTES + RSS_MARGIN
    p(f"(e) mountd mount worker after the cold read of a-cold (--memory-cache {MEMORY_CACHE}; "
      f"target VmHWM <= {limit // MiB} MiB):")
    p(f"  {'round':<6} {'VmHWM MiB':>10} {'VmRSS MiB':>10} {'disk cache MiB (du -sb)':>24} "
      f"{'allocated MiB':>14} {'disk cap':>10}")
    for m in res.memory:
        p(f"  {m.round:<6} {m.vmhwm / MiB:>10.1f} {m.vmrss / MiB:>10.1f} {m.disk_apparent / MiB:>24.1f} "
          f"{m.disk_allocated / MiB:>14.1f} {fmt_size(disk_cap):>10}")
    peak = max(m.vmhwm for m in res.memory)
    verdict = (f"within the target ({(limit - peak) / MiB:.0f} MiB to spare)" if peak <= limit
               else f"OVER the target by {(peak - limit) / MiB:.0f} MiB")
    p(f"  max VmHWM {peak / MiB:.1f} MiB: {verdict}")
    if res.other_hwm:
        p("  for comparison, VmHWM of the other mounts after the same read (median): " + ", ".join(
            f"{t} {sorted(v)[len(v) // 2] / MiB:.0f} MiB" for t, v in res.other_hwm.items()))


def print_cpu(res: Results, out=sys.stdout) -> None:
    p = lambda s="": print(s, file=out)  # noqa: E731
    cpu = cpu_per_gib(res)
    tw = max([14] + [len(t) for t in cpu])
    p("(e) CPU seconds per GiB of the cold read of a-cold (user + system, median over rounds): the mount "
      "process (mountd's worker, rclone) from dd's start until it is quiet after dd, and dd; curl's whole command:")
    p(f"  {'tool':<{tw}} {'process':>8} {'dd':>6} {'total':>6}   process, each round")
    for tool, c in cpu.items():
        reader = "-" if c["reader"] is None else f"{c['reader']:.2f}"
        p(f"  {tool:<{tw}} {c['process']:>8.2f} {reader:>6} {c['total']:>6.2f}   "
          + "  ".join(f"{v:.2f}" for v in c["rounds"]))


def print_all(res: Results, header: dict, disk_cap: int, out=sys.stdout) -> None:
    p = lambda s="": print(s, file=out)  # noqa: E731
    byte_scenarios = [sc for sc in (res.a, res.b, res.c) if sc]
    if byte_scenarios:
        print_report(byte_scenarios, subject="mountd", header=header, out=out)
    else:
        for k, v in header.items():
            p(f"{k}: {v}")
    if res.d:
        p()
        print_count_report([res.d], subject="mountd", unit="entries", out=out)
    if res.memory:
        p()
        print_memory(res, disk_cap, out)
    if res.cpu:
        p()
        print_cpu(res, out)
    if res.startup:
        p()
        p("mount start-up seconds per round (not part of any timing above):")
        for k, v in res.startup.items():
            p(f"  {k:<24} " + "  ".join(f"{s:7.2f}" for s in v))
    p()
    p("goal ratios (medians; >1x means mountd is better):")
    for sc, what, val in goals(res):
        p(f"  {sc:<28} {what:<40} {val}")


def results_json(res: Results, header: dict, disk_cap: int) -> dict:
    scenarios = [sc for sc in (res.a, res.b, res.c, res.d) if sc]
    doc = report_dict(scenarios, subject="mountd", header=header)
    for d in doc["scenarios"]:
        if res.d and d["name"] == res.d.name:
            d["median_entries_per_s"] = {t: res.d.files / res.d.median_seconds(t) for t in res.d.seconds}
    doc["memory"] = {"memory_cache_bytes": MEMORY_CACHE_BYTES, "vmhwm_limit_bytes": MEMORY_CACHE_BYTES + RSS_MARGIN,
                     "disk_cap_bytes": disk_cap, "rounds": [m.__dict__ for m in res.memory],
                     "other_vmhwm_bytes": res.other_hwm}
    doc["cpu"] = {"rounds": [c.__dict__ for c in res.cpu], "median_seconds_per_gib": cpu_per_gib(res)}
    doc["mount_startup_seconds"] = res.startup
    doc["goals"] = [{"scenario": s, "what": w, "value": v} for s, w, v in goals(res)]
    return doc


# --- main ---------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_mount",
                                description="Time reads through mountd mount next to rclone mount, curl and the "
                                            "page cache, against Azurite.")
    p.add_argument("--repeat", type=int, default=3, help="rounds (default 3)")
    p.add_argument("--big-mib", type=int, default=1024, help="size of the big blob in MiB (default 1024)")
    p.add_argument("--small-count", type=int, default=2000, help="number of small blobs (default 2000)")
    p.add_argument("--small-kib", type=int, default=256, help="size of each small blob in KiB (default 256)")
    p.add_argument("--list-count", type=int, default=20000, help="blobs in the listed directory (default 20000)")
    p.add_argument("--only", default=",".join(LETTERS), metavar="a,b,c,d,e",
                   help="measurements to run (default all); b and e need a's cold read, which then runs for "
                        "the tools they use")
    p.add_argument("--tls", action="store_true",
                   help="Azurite over HTTPS (a CA made for the run), every tool over TLS to it")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--tmp-dir", metavar="DIR", help="where the temporary data goes (default: system temp dir)")
    args = p.parse_args(argv)
    if min(args.repeat, args.big_mib, args.small_count, args.small_kib, args.list_count) < 1:
        p.error("--repeat, --big-mib, --small-count, --small-kib and --list-count must be positive")
    letters = {x.strip().lower() for x in args.only.split(",") if x.strip()}
    if not letters or letters - set(LETTERS):
        p.error(f"--only takes letters from {','.join(LETTERS)}, got {args.only!r}")
    args.only = letters
    return args


def require() -> None:
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark drops the page cache and mounts FUSE filesystems")
    missing = [t for t in ("azurite-blob", "rclone", "curl", "fusermount3", "dd", "du", "ls") if not shutil.which(t)]
    if missing:
        sys.exit(f"missing on PATH: {', '.join(missing)}")


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def run_session(tmp_prefix: str, tmp_dir: str | None, body, tls: bool = False) -> int:
    """One benchmark run against an Azurite of its own (over HTTPS with
    `tls`, see common.make_azurite) in a fresh temporary directory:
    `body(tmp, azurite, keep)` does the work, calling `keep(bench)` as soon
    as it has something whose `cleanup()` unmounts what it mounted.
    Failures, Ctrl-C and SIGTERM end in the same clean-up; returns the exit
    code."""
    signal.signal(signal.SIGTERM, _sigterm)
    tmp = tempfile.mkdtemp(prefix=tmp_prefix, dir=tmp_dir)
    held = []
    leftover: list[str] = []
    ok = False
    azurite = None
    try:
        azurite = make_azurite(tmp, tls)
        print(f"starting Azurite{' (HTTPS)' if tls else ''}, data under {tmp}", flush=True)
        azurite.start()
        body(tmp, azurite, held.append)
        ok = True
        return 0
    except ToolFailed as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        if MOUNTD_LOGS:
            print("mountd worker logs: " + ", ".join(sorted(MOUNTD_LOGS)), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the clean-up finish
        try:
            leftover = held[0].cleanup() if held else mounts_under(tmp)
        finally:
            if azurite is not None:
                azurite.stop()
            if leftover:
                print(f"WARNING: still mounted, left {tmp} in place: {', '.join(leftover)}", file=sys.stderr)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
            if ok and not leftover:
                for log in MOUNTD_LOGS:
                    try:
                        os.unlink(log)
                    except OSError:
                        pass
            signal.signal(signal.SIGINT, signal.default_int_handler)
            with open("/proc/mounts") as f:
                ours = [line.split()[1] for line in f if tmp in line]
            if ours:
                print(f"WARNING: /proc/mounts still lists {ours}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require()

    def body(tmp, azurite, keep):
        os.makedirs(os.path.join(tmp, "src"), exist_ok=True)
        container = blob_service(azurite).create_container(CONTAINER)
        bench = Bench(args, tmp, azurite, args.only)
        keep(bench)
        header = {"storage": storage_header(azurite), **machine_info(), "mountd": mountd_header(),
                  "rclone": tool_version(["rclone", "version"], words=2),
                  "curl": tool_version(["curl", "--version"]), "rounds": args.repeat,
                  "measurements": ",".join(sorted(args.only))}
        if args.only & set("abe"):
            print(f"uploading {BIG_BLOB} ({args.big_mib} MiB)", flush=True)
            upload_big(container, bench.local_big, args.big_mib)
            header["big blob has a stored MD5"] = stored_md5(container, BIG_BLOB)
        if "c" in args.only:
            print(f"uploading {args.small_count} x {args.small_kib} KiB under {SMALL_PREFIX}", flush=True)
            bench.small_md5 = upload_small(container, args.small_count, args.small_kib, threads=32)
            header["small blobs have a stored MD5"] = stored_md5(container, small_name(0))
        if "d" in args.only:
            start = time.perf_counter()
            print(f"uploading {args.list_count} x {len(LIST_BLOB)} B under {LIST_PREFIX} (32 threads)", flush=True)
            upload_list(container, args.list_count)
            print(f"  took {time.perf_counter() - start:.0f} s", flush=True)
        bench.scenarios()
        settle()
        bench.run()
        header["times"] = ("wall clock of the read only (dd / 8 reader threads / ls / curl command), mount "
                           "start-up excluded; page cache dropped before every cold read; median over rounds")
        disk_cap = default_disk_cap()
        print()
        print_all(bench.res, header, disk_cap)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results_json(bench.res, header, disk_cap), f, indent=2)
                f.write("\n")
            print(f"\nwrote {args.json}")

    return run_session("mountd-bench-mount-", args.tmp_dir, body, tls=args.tls)


if __name__ == "__main__":
    sys.exit(main())
