"""Download throughput of `mountd download` next to rclone and curl, against
one local Azurite.

Two scenarios, each run for several rounds with the tools interleaved inside a
round (the order rotates from round to round) so they share the machine's
noise:

- big:   one blob `big/blob.bin` of --big-mib MiB, fetched by
         `mountd download --prefix big/`, `rclone copy` (rclone's defaults) and
         a single `curl` of the blob's SAS URL;
- small: --small-count blobs `small/fNNNNN.bin` of --small-kib KiB, fetched by
         `mountd download --prefix small/` (its default workers),
         `rclone copy --transfers 16 --checkers 16` and
         `curl --parallel --parallel-max 16` over a list of SAS URLs.

With --baseline DIR, the mountd of another source tree (e.g. an earlier
commit checked out with `git worktree add` or `git archive`) runs as a
fourth tool, `mountd-base`, in the same rounds: a change is compared with
the code before it under the same noise, not against a run of another hour.

Each round also records every tool's CPU (user + system of the command, from
RUSAGE_CHILDREN), reported as median milliseconds per file: on 2 cores the
client's CPU is taken from Azurite, and it varies less than wall time.

Every run writes into an empty directory on the same disk, is checked for
completeness (file count and bytes; content too, see `check_*`) outside the
timed part, and is deleted and synced before the next run. The times are
wall-clock seconds of the whole command, process start-up included.

With --tls, Azurite serves HTTPS alone, with a certificate from a CA made
for the run, and every tool talks HTTPS to it trusting that CA (see
common.tool_env; curl with `--proto =https --cacert CA`), as real Azure
storage is HTTPS only; the report's header says which.

Run from the repository root (needs azurite-blob, rclone and curl on PATH and
mountd's dependencies installed; the mountd measured is the repository's,
run as `python -m mountd`):

    python -m tests.benchmarks.bench_download                      # 1 GiB + 2000 x 256 KiB, 3 rounds
    python -m tests.benchmarks.bench_download --big-mib 64 --small-count 200 --repeat 1   # quick check
    python -m tests.benchmarks.bench_download --skip-small --json results.json
    python -m tests.benchmarks.bench_download --tls                # the same over HTTPS
    python -m tests.benchmarks.bench_download --skip-big --baseline /tmp/before   # against another tree

This is not a pytest test; it prints a table (medians, MiB/s, mountd/tool
throughput ratios, every round's raw seconds) and optionally writes JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from statistics import median
from typing import Callable

from tests.benchmarks.common import (
    MiB, Scenario, ToolFailed, blob_sas_url, check_tree, children_cpu_seconds, container_sas_token,
    curl_tls_flags, file_md5,
    fresh_dir, machine_info, make_azurite, print_report, remove_dir, run_timed, same_edges, settle,
    storage_header, tool_env, tool_version, write_curl_config, write_json, write_random_file,
    write_rclone_config, write_workspace)
from tests.support.azurite import ACCOUNT, KEY, Azurite, blob_workspace_entry

CONTAINER = "bench"
DATASTORE = "bench"
KEY_ENV = "AZURITE_ACCOUNT_KEY"
RCLONE_REMOTE = "az"
BIG_BLOB = "big/blob.bin"
SMALL_PREFIX = "small/"
RUN_TIMEOUT = 3600


@dataclass
class Tool:
    """One way of fetching a scenario: a timed run into `out`, then a check of `out`."""
    name: str
    how: str
    run: Callable[[str], float]
    check: Callable[[str], None]


@dataclass
class Data:
    """What was uploaded, to check the tools' output against."""
    big_file: str | None = None       # local copy of big/blob.bin
    big_md5: str = ""
    small: dict[str, str] | None = None  # blob name -> MD5 hex
    small_bytes: int = 0


# --- setup ----------------------------------------------------------------------

def blob_service(azurite: Azurite):
    """The SDK client that uploads the test data (trusting the run's CA over HTTPS)."""
    return azurite.blob_service(connection_data_block_size=256 * 1024)


def upload_big(container, path: str, mib: int) -> str:
    md5 = write_random_file(path, mib)
    with open(path, "rb") as f:
        container.upload_blob(BIG_BLOB, f, length=mib * MiB, overwrite=True, max_concurrency=4)
    return md5


def small_name(i: int) -> str:
    return f"{SMALL_PREFIX}f{i:05d}.bin"


