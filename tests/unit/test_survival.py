"""mica.survival: bins, NLL loss against a direct formula, risk, c-index against brute-force pair counting and
lifelines, time-dependent AUC, AUC / log-rank / fold summaries; mica.baselines covariate coding and Cox/logistic."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from mica.baselines import cox_cindex, logistic_auc, prepare_covariates
from mica.survival import (
    binary_auc,
    c_index,
    hazard_bins,
    logrank_pvalue,
    mean_sd,
    median_threshold,
    nll_survival_loss,
    risk_from_logits,
    survival_curve,
    time_dependent_auc,
    to_bins,
)
from pipeline.errors import PipelineError


def test_hazard_bins_use_uncensored_quartiles_only() -> None:
    times = np.array([1, 2, 3, 4, 5, 6, 7, 8, 100, 200, 0.5], float)
    cens = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1], float)
    edges = hazard_bins(times, cens)
    np.testing.assert_allclose(edges, [0, 2.75, 4.5, 6.25, np.inf])
    # censored times do not move the edges
    np.testing.assert_allclose(hazard_bins(np.r_[times, 1e4], np.r_[cens, 1]), edges)
    bins = to_bins(times, edges)
    assert bins.dtype == np.int64
    np.testing.assert_array_equal(bins, [0, 0, 1, 1, 2, 2, 3, 3, 3, 3, 0])
    # intervals are [a, b): a time on an interior edge goes up; times past the ends stay in the end bins
    np.testing.assert_array_equal(to_bins([2.75, 4.5, -1.0, 1e9], edges), [1, 2, 0, 3])
    assert hazard_bins(times, cens, n_bins=2).tolist() == [0, 4.5, np.inf]
    with pytest.raises(PipelineError, match="no uncensored"):
        hazard_bins([1, 2], [1, 1])


def _nll_reference(logits: np.ndarray, y: np.ndarray, c: np.ndarray, alpha: float) -> float:
    """The likelihood written out with products: event in bin y: S_{y-1} h_y; censored in bin y: S_y."""
    h = 1 / (1 + np.exp(-logits))
    total = 0.0
    for i in range(len(y)):
        s_prev = np.prod(1 - h[i, :y[i]])
        s_y = np.prod(1 - h[i, :y[i] + 1])
        unc = -(1 - c[i]) * (np.log(max(s_prev, 1e-7)) + np.log(max(h[i, y[i]], 1e-7)))
        cen = -c[i] * np.log(max(s_y, 1e-7))
        total += (1 - alpha) * (unc + cen) + alpha * unc
    return total / len(y)


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_nll_matches_direct_likelihood(alpha: float) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (64, 4))
    y = rng.integers(0, 4, 64)
    c = (rng.random(64) < 0.4).astype(float)
    got = nll_survival_loss(torch.tensor(logits), torch.tensor(y), torch.tensor(c), alpha=alpha)
    assert got.ndim == 0
    assert float(got) == pytest.approx(_nll_reference(logits, y, c, alpha), rel=1e-10)
    per = nll_survival_loss(torch.tensor(logits), torch.tensor(y), torch.tensor(c), alpha=alpha, reduction="none")
    assert per.shape == (64,) and float(per.mean()) == pytest.approx(float(got))


def test_nll_gradient_direction_and_extremes() -> None:
    logits = torch.zeros(2, 4, requires_grad=True)
    # an event in bin 1: raise h_1, lower h_0; a censoring in bin 2: lower h_0..h_2, leave h_3 alone
    nll_survival_loss(logits, torch.tensor([1, 2]), torch.tensor([0.0, 1.0]), reduction="sum").backward()
    g = logits.grad
    assert g[0, 0] > 0 and g[0, 1] < 0 and g[0, 2:].abs().max() == 0
    assert (g[1, :3] > 0).all() and g[1, 3] == 0
    big = torch.tensor([[60.0, -60, 60, -60]], requires_grad=True)
    loss = nll_survival_loss(big, torch.tensor([1]), torch.tensor([0.0]))
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(-2 * math.log(1e-7), rel=1e-6)
    assert torch.isfinite(big.grad).all()
    with pytest.raises(PipelineError, match="bin labels"):
        nll_survival_loss(torch.zeros(1, 4), torch.tensor([4]), torch.tensor([0.0]))


def test_risk_and_survival_curve() -> None:
    logits = torch.tensor([[-2.0, -1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    s = survival_curve(logits)
    h = torch.sigmoid(logits)
    torch.testing.assert_close(s[:, 1], (1 - h[:, 0]) * (1 - h[:, 1]))
    assert (s[:, 1:] <= s[:, :-1]).all()
    torch.testing.assert_close(risk_from_logits(logits), -s.sum(1))
    # higher hazards in any bin -> higher risk
    assert (risk_from_logits(logits + 0.5) > risk_from_logits(logits)).all()
    assert risk_from_logits(torch.full((1, 4), 50.0)).item() == pytest.approx(0.0, abs=1e-6)


def _harrell_brute_force(t: np.ndarray, c: np.ndarray, r: np.ndarray) -> float:
    """Pairs (i,j) with an event for i and t_i < t_j, or t_i == t_j with j censored; risk ties count 1/2."""
    num = den = 0.0
    for i in range(len(t)):
        if c[i]:
            continue
        for j in range(len(t)):
            if t[i] < t[j] or (t[i] == t[j] and c[j] and i != j):
                den += 1
                num += 1.0 if r[i] > r[j] else 0.5 if r[i] == r[j] else 0.0
    return num / den


def test_c_index_matches_pair_counting_and_lifelines() -> None:
    from lifelines.utils import concordance_index

    rng = np.random.default_rng(1)
    t = rng.integers(1, 30, 120).astype(float)          # many tied times
    c = (rng.random(120) < 0.5).astype(float)
    r = np.round(rng.normal(size=120) - 0.05 * t, 1)    # tied risks, informative
    ours = c_index(t, c, r)
    assert ours == pytest.approx(_harrell_brute_force(t, c, r), abs=1e-12)
    assert ours == pytest.approx(concordance_index(t, -r, 1 - c), abs=1e-12)
    assert 0.6 < ours < 0.9
    tu = t + rng.random(120) * 0.5                       # distinct times: the sign convention alone decides
    assert c_index(tu, c, -tu) == pytest.approx(1.0) and c_index(tu, c, tu) == pytest.approx(0.0)
    assert math.isnan(c_index(t, np.ones_like(c), r))
    with pytest.raises(PipelineError, match="non-finite"):
        c_index(t, c, np.r_[r[:-1], np.nan])


def test_time_dependent_auc() -> None:
    from sksurv.metrics import cumulative_dynamic_auc
    from sksurv.util import Surv

    rng = np.random.default_rng(2)
    x_tr, x_te = rng.normal(size=300), rng.normal(size=150)
    t_tr, t_te = rng.exponential(np.exp(-x_tr)), rng.exponential(np.exp(-x_te))
    c_tr, c_te = (rng.random(300) < 0.3).astype(float), (rng.random(150) < 0.3).astype(float)
    t_te = np.minimum(t_te, t_tr.max() * 0.99)
    times, aucs, mean_auc = time_dependent_auc(t_tr, c_tr, t_te, c_te, x_te)
    assert times.shape == aucs.shape == (3,) and 0.65 < mean_auc < 0.9
    ref = cumulative_dynamic_auc(Surv.from_arrays(c_tr == 0, t_tr), Surv.from_arrays(c_te == 0, t_te), x_te, times)
    np.testing.assert_allclose(aucs, ref[0])
    # a test patient followed past the training follow-up: AUC unchanged at the same time points
    t_late = t_te.copy()
    t_late[np.argmax(t_te)] = t_tr.max() * 3
    times2, aucs2, _ = time_dependent_auc(t_tr, c_tr, t_late, c_te, x_te, eval_times=times)
    np.testing.assert_allclose(aucs2, aucs)
    assert time_dependent_auc(t_tr, c_tr, t_te, c_te, -x_te, eval_times=times)[2] < 0.35
    empty = time_dependent_auc(t_tr, c_tr, t_te, c_te, x_te, eval_times=[1e9])
    assert empty[0].size == 0 and math.isnan(empty[2])


def test_auc_logrank_threshold_summary() -> None:
    assert binary_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert math.isnan(binary_auc([1, 1], [0.2, 0.3]))
    rng = np.random.default_rng(3)
    high = np.r_[np.ones(50, bool), np.zeros(50, bool)]
    t = np.where(high, rng.exponential(1, 100), rng.exponential(5, 100))
    assert logrank_pvalue(t, np.zeros(100), high) < 1e-4
    assert math.isnan(logrank_pvalue(t, np.zeros(100), np.ones(100, bool)))
    assert median_threshold([1, 2, 3, 10]) == 2.5
    assert mean_sd([1.0, 2.0, 3.0, np.nan]) == (2.0, 1.0) and mean_sd([0.5]) == (0.5, 0.0)


def test_prepare_covariates_codes_on_the_training_fold() -> None:
    tr = pd.DataFrame({"age": [50, 60, np.nan, 70], "stage": ["1", "2", "3", "4"], "smoker": [True, False, True, True],
                       "hist": ["adeno", "squam", "adeno", None], "site": ["A", "A", "A", "A"]})
    va = pd.DataFrame({"age": [55, 65], "stage": ["2", "4"], "smoker": [False, True], "hist": ["large", "squam"],
                       "site": ["A", "B"]})
    x_tr, x_va, names = prepare_covariates(tr, va, ["age", "stage", "smoker", "hist", "site"])
    assert names == ["age", "stage", "smoker", "hist=missing", "hist=squam"]    # site constant: dropped
    np.testing.assert_allclose(x_tr.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(x_tr.std(0), 1)
    # stage stays ordinal (numbers); an unseen category ("large") codes as the reference
    assert x_va[1, 1] > x_va[0, 1]
    np.testing.assert_allclose(x_va[0, 3:], x_tr[0, 3:])
    with pytest.raises(PipelineError, match=r"\['grade'\] not in the clinical table"):
        prepare_covariates(tr, va, ["age", "grade"])


def test_cox_and_logistic_baselines_learn_a_linear_signal() -> None:
    rng = np.random.default_rng(4)
    n = 300
    df = pd.DataFrame({"x1": rng.normal(size=n), "x2": rng.normal(size=n), "noise": rng.normal(size=n)})
    lin = 1.0 * df.x1 - 0.7 * df.x2
    df["survival_months"] = rng.exponential(np.exp(-lin))
    df["censorship"] = (rng.random(n) < 0.3).astype(float)
    df["response"] = (rng.random(n) < 1 / (1 + np.exp(-2 * lin))).astype(int)
    tr, va = df.iloc[:200], df.iloc[200:]
    risk, ci = cox_cindex(tr, va, ["x1", "x2", "noise"])
    assert risk.shape == (100,) and ci > 0.7
    assert ci == pytest.approx(c_index(va.survival_months, va.censorship, risk))
    prob, auc = logistic_auc(tr, va, ["x1", "x2", "noise"])
    assert prob.shape == (100,) and ((prob > 0) & (prob < 1)).all() and auc > 0.75
    with pytest.raises(PipelineError, match="0/1"):
        logistic_auc(tr.assign(response=2), va, ["x1"])
