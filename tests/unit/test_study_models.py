"""The clinical models of the outcome study (``mica.baselines``: CovariateCoder, ClinicalCox, ClinicalLogistic,
default_covariates) and the multivariable Cox (``mica.study.cox``), checked against lifelines / sklearn fitted
directly on the same data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter
from lifelines.statistics import proportional_hazard_test
from sklearn.linear_model import LogisticRegression

from mica.baselines import (
    ClinicalCox,
    ClinicalLogistic,
    CovariateCoder,
    cox_cindex,
    default_covariates,
    logistic_auc,
    prepare_covariates,
)
from mica.study.cox import multivariable_cox
from mica.survival import c_index
from pipeline.errors import PipelineError


def _cohort(n: int = 300, seed: int = 0) -> pd.DataFrame:
    """Age, stage (numbers 1-4), histology (text with a missing value), a noise column, survival and response."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"age": rng.normal(65, 10, n), "stage": rng.integers(1, 5, n),
                       "hist": rng.choice(["adeno", "squam", "large"], n), "noise": rng.normal(size=n)})
    df.loc[3, "age"] = np.nan
    df.loc[5, "hist"] = None
    lin = 0.04 * (df["age"].fillna(65) - 65) + 0.5 * df["stage"] + 0.6 * (df["hist"] == "squam")
    df["survival_months"] = rng.exponential(30 * np.exp(-(lin - lin.mean())))
    df["censorship"] = (rng.random(n) < 0.3).astype(float)
    df["response"] = (rng.random(n) < 1 / (1 + np.exp(-(lin - lin.mean())))).astype(int)
    return df


def _old_prepare_covariates(tr: pd.DataFrame, va: pd.DataFrame, covariates: list[str]):
    """The pre-CovariateCoder ``prepare_covariates`` (train/val in one call), kept here as the reference."""
    tr_cols, va_cols, names = [], [], []
    for col in covariates:
        both = pd.concat([tr[col], va[col]], ignore_index=True)
        num = pd.to_numeric(both, errors="coerce")
        if num.notna().sum() == both.notna().sum():
            a, b = num.iloc[:len(tr)].to_numpy(float), num.iloc[len(tr):].to_numpy(float)
            med = np.nanmedian(a)
            tr_cols.append(np.where(np.isnan(a), med, a))
            va_cols.append(np.where(np.isnan(b), med, b))
            names.append(col)
            continue
        ct = tr[col].astype(object).where(tr[col].notna(), "missing").astype(str)
        cv = va[col].astype(object).where(va[col].notna(), "missing").astype(str)
        for level in sorted(ct.unique())[1:]:
            tr_cols.append((ct == level).to_numpy(float))
            va_cols.append((cv == level).to_numpy(float))
            names.append(f"{col}={level}")
    x_tr, x_va = np.stack(tr_cols, 1), np.stack(va_cols, 1)
    mean, sd = x_tr.mean(0), x_tr.std(0)
    keep = sd > 1e-12
    return (x_tr[:, keep] - mean[keep]) / sd[keep], (x_va[:, keep] - mean[keep]) / sd[keep], \
        [n for n, k in zip(names, keep) if k]


COVS = ["age", "stage", "hist", "noise"]


