#!/usr/bin/env bash
# Stage 09: MICA test of every fold of a run (c-index, time-dependent AUC, KM plots / AUC, ROC) and, with IG=1,
# integrated-gradients attributions -> OUT/mica_runs/RUN/{test/,ig/,fold_k/test_predictions.csv}.
# Encoders, mode, task, unit and bins come from the run's config.json (MODE/TASK here only name the run, as in 08).
# Arguments of this script go to python -m mica.test after EXTRA: bash scripts/09_test_mica.sh --overwrite
# (--help: these variables and the module's flags; runs nothing).
COHORT=${COHORT:-sample_cohort}            # for he/ thumbnails under the heatmaps (and if the run moved)
OUT=${OUT:-outputs}                        # holds mica_runs/RUN (stage 08)
MODE=${MODE:-coattn}                       # coattn | path | codex (names the default RUN)
TASK=${TASK:-survival}                     # survival | response (names the default RUN)
RUN=${RUN:-mica_${MODE}_${TASK}}           # stage 08's default run name (one run holds every fold)
FOLDS=${FOLDS:-}                           # empty: every fold of the run
IG=${IG:-1}                                # 1: integrated gradients (ig/{slide}.h5, heatmaps, marker bar plot)
WORKERS=${WORKERS:-4}                      # DataLoader workers reading bags
EXTRA=${EXTRA:-}                           # more flags for mica.test, e.g. "--ig-steps 50 --ig-batch 4 --ig-limit 10"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
require_module mica.test
ARGS=(--out "$OUT" --run-name "$RUN" --workers "$WORKERS")
if [ -d "$COHORT" ]; then ARGS+=(--cohort "$COHORT"); fi
if [ -n "$FOLDS" ]; then
  # shellcheck disable=SC2206
  FOLD_ARGS=($FOLDS)
  ARGS+=(--folds "${FOLD_ARGS[@]}")
fi
if [ "$IG" = "1" ]; then ARGS+=(--ig); fi
# shellcheck disable=SC2086
python -m mica.test "${ARGS[@]}" $EXTRA "$@"
