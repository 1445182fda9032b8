"""Evaluate a trained HEX model on labelled patches: per-patch predictions, per-marker and per-slide correlations.

Commands (run from the repository root)::

    # validation slides of a split, best model of run RUN -> OUT/runs/RUN/test/
    python -m hex.test --out OUT --run RUN --data OUT --split COHORT/splits/splits_0.csv --split-column val \\
        --visible-markers COHORT/ground_truth.json
    # every labelled slide in OUT/markers, from an epoch checkpoint
    python -m hex.test --out OUT --run RUN --data OUT --checkpoint OUT/runs/RUN/checkpoints/epoch_120.pt
    # the original release's checkpoint.pth (heads only): backbone weights from --weights, its 40 marker names
    # from hex/markers_original.csv, matched to the label columns by name
    python -m hex.test --out OUT --run orig --data OUT --checkpoint checkpoint.pth --backbone musk \
        --weights musk/model.safetensors
    # several processes / GPUs (each sample predicted exactly once, gathered by index on rank 0)
    torchrun --standalone --nproc-per-node=4 -m hex.test --out OUT --run-name RUN --data OUT --split ...

Outputs (rank 0, atomic): ``patch_predictions.csv`` (``slide,index,x,y,true_<m>...,pred_<m>...``),
``marker_pearson.csv`` (``marker,pearson,spearman,mse,n[,visible]`` + ``mean``/``median`` rows and, with
``--visible-markers``, ``mean_visible``/``mean_invisible``), ``slide_pearson.csv`` (per-slide per-marker r),
``summary.json``, ``marker_pearson_bar.png`` and ``scatter_grid.png``.

The labels must be normalised like the checkpoint's training labels (``markers/normalization.json`` against the
one stored in the checkpoint): a difference stops the run, since MSE and r on differently normalised labels do not
measure the model (``--allow-normalization-mismatch`` evaluates anyway, with a warning).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from hex.cli import run_cli
from hex.data import (
    LEGACY_PREFIX,
    BatchTransform,
    PatchDataset,
    build_dataset,
    list_labelled_slides,
    marker_columns,
    normalization_differences,
    read_split,
    resolve_markers_dir,
)
from hex.dist import DistContext, barrier
from hex.evaluate import autocast, predict, predict_distributed, resolve_amp, wants_channels_last
from hex.metrics import marker_table, slide_table
from hex.trained import add_checkpoint_args, load_from_args, load_trained
from preprocess.utils import PipelineError, atomic_path, save_config, write_json

log = logging.getLogger("hex.test")

# re-exported: older code imports the prediction loop and the loader from here
__all__ = ["autocast", "load_trained", "match_label_markers", "predict", "predict_distributed", "read_visible_markers",
           "resolve_amp", "write_reports"]


# ----------------------------------------------------------------------------------------------------------------
# markers: the model's outputs matched to the label CSV's columns by name


def match_label_markers(model_markers: Sequence[str], csv_markers: Sequence[str],
                        original: bool = False) -> tuple[list[str], list[int]]:
    """Label columns to read and the model outputs they correspond to: ``(columns, output indices)``.

    Markers are matched by name; the model's order is kept and markers the labels lack are left out (warning).
    An original checkpoint (``original``) evaluated on legacy ``mean_intensity_channel{k}`` columns maps output k-1
    to channel k, as the release trained it. No marker in common is an error.
    """
    have = set(csv_markers)
    if original and csv_markers and all(c.startswith(LEGACY_PREFIX) for c in csv_markers) and \
            len(csv_markers) == len(model_markers):
        log.info("original checkpoint on legacy label columns: output k -> %s{k+1}", LEGACY_PREFIX)
        return list(csv_markers), list(range(len(model_markers)))
    cols = [m for m in model_markers if m in have]
    if not cols:
        raise PipelineError(f"the label CSVs share no marker with the model (model: {list(model_markers)[:5]}..., "
                            f"labels: {list(csv_markers)[:5]}...); use labels with the model's marker names")
    if len(cols) < len(model_markers):
        log.warning("labels lack %d of the model's %d markers (%s...): evaluating the %d in common",
                    len(model_markers) - len(cols), len(model_markers),
                    [m for m in model_markers if m not in have][:5], len(cols))
    pos = {m: i for i, m in enumerate(model_markers)}
    return cols, [pos[m] for m in cols]


def _first_csv_markers(markers_dir: Path, slides: Sequence[str]) -> list[str]:
    for s in slides:
        p = markers_dir / f"{s}.csv"
        if p.is_file():
            return marker_columns(pd.read_csv(p, nrows=0).columns)
    raise PipelineError(f"no label CSV for slides {list(slides)[:5]} in {markers_dir} (run the quantification stage)")


# ----------------------------------------------------------------------------------------------------------------
# reports


def write_reports(test_dir: Path, ds: PatchDataset, pred: np.ndarray, visible: Sequence[str] | None = None,
                  plots: bool = True) -> dict[str, Any]:
    """Write the CSV tables, summary and plots for predictions ``pred`` (N,M) of ``ds``; returns the summary."""
    y, markers = ds.labels, ds.markers
    slides = ds.slide_of_sample
    df = pd.DataFrame({"slide": slides, "index": ds.rows, "x": ds.coords[:, 0], "y": ds.coords[:, 1]})
    df = pd.concat([df, pd.DataFrame(y, columns=[f"true_{m}" for m in markers]),
                    pd.DataFrame(pred, columns=[f"pred_{m}" for m in markers])], axis=1)
    with atomic_path(test_dir / "patch_predictions.csv") as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
    if visible is not None:
        unknown = sorted(set(visible) - set(markers))
        if unknown:
            log.warning("visible markers not in the model's marker list: %s", unknown)
    table = marker_table(y, pred, markers, visible)
    with atomic_path(test_dir / "marker_pearson.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    st = slide_table(y, pred, slides, markers)
    with atomic_path(test_dir / "slide_pearson.csv") as tmp:
        st.to_csv(tmp, index=False, float_format="%.6g")
    summ = table.set_index("marker")
    summary: dict[str, Any] = {"n_patches": int(len(y)), "n_slides": int(len(st)),
                               "mean_pearson": float(summ.loc["mean", "pearson"]),
                               "median_pearson": float(summ.loc["median", "pearson"]),
                               "mean_spearman": float(summ.loc["mean", "spearman"]),
                               "mean_mse": float(summ.loc["mean", "mse"])}
    if visible is not None:
        summary["mean_pearson_visible"] = float(summ.loc["mean_visible", "pearson"])
        summary["mean_pearson_invisible"] = float(summ.loc["mean_invisible", "pearson"])
        summary["visible_markers"] = [m for m in markers if m in set(visible)]
    write_json(test_dir / "summary.json", summary)
    if plots:
        _plots(test_dir, table.iloc[: len(markers)], y, pred, markers, visible)
    return summary


def _plots(test_dir: Path, table: pd.DataFrame, y: np.ndarray, pred: np.ndarray, markers: Sequence[str],
           visible: Sequence[str] | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = table.sort_values("pearson", ascending=False, na_position="last")
    vis = set(visible or [])
    colors = ["tab:green" if m in vis else "tab:blue" for m in t["marker"]]
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(t)), 4))
    ax.bar(range(len(t)), t["pearson"].fillna(0), color=colors)
    ax.set_xticks(range(len(t)), t["marker"], rotation=90, fontsize=7)
    ax.set_ylabel("Pearson r")
    ax.set_title(f"per-marker Pearson r (mean {np.nanmean(t['pearson']):.3f})" +
                 (" - green: visible" if vis else ""))
    fig.tight_layout()
    with atomic_path(test_dir / "marker_pearson_bar.png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)

    n = len(markers)
    cols = min(8, n)
    rows = (n + cols - 1) // cols
    rng = np.random.default_rng(0)
    sel = rng.choice(len(y), size=min(len(y), 2000), replace=False) if len(y) else np.arange(0)
    r = dict(zip(table["marker"], table["pearson"]))
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= n:
            ax.axis("off")
            continue
        ax.scatter(y[sel, k], pred[sel, k], s=2, alpha=0.3, rasterized=True)
        lo = float(min(y[sel, k].min(initial=0), pred[sel, k].min(initial=0)))
        hi = float(max(y[sel, k].max(initial=1), pred[sel, k].max(initial=1)))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.5)
        ax.set_title(f"{markers[k]} r={r.get(markers[k], np.nan):.2f}", fontsize=7)
        ax.tick_params(labelsize=5)
    fig.supxlabel("true")
    fig.supylabel("predicted")
    fig.tight_layout()
    with atomic_path(test_dir / "scatter_grid.png") as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def read_visible_markers(path: str | os.PathLike) -> list[str]:
    """``visible_markers`` of a ``ground_truth.json`` (or a JSON list)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"--visible-markers file {path} does not exist")
    obj = json.loads(path.read_text())
    vis = obj.get("visible_markers") if isinstance(obj, dict) else obj
    if not isinstance(vis, list):
        raise PipelineError(f"{path} has no 'visible_markers' list")
    return [str(v) for v in vis]


