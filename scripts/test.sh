#!/usr/bin/env bash
# Installs everything the tests need (see install.sh) and runs the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
exec "$PY" -m pytest tests "$@"
