"""mica.extract_features / mica.features.codex_encoders: H&E feature bags (tiny backbone, a tiny HEX run) equal a direct
forward of the stored patches; CODEX stats descriptors on hand-made maps; the image (DINOv2) CODEX path for shapes,
weight loading and cross-slide batching; skip/overwrite, empty grids, sharding, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from hex import backbones as bb
from hex.data.transforms import BatchTransform
from mica import extract_features as ef
from mica.features import codex_encoders as ce
from mica.features import codex_features as cr
from mica.features.done_records import codex_spec
from mica.features.he_bags import encoder_dirname, feature_paths, read_feature_bag
from mica.features.image_encoders import load_encoder
from preprocess import patch, patch_store
from sample_data.writers import write_aperio_tiff
from tests.fixtures import MAP_MARKERS, blob_slide, write_maps

ROOT = Path(__file__).resolve().parents[2]
MARKERS = MAP_MARKERS




@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Two slides (0.5 µm/px read at level 0; 0.25 µm/px read at its 2x level) with grids and patch stores, and the
    weights of a random ``tiny`` backbone."""
    d = tmp_path_factory.mktemp("mica_feat")
    (d / "he").mkdir()
    write_aperio_tiff(d / "he" / "a.tif", blob_slide(1000, 900, 0), mpp=0.5, downsamples=(4,))
    write_aperio_tiff(d / "he" / "b.tif", blob_slide(1400, 1300, 1), mpp=0.25, downsamples=(2, 8))
    out = d / "out"
    assert patch.main(["--cohort", str(d), "--out", str(out)]) == 0
    assert patch_store.main(["--cohort", str(d), "--out", str(out)]) == 0
    torch.manual_seed(1)
    w = bb.save_backbone(bb.create("tiny"), d / "tiny.safetensors")
    return d, out, w


def _direct(model: torch.nn.Module, store: Path, tf: BatchTransform) -> np.ndarray:
    with h5py.File(store) as f:
        imgs = torch.from_numpy(f["imgs"][:]).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        return model.eval()(tf(imgs)).numpy()


def _mtimes(paths: list[Path]) -> list[int]:
    return [p.stat().st_mtime_ns for p in paths]


# ----------------------------------------------------------------------------------------------------------------
# H&E bags


def test_he_tiny_equals_direct_forward_skip_overwrite(cohort) -> None:
    d, out, w = cohort
    args = ["--cohort", str(d), "--out", str(out), "--what", "he", "--encoder", "tiny", "--weights", str(w),
            "--workers", "0", "--batch-size", "5"]
    assert ef.main(args) == 0
    model = bb.create("tiny", weights=w)
    tf = BatchTransform(224, model.mean, model.std, train=False, interpolation="bicubic")
    files = []
    for s in ("a", "b"):
        h5, pt = feature_paths(out, "tiny", s)
        assert h5 == out / "features/tiny/h5_files" / f"{s}.h5" and pt == out / "features/tiny/pt_files" / f"{s}.pt"
        feats, coords, attrs = read_feature_bag(h5)
        with h5py.File(out / "patches" / f"{s}.h5") as g:
            np.testing.assert_array_equal(coords, g["coords"][:])
            assert attrs["patch_size_level0"] == g.attrs["patch_size_level0"]
        assert feats.dtype == np.float32 and coords.dtype == np.int64 and feats.shape == (len(coords), 192)
        assert len(coords) > 3
        assert attrs["encoder"] == "tiny" and attrs["slide_id"] == s and attrs["schema_version"] == 1
        assert attrs["mpp"] == 0.5
        np.testing.assert_allclose(feats, _direct(model, out / "he_patches" / f"{s}.h5", tf), rtol=1e-4, atol=1e-5)
        t = torch.load(pt, weights_only=True)
        assert isinstance(t, torch.Tensor) and torch.equal(t, torch.from_numpy(feats))
        files += [h5, pt]
    assert (out / "features/tiny/config.json").is_file()
    before = _mtimes(files)
    time.sleep(0.01)
    assert ef.main(args) == 0
    assert _mtimes(files) == before  # skipped
    assert ef.main([*args, "--slides", "a", "--overwrite"]) == 0
    after = _mtimes(files)
    assert after[:2] != before[:2] and after[2:] == before[2:]
    # other settings: stop before any work (tests/test_chain_mica.py), --overwrite redoes
    assert ef.main([*args, "--slides", "a", "--interpolation", "bilinear"]) == 2
    assert _mtimes(files) == after


