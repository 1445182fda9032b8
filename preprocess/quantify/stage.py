"""Stage 03 pass 1 per slide (raw means through the registration) and the ``python -m preprocess.quantify`` CLI."""

from __future__ import annotations

import argparse
import functools
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from preprocess.panel import resolve_channel_map
from preprocess.patch import add_common_args, read_grid
from preprocess.quantify.accumulate import quantify_patches
from preprocess.quantify.geometry import load_registration
from preprocess.quantify.normalize import add_normalization_args, resolve_run, run_normalization
from preprocess.quantify.raw import (
    input_entry,
    label_csv_path,
    raw_csv_path,
    raw_meta_path,
    stale_reason,
    write_raw_meta,
)
from preprocess.quantify.tables import add_table_args
from preprocess.slide_io import CodexImage
from preprocess.utils import (
    PipelineError,
    atomic_path,
    default_threads,
    run_slides,
    save_config,
    shard_config_name,
    shard_slides,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2


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
        raise PipelineError(f"slide {slide_id} has no CODEX image in the pairing table")
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


def _is_done(slide_id: str, out: Path) -> bool:
    """Raw means exist and are newer than the grid, registration record and field they were made from."""
    why = stale_reason(out, slide_id)
    if why is not None and raw_csv_path(out, slide_id).exists():
        log.info("%s: %s; recomputing", slide_id, why)
    return why is None


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
    out_dir = args.out / "markers"
    try:
        tables, selected = resolve_run(args)
        slides = shard_slides(selected, args.shard)
    except PipelineError as e:
        log.error("%s", e)
        return 2
    threads = args.threads or default_threads(args.workers)
    cfg = QuantConfig(out=args.out, patches_dir=args.patches or args.out / "patches",
                      registration_dir=args.registration or args.out / "registration", markers=tuple(tables.markers),
                      panel=tuple(tables.panel) if args.channels_by == "index" else None,
                      panel_path=str(tables.panel_path), codex_mpp=args.codex_mpp, he_mpp=args.mpp,
                      allow_flagged=args.allow_flagged, region_px=args.region_px, threads=threads,
                      panel_wins=args.panel_wins, nodata_um=args.nodata_um)
    save_config(out_dir, vars(args) | {"pairs_resolved": tables.pairs_path, "panel_resolved": tables.panel_path,
                                       "markers": tables.markers, "slides_resolved": slides,
                                       "threads_resolved": threads, "schema_version": SCHEMA_VERSION},
                name=shard_config_name(args.shard))
    try:
        report = run_slides(slides, functools.partial(_work, pairs=tables.pairs, cfg=cfg),
                            functools.partial(_is_done, out=args.out), overwrite=args.overwrite, workers=args.workers,
                            skip_errors=not args.fail_fast, desc="marker means (raw)",
                            outputs=functools.partial(outputs, out=args.out))
    except PipelineError as e:  # --fail-fast
        log.error("%s", e)
        return 1
    if args.shard or args.no_normalize:
        log.info("pass 1 done (%s); normalise after all shards with `python -m preprocess.normalize --out %s%s`",
                 report.summary(), args.out, f" --cohort {args.cohort}" if args.cohort else "")
        return 0 if report.ok else 1
    # the slides to label: every slide of the pairing table with fresh raw means (this run's or cached), or the
    # selected ones when a fixed normalisation is applied
    candidates = [s for s in (selected if args.normalization else sorted(tables.pairs)) if s not in report.failed]
    try:
        run_normalization(args, args.out, candidates, tables.markers)
    except PipelineError as e:
        log.error("%s", e)
        return 1
    return 0 if report.ok else 1
