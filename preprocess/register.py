"""Stage 02: register each CODEX image (DAPI) to its H&E slide (haematoxylin) with palom.

Usage (from the repository root)::

    python -m preprocess.register --cohort sample_cohort --out outputs
    python -m preprocess.register --cohort sample_cohort --out outputs --slides slide_000 slide_003 --overwrite
    python -m preprocess.register --pairs my_pairs.csv --out outputs --codex-mpp 0.377 --write-registered
    python -m preprocess.register --cohort sample_cohort --out outputs --shard 3/10     # job array task 3 of 10
    COHORT=/data/lung OUT=/scratch/hex bash scripts/02_register.sh

Inputs: the slides of :func:`pipeline.cohort.resolve_slides`: ``--pairs`` (``he_slide,codex_image``, paths
relative to the CSV), else ``COHORT/pairs.csv``, else the files of ``COHORT/he/`` with ``COHORT/codex/{slide}.*``
as their CODEX. Slide ids are the file names as written (a symbolic link keeps its own name), as in every stage.
Outputs under ``OUT/registration/``:

- ``{slide}.json``: ``he``, ``codex``, ``he_mpp``, ``codex_mpp``, ``affine_codex_to_he`` (3x3, CODEX level-0 px
  (x, y, 1) -> H&E level-0 px, integer coordinates = pixel centres), ``displacement`` (``{"file":
  "{slide}_displacement.npy", "step_px": S}`` or null), ``affine_coarse``, ``block_shifts``, ``qc``
  (``ncc_before`` / ``ncc_coarse`` / ``ncc_affine`` / ``ncc_after`` and diagnostics), ``status`` (``ok`` |
  ``flagged``), ``reason``.
- ``{slide}_displacement.npy``: the non-rigid part, (2, Gy, Gx) float32 (dx, dy) in H&E level-0 px at nodes
  (x, y) = (j, i)·S; the H&E point x_he shows CODEX point ``inv(affine) @ (x_he - D(x_he))``, D bilinear.
- ``{slide}_qc.png``: haematoxylin (magenta) over warped DAPI (green): before, coarse, after, the field, a zoom.
- ``{slide}_registered.ome.tif`` with ``--write-registered``: the CODEX resampled into the H&E pixel grid
  (pyramidal OME-TIFF, channel names kept, PhysicalSize = H&E mpp), streamed tile by tile.
- ``config.json`` (resolved arguments), ``register.log``, ``summary.csv`` (one row per slide).
- ``done/{slide}.json``: the done-record (:mod:`pipeline.done`): the settings below, the input files (``he``,
  ``codex``, ``panel`` when it decides the DAPI channel) with size and mtime. A rerun skips a slide done with
  these inputs and settings, redoes it when an input file changed (said in the log), and stops before any work
  with ``done with other settings: <diff>; pass --overwrite`` (exit 2) when the settings or input paths differ.
  The settings are the resolved :class:`RegParams` that change the outputs; not ``threads`` / ``--workers``, not
  ``--panel-wins`` (it only lets a slide through whose DAPI name disagrees, the values are the same), not
  ``--write-registered`` / ``--tile-size`` (the export is an extra output: a slide without it is redone when it is
  asked for; its tile size is layout only). ``done/{slide}.failed.json`` holds why a slide failed.

Method, per pair:

1. Working images at ``--thumbnail-mpp`` µm/px (both images resampled to the same pixel size, using the pixel sizes
   from the files, ``--mpp`` / ``--codex-mpp``, or the slide's row of ``--pixel-sizes``, default
   ``COHORT/pixel_sizes.csv``: :mod:`preprocess.pixel_sizes`): H&E -> haematoxylin (``rgb2hed``), CODEX -> DAPI.
2. Coarse affine: palom ``Aligner.coarse_register_affine`` (ORB keypoints + RANSAC) on these images.
3. Block shifts: the H&E haematoxylin at ``--block-mpp`` µm/px (a pyramid level, area-averaged by an integer
   factor when finer: 40x slides) is cut into ``--block-size`` µm blocks; palom ``compute_shifts`` warps the DAPI
   by the coarse affine and finds each block's shift by phase correlation with ``--upsample`` sub-pixel
   upsampling; blocks without tissue or not fully covered by the CODEX are masked; ``constrain_shifts`` is run as
   palom's outlier check (it raises when all shifts are identical: caught, recorded).
4. Refinement: each block centre c (H&E) is matched to its CODEX point A_coarse^-1(c) and to c + shift; an affine is
   fitted to these pairs by RANSAC then least squares with iterative trimming of outlier blocks. That affine is
   ``affine_codex_to_he``. What the affine leaves of each block's shift is kept as a displacement field (serial
   sections deform by 5-20 µm): blocks far (``--field-outlier-um``) from a plane through their neighbours are
   replaced from them, blocks without a measurement are filled from planes through the measured ones, and the
   field is sampled at nodes one block apart (``--no-displacement``: affine only).
5. QC: NCC of the haematoxylin and the DAPI warped by the transform, at ``--qc-mpp`` µm/px inside the H&E tissue
   that the CODEX covers, for the pixel-size-only placement (before), the coarse affine, the block affine and the
   final transform (affine + field). A slide is
   ``flagged`` (not failed) when NCC after < ``--ncc-threshold``, when the affine is implausible (scale off the
   pixel-size ratio by more than ``--max-scale-dev``, shear above ``--max-shear``, a reflection), when palom's
   feature matching returned its identity placeholder, or when too few blocks were usable to refine.

The last log line is ``registration: N done, N skipped (already done), N failed: slide (reason); ...; N flagged``.
Exit code: 0 when every slide was registered (flagged slides included, they are listed), 1 when any slide failed
(unreadable or missing CODEX, missing pixel size), 2 before any work for argument errors, a missing pairing table,
panel or H&E file, an unwritable output folder, or slides done with other settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import artifacts as art
from pipeline.cli import SlideJob, Stage, config_from_args, require
from pipeline.cohort import resolve_slides, select_slides
from pipeline.errors import PipelineError
from pipeline.io import write_json
from pipeline.runner import StageReport, shard_file_name, shard_slides
from preprocess.pixel_sizes import PixelSizes, add_pixel_sizes_arg, resolve_pixel_sizes
from preprocess.registration.field import DisplacementField
from preprocess.registration.pair import register_pair
from preprocess.registration.params import RegParams
from preprocess.registration.stage_files import done_settings, done_spec, outputs, write_summary
from preprocess.slide_io import CodexImage, HESlide

log = logging.getLogger(__name__)

def register_slide(slide: str, pairs: dict[str, tuple[Path, Path | None]], pairs_path: str, out_dir: str,
                   params: RegParams, sizes: PixelSizes | None = None) -> dict[str, Any]:
    """Stage work for one slide (module level so that a process pool can pickle it); writes its outputs.

    ``pairs``: {slide: (H&E path, CODEX path or None)}, paths as written (links not followed); ``pairs_path``: where
    they came from (the pairing table or the cohort folder), for messages; ``sizes``: the slide's pixel sizes
    (``--mpp`` / ``--codex-mpp`` or its row of the pixel-size table) replace ``params.he_mpp`` / ``codex_mpp``. The
    record is written last: it is what marks the slide as registered.
    """
    if sizes is not None:
        params = dataclasses.replace(params, he_mpp=sizes.he_mpp(slide), codex_mpp=sizes.codex_mpp(slide))
    if slide not in pairs:
        raise PipelineError(f"slide {slide} is not listed in {pairs_path}")
    he_path, codex_path = pairs[slide]
    table = str(pairs_path).endswith(".csv")
    if codex_path is None or codex_path.is_dir():
        raise PipelineError(f"slide {slide} has no CODEX image in {pairs_path} (empty codex_image)" if table else
                            f"slide {slide} has no CODEX image (no codex/{slide}.* beside {pairs_path}); add it, or "
                            "list the pair in pairs.csv")
    if not he_path.exists():
        raise PipelineError(f"H&E slide not found: {he_path} (listed for {slide} in {pairs_path})")
    if not codex_path.exists():
        raise PipelineError(f"CODEX image not found: {codex_path} (listed for {slide} in {pairs_path})")
    json_path, png_path, npy_path, ome_path = outputs(slide, out_dir)
    record = register_pair(he_path, codex_path, params, qc_png=png_path, field_npy=npy_path)
    record["slide"] = slide
    if params.write_registered:
        from preprocess.registration.export import write_registered_ome

        t0 = time.perf_counter()
        field = None
        if record.get("displacement"):
            field = DisplacementField.load(npy_path, record["displacement"]["step_px"])
        with CodexImage(codex_path, mpp=params.codex_mpp) as codex, HESlide(he_path, mpp=params.he_mpp) as he:
            write_registered_ome(codex, np.asarray(record["affine_codex_to_he"]), he.dimensions, he.mpp, ome_path,
                                 tile=params.tile_size, field=field)
        record["registered_ome"] = str(ome_path)
        record["qc"]["seconds"]["registered_ome"] = time.perf_counter() - t0
    write_json(json_path, record)
    q = record["qc"]
    disp = record.get("displacement")
    log.info("%s: %s, NCC before %s coarse %s affine %s after %s, %d/%d blocks used%s, %.1f s%s", slide,
             record["status"], _fmt(q["ncc_before"]), _fmt(q["ncc_coarse"]), _fmt(q["ncc_affine"]),
             _fmt(q["ncc_after"]), q["n_blocks_used"], q["n_blocks_measured"],
             f", field up to {disp['max_um']:.1f} µm" if disp else "", q["seconds"]["total"],
             f" -- {record['reason']}" if record["reason"] else "")
    return {"status": record["status"], "reason": record["reason"], "ncc_before": q["ncc_before"],
            "ncc_after": q["ncc_after"]}


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _route_palom_logs() -> None:
    """Send palom's loguru messages (INFO and above) to the ``palom`` std logger instead of raw stderr."""
    try:
        from loguru import logger as loguru_logger
    except ImportError:  # pragma: no cover - palom depends on loguru
        return
    pl = logging.getLogger("palom")

    def sink(message) -> None:
        rec = message.record
        pl.log(logging.WARNING if rec["level"].no >= 30 else logging.DEBUG, rec["message"])

    loguru_logger.remove()
    loguru_logger.add(sink, level="INFO", format="{message}")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only when there is one (not None / False) and the help text does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        h = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in h:
            return h
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The stage's argument parser (``python -m preprocess.register --help``)."""
    p = argparse.ArgumentParser(prog="python -m preprocess.register", description=__doc__.split("\n\n")[0],
                                formatter_class=_HelpFormatter)
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--cohort", type=Path, help="cohort folder (he/, codex/, pairs.csv, marker_panel.csv)")
    io.add_argument("--pairs", type=Path, help="pairing table he_slide,codex_image (default: COHORT/pairs.csv)")
    io.add_argument("--marker-panel", type=Path,
                    help="channel,marker CSV used to find DAPI (default: COHORT/marker_panel.csv when present)")
    io.add_argument("--out", type=Path, default=Path("outputs"), help="output root; writes OUT/registration/")
    io.add_argument("--slides", nargs="+", help="slide ids to register (default: every row of the pairing table)")
    io.add_argument("--overwrite", action="store_true", help="redo slides whose outputs exist")
    io.add_argument("--workers", type=int, default=1, help="slides registered in parallel (processes)")
    io.add_argument("--fail-fast", action="store_true", help="stop at the first failing slide")
    io.add_argument("--shard", metavar="I/N",
                    help="job arrays: only every N-th slide of the sorted list, from I (0-based)")
    px = p.add_argument_group("pixel sizes")
    px.add_argument("--mpp", type=float, help="H&E level-0 µm/px (overrides the slide metadata)")
    px.add_argument("--codex-mpp", type=float, help="CODEX level-0 µm/px (overrides the OME PhysicalSizeX)")
    add_pixel_sizes_arg(px)
    px.add_argument("--dapi-channel", type=int, help="CODEX DAPI channel index (default: from the panel / names)")
    px.add_argument("--panel-wins", action="store_true",
                    help="use the panel's DAPI channel even when the OME channel there has another name (default: "
                         "stop and list the mismatch)")
    reg = p.add_argument_group("registration")
    d = RegParams()
    reg.add_argument("--thumbnail-mpp", type=float, default=d.thumbnail_mpp,
                     help="µm/px of the coarse (keypoint) working images")
    reg.add_argument("--thumbnail-max-px", type=int, default=d.thumbnail_max_px,
                     help="the coarse working images are coarsened so their longer side stays below this")
    reg.add_argument("--n-keypoints", type=int, default=d.n_keypoints, help="ORB keypoints of the coarse step")
    reg.add_argument("--block-mpp", type=float, default=d.block_mpp,
                     help="µm/px of the block-shift step (the H&E level at it, area-averaged when finer: 40x)")
    reg.add_argument("--block-size", type=float, default=d.block_size_um, help="block side in µm")
    reg.add_argument("--max-blocks", type=int, default=d.max_blocks,
                     help="blocks are enlarged so that the grid over the whole H&E has at most this many")
    reg.add_argument("--upsample", type=int, default=d.upsample, help="phase-correlation sub-pixel upsampling")
    reg.add_argument("--pcc-sigma", type=float, default=d.pcc_sigma,
                     help="Gaussian sigma (block-step px) of palom's whitening before phase correlation")
    reg.add_argument("--min-tissue", type=float, default=d.min_tissue,
                     help="tissue fraction a block needs for its shift to be measured")
    reg.add_argument("--min-blocks", type=int, default=d.min_blocks,
                     help="fewest usable blocks to fit the refined affine (else coarse + median shift, flagged)")
    reg.add_argument("--no-displacement", action="store_true",
                     help="affine only: do not keep the block residuals as a displacement field")
    reg.add_argument("--field-outlier-um", type=float, default=d.field_outlier_um,
                     help="a block whose shift is this far (µm) from the plane through its neighbours is replaced "
                          "from them in the displacement field")
    reg.add_argument("--min-field-blocks", type=int, default=d.min_field_blocks,
                     help="fewest measured blocks for a displacement field (else affine only)")
    q = p.add_argument_group("quality control")
    q.add_argument("--qc-mpp", type=float, default=d.qc_mpp, help="µm/px of the NCC working images")
    q.add_argument("--ncc-threshold", type=float, default=d.ncc_threshold,
                   help="flag slides whose NCC after registration is below this (synthetic cohort: correct "
                        "pairs 0.90-0.93, another slide's CODEX <= 0.18, a correct pair 5 / 10 µm off 0.4-0.55 / "
                        "0.05-0.23; real pairs score lower: check the _qc.png of a few slides)")
    q.add_argument("--max-scale-dev", type=float, default=d.max_scale_dev,
                   help="flag affines whose scale deviates from the pixel-size ratio by more than this (relative)")
    q.add_argument("--max-shear", type=float, default=d.max_shear, help="flag affines with more shear than this")
    w = p.add_argument_group("registered image")
    w.add_argument("--write-registered", action="store_true",
                   help="also write the CODEX resampled into the H&E grid as a pyramidal OME-TIFF")
    w.add_argument("--tile-size", type=int, default=d.tile_size, help="tile side (px) of the registered OME-TIFF")
    return p


