"""``mica.study.metrics``: the statistics the report prints equal scikit-survival's and sklearn's own functions.

Real data nobody here made (scikit-survival's veterans' lung cancer trial and GBSG2), one 70/30 train/test split:
Cox PH (lifelines) and the repository's tabular discrete-time NLL head (4 bins, its survival curve interpolated by
``discrete_survival_at``). ``survival_metrics`` reports Uno's C, td-AUC and Brier / integrated Brier equal to
scikit-survival called directly on the same predictions (1e-9), for both models, and the NLL head's integrated
Brier score is within 0.02 of Cox's.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.calibration import calibration_curve
from sklearn.metrics import balanced_accuracy_score, brier_score_loss, roc_auc_score
from sklearn.model_selection import train_test_split
from sksurv.metrics import (
    brier_score,
    concordance_index_censored,
    concordance_index_ipcw,
    cumulative_dynamic_auc,
    integrated_brier_score,
)
from sksurv.util import Surv

from mica.study.metrics import (
    brier,
    calibration_table,
    default_tau,
    discrete_survival_at,
    evaluation_times,
    harrell_c,
    metric_names,
    response_metrics,
    survival_metrics,
    td_auc,
    uno_c,
)

EXACT = 1e-9
IBS_TOLERANCE = 0.02


# ---------------------------------------------------------------------------------------------------- real data
def _split_predictions(name: str) -> dict:
    """Train Cox and the NLL head on 70% of a scikit-survival dataset; predictions on the other 30%."""
    from lifelines import CoxPHFitter

    from mica.baselines import fit_nll_tabular, load_sksurv_dataset, prepare_covariates
    from mica.survival import risk_from_logits, survival_curve

    df, covariates, time_col, cens_col = load_sksurv_dataset(name)
    tr, te = train_test_split(np.arange(len(df)), test_size=0.3, random_state=0)
    train_df, test_df = df.iloc[tr].reset_index(drop=True), df.iloc[te].reset_index(drop=True)
    x_tr, x_te, _ = prepare_covariates(train_df, test_df, covariates)
    t_tr, e_tr = train_df[time_col].to_numpy(float), train_df[cens_col].to_numpy(float) == 0
    t_te, e_te = test_df[time_col].to_numpy(float), test_df[cens_col].to_numpy(float) == 0
    times, tau = evaluation_times(t_te, e_te), default_tau(t_te, e_te)

    cols = [f"x{i}" for i in range(x_tr.shape[1])]
    cph = CoxPHFitter(penalizer=0.01).fit(pd.DataFrame(x_tr, columns=cols).assign(T=t_tr, E=e_tr.astype(float)),
                                          duration_col="T", event_col="E")
    x_te_df = pd.DataFrame(x_te, columns=cols)
    cox = (cph.predict_log_partial_hazard(x_te_df).to_numpy(float),
           cph.predict_survival_function(x_te_df, times=times).to_numpy(float).T)   # (N,), (N,T)

    model, edges = fit_nll_tabular(x_tr, t_tr, (~e_tr).astype(float), n_bins=4)
    with torch.no_grad():
        logits = model(torch.as_tensor(x_te, dtype=torch.float32))
        nll = (risk_from_logits(logits).double().numpy(),
               discrete_survival_at(survival_curve(logits).double().numpy(), edges, times, t_end=t_tr.max()))
    return {"train": (t_tr, e_tr), "test": (t_te, e_te), "times": times, "tau": tau, "cox": cox, "nll": nll}


@pytest.fixture(scope="module", params=["veterans", "gbsg2"])
def split(request) -> tuple[str, dict]:
    return request.param, _split_predictions(request.param)


@pytest.mark.slow  # trains Cox and the NLL head on two real data sets (~10-20 s)
def test_metrics_equal_sksurv_on_real_data(split) -> None:
    name, d = split
    (t_tr, e_tr), (t_te, e_te), times, tau = d["train"], d["test"], d["times"], d["tau"]
    assert times.size == 3 and tau < t_tr.max() and t_te.max() < t_tr.max()   # sksurv can be called directly
    y_tr, y_te = Surv.from_arrays(e_tr, t_tr), Surv.from_arrays(e_te, t_te)
    ibs = {}
    for model in ("cox", "nll"):
        risk, surv = d[model]
        ours = survival_metrics(t_te, e_te, risk, surv, times, tau, t_tr, e_tr)
        assert list(ours) == metric_names(times)
        auc, auc_mean = cumulative_dynamic_auc(y_tr, y_te, risk, times)
        ref = {"c_harrell": concordance_index_censored(e_te, t_te, risk)[0],
               "c_uno": concordance_index_ipcw(y_tr, y_te, risk, tau=tau)[0],
               "td_auc_mean": auc_mean,
               **{f"td_auc@{t:g}": a for t, a in zip(times, auc)},
               **{f"brier@{t:g}": b for t, b in zip(times, brier_score(y_tr, y_te, surv, times)[1])},
               "ibs": integrated_brier_score(y_tr, y_te, surv, times)}
        for key, value in ref.items():
            assert abs(ours[key] - value) < EXACT, f"{name} {model} {key}: ours {ours[key]!r} sksurv {value!r}"
        # without training outcomes the censoring distribution is the evaluated patients' own
        own = survival_metrics(t_te, e_te, risk, surv, times, tau)
        assert abs(own["c_uno"] - concordance_index_ipcw(y_te, y_te, risk, tau=tau)[0]) < EXACT
        assert abs(own["ibs"] - integrated_brier_score(y_te, y_te, surv, times)) < EXACT
        assert np.allclose(td_auc(t_te, e_te, risk, times)[0], cumulative_dynamic_auc(y_te, y_te, risk, times)[0],
                           rtol=0, atol=EXACT)
        assert 0.6 < ours["c_uno"] < 0.85 and 0.1 < ours["ibs"] < 0.25   # both models learn something
        ibs[model] = ours["ibs"]
        print(f"{name} {model}: " + ", ".join(f"{k} {v:.4f}" for k, v in ours.items()))
    assert abs(ibs["nll"] - ibs["cox"]) <= IBS_TOLERANCE, f"{name}: IBS NLL {ibs['nll']:.4f} vs Cox {ibs['cox']:.4f}"


# ---------------------------------------------------------------------------------------------------- synthetic
def _cohort(n: int = 120, seed: int = 0, ties: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    t_event, t_cens = rng.exponential(np.exp(-x)), rng.exponential(2.0, size=n)
    t, e = np.minimum(t_event, t_cens), t_event <= t_cens
    if ties:
        t, x = np.round(t, 1) + 0.1, np.round(x, 1)
    return t, e, x


def test_clipping_beyond_training_follow_up_keeps_values() -> None:
    """Evaluated patients followed longer than the training patients: sksurv raises, ours clips them just below the
    training follow-up; the values equal sksurv's on the same data with those patients' times set to any time
    between the last evaluation time and the training follow-up (they are controls at every time point)."""
    t, e, x = _cohort(200, seed=1)
    t_tr, e_tr, _ = _cohort(150, seed=2)
    times = evaluation_times(t, e)
    assert (t > t_tr.max()).any() and times[-1] < t_tr.max()
    surv = np.exp(-np.outer(np.exp(x), times))
    y_tr = Surv.from_arrays(e_tr, t_tr)
    with pytest.raises(ValueError):
        cumulative_dynamic_auc(y_tr, Surv.from_arrays(e, t), x, times)
    t_mid = np.minimum(t, (times[-1] + t_tr.max()) / 2)            # another valid place for the long follow-ups
    y_mid = Surv.from_arrays(e, t_mid)
    assert np.allclose(td_auc(t, e, x, times, t_tr, e_tr)[0], cumulative_dynamic_auc(y_tr, y_mid, x, times)[0],
                       rtol=0, atol=EXACT)
    assert np.allclose(brier(t, e, surv, times, t_tr, e_tr), brier_score(y_tr, y_mid, surv, times)[1],
                       rtol=0, atol=EXACT)
    y = Surv.from_arrays(e, t)                                      # Uno's C needs no clipping, only tau <= max
    tau = 0.9 * t_tr.max()
    assert abs(uno_c(t, e, x, tau, t_tr, e_tr) - concordance_index_ipcw(y_tr, y, x, tau=tau)[0]) < EXACT
    assert abs(uno_c(t, e, x, 10 * t.max(), t_tr, e_tr)
               - concordance_index_ipcw(y_tr, y, x, tau=t_tr.max())[0]) < EXACT    # tau truncated
    with pytest.raises(ValueError):
        concordance_index_ipcw(y_tr, y, x, tau=10 * t.max())


def test_clipping_reads_before_the_last_time() -> None:
    """The largest time is a censoring and an event at once, so the censoring survival G is 0 there. The event is
    clipped far enough below it (``just_below``: sksurv reads any point within 2.2e-16 of 0.9 as 0.9, where G = 0)
    that td-AUC and Brier stay defined and equal sksurv's with that event moved to 0.85."""
    t = np.array([0.2, 0.3, 0.5, 0.6, 0.8, 0.9, 0.9])
    e = np.array([1, 1, 0, 1, 1, 1, 0], bool)
    x = np.array([3.0, 1.0, 0.0, 2.0, 0.5, -1.0, 0.2])
    times = np.array([0.4, 0.7])
    surv = np.linspace(0.9, 0.3, 14).reshape(7, 2)
    y, y_moved = Surv.from_arrays(e, t), Surv.from_arrays(e, np.minimum(t, 0.85))
    auc, mean = td_auc(t, e, x, times)
    ref_auc, ref_mean = cumulative_dynamic_auc(y, y_moved, x, times)
    assert np.allclose(auc, ref_auc, rtol=0, atol=EXACT) and abs(mean - ref_mean) < EXACT
    assert np.allclose(brier(t, e, surv, times), brier_score(y, y_moved, surv, times)[1], rtol=0, atol=EXACT)


