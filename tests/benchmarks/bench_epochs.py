"""Whole training jobs: the time to finish E epochs over a dataset in Azurite,
with the data staged by `mountd download` first, read through `mountd mount`
without and with `--prefetch`, and through `rclone mount --vfs-cache-mode
full`, side by side in one run.

A job here is what a PyTorch DataLoader over an ImageFolder does, without
torch: 4 loader processes (multiprocessing) read whole files, in a new
shuffled order every epoch. Every file read in every epoch is checked
against the size and CRC-32 recorded at upload (outside nothing: the check
is part of the job, as decoding would be). Two datasets:

- small: --files files (default 20 000) of --size-kib KiB on average
  (default 110; each file between half and 1.5 times that) under 50 class
  directories, `small/classNN/imgNNNNNN.jpg`;
- shards: --shards files (default 16) of --shard-mib MiB (default 64),
  `shards/shard-NN.bin`.

For each tool a round starts with the page cache dropped and a fresh mount
and cache directory (or an empty download directory), then times: the set-up
(the download; the mount command until it returns), and epochs 1, 2 and 3.
The time to finish E epochs is extrapolated as the issue does it:
set-up + epoch 1 + (E - 1) x the mean of epochs 2 and 3. Tools rotate their
order from round to round; medians over --repeat rounds. Ratios are the
download-then-train time over the tool's (above 1: the tool finishes first),
and for later epochs the local copy's (page cache warm) epoch time over the
tool's.

Where the time goes: around every phase (set-up, each epoch) the run reads
the CPU seconds (user + system) of each group of processes: Azurite; the
tool's own (`mountd download`, or the `mountd mount` command and the mount
worker it leaves running, or rclone); the loaders; and the whole host, so
that what the rest of a shared machine took meanwhile shows as "rest". The
CPU table gives them per phase with busy = the run's own CPU over wall
time (2.00: both cores of this machine busy all along) and the tool's CPU
per file. With --step-ms MS, the job also trains: each sample takes the
accelerator MS ms, in the order samples arrive, each as soon as the
accelerator is free (the loaders are not held back; an epoch ends when the
last sample is trained on). The accelerator is modelled, not run: its time
costs this machine's cores nothing, as a GPU's costs a node's CPU nothing,
so the figure shows how much of the data's fetching a tool hides behind
training. With --py-spy DIR, py-spy samples mountd (200 Hz, raw format, one
file per job) from the mount's start to the end of epoch 1, or the whole
download; such a run's CPU figures include py-spy's own.

Run from the repository root as root (drops the page cache, mounts FUSE):

    python -m tests.benchmarks.bench_epochs                                 # both datasets, full size, 3 rounds
    python -m tests.benchmarks.bench_epochs --dataset small --files 2000 --repeat 3
    python -m tests.benchmarks.bench_epochs --dataset shards --shards 8 --shard-mib 32
    python -m tests.benchmarks.bench_epochs --cache-max-size 100MiB         # mountd's disk cache smaller than the data
    python -m tests.benchmarks.bench_epochs --dataset small --files 2000 --step-ms 1   # and a training step per sample
    python -m tests.benchmarks.bench_epochs --tools download,mountd-prefetch --baseline /tmp/before  # another tree
    python -m tests.benchmarks.bench_epochs --dataset small --files 1000 --repeat 1 --py-spy /tmp/prof

Every mount it makes is unmounted at the end, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tests.benchmarks.bench_download import mountd_argv, mountd_header
from tests.benchmarks.bench_mount import (CONTAINER, DATASTORE, KEY_ENV, MEMORY_CACHE, MOUNTD_ENV_PREFIXES,
                                          RCLONE_REMOTE, MountdMount, RcloneMount, blob_service,
                                          is_mounted, require, run_session, unmount_all)
from tests.benchmarks.common import (MiB, ToolFailed, children_cpu_split, drop_page_cache, fmt_size, fresh_dir,
                                     host_cpu_seconds, machine_info, median, process_cpu_split, remove_dir,
                                     run_timed, storage_header, tool_env, tool_version, write_rclone_config,
                                     write_workspace)
from tests.support.azurite import ACCOUNT, KEY, blob_workspace_entry

TOOLS = ("download", "mountd", "mountd-prefetch", "rclone-full")
BASELINE_TOOLS = ("mountd-base", "mountd-prefetch-base")  # with --baseline DIR: the mounts of that tree
LOADERS = 4
CLASSES = 50
READ_SIZE = MiB  # a loader reads a file in pieces of this size (a small file in one)
EPOCHS_TIMED = 3
EPOCHS_SHOWN = (1, 2, 5, 10)
PHASES = ("set-up", "ep 1", "ep 2", "ep 3")
GROUPS = ("azurite", "tool", "loaders")  # the run's own process groups; "rest" is the host's remainder
PY_SPY = ["py-spy", "record", "-r", "200", "-f", "raw", "--nonblocking"]


# --- the loaders ----------------------------------------------------------------------

def _loader_start() -> None:
    """A loader process leaves Ctrl-C and SIGTERM to the benchmark, which
    cleans up and then ends the loaders itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _load(path: str) -> tuple[str, int, int]:
    """One sample: the whole file, as a loader process reads it; (path, size, CRC-32)."""
    crc = size = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(READ_SIZE):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return path, size, crc


