"""Marker quantification: exact agreement with brute force, pre-warped images, coverage, normalisation, errors, CLI."""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest

from pipeline.errors import PipelineError
from preprocess.quantify import accumulate
from preprocess.quantify import stage as q
from preprocess.quantify.geometry import CodexToHE, codex_coverage
from preprocess.quantify.normalize import fit_leakage
from preprocess.slide_io import CodexImage
from sample_data.writers import write_ome_pyramid

CODEX_MPP = 0.377


def _affine(scale=1.0, deg=0.0, tx=0.0, ty=0.0):
    c, s = np.cos(np.deg2rad(deg)) * scale, np.sin(np.deg2rad(deg)) * scale
    return np.array([[c, -s, tx], [s, c, ty], [0, 0, 1.0]])


def brute_force(data, coords, size, affine, field=None, step=1.0):
    """Mean over the CODEX pixels whose mapped centres fall in [x - 0.5, x + size - 0.5) x [y - 0.5, ...).

    With a displacement ``field`` (2, Gy, Gx) (H&E px at nodes j·step, i·step), each pixel u lands at the x with
    x = A u + D(x): solved by fixed-point iteration, D sampled with scipy (order 1, edge-clamped), independently of
    preprocess.registration.field.
    """
    from scipy import ndimage as ndi

    _, h, w = data.shape
    vv, uu = np.mgrid[0:h, 0:w].astype(np.float64)
    px0 = affine[0, 0] * uu + affine[0, 1] * vv + affine[0, 2]
    py0 = affine[1, 0] * uu + affine[1, 1] * vv + affine[1, 2]
    px, py = px0, py0
    for _ in range(40 if field is not None else 0):
        c = np.stack([py.ravel() / step, px.ravel() / step])
        dx, dy = (ndi.map_coordinates(field[k].astype(np.float64), c, order=1, mode="nearest").reshape(h, w)
                  for k in range(2))
        px, py = px0 + dx, py0 + dy
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
        res = accumulate.quantify_patches(codex, [0, 1, 2, 3, 4], coords, size, affine, region_px=64, threads=threads)
    ref, counts = brute_force(data, coords, size, affine)
    assert np.any(counts > 0) and np.any(counts == 0)  # some patches inside, some outside the CODEX
    np.testing.assert_array_equal(res.counts, counts)
    np.testing.assert_allclose(res.means, ref, atol=1e-6, rtol=0, equal_nan=True)


@pytest.mark.parametrize("region_px", [64, 300])  # 300: the coarse-then-Newton path of large regions
def test_quantify_through_a_displacement_field_equals_brute_force(codex_small, region_px):
    """A non-rigid map (affine + a smooth field of up to ~12 px) gives the same pixel counts and means as mapping
    every CODEX pixel by brute force."""
    from scipy import ndimage as ndi

    from preprocess.registration.field import DisplacementField

    path, data = codex_small
    rng = np.random.default_rng(8)
    field = ndi.gaussian_filter(rng.normal(0, 60, (2, 7, 8)), (0, 1.2, 1.2)).astype(np.float32)
    affine = _affine(0.754, 7.0, 30.3, -12.6)
    coords = _grid(380, 330, 24, start=(3, 5))
    mapping = CodexToHE(affine, DisplacementField(field, 50.0))
    with CodexImage(path) as codex:
        res = accumulate.quantify_patches(codex, [0, 1, 2, 3, 4], coords, 24, mapping, region_px=region_px, threads=2)
        flat = accumulate.quantify_patches(codex, [0, 1, 2, 3, 4], coords, 24, affine, region_px=region_px)
    ref, counts = brute_force(data, coords, 24, affine, field, 50.0)
    assert np.abs(field).max() > 5 and not np.array_equal(flat.counts, counts)  # the field moves pixels
    np.testing.assert_array_equal(res.counts, counts)
    np.testing.assert_allclose(res.means, ref, atol=1e-6, rtol=0, equal_nan=True)


