"""Stage 06: whole-slide HEX inference -> ``OUT/hex_pred/{slide}.h5`` (and the virtual CODEX maps).

Commands (run from the repository root)::

    # every slide of COHORT/he with run RUN's best model (OUT/runs/RUN/best.safetensors); maps too
    python -m hex.infer_wsi --cohort COHORT --out OUT --run-name RUN
    # overlapping 224 px tiles every 56 px (a map pixel per 28 µm), raw marker units as well
    python -m hex.infer_wsi --cohort COHORT --out OUT --run-name RUN --stride 56 --raw-units
    # the original release's heads-only checkpoint.pth on MUSK (output names: hex/markers_original.csv)
    python -m hex.infer_wsi --he /data/slides --out OUT --checkpoint checkpoint.pth --backbone musk \\
        --weights musk/model.safetensors
    # GPUs: slides are shared among ranks; job arrays add --shard i/n (sorted slide list, every n-th from i)
    torchrun --standalone --nproc-per-node 8 -m hex.infer_wsi --cohort COHORT --out OUT --run-name RUN

Grid: ``OUT/patches/{slide}.h5`` from stage 01 when it exists and the stride equals its patch size (the label
coordinates); otherwise the tissue grid is computed with preprocess's functions: tiles of ``--patch-size`` px at
``--target-mpp`` (level-0 side P = round(patch_size * target_mpp / mpp)), top-left x, y = 0, s, 2s, ... with
s = round(stride * target_mpp / mpp) level-0 px, tiles fully inside the slide, kept when their tissue fraction is
>= ``--min-tissue``. Tiles are read region by region (:mod:`hex.wsi_tiles`) by ``--workers`` DataLoader workers.

Writes (atomically), per slide ``hex_pred/{slide}.h5``: ``coords`` (N,2) int64 level-0 top-left x, y;
``codex_prediction`` (N,M) float32 in normalised units (what the model was trained on); ``tissue_fraction``
(N,); with ``--raw-units`` ``codex_prediction_raw`` = p_low + pred * (p_high - p_low) per marker (the training
percentiles). Attributes: ``markers``, ``patch_size`` (px), ``patch_size_level0``, ``stride``, ``stride_level0``,
``target_mpp``, ``mpp`` (level-0 µm/px), ``slide_dimensions`` (level-0 w, h), ``patch_level``,
``read_size_at_level``, ``checkpoint``, ``checkpoint_sha256``, ``normalization`` (JSON; "null" when unknown),
``grid_source``, ``slide_id``, ``he_path``, ``schema_version``. Also ``hex_pred/config.json`` and ``run.log``.
A slide whose file exists with the same checkpoint and grid settings is skipped (``--overwrite`` redoes it).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from hex.cli import run_cli
from hex.data import BatchTransform
from hex.dist import DistContext, is_dist
from hex.evaluate import prediction_fn, resolve_amp, run_loop, wants_channels_last
from hex.trained import add_checkpoint_args, load_from_args
from hex.wsi_tiles import TileRegions, make_tile_loader, tissue_tiles
from preprocess.patch import collect_he_slides, read_grid
from preprocess.utils import PipelineError, StageReport, atomic_path, save_config

log = logging.getLogger("hex.infer_wsi")

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class InferConfig:
    """Grid and reading settings of one run (``patch_size``/``stride`` None = the stage-01 grid's)."""

    pred_dir: Path
    grid_dir: Path
    patch_size: int | None = None
    stride: int | None = None
    target_mpp: float = 0.5
    min_tissue: float = 0.5
    thumb_size: int = 2048
    mpp: float | None = None
    region_px: int = 2048
    batch_size: int = 128
    workers: int = 4
    raw_units: bool = False


# ----------------------------------------------------------------------------------------------------------------
# grid


def _use_stage01_grid(grid_file: Path, cfg: InferConfig) -> bool:
    if not grid_file.is_file():
        return False
    _, attrs = read_grid(grid_file)
    size = int(attrs["patch_size"])
    same_mpp = abs(float(attrs.get("mpp", cfg.target_mpp)) - cfg.target_mpp) < 1e-6
    return same_mpp and cfg.patch_size in (None, size) and cfg.stride in (None, size)


def build_tiles(slide_id: str, he_path: Path, cfg: InferConfig) -> tuple[TileRegions, np.ndarray, dict[str, Any]]:
    """Tiles of one slide, their tissue fractions (N,) and the grid attributes of the prediction file."""
    import h5py

    grid_file = cfg.grid_dir / f"{slide_id}.h5"
    if _use_stage01_grid(grid_file, cfg):
        tiles = TileRegions.from_grid(he_path, grid_file, mpp=cfg.mpp, region_px=cfg.region_px)
        _, attrs = read_grid(grid_file)
        with h5py.File(grid_file, "r") as f:
            frac = f["tissue_fraction"][:] if "tissue_fraction" in f else np.ones(tiles.num_tiles, np.float32)
        size = int(attrs["patch_size"])
        info = {"grid_source": str(grid_file), "patch_size": size, "stride": size,
                "stride_level0": tiles.patch_size_level0, "min_tissue": float(attrs.get("min_tissue", np.nan))}
        if "level0_mpp" in attrs and abs(float(attrs["level0_mpp"]) - tiles.mpp) > 0.01 * tiles.mpp:
            log.warning("%s: the grid was made at %.4f µm/px, the slide reads %.4f µm/px (--mpp?)", slide_id,
                        float(attrs["level0_mpp"]), tiles.mpp)
    else:
        size = cfg.patch_size or (int(read_grid(grid_file)[1]["patch_size"]) if grid_file.is_file() else 224)
        tiles, frac, info = tissue_tiles(he_path, size, cfg.stride or size, cfg.target_mpp, cfg.min_tissue,
                                         cfg.thumb_size, cfg.mpp, cfg.region_px)
        info["grid_source"] = "computed"
    info |= {"patch_size_level0": tiles.patch_size_level0, "patch_level": tiles.level,
             "read_size_at_level": tiles.read_size, "level_downsample": tiles.downsample,
             "target_mpp": cfg.target_mpp, "mpp": tiles.mpp, "slide_dimensions": np.asarray(tiles.dimensions)}
    return tiles, np.asarray(frac, np.float32), info


# ----------------------------------------------------------------------------------------------------------------
# units


def denormalize(pred: np.ndarray, markers: Sequence[str], normalization: dict | None) -> np.ndarray:
    """Raw marker units (N,M) = p_low + pred * (p_high - p_low), percentiles matched to ``markers`` by name.

    ``normalization`` is a ``markers/normalization.json`` record (``markers`` + ``values`` [lows, highs]) or a
    ``{marker: {"p_low", "p_high"}}`` mapping."""
    if not normalization:
        raise PipelineError("--raw-units needs the label percentiles the model was trained with; this checkpoint "
                            "has none (e.g. the original release): pass --normalization markers/normalization.json")
    if "values" in normalization and "markers" in normalization:
        lo_hi = {m: (float(a), float(b)) for m, a, b in zip(normalization["markers"], *normalization["values"])}
    else:
        lo_hi = {m: (float(v["p_low"]), float(v["p_high"])) for m, v in normalization.items() if isinstance(v, dict)}
    missing = [m for m in markers if m not in lo_hi]
    if missing:
        raise PipelineError(f"the normalization percentiles lack markers {missing[:5]}; pass a --normalization file "
                            "for this model's markers")
    lo = np.array([lo_hi[m][0] for m in markers], np.float32)
    hi = np.array([lo_hi[m][1] for m in markers], np.float32)
    return (lo + pred * (hi - lo)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# one slide


def _settings(cfg: InferConfig) -> dict[str, Any]:
    return {"patch_size": cfg.patch_size, "stride": cfg.stride, "target_mpp": cfg.target_mpp}


def is_done(path: Path, sha256: str, cfg: InferConfig) -> bool:
    """The prediction file exists, is readable, and was made with this checkpoint and these grid settings."""
    import h5py

    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            a = dict(f.attrs)
            ok = "codex_prediction" in f and (not cfg.raw_units or "codex_prediction_raw" in f)
    except OSError:
        return False
    same = a.get("checkpoint_sha256") == sha256 and all(
        v is None or (k in a and abs(float(a[k]) - v) < 1e-9) for k, v in _settings(cfg).items())
    if ok and not same:
        log.info("%s exists from another checkpoint or grid; redoing it", path)
    return ok and same


def infer_slide(slide_id: str, he_path: Path, model: torch.nn.Module, meta: dict[str, Any], cfg: InferConfig,
                device: torch.device, amp: torch.dtype | None, normalization: dict | None,
                progress: bool = False) -> dict[str, Any]:
    """Predict every tile of one slide and write ``hex_pred/{slide}.h5``; returns a summary (``warning`` set when
    the slide has no tissue)."""
    import h5py

    if he_path.is_file() and he_path.stat().st_size == 0:
        raise PipelineError(f"{he_path} is an empty (0-byte) file: the copy or download did not finish; copy the "
                            "slide again or remove it")
    t0 = time.perf_counter()
    tiles, frac, info = build_tiles(slide_id, he_path, cfg)
    markers = list(meta["markers"])
    out: dict[str, Any] = {"patches": tiles.num_tiles, "warning": None}
    if tiles.num_tiles == 0:
        pred = np.zeros((0, len(markers)), np.float32)
        out["warning"] = (f"no tissue tile in {he_path} (--min-tissue {cfg.min_tissue}): wrote an empty prediction "
                          "file (0 tiles); check the slide is not blank or lower --min-tissue")
    else:
        tf = BatchTransform(int(meta["input_size"]), meta["mean"], meta["std"], train=False,
                            interpolation=meta.get("interpolation") or "bilinear")
        loader = make_tile_loader(tiles, cfg.batch_size, cfg.workers, pin_memory=device.type == "cuda")
        pred = run_loop(loader, prediction_fn(model), tf, device, amp, n=tiles.num_tiles, dim=len(markers),
                        channels_last=wants_channels_last(model, device), progress=progress, desc=slide_id,
                        total=tiles.num_tiles)
    raw = denormalize(pred, markers, normalization) if cfg.raw_units else None
    path = cfg.pred_dir / f"{slide_id}.h5"
    attrs = {**info, "markers": np.array(markers, dtype=h5py.string_dtype()), "checkpoint": meta["checkpoint"],
             "checkpoint_sha256": meta["checkpoint_sha256"], "normalization": json.dumps(normalization),
             "units": "normalised [0, 1] (label percentiles, see normalization)", "slide_id": slide_id,
             "he_path": str(he_path), "schema_version": SCHEMA_VERSION,
             "coords_units": "level-0 pixels, top-left (x, y)"}
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("coords", data=tiles.coords.astype(np.int64))
        f.create_dataset("codex_prediction", data=pred.astype(np.float32))
        f.create_dataset("tissue_fraction", data=frac)
        if raw is not None:
            f.create_dataset("codex_prediction_raw", data=raw)
        for k, v in attrs.items():
            f.attrs[k] = v
    dt = time.perf_counter() - t0
    out |= {"seconds": dt, "patches_per_s": tiles.num_tiles / max(dt, 1e-9), "path": str(path)}
    return out


# ----------------------------------------------------------------------------------------------------------------
# many slides


def shard_slides(slides: Sequence[str], shard: str | None, rank: int = 0, world_size: int = 1) -> list[str]:
    """Deterministic share of the sorted slide list: job-array shard ``i/n`` takes every n-th slide from i, then
    rank r of ``world_size`` every world_size-th of those from r."""
    ordered = sorted(slides)
    if shard:
        try:
            i, n = (int(v) for v in shard.split("/"))
        except ValueError:
            raise PipelineError(f"--shard {shard!r}: expected i/n with 0 <= i < n, e.g. 0/4") from None
        if not 0 <= i < n:
            raise PipelineError(f"--shard {shard!r}: expected i/n with 0 <= i < n, e.g. 0/4")
        ordered = ordered[i::n]
    return ordered[rank::world_size]


def _one_line(e: BaseException) -> str:
    """The last line of an exception message (DataLoader workers embed the worker's traceback in it)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def _run_one(slide_id: str, he_path: Path, run: dict[str, Any], report: StageReport, warnings: dict[str, str]) -> None:
    import openslide

    try:
        res = infer_slide(slide_id, he_path, **run)
    except PipelineError as e:
        report.failed[slide_id] = str(e)
        log.error("%s: %s", slide_id, e)
        return
    except (openslide.OpenSlideError, OSError) as e:
        hint = (" (the file name is not ASCII: rename the file)" if not he_path.name.isascii() else "")
        msg = (f"cannot read {he_path} ({type(e).__name__}: {_one_line(e)}){hint}; the file is truncated or corrupt: "
               "copy it again, or remove it")
        report.failed[slide_id] = msg
        log.error("%s: %s", slide_id, msg)
        return
    except Exception as e:  # noqa: BLE001 - unexpected: full traceback, the other slides go on
        report.failed[slide_id] = f"{type(e).__name__}: {_one_line(e)}"
        log.exception("%s failed", slide_id)
        return
    report.done.append(slide_id)
    report.results[slide_id] = res
    if res["warning"]:
        warnings[slide_id] = res["warning"]
        log.warning("%s: %s", slide_id, res["warning"])
    else:
        log.info("%s: %d patches, %.1f patches/s -> %s", slide_id, res["patches"], res["patches_per_s"], res["path"])
    if not he_path.name.isascii():
        msg = (f"{he_path} has a non-ASCII file name; predicted, but rename it to ASCII for tools that cannot open "
               "such paths (OpenSlide on Windows, some cluster file systems)")
        warnings[slide_id] = f"{warnings[slide_id]}; {msg}" if slide_id in warnings else msg
        log.warning("%s: %s", slide_id, msg)


def _write_maps(slide_id: str, he_path: Path, out: Path, report: StageReport, preview: Sequence[str] | None,
                overwrite: bool) -> None:
    try:
        from hex.virtual_codex import write_slide_maps
    except ImportError:
        return
    try:
        write_slide_maps(out / "hex_pred" / f"{slide_id}.h5", out / "virtual_codex", he_path=he_path,
                         preview_markers=preview, overwrite=overwrite)
    except PipelineError as e:
        report.failed[slide_id] = f"maps: {e}"
        log.error("%s: virtual CODEX maps: %s", slide_id, e)
    except Exception as e:  # noqa: BLE001 - unexpected: full traceback, the other slides go on
        report.failed[slide_id] = f"maps: {type(e).__name__}: {_one_line(e)}"
        log.exception("%s: virtual CODEX maps failed", slide_id)


def _gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` through a gloo group with a long timeout (ranks may finish hours apart)."""
    if not is_dist():
        return [obj]
    import torch.distributed as dist

    group = dist.new_group(backend="gloo", timeout=timedelta(days=7))
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


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
    r.add_argument("--overwrite", action="store_true", help="redo slides whose prediction file exists")
    r.add_argument("--raw-units", action="store_true",
                   help="also write codex_prediction_raw = p_low + pred * (p_high - p_low) (training percentiles)")
    r.add_argument("--normalization", type=Path,
                   help="markers/normalization.json to use for --raw-units (default: the checkpoint's)")
    r.add_argument("--no-maps", action="store_true", help="skip the virtual CODEX maps (hex.virtual_codex)")
    r.add_argument("--preview-markers", nargs="+", help="markers shown in the map previews")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), argv, infer, lambda a: a.out / "hex_pred" / f"run{_shard_tag(a)}.log", logger=log)


