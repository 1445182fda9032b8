"""Discrete-time survival numerics: hazard bins, the NLL survival loss, risk, c-index, time-dependent AUC, log-rank.

Conventions (the MCAT / HEX-MICA ones, as facts):

* ``censorship`` is 1 for a censored patient, 0 for an observed event (event = 1 - censorship).
* Times are in any unit (the clinical CSVs use months); bins are ``[edges[k], edges[k+1])``.
* A survival model outputs ``logits (B,K)`` over K time bins; hazards ``h = sigmoid(logits)``, survival
  ``S_k = prod_{j<=k} (1 - h_j)`` and ``risk = -sum_k S_k`` (higher risk = shorter survival).
* The c-index is Harrell's, computed by scikit-survival's ``concordance_index_censored`` (ties in risk count 1/2,
  a death and a censoring at the same time are a comparable pair, two deaths at the same time are not).

Everything here is a pure function of arrays/tensors (numpy in, python floats/numpy out; torch for the loss).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

__all__ = [
    "hazard_bins", "to_bins", "nll_survival_loss", "survival_curve", "risk_from_logits", "c_index",
    "time_dependent_auc", "binary_auc", "median_threshold", "logrank_pvalue", "mean_sd",
]


def _as_1d(x, name: str) -> np.ndarray:
    """Any array-like / tensor -> 1-d float64; non-finite values are an error naming ``name``."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(a)):
        raise PipelineError(f"{name} has {int((~np.isfinite(a)).sum())} non-finite values; fix the inputs "
                            "(NaN risk usually means a diverged model)")
    return a


def hazard_bins(times: Sequence[float] | np.ndarray, censorship: Sequence[float] | np.ndarray,
                n_bins: int = 4) -> np.ndarray:
    """Bin edges ``(n_bins+1,)`` float64 from the quantiles of the UNCENSORED times (MCAT's ``qcut``).

    ``edges[0] = 0`` and ``edges[-1] = +inf``; the interior edges are the 1/n_bins ... (n_bins-1)/n_bins quantiles
    (linear interpolation, as pandas ``qcut``) of ``times[censorship == 0]``. Only the interior edges decide a bin
    (``to_bins``), so negative or very late times still fall in the first / last bin. Tied quantiles (many equal
    event times) give an empty bin, logged as a warning; the loss and risk stay well defined.
    """
    if n_bins < 1:
        raise PipelineError(f"n_bins must be >= 1, got {n_bins}")
    t = _as_1d(times, "times")
    c = _as_1d(censorship, "censorship")
    if t.shape != c.shape:
        raise PipelineError(f"times ({t.size}) and censorship ({c.size}) differ in length")
    unc = t[c == 0]
    if unc.size == 0:
        raise PipelineError("no uncensored patient (censorship == 0) to place survival bins; check the censorship "
                            "column (1 = censored, 0 = event)")
    inner = np.quantile(unc, np.arange(1, n_bins) / n_bins) if n_bins > 1 else np.empty(0)
    edges = np.concatenate([[0.0], inner, [np.inf]]).astype(np.float64)
    if np.any(np.diff(inner) <= 0):
        log.warning("survival bins have tied edges %s (many equal event times): some bins are empty", inner)
    return edges


def to_bins(times: Sequence[float] | np.ndarray, edges: Sequence[float] | np.ndarray) -> np.ndarray:
    """Bin index ``(N,) int64`` in ``[0, len(edges)-1)`` of each time; bin k is ``[edges[k], edges[k+1])``."""
    t = _as_1d(times, "times")
    e = np.asarray(edges, dtype=np.float64)
    if e.ndim != 1 or e.size < 2:
        raise PipelineError(f"edges must be a 1-d array of >= 2 values, got shape {e.shape}")
    return np.searchsorted(e[1:-1], t, side="right").astype(np.int64)


