"""Marker quantification: exact agreement with brute force, pre-warped images, coverage, normalisation, errors, CLI."""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest

from preprocess import quantify as q
from preprocess.slide_io import CodexImage
from preprocess.utils import PipelineError
from sample_data.writers import write_ome_pyramid

CODEX_MPP = 0.377


def _affine(scale=1.0, deg=0.0, tx=0.0, ty=0.0):
    c, s = np.cos(np.deg2rad(deg)) * scale, np.sin(np.deg2rad(deg)) * scale
    return np.array([[c, -s, tx], [s, c, ty], [0, 0, 1.0]])


def brute_force(data, coords, size, affine):
    """Mean over the CODEX pixels whose mapped centres fall in [x - 0.5, x + size - 0.5) x [y - 0.5, ...)."""
    _, h, w = data.shape
    vv, uu = np.mgrid[0:h, 0:w].astype(np.float64)
    px = affine[0, 0] * uu + affine[0, 1] * vv + affine[0, 2]
    py = affine[1, 0] * uu + affine[1, 1] * vv + affine[1, 2]
    out = np.full((len(coords), data.shape[0]), np.nan)
    counts = np.zeros(len(coords), int)
    for i, (x, y) in enumerate(coords):
        m = (px >= x - 0.5) & (px < x + size - 0.5) & (py >= y - 0.5) & (py < y + size - 0.5)
        counts[i] = m.sum()
        if m.any():
            out[i] = data[:, m].astype(np.float64).mean(axis=1)
    return out, counts


@pytest.fixture(scope="module")
def codex_small(tmp_path_factory):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 65535, (5, 230, 270), dtype=np.uint16)
    path = tmp_path_factory.mktemp("codex") / "small.ome.tif"
    write_ome_pyramid(path, data, ["DAPI", "CD8", "CD4", "CD20", "Ki67"], mpp=CODEX_MPP, tile=32)
    return path, data


def _grid(extent_x, extent_y, size, stride=None, start=(0, 0)):
    stride = stride or size
    xs = np.arange(start[0], extent_x, stride)
    ys = np.arange(start[1], extent_y, stride)
    return np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2).astype(np.int64)


@pytest.mark.parametrize(
    "affine,size,stride,threads",
    [
        (_affine(), 40, None, 1),  # identity
        (_affine(0.754, 7.0, 30.3, -12.6), 24, None, 2),  # rotation + scale (CODEX 0.377 -> H&E 0.5 µm/px)
        (_affine(1.3, -20.0, 80.0, 10.0), 30, 20, 1),  # overlapping patches (stride < size): several lattices
        (np.array([[0.9031, 0.1517, 5.13], [-0.1042, 1.0987, 3.31], [0, 0, 1]]), 35, None, 2),  # shear
    ],
)
def test_quantify_equals_brute_force(codex_small, affine, size, stride, threads):
    path, data = codex_small
    coords = _grid(380, 330, size, stride, start=(3, 5))
    with CodexImage(path) as codex:
        res = q.quantify_patches(codex, [0, 1, 2, 3, 4], coords, size, affine, region_px=64, threads=threads)
    ref, counts = brute_force(data, coords, size, affine)
    assert np.any(counts > 0) and np.any(counts == 0)  # some patches inside, some outside the CODEX
    np.testing.assert_array_equal(res.counts, counts)
    np.testing.assert_allclose(res.means, ref, atol=1e-6, rtol=0, equal_nan=True)


def test_channel_subset_order_and_zarr_fallback(codex_small, monkeypatch):
    path, data = codex_small
    affine, coords = _affine(0.8, 3.0, 4.0, 2.0), _grid(200, 180, 33)
    ref, _ = brute_force(data[[4, 1]], coords, 33, affine)
    with CodexImage(path) as codex:
        fast = q.quantify_patches(codex, [4, 1], coords, 33, affine, region_px=64)

        def no_direct(*a, **k):
            raise ValueError("forced fallback")

        monkeypatch.setattr(q, "TiledRegionReader", no_direct)
        slow = q.quantify_patches(codex, [4, 1], coords, 33, affine, region_px=64, threads=2)
    np.testing.assert_allclose(fast.means, ref, atol=1e-6, rtol=0, equal_nan=True)
    np.testing.assert_allclose(slow.means, ref, atol=1e-6, rtol=0, equal_nan=True)


