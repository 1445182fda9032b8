#!/usr/bin/env bash
# One prepared check for a GPU machine (one H200, no network, python3 with torch but without openslide, palom,
# torchscale ...), at most ~9.5 minutes: installs the carried wheels offline (bench/gpu_wheels.sh makes them),
# builds a 3-slide sample cohort, runs stages 01-03 on it, then hex.train (full-size MUSK, random init, batch 48)
# with --amp fp16 and --amp bf16 for a few steps, hex.test, hex.infer_wsi on one held-out slide and
# bench/bench_infer.py, each timed with its exit status; prints ONE table at the end (step, status, seconds, peak
# GPU memory by torch.cuda.max_memory_allocated, key numbers). A failing step does not stop the others. It only
# reads the GPU's state (nvidia-smi queries), never changes it.
#
#   bash bench/gpu_check.sh                                   # from the repo root, on the GPU machine
#   GPU_CHECK_DEVICE=cpu OMP_NUM_THREADS=1 bash bench/gpu_check.sh   # CPU dry run of the logic: tiny MUSK, .venv
#
# Outputs: the table, the step logs and a JSON go to $OUT when set (the device tool's return folder), else to
# $GPU_CHECK_WORK/results; cohort and pipeline outputs stay in $GPU_CHECK_WORK. Variables:
DEVICE=${GPU_CHECK_DEVICE:-cuda}              # cuda, or cpu for a dry run
WORK=${GPU_CHECK_WORK:-/tmp/hex_gpu_check}    # scratch: site-packages, cohort, pipeline outputs (wiped first)
WHEELS=${GPU_WHEELS_DIR:-.gpu_wheels}         # wheels from bench/gpu_wheels.sh (carried along)
BUDGET_S=${GPU_CHECK_BUDGET_S:-550}           # wall-clock budget of all steps; a step gets at most what is left
SLIDES=${GPU_CHECK_SLIDES:-3}
TRAIN_STEPS=${GPU_CHECK_TRAIN_STEPS:-6}       # optimiser steps per epoch (2 epochs: the 2nd gives warm samples/s)
if [ "$DEVICE" = cpu ]; then
  TISSUE_MM=${GPU_CHECK_TISSUE_MM:-0.6}
  BATCH=${GPU_CHECK_BATCH:-8}
  BACKBONE_KW=${GPU_CHECK_BACKBONE_KW:-'{"embed_dim": 64, "depth": 2, "num_heads": 4, "mlp_dim": 128, "img_size": 64}'}
  WORKERS=${GPU_CHECK_WORKERS:-1}
  BENCH_ARGS=${GPU_CHECK_BENCH_ARGS:---device cpu --backbone musk}
else
  TISSUE_MM=${GPU_CHECK_TISSUE_MM:-1.5}
  BATCH=${GPU_CHECK_BATCH:-48}
  BACKBONE_KW=${GPU_CHECK_BACKBONE_KW:-'{}'}   # full-size MUSK-large
  WORKERS=${GPU_CHECK_WORKERS:-8}
  BENCH_ARGS=${GPU_CHECK_BENCH_ARGS:---device cuda --backbone musk}
fi
set -uo pipefail   # no -e: every step runs and lands in the table
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
RESULTS=${OUT:-$WORK/results}
unset OUT          # the stage scripts read OUT as the pipeline root; every command below names its folders
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ "$DEVICE" = cpu ] && [ -x .venv/bin/python ]; then PY=$REPO/.venv/bin/python
else PY=python3; fi
T_START=$(date +%s)
if [ -e "$WORK" ] && [ ! -f "$WORK/.hex_gpu_check" ]; then
  echo "[gpu_check] $WORK exists and was not made by this script: set GPU_CHECK_WORK to a new folder" >&2; exit 2
fi
rm -rf "$WORK"
mkdir -p "$WORK/steps" "$WORK/site" "$RESULTS"
touch "$WORK/.hex_gpu_check"
COHORT=$WORK/cohort
PIPE=$WORK/pipeline
export PYTHONPATH="$REPO" PYTHONUNBUFFERED=1 TQDM_MININTERVAL=${TQDM_MININTERVAL:-5} MPLBACKEND=Agg
export HF_HUB_OFFLINE=1
N=0

# ---------------------------------------------------------------------------------------------------------- helpers
cat >"$WORK/_step.py" <<'EOF'
"""_step.py NAME JSON -- (-m MODULE | SCRIPT.py) ARGS...: run a python step in this process (so that its peak CUDA
memory can be read), record exit status, seconds and torch.cuda.max_memory_allocated in JSON."""
import json
import runpy
import sys
import time
import traceback

