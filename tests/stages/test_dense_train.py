"""hex.train with the dense head (``--dense-grid``) on a tiny synthetic cohort with dense labels (CPU).

Fast: a short dense run lowers the dense loss, writes a checkpoint whose model, loss and run identity carry the dense
settings, and a patch-level model fine-tunes into a dense one (``--init``); missing dense labels and a changed
``--dense-grid`` on resume are one-line errors. Slow (real gloo ranks): a dense MUSK (tiny size) trained by 2 ranks
with batch b equals 1 rank with batch 2b, as the patch-level model's test does.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from bench.synthetic_hex_data import write_synthetic_dataset
from hex.train import stage as hex_train
from pipeline import artifacts as art
from preprocess.quantify.dense import read_dense_labels

ROOT = Path(__file__).resolve().parents[2]
GRID = 4
FAST = ["--backbone", "tiny", "--input-size", "32", "--batch-size", "8", "--workers", "0", "--no-fds"]
MUSK_KW = '{"embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64, "img_size": 32}'


def write_dense_labels(root: Path, grid: int, nan_cells: bool = True) -> None:
    """Dense labels in stage 03's layout for every slide of a synthetic cohort: per cell, the first 8 markers are the
    colour functions of the patch labels applied to the cell's mean colour, the rest the patch label; rows in
    reverse order of the CSV (matched by ``index``); with ``nan_cells`` the top-left cell of every patch is NaN."""
    d = art.DENSE_LABELS.dir(root)
    d.mkdir(parents=True, exist_ok=True)
    for csv in sorted(art.LABELS.dir(root).glob("*.csv")):
        slide = csv.stem
        df = pd.read_csv(csv)
        markers = [c for c in df.columns if c not in ("slide", "index", "x", "y")]
        with h5py.File(art.PATCH_STORE.path(root, slide), "r") as f:
            imgs = f["imgs"][:].astype(np.float32) / 255  # (N,S,S,3)
        n, s = len(imgs), imgs.shape[1]
        c = imgs.reshape(n, grid, s // grid, grid, s // grid, 3).mean(axis=(2, 4))  # (N,G,G,3) cell colour
        r, g, b = c[..., 0], c[..., 1], c[..., 2]
        funcs = [r, g, b, 1 - r, (r + b) / 2, 1 - g, (r + g) / 2, (g + b) / 2]
        vals = np.repeat(df[markers].to_numpy(np.float32)[:, :, None, None], grid, 2).repeat(grid, 3)
        for m in range(8):
            vals[:, m] = funcs[m]
        if nan_cells:
            vals[:, :, 0, 0] = np.nan
        order = np.arange(n)[::-1]
        with h5py.File(d / f"{slide}.h5", "w") as f:
            f.create_dataset("values", data=vals[order].astype(np.float16), compression="gzip",
                             chunks=(1, len(markers), grid, grid))
            f.create_dataset("index", data=df["index"].to_numpy(np.int64)[order])
            f.create_dataset("coords", data=df[["x", "y"]].to_numpy(np.int64)[order])
            f.attrs.update({"schema_version": 1, "markers": json.dumps(markers), "grid": grid,
                            "cell_px_level0": 224 / grid, "cell_um": 112 / grid, "patch_size_level0": 224,
                            "mpp": 0.5, "registration": "affine+field"})


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("densecohort")
    write_synthetic_dataset(root, n_slides=4, n_per_slide=12, size=32, seed=1)
    write_dense_labels(root, GRID)
    return root


def _args(root: Path, out: Path, run: str, *extra: str, fast: bool = True) -> list[str]:
    return ["--data", str(root), "--split", str(root / "splits" / "splits_0.csv"), "--clinical",
            str(root / "clinical.csv"), "--out", str(out), "--run-name", run, *(FAST if fast else []), *extra]


def _ck(out: Path, run: str, epoch: int) -> dict:
    return torch.load(out / "runs" / run / "checkpoints" / f"epoch_{epoch}.pt", weights_only=True)


def test_fixture_labels_read_back_with_stage_03s_reader(cohort: Path) -> None:
    d = read_dense_labels(art.DENSE_LABELS.path(cohort, "slide_000"))
    assert d.values.shape == (12, 40, GRID, GRID) and d.grid == GRID and list(d.index) == list(range(11, -1, -1))


def test_dense_training_lowers_the_dense_loss_and_resumes(cohort: Path, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    args = _args(cohort, tmp_path, "dense", "--dense-grid", str(GRID), "--epochs", "4", "--no-lds", "--save-every",
                 "2", "--color-jitter", "0", "0", "0", "0", "--lr", "3e-3", "--gamma", "1", "--rotation", "20")
    assert hex_train.main(args) == 0
    run = tmp_path / "runs" / "dense"
    log = (run / "train.log").read_text()
    dense = [float(v) for v in re.findall(r"x dense (\d+\.\d+)", log)]
    assert len(dense) == 4 and "dense head: 4x4 cells" in log, log[-2000:]
    # the adaptive loss (NLL per cell and marker; 1.28 -> 1.20 here) falls every epoch
    assert all(b < a for a, b in zip(dense, dense[1:])) and dense[-1] < dense[0] - 0.04, dense
    ck = _ck(tmp_path, "dense", 4)
    assert ck["model_args"]["dense_grid"] == GRID and "dense_loss" in ck and ck["config"]["dense_grid"] == GRID
    assert any(k.startswith("dense_head.") for k in ck["model"])
    best = json.loads((run / "best.json").read_text())
    assert best["model_args"]["dense_grid"] == GRID
    from safetensors import safe_open

    with safe_open(str(run / "best.safetensors"), framework="pt") as f:
        assert any(k.startswith("dense_head.out.") for k in f.keys())
    # resumed (2 + 2 epochs: dense loss parameters, optimiser, RNG of the dense augmentation) = 4 epochs at once
    other = _args(cohort, tmp_path, "resumed", *args[args.index("--dense-grid"):], "--resume", "auto")
    for epochs in ("2", "4"):
        other[other.index("--epochs") + 1] = epochs
        assert hex_train.main(other) == 0
    again = _ck(tmp_path, "resumed", 4)
    for part in ("model", "loss", "dense_loss"):
        assert all(torch.equal(ck[part][k], again[part][k]) for k in ck[part]), part
    # a changed dense grid is another run
    caplog.clear()
    assert hex_train.main([*other, "--epochs", "5", "--dense-grid", "8"]) == 2
    assert "dense_grid: checkpoint 4 vs now 8" in caplog.text


def test_patch_model_fine_tunes_into_a_dense_one(cohort: Path, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    assert hex_train.main(_args(cohort, tmp_path, "patch", "--epochs", "1")) == 0
    best = tmp_path / "runs" / "patch" / "best.safetensors"
    caplog.clear()
    assert hex_train.main(_args(cohort, tmp_path, "ft", "--epochs", "1", "--init", str(best), "--dense-grid",
                                str(GRID))) == 0
    assert "dense head (dense_grid 4) keeps its initialisation" in caplog.text
    patch, ft = torch.load(tmp_path / "runs/patch/checkpoints/epoch_1.pt", weights_only=True), _ck(tmp_path, "ft", 1)
    assert set(ft["model"]) - set(patch["model"]) == {k for k in ft["model"] if k.startswith("dense_head.")}


def test_missing_dense_labels_is_one_line_naming_stage_03(cohort: Path, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    assert hex_train.main(_args(cohort, tmp_path, "g8", "--epochs", "1", "--dense-grid", "8")) == 2
    assert "not 8x8" in caplog.text and "run stage 03 with --dense-grid 8" in caplog.text
    caplog.clear()
    empty = tmp_path / "no_dense"
    empty.mkdir()
    assert hex_train.main(_args(cohort, tmp_path, "none", "--epochs", "1", "--dense-grid", "4", "--dense-dir",
                                str(empty))) == 2
    assert "slide_000.h5" in caplog.text and "run stage 03 with --dense-grid 4" in caplog.text
    assert not (tmp_path / "runs" / "none" / "checkpoints").exists() or not any(
        (tmp_path / "runs" / "none" / "checkpoints").iterdir())


# ------------------------------------------------------------------------------------------------ multi-process
DDP_FLAGS = ["--backbone", "musk", "--backbone-kw", MUSK_KW, "--workers", "0", "--dropout", "0", "--no-flips",
             "--color-jitter", "0", "0", "0", "0", "--epochs", "2", "--fds-start-smooth", "1", "--lds",
             "--save-every", "1", "--lr", "1e-4", "--dense-grid", str(GRID), "--dense-weight", "0.5"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return env


@pytest.mark.slow
def test_dense_musk_two_ranks_batch_b_equal_one_rank_batch_2b(tmp_path_factory: pytest.TempPathFactory,
                                                              tmp_path: Path) -> None:
    """A tiny dense MUSK (adaptive loss for both heads, FDS, LDS): 2 gloo ranks x batch 4 = 1 rank x batch 8. Dense
    labels without NaN cells here: each rank's dense loss is the mean over its own valid cells, so with NaN cells
    the two runs weigh cells slightly differently."""
    root = tmp_path_factory.mktemp("densecohort_ddp")
    write_synthetic_dataset(root, n_slides=4, n_per_slide=12, size=32, seed=1)
    write_dense_labels(root, GRID, nan_cells=False)
    two_out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "hex.train",
           *_args(root, two_out, "ddp", "--batch-size", "4", *DDP_FLAGS, fast=False)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert hex_train.main(_args(root, tmp_path / "one", "one", "--batch-size", "8", *DDP_FLAGS, fast=False)) == 0
    two, one = _ck(two_out, "ddp", 2), _ck(tmp_path / "one", "one", 2)
    assert two["world_size"] == 2 and one["world_size"] == 1 and two["model_args"]["dense_grid"] == GRID
    for part in ("model", "loss", "dense_loss"):
        assert two[part].keys() == one[part].keys()
        for k in two[part]:
            torch.testing.assert_close(two[part][k].float(), one[part][k].float(), rtol=0, atol=1e-5,
                                       msg=f"{part} {k}")
    first = _ck(two_out, "ddp", 1)
    moved = max(float((two["model"][k] - first["model"][k]).abs().max()) for k in two["model"]
                if k.startswith("dense_head."))
    assert moved > 1e-4  # the dense head did train: the comparison is not between two initialisations
