"""Point estimates of the outcome statistics papers report, as thin wrappers around scikit-survival and sklearn.

Each function returns what the library returns on the same inputs (the tests check equality to 1e-9); what it
adds is the repository's conventions and a NaN (with a log line) where the library raises on a degenerate input,
so that a bootstrap resample with, say, no event never stops a report.

Conventions:

* A survival outcome is ``time (N,) float`` (any unit, the clinical CSVs use months) and ``event (N,) bool``
  (True = event observed; the clinical tables store ``censorship = 1 - event``).
* ``risk (N,)``: higher = earlier event. ``surv (N,T)``: survival probabilities ``S(t)`` at ``times (T,)``.
* The censoring distribution (the inverse-probability-of-censoring weights of Uno's C, td-AUC and Brier) is the
  Kaplan-Meier estimate from ``train_time, train_event`` when given (the honest choice for a held-out cohort),
  else from the evaluated patients themselves.
* scikit-survival cannot weight a patient observed beyond the training follow-up (``G(t)`` is unknown there; it
  raises "time must be smaller than largest observed time point"). As in :func:`mica.survival.time_dependent_auc`,
  evaluated times at or beyond the largest training time are clipped just below it (:func:`just_below`) before
  td-AUC and Brier are computed; this leaves every reported value unchanged (such a patient is a control at every
  allowed time point), and time points at or beyond ``just_below(largest training time)`` are not allowed (NaN).
  (The clip is 4 ulps, at least 4 eps, below: sksurv reads a point within eps = 2.2e-16 of a time as that time,
  where ``G`` may be 0.) Uno's C is truncated at ``min(tau, largest training time)``, which needs no clipping (only
  events before the truncation are weighted).

    from mica.study.metrics import survival_metrics, evaluation_times, default_tau
    times = evaluation_times(time, event); tau = default_tau(time, event)
    survival_metrics(time, event, risk, surv, times, tau)   # {'c_harrell': ..., 'c_uno': ..., 'ibs': ...}
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

__all__ = [
    "harrell_c", "uno_c", "td_auc", "brier", "integrated_brier", "evaluation_times", "default_tau",
    "discrete_survival_at", "metric_names", "survival_metrics", "response_metrics", "calibration_table",
    "DEFAULT_QUANTILES", "TAU_QUANTILE", "TIED_TOL", "just_below",
]

DEFAULT_QUANTILES = (0.25, 0.5, 0.75)  # evaluation times: these quantiles of the observed event times
TAU_QUANTILE = 0.8                     # default_tau: this quantile of all follow-up times (events and censorings)
TIED_TOL = 1e-8                        # risks closer than this are tied (scikit-survival's default)
NAN = float("nan")


# ---------------------------------------------------------------------------------------------------- inputs
def _vec(x, name: str) -> np.ndarray:
    """Array-like -> 1-d float64; non-finite values are an error naming ``name``."""
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(a)):
        raise PipelineError(f"{name} has {int((~np.isfinite(a)).sum())} non-finite values; fix the inputs "
                            "(NaN risk usually means a diverged model)")
    return a


def _events(x, name: str) -> np.ndarray:
    """Array-like of bools or 0/1 -> 1-d bool (True = event observed)."""
    a = np.asarray(x).reshape(-1)
    if a.dtype != bool:
        f = np.asarray(a, dtype=np.float64)
        if not np.isin(f, (0.0, 1.0)).all():
            raise PipelineError(f"{name} must be bool or 0/1 (1 = event observed; censorship is 1 - event)")
        a = f.astype(bool)
    return a


def _outcome(time, event, n: int | None = None, what: str = "") -> tuple[np.ndarray, np.ndarray]:
    t, e = _vec(time, f"{what}time"), _events(event, f"{what}event")
    if t.size != e.size or (n is not None and t.size != n):
        raise PipelineError(f"{what}time ({t.size}), {what}event ({e.size}) and the predictions "
                            f"({n if n is not None else t.size}) differ in length")
    return t, e


def _train(time, event, train_time, train_event) -> tuple[np.ndarray, np.ndarray]:
    """The outcomes the censoring distribution is estimated from: the training ones when given, else ``time``."""
    if (train_time is None) != (train_event is None):
        raise PipelineError("give both train_time and train_event (or neither)")
    if train_time is None:
        return time, event
    return _outcome(train_time, train_event, what="train_")


def _surv(event: np.ndarray, time: np.ndarray) -> np.ndarray:
    from sksurv.util import Surv

    return Surv.from_arrays(event, time)


def _curves(surv) -> np.ndarray:
    s = np.asarray(surv, dtype=np.float64)
    if s.ndim != 2 or not np.all(np.isfinite(s)):
        raise PipelineError(f"surv must be a finite (N,T) array of survival probabilities, got shape {s.shape}")
    return s


def just_below(x):
    """``x`` minus ``4 max(eps, spacing(x))``: far enough below ``x`` that scikit-survival's step functions
    (which treat points within ``eps`` = 2.2e-16 of a time as that time) read the value before ``x``."""
    x = np.asarray(x, dtype=np.float64)
    return x - 4.0 * np.maximum(np.finfo(np.float64).eps, np.spacing(np.abs(x)))


def _clip_to_train(time: np.ndarray, t_train: np.ndarray) -> tuple[np.ndarray, float]:
    """Times clipped just below the largest training time ``(clipped (N,), t_cap)`` (see the module docstring)."""
    t_cap = float(just_below(t_train.max()))
    return np.minimum(time, t_cap), t_cap


def _allowed_times(times, time: np.ndarray, t_cap: float) -> tuple[np.ndarray, np.ndarray]:
    """``(times (T,) float, allowed (T,) bool)``: a time point is allowed within ``[min time, max time)`` of the
    evaluated patients (scikit-survival's rule) and below the clipped training follow-up ``t_cap``."""
    ev = np.asarray(times, dtype=np.float64).reshape(-1)
    if ev.size == 0 or not np.all(np.isfinite(ev)) or np.any(np.diff(ev) <= 0):
        raise PipelineError(f"evaluation times must be finite and strictly increasing, got {ev.tolist()}")
    ok = (ev >= time.min()) & (ev < time.max()) & (ev < t_cap)
    return ev, ok


# ---------------------------------------------------------------------------------------------------- discrimination
def harrell_c(time, event, risk, tied_tol: float = TIED_TOL) -> float:
    """Harrell's concordance index (sksurv ``concordance_index_censored``); NaN (logged) when undefined.

    A pair is comparable when the shorter time is an event (an event and a censoring at the same time are a pair,
    two events at the same time are not); risks within ``tied_tol`` count 1/2. Undefined with fewer than two
    patients, no event or no comparable pair.
    """
    from sksurv.metrics import concordance_index_censored

    r = _vec(risk, "risk")
    t, e = _outcome(time, event, r.size)
    if t.size < 2 or not e.any():
        log.warning("Harrell's C undefined: %d patients, %d events", t.size, int(e.sum()))
        return NAN
    try:
        return float(concordance_index_censored(e, t, r, tied_tol=tied_tol)[0])
    except (ValueError, ZeroDivisionError) as err:  # NoComparablePairException is a ValueError
        log.warning("Harrell's C undefined: %s", err)
        return NAN


def uno_c(time, event, risk, tau: float | None, train_time=None, train_event=None,
          tied_tol: float = TIED_TOL) -> float:
    """Uno's IPCW concordance index truncated at ``tau`` (sksurv ``concordance_index_ipcw``); NaN when undefined.

    Only events before the truncation time are weighted (by ``1 / G(t_i)^2``, ``G`` the Kaplan-Meier censoring
    survival of ``train_*``, else of the evaluated patients). The truncation is ``min(tau, largest training
    time)`` (``tau=None``: the largest training time): beyond it ``G`` is unknown. The value is then exactly
    scikit-survival's with that truncation time; with ``tau`` below the largest training time it is
    ``concordance_index_ipcw(train, test, risk, tau)`` itself.
    """
    from sksurv.metrics import concordance_index_ipcw

    r = _vec(risk, "risk")
    t, e = _outcome(time, event, r.size)
    t_tr, e_tr = _train(t, e, train_time, train_event)
    if t.size < 2 or t_tr.size == 0:
        return NAN
    tau_eff = float(t_tr.max()) if tau is None else min(float(tau), float(t_tr.max()))
    if not (e & (t < tau_eff)).any():
        log.warning("Uno's C undefined: no event before tau=%g", tau_eff)
        return NAN
    try:
        with np.errstate(divide="ignore", invalid="ignore"):
            c = float(concordance_index_ipcw(_surv(e_tr, t_tr), _surv(e, t), r, tau=tau_eff, tied_tol=tied_tol)[0])
    except (ValueError, ZeroDivisionError) as err:
        log.warning("Uno's C undefined: %s", err)
        return NAN
    return c if np.isfinite(c) else NAN


def td_auc(time, event, risk, times, train_time=None, train_event=None,
           tied_tol: float = TIED_TOL) -> tuple[np.ndarray, float]:
    """Cumulative/dynamic AUC(t) (sksurv ``cumulative_dynamic_auc``) -> ``(auc (T,), mean)``.

    ``times (T,)`` strictly increasing. A time point outside ``[min time, max time)`` of the evaluated patients
    or at/after ``just_below(largest training time)`` gets NaN, and ``mean`` (sksurv's survival-weighted mean, the
    value itself for one time) is over the allowed time points only; NaN everywhere when none is allowed or the
    library cannot compute it (no case or no control).
    """
    from sksurv.metrics import cumulative_dynamic_auc

    r = _vec(risk, "risk")
    t, e = _outcome(time, event, r.size)
    t_tr, e_tr = _train(t, e, train_time, train_event)
    t_c, t_cap = _clip_to_train(t, t_tr)
    ev, ok = _allowed_times(times, t, t_cap)
    aucs = np.full(ev.size, NAN)
    if not ok.any() or not e.any():
        return aucs, NAN
    try:
        with np.errstate(divide="ignore", invalid="ignore"):
            a, mean = cumulative_dynamic_auc(_surv(e_tr, t_tr), _surv(e, t_c), r, ev[ok], tied_tol=tied_tol)
    except (ValueError, ZeroDivisionError) as err:
        log.warning("time-dependent AUC undefined: %s", err)
        return aucs, NAN
    aucs[ok] = a
    aucs[~np.isfinite(aucs)] = NAN
    mean = float(mean)
    return aucs, mean if np.isfinite(mean) else NAN


def brier(time, event, surv, times, train_time=None, train_event=None) -> np.ndarray:
    """IPCW Brier score at each time (sksurv ``brier_score``) -> ``(T,)``; lower is better.

    ``surv (N,T)``: predicted ``S(t)`` at ``times (T,)``. A time point outside ``[min time, max time)`` of the
    evaluated patients or at/after ``just_below(largest training time)`` gets NaN; every one without an event (as
    scikit-survival, which refuses such a cohort).
    """
    from sksurv.metrics import brier_score

    s = _curves(surv)
    t, e = _outcome(time, event, s.shape[0])
    t_tr, e_tr = _train(t, e, train_time, train_event)
    t_c, t_cap = _clip_to_train(t, t_tr)
    ev, ok = _allowed_times(times, t, t_cap)
    if s.shape[1] != ev.size:
        raise PipelineError(f"surv has {s.shape[1]} columns for {ev.size} evaluation times")
    out = np.full(ev.size, NAN)
    if not ok.any() or not e.any():  # sksurv refuses a cohort without an event
        return out
    try:
        out[ok] = brier_score(_surv(e_tr, t_tr), _surv(e, t_c), s[:, ok], ev[ok])[1]
    except ValueError as err:
        log.warning("Brier score undefined: %s", err)
    return out


def integrated_brier(time, event, surv, times, train_time=None, train_event=None) -> float:
    """Integrated Brier score over ``[times[0], times[-1]]`` (sksurv ``integrated_brier_score``: trapezoid rule
    over the given times, divided by the range); needs >= 2 time points, NaN if any time point is not allowed
    (see :func:`brier`)."""
    from sksurv.metrics import integrated_brier_score

    s = _curves(surv)
    t, e = _outcome(time, event, s.shape[0])
    t_tr, e_tr = _train(t, e, train_time, train_event)
    t_c, t_cap = _clip_to_train(t, t_tr)
    ev, ok = _allowed_times(times, t, t_cap)
    if ev.size < 2:
        raise PipelineError("the integrated Brier score needs >= 2 evaluation times")
    if s.shape[1] != ev.size:
        raise PipelineError(f"surv has {s.shape[1]} columns for {ev.size} evaluation times")
    if not ok.all() or not e.any():
        return NAN
    try:
        return float(integrated_brier_score(_surv(e_tr, t_tr), _surv(e, t_c), s, ev))
    except ValueError as err:
        log.warning("integrated Brier score undefined: %s", err)
        return NAN


# ---------------------------------------------------------------------------------------------------- time points
def evaluation_times(time, event, quantiles: Sequence[float] = DEFAULT_QUANTILES) -> np.ndarray:
    """The ``quantiles`` of the observed EVENT times (numpy linear interpolation), unique, kept when strictly
    inside the follow-up ``(min time, max time)`` -> ``(T,)`` increasing (empty when no event)."""
    t, e = _outcome(time, event)
    if not e.any():
        return np.empty(0)
    q = np.unique(np.quantile(t[e], np.asarray(quantiles, dtype=np.float64)))
    return q[(q > t.min()) & (q < t.max())]


def default_tau(time, event) -> float:
    """Uno's C truncation time: the 80th percentile (:data:`TAU_QUANTILE`) of all follow-up times (events and
    censorings), so that about a fifth of the patients are still followed beyond it and ``G(tau)`` is not small."""
    t, _ = _outcome(time, event)
    return float(np.quantile(t, TAU_QUANTILE))


# ---------------------------------------------------------------------------------------------------- curves
def discrete_survival_at(surv_bins, edges, times, t_end: float) -> np.ndarray:
    """Survival ``(N,T)`` at arbitrary ``times (T,)`` from a discrete-time hazard model's curve ``surv_bins (N,K)``.

    ``S_k = prod_{j<=k} (1 - h_j)`` is the probability to outlive bin k = ``[edges[k], edges[k+1])``
    (``edges (K+1,)`` from :func:`mica.survival.hazard_bins`: ``edges[0] = 0``, ``edges[-1] = inf``). ``S`` is
    the piecewise-linear curve through the knots ``(0, 1), (edges[1], S_0), ..., (edges[K-1], S_{K-2}),
    (t_end, S_{K-1})`` and constant ``S_{K-1}`` after ``t_end`` (1 before 0). ``t_end`` closes the open last bin:
    use the largest training time. Tied edges (an empty bin) make a vertical step, evaluated from the right.
    """
    s = np.asarray(surv_bins, dtype=np.float64)
    e = np.asarray(edges, dtype=np.float64).reshape(-1)
    tt = _vec(times, "times")
    if s.ndim != 2 or e.size != s.shape[1] + 1:
        raise PipelineError(f"surv_bins (N,K) and edges (K+1,) do not match: {s.shape} vs {e.shape}")
    k = s.shape[1]
    x = np.concatenate([[0.0], e[1:k], [float(t_end)]])          # (K+1,) knots
    if np.any(np.diff(x) < 0) or not x[-1] > x[-2]:
        raise PipelineError(f"t_end={t_end:g} must exceed the last interior edge {x[-2]:g} (use the largest "
                            "training time) and the edges must not decrease")
    y = np.concatenate([np.ones((s.shape[0], 1)), s], axis=1)     # (N,K+1) values at the knots
    j = np.clip(np.searchsorted(x, tt, side="right") - 1, 0, k - 1)  # segment [x_j, x_{j+1}) of each time
    width = x[j + 1] - x[j]
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.clip(np.where(width > 0, (tt - x[j]) / width, 1.0), 0.0, 1.0)  # 0 before 0, 1 after t_end
    return y[:, j] * (1.0 - w) + y[:, j + 1] * w


# ---------------------------------------------------------------------------------------------------- summaries
def metric_names(times, with_surv: bool = True) -> list[str]:
    """The keys :func:`survival_metrics` returns for these ``times``, in order."""
    ev = np.asarray(times, dtype=np.float64).reshape(-1)
    names = ["c_harrell", "c_uno", "td_auc_mean"] + [f"td_auc@{t:g}" for t in ev]
    if with_surv:
        names += [f"brier@{t:g}" for t in ev] + (["ibs"] if ev.size >= 2 else [])
    return names


def survival_metrics(time, event, risk, surv, times, tau: float | None, train_time=None,
                     train_event=None) -> dict[str, float]:
    """Every survival statistic of one set of predictions -> ``{name: value}`` (NaN where undefined; never raises
    for a degenerate cohort such as a resample without an event).

    Keys (:func:`metric_names`): ``c_harrell``, ``c_uno`` (truncated at ``tau``), ``td_auc_mean``,
    ``td_auc@{t:g}`` per time; when ``surv (N,T)`` is given, ``brier@{t:g}`` per time and ``ibs`` (>= 2 times).
    """
    r = _vec(risk, "risk")
    t, e = _outcome(time, event, r.size)
    tr = (train_time, train_event)
    ev = np.asarray(times, dtype=np.float64).reshape(-1)
    out = {"c_harrell": harrell_c(t, e, r), "c_uno": uno_c(t, e, r, tau, *tr)}
    aucs, mean = td_auc(t, e, r, ev, *tr)
    out["td_auc_mean"] = mean
    out.update({f"td_auc@{x:g}": float(a) for x, a in zip(ev, aucs)})
    if surv is not None:
        out.update({f"brier@{x:g}": float(b) for x, b in zip(ev, brier(t, e, surv, ev, *tr))})
        if ev.size >= 2:
            out["ibs"] = integrated_brier(t, e, surv, ev, *tr)
    return out


def response_metrics(labels, prob, threshold: float = 0.5) -> dict[str, float]:
    """Response statistics of probabilities ``prob (N,)`` for 0/1 ``labels (N,)``.

    ``auc`` (sklearn ``roc_auc_score``; NaN with one class), ``balanced_accuracy`` (sklearn, of
    ``prob >= threshold``; NaN with one class) and ``brier`` (mean of ``(prob - label)^2``, sklearn's
    ``brier_score_loss``; lower is better).
    """
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    y = _events(labels, "labels")
    p = _vec(prob, "prob")
    if y.size != p.size or y.size == 0:
        raise PipelineError(f"labels ({y.size}) and prob ({p.size}) differ in length or are empty")
    out = {"auc": NAN, "balanced_accuracy": NAN, "brier": float(np.mean(np.square(p - y)))}
    if np.unique(y).size == 2:
        out["auc"] = float(roc_auc_score(y, p))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out["balanced_accuracy"] = float(balanced_accuracy_score(y, p >= threshold))
    return out


def calibration_table(labels, prob, n_bins: int = 10) -> pd.DataFrame:
    """Reliability table with quantile bins (sklearn ``calibration_curve(strategy="quantile")`` logic).

    Bin edges are the 0, 1/n_bins, ..., 1 quantiles of ``prob``; a probability goes to the bin found by
    ``searchsorted(edges[1:-1], p)`` as in sklearn; empty bins (tied edges) are dropped. Columns ``bin`` (index),
    ``mean_predicted``, ``fraction_positive``, ``n`` (patients in the bin).
    """
    y = _events(labels, "labels").astype(np.float64)
    p = _vec(prob, "prob")
    if y.size != p.size or y.size == 0:
        raise PipelineError(f"labels ({y.size}) and prob ({p.size}) differ in length or are empty")
    if n_bins < 1:
        raise PipelineError(f"n_bins must be >= 1, got {n_bins}")
    edges = np.percentile(p, np.linspace(0.0, 1.0, n_bins + 1) * 100)
    ids = np.searchsorted(edges[1:-1], p)
    n = np.bincount(ids, minlength=n_bins)
    sum_p = np.bincount(ids, weights=p, minlength=n_bins)
    sum_y = np.bincount(ids, weights=y, minlength=n_bins)
    nz = n > 0
    return pd.DataFrame({"bin": np.flatnonzero(nz), "mean_predicted": sum_p[nz] / n[nz],
                         "fraction_positive": sum_y[nz] / n[nz], "n": n[nz]})
