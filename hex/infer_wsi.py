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

Slides: :func:`pipeline.cohort.resolve_slides` (``COHORT/pairs.csv`` when present, else ``COHORT/he/``, or
``--he``); a slide's id is its file name as written (a link keeps its own name), like every other stage.

Done-records (:mod:`pipeline.done`): ``hex_pred/done/{slide}.json`` holds the settings that change the file
(``patch_size``, ``stride``, ``target_mpp``, ``min_tissue``, ``thumb_size``, ``mpp``, ``raw_units``,
``normalization``, and the backbone flags of an original checkpoint) and the input files (``he``, ``checkpoint``,
``grid``, with size and mtime). A rerun skips slides done with these; redoes a slide whose input changed (the model
was trained on, the grid redone), saying so; and, when any slide was done with other settings or another
checkpoint file, stops before any work: "done with other settings: <diff>; pass --overwrite" (exit 2).
``--overwrite`` redoes every slide (and its maps). The virtual CODEX maps follow the same rule
(``virtual_codex/done/``, :mod:`hex.virtual_codex`). Batch size, workers, region size and autocast are not
settings (they do not change what is predicted beyond float rounding).

Before the first slide: flags in range, the slides and the checkpoint exist, ``hex_pred/`` (and ``virtual_codex/``)
writable, ``--preview-markers`` among the model's markers. The last line of the log counts done / skipped /
failed slides, with each failure's reason; the exit status is 1 when any failed.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hex.evaluate import resolve_amp, wants_channels_last
from hex.trained import add_checkpoint_args, load_from_args
from hex.wsi_predict import SCHEMA_VERSION, InferConfig, build_tiles, denormalize, infer_slide
from pipeline import done as done_mod
from pipeline.cli import run_cli
from pipeline.cohort import select_slides
from pipeline.dist import DistContext, broadcast_object, is_dist
from pipeline.errors import PipelineError
from pipeline.io import ensure_writable, save_config
from pipeline.runner import StageReport, parse_shard, run_slides

log = logging.getLogger("hex.infer_wsi")

__all__ = ["SCHEMA_VERSION", "InferConfig", "build_tiles", "denormalize", "done_spec", "infer_slide", "main",
           "shard_slides"]


# ----------------------------------------------------------------------------------------------------------------
# many slides


def shard_slides(slides: Sequence[str], shard: str | None, rank: int = 0, world_size: int = 1) -> list[str]:
    """Deterministic share of the sorted slide list: job-array shard ``i/n`` takes every n-th slide from i, then
    rank r of ``world_size`` every world_size-th of those from r."""
    ordered = sorted(slides)
    parsed = parse_shard(shard)
    if parsed is not None:
        ordered = ordered[parsed[0]::parsed[1]]
    return ordered[rank::world_size]


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


def _outputs(slide: str, pred_dir: str) -> list[str]:
    return [os.path.join(pred_dir, f"{slide}.h5")]


def done_spec(args: argparse.Namespace, cfg: InferConfig, checkpoint: Path, he: dict[str, str]) -> done_mod.DoneSpec:
    """The done-record spec of ``hex_pred/``: the settings and inputs of the module docstring."""
    settings = {"patch_size": cfg.patch_size, "stride": cfg.stride, "target_mpp": cfg.target_mpp,
                "min_tissue": cfg.min_tissue, "thumb_size": cfg.thumb_size, "mpp": cfg.mpp,
                "raw_units": cfg.raw_units, "backbone": args.backbone, "weights": args.weights,
                "backbone_kw": args.backbone_kw}
    norm = _abs(args.normalization) if args.normalization and cfg.raw_units else None
    return done_mod.DoneSpec(cfg.pred_dir, settings, SCHEMA_VERSION,
                             inputs=functools.partial(_inputs, he={s: _abs(p) for s, p in he.items()},
                                                      checkpoint=_abs(checkpoint), grid_dir=_abs(cfg.grid_dir),
                                                      normalization=norm),
                             outputs=functools.partial(_outputs, pred_dir=str(cfg.pred_dir)))


def _predict(slide_id: str, he_paths: dict[str, str], run: dict[str, Any]) -> dict[str, Any]:
    """One slide for :func:`pipeline.runner.run_slides`: every failure becomes one line (a PipelineError)."""
    import openslide

    he_path = Path(he_paths[slide_id])
    try:
        res = infer_slide(slide_id, he_path, **run)
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


