"""scripts/install.sh on Debian's own Python, which refuses system-wide pip
installs: mountd lands in .venv and is on PATH through a link, a second run
installs nothing (it would fail here: the index is switched off), and another
mountd already on PATH is left alone."""

import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEBIAN_PYTHON = "/usr/bin/python3"
SKIP = {".git", ".venv", ".install-stamp", "mountd-runs", "__pycache__", ".pytest_cache"}


def _externally_managed() -> bool:
    if not os.access(DEBIAN_PYTHON, os.X_OK):
        return False
    r = subprocess.run([DEBIAN_PYTHON, "-c", "import sys, sysconfig, os; print(sys.version_info >= (3, 11) and "
                        "os.path.exists(os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED')))"],
                       capture_output=True, text=True)
    return r.stdout.strip() == "True"


@pytest.mark.skipif(not _externally_managed(), reason="no externally managed system Python >= 3.11 here")
def test_install_on_debians_python_puts_mountd_on_path_and_a_second_run_installs_nothing(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=lambda d, names: [n for n in names if n in SKIP])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # only the system's directories on PATH: python3 is Debian's
    env = {"PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(tmp_path), "MOUNTD_BIN_DIR": str(bin_dir),
           "PIP_CACHE_DIR": os.path.join(os.path.expanduser("~"), ".cache", "pip")}
    env.update({k: v for k, v in os.environ.items() if k.endswith("_proxy") or k.endswith("_PROXY")})
    first = subprocess.run(["bash", "scripts/install.sh"], cwd=src, env=env, capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    venv_mountd = src / ".venv" / "bin" / "mountd"
    assert first.stdout.strip() == f"mountd installed: {venv_mountd} (linked from {bin_dir}/mountd)", first.stdout
    assert os.readlink(bin_dir / "mountd") == str(venv_mountd)
    # found on PATH by name, as a user types it, and it is this tree's
    r = subprocess.run(["mountd", "--version"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("mountd "), r.stdout + r.stderr
    r = subprocess.run(["mountd", "validate", "--offline", str(src / "configs" / "quickstart.yaml")], cwd=src,
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    # the second run installs nothing: with the index off, a pip install would fail
    second = subprocess.run(["bash", "scripts/install.sh"], cwd=src, env=dict(env, PIP_NO_INDEX="1"),
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stdout == first.stdout

    # a mountd that is not this one's link is left alone, and the line says so
    os.unlink(bin_dir / "mountd")
    (bin_dir / "mountd").write_text("#!/bin/sh\necho another\n")
    third = subprocess.run(["bash", "scripts/install.sh"], cwd=src, env=dict(env, PIP_NO_INDEX="1"),
                           capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stdout + third.stderr
    assert third.stdout.strip().endswith(f"({bin_dir}/mountd is another one: call this one by its path)"), third.stdout
    assert (bin_dir / "mountd").read_text() == "#!/bin/sh\necho another\n"