def test_coder_fitted_on_train_transforms_val_like_the_old_prepare_covariates() -> None:
    df = _cohort()
    tr, va = df.iloc[:200].reset_index(drop=True), df.iloc[200:].reset_index(drop=True).copy()
    va.loc[0, "hist"] = "small cell"        # unseen category -> all indicators 0 (= the reference level)
    va.loc[1, "age"] = np.nan               # missing numeric -> training median
    va.loc[2, "hist"] = None                # missing category -> the training level "missing"
    coder = CovariateCoder.fit(tr, COVS)
    ref_tr, ref_va, ref_names = _old_prepare_covariates(tr, va, COVS)
    assert coder.names == ref_names == ["age", "stage", "hist=large", "hist=missing", "hist=squam", "noise"]
    np.testing.assert_allclose(coder.transform(tr), ref_tr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(coder.transform(va), ref_va, rtol=0, atol=1e-12)
    x_va = coder.transform(va)
    ind = [coder.names.index(n) for n in ("hist=large", "hist=missing", "hist=squam")]
    np.testing.assert_allclose(x_va[0, ind] * coder.sd[ind] + coder.mean[ind], 0, atol=1e-12)
    assert x_va[1, 0] * coder.sd[0] + coder.mean[0] == pytest.approx(np.nanmedian(tr["age"]))
    assert x_va[2, coder.names.index("hist=missing")] * coder.sd[ind[1]] + coder.mean[ind[1]] == pytest.approx(1)
    # row by row = as a batch (a later cohort is coded patient by patient, whatever else it holds)
    np.testing.assert_allclose(np.concatenate([coder.transform(va.iloc[[i]]) for i in range(5)]), x_va[:5])
    # the functional form is the coder
    a, b, names = prepare_covariates(tr, va, COVS)
    np.testing.assert_array_equal(a, coder.transform(tr))
    np.testing.assert_array_equal(b, x_va)
    # scale="numeric": indicators stay 0/1, numeric columns standardised
    x = CovariateCoder.fit(tr, COVS, scale="numeric").transform(tr)
    assert set(np.unique(x[:, ind])) == {0.0, 1.0}
    assert x[:, 0].mean() == pytest.approx(0, abs=1e-12) and x[:, 0].std() == pytest.approx(1)
    with pytest.raises(PipelineError, match=r"\['hist'\] not in the clinical table"):
        coder.transform(va.drop(columns="hist"))
    with pytest.raises(PipelineError, match="constant"):
        CovariateCoder.fit(tr.assign(site="A"), ["site"])


def test_clinical_cox_risk_equals_lifelines_and_cox_cindex() -> None:
    df = _cohort()
    tr, va = df.iloc[:200].reset_index(drop=True), df.iloc[200:].reset_index(drop=True)
    model = ClinicalCox.fit(tr, COVS)
    assert model.names == ["age", "stage", "hist=large", "hist=missing", "hist=squam", "noise"]
    # lifelines on the design made independently (the reference coding above)
    x_tr, x_va, names = _old_prepare_covariates(tr, va, COVS)
    cph = CoxPHFitter(penalizer=0.01).fit(pd.DataFrame(x_tr, columns=names).assign(T=tr.survival_months,
                                                                                 E=1 - tr.censorship), "T", "E")
    risk = model.risk(va)
    assert risk.shape == (len(va),)
    np.testing.assert_allclose(risk, x_va @ cph.params_.loc[names].to_numpy(), rtol=0, atol=1e-8)
    np.testing.assert_allclose(model.model.params_.loc[names].to_numpy(), cph.params_.loc[names].to_numpy(),
                               atol=1e-8)
    risk2, ci = cox_cindex(tr, va, COVS)
    np.testing.assert_array_equal(risk2, risk)
    assert ci == pytest.approx(c_index(va.survival_months, va.censorship, risk)) and ci > 0.65
    with pytest.raises(PipelineError, match="no events"):
        ClinicalCox.fit(tr.assign(censorship=1.0), COVS)


def test_survival_at_is_a_survival_curve_and_matches_lifelines() -> None:
    df = _cohort()
    tr, va = df.iloc[:200].reset_index(drop=True), df.iloc[200:].reset_index(drop=True)
    model = ClinicalCox.fit(tr, COVS)
    times = np.linspace(0, 1.2 * tr.survival_months.max(), 40)
    s = model.survival_at(va, times)
    assert s.shape == (len(va), 40)
    assert ((s >= 0) & (s <= 1)).all() and (np.diff(s, axis=1) <= 1e-15).all()
    assert (s[:, 0] == 1).all()                                   # time 0 is before every training time
    order = np.argsort(model.risk(va))                            # higher risk -> lower survival at every time
    assert (np.diff(s[order], axis=0) <= 1e-12).all()
    # at the training times (the knots of the Breslow step function) it is lifelines' predict_survival_function
    knots = model.model.baseline_cumulative_hazard_.index.to_numpy(float)[::7]
    ll = model.model.predict_survival_function(model.coder.frame(va), times=knots).to_numpy().T
    np.testing.assert_allclose(model.survival_at(va, knots), ll, rtol=1e-10, atol=1e-12)
    # times in any order: columns follow the order asked for
    np.testing.assert_array_equal(model.survival_at(va, times[::-1]), s[:, ::-1])


def test_combined_model_with_a_model_risk_as_covariate() -> None:
    df = _cohort(400, seed=3)
    rng = np.random.default_rng(1)
    hidden = rng.normal(size=len(df))                 # what the images see and the clinical table does not
    df["survival_months"] = df["survival_months"] * np.exp(-1.5 * hidden)
    df["mica_risk"] = 1.5 * hidden + rng.normal(scale=0.3, size=len(df))
    tr, va = df.iloc[:300].reset_index(drop=True), df.iloc[300:].reset_index(drop=True)
    clinical = ClinicalCox.fit(tr.drop(columns="mica_risk"), COVS)
    combined = ClinicalCox.fit(tr.assign(mica_risk=tr["mica_risk"].to_numpy()), [*COVS, "mica_risk"])
    assert combined.names[-1] == "mica_risk"
    coef = combined.model.params_
    assert coef["mica_risk"] > 3 * abs(coef["noise"]) and coef["mica_risk"] > 0.8
    c_clin = c_index(va.survival_months, va.censorship, clinical.risk(va))
    c_comb = c_index(va.survival_months, va.censorship, combined.risk(va))
    assert c_comb > c_clin + 0.1, (c_comb, c_clin)
    # the same numbers as lifelines on the design with the risk as one more standardised column
    x = combined.coder.frame(tr).assign(T=tr.survival_months, E=1 - tr.censorship)
    ref = CoxPHFitter(penalizer=0.01).fit(x, "T", "E")
    np.testing.assert_allclose(combined.risk(va), ref.predict_log_partial_hazard(combined.coder.frame(va)),
                               atol=1e-8)


def test_clinical_logistic_equals_sklearn_and_logistic_auc() -> None:
    df = _cohort()
    tr, va = df.iloc[:200].reset_index(drop=True), df.iloc[200:].reset_index(drop=True)
    model = ClinicalLogistic.fit(tr, COVS)
    x_tr, x_va, _ = _old_prepare_covariates(tr, va, COVS)
    ref = LogisticRegression(C=1.0, max_iter=2000).fit(x_tr, tr.response).predict_proba(x_va)[:, 1]
    prob = model.prob(va)
    assert prob.shape == (len(va),) and ((prob > 0) & (prob < 1)).all()
    np.testing.assert_allclose(prob, ref, atol=1e-10)
    prob2, auc = logistic_auc(tr, va, COVS)
    np.testing.assert_array_equal(prob2, prob)
    assert auc > 0.6
    one = ClinicalLogistic.fit(tr.assign(response=1), COVS)          # one class: its rate
    np.testing.assert_array_equal(one.prob(va), np.ones(len(va)))
    with pytest.raises(PipelineError, match="0/1"):
        ClinicalLogistic.fit(tr.assign(response=2), COVS)


def test_default_covariates_keeps_clinical_columns_only() -> None:
    rng = np.random.default_rng(0)
    n = 40
    df = pd.DataFrame({"case_id": [f"p{i}" for i in range(n)], "slide_id": [f"s{i}" for i in range(n)],
                       "survival_months": rng.exponential(20, n), "censorship": rng.integers(0, 2, n),
                       "response": rng.integers(0, 2, n), "age": rng.normal(60, 9, n), "stage": rng.integers(1, 5, n),
                       "site_id": rng.integers(0, 3, n), "hist": rng.choice(["adeno", "squam"], n),
                       "notes": [f"free text {i}" for i in range(n)],
                       "pack_years": rng.normal(30, 10, n)})
    assert default_covariates(df) == ["age", "stage", "hist", "pack_years"]
    # <= 20 distinct text values is a category, not free text
    assert "notes" in default_covariates(df.assign(notes=[f"t{i % 20}" for i in range(n)]))
    ids = df[["case_id", "slide_id", "survival_months", "censorship", "response", "site_id", "notes"]]
    ids.attrs["path"] = "/data/cohort/clinical.csv"
    with pytest.raises(PipelineError, match="/data/cohort/clinical.csv: no clinical covariate"):
        default_covariates(ids)


def _surv(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"risk": rng.normal(2, 3, n), "noise": rng.normal(50, 10, n),
                       "stage": rng.choice(["I", "II", "III"], n)})
    df["survival_months"] = rng.exponential(12 * np.exp(-0.4 * df["risk"]))
    df["censorship"] = (rng.random(n) < 0.25).astype(float)
    return df