@pytest.mark.slow
def test_he_hex_run_backbone(cohort) -> None:
    from hex.model import HEX
    from hex.train.checkpoints import save_best

    d, out, _ = cohort
    torch.manual_seed(2)
    model = HEX("tiny", num_markers=40, unfreeze_last=-1, input_size=96, embed_dim=48)
    meta = {"markers": MARKERS, "normalization": None, "model_args": model.model_args, "input_size": 96,
            "interpolation": "bilinear", "mean": list(model.mean), "std": list(model.std), "epoch": 3,
            "val_mean_pearson": 0.1}
    save_best(out / "runs" / "tiny_run", model, meta)
    assert ef.main(["--cohort", str(d), "--out", str(out), "--what", "he", "--encoder", "hex:tiny_run",
                    "--workers", "1", "--slides", "b"]) == 0
    feats, coords, attrs = read_feature_bag(out / "features/hex_tiny_run/h5_files/b.h5")
    assert feats.shape == (len(coords), 48) and attrs["encoder"] == "hex:tiny_run" and attrs["input_size"] == 96
    tf = BatchTransform(96, model.mean, model.std, train=False, interpolation="bilinear")
    np.testing.assert_allclose(feats, _direct(model.visual, out / "he_patches/b.h5", tf), rtol=1e-4, atol=1e-5)


def test_empty_grid_gives_empty_bag(cohort, tmp_path, caplog) -> None:
    d, out, w = cohort
    (tmp_path / "he").mkdir()
    os.symlink(d / "he" / "a.tif", tmp_path / "he" / "e.tif")
    (tmp_path / "patches").mkdir()
    with h5py.File(out / "patches" / "a.h5") as g, h5py.File(tmp_path / "patches" / "e.h5", "w") as f:
        f.create_dataset("coords", data=np.zeros((0, 2), np.int64))
        for k, v in g.attrs.items():
            f.attrs[k] = v
    assert ef.main(["--cohort", str(tmp_path), "--out", str(tmp_path), "--what", "he", "--encoder", "tiny",
                    "--weights", str(w), "--workers", "2"]) == 0
    feats, coords, _ = read_feature_bag(tmp_path / "features/tiny/h5_files/e.h5")
    assert feats.shape == (0, 192) and coords.shape == (0, 2)
    assert torch.load(tmp_path / "features/tiny/pt_files/e.pt", weights_only=True).shape == (0, 192)
    assert "is empty" in caplog.text


def test_bad_input_and_failures(cohort, tmp_path, caplog) -> None:
    d, out, w = cohort
    base = ["--cohort", str(d), "--out", str(out), "--what", "he", "--workers", "0"]
    assert ef.main([*base, "--encoder", "nope"]) == 2
    assert ef.main([*base, "--encoder", "hex:missing_run"]) == 2
    assert ef.main([*base, "--encoder", "tiny", "--weights", str(tmp_path / "none.pth")]) == 2
    assert ef.main([*base, "--encoder", "tiny", "--shard", "3/2"]) == 2
    # a slide without a grid fails (exit 1) while the others are done; the last line names it and why
    (tmp_path / "patches").mkdir()
    (tmp_path / "patches" / "a.h5").write_bytes((out / "patches" / "a.h5").read_bytes())
    assert ef.main(["--cohort", str(d), "--out", str(tmp_path / "o"), "--what", "he", "--workers", "0", "--encoder",
                    "tiny", "--weights", str(w), "--patches", str(tmp_path / "patches")]) == 1
    assert feature_paths(tmp_path / "o", "tiny", "a")[0].is_file()
    last = caplog.records[-1].getMessage()
    assert last.startswith("H&E features (tiny): 1 done, 0 skipped (already done), 1 failed: b (patch grid not found")


