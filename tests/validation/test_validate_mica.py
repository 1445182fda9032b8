"""bench.validate_mica's verdict: coattn above clinical (paired CI of the difference above 0) for each task, and the
survival model's per-fold mean within 0.05 of the cohort's exact H&E-visible ceiling; a miss is exit status 1."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from bench import validate_mica
from pipeline import artifacts as art


def _report(d: Path, metric: str, coattn: float, delta_lo: float, folds: list[float]) -> None:
    d.mkdir(parents=True)
    pd.DataFrame([("coattn", metric, coattn, coattn - 0.04, coattn + 0.04),
                  ("clinical", metric, 0.55, 0.50, 0.60)],
                 columns=["row", "metric", "value", "lo", "hi"]).to_csv(d / "report.csv", index=False)
    pd.DataFrame([("coattn", "clinical", metric, coattn - 0.55, delta_lo, coattn - 0.5, 0.001, 0.3)],
                 columns=["row_a", "row_b", "metric", "delta", "lo", "hi", "p", "rel_improvement"]
                 ).to_csv(d / "comparisons.csv", index=False)
    pd.DataFrame([("coattn", k, metric, v) for k, v in enumerate(folds)],
                 columns=["row", "fold", "metric", "value"]).to_csv(d / "report_folds.csv", index=False)


@pytest.mark.parametrize(("folds", "want"), [([0.78, 0.76, 0.77], 0), ([0.75, 0.76, 0.77], 1)])
def test_the_ceiling_gap_is_a_target(tmp_path: Path, folds: list[float], want: int) -> None:
    out = tmp_path / "out"
    _report(art.MICA_REPORT.dir(out, run="val_coattn_survival"), "c_harrell", 0.76, 0.1, folds)
    _report(art.MICA_REPORT.dir(out, run="val_coattn_response"), "auc", 0.76, 0.05, [0.7, 0.8])
    rc = validate_mica.report(out, None, {}, ceiling=(0.814, 0.02, 0.1))
    text = (out / "validation.md").read_text()
    assert rc == want
    gap = 0.814 - sum(folds) / len(folds)
    assert f"gap {gap:.3f} (target <= 0.05)" in text
    assert ("below the H&E-visible ceiling" in text) == (want == 1)


def test_coattn_not_above_clinical_is_a_miss(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _report(art.MICA_REPORT.dir(out, run="val_coattn_survival"), "c_harrell", 0.76, 0.1, [0.8, 0.8])
    _report(art.MICA_REPORT.dir(out, run="val_coattn_response"), "auc", 0.60, -0.02, [0.6])
    assert validate_mica.report(out, None, {}, ceiling=(0.814, 0.02, 0.1)) == 1
    text = (out / "validation.md").read_text()
    assert "response internal, 5-fold out of fold: coattn - clinical CI not above 0" in text