def _shard_tag(args: argparse.Namespace) -> str:
    return f"_shard{args.shard.replace('/', 'of')}" if args.shard else ""


def infer(args: argparse.Namespace, ctx: DistContext) -> int:
    """The stage body: every slide of this rank's shard -> ``hex_pred/{slide}.h5`` (+ maps); 1 if any failed."""
    pred_dir, tag = args.out / "hex_pred", _shard_tag(args)
    report, warnings = StageReport(), {}
    he_paths, slides = collect_he_slides(args.cohort, args.he, args.slides)
    mine = shard_slides(slides, args.shard, ctx.rank, ctx.world_size)
    model, meta = load_from_args(args, args.out / "runs" / args.run / "best.safetensors")
    normalization = json.loads(args.normalization.read_text()) if args.normalization else meta.get("normalization")
    if args.raw_units:
        denormalize(np.zeros((0, len(meta["markers"])), np.float32), meta["markers"], normalization)
    model.to(ctx.device)
    if wants_channels_last(model, ctx.device):
        model.to(memory_format=torch.channels_last)
    cfg = InferConfig(pred_dir=pred_dir, grid_dir=args.patches or args.out / "patches",
                      patch_size=args.patch_size, stride=args.stride, target_mpp=args.target_mpp,
                      min_tissue=args.min_tissue, thumb_size=args.thumb_size, mpp=args.mpp,
                      region_px=args.region_px, batch_size=args.batch_size, workers=args.workers,
                      raw_units=args.raw_units)
    if ctx.is_main:
        save_config(pred_dir, {**vars(args), "slides_resolved": slides, "world_size": ctx.world_size,
                               "checkpoint_resolved": meta["checkpoint"], "schema_version": SCHEMA_VERSION,
                               "checkpoint_sha256": meta["checkpoint_sha256"], "markers": meta["markers"]},
                    name=f"config{tag}.json")
        log.info("%d slides (%d on this rank of %d), checkpoint %s (%s), device %s", len(slides), len(mine),
                 ctx.world_size, meta["checkpoint"], meta["checkpoint_kind"], ctx.device)
    run = {"model": model, "meta": meta, "cfg": cfg, "device": ctx.device,
           "amp": resolve_amp(args.amp, ctx.device), "normalization": normalization, "progress": ctx.is_main}
    for sid in tqdm(mine, desc="slides", unit="slide", disable=not ctx.is_main):
        if not args.overwrite and is_done(pred_dir / f"{sid}.h5", meta["checkpoint_sha256"], cfg):
            report.skipped.append(sid)
        else:
            _run_one(sid, Path(he_paths[sid]), run, report, warnings)
        if not args.no_maps and sid not in report.failed:
            _write_maps(sid, Path(he_paths[sid]), args.out, report, args.preview_markers, args.overwrite)
    parts = _gather((report.done, report.skipped, report.failed, warnings))
    done = [s for p in parts for s in p[0] if s not in p[2]]
    skipped = [s for p in parts for s in p[1] if s not in p[2]]
    failed = {k: v for p in parts for k, v in p[2].items()}
    warned = {k: v for p in parts for k, v in p[3].items()}
    if ctx.is_main:
        log.info("hex_pred: %d done (%d with warnings), %d skipped (already done), %d failed%s", len(done),
                 len(warned), len(skipped), len(failed), f": {sorted(failed)}" if failed else "")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
