#!/usr/bin/env bash
# Stage 03: mean intensity of the 40 CODEX markers under every patch (through the registration), normalisation to
# [0,1] fitted on the slides you choose, and the matched H&E patch store.
# Writes OUT/markers/{slide}.csv, OUT/markers/normalization.json, OUT/he_patches/{slide}.h5.
# Two steps: python -m preprocess.quantify (EXTRA goes to it), then python -m preprocess.patch_store (STORE_EXTRA
# goes to it) with --labelled-only: it stores the slides quantify labelled and names the ones it failed. The store
# runs even when quantify failed for some slides; a quantify that stopped before any slide (exit 2: bad input or
# flags) stops the stage. The last line says how each step ended; the exit status is non-zero when either failed.
# Both steps and these rules are python -m preprocess.labels; this script passes it the variables below.
# Arguments of this script go to both steps (use flags both take, e.g. --overwrite, --slides ..., --fail-fast):
# bash scripts/03_quantify.sh --overwrite redoes the labels and the patch stores.
# Job arrays: run every task with SHARD=i/n (pass 1 + patch store only; labels do not exist before the
# normalisation, so each task stores every slide of its shard, as with --no-normalize), then once NORMALIZE_ONLY=1
# (the normalisation only: EXTRA and the arguments go to python -m preprocess.normalize).
# DENSE=1 also writes the cell-scale labels OUT/markers_dense/{slide}.h5 (quantify --dense-grid DENSE_GRID: the
# marker means on a DENSE_GRID x DENSE_GRID grid of cells inside each labelled patch, normalised like the labels);
# REGISTRATION_MODEL=affine maps the CODEX through the affine only (no displacement field). Both go to pass 1 only
# (not with NORMALIZE_ONLY: the normalisation makes dense labels when pass 1 made cell means).
# (--help: these variables and the modules' flags; runs nothing).
COHORT=${COHORT:-sample_cohort}          # input folder (pairs.csv, marker_panel.csv, he/, codex/)
OUT=${OUT:-outputs}                      # output root: reads patches/ and registration/ of stages 01-02
WORKERS=${WORKERS:-2}                    # slides processed in parallel (both steps)
FIT_SPLIT=${FIT_SPLIT:-}                 # fit the percentiles on this split's train column, e.g. COHORT/splits/splits_0.csv
SHARD=${SHARD:-}                         # job arrays: "i/n" = every n-th slide from i
NORMALIZE_ONLY=${NORMALIZE_ONLY:-}       # 1: only the normalisation step (after all shards)
EXTRA=${EXTRA:-}                         # more flags for preprocess.quantify, e.g. "--legacy-columns --allow-flagged"
STORE_EXTRA=${STORE_EXTRA:-}             # more flags for preprocess.patch_store, e.g. "--png" or "--compression jpeg"
DENSE=${DENSE:-}                         # 1: also dense labels OUT/markers_dense/ (--dense-grid DENSE_GRID)
DENSE_GRID=${DENSE_GRID:-16}             # cells per patch side with DENSE=1: 16 = 14 px = 7 µm cells (224 px at 20x)
REGISTRATION_MODEL=${REGISTRATION_MODEL:-}  # affine: ignore the displacement field (empty: field, the default)
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
require_module preprocess.labels preprocess.quantify preprocess.patch_store preprocess.normalize
QUANTIFY_FLAGS=$EXTRA
if [ -z "$NORMALIZE_ONLY" ]; then
  if [ -n "$DENSE" ] && [ "$DENSE" != 0 ]; then QUANTIFY_FLAGS+=" --dense-grid $DENSE_GRID"; fi
  if [ -n "$REGISTRATION_MODEL" ]; then QUANTIFY_FLAGS+=" --registration-model $REGISTRATION_MODEL"; fi
fi
python -m preprocess.labels --cohort "$COHORT" --out "$OUT" --workers "$WORKERS" ${SHARD:+--shard "$SHARD"} \
  ${FIT_SPLIT:+--fit-split "$FIT_SPLIT"} ${NORMALIZE_ONLY:+--normalize-only} --quantify-flags="$QUANTIFY_FLAGS" \
  --store-flags="$STORE_EXTRA" -- "$@"
