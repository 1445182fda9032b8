#!/usr/bin/env bash
# Run the test suite (creates .venv on first use). Extra arguments go to pytest, e.g.
#   bash scripts/test.sh -m "not slow"      # skip the slow tests (chain / end-to-end modules, multi-process runs,
#                                           # full-size models, subprocess CLIs): the quick check while editing
#   bash scripts/test.sh tests/unit/test_cohort.py -x
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup_env.sh"
ruff check . || { echo "[test] ruff found problems (ruff check --fix . mends most)" >&2; exit 1; }
python -m pytest -q "$@"