def run_epoch(pool, root: str, expected: dict[str, tuple[int, int]], seed: int, step: float = 0.0) -> float:
    """Read every file under `root` once in a shuffled order with the loader
    pool; the seconds the epoch took: until the last sample arrived, or with
    a training `step` (seconds of the accelerator per sample), until the
    accelerator has trained on the last one, taking samples in the order
    they arrive, each as soon as it is free. Raises ToolFailed on a wrong
    file."""
    names = sorted(expected)
    random.Random(seed).shuffle(names)
    paths = [os.path.join(root, n) for n in names]
    chunk = 8 if len(paths) >= 400 else 1
    start = time.perf_counter()
    results, trained = [], start  # trained: when the accelerator is done with the samples so far
    for result in pool.imap_unordered(_load, paths, chunksize=chunk):
        results.append(result)
        trained = max(trained, time.perf_counter()) + step
    secs = max(trained, time.perf_counter()) - start
    for path, size, crc in results:
        want = expected[os.path.relpath(path, root)]
        if (size, crc) != want:
            raise ToolFailed(f"{path}: read {size} bytes with CRC {crc:08x}, expected {want[0]} bytes, {want[1]:08x}")
    if len(results) != len(expected):
        raise ToolFailed(f"{root}: {len(results)} files read, expected {len(expected)}")
    return secs


# --- data ----------------------------------------------------------------------------------

@dataclass
class Dataset:
    name: str  # the prefix in the container, without "/"
    files: dict[str, tuple[int, int]]  # path under the prefix -> (size, CRC-32)

    @property
    def nbytes(self) -> int:
        return sum(size for size, _ in self.files.values())


def upload_dataset(container, name: str, sizes: list[int], names: list[str], threads: int = 32) -> Dataset:
    def one(i: int) -> tuple[str, tuple[int, int]]:
        data = random.Random(i).randbytes(sizes[i])
        container.upload_blob(f"{name}/{names[i]}", data, overwrite=True)
        return names[i], (len(data), zlib.crc32(data))

    with ThreadPoolExecutor(threads) as pool:
        return Dataset(name, dict(pool.map(one, range(len(sizes)))))


def small_dataset(container, files: int, size_kib: int) -> Dataset:
    rng = random.Random(20)
    sizes = [rng.randrange(size_kib * 512, size_kib * 1536) for _ in range(files)]
    names = [f"class{i % CLASSES:02d}/img{i:06d}.jpg" for i in range(files)]
    return upload_dataset(container, "small", sizes, names)


def shard_dataset(container, shards: int, shard_mib: int) -> Dataset:
    return upload_dataset(container, "shards", [shard_mib * MiB] * shards,
                          [f"shard-{i:02d}.bin" for i in range(shards)], threads=4)


# --- one tool's job -----------------------------------------------------------------------

def _cpu(pid: int | None) -> float:
    """A live process's CPU seconds so far; 0 for none, or one gone."""
    return sum(_cpu_split(pid))


def _cpu_split(pid: int | None) -> tuple[float, float]:
    """_cpu as (user, system) seconds."""
    try:
        return process_cpu_split(pid) if pid else (0.0, 0.0)
    except (OSError, ValueError, IndexError):
        return 0.0, 0.0


