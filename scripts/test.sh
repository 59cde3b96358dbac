#!/usr/bin/env bash
# The test command: set up (idempotent), then run the whole suite, slow and multi-process tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q "$@"