def nll_survival_loss(logits: torch.Tensor, y: torch.Tensor, censorship: torch.Tensor, alpha: float = 0.0,
                      eps: float = 1e-7, reduction: str = "mean") -> torch.Tensor:
    """Discrete-time negative log-likelihood (Zadeh & Schmid 2020; the MCAT ``NLLSurvLoss``).

    Args:
        logits: (B,K) hazard logits; ``h = sigmoid(logits)``, ``S_k = prod_{j<=k}(1-h_j)``, ``S_{-1} = 1``.
        y: (B,) long, the bin of each patient's time (``to_bins``).
        censorship: (B,) float/bool, 1 = censored.
        alpha: weight of the uncensored term: ``loss = (1-alpha)*neg_l + alpha*uncensored`` (the original uses 0).
        eps: probabilities are floored at ``eps`` before the log (as the original's ``clamp(min=eps)``).
        reduction: "mean" (default, over B), "sum" or "none" ((B,)).

    ``uncensored = -(1-c) (log S_{y-1} + log h_y)``, ``censored = -c log S_y``, ``neg_l = censored + uncensored``.
    Computed in log space (``logsigmoid``), so large logits do not underflow before the floor.
    """
    if logits.ndim != 2:
        raise PipelineError(f"logits must be (B,K), got shape {tuple(logits.shape)}")
    b, k = logits.shape
    y = y.reshape(b, 1).long()
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= k):
        raise PipelineError(f"bin labels must lie in [0,{k}), got [{int(y.min())},{int(y.max())}]")
    c = censorship.reshape(b, 1).to(logits.dtype)
    log_eps = math.log(eps)
    log_h = F.logsigmoid(logits)                         # log h_k
    log_s = torch.cumsum(F.logsigmoid(-logits), dim=1)   # log S_k
    log_s_pad = torch.cat([torch.zeros_like(log_s[:, :1]), log_s], dim=1)  # log S_{k-1}, k = 0..K
    log_s_prev = torch.gather(log_s_pad, 1, y).clamp(min=log_eps)
    log_h_y = torch.gather(log_h, 1, y).clamp(min=log_eps)
    log_s_y = torch.gather(log_s_pad, 1, y + 1).clamp(min=log_eps)
    uncensored = -(1 - c) * (log_s_prev + log_h_y)
    censored = -c * log_s_y
    loss = ((1 - alpha) * (censored + uncensored) + alpha * uncensored).reshape(b)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise PipelineError(f"reduction must be mean, sum or none, got {reduction!r}")


def survival_curve(logits: torch.Tensor) -> torch.Tensor:
    """(B,K) logits -> (B,K) survival ``S_k = prod_{j<=k} (1 - sigmoid(logit_j))`` (probability to outlive bin k)."""
    return torch.cumprod(1 - torch.sigmoid(logits), dim=1)


def risk_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """(B,K) logits -> (B,) risk ``-sum_k S_k`` in [-K, 0]; higher = shorter predicted survival."""
    return -survival_curve(logits).sum(dim=1)


def c_index(times: Sequence[float] | np.ndarray, censorship: Sequence[float] | np.ndarray,
            risk: Sequence[float] | np.ndarray, tied_tol: float = 1e-8) -> float:
    """Harrell's concordance index of ``risk`` (higher = earlier event) via sksurv ``concordance_index_censored``.

    ``event = (1 - censorship).astype(bool)``. Returns NaN (with a warning) when no pair is comparable (e.g. every
    patient censored). Equals ``lifelines.utils.concordance_index(times, -risk, 1 - censorship)`` when no two risks
    differ by less than ``tied_tol`` without being equal.
    """
    from sksurv.metrics import concordance_index_censored

    t = _as_1d(times, "times")
    c = _as_1d(censorship, "censorship")
    r = _as_1d(risk, "risk")
    if not (t.size == c.size == r.size):
        raise PipelineError(f"times ({t.size}), censorship ({c.size}) and risk ({r.size}) differ in length")
    event = (1 - c).astype(bool)
    if t.size < 2 or not event.any():
        log.warning("c-index undefined: %d patients, %d events", t.size, int(event.sum()))
        return float("nan")
    try:
        return float(concordance_index_censored(event, t, r, tied_tol=tied_tol)[0])
    except (ValueError, ZeroDivisionError) as e:  # no comparable pair
        log.warning("c-index undefined: %s", e)
        return float("nan")


