#!/usr/bin/env bash
# Sourced by scripts/demo.sh and scripts/test.sh: create .venv when missing or stale, then activate it.
# "Stale" = the hash of the requirement files differs from the stamp written after the last good install,
# so a second run does not reinstall. PYTHON picks the interpreter (default python3, 3.10+).
set -euo pipefail
_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_venv="${VENV:-$_repo/.venv}"
_stamp="$_venv/.requirements.sha256"
_want="$(cat "$_repo/requirements.txt" "$_repo/requirements-nodeps.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$_venv/bin/python" ] || [ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ]; then
  echo "[setup] installing the environment into $_venv (first run: ~2-3 min)"
  [ -x "$_venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$_venv"
  "$_venv/bin/python" -m pip install -q --upgrade pip
  # torch first, from its own line, so the pinned CPU/CUDA wheel is chosen before anything asks for torch
  "$_venv/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  "$_venv/bin/python" -m pip install -q -r "$_repo/requirements.txt"
  "$_venv/bin/python" -m pip install -q --no-deps -r "$_repo/requirements-nodeps.txt"
  "$_venv/bin/python" -c "import torch, timm, palom, torchscale, openslide, tifffile, h5py" \
    || { echo "[setup] the environment does not import; see the errors above" >&2; exit 1; }
  echo "$_want" > "$_stamp"
fi
# shellcheck disable=SC1091
source "$_venv/bin/activate"
cd "$_repo"
# idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning slows training up to 20x
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
export PYTHONPATH="$_repo${PYTHONPATH:+:$PYTHONPATH}"
