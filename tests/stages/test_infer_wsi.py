"""hex.infer_wsi (stage 06) and its region tile reader on small synthetic slides (tiny models, CPU).

Fast: the region reader equals the patch store pixel for pixel; infer_wsi over the stage-01 grid reproduces
hex.test's predictions; a stride gives the expected overlapping grid; shards cover every slide once; bad slides
fail with one line each while the others finish; the original release's checkpoint layouts (heads-only + MUSK
weights, and full) run through hex.test and hex.infer_wsi. Slow: 2-rank gloo torchrun equals 1 rank.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

from hex.evaluate import stage as hex_test
from hex.infer import predictions
from hex.infer import stage as infer_wsi
from hex.infer.tiles import TileRegions, make_tile_loader, tissue_tiles
from hex.model import HEX
from hex.trained_model import load_trained, original_markers
from preprocess import patch, patch_store
from sample_data.writers import write_aperio_tiff
from tests.fixtures import blob_slide, save_run

ROOT = Path(__file__).resolve().parents[2]
PS = 112  # tile size of these tests (56 µm), small slides stay fast
MUSK_KW = {"embed_dim": 64, "depth": 2, "num_heads": 2, "img_size": 64}




def _spread_out(model: HEX, factor: float = 500.0) -> HEX:
    """Scale the last layer so predictions vary across tiles by ~0.1 (a random init varies by ~1e-4, which would make
    a 1e-4 comparison meaningless)."""
    with torch.no_grad():
        model.regression_head1.weight.mul_(factor)
    return model


def _spread(pred: np.ndarray) -> float:
    """Mean over markers of the prediction's standard deviation over tiles."""
    return float(pred.std(axis=0).mean())


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Slides a (0.5 µm/px, level 0), b (0.25 µm/px, read at its 2x level), c (0.3 µm/px, resized); stages 01 and
    03's patch store; random labels named like the original markers; a random tiny HEX as run ``tiny``."""
    d = tmp_path_factory.mktemp("wsi")
    (d / "he").mkdir()
    write_aperio_tiff(d / "he" / "a.tif", blob_slide(800, 700, 0), mpp=0.5, downsamples=(4,))
    write_aperio_tiff(d / "he" / "b.tif", blob_slide(1400, 1200, 1), mpp=0.25, downsamples=(2, 8))
    write_aperio_tiff(d / "he" / "c.tif", blob_slide(900, 800, 2), mpp=0.3, downsamples=(4,))
    out = d / "out"
    common = ["--cohort", str(d), "--out", str(out)]
    assert patch.main([*common, "--patch-size", str(PS)]) == 0
    assert patch_store.main([*common, "--region-px", "300"]) == 0  # several regions per slide
    markers = original_markers()
    rng = np.random.default_rng(0)
    (out / "markers").mkdir()
    for sid in ("a", "b", "c"):
        with h5py.File(out / "patches" / f"{sid}.h5") as f:
            xy = f["coords"][:]
        df = pd.DataFrame({"slide": sid, "index": np.arange(len(xy)), "x": xy[:, 0], "y": xy[:, 1]})
        labels = pd.DataFrame(rng.uniform(0, 1, (len(xy), len(markers))), columns=markers)
        pd.concat([df, labels[markers[::-1]]], axis=1).to_csv(out / "markers" / f"{sid}.csv", index=False)
    torch.manual_seed(0)
    save_run(out, "tiny", _spread_out(HEX("tiny", num_markers=40, input_size=32, unfreeze_last=-1)), markers)
    return d, out


