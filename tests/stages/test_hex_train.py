"""hex.train / hex.test end to end on a tiny synthetic cohort (CPU).

Fast: CLI help; flag defaults from the backbone's recipe; resuming across the backbone-freeze and FDS-stop epochs
equals an uninterrupted run (and ``--keep-last`` prunes); resuming with other run-defining flags stops naming them;
``--device cuda`` without a usable GPU stops naming CUDA; the last, partial accumulation group is scaled by its own
size; a collapsed marker counts as r = 0 in model selection; hex.test outputs and its normalisation check; clear
errors; a learning sanity check. Slow (real gloo ranks): 2-rank training with batch b equals 1-rank training with
batch 2b; 2-rank evaluation equals 1-rank evaluation; an error on one rank stops every rank.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bench.synthetic_hex_data import write_synthetic_dataset
from hex.data.transforms import BatchTransform
from hex.evaluate import stage as hex_test
from hex.losses import build_loss
from hex.model import HEX
from hex.train import stage as hex_train
from hex.train.config import TrainConfig, resolve_recipe
from hex.train.epoch import TrainStep, selection_score, train_one_epoch
from pipeline.cli import config_from_args
from pipeline.dist import cuda_problem
from pipeline.errors import PipelineError

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--backbone", "tiny", "--input-size", "32", "--batch-size", "8", "--workers", "0"]  # tiny recipe otherwise
MUSK_KW = '{"embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64, "img_size": 32}'


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hexcohort")
    write_synthetic_dataset(root, n_slides=4, n_per_slide=12, seed=1)
    return root


def _args(root: Path, out: Path, run: str, *extra: str, fast: bool = True) -> list[str]:
    return ["--data", str(root), "--split", str(root / "splits" / "splits_0.csv"), "--clinical",
            str(root / "clinical.csv"), "--out", str(out), "--run-name", run, *(FAST if fast else []), *extra]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return env


def _ck(out: Path, run: str, epoch: int) -> dict:
    return torch.load(out / "runs" / run / "checkpoints" / f"epoch_{epoch}.pt", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("module", ["hex.train", "hex.test"])
def test_cli_help(module: str) -> None:
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT,
                       env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "torchrun --standalone --nproc-per-node" in r.stdout and "--out" in r.stdout


def test_defaults_come_from_the_backbone_recipe() -> None:
    def ns(*argv: str) -> TrainConfig:
        args = hex_train.build_parser().parse_args(["--data", "d", "--split", "s", "--out", "o", *argv])
        return config_from_args(TrainConfig, args)

    a = resolve_recipe(ns("--backbone", "tiny"))
    info = a.recipe_info
    assert (a.lr, a.gamma, a.lr_floor, a.unfreeze_last, a.batch_size, a.lds) == (1e-3, 0.95, 0.1, -1, 32, True)
    assert info["recipe"] == "scratch" and info["warning"] is None
    a = resolve_recipe(ns("--backbone", "tiny", "--lr", "5e-4", "--no-lds", "--unfreeze-last", "2"))  # flags win
    assert (a.lr, a.lds, a.unfreeze_last, a.batch_size) == (5e-4, False, 2, 32)
    a = resolve_recipe(ns("--backbone", "musk", "--weights", "musk.safetensors"))  # the paper's fine-tuning recipe
    assert a.recipe_info["recipe"] == "pretrained"
    assert (a.lr, a.gamma, a.lr_floor, a.unfreeze_last, a.batch_size, a.lds) == (1e-5, 0.95, 0.0, 4, 48, False)
    a = resolve_recipe(ns("--backbone", "musk"))  # meant to be pretrained: scratch recipe + a loud warning
    info = a.recipe_info
    assert a.unfreeze_last == -1 and a.lr > 1e-5 and "meant to be fine-tuned" in info["warning"]
    with pytest.raises(PipelineError, match="--require-weights"):
        resolve_recipe(ns("--backbone", "dinov2_vits14_reg", "--require-weights"))


@pytest.mark.slow
def test_resume_across_freeze_and_fds_stop_equals_one_run(cohort: Path, tmp_path: Path) -> None:
    """Adaptive loss + FDS (smoothing from epoch 1, off from 3) + LDS, backbone frozen from epoch 2: 1 + 2 + 1 epochs
    with two resumes (one across the freeze, one across the FDS stop from a frozen checkpoint) = 4 epochs."""
    common = ["--save-every", "1", "--freeze-backbone-epoch", "2", "--fds-stop-epoch", "3", "--fds-start-smooth", "1",
              "--seed", "7", "--resume", "auto"]
    assert hex_train.main(_args(cohort, tmp_path, "a", "--epochs", "4", "--keep-last", "2", *common)) == 0
    for epochs in ("1", "3", "4"):
        assert hex_train.main(_args(cohort, tmp_path, "b", "--epochs", epochs, *common)) == 0
    a, b = _ck(tmp_path, "a", 4), _ck(tmp_path, "b", 4)
    assert not _ck(tmp_path, "b", 1)["backbone_frozen"] and _ck(tmp_path, "b", 3)["backbone_frozen"]
    assert a["model"].keys() == b["model"].keys() and any(k.startswith("fds.") for k in a["model"])
    for part in ("model", "loss"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    assert a["scheduler"] == b["scheduler"] and a["best"] == b["best"]
    assert sorted(p.name for p in (tmp_path / "runs/a/checkpoints").iterdir()) == ["epoch_3.pt", "epoch_4.pt"]
    assert (tmp_path / "runs/b/config_resume_epoch1.json").is_file()
    # a finished run with the same flags: nothing to do, exit 0, checkpoint untouched
    before = (tmp_path / "runs/b/checkpoints/epoch_4.pt").stat().st_mtime_ns
    assert hex_train.main(_args(cohort, tmp_path, "b", "--epochs", "4", *common)) == 0
    assert (tmp_path / "runs/b/checkpoints/epoch_4.pt").stat().st_mtime_ns == before
    # run layout; defaults from the tiny recipe
    run = tmp_path / "runs" / "a"
    meta = json.loads((run / "best.json").read_text())
    assert meta["markers"][0] == "M00" and len(meta["markers"]) == 40 and meta["input_size"] == 32
    assert meta["backbone"] == "tiny" and meta["normalization"] is not None and "val_collapsed" in meta
    assert list((run / "tb").glob("events.out.tfevents.*"))
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["global_batch"] == 8 and cfg["world_size"] == 1 and cfg["recipe"]["recipe"] == "scratch"
    assert (cfg["lr"], cfg["unfreeze_last"], cfg["lds"], cfg["warnings"]) == (1e-3, -1, True, [])


def test_resume_with_other_run_flags_stops_naming_them(cohort: Path, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    assert hex_train.main(_args(cohort, tmp_path, "r", "--epochs", "1", "--no-fds", "--resume", "auto")) == 0
    other_split = tmp_path / "splits_1.csv"  # another fold's file (same content here)
    shutil.copy(cohort / "splits" / "splits_0.csv", other_split)
    for extra, key in ((["--backbone", "timm:resnet10t"], "backbone"), (["--unfreeze-last", "1"], "unfreeze_last"),
                       (["--loss", "mse"], "loss")):
        caplog.clear()
        assert hex_train.main(_args(cohort, tmp_path, "r", "--epochs", "2", "--no-fds", "--resume", "auto",
                                    *extra)) == 2, key
        assert "trained with other settings" in caplog.text and f"{key}: checkpoint" in caplog.text, caplog.text
    caplog.clear()
    args = _args(cohort, tmp_path, "r", "--epochs", "2", "--no-fds", "--resume", "auto")
    args[args.index("--split") + 1] = str(other_split)
    assert hex_train.main(args) == 2
    assert "split: checkpoint" in caplog.text and "use a new --run-name" in caplog.text
    assert _ck(tmp_path, "r", 1)["epoch"] == 1 and not (tmp_path / "runs/r/checkpoints/epoch_2.pt").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a usable GPU")
def test_cuda_without_a_usable_gpu_stops_naming_cuda(cohort: Path, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    assert hex_train.main(_args(cohort, tmp_path, "gpu", "--epochs", "1", "--device", "cuda")) == 2
    assert "needs CUDA" in caplog.text and not (tmp_path / "runs" / "gpu" / "checkpoints").exists()
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CPU-only build" in cuda_problem()
    monkeypatch.setattr(torch.version, "cuda", "13.0")

    def too_old() -> None:
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 11040).")

    monkeypatch.setattr(torch.cuda, "init", too_old)
    msg = cuda_problem()
    assert "too old (found version 11040)" in msg and "CUDA 13.0" in msg and "older CUDA" in msg


def test_partial_accumulation_group_is_scaled_by_its_size() -> None:
    """6 micro-batches, accumulation 4: steps on the mean gradient of micro-batches 0-3, then of 4-5 (plain SGD, so
    any other scaling of the last group shows in the weights)."""
    torch.manual_seed(0)
    n, b = 24, 4
    imgs = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    labels = torch.rand(n, 3)
    data = [(imgs[i], labels[i], i) for i in range(n)]
    loader = torch.utils.data.DataLoader(data, batch_size=b, shuffle=False)
    model = HEX("musk", num_markers=3, unfreeze_last=-1, head_dropout=0.0, **json.loads(MUSK_KW))
    ref = copy.deepcopy(model)
    tf = BatchTransform(32, model.mean, model.std)
    step = TrainStep(model, build_loss("mse", 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    train_one_epoch(step, step, opt, scaler, loader, tf, None, 0, 4, None, torch.device("cpu"), False, None, False)
    ref_step, ref_opt = TrainStep(ref, build_loss("mse", 3)).train(), torch.optim.SGD(ref.parameters(), lr=0.5)
    batches = list(loader)
    for group in (batches[:4], batches[4:]):
        ref_opt.zero_grad()
        for img, y, _ in group:
            (ref_step(tf(img), y, 0)[0] / len(group)).backward()
        ref_opt.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_collapsed_marker_counts_as_zero_in_model_selection() -> None:
    rng = np.random.default_rng(0)
    y = rng.random((50, 4))
    p = y + rng.normal(0, 0.2, (50, 4))
    p[:, 1] = 0.3  # collapsed prediction: r undefined, counted as 0
    y[:, 3] = 0.5  # constant labels: undefined for every model, left out
    score, r, collapsed = selection_score(y, p)
    assert collapsed == 1 and r[1] == 0 and np.isnan(r[3])
    assert score == pytest.approx((r[0] + r[2]) / 3)


@pytest.mark.slow
def test_hex_test_outputs_and_normalisation_check(cohort: Path, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
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
    common = ["--out", str(tmp_path), "--run", "t", "--data", str(cohort), "--checkpoint",
              str(tmp_path / "runs/t/checkpoints/epoch_1.pt"), "--slides", "slide_002", "slide_003", "--workers", "0",
              "--no-plots"]
    assert hex_test.main([*common, "--test-dir", str(tmp_path / "t2")]) == 0
    pp2 = pd.read_csv(tmp_path / "t2" / "patch_predictions.csv")
    assert np.allclose(pp2.filter(like="pred_").to_numpy(), pp.filter(like="pred_").to_numpy(), atol=1e-6)
    # labels normalised with other percentiles than the training labels: an error, unless allowed
    other = tmp_path / "markers_other"
    shutil.copytree(cohort / "markers", other)
    norm = json.loads((other / "normalization.json").read_text())
    norm["values"][1][5] = 2.0
    (other / "normalization.json").write_text(json.dumps(norm))
    caplog.clear()
    assert hex_test.main([*common, "--markers-dir", str(other), "--test-dir", str(tmp_path / "t3")]) == 2
    assert "normalization.json differs" in caplog.text and "M05" in caplog.text
    assert hex_test.main([*common, "--markers-dir", str(other), "--test-dir", str(tmp_path / "t3"),
                          "--allow-normalization-mismatch"]) == 0


@pytest.mark.parametrize("extra,message", [
    (["--backbone", "resnet_9000"], "unknown backbone 'resnet_9000'"),
    (["--weights", "/nonexistent/musk.safetensors"], "backbone weights file not found"),
    (["--clinical", "/nonexistent/clinical.csv"], "--clinical /nonexistent/clinical.csv: file not found"),
])
def test_bad_flags_are_clear_errors(cohort: Path, tmp_path: Path, extra: list[str], message: str,
                                    caplog: pytest.LogCaptureFixture) -> None:
    assert hex_train.main(_args(cohort, tmp_path, "bad", "--epochs", "1", *extra)) == 2
    assert message in caplog.text
    assert not (tmp_path / "runs" / "bad").exists()  # found before anything is written


def test_patient_overlap_stops_training(cohort: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = tmp_path / "overlap.csv"
    pd.DataFrame({"train": ["slide_000", "slide_002"], "val": ["slide_001", None]}).to_csv(bad, index=False)
    args = _args(cohort, tmp_path, "overlap", "--epochs", "1")
    args[args.index("--split") + 1] = str(bad)
    assert hex_train.main(args) == 2
    assert "patients in both" in caplog.text and str(bad) in caplog.text


@pytest.mark.slow
def test_learns_colour_labels(tmp_path: Path) -> None:
    """Sanity: labels that are functions of mean colour are learnt (val r on visible markers rises well above 0)."""
    root = tmp_path / "data"
    write_synthetic_dataset(root, n_slides=6, n_per_slide=32, n_visible=4, num_markers=8, size=64, seed=5)
    args = _args(root, tmp_path, "learn", "--epochs", "8", "--no-fds", "--loss", "mse", "--batch-size", "16",
                 "--color-jitter", "0", "0", "0", "0", "--gamma", "1.0", "--no-lds")
    assert hex_train.main(args) == 0
    assert hex_test.main(["--out", str(tmp_path), "--run", "learn", "--data", str(root), "--split",
                          str(root / "splits/splits_0.csv"), "--visible-markers", str(root / "ground_truth.json"),
                          "--workers", "0", "--no-plots"]) == 0
    s = json.loads((tmp_path / "runs/learn/test/summary.json").read_text())
    assert s["mean_pearson_visible"] > 0.6, s  # from ~0 at initialisation
    assert abs(s["mean_pearson_invisible"]) < 0.5, s


# ------------------------------------------------------------------------------------------------ multi-process
# deterministic flags for the rank-equivalence test: a backbone without batch statistics (a tiny MUSK), no dropout,
# no augmentation; adaptive loss (its parameters are averaged by DDP too), FDS smoothing from epoch 1, LDS
DDP_FLAGS = ["--backbone", "musk", "--backbone-kw", MUSK_KW, "--workers", "0", "--dropout", "0", "--no-flips",
             "--color-jitter", "0", "0", "0", "0", "--epochs", "2", "--fds-start-smooth", "1", "--lds",
             "--save-every", "1", "--lr", "1e-4"]


def _torchrun(module: str, args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", module,
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=180)


@pytest.fixture(scope="module")
def ddp_run(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 gloo ranks x batch 4, 2 epochs (3 steps each) of a tiny MUSK; returns OUT (run ``ddp``)."""
    out = tmp_path_factory.mktemp("ddp")
    r = _torchrun("hex.train", _args(cohort, out, "ddp", "--batch-size", "4", *DDP_FLAGS, fast=False))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.slow
