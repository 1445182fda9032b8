"""Stain robustness (issue 20): HED colour deconvolution and augmentation in ``BatchTransform``, stain normalisation
(``hex.data.stain``, torchstain) recorded with a run and re-applied by everything that reads the run.

- ``rgb_to_hed`` equals skimage's ``rgb2hed``; ``hed_to_rgb`` inverts it; strength 0 is the identity.
- the augmentation scales each sample's H/E/DAB amounts by alpha in [1-s, 1+s] and shifts them by at most s/4 OD,
  differently per sample; reproducible under the CPU RNG; off, it draws nothing (the transform is unchanged).
- Macenko and Reinhard, fitted on a target patch, move a stain-shifted patch toward the target; background patches
  are left alone; a damaged record is one line.
- hex.train records the fit (config.json, best.json, checkpoints) and hex.test / trained-model loading / mica image
  encoders re-apply it without being told (predictions equal a transform built from the record).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hex.data.stain import StainNormalizer, check_record, fit_stain_norm
from hex.data.transforms import BatchTransform, colour_jitter_matrices, hed_jitter_maps, hed_to_rgb, rgb_to_hed
from pipeline.errors import PipelineError

H_OD, E_OD = (0.80, 1.00, 0.42), (0.12, 0.85, 0.42)  # the sample generator's default stain vectors


def he_patch(seed: int = 0, size: int = 96, h_vec=H_OD, e_vec=E_OD, h_amt: float = 1.0, e_amt: float = 1.0,
             white: float = 250.0) -> torch.Tensor:
    """uint8 (3, size, size) Beer-Lambert H&E-like patch: eosin tissue disc with haematoxylin nuclei on glass."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    tissue = ((xx - size / 2) ** 2 + (yy - size / 2) ** 2) < (0.6 * size) ** 2
    ch, ce = np.zeros((size, size)), np.where(tissue, 1.2 + 0.6 * rng.random((size, size)), 0.0)
    for _ in range(size // 6):
        cx, cy, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(size / 50, size / 25)
        ch[(((xx - cx) ** 2 + (yy - cy) ** 2) < r * r) & tissue] = 1.2 + 0.3 * rng.random()
    od = h_amt * ch[..., None] * np.array(h_vec) + e_amt * ce[..., None] * np.array(e_vec) + 0.03
    img = white * np.exp(-od) + rng.normal(0, 2, od.shape)
    return torch.from_numpy(np.clip(img, 0, 255).astype(np.uint8)).permute(2, 0, 1).contiguous()


def _png(path: Path, img: torch.Tensor) -> Path:
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(path)
    return path


# ---------------------------------------------------------------------------------------------------- HED


def test_hed_matches_skimage_round_trips_and_is_identity_at_zero_strength() -> None:
    from skimage.color import rgb2hed

    x = torch.stack([he_patch(0, 48), torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8)]).float()
    hed = rgb_to_hed(x)
    ref = rgb2hed(x[1].permute(1, 2, 0).numpy() / 255)
    assert np.allclose(np.maximum(hed[1].permute(1, 2, 0).numpy(), 0), ref, atol=1e-5)
    assert torch.allclose(hed_to_rgb(hed), x, atol=1e-2)
    a, c = hed_jitter_maps(2, 0.0)
    assert torch.allclose(a, torch.eye(3).expand(2, 3, 3), atol=1e-6) and torch.all(c == 0)
    tf = BatchTransform(48, (0.5,) * 3, (0.5,) * 3, train=True, flips=False, jitter=(0, 0, 0, 0), stain_aug=1e-9)
    assert torch.allclose(tf._hed(x[:1]), x[:1], atol=1e-2)  # strength ~0: the identity (skimage clamp aside)


def test_stain_aug_scales_and_shifts_amounts_within_bounds() -> None:
    s, n = 0.3, 6
    rng = np.random.default_rng(0)
    # stain amounts (skimage units) spread enough to fit a line, small enough that RGB never clips
    hed = torch.from_numpy(rng.uniform(0.005, 0.04, (1, 3, 16, 16))).float().expand(n, 3, 16, 16).contiguous()
    x = hed_to_rgb(hed)
    assert 5 < x.min() and x.max() < 250
    tf = BatchTransform(16, (0.5,) * 3, (0.5,) * 3, train=True, stain_aug=s)
    torch.manual_seed(3)
    y = rgb_to_hed(tf._hed(x))
    alphas, betas = np.zeros((n, 3)), np.zeros((n, 3))
    for i in range(n):
        for k in range(3):
            slope, icpt = np.polyfit(hed[i, k].flatten().numpy(), y[i, k].flatten().numpy(), 1)
            alphas[i, k], betas[i, k] = slope, icpt * -math.log(1e-6)  # shift back in natural-log OD
    assert np.all((alphas >= 1 - s - 1e-3) & (alphas <= 1 + s + 1e-3)), alphas
    assert np.all(np.abs(betas) <= s / 4 + 1e-3), betas
    assert alphas.std() > 0.05 and np.abs(alphas[:, :2] - 1).max() > s / 3  # really changed, per sample
    assert np.abs(betas).max() > s / 12


