#!/usr/bin/env bash
# Sourced by scripts/demo.sh and scripts/test.sh: create .venv when missing or stale, then activate it.
# "Stale" = the hash of the requirement files (and TORCH_INDEX_URL) differs from the stamp written after the last
# good install, so a second run does not reinstall.
#   PYTHON           interpreter for a new .venv (default python3); must be Python >= 3.11 (every pin needs it)
#   TORCH_INDEX_URL  pip index for the torch/torchvision wheels (default: PyPI, whose Linux torch bundles CUDA):
#                    https://download.pytorch.org/whl/cpu for CPU-only machines (no 5 GB of CUDA libraries),
#                    .../whl/cu126, .../whl/cu128, ... for a CUDA build your NVIDIA driver supports (README, Install)
#   VENV             where the environment goes (default .venv in the repository)
set -euo pipefail
_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_venv="${VENV:-$_repo/.venv}"
_stamp="$_venv/.requirements.sha256"
_torch_index="${TORCH_INDEX_URL:-}"
_want="$( (cat "$_repo/requirements.txt" "$_repo/requirements-nodeps.txt"
          [ -z "$_torch_index" ] || echo "torch index: $_torch_index") | sha256sum | cut -d' ' -f1)"
if [ ! -x "$_venv/bin/python" ] || [ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ]; then
  _py="${PYTHON:-python3}"
  [ -x "$_venv/bin/python" ] && _py="$_venv/bin/python"
  if ! _pyver="$("$_py" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)"; then
    echo "[setup] cannot run the Python interpreter '$_py'; set PYTHON=/path/to/python3.11 (or newer)" >&2
    exit 1
  fi
  if ! "$_py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
    _fix="run again with PYTHON=/path/to/python3.11 (or newer)"
    [ -x "$_venv/bin/python" ] && _fix="delete $_venv and $_fix"
    echo "[setup] $_py is Python $_pyver, but the pinned packages (numpy 2.3, scipy 1.17, ...) need Python >= 3.11:" \
         "$_fix" >&2
    exit 1
  fi
  echo "[setup] installing the environment into $_venv with Python $_pyver (first run: ~2-3 min)"
  [ -x "$_venv/bin/python" ] || "$_py" -m venv "$_venv"
  "$_venv/bin/python" -m pip install -q --upgrade pip
  # torch first, from its own index when TORCH_INDEX_URL is set, so that build is the one the requirements see
  mapfile -t _torch_pins < <(grep -E '^(torch|torchvision)==' "$_repo/requirements.txt")
  if [ -n "$_torch_index" ]; then
    "$_venv/bin/python" -m pip install -q --index-url "$_torch_index" "${_torch_pins[@]}"
  else
    "$_venv/bin/python" -m pip install -q "${_torch_pins[@]}"
  fi
  "$_venv/bin/python" -m pip install -q -r "$_repo/requirements.txt"
  "$_venv/bin/python" -m pip install -q --no-deps -r "$_repo/requirements-nodeps.txt"
  "$_venv/bin/python" -c "import torch, timm, palom, torchscale, openslide, tifffile, h5py" \
    || { echo "[setup] the environment does not import; see the errors above" >&2; exit 1; }
  echo "$_want" > "$_stamp"
fi
# the project itself, editable (its packages import from any folder); redone when pyproject.toml changes
_proj="$(sha256sum "$_repo/pyproject.toml" | cut -d' ' -f1)"
if [ "$(cat "$_venv/.project.sha256" 2>/dev/null)" != "$_proj" ]; then
  _log="$_venv/.project-install.log"
  "$_venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$_repo" >"$_log" 2>&1 \
    || "$_venv/bin/python" -m pip install -q --no-deps -e "$_repo" >>"$_log" 2>&1 \
    || { cat "$_log" >&2; echo "[setup] pip install -e $_repo failed; see the errors above" >&2; exit 1; }
  echo "$_proj" > "$_venv/.project.sha256"
fi
# shellcheck disable=SC1091
source "$_venv/bin/activate"
cd "$_repo"
# idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning slows training up to 20x
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
