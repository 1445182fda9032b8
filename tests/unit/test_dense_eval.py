"""hex.evaluate.dense (issue 19): cell-centre / map-pixel geometry, the mask-weighted bilinear baseline, the pooled
per-marker Pearson over valid cells, the dense prediction loop and the one-line input errors. Fast CPU tests."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from hex.evaluate.dense import (
    BaselineMap,
    baseline_at_cells,
    cell_centres,
    check_dense_inputs,
    pooled_pearson,
    sample_map,
)
from hex.evaluate.metrics import pearson
from hex.evaluate.predict import predict, predict_distributed
from hex.infer.maps import accumulate_map
from hex.model import HEX
from pipeline.errors import PipelineError


def test_cell_centres_follow_the_contract() -> None:
    """Cell (i, j) of the patch at (x, y): (x + (j + 1/2) c - 1/2, y + (i + 1/2) c - 1/2); axis 1 = rows (y)."""
    xy = cell_centres(np.array([[100, 40]]), grid=16, cell_px=14)
    assert xy.shape == (1, 16, 16, 2)
    assert xy[0, 0, 0].tolist() == [106.5, 46.5]
    assert xy[0, 2, 5].tolist() == [100 + 5.5 * 14 - 0.5, 40 + 2.5 * 14 - 0.5]
    # the cells tile the patch: mean centre = patch centre (x + P/2 - 1/2 with pixel centres at integers)
    assert np.allclose(xy[0].reshape(-1, 2).mean(axis=0), [100 + 112 - 0.5, 40 + 112 - 0.5])


def test_linear_ramp_map_gives_the_exact_ramp_at_cell_centres() -> None:
    """A map whose pixel (r, q) holds a linear function of its level-0 centre ((q + 1/2) s - 1/2, same in y)
    interpolates to that function at every cell centre inside the map: the pixel convention matches."""
    s = 56.0
    h, w = 20, 24
    cx = (np.arange(w) + 0.5) * s - 0.5
    cy = (np.arange(h) + 0.5) * s - 0.5
    vals = np.zeros((h, w, 2), np.float32)
    vals[..., 0] = 0.001 * cx[None, :] + 0.25
    vals[..., 1] = -0.002 * cy[:, None] + 3.0
    coords = np.array([[224, 112], [300, 450], [37, 29]])
    xy = cell_centres(coords, 16, 14).reshape(-1, 2)
    out, inside = sample_map(vals, np.ones((h, w), bool), s, xy)
    assert inside.all()
    assert np.allclose(out[:, 0], 0.001 * xy[:, 0] + 0.25, atol=1e-5)
    assert np.allclose(out[:, 1], -0.002 * xy[:, 1] + 3.0, atol=1e-5)
    # baseline_at_cells: (N, M, G, G) in the order asked, NaN for a marker the map lacks
    b = baseline_at_cells(BaselineMap(vals, np.ones((h, w), bool), ["mx", "my"], s), coords, 16, 14,
                          ["my", "zz", "mx"])
    assert b.shape == (3, 3, 16, 16) and np.isnan(b[:, 1]).all()
    cc = cell_centres(coords, 16, 14)
    assert np.allclose(b[:, 2], 0.001 * cc[..., 0] + 0.25, atol=1e-5)
    assert np.allclose(b[:, 0], -0.002 * cc[..., 1] + 3.0, atol=1e-5)


def test_stage06_map_of_tile_centres_samples_back_to_the_cell_centres() -> None:
    """Tiles of side 224 every 56 px whose value is their centre (x + 111.5, y + 111.5), accumulated by stage 06's
    own accumulate_map: sampled at the cells of an interior patch, the map gives each cell's own centre."""
    p, s = 224, 56
    xs = np.arange(0, 1400, s)
    coords = np.array([(x, y) for y in xs for x in xs])
    centre = coords + p / 2 - 0.5
    vmap, mask = accumulate_map(coords, centre.astype(np.float32), p, s, shape_level0=(1400 + p, 1400 + p))
    patch = np.array([[448, 560]])
    out, inside = sample_map(vmap, mask, s, cell_centres(patch, 16, 14).reshape(-1, 2))
    assert inside.all()
    assert np.allclose(out, cell_centres(patch, 16, 14).reshape(-1, 2), atol=1e-3)


def test_mask_keeps_the_zeros_outside_tissue_out() -> None:
    """Between a tissue pixel (value 1) and a non-tissue one (0), a cell gets 1, not a blend; far off: NaN."""
    vals = np.zeros((4, 4, 1), np.float32)
    mask = np.zeros((4, 4), bool)
    vals[:, :2] = 1.0
    mask[:, :2] = True
    out, inside = sample_map(vals, mask, 10.0, np.array([[14.5, 14.5], [37.0, 15.0]]))
    assert inside.tolist() == [True, False]
    assert out[0, 0] == pytest.approx(1.0) and np.isnan(out[1, 0])


