"""Stage 03 pass 1 per slide (raw means through the registration) and the ``python -m preprocess.quantify`` CLI.

Pass 1 is keyed by a done-record per slide (``markers/done/{slide}.json``, :mod:`pipeline.done`):

- inputs: ``codex`` (the CODEX image as the pairing table or ``COHORT/codex/`` names it), ``grid``
  (``patches/{slide}.h5``), ``registration`` (``registration/{slide}.json``), ``field`` (its displacement field
  file, stamped as missing when it has none) and ``panel`` (the marker panel CSV). A changed input file (stage 01
  or 02 redone, the panel fixed) redoes the slide, and the log says which file.
- settings (:func:`done_settings`): ``channels_by``, ``codex_mpp``, ``nodata_um`` -- what changes the values of a
  slide. Not recorded: the panel's content (it is the ``panel`` input: editing it redoes the slides, it does not
  stop them), ``--allow-flagged`` / ``--panel-wins`` / ``--num-markers`` (they decide whether a slide may be
  quantified, not its values; the sidecar records a flagged registration, and the normalisation warns about the
  labels made through one), ``--mpp`` (a check only), ``--region-px`` / ``--threads`` / ``--workers`` (how the
  work is cut, not what it computes).
- A rerun with other settings or other input paths stops before any work and before ``config.json`` is written:
  ``... done with other settings: <diff>; pass --overwrite`` (exit 2).

A slide that fails leaves ``markers/done/{slide}.failed.json`` with the reason (read with
``pipeline.done.read_failure(OUT / "markers", slide)``) and neither raw means nor labels. The last log line
covers both passes: ``quantify: N done, N skipped (already done), N failed: slide (reason); labels: ...``.
"""

from __future__ import annotations

import argparse
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

from pipeline import done as done_mod
from pipeline.errors import PipelineError
from pipeline.io import atomic_path, save_config
from pipeline.runner import default_threads, run_slides, shard_config_name, shard_slides
from preprocess.panel import resolve_channel_map
from preprocess.patch import add_common_args, read_grid
from preprocess.quantify.accumulate import quantify_patches
from preprocess.quantify.geometry import load_registration
from preprocess.quantify.normalize import add_normalization_args, resolve_run, run_normalization
from preprocess.quantify.raw import (
    RAW_SCHEMA,
    input_entry,
    label_csv_path,
    raw_csv_path,
    raw_meta_path,
    write_raw_meta,
)
from preprocess.quantify.tables import Tables, add_table_args
from preprocess.slide_io import CodexImage

log = logging.getLogger(__name__)

SCHEMA_VERSION = RAW_SCHEMA
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


def quantify_slide(slide_id: str, codex_path: str | os.PathLike | None, cfg: QuantConfig) -> dict:
    """Pass 1 for one slide: raw per-patch means -> ``markers/raw/{slide}.csv`` (+ ``.json`` sidecar)."""
    import pandas as pd

    grid_path = Path(cfg.patches_dir) / f"{slide_id}.h5"
    coords, attrs = read_grid(grid_path)
    reg_path = Path(cfg.registration_dir) / f"{slide_id}.json"
    inputs = {"grid": input_entry(grid_path), "registration": input_entry(reg_path) if reg_path.exists() else None}
    mapping, rec = load_registration(reg_path, cfg.allow_flagged)
    field_file = reg_path.parent / rec["displacement"]["file"] if rec.get("displacement") else None
    size = int(attrs["patch_size_level0"])
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
        res = quantify_patches(codex, [i for _, i, _ in channel_map], coords, size, mapping, cfg.region_px,
                               cfg.threads, desc=f"{slide_id} regions", nodata_px=cell)
    nodata = missing_data_fraction(res.zero_fraction, _tissue_fraction(grid_path, len(coords)))
    res.coverage = res.coverage * (1.0 - nodata)
    if not np.any(res.coverage > 0):
        raise PipelineError(f"no patch of {slide_id} overlaps CODEX data of {codex_path} through the registration "
                            f"in {reg_path}; check the registration")
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
        "schema_version": SCHEMA_VERSION, "slide": slide_id, "inputs": inputs,
        "channels": [[m, int(i), n] for m, i, n in channel_map],
        "channels_units": "[marker, 0-based channel index in the CODEX file, OME channel name (null: none)]",
        "through_displacement_field": field_file is not None, "nodata_px": cell,
        "registration_status": rec.get("status"),
        "patches_missing_data": int(np.sum(nodata > 0.01)),
    })
    log.info("%s: %d patches, %d with coverage > 0, median coverage %.3f%s", slide_id, len(coords),
             int((res.coverage > 0).sum()), float(np.median(res.coverage)),
             ", through the displacement field" if field_file else "")
    return {"patches": len(coords), "covered": int((res.coverage > 0).sum())}


