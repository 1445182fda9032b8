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
the one prediction loop (:func:`hex.evaluate.run_loop`). The slides are the cohort's (:func:`pipeline.cohort.
resolve_slides`: ``COHORT/pairs.csv`` when present, else ``COHORT/he/``, or ``--he``; ids = file names as written,
so a link names its outputs after itself, as stage 01 names its grid). Outputs (atomic)::

    OUT/features/{encdir}/h5_files/{slide}.h5   features (N, D) float32, coords (N, 2) int64 level-0 top-left;
                                                attrs encoder, patch_size_level0, patch_size, mpp (µm/px of the
                                                tiles), level0_mpp, embed_dim, input_size, schema_version, slide_id
    OUT/features/{encdir}/pt_files/{slide}.pt   the (N, D) float32 tensor only (CLAM/MCAT convention)
    OUT/features/{encdir}/done/{slide}.json     what the bag was made with (:mod:`mica.feature_done`)
    OUT/features/{encdir}/config.json           resolved settings (written after the done-check passed)

Done means "done with these inputs and these settings" (:mod:`mica.feature_done`): a slide whose H&E file or grid
changed is redone; a rerun with other settings (encoder weights, resize mode, ``--region-px``, ``--mpp``, the
CODEX thresholds or weights) stops before any work with "... done with other settings: <diff>; pass --overwrite".

CODEX (``--codex-encoder``): ``stats`` (per-channel spatial descriptors, D' = 10, see :mod:`mica.codex_encoders`)
or an image backbone (``dinov2_vits14_reg`` as the original MICA, with ``--codex-weights``) applied to every
channel of ``OUT/virtual_codex/{slide}.npy`` (H', W', 40), batched across slides. Outputs::

    OUT/codex_features/{encdir}/{slide}.h5      per-slide part: features (40, D') float32 (the resumable unit)
    OUT/codex_features/{encdir}/done/{slide}.json
    OUT/codex_features/{encdir}.h5              one (40, D') dataset per slide; attrs encoder, markers,
                                                schema_version (+ feature_names for stats); rebuilt from the parts
                                                done with these settings (:mod:`mica.codex_run`)
    OUT/codex_features/{encdir}/config.json

``{encdir}`` is the encoder name with ``:`` and ``/`` replaced by ``_`` (``hex:demo`` -> ``hex_demo``). The run ends
with one line (done / skipped / failed slides with their reasons). Exit code 0 when every slide is done or skipped,
1 when any failed, 2 on bad input (flags, missing inputs, an unwritable output folder, other settings), checked
before any slide.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mica import codex_encoders as ce
from mica import codex_run as cr
from mica import feature_done as fd
from mica.bags import encoder_dirname, feature_paths, features_dir, read_feature_bag, write_feature_bag
from mica.encoders import HEX_PREFIX, ImageEncoder, encode_tiles, load_encoder
from pipeline.cohort import select_slides
from pipeline.dist import all_gather_objects, barrier
from pipeline.done import DoneSpec
from pipeline.errors import PipelineError
from pipeline.io import ensure_writable, save_config
from pipeline.runner import StageReport, run_slides

log = logging.getLogger("mica.extract_features")

SCHEMA_VERSION = 1
# the bag helpers live in mica.bags, the encoders in mica.encoders (re-exported here)
__all__ = ["HEX_PREFIX", "ImageEncoder", "encode_tiles", "encoder_dirname", "extract_slide", "feature_paths",
           "load_encoder", "main", "my_slides", "read_feature_bag", "write_feature_bag"]


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


def extract_slide(slide: str, he_path: Path, enc: ImageEncoder, cfg: HEConfig, device: torch.device,
                  settings: dict[str, Any] | None = None) -> dict:
    """Features of one slide's grid -> ``features/{encdir}/{h5_files,pt_files}/{slide}.*``; returns a summary.
    ``settings`` (:func:`mica.feature_done.he_settings`) are stored as JSON in the attr ``settings``."""
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
             "schema_version": SCHEMA_VERSION,
             "settings": json.dumps(settings or fd.he_settings(enc, cfg.region_px, cfg.mpp), default=str),
             **{k: v for k, v in enc.info.items() if v is not None}}
    h5_path, pt_path = feature_paths(cfg.out, enc.name, slide)
    write_feature_bag(h5_path, pt_path, feats, tiles.coords, attrs)
    return {"patches": int(len(feats))}


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
    p.add_argument("--cohort", type=Path, help="cohort folder: pairs.csv when present, else he/ (H&E slides)")
    p.add_argument("--he", type=Path, nargs="+", help="H&E slide files or folders (instead of the cohort's)")
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
    p.add_argument("--overwrite", action="store_true",
                   help="redo slides whose outputs exist, also those made with other settings")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failing slide")
    return p


def _out_dirs(args: argparse.Namespace) -> list[Path]:
    dirs = []
    if args.what in ("he", "both"):
        dirs.append(features_dir(args.out, args.encoder))
    if args.what in ("codex", "both"):
        dirs.append(args.out / "codex_features" / encoder_dirname(args.codex_encoder))
    return dirs


def check_args(args: argparse.Namespace) -> None:
    """Flags, then the output folders (writable), before logging, a process group or any slide."""
    my_slides([], args.shard)  # a bad --shard stops here
    for flag, value, ok in (("--batch-size", args.batch_size, args.batch_size >= 1),
                            ("--workers", args.workers, args.workers >= 0),
                            ("--region-px", args.region_px, args.region_px >= 1),
                            ("--mpp", args.mpp, args.mpp is None or args.mpp > 0),
                            ("--high", args.high, args.high > 0)):
        if not ok:
            raise PipelineError(f"{flag} {value}: must be {'>= 0' if flag == '--workers' else 'positive'}")
    for d in _out_dirs(args):
        ensure_writable(d)


def _log_file(args: argparse.Namespace) -> Path:
    return args.out / ("codex_features" if args.what == "codex" else "features") / "run.log"


@dataclass
class _Part:
    """One modality of a run, planned: its done-spec and slides, and how to run and finish it."""

    what: str
    desc: str
    spec: DoneSpec
    run_slides: list[str]  # this run's (job-array shard's) slides; ``run`` does this rank's share of them
    config_dir: Path
    config: dict[str, Any]
    run: Callable[[], StageReport]
    after: Callable[[], None] = lambda: None


def _plan_he(args: argparse.Namespace, ctx) -> _Part:
    from pipeline.cohort import resolve_slides

    cohort = resolve_slides(args.cohort, he=args.he)
    slides = my_slides(select_slides(cohort.ids, args.slides, cohort.source), args.shard)
    he_paths = cohort.he_paths()
    patches = args.patches or args.out / "patches"
    if not patches.is_dir():
        raise PipelineError(f"grid folder {patches} not found; run stage 01 (preprocess.patch) first, or pass "
                            "--patches")
    enc = load_encoder(args.encoder, args.out, args.weights, args.interpolation)
    cfg = HEConfig(out=args.out, patches_dir=patches, batch_size=args.batch_size, workers=args.workers,
                   amp=args.amp, region_px=args.region_px, mpp=args.mpp, progress=ctx.is_main)
    settings = fd.he_settings(enc, args.region_px, args.mpp)
    spec = fd.he_spec(args.out, enc.name, settings, he_paths, patches)
    mine = my_slides(slides, None, ctx.rank, ctx.world_size)
    desc = f"H&E features ({args.encoder})"

    def run() -> StageReport:
        enc.module.to(ctx.device)
        return run_slides(mine, lambda s: extract_slide(s, he_paths[s], enc, cfg, ctx.device, settings),
                          done=spec, overwrite=args.overwrite, skip_errors=not args.fail_fast, desc=desc)

    config = vars(args) | {"slides_resolved": slides, "slide_source": cohort.source, "settings": settings,
                           "world_size": ctx.world_size, "schema_version": SCHEMA_VERSION}
    return _Part("H&E", desc, spec, slides, features_dir(args.out, enc.name), config, run)


def _plan_codex(args: argparse.Namespace, ctx) -> _Part:
    from hex.evaluate import resolve_amp

    maps = cr.find_maps(args.out)
    if not maps:
        raise PipelineError(f"no virtual CODEX maps in {args.out / 'virtual_codex'}; run stage 06 "
                            "(hex.infer_wsi, then hex.virtual_codex) first")
    slides = my_slides(select_slides(sorted(maps), args.slides, str(args.out / "virtual_codex")), args.shard)
    mine = my_slides(slides, None, ctx.rank, ctx.world_size)
    name, encdir = args.codex_encoder, encoder_dirname(args.codex_encoder)
    desc = f"CODEX features ({name})"
    resolved: dict[str, Any] = {"slides_resolved": slides, "world_size": ctx.world_size,
                                "schema_version": SCHEMA_VERSION}
    if name == ce.STATS_ENCODER:
        settings = fd.codex_settings(name, args.high, ce.EPI_THRESHOLD)
        spec = fd.codex_spec(args.out, encdir, settings)
        resolved |= {"feature_names": list(ce.STATS_FEATURES), "feature_descriptions": ce.STATS_DESCRIPTIONS}
        work = functools.partial(_stats_work, maps=maps, out=args.out, encdir=encdir, high=args.high,
                                 settings=settings)
        names: list[str] | None = list(ce.STATS_FEATURES)

        def run() -> StageReport:
            return run_slides(mine, work, done=spec, overwrite=args.overwrite, workers=args.workers,
                              skip_errors=not args.fail_fast, desc=desc)
    else:
        enc = load_encoder(name, args.out, args.codex_weights)
        settings = fd.codex_settings(name, enc=enc)
        spec = fd.codex_spec(args.out, encdir, settings)
        resolved |= {"embed_dim": enc.embed_dim, "input_size": enc.input_size, "mean": enc.mean, "std": enc.std}
        names = None

        def run() -> StageReport:
            enc.module.to(ctx.device)
            return cr.run_image(mine, maps, args.out, encdir, name, enc.module, enc.input_size, enc.mean, enc.std,
                                ctx.device, spec, batch_size=args.batch_size, workers=args.workers,
                                amp=resolve_amp(args.amp, ctx.device), overwrite=args.overwrite,
                                skip_errors=not args.fail_fast, progress=ctx.is_main)

    def after() -> None:  # the combined file holds the parts made with these settings and current maps only
        parts = cr.part_slides(args.out, encdir)
        keep = fd.done_now(spec, parts)
        left = sorted(set(parts) - set(keep))
        if left:
            log.warning("%s: %d parts left out of %s (made with other settings, or their map changed or is gone): "
                        "%s", desc, len(left), cr.combined_path(args.out, encdir), ", ".join(left[:10]))
        cr.assemble(args.out, encdir, name, names, slides=keep)

    resolved["settings"] = settings
    return _Part("CODEX", desc, spec, slides, args.out / "codex_features" / encdir, vars(args) | resolved, run,
                 after)


def _stats_work(slide: str, maps: dict[str, Path], out: Path, encdir: str, high: float,
                settings: dict[str, Any]) -> dict:
    return cr.stats_slide(slide, maps[slide], out, encdir, high, settings)


def _merge(reports: list[StageReport]) -> StageReport:
    out = StageReport()
    for r in reports:
        out.done += r.done
        out.skipped += r.skipped
        out.failed |= r.failed
    return out


def final_report(reports: dict[str, StageReport]) -> tuple[StageReport, str]:
    """(report, extra) of the run's last line: one modality as it is; both with the slides tagged [H&E]/[CODEX]
    and the counts of each as ``extra``."""
    if len(reports) == 1:
        return next(iter(reports.values())), ""
    total = StageReport()
    for what, r in reports.items():
        total.done += [f"{s} [{what}]" for s in r.done]
        total.skipped += [f"{s} [{what}]" for s in r.skipped]
        total.failed |= {f"{s} [{what}]": why for s, why in r.failed.items()}
    return total, "; ".join(f"{what} {r.summary()}" for what, r in reports.items())


def _work(args: argparse.Namespace, ctx) -> int:
    try:
        parts = []
        if args.what in ("he", "both"):
            parts.append(_plan_he(args, ctx))
        if args.what in ("codex", "both"):
            parts.append(_plan_codex(args, ctx))
        for part in parts:  # every rank checks every slide of the run: all stop alike, before any work
            fd.check_before_work(part.spec, part.run_slides, args.overwrite, part.desc)
        if ctx.is_main:
            for part in parts:
                save_config(part.config_dir, part.config)
        reports = {}
        for part in parts:
            rep = part.run()
            barrier()
            if ctx.is_main:
                part.after()
            reports[part.what] = _merge(all_gather_objects(rep))
    finally:
        barrier()
    total, extra = final_report(reports)
    desc = " + ".join(p.desc for p in parts)
    if ctx.is_main:
        return total.finish(desc, extra)
    return 0 if total.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run stage 07 (see the module docstring); returns the exit code (0, 1 when a slide failed, 2 bad input)."""
    from pipeline.cli import run_cli

    return run_cli(build_parser(), argv, _work, _log_file, check_args, logger=log)


if __name__ == "__main__":
    raise SystemExit(main())