def test_stain_aug_reproducible_and_off_draws_nothing() -> None:
    x = torch.stack([he_patch(i, 40) for i in range(4)])
    kw = {"input_size": 32, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "train": True, "rotation": 10.0}
    on = BatchTransform(**kw, stain_aug=0.2)
    torch.manual_seed(7)
    a = on(x)
    torch.manual_seed(7)
    b = on(x)
    torch.manual_seed(8)
    c = on(x)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    torch.manual_seed(7)
    base, state_base = BatchTransform(**kw)(x), torch.get_rng_state()
    torch.manual_seed(7)
    off, state_off = BatchTransform(**kw, stain_aug=0.0)(x), torch.get_rng_state()
    assert torch.equal(base, off) and torch.equal(state_base, state_off)
    torch.manual_seed(7)  # off, the draws are the geometry's, the rotation's and the jitter's only
    torch.randint(0, 8, (4,)), torch.rand(4), colour_jitter_matrices(4, (0.1, 0.1, 0.1, 0.01))
    assert torch.equal(torch.get_rng_state(), state_off)
    assert not torch.allclose(a, base)
    # dense labels still follow the geometry with the augmentation on
    dense = torch.arange(4 * 2 * 4 * 4, dtype=torch.float32).view(4, 2, 4, 4)
    kw_geo = {**kw, "rotation": 0.0}
    torch.manual_seed(1)
    _, d_on = BatchTransform(**kw_geo, stain_aug=0.2)(x, dense)
    torch.manual_seed(1)
    _, d_off = BatchTransform(**kw_geo)(x, dense)
    assert torch.equal(d_on, d_off)


# ---------------------------------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_normalisation_moves_a_stain_shifted_patch_toward_the_target(method: str, tmp_path: Path) -> None:
    target = _png(tmp_path / "target.png", he_patch(1, 160))
    rec = fit_stain_norm(method, target)
    assert rec["method"] == method and rec["target"] == str(target.resolve()) and len(rec["target_sha256"]) == 64
    json.dumps(rec)  # plain JSON
    norm = StainNormalizer(rec)
    ref = torch.stack([he_patch(10 + i, 96) for i in range(3)]).float().mean((0, 2, 3))
    for shift in ({"h_amt": 0.55, "e_amt": 0.6}, {"h_amt": 1.5, "e_amt": 1.4},
                  {"h_vec": (0.95, 1.0, 0.28), "e_vec": (0.32, 0.95, 0.30)}):
        x = torch.stack([he_patch(10 + i, 96, **shift) for i in range(3)])
        y = norm(x)
        assert y.dtype == torch.uint8 and y.shape == x.shape
        before = (x.float().mean((0, 2, 3)) - ref).abs().mean()
        after = (y.float().mean((0, 2, 3)) - ref).abs().mean()
        assert after < 0.6 * before, (shift, before, after)
    blank = torch.full((1, 3, 64, 64), 245, dtype=torch.uint8)
    assert torch.equal(norm(blank), blank)  # background: left as it is


def test_cache_returns_what_the_normaliser_computes_and_stays_within_its_size() -> None:
    rec = {"method": "macenko", "params": {"HERef": [[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]],
                                           "maxCRef": [1.9, 1.0], "Io": 240.0, "alpha": 1.0, "beta": 0.1}}
    plain, cached = StainNormalizer(rec), StainNormalizer(rec, cache_mb=3 * 3 * 96 * 96 / 2**20)  # room for 3
    x = torch.stack([he_patch(20 + i, 96, h_amt=0.7 + 0.1 * i) for i in range(4)])
    want = plain(x)
    assert torch.equal(cached(x), want) and (cached.hits, cached.misses) == (0, 4)
    assert torch.equal(cached(x[1:]), want[1:]) and (cached.hits, cached.misses) == (3, 4)  # the last 3 were kept
    assert cached._cached_bytes <= cached.cache_bytes and len(cached._cache) == 3
    assert torch.equal(cached(x[:1]), want[:1]) and cached.misses == 5  # patch 0 was evicted (least recent)
    flipped = x[:1].flip(-1)  # another content is another key
    assert torch.equal(cached(flipped), plain(flipped)) and cached.misses == 6


def test_a_patch_store_is_a_target(tmp_path: Path) -> None:
    import h5py

    patches = torch.stack([he_patch(30 + i, 64) for i in range(20)]).permute(0, 2, 3, 1).numpy()
    with h5py.File(tmp_path / "slide_a.h5", "w") as f:
        f["imgs"] = patches
    rec = fit_stain_norm("macenko", tmp_path / "slide_a.h5")
    idx = np.linspace(0, 19, 16).round().astype(int)
    mosaic = np.concatenate([np.concatenate(list(patches[idx[r * 4:(r + 1) * 4]]), axis=1) for r in range(4)])
    png = tmp_path / "mosaic.png"
    Image.fromarray(mosaic).save(png)
    assert rec["params"] == fit_stain_norm("macenko", png)["params"]
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f["imgs"] = np.zeros((0, 64, 64, 3), np.uint8)
    with pytest.raises(PipelineError, match="holds no patches"):
        fit_stain_norm("macenko", tmp_path / "empty.h5")


