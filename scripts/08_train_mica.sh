#!/usr/bin/env bash
# Stage 08: MICA k-fold training (survival or response) on the feature bags of stage 07 -> OUT/mica_runs/RUN/
# (config.json, summary.csv, fold_k/{checkpoint.safetensors,checkpoint.json,val_predictions.csv,tb/}).
# Rerunning the same command resumes: finished folds are skipped, a killed fold continues from its last epoch.
# One run holds every fold (fold_k/), so RUN names no fold. Arguments of this script go to python -m mica.train
# after EXTRA: bash scripts/08_train_mica.sh --overwrite retrains the folds. TORCHRUN_ARGS go to torchrun itself
# (GPUS>0). (--help: these variables and the module's flags; runs nothing).
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
GPUS=${GPUS:-0}                            # processes per node (torchrun), one fold each, no process group;
                                           # 0 = one process for every fold
NNODES=${NNODES:-1}                        # nodes (GPUS>0); several: give TORCHRUN_ARGS
WORKERS=${WORKERS:-4}                      # DataLoader workers reading bags
EXTRA=${EXTRA:-}                           # more flags for mica.train, e.g. "--keep best --unit slide --grad-accum 8"
TORCHRUN_ARGS=${TORCHRUN_ARGS:-}           # flags for torchrun itself (GPUS>0), e.g. for several nodes
                                           # "--node-rank 0 --rdzv-backend c10d --rdzv-endpoint HOST:29500"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
require_module mica.train
# shellcheck disable=SC2206
FOLD_ARGS=($FOLDS)
ARGS=(--cohort "$COHORT" --out "$OUT" --run-name "$RUN" --mode "$MODE" --task "$TASK" --encoder "$ENCODER"
      --codex-encoder "$CODEX_ENCODER" --folds "${FOLD_ARGS[@]}" --epochs "$EPOCHS" --workers "$WORKERS")
# shellcheck disable=SC2086
launch mica.train "${ARGS[@]}" $EXTRA "$@"
