#!/usr/bin/env bash
# Stage 01: tissue segmentation + 224 px @ 0.5 mpp patch grid for every H&E slide.
# Writes OUT/patches/{slide}.h5 (CLAM-style coords) and OUT/patches/{slide}_tissue.png.
# Edit the variables or override them from the environment: COHORT=/data/lung OUT=/scratch/hex bash scripts/01_patch.sh
# Arguments of this script go to python -m preprocess.patch after EXTRA: bash scripts/01_patch.sh --overwrite
# (--help: these variables and the module's flags; runs nothing).
COHORT=${COHORT:-sample_cohort}          # input folder: he/, codex/, pairs.csv, marker_panel.csv, clinical.csv, splits/
OUT=${OUT:-outputs}                      # output root
WORKERS=${WORKERS:-2}                    # slides processed in parallel
MIN_TISSUE=${MIN_TISSUE:-0.5}            # keep a patch when >= this fraction of it is tissue
SHARD=${SHARD:-}                         # job arrays: "i/n" = every n-th slide from i, e.g. SHARD=$SLURM_ARRAY_TASK_ID/10
EXTRA=${EXTRA:-}                         # more flags for preprocess.patch, e.g. "--mpp 0.25 --overwrite"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
require_module preprocess.patch
# shellcheck disable=SC2086
python -m preprocess.patch --cohort "$COHORT" --out "$OUT" --workers "$WORKERS" --min-tissue "$MIN_TISSUE" \
  ${SHARD:+--shard "$SHARD"} $EXTRA "$@"