def test_channel_subset_order_and_zarr_fallback(codex_small, monkeypatch):
    path, data = codex_small
    affine, coords = _affine(0.8, 3.0, 4.0, 2.0), _grid(200, 180, 33)
    ref, _ = brute_force(data[[4, 1]], coords, 33, affine)
    with CodexImage(path) as codex:
        fast = accumulate.quantify_patches(codex, [4, 1], coords, 33, affine, region_px=64)

        def no_direct(*a, **k):
            raise ValueError("forced fallback")

        monkeypatch.setattr(accumulate, "TiledRegionReader", no_direct)
        slow = accumulate.quantify_patches(codex, [4, 1], coords, 33, affine, region_px=64, threads=2)
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
        res = accumulate.quantify_patches(codex, [0, 1, 2], coords, 28, affine, region_px=64, threads=2)
    ref, _ = brute_force(data, coords, 28, affine)
    np.testing.assert_allclose(res.means, ref, rtol=1e-9, atol=1e-6, equal_nan=True)


def test_coverage_is_the_exact_area_fraction():
    # identity: the CODEX covers [-0.5, 99.5] x [-0.5, 79.5]
    coords = np.array([[10, 10], [80, 10], [90, 70], [200, 200]])
    cov = codex_coverage(coords, 20, _affine(), (100, 80))
    np.testing.assert_allclose(cov, [1.0, 1.0, 0.5 * 0.5, 0.0])
    cov = codex_coverage(np.array([[90, 10]]), 20, _affine(), (100, 80))
    np.testing.assert_allclose(cov, [0.5])
    # rotated + scaled, and mirrored: compare with dense point sampling of each patch
    for affine in (_affine(0.754, 12.0, 40.0, -5.0), np.array([[-0.8, 0.1, 140.0], [0.05, 0.9, 2.0], [0, 0, 1]])):
        coords = _grid(160, 140, 30)
        cov = codex_coverage(coords, 30, affine, (150, 120))
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
        res = accumulate.quantify_patches(codex, [0, 1, 2], coords, size, affine, region_px=128)
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
    # unknown marker names: matched by name they fail; by the panel's index they stop, naming the panel, the file
    # and both names, unless the panel wins
    renamed = cohort / "codex" / "renamed.ome.tif"
    write_ome_pyramid(renamed, np.ones((40, 100, 100), np.uint16), [f"ch{i}" for i in range(40)], mpp=CODEX_MPP,
                      tile=32)
    by_name = q.QuantConfig(**{**base.__dict__, "panel": None})
    with pytest.raises(PipelineError, match="renamed.ome.tif.*lacks the markers"):
        q.quantify_slide("s1", renamed, by_name)
    with pytest.raises(PipelineError, match=r"panel.csv.*renamed.ome.tif.*'M0' -> channel 0 named 'ch0'.*--panel-wins"):
        q.quantify_slide("s1", renamed, base)
    q.quantify_slide("s1", renamed, q.QuantConfig(**{**base.__dict__, "panel_wins": True}))
    meta = json.loads((out / "markers" / "raw" / "s1.json").read_text())
    assert meta["channels"][:2] == [["M0", 0, "ch0"], ["M1", 1, "ch1"]]  # the resolved triples are written
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


@pytest.mark.slow
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
    for s, rec in gt["slides"].items():  # the truth as the registration: its warp is a displacement field
        _write_reg(out / "registration" / f"{s}.json", rec["affine_codex_to_he"])
        reg = json.loads((out / "registration" / f"{s}.json").read_text())
        (out / "registration" / f"{s}_displacement.npy").write_bytes((cohort / rec["warp"]["file"]).read_bytes())
        reg["displacement"] = {"file": f"{s}_displacement.npy", "step_px": rec["warp"]["step_px"]}
        (out / "registration" / f"{s}.json").write_text(json.dumps(reg))
    assert patch.main(["--cohort", str(cohort), "--out", str(out), "--patch-size", "112"]) == 0
    assert q.main(["--cohort", str(cohort), "--out", str(out)]) == 0
    assert patch_store.main(["--cohort", str(cohort), "--out", str(out)]) == 0
    markers = [line.split(",", 1)[1].strip() for line in (cohort / "marker_panel.csv").read_text().splitlines()[1:]]
    for s in gt["slides"]:
        df = pd.read_csv(out / "markers" / f"{s}.csv")
        raw = pd.read_csv(out / "markers" / "raw" / f"{s}.csv")
        assert len(df) > 0 and list(df.columns[4:]) == markers
        assert (raw["coverage"] >= 0.95).mean() > 0.4  # the CODEX covers much of the tissue
        assert json.loads((out / "markers" / "raw" / f"{s}.json").read_text())["through_displacement_field"]
        with h5py.File(out / "he_patches" / f"{s}.h5") as f:
            np.testing.assert_array_equal(f["coords"][:][df["index"]], df[["x", "y"]].to_numpy())
            assert f["imgs"].shape[1:] == (112, 112, 3)