def test_two_ranks_batch_b_equal_one_rank_batch_2b(cohort: Path, ddp_run: Path, tmp_path: Path) -> None:
    assert hex_train.main(_args(cohort, tmp_path, "one", "--batch-size", "8", *DDP_FLAGS, fast=False)) == 0
    two, one = _ck(ddp_run, "ddp", 2), _ck(tmp_path, "one", 2)
    assert two["world_size"] == 2 and len(two["rng"]) == 2 and one["world_size"] == 1
    assert not torch.equal(two["rng"][0]["torch"], two["rng"][1]["torch"])  # ranks draw different augmentations
    cfg = json.loads((ddp_run / "runs/ddp/config.json").read_text())
    assert cfg["global_batch"] == 8 and "meant to be fine-tuned" in cfg["warnings"][0]
    for part in ("model", "loss"):
        assert two[part].keys() == one[part].keys()
        for k in two[part]:
            torch.testing.assert_close(two[part][k].float(), one[part][k].float(), rtol=0, atol=1e-5,
                                       msg=f"{part} {k}")
    moved = max(float((two["model"][k] - _ck(ddp_run, "ddp", 1)["model"][k]).abs().max()) for k in two["model"]
                if k.startswith("regression_head"))
    assert moved > 1e-4  # the weights did change between epochs: the comparison is not between two initialisations


