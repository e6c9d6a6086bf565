#!/usr/bin/env bash
# Quickstart with no cloud account: install mountd, then run the quickstart
# manifest. It mounts the sample images (a local datastore, through FUSE),
# downloads the labels, trains, and uploads the outputs to the built-in local
# datastore `workspacelocalstore`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PATH="$PWD/.venv/bin:$PATH"   # when install.sh had to use a virtual environment
mountd run configs/quickstart.yaml --work-dir /tmp/mountd-quickstart/work
echo "quickstart: outputs uploaded under $(python3 -c 'import os; print(os.path.join(os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "mountd/workspacelocalstore/runs"))')"
