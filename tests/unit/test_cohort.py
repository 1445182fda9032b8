"""Acceptance tests of the synthetic cohort (sample_data/make_cohort.py).

They read the generated files back with OpenSlide, tifffile, scikit-image and lifelines, independently of the
generator's internals.
"""

from __future__ import annotations

import csv
import filecmp
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from scipy import ndimage as ndi
from scipy.spatial import cKDTree
from skimage.color import rgb2hed
from skimage.filters import threshold_otsu
from skimage.measure import label, regionprops

OME_NS = {"o": "http://www.openmicroscopy.org/Schemas/OME/2016-06"}
PANEL = Path(__file__).resolve().parents[2] / "sample_data" / "marker_panel.csv"


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _panel(path: Path = PANEL) -> list[str]:
    rows = _read_csv(path)
    assert [int(r["channel"]) for r in rows] == list(range(len(rows)))
    return [r["marker"] for r in rows]


def _gt(cohort: Path) -> dict:
    return json.loads((cohort / "ground_truth.json").read_text())


def _he_level(path: Path, level: int) -> np.ndarray:
    with openslide.OpenSlide(str(path)) as s:
        return np.asarray(s.read_region((0, 0), level, s.level_dimensions[level]).convert("RGB"))


def _codex(path: Path, channel: int, level: int = 0) -> np.ndarray:
    with tifffile.TiffFile(path) as tf:
        return tf.series[0].levels[level].asarray()[channel]


def _haematoxylin(rgb: np.ndarray) -> np.ndarray:
    return rgb2hed(rgb)[..., 0].astype(np.float32)


def _warp_codex_to_he(img: np.ndarray, affine: np.ndarray, he_shape: tuple[int, int], down: int,
                      order: int = 1) -> np.ndarray:
    """Sample a CODEX level-0 image on the grid of H&E level ``down`` (downsample), given CODEX->H&E level-0 affine.

    H&E level pixel c is centred on level-0 coordinate (c + 0.5)·down − 0.5 (pixel-centre convention).
    """
    s = np.array([[down, 0, 0.5 * down - 0.5], [0, down, 0.5 * down - 0.5], [0, 0, 1.0]])
    m_xy = np.linalg.inv(affine) @ s  # H&E level (x, y, 1) -> CODEX level-0 (x, y, 1)
    swap = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1.0]])
    m_rc = swap @ m_xy @ swap  # same map in (row, col) order
    return ndi.affine_transform(img.astype(np.float32), m_rc[:2, :2], offset=m_rc[:2, 2], output_shape=he_shape,
                                order=order, cval=np.nan)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _nuclei_centroids(img: np.ndarray, mpp: float, mask: np.ndarray | None = None) -> np.ndarray:
    """Centroids (x, y) in pixels of thresholded blobs of nuclear size (12-120 µm²)."""
    vals = img[mask] if mask is not None else img.ravel()
    binary = img > threshold_otsu(vals)
    if mask is not None:
        binary &= mask
    cents = [r.centroid[::-1] for r in regionprops(label(binary)) if 12 <= r.area * mpp * mpp <= 120]
    return np.array(cents, np.float64).reshape(-1, 2)


# ---------------------------------------------------------------------------------------------------------------
def test_marker_panel() -> None:
    from sample_data.panel import MARKERS

    names = _panel()
    assert len(names) == 40 and names[0] == "DAPI" and names == MARKERS
    assert {"CD8", "Pan-Cytokeratin", "PD-1", "HLA-DR", "Mac2/Galectin-3"} <= set(names)