def test_strip_layout_and_float_data(tmp_path):
    """Untiled (strip) OME-TIFFs go through zarr; float32 CODEX values are averaged in float64."""
    import tifffile

    rng = np.random.default_rng(5)
    data = rng.random((3, 150, 190)).astype(np.float32) * 1000
    path = tmp_path / "strips.ome.tif"
    tifffile.imwrite(path, data, ome=True, rowsperstrip=16,
                     metadata={"axes": "CYX", "PhysicalSizeX": 0.377, "PhysicalSizeY": 0.377})
    affine, coords = _affine(0.754, 4.0, 3.0, 1.0), _grid(150, 130, 28)
    with CodexImage(path) as codex:
        res = q.quantify_patches(codex, [0, 1, 2], coords, 28, affine, region_px=64, threads=2)
    ref, _ = brute_force(data, coords, 28, affine)
    np.testing.assert_allclose(res.means, ref, rtol=1e-9, atol=1e-6, equal_nan=True)


def test_coverage_is_the_exact_area_fraction():
    # identity: the CODEX covers [-0.5, 99.5] x [-0.5, 79.5]
    coords = np.array([[10, 10], [80, 10], [90, 70], [200, 200]])
    cov = q.codex_coverage(coords, 20, _affine(), (100, 80))
    np.testing.assert_allclose(cov, [1.0, 1.0, 0.5 * 0.5, 0.0])
    cov = q.codex_coverage(np.array([[90, 10]]), 20, _affine(), (100, 80))
    np.testing.assert_allclose(cov, [0.5])
    # rotated + scaled, and mirrored: compare with dense point sampling of each patch
    for affine in (_affine(0.754, 12.0, 40.0, -5.0), np.array([[-0.8, 0.1, 140.0], [0.05, 0.9, 2.0], [0, 0, 1]])):
        coords = _grid(160, 140, 30)
        cov = q.codex_coverage(coords, 30, affine, (150, 120))
        assert ((cov > 0) & (cov < 1)).any() and (cov == 1).any()
        inv = np.linalg.inv(affine)
        t = (np.arange(300) + 0.5) / 300 * 30 - 0.5
        for (x, y), c in zip(coords, cov):
            gx, gy = np.meshgrid(x + t, y + t)
            u = inv[0, 0] * gx + inv[0, 1] * gy + inv[0, 2]
            v = inv[1, 0] * gx + inv[1, 1] * gy + inv[1, 2]
            inside = (u >= -0.5) & (u <= 149.5) & (v >= -0.5) & (v <= 119.5)
            assert abs(inside.mean() - c) < 5e-3


def test_matches_labels_from_a_prewarped_image(tmp_path):
    """Quantifying through the affine ~= averaging an image pre-warped into the H&E frame (smooth CODEX)."""
    from scipy import ndimage as ndi

    h, w = 400, 460
    yy, xx = np.mgrid[0:h, 0:w] / 100.0
    data = np.stack([1000 + 800 * np.sin(xx) * np.cos(0.7 * yy), 500 + 300 * xx + 200 * yy,
                     3000 + 1000 * np.cos(1.3 * xx + 0.4 * yy)]).astype(np.uint16)
    path = tmp_path / "smooth.ome.tif"
    write_ome_pyramid(path, data, ["a", "b", "c"], mpp=CODEX_MPP, tile=64)
    affine = _affine(0.754, 9.0, 60.0, 10.0)
    he_h, he_w = 420, 420
    inv = np.linalg.inv(affine)
    gy, gx = np.mgrid[0:he_h, 0:he_w].astype(np.float64)
    u = inv[0, 0] * gx + inv[0, 1] * gy + inv[0, 2]
    v = inv[1, 0] * gx + inv[1, 1] * gy + inv[1, 2]
    warped = np.stack([ndi.map_coordinates(d.astype(np.float64), [v, u], order=1, mode="nearest") for d in data])
    inside = (u >= 0) & (u <= w - 1) & (v >= 0) & (v <= h - 1)
    size = 40
    coords = _grid(he_w - size + 1, he_h - size + 1, size)
    with CodexImage(path) as codex:
        res = q.quantify_patches(codex, [0, 1, 2], coords, size, affine, region_px=128)
    full = res.coverage == 1.0
    assert full.sum() >= 20
    for i in np.flatnonzero(full):
        x, y = coords[i]
        assert inside[y : y + size, x : x + size].all()
        expect = warped[:, y : y + size, x : x + size].mean(axis=(1, 2))
        np.testing.assert_allclose(res.means[i], expect, rtol=5e-3, atol=3.0)


