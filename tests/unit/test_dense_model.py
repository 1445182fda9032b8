"""The dense HEX (issue 19): spatial tokens of every backbone family, ``HEX.forward_dense`` shapes and dtypes, the
dense head in checkpoints both ways (patch -> dense, dense -> patch), the NaN-masked dense loss, the dense labels
following their image through flips/rot90/rotation, and the dataset joining dense labels by patch index."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bench.synthetic_hex_data import write_synthetic_dataset
from hex import backbones as bb
from hex.data.datasets import build_dataset
from hex.data.transforms import BatchTransform
from hex.losses import build_loss
from hex.model import HEX, build_from_args, inference_state_dict, load_hex_checkpoint
from pipeline import artifacts as art
from pipeline.errors import PipelineError

torch.set_num_threads(2)

MUSK_TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64, "img_size": 64}
DINO_TINY = {"embed_dim": 48, "depth": 1, "num_heads": 2}


@pytest.mark.parametrize("name,kw,size,tokens", [
    ("tiny", {"widths": (8, 8, 16, 16), "embed_dim": 32}, 224, 14),  # stride-16 map: 14x14 at 224
    ("dinov2_vits14_reg", DINO_TINY, 224, 16),  # 224 / 14 = 16x16 patch tokens, CLS + 4 registers dropped
    ("musk", MUSK_TINY, 64, 4),  # 64 / 16 = 4x4 (384 px: 24x24)
])
def test_forward_tokens_and_forward_dense_shapes(name: str, kw: dict, size: int, tokens: int) -> None:
    torch.manual_seed(0)
    model = HEX(name, num_markers=5, dense_grid=16, head_dropout=0.0, unfreeze_last=-1, **kw).eval()
    x = torch.randn(2, 3, size, size)
    emb, tok = model.visual.forward_tokens(x)
    assert tok.shape == (2, model.visual.token_dim, tokens, tokens)
    with torch.no_grad():
        torch.testing.assert_close(emb, model.visual(x))  # one pass gives forward()'s embedding
        pred, feat, dense = model.forward_dense(x)
        pred0, feat0 = model(x)  # forward() is unchanged
    assert pred.shape == (2, 5) and feat.shape == (2, 128) and dense.shape == (2, 5, 16, 16)
    assert dense.dtype == torch.float32 and torch.isfinite(dense).all()
    torch.testing.assert_close(pred, pred0)
    assert model.dense_grid == 16 and model.model_args["dense_grid"] == 16
    model.train()
    _, _, dense = model.forward_dense(x)
    dense.square().mean().backward()
    assert all(p.grad is not None for p in model.dense_head.parameters())
    assert model.visual.blocks()[0].parameters().__next__().grad is not None  # reaches the backbone


def test_dense_output_is_float32_under_autocast() -> None:
    torch.manual_seed(0)
    model = HEX("tiny", num_markers=3, dense_grid=8, head_dropout=0.0).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        _, _, dense = model.forward_dense(x)
    assert dense.dtype == torch.float32 and dense.shape == (1, 3, 8, 8)


def test_backbone_without_tokens_is_a_clear_error() -> None:
    class Flat(bb.Backbone):
        def __init__(self) -> None:
            super().__init__()
            self._set_spec(bb.get_spec("tiny"))

    with pytest.raises(NotImplementedError, match="cannot feed a dense head"):
        Flat().forward_tokens(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="dense_grid must be >= 0"):
        HEX("tiny", num_markers=3, dense_grid=-1)


def test_patch_checkpoint_into_dense_model_and_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    patch = HEX("musk", num_markers=6, **MUSK_TINY)
    dense = HEX("musk", num_markers=6, dense_grid=4, **MUSK_TINY)
    assert patch.model_args["dense_grid"] == 0 and not any(k.startswith("dense_head.") for k in patch.state_dict())
    assert "dense_head" not in str(patch.trainable_groups())
    heads = {id(p) for p in dense.trainable_groups()["heads"]}
    assert all(id(p) in heads for p in dense.dense_head.parameters())
    init = {k: v.clone() for k, v in dense.dense_head.state_dict().items()}
    save_file(inference_state_dict(patch), str(tmp_path / "patch.safetensors"))
    caplog.set_level(logging.INFO)
    rep = load_hex_checkpoint(dense, tmp_path / "patch.safetensors")
    assert rep["dense"] == "initialised" and rep["backbone"] == "loaded" and "keeps its initialisation" in caplog.text
    for k, v in patch.state_dict().items():
        assert torch.equal(dense.state_dict()[k], v), k
    assert all(torch.equal(dense.dense_head.state_dict()[k], v) for k, v in init.items())
    # dense -> patch: dense_head.* ignored (logged); dense -> dense: loaded
    with torch.no_grad():
        for p in dense.dense_head.parameters():
            p.add_(1.0)
    sd = inference_state_dict(dense)
    assert any(k.startswith("dense_head.") for k in sd)
    save_file(sd, str(tmp_path / "dense.safetensors"))
    caplog.clear()
    fresh_patch = HEX("musk", num_markers=6, **MUSK_TINY)
    assert load_hex_checkpoint(fresh_patch, tmp_path / "dense.safetensors")["dense"] == "ignored"
    assert "ignored its dense head" in caplog.text
    rebuilt = build_from_args(dense.model_args)
    assert rebuilt.dense_grid == 4
    assert load_hex_checkpoint(rebuilt, tmp_path / "dense.safetensors")["dense"] == "loaded"
    for k, v in dense.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v), k
    old_args = {k: v for k, v in patch.model_args.items() if k != "dense_grid"}  # checkpoints from before
    assert build_from_args(old_args).dense_grid == 0


@pytest.mark.parametrize("name", ["mse", "huber", "adaptive"])
def test_masked_loss_ignores_nan_targets(name: str) -> None:
    torch.manual_seed(0)
    loss = build_loss(name, 4)
    pred = torch.randn(50, 4, requires_grad=True)
    target = torch.rand(50, 4)
    target[::3, 1] = float("nan")
    target[7] = float("nan")
    valid = torch.isfinite(target)
    value = loss.masked(pred, target)
    value.backward()
    assert torch.isfinite(value) and pred.grad is not None and torch.isfinite(pred.grad).all()
    assert (pred.grad[~valid] == 0).all() and (pred.grad[valid] != 0).any()
    ref = loss.elementwise(pred.detach(), torch.nan_to_num(target))[valid].mean()
    torch.testing.assert_close(value.detach(), ref)
    none = loss.masked(pred, torch.full_like(target, float("nan")))
    assert float(none.detach()) == 0.0


def _left_dark(n: int, size: int, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Patches whose left half is dark (40) and right half light (220) + a dense target (n, 2, G, G): marker 0 = 1
    on the dark cells, marker 1 = the column index (NaN in one cell)."""
    x = torch.full((n, 3, size, size), 220, dtype=torch.uint8)
    x[:, :, :, : size // 2] = 40
    d = torch.zeros(n, 2, grid, grid)
    d[:, 0, :, : grid // 2] = 1.0
    d[:, 1] = torch.arange(grid, dtype=torch.float32).view(1, grid)
    d[:, 1, 0, 0] = float("nan")
    return x, d


def _cell_means(img: torch.Tensor, grid: int) -> torch.Tensor:
    """(B,3,S,S) -> (B,G,G) mean over channels and each cell."""
    b, _, s, _ = img.shape
    return img.mean(1).reshape(b, grid, s // grid, grid, s // grid).mean(dim=(2, 4))


def test_flips_move_the_dense_target_with_the_image() -> None:
    n, size, grid = 64, 32, 8
    x, d = _left_dark(n, size, grid)
    tf = BatchTransform(size, (0.0,) * 3, (1.0,) * 3, train=True, jitter=(0, 0, 0, 0))
    torch.manual_seed(0)
    y, dy = tf(x, d)
    dark = _cell_means(y, grid) < 0.5  # images scaled to [0, 1]
    assert torch.equal(dark, dy[:, 0] > 0.5)  # the target still marks the dark half, for every dihedral element
    assert len({tuple(dark[i].flatten().tolist()) for i in range(n)}) == 4  # left/right/top/bottom seen
    assert int(torch.isnan(dy[:, 1]).sum()) == n  # the NaN cell moved, still one per patch
    # without dense: the same image and the same random draws
    torch.manual_seed(0)
    assert torch.equal(tf(x), y)
    assert torch.equal(torch.rand(3), (torch.manual_seed(0), tf(x, d), torch.rand(3))[2])


def test_rotation_moves_the_dense_target_with_the_image() -> None:
    n, size, grid = 32, 64, 16
    x, d = _left_dark(n, size, grid)
    tf = BatchTransform(size, (0.0,) * 3, (1.0,) * 3, train=True, jitter=(0, 0, 0, 0), flips=False, rotation=40)
    torch.manual_seed(1)
    y, dy = tf(x, d)
    means = _cell_means(y, grid)
    inside = torch.isfinite(dy[:, 0])
    assert (~inside).any() and inside.float().mean() > 0.6  # corners outside the rotated patch: NaN
    dark = (means < 0.5) & (means > 0.05)  # black padding is not tissue
    agree = (dark == (dy[:, 0] > 0.5))[inside & (means > 0.05)].float().mean()
    assert agree > 0.95, float(agree)


def _write_dense(root: Path, slides: list[str], grid: int, markers: list[str], shuffle: bool = True) -> None:
    """Dense labels in the layout of stage 03 (the contract's HDF5), rows in another order than the CSV."""
    import pandas as pd

    d = art.DENSE_LABELS.dir(root)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for slide in slides:
        df = pd.read_csv(art.LABELS.path(root, slide))
        n = len(df)
        order = rng.permutation(n) if shuffle else np.arange(n)
        vals = np.zeros((n, len(markers), grid, grid), np.float16)
        vals[:] = (df["index"].to_numpy()[order] / 100.0).astype(np.float16)[:, None, None, None]
        vals[:, :, 0, 0] = np.nan
        with h5py.File(d / f"{slide}.h5", "w") as f:
            f.create_dataset("values", data=vals, compression="gzip", chunks=(1, len(markers), grid, grid))
            f.create_dataset("index", data=df["index"].to_numpy(np.int64)[order])
            f.create_dataset("coords", data=df[["x", "y"]].to_numpy(np.int64)[order])
            f.attrs.update({"schema_version": 1, "markers": json.dumps(markers), "grid": grid,
                            "cell_px_level0": 224 / grid, "cell_um": 112 / grid, "patch_size_level0": 224,
                            "mpp": 0.5, "registration": "affine+field"})


def test_dataset_joins_dense_labels_by_index(tmp_path: Path) -> None:
    info = write_synthetic_dataset(tmp_path, n_slides=2, n_per_slide=5, num_markers=4, n_visible=2, size=32)
    _write_dense(tmp_path, info["slides"], 4, info["markers"][::-1])  # other marker order in the file
    ds = build_dataset(tmp_path, info["slides"], dense_dir=art.DENSE_LABELS.dir(tmp_path), dense_grid=4)
    assert ds.dense_grid == 4 and len(ds[0]) == 4
    for i in range(len(ds)):
        img, y, j, dense = ds[i]
        assert j == i and dense.shape == (4, 4, 4) and dense.dtype == torch.float32
        assert torch.isnan(dense[:, 0, 0]).all()
        torch.testing.assert_close(dense[:, 1:, 1:], torch.full((4, 3, 3), ds.rows[i] / 100.0), atol=1e-3, rtol=0)
    assert len(build_dataset(tmp_path, info["slides"])[0]) == 3  # without: as before
    with pytest.raises(PipelineError, match="not 8x8.*--dense-grid 8"):
        build_dataset(tmp_path, info["slides"], dense_dir=art.DENSE_LABELS.dir(tmp_path), dense_grid=8)
    art.DENSE_LABELS.path(tmp_path, info["slides"][1]).unlink()
    with pytest.raises(PipelineError, match="slide_001.h5.*--dense-grid"):
        build_dataset(tmp_path, info["slides"], dense_dir=art.DENSE_LABELS.dir(tmp_path))


def test_dense_head_area_resize_is_the_mean_over_each_cell_of_the_bilinear_surface() -> None:
    """The separable resize equals bilinear upsampling to 4G then 4 x 4 block means (tiny's 14 and MUSK's 24
    tokens to 16 cells), and a constant feature map stays constant."""
    import torch.nn.functional as F

    from hex.model import AREA_SAMPLES, area_resize_matrix

    for n in (14, 24, 16):
        f = torch.randn(2, 8, n, n)
        ref = F.avg_pool2d(F.interpolate(f, size=(AREA_SAMPLES * 16,) * 2, mode="bilinear", align_corners=False),
                           AREA_SAMPLES)
        r = area_resize_matrix(n, 16)
        torch.testing.assert_close(torch.einsum("gh,bchw,kw->bcgk", r, f, r), ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(r.sum(1), torch.ones(16))
