#!/usr/bin/env bash
# Stage 05: evaluate a HEX run on the validation split: per-marker Pearson r / Spearman / MSE, plots.
# Writes OUT/runs/RUN/test/. GPUS>0: torchrun with GPUS CUDA processes per node; GPUS=0: one CPU process.
# Arguments of this script go to python -m hex.test after EXTRA: bash scripts/05_test_hex.sh --overwrite.
# TORCHRUN_ARGS go to torchrun itself (GPUS>0). (--help: these variables and the module's flags; runs nothing).
COHORT=${COHORT:-sample_cohort}          # for splits/
OUT=${OUT:-outputs}                      # holds he_patches/, markers/ and runs/RUN
FOLD=${FOLD:-0}                          # tests on the val column of COHORT/splits/splits_FOLD.csv
RUN=${RUN:-hex_fold${FOLD}}              # stage 04's default run name for this fold
GPUS=${GPUS:-0}                          # CUDA processes per node (torchrun); 0 = one CPU process
NNODES=${NNODES:-1}                      # nodes (GPUS>0); several: give TORCHRUN_ARGS
WORKERS=${WORKERS:-4}                    # DataLoader workers per process
EXTRA=${EXTRA:-}                         # more flags for hex.test, e.g. "--visible-markers COHORT/ground_truth.json"
TORCHRUN_ARGS=${TORCHRUN_ARGS:-}         # flags for torchrun itself (GPUS>0), e.g. for several nodes
                                         # "--node-rank 0 --rdzv-backend c10d --rdzv-endpoint HOST:29500"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
require_module hex.test
ARGS=(--data "$OUT" --out "$OUT" --run-name "$RUN" --split "$COHORT/splits/splits_${FOLD}.csv" --workers "$WORKERS")
if [ "$GPUS" -gt 0 ]; then ARGS+=(--device cuda); else ARGS+=(--device cpu); fi
# shellcheck disable=SC2086
launch hex.test "${ARGS[@]}" $EXTRA "$@"
