"""MICA figures (matplotlib, Agg), each function writing one PNG atomically:

* outcome figures a journal takes: Kaplan-Meier curves of risk groups with CI bands and the number at risk
  (``km_plot``), the ROC curve with a bootstrap band (``roc_band_plot``; plain ``roc_plot``), the forest plot of a
  multivariable Cox (``forest_plot``), every model's metric with its CI (``comparison_plot``) and a calibration
  curve (``calibration_plot``);
* attribution figures: patch-attribution heatmaps over the slide thumbnail and the cohort bar plot of CODEX marker
  attributions.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.io import atomic_path  # noqa: E402

log = logging.getLogger(__name__)


def save_figure(fig: plt.Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write ``fig`` as a PNG atomically and close it; returns the path."""
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def km_plot(times: np.ndarray, censorship: np.ndarray, high: np.ndarray, pvalue: float | None,
            path: str | os.PathLike, title: str = "", time_unit: str = "months", *,
            labels: tuple[str, str] = ("low risk", "high risk"), ci: bool = True, at_risk: bool = True) -> Path:
    """Kaplan-Meier curves (lifelines) of the low- and high-risk groups as a journal prints them: 95% CI bands
    (Greenwood, exponential), censor ticks, the log-rank p in the legend title and the number at risk under the
    axis (``lifelines.plotting.add_at_risk_counts``).

    times (N,) in ``time_unit``; censorship (N,) 1 = censored; high (N,) bool; ``pvalue`` the log-rank p to print
    (None: computed with lifelines' ``logrank_test``; NaN prints n/a). An empty group is left out.
    """
    from lifelines import KaplanMeierFitter
    from lifelines.plotting import add_at_risk_counts

    t, e, g = np.asarray(times, float), 1 - np.asarray(censorship, float), np.asarray(high, bool)
    if pvalue is None:
        pvalue = float("nan")
        if g.any() and (~g).any() and e.any():
            from lifelines.statistics import logrank_test

            pvalue = float(logrank_test(t[g], t[~g], e[g], e[~g]).p_value)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    fitters = []
    for mask, name, colour in ((~g, labels[0], "tab:blue"), (g, labels[1], "tab:red")):
        if mask.any():
            kmf = KaplanMeierFitter(label=f"{name} (n={int(mask.sum())})").fit(t[mask], e[mask])
            kmf.plot_survival_function(ax=ax, ci_show=ci, ci_alpha=0.15, show_censors=True, color=colour,
                                       censor_styles={"marker": "|", "ms": 6, "mew": 1})
            fitters.append(kmf)
    ax.set_xlabel(f"time ({time_unit})")
    ax.set_ylabel("survival probability")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(left=0)
    ax.legend(title=f"log-rank p = {pvalue:.3g}" if np.isfinite(pvalue) else "log-rank p = n/a", loc="lower left",
              fontsize=8, title_fontsize=8)
    ax.set_title(title)
    if at_risk and fitters:
        add_at_risk_counts(*fitters, ax=ax, rows_to_show=["At risk"], labels=[f.label.split(" (n=")[0]
                                                                             for f in fitters])
    return save_figure(fig, path)


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
    return save_figure(fig, path)


FPR_GRID = np.linspace(0.0, 1.0, 101)


