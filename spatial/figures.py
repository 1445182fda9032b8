"""Stage 10 figures (matplotlib, Agg), each function writing one PNG atomically and returning its path:

* :func:`forest_plot`: the univariable table of :mod:`spatial.outcome` (HR or OR per SD, 95% CI, p and BH q);
* :func:`km_top_feature`: Kaplan-Meier of the patients above / at-or-below the median of one feature (the top niche
  by default), log-rank p and the number at risk (``mica.plots.km_plot``);
* :func:`composition_heatmap`: the niche composition, phenotypes x niches (fraction of each niche's units);
* :func:`niche_map`: a slide's units as dots coloured by niche over its H&E thumbnail, one colour per niche on every
  slide (:func:`spatial.export.niche_colour`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.lines  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from mica.plots import km_plot, save_figure  # noqa: E402
from spatial.export import niche_colour  # noqa: E402

log = logging.getLogger(__name__)


def _fmt(v: float, name: str) -> str:
    if not np.isfinite(v):
        return f"{name} n/a"
    return f"{name} < 0.001" if v < 0.001 else f"{name} = {v:.3f}"


def forest_plot(table: pd.DataFrame, path: str | os.PathLike, title: str = "", max_rows: int = 40) -> Path:
    """Forest plot of a univariable table (:func:`spatial.outcome.univariable_cox`: ``hr_per_sd``, or
    :func:`spatial.outcome.response_association`: ``or_per_sd``): one row per feature sorted by p (the ``max_rows``
    smallest), the ratio per SD with its 95% CI on a log axis, a line at 1, and ``ratio (CI)  p  q`` at the right;
    rows with q < 0.05 drawn in red. NaN rows are listed as n/a and not drawn. (``mica.plots.forest_plot`` draws a
    multivariable table without q, hence this one.)"""
    effect = "hr_per_sd" if "hr_per_sd" in table else "or_per_sd"
    label = "hazard ratio per SD" if effect == "hr_per_sd" else "odds ratio per SD"
    t = table.sort_values("p", na_position="last", kind="stable").head(max_rows)
    n = len(t)
    r, lo, hi, p, q = (pd.to_numeric(t[c], errors="coerce").to_numpy(float) if n else np.empty(0)
                       for c in (effect, "lo", "hi", "p", "q"))
    ys = np.arange(n)[::-1]
    fig, ax = plt.subplots(figsize=(7.5, 1.0 + 0.32 * max(n, 1)))
    ok = np.isfinite(r) & np.isfinite(lo) & np.isfinite(hi) & (lo > 0)
    sig = ok & (q < 0.05)
    for mask, colour in ((ok & ~sig, "black"), (sig, "tab:red")):
        if mask.any():
            ax.errorbar(r[mask], ys[mask], xerr=[r[mask] - lo[mask], hi[mask] - r[mask]], fmt="s", color=colour,
                        ms=4, ecolor=colour, capsize=2, lw=1.1)
    if ok.any():
        span = np.concatenate([lo[ok], hi[ok], [1.0]])
        left, right = span.min() / 1.2, span.max() * 1.2
    else:
        left, right = 0.5, 2.0
    ax.set_xscale("log")
    ax.set_xlim(left, right)
    ticks = [v for v in (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1, 1.5, 2, 3, 5, 10, 20) if left <= v <= right]
    ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.axvline(1.0, color="grey", ls="--", lw=1)
    ax.set_yticks(ys)
    ax.set_yticklabels([str(f) for f in t["feature"]] if n else [], fontsize=8)
    ax.set_ylim(-0.7, max(n, 1) - 0.3)
    for y, a, b, c, pv, qv in zip(ys, r, lo, hi, p, q):
        text = f"{a:.2f} ({b:.2f}-{c:.2f})" if np.isfinite([a, b, c]).all() else "n/a"
        ax.annotate(f"{text}   {_fmt(pv, 'p')}   {_fmt(qv, 'q')}", xy=(1.02, y),
                    xycoords=("axes fraction", "data"), va="center", fontsize=7)
    if not n:
        ax.text(0.5, 0.5, "no features", transform=ax.transAxes, ha="center", color="grey")
    ax.set_xlabel(f"{label} (95% CI; log scale)")
    ax.set_title(title + (f" ({max_rows} smallest p of {len(table)})" if len(table) > max_rows else ""))
    return save_figure(fig, path)


def top_feature(table: pd.DataFrame, prefix: str = "niche_") -> str | None:
    """The feature of ``table`` starting with ``prefix`` with the smallest finite p (None when there is none)."""
    t = table[table["feature"].astype(str).str.startswith(prefix) & np.isfinite(pd.to_numeric(table["p"]))]
    return None if t.empty else str(t.sort_values("p", kind="stable")["feature"].iloc[0])


def km_top_feature(df: pd.DataFrame, feature: str, path: str | os.PathLike, time_col: str = "survival_months",
                   cens_col: str = "censorship", title: str = "") -> Path:
    """Kaplan-Meier of the patients of ``df`` (one row per patient) above vs at-or-below the median of ``feature``
    (ties at the median fall below; when that leaves a group empty, ``>=`` median is used), with the log-rank p
    and the number at risk (``mica.plots.km_plot``; ``cens_col`` 1 = censored)."""
    sub = df[[feature, time_col, cens_col]].apply(pd.to_numeric, errors="coerce").dropna()
    x = sub[feature].to_numpy(float)
    med = float(np.median(x)) if len(x) else float("nan")
    high = x > med
    if len(x) and (high.all() or not high.any()):
        high = x >= med
    return km_plot(sub[time_col].to_numpy(float), sub[cens_col].to_numpy(float), high, None, path,
                   title=title or f"{feature}: split at the median ({med:.3g})",
                   labels=(f"{feature} <= median", f"{feature} > median"))


def composition_heatmap(composition: pd.DataFrame, path: str | os.PathLike, title: str = "",
                        value_label: str = "fraction of the niche's units") -> Path:
    """Heatmap of ``composition`` (phenotypes x niches: each column the fraction of a niche's units per phenotype),
    values printed in the cells, columns labelled by niche with its map colour."""
    c = composition.astype(float)
    nr, nc = c.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * max(nc, 1), 1.0 + 0.35 * max(nr, 1)))
    im = ax.imshow(c.to_numpy(), aspect="auto", cmap="viridis", vmin=0.0,
                   vmax=max(float(np.nanmax(c.to_numpy())) if c.size else 1.0, 1e-9))
    ax.set_xticks(range(nc))
    ax.set_xticklabels([str(k) for k in c.columns], fontsize=8)
    ax.set_yticks(range(nr))
    ax.set_yticklabels([str(p) for p in c.index], fontsize=8)
    for j, k in enumerate(c.columns):
        try:
            ax.get_xticklabels()[j].set_color(np.array(niche_colour(int(str(k).removeprefix("niche_")))) / 255)
        except ValueError:
            pass
    vmax = float(np.nanmax(c.to_numpy())) if c.size else 1.0
    for i in range(nr):
        for j in range(nc):
            v = c.iat[i, j]
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="black" if v > 0.6 * vmax else "white")
    ax.set_xlabel("niche")
    fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02, label=value_label)
    ax.set_title(title)
    return save_figure(fig, path)


def niche_map(path: str | os.PathLike, x_px: np.ndarray, y_px: np.ndarray, niche: np.ndarray,
              thumbnail: np.ndarray | None = None, downsample: float = 1.0, n_niches: int | None = None,
              title: str = "", max_points: int = 300_000, seed: int = 0) -> Path:
    """PNG of a slide's units as dots coloured by niche (:func:`spatial.export.niche_colour`) over its H&E.

    Args:
        x_px, y_px: (N,) unit centroids in level-0 px. niche: (N,) int niche ids (-1: none, grey).
        thumbnail: (h, w, 3) uint8 RGB of the slide, ``downsample`` level-0 px per thumbnail px; None draws the
            dots on white in level-0 px / ``downsample``.
        n_niches: the cohort's number of niches (the legend lists niches 0..n-1 so every slide's legend is the
            same); None lists those present.
        max_points: at most this many dots are drawn (a seeded random subset), so a million-cell slide stays fast.
    """
    x = np.asarray(x_px, float) / float(downsample)
    y = np.asarray(y_px, float) / float(downsample)
    k = np.asarray(niche).astype(int)
    if len(k) > max_points:
        idx = np.sort(np.random.default_rng(seed).choice(len(k), max_points, replace=False))
        x, y, k = x[idx], y[idx], k[idx]
    if thumbnail is not None:
        h, w = thumbnail.shape[:2]
    else:
        w = int(np.ceil(x.max())) + 1 if len(x) else 1
        h = int(np.ceil(y.max())) + 1 if len(y) else 1
    scale = 8.0 / max(h, w)
    fig, ax = plt.subplots(figsize=(max(w * scale, 2.0) + 1.8, max(h * scale, 2.0)))
    if thumbnail is not None:
        ax.imshow(thumbnail, interpolation="nearest")
    # dot area in points^2: about a unit's footprint at thumbnail scale, bounded to stay visible
    size = float(np.clip(2e5 / max(len(k), 1), 0.3, 12.0))
    colours = np.array([niche_colour(v) for v in range(max(int(k.max(initial=-1)) + 1, 0))] + [(160, 160, 160)],
                       float) / 255
    ax.scatter(x, y, s=size, c=colours[np.where(k < 0, -1, k)], linewidths=0, alpha=0.8)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    shown = range(n_niches) if n_niches is not None else sorted(set(k[k >= 0].tolist()))
    handles = [matplotlib.lines.Line2D([], [], ls="", marker="o", ms=6, color=np.array(niche_colour(v)) / 255,
                                       label=f"niche {v}") for v in shown]
    if (k < 0).any():
        handles.append(matplotlib.lines.Line2D([], [], ls="", marker="o", ms=6, color="#a0a0a0", label="none"))
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)