def upload_small(container, count: int, kib: int, threads: int = 16) -> dict[str, str]:
    def one(i: int) -> tuple[str, str]:
        data = os.urandom(kib * 1024)
        container.upload_blob(small_name(i), data, overwrite=True)
        return small_name(i), hashlib.md5(data).hexdigest()

    pool = ThreadPoolExecutor(threads)
    try:
        return dict(pool.map(one, range(count)))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def stored_md5(container, name: str) -> bool:
    """Whether the service keeps a Content-MD5 for the blob (tools verify it if so)."""
    return bool(container.get_blob_client(name).get_blob_properties().content_settings.content_md5)


# --- checks (outside the timed part) ------------------------------------------

def check_big(tool: str, path: str, data: Data, full: bool) -> None:
    if not os.path.isfile(path):
        raise ToolFailed(f"{tool}: {path} is missing")
    if not same_edges(path, data.big_file):
        raise ToolFailed(f"{tool}: size or first/last MiB differ from the source")
    if full and file_md5(path) != data.big_md5:
        raise ToolFailed(f"{tool}: MD5 of the whole file differs from the source")


def check_small(tool: str, root: str, data: Data) -> None:
    """Exact file count, bytes and every file's MD5; `root` holds the files
    named like the blobs minus the `small/` prefix."""
    check_tree(tool, root, len(data.small), data.small_bytes)
    for name, md5 in data.small.items():
        path = os.path.join(root, name[len(SMALL_PREFIX):])
        if not os.path.isfile(path) or file_md5(path) != md5:
            raise ToolFailed(f"{tool}: {path} is missing or differs from the source")


# --- the tools ----------------------------------------------------------------------

def mountd_argv() -> list[str]:
    """The command that runs mountd: this interpreter with `-m mountd`, so the
    tree the benchmark runs from (its root the working directory, first on
    the path) is what is measured, its mount workers too (they start with
    `-m mountd.run.mount_worker` in the same directory), not whichever
    installation a `mountd` script on PATH belongs to."""
    return [sys.executable, "-m", "mountd"]


def mountd_header() -> str:
    """mountd's version, and the directory its package comes from, for a
    report's header."""
    import mountd
    return f"{tool_version(mountd_argv() + ['--version'])} ({os.path.dirname(os.path.abspath(mountd.__file__))})"


