#!/usr/bin/env bash
# Stage 04: train HEX (H&E patch -> 40 markers). GPUS>0: torchrun with GPUS processes (NCCL);
# GPUS=0: one CPU process. Paper settings: BACKBONE=musk WEIGHTS=/path/to/musk.safetensors EPOCHS=120 GPUS=8.
COHORT=${COHORT:-sample_cohort}          # for clinical.csv and splits/
OUT=${OUT:-outputs}                      # holds he_patches/ and markers/ from stage 03; run goes to OUT/runs/RUN
RUN=${RUN:-hex_fold0}
FOLD=${FOLD:-0}
BACKBONE=${BACKBONE:-musk}               # musk | dinov2_vits14_reg | timm:<name> | tiny
WEIGHTS=${WEIGHTS:-}                     # local weights file (or hf_hub:<repo> with internet); empty = random init
GPUS=${GPUS:-0}
NNODES=${NNODES:-1}
EPOCHS=${EPOCHS:-120}
WORKERS=${WORKERS:-8}
EXTRA=${EXTRA:-}                         # flags for hex.train, e.g. "--batch-size 48 --lr 1e-5"
TORCHRUN_ARGS=${TORCHRUN_ARGS:-}         # multi-node: "--node-rank 0 --rdzv-backend c10d --rdzv-endpoint HOST:29500"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
require_module hex.train
ARGS=(--data "$OUT" --out "$OUT" --run-name "$RUN" --split "$COHORT/splits/splits_${FOLD}.csv"
      --clinical "$COHORT/clinical.csv" --backbone "$BACKBONE" --epochs "$EPOCHS" --workers "$WORKERS"
      --resume auto)  # continue a run that has checkpoints (a finished run is left as it is)
[ -n "$WEIGHTS" ] && ARGS+=(--weights "$WEIGHTS")
if [ "$GPUS" -gt 0 ]; then
  # shellcheck disable=SC2086
  torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS" --max-restarts 3 $TORCHRUN_ARGS -m hex.train "${ARGS[@]}" $EXTRA
else
  # shellcheck disable=SC2086
  python -m hex.train "${ARGS[@]}" $EXTRA
fi
