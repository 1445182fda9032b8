"""Link the niches to outcome: per-patient spatial features and their univariable association tables.

::

    feats = patient_features(slide_fractions, slide_colocal, slide_case, weights=cells_per_slide)  # one row per case
    data = feats.join(patient_outcomes(clinical))                       # + survival_months, censorship, response
    cols = feature_columns(feats)                                       # niche_{k}, coloc_{a}__{b}
    cox = univariable_cox(data, cols)                                   # HR per SD, 95% CI, Wald p, BH q
    resp = response_association(data, cols)                             # OR per SD, p, q, Mann-Whitney p, q, AUC
    both = by_fold(data, cols, fold_cases(split_paths, slide_case), univariable_cox)   # per MICA fold + 'all'

Each feature is tested alone (one model per feature) on the patients that have it and the outcome, after
standardising it on those patients (mean 0, SD 1, ``ddof=1``), so effects read "per SD of the feature". The
Benjamini-Hochberg q values (``scipy.stats.false_discovery_control``) are taken over the features of one table that
could be tested; a feature that is constant on the patients (or without events / without both response classes) is
reported with NaN statistics and left out of the correction.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from pipeline import tables

log = logging.getLogger(__name__)

COX_COLUMNS = ("feature", "n", "events", "sd", "hr_per_sd", "lo", "hi", "p", "q")
RESPONSE_COLUMNS = ("feature", "n", "n_pos", "sd", "or_per_sd", "lo", "hi", "p", "q", "mw_p", "mw_q", "auc")
FEATURE_PREFIXES = ("niche_", "coloc_")
_Z95 = float(stats.norm.ppf(0.975))


# ----------------------------------------------------------------------------------------------------------------
# per-patient features


def patient_features(slide_fractions: pd.DataFrame, slide_colocal: pd.DataFrame | None,
                     slide_case: Mapping[str, str], weights: Mapping[str, float] | pd.Series | None = None
                     ) -> pd.DataFrame:
    """Per-patient spatial features from per-slide ones.

    Args:
        slide_fractions: (S, K) one row per slide (index = slide id), columns ``niche_{k}``: the fraction of the
            slide's units in niche k (rows sum to 1).
        slide_colocal: (S', P) or None: one row per slide, columns ``coloc_{a}__{b}``: the co-localisation z-score
            of phenotypes a and b on the slide (NaN where a pair could not be scored, e.g. a phenotype absent).
        slide_case: {slide id: case id}; slides missing from it are left out (logged).
        weights: {slide id: number of units} used to weight the fractions; None weights the slides equally.

    Returns:
        DataFrame indexed by ``case_id`` (sorted) with the niche fractions averaged over the patient's slides,
        weighted by their units (so they are the fractions of the patient's pooled units, and still sum to 1), the
        co-localisation z-scores averaged with equal weight over the slides that have a finite value (a z-score is
        a per-slide statistic, not a count), then ``n_slides`` and ``n_units`` (sum of the weights; NaN without).
    """
    frac = slide_fractions.copy()
    frac.index = frac.index.map(str)
    cases = pd.Series({s: slide_case.get(s) for s in frac.index}, dtype=object)
    unknown = cases[cases.isna()].index.tolist()
    if unknown:
        log.warning("patient features: %d slides without a case id are left out: %s", len(unknown), unknown[:10])
    keep = cases.notna()
    frac, cases = frac[keep], cases[keep].astype(str)
    if weights is None:
        w = pd.Series(1.0, index=frac.index)
    else:
        given = pd.Series(weights, dtype=float)
        given.index = given.index.map(str)
        w = given.reindex(frac.index)
        if w.isna().any() or (w < 0).any():
            raise ValueError(f"weights need a non-negative value for every slide; missing/negative: "
                             f"{w[w.isna() | (w < 0)].index.tolist()[:10]}")
    wf = frac.mul(w, axis=0)
    wsum = w.groupby(cases).sum()
    out = wf.groupby(cases).sum().div(wsum.replace(0, np.nan), axis=0)
    if slide_colocal is not None and len(slide_colocal.columns):
        z = slide_colocal.copy()
        z.index = z.index.map(str)
        z = z[z.index.isin(cases.index)]
        out = out.join(z.groupby(cases.reindex(z.index)).mean(), how="left")  # mean skips NaN
    out["n_slides"] = cases.groupby(cases).size().reindex(out.index).astype(int)
    out["n_units"] = wsum.reindex(out.index) if weights is not None else np.nan
    out.index.name = "case_id"
    return out.sort_index()


def feature_columns(df: pd.DataFrame, prefixes: Sequence[str] = FEATURE_PREFIXES) -> list[str]:
    """The feature columns of a :func:`patient_features` table (``niche_*`` then ``coloc_*``, table order)."""
    return [c for p in prefixes for c in df.columns if str(c).startswith(p)]


def patient_outcomes(clinical: pd.DataFrame) -> pd.DataFrame:
    """One row per ``case_id`` of a clinical table from :func:`pipeline.tables.read_clinical_table` with the outcome
    columns it has (``survival_months``, ``censorship`` 1 = censored, ``response``) and its numeric covariates; a
    patient's slides agree on the outcome (the reader checks it), so the first non-empty value is taken."""
    cols = [c for c in clinical.columns if c not in tables.ID_COLUMNS]
    out = clinical.groupby("case_id")[cols].first()
    out.index = out.index.map(str)
    return out


def fold_cases(split_paths: Iterable[str], slide_case: Mapping[str, str], column: str = "val"
               ) -> dict[str, list[str]]:
    """{``"fold k"``: sorted case ids of the ``column`` slides} of MICA split files ``splits_{k}.csv`` (slide ids;
    a slide without a case id is its own patient)."""
    out = {}
    for path in split_paths:
        slides = tables.read_split(path, column)
        out[tables.fold_of(path)] = sorted({slide_case.get(s, s) for s in slides})
    return out


# ----------------------------------------------------------------------------------------------------------------
# statistics


def bh_q(p: Sequence[float] | np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q values of ``p`` (scipy ``false_discovery_control``); NaN p stay NaN and are not counted
    among the tests."""
    p = np.asarray(p, dtype=float)
    q = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        q[ok] = stats.false_discovery_control(p[ok], method="bh")
    return q


def _standardise(x: np.ndarray) -> tuple[np.ndarray, float]:
    """``(x - mean) / sd`` and sd (``ddof=1``); sd 0 or NaN -> (x, NaN) (a constant feature cannot be tested)."""
    sd = float(np.std(x, ddof=1)) if len(x) > 1 else float("nan")
    if not np.isfinite(sd) or sd <= 1e-12 * max(1.0, float(np.abs(x).max(initial=0.0))):
        return x, float("nan")
    return (x - x.mean()) / sd, sd


def _cox_one(x: np.ndarray, t: np.ndarray, e: np.ndarray) -> tuple[float, float, float, float]:
    """(HR, lo, hi, Wald p) of a one-covariate Cox PH fit (lifelines); NaN when the fit fails (no convergence)."""
    from lifelines import CoxPHFitter
    from lifelines.exceptions import ConvergenceError

    df = pd.DataFrame({"x": x, "__time__": t, "__event__": e})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cph = CoxPHFitter().fit(df, duration_col="__time__", event_col="__event__")
    except (ConvergenceError, np.linalg.LinAlgError, ValueError) as err:
        log.warning("univariable Cox: the fit failed (%s); statistics reported as NaN", err)
        return (math.nan,) * 4
    s = cph.summary.loc["x"]
    return (float(s["exp(coef)"]), float(s["exp(coef) lower 95%"]), float(s["exp(coef) upper 95%"]), float(s["p"]))


def univariable_cox(df: pd.DataFrame, features: Sequence[str], time_col: str = "survival_months",
                    cens_col: str = "censorship") -> pd.DataFrame:
    """One Cox PH model per feature on ``df`` (one row per patient; ``cens_col`` 1 = censored, the CLAM/MCAT
    convention; ``time_col`` in months).

    Each feature is standardised on the patients with a finite feature, time and censorship (``n`` of them,
    ``events`` events). Returns one row per feature, in ``features`` order, with columns ``feature, n, events, sd
    (the feature's SD in its own units), hr_per_sd, lo, hi`` (95% Wald CI, lifelines ``CoxPHFitter``), ``p`` (Wald)
    and ``q`` (Benjamini-Hochberg over the features with a finite p). Constant features, or fewer than 2 events,
    give NaN statistics and are left out of the q values.
    """
    rows = []
    for f in features:
        sub = df[[f, time_col, cens_col]].apply(pd.to_numeric, errors="coerce").dropna()
        x, t, c = (sub[k].to_numpy(float) for k in (f, time_col, cens_col))
        e = (c == 0).astype(int)
        z, sd = _standardise(x)
        hr = lo = hi = p = math.nan
        if np.isfinite(sd) and e.sum() >= 2:
            hr, lo, hi, p = _cox_one(z, t, e)
        rows.append({"feature": f, "n": len(sub), "events": int(e.sum()), "sd": sd, "hr_per_sd": hr, "lo": lo,
                     "hi": hi, "p": p})
    out = pd.DataFrame(rows, columns=[c for c in COX_COLUMNS if c != "q"])
    out["q"] = bh_q(out["p"].to_numpy(float)) if len(out) else np.empty(0)
    return out


def _logistic_one(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    """(OR per unit of x, lo, hi, Wald p) of an unpenalised logistic regression ``y ~ 1 + x`` (sklearn, ``C=inf``),
    the SE of the slope from the inverse Fisher information ``(X' W X)^-1``, ``W = p (1 - p)``. NaN under (quasi-)
    complete separation, where the MLE does not exist (the fitted probabilities reach 0 or 1)."""
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = LogisticRegression(C=np.inf, max_iter=1000, tol=1e-10).fit(x[:, None], y)
    b0, b1 = float(m.intercept_[0]), float(m.coef_[0, 0])
    pr = 1.0 / (1.0 + np.exp(-(b0 + b1 * x)))
    w = pr * (1 - pr)
    if w.min() < 1e-8 or abs(b1) > 20:  # (quasi-)complete separation: the caller says which features, once
        return (math.nan,) * 4
    design = np.column_stack([np.ones_like(x), x])
    info = design.T @ (design * w[:, None])
    try:
        se = float(np.sqrt(np.linalg.inv(info)[1, 1]))
    except np.linalg.LinAlgError:
        return (math.nan,) * 4
    p = float(2 * stats.norm.sf(abs(b1) / se))
    return math.exp(b1), math.exp(b1 - _Z95 * se), math.exp(b1 + _Z95 * se), p


def response_association(df: pd.DataFrame, features: Sequence[str], response_col: str = "response"
                         ) -> pd.DataFrame:
    """Per feature, its association with a binary response (1 = responder) on ``df`` (one row per patient).

    Returns one row per feature with columns ``feature, n, n_pos, sd, or_per_sd, lo, hi, p, q`` (logistic
    regression on the standardised feature: odds ratio per SD, 95% Wald CI, Wald p, BH q), ``mw_p, mw_q``
    (two-sided Mann-Whitney U of the raw feature between responders and non-responders, scipy; BH q) and ``auc``
    (sklearn ``roc_auc_score`` of the raw feature for response: > 0.5 when responders have higher values). Constant
    features or a single response class give NaN and are left out of the q values.
    """
    from sklearn.metrics import roc_auc_score

    rows, separated = [], []
    for f in features:
        sub = df[[f, response_col]].apply(pd.to_numeric, errors="coerce").dropna()
        x, y = sub[f].to_numpy(float), sub[response_col].to_numpy(float)
        bad = ~np.isin(y, (0.0, 1.0))
        if bad.any():
            raise ValueError(f"{response_col} must be 0 or 1; found {sorted(set(y[bad]))[:5]}")
        y = y.astype(int)
        z, sd = _standardise(x)
        orr = lo = hi = p = mw_p = auc = math.nan
        n_pos = int(y.sum())
        if 0 < n_pos < len(y):
            if np.isfinite(sd):
                orr, lo, hi, p = _logistic_one(z, y)
                if not np.isfinite(orr):
                    separated.append(f)
                mw_p = float(stats.mannwhitneyu(x[y == 1], x[y == 0], alternative="two-sided").pvalue)
                auc = float(roc_auc_score(y, x))
        rows.append({"feature": f, "n": len(sub), "n_pos": n_pos, "sd": sd, "or_per_sd": orr, "lo": lo, "hi": hi,
                     "p": p, "mw_p": mw_p, "auc": auc})
    if separated:
        log.warning("logistic regression: %d of %d features separate responders completely (odds ratio NaN; "
                    "Mann-Whitney and AUC still given): %s", len(separated), len(features),
                    ", ".join(separated[:8]) + (" ..." if len(separated) > 8 else ""))
    out = pd.DataFrame(rows, columns=[c for c in RESPONSE_COLUMNS if c not in ("q", "mw_q")])
    out.insert(out.columns.get_loc("p") + 1, "q", bh_q(out["p"].to_numpy(float)) if len(out) else np.empty(0))
    out.insert(out.columns.get_loc("mw_p") + 1, "mw_q",
               bh_q(out["mw_p"].to_numpy(float)) if len(out) else np.empty(0))
    return out


def by_fold(df: pd.DataFrame, features: Sequence[str], folds: Mapping[str, Sequence[str]],
            test: Callable[..., pd.DataFrame], **kwargs: object) -> pd.DataFrame:
    """``test`` (:func:`univariable_cox` or :func:`response_association`) on the whole of ``df`` (``fold = "all"``)
    and on each fold's patients (``folds``: {name: case ids}, e.g. :func:`fold_cases`' validation patients), stacked
    with a first column ``fold``; the q values are computed within each table. Case ids absent from ``df`` are
    ignored (logged)."""
    parts = [test(df, features, **kwargs).assign(fold="all")]
    for name, cases in folds.items():
        cases = [str(c) for c in cases]
        idx = df.index.intersection(cases)
        if len(idx) < len(cases):
            log.info("%s: %d of its %d patients have no spatial features", name, len(cases) - len(idx), len(cases))
        parts.append(test(df.loc[idx], features, **kwargs).assign(fold=name))
    out = pd.concat(parts, ignore_index=True)
    return out[["fold", *[c for c in out.columns if c != "fold"]]]