@dataclass(frozen=True)
class RegisterConfig:
    """Stage 02's settings: the flags of ``python -m preprocess.register`` (same names); a slide's job gets them as
    :class:`RegParams` (:meth:`params`)."""

    out: Path = Path("outputs")
    cohort: Path | None = None
    pairs: Path | None = None
    marker_panel: Path | None = None
    slides: list[str] | None = None
    overwrite: bool = False
    workers: int = 1
    fail_fast: bool = False
    shard: str | None = None
    mpp: float | None = None
    codex_mpp: float | None = None
    pixel_sizes: Path | None = None
    dapi_channel: int | None = None
    panel_wins: bool = False
    thumbnail_mpp: float = RegParams.thumbnail_mpp
    thumbnail_max_px: int = RegParams.thumbnail_max_px
    n_keypoints: int = RegParams.n_keypoints
    block_mpp: float = RegParams.block_mpp
    block_size: float = RegParams.block_size_um
    max_blocks: int = RegParams.max_blocks
    upsample: int = RegParams.upsample
    pcc_sigma: float = RegParams.pcc_sigma
    min_tissue: float = RegParams.min_tissue
    min_blocks: int = RegParams.min_blocks
    no_displacement: bool = False
    field_outlier_um: float = RegParams.field_outlier_um
    min_field_blocks: int = RegParams.min_field_blocks
    qc_mpp: float = RegParams.qc_mpp
    ncc_threshold: float = RegParams.ncc_threshold
    max_scale_dev: float = RegParams.max_scale_dev
    max_shear: float = RegParams.max_shear
    write_registered: bool = False
    tile_size: int = RegParams.tile_size

    def params(self, marker_panel: Path | None, threads: int) -> RegParams:
        """The registration parameters of every slide (``marker_panel``: the resolved panel)."""
        return RegParams(
            he_mpp=self.mpp, codex_mpp=self.codex_mpp, dapi_channel=self.dapi_channel,
            marker_panel=str(marker_panel) if marker_panel else None, panel_wins=self.panel_wins,
            thumbnail_mpp=self.thumbnail_mpp, thumbnail_max_px=self.thumbnail_max_px, n_keypoints=self.n_keypoints,
            block_mpp=self.block_mpp, block_size_um=self.block_size, max_blocks=self.max_blocks,
            upsample=self.upsample, pcc_sigma=self.pcc_sigma, min_tissue=self.min_tissue, min_blocks=self.min_blocks,
            displacement=not self.no_displacement, field_outlier_um=self.field_outlier_um,
            min_field_blocks=self.min_field_blocks, qc_mpp=self.qc_mpp, ncc_threshold=self.ncc_threshold,
            max_scale_dev=self.max_scale_dev, max_shear=self.max_shear, write_registered=self.write_registered,
            tile_size=self.tile_size, threads=threads,
        )


