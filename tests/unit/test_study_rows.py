"""mica.study.predictions / rows / external: out-of-fold pooling on the training patients' scale, the fold checks of
compared runs, the training cohort's cut-off of the ensemble, and the reference row (no model training)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mica.external import training_cutoff, training_ensemble
from mica.study.predictions import FoldTable, RunTables, out_of_fold
from mica.study.rows import check_same_folds, internal_rows, read_truth
from pipeline.errors import PipelineError


def _run(name: str, mode: str, seed: int = 0, shift: float = 0.0) -> RunTables:
    """3 folds of 10 patients; fold k's model scores risk = true + noise + k (a per-fold offset) + shift."""
    rng = np.random.default_rng(seed)
    cases = [f"p{i:02d}" for i in range(30)]
    true = rng.normal(size=30)
    time = np.exp(-true) * 50
    cens = (rng.uniform(size=30) < 0.2).astype(int)
    folds = []
    for k in range(3):
        val = np.arange(30) % 3 == k

        def table(mask: np.ndarray, k: int = k) -> pd.DataFrame:
            risk = true[mask] + rng.normal(0, 0.3, mask.sum()) + 10 * k + shift
            return pd.DataFrame({"case_id": np.array(cases)[mask], "slides": np.array(cases)[mask],
                                 "time": time[mask], "censorship": cens[mask], "risk": risk,
                                 "surv_0": 0.9, "surv_1": 0.7, "surv_2": 0.5, "surv_3": 0.3})
        folds.append(FoldTable(k, table(val), table(~val), np.array([0, 10, 30, 60, np.inf]), float(time.max())))
    return RunTables(name, Path(name), "survival", mode, folds)


def test_out_of_fold_puts_every_fold_on_its_training_scale() -> None:
    run = _run("a", "coattn")
    oof, surv = out_of_fold(run, np.array([5.0, 20.0]))
    assert len(oof) == 30 and oof["case_id"].is_unique and surv.shape == (30, 2)
    for f in run.folds:
        m = oof["fold"] == f.fold
        tr = f.train["risk"]
        np.testing.assert_allclose(oof.loc[m, "score"], (f.val["risk"] - tr.mean()) / tr.std(ddof=0))
        np.testing.assert_array_equal(oof.loc[m, "high"], f.val["risk"].to_numpy() > np.median(tr))
    # the per-fold offsets (+10 k) are gone: pooled z-scores all lie within a few sd of 0
    assert oof["score"].abs().max() < 6
    assert oof["risk"].max() - oof["risk"].min() > 15  # the raw risks are not comparable across folds


def test_compared_runs_need_the_same_folds() -> None:
    a, b = _run("a", "coattn"), _run("b", "path")
    check_same_folds(a, b)
    b.folds[1].val = b.folds[1].val.iloc[:-1]
    with pytest.raises(PipelineError, match="fold 1: runs a and b validate on other patients"):
        check_same_folds(a, b)
    with pytest.raises(PipelineError, match="other folds"):
        check_same_folds(a, RunTables("c", Path("c"), "survival", "codex", a.folds[:2]))


def test_internal_rows_clinical_and_truth(tmp_path) -> None:
    a, b = _run("a", "coattn"), _run("b", "path", seed=1)
    ids = a.case_ids
    clinical = pd.DataFrame({"age": np.linspace(40, 80, 30), "stage": np.arange(30) % 4 + 1},
                            index=sorted(ids))
    clinical["survival_months"] = pd.concat([f.val for f in a.folds]).set_index("case_id").loc[clinical.index, "time"]
    clinical["censorship"] = pd.concat([f.val for f in a.folds]).set_index("case_id").loc[clinical.index,
                                                                                            "censorship"]
    truth_csv = tmp_path / "truth.csv"
    pd.DataFrame({"case_id": ids, "risk": np.arange(30.0)}).to_csv(truth_csv, index=False)
    cohort, rows, groups, notes = internal_rows(a, [b], clinical, ["age", "stage"], np.array([5.0, 20.0]),
                                                read_truth(truth_csv, "survival"))
    assert [r.name for r in rows] == ["coattn", "path", "clinical", "coattn+clinical", "truth"]
    assert all(len(r.score) == 30 and np.isfinite(r.score).all() for r in rows)
    assert rows[2].surv.shape == (30, 2) and rows[-1].surv is None
    np.testing.assert_array_equal(rows[-1].score, np.arange(30.0)[[ids.index(c) for c in cohort.case_id]])
    assert groups.dtype == bool and notes
    pd.DataFrame({"case_id": ids[:5], "risk": 1.0}).to_csv(truth_csv, index=False)
    with pytest.raises(PipelineError, match="no value for 25 patients"):
        internal_rows(a, [], None, [], None, read_truth(truth_csv, "survival"))


def test_ensemble_cutoff_is_the_median_over_the_training_cohort() -> None:
    run = _run("a", "coattn")
    ens = training_ensemble(run).set_index("case_id")
    assert len(ens) == 30
    c = "p04"
    want = np.mean([pd.concat([f.val, f.train]).set_index("case_id").loc[c, "risk"] for f in run.folds])
    assert ens.loc[c, "risk"] == pytest.approx(want)
    assert training_cutoff(run) == pytest.approx(float(np.median(ens["risk"])))
