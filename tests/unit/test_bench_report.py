"""The benchmarks' arithmetic (the ratios the README quotes, CPU per GiB, CPU per phase of a
whole job) and the environment that makes every tool trust a TLS run's CA."""

import math

from tests.benchmarks.common import Scenario

MiB = 1 << 20


def test_paired_ratio_pairs_each_round_with_its_own_reference():
    sc = Scenario("a-cold", 1, 1024 * MiB)
    for tool, secs in (("mountd", [2.0, 4.0, 3.0]), ("curl", [1.0, 4.0, 2.4])):
        for s in secs:
            sc.add(tool, s)
    # rounds: 1/2, 4/4, 2.4/3 -> median 0.8; the ratio of medians is 2.4/3 = 0.8 too, by chance
    assert math.isclose(sc.paired_ratio("mountd", "curl"), 0.8)
    sc.add("mountd", 1.0)
    sc.add("curl", 3.0)  # a quiet round for mountd next to a busy one for curl
    assert math.isclose(sc.paired_ratio("mountd", "curl"), (0.8 + 1.0) / 2)
    assert math.isclose(sc.median_rate("mountd") / sc.median_rate("curl"), 2.7 / 2.5)


def test_paired_ratio_without_rounds_is_nan():
    sc = Scenario("a-cold", 1, MiB)
    sc.add("mountd", 1.0)
    assert math.isnan(sc.paired_ratio("mountd", "curl"))


def test_cpu_per_gib_scales_each_round_and_adds_the_reader():
    from tests.benchmarks.bench_mount import CpuRound, Results, cpu_per_gib
    res = Results(cpu=[CpuRound(1, "mountd", 512 * MiB, 1.0, 0.25), CpuRound(2, "mountd", 512 * MiB, 3.0, 0.5),
                       CpuRound(1, "curl", 1024 * MiB, 0.75, None)])
    cpu = cpu_per_gib(res)
    assert list(cpu) == ["mountd", "curl"]
    assert cpu["mountd"] == {"process": 4.0, "reader": 0.75, "total": 4.75, "rounds": [2.0, 6.0]}
    assert cpu["curl"] == {"process": 0.75, "reader": None, "total": 0.75, "rounds": [0.75]}


def test_process_cpu_seconds_reads_this_process():
    import os

    from tests.benchmarks.common import process_cpu_seconds
    t = os.times()
    assert abs(process_cpu_seconds(os.getpid()) - (t.user + t.system)) < 0.05


def test_tool_env_points_every_tool_at_the_run_ca_over_tls(tmp_path):
    from tests.benchmarks.common import CA_FILE_VARIABLES, curl_tls_flags, tool_env
    from tests.support.azurite import Azurite
    base = {"SSL_CERT_FILE": "/sys.pem", "SSL_CERT_DIR": "/etc/ssl/certs", "REQUESTS_CA_BUNDLE": "/sys.pem",
            "CURL_CA_BUNDLE": "/sys.pem", "PATH": "/bin"}
    plain = Azurite(location=str(tmp_path))
    assert tool_env(plain, base) == base and curl_tls_flags(plain) == []
    tls = Azurite(location=str(tmp_path), cert="c.pem", key="k.pem", ca="/run/ca.pem")
    env = tool_env(tls, base)
    assert {v: env[v] for v in CA_FILE_VARIABLES} == dict.fromkeys(CA_FILE_VARIABLES, "/run/ca.pem")
    assert "SSL_CERT_DIR" not in env and env["PATH"] == "/bin"
    assert curl_tls_flags(tls) == ["--proto", "=https", "--cacert", "/run/ca.pem"]


def test_process_cpu_split_is_user_and_system():
    import os

    from tests.benchmarks.common import process_cpu_split
    t = os.times()
    user, system = process_cpu_split(os.getpid())
    assert abs(user - t.user) < 0.05 and abs(system - t.system) < 0.05


def test_host_cpu_seconds_counts_this_process_busy_and_no_more_than_every_core():
    import os
    import time

    from tests.benchmarks.common import host_cpu_seconds
    before, start = host_cpu_seconds(), time.perf_counter()
    while time.perf_counter() - start < 0.3:
        pass  # spin: this core busy for 0.3 s
    used, wall = host_cpu_seconds() - before, time.perf_counter() - start
    assert 0.2 <= used <= os.cpu_count() * wall + 0.05


def test_epoch_cpu_table_adds_phases_and_gives_the_rest_of_the_host():
    import io

    from tests.benchmarks.bench_epochs import Bench, Job, Results, report_cpu
    marks = [{"wall": 10.0 * i, "azurite": 3.0 * i, "tool": 2.0 * i, "tool sys": 1.0 * i, "loaders": 1.0 * i,
              "host": 8.0 * i} for i in range(5)]
    phases = [Bench.cpu_phase(a, b) for a, b in zip(marks, marks[1:])]
    assert phases[0] == {"wall": 10.0, "azurite": 3.0, "tool": 2.0, "tool sys": 1.0, "loaders": 1.0, "rest": 2.0}
    job = Job("mountd", 0, 10.0, [10.0, 10.0, 10.0], phases)
    assert job.cpu_of(slice(0, 2))["azurite"] == 6.0
    res = Results("small", 1000, 1, [job])
    summary = {"tools": {"mountd": {}}}
    out = io.StringIO()
    report_cpu(res, ["mountd"], summary, lambda *a: print(*a, file=out))
    first = summary["tools"]["mountd"]["cpu"]["set-up+ep 1"]
    assert first["wall"] == 20.0 and first["busy"] == 0.6 and first["tool_ms_per_file"] == 4.0
    assert "set-up+ep 1" in out.getvalue()


def test_an_epoch_with_a_training_step_ends_when_the_last_sample_is_trained_on(tmp_path):
    import time
    import zlib

    from tests.benchmarks.bench_epochs import run_epoch

    class Pool:  # the loaders, in this process: samples arrive at once, or one every `gap` seconds
        gap = 0.0

        def imap_unordered(self, fn, paths, chunksize):
            for p in paths:
                time.sleep(self.gap)
                yield fn(p)
    files = {}
    for i in range(20):
        (tmp_path / f"f{i}").write_bytes(b"x" * i)
        files[f"f{i}"] = (i, zlib.crc32(b"x" * i))
    pool = Pool()
    assert run_epoch(pool, str(tmp_path), files, seed=1) < 0.1
    assert 0.2 <= run_epoch(pool, str(tmp_path), files, seed=1, step=0.01) < 0.3  # 20 steps after fast reads
    pool.gap = 0.02
    # reads slower than training: the accelerator waits for each sample, and adds one step at the end
    assert 0.4 <= run_epoch(pool, str(tmp_path), files, seed=1, step=0.01) < 0.5
