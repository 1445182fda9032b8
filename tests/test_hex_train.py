"""hex.train / hex.test end to end on a tiny synthetic cohort (tiny backbone, CPU).

Fast: CLI help, exact resume, evaluation outputs, clear errors, a learning sanity check. Slow (multi-process gloo
torchrun, ~10 s start-up each): 2-rank training, 2-rank evaluation == 1-rank evaluation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hex import test as hex_test
from hex import train as hex_train
from hex.data import write_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--backbone", "tiny", "--input-size", "32", "--batch-size", "8", "--workers", "0", "--lr", "1e-3",
        "--unfreeze-last", "-1"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hexcohort")
    write_synthetic_dataset(root, n_slides=4, n_per_slide=12, seed=1)
    return root


def _args(root: Path, out: Path, run: str, *extra: str) -> list[str]:
    return ["--data", str(root), "--split", str(root / "splits" / "splits_0.csv"), "--clinical",
            str(root / "clinical.csv"), "--out", str(out), "--run-name", run, *FAST, *extra]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("RANK", None)
    return env


@pytest.mark.parametrize("module", ["hex.train", "hex.test"])
def test_cli_help(module: str) -> None:
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT,
                       env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "torchrun --standalone --nproc-per-node" in r.stdout and "--out" in r.stdout


def test_two_epochs_equal_one_plus_resume(cohort: Path, tmp_path: Path) -> None:
    """Adaptive loss + FDS smoothing from epoch 1 + LDS: resuming reproduces an uninterrupted run exactly."""
    common = ["--save-every", "1", "--fds-start-smooth", "1", "--lds", "--seed", "7"]
    assert hex_train.main(_args(cohort, tmp_path, "a", "--epochs", "2", *common)) == 0
    assert hex_train.main(_args(cohort, tmp_path, "b", "--epochs", "1", *common)) == 0
    # architecture flags on resume are ignored: the checkpoint decides
    assert hex_train.main(_args(cohort, tmp_path, "b", "--epochs", "2", "--resume", "auto", "--dropout", "0.1",
                                "--unfreeze-last", "1", *common)) == 0
    a = torch.load(tmp_path / "runs/a/checkpoints/epoch_2.pt", weights_only=True)
    b = torch.load(tmp_path / "runs/b/checkpoints/epoch_2.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    assert a["model"].keys() == b["model"].keys() and any(k.startswith("fds.") for k in a["model"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["loss"]:
        assert torch.equal(a["loss"][k], b["loss"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    assert a["scheduler"] == b["scheduler"] and a["best"] == b["best"]
    assert (tmp_path / "runs/b/config_resume_epoch1.json").is_file()
    # run layout
    run = tmp_path / "runs" / "a"
    meta = json.loads((run / "best.json").read_text())
    assert meta["markers"][0] == "M00" and len(meta["markers"]) == 40 and meta["input_size"] == 32
    assert meta["backbone"] == "tiny" and meta["normalization"] is not None and "val_mean_pearson" in meta
    assert list((run / "tb").glob("events.out.tfevents.*"))
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["global_batch"] == 8 and cfg["world_size"] == 1


def test_resume_auto_without_checkpoint_starts_fresh(cohort: Path, tmp_path: Path) -> None:
    assert hex_train.main(_args(cohort, tmp_path, "fresh", "--epochs", "1", "--resume", "auto", "--no-fds",
                                "--loss", "mse", "--global-batch-size", "16")) == 0
    ck = torch.load(tmp_path / "runs/fresh/checkpoints/epoch_1.pt", weights_only=True)
    assert ck["config"]["resume"] == "auto" and len(ck["rng"]) == 1
    assert not any(k.startswith("fds.") for k in ck["model"])


def test_hex_test_outputs(cohort: Path, tmp_path: Path) -> None:
    assert hex_train.main(_args(cohort, tmp_path, "t", "--epochs", "1", "--no-fds")) == 0
    gt = cohort / "ground_truth.json"
    assert hex_test.main(["--out", str(tmp_path), "--run", "t", "--data", str(cohort), "--split",
                          str(cohort / "splits/splits_0.csv"), "--visible-markers", str(gt), "--workers", "0"]) == 0
    d = tmp_path / "runs" / "t" / "test"
    for name in ("patch_predictions.csv", "marker_pearson.csv", "slide_pearson.csv", "summary.json",
                 "marker_pearson_bar.png", "scatter_grid.png"):
        assert (d / name).is_file(), name
    pp = pd.read_csv(d / "patch_predictions.csv")
    assert len(pp) == 24 and list(pp.columns[:6]) == ["slide", "index", "x", "y", "true_M00", "true_M01"]
    assert "pred_M39" in pp.columns
    mp = pd.read_csv(d / "marker_pearson.csv")
    assert list(mp.columns) == ["marker", "pearson", "spearman", "mse", "n", "visible"]
    assert {"mean", "median", "mean_visible", "mean_invisible"} <= set(mp["marker"])
    sp = pd.read_csv(d / "slide_pearson.csv")
    assert list(sp["slide"]) == ["slide_002", "slide_003"] and "M00" in sp.columns
    # an epoch checkpoint (with FDS-free model args) evaluates the same as best.safetensors of that epoch
    assert hex_test.main(["--out", str(tmp_path), "--run", "t", "--data", str(cohort), "--checkpoint",
                          str(tmp_path / "runs/t/checkpoints/epoch_1.pt"), "--test-dir", str(tmp_path / "t2"),
                          "--slides", "slide_002", "slide_003", "--workers", "0", "--no-plots"]) == 0
    pp2 = pd.read_csv(tmp_path / "t2" / "patch_predictions.csv")
    assert np.allclose(pp2.filter(like="pred_").to_numpy(), pp.filter(like="pred_").to_numpy(), atol=1e-6)


@pytest.mark.parametrize("extra,message", [
    (["--backbone", "resnet_9000"], "unknown backbone 'resnet_9000'"),
    (["--weights", "/nonexistent/musk.safetensors"], "backbone weights file not found"),
])
def test_bad_model_flags_are_clear_errors(cohort: Path, tmp_path: Path, extra: list[str], message: str,
                                          caplog: pytest.LogCaptureFixture) -> None:
    assert hex_train.main(_args(cohort, tmp_path, "bad", "--epochs", "1", *extra)) == 2
    assert message in caplog.text


def test_patient_overlap_stops_training(cohort: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = tmp_path / "overlap.csv"
    pd.DataFrame({"train": ["slide_000", "slide_002"], "val": ["slide_001", None]}).to_csv(bad, index=False)
    args = _args(cohort, tmp_path, "overlap", "--epochs", "1")
    args[args.index("--split") + 1] = str(bad)
    assert hex_train.main(args) == 2
    assert "patients in both" in caplog.text and str(bad) in caplog.text


def test_learns_colour_labels(tmp_path: Path) -> None:
    """Sanity: labels that are functions of mean colour are learnt (val r on visible markers rises well above 0)."""
    root = tmp_path / "data"
    write_synthetic_dataset(root, n_slides=6, n_per_slide=32, n_visible=4, num_markers=8, size=64, seed=5)
    args = _args(root, tmp_path, "learn", "--epochs", "8", "--no-fds", "--loss", "mse", "--batch-size", "16",
                 "--color-jitter", "0", "0", "0", "0", "--gamma", "1.0", "--eval-every", "1")
    assert hex_train.main(args) == 0
    assert hex_test.main(["--out", str(tmp_path), "--run", "learn", "--data", str(root), "--split",
                          str(root / "splits/splits_0.csv"), "--visible-markers", str(root / "ground_truth.json"),
                          "--workers", "0", "--no-plots"]) == 0
    s = json.loads((tmp_path / "runs/learn/test/summary.json").read_text())
    assert s["mean_pearson_visible"] > 0.6, s  # from ~0 at initialisation
    assert abs(s["mean_pearson_invisible"]) < 0.5, s


# ------------------------------------------------------------------------------------------------ multi-process
def _torchrun(module: str, args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", module,
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=180)


@pytest.mark.slow
def test_torchrun_two_ranks_train_then_evaluate_like_one_rank(cohort: Path, tmp_path: Path) -> None:
    """gloo, 2 ranks: one epoch of training (FDS statistics all-reduced), then 2-rank evaluation whose predictions
    equal single-process evaluation (every sample predicted exactly once)."""
    r = _torchrun("hex.train", _args(cohort, tmp_path, "ddp", "--epochs", "1", "--fds-start-smooth", "0"))
    assert r.returncode == 0, r.stderr[-3000:]
    ck = torch.load(tmp_path / "runs/ddp/checkpoints/epoch_1.pt", weights_only=True)
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2
    assert not torch.equal(ck["rng"][0]["torch"], ck["rng"][1]["torch"])  # ranks draw different augmentations
    cfg = json.loads((tmp_path / "runs/ddp/config.json").read_text())
    assert cfg["global_batch"] == 16
    common = ["--out", str(tmp_path), "--run-name", "ddp", "--data", str(cohort), "--workers", "0", "--no-plots",
              "--batch-size", "5"]
    r = _torchrun("hex.test", [*common, "--test-dir", str(tmp_path / "two")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert hex_test.main([*common, "--test-dir", str(tmp_path / "one")]) == 0
    one = pd.read_csv(tmp_path / "one" / "patch_predictions.csv")
    two = pd.read_csv(tmp_path / "two" / "patch_predictions.csv")
    assert len(one) == len(two) == 48  # all labelled slides, no padding duplicates
    assert one[["slide", "index"]].equals(two[["slide", "index"]])
    p1, p2 = one.filter(like="pred_").to_numpy(), two.filter(like="pred_").to_numpy()
    assert np.abs(p1 - p2).max() <= 1e-6
