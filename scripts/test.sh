#!/usr/bin/env bash
# Installs everything the tests need (see install.sh), runs the checkers
# (mypy on mountd/, ruff on mountd/ and tests/, configured in pyproject.toml),
# then the suite, then the TLS lane: the storage, mount and run tests again
# over HTTPS (strict Azurite, the Files emulator over HTTPS, the test CA
# trusted through the environment; see tests/conftest.py). Arguments go to
# both pytest runs. Fails if a checker or either run fails; a checker's
# failure does not stop the tests, so one run shows everything.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test || exit
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python

TLS_LANE=(tests/integration/test_lane.py tests/integration/test_storage.py tests/integration/test_fileshare.py
          tests/integration/test_mount.py tests/integration/test_rw_mount.py tests/integration/test_run.py)

verdict() { case "$1" in 0) echo "passed";; 5) echo "no tests selected (exit 5)";; *) echo "FAILED (exit $1)";; esac; }

# The contracts the machine checks, before the tests (README, "Static checks").
"$PY" -m mypy
mypy=$?
echo "mypy: $(verdict $mypy)"
"$PY" -m ruff check mountd tests
ruff=$?
echo "ruff: $(verdict $ruff)"
echo

start=$SECONDS
"$PY" -m pytest tests "$@"
main=$?
main_time=$((SECONDS - start))

start=$SECONDS
echo
echo "=== TLS lane: ${TLS_LANE[*]#tests/integration/} ==="
MOUNTD_TEST_LANE=tls "$PY" -m pytest "${TLS_LANE[@]}" "$@"
lane=$?
lane_time=$((SECONDS - start))

echo
echo "mypy: $(verdict $mypy); ruff: $(verdict $ruff)"
echo "main run: $(verdict $main) in ${main_time}s; TLS lane: $(verdict $lane) in ${lane_time}s"
# A filter of the caller's that selects nothing in the lane (pytest's exit 5) is not a failure.
[ "$lane" = 5 ] && [ "$#" -gt 0 ] && lane=0
[ "$mypy" = 0 ] && [ "$ruff" = 0 ] && [ "$main" = 0 ] && [ "$lane" = 0 ]