def test_pooled_pearson_ignores_nan_labels_and_constant_maps() -> None:
    rng = np.random.default_rng(0)
    y = rng.uniform(size=(6, 3, 4, 4)).astype(np.float32)
    p = (y + rng.normal(0, 0.1, y.shape)).astype(np.float32)
    y[0, :, :2] = np.nan  # cells without CODEX
    y[3, 1] = np.nan  # a marker missing in one patch
    p_bad = p.copy()
    p_bad[np.isnan(y)] = 1e6  # predictions where the label is NaN must not count
    r, n = pooled_pearson(y, p_bad)
    for k in range(3):
        ok = np.isfinite(y[:, k].ravel())
        assert n[k] == ok.sum()
        assert r[k] == pytest.approx(pearson(y[:, k].ravel()[ok, None], p[:, k].ravel()[ok, None])[0])
    assert r.min() > 0.8
    const = np.full_like(y, 0.5)  # a constant baseline: r NaN, not an error
    rc, nc = pooled_pearson(y, const)
    assert np.isnan(rc).all() and (nc == n).all()


class _FakeDense(nn.Module):
    """pred = per-channel image mean (3 markers), dense = the image average-pooled to G x G."""

    dense_grid = 4

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.mean(dim=(2, 3)), torch.zeros(len(x), 128)

    def forward_dense(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pred, feat = self.forward(x)
        return pred, feat, nn.functional.adaptive_avg_pool2d(x, self.dense_grid)


class _Images(Dataset):
    markers = ["a", "b", "c"]

    def __init__(self, n: int):
        g = torch.Generator().manual_seed(0)
        self.imgs = torch.randint(0, 255, (n, 3, 8, 8), generator=g, dtype=torch.uint8)

    def __len__(self) -> int:
        return len(self.imgs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.imgs[i], torch.zeros(3), i


def test_dense_prediction_loop_returns_both_outputs_in_order() -> None:
    """predict(dense=True): pred equals the patch-only loop's, dense (N, M, G, G) equals forward_dense row by row
    (rows / columns not transposed); predict_distributed (one rank) the same."""
    ds, model, dev = _Images(11), _FakeDense(), torch.device("cpu")

    def tf(x: torch.Tensor) -> torch.Tensor:
        return x.float() / 255

    idx = [5, 0, 3, 10, 7]
    plain = predict(model, ds, idx, tf, dev, batch_size=2)
    pred, dense = predict(model, ds, idx, tf, dev, batch_size=2, dense=True)
    assert isinstance(plain, np.ndarray) and np.array_equal(plain, pred)
    assert dense.shape == (5, 3, 4, 4) and dense.dtype == np.float32
    ref = nn.functional.adaptive_avg_pool2d(ds.imgs[idx].float() / 255, 4).numpy()
    assert np.allclose(dense, ref, atol=1e-6)
    full_pred, full_dense = predict_distributed(model, ds, tf, dev, 0, 1, batch_size=4, dense=True)
    assert np.allclose(full_dense[idx], ref, atol=1e-6) and np.array_equal(full_pred[idx], pred)
    assert predict(model, ds, [], tf, dev, dense=True)[1].shape == (0, 3, 4, 4)


def _labels(path: Path, grid: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("values", data=np.zeros((2, 3, grid, grid), np.float16))
        f.create_dataset("index", data=np.arange(2, dtype=np.int64))
        f.create_dataset("coords", data=np.zeros((2, 2), np.int64))
        f.attrs.update({"schema_version": 1, "markers": json.dumps(["a", "b", "c"]), "grid": grid,
                        "cell_px_level0": 14.0, "cell_um": 7.0, "patch_size_level0": 14 * grid, "mpp": 0.5,
                        "registration": "affine+field"})


def test_missing_or_mismatched_inputs_are_one_line(tmp_path: Path) -> None:
    _labels(tmp_path / "dense" / "s1.h5", 16)
    _labels(tmp_path / "dense" / "s2.h5", 8)
    ck = tmp_path / "best.safetensors"
    check_dense_inputs(["s1"], tmp_path / "dense", 16, ck, None)
    with pytest.raises(PipelineError) as e:
        check_dense_inputs(["s1", "s3"], tmp_path / "dense", 16, ck, None)
    msg = str(e.value)
    assert "\n" not in msg and "s3.h5" in msg and "run stage 03 with --dense-grid 16" in msg
    with pytest.raises(PipelineError) as e:
        check_dense_inputs(["s2"], tmp_path / "dense", 16, ck, None)
    msg = str(e.value)
    assert "\n" not in msg and "8x8" in msg and "16x16" in msg and "--dense-grid 16" in msg
    with pytest.raises(PipelineError) as e:
        check_dense_inputs(["s1"], tmp_path / "dense", 16, ck, tmp_path / "out_b")
    msg = str(e.value)
    assert "\n" not in msg and "s1.npy" in msg and "--stride 56" in msg


def test_real_dense_hex_through_the_loop() -> None:
    """A tiny HEX with a dense head (hex.model): predict(dense=True) gives forward_dense's outputs, and its patch
    predictions equal the patch-only loop's."""
    model = HEX("tiny", num_markers=3, input_size=32, dense_grid=4).eval()
    ds, dev = _Images(5), torch.device("cpu")

    def tf(x: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(x.float() / 255, size=32)

    pred, dense = predict(model, ds, range(5), tf, dev, batch_size=2, dense=True)
    with torch.inference_mode():
        p_ref, _, d_ref = model.forward_dense(tf(ds.imgs))
    assert dense.shape == (5, 3, 4, 4)
    assert np.allclose(dense, d_ref.numpy(), atol=1e-5) and np.allclose(pred, p_ref.numpy(), atol=1e-5)
    assert np.allclose(predict(model, ds, range(5), tf, dev, batch_size=2), pred, atol=1e-6)
