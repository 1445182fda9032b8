"""Stage 06: whole-slide HEX inference -> ``OUT/hex_pred/{slide}.h5`` (and the virtual CODEX maps).

Commands (run from the repository root)::

    # every slide of COHORT/he with run RUN's best model (OUT/runs/RUN/best.safetensors); maps too
    python -m hex.infer_wsi --cohort COHORT --out OUT --run-name RUN
    # overlapping 224 px tiles every 56 px (a map pixel per 28 µm), raw marker units as well
    python -m hex.infer_wsi --cohort COHORT --out OUT --run-name RUN --stride 56 --raw-units
    # the original release's heads-only checkpoint.pth on MUSK (output names: hex/markers_original.csv)
    python -m hex.infer_wsi --he /data/slides --out OUT --checkpoint checkpoint.pth --backbone musk \\
        --weights musk/model.safetensors
    # and the dense (cell-scale, 7 µm) virtual CODEX of a model trained with --dense-grid 16: tiles every 56 px
    python -m hex.infer_wsi --cohort COHORT --out OUT --run-name RUN --dense
    # GPUs: slides are shared among ranks; job arrays add --shard i/n (sorted slide list, every n-th from i)
    torchrun --standalone --nproc-per-node 8 -m hex.infer_wsi --cohort COHORT --out OUT --run-name RUN

Grid: ``OUT/patches/{slide}.h5`` from stage 01 when it exists and the stride equals its patch size (the label
coordinates); otherwise the tissue grid is computed with preprocess's functions: tiles of ``--patch-size`` px at
``--target-mpp`` (level-0 side P = round(patch_size * target_mpp / mpp)), top-left x, y = 0, s, 2s, ... with
s = round(stride * target_mpp / mpp) level-0 px, tiles fully inside the slide, kept when their tissue fraction is
>= ``--min-tissue``. Tiles are read region by region (:mod:`hex.infer.tiles`) by ``--workers`` DataLoader workers.

Writes (atomically), per slide ``hex_pred/{slide}.h5``: ``coords`` (N,2) int64 level-0 top-left x, y;
``codex_prediction`` (N,M) float32 in normalised units (what the model was trained on); ``tissue_fraction``
(N,); with ``--raw-units`` ``codex_prediction_raw`` = p_low + pred * (p_high - p_low) per marker (the training
percentiles). Attributes: ``markers``, ``patch_size`` (px), ``patch_size_level0``, ``stride``, ``stride_level0``,
``target_mpp``, ``mpp`` (level-0 µm/px), ``slide_dimensions`` (level-0 w, h), ``patch_level``,
``read_size_at_level``, ``checkpoint``, ``checkpoint_sha256``, ``normalization`` (JSON; "null" when unknown),
``grid_source``, ``slide_id``, ``he_path``, ``schema_version``. Also ``hex_pred/config.json`` and ``run.log``.

Dense (``--dense``, a checkpoint with a dense head): after a slide's prediction file, a second pass over tiles every
``--dense-stride`` px (default a quarter of the tile; a multiple of the dense cell, tile / G px) blended into the
cell-scale map ``virtual_codex/{slide}_dense.ome.tif`` + ``{slide}_dense_preview.png``, described under ``dense`` in
``virtual_codex/{slide}.json`` (:mod:`hex.infer.dense_maps`). The prediction file and the patch maps stay as without it.

Slides: :func:`pipeline.cohort.resolve_slides` (``COHORT/pairs.csv`` when present, else ``COHORT/he/``, or
``--he``); a slide's id is its file name as written (a link keeps its own name), like every other stage.

Done-records (:mod:`pipeline.done`): ``hex_pred/done/{slide}.json`` holds the settings that change the file
(``patch_size``, ``stride``, ``target_mpp``, ``min_tissue``, ``thumb_size``, ``mpp``, ``raw_units``,
``normalization``, and the backbone flags of an original checkpoint; with ``--dense`` also ``dense``,
``dense_stride``, ``dense_window`` and ``dense_preview_markers``, and the dense files as outputs) and the input
files (``he``, ``checkpoint``, ``grid``, with size and mtime). A rerun skips slides done with these; redoes a slide
whose input changed (the model was trained on, the grid redone), saying so; and, when any slide was done with other
settings or another checkpoint file, stops before any work: "done with other settings: <diff>; pass --overwrite"
(exit 2). A slide done without ``--dense`` is redone with it (its dense files are missing); one done with it, rerun
without it, is "done with other settings" (and ``--overwrite`` then removes its dense files, which would be stale).
``--overwrite`` redoes every slide (and its maps). The virtual CODEX maps follow the same rule
(``virtual_codex/done/``, :mod:`hex.infer.maps`). Batch size, workers, region size and autocast are not
settings (they do not change what is predicted beyond float rounding).

Before the first slide: flags in range, the slides and the checkpoint exist, ``hex_pred/`` (and ``virtual_codex/``)
writable, ``--preview-markers`` among the model's markers. The last line of the log counts the slides: a slide is
done when its prediction file and its maps are (made now: done; both made earlier: skipped), and failed, with the
reason, when either failed ("maps: ..." for the maps); the exit status is 1 when any failed. Ctrl-C stops with one
line saying how to resume (exit 130): the slides finished are skipped by the next run.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hex.evaluate.predict import resolve_amp, wants_channels_last
from hex.infer.dense_maps import (
    WINDOW,
    WINDOW_FLOOR,
    DenseConfig,
    attach_dense_record,
    dense_outputs,
    dense_patch_size,
    dense_slide,
    dense_stride,
    model_grid,
)
from hex.infer.map_formats import choose_preview_markers
from hex.infer.maps import FORMATS as MAP_FORMATS
from hex.infer.maps import map_conflicts, write_slide_maps
from hex.infer.predictions import InferConfig, denormalize, infer_slide
from hex.trained_model import add_checkpoint_args, check_backbone_kw, load_trained
from pipeline import artifacts as art
from pipeline import done as done_mod
from pipeline import runner
from pipeline.cli import Stage, config_from_args, require
from pipeline.cohort import resolve_slides, select_slides
from pipeline.dist import DistContext, broadcast_object, is_dist
from pipeline.errors import PipelineError
from pipeline.io import config_dict, ensure_writable, remove_outputs, save_config
from pipeline.runner import StageReport, parse_shard, run_slides, shard_file_name

log = logging.getLogger("hex.infer_wsi")


# ----------------------------------------------------------------------------------------------------------------
# flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hex.infer_wsi", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cohort", type=Path, help="cohort folder with he/ (or give --he)")
    p.add_argument("--he", type=Path, nargs="+", help="H&E slide files or folders (instead of COHORT/he)")
    p.add_argument("--out", type=Path, required=True, help="output root OUT: writes OUT/hex_pred/, OUT/virtual_codex/")
    p.add_argument("--slides", nargs="+", help="only these slide ids (default: all)")
    p.add_argument("--run-name", "--run", dest="run", default="hex",
                   help="run under OUT/runs/ whose best.safetensors is used (default hex)")
    add_checkpoint_args(p, "default OUT/runs/RUN/best.safetensors")
    g = p.add_argument_group("grid")
    g.add_argument("--patches", type=Path, help="stage-01 grid folder (default OUT/patches)")
    g.add_argument("--patch-size", type=int, default=None,
                   help="tile side in px at --target-mpp (default: the stage-01 grid's, else 224)")
    g.add_argument("--stride", type=int, default=None,
                   help="tile step in px at --target-mpp, like --patch-size (default = patch size: the stage-01 "
                        "grid; e.g. 56 = overlapping 224 px tiles every 56 px = 28 µm)")
    g.add_argument("--target-mpp", type=float, default=0.5, help="µm per tile pixel (default 0.5 = 20x)")
    g.add_argument("--min-tissue", type=float, default=0.5,
                   help="computed grids: keep tiles whose tissue fraction is >= this, in [0, 1] (default 0.5)")
    g.add_argument("--thumb-size", type=int, default=2048, help="computed grids: tissue-mask thumbnail side, px")
    g.add_argument("--mpp", type=float, help="level-0 µm/px of the slides (overrides their metadata)")
    g.add_argument("--region-px", type=int, default=2048,
                   help="side of the regions read at the tile level, px (default 2048, as the patch store)")
    r = p.add_argument_group("run")
    r.add_argument("--batch-size", type=int, default=128, help="tiles per forward per process")
    r.add_argument("--workers", type=int, default=4, help="DataLoader workers (processes reading regions) per rank")
    r.add_argument("--amp", choices=("auto", "fp16", "bf16", "none"), default="auto", help="autocast (CUDA only)")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda")
    r.add_argument("--shard", help="job arrays: i/n = every n-th slide of the sorted list, from i (0-based)")
    r.add_argument("--overwrite", action="store_true",
                   help="redo every slide (and its maps), also those done with other settings (default: skip those "
                        "done with these settings, stop on other settings)")
    r.add_argument("--raw-units", action="store_true",
                   help="also write codex_prediction_raw = p_low + pred * (p_high - p_low) (training percentiles)")
    r.add_argument("--normalization", type=Path,
                   help="markers/normalization.json to use for --raw-units (default: the checkpoint's)")
    r.add_argument("--no-maps", action="store_true", help="skip the virtual CODEX maps (hex.virtual_codex)")
    r.add_argument("--preview-markers", nargs="+", help="markers shown in the map previews")
    r.add_argument("--map-formats", nargs="+", choices=MAP_FORMATS, default=list(MAP_FORMATS),
                   help="virtual CODEX outputs to write (default: all): npy = map + mask (stage 07 reads it), "
                        "ome = pyramidal OME-TIFF, preview = PNG (~2 s a slide on CPU), geojson = QuPath detections")
    d = p.add_argument_group("dense (cell-scale) virtual CODEX")
    d.add_argument("--dense", action="store_true",
                   help="also the dense map virtual_codex/{slide}_dense.ome.tif (one pixel per cell of the model's "
                        "G x G grid: 7 µm at 224 px / 16) + _dense_preview.png; needs a checkpoint trained with "
                        "--dense-grid")
    d.add_argument("--dense-stride", type=int, default=None,
                   help="dense tiles every this many px at --target-mpp (default a quarter of the tile: 56 for 224 px; "
                        "at half the tile, 112, the tile lattice shows in the steps between cells); a "
                        "multiple of the dense cell (tile / G px, 14 for 224 / 16)")
    return p


@dataclass(frozen=True, kw_only=True)
class InferWSIConfig:
    """One field per flag of ``python -m hex.infer_wsi`` (same names; see its ``--help``), and the slides
    :func:`make_config` resolved: ``he_resolved`` {id: H&E path} of the cohort, ``slides_resolved`` the ids of
    this job (after ``--slides`` and ``--shard``)."""

    cohort: Path | None = None
    he: list[Path] | None = None
    out: Path
    slides: list[str] | None = None
    run: str = "hex"
    checkpoint: Path | None = None
    backbone: str | None = None
    weights: str | None = None
    backbone_kw: dict[str, Any] | None = None
    patches: Path | None = None
    patch_size: int | None = None
    stride: int | None = None
    target_mpp: float = 0.5
    min_tissue: float = 0.5
    thumb_size: int = 2048
    mpp: float | None = None
    region_px: int = 2048
    batch_size: int = 128
    workers: int = 4
    amp: str = "auto"
    device: str = "auto"
    shard: str | None = None
    overwrite: bool = False
    raw_units: bool = False
    normalization: Path | None = None
    no_maps: bool = False
    preview_markers: list[str] | None = None
    map_formats: list[str] = field(default_factory=lambda: list(MAP_FORMATS))
    dense: bool = False
    dense_stride: int | None = None
    he_resolved: dict[str, str] = field(default_factory=dict)
    slides_resolved: list[str] = field(default_factory=list)

    @property
    def checkpoint_path(self) -> Path:
        """``--checkpoint``, default ``OUT/runs/RUN/best.safetensors``."""
        return self.checkpoint or art.HEX_RUN.path(self.out, run=self.run)

    def slide_settings(self) -> InferConfig:
        """The grid and reading settings of every slide (:func:`hex.infer.predictions.infer_slide`)."""
        return InferConfig(pred_dir=art.PREDICTIONS.dir(self.out),
                           grid_dir=self.patches or art.PATCH_GRID.dir(self.out), patch_size=self.patch_size,
                           stride=self.stride, target_mpp=self.target_mpp, min_tissue=self.min_tissue,
                           thumb_size=self.thumb_size, mpp=self.mpp, region_px=self.region_px,
                           batch_size=self.batch_size, workers=self.workers, raw_units=self.raw_units)

    def dense_settings(self) -> DenseConfig | None:
        """The dense pass's settings (:func:`hex.infer.dense_maps.dense_slide`), None without ``--dense``."""
        if not self.dense:
            return None
        return DenseConfig(out_dir=art.VIRTUAL_CODEX.dir(self.out), patch=self.slide_settings(),
                           stride=self.dense_stride, preview_markers=self.preview_markers)


