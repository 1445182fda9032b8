#!/usr/bin/env bash
# The whole pipeline on the synthetic sample cohort, on CPU, with CPU-sized settings; prints a summary.
# Creates .venv on first use. Variables (override from the environment):
DEMO_OUT=${DEMO_OUT:-demo_out}           # everything goes here (git-ignored)
SLIDES=${SLIDES:-12}                     # slides in the synthetic cohort
SEED=${SEED:-0}
TISSUE_MM=${TISSUE_MM:-1.5}              # side of each synthetic tissue section, mm
HEX_EPOCHS=${HEX_EPOCHS:-40}             # epochs of the tiny HEX model
MICA_EPOCHS=${MICA_EPOCHS:-20}           # epochs of each MICA fold (paper: 20)
WORKERS=${WORKERS:-2}
HEX_EXTRA=${HEX_EXTRA:---save-every 10}  # flags for hex.train in stage 04 (its EXTRA), e.g. "--save-every 5 --lr 3e-4"
set -euo pipefail
case $DEMO_OUT in /*) ;; *) DEMO_OUT="$PWD/$DEMO_OUT" ;; esac  # relative to where you run it (as the stage scripts)
source "$(dirname "${BASH_SOURCE[0]}")/_setup_env.sh"
export COHORT="$DEMO_OUT/cohort" OUT="$DEMO_OUT" WORKERS
start=$(date +%s)
status=()
run_stage() {  # run_stage NAME command...; a failed stage prints the summary so far and stops the demo
  local name=$1; shift
  local t0 rc
  t0=$(date +%s)
  echo; echo "=== $name ==="
  set +e; "$@"; rc=$?; set -e
  if [ $rc -eq 0 ]; then status+=("$name: ok ($(( $(date +%s) - t0 )) s)")
  else status+=("$name: FAILED (exit $rc)"); echo "[demo] $name failed" >&2; print_summary; exit $rc; fi
}
print_summary() {
  echo; echo "=== demo summary ($(( $(date +%s) - start )) s) ==="
  printf '  %s\n' "${status[@]}"
  python -m bench.demo_summary --cohort "$COHORT" --out "$OUT" || true
}
if [ ! -f "$COHORT/ground_truth.json" ]; then
  run_stage "sample cohort" python -m sample_data.make_cohort --out "$COHORT" --slides "$SLIDES" --seed "$SEED" \
    --tissue-mm "$TISSUE_MM" --workers "$WORKERS"
else
  status+=("sample cohort: reused $COHORT (delete it to rebuild)")
fi
run_stage "01 patch" bash scripts/01_patch.sh
run_stage "02 register" bash scripts/02_register.sh
# normalisation percentiles fitted on the training slides of fold 0 (the split HEX trains on): no validation leak
FIT_SPLIT="$COHORT/splits/splits_0.csv" run_stage "03 quantify" bash scripts/03_quantify.sh
# tiny CNN from scratch with the backbone's default recipe (no pretrained weights: every block trainable, lr 1e-3,
# batch 32, LDS re-weighting), the paper's loss (adaptive robust) and FDS
RUN=demo_tiny BACKBONE=tiny EPOCHS=$HEX_EPOCHS WORKERS=1 GPUS=0 EXTRA="$HEX_EXTRA" \
  run_stage "04 train HEX (tiny)" bash scripts/04_train_hex.sh
RUN=demo_tiny WORKERS=0 GPUS=0 EXTRA="--visible-markers $COHORT/ground_truth.json" \
  run_stage "05 test HEX" bash scripts/05_test_hex.sh
# whole-slide inference over the stage-01 grid with the demo's HEX run -> hex_pred/ and virtual_codex/
RUN=demo_tiny WORKERS=0 GPUS=0 run_stage "06 WSI inference" bash scripts/06_infer_wsi.sh
# feature bags: H&E = the demo HEX run's backbone (no pretrained MUSK here), CODEX = stats descriptors of the maps
HEX_RUN=demo_tiny CODEX_ENCODER=stats WORKERS=0 run_stage "07 features" bash scripts/07_features.sh
# MICA, 5 folds, survival: co-attention (the paper) and the two single-modality modes; IG for co-attention
for mode in coattn path codex; do
  MODE=$mode TASK=survival RUN=demo_$mode ENCODER=hex:demo_tiny CODEX_ENCODER=stats EPOCHS=${MICA_EPOCHS:-20} \
    WORKERS=0 run_stage "08 train MICA ($mode)" bash scripts/08_train_mica.sh
done
MODE=coattn TASK=survival RUN=demo_coattn IG=1 WORKERS=0 run_stage "09 test MICA (coattn, IG)" bash scripts/09_test_mica.sh
for mode in path codex; do
  MODE=$mode TASK=survival RUN=demo_$mode IG=0 WORKERS=0 run_stage "09 test MICA ($mode)" bash scripts/09_test_mica.sh
done
print_summary
