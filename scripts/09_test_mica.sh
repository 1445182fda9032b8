#!/usr/bin/env bash
# Stage 09: MICA test (c-index, KM plots) and integrated gradients -> OUT/mica_runs/RUN/
COHORT=${COHORT:-sample_cohort}
OUT=${OUT:-outputs}
RUN=${RUN:-mica_run}
GPUS=${GPUS:-0}
WORKERS=${WORKERS:-4}
EXTRA=${EXTRA:-}
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
require_module mica.test
# shellcheck disable=SC2086
python -m mica.test --cohort "$COHORT" --out "$OUT" --workers "$WORKERS" $EXTRA
