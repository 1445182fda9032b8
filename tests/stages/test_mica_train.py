"""mica.train on tiny synthetic bags (a planted feature drives risk): learning, outputs, resume, --keep, errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mica import train as mt
from mica.survival import c_index
from tests.fixtures import write_synthetic_bags

FAST = ["--encoder", "synth", "--codex-encoder", "synth_codex", "--model-dim", "32", "--epochs", "8",
        "--grad-accum", "4", "--lr", "2e-3", "--workers", "0", "--seed", "1"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mica_train")
    write_synthetic_bags(root, n_patients=30, n_folds=2, seed=0)
    return root


def _args(root: Path, run: str, *extra: str) -> list[str]:
    return ["--cohort", str(root), "--out", str(root), "--run-name", run, *FAST, *extra]


@pytest.fixture(scope="module")
def run_a(cohort: Path) -> Path:
    """The reference run: 2 folds, uninterrupted."""
    assert mt.main(_args(cohort, "a", "--folds", "0", "1")) == 0
    return cohort / "mica_runs" / "a"


@pytest.mark.slow
def test_learns_the_planted_signal_and_writes_outputs(run_a: Path) -> None:
    summary = pd.read_csv(run_a / "summary.csv", dtype={"fold": str})
    assert list(summary["fold"]) == ["0", "1", "mean", "sd"]
    per_fold = summary["c_index"][:2].to_numpy()
    assert per_fold.min() > 0.65, per_fold                         # chance is 0.5
    assert summary["c_index"][2] == pytest.approx(per_fold.mean())
    assert summary["c_index"][3] == pytest.approx(per_fold.std(ddof=1))
    for k in (0, 1):
        fd = run_a / f"fold_{k}"
        meta = json.loads((fd / "checkpoint.json").read_text())
        assert meta["complete"] and meta["epoch"] == 7 and meta["keep"] == "last"
        assert len(meta["bin_edges"]) == 5 and meta["model_args"]["d"] == 32
        pred = pd.read_csv(fd / "val_predictions.csv")
        assert {"case_id", "slides", "time", "censorship", "risk", "y_bin"} <= set(pred.columns)
        assert c_index(pred["time"], pred["censorship"], pred["risk"]) == pytest.approx(per_fold[k])
        assert (fd / "checkpoint.safetensors").is_file() and not (fd / "state.pt").exists()
        assert list((fd / "tb").glob("events.out.tfevents.*"))
        assert len(pd.read_csv(fd / "history.csv")) == 8
    cfg = json.loads((run_a / "config.json").read_text())
    assert cfg["mode"] == "coattn" and cfg["lr"] == 2e-3


class _Killed(Exception):
    pass


@pytest.mark.slow
def test_resume_after_kill_reproduces_the_uninterrupted_run(cohort: Path, run_a: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    assert mt.main(_args(cohort, "b", "--folds", "0")) == 0        # "killed" after fold 0
    f0 = cohort / "mica_runs/b/fold_0/checkpoint.safetensors"
    mtime = f0.stat().st_mtime_ns
    real, calls = mt.predict, {"n": 0}

    def dying_predict(*a, **kw):                                    # kill fold 1 during its 4th validation
        calls["n"] += 1
        if calls["n"] == 4:
            raise _Killed
        return real(*a, **kw)

    monkeypatch.setattr(mt, "predict", dying_predict)
    with pytest.raises(_Killed):
        mt.main(_args(cohort, "b", "--folds", "0", "1"))
    assert (cohort / "mica_runs/b/fold_1/state.pt").is_file()
    monkeypatch.setattr(mt, "predict", real)
    assert mt.main(_args(cohort, "b", "--folds", "0", "1")) == 0   # fold 0 skipped, fold 1 resumes at epoch 4
    assert f0.stat().st_mtime_ns == mtime
    for k in (0, 1):
        a = pd.read_csv(run_a / f"fold_{k}/val_predictions.csv")
        b = pd.read_csv(cohort / f"mica_runs/b/fold_{k}/val_predictions.csv")
        np.testing.assert_allclose(b["risk"], a["risk"], rtol=0, atol=1e-6)
    ha, hb = (pd.read_csv(cohort / f"mica_runs/{r}/fold_1/history.csv") for r in ("a", "b"))
    np.testing.assert_allclose(hb["train_loss"], ha["train_loss"], atol=1e-6)
    sa, sb = (pd.read_csv(cohort / f"mica_runs/{r}/summary.csv") for r in ("a", "b"))
    np.testing.assert_allclose(sb["c_index"], sa["c_index"], atol=1e-9)


@pytest.mark.slow
def test_keep_best_keeps_the_best_validation_epoch(cohort: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scripted validation metric (best at epoch 1 of 4): the checkpoint and val_predictions are epoch 1's."""
    from mica.checkpoint import load_fold_model

    scripted, seen = iter([0.5, 0.9, 0.6, 0.9]), []
    real_predict = mt.predict

    def recording_predict(*a, **kw):
        out = real_predict(*a, **kw)
        seen.append(out[0])
        return out

    monkeypatch.setattr(mt, "predict", recording_predict)
    monkeypatch.setattr(mt, "score", lambda pred, task: next(scripted))
    assert mt.main(_args(cohort, "best", "--folds", "0", "--keep", "best", "--epochs", "4")) == 0
    fd = cohort / "mica_runs/best/fold_0"
    meta = json.loads((fd / "checkpoint.json").read_text())
    assert meta["epoch"] == 1 and meta["metrics"]["c_index"] == 0.9 and meta["complete"]
    assert len(seen) == 4 and not np.allclose(seen[1]["risk"], seen[3]["risk"])
    np.testing.assert_allclose(pd.read_csv(fd / "val_predictions.csv")["risk"], seen[1]["risk"], atol=1e-6)
    model, _ = load_fold_model(fd, mt.resolve_device("cpu"))        # the saved weights are epoch 1's
    args = mt.build_parser().parse_args(_args(cohort, "best", "--folds", "0"))
    _, val_ds, _ = mt.build_fold(mt.read_clinical_table(cohort / "clinical.csv"), cohort / "splits/splits_0.csv",
                                 mt.feature_source(mt.make_config(args)), edges=np.asarray(meta["bin_edges"]))
    np.testing.assert_allclose(real_predict(model, val_ds, mt.resolve_device("cpu"), "survival")[0]["risk"],
                               seen[1]["risk"], atol=1e-6)
    summary = pd.read_csv(cohort / "mica_runs/best/summary.csv")
    assert summary["epoch"][0] == 2 and summary["c_index"][0] == 0.9