# ---------------------------------------------------------------------------------------------------------------
# no-data regions, leakage-free normalisation, job arrays, stale outputs


def _pooled_percentiles(out, slides, min_coverage=0.95):
    kept = []
    for s in slides:
        raw = pd.read_csv(out / "markers" / "raw" / f"{s}.csv")
        kept.append(raw[(raw["coverage"] >= min_coverage) & (raw["n_codex_px"] > 0)][MARKERS].to_numpy())
    v = np.concatenate(kept)
    return np.percentile(v, 1, axis=0), np.percentile(v, 99, axis=0)


def test_zero_filled_block_is_excluded_and_percentiles_stay(stage):
    """A CODEX with a zero-filled block (a missing tile): patches over it lose coverage and are left out, and the
    percentiles are those of the intact image's remaining patches; counting the mapped rectangle instead (the
    no-data test off) lets them in and pulls P1 down to the fill."""
    cohort, out, data, affines = stage
    args = ["--cohort", str(cohort), "--region-px", "64", "--nodata-um", "15"]  # a 30 µm block in a 64 µm image
    assert q.main([*args, "--out", str(out)]) == 0
    intact = pd.read_csv(out / "markers" / "raw" / "s1.csv")
    lo0, hi0 = (np.asarray(v) for v in json.loads((out / "markers" / "normalization.json").read_text())["values"])
    holed = data["s1"].copy()
    holed[:, 40:120, 50:130] = 0  # 80 x 80 CODEX px ~ 60 x 60 H&E px
    write_ome_pyramid(cohort / "codex" / "s1.ome.tif", holed, MARKERS, mpp=CODEX_MPP, tile=64)
    assert q.main([*args, "--out", str(out)]) == 0  # the CODEX changed: s1 is redone
    raw = pd.read_csv(out / "markers" / "raw" / "s1.csv")
    labels = pd.read_csv(out / "markers" / "s1.csv")
    over = intact["coverage"].to_numpy() >= 0.95
    hit = over & (raw["coverage"].to_numpy() < 0.95)
    assert hit.sum() >= 3 and not set(raw["index"][hit]) & set(labels["index"])
    # coverage = geometric coverage x (1 - the fraction of the patch's pixels in the zero block); means as before
    ref, n = brute_force(holed, raw[["x", "y"]].to_numpy(), 30, affines["s1"])
    zero = (holed == 0).all(axis=0).astype(np.uint16)[None]
    frac, _ = brute_force(zero, raw[["x", "y"]].to_numpy(), 30, affines["s1"])
    np.testing.assert_allclose(raw["coverage"], intact["coverage"] * (1 - np.nan_to_num(frac[:, 0])), atol=1e-9)
    np.testing.assert_allclose(raw[MARKERS].to_numpy(), ref, atol=1e-6, equal_nan=True)
    assert (raw["n_codex_px"].to_numpy() == n).all()
    norm = json.loads((out / "markers" / "normalization.json").read_text())
    kept = pd.concat([raw[raw["coverage"] >= 0.95], pd.read_csv(out / "markers" / "raw" / "s2.csv").query(
        "coverage >= 0.95")])
    np.testing.assert_allclose(norm["values"][0], np.percentile(kept[MARKERS].to_numpy(), 1, axis=0))
    # the percentiles do not move (only through the few patches dropped): within 5% of the intact image's
    lo, hi = (np.asarray(v) for v in norm["values"])
    assert np.median(np.abs(lo / lo0 - 1)) < 0.05 and np.median(np.abs(hi / hi0 - 1)) < 0.05
    # the old behaviour: every mapped pixel counts as data -> zero-fill patches pass and P1 collapses
    assert q.main([*args, "--out", str(out), "--overwrite", "--nodata-um", "0"]) == 0
    bad = json.loads((out / "markers" / "normalization.json").read_text())
    assert np.median(np.asarray(bad["values"][0]) / np.asarray(norm["values"][0])) < 0.2


