"""Stage 07: MICA feature bags — H&E patch features and virtual-CODEX channel features.

Commands (run from the repository root)::

    # H&E bags with MUSK (weights file or hf_hub:xiangjx/musk) + CODEX tokens with DINOv2, one process
    python -m mica.extract_features --cohort COHORT --out OUT --encoder musk --weights /models/musk/model.safetensors \\
        --codex-encoder dinov2_vits14_reg --codex-weights /models/dinov2_vits14_reg4_pretrain.pth
    # the backbone of a trained HEX run as H&E encoder, interpretable CODEX statistics (the CPU demo)
    python -m mica.extract_features --cohort COHORT --out OUT --encoder hex:hex_fold0 --codex-encoder stats
    # only one modality; 4 GPUs (slides sharded over ranks); or a job array: --shard 3/10
    python -m mica.extract_features --cohort COHORT --out OUT --what he --encoder musk --weights ...
    torchrun --standalone --nproc-per-node=4 -m mica.extract_features --cohort COHORT --out OUT --encoder musk ...

``--what he|codex|both`` (default both) picks the modalities.

H&E (``--encoder``): any ``hex.backbones`` name (``musk``, ``dinov2_vits14_reg``, ``tiny``, ``timm:<name>``) with
``--weights`` (a local file or ``hf_hub:<repo>``; without it the backbone is randomly initialised, with a warning),
or ``hex:RUN``, the backbone (``model.visual``) of the trained HEX run ``OUT/runs/RUN/best.safetensors``
(``--weights`` then names another checkpoint of it). The tiles of the stage-01 grid ``OUT/patches/{slide}.h5``
(224 px at 20x) are read region by region (:mod:`hex.wsi_tiles`, the stage-06 reader), resized to the encoder's
input size and normalised with its mean/std (:class:`hex.data.BatchTransform`, evaluation mode), then embedded by
the one prediction loop (:func:`hex.evaluate.run_loop`). Outputs (atomic; a slide is skipped when both exist and
are newer than its grid and the weights, unless ``--overwrite``)::

    OUT/features/{encdir}/h5_files/{slide}.h5   features (N, D) float32, coords (N, 2) int64 level-0 top-left;
                                                attrs encoder, patch_size_level0, patch_size, mpp (µm/px of the
                                                tiles), level0_mpp, embed_dim, input_size, schema_version, slide_id
    OUT/features/{encdir}/pt_files/{slide}.pt   the (N, D) float32 tensor only (CLAM/MCAT convention)
    OUT/features/{encdir}/config.json           resolved settings

CODEX (``--codex-encoder``): ``stats`` (per-channel spatial descriptors, D' = 10, see :mod:`mica.codex_encoders`)
or an image backbone (``dinov2_vits14_reg`` as the original MICA, with ``--codex-weights``) applied to every
channel of ``OUT/virtual_codex/{slide}.npy`` (H', W', 40), batched across slides. Outputs::

    OUT/codex_features/{encdir}/{slide}.h5      per-slide part: features (40, D') float32 (the resumable unit)
    OUT/codex_features/{encdir}.h5              one (40, D') dataset per slide; attrs encoder, markers,
                                                schema_version (+ feature_names for stats); rebuilt from the parts
    OUT/codex_features/{encdir}/config.json

``{encdir}`` is the encoder name with ``:`` and ``/`` replaced by ``_`` (``hex:demo`` -> ``hex_demo``). Exit code
0 when every slide is done or skipped, 1 when any failed, 2 on bad input.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hex.dist import all_gather_objects, barrier, cleanup_dist, close_log_file, setup_dist
from mica import codex_encoders as ce
from preprocess.utils import (
    PipelineError,
    StageReport,
    atomic_path,
    run_slides,
    save_config,
    select_slides,
    setup_logging,
)

log = logging.getLogger("mica.extract_features")

SCHEMA_VERSION = 1
HEX_PREFIX = "hex:"


def encoder_dirname(name: str) -> str:
    """Folder name of an encoder: ``:`` and ``/`` replaced by ``_`` (``hex:demo_tiny`` -> ``hex_demo_tiny``)."""
    return name.replace(":", "_").replace("/", "_")


# ----------------------------------------------------------------------------------------------------------------
# encoders


@dataclass
class ImageEncoder:
    """A loaded image encoder: ``module`` maps normalised (B, 3, S, S) float to (B, embed_dim)."""

    name: str
    module: nn.Module
    embed_dim: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    weights: str | None = None
    sources: list[Path] = field(default_factory=list)  # local files the features depend on (freshness check)
    info: dict[str, Any] = field(default_factory=dict)

    def transform(self):
        """uint8 (B, 3, H, W) -> normalised (B, 3, S, S) (:class:`hex.data.BatchTransform`, no augmentation)."""
        from hex.data import BatchTransform

        return BatchTransform(self.input_size, self.mean, self.std, train=False, interpolation=self.interpolation)


def load_encoder(name: str, out: Path | None = None, weights: str | None = None, interpolation: str | None = None,
                 **backbone_kw: Any) -> ImageEncoder:
    """Build ``name`` once: a ``hex.backbones`` name (+ ``weights``), or ``hex:RUN`` (the backbone of
    ``OUT/runs/RUN/best.safetensors``, or of the checkpoint ``weights``). ``interpolation`` overrides the resize
    mode (default: the HEX run's, else bicubic as MUSK/DINOv2 pre-processing). ``backbone_kw``: builder options
    (reduced sizes in tests). Raises :class:`PipelineError` for a missing file or an unknown name."""
    from hex import backbones

    if name.startswith(HEX_PREFIX):
        from hex.trained import load_trained

        run = name[len(HEX_PREFIX):]
        if not run:
            raise PipelineError("--encoder hex:RUN needs a run name (a folder OUT/runs/RUN with best.safetensors)")
        if out is None and weights is None:
            raise PipelineError(f"--encoder {name}: give --out (runs live in OUT/runs/) or --weights CHECKPOINT")
        ckpt = Path(weights) if weights is not None else Path(out) / "runs" / run / "best.safetensors"
        if not ckpt.is_file():
            raise PipelineError(f"--encoder {name}: {ckpt} does not exist; train the HEX run first (stage 04) or give "
                                "one of its checkpoints with --weights")
        model, meta = load_trained(ckpt)
        visual = model.visual.eval()
        return ImageEncoder(name, visual, int(visual.embed_dim), int(meta["input_size"]), tuple(meta["mean"]),
                            tuple(meta["std"]), interpolation or meta.get("interpolation") or "bilinear",
                            str(ckpt), [ckpt], {"checkpoint_sha256": meta.get("checkpoint_sha256", ""),
                                                "hex_epoch": meta.get("epoch")})
    try:
        spec = backbones.get_spec(name)
        with torch.random.fork_rng(devices=[]):  # random init: the same in every process and run
            torch.manual_seed(0)
            module = backbones.create(name, weights=weights, **backbone_kw)
    except ValueError as e:
        raise PipelineError(str(e).splitlines()[0]) from e
    except (FileNotFoundError, RuntimeError) as e:
        raise PipelineError(f"encoder {name!r}, weights {weights}: {str(e).splitlines()[0]}") from e
    if weights is None:
        hint = f" (e.g. --weights hf_hub:{spec.hf_hub_id})" if spec.hf_hub_id else ""
        log.warning("%s: no weights given, the encoder is RANDOMLY initialised%s", name, hint)
    sources = [Path(weights)] if weights is not None and Path(weights).is_file() else []
    return ImageEncoder(name, module.eval(), int(module.embed_dim), int(module.input_size), tuple(module.mean),
                        tuple(module.std), interpolation or "bicubic", str(weights) if weights else None, sources)


def _newer_than_all(path: Path, inputs: Sequence[Path]) -> bool:
    mt = path.stat().st_mtime
    return all(not p.exists() or p.stat().st_mtime <= mt for p in inputs)


# ----------------------------------------------------------------------------------------------------------------
# H&E feature bags


@dataclass
class HEConfig:
    """Settings of H&E extraction (see ``build_parser``)."""

    out: Path
    patches_dir: Path
    batch_size: int = 128
    workers: int = 2
    amp: str = "auto"
    region_px: int = 2048
    mpp: float | None = None
    progress: bool = True


def feature_paths(out: Path, encoder: str, slide: str) -> tuple[Path, Path]:
    """(h5, pt) paths of one slide's bag under ``OUT/features/{encdir}/``."""
    d = Path(out) / "features" / encoder_dirname(encoder)
    return d / "h5_files" / f"{slide}.h5", d / "pt_files" / f"{slide}.pt"


def write_feature_bag(h5_path: Path, pt_path: Path, features: np.ndarray, coords: np.ndarray,
                      attrs: dict[str, Any]) -> None:
    """Write ``features`` (N, D) float32 + ``coords`` (N, 2) int64 to HDF5 and the tensor alone to .pt, atomically
    (the .pt last)."""
    import h5py

    features = np.ascontiguousarray(features, np.float32)
    coords = np.ascontiguousarray(coords, np.int64).reshape(-1, 2)
    if len(features) != len(coords):
        raise ValueError(f"{len(features)} feature rows for {len(coords)} coords")
    rows = max(1, min(len(features), (1 << 20) // max(1, 4 * features.shape[1])))  # ~1 MiB chunks
    with atomic_path(h5_path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=features, chunks=(rows, features.shape[1]) if len(features) else None)
        f.create_dataset("coords", data=coords)
        for k, v in attrs.items():
            f.attrs[k] = v
    with atomic_path(pt_path) as tmp:
        torch.save(torch.from_numpy(features), tmp)


def read_feature_bag(h5_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(features (N, D) float32, coords (N, 2) int64, attrs) of a bag file."""
    import h5py

    with h5py.File(h5_path, "r") as f:
        return f["features"][:], f["coords"][:], dict(f.attrs)


def encode_tiles(enc: ImageEncoder, tiles: Any, device: torch.device, batch_size: int = 128, workers: int = 0,
                 amp: torch.dtype | None = None, progress: bool = False, desc: str = "tiles") -> np.ndarray:
    """(N, D) float32 features of every tile of a :class:`hex.wsi_tiles.TileRegions`, row i = tile i."""
    from hex.evaluate import prediction_fn, run_loop, wants_channels_last
    from hex.wsi_tiles import make_tile_loader

    loader = make_tile_loader(tiles, batch_size, workers, pin_memory=device.type == "cuda")
    return run_loop(loader, prediction_fn(enc.module), enc.transform(), device, amp, n=tiles.num_tiles,
                    dim=enc.embed_dim, channels_last=wants_channels_last(enc.module, device), progress=progress,
                    desc=desc, total=tiles.num_tiles)


def extract_slide(slide: str, he_path: Path, enc: ImageEncoder, cfg: HEConfig, device: torch.device) -> dict:
    """Features of one slide's grid -> ``features/{encdir}/{h5_files,pt_files}/{slide}.*``; returns a summary."""
    from hex.evaluate import resolve_amp
    from hex.wsi_tiles import TileRegions
    from preprocess.patch import read_grid

    grid_path = Path(cfg.patches_dir) / f"{slide}.h5"
    _, gattrs = read_grid(grid_path)
    tiles = TileRegions.from_grid(he_path, grid_path, mpp=cfg.mpp, region_px=cfg.region_px)
    if tiles.num_tiles == 0:
        log.warning("%s: the grid %s is empty; writing (0, %d) features", slide, grid_path, enc.embed_dim)
    feats = encode_tiles(enc, tiles, device, cfg.batch_size, cfg.workers, resolve_amp(cfg.amp, device),
                         cfg.progress, desc=slide)
    attrs = {"encoder": enc.name, "embed_dim": enc.embed_dim, "input_size": enc.input_size,
             "interpolation": enc.interpolation, "weights": enc.weights or "", "slide_id": slide,
             "patch_size_level0": int(gattrs["patch_size_level0"]), "patch_size": int(gattrs["patch_size"]),
             "patch_level": int(gattrs["patch_level"]), "mpp": float(gattrs.get("mpp", 0.5)),
             "level0_mpp": float(gattrs.get("level0_mpp", tiles.mpp)), "source_grid": str(grid_path),
             "he_path": str(he_path), "coords_units": "level-0 pixels, top-left (x, y)",
             "schema_version": SCHEMA_VERSION, "settings": he_settings(enc, cfg),
             **{k: v for k, v in enc.info.items() if v is not None}}
    h5_path, pt_path = feature_paths(cfg.out, enc.name, slide)
    write_feature_bag(h5_path, pt_path, feats, tiles.coords, attrs)
    return {"patches": int(len(feats))}


def he_settings(enc: ImageEncoder, cfg: HEConfig) -> str:
    """JSON of what a bag depends on besides its inputs (a change means the bag is redone)."""
    import json

    return json.dumps({"encoder": enc.name, "weights": enc.weights, "input_size": enc.input_size,
                       "interpolation": enc.interpolation, "mean": list(enc.mean), "std": list(enc.std),
                       "region_px": cfg.region_px, "mpp": cfg.mpp})


def he_is_done(slide: str, enc: ImageEncoder, cfg: HEConfig) -> bool:
    """Both files exist, are newer than the slide's grid and the encoder's weight files, and were made with the
    same settings (:func:`he_settings`)."""
    import h5py

    h5_path, pt_path = feature_paths(cfg.out, enc.name, slide)
    if not (h5_path.exists() and pt_path.exists()):
        return False
    inputs = [Path(cfg.patches_dir) / f"{slide}.h5", *enc.sources]
    if not _newer_than_all(h5_path, inputs):
        log.info("%s: grid or weights changed since %s was written; redoing it", slide, h5_path)
        return False
    try:
        with h5py.File(h5_path, "r") as f:
            same = f.attrs.get("settings", "") == he_settings(enc, cfg)
    except OSError:
        return False
    if not same:
        log.info("%s: %s was made with other settings; redoing it", slide, h5_path)
    return same


# ----------------------------------------------------------------------------------------------------------------
# CLI


def my_slides(slides: Sequence[str], shard: str | None, rank: int = 0, world: int = 1) -> list[str]:
    """This process's slides, as stage 06 shares them (:func:`hex.infer_wsi.shard_slides`): job-array shard
    ``i/n`` = every n-th of the sorted list from i, then every ``world``-th of those from ``rank``."""
    from hex.infer_wsi import shard_slides

    return shard_slides(slides, shard, rank, world)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mica.extract_features", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output root OUT (reads patches/, virtual_codex/, runs/)")
    p.add_argument("--cohort", type=Path, help="cohort folder with he/ (H&E slides)")
    p.add_argument("--he", type=Path, nargs="+", help="H&E slide files or folders (instead of COHORT/he)")
    p.add_argument("--what", choices=("he", "codex", "both"), default="both", help="modalities (default both)")
    p.add_argument("--slides", nargs="+", help="only these slide ids (default: all)")
    p.add_argument("--encoder", default="musk",
                   help="H&E encoder: a hex.backbones name (musk, dinov2_vits14_reg, tiny), timm:<name>, or hex:RUN "
                        "(the backbone of OUT/runs/RUN) (default musk)")
    p.add_argument("--weights", help="H&E encoder weights (local file or hf_hub:<repo>); for hex:RUN a checkpoint "
                                     "(default OUT/runs/RUN/best.safetensors)")
    p.add_argument("--interpolation", choices=("bilinear", "bicubic"),
                   help="resize mode to the encoder input (default: the HEX run's, else bicubic)")
    p.add_argument("--codex-encoder", default="dinov2_vits14_reg",
                   help="CODEX encoder: stats, or an image backbone name (default dinov2_vits14_reg, the original)")
    p.add_argument("--codex-weights", help="weights of an image CODEX encoder (local file or hf_hub:<repo>)")
    p.add_argument("--high", type=float, default=ce.HIGH_THRESHOLD,
                   help="stats: high-expression threshold, P99-normalised units (default 0.5)")
    p.add_argument("--patches", type=Path, help="grid folder (default OUT/patches)")
    p.add_argument("--mpp", type=float, help="level-0 µm/px of the H&E (overrides slide metadata)")
    p.add_argument("--region-px", type=int, default=2048, help="side of the regions read at the tile level, px")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward per process")
    p.add_argument("--workers", type=int, default=2,
                   help="DataLoader worker processes per rank (stats: slides in parallel)")
    p.add_argument("--amp", choices=("auto", "fp16", "bf16", "none"), default="auto", help="autocast (CUDA only)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--shard", help="job arrays: i/n = every n-th slide of the sorted list, from i (0-based)")
    p.add_argument("--overwrite", action="store_true", help="redo slides whose outputs exist")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failing slide")
    return p


def _run_he(args: argparse.Namespace, ctx, shard: str | None) -> StageReport:
    from preprocess.patch import collect_he_slides

    he_paths, slides = collect_he_slides(args.cohort, args.he, args.slides)
    enc = load_encoder(args.encoder, args.out, args.weights, args.interpolation)
    cfg = HEConfig(out=args.out, patches_dir=args.patches or args.out / "patches", batch_size=args.batch_size,
                   workers=args.workers, amp=args.amp, region_px=args.region_px, mpp=args.mpp,
                   progress=ctx.is_main)
    enc.module.to(ctx.device)
    if ctx.is_main:
        save_config(args.out / "features" / encoder_dirname(enc.name),
                    vars(args) | {"slides_resolved": slides, "embed_dim": enc.embed_dim, "input_size": enc.input_size,
                                  "mean": enc.mean, "std": enc.std, "interpolation": enc.interpolation,
                                  "world_size": ctx.world_size, "schema_version": SCHEMA_VERSION})
    mine = my_slides(slides, shard, ctx.rank, ctx.world_size)
    return run_slides(mine, lambda s: extract_slide(s, he_paths[s], enc, cfg, ctx.device),
                      functools.partial(he_is_done, enc=enc, cfg=cfg), overwrite=args.overwrite,
                      skip_errors=not args.fail_fast, desc=f"H&E features ({args.encoder})")


def _run_codex(args: argparse.Namespace, ctx, shard: str | None) -> StageReport:
    import json

    from hex.evaluate import resolve_amp

    maps = ce.find_maps(args.out)
    if not maps:
        raise PipelineError(f"no virtual CODEX maps in {args.out / 'virtual_codex'}; run stage 06 "
                            "(hex.infer_wsi, then hex.virtual_codex) first")
    slides = select_slides(sorted(maps), args.slides, str(args.out / "virtual_codex"))
    mine = my_slides(slides, shard, ctx.rank, ctx.world_size)
    name, encdir = args.codex_encoder, encoder_dirname(args.codex_encoder)
    resolved: dict[str, Any] = {"slides_resolved": slides, "world_size": ctx.world_size,
                                "schema_version": SCHEMA_VERSION}
    if name == ce.STATS_ENCODER:
        settings = json.dumps({"encoder": name, "high": args.high, "epi_threshold": ce.EPI_THRESHOLD})
        resolved |= {"feature_names": list(ce.STATS_FEATURES), "feature_descriptions": ce.STATS_DESCRIPTIONS}
        work = functools.partial(_stats_work, maps=maps, out=args.out, encdir=encdir, high=args.high,
                                 settings=settings)
        done = functools.partial(_stats_done, maps=maps, out=args.out, encdir=encdir, settings=settings)
        if ctx.is_main:
            save_config(args.out / "codex_features" / encdir, vars(args) | resolved)
        rep = run_slides(mine, work, done, overwrite=args.overwrite, workers=args.workers,
                         skip_errors=not args.fail_fast, desc="CODEX features (stats)")
        names: list[str] | None = list(ce.STATS_FEATURES)
    else:
        enc = load_encoder(name, args.out, args.codex_weights)
        enc.module.to(ctx.device)
        settings = json.dumps({"encoder": name, "weights": enc.weights, "input_size": enc.input_size,
                               "mean": list(enc.mean), "std": list(enc.std)})
        resolved |= {"embed_dim": enc.embed_dim, "input_size": enc.input_size, "mean": enc.mean, "std": enc.std}
        if ctx.is_main:
            save_config(args.out / "codex_features" / encdir, vars(args) | resolved)
        rep = ce.run_image(mine, maps, args.out, encdir, name, enc.module, enc.input_size, enc.mean, enc.std,
                           ctx.device, settings, batch_size=args.batch_size, workers=args.workers,
                           amp=resolve_amp(args.amp, ctx.device), overwrite=args.overwrite,
                           skip_errors=not args.fail_fast, progress=ctx.is_main, sources=enc.sources)
        names = None
    barrier()
    if ctx.is_main:
        ce.assemble(args.out, encdir, name, names)
    return rep


def _stats_work(slide: str, maps: dict[str, Path], out: Path, encdir: str, high: float, settings: str) -> dict:
    return ce.stats_slide(slide, maps[slide], out, encdir, high, settings)


def _stats_done(slide: str, maps: dict[str, Path], out: Path, encdir: str, settings: str) -> bool:
    return ce.part_is_done(ce.part_path(out, encdir, slide), ce.map_inputs(maps[slide]), settings)


def _merge(reports: list[StageReport]) -> StageReport:
    out = StageReport()
    for r in reports:
        out.done += r.done
        out.skipped += r.skipped
        out.failed |= r.failed
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ctx = setup_dist(args.device)
    log_dir = args.out / ("codex_features" if args.what == "codex" else "features")
    setup_logging(log_dir / "run.log" if ctx.is_main else None, rank=ctx.rank)
    code = 0
    try:
        my_slides([], args.shard)  # a bad --shard stops here
        reports: dict[str, StageReport] = {}
        if args.what in ("he", "both"):
            reports["H&E"] = _run_he(args, ctx, args.shard)
        if args.what in ("codex", "both"):
            reports["CODEX"] = _run_codex(args, ctx, args.shard)
        for what, rep in reports.items():
            total = _merge(all_gather_objects(rep))
            if ctx.is_main:
                log.info("%s features: %s", what, total.summary())
                for s, why in total.failed.items():
                    log.error("  failed %s: %s", s, why)
            code = max(code, 0 if total.ok else 1)
    except PipelineError as e:
        log.error("%s", e)
        code = 2
    finally:
        barrier()
        cleanup_dist()
        close_log_file(log_dir / "run.log")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
