#!/usr/bin/env bash
# Stage 08: MICA k-fold training (survival or response) on the feature bags of stage 07 -> OUT/mica_runs/RUN/
# (config.json, summary.csv, fold_k/{checkpoint.safetensors,checkpoint.json,val_predictions.csv,tb/}).
# Rerunning the same command resumes: finished folds are skipped, a killed fold continues from its last epoch.
# One run holds every fold (fold_k/), so RUN names no fold. Arguments of this script go to python -m mica.train
# after EXTRA: bash scripts/08_train_mica.sh --overwrite retrains the folds.
# (--help: these variables and the module's flags; runs nothing).
COHORT=${COHORT:-sample_cohort}            # for clinical.csv and splits/
OUT=${OUT:-outputs}                        # reads features/ and codex_features/; the run goes to OUT/mica_runs/RUN
MODE=${MODE:-coattn}                       # coattn | path | codex
TASK=${TASK:-survival}                     # survival | response
RUN=${RUN:-mica_${MODE}_${TASK}}           # run folder OUT/mica_runs/RUN
ENCODER=${ENCODER:-musk}                   # H&E bags: OUT/features/ENCODER/ (e.g. hex:RUN for a HEX backbone)
CODEX_ENCODER=${CODEX_ENCODER:-stats}     # CODEX tokens: OUT/codex_features/CODEX_ENCODER.h5 (as 07; the paper:
                                           # dinov2_vits14_reg)
FOLDS=${FOLDS:-"0 1 2 3 4"}                # folds k of COHORT/splits/splits_k.csv, each in OUT/mica_runs/RUN/fold_k
EPOCHS=${EPOCHS:-20}
GPUS=${GPUS:-0}                            # >1: one fold per process (torchrun), no process group
WORKERS=${WORKERS:-4}                      # DataLoader workers reading bags
EXTRA=${EXTRA:-}                           # more flags for mica.train, e.g. "--keep best --unit slide --grad-accum 8"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
require_module mica.train
# shellcheck disable=SC2206
FOLD_ARGS=($FOLDS)
ARGS=(--cohort "$COHORT" --out "$OUT" --run-name "$RUN" --mode "$MODE" --task "$TASK" --encoder "$ENCODER"
      --codex-encoder "$CODEX_ENCODER" --folds "${FOLD_ARGS[@]}" --epochs "$EPOCHS" --workers "$WORKERS")
if [ "$GPUS" -gt 1 ]; then
  # shellcheck disable=SC2086
  torchrun --standalone --nproc-per-node "$GPUS" -m mica.train "${ARGS[@]}" $EXTRA "$@"
else
  # shellcheck disable=SC2086
  python -m mica.train "${ARGS[@]}" $EXTRA "$@"
fi