def _write_maps(slides: Sequence[str], he_paths: dict[str, str], out: Path, report: StageReport,
                preview: Sequence[str] | None, overwrite: bool) -> None:
    """The virtual CODEX maps of the predicted (or already done) slides; a failure fails the slide."""
    from hex.virtual_codex import write_slide_maps

    for sid in slides:
        try:
            write_slide_maps(out / "hex_pred" / f"{sid}.h5", out / "virtual_codex", he_path=Path(he_paths[sid]),
                             preview_markers=preview, overwrite=overwrite)
            continue
        except PipelineError as e:
            report.failed[sid] = f"maps: {e}"
            log.error("%s: virtual CODEX maps: %s", sid, e)
        except Exception as e:  # noqa: BLE001 - unexpected: full traceback, the other slides go on
            report.failed[sid] = f"maps: {type(e).__name__}: {_one_line(e)}"
            log.exception("%s: virtual CODEX maps failed", sid)
        for group in (report.done, report.skipped):
            if sid in group:
                group.remove(sid)


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
    r.add_argument("--overwrite", action="store_true",
                   help="redo every slide (and its maps), also those done with other settings (default: skip those "
                        "done with these settings, stop on other settings)")
    r.add_argument("--raw-units", action="store_true",
                   help="also write codex_prediction_raw = p_low + pred * (p_high - p_low) (training percentiles)")
    r.add_argument("--normalization", type=Path,
                   help="markers/normalization.json to use for --raw-units (default: the checkpoint's)")
    r.add_argument("--no-maps", action="store_true", help="skip the virtual CODEX maps (hex.virtual_codex)")
    r.add_argument("--preview-markers", nargs="+", help="markers shown in the map previews")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), argv, infer, lambda a: a.out / "hex_pred" / f"run{_shard_tag(a)}.log", logger=log,
                   check=check_flags, prepare=_prepare)


def _shard_tag(args: argparse.Namespace) -> str:
    return f"_shard{args.shard.replace('/', 'of')}" if args.shard else ""


def _checkpoint(args: argparse.Namespace) -> Path:
    return args.checkpoint or args.out / "runs" / args.run / "best.safetensors"


