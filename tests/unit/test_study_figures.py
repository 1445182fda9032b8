"""The outcome study's figures (``mica.plots``): each writes a readable PNG, degenerate inputs (an empty group, one
class, no finite CI) draw instead of raising, and the ROC band's numbers are what they claim. No pixel checks."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from mica import plots


def _png(path: Path) -> tuple[int, ...]:
    assert path.is_file() and not list(path.parent.glob("*.tmp*"))          # written atomically, nothing left over
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    return img.shape


def _survival(n: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    risk = rng.normal(size=n)
    return rng.exponential(24 * np.exp(-risk)), (rng.random(n) < 0.3).astype(float), risk


def test_km_plot_with_bands_and_at_risk_table(tmp_path: Path) -> None:
    t, c, risk = _survival()
    high = risk > np.median(risk)
    full = _png(plots.km_plot(t, c, high, 0.003, tmp_path / "km.png", title="risk groups"))
    bare = _png(plots.km_plot(t, c, high, 0.003, tmp_path / "km_bare.png", title="risk groups", at_risk=False))
    assert full[0] > bare[0]                                    # the number-at-risk table adds rows under the axis
    _png(plots.km_plot(t, c, high, None, tmp_path / "km_p.png", time_unit="days"))   # p computed by lifelines
    # degenerate: one group empty, NaN p, everybody censored
    _png(plots.km_plot(t, c, np.zeros(t.size, bool), float("nan"), tmp_path / "km_one.png"))
    _png(plots.km_plot(t, np.ones(t.size), high, None, tmp_path / "km_cens.png"))


def test_forest_plot(tmp_path: Path) -> None:
    table = pd.DataFrame({"covariate": ["risk", "age", "stage=II", "stage=III"], "hr": [2.4, 1.02, 0.9, 1.3],
                          "lo": [1.8, 0.9, 0.6, 0.8], "hi": [3.1, 1.15, 1.35, 2.1], "p": [1e-6, 0.7, 0.6, 0.3]})
    _png(plots.forest_plot(table, tmp_path / "forest.png", title="multivariable Cox"))
    bad = table.assign(hr=[np.inf, 1.0, np.nan, 1.3], hi=[np.inf, 1.1, np.nan, 2.1])
    _png(plots.forest_plot(bad, tmp_path / "forest_bad.png"))
    _png(plots.forest_plot(table.iloc[:0], tmp_path / "forest_empty.png"))


def test_roc_band_numbers() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(150) < 0.4).astype(int)
    s = y + rng.normal(size=150)
    # B copies of the cohort itself: a band of zero width on the curve, interpolated on the FPR grid
    lo, hi, aucs, tpr = plots.roc_band(y, s, np.tile(np.arange(150), (5, 1)))
    fpr, tpr_full, _ = roc_curve(y, s)
    np.testing.assert_allclose(lo, hi)
    np.testing.assert_allclose(lo[1:], np.interp(plots.FPR_GRID, fpr, tpr_full)[1:])
    assert lo[0] == 0 and aucs.shape == (5,) and tpr.shape == (5, plots.FPR_GRID.size)
    idx = rng.integers(0, 150, (200, 150))
    lo, hi, aucs, tpr = plots.roc_band(y, s, idx)
    assert (lo <= hi).all() and (lo >= 0).all() and (hi <= 1).all() and (np.diff(lo) >= -1e-12).all()
    assert (hi - lo)[10:90].mean() > 0.05                       # a real band on real resamples
    full_auc = roc_auc_score(y, s)
    assert np.percentile(aucs, 2.5) < full_auc < np.percentile(aucs, 97.5)
    np.testing.assert_allclose(aucs[:3], [roc_auc_score(y[r], s[r]) for r in idx[:3]])
    # a resample holding one class is skipped; none with both classes: empty band
    idx1 = np.vstack([np.flatnonzero(y == 1)[np.zeros(150, int)], idx[0]])
    assert plots.roc_band(y, s, idx1)[2].shape == (1,)
    assert plots.roc_band(y, s, idx1[:1])[0].size == 0


def test_roc_band_plot(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    y = (rng.random(100) < 0.5).astype(int)
    s = y + rng.normal(size=100)
    idx = rng.integers(0, 100, (100, 100))
    _png(plots.roc_band_plot(y, s, idx, tmp_path / "roc.png", title="response"))
    _png(plots.roc_band_plot(np.ones(100), s, idx, tmp_path / "roc_one.png"))          # one class
    _png(plots.roc_band_plot(y, s, np.zeros((3, 100), int), tmp_path / "roc_noband.png"))  # no usable resample


@pytest.mark.parametrize("metric", ["c_harrell", "ibs"])
def test_comparison_plot(tmp_path: Path, metric: str) -> None:
    report = pd.DataFrame({"row": ["coattn", "path", "clinical", "coattn+clinical", "coattn", "clinical"],
                           "metric": ["c_harrell"] * 4 + ["ibs"] * 2,
                           "value": [0.74, 0.70, 0.61, 0.76, 0.15, np.nan],
                           "lo": [0.70, 0.65, 0.55, 0.72, 0.12, np.nan],
                           "hi": [0.78, 0.75, 0.67, 0.80, 0.18, np.nan]})
    _png(plots.comparison_plot(report, metric, tmp_path / f"compare_{metric}.png", title=metric))
    _png(plots.comparison_plot(report, "auc", tmp_path / "compare_none.png"))        # no rows for the metric
    assert plots._chance_level("c_harrell") == plots._chance_level("auc") == 0.5
    assert plots._chance_level("ibs") is None and plots._chance_level("brier") is None


def test_calibration_plot(tmp_path: Path) -> None:
    table = pd.DataFrame({"bin": range(5), "mean_predicted": [0.1, 0.3, 0.5, 0.7, 0.9],
                          "fraction_positive": [0.12, 0.35, 0.45, 0.72, 0.88], "n": [12, 30, 25, 20, 13]})
    _png(plots.calibration_plot(table, tmp_path / "cal.png", title="calibration"))
    empty_bins = table.assign(n=[0, 30, 0, 20, 0], fraction_positive=[np.nan, 0.35, np.nan, 0.72, np.nan])
    _png(plots.calibration_plot(empty_bins, tmp_path / "cal_gaps.png"))
    _png(plots.calibration_plot(table.iloc[:0], tmp_path / "cal_empty.png"))
