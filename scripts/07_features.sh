#!/usr/bin/env bash
# Stage 07: MUSK patch features and DINOv2 virtual-CODEX features -> OUT/features/, OUT/codex_features/
COHORT=${COHORT:-sample_cohort}
OUT=${OUT:-outputs}
RUN=${RUN:-mica_run}
GPUS=${GPUS:-0}
WORKERS=${WORKERS:-4}
EXTRA=${EXTRA:-}
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
require_module mica.extract_features
# shellcheck disable=SC2086
python -m mica.extract_features --cohort "$COHORT" --out "$OUT" --workers "$WORKERS" $EXTRA