def check_flags(args: argparse.Namespace) -> None:
    """Before any process group or output folder: flag values, the slides (``args.he_resolved``: {id: H&E path},
    ``args.slides_resolved``: the ids of this job) and the checkpoint exist; one line naming the flag or file."""
    from pipeline.cohort import resolve_slides

    for flag, v, lo in (("--patch-size", args.patch_size, 1), ("--stride", args.stride, 1),
                        ("--thumb-size", args.thumb_size, 16), ("--region-px", args.region_px, 1),
                        ("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0)):
        if v is not None and v < lo:
            raise PipelineError(f"{flag} {v}: must be >= {lo}")
    if not args.target_mpp > 0 or (args.mpp is not None and not args.mpp > 0):
        raise PipelineError(f"--target-mpp {args.target_mpp} / --mpp {args.mpp}: µm per pixel must be > 0")
    if not 0 <= args.min_tissue <= 1:
        raise PipelineError(f"--min-tissue {args.min_tissue}: a tissue fraction in [0, 1]")
    parse_shard(args.shard)
    if args.normalization is not None and not args.normalization.is_file():
        raise PipelineError(f"--normalization {args.normalization}: file not found")
    if args.cohort is None and not args.he:
        raise PipelineError("give --cohort (a folder with he/ or pairs.csv) or --he (slide files or folders)")
    if args.cohort is not None and not args.he and not args.cohort.is_dir():
        raise PipelineError(f"--cohort {args.cohort}: folder not found")
    cohort = resolve_slides(args.cohort, he=args.he)
    args.he_resolved = {s: str(p) for s, p in cohort.he_paths().items()}
    args.slides_resolved = shard_slides(select_slides(cohort.ids, args.slides, cohort.source), args.shard)
    if not args.slides_resolved:
        raise PipelineError(f"--shard {args.shard}: no slide of the {len(cohort)} in {cohort.source} falls in this "
                            "shard")
    ck = _checkpoint(args)
    if not ck.is_file():
        raise PipelineError(f"checkpoint {ck} does not exist (train run {args.run} first, or pass --checkpoint)")


def _prepare(args: argparse.Namespace, ctx: DistContext) -> None:
    ensure_writable(args.out / "hex_pred", "output folder", "choose another --out")
    if not args.no_maps:
        ensure_writable(args.out / "virtual_codex", "output folder", "choose another --out")


def _conflicts(spec: done_mod.DoneSpec, slides: Sequence[str], args: argparse.Namespace) -> str | None:
    """The one-line error for slides (of this job) done with other settings, or None (rank 0 decides)."""
    found = done_mod.conflicts(spec, slides)
    if found and not args.overwrite:
        return str(done_mod.conflict_error(found, "hex_pred"))
    if not args.no_maps and not args.overwrite:
        from hex.virtual_codex import map_conflicts

        maps = map_conflicts(slides, args.out / "hex_pred", args.out / "virtual_codex",
                             {s: Path(args.he_resolved[s]) for s in slides}, args.preview_markers)
        if maps:
            return str(done_mod.conflict_error(maps, "virtual_codex"))
    return None


def infer(args: argparse.Namespace, ctx: DistContext) -> int:
    """The stage body: every slide of this rank's shard -> ``hex_pred/{slide}.h5`` (+ maps); 1 if any failed."""
    pred_dir, tag = args.out / "hex_pred", _shard_tag(args)
    slides, he_paths = args.slides_resolved, args.he_resolved
    mine = slides[ctx.rank::ctx.world_size]
    ckpt = _checkpoint(args)
    cfg = InferConfig(pred_dir=pred_dir, grid_dir=args.patches or args.out / "patches",
                      patch_size=args.patch_size, stride=args.stride, target_mpp=args.target_mpp,
                      min_tissue=args.min_tissue, thumb_size=args.thumb_size, mpp=args.mpp,
                      region_px=args.region_px, batch_size=args.batch_size, workers=args.workers,
                      raw_units=args.raw_units)
    spec = done_spec(args, cfg, ckpt, he_paths)
    conflict = broadcast_object(_conflicts(spec, slides, args) if ctx.is_main else None)
    if conflict:
        raise PipelineError(conflict)
    model, meta = load_from_args(args, ckpt)
    normalization = json.loads(args.normalization.read_text()) if args.normalization else meta.get("normalization")
    if args.raw_units:
        denormalize(np.zeros((0, len(meta["markers"])), np.float32), meta["markers"], normalization)
    if args.preview_markers and not args.no_maps:
        from hex.virtual_codex import choose_preview_markers

        choose_preview_markers(meta["markers"], args.preview_markers)
    model.to(ctx.device)
    if wants_channels_last(model, ctx.device):
        model.to(memory_format=torch.channels_last)
    if ctx.is_main:
        save_config(pred_dir, {**vars(args), "world_size": ctx.world_size, "checkpoint_resolved": meta["checkpoint"],
                               "schema_version": SCHEMA_VERSION, "checkpoint_sha256": meta["checkpoint_sha256"],
                               "markers": meta["markers"], "settings": dict(spec.settings)},
                    name=f"config{tag}.json")
        log.info("%d slides (%d on this rank of %d), checkpoint %s (%s), device %s", len(slides), len(mine),
                 ctx.world_size, meta["checkpoint"], meta["checkpoint_kind"], ctx.device)
    run = {"model": model, "meta": meta, "cfg": cfg, "device": ctx.device,
           "amp": resolve_amp(args.amp, ctx.device), "normalization": normalization, "progress": ctx.is_main}
    report = run_slides(mine, functools.partial(_predict, he_paths=he_paths, run=run), done=spec,
                        overwrite=args.overwrite, desc="hex_pred")
    warnings = {s: r["warning"] for s, r in report.results.items() if r.get("warning")}
    if not args.no_maps:
        _write_maps([*report.done, *report.skipped], he_paths, args.out, report, args.preview_markers, args.overwrite)
    parts = _gather((report.done, report.skipped, report.failed, warnings))
    total = StageReport(done=sorted(s for p in parts for s in p[0]), skipped=sorted(s for p in parts for s in p[1]),
                        failed={k: v for p in parts for k, v in sorted(p[2].items())})
    warned = sorted(k for p in parts for k in p[3] if k not in total.failed)
    extra = f"{len(warned)} with warnings ({', '.join(warned)}; see above)" if warned else ""
    if ctx.is_main:
        return total.finish("hex_pred", extra)
    return 0 if total.ok else 1


if __name__ == "__main__":
    sys.exit(main())
