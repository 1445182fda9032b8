#!/usr/bin/env bash
# Stage 05: evaluate a HEX run on the validation split (or an independent cohort): per-marker Pearson r, Spearman, MSE.
# Writes OUT/runs/RUN/test/ (tables, plots). GPUS>0: torchrun with GPUS CUDA processes per node; GPUS=0: one CPU
# process. Independent cohort: EXTERNAL=/path/cohort2 EXTERNAL_OUT=/path/out2 (stages 01-03 run there) scores the
# run on every labelled slide of EXTERNAL_OUT/markers, no split, with the labels put into the run's normalisation
# (hex.test --external-cohort), and writes OUT/runs/RUN/external/{EXTERNAL's folder name}/ (FOLD only names RUN).
# Dense runs (stage 04 with DENSE=1) are also scored per 7 µm cell (dense_pearson.csv) against OUT/markers_dense
# (stage 03 with DENSE=1) or DENSE_LABELS; DENSE_BASELINE=OUT_B adds a patch-level run's stage-06 maps (STRIDE=56).
# Arguments of this script go to python -m hex.test after EXTRA: bash scripts/05_test_hex.sh --overwrite.
# TORCHRUN_ARGS go to torchrun itself (GPUS>0). (--help: these variables and the module's flags; runs nothing).
COHORT=${COHORT:-sample_cohort}          # for splits/
OUT=${OUT:-outputs}                      # holds he_patches/, markers/ and runs/RUN
FOLD=${FOLD:-0}                          # tests on the val column of COHORT/splits/splits_FOLD.csv
RUN=${RUN:-hex_fold${FOLD}}              # stage 04's default run name for this fold
EXTERNAL=${EXTERNAL:-}                   # an independent cohort's folder (its name names the results folder)
EXTERNAL_OUT=${EXTERNAL_OUT:-}           # that cohort's output root (he_patches/, markers/ of its stages 01-03)
GPUS=${GPUS:-0}                          # CUDA processes per node (torchrun); 0 = one CPU process
NNODES=${NNODES:-1}                      # nodes (GPUS>0); several: give TORCHRUN_ARGS
WORKERS=${WORKERS:-4}                    # DataLoader workers per process
DENSE_LABELS=${DENSE_LABELS:-}           # dense runs: dense label folder (default OUT/markers_dense), e.g. affine-only
DENSE_BASELINE=${DENSE_BASELINE:-}       # dense runs: OUT root of a patch-level run's stage-06 maps at STRIDE=56
EXTRA=${EXTRA:-}                         # more flags for hex.test, e.g. "--visible-markers COHORT/ground_truth.json"
TORCHRUN_ARGS=${TORCHRUN_ARGS:-}         # flags for torchrun itself (GPUS>0), e.g. for several nodes
                                         # "--node-rank 0 --rdzv-backend c10d --rdzv-endpoint HOST:29500"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
require_module hex.test
if [ -n "$EXTERNAL" ] || [ -n "$EXTERNAL_OUT" ]; then
  if [ -z "$EXTERNAL" ] || [ -z "$EXTERNAL_OUT" ]; then
    echo "05_test_hex.sh: give both EXTERNAL (the other cohort's folder) and EXTERNAL_OUT (its output root)" >&2
    exit 2
  fi
  _name=$(basename "${EXTERNAL%/}")
  ARGS=(--data "$EXTERNAL_OUT" --out "$OUT" --run-name "$RUN" --external-cohort "$_name" --workers "$WORKERS")
else
  ARGS=(--data "$OUT" --out "$OUT" --run-name "$RUN" --split "$COHORT/splits/splits_${FOLD}.csv" --workers "$WORKERS")
fi
if [ "$GPUS" -gt 0 ]; then ARGS+=(--device cuda); else ARGS+=(--device cpu); fi
if [ -n "$DENSE_LABELS" ]; then ARGS+=(--dense-labels "$DENSE_LABELS"); fi
if [ -n "$DENSE_BASELINE" ]; then ARGS+=(--dense-baseline "$DENSE_BASELINE"); fi
# shellcheck disable=SC2086
launch hex.test "${ARGS[@]}" $EXTRA "$@"