def test_shards_cover_every_slide_once() -> None:
    slides = [f"s{i}" for i in range(11)]
    got = [s for i in range(3) for r in range(2) for s in ef.my_slides(slides, f"{i}/3", r, 2)]
    assert sorted(got) == sorted(slides) and len(got) == len(slides)
    assert ef.my_slides(slides, None) == sorted(slides)
    assert encoder_dirname("hex:demo/x") == "hex_demo_x"


# ----------------------------------------------------------------------------------------------------------------
# CODEX stats


def _moran_reference(x: np.ndarray, mask: np.ndarray) -> float:
    """Moran's I with an explicit binary rook weight matrix (textbook formula)."""
    pos = [tuple(p) for p in np.argwhere(mask)]
    idx = {p: i for i, p in enumerate(pos)}
    n = len(pos)
    wmat = np.zeros((n, n))
    for (r, c), i in idx.items():
        for q in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
            if q in idx:
                wmat[i, idx[q]] = 1
    z = np.array([x[p] for p in pos]) - np.mean([x[p] for p in pos])
    return n / wmat.sum() * (z @ wmat @ z) / (z @ z)


def test_morans_i_block_noise_checkerboard_reference() -> None:
    rng = np.random.default_rng(0)
    block = np.zeros((20, 20))
    block[5:11, 5:11] = 1
    noise = rng.random((20, 20))
    checker = (np.indices((20, 20)).sum(0) % 2).astype(float)
    vmap = np.stack([block, noise, checker], -1)
    i = ce.morans_i(vmap, np.ones((20, 20), bool))
    assert i[0] > 0.8 and abs(i[1]) < 0.15 and i[2] == pytest.approx(-1.0)
    mask = rng.random((9, 8)) > 0.3
    x = rng.random((9, 8, 1))
    assert ce.morans_i(x, mask)[0] == pytest.approx(_moran_reference(x[..., 0], mask), rel=1e-6)
    assert ce.morans_i(np.ones((5, 5, 1)), np.ones((5, 5), bool))[0] == 0  # constant channel


def test_stats_features_on_hand_made_map(caplog) -> None:
    h = w = 20
    cd8 = np.zeros((h, w))
    cd8[5:11, 5:11] = 1  # 36 px
    ck = np.zeros((h, w))
    ck[0:10, 0:10] = 0.8  # epithelial region: 100 px, overlaps the CD8 block on 25 px
    noise = np.random.default_rng(1).random((h, w)) * 0.4
    vmap = np.stack([cd8, ck, noise], -1).astype(np.float16)
    mask = np.ones((h, w), bool)
    mask[:, 15:] = False
    vmap[:, 15:] = 9.0  # outside the tissue: ignored
    f = ce.stats_features(vmap, mask, ["CD8", "pan-cytokeratin", "CD68"])
    col = {k: i for i, k in enumerate(ce.STATS_FEATURES)}
    assert f.shape == (3, len(ce.STATS_FEATURES)) == (3, 10) and f.dtype == np.float32
    n = 300  # tissue pixels
    assert f[0, col["mean"]] == pytest.approx(36 / n)
    assert f[0, col["frac_high"]] == pytest.approx(36 / n)
    assert f[0, col["sd"]] == pytest.approx(np.sqrt(36 / n * (1 - 36 / n)), rel=1e-5)
    assert f[0, col["p50"]] == 0 and f[1, col["p90"]] == pytest.approx(0.8, rel=1e-3)
    assert f[0, col["moran_i"]] > 0.8 and abs(f[2, col["moran_i"]]) < 0.2
    assert f[0, col["frac_high_in_epi"]] == pytest.approx(25 / 36)
    assert f[0, col["mean_epi"]] == pytest.approx(25 / 100) and f[0, col["mean_stroma"]] == pytest.approx(11 / 200)
    assert f[1, col["corr_epi"]] == pytest.approx(1.0) and abs(f[2, col["corr_epi"]]) < 0.2
    assert f[2, col["frac_high_in_epi"]] == 0  # no high pixel
    # without epithelial channels: co-location columns are 0 (warning); empty tissue: all zeros
    g = ce.stats_features(vmap, mask, ["CD8", "X", "CD68"])
    assert "no epithelial channel" in caplog.text
    np.testing.assert_array_equal(g[:, col["corr_epi"]:], 0)
    np.testing.assert_array_equal(g[:, :col["corr_epi"]], f[:, :col["corr_epi"]])
    assert not ce.stats_features(vmap, np.zeros((h, w), bool), ["CD8", "X", "CD68"]).any()
    assert set(ce.STATS_DESCRIPTIONS) == set(ce.STATS_FEATURES)


