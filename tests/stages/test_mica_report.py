"""Stage 09's outcome report and the independent-cohort path (issue 17) on synthetic bags with a planted signal:
the report's rows, files and CIs; the paired comparisons of every pair; the external path reproducing each fold's
own validation risks; and an independent cohort with other features stopping with one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from sksurv.metrics import concordance_index_censored

from mica import compare as mc
from mica import test as mtest
from mica import train as mt
from tests.fixtures import write_synthetic_bags

pytestmark = pytest.mark.slow  # trains two small runs (~20 s)

TRAIN = ["--encoder", "synth", "--codex-encoder", "synth_codex", "--model-dim", "16", "--epochs", "2",
         "--grad-accum", "4", "--lr", "3e-3", "--workers", "0", "--seed", "1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """36 patients, 3 folds; runs ``p`` (path) and ``c`` (codex), tested, with a truth CSV."""
    root = tmp_path_factory.mktemp("report")
    gt = write_synthetic_bags(root, n_patients=36, n_folds=3, seed=2, two_slide_every=6)
    pd.DataFrame({"case_id": list(gt["risk"]), "risk": list(gt["risk"].values())}).to_csv(root / "truth.csv",
                                                                                         index=False)
    for name, mode in (("c", "codex"), ("p", "path")):
        assert mt.main(["--cohort", str(root), "--out", str(root), "--run-name", name, "--mode", mode,
                        "--folds", "0", "1", "2", *TRAIN]) == 0
    assert mtest.main(["--out", str(root), "--run-name", "c", "--no-report"]) == 0
    assert mtest.main(["--out", str(root), "--run-name", "p", "--compare", "c", "--truth", str(root / "truth.csv"),
                       "--bootstrap", "60", "--covariates", "age"]) == 0
    return root, gt


def test_report_rows_files_and_cis(runs) -> None:
    root, _ = runs
    d = root / "mica_runs/p/test"
    rep = pd.read_csv(d / "report.csv")
    assert list(rep.columns) == ["row", "metric", "value", "lo", "hi"]
    assert set(rep["row"]) == {"path", "codex", "clinical", "path+clinical", "truth"}
    c = rep[rep["metric"] == "c_harrell"].set_index("row")
    assert (c["lo"] <= c["value"]).all() and (c["value"] <= c["hi"]).all()
    assert c.loc["truth", "value"] > 0.85  # the planted risk itself
    # pooled out of fold: each fold's val risks z-scored with its training patients' risks, then one Harrell's C
    parts = []
    for k in range(3):
        val = pd.read_csv(root / f"mica_runs/p/fold_{k}/test_predictions.csv")
        train = pd.read_csv(root / f"mica_runs/p/fold_{k}/train_predictions.csv")
        parts.append(val.assign(z=(val["risk"] - train["risk"].mean()) / train["risk"].std(ddof=0)))
    oof = pd.concat(parts)
    want = concordance_index_censored(oof["censorship"].to_numpy() == 0, oof["time"].to_numpy(), oof["z"].to_numpy())
    assert c.loc["path", "value"] == pytest.approx(want[0], abs=1e-12)
    ibs = rep[rep["metric"] == "ibs"].set_index("row")["value"]
    assert np.isfinite(ibs[["path", "codex", "clinical", "path+clinical"]]).all() and "truth" not in ibs.index
    comp = pd.read_csv(d / "comparisons.csv")
    assert list(comp.columns) == ["row_a", "row_b", "metric", "delta", "lo", "hi", "p", "rel_improvement"]
    pairs = {(a, b) for a, b in zip(comp["row_a"], comp["row_b"])}
    assert len(pairs) == 10  # every pair of the 5 rows
    folds = pd.read_csv(d / "report_folds.csv")
    assert set(folds["fold"]) == {0, 1, 2}
    md = (d / "report.md").read_text()
    assert "| **path** |" in md and "path vs clinical" in md and "Multivariable Cox" in md
    for f in ("km_risk_groups.png", "forest_cox.png", "compare_c_harrell.png", "cox_multivariable.csv"):
        assert (d / f).is_file(), f
    info = json.loads((d / "report.json").read_text())
    assert info["bootstrap"]["resamples"] == 60 and len(info["times"]) >= 1


def test_compare_cli_rebuilds_the_same_report(runs, tmp_path) -> None:
    root, _ = runs
    assert mc.main(["--out", str(root), "--runs", "p", "c", "--truth", str(root / "truth.csv"), "--bootstrap", "60",
                    "--covariates", "age", "--dest", str(tmp_path)]) == 0
    a = pd.read_csv(root / "mica_runs/p/test/report.csv")
    b = pd.read_csv(tmp_path / "report.csv")
    pd.testing.assert_frame_equal(a, b)  # seeded: the same numbers


def test_external_path_on_the_runs_own_cohort_reproduces_each_folds_val_risk(runs) -> None:
    root, _ = runs
    assert mtest.main(["--out", str(root), "--run-name", "c", "--external-out", str(root), "--external-cohort",
                       str(root), "--external-name", "self", "--no-report"]) == 0
    assert mtest.main(["--out", str(root), "--run-name", "p", "--external-out", str(root), "--external-cohort",
                       str(root), "--external-name", "self", "--bootstrap", "30", "--covariates", "age",
                       "--compare", "c"]) == 0
    d = root / "mica_runs/p/external/self"
    pred = pd.read_csv(d / "predictions.csv", dtype={"case_id": str}).set_index("case_id")
    assert {"risk", "risk_fold0", "risk_fold1", "risk_fold2", "risk_group", "time", "censorship"} <= set(pred.columns)
    np.testing.assert_allclose(pred["risk"], pred[["risk_fold0", "risk_fold1", "risk_fold2"]].mean(axis=1))
    for k in range(3):
        val = pd.read_csv(root / f"mica_runs/p/fold_{k}/test_predictions.csv", dtype={"case_id": str})
        np.testing.assert_allclose(pred.loc[val["case_id"], f"risk_fold{k}"].to_numpy(), val["risk"].to_numpy(),
                                   rtol=1e-6, atol=1e-6)
    rep = pd.read_csv(d / "report.csv")
    assert {"path", "path fold 0", "codex", "clinical", "path+clinical"} <= set(rep["row"])


def test_external_without_outcome_gives_the_risk_table_only(runs, tmp_path, caplog) -> None:
    root, _ = runs
    ext = tmp_path / "ext"
    shutil.copytree(root / "features", ext / "features")
    assert mtest.main(["--out", str(root), "--run-name", "p", "--external-out", str(ext)]) == 0
    d = root / "mica_runs/p/external/ext"
    pred = pd.read_csv(d / "predictions.csv")
    assert len(pred) == len(list((ext / "features/synth/pt_files").glob("*.pt")))  # one patient per slide
    assert "time" not in pred and set(pred["risk_group"]) <= {"high", "low"}
    assert not (d / "report.csv").exists()
    assert "no outcome" in caplog.records[-1].getMessage()


def _error_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


def test_external_with_another_encoder_stops_with_one_line(runs, tmp_path, caplog) -> None:
    root, _ = runs
    ext = tmp_path / "ext2"
    shutil.copytree(root / "features", ext / "features")
    for h5 in (ext / "features/synth/h5_files").glob("*.h5"):
        with h5py.File(h5, "a") as f:
            f.attrs["encoder"] = "musk"
    assert mtest.main(["--out", str(root), "--run-name", "p", "--external-out", str(ext)]) == 2
    err = _error_lines(caplog)
    assert len(err) == 1 and "\n" not in err[0] and "made by encoder musk, the run's by synth" in err[0]


def test_external_with_other_encoder_weights_stops(runs, tmp_path, caplog) -> None:
    root, _ = runs
    ext = tmp_path / "ext3"
    shutil.copytree(root / "features", ext / "features")
    slides = [p.stem for p in (root / "features/synth/h5_files").glob("*.h5")]
    for base, sha in ((root, "a" * 64), (ext, "b" * 64)):
        done = base / "features/synth/done"
        done.mkdir(exist_ok=True)
        for s in slides:
            (done / f"{s}.json").write_text(json.dumps({"schema": 1, "settings": {
                "encoder": "synth", "weights": "file", "weights_sha256": sha}}))
    try:
        assert mtest.main(["--out", str(root), "--run-name", "p", "--external-out", str(ext)]) == 2
    finally:
        shutil.rmtree(root / "features/synth/done")
    err = _error_lines(caplog)
    assert len(err) == 1 and "H&E bags were made otherwise than the run's" in err[0] and "b" * 64 in err[0]


def test_response_report(tmp_path) -> None:
    """A response run: AUC, balanced accuracy and Brier with CIs, the clinical rows, ROC with its band and the
    calibration curve; the external path writes prob and prob_fold{k}."""
    write_synthetic_bags(tmp_path, n_patients=30, n_folds=2, seed=4, two_slide_every=0)
    assert mt.main(["--cohort", str(tmp_path), "--out", str(tmp_path), "--run-name", "r", "--mode", "codex",
                    "--task", "response", "--folds", "0", "1", *TRAIN]) == 0
    assert mtest.main(["--out", str(tmp_path), "--run-name", "r", "--bootstrap", "40", "--covariates", "age"]) == 0
    d = tmp_path / "mica_runs/r/test"
    rep = pd.read_csv(d / "report.csv")
    assert set(rep["row"]) == {"codex", "clinical", "codex+clinical"}
    assert set(rep["metric"]) == {"auc", "balanced_accuracy", "brier"}
    auc = rep[(rep["metric"] == "auc") & (rep["row"] == "codex")].iloc[0]
    pooled = pd.concat(pd.read_csv(d.parent / f"fold_{k}/test_predictions.csv") for k in range(2))
    from sklearn.metrics import roc_auc_score

    assert auc["value"] == pytest.approx(roc_auc_score(pooled["response"], pooled["prob"]), abs=1e-12)
    for f in ("roc.png", "calibration.png", "calibration.csv", "compare_auc.png"):
        assert (d / f).is_file(), f
    assert mtest.main(["--out", str(tmp_path), "--run-name", "r", "--external-out", str(tmp_path),
                       "--external-cohort", str(tmp_path), "--external-name", "self", "--bootstrap", "20"]) == 0
    pred = pd.read_csv(tmp_path / "mica_runs/r/external/self/predictions.csv")
    assert {"prob", "prob_fold0", "prob_fold1", "response"} <= set(pred.columns)
