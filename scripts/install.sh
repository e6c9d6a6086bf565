#!/usr/bin/env bash
# Installs mountd from this checkout, and with --test what its tests need:
# fuse3 (Debian), Azurite (npm, pinned), the package with its test extra.
# On a Python that refuses system-wide pip installs (Debian's own), it uses a
# virtual environment in .venv. Prints nothing else on success but one line.
set -euo pipefail
cd "$(dirname "$0")/.."

AZURITE_VERSION=3.37.0
WITH_TESTS=0
[ "${1:-}" = "--test" ] && WITH_TESTS=1

apt_packages=()
need() { command -v "$1" >/dev/null 2>&1 || apt_packages+=("$2"); }
need python3 python3
need git git
need curl curl
need fusermount3 fuse3
if [ "$WITH_TESTS" = 1 ]; then
    need unshare util-linux
    need systemd-analyze systemd  # the unit files are checked with `systemd-analyze verify`
    need node nodejs
    need npm npm
fi
PY=python3
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "mountd needs Python 3.11 or newer" >&2
    exit 1
fi
# Debian's Python marks itself externally managed: use a virtual environment.
if python3 -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'; then
    python3 -c 'import ensurepip' 2>/dev/null || apt_packages+=("python3-venv")
    USE_VENV=1
else
    USE_VENV=0
fi
if [ "${#apt_packages[@]}" -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${apt_packages[@]}" >/dev/null
fi
if [ "$USE_VENV" = 1 ]; then
    [ -x .venv/bin/python ] || python3 -m venv .venv
    PY="$PWD/.venv/bin/python"
fi
extra=""
[ "$WITH_TESTS" = 1 ] && extra="[test]"
# pip only when something changed: the interpreter, the declared dependencies,
# the extra, or where the installed mountd points (each run of the tests would
# otherwise spend ~10 s reinstalling what is there)
stamp="$("$PY" -c 'import sys; print(sys.executable)') $(sha256sum pyproject.toml | cut -c1-16) ${extra}"
here="$PWD"
installed_here() { (cd / && "$PY" -c 'import mountd, os, sys; sys.exit(os.path.dirname(os.path.dirname(os.path.abspath(mountd.__file__))) != sys.argv[1])' "$here") 2>/dev/null; }
if [ "$(cat .install-stamp 2>/dev/null)" != "$stamp" ] || ! installed_here; then
    "$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore -e ".${extra}"
    echo "$stamp" > .install-stamp
fi
if [ "$WITH_TESTS" = 1 ]; then
    if [ "$(azurite-blob --version 2>/dev/null)" != "$AZURITE_VERSION" ]; then
        npm install -g --silent --no-fund --no-audit "azurite@${AZURITE_VERSION}" >/dev/null 2>&1 \
            || npm install -g --no-fund --no-audit "azurite@${AZURITE_VERSION}"
    fi
fi
where="$("$PY" -c 'import sys, os; print(os.path.join(os.path.dirname(sys.executable), "mountd"))')"
# In a virtual environment the command is not on PATH: link it from
# /usr/local/bin (or $MOUNTD_BIN_DIR) when that is ours to write and holds no
# other mountd.
bin_dir="${MOUNTD_BIN_DIR:-/usr/local/bin}"
if [ "$USE_VENV" = 1 ] && [ -w "$bin_dir" ]; then
    if [ ! -e "$bin_dir/mountd" ] || [ "$(readlink "$bin_dir/mountd")" = "$where" ]; then
        ln -sfn "$where" "$bin_dir/mountd"
        where="$where (linked from $bin_dir/mountd)"
    else
        where="$where ($bin_dir/mountd is another one: call this one by its path)"
    fi
fi
echo "mountd installed: $where"
