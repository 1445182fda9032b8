"""MICA figures (matplotlib, Agg): Kaplan-Meier curves of risk groups, ROC curves, patch-attribution heatmaps over
the slide thumbnail, and the cohort bar plot of CODEX marker attributions. Every function writes one PNG atomically.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.io import atomic_path  # noqa: E402

log = logging.getLogger(__name__)


def _save(fig: plt.Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def km_plot(times: np.ndarray, censorship: np.ndarray, high: np.ndarray, pvalue: float, path: str | os.PathLike,
            title: str = "", time_unit: str = "months") -> Path:
    """Kaplan-Meier curves (lifelines) of the high- and low-risk groups with the log-rank p in the legend title.

    times (N,) in ``time_unit``; censorship (N,) 1 = censored; high (N,) bool.
    """
    from lifelines import KaplanMeierFitter

    t, e, g = np.asarray(times, float), 1 - np.asarray(censorship, float), np.asarray(high, bool)
    fig, ax = plt.subplots(figsize=(5, 4))
    for mask, name, colour in ((~g, "low risk", "tab:blue"), (g, "high risk", "tab:red")):
        if mask.any():
            KaplanMeierFitter(label=f"{name} (n={int(mask.sum())})").fit(t[mask], e[mask]).plot_survival_function(
                ax=ax, ci_show=False, show_censors=True, color=colour)
    ax.set_xlabel(f"time ({time_unit})")
    ax.set_ylabel("survival probability")
    ax.set_ylim(0, 1.02)
    ax.legend(title=f"log-rank p = {pvalue:.3g}" if np.isfinite(pvalue) else "log-rank p = n/a", loc="lower left")
    ax.set_title(title)
    return _save(fig, path)


def roc_plot(labels: np.ndarray, scores: np.ndarray, path: str | os.PathLike, title: str = "") -> Path:
    """ROC curve (sklearn) of 0/1 ``labels`` against ``scores`` with the AUC in the legend."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y, s = np.asarray(labels, float), np.asarray(scores, float)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if np.unique(y).size == 2:
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, color="tab:red", label=f"AUC = {roc_auc_score(y, s):.3f} (n={y.size})")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(loc="lower right")
    ax.set_title(title)
    return _save(fig, path)


def attribution_canvas(coords: np.ndarray, values: np.ndarray, patch_size: int, shape: tuple[int, int],
                       downsample: float) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise per-patch values onto a (H,W) canvas of ``downsample`` level-0 px per pixel.

    coords (N,2) level-0 top-left x,y; overlapping patches are averaged. Returns (values (H,W), covered (H,W) bool).
    """
    h, w = shape
    acc, cnt = np.zeros((h, w), np.float64), np.zeros((h, w), np.float64)
    side = max(1, int(round(patch_size / downsample)))
    for (x, y), v in zip(np.asarray(coords), np.asarray(values, np.float64)):
        c0, r0 = int(x / downsample), int(y / downsample)
        r1, c1 = min(h, r0 + side), min(w, c0 + side)
        if r0 < h and c0 < w and r1 > 0 and c1 > 0:
            acc[max(r0, 0):r1, max(c0, 0):c1] += v
            cnt[max(r0, 0):r1, max(c0, 0):c1] += 1
    covered = cnt > 0
    acc[covered] /= cnt[covered]
    return acc, covered


def heatmap_plot(coords: np.ndarray, values: np.ndarray, path: str | os.PathLike, patch_size: int,
                 thumbnail: np.ndarray | None = None, downsample: float | None = None, title: str = "",
                 max_side: int = 1024) -> Path:
    """Patch attributions (diverging colours, symmetric about 0, red = raises the target) over the slide thumbnail.

    Without a thumbnail the patches are drawn on a blank canvas spanning the coordinates. ``downsample`` is level-0
    px per thumbnail px (from ``HESlide.thumbnail``).
    """
    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    if thumbnail is None:
        extent = (coords.max(0) + patch_size) if len(coords) else np.array([patch_size, patch_size])
        downsample = max(1.0, float(extent.max()) / max_side)
        shape = (int(np.ceil(extent[1] / downsample)), int(np.ceil(extent[0] / downsample)))
        background = np.full((*shape, 3), 255, np.uint8)
    else:
        background, shape = thumbnail, thumbnail.shape[:2]
        downsample = float(downsample or 1.0)
    canvas, covered = attribution_canvas(coords, values, patch_size, shape, downsample)
    vmax = float(np.percentile(np.abs(values), 99)) if len(values) else 1.0
    vmax = vmax if vmax > 0 else 1.0
    fig, ax = plt.subplots(figsize=(6, 6 * shape[0] / max(shape[1], 1) + 0.5))
    ax.imshow(background)
    shown = np.ma.masked_where(~covered, canvas)
    im = ax.imshow(shown, cmap="RdBu_r", vmin=-vmax, vmax=vmax, alpha=0.6, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.04, label="patch attribution (IG)")
    ax.set_axis_off()
    ax.set_title(title)
    return _save(fig, path)


def marker_bar_plot(markers: Sequence[str], mean: np.ndarray, sd: np.ndarray | None, path: str | os.PathLike,
                    title: str = "mean CODEX attribution per marker") -> Path:
    """Bar plot of the mean attribution of each marker (sorted, ± sd), positive = raises the target."""
    mean = np.asarray(mean, float)
    order = np.argsort(mean)[::-1]
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(markers)), 4))
    colours = ["tab:red" if v > 0 else "tab:blue" for v in mean[order]]
    ax.bar(np.arange(len(order)), mean[order], yerr=None if sd is None else np.asarray(sd, float)[order],
           color=colours, capsize=2)
    ax.set_xticks(np.arange(len(order)))
    ax.set_xticklabels([markers[i] for i in order], rotation=90, fontsize=7)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("attribution (IG, summed over features)")
    ax.set_title(title)
    return _save(fig, path)