def _tissue_fraction(grid_path: Path, n: int) -> np.ndarray:
    """The grid's per-patch H&E tissue fraction (stage 01's ``tissue_fraction``; ones when the grid has none)."""
    import h5py

    with h5py.File(grid_path, "r") as f:
        return f["tissue_fraction"][:].astype(np.float64) if "tissue_fraction" in f else np.ones(n)


def missing_data_fraction(zero_fraction: np.ndarray | None, tissue_fraction: np.ndarray) -> np.ndarray:
    """(N,) fraction of each patch where the CODEX has no data: its all-zero area beyond what its glass
    (1 - H&E tissue fraction) explains, since background-subtracted glass is all-zero as well."""
    if zero_fraction is None:
        return np.zeros_like(tissue_fraction)
    return np.clip(zero_fraction - (1.0 - np.clip(tissue_fraction, 0.0, 1.0)), 0.0, 1.0)


def _work(slide_id: str, pairs: dict[str, tuple[Path, Path | None]], cfg: QuantConfig) -> dict:
    return quantify_slide(slide_id, pairs[slide_id][1], cfg)


def outputs(slide_id: str, out: Path) -> list[Path]:
    """What stage 03 writes for one slide (raw means, sidecar, labels): removed before a slide is redone."""
    return [raw_csv_path(out, slide_id), raw_meta_path(out, slide_id), label_csv_path(out, slide_id)]


def done_outputs(slide_id: str, out: Path) -> list[Path]:
    """What must exist for pass 1 of a slide to count as done (the raw means and their sidecar)."""
    return [raw_csv_path(out, slide_id), raw_meta_path(out, slide_id)]


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
    """The settings that change a slide's raw means (see the module docstring)."""
    return {"channels_by": channels_by, "codex_mpp": cfg.codex_mpp, "nodata_um": float(cfg.nodata_um)}


def done_spec(cfg: QuantConfig, tables: Tables, channels_by: str) -> done_mod.DoneSpec:
    """Pass 1's :class:`pipeline.done.DoneSpec`: records in ``OUT/markers/done/``."""
    return done_mod.DoneSpec(
        folder=Path(cfg.out) / "markers", settings=done_settings(cfg, channels_by), schema=SCHEMA_VERSION,
        inputs=functools.partial(done_inputs, pairs=tables.pairs, patches_dir=cfg.patches_dir,
                                 registration_dir=cfg.registration_dir, panel_path=tables.panel_path),
        outputs=functools.partial(done_outputs, out=cfg.out))


def check_args(args: argparse.Namespace) -> None:
    """Invalid values stop before any work (one line naming the flag)."""
    for name, v, lo in (("--workers", args.workers, 1), ("--region-px", args.region_px, 16),
                        ("--threads", args.threads, 0)):
        if v < lo:
            raise PipelineError(f"{name} must be >= {lo} (got {v})")
    for name, v in (("--codex-mpp", args.codex_mpp), ("--mpp", args.mpp)):
        if v is not None and not v > 0:
            raise PipelineError(f"{name} must be positive (got {v})")
    if not args.nodata_um >= 0:
        raise PipelineError(f"--nodata-um must be >= 0 (0 = no test; got {args.nodata_um})")


