"""Later epochs of many small files: a read-only `mountd mount` whose files
are all in the page cache, next to a local copy in the page cache.

A training job's second epoch over a dataset of small files opens, reads and
closes every file again. Its bytes are in the kernel's page cache after the
first epoch, so what the mount can still cost is the requests the kernel
sends mountd per file (open, flush, release, attributes). This measures that
cost, side by side in one run:

- mount: --count blobs of --kib KiB in Azurite, mounted read-only (defaults);
  epoch 1 (cold, fills the caches) is not timed, epoch 2 is;
- local: the same files in a local directory, read once to warm the page
  cache, then timed.

An epoch is --procs processes reading every file whole (1 MiB reads), each a
share of one shuffled order (a new shuffle per epoch), as a PyTorch
DataLoader over an ImageFolder does. In each round every tool gets a fresh
mount (tool order rotated), and the local copy is read right after each
mount's timed epoch, so each ratio compares two epochs a moment apart: the
machine's noise (it is shared) moves both. After each timed mount epoch every file's bytes are
checked against its MD5 (not timed), and the requests that reached mountd
during the timed epoch are counted (its fs core's counters, through the
mount worker's control socket).

Run from the repository root as root (azurite-blob and fusermount3 on PATH):

    python -m tests.benchmarks.bench_reopen                     # 2000 x 110 KiB, 5 rounds
    python -m tests.benchmarks.bench_reopen --count 500 --repeat 3
    python -m tests.benchmarks.bench_reopen --tools mountd,mountd-strict-open

It prints per tool the medians, the ratio local/mount (1.0: the mount is as
fast as the page cache), every round's seconds and the requests per file.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import random
import sys
import time

from mountd.run import control, runtime
from tests.benchmarks.bench_download import mountd_header
from tests.benchmarks.bench_mount import (CONTAINER, DATASTORE, KEY_ENV, MOUNTD_ENV_PREFIXES, MOUNTD_FLAGS,
                                          MountdMount, blob_service, run_session)
from tests.benchmarks.common import (ToolFailed, fresh_dir, is_mounted, machine_info, median, remove_dir, settle,
                                     storage_header, tool_env, write_workspace)
from tests.support.azurite import KEY, blob_workspace_entry

PREFIX = "epochs/"
CHUNK = 1024 * 1024


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_reopen",
                                description="Time a later epoch of small files through a read-only mountd mount "
                                            "next to a local copy in the page cache.")
    p.add_argument("--count", type=int, default=2000, help="files (default 2000)")
    p.add_argument("--kib", type=int, default=110, help="KiB per file (default 110)")
    p.add_argument("--procs", type=int, default=4, help="reading processes (default 4)")
    p.add_argument("--repeat", type=int, default=5, help="rounds (default 5)")
    p.add_argument("--tools", default="mountd", help="mountd variants, comma-separated, from "
                   f"{', '.join(MOUNTD_FLAGS)} (default mountd)")
    p.add_argument("--tmp-dir", metavar="DIR", help="where the temporary data goes (default: system temp dir)")
    args = p.parse_args(argv)
    if min(args.count, args.kib, args.procs, args.repeat) < 1:
        p.error("--count, --kib, --procs and --repeat must be positive")
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if not args.tools or set(args.tools) - set(MOUNTD_FLAGS):
        p.error(f"--tools takes names from {', '.join(MOUNTD_FLAGS)}, got {','.join(args.tools)!r}")
    return args


def _read_share(paths: list[str], size: int, bad) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            got = 0
            while True:
                n = len(os.read(fd, CHUNK))
                if not n:
                    break
                got += n
        finally:
            os.close(fd)
        if got != size:
            bad.value += 1


def epoch(root: str, names: list[str], size: int, procs: int, seed: int) -> float:
    """Seconds for `procs` processes to read every file under `root` once, in
    one shuffled order dealt out round-robin."""
    order = [os.path.join(root, n) for n in names]
    random.Random(seed).shuffle(order)
    bad = multiprocessing.Value("i", 0)
    workers = [multiprocessing.Process(target=_read_share, args=(order[i::procs], size, bad)) for i in range(procs)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    if bad.value or any(w.exitcode for w in workers):
        raise ToolFailed(f"epoch over {root}: {bad.value} file(s) short, exit codes {[w.exitcode for w in workers]}")
    return elapsed


def check_bytes(root: str, md5: dict[str, str]) -> None:
    for name, want in md5.items():
        with open(os.path.join(root, name), "rb") as f:
            if hashlib.md5(f.read()).hexdigest() != want:
                raise ToolFailed(f"{name} read through {root} differs from what was uploaded")


def calls(mountpoint: str) -> dict:
    return dict(control.query(runtime.control_path(mountpoint)).get("calls", {}))


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark mounts FUSE filesystems")
    size = args.kib * 1024

    class Session:
        active: list[MountdMount] = []

        def cleanup(self) -> list[str]:
            for m in list(self.active):
                m.stop()
            return [m.path for m in self.active if is_mounted(m.path)]

    def body(tmp, azurite, keep):
        session = Session()
        keep(session)
        container = blob_service(azurite).create_container(CONTAINER)
        local = os.path.join(tmp, "local")
        os.makedirs(local)
        names, md5 = [], {}
        print(f"uploading {args.count} x {args.kib} KiB under {PREFIX}", flush=True)
        for i in range(args.count):
            data = os.urandom(size)
            name = f"f{i:05d}.bin"
            names.append(name)
            md5[name] = hashlib.md5(data).hexdigest()
            with open(os.path.join(local, name), "wb") as f:
                f.write(data)
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda n: container.upload_blob(PREFIX + n, open(os.path.join(local, n), "rb").read()),
                          names))
        env = {k: v for k, v in os.environ.items() if not k.startswith(MOUNTD_ENV_PREFIXES)}
        env = {**tool_env(azurite, env), KEY_ENV: KEY}
        entry = blob_workspace_entry(azurite, CONTAINER, key_env=KEY_ENV)
        workspace = write_workspace(os.path.join(tmp, "workspace.yaml"), {DATASTORE: entry}, default=DATASTORE)
        epoch(local, names, size, args.procs, seed=0)  # warms the local copy's pages
        settle()
        mount_s: dict[str, list[float]] = {t: [] for t in args.tools}
        local_s: dict[str, list[float]] = {t: [] for t in args.tools}
        per_file: dict[str, list[dict]] = {t: [] for t in args.tools}
        for r in range(args.repeat):
            seed = 2 * r + 2
            for tool in args.tools[r % len(args.tools):] + args.tools[:r % len(args.tools)]:
                secs, counts = mount_epoch(session, tmp, f"{tool}-{r}", tool, workspace, env, names, size, md5,
                                           args.procs, seed)
                mount_s[tool].append(secs)
                local_s[tool].append(epoch(local, names, size, args.procs, seed=seed))
                per_file[tool].append({k: v / args.count for k, v in counts.items()})
            print(f"round {r + 1}: " + ", ".join(f"{t} {mount_s[t][-1]:.3f} s (local {local_s[t][-1]:.3f} s)"
                                                 for t in args.tools), flush=True)
        print()
        print(f"storage: {storage_header(azurite)}")
        for k, v in {**machine_info(), "mountd": mountd_header()}.items():
            print(f"{k}: {v}")
        print(f"dataset: {args.count} x {args.kib} KiB, {args.procs} processes, shuffled, whole files, "
              f"{args.repeat} rounds; seconds of epoch 2 (mount) and of an epoch over the local copy in the page "
              "cache read right after it; ratio = local / mount (1.0 = page-cache speed), the median of the "
              "rounds' ratios")
        for tool in args.tools:
            mm, lm = median(mount_s[tool]), median(local_s[tool])
            ratios = [lo / mo for lo, mo in zip(local_s[tool], mount_s[tool])]
            print(f"{tool:<20} median {mm:.3f} s  ({' '.join(f'{s:.3f}' for s in mount_s[tool])}); local median "
                  f"{lm:.3f} s ({' '.join(f'{s:.3f}' for s in local_s[tool])})")
            print(f"{'':<20} ratio {median(ratios):.2f} (rounds {' '.join(f'{x:.2f}' for x in ratios)}; of medians "
                  f"{lm / mm:.2f})  [{' '.join(MOUNTD_FLAGS[tool]) or 'defaults'}]")
            keys = sorted({k for d in per_file[tool] for k in d})
            print(f"{'':<20} requests reaching mountd per file: "
                  + ", ".join(f"{k} {median([d.get(k, 0) for d in per_file[tool]]):.2f}" for k in keys))

    return run_session("mountd-bench-reopen-", args.tmp_dir, body)


def mount_epoch(session, tmp: str, label: str, tool: str, workspace: str, env: dict, names: list[str], size: int,
                md5: dict[str, str], procs: int, seed: int) -> tuple[float, dict]:
    """On a fresh mount: epoch 1 (not timed), then epoch 2 timed; its
    seconds and the requests that reached mountd during it. Every file's
    bytes are checked after."""
    mp = fresh_dir(os.path.join(tmp, "mnt", label))
    cache = fresh_dir(os.path.join(tmp, "cache", label))
    m = MountdMount(mp, cache, workspace, env, tool)
    session.active.append(m)
    try:
        m.start()
        root = os.path.join(mp, PREFIX)
        epoch(root, names, size, procs, seed=seed - 1)
        before = calls(mp)
        secs = epoch(root, names, size, procs, seed=seed)
        after = calls(mp)
        check_bytes(root, md5)
        return secs, {k: after[k] - before.get(k, 0) for k in after}
    finally:
        m.stop()
        session.active.remove(m)
        if not is_mounted(mp):
            os.rmdir(mp)
        remove_dir(cache)


if __name__ == "__main__":
    sys.exit(main())
