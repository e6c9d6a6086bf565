"""The benchmarks' arithmetic (the ratios the README quotes, CPU per GiB) and
the environment that makes every tool trust a TLS run's CA."""

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
