#!/usr/bin/env bash
# Stage 10: spatial niches from the virtual CODEX. Cells (nuclei detected in the H&E, or CELLS=folder of QuPath
# GeoJSON / CSV exports) or the tiles of stage 06 (UNITS=tiles), each with the virtual CODEX at it (and the measured
# CODEX where the slide has it) -> phenotypes (gating table or clusters) -> neighbourhoods and niches (one k-means
# over the cohort) -> per slide OUT/spatial/{slide}.h5ad (AnnData), .geojson (QuPath), _niches.png; cohort tables,
# figures and the niche-outcome association (clinical.csv) in OUT/spatial/cohort/. Needs stage 06 (and 02-03 for
# the measured CODEX). SHARD=i/n runs the per-slide half only; a run without it finishes the cohort.
# Arguments of this script go to python -m spatial.niches after EXTRA: bash scripts/10_niches.sh --overwrite.
# (--help: these variables and the module's flags; runs nothing).
COHORT=${COHORT:-sample_cohort}          # he/ (or pairs.csv), clinical.csv, splits/
OUT=${OUT:-outputs}                      # reads virtual_codex/ (or hex_pred/), registration/, markers/; writes spatial/
UNITS=${UNITS:-cells}                    # cells | tiles (OUT/spatial_tiles/)
CELLS=${CELLS:-}                         # folder of {slide}.geojson (QuPath) or {slide}.csv (x,y px); empty: detect
GATING=${GATING:-}                       # gating CSV (phenotype,rule,priority); empty: spatial/gating_default.csv
PHENOTYPES=${PHENOTYPES:-gating}         # gating | cluster
K=${K:-5}                                # units per window: the unit and its K-1 nearest (Schürch et al.: 10)
NICHES=${NICHES:-8}                      # niches (k-means clusters of the windows)
PERMS=${PERMS:-200}                      # label permutations of the co-localisation z-scores
SHARD=${SHARD:-}                         # i/n: every n-th slide from i (job arrays), per-slide half only
WORKERS=${WORKERS:-1}                    # processes building the slides' units (nuclei, markers), a slide each
EXTRA=${EXTRA:-}                         # more flags for spatial.niches, e.g. "--source measured --radius 50"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
require_module spatial.niches
ARGS=(--cohort "$COHORT" --out "$OUT" --units "$UNITS" --phenotypes "$PHENOTYPES" --k "$K" --n-niches "$NICHES"
      --n-perms "$PERMS" --workers "$WORKERS")
[ -n "$CELLS" ] && ARGS+=(--cells "$CELLS")
[ -n "$GATING" ] && ARGS+=(--gating "$GATING")
[ -n "$SHARD" ] && ARGS+=(--shard "$SHARD")
# shellcheck disable=SC2086
launch spatial.niches "${ARGS[@]}" $EXTRA "$@"