# ---------------------------------------------------------------------------------------------------------------
# the stage: files, normalisation, errors


MARKERS = [f"M{i}" for i in range(40)]


def _write_grid(path, coords, size):
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("coords", data=np.asarray(coords, np.int64))
        f.attrs.update({"patch_size": 224, "patch_level": 0, "patch_size_level0": size, "mpp": 0.5,
                        "level0_mpp": 0.5})


def _write_reg(path, affine, status="ok"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"affine_codex_to_he": np.asarray(affine).tolist(), "status": status,
                                "reason": "low NCC" if status != "ok" else None}))


@pytest.fixture()
def stage(tmp_path):
    """Two slides with 40-channel CODEX images, grids, registrations, a pairing table and a panel."""
    rng = np.random.default_rng(3)
    (tmp_path / "codex").mkdir()
    out = tmp_path / "out"
    affines = {"s1": _affine(0.754, 2.0, 10.0, 6.0), "s2": _affine(0.754, -4.0, 30.0, 20.0)}
    data = {}
    for s in ("s1", "s2"):
        d = rng.integers(100, 5000, (40, 150, 170), dtype=np.uint16)
        d[5] = d[5] // 50  # a dim marker
        data[s] = d
        write_ome_pyramid(tmp_path / "codex" / f"{s}.ome.tif", d, MARKERS, mpp=CODEX_MPP, tile=64)
        _write_grid(out / "patches" / f"{s}.h5", _grid(150, 140, 30), 30)
        _write_reg(out / "registration" / f"{s}.json", affines[s])
    (tmp_path / "pairs.csv").write_text("he_slide,codex_image\n" + "".join(
        f"he/{s}.tif,codex/{s}.ome.tif\n" for s in ("s1", "s2")))
    (tmp_path / "marker_panel.csv").write_text("channel,marker\n" + "".join(
        f"{i},{m}\n" for i, m in enumerate(MARKERS)))
    return tmp_path, out, data, affines


def test_stage_outputs_and_normalization(stage):
    cohort, out, data, affines = stage
    assert q.main(["--cohort", str(cohort), "--out", str(out), "--legacy-columns", "--region-px", "64"]) == 0
    raws, kept = {}, []
    for s in ("s1", "s2"):
        raw = pd.read_csv(out / "markers" / "raw" / f"{s}.csv")
        raws[s] = raw
        coords = raw[["x", "y"]].to_numpy()
        ref, _ = brute_force(data[s], coords, 30, affines[s])
        np.testing.assert_allclose(raw[MARKERS].to_numpy(), ref, atol=1e-6, rtol=0, equal_nan=True)
        kept.append(raw[raw["coverage"] >= 0.95])
        assert (raw["coverage"] < 0.95).any()
    pooled = pd.concat(kept)[MARKERS].to_numpy()
    norm = json.loads((out / "markers" / "normalization.json").read_text())
    assert norm["markers"] == MARKERS and norm["percentiles"] == [1.0, 99.0]
    lo, hi = np.percentile(pooled, 1, axis=0), np.percentile(pooled, 99, axis=0)
    np.testing.assert_allclose(norm["values"], [lo, hi])
    for s in ("s1", "s2"):
        df = pd.read_csv(out / "markers" / f"{s}.csv")
        assert list(df.columns[:4]) == ["slide", "index", "x", "y"] and list(df.columns[4:44]) == MARKERS
        assert list(df.columns[44:]) == [f"mean_intensity_channel{k}" for k in range(1, 41)]
        raw = raws[s].set_index("index").loc[df["index"]]
        assert (raw["coverage"] >= 0.95).all() and len(df) == (raws[s]["coverage"] >= 0.95).sum()
        with h5py.File(out / "patches" / f"{s}.h5") as f:
            np.testing.assert_array_equal(f["coords"][:][df["index"]], df[["x", "y"]].to_numpy())
        expect = np.clip((raw[MARKERS].to_numpy() - lo) / (hi - lo), 0, 1)
        np.testing.assert_allclose(df[MARKERS].to_numpy(), expect, atol=1e-6)
        np.testing.assert_allclose(df[[f"mean_intensity_channel{k}" for k in range(1, 41)]].to_numpy(),
                                   df[MARKERS].to_numpy())
        assert df[MARKERS].to_numpy().min() >= 0 and df[MARKERS].to_numpy().max() <= 1
    assert (out / "markers" / "config.json").exists() and (out / "markers" / "run.log").exists()


