#!/usr/bin/env bash
# Stage 05: evaluate a HEX run on the validation split: per-marker Pearson r / Spearman / MSE, plots.
# Writes OUT/runs/RUN/test/.
COHORT=${COHORT:-sample_cohort}
OUT=${OUT:-outputs}
RUN=${RUN:-hex_fold0}
FOLD=${FOLD:-0}
GPUS=${GPUS:-0}
WORKERS=${WORKERS:-4}
EXTRA=${EXTRA:-}                         # e.g. "--visible-markers COHORT/ground_truth.json"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
require_module hex.test
ARGS=(--data "$OUT" --out "$OUT" --run-name "$RUN" --split "$COHORT/splits/splits_${FOLD}.csv" --workers "$WORKERS")
if [ "$GPUS" -gt 0 ]; then
  # shellcheck disable=SC2086
  torchrun --nproc-per-node "$GPUS" -m hex.test "${ARGS[@]}" $EXTRA
else
  # shellcheck disable=SC2086
  python -m hex.test "${ARGS[@]}" $EXTRA
fi
