#!/usr/bin/env bash
# The test command: set up (idempotent), lint, format-check and type-check, then run the whole
# suite, slow and multi-process tests included. Extra arguments go to pytest (e.g. -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check ptcli tests bench scripts
ruff format --check ptcli tests bench scripts
mypy ptcli
python -m pytest -q "$@"
