#!/usr/bin/env bash
# Stage 07: MICA feature bags. H&E patch features -> OUT/features/{encoder}/{h5_files,pt_files}/,
# virtual-CODEX channel features -> OUT/codex_features/{codex encoder}.h5. Needs stages 01 (grids) and 06 (maps).
COHORT=${COHORT:-sample_cohort}
OUT=${OUT:-outputs}
HEX_RUN=${HEX_RUN:-}                     # set to use the backbone of OUT/runs/HEX_RUN as H&E encoder (the demo)
ENCODER=${ENCODER:-${HEX_RUN:+hex:$HEX_RUN}}
ENCODER=${ENCODER:-musk}                 # musk | dinov2_vits14_reg | tiny | timm:<name> | hex:RUN
WEIGHTS=${WEIGHTS:-}                     # H&E encoder weights: local file or hf_hub:<repo> (empty: random/HEX run)
CODEX_ENCODER=${CODEX_ENCODER:-stats}    # stats | dinov2_vits14_reg (the original MICA; give CODEX_WEIGHTS)
CODEX_WEIGHTS=${CODEX_WEIGHTS:-}
WHAT=${WHAT:-both}                       # he | codex | both
GPUS=${GPUS:-0}
WORKERS=${WORKERS:-4}
EXTRA=${EXTRA:-}                         # e.g. "--batch-size 256 --shard 0/4 --overwrite"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
require_module mica.extract_features
ARGS=(--cohort "$COHORT" --out "$OUT" --what "$WHAT" --encoder "$ENCODER" --codex-encoder "$CODEX_ENCODER"
      --workers "$WORKERS")
[ -n "$WEIGHTS" ] && ARGS+=(--weights "$WEIGHTS")
[ -n "$CODEX_WEIGHTS" ] && ARGS+=(--codex-weights "$CODEX_WEIGHTS")
if [ "$GPUS" -gt 0 ]; then
  # shellcheck disable=SC2086
  torchrun --standalone --nproc-per-node "$GPUS" -m mica.extract_features "${ARGS[@]}" $EXTRA
else
  # shellcheck disable=SC2086
  python -m mica.extract_features "${ARGS[@]}" $EXTRA
fi
