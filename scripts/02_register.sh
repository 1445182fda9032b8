#!/usr/bin/env bash
# Stage 02: co-register each CODEX image (DAPI) to its H&E slide (haematoxylin) with palom.
# Writes OUT/registration/{slide}.json (CODEX->H&E level-0 affine + displacement field, QC score, status),
# {slide}_displacement.npy and {slide}_qc.png.
COHORT=${COHORT:-sample_cohort}          # needs COHORT/pairs.csv (he_slide,codex_image)
OUT=${OUT:-outputs}
WORKERS=${WORKERS:-2}
SHARD=${SHARD:-}                         # job arrays: "i/n" = every n-th slide from i
EXTRA=${EXTRA:-}                         # e.g. "--write-registered --overwrite" or "--no-displacement"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
require_module preprocess.register
# shellcheck disable=SC2086
python -m preprocess.register --cohort "$COHORT" --out "$OUT" --workers "$WORKERS" ${SHARD:+--shard "$SHARD"} $EXTRA
