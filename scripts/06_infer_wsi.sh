#!/usr/bin/env bash
# Stage 06: whole-slide HEX inference -> OUT/hex_pred/{slide}.h5, then the virtual CODEX maps -> OUT/virtual_codex/.
# GPUS>0: torchrun with GPUS processes (slides shared among them, NCCL); GPUS=0: one CPU process.
# Original release checkpoint: CHECKPOINT=/path/checkpoint.pth BACKBONE=musk WEIGHTS=/path/musk/model.safetensors
# Arguments of this script go to python -m hex.infer_wsi after EXTRA: bash scripts/06_infer_wsi.sh --overwrite.
# TORCHRUN_ARGS go to torchrun itself (GPUS>0). (--help: these variables and the module's flags; runs nothing).
COHORT=${COHORT:-sample_cohort}          # slides in COHORT/he/
OUT=${OUT:-outputs}                      # OUT/patches/ (stage 01 grid, used when STRIDE is empty) and OUT/runs/RUN
FOLD=${FOLD:-0}                          # names the default RUN (the model stage 04 trained on this fold)
RUN=${RUN:-hex_fold${FOLD}}              # checkpoint OUT/runs/RUN/best.safetensors unless CHECKPOINT is set
CHECKPOINT=${CHECKPOINT:-}               # best.safetensors, checkpoints/epoch_k.pt, or the original checkpoint.pth
BACKBONE=${BACKBONE:-}                   # original checkpoint.pth only (default musk)
WEIGHTS=${WEIGHTS:-}                     # original heads-only checkpoint.pth: backbone weights file
STRIDE=${STRIDE:-}                       # tile step in px at 0.5 µm/px; empty = patch size (stage-01 grid), e.g. 56
DENSE=${DENSE:-0}                        # 1 = also the dense (7 µm, cell-scale) map: needs a model trained with DENSE=1
DENSE_STRIDE=${DENSE_STRIDE:-}           # DENSE=1: dense tile step in px at 0.5 µm/px; empty = a quarter of the tile (56)
GPUS=${GPUS:-0}                          # processes per node (torchrun); 0 = one CPU process
NNODES=${NNODES:-1}                      # nodes (GPUS>0); several: give TORCHRUN_ARGS
WORKERS=${WORKERS:-4}                    # DataLoader workers reading regions, per process
EXTRA=${EXTRA:-}                         # more flags for hex.infer_wsi, e.g. "--raw-units --batch-size 256 --shard 0/4"
TORCHRUN_ARGS=${TORCHRUN_ARGS:-}         # flags for torchrun itself (GPUS>0), e.g. for several nodes
                                         # "--node-rank 0 --rdzv-backend c10d --rdzv-endpoint HOST:29500"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
require_module hex.infer_wsi
ARGS=(--cohort "$COHORT" --out "$OUT" --run-name "$RUN" --workers "$WORKERS")
[ -n "$CHECKPOINT" ] && ARGS+=(--checkpoint "$CHECKPOINT")
[ -n "$BACKBONE" ] && ARGS+=(--backbone "$BACKBONE")
[ -n "$WEIGHTS" ] && ARGS+=(--weights "$WEIGHTS")
[ -n "$STRIDE" ] && ARGS+=(--stride "$STRIDE")
[ "$DENSE" = 1 ] && ARGS+=(--dense)
[ "$DENSE" = 1 ] && [ -n "$DENSE_STRIDE" ] && ARGS+=(--dense-stride "$DENSE_STRIDE")
# shellcheck disable=SC2086
launch hex.infer_wsi "${ARGS[@]}" $EXTRA "$@"
