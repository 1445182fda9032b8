"""Artefact exclusion of stage 01 (preprocess.tissue.artefact_masks / slide_artefacts, preprocess.patch QC files).

Each detector sees a synthetic H&E-like image at 2 µm/px (pink eosin with purple nuclei, a few µm of texture) with one
painted artefact: it must find that artefact, leave the clean tissue alone, and do nothing when switched off.
"""

from __future__ import annotations

import csv

import cv2
import h5py
import numpy as np
import pytest

from preprocess import patch
from preprocess.tissue import ArtefactParams, artefact_masks, grid_tissue_mask, qc_measures, white_point
from sample_data.writers import write_aperio_tiff

MPP = 2.0
H_OD = np.array([0.80, 1.00, 0.42], np.float32)
E_OD = np.array([0.12, 0.85, 0.42], np.float32)


def tissue_od(n: int = 320, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """OD image (n, n, 3) of a tissue disc (eosin + nuclei dots) on glass, and the disc mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:n, 0:n]
    disc = (xx - n / 2) ** 2 + (yy - n / 2) ** 2 < (0.42 * n) ** 2
    e = 0.45 + 0.15 * cv2.GaussianBlur(rng.standard_normal((n, n)).astype(np.float32), (0, 0), 1.5)
    nuc = np.zeros((n, n), np.float32)
    for x, y in rng.uniform(0, n, (int(0.08 * n * n / 4), 2)):
        cv2.circle(nuc, (int(x), int(y)), int(rng.integers(1, 3)), 1.0, -1)
    od = disc[..., None] * (e[..., None] * E_OD + 0.9 * nuc[..., None] * H_OD)
    return od.astype(np.float32), disc


def to_rgb(od: np.ndarray, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = 245.0 * np.exp(-(od + 0.02)) + rng.normal(0, 2.0, od.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def masks(rgb: np.ndarray, params: ArtefactParams | None = None) -> tuple[dict, np.ndarray]:
    params = params or ArtefactParams()
    tissue, _ = grid_tissue_mask(rgb, MPP)
    maps = qc_measures(rgb, white_point(rgb, tissue), MPP)
    return artefact_masks(maps, tissue, MPP, params), tissue


def _band(n: int, width: float, y: int | None = None) -> np.ndarray:
    m = np.zeros((n, n), np.uint8)
    y = n // 2 if y is None else y
    cv2.line(m, (int(0.15 * n), y - 20), (int(0.85 * n), y + 20), 1, thickness=int(width))
    return m.astype(bool)


def test_clean_tissue_has_no_artefact():
    got, tissue = masks(to_rgb(tissue_od()[0]))
    assert tissue.mean() > 0.4
    for cause, m in got.items():
        assert (m & tissue).mean() / tissue.mean() < 0.01, cause


@pytest.mark.parametrize("colour", [(0.95, 0.25, 0.75), (0.95, 0.55, 0.10), (1.6, 1.6, 1.5)])  # green, blue, black
def test_ink_on_tissue_and_glass(colour):
    od, _ = tissue_od()
    n = od.shape[0]
    stroke = np.zeros((n, n), np.uint8)
    cv2.line(stroke, (10, 40), (n - 10, n - 60), 1, thickness=25)  # from glass across the tissue to glass
    stroke = stroke.astype(bool)
    rgb = to_rgb(od + stroke[..., None] * np.asarray(colour, np.float32))
    got, _ = masks(rgb)
    assert (got["ink"] & stroke).sum() / stroke.sum() > 0.85
    assert (got["ink"] & ~cv2.dilate(stroke.astype(np.uint8), np.ones((15, 15))).astype(bool)).sum() < 0.01 * n * n
    off, _ = masks(rgb, ArtefactParams(ink=False))
    assert not off["ink"].any()


def test_fold_is_dark_band():
    od, disc = tissue_od()
    n = od.shape[0]
    band = _band(n, 20) & disc
    shifted = np.roll(od, 12, axis=0)
    rgb = to_rgb(od + band[..., None] * (1.1 * shifted + np.array([0.1, 0.14, 0.06], np.float32)))
    got, _ = masks(rgb)
    assert (got["fold"] & band).sum() / band.sum() > 0.8
    assert (got["fold"] & ~cv2.dilate(band.astype(np.uint8), np.ones((15, 15))).astype(bool)).sum() < 0.01 * n * n
    assert not masks(rgb, ArtefactParams(folds=False))[0]["fold"].any()


def test_bubble_ring_is_filled():
    od, _ = tissue_od()
    n = od.shape[0]
    yy, xx = np.mgrid[0:n, 0:n]
    r = np.hypot(xx - 0.45 * n, yy - 0.5 * n)
    inside = r < 50
    grey = od.mean(axis=2, keepdims=True)
    od = np.where(inside[..., None], 0.5 * od + 0.25 * grey + np.array([0.06, 0.06, 0.08]), od)
    od = od + np.exp(-((r - 50) / 2.5) ** 2)[..., None] * np.array([0.95, 0.92, 0.88], np.float32)
    rgb = to_rgb(od.astype(np.float32))
    got, _ = masks(rgb)
    assert (got["bubble"] & inside).sum() / inside.sum() > 0.8
    assert (got["bubble"] & (r > 70)).sum() < 0.01 * n * n
    assert not masks(rgb, ArtefactParams(bubbles=False))[0]["bubble"].any()


def test_blur_region():
    od, disc = tissue_od()
    n = od.shape[0]
    rgb = to_rgb(od)
    yy, xx = np.mgrid[0:n, 0:n]
    region = np.hypot(xx - 0.55 * n, yy - 0.5 * n) < 60
    blurred = cv2.GaussianBlur(rgb, (0, 0), 2.0)  # 4 µm at 2 µm/px
    rgb = np.where(region[..., None], blurred, rgb)
    got, tissue = masks(rgb)
    assert (got["blur"] & region).sum() / region.sum() > 0.8
    far = tissue & (np.hypot(xx - 0.55 * n, yy - 0.5 * n) > 80)
    assert (got["blur"] & far).sum() < 0.02 * far.sum()
    assert not masks(rgb, ArtefactParams(blur=False))[0]["blur"].any()


def test_stage01_writes_qc_files_and_drops_ink_patches(tmp_path):
    """Stage 01 on a 0.5 µm/px slide with a green stroke: QC figure, table, summary; the stroke's patches are
    dropped (and kept with --no-ink)."""
    od, _ = tissue_od(400, seed=3)
    od = cv2.resize(od, (1600, 1600), interpolation=cv2.INTER_LINEAR)  # 2 µm/px -> 0.5 µm/px
    stroke = np.zeros((1600, 1600), np.uint8)
    cv2.line(stroke, (100, 800), (1500, 800), 1, thickness=120)
    stroke = stroke.astype(bool)
    rgb = to_rgb(od + stroke[..., None] * np.array([0.95, 0.25, 0.75], np.float32))
    (tmp_path / "he").mkdir()
    write_aperio_tiff(tmp_path / "he" / "s1.tif", rgb, mpp=0.5, downsamples=(4,))
    out = tmp_path / "out"
    assert patch.main(["--he", str(tmp_path / "he"), "--out", str(out), "--patch-size", "112"]) == 0
    d = out / "patches"
    assert (d / "s1_qc.png").stat().st_size > 0 and cv2.imread(str(d / "s1_qc.png")).shape[2] == 3
    with open(d / "s1_qc.csv", newline="") as f:
        table = {r["cause"]: float(r["fraction_of_tissue"]) for r in csv.DictReader(f)}
    assert set(table) == {"ink", "fold", "bubble", "blur", "total"} and table["ink"] > 0.05
    with open(d / "qc_summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["slide"] for r in rows] == ["s1"] and float(rows[0]["ink"]) == pytest.approx(table["ink"], abs=1e-6)
    with h5py.File(d / "s1.h5", "r") as f:
        coords, ps0 = f["coords"][:], int(f.attrs["patch_size_level0"])
    on_ink = [stroke[y:y + ps0, x:x + ps0].mean() for x, y in coords]
    assert max(on_ink) <= 0.05
    out2 = tmp_path / "out_noink"
    assert patch.main(["--he", str(tmp_path / "he"), "--out", str(out2), "--patch-size", "112", "--no-ink"]) == 0
    with open(out2 / "patches" / "s1_qc.csv", newline="") as f:
        assert {r["cause"]: float(r["fraction_of_tissue"]) for r in csv.DictReader(f)}["ink"] == 0.0
    assert '"ink": false' in (out2 / "patches" / "done" / "s1.json").read_text()  # a done-record setting
    out3 = tmp_path / "out_off"  # every exclusion off: the stroke's patches are kept (the tissue mask holds ink)
    assert patch.main(["--he", str(tmp_path / "he"), "--out", str(out3), "--patch-size", "112", "--no-ink",
                       "--no-folds", "--no-bubbles", "--no-blur"]) == 0
    with h5py.File(out3 / "patches" / "s1.h5", "r") as f:
        assert len(f["coords"]) > len(coords) + 10
