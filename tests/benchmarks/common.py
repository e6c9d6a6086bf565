"""Shared helpers for the benchmarks under tests/benchmarks/.

Nothing here is a benchmark by itself. It holds the pieces every benchmark
that compares mountd with other tools (rclone, curl, ...) against a local
Azurite needs:

- timing one command-line run (`run_timed`) and summarising rounds
  (`median`, `mib_per_s`);
- preparing the other tools: an rclone `azureblob` config file for an Azurite
  (`write_rclone_config`), a SAS token/URL for curl (`blob_sas_url`,
  `container_sas_token`), a curl config file (`write_curl_config`);
- plain HTTP or TLS: the run's Azurite (`make_azurite`, over HTTPS with
  `--tls`), the environment and curl flags that make every tool trust its CA
  (`tool_env`, `curl_tls_flags`), and the header line saying which it was
  (`storage_header`);
- CPU time: of a live process (`process_cpu_seconds`, `cpu_when_quiet`;
  split into user and system, `process_cpu_split`), of the commands run to
  completion (`children_cpu_seconds`, `children_cpu_split`) and of the whole
  host, every process on it (`host_cpu_seconds`);
- test data: a random file of N MiB written in chunks (`write_random_file`),
  a mountd workspace file (`write_workspace`);
- checking a tool's output (`tree_stats`, `file_md5`, `same_edges`);
- the result model and report (`Scenario`, `print_report`, `write_json`).

Secrets (account key, SAS tokens) only ever go into files under the
benchmark's temporary directory or into environment variables, never onto a
command line and never into the printed output.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

from mountd.run.mounts import is_mounted, mount_points  # noqa: F401 - re-exported for the benchmarks
from tests.support.azurite import Azurite

MiB = 1024 * 1024
GiB = 1024 * MiB


# --- running and timing ------------------------------------------------------

class ToolFailed(RuntimeError):
    """A benchmarked command exited non-zero or produced wrong output."""


def run_timed(argv: list[str], env: dict | None = None, timeout: float | None = None,
              cwd: str | None = None) -> float:
    """Run one command to completion (in `cwd` if given) and return its
    wall-clock seconds (process start-up included). Raises ToolFailed with
    the end of its stderr if it exits non-zero; its stdout is discarded."""
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, timeout=timeout, cwd=cwd)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-15:]
        raise ToolFailed(f"{os.path.basename(argv[0])} exited with {proc.returncode}:\n  " + "\n  ".join(tail))
    return elapsed


def children_cpu_seconds() -> float:
    """User + system CPU seconds of every child this process has waited for
    so far (RUSAGE_CHILDREN). The difference around one run_timed* call is
    that command's CPU, as long as no other child is reaped meanwhile (the
    benchmarks run their commands one at a time; mounts are reaped later)."""
    return sum(children_cpu_split())


def children_cpu_split() -> tuple[float, float]:
    """children_cpu_seconds as (user, system) seconds."""
    import resource
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime, ru.ru_stime


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a live process has used so far, all its
    threads together (utime and stime of /proc/PID/stat)."""
    return sum(process_cpu_split(pid))


def process_cpu_split(pid: int) -> tuple[float, float]:
    """process_cpu_seconds as (user, system) seconds: system is the time
    the kernel spent on the process's behalf (its system calls: socket,
    file and /dev/fuse reads and writes)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()  # the name may hold spaces; fields from 3 (state) on
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def host_cpu_seconds() -> float:
    """CPU seconds the whole host has been busy so far, all cores together:
    user, nice, system, irq, softirq and steal of /proc/stat's first line
    (not idle and iowait). Around a phase, minus the processes measured, it
    says what the rest of a shared machine took meanwhile."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def cpu_when_quiet(pid: int, quiet: float = 0.3, timeout: float = 10.0) -> float:
    """process_cpu_seconds(pid) once the process has used less than one clock
    tick in `quiet` seconds (work a read left behind, such as cache writes,
    done), or after `timeout` seconds."""
    tick = 1 / os.sysconf("SC_CLK_TCK")
    deadline = time.monotonic() + timeout
    last = process_cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = process_cpu_seconds(pid)
        if now - last < tick:
            return now
        last = now
    return last


def settle() -> None:
    """Flush dirty pages so the next run does not pay for the last one's writeback."""
    os.sync()


def fresh_dir(path: str) -> str:
    """An empty directory at `path` (removed first if it exists)."""
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def remove_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    settle()


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def mib_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / MiB / seconds if seconds > 0 else float("inf")


