"""The reports of ``hex.test``: per-patch predictions, per-marker and per-slide correlation tables, ``summary.json``
and the plots, each written atomically (``summary.json`` last, so that it marks a complete set)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hex.data.datasets import PatchDataset
from hex.evaluate.metrics import marker_table, slide_table
from pipeline.io import atomic_path, write_json

log = logging.getLogger("hex.test")


def write_reports(test_dir: Path, ds: PatchDataset, pred: np.ndarray, visible: Sequence[str] | None = None,
                  plots: bool = True, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the CSV tables, summary and plots for predictions ``pred`` (N,M) of ``ds``; returns the summary
    (``info``: what was scored, added to ``summary.json``)."""
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
    summary |= dict(info or {})
    if plots:
        _plots(test_dir, table.iloc[: len(markers)], y, pred, markers, visible)
    write_json(test_dir / "summary.json", summary)  # last: the other files are complete when it exists
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
