"""Niche features -> outcome (``spatial.outcome``) and its figures (``spatial.figures``).

A simulated cohort where one feature drives the hazard (and the odds of response) and another does not: the driver
comes out with HR (OR) > 1 and q < 0.05, the null one does not; HR per SD equals lifelines' HR per unit raised to
the SD; the logistic Wald statistics equal a hand IRLS fit; BH q values equal a hand example; patient features are
cell-weighted means of the slide fractions; folds give the same tables on their patients.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from spatial import figures, outcome


def _cohort(n: int = 300, seed: int = 0) -> pd.DataFrame:
    """Per-patient table: niche_0 drives hazard and response, niche_1 is noise, niche_2 is constant."""
    rng = np.random.default_rng(seed)
    drive = rng.beta(2, 5, n)                  # a fraction
    z = (drive - drive.mean()) / drive.std()
    t_event = rng.exponential(30 * np.exp(-0.8 * z))
    t_cens = rng.uniform(5, 80, n)
    resp = (rng.random(n) < 1 / (1 + np.exp(-(0.2 + 1.0 * z)))).astype(int)
    return pd.DataFrame({"niche_0": drive, "niche_1": rng.beta(2, 5, n), "niche_2": 0.25,
                         "survival_months": np.minimum(t_event, t_cens),
                         "censorship": (t_cens < t_event).astype(int), "response": resp},
                        index=pd.Index([f"case_{i:03d}" for i in range(n)], name="case_id"))


def test_bh_q_matches_a_hand_example_and_skips_nan() -> None:
    # sorted p 0.01, 0.03, 0.04, 0.20 (m = 4): p*m/rank = 0.04, 0.06, 0.0533, 0.20 -> running min from the top
    q = outcome.bh_q([0.01, 0.04, np.nan, 0.03, 0.20])
    np.testing.assert_allclose(q, [0.04, 0.16 / 3, np.nan, 0.16 / 3, 0.20], rtol=1e-12)


def test_univariable_cox_finds_the_driver_and_not_the_null() -> None:
    from lifelines import CoxPHFitter

    df = _cohort()
    t = outcome.univariable_cox(df, ["niche_0", "niche_1", "niche_2"]).set_index("feature")
    assert list(t.columns) == list(outcome.COX_COLUMNS[1:])
    assert t.loc["niche_0", "hr_per_sd"] > 1.5 and t.loc["niche_0", "q"] < 0.05
    assert 1 < t.loc["niche_0", "lo"] < t.loc["niche_0", "hr_per_sd"] < t.loc["niche_0", "hi"]
    assert t.loc["niche_1", "p"] > 0.05 and t.loc["niche_1", "lo"] < 1 < t.loc["niche_1", "hi"]
    assert np.isnan(t.loc["niche_2", ["hr_per_sd", "p", "q"]].astype(float)).all()    # constant: not tested
    np.testing.assert_allclose(t["q"].iloc[:2], outcome.bh_q(t["p"].iloc[:2]))          # q over the 2 tested only
    assert t.loc["niche_0", "n"] == len(df) and t.loc["niche_0", "events"] == int((df["censorship"] == 0).sum())
    # lifelines on the raw feature: HR per unit ** SD == HR per SD, same Wald p (scale-invariant)
    raw = CoxPHFitter().fit(df[["niche_0", "survival_months"]].assign(e=1 - df["censorship"]),
                            duration_col="survival_months", event_col="e").summary.loc["niche_0"]
    sd = df["niche_0"].std(ddof=1)
    assert t.loc["niche_0", "sd"] == pytest.approx(sd)
    assert t.loc["niche_0", "hr_per_sd"] == pytest.approx(np.exp(raw["coef"] * sd), rel=1e-4)
    assert t.loc["niche_0", "p"] == pytest.approx(raw["p"], rel=1e-3)


def _irls(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Slope and its Wald SE of logit(y) ~ 1 + x by Newton-Raphson (the textbook fit, independent of sklearn)."""
    X = np.column_stack([np.ones_like(x), x])
    b = np.zeros(2)
    for _ in range(50):
        p = 1 / (1 + np.exp(-X @ b))
        info = X.T @ (X * (p * (1 - p))[:, None])
        b = b + np.linalg.solve(info, X.T @ (y - p))
    return float(b[1]), float(np.sqrt(np.linalg.inv(info)[1, 1]))