def make_config(args: argparse.Namespace) -> RegisterConfig:
    """The flags as a :class:`RegisterConfig`; invalid values stop before any work (one line naming the flag)."""
    for name, v in (("--mpp", args.mpp), ("--codex-mpp", args.codex_mpp), ("--block-size", args.block_size),
                    ("--thumbnail-mpp", args.thumbnail_mpp), ("--qc-mpp", args.qc_mpp),
                    ("--block-mpp", args.block_mpp), ("--field-outlier-um", args.field_outlier_um)):
        require(v is None or v > 0, f"{name} must be positive (got {v})")
    for name, v, lo in (("--upsample", args.upsample, 1), ("--workers", args.workers, 1),
                        ("--thumbnail-max-px", args.thumbnail_max_px, 64), ("--n-keypoints", args.n_keypoints, 10),
                        ("--max-blocks", args.max_blocks, 1), ("--min-blocks", args.min_blocks, 1),
                        ("--tile-size", args.tile_size, 16), ("--dapi-channel", args.dapi_channel, 0)):
        require(v is None or v >= lo, f"{name} must be >= {lo} (got {v})")
    require(0 <= args.min_tissue <= 1, f"--min-tissue must be in [0, 1] (got {args.min_tissue})")
    require(args.pairs is not None or args.cohort is not None,
            "give --cohort (a folder with pairs.csv, or he/ and codex/) or --pairs")
    return config_from_args(RegisterConfig, args)