def roc_band(labels: np.ndarray, scores: np.ndarray, idx: np.ndarray,
             grid: np.ndarray = FPR_GRID) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bootstrap band of the ROC curve: ``(tpr_lo (G,), tpr_hi (G,), aucs (B',), tpr (B',G))`` over the resamples
    ``idx`` (B,N) of patients that hold both classes (B' of them); TPR interpolated on the FPR ``grid`` per resample
    (the curve starts at 0), the band the 2.5/97.5 percentiles. All empty when no resample has both classes."""
    from sklearn.metrics import auc, roc_curve

    y, s = np.asarray(labels, float), np.asarray(scores, float)
    curves, aucs = [], []
    for rows in np.asarray(idx, np.int64).reshape(-1, y.size) if y.size else []:
        yb, sb = y[rows], s[rows]
        if np.unique(yb).size < 2:
            continue
        fpr, tpr, _ = roc_curve(yb, sb)
        curve = np.interp(grid, fpr, tpr)
        curve[0] = 0.0
        curves.append(curve)
        aucs.append(auc(fpr, tpr))                       # = roc_auc_score (trapezoids of the curve)
    if not curves:
        empty = np.empty(0)
        return empty, empty, empty, np.empty((0, grid.size))
    tpr = np.stack(curves)
    lo, hi = np.percentile(tpr, [2.5, 97.5], axis=0)
    return lo, hi, np.asarray(aucs), tpr


def roc_band_plot(labels: np.ndarray, scores: np.ndarray, idx: np.ndarray, path: str | os.PathLike,
                  title: str = "") -> Path:
    """ROC curve of 0/1 ``labels`` (N,) against ``scores`` (N,) with a 95% bootstrap band (``idx`` (B,N) patient
    resample indices; :func:`roc_band`) and the AUC with its percentile 95% CI in the legend. One class: the
    diagonal and "AUC undefined"."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y, s = np.asarray(labels, float), np.asarray(scores, float)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if np.unique(y).size == 2:
        lo, hi, aucs, _ = roc_band(y, s, idx)
        fpr, tpr, _ = roc_curve(y, s)
        auc = roc_auc_score(y, s)
        ci = f" (95% CI {np.percentile(aucs, 2.5):.3f}-{np.percentile(aucs, 97.5):.3f})" if aucs.size else ""
        if lo.size:
            ax.fill_between(FPR_GRID, lo, hi, color="tab:red", alpha=0.15, lw=0, label="95% bootstrap band")
        ax.plot(fpr, tpr, color="tab:red", label=f"AUC = {auc:.3f}{ci}\nn = {y.size}, {int(y.sum())} positive")
    else:
        ax.text(0.5, 0.35, "one class only: AUC undefined", ha="center", fontsize=9, color="grey")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title)
    return save_figure(fig, path)


def _fmt_p(p: float) -> str:
    if not np.isfinite(p):
        return "p = n/a"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def forest_plot(table: pd.DataFrame, path: str | os.PathLike, title: str = "") -> Path:
    """Forest plot of a multivariable Cox table (columns ``covariate, hr, lo, hi, p``; ``mica.study.cox``): one
    row per covariate in table order, HR with its 95% CI on a log axis, a line at HR = 1, and ``HR (CI)`` and p
    printed at the right. Non-finite values are printed as n/a and not drawn."""
    n = len(table)
    fig, ax = plt.subplots(figsize=(7, 1.0 + 0.4 * max(n, 1)))
    ys = np.arange(n)[::-1]
    hr, lo, hi = (pd.to_numeric(table[c], errors="coerce").to_numpy(float) if n else np.empty(0)
                  for c in ("hr", "lo", "hi"))
    ok = np.isfinite(hr) & np.isfinite(lo) & np.isfinite(hi) & (lo > 0) & (hr > 0)
    if ok.any():
        ax.errorbar(hr[ok], ys[ok], xerr=[hr[ok] - lo[ok], hi[ok] - hr[ok]], fmt="s", color="black", ms=5,
                    ecolor="black", capsize=3, lw=1.2)
        span = np.concatenate([lo[ok], hi[ok], [1.0]])
        left, right = span.min() / 1.3, span.max() * 1.3
    else:
        left, right = 0.5, 2.0
    ax.set_xscale("log")
    ax.set_xlim(left, right)
    ticks = [v for v in (0.01, 0.02, 0.05, 0.1, 0.2, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 5, 10, 20, 50, 100)
             if left <= v <= right]
    ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.axvline(1.0, color="grey", ls="--", lw=1)
    ax.set_yticks(ys)
    ax.set_yticklabels([str(c) for c in table["covariate"]] if n else [])
    ax.set_ylim(-0.7, max(n, 1) - 0.3)
    for y, h, lw_, hi_, p in zip(ys, hr, lo, hi, pd.to_numeric(table["p"], errors="coerce") if n else []):
        text = f"{h:.2f} ({lw_:.2f}-{hi_:.2f})" if np.isfinite([h, lw_, hi_]).all() else "n/a"
        ax.annotate(f"{text}   {_fmt_p(float(p))}", xy=(1.02, y), xycoords=("axes fraction", "data"),
                    va="center", fontsize=8)
    ax.annotate("HR (95% CI)   p", xy=(1.02, max(n, 1) - 0.3), xycoords=("axes fraction", "data"), va="bottom",
                fontsize=8, fontweight="bold")
    if not n:
        ax.text(0.5, 0.5, "no covariates", transform=ax.transAxes, ha="center", color="grey")
    ax.set_xlabel("hazard ratio (per SD for numeric covariates; log scale)")
    ax.set_title(title)
    return save_figure(fig, path)


