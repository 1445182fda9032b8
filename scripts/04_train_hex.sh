#!/usr/bin/env bash
# Stage 04: train HEX (H&E patch -> 40 markers). GPUS>0: torchrun with GPUS CUDA processes per node (NCCL; a machine
# where torch sees no GPU stops with the reason); GPUS=0: one CPU process. Training defaults follow the backbone
# (python -m hex.train --help): paper settings = BACKBONE=musk WEIGHTS=/path/to/musk.safetensors EPOCHS=120 GPUS=8.
# Arguments of this script go to python -m hex.train after EXTRA (in the --check call and in every torchrun rank):
# bash scripts/04_train_hex.sh --overwrite. TORCHRUN_ARGS go to torchrun itself (GPUS>0).
# (--help: these variables and the module's flags; runs nothing). DENSE=1 adds the dense head (cell-scale markers on a
# DENSE_GRID x DENSE_GRID grid per patch, hex.train --dense-grid): needs stage 03 run with DENSE=1 (OUT/markers_dense).
COHORT=${COHORT:-sample_cohort}          # for clinical.csv and splits/
OUT=${OUT:-outputs}                      # holds he_patches/ and markers/ from stage 03; run goes to OUT/runs/RUN
FOLD=${FOLD:-0}                          # trains on COHORT/splits/splits_FOLD.csv
RUN=${RUN:-hex_fold${FOLD}}              # a rerun with the same RUN resumes it (and must use the same settings)
BACKBONE=${BACKBONE:-musk}               # musk | dinov2_vits14_reg | timm:<name> | tiny
WEIGHTS=${WEIGHTS:-}                     # local weights file (or hf_hub:<repo> with internet); empty = random init
GPUS=${GPUS:-0}                          # CUDA processes per node (torchrun); 0 = one CPU process
NNODES=${NNODES:-1}                      # nodes (GPUS>0); several: give TORCHRUN_ARGS
EPOCHS=${EPOCHS:-120}
WORKERS=${WORKERS:-8}                    # DataLoader workers per process
KEEP_LAST=${KEEP_LAST:-0}                # keep only the newest K epoch checkpoints (0 = all; MUSK: ~1.5 GB each)
DENSE=${DENSE:-0}                        # 1 = also train the dense head (7 um cells at 20x with DENSE_GRID=16)
DENSE_GRID=${DENSE_GRID:-16}             # cells per patch side of the dense head (DENSE=1); as in stage 03
EXTRA=${EXTRA:-}                         # more flags for hex.train, e.g. "--batch-size 48 --lr 1e-5"
TORCHRUN_ARGS=${TORCHRUN_ARGS:-}         # flags for torchrun itself (GPUS>0), e.g. for several nodes
                                         # "--node-rank 0 --rdzv-backend c10d --rdzv-endpoint HOST:29500"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
require_module hex.train
ARGS=(--data "$OUT" --out "$OUT" --run-name "$RUN" --split "$COHORT/splits/splits_${FOLD}.csv"
      --clinical "$COHORT/clinical.csv" --backbone "$BACKBONE" --epochs "$EPOCHS" --workers "$WORKERS"
      --keep-last "$KEEP_LAST" --resume auto)  # continue this run from its newest checkpoint
[ -n "$WEIGHTS" ] && ARGS+=(--weights "$WEIGHTS")
if [ "$DENSE" = 1 ]; then ARGS+=(--dense-grid "$DENSE_GRID"); fi
if [ "$GPUS" -gt 0 ]; then
  ARGS+=(--device cuda)
  # flags, inputs and CUDA are checked once here: torchrun would start (and --max-restarts restart) every rank
  # shellcheck disable=SC2086
  WORLD_SIZE=$((GPUS * NNODES)) python -m hex.train "${ARGS[@]}" $EXTRA "$@" --check
else
  ARGS+=(--device cpu)
fi
# shellcheck disable=SC2086
launch --max-restarts 3 -- hex.train "${ARGS[@]}" $EXTRA "$@"
