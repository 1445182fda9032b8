"""Stage 03: mean intensity of every CODEX marker under every H&E patch, then normalisation to [0, 1].

    python -m preprocess.quantify --cohort sample_cohort --out outputs --workers 2
    python -m preprocess.quantify --cohort sample_cohort --out outputs --fit-split sample_cohort/splits/splits_0.csv
    python -m preprocess.quantify --pairs pairs.csv --panel marker_panel.csv --out outputs --legacy-columns
    python -m preprocess.quantify --cohort C --out O --shard 0/4 ... --shard 3/4   # job array: pass 1 only, then
    python -m preprocess.normalize --cohort C --out O --fit-split C/splits/splits_0.csv
    python -m preprocess.quantify --cohort test_cohort --out out_test \\
        --normalization outputs/markers/normalization.json        # apply a training cohort's percentiles

Inputs (paths relative to ``--out`` unless given): ``patches/{slide}.h5`` (stage 01), ``registration/{slide}.json``
(stage 02: ``affine_codex_to_he`` maps CODEX level-0 pixel (x, y, 1) to H&E level-0 pixel coordinates, and its
``displacement`` field when it has one; a record with ``status: flagged`` is refused unless ``--allow-flagged``),
the slides of :func:`pipeline.cohort.resolve_slides` (``--pairs``, else ``COHORT/pairs.csv``, else ``COHORT/he/``
with ``COHORT/codex/{slide}.*``; ids are the names as written, a link keeps its own; the H&E files are never read)
and the marker panel (channel,marker: the markers, in panel order, and their 0-based channel in the CODEX file; the
OME channel names must agree unless ``--panel-wins``).

Two passes:
1. per slide, raw means -> ``markers/raw/{slide}.csv``: ``slide,index,x,y,coverage,n_codex_px,<markers>`` for every
   grid patch (``index`` = row in ``patches/{slide}.h5``; x, y = level-0 top-left), and ``markers/raw/{slide}.json``
   (resolved (marker, channel, OME name) triples). The mean of a marker is the average of the CODEX
   level-0 pixels whose centres, mapped through the registration (affine, then the displacement field), fall
   inside the patch (pixel centres at integer coordinates; a patch with top-left x and side s holds
   [x - 0.5, x + s - 0.5)); ``n_codex_px`` counts them. ``coverage`` is the fraction of the patch's area covered
   by the mapped CODEX image (exact polygon clipping; with a field, of the map linearised at the patch) times
   (1 - its missing-data fraction): the part of the patch in all-zero CODEX areas holding a ``--nodata-um``
   square (zero fill: missing tiles, outside the stitched ROI) beyond what its glass explains (1 - the stage-01
   tissue fraction; background-subtracted glass is all-zero too). Keyed by a done-record per slide
   (``markers/done/{slide}.json``: the CODEX, grid, registration, field and panel files, and the settings that
   change the values; :mod:`.stage`): a slide done with these is skipped, one whose input changed (a fixed panel
   included) is redone, one done with other settings stops the run before any work (``--overwrite`` to redo).
   A slide that is redone loses its old outputs first; one that fails keeps none, and its reason is in
   ``markers/done/{slide}.failed.json``.
2. normalisation (:mod:`preprocess.quantify.normalize`; also ``python -m preprocess.normalize``, the one step that
   runs after all shards of pass 1): per marker, value = clip((raw - P_low) / (P_high - P_low), 0, 1) with
   P_low / P_high the ``--low-pct`` / ``--high-pct`` percentiles (default 1 and 99) of the raw means of the fit
   slides' patches with coverage >= ``--min-coverage`` (default 0.95). The fit slides are ``--fit-slides``, a split
   file's train column (``--fit-split``), or by default every slide normalised; they are recorded in
   ``markers/normalization.json`` (``fit_slides``). Writes ``markers/{slide}.csv`` (``slide,index,x,y,<markers>``;
   patches below the coverage threshold are left out; ``--legacy-columns`` adds ``mean_intensity_channel{1..K}``)
   for every slide of the cohort with fresh raw means. With ``--normalization FILE`` the percentiles of an
   earlier run are applied instead. ``--shard i/n`` and ``--no-normalize`` run pass 1 only. The step is redone
   on every run with the settings given now (a label file is rewritten when its content changes; the log names
   the settings that changed), so labels of another ``--fit-split`` or other percentiles are never kept.

Exit code: 0; 1 when a slide failed (the others are labelled) or the normalisation failed; 2 before any work for
bad flags, missing inputs (pairing table, panel, split or normalization file, the patches / registration
folders), an unwritable output folder, or slides done with other settings.

Modules: :mod:`.geometry` (the map, patch lookup, coverage), :mod:`.readers` (CODEX region reads),
:mod:`.accumulate` (sums per patch, no-data test), :mod:`.raw` (pass-1 files), :mod:`.normalize` (pass 2),
:mod:`.tables` (pairs and panel), :mod:`.stage` (per-slide work and the CLI).
"""

from preprocess.quantify.accumulate import QuantResult, ZeroAreas, accumulate_region, quantify_patches
from preprocess.quantify.geometry import (
    CodexToHE,
    PatchLookup,
    codex_coverage,
    load_affine,
    load_registration,
    patch_coverage,
    regions_touched,
)
from preprocess.quantify.normalize import (
    apply_normalization,
    compute_normalization,
    fit_leakage,
    load_normalization,
    normalize_cohort,
)
from preprocess.quantify.raw import RAW_META_COLUMNS, load_raw, raw_csv_path
from preprocess.quantify.readers import TiledRegionReader, ZarrRegionReader
from preprocess.quantify.stage import SCHEMA_VERSION, QuantConfig, build_parser, done_spec, main, quantify_slide

__all__ = [
    "RAW_META_COLUMNS", "SCHEMA_VERSION", "CodexToHE", "PatchLookup", "QuantConfig", "QuantResult",
    "TiledRegionReader", "ZarrRegionReader", "ZeroAreas", "accumulate_region", "apply_normalization",
    "build_parser", "codex_coverage", "compute_normalization", "done_spec", "fit_leakage", "load_affine",
    "load_normalization",
    "load_raw", "load_registration", "main", "normalize_cohort", "patch_coverage", "quantify_patches",
    "quantify_slide", "raw_csv_path", "regions_touched",
]
