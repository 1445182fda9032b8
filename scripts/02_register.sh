#!/usr/bin/env bash
# Stage 02: co-register each CODEX image (DAPI) to its H&E slide (haematoxylin) with palom.
# Writes OUT/registration/{slide}.json (CODEX->H&E level-0 affine + displacement field, QC score, status),
# {slide}_displacement.npy and {slide}_qc.png.
# Arguments of this script go to python -m preprocess.register after EXTRA: bash scripts/02_register.sh --overwrite
# (--help: these variables and the module's flags; runs nothing).
COHORT=${COHORT:-sample_cohort}          # needs COHORT/pairs.csv (he_slide,codex_image)
OUT=${OUT:-outputs}                      # output root
WORKERS=${WORKERS:-2}                    # slides registered in parallel
SHARD=${SHARD:-}                         # job arrays: "i/n" = every n-th slide from i
EXTRA=${EXTRA:-}                         # more flags for preprocess.register, e.g. "--write-registered --overwrite"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
require_module preprocess.register
# shellcheck disable=SC2086
python -m preprocess.register --cohort "$COHORT" --out "$OUT" --workers "$WORKERS" ${SHARD:+--shard "$SHARD"} \
  $EXTRA "$@"
