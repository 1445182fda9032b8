"""Multivariable Cox of a model's risk with the clinical covariates: is the risk prognostic beyond them?

``multivariable_cox(df, "risk", ["age", "stage"])`` fits lifelines' ``CoxPHFitter`` on the evaluation cohort itself
(one row per patient, complete cases) and returns the table an outcome paper prints: hazard ratio per SD of each
numeric covariate (and of the risk) or per category against the first level, its 95% Wald CI and p, and the
Schoenfeld-residual test of proportional hazards per covariate (lifelines ``proportional_hazard_test``, rank time
transform) plus its global version (Grambsch & Therneau's score test over all coefficients, the same statistic
computed from the same scaled residuals, chi-squared with P degrees of freedom).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from mica.baselines import CovariateCoder, survival_columns
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

TABLE_COLUMNS = ("covariate", "hr", "lo", "hi", "p", "ph_p")


def cox_design(df: pd.DataFrame, risk_col: str, covariates: Sequence[str]) -> pd.DataFrame:
    """The design (N,P) of :func:`multivariable_cox`: ``risk_col`` and numeric covariates standardised (mean 0,
    sd 1 on ``df``), categorical covariates as 0/1 indicators against their first level (sorted); columns
    constant on ``df`` dropped. Rows with a missing value in any used column must be removed before."""
    cols = [risk_col, *[c for c in covariates if c != risk_col]]
    return CovariateCoder.fit(df, cols, scale="numeric").frame(df)


def _global_ph_p(cph, scaled_resids: pd.DataFrame) -> float:
    """Global Schoenfeld test (Grambsch & Therneau 1994), rank time transform, from lifelines' scaled residuals.

    With g the demeaned ranks of the event times, d events, S (d,P) the scaled residuals and V (P,P) the
    coefficients' covariance: ``T = (g'S) V^-1 (g'S)' / (d * g'g)`` ~ chi2(P); for P = 1 it is lifelines' per-
    covariate statistic ``(g'S)^2 / (d * V * g'g)``.
    """
    from lifelines.statistics import TimeTransformers

    events, durations, weights = cph.event_observed, cph.durations, cph.weights   # lifelines' (sorted) order
    g = np.asarray(TimeTransformers().get("rank")(durations, events, weights), float)[events.to_numpy(bool)]
    g = g - g.mean()
    u = g @ scaled_resids.to_numpy(float)                           # (P,)
    v = cph.variance_matrix_.loc[scaled_resids.columns, scaled_resids.columns].to_numpy(float)
    stat = float(u @ np.linalg.solve(v, u)) / (float(events.sum()) * float(g @ g))
    return float(stats.chi2.sf(stat, df=len(u)))


def multivariable_cox(df: pd.DataFrame, risk_col: str, covariates: Sequence[str],
                      time_col: str = "survival_months", cens_col: str = "censorship",
                      penalizer: float = 0.0) -> tuple[pd.DataFrame, float]:
    """Cox PH of ``risk_col`` with ``covariates`` on ``df`` (one row per patient, ``cens_col`` 1 = censored).

    Complete cases only (rows missing a covariate or the risk are dropped, logged). Returns ``(table, global_ph_p)``:
    ``table`` has one row per design column (the risk first) with columns ``covariate, hr, lo, hi, p, ph_p`` —
    hazard ratio per SD (numeric) or vs the reference level (categorical, ``col=level``), its 95% CI, the Wald p,
    and the proportional-hazards test p (scaled Schoenfeld residuals, rank time); ``global_ph_p`` is the global PH
    test over all coefficients.
    """
    from lifelines import CoxPHFitter
    from lifelines.statistics import proportional_hazard_test

    for col in (risk_col, *covariates):
        if col not in df.columns:
            raise PipelineError(f"multivariable Cox: column {col!r} not in the table; available: {sorted(df.columns)}")
    used = list(dict.fromkeys([risk_col, *covariates]))
    complete = df[used].notna().all(axis=1).to_numpy()
    if not complete.all():
        log.info("multivariable Cox: %d of %d patients dropped for a missing %s", int((~complete).sum()), len(df),
                 ", ".join(c for c in used if df[c].isna().any()))
    data = df.loc[complete].reset_index(drop=True)
    t, c = survival_columns(data, time_col, cens_col)
    if int((c == 0).sum()) < 2:
        raise PipelineError(f"multivariable Cox: {int((c == 0).sum())} event(s) among {len(data)} complete patients; "
                            "need at least 2")
    design = cox_design(data, risk_col, covariates)
    fit_df = design.assign(__time__=t, __event__=1 - c)
    cph = CoxPHFitter(penalizer=penalizer).fit(fit_df, duration_col="__time__", event_col="__event__")
    summary = cph.summary
    resids = cph.compute_residuals(fit_df, kind="scaled_schoenfeld")
    ph = proportional_hazard_test(cph, fit_df, time_transform="rank", precomputed_residuals=resids).summary
    names = list(design.columns)
    table = pd.DataFrame({
        "covariate": names,
        "hr": summary.loc[names, "exp(coef)"].to_numpy(float),
        "lo": summary.loc[names, "exp(coef) lower 95%"].to_numpy(float),
        "hi": summary.loc[names, "exp(coef) upper 95%"].to_numpy(float),
        "p": summary.loc[names, "p"].to_numpy(float),
        "ph_p": ph.loc[names, "p"].to_numpy(float),
    })
    global_p = _global_ph_p(cph, resids[names])
    return table, global_p