def test_degenerate_cohorts_give_nan_not_errors() -> None:
    t, e, x = _cohort(30)
    times = evaluation_times(t, e)
    surv = np.full((30, times.size), 0.5)
    none = survival_metrics(t, np.zeros(30, bool), x, surv, times, default_tau(t, e))   # every patient censored
    assert list(none) == metric_names(times) and all(np.isnan(v) for v in none.values())
    assert np.isnan(harrell_c(t[:1], e[:1], x[:1]))
    assert np.isnan(uno_c(t, e, x, tau=t.min() / 2))                # no event before tau
    out = survival_metrics(t, e, x, None, [t.min() - 1, np.median(t), t.max()], None)
    assert np.isnan(out[f"td_auc@{t.min() - 1:g}"]) and np.isnan(out[f"td_auc@{t.max():g}"])
    assert np.isfinite(out[f"td_auc@{np.median(t):g}"]) and out["td_auc_mean"] == out[f"td_auc@{np.median(t):g}"]
    assert "ibs" not in out and not any(k.startswith("brier") for k in out)


def test_evaluation_times_and_tau() -> None:
    t = np.array([1.0, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    e = np.array([1, 1, 0, 1, 1, 0, 1, 1, 1, 0], bool)
    assert np.allclose(evaluation_times(t, e), np.quantile(t[e], [0.25, 0.5, 0.75]))
    assert np.allclose(evaluation_times(t, e, quantiles=(0.0, 1.0)), [])        # min and max are not inside
    assert default_tau(t, e) == pytest.approx(np.quantile(t, 0.8))
    assert evaluation_times(t, np.zeros(10, bool)).size == 0


def test_discrete_survival_at_hand_made() -> None:
    edges = np.array([0.0, 10.0, 20.0, np.inf])                      # 3 bins; S_k = P(outlive bin k)
    s = np.array([[0.9, 0.6, 0.3], [1.0, 0.5, 0.5]])
    times = np.array([-1.0, 0.0, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0])
    got = discrete_survival_at(s, edges, times, t_end=40.0)
    # knots (0,1), (10,S_0), (20,S_1), (40,S_2); constant after 40, 1 before 0
    assert np.allclose(got[0], [1.0, 1.0, 0.95, 0.9, 0.75, 0.6, 0.45, 0.3, 0.3])
    assert np.allclose(got[1], [1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.5, 0.5, 0.5])
    one = discrete_survival_at(np.array([[0.2]]), np.array([0.0, np.inf]), [0.0, 5.0, 10.0, 20.0], t_end=10.0)
    assert np.allclose(one, [[1.0, 0.6, 0.2, 0.2]])                  # one bin: a straight line to t_end
    tied = discrete_survival_at(np.array([[0.8, 0.8, 0.4]]), np.array([0.0, 5.0, 5.0, np.inf]), [5.0, 7.5], 10.0)
    assert np.allclose(tied, [[0.8, 0.6]])                           # an empty bin is a vertical step
    with pytest.raises(Exception, match="t_end"):
        discrete_survival_at(s, edges, times, t_end=15.0)


# ---------------------------------------------------------------------------------------------------- response
def test_response_metrics_equal_sklearn() -> None:
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.4
    p = np.round(np.clip(0.4 + 0.3 * (y - 0.4) + rng.normal(0, 0.2, 200), 0, 1), 2)   # ties: bin edges on data
    got = response_metrics(y, p, threshold=0.45)
    assert got["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p >= 0.45), abs=1e-12)
    assert got["brier"] == pytest.approx(brier_score_loss(y, p), abs=1e-12)
    one = response_metrics(np.ones(5), np.linspace(0.1, 0.9, 5))
    assert np.isnan(one["auc"]) and np.isnan(one["balanced_accuracy"]) and np.isfinite(one["brier"])

    table = calibration_table(y, p, n_bins=10)
    frac, mean = calibration_curve(y, p, n_bins=10, strategy="quantile")
    assert list(table.columns) == ["bin", "mean_predicted", "fraction_positive", "n"]
    assert np.allclose(table["mean_predicted"], mean) and np.allclose(table["fraction_positive"], frac)
    assert table["n"].sum() == 200