def time_dependent_auc(train_times, train_cens, test_times, test_cens, risk,
                       eval_times: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Cumulative/dynamic AUC(t) of ``risk`` (sksurv ``cumulative_dynamic_auc``, IPCW from the training fold).

    Args:
        train_times, train_cens: (Ntr,) the training fold (estimates the censoring distribution).
        test_times, test_cens, risk: (Nte,) the evaluated fold; censorship 1 = censored.
        eval_times: time points (same unit as times); default the 25/50/75% quantiles of the test event times.

    Returns ``(times (T,), aucs (T,), mean_auc)`` where mean_auc is sksurv's integrated (survival-weighted) mean,
    or the plain mean for a single time. Time points outside ``[min test time, max test time)`` or at/after the
    last training time are dropped (logged); none left -> empty arrays and NaN. Test times beyond the training
    follow-up are clipped just below it: this leaves AUC(t) unchanged at every kept t (such a patient is a control
    at all of them) and avoids sksurv's "censoring survival function is zero" error.
    """
    from sksurv.metrics import cumulative_dynamic_auc
    from sksurv.util import Surv

    t_tr, c_tr = _as_1d(train_times, "train_times"), _as_1d(train_cens, "train_cens")
    t_te, c_te, r = _as_1d(test_times, "test_times"), _as_1d(test_cens, "test_cens"), _as_1d(risk, "risk")
    if not (t_te.size == c_te.size == r.size) or t_tr.size != c_tr.size:
        raise PipelineError("time_dependent_auc: times, censorship and risk lengths differ")
    e_te = (1 - c_te).astype(bool)
    empty = (np.empty(0), np.empty(0), float("nan"))
    if t_tr.size == 0 or not e_te.any():
        log.warning("time-dependent AUC undefined: no test event")
        return empty
    t_cap = np.nextafter(t_tr.max(), -np.inf)
    t_te_c = np.minimum(t_te, t_cap)
    if eval_times is None:
        eval_times = np.quantile(t_te[e_te], [0.25, 0.5, 0.75])
    ev = np.unique(np.asarray(eval_times, dtype=np.float64))
    keep = (ev >= t_te_c.min()) & (ev < t_te_c.max()) & (ev < t_cap)
    if not keep.all():
        log.info("time-dependent AUC: dropped time points %s outside the follow-up", ev[~keep])
    ev = ev[keep]
    if ev.size == 0:
        log.warning("time-dependent AUC undefined: no time point within the follow-up")
        return empty
    y_tr = Surv.from_arrays((1 - c_tr).astype(bool), t_tr)
    y_te = Surv.from_arrays(e_te, t_te_c)
    try:
        aucs, mean_auc = cumulative_dynamic_auc(y_tr, y_te, r, ev)
    except ValueError as e:
        log.warning("time-dependent AUC undefined: %s", e)
        return empty
    return ev, np.asarray(aucs, dtype=np.float64), float(mean_auc)


def binary_auc(labels: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """ROC AUC of ``scores`` for 0/1 ``labels`` (sklearn); NaN (with a warning) when only one class is present."""
    from sklearn.metrics import roc_auc_score

    y = _as_1d(labels, "labels")
    s = _as_1d(scores, "scores")
    if y.size != s.size:
        raise PipelineError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    if np.unique(y).size < 2:
        log.warning("AUC undefined: only one class among %d labels", y.size)
        return float("nan")
    return float(roc_auc_score(y, s))


def median_threshold(train_risk: Sequence[float] | np.ndarray) -> float:
    """Risk threshold for high/low groups: the median of the TRAINING fold's risk (``val_risk > thr`` = high)."""
    return float(np.median(_as_1d(train_risk, "train_risk")))


def logrank_pvalue(times: Sequence[float] | np.ndarray, censorship: Sequence[float] | np.ndarray,
                   high: Sequence[bool] | np.ndarray) -> float:
    """Two-group log-rank p-value (lifelines ``logrank_test``) of ``high`` vs ``~high``; NaN if a group is empty."""
    from lifelines.statistics import logrank_test

    t = _as_1d(times, "times")
    e = 1 - _as_1d(censorship, "censorship")
    g = np.asarray(high, dtype=bool).reshape(-1)
    if not (t.size == e.size == g.size):
        raise PipelineError("logrank_pvalue: times, censorship and groups differ in length")
    if g.all() or not g.any():
        return float("nan")
    return float(logrank_test(t[g], t[~g], event_observed_A=e[g], event_observed_B=e[~g]).p_value)


def mean_sd(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for one value) ignoring NaNs, for fold summaries."""
    a = np.asarray(values, dtype=np.float64).reshape(-1)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0
