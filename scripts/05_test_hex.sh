#!/usr/bin/env bash
# Stage 05: evaluate a HEX run on the validation split: per-marker Pearson r / Spearman / MSE, plots.
# Writes OUT/runs/RUN/test/. GPUS>0: torchrun with GPUS CUDA processes; GPUS=0: one CPU process.
# Arguments of this script go to python -m hex.test after EXTRA: bash scripts/05_test_hex.sh --overwrite
# (--help: these variables and the module's flags; runs nothing).
COHORT=${COHORT:-sample_cohort}          # for splits/
OUT=${OUT:-outputs}                      # holds he_patches/, markers/ and runs/RUN
FOLD=${FOLD:-0}                          # tests on the val column of COHORT/splits/splits_FOLD.csv
RUN=${RUN:-hex_fold${FOLD}}              # stage 04's default run name for this fold
GPUS=${GPUS:-0}                          # CUDA processes (torchrun); 0 = one CPU process
WORKERS=${WORKERS:-4}                    # DataLoader workers per process
EXTRA=${EXTRA:-}                         # more flags for hex.test, e.g. "--visible-markers COHORT/ground_truth.json"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
require_module hex.test
ARGS=(--data "$OUT" --out "$OUT" --run-name "$RUN" --split "$COHORT/splits/splits_${FOLD}.csv" --workers "$WORKERS")
if [ "$GPUS" -gt 0 ]; then
  # shellcheck disable=SC2086
  torchrun --standalone --nproc-per-node "$GPUS" -m hex.test "${ARGS[@]}" --device cuda $EXTRA "$@"
else
  # shellcheck disable=SC2086
  python -m hex.test "${ARGS[@]}" --device cpu $EXTRA "$@"
fi
