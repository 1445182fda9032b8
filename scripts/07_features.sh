#!/usr/bin/env bash
# Stage 07: MICA feature bags. H&E patch features -> OUT/features/{encoder}/{h5_files,pt_files}/,
# virtual-CODEX channel features -> OUT/codex_features/{codex encoder}.h5. Needs stages 01 (grids) and 06 (maps).
# GPUS>0: torchrun with GPUS processes per node (slides shared among them); GPUS=0: one process.
# Arguments of this script go to python -m mica.extract_features after EXTRA: bash scripts/07_features.sh --overwrite.
# TORCHRUN_ARGS go to torchrun itself (GPUS>0). (--help: these variables and the module's flags; runs nothing).
COHORT=${COHORT:-sample_cohort}          # slides in COHORT/he/
OUT=${OUT:-outputs}                      # reads patches/, virtual_codex/ (and runs/ for hex:RUN)
HEX_RUN=${HEX_RUN:-}                     # set to use the backbone of OUT/runs/HEX_RUN as H&E encoder (the demo)
ENCODER=${ENCODER:-${HEX_RUN:+hex:$HEX_RUN}}  # empty: hex:HEX_RUN when HEX_RUN is set, else musk (next line)
ENCODER=${ENCODER:-musk}                 # musk | dinov2_vits14_reg | tiny | timm:<name> | hex:RUN
WEIGHTS=${WEIGHTS:-}                     # H&E encoder weights: local file or hf_hub:<repo> (empty: random/HEX run)
CODEX_ENCODER=${CODEX_ENCODER:-stats}    # stats | dinov2_vits14_reg (the original MICA; give CODEX_WEIGHTS)
CODEX_WEIGHTS=${CODEX_WEIGHTS:-}         # CODEX encoder weights: local file or hf_hub:<repo>
WHAT=${WHAT:-both}                       # he | codex | both
GPUS=${GPUS:-0}                          # processes per node (torchrun); 0 = one process
NNODES=${NNODES:-1}                      # nodes (GPUS>0); several: give TORCHRUN_ARGS
WORKERS=${WORKERS:-4}                    # DataLoader workers per process
EXTRA=${EXTRA:-}                         # more flags for mica.extract_features, e.g. "--batch-size 256 --shard 0/4"
TORCHRUN_ARGS=${TORCHRUN_ARGS:-}         # flags for torchrun itself (GPUS>0), e.g. for several nodes
                                         # "--node-rank 0 --rdzv-backend c10d --rdzv-endpoint HOST:29500"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
require_module mica.extract_features
ARGS=(--cohort "$COHORT" --out "$OUT" --what "$WHAT" --encoder "$ENCODER" --codex-encoder "$CODEX_ENCODER"
      --workers "$WORKERS")
[ -n "$WEIGHTS" ] && ARGS+=(--weights "$WEIGHTS")
[ -n "$CODEX_WEIGHTS" ] && ARGS+=(--codex-weights "$CODEX_WEIGHTS")
# shellcheck disable=SC2086
launch mica.extract_features "${ARGS[@]}" $EXTRA "$@"
