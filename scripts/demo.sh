#!/usr/bin/env bash
# The whole pipeline on the synthetic sample cohort, on CPU, with CPU-sized settings; prints a summary.
# Creates .venv on first use. Variables (override from the environment):
DEMO_OUT=${DEMO_OUT:-demo_out}           # everything goes here (git-ignored)
SLIDES=${SLIDES:-12}                     # slides in the synthetic cohort
SEED=${SEED:-0}
TISSUE_MM=${TISSUE_MM:-1.5}              # side of each synthetic tissue section, mm
HEX_EPOCHS=${HEX_EPOCHS:-40}             # epochs of the tiny HEX model
MICA_EPOCHS=${MICA_EPOCHS:-20}           # epochs of each MICA fold (paper: 20)
MICA_EXTRA=${MICA_EXTRA:---grad-accum 8} # flags for mica.train in stage 08, e.g. "--grad-accum 32" (the original's:
                                         # ~50 training patients per fold then make 2 optimizer steps per epoch)
MICA_PROCS=${MICA_PROCS:-2}              # stage 08: folds trained in parallel on the CPU (torchrun, one thread each)
OUTCOME_PATIENTS=${OUTCOME_PATIENTS:-64}  # patients (one small section each) of the outcome cohort of stages 07-09
OUTCOME_TISSUE_MM=${OUTCOME_TISSUE_MM:-0.6}  # their section diameter, mm
BOOTSTRAP=${BOOTSTRAP:-200}              # bootstrap resamples of the outcome report (a paper: 1000)
COMPARE_MODES=${COMPARE_MODES:-path}     # MICA modes trained beside coattn for the report's rows: "path codex" adds
                                         # the CODEX-only ablation (~2 min more)
IG_LIMIT=${IG_LIMIT:-4}                  # integrated gradients of the first N validation patients per fold (0 = all)
WORKERS=${WORKERS:-2}
HEX_EXTRA=${HEX_EXTRA:---save-every 10}  # flags for hex.train in stage 04 (its EXTRA), e.g. "--save-every 5 --lr 3e-4"
STAIN_NORM=${STAIN_NORM:-macenko}        # HEX's stain normalisation (none, macenko, reinhard): the sample slides vary in
                                         # stain from slide to slide, as a hospital's do; target: the first training slide
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
  python -m bench.demo_summary --cohort "$COHORT" --out "$OUT" --outcome-out "$DEMO_OUT/outcome" || true
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
# batch 32, LDS re-weighting), the paper's loss (adaptive robust) and FDS; stains normalised (Macenko) to the first
# training slide's patches (hex.train's default target), and the run re-applies it in stages 05-07 on both cohorts
[ "$STAIN_NORM" = none ] || HEX_EXTRA="$HEX_EXTRA --stain-norm $STAIN_NORM"
RUN=demo_tiny BACKBONE=tiny EPOCHS=$HEX_EPOCHS WORKERS=1 GPUS=0 EXTRA="$HEX_EXTRA" \
  run_stage "04 train HEX (tiny)" bash scripts/04_train_hex.sh
RUN=demo_tiny WORKERS=0 GPUS=0 EXTRA="--visible-markers $COHORT/ground_truth.json" \
  run_stage "05 test HEX" bash scripts/05_test_hex.sh
# whole-slide inference over the stage-01 grid with the demo's HEX run -> hex_pred/ and virtual_codex/
RUN=demo_tiny WORKERS=0 GPUS=0 run_stage "06 WSI inference" bash scripts/06_infer_wsi.sh
# feature bags: H&E = the demo HEX run's backbone (no pretrained MUSK here), CODEX = stats descriptors of the maps
HEX_RUN=demo_tiny CODEX_ENCODER=stats WORKERS=0 run_stage "07 features" bash scripts/07_features.sh
# MICA needs patients: an outcome cohort of OUTCOME_PATIENTS small sections (another seed) through stages 01, 06
# and 07 with the demo's HEX run, then MICA (5 folds, survival) in the three modes on it. The 12-slide cohort above
# (made with another seed) is its independent cohort.
OC="$DEMO_OUT/outcome/cohort" OO="$DEMO_OUT/outcome"
HEX_CKPT="$DEMO_OUT/runs/demo_tiny/best.safetensors"
if [ ! -f "$OC/ground_truth.json" ]; then
  run_stage "outcome cohort" python -m sample_data.make_cohort --out "$OC" --slides "$OUTCOME_PATIENTS" --no-codex \
    --patients "$OUTCOME_PATIENTS" --seed $((SEED + 100)) --tissue-mm "$OUTCOME_TISSUE_MM" --workers "$WORKERS"
