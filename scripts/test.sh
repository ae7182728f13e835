#!/usr/bin/env bash
# Set up (idempotent), lint, type-check and run the default test suite. Extra arguments go to pytest
# (e.g. -m "not slow", or a test file).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "[test] ruff"
.venv/bin/ruff check cl streams evaluation strategies tests benchmarks scripts
echo "[test] mypy"
.venv/bin/mypy
echo "[test] pytest"
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