@dataclass
class Job:
    tool: str
    round: int
    setup: float
    epochs: list[float]
    cpu: list[dict[str, float]] = field(default_factory=list)  # per phase: wall and CPU seconds per group, "rest"

    def cpu_of(self, phases: slice) -> dict[str, float]:
        """The CPU figures of some phases added up."""
        rows = self.cpu[phases]
        return {k: sum(r[k] for r in rows) for k in rows[0]}

    def total(self, e: int) -> float:
        """Seconds to finish `e` epochs: set-up, epoch 1, then later epochs
        at the mean of the measured ones after the first."""
        later = sum(self.epochs[1:]) / len(self.epochs[1:])
        return self.setup + self.epochs[0] + (e - 1) * later

    @property
    def later(self) -> float:
        return sum(self.epochs[1:]) / len(self.epochs[1:])


@dataclass
class Results:
    dataset: str
    nfiles: int
    nbytes: int
    jobs: list[Job] = field(default_factory=list)

    def of(self, tool: str) -> list[Job]:
        return [j for j in self.jobs if j.tool == tool]

    def med(self, tool: str, what) -> float:
        return median([what(j) for j in self.of(tool)])


class Bench:
    def __init__(self, args, tmp: str, azurite):
        self.args, self.tmp = args, tmp
        self.conf = fresh_dir(os.path.join(tmp, "conf"))
        self.work = fresh_dir(os.path.join(tmp, "work"))
        env = {k: v for k, v in os.environ.items() if not k.startswith(MOUNTD_ENV_PREFIXES)}
        self.env = {**tool_env(azurite, env), KEY_ENV: KEY}
        self.workspace = write_workspace(os.path.join(self.conf, "workspace.yaml"),
                                         {DATASTORE: blob_workspace_entry(azurite, CONTAINER, key_env=KEY_ENV)},
                                         default=DATASTORE)
        self.rclone_conf = write_rclone_config(os.path.join(self.conf, "rclone.conf"), RCLONE_REMOTE, ACCOUNT, KEY,
                                               azurite.account_url)
        self.azurite = azurite
        self.active: list = []
        self.pool = multiprocessing.get_context("fork").Pool(LOADERS, initializer=_loader_start)

    def cleanup(self) -> list[str]:
        self.pool.terminate()
        return unmount_all(self.active, self.tmp, self.workspace, self.env)

    def mountd_flags(self, tool: str) -> tuple:
        flags = ("--prefetch",) if tool.startswith("mountd-prefetch") else ()
        return flags + (("--cache-max-size", self.args.cache_max_size) if self.args.cache_max_size else ())

    def cpu_now(self, m) -> dict[str, float]:
        """Cumulative CPU seconds so far: of Azurite, of the tool (the
        commands this process ran and reaped: the download, the mount
        command; plus the live mount worker or rclone), of the loaders, and of
        the whole host; and the wall clock."""
        (cu, cs), (pu, ps) = children_cpu_split(), _cpu_split(getattr(m, "pid", None))
        return {"wall": time.perf_counter(), "azurite": _cpu(self.azurite.proc.pid), "tool": cu + cs + pu + ps,
                "tool sys": cs + ps, "loaders": sum(_cpu(p.pid) for p in multiprocessing.active_children()),
                "host": host_cpu_seconds()}

    @staticmethod
    def cpu_phase(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        d = {k: after[k] - before[k] for k in after}
        d["rest"] = max(0.0, d.pop("host") - sum(d[g] for g in GROUPS))
        return d

    def spy(self, label: str, pid: int | None = None) -> list[str]:
        """py-spy's command recording `pid` (or, with no pid, the command
        appended to it) into the --py-spy directory; [] without --py-spy."""
        if not self.args.py_spy:
            return []
        out = os.path.join(self.args.py_spy, f"{label}.txt")
        return PY_SPY + ["-o", out] + (["-p", str(pid)] if pid else ["--"])

    def how(self, tool: str, ds: str) -> str:
        if tool == "download":
            return f"mountd download {DATASTORE} DIR --prefix {ds}/ --no-progress, then epochs over DIR/{ds}"
        if tool == "rclone-full":
            return RcloneMount.how("full") + f"; epochs over MNT/{ds}"
        return (f"mountd mount {DATASTORE}:{ds} MNT --cache-dir EMPTY_DIR --memory-cache {MEMORY_CACHE} "
                + " ".join(self.mountd_flags(tool)) + " (otherwise defaults); epochs over MNT"
                + (f"; the tree {self.args.baseline}" if tool.endswith("-base") else ""))

    def job(self, tool: str, ds: Dataset, r: int) -> Job:
        """One tool's whole job on a cold node: set-up, then the epochs."""
        label = f"{ds.name}-{tool}-{r}"
        mp = cache = None
        m = spy = None
        drop_page_cache()
        marks = [self.cpu_now(None)]
        try:
            if tool == "download":
                local = fresh_dir(os.path.join(self.work, label))
                argv = mountd_argv() + ["--workspace", self.workspace, "download", DATASTORE, local,
                                        "--prefix", f"{ds.name}/", "--no-progress"]
                setup = run_timed(self.spy(label) + argv, env=self.env, timeout=3600)
                root = os.path.join(local, ds.name)
            else:
                mp = fresh_dir(os.path.join(self.work, f"mnt-{label}"))
                cache = fresh_dir(os.path.join(self.work, f"cache-{label}"))
                if tool == "rclone-full":
                    m = RcloneMount(mp, "full", cache, self.rclone_conf, os.path.join(self.work, f"{label}.log"),
                                    self.env)
                    root = os.path.join(mp, ds.name)
                else:
                    m = MountdMount(mp, cache, self.workspace, self.env, tool, target=f"{DATASTORE}:{ds.name}",
                                    flags=self.mountd_flags(tool),
                                    tree=self.args.baseline if tool.endswith("-base") else None)
                    root = mp
                self.active.append(m)
                setup = m.start()
                if tool != "rclone-full" and self.spy(label, m.pid):
                    spy = subprocess.Popen(self.spy(label, m.pid), stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL)
            marks.append(self.cpu_now(m))
            epochs = []
            for e in range(EPOCHS_TIMED):
                epochs.append(run_epoch(self.pool, root, ds.files, seed=1000 * r + e, step=self.args.step_ms / 1000))
                if spy is not None:  # epoch 1 profiled: py-spy writes its samples on SIGINT (its CPU in epoch 1's)
                    spy.send_signal(signal.SIGINT)
                    spy.wait(60)
                    spy = None
                marks.append(self.cpu_now(m))
        finally:
            if spy is not None:
                spy.kill()
                spy.wait()
            if m is not None:
                m.stop()
                self.active.remove(m)
                if mp and not is_mounted(mp):
                    os.rmdir(mp)
            for d in (cache, os.path.join(self.work, label)):
                if d:
                    remove_dir(d)
        job = Job(tool, r, setup, epochs, [self.cpu_phase(a, b) for a, b in zip(marks, marks[1:])])
        print(f"  round {r} {tool:20s} set-up {setup:7.2f} s, epochs " + ", ".join(f"{e:.2f}" for e in epochs)
              + f" s; {EPOCHS_SHOWN[-1]} epochs {job.total(EPOCHS_SHOWN[-1]):.1f} s", flush=True)
        print("    CPU s (" + "/".join(GROUPS + ("rest",)) + "): " + ", ".join(
            f"{name} " + "/".join(f"{c[g]:.2f}" for g in GROUPS + ("rest",)) for name, c in zip(PHASES, job.cpu)),
            flush=True)
        return job

    def run(self, ds: Dataset) -> Results:
        res = Results(ds.name, len(ds.files), ds.nbytes)
        print(f"dataset {ds.name}: {len(ds.files)} files, {fmt_size(ds.nbytes)}", flush=True)
        tools = [t for t in TOOLS + BASELINE_TOOLS if t in self.args.tools]
        for r in range(self.args.repeat):
            order = tools[r % len(tools):] + tools[:r % len(tools)]
            for tool in order:
                res.jobs.append(self.job(tool, ds, r))
        return res


# --- report -----------------------------------------------------------------------------

def ratio(x: float, y: float) -> float:
    return x / y if y > 0 else float("nan")


def report(res: Results, bench: Bench, out=sys.stdout) -> dict:
    p = lambda *a: print(*a, file=out)  # noqa: E731
    tools = [t for t in TOOLS + BASELINE_TOOLS if res.of(t)]
    p(f"\n== {res.dataset}: {res.nfiles} files, {fmt_size(res.nbytes)}; {LOADERS} loader processes, shuffled "
      f"whole-file reads, every file's size and CRC-32 checked; medians of {len(res.of(tools[0]))} round(s)"
      + (f"; a training step of {bench.args.step_ms:g} ms per sample (modelled)" if bench.args.step_ms else ""))
    head = "".join(f"{'E=' + str(e):>9s}" for e in EPOCHS_SHOWN)
    p(f"{'tool':21s}{'set-up':>8s}{'ep 1':>8s}{'ep 2':>8s}{'ep 3':>8s} |{head}   (seconds to finish E epochs)")
    summary = {"dataset": res.dataset, "files": res.nfiles, "bytes": res.nbytes, "tools": {}}
    for t in tools:
        e = [res.med(t, lambda j, i=i: j.epochs[i]) for i in range(EPOCHS_TIMED)]
        totals = [res.med(t, lambda j, k=k: j.total(k)) for k in EPOCHS_SHOWN]
        p(f"{t:21s}{res.med(t, lambda j: j.setup):8.2f}" + "".join(f"{x:8.2f}" for x in e) + " |"
          + "".join(f"{x:9.2f}" for x in totals))
        summary["tools"][t] = {"setup": res.med(t, lambda j: j.setup), "epochs": e,
                               "total": dict(zip(map(str, EPOCHS_SHOWN), totals)),
                               "rounds": [{"setup": j.setup, "epochs": j.epochs,
                                           "cpu": dict(zip(PHASES, j.cpu))} for j in res.of(t)]}
    if "download" in tools:
        p("\nratios: download-then-train time / the tool's (above 1: the tool finishes first); later epochs: the "
          "local copy's epoch (page cache warm) / the tool's")
        p(f"{'tool':21s}" + "".join(f"{'E=' + str(e):>9s}" for e in EPOCHS_SHOWN) + f"{'later ep':>10s}")
        for t in tools:
            if t == "download":
                continue
            rs = [ratio(res.med("download", lambda j, k=k: j.total(k)), res.med(t, lambda j, k=k: j.total(k)))
                  for k in EPOCHS_SHOWN]
            later = ratio(res.med("download", lambda j: j.later), res.med(t, lambda j: j.later))
            p(f"{t:21s}" + "".join(f"{x:8.2f}x" for x in rs) + f"{later:9.2f}x")
            summary["tools"][t]["ratio_vs_download"] = dict(zip(map(str, EPOCHS_SHOWN), rs))
            summary["tools"][t]["later_epoch_vs_local"] = later
    report_cpu(res, tools, summary, p)
    p("\nhow each tool ran:")
    for t in tools:
        p(f"  {t:21s}{bench.how(t, res.dataset)}")
    return summary


def report_cpu(res: Results, tools: list[str], summary: dict, p) -> None:
    """The CPU table: per tool and phase, the wall time and the CPU seconds
    of each group (medians over rounds), busy = the run's own CPU / wall, and
    the tool's CPU per file; the first epoch (set-up + epoch 1) last."""
    p(f"\nCPU seconds (user + system; medians): azurite; tool = mountd (the download, or the mount command and "
      f"its worker) or rclone; the {LOADERS} loaders; rest = the rest of the host meanwhile (a shared machine). "
      f"busy = (azurite + tool + loaders) / wall, {os.cpu_count()}.00 = every core busy; tool sys = the part of "
      f"tool spent in the kernel (its socket, file and /dev/fuse calls)")
    cols = ("wall", "azurite", "tool", "tool sys", "loaders", "rest")
    p(f"{'tool':21s}{'phase':>12s}" + "".join(f"{c:>9s}" for c in cols) + f"{'busy':>7s}{'tool ms/file':>14s}")
    rows = [(name, slice(i, i + 1)) for i, name in enumerate(PHASES)] + [("set-up+ep 1", slice(0, 2))]
    for t in tools:
        summary["tools"][t]["cpu"] = {}
        for k, (name, phases) in enumerate(rows):
            c = {col: res.med(t, lambda j, col=col, ph=phases: j.cpu_of(ph)[col]) for col in cols}
            busy = ratio(sum(c[g] for g in GROUPS), c["wall"])
            per_file = 1000 * c["tool"] / res.nfiles
            p(f"{t if k == 0 else '':21s}{name:>12s}" + "".join(f"{c[col]:9.2f}" for col in cols)
              + f"{busy:7.2f}{per_file:14.2f}")
            summary["tools"][t]["cpu"][name] = {**c, "busy": busy, "tool_ms_per_file": per_file}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_epochs",
                                 description="Time whole multi-epoch jobs: download-then-train, mountd mount "
                                             "(with and without --prefetch), rclone mount --vfs-cache-mode full.")
    ap.add_argument("--dataset", choices=("small", "shards", "both"), default="both")
    ap.add_argument("--files", type=int, default=20000, help="files of the small-file dataset (default 20000)")
    ap.add_argument("--size-kib", type=int, default=110, help="their mean size in KiB (default 110)")
    ap.add_argument("--shards", type=int, default=16, help="files of the shard dataset (default 16)")
    ap.add_argument("--shard-mib", type=int, default=64, help="their size in MiB (default 64)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated subset of {','.join(TOOLS)}")
    ap.add_argument("--cache-max-size", metavar="SIZE", help="mountd's disk cache cap (default: mountd's)")
    ap.add_argument("--step-ms", type=float, default=0.0, metavar="MS",
                    help="a training step of MS ms of the accelerator per sample, taken as samples arrive "
                         "(default 0: the job only reads)")
    ap.add_argument("--baseline", metavar="DIR", help="also run the mounts (without and with --prefetch, as "
                                                      "selected by --tools) of the mountd source tree DIR "
                                                      "(e.g. a git worktree of an earlier commit), as "
                                                      "mountd-base and mountd-prefetch-base")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    ap.add_argument("--py-spy", metavar="DIR", help="profile mountd with py-spy from the mount's start to the end "
                                                    "of epoch 1 (a download: whole), into "
                                                    "DIR/<dataset>-<tool>-<round>.txt (raw format)")
    ap.add_argument("--tmp-dir", metavar="DIR", help="where the run's data lives (default: the system's)")
    args = ap.parse_args(argv)
    args.tools = set(args.tools.split(","))
    if not args.tools <= set(TOOLS):
        ap.error(f"--tools: unknown {', '.join(sorted(args.tools - set(TOOLS)))}")
    if args.baseline is not None:
        if not os.path.isfile(os.path.join(args.baseline, "mountd", "__main__.py")):
            ap.error(f"--baseline {args.baseline}: not a mountd source tree (no mountd/__main__.py in it)")
        args.baseline = os.path.abspath(args.baseline)
        args.tools |= {t + "-base" for t in ("mountd", "mountd-prefetch") if t in args.tools}
    if args.py_spy:
        os.makedirs(args.py_spy, exist_ok=True)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    require()

    def body(tmp, azurite, keep):
        container = blob_service(azurite).create_container(CONTAINER)
        bench = Bench(args, tmp, azurite)
        keep(bench)
        header = {"storage": storage_header(azurite), **machine_info(), "mountd": mountd_header(),
                  "rclone": tool_version(["rclone", "version"], words=2), "rounds": args.repeat,
                  "training step per sample (ms, modelled)": args.step_ms}
        print(json.dumps(header), flush=True)
        datasets = []
        if args.dataset in ("small", "both"):
            print(f"uploading {args.files} files of ~{args.size_kib} KiB under small/", flush=True)
            datasets.append(small_dataset(container, args.files, args.size_kib))
        if args.dataset in ("shards", "both"):
            print(f"uploading {args.shards} shards of {args.shard_mib} MiB under shards/", flush=True)
            datasets.append(shard_dataset(container, args.shards, args.shard_mib))
        summaries = [report(bench.run(ds), bench) for ds in datasets]
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"header": header, "datasets": summaries}, f, indent=2)
                f.write("\n")
            print(f"\nwrote {args.json}")

    return run_session("mountd-bench-epochs-", args.tmp_dir, body)


if __name__ == "__main__":
    sys.exit(main())