name, out = sys.argv[1], sys.argv[2]
cmd = sys.argv[4:]
t0 = time.perf_counter()
rc = 0
try:
    if cmd[0] == "-m":
        sys.argv = [cmd[1], *cmd[2:]]
        runpy.run_module(cmd[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(cmd)
        sys.path.insert(0, str(__import__("pathlib").Path(cmd[0]).resolve().parent))
        runpy.run_path(cmd[0], run_name="__main__")
except SystemExit as e:
    if e.code is None or isinstance(e.code, int):
        rc = int(e.code or 0)
    else:
        print(e.code, file=sys.stderr)
        rc = 1
except BaseException:  # noqa: BLE001 - the table reports it
    traceback.print_exc()
    rc = 1
seconds = time.perf_counter() - t0
peak = None
torch = sys.modules.get("torch")
if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
    peak = torch.cuda.max_memory_allocated() / 2**30
with open(out, "w") as f:
    json.dump({"name": name, "rc": rc, "seconds": seconds, "peak_gib": peak}, f)
sys.stdout.flush()
sys.stderr.flush()
import os  # noqa: E402

os._exit(rc)  # no interpreter teardown: DataLoader workers / CUDA can hang at exit
EOF

cat >"$WORK/_attn.py" <<'EOF'
"""_attn.py DEVICE BACKBONE_KW BATCH: MUSK with SDPA vs eager (torchscale) attention, same weights (random init):
max |difference| of the embeddings in fp32 and bf16, forward time per batch of each, and whether the flash
kernel takes MUSK's attention."""
import contextlib
import json
import sys
import time

import torch

from hex import backbones as bb

dev, kw, batch = torch.device(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
model = bb.create("musk", **kw).to(dev).eval()
x = torch.randn(batch, 3, model.input_size, model.input_size, device=dev)
amp = torch.bfloat16 if dev.type == "cuda" else None


def fwd(mode, dtype, n=None):
    model.set_attention(mode)
    ctx = torch.autocast(dev.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        return model(x[:n]).float()


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


small = min(batch, 8)
ref = fwd("eager", None, small)
d32 = (fwd("sdpa", None, small) - ref).abs().max().item()
print(f"KEY: fp32 max abs diff sdpa-eager {d32:.1e} (max abs emb {ref.abs().max().item():.2f}, batch {small})")
if amp is not None:
    a, b = fwd("eager", amp), fwd("sdpa", amp)
    print(f"KEY: bf16 rel. diff sdpa/eager {((a - b).norm() / a.norm()).item():.1e}")
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            fwd("sdpa", amp, small)
        print("KEY: flash kernel ok")
    except Exception as e:  # noqa: BLE001
        print(f"KEY: flash kernel refused ({type(e).__name__}: {e})"[:200])
times = {}
reps = 10 if dev.type == "cuda" else 3
for mode in ("eager", "sdpa", "eager", "sdpa"):  # twice each, alternating; the second counts
    fwd(mode, amp)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fwd(mode, amp)
    sync()
    times[mode] = (time.perf_counter() - t0) / reps
print(f"KEY: batch {batch} {'bf16' if amp else 'fp32'}: eager {times['eager'] * 1e3:.1f} ms, sdpa "
      f"{times['sdpa'] * 1e3:.1f} ms ({batch / times['sdpa']:.0f} images/s), speed-up "
      f"{times['eager'] / times['sdpa']:.2f}x")
tol = 1e-3 if dev.type == "cuda" else 1e-5  # CUDA fp32 kernels (TF32 convolution, fused attention) round more
sys.exit(0 if d32 <= tol else 1)
EOF

_json() {  # _json FILE NAME STATUS SECONDS
  printf '{"name": "%s", "status": "%s", "seconds": %s, "peak_gib": null}\n' "$2" "$3" "$4" >"$1"
}

_left() { echo $(( BUDGET_S - ($(date +%s) - T_START) )); }

# run NAME CAP_S NEEDED_FILE KIND -- ARGS...   KIND: py (python step through _step.py) or sh (any command)
run() {
  local name=$1 cap=$2 need=$3 kind=$4
  shift 5
  N=$((N + 1))
  local id
  id=$(printf '%02d' "$N")
  local log=$WORK/steps/$id.log json=$WORK/steps/$id.json
  echo "$name" >"$WORK/steps/$id.name"
  if [ -n "$need" ] && [ ! -e "$need" ]; then
    echo "[gpu_check] $name: missing ($need not in this checkout)"; _json "$json" "$name" missing 0; return
  fi
  local left t rc t0
  left=$(_left)
  if [ "$left" -lt 20 ]; then
    echo "[gpu_check] $name: skipped (budget spent)"; _json "$json" "$name" "skipped (budget)" 0; return
  fi
  t=$(( cap < left ? cap : left ))
  local shown="$*"
  shown=${shown//$'\n'/ }
  echo "[gpu_check] $(date +%T) $name (limit ${t}s): ${shown:0:160}"
  t0=$(date +%s.%N)
  if [ "$kind" = py ]; then
    timeout -k 10 "$t" "$PY" "$WORK/_step.py" "$name" "$json" -- "$@" >"$log" 2>&1
  else
    timeout -k 10 "$t" "$@" >"$log" 2>&1
  fi
  rc=$?
  local dt
  dt=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    _json "$json" "$name" "timeout (${t}s)" "$dt"
  elif [ "$kind" = sh ] || [ ! -s "$json" ]; then
    _json "$json" "$name" "$([ "$rc" -eq 0 ] && echo ok || echo "FAILED (exit $rc)")" "$dt"
  fi
  [ "$rc" -eq 0 ] || { echo "[gpu_check] $name: exit $rc; last lines of its log:"; tail -n 8 "$log" | cut -c1-200; }
}

install_wheels() {  # the device docs' recipe: --no-index --no-deps into a folder put on PYTHONPATH
  shopt -s nullglob
  local whl=("$WHEELS"/*.whl)
  if [ ${#whl[@]} -eq 0 ]; then
    echo "no wheels in $WHEELS: using $PY's own packages"; return 0
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" "${whl[@]}"
  echo "KEY: ${#whl[@]} wheels"
}

gpu_info() {  # read-only queries
  "$PY" -c "
import platform, torch
print(f'KEY: python {platform.python_version()}, torch {torch.__version__}, cuda {torch.version.cuda}')
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f'KEY: {p.name}, cc {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs')
" || return 1
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,temperature.gpu --format=csv
  fi
  nproc
}
export -f install_wheels gpu_info
export PY WORK WHEELS

# ------------------------------------------------------------------------------------------------------------ steps
run "gpu info" 30 "" sh -- bash -c gpu_info
if [ "$DEVICE" = cuda ]; then
  run "install wheels" 90 "" sh -- bash -c install_wheels
  export PYTHONPATH="$REPO:$WORK/site"
fi
run "imports" 60 "" sh -- "$PY" -c "
import importlib, importlib.metadata as md
mods = ['openslide', 'palom', 'torchscale', 'tensorboardX', 'tifffile', 'zarr', 'imagecodecs', 'h5py', 'timm',
        'skimage', 'cv2', 'hex.train.stage', 'hex.evaluate.stage', 'preprocess.patch', 'preprocess.register', 'preprocess.quantify',
        'preprocess.patch_store', 'sample_data.make_cohort']
bad = []
for m in mods:
    try:
        importlib.import_module(m)
    except Exception as e:
        bad.append(m); print('IMPORT FAILED', m, type(e).__name__, e)
names = ['torch', 'numpy', 'scipy', 'pandas', 'scikit-image', 'scikit-learn', 'opencv-python-headless', 'timm',
         'torchscale', 'tifffile', 'imagecodecs', 'zarr', 'h5py', 'openslide-python', 'palom']
print('KEY: ' + ', '.join(f'{n} {md.version(n)}' for n in names))
raise SystemExit(1 if bad else 0)
"
run "sample cohort" 150 "" py -- -m sample_data.make_cohort --out "$COHORT" --slides "$SLIDES" --seed 0 \
  --tissue-mm "$TISSUE_MM" --workers "$SLIDES" --log-level WARNING
run "01 patch" 60 "" py -- -m preprocess.patch --cohort "$COHORT" --out "$PIPE" --workers "$SLIDES"
run "02 register" 120 "" py -- -m preprocess.register --cohort "$COHORT" --out "$PIPE" --workers "$SLIDES"
run "03 quantify" 90 "" py -- -m preprocess.quantify --cohort "$COHORT" --out "$PIPE" --workers "$SLIDES"
run "03 patch store" 60 "" py -- -m preprocess.patch_store --cohort "$COHORT" --out "$PIPE" --workers "$SLIDES"
SPLIT=$COHORT/splits/splits_0.csv
for amp in fp16 bf16; do
  run "train musk $amp b$BATCH" 110 "" py -- -m hex.train --data "$PIPE" --out "$PIPE" --run-name "gpu_$amp" \
    --split "$SPLIT" --clinical "$COHORT/clinical.csv" --backbone musk --backbone-kw "$BACKBONE_KW" \
    --batch-size "$BATCH" --epochs 2 --max-steps-per-epoch "$TRAIN_STEPS" --save-every 100 --amp "$amp" \
    --unfreeze-last 4 --lr 1e-5 \
    --device "$DEVICE" --workers "$WORKERS"
done
run "musk sdpa vs eager" 60 "" py -- "$WORK/_attn.py" "$DEVICE" "$BACKBONE_KW" "$BATCH"
run "test bf16" 60 "" py -- -m hex.test --out "$PIPE" --run-name gpu_bf16 --data "$PIPE" --split "$SPLIT" \
  --visible-markers "$COHORT/ground_truth.json" --amp bf16 --device "$DEVICE" --workers "$WORKERS" --no-plots
HELD_OUT=$(awk -F, 'NR == 2 { print $2 }' "$SPLIT" 2>/dev/null)
run "infer_wsi bf16" 90 hex/infer_wsi.py py -- -m hex.infer_wsi --cohort "$COHORT" --out "$PIPE" \
  --run-name gpu_bf16 --slides "${HELD_OUT:-slide_000}" --amp bf16 --device "$DEVICE" --workers "$WORKERS"
# shellcheck disable=SC2086
run "bench_infer" 150 bench/bench_infer.py py -- -m bench.bench_infer $BENCH_ARGS

# ------------------------------------------------------------------------------------------------------------ table
"$PY" - "$WORK/steps" "$RESULTS" "$DEVICE" "$(( $(date +%s) - T_START ))" <<'EOF'
import json
import re
import sys
from pathlib import Path

steps, results, device, total = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
PATTERNS = [  # (regex on the step's log, label); the last match counts
    (r"([\d.]+)\s*samples/s", "{} samples/s"),
    (r"([\d.]+)\s*(?:patches|tiles)/s", "{} patches/s"),
    (r"\bratio\b\D{0,40}?([\d.]+)", "ratio {}"),
    (r"data wait (\d+)%", "data wait {}%"),
    (r"mean (?:Pearson )?r\b\D{0,12}?(-?[\d.]+)", "mean r {}"),
    (r"(\d+) train patches", "{} train patches"),
]
rows, logs = [], []
for js in sorted(steps.glob("*.json")):
    rec = json.loads(js.read_text())
    log = js.with_suffix(".log")
    text = log.read_text(errors="replace") if log.exists() else ""
    status = rec.get("status") or ("ok" if rec["rc"] == 0 else f"FAILED (exit {rec['rc']})")
    keys = [ln[5:].strip() for ln in text.splitlines() if ln.startswith("KEY: ")]
    for pat, label in PATTERNS:
        hits = re.findall(pat, text.replace("\r", "\n"))
        if hits:
            keys.append(label.format(hits[-1]))
    peak = rec.get("peak_gib")
    keys = "; ".join(keys).replace("|", "/")
    rows.append((rec["name"], status, f"{rec['seconds']:.1f}", "" if peak is None else f"{peak:.1f}", keys))
    tail = [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip()][-150:]
    logs.append(f"===== {rec['name']}: {status}, {rec['seconds']:.1f} s =====\n" + "\n".join(tail) + "\n")
head = ("step", "status", "s", "peak GiB", "key numbers")
table = [f"| {' | '.join(head)} |", "|" + "|".join("---" for _ in head) + "|"]
table += [f"| {' | '.join(r)} |" for r in rows]
n_ok = sum(r[1] == "ok" for r in rows)
summary = f"gpu_check on {device}: {n_ok}/{len(rows)} steps ok, {total} s in all"
results.mkdir(parents=True, exist_ok=True)
(results / "gpu_check_table.md").write_text(summary + "\n\n" + "\n".join(table) + "\n")
(results / "gpu_check_logs.txt").write_text("\n".join(logs))
(results / "gpu_check.json").write_text(json.dumps([dict(zip(head, r)) for r in rows], indent=1))
print("\n" + summary + f" (logs: {results}/gpu_check_logs.txt)\n")
print("\n".join(table))
EOF