def test_codex_stats_cli_skip_and_errors(tmp_path) -> None:
    maps = write_maps(tmp_path, {"s1": (12, 15), "s2": (9, 9)})
    args = ["--out", str(tmp_path), "--what", "codex", "--codex-encoder", "stats", "--workers", "1"]
    assert ef.main(args) == 0
    with h5py.File(tmp_path / "codex_features/stats.h5") as f:
        assert sorted(f) == ["s1", "s2"] and list(f.attrs["markers"]) == MARKERS and f.attrs["encoder"] == "stats"
        assert list(f.attrs["feature_names"]) == list(ce.STATS_FEATURES)
        for s, vmap in maps.items():
            mask = np.asarray(Image.open(tmp_path / f"virtual_codex/{s}_mask.png")) > 0
            np.testing.assert_allclose(f[s][:], ce.stats_features(vmap, mask, MARKERS), rtol=1e-6)
            assert f[s].shape == (40, 10) and f[s].dtype == np.float32
    parts = [cr.part_path(tmp_path, "stats", s) for s in maps]
    before = _mtimes(parts)
    assert ef.main(args) == 0 and _mtimes(parts) == before
    assert ef.main([*args, "--high", "0.3"]) == 2 and _mtimes(parts) == before  # other settings: stop
    assert ef.main([*args, "--high", "0.3", "--overwrite"]) == 0
    assert all(a != b for a, b in zip(_mtimes(parts), before))
    args = [*args, "--high", "0.3"]
    # a map with the wrong channel count fails that slide only (exit 1); the combined file keeps the others
    np.save(tmp_path / "virtual_codex/s3.npy", np.zeros((5, 5, 7), np.float16))
    assert ef.main(args) == 1
    with h5py.File(tmp_path / "codex_features/stats.h5") as f:
        assert sorted(f) == ["s1", "s2"]
    assert ef.main(["--out", str(tmp_path / "nothing"), "--what", "codex", "--codex-encoder", "stats"]) == 2


# ----------------------------------------------------------------------------------------------------------------
# CODEX image encoders (DINOv2 path)


def test_channel_images_and_model_input() -> None:
    vmap = np.array([[[0.5, 1.7, -0.2]]], np.float16)  # (1, 1, 3)
    img = ce.channel_images(vmap)
    assert img.shape == (3, 1, 1, 1) and img.dtype == torch.uint8 and img.flatten().tolist() == [128, 255, 0]
    const = torch.full((2, 1, 7, 9), 100, dtype=torch.uint8)
    g = ce.resize_grey(const, 224)
    assert g.shape == (2, 1, 224, 224) and torch.allclose(g, torch.full_like(g, 100 / 255))
    step = torch.zeros((1, 1, 8, 8), dtype=torch.uint8)
    step[..., 4:] = 255
    up = ce.resize_grey(step, 224)  # bicubic overshoots at the edge: clamped, on the uint8 grid as PIL's result
    assert up.min() == 0 and up.max() == 1 and torch.equal(up * 255, (up * 255).round())
    x = ce.to_model_input(g, bb.IMAGENET_MEAN, bb.IMAGENET_STD)
    assert x.shape == (2, 3, 224, 224)
    assert torch.allclose(x[0, :, 0, 0], (100 / 255 - torch.tensor(bb.IMAGENET_MEAN)) / torch.tensor(bb.IMAGENET_STD))