@pytest.mark.slow
def test_changed_settings_on_an_existing_run_are_an_error(cohort: Path, run_a: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    assert mt.main(_args(cohort, "a", "--folds", "0", "1", "--lr", "1e-4")) == 2
    assert "exists with other settings" in caplog.text and "'lr': (0.002, 0.0001)" in caplog.text


def test_response_task_and_other_modes(cohort: Path) -> None:
    short = ["--folds", "0", "--epochs", "2"]
    assert mt.main(_args(cohort, "resp", *short, "--task", "response", "--mode", "path")) == 0
    s = pd.read_csv(cohort / "mica_runs/resp/summary.csv")
    assert "auc" in s.columns and np.isfinite(s["auc"][0])
    pred = pd.read_csv(cohort / "mica_runs/resp/fold_0/val_predictions.csv")
    assert {"response", "prob", "logit"} <= set(pred.columns) and pred["prob"].between(0, 1).all()
    assert mt.main(_args(cohort, "cx", *short, "--mode", "codex", "--unit", "slide")) == 0
    pred = pd.read_csv(cohort / "mica_runs/cx/fold_0/val_predictions.csv")
    assert pred["slides"].str.contains(";").sum() == 0              # one row per slide


def test_bad_input_exits_2_with_one_line(cohort: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert mt.main(["--cohort", str(tmp_path), "--out", str(tmp_path), *FAST]) == 2
    assert "clinical table" in caplog.text and "does not exist" in caplog.text
    assert "torchrun --standalone --nproc-per-node" in mt.build_parser().format_help()


@pytest.mark.slow
def test_ctrl_c_mid_fold_exits_130_with_one_line_and_the_rerun_resumes(cohort: Path, monkeypatch: pytest.MonkeyPatch,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    real, calls = mt.predict, {"n": 0}

    def interrupted_predict(*a, **kw):                              # Ctrl-C during the 2nd epoch's validation
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(mt, "predict", interrupted_predict)
    args = _args(cohort, "ctrl_c", "--folds", "0", "--epochs", "3")
    assert mt.main(args) == 130
    assert caplog.records[-1].getMessage() == (
        "mica.train: interrupted (Ctrl-C); run the same command again to resume (finished folds are skipped, a fold "
        "stopped mid-way continues after its last finished epoch)")
    assert "Traceback" not in caplog.text and (cohort / "mica_runs/ctrl_c/fold_0/state.pt").is_file()
    monkeypatch.setattr(mt, "predict", real)
    caplog.clear()
    assert mt.main(args) == 0
    assert "fold 0: resuming after epoch 0" in caplog.text
    assert caplog.records[-1].getMessage().startswith("mica.train ctrl_c: folds 0 trained, 1 resumed (0), 0 skipped")


def test_fold_parallel_without_a_process_group(cohort: Path, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """Under torchrun (RANK, WORLD_SIZE set; no process group) the i-th fold goes to rank i % WORLD_SIZE; the last
    process to finish writes summary.csv."""
    caplog.set_level(logging.INFO)                                    # restored after the test (rank 1 logs warnings)
    run = cohort / "mica_runs/par"
    args = _args(cohort, "par", "--folds", "0", "1", "--epochs", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        assert mt.main(args) == 0
        assert (run / f"fold_{rank}/checkpoint.json").is_file()
        assert (run / "fold_0").exists() == (rank == 0) and (run / "summary.csv").is_file() == (rank == 0)
    assert list(pd.read_csv(run / "summary.csv", dtype={"fold": str})["fold"]) == ["0", "1", "mean", "sd"]
