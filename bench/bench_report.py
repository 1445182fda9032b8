"""Benchmark: the bootstrap of the outcome statistics (``mica.study.bootstrap``) against patients and resamples.

    python -m bench.bench_report                                   # 250..2000 patients x 100..1000 resamples
    python -m bench.bench_report --patients 2000 --resamples 1000  # the headline number only
    python -m bench.bench_report --patients 500 --resamples 100 --no-reference   # quick

Synthetic cohort: x ~ N(0,1), exponential event times with hazard exp(x), independent exponential censoring
(~30% censored); the risk is x, the survival curves the true ones at the 25/50/75% event-time quantiles.
For every (patients, resamples) it times one row of a report:

* ``point_s``: ``survival_metrics`` once on all patients (scikit-survival);
* ``harrell_s``: ``harrell_c_resampled`` (the weighted pair counts) alone;
* ``boot_s``: ``bootstrap_survival`` without training outcomes (each resample's own censoring Kaplan-Meier):
  Harrell's and Uno's C, td-AUC at 3 times and their mean, Brier at 3 times and the IBS, all resamples;
* ``boot_train_s``: the same with training outcomes (the censoring distribution fixed);
* ``response_s``: ``bootstrap_response`` (sklearn per resample) on a 0/1 label of the same patients.

``sksurv_s`` (``--reference``, on by default) is what the same bootstrap costs with ``survival_metrics`` called
on every resample, measured on 20 resamples and scaled to the resample count. Times are wall seconds (one run
each; a shared machine makes them noisy), with the process's CPU seconds of ``boot_s`` beside them. The pair work
is ``(2 + T) B N E`` multiply-adds (B resamples, N patients, E events, T time points): linear in the resamples,
quadratic in the patients.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import numpy as np
import pandas as pd

from mica.study.bootstrap import (
    BLOCK_ELEMS,
    bootstrap,
    bootstrap_response,
    bootstrap_survival,
    harrell_c_resampled,
    resample_indices,
)
from mica.study.metrics import default_tau, evaluation_times, survival_metrics

REFERENCE_RESAMPLES = 20


def synthetic_cohort(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``time, event, risk (N,)``, ``surv (N,3)`` at ``times (3,)``, ``label (N,)`` of a known risk model."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    t_event, t_cens = rng.exponential(np.exp(-x)), rng.exponential(1 / 0.36, size=n)   # ~30% censored
    time_, event = np.minimum(t_event, t_cens), t_event <= t_cens
    times = evaluation_times(time_, event)
    return {"time": time_, "event": event, "risk": x, "times": times,
            "surv": np.exp(-np.outer(np.exp(x), times)), "label": rng.random(n) < 1 / (1 + np.exp(-x))}


def _timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def bench_one(n: int, b: int, reference: bool, seed: int = 0) -> dict[str, float]:
    """Seconds for each part of one report row's bootstrap at ``n`` patients and ``b`` resamples."""
    d = synthetic_cohort(n, seed)
    t, e, r, s, times = d["time"], d["event"], d["risk"], d["surv"], d["times"]
    tau = default_tau(t, e)
    idx, idx_s, _ = _timed(lambda: resample_indices(n, n_boot=b, seed=seed))
    _, point_s, _ = _timed(lambda: survival_metrics(t, e, r, s, times, tau))
    _, harrell_s, _ = _timed(lambda: harrell_c_resampled(t, e, r, idx))
    boot, boot_s, boot_cpu = _timed(lambda: bootstrap_survival(t, e, r, s, times, tau, idx))
    _, boot_train_s, _ = _timed(lambda: bootstrap_survival(t, e, r, s, times, tau, idx, t, e))
    _, response_s, _ = _timed(lambda: bootstrap_response(d["label"], 1 / (1 + np.exp(-r)), idx))
    row = {"patients": n, "resamples": b, "events": int(e.sum()), "indices_s": idx_s, "point_s": point_s,
           "harrell_s": harrell_s, "boot_s": boot_s, "boot_cpu_s": boot_cpu, "boot_train_s": boot_train_s,
           "response_s": response_s, "nan_rows": int(boot.isna().any(axis=1).sum())}
    if reference:
        k = min(b, REFERENCE_RESAMPLES)
        _, ref_s, _ = _timed(lambda: bootstrap(lambda i: survival_metrics(t[i], e[i], r[i], s[i], times, tau),
                                               idx[:k]))
        row["sksurv_s"] = ref_s * b / k
    return row


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Time of the bootstrap of the survival statistics against patients "
                                "and resamples (synthetic cohort).")
    p.add_argument("--patients", type=int, nargs="+", default=[250, 500, 1000, 2000],
                   help="cohort sizes; the resample sweep uses the largest")
    p.add_argument("--resamples", type=int, nargs="+", default=[100, 300, 1000],
                   help="bootstrap resamples; the patient sweep uses the largest")
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                   help=f"also time scikit-survival per resample ({REFERENCE_RESAMPLES} resamples, scaled)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    warnings.simplefilter("ignore")
    warm = synthetic_cohort(50)                     # imports and first calls out of the timings
    survival_metrics(warm["time"], warm["event"], warm["risk"], warm["surv"], warm["times"], None)
    bootstrap_response(warm["label"], warm["surv"][:, 0], resample_indices(50, 2))
    n_max, b_max = max(args.patients), max(args.resamples)
    grid = [(n, b_max) for n in sorted(set(args.patients))]
    grid += [(n_max, b) for b in sorted(set(args.resamples)) if b != b_max]
    rows = []
    for n, b in grid:
        rows.append(bench_one(n, b, args.reference, args.seed))
        print(f"  {n} patients x {b} resamples: bootstrap_survival {rows[-1]['boot_s']:.2f} s", flush=True)
    table = pd.DataFrame(rows)
    cols = [c for c in table.columns if c.endswith("_s")]
    table[cols] = table[cols].round(3)
    by_n = table[table["resamples"] == b_max].sort_values("patients")
    by_b = table[table["patients"] == n_max].sort_values("resamples")
    print(f"\nbootstrap of one report row: 3 time points, blocks of {BLOCK_ELEMS:,} matrix entries; seconds")
    print(f"\ngrowth with patients ({b_max} resamples):\n{by_n.to_string(index=False)}")
    print(f"\ngrowth with resamples ({n_max} patients):\n{by_b.to_string(index=False)}")
    head = by_n.iloc[-1]
    print(f"\n{n_max} patients x {b_max} resamples: bootstrap_survival {head['boot_s']:.2f} s "
          f"(with training outcomes {head['boot_train_s']:.2f} s, Harrell's C alone {head['harrell_s']:.2f} s, "
          f"response {head['response_s']:.2f} s"
          + (f"; scikit-survival per resample would take ~{head['sksurv_s']:.0f} s" if args.reference else "")
          + ")")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
