#!/usr/bin/env bash
# Stage 08: MICA co-attention survival model, k-fold -> OUT/mica_runs/RUN/
COHORT=${COHORT:-sample_cohort}
OUT=${OUT:-outputs}
RUN=${RUN:-mica_run}
GPUS=${GPUS:-0}
WORKERS=${WORKERS:-4}
EXTRA=${EXTRA:-}
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
require_module mica.train
# shellcheck disable=SC2086
python -m mica.train --cohort "$COHORT" --out "$OUT" --workers "$WORKERS" $EXTRA