def test_multivariable_cox_equals_lifelines() -> None:
    df = _surv(250, 0)
    df.loc[[4, 9], "noise"] = np.nan                 # complete cases: these two patients are dropped
    table, global_p = multivariable_cox(df, "risk", ["noise", "stage"])
    assert list(table.columns) == ["covariate", "hr", "lo", "hi", "p", "ph_p"]
    assert list(table["covariate"]) == ["risk", "noise", "stage=II", "stage=III"]
    d = df.dropna().reset_index(drop=True)
    x = pd.DataFrame({"risk": (d.risk - d.risk.mean()) / d.risk.std(ddof=0),
                      "noise": (d.noise - d.noise.mean()) / d.noise.std(ddof=0),
                      "stage=II": (d.stage == "II").astype(float), "stage=III": (d.stage == "III").astype(float),
                      "T": d.survival_months, "E": 1 - d.censorship})
    cph = CoxPHFitter().fit(x, "T", "E")
    s = cph.summary.loc[table["covariate"]]
    np.testing.assert_allclose(table["hr"], s["exp(coef)"], rtol=1e-8)
    np.testing.assert_allclose(table["lo"], s["exp(coef) lower 95%"], rtol=1e-8)
    np.testing.assert_allclose(table["hi"], s["exp(coef) upper 95%"], rtol=1e-8)
    np.testing.assert_allclose(table["p"], s["p"], rtol=1e-6)
    ph = proportional_hazard_test(cph, x, time_transform="rank").summary.loc[table["covariate"], "p"]
    np.testing.assert_allclose(table["ph_p"], ph, rtol=1e-6)
    assert 0 < global_p <= 1
    # one coefficient: the global test is the covariate's own test
    one, gp = multivariable_cox(df, "risk", [])
    assert gp == pytest.approx(float(one["ph_p"].iloc[0]), rel=1e-9)