def _finish(report: StageReport, cfg: RegisterConfig, slides: list[str]) -> int:
    """The summary table, the flagged slides, and the last line ``registration: ...; N flagged; summary in ...``."""
    reg_dir = art.REGISTRATION.dir(cfg.out)
    summary = reg_dir / shard_file_name(cfg.shard, "summary", ".csv")
    rows = write_summary(summary, slides, cfg.out, report.failed)
    flagged = [r for r in rows if r["status"] == "flagged"]
    if flagged:
        log.warning("%d flagged slides (check their _qc.png): %s", len(flagged),
                    "; ".join(f"{r['slide']}: {r['reason']}" for r in flagged))
    return report.finish("registration", f"{len(flagged)} flagged; summary in {summary}")


def plan(cfg: RegisterConfig) -> SlideJob:
    """The pairs of this run, the resolved panel and parameters, and what makes each slide done."""
    if cfg.cohort is not None and not cfg.cohort.is_dir():
        raise PipelineError(f"cohort folder not found: {cfg.cohort}")
    cohort = resolve_slides(cfg.cohort, pairs=cfg.pairs, need_codex=True)
    pairs_path = cohort.source
    pairs = cohort.pairs()
    slides = shard_slides(select_slides(cohort.ids, cfg.slides, pairs_path), cfg.shard)
    panel = cfg.marker_panel
    if panel is None and cfg.cohort is not None and (cfg.cohort / "marker_panel.csv").exists():
        panel = cfg.cohort / "marker_panel.csv"
    if panel is not None and not Path(panel).is_file():
        raise PipelineError(f"marker panel not found: {panel} (--marker-panel)")
    sizes = resolve_pixel_sizes(cfg.pixel_sizes, cfg.cohort, pairs, he_mpp=cfg.mpp, codex_mpp=cfg.codex_mpp)
    workers = max(1, min(cfg.workers, len(slides)))
    params = cfg.params(panel, threads=max(1, (os.cpu_count() or 1) // workers))
    _route_palom_logs()
    log.info("registering %d slides from %s into %s", len(slides), pairs_path, art.REGISTRATION.dir(cfg.out))
    work = functools.partial(register_slide, pairs=pairs, pairs_path=pairs_path, out_dir=str(cfg.out),
                             params=params, sizes=sizes)
    return SlideJob(art.REGISTRATION.dir(cfg.out), slides, work, done=done_spec(cfg.out, pairs, params, sizes),
                    config=cfg, overwrite=cfg.overwrite, workers=workers, fail_fast=cfg.fail_fast, shard=cfg.shard,
                    outputs=functools.partial(outputs, out_dir=cfg.out), log_name="register.log",
                    finish=functools.partial(_finish, cfg=cfg, slides=slides),
                    extra_config={"pairs": pairs_path, "marker_panel": str(panel) if panel else None,
                                  "resolved_params": asdict(params), "slides": slides,
                                  "done_settings": done_settings(params), "pixel_sizes_resolved": sizes.path})


STAGE = Stage("register", build_parser, make_config, plan=plan)


def main(argv: list[str] | None = None) -> int:
    return STAGE.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
