"""Nucleus detection (spatial/nuclei.py) on small synthetic H&E images: shapes, 20x vs 40x, tiles with halos
(a nucleus on a tile border or corner is found once), and a whole slide read through OpenSlide."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.spatial import cKDTree

from spatial.nuclei import (
    COLUMNS,
    detect_nuclei,
    detect_slide,
    detect_tiled,
    haematoxylin_od,
    tiles_on_tissue,
    tiling,
)

HAEM = np.array([0.65, 0.70, 0.29])
EOSIN = np.array([0.07, 0.99, 0.11])


def _image(side_um: float, nuclei: list[tuple], mpp: float, tissue: tuple | None = None, seed: int = 0
           ) -> np.ndarray:
    """RGB uint8 of ``side_um`` µm at ``mpp``: pink tissue (the box x0, y0, x1, y1 µm, or everywhere) and dark
    elliptical nuclei (x, y, a, b, theta[, ring]) in µm, pixel x centred at x·mpp µm; ring=True: a pale centre."""
    n = int(round(side_um / mpp))
    yy, xx = np.mgrid[0:n, 0:n] * mpp
    h = np.zeros((n, n))
    for x, y, a, b, th, *ring in nuclei:
        u = (xx - x) * np.cos(th) + (yy - y) * np.sin(th)
        v = -(xx - x) * np.sin(th) + (yy - y) * np.cos(th)
        q = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        inner = 0.35 if ring and ring[0] else 1.0
        h = np.maximum(h, np.where(q < 1, np.where(q < 0.7, inner, 1.0), 0.0))
    e = np.full((n, n), 0.35)
    if tissue is not None:
        x0, y0, x1, y1 = tissue
        e *= (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
    od = h[..., None] * HAEM * 0.9 + e[..., None] * EOSIN
    noise = np.random.default_rng(seed).normal(0, 2.0, od.shape)
    return np.clip(255 * np.exp(-od) + noise, 0, 255).astype(np.uint8)


def _match(df: pd.DataFrame, centres: np.ndarray, mpp: float, tol_um: float = 1.0) -> None:
    """Exactly one detection within ``tol_um`` of every centre (µm) and no other detection."""
    got = df[["x", "y"]].to_numpy() * mpp
    assert len(got) == len(centres), (len(got), len(centres))
    d, i = cKDTree(got).query(centres)
    assert (d < tol_um).all(), d
    assert len(set(i.tolist())) == len(centres)


def test_haematoxylin_is_rgb2hed() -> None:
    from skimage.color import rgb2hed

    rgb = np.random.default_rng(1).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    np.testing.assert_allclose(haematoxylin_od(rgb), np.maximum(rgb2hed(rgb)[..., 0], 0), atol=1e-5)


SHAPES = [
    (12.0, 12.0, 3.0, 3.0, 0.0),  # lymphocyte
    (30.0, 12.0, 3.0, 2.8, 0.0), (36.6, 12.0, 3.0, 2.8, 0.0),  # two touching (6.6 µm apart)
    (14.0, 32.0, 7.0, 1.6, 0.6),  # spindle (fibroblast)
    (34.0, 34.0, 5.5, 4.5, 0.3, True),  # vesicular tumour nucleus: pale centre
]
SPECK = (45.0, 45.0, 0.7, 0.7, 0.0)  # below the smallest area


@pytest.mark.parametrize("mpp", [0.5, 0.25])
def test_shapes_at_20x_and_40x(mpp: float) -> None:
    """Each nucleus once (touching ones split, the spindle and the ring not), the speck dropped, at both scales;
    areas in µm² agree with the drawn ellipses."""
    df = detect_nuclei(_image(50, SHAPES + [SPECK], mpp), mpp)
    assert list(df.columns) == ["x", "y", "area_um2", "hematoxylin"]
    centres = np.array([s[:2] for s in SHAPES])
    _match(df, centres, mpp)
    order = cKDTree(df[["x", "y"]].to_numpy() * mpp).query(centres)[1]
    true_area = np.array([np.pi * s[2] * s[3] for s in SHAPES])
    np.testing.assert_allclose(df.area_um2.to_numpy()[order], true_area, rtol=0.3)
    h = df.hematoxylin.to_numpy()[order]
    assert (h > 0.03).all() and h[-1] < h[:-1].min()  # the pale-centred nucleus has the lowest mean OD


def _border_nuclei(rng: np.random.Generator, side: float, step: float) -> list[tuple]:
    """Nuclei on tile borders (x = k·step), corners and at random, none overlapping."""
    pts = [(step, 20.0), (20.0, step), (step, step), (2 * step, 2 * step + 0.3), (step - 0.2, 2 * step)]
    while len(pts) < 25:
        p = tuple(rng.uniform(6, side - 6, 2))
        if all(np.hypot(p[0] - q[0], p[1] - q[1]) > 9 for q in pts):
            pts.append(p)
    return [(x, y, 3.0, 2.5, float(rng.uniform(0, np.pi))) for x, y in pts]


@pytest.mark.parametrize("mpp", [0.5, 0.25])
def test_tiles_agree_with_whole_image(mpp: float) -> None:
    """Tiled detection with halos = detection of the whole image: nuclei straddling a tile border or corner are
    found once, none is lost (tiles of 32 µm, nuclei on the borders and at the 4-tile corners)."""
    nuclei = _border_nuclei(np.random.default_rng(3), 100.0, 32.0)
    img = _image(100, nuclei, mpp)
    tile_px, _ = tiling(mpp, int(round(32 / mpp)), 12.0)
    assert tile_px * mpp == 32.0

    def read(x: int, y: int, w: int, h: int) -> np.ndarray:
        return img[y:y + h, x:x + w]

    tiled = detect_tiled(read, (img.shape[1], img.shape[0]), mpp, tile_px=tile_px, halo_um=12.0)
    assert list(tiled.columns) == list(COLUMNS)
    whole = detect_nuclei(img, mpp).sort_values(["y", "x"]).reset_index(drop=True)
    _match(tiled, np.array([n[:2] for n in nuclei]), mpp)
    np.testing.assert_allclose(tiled[["x", "y", "area_um2"]].to_numpy(), whole[["x", "y", "area_um2"]].to_numpy(),
                               atol=1e-6)
    np.testing.assert_allclose(tiled.x_um, tiled.x * mpp)


def test_tiles_on_tissue() -> None:
    mask = np.zeros((10, 10), bool)
    mask[4, 6] = True  # level-0 [24, 28) x [16, 20) at downsample 4
    tiles = [(x, y) for y in (0, 16, 32) for x in (0, 16, 32)]
    assert tiles_on_tissue(tiles, 16, mask, 4.0) == [(16, 16)]
    assert tiles_on_tissue(tiles, 16, mask, 4.0, margin_px=3) == [(16, 0), (16, 16)]  # reaches row 4, not col 7


def _write_slide(path: Path, mpp: float) -> list[tuple]:
    """A 320 µm slide: glass with a 120 µm square of tissue holding nuclei; returns the nuclei."""
    from sample_data.writers import write_aperio_tiff

    rng = np.random.default_rng(5)
    pts: list[tuple] = []
    while len(pts) < 40:
        p = tuple(rng.uniform(106, 214, 2))
        if all(np.hypot(p[0] - q[0], p[1] - q[1]) > 9 for q in pts):
            pts.append(p)
    nuclei = [(x, y, 3.0, 2.6, 0.0) for x, y in pts]
    write_aperio_tiff(path, _image(320, nuclei, mpp, tissue=(100, 100, 220, 220)), mpp, tile=128)
    return nuclei


def test_detect_slide(tmp_path: Path) -> None:
    """A slide through OpenSlide: every nucleus once, only tiles on tissue read, µm columns from the metadata."""
    mpp = 0.5
    nuclei = _write_slide(tmp_path / "s.tif", mpp)
    df = detect_slide(tmp_path / "s.tif", tile_px=128, halo_um=12, progress=False)
    assert list(df.columns) == list(COLUMNS)
    _match(df, np.array([n[:2] for n in nuclei]), mpp)
    assert df.attrs["mpp"] == mpp and 0 < df.attrs["tiles"] < 25
    assert 0.012 < df.attrs["tissue_mm2"] < 0.017  # 120 µm square = 0.0144 mm²
    allt = detect_slide(tmp_path / "s.tif", tile_px=128, halo_um=12, tissue_mask=False, progress=False)
    assert allt.attrs["tiles"] == 25
    pd.testing.assert_frame_equal(df, allt)


@pytest.mark.slow
def test_detect_slide_workers(tmp_path: Path) -> None:
    """Two worker processes give the same table as one."""
    _write_slide(tmp_path / "s.tif", 0.5)
    one = detect_slide(tmp_path / "s.tif", tile_px=128, progress=False)
    two = detect_slide(tmp_path / "s.tif", tile_px=128, workers=2, progress=False)
    pd.testing.assert_frame_equal(one, two)
