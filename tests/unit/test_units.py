"""The unit files in systemd/ pass `systemd-analyze verify` without a
warning, and carry the settings the service depends on."""

import configparser
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UNITS = {"mountd@.service": "mountd@train.service", "mountd-job@.service": "mountd-job@exp42.service"}


@pytest.fixture(scope="module")
def analyze():
    tool = shutil.which("systemd-analyze")
    if not tool:
        message = "systemd-analyze is not installed (Debian package systemd; scripts/install.sh --test installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return tool


def _verify(analyze, directory, body_of):
    """Write the units into `directory` and verify an instance of each.
    verify insists that ExecStart's program exists: the installed path
    (/usr/local/bin/mountd) is pointed at this Python for the check."""
    paths = []
    for name, instance in UNITS.items():
        with open(os.path.join(REPO, "systemd", name), encoding="utf-8") as f:
            text = body_of(f.read()).replace("/usr/local/bin/mountd", sys.executable)
        with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
            f.write(text)
        paths.append(os.path.join(directory, instance))
    r = subprocess.run([analyze, "verify", *paths], capture_output=True, text=True, timeout=120)
    complaints = [line for line in (r.stdout + r.stderr).splitlines() if "mountd" in line]
    return r.returncode, complaints


def test_units_pass_systemd_analyze_verify(analyze, tmp_path):
    code, complaints = _verify(analyze, str(tmp_path), lambda text: text)
    assert code == 0 and complaints == [], complaints


def test_verify_would_catch_a_mistake(analyze, tmp_path):
    code, complaints = _verify(analyze, str(tmp_path), lambda text: text.replace("KillMode=mixed", "KillMode=gently"))
    assert code != 0 or complaints


def _service(name):
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str
    with open(os.path.join(REPO, "systemd", name), encoding="utf-8") as f:
        parser.read_string(f.read())
    return parser["Service"]


def test_daemon_unit_settings():
    s = _service("mountd@.service")
    assert s["Type"] == "notify" and s["KillMode"] == "mixed" and s["DeviceAllow"] == "/dev/fuse rw"
    assert s["CapabilityBoundingSet"] == "CAP_SYS_ADMIN" and s["DevicePolicy"] == "closed"
    assert "/etc/mountd/%i.yaml" in s["ExecStart"] and s["RestartPreventExitStatus"] == "2"
    # mounts must be visible outside the unit: nothing that makes a mount namespace
    for key in ("ProtectSystem", "ReadWritePaths", "PrivateTmp", "ProtectHome", "PrivateDevices", "MountFlags"):
        assert key not in s, key
    stop = s["TimeoutStopSec"]
    assert stop.endswith("min") and int(stop[:-3]) * 60 > 780  # longer than the upload deadline


def test_job_unit_settings():
    s = _service("mountd-job@.service")
    assert s["ExecStart"].split()[1] == "run" and s["KillMode"] == "mixed"
    assert s["ProtectSystem"] == "strict" and "/mnt/mountd" in s["ReadWritePaths"]


def test_container_manifest_validates_and_spreads_outputs_by_node():
    manifest = os.path.join(REPO, "configs", "container", "manifest.yaml")
    env = dict(os.environ, STORAGE_KEY="bm90LXVzZWQtYnktdmFsaWRhdGU=", NODE_RANK="3")
    r = subprocess.run([sys.executable, "-m", "mountd", "validate", "--offline", manifest], capture_output=True,
                       text=True, env=env, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "upload training:runs/exp42/outputs/3 ->" in r.stdout


def test_cluster_examples_parse():
    import yaml
    with open(os.path.join(REPO, "configs", "cluster", "kubernetes-indexed-job.yaml"), encoding="utf-8") as f:
        job = yaml.safe_load(f)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert {e["name"] for e in container["env"]} >= {"NODE_RANK", "STORAGE_KEY"}
    script = os.path.join(REPO, "configs", "cluster", "slurm-train.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
