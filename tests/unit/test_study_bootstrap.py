"""``mica.study.bootstrap``: the fast resampled statistics equal scikit-survival on every resampled dataset, the
paired comparison behaves, and the 95% percentile interval of Harrell's C covers the population value in 92-98% of
simulated cohorts."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import brentq
from sksurv.metrics import concordance_index_censored

from mica.study.bootstrap import (
    bootstrap,
    bootstrap_response,
    bootstrap_survival,
    harrell_c_resampled,
    multiplicity,
    paired_difference,
    percentile_ci,
    resample_indices,
)
from mica.study.metrics import (
    default_tau,
    evaluation_times,
    harrell_c,
    metric_names,
    response_metrics,
    survival_metrics,
)

EXACT = 1e-12


def _cohort(n: int, seed: int, ties: bool = True, censor_rate: float = 0.5):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    t_event, t_cens = rng.exponential(np.exp(-x)), rng.exponential(1 / censor_rate, size=n)
    t, e = np.minimum(t_event, t_cens), t_event <= t_cens
    if ties:                                  # many tied times (events with events, events with censorings)
        t, x = np.round(t, 1) + 0.1, np.round(x, 1)   # and many tied risks
    return t, e, x


def _sksurv_c(t, e, r) -> float:
    try:
        return float(concordance_index_censored(e, t, r)[0])
    except ValueError:                        # all censored / no comparable pair
        return float("nan")


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return bool(np.array_equal(np.isnan(a), np.isnan(b)) and np.all(np.abs(a - b)[~np.isnan(a)] <= EXACT))


# ---------------------------------------------------------------------------------------------------- resamples
def test_resample_indices_and_multiplicity() -> None:
    idx = resample_indices(7, n_boot=5, seed=3)
    assert idx.shape == (5, 7) and idx.dtype == np.int64 and idx.min() >= 0 and idx.max() < 7
    assert np.array_equal(idx, resample_indices(7, n_boot=5, seed=3))
    assert not np.array_equal(idx, resample_indices(7, n_boot=5, seed=4))
    w = multiplicity(idx, 7)
    assert np.array_equal(w.sum(axis=1), np.full(5, 7.0))
    assert all(np.array_equal(w[b], np.bincount(idx[b], minlength=7)) for b in range(5))


def test_fast_harrell_equals_sksurv_on_every_resample_with_ties() -> None:
    for seed, n, ties in ((0, 40, True), (1, 60, False), (2, 8, True)):
        t, e, x = _cohort(n, seed, ties, censor_rate=4.0 if n == 8 else 0.5)
        idx = resample_indices(n, n_boot=300, seed=seed)
        fast = harrell_c_resampled(t, e, x, idx, block_elems=97)          # tiny blocks: the blocking is exercised
        ref = np.array([_sksurv_c(t[i], e[i], x[i]) for i in idx])
        assert _same(fast, ref), f"seed {seed}: max diff {np.nanmax(np.abs(fast - ref))}"
        if n == 8:
            assert np.isnan(ref).any()                                       # degenerate resamples are exercised


@pytest.mark.parametrize("with_train", [False, True])
def test_bootstrap_survival_rows_equal_survival_metrics(with_train: bool) -> None:
    """Row b of the fast bootstrap == survival_metrics (sksurv) on resample b, every column, incl. NaN patterns."""
    logging.disable(logging.WARNING)
    try:
        for seed, n in ((0, 50), (1, 12)):
            t, e, x = _cohort(n, seed)
            times, tau = evaluation_times(t, e), default_tau(t, e)
            surv = np.random.default_rng(seed).random((n, times.size))
            train = _cohort(80, seed + 10)[:2] if with_train else (None, None)
            idx = resample_indices(n, n_boot=60, seed=seed)
            fast = bootstrap_survival(t, e, x, surv, times, tau, idx, *train, block_elems=101)
            slow = bootstrap(lambda i, t=t, e=e, x=x, s=surv, ts=times, tau=tau, tr=train:
                             survival_metrics(t[i], e[i], x[i], s[i], ts, tau, *tr), idx)
            assert list(fast.columns) == metric_names(times) == list(slow.columns)
            for col in fast.columns:
                assert _same(fast[col], slow[col]), f"seed {seed} {col}"
    finally:
        logging.disable(logging.NOTSET)


def test_bootstrap_nan_for_failing_resamples_and_response() -> None:
    idx = resample_indices(10, n_boot=6, seed=0)

    def fn(i: np.ndarray) -> dict[str, float]:
        if i[0] % 2:
            raise ValueError("degenerate")
        return {"a": float(i.sum()), "b": 1.0}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = bootstrap(fn, idx)
    assert list(out.columns) == ["a", "b"] and len(out) == 6
    assert out["a"].isna().to_numpy().tolist() == [bool(i[0] % 2) for i in idx]



def test_fast_response_bootstrap_equals_sklearn_per_resample() -> None:
    rng = np.random.default_rng(0)
    for n, pos in ((60, 0.4), (6, 0.2)):                                 # the small one has one-class resamples
        y = rng.random(n) < pos
        p = np.round(np.clip(0.3 + 0.3 * y + rng.normal(0, 0.2, n), 0, 1), 1)   # tied probabilities
        idx = resample_indices(n, n_boot=200, seed=n)
        fast = bootstrap_response(y, p, idx, threshold=0.45)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            slow = bootstrap(lambda i, y=y, p=p: response_metrics(y[i], p[i], threshold=0.45), idx)
        assert list(fast.columns) == list(slow.columns) == ["auc", "balanced_accuracy", "brier"]
        for col in fast.columns:
            assert _same(fast[col], slow[col]), f"n={n} {col}"
        if n == 6:
            assert fast["auc"].isna().any()


# ---------------------------------------------------------------------------------------------------- intervals
def test_percentile_ci_order_statistics() -> None:
    boot = pd.DataFrame({"m": np.arange(1000, dtype=float)[::-1], "empty": np.nan})
    ci = percentile_ci({"m": 500.0, "empty": 1.0, "absent": 2.0}, boot).set_index("metric")
    assert (ci.loc["m", "lo"], ci.loc["m", "hi"]) == (24.0, 975.0)        # 25th smallest, 25th largest
    assert np.isnan(ci.loc["empty", "lo"]) and np.isnan(ci.loc["absent", "hi"])
    assert ci.loc["m", "value"] == 500.0


def test_paired_difference_identical_and_better_rows() -> None:
    t, e, x = _cohort(150, 5, ties=False)
    idx = resample_indices(150, n_boot=500, seed=0)
    times, tau = evaluation_times(t, e), default_tau(t, e)
    noise = np.random.default_rng(1).normal(0, 3, 150)
    rows = {"good": x, "noisy": x + noise}
    surv = {k: np.exp(-np.outer(np.exp(r - r.mean()), times)) for k, r in rows.items()}
    point = {k: survival_metrics(t, e, r, surv[k], times, tau) for k, r in rows.items()}
    boot = {k: bootstrap_survival(t, e, r, surv[k], times, tau, idx) for k, r in rows.items()}

    same = paired_difference(point["good"], point["good"], boot["good"], boot["good"]).set_index("metric")
    assert (same[["delta", "lo", "hi"]] == 0).all().all() and (same["p"] == 1).all()

    diff = paired_difference(point["good"], point["noisy"], boot["good"], boot["noisy"]).set_index("metric")
    print(diff.round(4).to_string())
    for m in ("c_harrell", "c_uno"):
        assert diff.loc[m, "lo"] > 0 and diff.loc[m, "p"] < 0.05
        assert diff.loc[m, "rel_improvement"] == pytest.approx(diff.loc[m, "delta"] / point["noisy"][m])
    assert diff.loc["ibs", "rel_improvement"] == pytest.approx(
        (point["noisy"]["ibs"] - point["good"]["ibs"]) / point["noisy"]["ibs"])          # error: (b - a) / b
    assert (diff.loc["ibs", "rel_improvement"] > 0) == (point["good"]["ibs"] < point["noisy"]["ibs"])

    with pytest.raises(Exception, match="same resample"):
        paired_difference(point["good"], point["noisy"], boot["good"], boot["noisy"].iloc[:10])


def test_interval_excludes_zero_exactly_when_p_below_alpha() -> None:
    rng = np.random.default_rng(0)
    for trial in range(300):
        b = int(rng.choice([40, 99, 100, 1000]))
        shift = rng.normal(0, 0.05)
        d = np.round(rng.normal(shift, 0.02, b), int(rng.integers(1, 4)))   # rounding: many exact zeros
        level = float(rng.choice([0.9, 0.95]))
        out = paired_difference({"m": 0.0}, {"m": 0.0}, pd.DataFrame({"m": d}), pd.DataFrame({"m": 0 * d}),
                                level=level).iloc[0]
        excludes = out["lo"] > 0 or out["hi"] < 0
        assert excludes == (out["p"] < round(1 - level, 12)), (trial, b, level, out.to_dict())


# ---------------------------------------------------------------------------------------------------- coverage
BETA = 1.0            # hazard exp(BETA x), x ~ N(0,1); risk score = x
CENSORED = 0.30       # share of censored patients (independent exponential censoring)
N_PAIRS = 4_000_000   # Monte-Carlo pairs for the population value


def _censoring_rate() -> float:
    """Rate mu of the exponential censoring time with P(censored) = E[mu / (exp(BETA x) + mu)] = CENSORED."""
    x, w = np.polynomial.hermite_e.hermegauss(80)
    w = w / w.sum()
    return float(brentq(lambda mu: np.sum(w * mu / (np.exp(BETA * x) + mu)) - CENSORED, 1e-6, 1e3))


def _population_harrell_c(mu: float) -> tuple[float, float]:
    """Harrell's C of the population (the limit of the estimator under this censoring) and its Monte-Carlo error.

    For independent patients i, j: P(i's event is observed before j leaves follow-up | x_i, x_j) = lambda_i /
    (lambda_i + lambda_j + 2 mu) (exponential times, lambda = exp(BETA x)); C = E[w 1(x_i > x_j)] / E[w]. Estimated
    on N_PAIRS independent pairs with these exact weights (no event times drawn), standard error by the delta method.
    """
    rng = np.random.default_rng(12345)
    xi, xj = rng.normal(size=(2, N_PAIRS))
    li, lj = np.exp(BETA * xi), np.exp(BETA * xj)
    w = li / (li + lj + 2 * mu)
    a = w * (xi > xj)
    c = a.mean() / w.mean()
    return float(c), float(((a - c * w) / w.mean()).std() / np.sqrt(N_PAIRS))


def _simulate(rng: np.random.Generator, n: int, mu: float):
    x = rng.normal(size=n)
    t_event, t_cens = rng.exponential(np.exp(-BETA * x)), rng.exponential(1 / mu, size=n)
    return np.minimum(t_event, t_cens), t_event <= t_cens, x


@pytest.mark.slow  # 200 cohorts x 1,000 resamples, plus a 20,000-patient check (~15 s)
def test_bootstrap_ci_of_harrell_c_covers_population_value() -> None:
    mu = _censoring_rate()
    c_pop, mc_error = _population_harrell_c(mu)
    rng = np.random.default_rng(2024)
    t, e, x = _simulate(rng, 20_000, mu)                    # the formula agrees with a large simulated cohort
    big = harrell_c_resampled(t, e, x, np.arange(20_000)[None, :])[0]
    print(f"\npopulation Harrell's C {c_pop:.4f} (MC error {mc_error:.5f}, {N_PAIRS:,} pairs); "
          f"20,000 simulated patients: {big:.4f}, censored {1 - e.mean():.3f}")
    assert mc_error < 5e-4 and abs(big - c_pop) < 0.01 and abs((1 - e.mean()) - CENSORED) < 0.02

    covered, widths = 0, []
    n_cohorts, n_patients = 200, 150
    for k in range(n_cohorts):
        t, e, x = _simulate(rng, n_patients, mu)
        boot = harrell_c_resampled(t, e, x, resample_indices(n_patients, n_boot=1000, seed=k))
        ci = percentile_ci({"c": harrell_c(t, e, x)}, pd.DataFrame({"c": boot})).iloc[0]
        covered += ci["lo"] <= c_pop <= ci["hi"]
        widths.append(ci["hi"] - ci["lo"])
    coverage = covered / n_cohorts
    print(f"95% CI of Harrell's C covers the population value in {coverage:.1%} of {n_cohorts} cohorts of "
          f"{n_patients} (mean width {np.mean(widths):.3f})")
    assert 0.92 <= coverage <= 0.98
