#!/usr/bin/env bash
# Stage 03: mean intensity of the 40 CODEX markers under every patch (through the registration), normalisation to
# [0,1] fitted on the slides you choose, and the matched H&E patch store.
# Writes OUT/markers/{slide}.csv, OUT/markers/normalization.json, OUT/he_patches/{slide}.h5.
# Job arrays: run every task with SHARD=i/n (pass 1 + patch store only), then once NORMALIZE_ONLY=1 (normalisation).
COHORT=${COHORT:-sample_cohort}
OUT=${OUT:-outputs}
WORKERS=${WORKERS:-2}
FIT_SPLIT=${FIT_SPLIT:-}                 # fit the percentiles on this split's train column, e.g. $COHORT/splits/splits_0.csv
SHARD=${SHARD:-}                         # job arrays: "i/n" = every n-th slide from i
NORMALIZE_ONLY=${NORMALIZE_ONLY:-}       # 1: only the normalisation step (after all shards)
EXTRA=${EXTRA:-}                         # e.g. "--legacy-columns --overwrite"
STORE_EXTRA=${STORE_EXTRA:-}             # flags for the patch store, e.g. "--png" or "--compression jpeg"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
require_module preprocess.quantify
require_module preprocess.patch_store
if [ -n "$NORMALIZE_ONLY" ]; then
  # shellcheck disable=SC2086
  exec python -m preprocess.normalize --cohort "$COHORT" --out "$OUT" ${FIT_SPLIT:+--fit-split "$FIT_SPLIT"} $EXTRA
fi
# shellcheck disable=SC2086
python -m preprocess.quantify --cohort "$COHORT" --out "$OUT" --workers "$WORKERS" ${SHARD:+--shard "$SHARD"} \
  ${FIT_SPLIT:+--fit-split "$FIT_SPLIT"} $EXTRA
# shellcheck disable=SC2086
python -m preprocess.patch_store --cohort "$COHORT" --out "$OUT" --workers "$WORKERS" ${SHARD:+--shard "$SHARD"} \
  $STORE_EXTRA