def fmt_size(nbytes: int) -> str:
    if nbytes >= 1024 * MiB:
        return f"{nbytes / (1024 * MiB):.2f} GiB"
    if nbytes >= MiB:
        return f"{nbytes / MiB:.1f} MiB"
    return f"{nbytes / 1024:.0f} KiB"


def tool_version(argv: list[str], words: int = 3) -> str:
    """The first `words` words of a tool's version output, or '?'."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    return " ".join((out.strip().splitlines() or ["?"])[0].split()[:words])


def machine_info() -> dict:
    return {"cores": os.cpu_count(), "machine": platform.machine(), "kernel": platform.release(),
            "python": platform.python_version()}


# --- test data -------------------------------------------------------------------

def write_random_file(path: str, mib: int, chunk_mib: int = 8) -> str:
    """Write `mib` MiB of random bytes to `path` in chunks (never the whole
    file in memory); returns the file's MD5 hex digest."""
    md5 = hashlib.md5()
    left = mib * MiB
    with open(path, "wb") as f:
        while left:
            chunk = os.urandom(min(left, chunk_mib * MiB))
            f.write(chunk)
            md5.update(chunk)
            left -= len(chunk)
    return md5.hexdigest()


def file_md5(path: str, block: int = 8 * MiB) -> str:
    md5 = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            md5.update(chunk)
    return md5.hexdigest()


def same_edges(a: str, b: str, span: int = MiB) -> bool:
    """True if two files have the same size and the same first and last `span` bytes."""
    size = os.path.getsize(a)
    if size != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for offset in (0, max(0, size - span)):
            fa.seek(offset)
            fb.seek(offset)
            if fa.read(span) != fb.read(span):
                return False
    return True


def tree_stats(root: str) -> tuple[int, int]:
    """(number of regular files, total bytes) under `root`."""
    count = total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            count += 1
            total += os.path.getsize(os.path.join(dirpath, name))
    return count, total


def check_tree(tool: str, root: str, want_files: int, want_bytes: int) -> None:
    """Raise ToolFailed unless `root` holds exactly `want_files` files of `want_bytes` bytes."""
    count, total = tree_stats(root)
    if (count, total) != (want_files, want_bytes):
        raise ToolFailed(f"{tool}: output has {count} files / {total} bytes, "
                         f"expected {want_files} files / {want_bytes} bytes")


# --- tool configuration ----------------------------------------------------------