@pytest.mark.slow
def test_layout_and_tables(small_cohort: Path) -> None:
    gt = _gt(small_cohort)
    pairs = _read_csv(small_cohort / "pairs.csv")
    assert list(pairs[0]) == ["he_slide", "codex_image"]
    slides = [Path(p["he_slide"]).name.split(".")[0] for p in pairs]
    assert slides == sorted(gt["slides"]) and len(slides) == 3
    for p in pairs:
        assert not Path(p["he_slide"]).is_absolute() and (small_cohort / p["he_slide"]).is_file()
        assert (small_cohort / p["codex_image"]).is_file()
    for s in slides:
        assert "." not in s and s.startswith("slide_")
    assert _panel(small_cohort / "marker_panel.csv") == _panel()
    assert gt["markers"] == _panel()
    assert gt["visible_markers"] and set(gt["visible_markers"]) < set(gt["markers"])
    for rec in gt["slides"].values():
        assert rec["he_mpp"] == 0.5 and rec["codex_mpp"] == 0.377
        a = np.array(rec["affine_codex_to_he"])
        assert a.shape == (3, 3) and np.allclose(a[2], [0, 0, 1])
        # a similarity: rotation within ±5° and scale 0.377 / 0.5
        scale = math.sqrt(abs(np.linalg.det(a[:2, :2])))
        assert scale == pytest.approx(0.377 / 0.5, rel=1e-6)
        assert abs(math.degrees(math.atan2(a[1, 0], a[0, 0]))) <= 5.0 + 1e-6
        assert (small_cohort / rec["risk_mask_png"]).is_file()
    clin = _read_csv(small_cohort / "clinical.csv")
    assert list(clin[0]) == ["case_id", "slide_id", "survival_months", "censorship", "response", "age", "stage"]
    assert sorted(r["slide_id"] for r in clin) == slides
    for r in clin:
        assert r["case_id"] in gt["patients"] and r["censorship"] in ("0", "1") and r["response"] in ("0", "1")
        assert float(r["survival_months"]) > 0
    assert (small_cohort / "preview.png").stat().st_size > 10_000


