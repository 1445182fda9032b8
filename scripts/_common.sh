#!/usr/bin/env bash
# Sourced by the numbered stage scripts: activates .venv when present and runs from the repo root.
set -euo pipefail
_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$_repo"
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f "$_repo/.venv/bin/activate" ]; then
  # shellcheck disable=SC1091
  source "$_repo/.venv/bin/activate"
fi
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
export PYTHONPATH="$_repo${PYTHONPATH:+:$PYTHONPATH}"
# A stage whose python module is not in this checkout yet stops here with a clear message.
require_module() {
  local path="$_repo/$(echo "$1" | tr . /)"
  if [ ! -f "$path.py" ] && [ ! -f "$path/__main__.py" ]; then
    echo "[$(basename "$0")] stage not implemented yet: python module $1 is missing in this checkout" >&2
    exit 3
  fi
}
