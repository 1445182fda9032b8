"""mica.test + mica.attribution on a model trained on planted-signal bags: metrics files, plots, IG layout,
completeness, and that the planted patches get the largest attributions."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from mica import test as mtest
from mica import train as mt
from mica.attribution.integrated_gradients import integrated_gradients, read_ig_h5, split_to_slides
from tests.fixtures import write_synthetic_bags

FAST = ["--encoder", "synth", "--codex-encoder", "synth_codex", "--model-dim", "32", "--epochs", "8",
        "--grad-accum", "4", "--lr", "2e-3", "--workers", "0", "--seed", "1", "--folds", "0"]


@pytest.fixture(scope="module")
def tested(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("mica_ig")
    truth = write_synthetic_bags(root, n_patients=30, n_folds=2, seed=0)
    assert mt.main(["--cohort", str(root), "--out", str(root), "--run-name", "r", *FAST]) == 0
    assert mtest.main(["--out", str(root), "--run-name", "r", "--ig", "--workers", "0"]) == 0
    return root / "mica_runs" / "r", truth


@pytest.mark.slow
def test_metrics_predictions_and_plots(tested: tuple[Path, dict]) -> None:
    run, _ = tested
    pred = pd.read_csv(run / "fold_0/test_predictions.csv")
    assert {"fold", "case_id", "slides", "time", "censorship", "risk", "risk_group"} <= set(pred.columns)
    assert pred["case_id"].is_unique and set(pred["risk_group"]) <= {"high", "low"}
    s = pd.read_csv(run / "test/summary.csv", dtype={"fold": str})
    assert list(s["fold"]) == ["0", "mean", "sd"]
    assert s["c_index"][0] > 0.6 and 0 <= s["logrank_p"][0] <= 1 and np.isfinite(s["td_auc_mean"][0])
    # the c-index equals the training run's on the same (kept) model
    assert s["c_index"][0] == pytest.approx(pd.read_csv(run / "summary.csv")["c_index"][0])
    # the risk threshold is the median of the TRAINING fold's risks (not the val fold's)
    thr = s["risk_threshold"][0]
    assert ((pred["risk"] > thr) == (pred["risk_group"] == "high")).all()
    assert thr != pytest.approx(float(np.median(pred["risk"])))
    td = pd.read_csv(run / "test/td_auc.csv")
    assert len(td) >= 1 and td["auc"].between(0, 1).all()
    for png in ("test/km_fold0.png", "test/km_all_folds.png", "ig/codex_attribution_bar.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert json.loads((run / "test/summary.json").read_text())["ig"]["slides"] == len(list((run / "ig").glob("*.h5")))


@pytest.mark.slow
def test_ig_files_layout_and_completeness(tested: tuple[Path, dict]) -> None:
    run, _ = tested
    root = run.parents[1]
    val = pd.read_csv(root / "splits/splits_0.csv")["val"].dropna().tolist()
    assert sorted(p.stem for p in (run / "ig").glob("*.h5")) == sorted(val)
    for s in val:
        d = read_ig_h5(run / "ig" / f"{s}.h5")
        with h5py.File(root / "features/synth/h5_files" / f"{s}.h5") as f:
            assert np.array_equal(d["coords"], f["coords"][:])
        assert d["path_attr"].shape == (len(d["coords"]),) and d["codex_attr"].shape == (40,)
        a = d["attrs"]
        assert a["baseline"] == "zero" and a["steps"] == 50 and a["target"] == "risk" and len(a["markers"]) == 40
        assert (run / "ig" / f"{s}_heatmap.png").is_file()
    ig = pd.read_csv(run / "ig/ig_summary.csv")
    diff = (ig["f_x"] - ig["f_baseline"]).abs()
    assert (ig["delta_abs"] <= 0.05 * diff + 1e-4).all(), ig          # completeness within 5 %
    # a patient's attributions, summed over all of its slides' files, give f(x) - f(baseline)
    for case, g in ig.groupby("case_id"):
        total = sum(float(read_ig_h5(run / "ig" / f"{s}.h5")["path_attr"].sum()
                          + read_ig_h5(run / "ig" / f"{s}.h5")["codex_attr"].sum()) for s in g["slide"])
        assert total == pytest.approx(g["f_x"].iloc[0] - g["f_baseline"].iloc[0], rel=0.05, abs=1e-4), case
    bar = pd.read_csv(run / "ig/codex_attribution.csv")
    assert list(bar.columns[:4]) == ["marker", "mean", "sd", "mean_abs"] and len(bar) == 40


@pytest.mark.slow
def test_planted_patches_get_the_largest_attributions(tested: tuple[Path, dict]) -> None:
    run, truth = tested
    labels, scores, per_slide = [], [], []
    for p in (run / "ig").glob("*.h5"):
        planted = truth["planted"][p.stem]
        attr = read_ig_h5(p)["path_attr"]
        labels.append(planted)
        scores.append(attr)
        if 0 < planted.sum() < len(planted):
            per_slide.append(roc_auc_score(planted, attr))
    auroc = roc_auc_score(np.concatenate(labels), np.concatenate(scores))
    assert auroc >= 0.7 and np.median(per_slide) >= 0.7, (auroc, np.median(per_slide))


@pytest.mark.slow
def test_rerun_skips_done_slides(tested: tuple[Path, dict]) -> None:
    run, _ = tested
    h5 = next((run / "ig").glob("*.h5"))
    before = h5.stat().st_mtime_ns
    assert mtest.main(["--out", str(run.parents[1]), "--run-name", "r", "--ig", "--workers", "0"]) == 0
    assert h5.stat().st_mtime_ns == before


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["path", "codex"])
def test_single_modality_ig_and_slide_split(tmp_path: Path, mode: str) -> None:
    """Random-init models, one two-slide patient: per-slide arrays and completeness of the captum integral."""
    from mica.dataset import FeatureSource, build_fold
    from mica.model import MICA
    from pipeline.tables import read_clinical_table

    write_synthetic_bags(tmp_path, n_patients=6, n_folds=2, seed=1, two_slide_every=3)
    _, val, _ = build_fold(read_clinical_table(tmp_path / "clinical.csv"), tmp_path / "splits/splits_0.csv",
                           FeatureSource(tmp_path, "synth", "synth_codex"), mode=mode)
    torch.manual_seed(0)
    model = MICA(mode=mode, path_dim=16, codex_dim=8, d=32)
    i = max(range(len(val)), key=lambda j: len(val.units[j].slides))
    item = val[i]
    res = integrated_gradients(model, item, "survival", mode, steps=50, internal_batch_size=7)
    parts = split_to_slides(res, item)
    assert list(parts) == item["slides"]
    if mode == "path":
        assert [len(p["path_attr"]) for p in parts.values()] == item["slide_sizes"]
        assert all(np.isnan(p["codex_attr"]).all() for p in parts.values())
        total = res["path_attr"].sum()
    else:
        assert all(p["path_attr"].shape == (0,) and p["codex_attr"].shape == (40,) for p in parts.values())
        total = res["codex_attr"].sum()
    assert total == pytest.approx(res["f_x"] - res["f_baseline"], rel=0.05, abs=1e-5)