def write_private(path: str, text: str) -> str:
    """Write a file readable only by this user (it may hold a secret)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def write_workspace(path: str, datastores: dict[str, dict], default: str | None = None) -> str:
    """A mountd workspace file with the given datastore entries (see
    tests.support.azurite.blob_workspace_entry). Holds no secret itself."""
    import yaml
    doc = {"datastores": datastores}
    if default:
        doc["default_datastore"] = default
    with open(path, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)
    return path


def write_rclone_config(path: str, remote: str, account: str, key: str, endpoint: str) -> str:
    """An rclone config file with one `azureblob` remote for an Azurite.
    rclone 1.60 needs both use_emulator and the explicit endpoint when the
    emulator is not on its default port."""
    return write_private(path, (
        f"[{remote}]\n"
        "type = azureblob\n"
        f"account = {account}\n"
        f"key = {key}\n"
        "use_emulator = true\n"
        f"endpoint = {endpoint}\n"))


def _sas_expiry(hours: float) -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=hours)


def blob_sas_url(account_url: str, account: str, key: str, container: str, blob: str, hours: float = 6) -> str:
    """A read-only SAS URL for one blob (for curl)."""
    from azure.storage.blob import BlobSasPermissions, generate_blob_sas
    token = generate_blob_sas(account, container, blob, account_key=key,
                              permission=BlobSasPermissions(read=True), expiry=_sas_expiry(hours))
    return f"{account_url}/{container}/{blob}?{token}"


def container_sas_token(account: str, key: str, container: str, hours: float = 6) -> str:
    """A read-only SAS token for every blob of a container (for many curl URLs)."""
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas
    return generate_container_sas(account, container, account_key=key,
                                  permission=ContainerSasPermissions(read=True), expiry=_sas_expiry(hours))


def write_curl_config(path: str, transfers: list[tuple[str, str]]) -> str:
    """A curl config file (`curl -K path`) fetching each (url, output file)
    pair, so that SAS tokens stay off the command line."""
    def q(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
    lines = []
    for url, out in transfers:
        lines += [f"url = {q(url)}", f"output = {q(out)}"]
    return write_private(path, "\n".join(lines) + "\n")


# --- plain HTTP or TLS ----------------------------------------------------------

# The variables through which the tools find the CAs they trust: OpenSSL
# (curl's defaults), Python's ssl module and Go's crypto/x509 (rclone) read
# SSL_CERT_FILE and SSL_CERT_DIR; mountd's transport takes REQUESTS_CA_BUNDLE,
# then CURL_CA_BUNDLE, before them; curl takes CURL_CA_BUNDLE.
CA_FILE_VARIABLES = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
CA_DIR_VARIABLES = ("SSL_CERT_DIR",)


def make_azurite(tmp: str, tls: bool = False) -> Azurite:
    """The run's Azurite (not started), its data under TMP/azurite: over
    plain HTTP, or with `tls` over HTTPS alone, its certificate for 127.0.0.1
    signed by a CA made for this run under TMP/ca (tests/support/tls.py),
    which `tool_env` and `curl_tls_flags` make the tools trust."""
    location = os.path.join(tmp, "azurite")
    os.makedirs(location, exist_ok=True)
    if not tls:
        return Azurite(location=location)
    from tests.support.tls import make_local_ca
    ca = make_local_ca(os.path.join(tmp, "ca"))
    return Azurite(location=location, cert=ca.cert_path, key=ca.key_path, ca=ca.ca_path)


def tool_env(azurite: Azurite, base: dict | None = None) -> dict:
    """The environment the benchmarked tools run in: `base` (default this
    process's), and for an HTTPS Azurite trust in its CA: every variable of
    CA_FILE_VARIABLES names the CA's certificate and SSL_CERT_DIR is unset,
    whatever the machine's environment said (a system bundle, which does not
    hold the run's CA)."""
    env = dict(os.environ if base is None else base)
    if azurite.tls:
        for var in CA_DIR_VARIABLES:
            env.pop(var, None)
        env.update({var: azurite.ca for var in CA_FILE_VARIABLES})
    return env


def curl_tls_flags(azurite: Azurite, ca: str | None = None) -> list[str]:
    """curl's flags for the run's Azurite: over HTTPS, trust its CA and
    refuse any protocol but HTTPS (`--proto =https`); none over HTTP. `ca`
    stands in for the CA's path (in a report's "how each tool was run")."""
    return ["--proto", "=https", "--cacert", ca or azurite.ca] if azurite.tls else []


def storage_header(azurite: Azurite) -> str:
    """What the tools talk to, for a report's header. Over HTTPS it is
    checked first: a TLS handshake trusting the run's CA alone succeeds, and
    a plain-HTTP request to the same port gets no HTTP answer, so a tool that
    got any data from this Azurite spoke TLS to it. Raises ToolFailed if not."""
    if not azurite.tls:
        return f"Azurite over plain HTTP ({azurite.account_url})"
    import socket
    import ssl
    context = ssl.create_default_context(cafile=azurite.ca)
    try:
        with socket.create_connection(("127.0.0.1", azurite.port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
            version, cipher = conn.version(), conn.cipher()[0]
    except (OSError, ssl.SSLError) as e:
        raise ToolFailed(f"no TLS handshake with Azurite at {azurite.account_url}: {e}") from None
    try:
        with socket.create_connection(("127.0.0.1", azurite.port), timeout=10) as plain:
            plain.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            answer = plain.recv(64)
    except OSError:
        answer = b""
    if answer.startswith(b"HTTP/"):
        raise ToolFailed(f"Azurite at port {azurite.port} answers plain HTTP too: {answer!r}")
    return (f"TLS: Azurite over HTTPS only ({azurite.account_url}; plain HTTP gets no answer there), "
            f"its certificate from a CA made for this run, the only one every tool is pointed at "
            f"(Python negotiates {version} {cipher})")


# --- results --------------------------------------------------------------------

@dataclass
class Scenario:
    """One thing to move (e.g. one 1 GiB blob) and each tool's seconds per round."""
    name: str
    files: int
    nbytes: int
    tools: dict[str, str] = field(default_factory=dict)       # tool -> how it was run
    seconds: dict[str, list[float]] = field(default_factory=dict)  # tool -> one entry per round

    def add(self, tool: str, seconds: float) -> None:
        self.seconds.setdefault(tool, []).append(seconds)

    def median_seconds(self, tool: str) -> float:
        return median(self.seconds.get(tool, []))

    def median_rate(self, tool: str) -> float:
        return mib_per_s(self.nbytes, self.median_seconds(tool))

    def paired_ratio(self, tool: str, reference: str) -> float:
        """The median over rounds of the reference's seconds over the tool's
        in the same round (a throughput ratio). The two ran minutes apart at
        most, so a host whose load drifts over the run moves both; the
        ratio of per-tool medians can pair a quiet round of one with a busy
        round of the other."""
        pairs = [r / t for t, r in zip(self.seconds.get(tool, []), self.seconds.get(reference, [])) if t > 0]
        return median(pairs) if pairs else float("nan")


def print_report(scenarios: list[Scenario], subject: str = "mountd", header: dict | None = None,
                 out=sys.stdout) -> None:
    """Median seconds and MiB/s per scenario and tool, the throughput ratio
    subject/other (>1: subject is faster), then every round's raw seconds."""
    p = lambda s="": print(s, file=out)  # noqa: E731
    for k, v in (header or {}).items():
        p(f"{k}: {v}")
    tw = tool_width(scenarios)
    p()
    p(f"{'scenario':<28} {'tool':<{tw}} {'median s':>9} {'MiB/s':>9} {f'{subject}/tool':>12}")
    p("-" * (62 + tw))
    for sc in scenarios:
        label = f"{sc.name} ({sc.files} x {fmt_size(sc.nbytes // max(sc.files, 1))})"
        subject_rate = sc.median_rate(subject) if subject in sc.seconds else None
        for tool in sc.seconds:
            rate = sc.median_rate(tool)
            ratio = "" if tool == subject or subject_rate is None else f"{subject_rate / rate:.2f}x"
            p(f"{label:<28} {tool:<{tw}} {sc.median_seconds(tool):>9.2f} {rate:>9.1f} {ratio:>12}")
            label = ""
    _print_rounds_and_tools(p, scenarios)


def tool_width(scenarios: list[Scenario]) -> int:
    """Width of the tool column: the longest tool name, at least 14."""
    return max([14] + [len(t) for sc in scenarios for t in sc.seconds])


def _print_rounds_and_tools(p, scenarios: list[Scenario]) -> None:
    """The raw per-round seconds and each tool's command line, after a table."""
    tw = tool_width(scenarios)
    p()
    p("raw seconds per round:")
    for sc in scenarios:
        for tool, secs in sc.seconds.items():
            p(f"  {sc.name:<10} {tool:<{tw}} " + "  ".join(f"{s:7.2f}" for s in secs))
    p()
    p("how each tool was run:")
    for sc in scenarios:
        for tool, how in sc.tools.items():
            p(f"  {sc.name:<10} {tool:<{tw}} {how}")


def report_dict(scenarios: list[Scenario], subject: str = "mountd", header: dict | None = None) -> dict:
    out = {"header": header or {}, "subject": subject, "scenarios": []}
    for sc in scenarios:
        d = asdict(sc)
        d["median_seconds"] = {t: sc.median_seconds(t) for t in sc.seconds}
        d["median_mib_per_s"] = {t: sc.median_rate(t) for t in sc.seconds}
        if subject in sc.seconds:
            d[f"{subject}_throughput_ratio"] = {t: sc.median_rate(subject) / sc.median_rate(t)
                                                for t in sc.seconds if t != subject}
        out["scenarios"].append(d)
    return out


def write_json(path: str, scenarios: list[Scenario], subject: str = "mountd", header: dict | None = None) -> None:
    with open(path, "w") as f:
        json.dump(report_dict(scenarios, subject, header), f, indent=2)
        f.write("\n")


# --- reading through mounts (bench_mount) ---------------------------------------

def drop_page_cache() -> None:
    """Write back dirty pages, then drop the page cache, dentries and inodes
    (needs root), so the next read really comes from below the page cache."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def run_timed_capture(argv: list[str], env: dict | None = None, timeout: float | None = None) -> tuple[float, bytes]:
    """Like run_timed, but returns (wall-clock seconds, the command's stdout)."""
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=timeout)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-15:]
        raise ToolFailed(f"{os.path.basename(argv[0])} exited with {proc.returncode}:\n  " + "\n  ".join(tail))
    return elapsed, proc.stdout


def dd_read(path: str, block: str = "1M", timeout: float | None = None) -> tuple[float, int]:
    """Time `dd if=path of=/dev/null bs=block`; returns (wall-clock seconds,
    bytes dd says it copied)."""
    import re
    argv = ["dd", f"if={path}", "of=/dev/null", f"bs={block}"]
    start = time.perf_counter()
    proc = subprocess.run(argv, env={**os.environ, "LC_ALL": "C"}, stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout)
    elapsed = time.perf_counter() - start
    err = proc.stderr.decode(errors="replace")
    if proc.returncode != 0:
        raise ToolFailed(f"dd of {path} exited with {proc.returncode}:\n  "
                         + "\n  ".join(err.strip().splitlines()[-5:]))
    m = re.search(r"^(\d+) bytes", err, re.MULTILINE)
    if not m:
        raise ToolFailed(f"dd of {path}: no byte count in its output: {err.strip()!r}")
    return elapsed, int(m.group(1))


def parallel_read(paths: list[str], workers: int = 8, block: int = MiB) -> tuple[float, int]:
    """Read every file to its end in `block`-byte reads with `workers`
    threads, each taking a disjoint contiguous share of `paths`; returns
    (wall-clock seconds, total bytes read)."""
    from concurrent.futures import ThreadPoolExecutor
    shares = [paths[i * len(paths) // workers:(i + 1) * len(paths) // workers] for i in range(workers)]

    def reader(share: list[str]) -> int:
        view = memoryview(bytearray(block))
        total = 0
        for path in share:
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(view):
                    total += n
        return total

    with ThreadPoolExecutor(workers) as pool:
        start = time.perf_counter()
        totals = list(pool.map(reader, shares))
        elapsed = time.perf_counter() - start
    return elapsed, sum(totals)


def proc_status(pid: int) -> dict[str, str]:
    """The fields of /proc/PID/status (e.g. 'VmHWM': '123456 kB')."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def proc_status_bytes(pid: int, key: str) -> int:
    """A kB field of /proc/PID/status (VmHWM, VmRSS, ...) in bytes."""
    return int(proc_status(pid)[key].split()[0]) * 1024


def dir_bytes(path: str, apparent: bool = True) -> int:
    """`du -sb` of a directory (apparent size), or with apparent=False the
    bytes actually allocated on disk (`du -s --block-size=1`)."""
    argv = ["du", "-sb", path] if apparent else ["du", "-s", "--block-size=1", path]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def mounts_under(root: str) -> list[str]:
    """Mount points at or below `root`."""
    root = os.path.abspath(root)
    return [m for m in mount_points() if m == root or m.startswith(root + "/")]


def wait_mounted(path: str, timeout: float, proc: subprocess.Popen | None = None) -> float:
    """Wait until `path` is a mount point; returns the seconds waited. Raises
    ToolFailed on timeout or if `proc` exits first."""
    start = time.perf_counter()
    while not is_mounted(path):
        if proc is not None and proc.poll() is not None:
            raise ToolFailed(f"{os.path.basename(str(proc.args[0]))} exited with {proc.returncode} "
                             f"before {path} was mounted")
        if time.perf_counter() - start > timeout:
            raise ToolFailed(f"{path} is not mounted after {timeout:.0f} s")
        time.sleep(0.05)
    return time.perf_counter() - start


def print_count_report(scenarios: list[Scenario], subject: str = "mountd", unit: str = "entries",
                       out=sys.stdout) -> None:
    """print_report for scenarios where the count matters, not the bytes (a
    directory listing, say): median seconds, `unit`/s (Scenario.files per
    second) and the speed ratio subject/tool = tool seconds / subject seconds
    (>1: subject is faster), then every round's raw seconds and how each tool
    was run."""
    p = lambda s="": print(s, file=out)  # noqa: E731
    rate_head = f"{unit}/s"
    tw = tool_width(scenarios)
    p(f"{'scenario':<28} {'tool':<{tw}} {'median s':>9} {rate_head:>9} {f'{subject}/tool':>12}")
    p("-" * (62 + tw))
    for sc in scenarios:
        label = f"{sc.name} ({sc.files} {unit})"
        subject_s = sc.median_seconds(subject) if subject in sc.seconds else None
        for tool in sc.seconds:
            secs = sc.median_seconds(tool)
            ratio = "" if tool == subject or subject_s is None else f"{secs / subject_s:.2f}x"
            rate = sc.files / secs if secs > 0 else float("inf")
            p(f"{label:<28} {tool:<{tw}} {secs:>9.2f} {rate:>9.0f} {ratio:>12}")
            label = ""
    _print_rounds_and_tools(p, scenarios)
