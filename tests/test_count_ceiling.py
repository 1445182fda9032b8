"""bench/count_ceiling.py rebuilds a cohort's cells from its recorded flags: the outcome scores recomputed from the
rebuilt cells equal ground_truth.json's, and the probe inputs are finite, so its ceiling is the cohort's own."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from sample_data import make_cohort, outcomes

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("count_ceiling", ROOT / "bench" / "count_ceiling.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rebuilt_cells_give_the_cohorts_scores(tmp_path: Path) -> None:
    cohort = tmp_path / "c"
    assert make_cohort.main(["--out", str(cohort), "--slides", "5", "--patients", "4", "--tissue-mm", "0.5",
                             "--seed", "11", "--workers", "1", "--tables-only", "--log-level", "WARNING"]) == 0
    counts, gt = _bench().rebuild(cohort, 112.0)
    assert sorted(counts) == sorted(gt["slides"])
    for case, p in gt["patients"].items():
        slides = [s for s, info in gt["slides"].items() if info["case_id"] == case]
        sc = outcomes.patient_scores([counts[s]["features"] for s in slides])
        for k in ("cd8", "tcf1", "myeloid", "pdl1"):
            assert abs(sc[k] - p["scores"][k]) < 1e-5, (case, k)
    for c in counts.values():
        assert c["visible"].shape == (2,) and c["patch"].shape == (3,)
        assert np.isfinite(c["visible"]).all() and np.isfinite(c["patch"]).all()