# ----------------------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hex.test", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="output root OUT (runs live in OUT/runs/RUN)")
    p.add_argument("--run-name", "--run", dest="run", default="hex",
                   help="run name under OUT/runs/ (--run-name under torchrun, which reads --run itself)")
    p.add_argument("--data", type=Path, help="data root holding he_patches/ and markers/ (default: OUT)")
    p.add_argument("--markers-dir", type=Path, help="label CSV folder (default DATA/markers)")
    p.add_argument("--patches-dir", type=Path, help="patch folder (default DATA/he_patches)")
    p.add_argument("--split", type=Path, help="split CSV; without it every labelled slide in the marker folder")
    p.add_argument("--split-column", default="val", help="column of --split to evaluate (default val)")
    p.add_argument("--slides", nargs="+", help="explicit slide ids (instead of --split)")
    p.add_argument("--visible-markers", type=Path, help="ground_truth.json with visible_markers: report means")
    p.add_argument("--test-dir", type=Path, help="output folder (default OUT/runs/RUN/test)")
    p.add_argument("--batch-size", type=int, default=128, help="patches per forward per process")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes per rank")
    p.add_argument("--amp", choices=("auto", "fp16", "bf16", "none"), default="auto", help="autocast (CUDA only)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--allow-normalization-mismatch", action="store_true",
                   help="evaluate labels whose normalization.json differs from the checkpoint's (default: an error)")
    add_checkpoint_args(p, "best.safetensors (default OUT/runs/RUN/best.safetensors)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), argv, evaluate_run, lambda a: _test_dir(a) / "test.log", logger=log)


def _test_dir(args: argparse.Namespace) -> Path:
    return args.test_dir or args.out / "runs" / args.run / "test"


def check_normalization(meta: dict[str, Any], labels: dict | None, markers: Sequence[str], allow: bool) -> None:
    """Stop when the labels were normalised differently from the checkpoint's training labels (``allow``: warn)."""
    diffs = normalization_differences(meta.get("normalization"), labels, markers)
    if not diffs:
        if meta.get("normalization") is None or labels is None:
            log.info("label normalisation not compared (the %s has none)",
                     "checkpoint" if meta.get("normalization") is None else "label folder")
        return
    msg = (f"the labels' normalization.json differs from the one checkpoint {meta.get('checkpoint')} was trained on "
           f"({len(diffs)} differences, e.g. {'; '.join(diffs[:3])}): MSE and r on differently normalised labels do "
           "not measure the model; normalise these slides with the training cohort's file (preprocess.quantify "
           "--normalization), or pass --allow-normalization-mismatch")
    if not allow:
        raise PipelineError(msg)
    log.warning("%s", msg.replace(", or pass --allow-normalization-mismatch", " (allowed)"))


def evaluate_run(args: argparse.Namespace, ctx: DistContext) -> int:
    """The stage body: load the model, build the dataset, predict on every rank, write the reports on rank 0."""
    run_dir = args.out / "runs" / args.run
    test_dir = _test_dir(args)
    data = args.data or args.out
    ckpt = args.checkpoint or run_dir / "best.safetensors"
    model, meta = load_from_args(args, run_dir / "best.safetensors")
    model.to(ctx.device)
    channels_last = wants_channels_last(model, ctx.device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if args.slides:
        slides = list(args.slides)
    elif args.split is not None:
        slides = read_split(args.split, args.split_column)
    else:
        slides = list_labelled_slides(resolve_markers_dir(data, args.markers_dir))
        if not slides:
            raise PipelineError(f"no label CSVs in {resolve_markers_dir(data, args.markers_dir)}")
    mdir = resolve_markers_dir(data, args.markers_dir)
    cols, outputs = match_label_markers(meta["markers"], _first_csv_markers(mdir, slides),
                                        original=meta.get("checkpoint_kind") == "original")
    ds = build_dataset(data, slides, markers=cols, markers_dir=args.markers_dir, patches_dir=args.patches_dir)
    check_normalization(meta, ds.normalization, cols, args.allow_normalization_mismatch)
    ds.markers = [meta["markers"][k] for k in outputs]  # report under the model's names
    visible = read_visible_markers(args.visible_markers) if args.visible_markers else None
    tf = BatchTransform(int(meta["input_size"]), meta["mean"], meta["std"], train=False,
                        interpolation=meta.get("interpolation") or "bilinear")
    amp = resolve_amp(args.amp, ctx.device)
    if ctx.is_main:
        log.info("model %s (epoch %s) on %d patches of %d slides, %d rank(s)", ckpt, meta.get("epoch"), len(ds),
                 len(slides), ctx.world_size)
    pred = predict_distributed(model, ds, tf, ctx.device, ctx.rank, ctx.world_size, batch_size=args.batch_size,
                               workers=args.workers, amp=amp, progress=ctx.is_main, channels_last=channels_last)
    pred = pred[:, outputs]
    if ctx.is_main:
        save_config(test_dir, {**vars(args), "checkpoint": str(ckpt), "world_size": ctx.world_size,
                               "slides": slides, "checkpoint_sha256": meta["checkpoint_sha256"],
                               "checkpoint_kind": meta["checkpoint_kind"], "markers": ds.markers},
                    name="test_config.json")
        s = write_reports(test_dir, ds, pred, visible, plots=not args.no_plots)
        msg = f"mean Pearson r {s['mean_pearson']:.4f} (median {s['median_pearson']:.4f})"
        if visible is not None:
            msg += (f"; visible {s['mean_pearson_visible']:.4f}, invisible {s['mean_pearson_invisible']:.4f}")
        log.info("%s over %d patches -> %s", msg, len(ds), test_dir)
    barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
