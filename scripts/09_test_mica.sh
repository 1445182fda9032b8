#!/usr/bin/env bash
# Stage 09: MICA test of every fold of a run (c-index, time-dependent AUC, KM plots / AUC, ROC), the outcome report
# (OUT/mica_runs/RUN/test/report.{csv,md}, comparisons.csv: bootstrap CIs, paired comparisons with COMPARE runs, the
# clinical model and TRUTH) and, with IG=1, integrated-gradients attributions -> OUT/mica_runs/RUN/{test/,ig/}.
# Independent cohort: EXTERNAL=/path/cohort2 EXTERNAL_OUT=/path/out2 (its stages 01, 06, 07 with the run's
# encoders) applies every fold's model and the ensemble -> OUT/mica_runs/RUN/external/{cohort2 name}/ (run this
# stage on the run itself first).
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
COMPARE=${COMPARE:-}                       # other runs on the same folds for the report, e.g. "mica_path_survival"
TRUTH=${TRUTH:-}                           # CSV case_id,risk (or prob): a reference row (synthetic truth)
BOOTSTRAP=${BOOTSTRAP:-1000}               # bootstrap resamples of the patients for the 95% CIs
EXTERNAL=${EXTERNAL:-}                     # independent cohort folder (clinical.csv); needs EXTERNAL_OUT
EXTERNAL_OUT=${EXTERNAL_OUT:-}             # its output root (features/, codex_features/ of stage 07)
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
ARGS+=(--bootstrap "$BOOTSTRAP")
if [ -n "$COMPARE" ]; then
  # shellcheck disable=SC2206
  COMPARE_ARGS=($COMPARE)
  ARGS+=(--compare "${COMPARE_ARGS[@]}")
fi
[ -n "$TRUTH" ] && ARGS+=(--truth "$TRUTH")
if [ -n "$EXTERNAL_OUT" ]; then
  ARGS+=(--external-out "$EXTERNAL_OUT")
  [ -n "$EXTERNAL" ] && ARGS+=(--external-cohort "$EXTERNAL")
elif [ -n "$EXTERNAL" ]; then
  echo "09_test_mica.sh: EXTERNAL=$EXTERNAL needs EXTERNAL_OUT (the independent cohort's output root)" >&2; exit 2
elif [ "$IG" = "1" ]; then ARGS+=(--ig); fi
# shellcheck disable=SC2086
python -m mica.test "${ARGS[@]}" $EXTRA "$@"