def build_parser() -> argparse.ArgumentParser:
    import preprocess.quantify as pkg

    p = argparse.ArgumentParser(prog="python -m preprocess.quantify", description=pkg.__doc__,
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
    p.add_argument("--allow-flagged", action="store_true", help="use registrations with status 'flagged'")
    p.add_argument("--nodata-um", type=float, default=40.0,
                   help="no-data test: CODEX pixels in an area where every marker channel is 0 and that holds a "
                        "square of this side (µm) are zero area; a patch's zero area beyond its glass (1 - its "
                        "stage-01 tissue fraction) is missing data (zero fill: missing tiles, outside the stitched "
                        "ROI) and lowers its coverage (0 = no test; default 40)")
    p.add_argument("--no-normalize", action="store_true",
                   help="pass 1 only (implied by --shard: run `python -m preprocess.normalize` after all shards)")
    p.add_argument("--region-px", type=int, default=1024, help="side of the decoded CODEX regions, px (default 1024)")
    p.add_argument("--threads", type=int, default=0,
                   help="threads per slide over regions (default: CPU cores / --workers, at most 4)")
    add_normalization_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        tables, selected, plan = resolve_run(args, check_args)
        slides = shard_slides(selected, args.shard)
        threads = args.threads or default_threads(args.workers)
        cfg = QuantConfig(out=args.out, patches_dir=args.patches or args.out / "patches",
                          registration_dir=args.registration or args.out / "registration",
                          markers=tuple(tables.markers),
                          panel=tuple(tables.panel) if args.channels_by == "index" else None,
                          panel_path=str(tables.panel_path), codex_mpp=args.codex_mpp, he_mpp=args.mpp,
                          allow_flagged=args.allow_flagged, region_px=args.region_px, threads=threads,
                          panel_wins=args.panel_wins, nodata_um=args.nodata_um)
        for what, folder, stage, flag in (
                ("patch grid folder", cfg.patches_dir, "preprocess.patch (stage 01)", "--patches"),
                ("registration folder", cfg.registration_dir, "preprocess.register (stage 02)", "--registration")):
            if not Path(folder).is_dir():
                raise PipelineError(f"{what} not found: {folder}; run {stage} first, or give {flag}")
        spec = done_spec(cfg, tables, args.channels_by)
        done_mod.stop_on_conflicts(spec, slides, DESC, args.overwrite)
    except PipelineError as e:
        log.error("%s", e)
        return 2
    out_dir = args.out / "markers"
    save_config(out_dir, vars(args) | {"pairs_resolved": tables.source, "panel_resolved": tables.panel_path,
                                       "markers": tables.markers, "slides_resolved": slides,
                                       "threads_resolved": threads, "schema_version": SCHEMA_VERSION,
                                       "done_settings": spec.settings},
                name=shard_config_name(args.shard))
    try:
        report = run_slides(slides, functools.partial(_work, pairs=tables.pairs, cfg=cfg), overwrite=args.overwrite,
                            workers=args.workers, skip_errors=not args.fail_fast, desc=DESC,
                            outputs=functools.partial(outputs, out=args.out), done=spec)
    except PipelineError as e:  # --fail-fast (conflicts were checked above)
        log.error("%s", e)
        return 1
    if args.shard or args.no_normalize:
        return report.finish(DESC, "labels: not written (pass 1 only); normalise after all shards with "
                                   f"`python -m preprocess.normalize --out {args.out}"
                                   f"{f' --cohort {args.cohort}' if args.cohort else ''}`")
    # the slides to label: every slide of the cohort with fresh raw means (this run's or cached)
    candidates = [s for s in tables.ids if s not in report.failed]
    try:
        extra = "labels: " + run_normalization(args, args.out, candidates, tables.markers, plan).summary
        failed_norm = False
    except PipelineError as e:
        log.error("normalisation: %s", e)
        extra, failed_norm = f"labels: not written ({e})", True
    rc = report.finish(DESC, extra)
    return max(rc, 1) if failed_norm else rc