@pytest.mark.slow
def test_he_opens_in_openslide(small_cohort: Path) -> None:
    gt = _gt(small_cohort)
    for sid, rec in gt["slides"].items():
        with openslide.OpenSlide(str(small_cohort / "he" / f"{sid}.tif")) as s:
            assert s.level_count >= 2
            h, w = rec["he_shape"]
            dims = [(w, h)]
            for _ in range(s.level_count - 1):
                dims.append((-(-dims[-1][0] // 4), -(-dims[-1][1] // 4)))
            assert tuple(s.level_dimensions) == tuple(dims)
            assert float(s.properties[openslide.PROPERTY_NAME_MPP_X]) == 0.5
            assert float(s.properties[openslide.PROPERTY_NAME_MPP_Y]) == 0.5
            for lvl in range(s.level_count):
                region = np.asarray(s.read_region((0, 0), lvl, (64, 64)).convert("RGB"))
                assert region.shape == (64, 64, 3)
            thumb = np.asarray(s.get_thumbnail((256, 256)).convert("RGB")).astype(float)
        # white glass around pink/purple tissue
        white = thumb.min(-1) > 215
        assert 0.05 < white.mean() < 0.8
        tissue = thumb[~white]
        assert tissue[:, 1].mean() < tissue[:, 0].mean() - 20  # eosin/haematoxylin absorb green most


@pytest.mark.slow
def test_codex_ome_pyramid(small_cohort: Path) -> None:
    gt = _gt(small_cohort)
    panel = _panel()
    for sid, rec in gt["slides"].items():
        with tifffile.TiffFile(small_cohort / "codex" / f"{sid}.ome.tif") as tf:
            assert tf.is_ome and len(tf.series) == 1
            ser = tf.series[0]
            assert ser.axes == "CYX" and ser.dtype == np.uint16
            assert ser.shape == (40, *rec["codex_shape"])
            assert len(ser.levels) >= 2
            for lo, hi in zip(ser.levels[:-1], ser.levels[1:]):
                assert hi.shape == (40, -(-lo.shape[1] // 2), -(-lo.shape[2] // 2))
            assert max(ser.levels[-1].shape[1:]) < 1000
            page = tf.pages[0]
            assert page.is_tiled and page.compression in (8, 50000)  # deflate or zstd
            assert len(page.subifds or ()) == len(ser.levels) - 1
            root = ET.fromstring(tf.ome_metadata)
            assert len(root.findall("o:Image", OME_NS)) == 1
            pix = root.find("o:Image/o:Pixels", OME_NS)
            assert float(pix.get("PhysicalSizeX")) == 0.377 and float(pix.get("PhysicalSizeY")) == 0.377
            assert pix.get("PhysicalSizeXUnit", "µm") == "µm"
            assert [c.get("Name") for c in pix.findall("o:Channel", OME_NS)] == panel
            # lower levels are 2x2 area means of the level above
            l0 = ser.levels[0].asarray()[0].astype(np.float64)
            l1 = ser.levels[1].asarray()[0].astype(np.float64)
        h, w = (l0.shape[0] // 2) * 2, (l0.shape[1] // 2) * 2
        block = l0[:h, :w].reshape(h // 2, 2, w // 2, 2).mean((1, 3))
        assert np.abs(block - l1[: h // 2, : w // 2]).max() <= 1.0
        assert l0.max() > 1000  # nuclei are bright in DAPI


@pytest.mark.slow
def test_dapi_matches_haematoxylin_after_registration(small_cohort: Path) -> None:
    """DAPI warped by the stored affine correlates with haematoxylin; a 40 µm error destroys that."""
    gt = _gt(small_cohort)
    results = []
    for sid, rec in gt["slides"].items():
        affine = np.array(rec["affine_codex_to_he"])
        down = 4  # H&E level 1: 2 µm / px working resolution
        rgb = _he_level(small_cohort / "he" / f"{sid}.tif", 1)
        hem = ndi.gaussian_filter(_haematoxylin(rgb), 0.7)
        tissue = rgb.min(-1) < 215
        dapi = ndi.gaussian_filter(_codex(small_cohort / "codex" / f"{sid}.ome.tif", 0).astype(np.float32),
                                   0.5 * down * 0.5 / 0.377)
        rs = []
        for shift_um in (0.0, 40.0):
            a = affine.copy()
            a[0, 2] += shift_um / 0.5
            warped = _warp_codex_to_he(dapi, a, hem.shape, down)
            ok = tissue & np.isfinite(warped)
            assert ok.mean() > 0.2
            rs.append(_pearson(ndi.gaussian_filter(np.nan_to_num(warped), 0.7)[ok], hem[ok]))
        results.append(rs)
        print(f"{sid}: r(DAPI, haematoxylin) = {rs[0]:.3f} with the true affine, {rs[1]:.3f} off by 40 µm")
    for r_true, r_shift in results:
        assert r_true > 0.6
        assert r_shift < r_true - 0.3


def _displacement(cohort: Path, rec: dict, pts: np.ndarray) -> np.ndarray:
    """D (H&E level-0 px) at H&E points (N, 2) from the ground truth's warp file: bilinear, edge-clamped."""
    if not rec.get("warp"):
        return np.zeros_like(pts)
    d = np.load(cohort / rec["warp"]["file"]).astype(np.float64)
    step = rec["warp"]["step_px"]
    c = np.stack([pts[:, 1] / step, pts[:, 0] / step])
    return np.stack([ndi.map_coordinates(d[k], c, order=1, mode="nearest") for k in range(2)], 1)


def _codex_to_he(cohort: Path, rec: dict, pts: np.ndarray, warp: bool = True) -> np.ndarray:
    """The ground truth's CODEX -> H&E map: x = A u + D(x), by fixed-point iteration."""
    a = np.array(rec["affine_codex_to_he"])
    y = pts @ a[:2, :2].T + a[:2, 2]
    x = y.copy()
    for _ in range(12 if warp else 0):
        x = y + _displacement(cohort, rec, x)
    return x


def _he_to_codex(cohort: Path, rec: dict, pts: np.ndarray) -> np.ndarray:
    inv = np.linalg.inv(np.array(rec["affine_codex_to_he"]))
    q = pts - _displacement(cohort, rec, pts)
    return q @ inv[:2, :2].T + inv[:2, 2]


@pytest.mark.slow
def test_true_map_matches_nuclei_both_ways(small_cohort: Path) -> None:
    """Nucleus centroids found in DAPI land on nuclei found in haematoxylin through the true affine + warp, and
    back (sub-micron); the affine alone is off by the warp, a 10 µm shift is far off."""
    gt = _gt(small_cohort)
    sid, rec = next(iter(gt["slides"].items()))
    assert rec["warp"]["file"] == f"warps/{sid}.npy" and rec["warp"]["amplitude_um"] == 8.0
    d = np.load(small_cohort / rec["warp"]["file"])
    assert d.dtype == np.float32 and d.shape[0] == 2
    step = rec["warp"]["step_px"]
    h0, w0 = rec["he_shape"]
    assert (d.shape[1] - 1) * step >= h0 - 1 and (d.shape[2] - 1) * step >= w0 - 1  # nodes cover the slide
    assert 7.9 <= np.hypot(d[0], d[1]).max() * rec["he_mpp"] <= 8.0 + 1e-4  # amplitude = the largest |D|
    rgb = _he_level(small_cohort / "he" / f"{sid}.tif", 0)
    he_c = _nuclei_centroids(_haematoxylin(rgb), 0.5, rgb.min(-1) < 215)
    dapi = _codex(small_cohort / "codex" / f"{sid}.ome.tif", 0).astype(np.float32)
    cx_c = _nuclei_centroids(dapi, 0.377)
    assert len(he_c) > 100 and len(cx_c) > 100
    tree = cKDTree(he_c)
    d_fwd = tree.query(_codex_to_he(small_cohort, rec, cx_c))[0] * 0.5  # µm
    d_aff = tree.query(_codex_to_he(small_cohort, rec, cx_c, warp=False))[0] * 0.5
    bwd = _he_to_codex(small_cohort, rec, he_c)
    h, w = rec["codex_shape"]
    inside = (bwd[:, 0] > 10) & (bwd[:, 1] > 10) & (bwd[:, 0] < w - 10) & (bwd[:, 1] < h - 10)
    d_bwd = cKDTree(cx_c).query(bwd[inside])[0] * 0.377
    print(f"{sid}: median nucleus mismatch {np.median(d_fwd):.2f} µm (CODEX->H&E), {np.median(d_bwd):.2f} µm "
          f"(H&E->CODEX); affine only {np.median(d_aff):.2f} µm")
    assert np.median(d_fwd) < 1.0 and np.median(d_bwd) < 1.0
    assert np.median(d_aff) > np.median(d_fwd) + 0.3
    # a wrong map (10 µm shift) does not match
    shifted = _codex_to_he(small_cohort, rec, cx_c) + 10.0 / 0.5
    assert np.median(tree.query(shifted)[0] * 0.5) > 2.5


@pytest.mark.slow
def test_40x_twin_and_zero_filled_block(tmp_path: Path) -> None:
    """--he-mpp 0.25 renders the same cells at 40x (same CODEX file as the 20x twin); --nodata-slides zero-fills a
    square of the first slides' CODEX and records it."""
    from sample_data.make_cohort import main

    args = ["--slides", "1", "--seed", "4", "--tissue-mm", "0.35", "--workers", "1", "--log-level", "WARNING",
            "--nodata-slides", "1"]
    assert main(["--out", str(tmp_path / "a"), *args]) == 0
    assert main(["--out", str(tmp_path / "b"), "--he-mpp", "0.25", *args]) == 0
    ra, rb = (_gt(tmp_path / k)["slides"]["slide_000"] for k in "ab")
    assert rb["he_mpp"] == 0.25 and rb["he_shape"] == [2 * v for v in ra["he_shape"]]
    with openslide.OpenSlide(str(tmp_path / "b" / "he" / "slide_000.tif")) as s:
        assert float(s.properties[openslide.PROPERTY_NAME_MPP_X]) == 0.25
    ca, cb = (tmp_path / k / "codex" / "slide_000.ome.tif" for k in "ab")
    assert filecmp.cmp(ca, cb, shallow=False)
    # the same displacement in µm (nodes in each twin's own H&E pixels)
    da, db = (np.load(tmp_path / k / "warps" / "slide_000.npy") for k in "ab")
    assert rb["warp"]["step_px"] == 2 * ra["warp"]["step_px"]
    np.testing.assert_allclose(db * 0.25, da * 0.5, atol=0.02)
    x0, y0, x1, y1 = ra["nodata_box_codex_px"]
    img = tifffile.TiffFile(ca).series[0].levels[0].asarray()
    assert x1 - x0 > 50 and not img[:, y0:y1, x0:x1].any() and img[:, :y0].any()


@pytest.mark.slow
def test_splits_are_patient_level(small_cohort: Path, tmp_path: Path) -> None:
    from sample_data.make_cohort import main

    cohorts = [small_cohort]
    out = tmp_path / "tables"
    assert main(["--out", str(out), "--slides", "14", "--seed", "5", "--tissue-mm", "0.4", "--tables-only",
                 "--workers", "1", "--log-level", "WARNING"]) == 0
    cohorts.append(out)
    for cohort in cohorts:
        case_of = {r["slide_id"]: r["case_id"] for r in _read_csv(cohort / "clinical.csv")}
        files = sorted((cohort / "splits").glob("splits_*.csv"))
        assert [f.name for f in files] == [f"splits_{k}.csv" for k in range(5)]
        val_count = dict.fromkeys(case_of, 0)
        for f in files:
            rows = _read_csv(f)
            assert list(rows[0]) == ["train", "val"]
            train = {r["train"] for r in rows if r["train"]}
            val = {r["val"] for r in rows if r["val"]}
            assert train | val == set(case_of) and not train & val
            assert not {case_of[s] for s in train} & {case_of[s] for s in val}
            for s in val:
                val_count[s] += 1
        assert set(val_count.values()) == {1}
    # the bigger cohort has patients with several slides, and every fold has validation slides
    case_of = {r["slide_id"]: r["case_id"] for r in _read_csv(out / "clinical.csv")}
    assert len(set(case_of.values())) < len(case_of)
    assert all(any(r["val"] for r in _read_csv(out / "splits" / f"splits_{k}.csv")) for k in range(5))


@pytest.mark.slow
def test_true_risk_ranks_survival(tmp_path: Path) -> None:
    from lifelines.utils import concordance_index

    from sample_data.make_cohort import main

    out = tmp_path / "outcomes"
    assert main(["--out", str(out), "--slides", "60", "--seed", "1", "--tissue-mm", "0.5", "--tables-only",
                 "--workers", "2", "--log-level", "WARNING"]) == 0
    gt = _gt(out)
    clin = {r["case_id"]: r for r in _read_csv(out / "clinical.csv")}  # one row per patient
    cases = sorted(clin)
    risk = np.array([gt["patients"][c]["true_risk"] for c in cases])
    months = np.array([float(clin[c]["survival_months"]) for c in cases])
    event = np.array([1 - int(clin[c]["censorship"]) for c in cases])
    cidx = concordance_index(months, -risk, event)
    print(f"{len(cases)} patients: c-index(true_risk) = {cidx:.3f}, censored {1 - event.mean():.2f}")
    assert cidx >= 0.7
    assert 0.2 <= 1 - event.mean() <= 0.4
    prob = np.array([gt["patients"][c]["true_response_prob"] for c in cases])
    resp = np.array([int(clin[c]["response"]) for c in cases])
    assert 0.1 < resp.mean() < 0.9 and prob[resp == 1].mean() > prob[resp == 0].mean()


@pytest.mark.slow
def test_same_seed_same_files(tmp_path: Path) -> None:
    """Same seed -> identical files (pixels, tables, JSON), also across worker counts."""
    from sample_data.make_cohort import main

    args = ["--slides", "2", "--seed", "7", "--tissue-mm", "0.35", "--log-level", "WARNING"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["--out", str(a), "--workers", "1", *args]) == 0
    assert main(["--out", str(b), "--workers", "2", *args]) == 0
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert Path("he/slide_001.tif") in files and Path("codex/slide_001.ome.tif") in files
    for rel in files:
        assert filecmp.cmp(a / rel, b / rel, shallow=False), rel
    with tifffile.TiffFile(a / "codex" / "slide_000.ome.tif") as ta, \
            tifffile.TiffFile(b / "codex" / "slide_000.ome.tif") as tb:
        assert np.array_equal(ta.series[0].asarray(), tb.series[0].asarray())
