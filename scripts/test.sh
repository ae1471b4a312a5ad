#!/usr/bin/env bash
# Install everything from scratch, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python3 -m pytest -q -ra "$@"
