"""Tests of stage 02 (``preprocess.register``): CODEX -> H&E registration with palom.

Acceptance: on the small sample cohort (conftest's ``small_cohort``: 3 slides, seed 0, 0.6 mm tissue, the default
mild 8 µm warp) the recovered transform (affine + displacement field) is within 0.5 µm (median) / 1.5 µm (95th
percentile) of the ground truth (affine + warp) on a grid of tissue points, errors measured where they matter: at
points, with the ground truth's own convention implemented independently (sample_data.truth, scipy); a mismatched
pair (another slide's CODEX) is flagged by the NCC score; missing pair / missing CODEX file / CODEX without a
pixel size fail with messages naming the file; the CLI runs as a subprocess. The displacement field and its fit
from block shifts are checked on known fields.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sample_data.writers import write_aperio_tiff, write_ome_pyramid

REPO = Path(__file__).resolve().parents[2]
HE_MPP, CODEX_MPP = 0.5, 0.377


# ----------------------------------------------------------------------------------------------------------------
# a small synthetic H&E / CODEX pair, for what the cohort lacks (a CODEX without a pixel size, a quick export)


def _splat_gaussians(shape: tuple[int, int], xy: np.ndarray, weights: np.ndarray, sigma_px: float) -> np.ndarray:
    """Sum of isotropic Gaussians (sigma in px) centred at sub-pixel ``xy`` (N, 2) on an image of ``shape`` (h, w).

    Bilinear splatting then a Gaussian blur: the centroid of every blob is exact, so two renderings of the same
    nuclei in two pixel grids agree to far below a pixel.
    """
    import scipy.ndimage as ndi

    h, w = shape
    img = np.zeros((h + 2, w + 2), np.float64)
    x, y = xy[:, 0] + 1, xy[:, 1] + 1
    ok = (x >= 0) & (y >= 0) & (x < w + 1) & (y < h + 1)
    x, y, wt = x[ok], y[ok], weights[ok]
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - x0, y - y0
    for dx, dy, f in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        np.add.at(img, (np.clip(y0 + dy, 0, h + 1), np.clip(x0 + dx, 0, w + 1)), wt * f)
    img = ndi.gaussian_filter(img, sigma_px, mode="constant")
    return (img * 2 * np.pi * sigma_px**2)[1:-1, 1:-1].astype(np.float32)


def synthetic_pair(root: Path, slide: str, seed: int, he_size: tuple[int, int] = (1400, 1200),
                   rotation_deg: float = 6.0, codex_mpp_in_file: float | None = CODEX_MPP,
                   n_channels: int = 3) -> np.ndarray:
    """Write ``root/he/{slide}.tif`` and ``root/codex/{slide}.ome.tif`` of one tissue; return the true 3x3 affine.

    Nuclei (Gaussian blobs of sigma 2 µm) scattered in an irregular tissue region are rendered as haematoxylin in
    the H&E (0.5 µm/px) and as DAPI in the CODEX (0.377 µm/px, rotated and shifted); the CODEX covers the central
    ~85% of the H&E.
    """
    import scipy.ndimage as ndi

    rng = np.random.default_rng(seed)
    w, h = he_size
    # tissue: smoothed noise inside an ellipse (H&E px)
    yy, xx = np.mgrid[0:h, 0:w]
    ell = ((xx - w / 2) / (0.46 * w)) ** 2 + ((yy - h / 2) / (0.46 * h)) ** 2 < 1
    blob = ndi.gaussian_filter(rng.standard_normal((h, w)), 40)
    tissue = ell & (blob > np.quantile(blob[ell], 0.2))
    # nuclei: Poisson in tissue, ~1 per 120 µm^2
    n = int(tissue.sum() * HE_MPP**2 / 120)
    pts = rng.uniform([0, 0], [w, h], size=(3 * n, 2))
    pts = pts[tissue[pts[:, 1].astype(int), pts[:, 0].astype(int)]][:n]
    amp = rng.uniform(0.5, 1.0, len(pts))
    # true affine CODEX px -> H&E px
    s = CODEX_MPP / HE_MPP
    th = np.deg2rad(rotation_deg)
    wc, hc = int(0.85 * w / s), int(0.85 * h / s)
    lin = s * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    t = np.array([w / 2, h / 2]) + rng.uniform(-15, 15, 2) - lin @ np.array([wc / 2, hc / 2])
    affine = np.eye(3)
    affine[:2, :2], affine[:2, 2] = lin, t
    # H&E: Beer-Lambert with haematoxylin (nuclei) and eosin (tissue) optical densities
    hem = _splat_gaussians((h, w), pts, amp, 2.0 / HE_MPP)
    eos = ndi.gaussian_filter(tissue.astype(np.float32), 3) * (0.35 + 0.1 * ndi.gaussian_filter(
        rng.standard_normal((h, w)), 4).astype(np.float32))
    od = hem[..., None] * np.array([0.65, 0.70, 0.29]) * 1.6 + eos[..., None] * np.array([0.07, 0.99, 0.11])
    rgb = 245 * np.exp(-od) + rng.normal(0, 3, (h, w, 3))
    (root / "he").mkdir(parents=True, exist_ok=True)
    write_aperio_tiff(root / "he" / f"{slide}.tif", np.clip(rgb, 0, 255).round().astype(np.uint8), HE_MPP)
    # CODEX: DAPI = the same nuclei mapped by the inverse affine, plus noise; other channels are noise
    inv = np.linalg.inv(affine)
    pc = pts @ inv[:2, :2].T + inv[:2, 2]
    dapi = _splat_gaussians((hc, wc), pc, amp, 2.0 / CODEX_MPP) * 4000 + 300
    chans = [dapi + rng.normal(0, 40, dapi.shape)]
    chans += [rng.normal(500, 50, dapi.shape) for _ in range(n_channels - 1)]
    cyx = np.clip(np.stack(chans), 0, 65535).round().astype(np.uint16)
    (root / "codex").mkdir(parents=True, exist_ok=True)
    names = ["DAPI"] + [f"Marker{i}" for i in range(1, n_channels)]
    write_ome_pyramid(root / "codex" / f"{slide}.ome.tif", cyx, names, mpp=codex_mpp_in_file, tile=256, levels=3)
    return affine


# ----------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def registered(small_cohort, tmp_path_factory) -> tuple[Path, int]:
    """Stage 02 run once over the small cohort: (output root, exit code)."""
    from preprocess.register import main

    out = tmp_path_factory.mktemp("reg_out")
    rc = main(["--cohort", str(small_cohort), "--out", str(out)])
    return out, rc


def _ground_truth(cohort: Path) -> dict:
    return json.loads((cohort / "ground_truth.json").read_text())["slides"]


def tissue_points(he_path: Path, step_um: float = 20.0) -> np.ndarray:
    """H&E level-0 grid points (N, 2), every ``step_um``, inside the H&E tissue."""
    from preprocess.registration.work_images import read_he_work
    from preprocess.registration_qc import apply_affine, registration_tissue_mask
    from preprocess.slide_io import HESlide

    with HESlide(he_path) as he:
        work = read_he_work(he, 4.0)
        w0, h0 = he.dimensions
        step = step_um / he.mpp
    tissue = registration_tissue_mask(work.img, 4.0)
    xs, ys = np.meshgrid(np.arange(step / 2, w0, step), np.arange(step / 2, h0, step))
    pts = np.c_[xs.ravel(), ys.ravel()]
    tw = apply_affine(np.linalg.inv(work.to_level0), pts).round().astype(int)
    th_, tw_ = tissue.shape
    inside = (tw[:, 0] >= 0) & (tw[:, 1] >= 0) & (tw[:, 0] < tw_) & (tw[:, 1] < th_)
    pts, tw = pts[inside], tw[inside]
    return pts[tissue[tw[:, 1], tw[:, 0]]]


def transform_errors_um(est, true, pts: np.ndarray, codex_dims: tuple[int, int], he_mpp: float) -> np.ndarray:
    """Errors (µm) of ``est`` against ``true`` (sample_data.truth.Transform) at the H&E points the CODEX covers."""
    from sample_data.truth import errors_um

    q = true.he_to_codex(pts)
    cover = (q[:, 0] >= 0) & (q[:, 1] >= 0) & (q[:, 0] <= codex_dims[0] - 1) & (q[:, 1] <= codex_dims[1] - 1)
    assert cover.sum() > 50, "too few tissue grid points covered by the CODEX"
    return errors_um(est, true, pts[cover], he_mpp)


# ----------------------------------------------------------------------------------------------------------------
# acceptance


@pytest.mark.slow
def test_recovers_ground_truth_transform(small_cohort, registered):
    from preprocess.slide_io import CodexImage
    from sample_data.truth import record_transform, true_transform

    out, rc = registered
    assert rc == 0
    gt = _ground_truth(small_cohort)
    assert (out / "registration" / "config.json").exists()
    assert (out / "registration" / "register.log").exists()
    assert (out / "registration" / "summary.csv").exists()
    for slide in gt:
        rec_path = out / "registration" / f"{slide}.json"
        rec = json.loads(rec_path.read_text())
        assert (out / "registration" / f"{slide}_qc.png").stat().st_size > 1000
        assert rec["status"] == "ok", rec["reason"]
        assert rec["qc"]["ncc_after"] > rec["qc"]["ncc_before"]
        assert rec["block_shifts"] and {"x", "y", "dx", "dy"} <= set(rec["block_shifts"][0])
        assert rec["displacement"]["file"] == f"{slide}_displacement.npy"
        with CodexImage(rec["codex"]) as cx:
            dims = cx.dimensions
        est, true = record_transform(rec_path), true_transform(small_cohort, slide)
        pts = tissue_points(Path(rec["he"]))
        err = transform_errors_um(est, true, pts, dims, rec["he_mpp"])
        aff = transform_errors_um(est.affine_only(), true, pts, dims, rec["he_mpp"])
        med, p95 = float(np.median(err)), float(np.percentile(err, 95))
        print(f"{slide}: median {med:.3f} µm, p95 {p95:.3f} µm over {len(err)} points (affine only: median "
              f"{np.median(aff):.3f}, p95 {np.percentile(aff, 95):.3f}), NCC {rec['qc']['ncc_before']:.3f} -> "
              f"{rec['qc']['ncc_affine']:.3f} (affine) -> {rec['qc']['ncc_after']:.3f}")
        assert med <= 0.5 and p95 <= 1.5, (slide, med, p95)


@pytest.mark.slow
def test_mismatched_pair_is_flagged(small_cohort, registered, tmp_path):
    from preprocess.register import main

    out, _ = registered
    gt = sorted(_ground_truth(small_cohort))
    a, b = gt[0], gt[1]
    pairs = tmp_path / "pairs.csv"
    he = next((small_cohort / "he").glob(f"{a}.*"))
    cx = next((small_cohort / "codex").glob(f"{b}.*"))
    pairs.write_text(f"he_slide,codex_image\n{he},{cx}\n")
    rc = main(["--pairs", str(pairs), "--out", str(tmp_path / "out")])
    assert rc == 0, "a flagged slide is not a failure"
    rec = json.loads((tmp_path / "out" / "registration" / f"{a}.json").read_text())
    good = json.loads((out / "registration" / f"{a}.json").read_text())
    print(f"mismatched {a} <- {b}: NCC after {rec['qc']['ncc_after']} (correct pair {good['qc']['ncc_after']:.3f}), "
          f"reason: {rec['reason']}")
    assert rec["status"] == "flagged" and "NCC" in rec["reason"]
    assert rec["qc"]["ncc_after"] is None or rec["qc"]["ncc_after"] < good["qc"]["ncc_threshold"]
    assert good["qc"]["ncc_after"] > good["qc"]["ncc_threshold"]


# ----------------------------------------------------------------------------------------------------------------
# errors name the file


def _summary(out: Path) -> dict[str, dict]:
    with open(out / "registration" / "summary.csv", newline="") as f:
        return {r["slide"]: r for r in csv.DictReader(f)}


@pytest.mark.slow
def test_slide_missing_from_pairs_is_an_error(small_cohort, tmp_path, caplog):
    from preprocess.register import main

    rc = main(["--cohort", str(small_cohort), "--out", str(tmp_path), "--slides", "no_such_slide"])
    assert rc == 2
    assert "no_such_slide" in caplog.text and str(small_cohort / "pairs.csv") in caplog.text


@pytest.mark.slow
def test_empty_pair_and_missing_codex_fail_naming_the_file(small_cohort, tmp_path):
    from preprocess.register import main

    he = sorted((small_cohort / "he").iterdir())
    pairs = tmp_path / "pairs.csv"
    missing = tmp_path / "nowhere" / "gone.ome.tif"
    pairs.write_text(f"he_slide,codex_image\n{he[0]},\n{he[1]},{missing}\n")
    rc = main(["--pairs", str(pairs), "--out", str(tmp_path / "out")])
    assert rc == 1
    rows = _summary(tmp_path / "out")
    s0, s1 = (p.name.split(".")[0] for p in he[:2])
    assert rows[s0]["status"] == "failed" and str(pairs) in rows[s0]["reason"] and "codex" in rows[s0]["reason"].lower()
    assert rows[s1]["status"] == "failed" and str(missing) in rows[s1]["reason"]
    assert not (tmp_path / "out" / "registration" / f"{s0}.json").exists()


@pytest.mark.slow
def test_codex_without_pixel_size(tmp_path):
    from pipeline.errors import PipelineError
    from preprocess.registration.pair import register_pair
    from preprocess.registration.params import RegParams

    truth = synthetic_pair(tmp_path, "nopx", seed=7, he_size=(900, 800), codex_mpp_in_file=None, n_channels=2)
    he, cx = tmp_path / "he" / "nopx.tif", tmp_path / "codex" / "nopx.ome.tif"
    with pytest.raises(PipelineError, match="--codex-mpp") as e:
        register_pair(he, cx, RegParams())
    assert str(cx) in str(e.value)
    rec = register_pair(he, cx, RegParams(codex_mpp=CODEX_MPP))
    assert rec["codex_mpp"] == CODEX_MPP and rec["displacement"] is None  # no field file asked for
    # compare what matters: where points land (a scale or rotation error of 1% moves the corners by microns)
    from sample_data.truth import Transform, errors_um

    yy, xx = np.mgrid[100:800:50, 100:700:50]
    err = errors_um(Transform(np.asarray(rec["affine_codex_to_he"])), Transform(truth), np.c_[xx.ravel(), yy.ravel()],
                    HE_MPP)
    print(f"no-pixel-size pair: median {np.median(err):.3f} µm, max {err.max():.3f} µm")
    assert np.median(err) < 0.3 and err.max() < 1.0


# ----------------------------------------------------------------------------------------------------------------
# pieces


def test_robust_affine_fit_drops_outliers():
    from preprocess.registration.blocks import robust_affine_fit
    from preprocess.registration_qc import apply_affine

    rng = np.random.default_rng(0)
    true = np.array([[0.75, -0.05, 12.0], [0.05, 0.75, -3.0], [0, 0, 1]])
    src = rng.uniform(0, 2000, (40, 2))
    dst = apply_affine(true, src) + rng.normal(0, 0.05, (40, 2))
    dst[:6] += rng.uniform(5, 40, (6, 2))  # six bad blocks
    m, inl = robust_affine_fit(src, dst, ransac_px=4, floor_px=0.5, min_points=6)
    assert not inl[:6].any() and inl[6:].all()
    assert np.abs(apply_affine(m, src) - apply_affine(true, src)).max() < 0.1
    assert robust_affine_fit(src[:3], dst[:3], 4, 0.5, 6) is None
    line = np.c_[np.linspace(0, 1000, 20), np.full(20, 50.0)]
    assert robust_affine_fit(line, apply_affine(true, line), 4, 0.5, 6) is None, "collinear blocks: undetermined"


def test_displacement_field_maps_both_ways():
    """Bilinear, edge-clamped sampling (as scipy's order-1 'nearest'), and CODEX -> H&E inverts H&E -> CODEX."""
    from scipy import ndimage as ndi

    from preprocess.registration.field import DisplacementField

    rng = np.random.default_rng(4)
    d = ndi.gaussian_filter(rng.normal(0, 40, (2, 9, 11)), (0, 1.5, 1.5)).astype(np.float32)
    field = DisplacementField(d, 60.0)
    pts = rng.uniform(-100, 750, (500, 2))  # some beyond the last node: edge values
    dx, dy = field.sample(pts[:, 0], pts[:, 1])
    c = np.stack([pts[:, 1] / 60.0, pts[:, 0] / 60.0])
    np.testing.assert_allclose(dx, ndi.map_coordinates(d[0].astype(np.float64), c, order=1, mode="nearest"),
                               atol=1e-9)
    np.testing.assert_allclose(dy, ndi.map_coordinates(d[1].astype(np.float64), c, order=1, mode="nearest"),
                               atol=1e-9)
    th = np.deg2rad(4.0)
    a = np.array([[0.754 * np.cos(th), -0.754 * np.sin(th), 40.0], [0.754 * np.sin(th), 0.754 * np.cos(th), -7.0],
                  [0, 0, 1]])
    q = field.he_to_codex(a, pts)
    np.testing.assert_allclose(q, (np.linalg.inv(a) @ np.c_[pts - np.c_[dx, dy], np.ones(len(pts))].T).T[:, :2])
    back = field.codex_to_he(a, q)
    assert np.abs(back - pts).max() < 1e-6  # Newton steps on the piecewise-bilinear field


def test_field_from_blocks_recovers_a_smooth_field():
    """Block residuals of a known smooth deformation (plus noise, gaps and three bad blocks) give back the field at
    points, and the bad blocks are the ones replaced."""
    from preprocess.registration.field import field_from_blocks

    def truth(x, y):
        return np.stack([14 * np.sin(x / 900 + 0.3) * np.cos(y / 1100) + 0.004 * y,
                         -9 * np.cos(x / 1000) * np.sin(y / 800 + 1.0) + 3.0], -1)

    rng = np.random.default_rng(2)
    gy, gx, b = 12, 14, 100
    yy, xx = np.mgrid[0:gy, 0:gx]
    centres = np.c_[xx.ravel() * b + (b - 1) / 2, yy.ravel() * b + (b - 1) / 2].astype(float)
    measured = ((xx - 6.5) ** 2 / 40 + (yy - 5.5) ** 2 / 30 < 1).ravel() & (rng.uniform(size=gy * gx) > 0.15)
    res = truth(centres[:, 0], centres[:, 1]) + rng.normal(0, 0.03, centres.shape)
    bad = rng.choice(np.flatnonzero(measured), 3, replace=False)
    res[bad] += [[15, -6], [-8, 9], [5, 12]]
    fit = field_from_blocks(centres, res, measured, (gy, gx), (gx * b, gy * b), b, outlier_px=3.0)
    assert sorted(np.flatnonzero(fit.outliers)) == sorted(bad)
    inner = centres[measured] + rng.uniform(-50, 50, (int(measured.sum()), 2))
    dx, dy = fit.field.sample(inner[:, 0], inner[:, 1])
    err = np.linalg.norm(np.c_[dx, dy] - truth(inner[:, 0], inner[:, 1]), axis=1)
    print(f"field from blocks: median error {np.median(err):.3f} px, max {err.max():.3f} px (true |D| up to "
          f"{np.abs(res).max():.0f} px)")
    assert np.median(err) < 0.15 and err.max() < 0.6


def test_plausibility_flags_scale_shear_and_flip():
    from preprocess.registration_qc import decompose_affine, plausibility

    s = CODEX_MPP / HE_MPP
    th = np.deg2rad(30)
    rot = np.array([[np.cos(th), -np.sin(th), 5], [np.sin(th), np.cos(th), 7], [0, 0, 1]])
    good = rot @ np.diag([s, s, 1])
    parts = decompose_affine(good)
    assert abs(parts.rotation_deg - 30) < 1e-9 and abs(parts.scale_x - s) < 1e-12 and abs(parts.shear) < 1e-12
    assert plausibility(good, s, 0.1, 0.05)[0]
    assert not plausibility(rot @ np.diag([1.0, 1.0, 1]), s, 0.1, 0.05)[0]
    assert not plausibility(good @ np.array([[1, 0.2, 0], [0, 1, 0], [0, 0, 1]]), s, 0.1, 0.05)[0]
    ok, why, _ = plausibility(good @ np.diag([1, -1, 1]), s, 0.1, 0.05)
    assert not ok and "flip" in why


@pytest.mark.slow
def test_constrain_shifts_failure_is_recorded(small_cohort, tmp_path, monkeypatch):
    """palom's constrain_shifts raises on identical shifts: the stage records it and still refines."""
    import palom

    from preprocess.registration.pair import register_pair
    from preprocess.registration.params import RegParams

    def boom(self):
        raise ValueError("all shifts identical")

    monkeypatch.setattr(palom.align.Aligner, "constrain_shifts", boom)
    gt = _ground_truth(small_cohort)
    slide = sorted(gt)[0]
    he, cx = (next((small_cohort / d).glob(f"{slide}.*")) for d in ("he", "codex"))
    rec = register_pair(he, cx, RegParams())
    assert any("constrain_shifts failed" in n for n in rec["qc"]["notes"])
    assert rec["qc"]["n_blocks_used"] >= 6 and rec["status"] == "ok"


def test_write_registered_ome(tmp_path):
    import tifffile

    from preprocess.registration.export import write_registered_ome
    from preprocess.registration_qc import haematoxylin, ncc
    from preprocess.slide_io import CodexImage, HESlide

    truth = synthetic_pair(tmp_path, "reg", seed=3, he_size=(800, 700), n_channels=2)
    out = tmp_path / "reg_registered.ome.tif"
    with CodexImage(tmp_path / "codex" / "reg.ome.tif") as cx, HESlide(tmp_path / "he" / "reg.tif") as he:
        write_registered_ome(cx, truth, he.dimensions, he.mpp, out, tile=256, min_level_px=256)
        rgb = he.read_region(0, 0, 0, he.dimensions)
    with CodexImage(out) as r:
        assert r.shape == (2, 700, 800) and r.mpp == HE_MPP and r.channel_names == ["DAPI", "Marker1"]
        assert r.level_count == 2 and r.level(0).dtype == np.uint16
        dapi = r.read_region(0, 0, 800, 700, channels=[0])[0].astype(np.float32)
    with tifffile.TiffFile(out) as tf:
        assert tf.series[0].axes == "CYX" and tf.is_ome
    assert ncc(haematoxylin(rgb), dapi, dapi > 0) > 0.9


def test_write_registered_ome_through_a_field(tmp_path):
    """The export maps through the displacement field: a constant field equals the shifted affine, and a smooth
    field matches an independent resampling (scipy, sample_data.truth) of the CODEX."""
    from scipy import ndimage as ndi

    from preprocess.registration.export import write_registered_ome
    from preprocess.registration.field import DisplacementField
    from preprocess.slide_io import CodexImage
    from sample_data.truth import Transform

    truth = synthetic_pair(tmp_path, "fld", seed=5, he_size=(640, 560), n_channels=2)
    const = DisplacementField(np.stack([np.full((3, 4), 7.25), np.full((3, 4), -3.5)]).astype(np.float32), 256.0)
    shift = np.array([[1, 0, 7.25], [0, 1, -3.5], [0, 0, 1.0]])
    rng = np.random.default_rng(1)
    smooth = ndi.gaussian_filter(rng.normal(0, 40, (2, 6, 7)), (0, 1, 1)).astype(np.float32)
    outs = {}
    with CodexImage(tmp_path / "codex" / "fld.ome.tif") as cx:
        for name, affine, field in (("field", truth, const), ("shifted", shift @ truth, None),
                                    ("smooth", truth, DisplacementField(smooth, 120.0))):
            write_registered_ome(cx, affine, (640, 560), HE_MPP, tmp_path / f"{name}.ome.tif", tile=256,
                                 min_level_px=256, field=field)
            with CodexImage(tmp_path / f"{name}.ome.tif") as r:
                outs[name] = r.read_region(0, 0, 640, 560, channels=[0])[0].astype(np.float64)
        src = cx.read_region(0, 0, *cx.dimensions, channels=[0])[0].astype(np.float64)
    assert np.abs(outs["field"] - outs["shifted"]).max() <= 1
    yy, xx = np.mgrid[0:560, 0:640]
    q = Transform(truth, smooth.astype(np.float64), 120.0).he_to_codex(np.c_[xx.ravel(), yy.ravel()])
    inside = (q[:, 0] >= 1) & (q[:, 1] >= 1) & (q[:, 0] <= src.shape[1] - 2) & (q[:, 1] <= src.shape[0] - 2)
    ref = ndi.map_coordinates(src, [q[inside, 1], q[inside, 0]], order=1)
    got = outs["smooth"].ravel()[inside]
    assert np.abs(smooth).max() > 5 and np.corrcoef(got, ref)[0, 1] > 0.999
    assert np.corrcoef(outs["field"].ravel()[inside], ref)[0, 1] < 0.99  # another field: another image


@pytest.mark.slow
def test_cli_subprocess(small_cohort, tmp_path):
    slide = sorted(_ground_truth(small_cohort))[-1]
    cmd = [sys.executable, "-m", "preprocess.register", "--cohort", str(small_cohort), "--out", str(tmp_path),
           "--slides", slide, "--workers", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rec = json.loads((tmp_path / "registration" / f"{slide}.json").read_text())
    assert rec["status"] == "ok" and len(rec["affine_codex_to_he"]) == 3
    cfg = json.loads((tmp_path / "registration" / "config.json").read_text())
    assert cfg["slides"] == [slide] and cfg["resolved_params"]["upsample"] == 10
    # a second run skips the slide that is done
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0 and "already done" in res.stderr
