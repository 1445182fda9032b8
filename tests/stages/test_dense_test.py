"""hex.test on a dense run (issue 19, deliverable 3): dense_pearson.csv, dense_summary.json, the plots, the baseline
(--dense-baseline), other dense labels (--dense-labels: affine-only), the done-record, one-line errors, and a
patch-only run left as it was.

Fixture: a synthetic cohort (4 slides x 8 patches of 32 px, 8 markers), a tiny HEX trained one epoch, and a
stand-in dense model (``load_trained`` patched): the trained patch head plus a dense head that average-pools the
input image to the G x G cells, marker k = colour channel k % 3. Dense labels are written with h5py in the
contract's layout: marker k's cell value = the cell's mean of colour channel k % 3 (some cells NaN), so a correct
pipeline (no transposed or shifted cells) scores r_dense ~ 1. The affine-only labels are those of a cell shifted
one column (a registration error at cell scale). The baseline is a stage-06-like map at stride P/4 holding each
patch's mean dense label over the patch (a patch-level model exact per patch): its r_baseline is below r_dense.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from bench.synthetic_hex_data import write_synthetic_dataset
from hex.evaluate import stage as hex_test
from hex.train import stage as hex_train
from pipeline import artifacts as art

G = 16
SIZE = 32  # patch side (stored and level-0 px): cells of 2 px
FAST = ["--backbone", "tiny", "--input-size", "32", "--batch-size", "8", "--workers", "0", "--no-fds", "--epochs", "1"]
VAL = ["slide_002", "slide_003"]


def _cell_means(imgs: np.ndarray, m: int) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, m, G, G) float32: marker k = mean of channel k % 3 over each cell, in [0, 1]."""
    n = len(imgs)
    c = SIZE // G
    cells = imgs.reshape(n, G, c, G, c, 3).mean(axis=(2, 4)) / 255.0  # (N, G, G, 3)
    return np.stack([cells[..., k % 3] for k in range(m)], axis=1).astype(np.float32)