def test_the_default_target_is_the_first_training_slides_patch_store(tmp_path: Path) -> None:
    from hex.train.config import TrainConfig, stain_target_path

    split = tmp_path / "splits_0.csv"
    split.write_text("train,val\nslide_b,slide_a\nslide_c,\n")
    cfg = TrainConfig(data=tmp_path, split=split, out=tmp_path, stain_norm="macenko")
    assert stain_target_path(cfg) == tmp_path / "he_patches" / "slide_b.h5"
    assert stain_target_path(dataclasses.replace(cfg, patches_dir=tmp_path / "p")) == tmp_path / "p" / "slide_b.h5"
    given = tmp_path / "t.png"
    assert stain_target_path(dataclasses.replace(cfg, stain_target=given)) == given
    assert stain_target_path(dataclasses.replace(cfg, stain_norm="none")) is None


def test_bad_targets_and_records_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="--stain-target .*file not found"):
        fit_stain_norm("macenko", tmp_path / "missing.png")
    with pytest.raises(PipelineError, match="needs --stain-target"):
        fit_stain_norm("reinhard", None)
    glass = _png(tmp_path / "glass.png", torch.full((3, 64, 64), 240, dtype=torch.uint8))
    with pytest.raises(PipelineError, match="stained tissue"):
        fit_stain_norm("macenko", glass)
    assert fit_stain_norm("none", None) is None
    with pytest.raises(PipelineError, match="lacks \\['maxCRef'"):
        check_record({"method": "macenko", "params": {"HERef": [[1, 0], [0, 1], [0, 0]]}})
    with pytest.raises(PipelineError, match="unknown stain normalisation method 'vahadane'"):
        check_record({"method": "vahadane", "params": {}})


# ---------------------------------------------------------------------------------------------------- recorded in runs


@pytest.mark.slow
def test_train_records_the_fit_and_test_reapplies_it(tmp_path: Path) -> None:
    import pandas as pd

    from bench.synthetic_hex_data import write_synthetic_dataset
    from hex.evaluate import stage as hex_test
    from hex.train import stage as hex_train
    from hex.trained_model import load_trained
    from mica.features.image_encoders import load_encoder

    root = tmp_path / "data"
    write_synthetic_dataset(root, n_slides=4, n_per_slide=6, size=48, seed=2)
    target = _png(tmp_path / "target.png", he_patch(1, 128))
    args = ["--data", str(root), "--split", str(root / "splits/splits_0.csv"), "--out", str(tmp_path),
            "--run-name", "s", "--backbone", "tiny", "--input-size", "32", "--batch-size", "8", "--workers", "0",
            "--epochs", "1", "--no-fds", "--stain-norm", "reinhard", "--stain-target", str(target),
            "--stain-aug", "0.2"]
    assert hex_train.main(args) == 0
    run = tmp_path / "runs" / "s"
    cfg, best = json.loads((run / "config.json").read_text()), json.loads((run / "best.json").read_text())
    assert cfg["stain_aug"] == 0.2 and cfg["stain_norm"] == "reinhard" and cfg["stain_norm_fit"] == best["stain_norm"]
    assert best["stain_norm"]["method"] == "reinhard" and len(best["stain_norm"]["params"]["means"]) == 3
    ck = torch.load(run / "checkpoints" / "epoch_1.pt", weights_only=True)
    assert ck["stain_norm"] == best["stain_norm"]
    model, meta = load_trained(run / "best.safetensors")
    assert meta["stain_norm"] == best["stain_norm"]
    assert load_encoder("hex:s", out=tmp_path).stain_norm == best["stain_norm"]  # stage 07 reads it too
    # hex.test (no stain flag) predicts through the recorded normalisation
    assert hex_test.main(["--out", str(tmp_path), "--run", "s", "--data", str(root), "--slides", "slide_002",
                          "--workers", "0", "--no-plots"]) == 0
    pp = pd.read_csv(run / "test" / "patch_predictions.csv")
    import h5py

    with h5py.File(root / "he_patches" / "slide_002.h5", "r") as f:
        imgs = torch.from_numpy(f["imgs"][:]).permute(0, 3, 1, 2).contiguous()
    preds = {}
    for name, rec in (("with", meta["stain_norm"]), ("without", None)):
        tf = BatchTransform(32, meta["mean"], meta["std"], stain_norm=rec)
        with torch.inference_mode():
            preds[name] = model(tf(imgs))[0].numpy()
    got = pp.filter(like="pred_").to_numpy()
    assert np.allclose(got, preds["with"], atol=1e-4) and not np.allclose(got, preds["without"], atol=1e-3)
    # resuming with another target stops naming the stain keys
    other = _png(tmp_path / "other.png", he_patch(2, 128))
    again = [*args[:args.index("--stain-target")], "--stain-target", str(other), "--epochs", "2", "--resume", "auto"]
    assert hex_train.main(again) == 2