def test_fit_slides_keep_validation_out_of_the_percentiles(stage, caplog):
    cohort, out, data, _ = stage
    (cohort / "splits.csv").write_text("train,val\ns1,s2\n")
    args = ["--cohort", str(cohort), "--out", str(out), "--region-px", "64"]
    assert q.main([*args, "--fit-split", str(cohort / "splits.csv")]) == 0
    norm = json.loads((out / "markers" / "normalization.json").read_text())
    assert norm["fit_slides"] == ["s1"] and norm["applied_to"] == ["s1", "s2"]
    np.testing.assert_allclose(norm["values"], _pooled_percentiles(out, ["s1"]))
    assert fit_leakage(norm, ["s2"]) == [] and (out / "markers" / "s2.csv").exists()
    # the validation slide changes (another CODEX): the fitted percentiles do not move, its labels do
    labels_before = pd.read_csv(out / "markers" / "s2.csv")
    write_ome_pyramid(cohort / "codex" / "s2.ome.tif", data["s2"] // 3 + 7, MARKERS, mpp=CODEX_MPP, tile=64)
    from preprocess.normalize import main as normalize_main

    assert q.main([*args, "--no-normalize"]) == 0
    assert normalize_main(["--cohort", str(cohort), "--out", str(out), "--fit-slides", "s1"]) == 0
    again = json.loads((out / "markers" / "normalization.json").read_text())
    assert again["values"] == norm["values"] and again["fit_slides"] == ["s1"]
    assert not pd.read_csv(out / "markers" / "s2.csv").equals(labels_before)
    # default: every slide is in the fit set, and that is what the leakage check sees
    assert normalize_main(["--cohort", str(cohort), "--out", str(out)]) == 0
    pooled = json.loads((out / "markers" / "normalization.json").read_text())
    assert pooled["fit_slides"] == ["s1", "s2"] and fit_leakage(pooled, ["s2"]) == ["s2"]
    assert normalize_main(["--cohort", str(cohort), "--out", str(out), "--fit-slides", "s1", "s9"]) == 2
    assert "s9" in caplog.text


def test_shards_then_normalize_equal_one_run_byte_for_byte(stage, tmp_path):
    from preprocess.normalize import main as normalize_main

    cohort, out, _, _ = stage
    inputs = ["--cohort", str(cohort), "--patches", str(out / "patches"), "--registration", str(out / "registration"),
              "--region-px", "64"]
    one, many = tmp_path / "one", tmp_path / "many"
    assert q.main([*inputs, "--out", str(one)]) == 0
    for i in range(2):
        assert q.main([*inputs, "--out", str(many), "--shard", f"{i}/2", "--threads", "2"]) == 0
        assert not (many / "markers" / "normalization.json").exists()  # a shard only does pass 1
    assert sorted(p.name for p in (many / "markers" / "raw").glob("*.csv")) == ["s1.csv", "s2.csv"]
    assert (many / "markers" / "config_shard1of2.json").exists()
    assert normalize_main(["--cohort", str(cohort), "--out", str(many)]) == 0
    for s in ("s1", "s2"):
        assert (one / "markers" / f"{s}.csv").read_bytes() == (many / "markers" / f"{s}.csv").read_bytes()
        raw_one, raw_many = (d / "markers" / "raw" / f"{s}.csv" for d in (one, many))
        assert raw_one.read_bytes() == raw_many.read_bytes()
    a, b = (json.loads((d / "markers" / "normalization.json").read_text()) for d in (one, many))
    assert a["values"] == b["values"] and a["fit_slides"] == b["fit_slides"]


def test_a_slide_that_fails_later_leaves_no_stale_labels(stage):
    cohort, out, _, _ = stage
    args = ["--cohort", str(cohort), "--out", str(out), "--region-px", "64"]
    assert q.main(args) == 0
    assert (out / "markers" / "s2.csv").exists()
    (out / "registration" / "s2.json").unlink()  # e.g. its re-registration failed and removed the record
    assert q.main(args) == 1  # s2's raw means are stale (input gone): redone, and it fails
    assert not (out / "markers" / "raw" / "s2.csv").exists() and not (out / "markers" / "s2.csv").exists()
    norm = json.loads((out / "markers" / "normalization.json").read_text())
    assert norm["applied_to"] == ["s1"] and (out / "markers" / "s1.csv").exists()