class Tools:
    """Builds the Tool entries of each scenario for one Azurite and temp dir."""

    def __init__(self, azurite: Azurite, conf_dir: str, data: Data, baseline: str | None = None):
        self.azurite, self.conf, self.data, self.baseline = azurite, conf_dir, data, baseline
        self.env = {**tool_env(azurite), KEY_ENV: KEY}
        self.workspace = write_workspace(
            os.path.join(conf_dir, "workspace.yaml"),
            {DATASTORE: blob_workspace_entry(azurite, CONTAINER, key_env=KEY_ENV)}, default=DATASTORE)
        self.rclone_conf = write_rclone_config(os.path.join(conf_dir, "rclone.conf"), RCLONE_REMOTE,
                                               ACCOUNT, KEY, azurite.account_url)

    def _timed(self, argv: list[str], cwd: str | None = None) -> float:
        return run_timed(argv, env=self.env, timeout=RUN_TIMEOUT, cwd=cwd)

    def mountd(self, prefix: str, check: Callable[[str], None], tree: str | None = None) -> Tool:
        """mountd of this tree, or with `tree` of that source tree (run from
        it: `-m mountd` imports the package of the working directory)."""
        def run(out: str) -> float:
            return self._timed(mountd_argv() + ["--workspace", self.workspace, "download", DATASTORE, out,
                                                "--prefix", prefix, "--no-progress"], cwd=tree)
        how = f"mountd download {DATASTORE} DIR --prefix {prefix} --no-progress (default workers)"
        if tree is not None:
            return Tool("mountd-base", f"{how}, the tree {tree}", run, check)
        return Tool("mountd", how, run, check)

    def with_baseline(self, tools: list[Tool], prefix: str, check: Callable[[str], None]) -> list[Tool]:
        if self.baseline is None:
            return tools
        return tools + [self.mountd(prefix, check, tree=self.baseline)]

    def rclone(self, prefix: str, flags: list[str], check: Callable[[str], None]) -> Tool:
        src = f"{RCLONE_REMOTE}:{CONTAINER}/{prefix.rstrip('/')}"

        def run(out: str) -> float:
            return self._timed(["rclone", "--config", self.rclone_conf, "copy", src, out, "-q"] + flags)
        return Tool("rclone", " ".join(["rclone copy", src, "DIR"] + (flags or ["(defaults)"])), run, check)

    def curl(self, name: str, transfers: Callable[[str], list[tuple[str, str]]], flags: list[str],
             check: Callable[[str], None]) -> Tool:
        tls = curl_tls_flags(self.azurite)

        def run(out: str) -> float:
            cfg = write_curl_config(os.path.join(self.conf, f"{name}.curlrc"), transfers(out))
            return self._timed(["curl", "-s", "-S", "-f"] + tls + ["-K", cfg] + flags)
        how = ["curl -s -S -f"] + curl_tls_flags(self.azurite, ca="CA") + ["-K URLS"] + flags
        return Tool(name, " ".join(how), run, check)

    def big(self) -> list[Tool]:
        d = self.data
        url = blob_sas_url(self.azurite.account_url, ACCOUNT, KEY, CONTAINER, BIG_BLOB)
        check_mountd = lambda out: (check_tree("mountd", out, 1, os.path.getsize(d.big_file)),  # noqa: E731
                                    check_big("mountd", os.path.join(out, BIG_BLOB), d, full=True))
        return self.with_baseline([
            self.mountd("big/", check_mountd),
            self.rclone("big/", [], lambda out: (check_tree("rclone", out, 1, os.path.getsize(d.big_file)),
                                                 check_big("rclone", os.path.join(out, "blob.bin"), d, full=False))),
            self.curl("curl", lambda out: [(url, os.path.join(out, "blob.bin"))], [],
                      lambda out: (check_tree("curl", out, 1, os.path.getsize(d.big_file)),
                                   check_big("curl", os.path.join(out, "blob.bin"), d, full=False))),
        ], "big/", check_mountd)

    def small(self) -> list[Tool]:
        d = self.data
        token = container_sas_token(ACCOUNT, KEY, CONTAINER)
        base = f"{self.azurite.account_url}/{CONTAINER}/"

        def urls(out: str) -> list[tuple[str, str]]:
            return [(f"{base}{name}?{token}", os.path.join(out, name[len(SMALL_PREFIX):])) for name in d.small]
        check_mountd = lambda out: check_small("mountd", os.path.join(out, "small"), d)  # noqa: E731
        return self.with_baseline([
            self.mountd(SMALL_PREFIX, check_mountd),
            self.rclone(SMALL_PREFIX, ["--transfers", "16", "--checkers", "16"],
                        lambda out: check_small("rclone", out, d)),
            self.curl("curl-parallel", urls, ["--parallel", "--parallel-max", "16"],
                      lambda out: check_small("curl-parallel", out, d)),
        ], SMALL_PREFIX, check_mountd)


# --- rounds ---------------------------------------------------------------------------

def run_rounds(scenarios: list[tuple[Scenario, list[Tool]]], repeat: int, out_root: str) -> dict:
    """Each round runs every scenario's tools once, in an order rotated by
    the round. Returns each run's CPU seconds: {(scenario, tool): [per round]}."""
    cpu: dict[tuple[str, str], list[float]] = {}
    for r in range(repeat):
        for sc, tools in scenarios:
            shift = r % len(tools)
            for tool in tools[shift:] + tools[:shift]:
                out = fresh_dir(os.path.join(out_root, f"{sc.name}-{tool.name}"))
                settle()
                before = children_cpu_seconds()
                secs = tool.run(out)
                used = children_cpu_seconds() - before
                tool.check(out)
                sc.add(tool.name, secs)
                cpu.setdefault((sc.name, tool.name), []).append(used)
                remove_dir(out)
                print(f"round {r + 1}/{repeat}  {sc.name:<6} {tool.name:<14} {secs:8.2f} s  cpu {used:6.2f} s",
                      flush=True)
    return cpu


