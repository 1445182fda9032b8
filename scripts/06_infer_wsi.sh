#!/usr/bin/env bash
# Stage 06: whole-slide HEX inference -> OUT/hex_pred/{slide}.h5 and OUT/virtual_codex/
COHORT=${COHORT:-sample_cohort}
OUT=${OUT:-outputs}
RUN=${RUN:-mica_run}
GPUS=${GPUS:-0}
WORKERS=${WORKERS:-4}
EXTRA=${EXTRA:-}
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
require_module hex.infer_wsi
# shellcheck disable=SC2086
python -m hex.infer_wsi --cohort "$COHORT" --out "$OUT" --workers "$WORKERS" $EXTRA