else
  status+=("outcome cohort: reused $OC (delete it to rebuild)")
fi
python -m bench.mica_vs_truth --cohort "$OC" --truth-csv "$OO/truth.csv" >/dev/null
COHORT=$OC OUT=$OO run_stage "01 patch (outcome cohort)" bash scripts/01_patch.sh
# only the maps stage 07 reads (npy): no preview figure (~2 s a slide), no OME-TIFF or GeoJSON for these 64 slides
COHORT=$OC OUT=$OO RUN=demo_tiny CHECKPOINT=$HEX_CKPT WORKERS=0 GPUS=0 EXTRA="--map-formats npy" \
  run_stage "06 WSI inference (outcome cohort)" bash scripts/06_infer_wsi.sh
COHORT=$OC OUT=$OO ENCODER=hex:demo_tiny WEIGHTS=$HEX_CKPT CODEX_ENCODER=stats WORKERS=0 \
  run_stage "07 features (outcome cohort)" bash scripts/07_features.sh
for mode in coattn $COMPARE_MODES; do
  COHORT=$OC OUT=$OO MODE=$mode TASK=survival RUN=demo_$mode ENCODER=hex:demo_tiny CODEX_ENCODER=stats EXTRA="$MICA_EXTRA" \
    EPOCHS=$MICA_EPOCHS WORKERS=0 GPUS=$MICA_PROCS run_stage "08 train MICA ($mode)" bash scripts/08_train_mica.sh
done
compare=()
for mode in $COMPARE_MODES; do
  COHORT=$OC OUT=$OO MODE=$mode RUN=demo_$mode IG=0 WORKERS=0 EXTRA="--no-report" \
    run_stage "09 test MICA ($mode)" bash scripts/09_test_mica.sh
  compare+=("demo_$mode")
done
# the report: coattn with the other modes, the clinical model (age, stage), coattn+clinical and the generator's truth
COHORT=$OC OUT=$OO MODE=coattn RUN=demo_coattn IG=1 WORKERS=0 COMPARE="${compare[*]}" TRUTH="$OO/truth.csv" \
  BOOTSTRAP=$BOOTSTRAP EXTRA="--ig-limit $IG_LIMIT" run_stage "09 test MICA (coattn, report, IG)" \
  bash scripts/09_test_mica.sh
# the trained coattn run applied to the independent 12-slide cohort (its stages 01, 06, 07 ran above)
python -m bench.mica_vs_truth --cohort "$COHORT" --truth-csv "$DEMO_OUT/truth.csv" >/dev/null
COHORT=$OC OUT=$OO RUN=demo_coattn EXTERNAL="$DEMO_OUT/cohort" EXTERNAL_OUT="$DEMO_OUT" TRUTH="$DEMO_OUT/truth.csv" \
  BOOTSTRAP=$BOOTSTRAP WORKERS=0 run_stage "09 MICA on the independent cohort" bash scripts/09_test_mica.sh
# stage 10 on the outcome cohort: nuclei of the H&E, virtual CODEX at each, phenotypes, 5-cell windows, 8 niches over
# the cohort, co-localisation (100 permutations), and the niche-outcome association (Cox, logistic)
COHORT=$OC OUT=$OO PERMS=100 WORKERS=$WORKERS EXTRA="--formats h5ad png" run_stage "10 spatial niches (outcome cohort)" \
  bash scripts/10_niches.sh
print_summary