@pytest.mark.slow
def test_two_rank_evaluation_equals_one_rank(cohort: Path, ddp_run: Path, tmp_path: Path) -> None:
    common = ["--out", str(ddp_run), "--run-name", "ddp", "--data", str(cohort), "--workers", "0", "--no-plots",
              "--batch-size", "5", "--allow-train-slides"]  # every labelled slide, the training ones too
    r = _torchrun("hex.test", [*common, "--test-dir", str(tmp_path / "two")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert hex_test.main([*common, "--test-dir", str(tmp_path / "one")]) == 0
    one = pd.read_csv(tmp_path / "one" / "patch_predictions.csv")
    two = pd.read_csv(tmp_path / "two" / "patch_predictions.csv")
    assert len(one) == len(two) == 48  # all labelled slides, no padding duplicates
    assert one[["slide", "index"]].equals(two[["slide", "index"]])
    p1, p2 = one.filter(like="pred_").to_numpy(), two.filter(like="pred_").to_numpy()
    assert np.abs(p1 - p2).max() <= 2e-6  # CSV values carry 6 significant digits


def _failing_rank(rank: int, world: int, store_path: str, out_dir: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    from pipeline.dist import all_reduce_sum, fail_together

    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=30))
    try:
        with fail_together():
            if rank == 1:
                raise PipelineError("slide_007.csv has no 'index' column")
        all_reduce_sum(torch.zeros(1))  # without fail_together rank 0 would wait here for rank 1
        outcome = "continued"
    except PipelineError as e:
        outcome = str(e)
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.txt").write_text(outcome)


@pytest.mark.slow
def test_an_error_on_one_rank_stops_every_rank(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_failing_rank, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "rank1.txt").read_text() == "slide_007.csv has no 'index' column"
    assert (tmp_path / "rank0.txt").read_text().startswith("rank 1 failed (1 of 2 ranks): PipelineError: slide_007")