def test_skip_overwrite_and_fixed_normalization(stage):
    cohort, out, _, _ = stage
    args = ["--cohort", str(cohort), "--out", str(out), "--slides", "s1"]
    assert q.main(args) == 0
    raw = out / "markers" / "raw" / "s1.csv"
    t0 = raw.stat().st_mtime_ns
    assert q.main(args) == 0 and raw.stat().st_mtime_ns == t0  # skipped
    assert q.main(args + ["--overwrite"]) == 0 and raw.stat().st_mtime_ns != t0
    t1 = raw.stat().st_mtime_ns
    reg = out / "registration" / "s1.json"
    os.utime(reg, ns=(t1 + 10**9, t1 + 10**9))  # a newer registration record makes the cache stale
    assert q.main(args) == 0 and raw.stat().st_mtime_ns != t1
    norm_path = out / "markers" / "normalization.json"
    fixed = json.loads(norm_path.read_text())
    fixed["values"] = [[0.0] * 40, [10000.0] * 40]
    (cohort / "norm.json").write_text(json.dumps(fixed))
    out2 = cohort / "out"
    assert q.main(["--cohort", str(cohort), "--out", str(out2), "--slides", "s2", "--normalization",
                   str(cohort / "norm.json")]) == 0
    df = pd.read_csv(out2 / "markers" / "s2.csv")
    raw2 = pd.read_csv(out2 / "markers" / "raw" / "s2.csv").set_index("index").loc[df["index"]]
    np.testing.assert_allclose(df[MARKERS].to_numpy(), np.clip(raw2[MARKERS].to_numpy() / 10000.0, 0, 1), atol=1e-6)