def _to_original_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm reg4 DINOv2 keys -> facebookresearch keys (register_tokens, a CLS row in pos_embed, mask_token)."""
    out = {("register_tokens" if k == "reg_token" else k): v.clone() for k, v in sd.items()}
    d = sd["cls_token"].shape[-1]
    out["pos_embed"] = torch.cat([torch.zeros(1, 1, d), sd["pos_embed"]], dim=1)
    out["mask_token"] = torch.zeros(1, d)
    return out


@pytest.mark.slow
def test_dinov2_codex_weights_and_cross_slide_batches(tmp_path) -> None:
    maps = write_maps(tmp_path, {"s1": (30, 20), "s2": (300, 260)})  # enlarged and shrunk to 224
    torch.manual_seed(4)
    src = bb.create("dinov2_vits14_reg", depth=1).eval()
    torch.save(_to_original_layout(src.model.state_dict()), tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    enc = load_encoder("dinov2_vits14_reg", weights=str(tmp_path / "dinov2_vits14_reg4_pretrain.pth"), depth=1)
    assert (enc.embed_dim, enc.input_size, enc.mean) == (384, 224, bb.IMAGENET_MEAN)
    found = cr.find_maps(tmp_path)
    assert sorted(found) == ["s1", "s2"]
    spec = codex_spec(tmp_path, "dino", {})
    rep = cr.run_image(["s1", "s2"], tmp_path, "dino", "dinov2_vits14_reg", enc.module, 224, enc.mean, enc.std,
                       torch.device("cpu"), spec, batch_size=24, workers=0, progress=False)
    assert rep.done == ["s1", "s2"] and not rep.failed
    cr.assemble(tmp_path, "dino", "dinov2_vits14_reg")
    with h5py.File(tmp_path / "codex_features/dino.h5") as f:
        got = {s: f[s][:] for s in f}
        assert list(f.attrs["markers"]) == MARKERS and f.attrs["feature_dim"] == 384
    for s, vmap in maps.items():  # 24-image batches mixed the slides' channels: same as one slide at a time
        assert got[s].shape == (40, 384)
        x = ce.to_model_input(ce.resize_grey(ce.channel_images(vmap), 224), bb.IMAGENET_MEAN, bb.IMAGENET_STD)
        with torch.no_grad():
            want = src(x[:8]).numpy()
        np.testing.assert_allclose(got[s][:8], want, rtol=1e-3, atol=1e-4)
    assert not np.allclose(got["s1"], got["s2"])
    again = cr.run_image(["s1", "s2"], tmp_path, "dino", "dinov2_vits14_reg", enc.module, 224, enc.mean, enc.std,
                         torch.device("cpu"), spec, progress=False)
    assert again.skipped == ["s1", "s2"] and not again.done


def test_codex_image_encoder_cli(cohort, tmp_path) -> None:
    _, _, w = cohort
    vmap = write_maps(tmp_path, {"s1": (10, 12)})["s1"]
    assert ef.main(["--out", str(tmp_path), "--what", "codex", "--codex-encoder", "tiny", "--codex-weights", str(w),
                    "--workers", "0", "--batch-size", "16"]) == 0
    with h5py.File(tmp_path / "codex_features/tiny.h5") as f:
        assert f["s1"].shape == (40, 192) and f.attrs["encoder"] == "tiny"
        got = f["s1"][:]
    model = bb.create("tiny", weights=w).eval()
    x = ce.to_model_input(ce.resize_grey(ce.channel_images(vmap), 224), model.mean, model.std)
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "codex_features/tiny/config.json").read_text())["input_size"] == 224


@pytest.mark.slow
def test_cli_help() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "mica.extract_features", "--help"], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "torchrun --standalone --nproc-per-node" in r.stdout and "--codex-encoder" in r.stdout
