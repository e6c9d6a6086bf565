#!/usr/bin/env bash
# Quickstart with no cloud account: install mountd, register a local
# datastore, upload the sample data into it and download it back.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PATH="$PWD/.venv/bin:$PATH"   # when install.sh had to use a virtual environment

demo=/tmp/mountd-quickstart
set -x
mountd datastore register-local quickstart --root "$demo/store" --create-if-not-exists --overwrite
mountd datastore list
mountd upload quickstart configs/sample-data --target-path datasets/sample --overwrite
mountd download quickstart "$demo/downloaded" --prefix datasets/sample --overwrite
set +x
diff -r configs/sample-data "$demo/downloaded/datasets/sample"
echo "quickstart: the sample data went up to the 'quickstart' datastore and came back byte for byte in $demo/downloaded"