def print_cpu(scenarios: list[Scenario], cpu: dict) -> None:
    """Median CPU seconds of each tool's command, and per file."""
    print("\nCPU of each command (user + system), median over rounds:")
    for sc in scenarios:
        for tool in sc.seconds:
            rounds = cpu.get((sc.name, tool), [])
            if rounds:
                med = median(rounds)
                print(f"  {sc.name:<6} {tool:<14} {med:7.2f} s  {med / sc.files * 1000:7.3f} ms per file"
                      f"   (rounds: {' '.join(f'{x:.2f}' for x in cpu[(sc.name, tool)])})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_download",
                                description="Time mountd download next to rclone and curl against Azurite.")
    p.add_argument("--repeat", type=int, default=3, help="rounds (default 3)")
    p.add_argument("--big-mib", type=int, default=1024, help="size of the big blob in MiB (default 1024)")
    p.add_argument("--small-count", type=int, default=2000, help="number of small blobs (default 2000)")
    p.add_argument("--small-kib", type=int, default=256, help="size of each small blob in KiB (default 256)")
    p.add_argument("--skip-big", action="store_true", help="leave out the big-blob scenario")
    p.add_argument("--skip-small", action="store_true", help="leave out the small-blobs scenario")
    p.add_argument("--tls", action="store_true",
                   help="Azurite over HTTPS (a CA made for the run), every tool over TLS to it")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--tmp-dir", metavar="DIR", help="where the temporary data goes (default: system temp dir)")
    p.add_argument("--baseline", metavar="DIR",
                   help="also run the mountd of the source tree DIR (tool `mountd-base`), in the same rounds")
    args = p.parse_args(argv)
    if args.baseline is not None and not os.path.isfile(os.path.join(args.baseline, "mountd", "__main__.py")):
        p.error(f"--baseline {args.baseline}: not a mountd source tree (no mountd/__main__.py in it)")
    if args.baseline is not None:
        args.baseline = os.path.abspath(args.baseline)
    if args.repeat < 1 or args.big_mib < 1 or args.small_count < 1 or args.small_kib < 1:
        p.error("--repeat, --big-mib, --small-count and --small-kib must be positive")
    if args.skip_big and args.skip_small:
        p.error("nothing to do with both --skip-big and --skip-small")
    return args


def require_tools() -> None:
    missing = [t for t in ("azurite-blob", "rclone", "curl") if not shutil.which(t)]
    if missing:
        sys.exit(f"missing on PATH: {', '.join(missing)}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_tools()
    tmp = tempfile.mkdtemp(prefix="mountd-bench-download-", dir=args.tmp_dir)
    azurite = make_azurite(tmp, args.tls)
    try:
        for sub in ("src", "conf", "out"):
            os.makedirs(os.path.join(tmp, sub), exist_ok=True)
        print(f"starting Azurite{' (HTTPS)' if args.tls else ''}, data under {tmp}", flush=True)
        azurite.start()
        header = {"storage": storage_header(azurite), **machine_info(), "mountd": mountd_header(),
                  "rclone": tool_version(["rclone", "version"]), "curl": tool_version(["curl", "--version"]),
                  "rounds": args.repeat}
        container = blob_service(azurite).create_container(CONTAINER)
        data = Data()
        plan: list[tuple[Scenario, list[Tool]]] = []
        tools = Tools(azurite, os.path.join(tmp, "conf"), data, args.baseline)
        if not args.skip_big:
            print(f"uploading {BIG_BLOB} ({args.big_mib} MiB)", flush=True)
            data.big_file = os.path.join(tmp, "src", "blob.bin")
            data.big_md5 = upload_big(container, data.big_file, args.big_mib)
            header["big blob has a stored MD5"] = stored_md5(container, BIG_BLOB)
            plan.append((Scenario("big", 1, args.big_mib * MiB), tools.big()))
        if not args.skip_small:
            print(f"uploading {args.small_count} x {args.small_kib} KiB under {SMALL_PREFIX}", flush=True)
            data.small = upload_small(container, args.small_count, args.small_kib)
            data.small_bytes = args.small_count * args.small_kib * 1024
            header["small blobs have a stored MD5"] = stored_md5(container, small_name(0))
            plan.append((Scenario("small", args.small_count, data.small_bytes), tools.small()))
        for sc, ts in plan:
            sc.tools = {t.name: t.how for t in ts}
        settle()
        cpu = run_rounds(plan, args.repeat, os.path.join(tmp, "out"))
        scenarios = [sc for sc, _ in plan]
        header["times"] = "wall clock of the whole command, process start-up included; median over rounds"
        print()
        print_report(scenarios, subject="mountd", header=header)
        print_cpu(scenarios, cpu)
        if args.json:
            write_json(args.json, scenarios, subject="mountd", header=header)
            print(f"\nwrote {args.json}")
        return 0
    except ToolFailed as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        azurite.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
