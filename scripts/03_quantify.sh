#!/usr/bin/env bash
# Stage 03: mean intensity of the 40 CODEX markers under every patch (through the registration), cohort
# normalisation to [0,1], and the matched H&E patch store.
# Writes OUT/markers/{slide}.csv, OUT/markers/normalization.json, OUT/he_patches/{slide}.h5.
COHORT=${COHORT:-sample_cohort}
OUT=${OUT:-outputs}
WORKERS=${WORKERS:-2}
EXTRA=${EXTRA:-}                         # e.g. "--legacy-columns --overwrite"
STORE_EXTRA=${STORE_EXTRA:-}             # flags for the patch store, e.g. "--png"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
require_module preprocess.quantify
require_module preprocess.patch_store
# shellcheck disable=SC2086
python -m preprocess.quantify --cohort "$COHORT" --out "$OUT" --workers "$WORKERS" $EXTRA
# shellcheck disable=SC2086
python -m preprocess.patch_store --cohort "$COHORT" --out "$OUT" --workers "$WORKERS" $STORE_EXTRA