def make_config(args: argparse.Namespace) -> InferWSIConfig:
    """Before any process group or output folder: flag values, the slides and the checkpoint exist; one line naming
    the flag or file."""
    for flag, v, lo in (("--patch-size", args.patch_size, 1), ("--stride", args.stride, 1),
                        ("--thumb-size", args.thumb_size, 16), ("--region-px", args.region_px, 1),
                        ("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0),
                        ("--dense-stride", args.dense_stride, 1)):
        require(v is None or v >= lo, f"{flag} {v}: must be >= {lo}")
    require(args.target_mpp > 0 and (args.mpp is None or args.mpp > 0),
            f"--target-mpp {args.target_mpp} / --mpp {args.mpp}: µm per pixel must be > 0")
    require(0 <= args.min_tissue <= 1, f"--min-tissue {args.min_tissue}: a tissue fraction in [0, 1]")
    require(args.dense_stride is None or args.dense, "--dense-stride is the step of the dense pass: add --dense")
    require(not (args.dense and args.no_maps), "--dense writes a map (virtual_codex/{slide}_dense.ome.tif): drop "
                                               "--no-maps")
    parse_shard(args.shard)
    require(args.normalization is None or args.normalization.is_file(),
            f"--normalization {args.normalization}: file not found")
    check_backbone_kw(args.backbone_kw)
    require(args.cohort is not None or bool(args.he),
            "give --cohort (a folder with he/ or pairs.csv) or --he (slide files or folders)")
    require(args.cohort is None or bool(args.he) or args.cohort.is_dir(), f"--cohort {args.cohort}: folder not found")
    cohort = resolve_slides(args.cohort, he=args.he)
    mine = shard_slides(select_slides(cohort.ids, args.slides, cohort.source), args.shard)
    require(bool(mine), f"--shard {args.shard}: no slide of the {len(cohort)} in {cohort.source} falls in this shard")
    cfg = config_from_args(InferWSIConfig, args, he_resolved={s: str(p) for s, p in cohort.he_paths().items()},
                           slides_resolved=mine)
    require(cfg.checkpoint_path.is_file(),
            f"checkpoint {cfg.checkpoint_path} does not exist (train run {cfg.run} first, or pass --checkpoint)")
    return cfg


def prepare(cfg: InferWSIConfig, ctx: DistContext) -> None:
    """The output folders are writable, before the log file opens there."""
    ensure_writable(art.PREDICTIONS.dir(cfg.out), "output folder", "choose another --out")
    if not cfg.no_maps:
        ensure_writable(art.VIRTUAL_CODEX.dir(cfg.out), "output folder", "choose another --out")


# ----------------------------------------------------------------------------------------------------------------
# many slides


def shard_slides(slides: Sequence[str], shard: str | None, rank: int = 0, world_size: int = 1) -> list[str]:
    """Deterministic share of the sorted slide list: job-array shard ``i/n`` takes every n-th slide from i
    (:func:`pipeline.runner.shard_slides`), then rank r of ``world_size`` every world_size-th of those from r."""
    return runner.shard_slides(slides, shard)[rank::world_size]


def _one_line(e: BaseException) -> str:
    """The last line of an exception message (DataLoader workers embed the worker's traceback in it)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def _abs(p: str | os.PathLike) -> str:
    """Absolute path as written (links not followed: a link is its own input)."""
    return os.path.normpath(os.path.abspath(p))


def _inputs(slide: str, he: dict[str, str], checkpoint: str, grid_dir: str,
            normalization: str | None) -> dict[str, str]:
    out = {"he": he[slide], "checkpoint": checkpoint, "grid": os.path.join(grid_dir, f"{slide}.h5")}
    if normalization:
        out["normalization"] = normalization
    return out


def _outputs(slide: str, out: str, dense: bool = False) -> list[str]:
    return [str(art.PREDICTIONS.path(out, slide))] + ([str(p) for p in dense_outputs(out, slide)] if dense else [])


def done_spec(cfg: InferWSIConfig, grid: InferConfig) -> done_mod.DoneSpec:
    """The done-record spec of ``hex_pred/``: the settings and inputs of the module docstring."""
    settings = {"patch_size": grid.patch_size, "stride": grid.stride, "target_mpp": grid.target_mpp,
                "min_tissue": grid.min_tissue, "thumb_size": grid.thumb_size, "mpp": grid.mpp,
                "raw_units": grid.raw_units, "backbone": cfg.backbone, "weights": cfg.weights,
                "backbone_kw": cfg.backbone_kw}
    if cfg.dense:  # only with --dense: the records of slides done without it stay as they were
        settings |= {"dense": True, "dense_stride": cfg.dense_stride, "dense_window": [WINDOW, WINDOW_FLOOR],
                     "dense_preview_markers": cfg.preview_markers}
    norm = _abs(cfg.normalization) if cfg.normalization and grid.raw_units else None
    return done_mod.DoneSpec(grid.pred_dir, settings, art.PREDICTIONS.schema,
                             inputs=functools.partial(_inputs, he={s: _abs(p) for s, p in cfg.he_resolved.items()},
                                                      checkpoint=_abs(cfg.checkpoint_path),
                                                      grid_dir=_abs(grid.grid_dir), normalization=norm),
                             outputs=functools.partial(_outputs, out=str(cfg.out), dense=cfg.dense))


def _predict(slide_id: str, he_paths: dict[str, str], run: dict[str, Any], out: str | None = None,
             dense: DenseConfig | None = None) -> dict[str, Any]:
    """One slide for :func:`pipeline.runner.run_slides`: the prediction file, and with ``dense`` the dense map
    (without it, dense files of an earlier run, now stale, are removed); every failure becomes one line (a
    PipelineError)."""
    import openslide

    he_path = Path(he_paths[slide_id])
    try:
        res = infer_slide(slide_id, he_path, **run)
        if dense is not None:
            res["dense"] = dense_slide(slide_id, he_path, run["model"], run["meta"], dense, run["device"], run["amp"],
                                       progress=run["progress"])
        elif out is not None:
            remove_outputs(dense_outputs(out, slide_id))
    except PipelineError:
        raise
    except (openslide.OpenSlideError, OSError) as e:
        hint = (" (the file name is not ASCII: rename the file)" if not he_path.name.isascii() else "")
        raise PipelineError(f"cannot read {he_path} ({type(e).__name__}: {_one_line(e)}){hint}; the file is "
                            "truncated or corrupt: copy it again, or remove it") from None
    except Exception as e:  # noqa: BLE001 - unexpected: the traceback in the log, one line in the summary
        log.exception("%s failed", slide_id)
        raise PipelineError(f"{type(e).__name__}: {_one_line(e)}") from None
    if res["warning"]:
        log.warning("%s: %s", slide_id, res["warning"])
    else:
        log.info("%s: %d patches, %.1f patches/s -> %s", slide_id, res["patches"], res["patches_per_s"], res["path"])
    if not he_path.name.isascii():
        msg = (f"{he_path} has a non-ASCII file name; predicted, but rename it to ASCII for tools that cannot open "
               "such paths (OpenSlide on Windows, some cluster file systems)")
        res["warning"] = f"{res['warning']}; {msg}" if res["warning"] else msg
        log.warning("%s: %s", slide_id, msg)
    return res


def _write_maps(slides: Sequence[str], cfg: InferWSIConfig) -> tuple[list[str], dict[str, str]]:
    """The virtual CODEX maps of the predicted (or already done) slides: ``(slides whose maps were made now,
    {slide: reason} of those whose maps failed)``; a failure does not stop the other slides."""
    made, failed = [], {}
    for sid in slides:
        try:
            res = write_slide_maps(art.PREDICTIONS.path(cfg.out, sid), art.VIRTUAL_CODEX.dir(cfg.out),
                                   he_path=Path(cfg.he_resolved[sid]), preview_markers=cfg.preview_markers,
                                   overwrite=cfg.overwrite, formats=cfg.map_formats)
            if not res["skipped"]:
                made.append(sid)
        except PipelineError as e:
            failed[sid] = f"maps: {e}"
            log.error("%s: virtual CODEX maps: %s", sid, e)
        except Exception as e:  # noqa: BLE001 - unexpected: full traceback, the other slides go on
            failed[sid] = f"maps: {type(e).__name__}: {_one_line(e)}"
            log.exception("%s: virtual CODEX maps failed", sid)
    return made, failed


def slide_outcomes(pred: StageReport, maps_made: Sequence[str], maps_failed: dict[str, str]) -> StageReport:
    """One outcome per slide from its prediction and its maps: failed (with the reason) when either failed; done
    when either was made now; skipped (already done) when both were done earlier."""
    failed = {**pred.failed, **{s: r for s, r in maps_failed.items() if s not in pred.failed}}
    made = set(pred.done) | set(maps_made)
    slides = [*pred.done, *pred.skipped]
    return StageReport(done=[s for s in slides if s in made and s not in failed],
                       skipped=[s for s in slides if s not in made and s not in failed], failed=failed)


def _gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` through a gloo group with a long timeout (ranks may finish hours apart)."""
    if not is_dist():
        return [obj]
    import torch.distributed as dist

    group = dist.new_group(backend="gloo", timeout=timedelta(days=7))
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


def _conflicts(spec: done_mod.DoneSpec, slides: Sequence[str], cfg: InferWSIConfig) -> str | None:
    """The one-line error for slides (of this job) done with other settings, or None (rank 0 decides)."""
    found = done_mod.conflicts(spec, slides)
    if found and not cfg.overwrite:
        return str(done_mod.conflict_error(found, art.PREDICTIONS.folder))
    if not cfg.no_maps and not cfg.overwrite:
        maps = map_conflicts(slides, cfg.out, {s: Path(cfg.he_resolved[s]) for s in slides}, cfg.preview_markers)
        if maps:
            return str(done_mod.conflict_error(maps, art.VIRTUAL_CODEX.folder))
    return None


def infer(cfg: InferWSIConfig, ctx: DistContext) -> int:
    """The stage body: every slide of this rank's share -> ``hex_pred/{slide}.h5`` and its maps; the last line
    counts the slides (:func:`slide_outcomes`); 1 if any failed."""
    slides, he_paths = cfg.slides_resolved, cfg.he_resolved
    mine = slides[ctx.rank::ctx.world_size]
    grid = cfg.slide_settings()
    spec = done_spec(cfg, grid)
    conflict = broadcast_object(_conflicts(spec, slides, cfg) if ctx.is_main else None)
    if conflict:
        raise PipelineError(conflict)
    model, meta = load_trained(cfg.checkpoint_path, backbone=cfg.backbone, weights=cfg.weights,
                               backbone_kw=cfg.backbone_kw)
    normalization = json.loads(cfg.normalization.read_text()) if cfg.normalization else meta.get("normalization")
    if cfg.raw_units:
        denormalize(np.zeros((0, len(meta["markers"])), np.float32), meta["markers"], normalization)
    if cfg.preview_markers and not cfg.no_maps:
        choose_preview_markers(meta["markers"], cfg.preview_markers)
    if cfg.dense:
        grid_g = model_grid(model)
        if not grid_g:
            raise PipelineError(f"--dense: the checkpoint {cfg.checkpoint_path} has no dense head (dense_grid 0); "
                                "train with --dense-grid 16 (DENSE=1 bash scripts/04_train_hex.sh) or drop --dense")
        dense_cfg = cfg.dense_settings()
        dense_stride(dense_patch_size(slides[0], dense_cfg), grid_g, cfg.dense_stride)  # a bad flag before any work
    model.to(ctx.device)
    if wants_channels_last(model, ctx.device):
        model.to(memory_format=torch.channels_last)
    if ctx.is_main:
        save_config(grid.pred_dir, {**config_dict(cfg), "world_size": ctx.world_size,
                                    "checkpoint_resolved": meta["checkpoint"], "schema_version": art.PREDICTIONS.schema,
                                    "checkpoint_sha256": meta["checkpoint_sha256"], "markers": meta["markers"],
                                    "settings": dict(spec.settings)},
                    name=shard_file_name(cfg.shard))
        log.info("%d slides (%d on this rank of %d), checkpoint %s (%s), device %s", len(slides), len(mine),
                 ctx.world_size, meta["checkpoint"], meta["checkpoint_kind"], ctx.device)
    run = {"model": model, "meta": meta, "cfg": grid, "device": ctx.device,
           "amp": resolve_amp(cfg.amp, ctx.device), "normalization": normalization, "progress": ctx.is_main}
    pred = run_slides(mine, functools.partial(_predict, he_paths=he_paths, run=run, out=str(cfg.out),
                                              dense=cfg.dense_settings()), done=spec,
                      overwrite=cfg.overwrite, desc=art.PREDICTIONS.folder)
    warnings = {s: r["warning"] for s, r in pred.results.items() if r.get("warning")}
    maps_made, maps_failed = [], {}
    if not cfg.no_maps:
        maps_made, maps_failed = _write_maps([*pred.done, *pred.skipped], cfg)
    if cfg.dense:  # the dense description in {slide}.json (also when the patch maps were done earlier)
        for sid in [*pred.done, *pred.skipped]:
            if sid not in maps_failed:
                attach_dense_record(art.VIRTUAL_CODEX.dir(cfg.out), sid)
    report = slide_outcomes(pred, maps_made, maps_failed)
    parts = _gather((report.done, report.skipped, report.failed, warnings))
    total = StageReport(done=sorted(s for p in parts for s in p[0]), skipped=sorted(s for p in parts for s in p[1]),
                        failed={k: v for p in parts for k, v in sorted(p[2].items())})
    warned = sorted(k for p in parts for k in p[3] if k not in total.failed)
    made = (f"predictions in {grid.pred_dir} (--no-maps)" if cfg.no_maps else
            f"predictions in {grid.pred_dir}, maps{' (and dense maps)' if cfg.dense else ''} in "
            f"{art.VIRTUAL_CODEX.dir(cfg.out)}")
    extra = made + (f"; {len(warned)} with warnings ({', '.join(warned)}; see above)" if warned else "")
    if ctx.is_main:
        return total.finish(STAGE.name, extra)
    return 0 if total.ok else 1


STAGE = Stage("hex.infer_wsi", build_parser, make_config, run=infer, distributed=True, prepare=prepare,
              log_file=lambda cfg: art.PREDICTIONS.dir(cfg.out) / shard_file_name(cfg.shard, "run", ".log"))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hex.infer_wsi``; returns the exit code (0, 1 some slides failed, 2 bad input, 130 Ctrl-C)."""
    return STAGE.main(argv)
