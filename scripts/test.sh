#!/usr/bin/env bash
# Run the test suite (creates .venv on first use). Extra arguments go to pytest, e.g.
#   bash scripts/test.sh -m "not slow"      # skip the slow tests
#   bash scripts/test.sh tests/test_cohort.py -x
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup_env.sh"
ruff check . || { echo "[test] ruff found problems (ruff check --fix . mends most)" >&2; exit 1; }
python -m pytest -q "$@"