def test_multivariable_cox_strong_risk_noise_and_a_ph_violation() -> None:
    df = _surv(300, 1)
    table = multivariable_cox(df, "risk", ["noise", "stage"])[0].set_index("covariate")
    assert table.at["risk", "hr"] > 2.5 and table.at["risk", "p"] < 1e-3      # 0.4 per unit x sd 3 = HR ~3.3
    assert table.at["risk", "lo"] > 1
    assert table.at["noise", "p"] > 0.01 and table.at["noise", "lo"] < 1 < table.at["noise", "hi"]
    assert table.at["risk", "ph_p"] > 0.01                                     # the risk acts proportionally
    # crossing hazards (Weibull shape 0.5 vs 2 by group): the Schoenfeld tests see it
    rng = np.random.default_rng(2)
    g = rng.integers(0, 2, 400)
    t = np.where(g == 1, rng.weibull(0.5, 400), rng.weibull(2.0, 400)) * 10
    bad = pd.DataFrame({"risk": g + rng.normal(scale=0.1, size=400), "noise": rng.normal(size=400),
                        "survival_months": t, "censorship": 0.0})
    table, global_p = multivariable_cox(bad, "risk", ["noise"])
    assert table.set_index("covariate").at["risk", "ph_p"] < 1e-3 and global_p < 1e-3
    with pytest.raises(PipelineError, match="'grade' not in the table"):
        multivariable_cox(df, "risk", ["grade"])
    with pytest.raises(PipelineError, match="event"):
        multivariable_cox(df.assign(censorship=1.0), "risk", ["noise"])
