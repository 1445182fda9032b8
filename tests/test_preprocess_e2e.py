"""Stages 01-03 end to end on a small generated cohort, scored against its ground truth.

Acceptance of the preprocessing issue: labels computed through the real registration match labels computed with
the ground-truth affine by an independent oracle (the CODEX resampled into H&E space with scipy, then averaged
over each patch box): Pearson r >= 0.99 per marker with signal, on every slide.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import openslide
import pandas as pd
import pytest
from scipy import ndimage

from preprocess import patch, patch_store, quantify, register
from preprocess.slide_io import CodexImage


@pytest.fixture(scope="module")
def pipeline_out(small_cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e_out")
    slides = sorted(json.loads((small_cohort / "ground_truth.json").read_text())["slides"])[:2]
    common = ["--cohort", str(small_cohort), "--out", str(out), "--slides", *slides]
    # 112 px patches (56 µm) give the small 0.6 mm sections enough patches for per-marker correlations
    assert patch.main([*common, "--patch-size", "112"]) == 0
    assert register.main(common) == 0
    assert quantify.main(common) == 0
    assert patch_store.main(common) == 0
    return out, slides


def oracle_patch_means(codex_path, affine_codex_to_he: np.ndarray, coords: np.ndarray, size: int,
                       he_shape: tuple[int, int]) -> np.ndarray:
    """Mean of each channel over each patch box after resampling the CODEX into H&E level-0 space (bilinear).

    Returns (N, C) float64; NaN where the box is not fully inside the CODEX field.
    """
    inv = np.linalg.inv(affine_codex_to_he)  # H&E (x, y, 1) -> CODEX (x, y, 1)
    # scipy maps output (row, col) -> input (row, col): swap x/y of the inverse affine
    matrix = np.array([[inv[1, 1], inv[1, 0]], [inv[0, 1], inv[0, 0]]])
    offset = np.array([inv[1, 2], inv[0, 2]])
    h, w = he_shape
    with CodexImage(codex_path) as cx:
        data = cx.read_region(0, 0, cx.dimensions[0], cx.dimensions[1]).astype(np.float32)
    valid = ndimage.affine_transform(np.ones(data.shape[1:], np.float32), matrix, offset, output_shape=(h, w),
                                     order=0, cval=0.0)
    out = np.full((len(coords), len(data)), np.nan)
    warped = [ndimage.affine_transform(ch, matrix, offset, output_shape=(h, w), order=1, cval=0.0) for ch in data]
    for i, (x, y) in enumerate(coords):
        if valid[y:y + size, x:x + size].min() < 1:
            continue
        out[i] = [wc[y:y + size, x:x + size].mean() for wc in warped]
    return out


def test_stages_01_03_outputs(pipeline_out, small_cohort):
    out, slides = pipeline_out
    for s in slides:
        with h5py.File(out / "patches" / f"{s}.h5") as f:
            n = len(f["coords"])
            assert n > 40 and f.attrs["patch_size"] == 112 and f.attrs["patch_size_level0"] == 112
        rec = json.loads((out / "registration" / f"{s}.json").read_text())
        assert rec["status"] == "ok", rec.get("reason")
        df = pd.read_csv(out / "markers" / f"{s}.csv")
        assert 0 < len(df) <= n and df.iloc[:, 4:].shape[1] == 40
        assert df.iloc[:, 4:].to_numpy().min() >= 0 and df.iloc[:, 4:].to_numpy().max() <= 1
        with h5py.File(out / "he_patches" / f"{s}.h5") as f:
            assert f["imgs"].shape == (n, 112, 112, 3) and f["imgs"].dtype == np.uint8
    norm = json.loads((out / "markers" / "normalization.json").read_text())
    assert len(norm["markers"]) == 40


def test_labels_through_registration_match_ground_truth_oracle(pipeline_out, small_cohort):
    out, slides = pipeline_out
    gt = json.loads((small_cohort / "ground_truth.json").read_text())
    for s in slides:
        raw = pd.read_csv(out / "markers" / "raw" / f"{s}.csv")
        raw = raw[raw["coverage"] >= 0.999]
        with h5py.File(out / "patches" / f"{s}.h5") as f:
            size = int(f.attrs["patch_size_level0"])
        with openslide.OpenSlide(str(small_cohort / "he" / f"{s}.tif")) as osr:
            he_w, he_h = osr.dimensions
        oracle = oracle_patch_means(small_cohort / "codex" / f"{s}.ome.tif",
                                    np.array(gt["slides"][s]["affine_codex_to_he"]),
                                    raw[["x", "y"]].to_numpy(), size, (he_h, he_w))
        ok = ~np.isnan(oracle).any(axis=1)
        assert ok.sum() > 20, s
        rs = {}
        for j, m in enumerate(gt["markers"]):
            pred, ref = raw[m].to_numpy()[ok], oracle[ok, j]
            if ref.std() < 1e-3 * max(ref.mean(), 1.0):  # no signal in these patches
                continue
            rs[m] = np.corrcoef(pred, ref)[0, 1]
        assert len(rs) >= 30, f"{s}: only {len(rs)} markers with signal"
        worst = min(rs, key=rs.get)
        print(f"{s}: {len(rs)} markers with signal over {ok.sum()} patches, min r {rs[worst]:.4f} ({worst})")
        assert rs[worst] >= 0.99, f"{s}: {worst} r={rs[worst]:.4f}"