def _chance_level(metric: str) -> float | None:
    """0.5 for a concordance, AUC or balanced accuracy metric, else None."""
    m = metric.lower()
    if m.startswith("c_") or any(k in m for k in ("auc", "cindex", "c-index", "c_index", "concordance", "balanced")):
        return 0.5
    return None


def comparison_plot(report: pd.DataFrame, metric: str, path: str | os.PathLike, title: str = "") -> Path:
    """One point with its 95% CI per row of ``report`` (columns ``row, metric, value, lo, hi``) for ``metric``,
    sorted by value (best at the top for higher-is-better metrics), with a reference line at 0.5 for c-index,
    AUC and balanced-accuracy metrics. Rows without a finite value are listed as n/a."""
    sub = report[report["metric"] == metric].copy()
    for c in ("value", "lo", "hi"):
        sub[c] = pd.to_numeric(sub[c], errors="coerce")
    sub = sub.sort_values("value", na_position="first").reset_index(drop=True)
    n = len(sub)
    fig, ax = plt.subplots(figsize=(6, 1.0 + 0.4 * max(n, 1)))
    ys = np.arange(n)
    v, lo, hi = sub["value"].to_numpy(float), sub["lo"].to_numpy(float), sub["hi"].to_numpy(float)
    ok = np.isfinite(v)
    has_ci = ok & np.isfinite(lo) & np.isfinite(hi)
    if has_ci.any():
        ax.errorbar(v[has_ci], ys[has_ci], xerr=[np.maximum(v - lo, 0)[has_ci], np.maximum(hi - v, 0)[has_ci]],
                    fmt="none", ecolor="tab:blue", capsize=3, lw=1.2)
    if ok.any():
        ax.plot(v[ok], ys[ok], "o", color="tab:blue")
    for y, row in zip(ys, sub.itertuples()):
        text = (f"{row.value:.3f} ({row.lo:.3f}-{row.hi:.3f})" if np.isfinite([row.value, row.lo, row.hi]).all()
                else f"{row.value:.3f}" if np.isfinite(row.value) else "n/a")
        ax.annotate(text, xy=(1.02, y), xycoords=("axes fraction", "data"), va="center", fontsize=8)
    chance = _chance_level(metric)
    if chance is not None:
        ax.axvline(chance, color="grey", ls="--", lw=1)
    ax.set_yticks(ys)
    ax.set_yticklabels([str(r) for r in sub["row"]])
    ax.set_ylim(-0.7, max(n, 1) - 0.3)
    if not n:
        ax.text(0.5, 0.5, f"no rows for {metric}", transform=ax.transAxes, ha="center", color="grey")
    ax.set_xlabel(f"{metric} (95% CI)")
    ax.set_title(title)
    return save_figure(fig, path)


def calibration_plot(table: pd.DataFrame, path: str | os.PathLike, title: str = "") -> Path:
    """Calibration curve: per bin (columns ``bin, mean_predicted, fraction_positive, n``) the observed fraction
    positive against the mean predicted probability, points sized by ``n``, with the diagonal of perfect
    calibration. Bins with n = 0 or non-finite values are not drawn."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    x = pd.to_numeric(table["mean_predicted"], errors="coerce").to_numpy(float) if len(table) else np.empty(0)
    y = pd.to_numeric(table["fraction_positive"], errors="coerce").to_numpy(float) if len(table) else np.empty(0)
    n = pd.to_numeric(table["n"], errors="coerce").fillna(0).to_numpy(float) if len(table) else np.empty(0)
    ok = np.isfinite(x) & np.isfinite(y) & (n > 0)
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect calibration")
    if ok.any():
        size = 20 + 180 * n[ok] / n[ok].max()
        ax.plot(x[ok], y[ok], "-", color="tab:red", lw=1)
        ax.scatter(x[ok], y[ok], s=size, color="tab:red", zorder=3, label=f"model ({int(n[ok].sum())} patients)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed fraction positive")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title)
    return save_figure(fig, path)


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
    return save_figure(fig, path)


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
    return save_figure(fig, path)