def _preds(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    with h5py.File(path) as f:
        return f["coords"][:], f["codex_prediction"][:], dict(f.attrs)


def _test_preds(test_dir: Path, sid: str, markers: list[str]) -> tuple[np.ndarray, np.ndarray]:
    df = pd.read_csv(test_dir / "patch_predictions.csv", dtype={"slide": str})
    df = df[df["slide"] == sid].sort_values("index")
    return df[["x", "y"]].to_numpy(), df[[f"pred_{m}" for m in markers]].to_numpy()


# ------------------------------------------------------------------------------------------------- tile reader
@pytest.mark.slow
def test_tile_regions_equal_patch_store(cohort: tuple[Path, Path]) -> None:
    d, out = cohort
    for sid in ("a", "b", "c"):
        ds = TileRegions.from_grid(d / "he" / f"{sid}.tif", out / "patches" / f"{sid}.h5", region_px=300)
        assert len(ds) > 1  # several regions, not one read
        with h5py.File(out / "he_patches" / f"{sid}.h5") as f:
            store = f["imgs"][:].transpose(0, 3, 1, 2)
        seen = np.zeros(ds.num_tiles, int)
        for imgs, idx in make_tile_loader(ds, batch_size=5, workers=0):
            assert imgs.dtype == torch.uint8 and imgs.shape[1:] == (3, PS, PS) and len(imgs) <= 5
            np.testing.assert_array_equal(imgs.numpy(), store[idx.numpy()])
            seen[idx.numpy()] += 1
        assert (seen == 1).all()
        tiles, idx = ds[0]  # map-style access: one region
        np.testing.assert_array_equal(tiles.numpy(), store[idx.numpy()])


def test_tile_loader_workers_cover_every_tile_once(cohort: tuple[Path, Path]) -> None:
    d, out = cohort
    ds = TileRegions.from_grid(d / "he" / "b.tif", out / "patches" / "b.h5", region_px=300)
    idx = np.concatenate([i.numpy() for _, i in make_tile_loader(ds, batch_size=4, workers=2)])
    assert sorted(idx.tolist()) == list(range(ds.num_tiles))


def test_tissue_grid_at_patch_stride_is_the_stage01_grid(cohort: tuple[Path, Path]) -> None:
    d, out = cohort
    for sid in ("a", "b", "c"):
        tiles, frac, info = tissue_tiles(d / "he" / f"{sid}.tif", patch_size=PS)
        with h5py.File(out / "patches" / f"{sid}.h5") as f:
            np.testing.assert_array_equal(tiles.coords, f["coords"][:])
            np.testing.assert_allclose(frac, f["tissue_fraction"][:], rtol=1e-6)
            assert info["stride_level0"] == f.attrs["patch_size_level0"] == tiles.patch_size_level0
            assert tiles.level == f.attrs["patch_level"] and tiles.read_size == f.attrs["read_size_at_level"]


# ------------------------------------------------------------------------------------------------- predictions
def test_stage01_grid_reproduces_hex_test(cohort: tuple[Path, Path], tmp_path: Path) -> None:
    d, out = cohort
    assert hex_test.main(["--out", str(out), "--run-name", "tiny", "--workers", "0", "--no-plots",
                          "--test-dir", str(tmp_path / "test"), "--batch-size", "7"]) == 0
    pred_out = tmp_path / "o"
    shutil.copytree(out / "patches", pred_out / "patches")
    ck = out / "runs" / "tiny" / "best.safetensors"
    args = ["--cohort", str(d), "--out", str(pred_out), "--checkpoint", str(ck), "--workers", "0", "--batch-size",
            "5", "--no-maps", "--raw-units"]
    assert infer_wsi.main(args) == 0
    markers = original_markers()
    for sid in ("a", "b", "c"):
        coords, pred, attrs = _preds(pred_out / "hex_pred" / f"{sid}.h5")
        t_xy, t_pred = _test_preds(tmp_path / "test", sid, markers)
        np.testing.assert_array_equal(coords, t_xy)
        assert pred.shape == (len(coords), 40) and pred.dtype == np.float32
        assert np.abs(pred - t_pred).max() <= 1e-4 and _spread(pred) > 0.02
        assert list(attrs["markers"]) == markers and attrs["stride_level0"] == attrs["patch_size_level0"]
        assert attrs["grid_source"].endswith(f"{sid}.h5") and len(attrs["checkpoint_sha256"]) == 64
        assert json.loads(attrs["normalization"])["values"][0][0] == 10.0
        with h5py.File(pred_out / "hex_pred" / f"{sid}.h5") as f:
            np.testing.assert_allclose(f["codex_prediction_raw"][:], 10 + 100 * pred, rtol=1e-6)
    assert (pred_out / "hex_pred" / "config.json").is_file()
    # done slides are skipped
    mtime = (pred_out / "hex_pred" / "a.h5").stat().st_mtime_ns
    assert infer_wsi.main(args) == 0
    assert (pred_out / "hex_pred" / "a.h5").stat().st_mtime_ns == mtime
    # best.safetensors alone (no best.json beside it) carries its own description
    shutil.copy(ck, tmp_path / "moved.safetensors")
    _, meta = load_trained(tmp_path / "moved.safetensors")
    assert meta["markers"] == markers and meta["input_size"] == 32 and meta["checkpoint_kind"] == "safetensors"


def test_stride_gives_overlapping_grid(cohort: tuple[Path, Path], tmp_path: Path) -> None:
    d, out = cohort
    ck = out / "runs" / "tiny" / "best.safetensors"
    base = ["--cohort", str(d), "--slides", "a", "--checkpoint", str(ck), "--workers", "0", "--no-maps"]
    assert infer_wsi.main([*base, "--out", str(tmp_path / "all"), "--stride", "56", "--patch-size", str(PS),
                           "--min-tissue", "0"]) == 0
    coords, _, attrs = _preds(tmp_path / "all" / "hex_pred" / "a.h5")
    assert attrs["stride_level0"] == 56 and attrs["patch_size_level0"] == PS and attrs["grid_source"] == "computed"
    xs, ys = np.arange(0, 800 - PS + 1, 56), np.arange(0, 700 - PS + 1, 56)
    expect = np.stack(np.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)  # row-major: y outer
    np.testing.assert_array_equal(coords, expect)
    # the tissue grid at stride 56 (tile size from the stage-01 grid) contains the stage-01 grid, with the same
    # predictions there
    for name in ("t", "g"):
        shutil.copytree(out / "patches", tmp_path / name / "patches")
    assert infer_wsi.main([*base, "--out", str(tmp_path / "t"), "--stride", "56"]) == 0
    coords, pred, attrs = _preds(tmp_path / "t" / "hex_pred" / "a.h5")
    assert ((coords % 56) == 0).all() and attrs["patch_size"] == PS and attrs["grid_source"] == "computed"
    assert infer_wsi.main([*base, "--out", str(tmp_path / "g")]) == 0
    g_coords, g_pred, _ = _preds(tmp_path / "g" / "hex_pred" / "a.h5")
    pos = {tuple(c): i for i, c in enumerate(coords)}
    assert all(tuple(c) in pos for c in g_coords) and len(coords) > 2 * len(g_coords)
    rows = [pos[tuple(c)] for c in g_coords]
    assert np.abs(pred[rows] - g_pred).max() <= 1e-4 and _spread(g_pred) > 0.02


def test_maps_written_by_default(cohort: tuple[Path, Path], tmp_path: Path) -> None:
    pytest.importorskip("hex.virtual_codex")
    d, out = cohort
    ck = out / "runs" / "tiny" / "best.safetensors"
    assert infer_wsi.main(["--cohort", str(d), "--slides", "a", "--out", str(tmp_path), "--checkpoint", str(ck),
                           "--workers", "0", "--patch-size", str(PS)]) == 0
    assert (tmp_path / "virtual_codex" / "a.npy").is_file() and (tmp_path / "virtual_codex" / "a.ome.tif").is_file()
    assert (tmp_path / "virtual_codex" / "a_preview.png").is_file()


def test_map_formats_writes_only_those_and_adds_the_rest_later(cohort: tuple[Path, Path], tmp_path: Path) -> None:
    """``--map-formats npy`` (the demo's outcome cohort: stage 07 needs only the map) skips the preview and the
    OME-TIFF; a later run with every format adds them without predicting again."""
    d, out = cohort
    ck = out / "runs" / "tiny" / "best.safetensors"
    base = ["--cohort", str(d), "--slides", "a", "--out", str(tmp_path), "--checkpoint", str(ck), "--workers", "0",
            "--patch-size", str(PS)]
    vc = tmp_path / "virtual_codex"
    assert infer_wsi.main([*base, "--map-formats", "npy"]) == 0
    assert (vc / "a.npy").is_file() and not (vc / "a_preview.png").exists() and not (vc / "a.ome.tif").exists()
    assert json.loads((vc / "a.json").read_text())["formats"] == ["npy"]
    assert infer_wsi.main(base) == 0
    assert (vc / "a_preview.png").is_file() and (vc / "a.ome.tif").is_file() and (vc / "a.geojson").is_file()


def test_shards_cover_all(cohort: tuple[Path, Path], tmp_path: Path) -> None:
    slides = ["c", "a", "e", "b", "d"]
    parts = [infer_wsi.shard_slides(slides, f"{i}/2") for i in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(slides) and not set(parts[0]) & set(parts[1])
    ranks = [infer_wsi.shard_slides(slides, "1/2", r, 2) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == sorted(parts[1])
    d, out = cohort
    ck = out / "runs" / "tiny" / "best.safetensors"
    for i in range(2):
        assert infer_wsi.main(["--cohort", str(d), "--out", str(tmp_path), "--checkpoint", str(ck), "--workers",
                               "0", "--no-maps", "--patch-size", str(PS), "--shard", f"{i}/2"]) == 0
    assert sorted(p.stem for p in (tmp_path / "hex_pred").glob("*.h5")) == ["a", "b", "c"]
    assert (tmp_path / "hex_pred" / "config_shard0of2.json").is_file()
    assert infer_wsi.main(["--cohort", str(d), "--out", str(tmp_path), "--checkpoint", str(ck), "--shard",
                           "2/2"]) == 2


def test_bad_slides_one_line_each(cohort: tuple[Path, Path], tmp_path: Path, capfd: pytest.CaptureFixture,
                                  caplog: pytest.LogCaptureFixture) -> None:
    d, out = cohort
    he = tmp_path / "he"
    he.mkdir()
    shutil.copy(d / "he" / "a.tif", he / "good.tif")
    shutil.copy(d / "he" / "a.tif", he / "café.tif")
    (he / "empty.tif").write_bytes(b"")
    data = (d / "he" / "c.tif").read_bytes()
    (he / "trunc.tif").write_bytes(data[: len(data) // 2])
    shutil.copy(d / "he" / "c.tif", he / "corrupt.tif")  # header intact, level-0 tiles zeroed: fails in a worker
    with tifffile.TiffFile(he / "corrupt.tif") as t:
        spans = list(zip(t.pages[0].dataoffsets, t.pages[0].databytecounts))
    with open(he / "corrupt.tif", "r+b") as f:
        for off, n in spans:
            f.seek(off)
            f.write(b"\0" * n)
    write_aperio_tiff(he / "small.tif", blob_slide(80, 70, 3), mpp=0.5, downsamples=(2,))
    write_aperio_tiff(he / "blank.tif", np.full((600, 500, 3), 240, np.uint8), mpp=0.5, downsamples=(4,))
    ck = out / "runs" / "tiny" / "best.safetensors"
    with caplog.at_level(logging.INFO):
        rc = infer_wsi.main(["--he", str(he), "--out", str(tmp_path / "o"), "--checkpoint", str(ck), "--workers",
                             "1", "--no-maps", "--patch-size", str(PS), "--thumb-size", "200"])
    assert rc == 1
    text = capfd.readouterr().err + caplog.text
    assert "Traceback" not in text
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    final = errors.pop()  # the stage's last line: counts, each failed slide with its reason, the warnings
    assert final.startswith("hex.infer_wsi: 3 done, 0 skipped (already done), 4 failed: corrupt (cannot read"), final
    assert all(f"{s} (" in final for s in ("empty", "trunc", "small")) and "2 with warnings (blank, café" in final
    for name in ("empty.tif", "trunc.tif", "corrupt.tif", "small.tif"):
        assert sum(name in m for m in errors) == 1, (name, errors)
    assert "0-byte" in next(m for m in errors if "empty.tif" in m)
    assert "smaller than one tile" in next(m for m in errors if "small.tif" in m)
    assert "truncated or corrupt" in next(m for m in errors if "corrupt.tif" in m)
    assert len(errors) == 4 and all("\n" not in m for m in errors), errors
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("blank.tif" in m and "no tissue" in m for m in warnings) == 1
    assert sum("café.tif" in m and "non-ASCII" in m for m in warnings) == 1
    pred_dir = tmp_path / "o" / "hex_pred"
    coords, pred, _ = _preds(pred_dir / "blank.h5")
    assert coords.shape == (0, 2) and pred.shape == (0, 40)
    assert _preds(pred_dir / "good.h5")[1].shape[0] > 0 and _preds(pred_dir / "café.h5")[1].shape[0] > 0
    assert caplog.records[-1].getMessage() == final


# ------------------------------------------------------------------------------------------ original checkpoints
def _original_checkpoints(tmp: Path) -> tuple[HEX, Path, Path, Path]:
    """A tiny-MUSK HEX and its original-release layouts: full checkpoint.pth (visual.beit3.* + heads), heads-only
    (regression_head.*, regression_head1.0.*) and the backbone in MUSK's own key layout (beit3.*)."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = _spread_out(HEX("musk", num_markers=40, **MUSK_KW), 5.0).eval()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    orig = {k.replace("regression_head1.", "regression_head1.0."): v for k, v in sd.items()}
    torch.save(orig, tmp / "checkpoint_full.pth")
    torch.save({k: v for k, v in orig.items() if k.startswith("regression_head")}, tmp / "checkpoint.pth")
    musk = {k[len("visual."):]: v.contiguous() for k, v in sd.items() if k.startswith("visual.")}
    musk["logit_scale"] = torch.ones([])
    save_file(musk, str(tmp / "musk.safetensors"))
    return model, tmp / "checkpoint.pth", tmp / "checkpoint_full.pth", tmp / "musk.safetensors"


@pytest.mark.slow
def test_original_checkpoints_run_from_the_command_line(cohort: tuple[Path, Path], tmp_path: Path) -> None:
    from hex.data.transforms import BatchTransform

    d, out = cohort
    model, heads, full, weights = _original_checkpoints(tmp_path)
    kw = ["--backbone", "musk", "--backbone-kw", json.dumps(MUSK_KW)]
    heads_args = ["--checkpoint", str(heads), "--weights", str(weights), *kw]
    # without backbone weights a heads-only file is a clear error
    assert hex_test.main(["--out", str(tmp_path), "--data", str(out), "--checkpoint", str(heads), *kw]) == 2
    assert hex_test.main(["--out", str(tmp_path), "--run-name", "orig", "--data", str(out), "--workers", "0",
                          "--no-plots", "--slides", "a", *heads_args]) == 0
    names = original_markers()  # the release's order (hex/test_codex_lung_marker.py biomarker_names)
    assert len(names) == 40 and names[:3] == ["DAPI", "CD8", "Pan-Cytokeratin"] and names[39] == "HLA-DR"
    table = pd.read_csv(tmp_path / "runs" / "orig" / "test" / "marker_pearson.csv")
    assert table["marker"].iloc[:40].tolist() == names
    rows = pd.read_csv(tmp_path / "runs" / "orig" / "test" / "patch_predictions.csv").sort_values("index")
    labels = pd.read_csv(out / "markers" / "a.csv").sort_values("index")  # columns in another order: by name
    np.testing.assert_allclose(rows["true_CD8"], labels["CD8"], rtol=1e-5)
    with h5py.File(out / "he_patches" / "a.h5") as f:
        imgs = torch.from_numpy(f["imgs"][:]).permute(0, 3, 1, 2)
    tf = BatchTransform(64, model.mean, model.std, interpolation="bilinear")
    with torch.inference_mode():
        expect = model(tf(imgs))[0].numpy()
    _, t_pred = _test_preds(tmp_path / "runs" / "orig" / "test", "a", original_markers())
    # the loaded weights, not a fresh initialisation
    assert np.abs(t_pred - expect).max() <= 1e-4 and _spread(expect) > 0.02
    for name, ck_args in (("h", heads_args), ("f", ["--checkpoint", str(full), *kw])):
        o = tmp_path / name
        shutil.copytree(out / "patches", o / "patches", dirs_exist_ok=True)
        assert infer_wsi.main(["--cohort", str(d), "--slides", "a", "--out", str(o), "--workers", "0",
                               "--no-maps", *ck_args]) == 0
        _, pred, attrs = _preds(o / "hex_pred" / "a.h5")
        assert np.abs(pred - expect).max() <= 1e-4
        assert list(attrs["markers"]) == original_markers() and attrs["normalization"] == "null"
    # --raw-units needs percentiles the original checkpoint does not have
    assert infer_wsi.main(["--cohort", str(d), "--slides", "a", "--out", str(tmp_path / "r"), "--raw-units",
                           *heads_args]) == 2


# ------------------------------------------------------------------------------------------------ multi-process
@pytest.mark.slow
def test_torchrun_two_ranks_equal_one(cohort: tuple[Path, Path], tmp_path: Path) -> None:
    d, out = cohort
    ck = out / "runs" / "tiny" / "best.safetensors"
    common = ["--cohort", str(d), "--checkpoint", str(ck), "--workers", "0", "--no-maps", "--patch-size", str(PS)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "hex.infer_wsi",
           *common, "--out", str(tmp_path / "two"), "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "hex.infer_wsi: 3 done, 0 skipped (already done), 0 failed" in r.stderr
    assert infer_wsi.main([*common, "--out", str(tmp_path / "one")]) == 0
    for sid in ("a", "b", "c"):
        c1, p1, a1 = _preds(tmp_path / "one" / "hex_pred" / f"{sid}.h5")
        c2, p2, a2 = _preds(tmp_path / "two" / "hex_pred" / f"{sid}.h5")
        np.testing.assert_array_equal(c1, c2)
        # same values up to float32 summation order (the ranks run with another thread count): outputs reach ~20
        np.testing.assert_allclose(p2, p1, rtol=1e-5, atol=1e-5)
        assert _spread(p1) > 0.02
        assert a1["checkpoint_sha256"] == a2["checkpoint_sha256"]


def test_stride_follows_the_tile_on_a_near_target_slide(tmp_path: Path) -> None:
    """An Aperio 0.502 µm/px slide reads 224 px tiles as they are; the stride must scale the same way (224 -> 224
    level-0 px, not 223), else a stride equal to the patch size leaves gaps between tiles."""
    from sample_data.writers import write_aperio_tiff

    rgb = np.full((1200, 1200, 3), 235, np.uint8)
    rgb[100:1100, 100:1100] = (150, 80, 160)
    f = tmp_path / "s.tif"
    write_aperio_tiff(f, rgb, 0.502)
    for stride in (224, 56):
        ds, _, info = tissue_tiles(f, patch_size=224, stride=stride)
        assert info["stride_level0"] == stride
        assert ds.patch_size_level0 == 224


class _Darkness(torch.nn.Module):
    """A stand-in HEX whose 40 outputs are all the tile's darkness, 1 - mean(x) (inputs in [0, 1])."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = 1.0 - x.mean(dim=(1, 2, 3))
        return d[:, None].expand(-1, 40).contiguous(), d[:, None]


@pytest.mark.slow
def test_known_feature_same_place_in_he_and_virtual_codex(tmp_path: Path) -> None:
    """A dark rectangle painted into a synthetic slide: stage 06 at --stride 56 and its OME-TIFF put the rectangle's
    edges at the same physical position (µm) as the H&E does, within one map pixel (28 µm)."""
    from hex.infer.maps import write_slide_maps
    from preprocess.slide_io import HESlide
    from sample_data.writers import write_aperio_tiff

    mpp, x0, x1, y0, y1 = 0.5, 1030, 2270, 730, 1890  # level-0 px, edges off the 56 px lattice on purpose
    rgb = np.full((2600, 3000, 3), 242, np.uint8)  # glass
    rgb[150:2450, 150:2850] = (220, 120, 180)  # pink tissue
    rgb[y0:y1, x0:x1] = (80, 30, 110)  # the feature
    he = tmp_path / "he" / "s.tif"
    he.parent.mkdir()
    write_aperio_tiff(he, rgb, mpp)
    cfg = predictions.InferConfig(pred_dir=tmp_path / "hex_pred", grid_dir=tmp_path / "patches", stride=56,
                                patch_size=224, workers=0, batch_size=64)
    meta = {"markers": original_markers(), "input_size": 224, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0),
            "checkpoint": "darkness", "checkpoint_sha256": "0"}
    res = predictions.infer_slide("s", he, _Darkness(), meta, cfg, torch.device("cpu"), None, None)
    maps = write_slide_maps(Path(res["path"]), tmp_path / "virtual_codex", he_path=he, formats=("npy", "ome"))
    with tifffile.TiffFile(tmp_path / "virtual_codex" / "s.ome.tif") as t:
        img = t.series[0].levels[0].asarray()[7]  # any channel: all are the darkness
        px_um = float(t.ome_metadata.split('PhysicalSizeX="')[1].split('"')[0])
    assert px_um == pytest.approx(56 * mpp) and maps["pixel_size_um"] == pytest.approx(28.0)

    def crossings(profile: np.ndarray, step_um: float, offset_um: float) -> tuple[float, float]:
        """µm positions where a profile crosses halfway between its low and high levels (rising, falling)."""
        hi = np.percentile(profile, 95)
        lo = np.median(profile[(profile > 0.05 * hi) & (profile < 0.5 * hi)])  # tissue level (not glass, not 0)
        half = (lo + hi) / 2
        above = profile > half
        i, j = int(np.argmax(above)), len(above) - int(np.argmax(above[::-1]))
        rise = i - 1 + (half - profile[i - 1]) / (profile[i] - profile[i - 1])
        fall = j - 1 + (profile[j - 1] - half) / (profile[j - 1] - profile[j])
        return offset_um + rise * step_um, offset_um + fall * step_um

    with HESlide(he) as s:  # the H&E as a reader sees it: one row and one column through the feature
        row = 255 - s.read_region(0, (y0 + y1) // 2, 0, (3000, 1))[0].mean(axis=1)
        col = 255 - s.read_region((x0 + x1) // 2, 0, 0, (1, 2600))[:, 0].mean(axis=1)
    he_x, he_y = crossings(row, mpp, 0.0), crossings(col, mpp, 0.0)
    assert he_x == pytest.approx((x0 * mpp, x1 * mpp), abs=1.0) and he_y == pytest.approx((y0 * mpp, y1 * mpp), abs=1.0)
    r, c = int((y0 + y1) / 2 / 56), int((x0 + x1) / 2 / 56)
    # map pixel k covers [k s, (k+1) s): its centre is (k + 0.5) s
    vc_x = crossings(img[r].astype(float), px_um, px_um / 2)
    vc_y = crossings(img[:, c].astype(float), px_um, px_um / 2)
    for he_pos, vc_pos in zip((*he_x, *he_y), (*vc_x, *vc_y)):
        assert abs(he_pos - vc_pos) <= px_um, (he_pos, vc_pos)