def _write_dense(path: Path, values: np.ndarray, index: np.ndarray, coords: np.ndarray, markers: list[str],
                 registration: str, grid: int = G) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        m = len(markers)
        f.create_dataset("values", data=values.astype(np.float16), chunks=(1, m, grid, grid), compression="gzip")
        f.create_dataset("index", data=index.astype(np.int64))
        f.create_dataset("coords", data=coords.astype(np.int64))
        f.attrs.update({"schema_version": 1, "markers": json.dumps(markers), "grid": grid,
                        "cell_px_level0": float(SIZE // grid), "cell_um": SIZE / grid * 0.5,
                        "patch_size_level0": SIZE, "mpp": 0.5, "registration": registration})


def _write_baseline(out_b: Path, slide: str, coords: np.ndarray, values: np.ndarray, markers: list[str]) -> None:
    """A stage-06 map at stride SIZE/4 (level-0 origin 0): every patch's ``values`` (N, M) over its 4 x 4 pixels,
    the mask there."""
    s = SIZE // 4
    h, w = int(np.ceil((coords[:, 1].max() + SIZE) / s)), int(np.ceil((coords[:, 0].max() + SIZE) / s))
    vmap = np.zeros((h, w, len(markers)), np.float32)
    mask = np.zeros((h, w), bool)
    for (x, y), v in zip(coords, values):
        vmap[y // s:(y + SIZE) // s, x // s:(x + SIZE) // s] = v
        mask[y // s:(y + SIZE) // s, x // s:(x + SIZE) // s] = True
    d = art.VIRTUAL_CODEX.dir(out_b)
    d.mkdir(parents=True, exist_ok=True)
    np.save(d / f"{slide}.npy", vmap.astype(np.float16))
    Image.fromarray(mask.astype(np.uint8) * 255).save(d / f"{slide}_mask.png")
    (d / f"{slide}.json").write_text(json.dumps({"markers": markers, "stride_level0": s, "mpp": 0.5,
                                                 "patch_size_level0": SIZE}))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("dense_test")
    data = root / "data"
    info = write_synthetic_dataset(data, n_slides=4, n_per_slide=8, num_markers=8, n_visible=4, size=SIZE, seed=3)
    markers = info["markers"]
    out_b = root / "out_b"
    for s in info["slides"]:
        with h5py.File(art.PATCH_STORE.path(data, s), "r") as f:
            imgs, coords = f["imgs"][:], f["coords"][:]
        lab = pd.read_csv(art.LABELS.path(data, s))
        idx = lab["index"].to_numpy()
        vals = _cell_means(imgs[idx], len(markers))
        patch_means = vals.mean(axis=(2, 3))
        vals[0, :, 0, :] = np.nan  # a row of cells without CODEX
        vals[1, 2] = np.nan  # one marker missing in a patch
        _write_dense(art.DENSE_LABELS.path(data, s), vals, idx, coords[idx], markers, "affine+field")
        shifted = np.roll(vals, 1, axis=3)  # one cell off: what a missing displacement field does at 7 µm
        _write_dense(root / "dense_affine" / f"{s}.h5", shifted, idx, coords[idx], markers, "affine")
        _write_dense(root / "dense_g8" / f"{s}.h5", vals[:, :, ::2, ::2], idx, coords[idx], markers, "affine+field",
                     grid=8)
        _write_baseline(out_b, s, coords[idx], patch_means, markers)
    run_out = root / "run_out"
    assert hex_train.main(["--data", str(data), "--split", str(data / "splits" / "splits_0.csv"), "--clinical",
                           str(data / "clinical.csv"), "--out", str(run_out), "--run-name", "r", *FAST]) == 0
    best_json = art.HEX_RUN.path(run_out, run="r").with_suffix(".json")
    patch_meta = json.loads(best_json.read_text())
    dense_meta = {**patch_meta, "model_args": {**patch_meta["model_args"], "dense_grid": G}}
    return {"root": root, "data": data, "out_b": out_b, "run_out": run_out, "markers": markers,
            "best_json": best_json, "patch_meta": patch_meta, "dense_meta": dense_meta}


class _StandInDense(nn.Module):
    """A trained patch HEX plus a dense head that average-pools the (normalised) input to G x G cells."""

    def __init__(self, inner: nn.Module, grid: int):
        super().__init__()
        self.inner, self.dense_grid = inner, grid

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, epoch: int | None = None) -> tuple:
        return self.inner(x)

    def forward_dense(self, x: torch.Tensor, labels: torch.Tensor | None = None, epoch: int | None = None) -> tuple:
        pred, feat = self.inner(x)
        cells = nn.functional.adaptive_avg_pool2d(x, self.dense_grid)
        return pred, feat, cells[:, [k % 3 for k in range(pred.shape[1])]].float()


@pytest.fixture
def dense_run(cohort: dict, monkeypatch: pytest.MonkeyPatch) -> dict:
    """The run described as dense (best.json's model_args.dense_grid = G), loaded as the stand-in dense model."""
    real = hex_test.load_trained

    def load(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        model, meta = real(*a, **kw)
        return _StandInDense(model, G), meta

    cohort["best_json"].write_text(json.dumps(cohort["dense_meta"]))
    monkeypatch.setattr(hex_test, "load_trained", load)
    yield cohort
    cohort["best_json"].write_text(json.dumps(cohort["patch_meta"]))


def _test(c: dict, test_dir: Path, *extra: str) -> int:
    return hex_test.main(["--out", str(c["run_out"]), "--run", "r", "--data", str(c["data"]), "--split",
                          str(c["data"] / "splits" / "splits_0.csv"), "--workers", "0", "--device", "cpu",
                          "--test-dir", str(test_dir), *extra])


def _one_error(caplog: pytest.LogCaptureFixture) -> str:
    assert "Traceback" not in caplog.text
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    return errors[0]


@pytest.mark.slow
def test_dense_run_writes_dense_tables_plots_and_record(dense_run: dict, caplog: pytest.LogCaptureFixture) -> None:
    c = dense_run
    d = c["root"] / "t_dense"
    assert _test(c, d, "--dense-baseline", str(c["out_b"]), "--visible-markers",
                 str(c["data"] / "ground_truth.json")) == 0
    t = pd.read_csv(d / "dense_pearson.csv")
    assert list(t.columns) == ["marker", "r_dense", "r_baseline", "r_patch"]
    assert list(t["marker"]) == c["markers"]
    mp = pd.read_csv(d / "marker_pearson.csv").set_index("marker")
    assert np.allclose(t["r_patch"], mp.loc[c["markers"], "pearson"], atol=1e-5, equal_nan=True)
    assert (t["r_dense"] > 0.98).all()  # cells in the right place (float16 labels)
    # the upsampled per-patch truth: high (the map is read where the patches are) but below the cells' own r
    # (measured: 0.960-0.968 vs 1.000)
    assert ((t["r_baseline"] > 0.9) & (t["r_baseline"] < t["r_dense"] - 0.02)).all()
    s = json.loads((d / "dense_summary.json").read_text())
    assert s["registration"] == "affine+field" and s["grid"] == G and s["n_patches"] == 16
    # 16 patches x 256 cells, minus a row of 16 cells in patch 0 of each of the 2 slides
    assert s["n_cells"] == 16 * G * G - 2 * G
    assert s["n_values"] == 8 * 16 * G * G - 2 * (8 * G + G * G)  # and one marker of patch 1
    assert s["baseline"] == str(c["out_b"]) and s["baseline_coverage"] == pytest.approx(1.0)
    assert s["mean_r_dense"] == pytest.approx(t["r_dense"].mean())
    assert s["visible_markers"] == c["markers"][:4]
    assert s["mean_r_dense_visible"] == pytest.approx(t["r_dense"][:4].mean())
    for name in ("dense_scatter.png", "dense_side_by_side.png"):
        assert (d / name).stat().st_size > 1000, name
    rec = json.loads((d / "done" / "evaluation.json").read_text())
    assert rec["settings"]["dense"] == {"grid": G, "baseline": str(c["out_b"].resolve())}
    assert {"dense_labels", "dense_baseline"} <= set(rec["inputs"])
    summ = json.loads((d / "summary.json").read_text())
    assert summ["dense"]["mean_r_dense"] == pytest.approx(s["mean_r_dense"])
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert _test(c, d, "--dense-baseline", str(c["out_b"]), "--visible-markers",
                     str(c["data"] / "ground_truth.json")) == 0
    assert "0 done, 1 skipped" in caplog.text
    # without the baseline: other settings -> stop (one line)
    caplog.clear()
    assert _test(c, d, "--visible-markers", str(c["data"] / "ground_truth.json")) == 2
    assert "done with other settings" in _one_error(caplog)


@pytest.mark.slow
def test_affine_labels_score_lower(dense_run: dict) -> None:
    """--dense-labels DIR: labels made with the affine only (a cell off here) give a lower r_dense, registration
    'affine' in the summary; no baseline: r_baseline empty."""
    c = dense_run
    d0, d1 = c["root"] / "t_field", c["root"] / "t_affine"
    assert _test(c, d0, "--no-plots") == 0
    assert _test(c, d1, "--no-plots", "--dense-labels", str(c["root"] / "dense_affine")) == 0
    t0, t1 = pd.read_csv(d0 / "dense_pearson.csv"), pd.read_csv(d1 / "dense_pearson.csv")
    assert t1["r_baseline"].isna().all()
    assert (t1["r_dense"] < t0["r_dense"] - 0.01).all()
    s1 = json.loads((d1 / "dense_summary.json").read_text())
    assert s1["registration"] == "affine" and s1["baseline"] is None and s1["mean_r_baseline"] is None
    assert s1["dense_labels"] == str(c["root"] / "dense_affine")
    assert not (d1 / "dense_scatter.png").exists()


@pytest.mark.slow
def test_dense_input_errors_are_one_line(dense_run: dict, caplog: pytest.LogCaptureFixture) -> None:
    c = dense_run
    caplog.clear()
    assert _test(c, c["root"] / "t_g8", "--dense-labels", str(c["root"] / "dense_g8")) == 2
    msg = _one_error(caplog)
    assert "8x8" in msg and f"{G}x{G}" in msg and f"run stage 03 with --dense-grid {G}" in msg
    empty = c["root"] / "no_labels"
    empty.mkdir(exist_ok=True)
    caplog.clear()
    assert _test(c, c["root"] / "t_none", "--dense-labels", str(empty)) == 2
    msg = _one_error(caplog)
    assert f"{VAL[0]}.h5" in msg and f"run stage 03 with --dense-grid {G}" in msg
    caplog.clear()
    assert _test(c, c["root"] / "t_nb", "--dense-baseline", str(c["root"] / "no_labels")) == 2
    assert "virtual_codex" in _one_error(caplog)
    assert not any((c["root"] / n / "summary.json").exists() for n in ("t_g8", "t_none", "t_nb"))


@pytest.mark.slow
def test_patch_only_run_is_unchanged(cohort: dict, caplog: pytest.LogCaptureFixture) -> None:
    """The same run described as patch-only: no dense files, no dense keys in the done-record or summary; the
    dense flags on it stop with one line."""
    c = cohort
    d = c["root"] / "t_patch"
    assert _test(c, d, "--no-plots") == 0
    assert not any((d / n).exists() for n in ("dense_pearson.csv", "dense_summary.json"))
    rec = json.loads((d / "done" / "evaluation.json").read_text())
    assert "dense" not in rec["settings"] and set(rec["inputs"]) == {"checkpoint", "labels", "patches"}
    assert "dense" not in json.loads((d / "summary.json").read_text())
    caplog.clear()
    assert _test(c, c["root"] / "t_patch2", "--dense-labels", str(c["root"] / "dense_affine")) == 2
    assert "no dense head" in _one_error(caplog)


FAKE_PYTHON = """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$SHIM_LOG"
"""


def test_script_dense_variables(tmp_path: Path) -> None:
    """scripts/05_test_hex.sh: DENSE_LABELS / DENSE_BASELINE -> --dense-labels / --dense-baseline; unset: neither."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").write_text(FAKE_PYTHON)
    (tmp_path / "bin" / "python").chmod(0o755)
    log = tmp_path / "calls.log"
    env = {k: v for k, v in os.environ.items() if k not in ("EXTRA", "RUN", "FOLD", "GPUS", "COHORT", "DENSE_LABELS",
                                                            "DENSE_BASELINE", "EXTERNAL", "EXTERNAL_OUT")}
    env |= {"PATH": f"{tmp_path / 'bin'}:{env['PATH']}", "VIRTUAL_ENV": str(tmp_path / "no_venv"),
            "SHIM_LOG": str(log), "OUT": "out"}
    script = Path(__file__).resolve().parents[2] / "scripts" / "05_test_hex.sh"
    r = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env | {"DENSE_LABELS": "/d/affine",
                       "DENSE_BASELINE": "/d/out_b"}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--dense-labels /d/affine --dense-baseline /d/out_b" in log.read_text()
    log.write_text("")
    r = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--dense" not in log.read_text()