def test_response_association_matches_irls_and_mann_whitney() -> None:
    df = _cohort()
    t = outcome.response_association(df, ["niche_0", "niche_1", "niche_2"]).set_index("feature")
    assert list(t.columns) == list(outcome.RESPONSE_COLUMNS[1:])
    x, y = df["niche_0"].to_numpy(), df["response"].to_numpy()
    b, se = _irls((x - x.mean()) / x.std(ddof=1), y)
    assert t.loc["niche_0", "or_per_sd"] == pytest.approx(np.exp(b), rel=1e-4)
    assert t.loc["niche_0", "lo"] == pytest.approx(np.exp(b - 1.959964 * se), rel=1e-4)
    assert t.loc["niche_0", "p"] == pytest.approx(2 * stats.norm.sf(abs(b) / se), rel=1e-3)
    assert t.loc["niche_0", "or_per_sd"] > 1.5 and t.loc["niche_0", "q"] < 0.05 and t.loc["niche_0", "mw_q"] < 0.05
    u = stats.mannwhitneyu(x[y == 1], x[y == 0]).statistic
    assert t.loc["niche_0", "auc"] == pytest.approx(u / ((y == 1).sum() * (y == 0).sum()))
    assert t.loc["niche_0", "auc"] > 0.6 and t.loc["niche_0", "n_pos"] == y.sum()
    assert t.loc["niche_1", "p"] > 0.05 and t.loc["niche_1", "mw_p"] > 0.05
    assert np.isnan(t.loc["niche_2", ["or_per_sd", "p", "q", "mw_p", "auc"]].astype(float)).all()


def test_separation_gives_nan_not_a_huge_odds_ratio() -> None:
    df = pd.DataFrame({"f": np.arange(20.0), "response": [0] * 10 + [1] * 10})
    t = outcome.response_association(df, ["f"])
    assert np.isnan(t.loc[0, "or_per_sd"]) and t.loc[0, "auc"] == 1.0 and t.loc[0, "mw_p"] < 0.001


def test_patient_features_weight_fractions_by_cells_and_average_z() -> None:
    frac = pd.DataFrame({"niche_0": [0.2, 0.6, 1.0, 0.5], "niche_1": [0.8, 0.4, 0.0, 0.5]},
                        index=["s1", "s2", "s3", "s_orphan"])
    coloc = pd.DataFrame({"coloc_T__T": [1.0, 3.0, np.nan]}, index=["s1", "s2", "s3"])
    out = outcome.patient_features(frac, coloc, {"s1": "A", "s2": "A", "s3": "B"},
                                   weights={"s1": 100, "s2": 300, "s3": 50, "s_orphan": 10})
    assert list(out.index) == ["A", "B"] and out.index.name == "case_id"
    assert out.loc["A", "niche_0"] == pytest.approx((0.2 * 100 + 0.6 * 300) / 400)      # cell-weighted
    np.testing.assert_allclose(out[["niche_0", "niche_1"]].sum(axis=1), 1.0)
    assert out.loc["A", "coloc_T__T"] == pytest.approx(2.0) and np.isnan(out.loc["B", "coloc_T__T"])
    assert out.loc["A", "n_slides"] == 2 and out.loc["A", "n_units"] == 400
    assert outcome.feature_columns(out) == ["niche_0", "niche_1", "coloc_T__T"]
    eq = outcome.patient_features(frac, None, {"s1": "A", "s2": "A"})                     # unweighted
    assert eq.loc["A", "niche_0"] == pytest.approx(0.4) and "coloc_T__T" not in eq


def test_by_fold_stacks_the_cohort_and_each_fold(tmp_path: Path) -> None:
    df = _cohort(120)
    slides = {f"slide_{c}": c for c in df.index}
    (tmp_path / "splits_0.csv").write_text("train,val\n" + "\n".join(
        f"{a},{b}" for a, b in zip(list(slides)[:60], list(slides)[60:])) + "\n")
    folds = outcome.fold_cases([tmp_path / "splits_0.csv"], slides)
    assert list(folds) == ["fold 0"] and folds["fold 0"] == list(df.index[60:])
    t = outcome.by_fold(df, ["niche_0", "niche_1"], folds, outcome.univariable_cox)
    assert list(t.columns)[0] == "fold" and list(t["fold"]) == ["all", "all", "fold 0", "fold 0"]
    sub = outcome.univariable_cox(df.iloc[60:], ["niche_0", "niche_1"])
    pd.testing.assert_frame_equal(t[t["fold"] == "fold 0"].drop(columns="fold").reset_index(drop=True), sub)


def _png(path: Path) -> None:
    assert path.is_file() and not list(path.parent.glob("*.tmp*"))
    assert matplotlib.image.imread(path).shape[0] > 100


def test_figures_write_pngs(tmp_path: Path) -> None:
    df = _cohort(150)
    cox = outcome.univariable_cox(df, ["niche_0", "niche_1", "niche_2"])
    _png(figures.forest_plot(cox, tmp_path / "forest.png", title="survival"))
    _png(figures.forest_plot(outcome.response_association(df, ["niche_0", "niche_1"]), tmp_path / "or.png"))
    assert figures.top_feature(cox) == "niche_0"


def test_km_and_composition_figures(tmp_path: Path) -> None:
    df = _cohort(150)
    _png(figures.km_top_feature(df, "niche_0", tmp_path / "km.png"))
    comp = pd.DataFrame(np.random.default_rng(0).dirichlet(np.ones(4), 3).T, index=["T", "B", "TAM", "tumour"],
                        columns=[f"niche_{k}" for k in range(3)])
    _png(figures.composition_heatmap(comp, tmp_path / "comp.png"))
