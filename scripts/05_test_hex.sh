#!/usr/bin/env bash
# Stage 05: evaluate a HEX run on the validation split: per-marker Pearson r / Spearman / MSE, plots.
# Writes OUT/runs/RUN/test/. GPUS>0: torchrun with GPUS CUDA processes; GPUS=0: one CPU process.
COHORT=${COHORT:-sample_cohort}
OUT=${OUT:-outputs}
FOLD=${FOLD:-0}
RUN=${RUN:-hex_fold${FOLD}}              # stage 04's default run name for this fold
GPUS=${GPUS:-0}
WORKERS=${WORKERS:-4}
EXTRA=${EXTRA:-}                         # e.g. "--visible-markers COHORT/ground_truth.json"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
require_module hex.test
ARGS=(--data "$OUT" --out "$OUT" --run-name "$RUN" --split "$COHORT/splits/splits_${FOLD}.csv" --workers "$WORKERS")
if [ "$GPUS" -gt 0 ]; then
  # shellcheck disable=SC2086
  torchrun --standalone --nproc-per-node "$GPUS" -m hex.test "${ARGS[@]}" --device cuda $EXTRA
else
  # shellcheck disable=SC2086
  python -m hex.test "${ARGS[@]}" --device cpu $EXTRA
fi
