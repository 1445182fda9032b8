"""Stage 03: mean intensity of every CODEX marker under every H&E patch, then normalisation to [0, 1].

    python -m preprocess.quantify --cohort sample_cohort --out outputs --workers 2
    python -m preprocess.quantify --cohort sample_cohort --out outputs --fit-split sample_cohort/splits/splits_0.csv
    python -m preprocess.quantify --pairs pairs.csv --panel marker_panel.csv --out outputs --legacy-columns
    python -m preprocess.quantify --cohort C --out O --shard 0/4 ... --shard 3/4   # job array: pass 1 only, then
    python -m preprocess.normalize --cohort C --out O --fit-split C/splits/splits_0.csv
    python -m preprocess.quantify --cohort test_cohort --out out_test \\
        --normalization outputs/markers/normalization.json        # apply a training cohort's percentiles
    python -m preprocess.quantify --cohort sample_cohort --out outputs --dense-grid 16   # + 7 µm cell labels

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
   change the values; below): a slide done with these is skipped, one whose input changed (a fixed panel
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

Dense labels (``--dense-grid G``, default 0 = none; :mod:`preprocess.quantify.dense`): pass 1 also writes the raw
mean of every marker in each of the G x G cells of side P / G px of every patch with CODEX pixels
(``markers/raw/{slide}_dense.h5``; same map, same no-data test; a cell with no CODEX pixel or mostly without
data is NaN), and pass 2 normalises them with the patch labels' record into ``markers_dense/{slide}.h5`` for
exactly the rows of ``markers/{slide}.csv``. ``--registration-model affine`` maps the CODEX through the affine only
(no displacement field), for the patch labels and the dense ones.

Exit code: 0; 1 when a slide failed (the others are labelled) or the normalisation failed; 2 before any work for
bad flags, missing inputs (pairing table, panel, split or normalization file, the patches / registration
folders), an unwritable output folder, or slides done with other settings.

Pixel sizes: the CODEX's from its OME-XML, ``--codex-mpp`` or the slide's row of ``--pixel-sizes`` (default
``COHORT/pixel_sizes.csv`` when it exists; :mod:`preprocess.pixel_sizes`); the H&E's (only for a check of the
affine's scale) from the grid file, ``--mpp`` or the table.

Pass 1 is keyed by a done-record per slide (``markers/done/{slide}.json``, :mod:`pipeline.done`):

- inputs: ``codex`` (the CODEX image as the pairing table or ``COHORT/codex/`` names it), ``grid``
  (``patches/{slide}.h5``), ``registration`` (``registration/{slide}.json``), ``field`` (its displacement field
  file, stamped as missing when it has none) and ``panel`` (the marker panel CSV). A changed input file (stage 01
  or 02 redone, the panel fixed) redoes the slide, and the log says which file.
- settings (:func:`done_settings`): ``channels_by``, ``codex_mpp``, ``nodata_um`` -- what changes the values of a
  slide -- and, only when not the default, ``dense_grid`` and ``registration_model``. A slide done without cell
  means is redone when ``--dense-grid`` asks for them (they are one of its outputs then); one done with them stops a
  run without ``--dense-grid`` (other settings: ``--overwrite``, which also removes its dense labels). Not recorded:
  the panel's content (it is the ``panel`` input: editing it redoes the slides, it does not stop them),
  ``--allow-flagged`` / ``--panel-wins`` / ``--num-markers`` (they decide whether a slide may be quantified, not its
  values; the sidecar records a flagged registration, and the normalisation warns about the labels made through
  one), ``--mpp`` (a check only), ``--region-px`` / ``--threads`` / ``--workers`` (how the work is cut, not what it
  computes).
- A rerun with other settings or other input paths stops before any work and before ``config.json`` is written:
  ``... done with other settings: <diff>; pass --overwrite`` (exit 2).

A slide that fails leaves ``markers/done/{slide}.failed.json`` with the reason (read with
``pipeline.done.read_failure(OUT / "markers", slide)``) and neither raw means nor labels. The last log line
covers both passes: ``quantify: N done, N skipped (already done), N failed: slide (reason); labels: ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import artifacts as art
from pipeline import done as done_mod
from pipeline.cli import SlideJob, Stage, config_from_args, require
from pipeline.errors import PipelineError
from pipeline.io import atomic_path, ensure_writable
from pipeline.runner import StageReport, default_threads, shard_slides
from preprocess.panel import resolve_channel_map
from preprocess.patch import add_common_args, read_grid, read_tissue_fraction
from preprocess.pixel_sizes import PixelSizes, add_pixel_sizes_arg, resolve_pixel_sizes
from preprocess.quantify.accumulate import ZeroAreas, quantify_patches
from preprocess.quantify.dense import cell_side, dense_label_path, write_raw_dense
from preprocess.quantify.geometry import CodexToHE, load_registration
from preprocess.quantify.normalize import (
    NormPlan,
    NormSettings,
    add_normalization_args,
    check_normalization_args,
    resolve_inputs,
    run_normalization,
)
from preprocess.quantify.raw import (
    RAW_SCHEMA,
    input_entry,
    label_csv_path,
    raw_csv_path,
    raw_dense_path,
    raw_meta_path,
    write_raw_meta,
)
from preprocess.quantify.tables import Tables, add_table_args
from preprocess.slide_io import CodexImage

log = logging.getLogger(__name__)

DESC = "quantify"


@dataclass(frozen=True)
class QuantConfig:
    """Everything one slide's job needs (picklable for the process pool)."""

    out: Path
    patches_dir: Path
    registration_dir: Path
    markers: tuple[str, ...]
    panel: tuple[tuple[int, str], ...] | None
    panel_path: str | None
    codex_mpp: float | None = None
    he_mpp: float | None = None
    allow_flagged: bool = False
    region_px: int = 1024
    threads: int = 1
    panel_wins: bool = False
    nodata_um: float = 40.0  # smallest all-zero square (µm) of the no-data test; 0 = no test
    dense_grid: int = 0  # G x G cell means per patch (markers/raw/{slide}_dense.h5); 0 = none
    registration_model: str = "field"  # "field": affine + displacement field; "affine": the affine only


