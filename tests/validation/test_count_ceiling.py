"""bench.count_ceiling rebuilds a cohort's cells from its recorded flags: the outcome scores recomputed from the
rebuilt cells equal ground_truth.json's, and the probe inputs are finite, so its ceiling is the cohort's own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench import count_ceiling
from bench.mica_ceiling import logistic_probe as probe
from sample_data import make_cohort, outcomes


def test_rebuilt_cells_give_the_cohorts_scores(tmp_path: Path) -> None:
    cohort = tmp_path / "c"
    assert make_cohort.main(["--out", str(cohort), "--slides", "5", "--patients", "4", "--tissue-mm", "0.5",
                             "--seed", "11", "--workers", "1", "--tables-only", "--log-level", "WARNING"]) == 0
    counts, gt = count_ceiling.rebuild(cohort, 112.0)
    assert sorted(counts) == sorted(gt["slides"])
    for case, p in gt["patients"].items():
        slides = [s for s, info in gt["slides"].items() if info["case_id"] == case]
        sc = outcomes.patient_scores([counts[s]["features"] for s in slides])
        for k in ("cd8", "tcf1", "myeloid", "pdl1"):
            assert abs(sc[k] - p["scores"][k]) < 1e-5, (case, k)
    for c in counts.values():
        assert c["visible"].shape == (2,) and c["patch"].shape == (3,)
        assert np.isfinite(c["visible"]).all() and np.isfinite(c["patch"]).all()


def test_logistic_probe_scores_the_validation_side() -> None:
    ids = [f"s{i}" for i in range(40)]
    y = {s: i % 2 for i, s in enumerate(ids)}
    X = {s: np.array([y[s] + 0.01 * i]) for i, s in enumerate(ids)}          # separable: AUC 1
    splits = [(ids[:30], ids[30:]), (ids[10:], ids[:10])]
    assert probe(X, y, splits) == (1.0, 0.0)
    assert probe({s: -x for s, x in X.items()}, y, splits, fit=False) == (0.0, 0.0)


@pytest.mark.slow
def test_exact_counts_find_the_risk_mask_patches(tmp_path: Path) -> None:
    """The IG yardstick: per-patch counts of the cells the risk counts, on a 224 px grid, rank the risk-mask
    patches far above chance (fails when cells and mask are misaligned, e.g. x and y swapped)."""
    import json

    import pandas as pd

    cohort, out = tmp_path / "c", tmp_path / "out"
    assert make_cohort.main(["--out", str(cohort), "--slides", "3", "--patients", "3", "--tissue-mm", "0.8",
                             "--seed", "5", "--workers", "1", "--tables-only", "--log-level", "WARNING"]) == 0
    gt = json.loads((cohort / "ground_truth.json").read_text())
    (out / "markers").mkdir(parents=True)
    for s, info in gt["slides"].items():
        h, w = info["he_shape"]
        xy = [(x, y) for y in range(0, h - 223, 224) for x in range(0, w - 223, 224)]
        pd.DataFrame(xy, columns=["x", "y"]).to_csv(out / "markers" / f"{s}.csv", index=False)
    counts, _ = count_ceiling.rebuild(cohort, 112.0, out)
    refs = [c["ig_ref"] for c in counts.values() if c["ig_ref"]]
    assert refs
    assert np.mean([r["cells the risk counts"] for r in refs]) > 0.85
