"""Per-marker regression metrics (float64, NaN where a marker is constant) and summary tables."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.stats import rankdata


def pearson(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Pearson r per column of (N,M) truth ``y`` and prediction ``p`` -> (M,); NaN for a constant column or N < 2."""
    y = np.asarray(y, np.float64)
    p = np.asarray(p, np.float64)
    if y.shape[0] < 2:
        return np.full(y.shape[1], np.nan)
    yc = y - y.mean(axis=0)
    pc = p - p.mean(axis=0)
    den = np.sqrt((yc * yc).sum(axis=0) * (pc * pc).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (yc * pc).sum(axis=0) / den
    # a constant column has no correlation; its centred values are rounding noise, not a signal
    const = (np.ptp(y, axis=0) == 0) | (np.ptp(p, axis=0) == 0)
    r[~(den > 1e-24) | const] = np.nan
    return np.clip(r, -1.0, 1.0)


def spearman(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Spearman rank correlation per column (average ranks for ties) -> (M,)."""
    y = np.asarray(y, np.float64)
    p = np.asarray(p, np.float64)
    if y.shape[0] < 2:
        return np.full(y.shape[1], np.nan)
    return pearson(rankdata(y, axis=0), rankdata(p, axis=0))


def mse(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Mean squared error per column -> (M,)."""
    d = np.asarray(p, np.float64) - np.asarray(y, np.float64)
    return (d * d).mean(axis=0) if len(d) else np.full(d.shape[1], np.nan)


def marker_table(y: np.ndarray, p: np.ndarray, markers: Sequence[str],
                 visible: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per marker (``marker, pearson, spearman, mse, n`` [+ ``visible``]) then summary rows.

    Summary rows: ``mean`` and ``median`` over markers (NaN-aware), and with ``visible`` also ``mean_visible`` and
    ``mean_invisible``.
    """
    df = pd.DataFrame({"marker": list(markers), "pearson": pearson(y, p), "spearman": spearman(y, p),
                       "mse": mse(y, p), "n": len(y)})
    rows = [{"marker": "mean", **{c: np.nanmean(df[c]) if df[c].notna().any() else np.nan
                                  for c in ("pearson", "spearman", "mse")}, "n": len(y)},
            {"marker": "median", **{c: np.nanmedian(df[c]) if df[c].notna().any() else np.nan
                                    for c in ("pearson", "spearman", "mse")}, "n": len(y)}]
    if visible is not None:
        vis = set(visible)
        df["visible"] = df["marker"].isin(vis)
        for name, sel in (("mean_visible", df["visible"]), ("mean_invisible", ~df["visible"])):
            sub = df[sel]
            rows.append({"marker": name, **{c: np.nanmean(sub[c]) if sub[c].notna().any() else np.nan
                                            for c in ("pearson", "spearman", "mse")}, "n": len(y)})
    return pd.concat([df, pd.DataFrame(rows)], ignore_index=True)


def slide_table(y: np.ndarray, p: np.ndarray, slides: np.ndarray, markers: Sequence[str]) -> pd.DataFrame:
    """Per-slide Pearson r: one row per slide (``slide, n, <marker>..., mean``)."""
    out = []
    for s in pd.unique(slides):
        sel = slides == s
        r = pearson(y[sel], p[sel])
        out.append({"slide": s, "n": int(sel.sum()), **dict(zip(markers, r)),
                    "mean": float(np.nanmean(r)) if np.isfinite(r).any() else np.nan})
    return pd.DataFrame(out)