def test_errors_name_the_file(stage, caplog):
    cohort, out, _, affines = stage
    base = q.QuantConfig(out=out, patches_dir=out / "patches", registration_dir=out / "registration",
                         markers=tuple(MARKERS), panel=tuple(enumerate(MARKERS)), panel_path="panel.csv")
    # wrong channel count: a 39-channel CODEX against a 40-marker panel
    bad = cohort / "codex" / "short.ome.tif"
    write_ome_pyramid(bad, np.zeros((39, 64, 64), np.uint16), MARKERS[:39], mpp=CODEX_MPP, tile=32)
    with pytest.raises(PipelineError, match="short.ome.tif.*39 channels"):
        q.quantify_slide("s1", bad, base)
    # unknown marker names: matched by name they fail, a panel mapping by index accepts them
    renamed = cohort / "codex" / "renamed.ome.tif"
    write_ome_pyramid(renamed, np.ones((40, 100, 100), np.uint16), [f"ch{i}" for i in range(40)], mpp=CODEX_MPP,
                      tile=32)
    by_name = q.QuantConfig(**{**base.__dict__, "panel": None})
    with pytest.raises(PipelineError, match="renamed.ome.tif.*lacks the markers"):
        q.quantify_slide("s1", renamed, by_name)
    q.quantify_slide("s1", renamed, base)
    # missing / flagged registration record
    (out / "registration" / "s2.json").unlink()
    with pytest.raises(PipelineError, match=r"registration record not found: .*s2\.json"):
        q.quantify_slide("s2", cohort / "codex" / "s2.ome.tif", base)
    _write_reg(out / "registration" / "s2.json", affines["s2"], status="flagged")
    with pytest.raises(PipelineError, match=r"s2\.json.*flagged.*--allow-flagged"):
        q.quantify_slide("s2", cohort / "codex" / "s2.ome.tif", base)
    allowed = q.QuantConfig(**{**base.__dict__, "allow_flagged": True})
    assert q.quantify_slide("s2", cohort / "codex" / "s2.ome.tif", allowed)["patches"] > 0
    # missing grid, missing CODEX file, slide not in the pairing table, wrong panel size
    with pytest.raises(PipelineError, match=r"patches.*nogrid\.h5"):
        q.quantify_slide("nogrid", cohort / "codex" / "s2.ome.tif", base)
    with pytest.raises(PipelineError, match="missing.ome.tif"):
        q.quantify_slide("s1", cohort / "codex" / "missing.ome.tif", base)
    assert q.main(["--cohort", str(cohort), "--out", str(out), "--slides", "s9"]) == 2
    assert "pairs.csv" in caplog.text and "s9" in caplog.text
    (cohort / "panel39.csv").write_text("channel,marker\n" + "".join(f"{i},{m}\n" for i, m in enumerate(MARKERS[:39])))
    assert q.main(["--cohort", str(cohort), "--out", str(out), "--panel", str(cohort / "panel39.csv")]) == 2
    assert "panel39.csv lists 39 markers" in caplog.text
    # a failing slide makes the stage exit non-zero, the others are still written
    (out / "registration" / "s2.json").unlink()
    assert q.main(["--cohort", str(cohort), "--out", str(out), "--overwrite"]) == 1
    assert (out / "markers" / "s1.csv").exists()


def test_cli_subprocess(stage):
    cohort, out, _, _ = stage
    r = subprocess.run([sys.executable, "-m", "preprocess.quantify", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--min-coverage" in r.stdout and "µm" in r.stdout
    r = subprocess.run([sys.executable, "-m", "preprocess.quantify", "--cohort", str(cohort), "--out", str(out),
                        "--workers", "2", "--threads", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (out / "markers" / "s1.csv").exists() and (out / "markers" / "s2.csv").exists()


@pytest.mark.slow
def test_sample_cohort_end_to_end(tmp_path):
    """patch -> (ground-truth affine as registration) -> quantify -> patch store on a tiny generated cohort."""
    pytest.importorskip("sample_data.make_cohort")
    from preprocess import patch, patch_store

    cohort, out = tmp_path / "cohort", tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "sample_data.make_cohort", "--out", str(cohort), "--slides", "1",
                        "--tissue-mm", "0.5", "--workers", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    gt = json.loads((cohort / "ground_truth.json").read_text())
    for s, rec in gt["slides"].items():
        _write_reg(out / "registration" / f"{s}.json", rec["affine_codex_to_he"])
    assert patch.main(["--cohort", str(cohort), "--out", str(out), "--patch-size", "112"]) == 0
    assert q.main(["--cohort", str(cohort), "--out", str(out)]) == 0
    assert patch_store.main(["--cohort", str(cohort), "--out", str(out)]) == 0
    markers = [line.split(",", 1)[1].strip() for line in (cohort / "marker_panel.csv").read_text().splitlines()[1:]]
    for s in gt["slides"]:
        df = pd.read_csv(out / "markers" / f"{s}.csv")
        raw = pd.read_csv(out / "markers" / "raw" / f"{s}.csv")
        assert len(df) > 0 and list(df.columns[4:]) == markers
        assert (raw["coverage"] >= 0.95).mean() > 0.5  # the CODEX covers most of the tissue
        with h5py.File(out / "he_patches" / f"{s}.h5") as f:
            np.testing.assert_array_equal(f["coords"][:][df["index"]], df[["x", "y"]].to_numpy())
            assert f["imgs"].shape[1:] == (112, 112, 3)