def quantify_slide(slide_id: str, codex_path: str | os.PathLike | None, cfg: QuantConfig) -> dict:
    """Pass 1 for one slide: raw per-patch means -> ``markers/raw/{slide}.csv`` (+ ``.json`` sidecar)."""
    import pandas as pd

    grid_path = Path(cfg.patches_dir) / f"{slide_id}.h5"
    coords, attrs = read_grid(grid_path)
    size = int(attrs["patch_size_level0"])
    if cfg.dense_grid:
        cell_side(size, cfg.dense_grid, f" of {grid_path}")
    reg_path = Path(cfg.registration_dir) / f"{slide_id}.json"
    inputs = {"grid": input_entry(grid_path), "registration": input_entry(reg_path) if reg_path.exists() else None}
    mapping, rec = load_registration(reg_path, cfg.allow_flagged)
    if cfg.registration_model == "affine":
        mapping = CodexToHE(mapping.affine)
    field_file = reg_path.parent / rec["displacement"]["file"] if rec.get("displacement") else None
    if codex_path is None or not str(codex_path).strip() or Path(codex_path).is_dir():
        raise PipelineError(f"slide {slide_id} has no CODEX image (an empty codex_image in pairs.csv, or no "
                            f"COHORT/codex/{slide_id}.*); add it, or list the pair in pairs.csv")
    if not Path(codex_path).exists():
        raise PipelineError(f"CODEX image not found: {codex_path}")
    inputs |= {"displacement": input_entry(field_file), "codex": input_entry(codex_path)}
    with CodexImage(codex_path, mpp=cfg.codex_mpp) as codex:
        channel_map = resolve_channel_map(codex, list(cfg.markers),
                                          [tuple(p) for p in cfg.panel] if cfg.panel else None, cfg.panel_path,
                                          cfg.panel_wins)
        he_mpp = cfg.he_mpp or attrs.get("level0_mpp")
        if he_mpp:
            scale = math.sqrt(abs(np.linalg.det(mapping.affine[:2, :2])))
            expected = codex.mpp / float(he_mpp)
            if abs(scale / expected - 1) > 0.1:
                log.warning("%s: the affine scales CODEX px by %.4f but the pixel sizes give %.4f (%.4f / %.4f "
                            "µm/px); check the registration or --codex-mpp/--mpp", slide_id, scale, expected,
                            codex.mpp, float(he_mpp))
        cell = int(round(cfg.nodata_um / codex.mpp)) if cfg.nodata_um > 0 else 0
        channels = [i for _, i, _ in channel_map]
        zero_areas = ZeroAreas(codex, channels, cell) if cfg.dense_grid and cell > 0 else None
        res = quantify_patches(codex, channels, coords, size, mapping, cfg.region_px, cfg.threads,
                               desc=f"{slide_id} regions", nodata_px=cell, zero_areas=zero_areas)
        nodata = missing_data_fraction(res.zero_fraction, read_tissue_fraction(grid_path, len(coords)))
        res.coverage = res.coverage * (1.0 - nodata)
        if not np.any(res.coverage > 0):
            raise PipelineError(f"no patch of {slide_id} overlaps CODEX data of {codex_path} through the "
                                f"registration in {reg_path}; check the registration")
        if cfg.dense_grid:
            write_raw_dense(raw_dense_path(cfg.out, slide_id), codex, channels, list(cfg.markers), coords,
                            np.flatnonzero(res.counts > 0), size, cfg.dense_grid, mapping,
                            nodata if cell > 0 else None, he_mpp, cfg.region_px, cfg.threads, cell, zero_areas,
                            desc=f"{slide_id} cells")
    df = pd.DataFrame(res.means, columns=list(cfg.markers))
    df.insert(0, "n_codex_px", res.counts)
    df.insert(0, "coverage", res.coverage)
    df.insert(0, "y", coords[:, 1])
    df.insert(0, "x", coords[:, 0])
    df.insert(0, "index", np.arange(len(coords)))
    df.insert(0, "slide", slide_id)
    with atomic_path(raw_csv_path(cfg.out, slide_id)) as tmp:
        df.to_csv(tmp, index=False)
    write_raw_meta(cfg.out, slide_id, {
        "schema_version": RAW_SCHEMA, "slide": slide_id, "inputs": inputs,
        "channels": [[m, int(i), n] for m, i, n in channel_map],
        "channels_units": "[marker, 0-based channel index in the CODEX file, OME channel name (null: none)]",
        "through_displacement_field": field_file is not None and cfg.registration_model == "field",
        "nodata_px": cell,
        "registration_status": rec.get("status"),
        "patches_missing_data": int(np.sum(nodata > 0.01)),
    } | ({"dense_grid": cfg.dense_grid, "dense_cell_px_level0": size // cfg.dense_grid} if cfg.dense_grid else {}))
    log.info("%s: %d patches, %d with coverage > 0, median coverage %.3f%s%s", slide_id, len(coords),
             int((res.coverage > 0).sum()), float(np.median(res.coverage)),
             ", through the displacement field" if mapping.field is not None else "",
             f", cell means on a {cfg.dense_grid} x {cfg.dense_grid} grid" if cfg.dense_grid else "")
    return {"patches": len(coords), "covered": int((res.coverage > 0).sum())}


def missing_data_fraction(zero_fraction: np.ndarray | None, tissue_fraction: np.ndarray) -> np.ndarray:
    """(N,) fraction of each patch where the CODEX has no data: its all-zero area beyond what its glass
    (1 - H&E tissue fraction) explains, since background-subtracted glass is all-zero as well."""
    if zero_fraction is None:
        return np.zeros_like(tissue_fraction)
    return np.clip(zero_fraction - (1.0 - np.clip(tissue_fraction, 0.0, 1.0)), 0.0, 1.0)


def _work(slide_id: str, pairs: dict[str, tuple[Path, Path | None]], cfg: QuantConfig, sizes: PixelSizes) -> dict:
    cfg = dataclasses.replace(cfg, codex_mpp=sizes.codex_mpp(slide_id), he_mpp=sizes.he_mpp(slide_id))
    return quantify_slide(slide_id, pairs[slide_id][1], cfg)


def outputs(slide_id: str, out: Path) -> list[Path]:
    """What stage 03 writes for one slide (raw means, sidecar, labels, and the dense ones): removed before a slide is
    redone."""
    return [raw_csv_path(out, slide_id), raw_meta_path(out, slide_id), label_csv_path(out, slide_id),
            raw_dense_path(out, slide_id), dense_label_path(out, slide_id)]


def done_outputs(slide_id: str, out: Path, dense: bool = False) -> list[Path]:
    """What must exist for pass 1 of a slide to count as done (the raw means and their sidecar; with ``dense``, the
    raw cell means too: a slide done without them is redone when they are asked for)."""
    return [raw_csv_path(out, slide_id), raw_meta_path(out, slide_id)] + (
        [raw_dense_path(out, slide_id)] if dense else [])


def field_path(reg_path: Path) -> Path:
    """The displacement field file a registration record names (the stage-02 name when it names none)."""
    try:
        rec = json.loads(reg_path.read_text())
        name = (rec.get("displacement") or {}).get("file")
    except (OSError, ValueError, AttributeError):
        name = None
    return reg_path.parent / (name or f"{reg_path.stem}_displacement.npy")


def done_inputs(slide_id: str, pairs: Mapping[str, tuple[Path, Path | None]], patches_dir: Path,
                registration_dir: Path, panel_path: Path) -> dict[str, Path]:
    """{role: file} pass 1 of a slide is made from (see the module docstring)."""
    reg = Path(registration_dir) / f"{slide_id}.json"
    roles = {"grid": Path(patches_dir) / f"{slide_id}.h5", "registration": reg, "field": field_path(reg),
             "panel": Path(panel_path)}
    codex = pairs[slide_id][1] if slide_id in pairs else None
    if codex is not None:
        roles["codex"] = Path(codex)
    return roles


def done_settings(cfg: QuantConfig, channels_by: str) -> dict[str, Any]:
    """The settings that change a slide's raw means (see the module docstring); ``dense_grid`` and
    ``registration_model`` only when not the default (records of runs without them stay as they were)."""
    return {"channels_by": channels_by, "codex_mpp": cfg.codex_mpp, "nodata_um": float(cfg.nodata_um)} | (
        {"dense_grid": int(cfg.dense_grid)} if cfg.dense_grid else {}) | (
        {"registration_model": cfg.registration_model} if cfg.registration_model != "field" else {})


def codex_mpp_setting(slide_id: str, sizes: PixelSizes) -> dict[str, float | None]:
    """A slide's own settings (:data:`~preprocess.quantify.raw.SLIDE_SETTINGS`): its ``codex_mpp`` (``--codex-mpp``
    or its row of the pixel-size table)."""
    return {"codex_mpp": sizes.codex_mpp(slide_id)}


def done_spec(cfg: QuantConfig, tables: Tables, channels_by: str, sizes: PixelSizes | None = None) -> done_mod.DoneSpec:
    """Pass 1's :class:`pipeline.done.DoneSpec`: records in ``OUT/markers/done/``; ``sizes`` gives each slide its
    ``codex_mpp`` (default ``cfg.codex_mpp`` for every slide)."""
    sizes = sizes if sizes is not None else PixelSizes(codex_default=cfg.codex_mpp)
    return done_mod.DoneSpec(
        folder=art.LABELS.dir(cfg.out), settings=done_settings(cfg, channels_by), schema=art.LABELS.schema,
        inputs=functools.partial(done_inputs, pairs=tables.pairs, patches_dir=cfg.patches_dir,
                                 registration_dir=cfg.registration_dir, panel_path=tables.panel_path),
        outputs=functools.partial(done_outputs, out=cfg.out, dense=cfg.dense_grid > 0),
        slide_settings=functools.partial(codex_mpp_setting, sizes=sizes))


@dataclass(frozen=True, kw_only=True)
class QuantifyConfig(NormSettings):
    """Stage 03's settings: the flags of ``python -m preprocess.quantify`` (same names); a slide's job gets them as
    :class:`QuantConfig`."""

    out: Path
    cohort: Path | None = None
    slides: list[str] | None = None
    overwrite: bool = False
    workers: int = 1
    fail_fast: bool = False
    shard: str | None = None
    pairs: Path | None = None
    panel: Path | None = None
    num_markers: int = 40
    patches: Path | None = None
    registration: Path | None = None
    channels_by: str = "index"
    panel_wins: bool = False
    codex_mpp: float | None = None
    mpp: float | None = None
    pixel_sizes: Path | None = None
    allow_flagged: bool = False
    nodata_um: float = 40.0
    dense_grid: int = 0
    registration_model: str = "field"
    no_normalize: bool = False
    region_px: int = 1024
    threads: int = 0


def make_config(args: argparse.Namespace) -> QuantifyConfig:
    """The flags as a :class:`QuantifyConfig`; invalid values stop before any work (one line naming the flag)."""
    check_normalization_args(args)
    for name, v, lo in (("--workers", args.workers, 1), ("--region-px", args.region_px, 16),
                        ("--threads", args.threads, 0)):
        require(v >= lo, f"{name} must be >= {lo} (got {v})")
    for name, v in (("--codex-mpp", args.codex_mpp), ("--mpp", args.mpp)):
        require(v is None or v > 0, f"{name} must be positive (got {v})")
    require(args.nodata_um >= 0, f"--nodata-um must be >= 0 (0 = no test; got {args.nodata_um})")
    require(args.dense_grid >= 0, f"--dense-grid must be >= 0 (0 = no dense labels; got {args.dense_grid})")
    return config_from_args(QuantifyConfig, args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m preprocess.quantify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    add_table_args(p)
    p.add_argument("--patches", type=Path, help="folder of the grid files (default OUT/patches)")
    p.add_argument("--registration", type=Path, help="folder of registration records (default OUT/registration)")
    p.add_argument("--channels-by", choices=["index", "name"], default="index",
                   help="find each marker's channel by the panel's channel index (default; the OME channel names "
                        "must agree) or by the OME channel names (then every marker name must be in the file)")
    p.add_argument("--panel-wins", action="store_true",
                   help="with --channels-by index: use the panel's indices even where the OME names disagree "
                        "(default: stop and list the mismatches)")
    p.add_argument("--codex-mpp", type=float, help="CODEX level-0 µm/px when the OME-XML has none")
    p.add_argument("--mpp", type=float, help="H&E level-0 µm/px (default: from the grid file; used for a check)")
    add_pixel_sizes_arg(p)
    p.add_argument("--allow-flagged", action="store_true", help="use registrations with status 'flagged'")
    p.add_argument("--nodata-um", type=float, default=40.0,
                   help="no-data test: CODEX pixels in an area where every marker channel is 0 and that holds a "
                        "square of this side (µm) are zero area; a patch's zero area beyond its glass (1 - its "
                        "stage-01 tissue fraction) is missing data (zero fill: missing tiles, outside the stitched "
                        "ROI) and lowers its coverage (0 = no test; default 40)")
    p.add_argument("--dense-grid", type=int, default=0, metavar="G",
                   help="also write dense (cell-scale) labels OUT/markers_dense/{slide}.h5: the mean of every marker "
                        "on a G x G grid of cells inside each labelled patch, normalised like the patch labels; G "
                        "must divide the patch side (16: cells of 14 px = 7 µm for 224 px patches at 20x, 28 px = 7 "
                        "µm at 40x; default 0 = none)")
    p.add_argument("--registration-model", choices=["field", "affine"], default="field",
                   help="map the CODEX through the registration's affine and its displacement field (field, default) "
                        "or the affine only (affine: ignores the field, for patch and dense labels; e.g. to show "
                        "what the field adds at cell scale)")
    p.add_argument("--no-normalize", action="store_true",
                   help="pass 1 only (implied by --shard: run `python -m preprocess.normalize` after all shards)")
    p.add_argument("--region-px", type=int, default=1024, help="side of the decoded CODEX regions, px (default 1024)")
    p.add_argument("--threads", type=int, default=0,
                   help="threads per slide over regions (default: CPU cores / --workers, at most 4)")
    add_normalization_args(p)
    return p


def _writable(cfg: QuantifyConfig, ctx: Any) -> None:
    """The output folder is checked before the inputs (an unwritable OUT is named first)."""
    ensure_writable(art.LABELS.dir(cfg.out))


def _finish(report: StageReport, cfg: QuantifyConfig, tables: Tables, plan: NormPlan) -> int:
    """Pass 2 over every slide of the cohort with fresh raw means (unless pass 1 only), then the one last line
    ``quantify: ...; labels: ...``; a failed normalisation makes the exit status 1."""
    if cfg.shard or cfg.no_normalize:
        return report.finish(DESC, "labels: not written (pass 1 only); normalise after all shards with "
                                   f"`python -m preprocess.normalize --out {cfg.out}"
                                   f"{f' --cohort {cfg.cohort}' if cfg.cohort else ''}`")
    candidates = [s for s in tables.ids if s not in report.failed]
    try:
        extra = "labels: " + run_normalization(cfg, cfg.out, candidates, tables.markers, plan).summary
        failed_norm = False
    except PipelineError as e:
        log.error("normalisation: %s", e)
        extra, failed_norm = f"labels: not written ({e})", True
    rc = report.finish(DESC, extra)
    return max(rc, 1) if failed_norm else rc


def check_dense_grid(slides: list[str], patches_dir: Path, grid: int) -> None:
    """``--dense-grid`` must divide the patch side of every slide's grid file (checked before any work; a grid
    file that is missing or unreadable is the slide's own failure later)."""
    import h5py

    for s in slides:
        path = Path(patches_dir) / f"{s}.h5"
        try:
            with h5py.File(path, "r") as f:
                size = int(f.attrs["patch_size_level0"])
        except (OSError, KeyError, TypeError, ValueError):
            continue
        cell_side(size, grid, f" of {path}")


def plan(cfg: QuantifyConfig) -> SlideJob:
    """The slides, panel and normalisation plan of this run, and what makes a slide's pass 1 done."""
    tables, selected, norm_plan = resolve_inputs(cfg, cfg.cohort, cfg.pairs, cfg.panel, cfg.num_markers, cfg.slides)
    slides = shard_slides(selected, cfg.shard)
    threads = cfg.threads or default_threads(cfg.workers)
    job_cfg = QuantConfig(out=cfg.out, patches_dir=cfg.patches or art.PATCH_GRID.dir(cfg.out),
                          registration_dir=cfg.registration or art.REGISTRATION.dir(cfg.out),
                          markers=tuple(tables.markers),
                          panel=tuple(tables.panel) if cfg.channels_by == "index" else None,
                          panel_path=str(tables.panel_path), codex_mpp=cfg.codex_mpp, he_mpp=cfg.mpp,
                          allow_flagged=cfg.allow_flagged, region_px=cfg.region_px, threads=threads,
                          panel_wins=cfg.panel_wins, nodata_um=cfg.nodata_um, dense_grid=cfg.dense_grid,
                          registration_model=cfg.registration_model)
    for what, folder, stage, flag in (
            ("patch grid folder", job_cfg.patches_dir, "preprocess.patch (stage 01)", "--patches"),
            ("registration folder", job_cfg.registration_dir, "preprocess.register (stage 02)", "--registration")):
        if not Path(folder).is_dir():
            raise PipelineError(f"{what} not found: {folder}; run {stage} first, or give {flag}")
    if cfg.dense_grid:
        check_dense_grid(slides, job_cfg.patches_dir, cfg.dense_grid)
    sizes = resolve_pixel_sizes(cfg.pixel_sizes, cfg.cohort, tables.ids, he_mpp=cfg.mpp, codex_mpp=cfg.codex_mpp)
    spec = done_spec(job_cfg, tables, cfg.channels_by, sizes)
    return SlideJob(art.LABELS.dir(cfg.out), slides, functools.partial(_work, pairs=tables.pairs, cfg=job_cfg,
                                                                        sizes=sizes),
                    done=spec, config=cfg, overwrite=cfg.overwrite, workers=cfg.workers, fail_fast=cfg.fail_fast,
                    shard=cfg.shard, outputs=functools.partial(outputs, out=cfg.out),
                    finish=functools.partial(_finish, cfg=cfg, tables=tables, plan=norm_plan),
                    extra_config={"pairs_resolved": tables.source, "panel_resolved": tables.panel_path,
                                  "markers": tables.markers, "threads_resolved": threads,
                                  "done_settings": spec.settings, "pixel_sizes_resolved": sizes.path})


STAGE = Stage(DESC, build_parser, make_config, plan=plan, prepare=_writable)


def main(argv: list[str] | None = None) -> int:
    return STAGE.main(argv)
