"""Nucleus detection on H&E: colour deconvolution, a haematoxylin threshold and a seeded watershed, tiled over a
whole slide with halos so that no nucleus is cut or counted twice.

    from spatial.nuclei import detect_nuclei, detect_slide
    cells = detect_slide("he/slide_000.tif", workers=2)    # x, y (level-0 px), x_um, y_um, area_um2, hematoxylin

One image (:func:`detect_nuclei`):

1. haematoxylin optical density from ``skimage.color.rgb2hed`` (Ruifrok-Johnston vectors), Gaussian-smoothed
   (``smooth_um``);
2. foreground = haematoxylin > ``threshold_od`` (a fixed OD: per-tile Otsu drifts with what a tile holds, a tile
   of stroma and one of lymphocytes would get different cut-offs; on the synthetic cohort F1 is flat at 0.997-0.998
   for 0.03-0.04 and falls to 0.976 at 0.05 as pale macrophage nuclei are lost), small specks opened away, holes
   up to ``max_hole_um2`` filled (vesicular nuclei have pale centres);
3. seeds = maxima of the distance transform (µm, smoothed by ``seed_smooth_um``) within ``min_distance_um``;
   watershed of the negated (smoothed) distance within the foreground;
4. objects outside [``min_area_um2``, ``max_area_um2``] are dropped; each object gives its centroid, area and
   mean haematoxylin OD.

Every length is in µm, so 20x (0.5 µm/px) and 40x (0.25 µm/px) behave the same.

A slide (:func:`detect_slide`): level 0 is cut into ``tile_px`` squares (cores); each tile is read with a halo of
``halo_um`` on every side, and a nucleus is kept only by the tile whose core contains its centroid, so a nucleus
on a border is segmented whole (the halo is wider than any nucleus) and counted once. Only tiles touching the
tissue mask of the thumbnail (:func:`preprocess.tissue.grid_tissue_mask`) are read.

Coordinates: pixel (x, y) = (column, row) and integer coordinates are pixel centres (docs/FORMATS.md); ``x_um =
x * mpp`` (µm from the centre of level-0 pixel (0, 0)).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

COLUMNS = ("x", "y", "x_um", "y_um", "area_um2", "hematoxylin")
"""Columns of a slide's cell table (level-0 px, µm, µm², mean haematoxylin OD)."""


@dataclass(frozen=True)
class NucleusParams:
    """Settings of :func:`detect_nuclei` (lengths in µm, areas in µm², OD of ``rgb2hed``'s haematoxylin channel).

    Attributes:
        smooth_um: sigma of the Gaussian applied to the haematoxylin image.
        threshold_od: haematoxylin OD above which a pixel is nuclear (after smoothing).
        open_um: radius of the opening that removes specks and thin bridges (0 = none).
        min_distance_um: smallest distance between two seeds.
        seed_smooth_um: sigma of the Gaussian applied to the distance transform before its maxima are taken
            (larger: fewer splits of elongated or lobed nuclei, more merges of touching ones).
        min_seed_um: a seed's (smoothed) distance to the background must reach this.
        min_area_um2, max_area_um2: plausible nucleus areas; objects outside are dropped.
        max_hole_um2: holes in the foreground up to this area are filled (pale centres of vesicular nuclei).
        work_mpp: finer images are first area-averaged by the integer factor round(work_mpp / mpp) when it is
            >= 2 (40x is processed at 20x, 4 times faster; the centroids are mapped back); None = native.
    """

    smooth_um: float = 0.5
    threshold_od: float = 0.035
    open_um: float = 0.5
    min_distance_um: float = 2.5
    seed_smooth_um: float = 1.0
    min_seed_um: float = 0.5
    min_area_um2: float = 6.0
    max_area_um2: float = 220.0
    max_hole_um2: float = 40.0
    work_mpp: float | None = 0.5

    def to_dict(self) -> dict:
        return asdict(self)


def haematoxylin_od(rgb: np.ndarray) -> np.ndarray:
    """Haematoxylin channel of ``skimage.color.rgb2hed`` for an RGB image (H, W, 3) uint8 -> float32 (H, W), >= 0.

    Computed with one 256-entry table per channel (the deconvolution is linear in the per-channel log), the same
    numbers as rgb2hed at a fraction of its time.
    """
    from skimage.color import hed_from_rgb

    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB, got {rgb.dtype}")
    v = np.maximum(np.arange(256) / 255.0, 1e-6)
    lut = (np.log(v) / np.log(1e-6))[:, None] * hed_from_rgb[None, :, 0]  # (256, 3)
    lut = lut.astype(np.float32)
    h = lut[rgb[..., 0], 0] + lut[rgb[..., 1], 1] + lut[rgb[..., 2], 2]
    return np.maximum(h, 0.0, out=h)


def _fill_holes(fg: np.ndarray, max_px: int) -> np.ndarray:
    """``fg`` (bool) with its holes (background not connected to the image border) of at most ``max_px`` filled."""
    import cv2

    bg = np.pad(~fg, 1, constant_values=True).astype(np.uint8)
    n, lab = cv2.connectedComponents(bg, connectivity=4)
    if n <= 2:
        return fg
    size = np.bincount(lab.ravel(), minlength=n)
    fill = size <= max_px
    fill[0] = False
    fill[lab[0, 0]] = False  # the outside
    return fg | fill[lab[1:-1, 1:-1]]


def _empty(extra: tuple[str, ...] = ()) -> pd.DataFrame:
    return pd.DataFrame({c: np.zeros(0, np.float64) for c in ("x", "y", *extra, "area_um2", "hematoxylin")})


def detect_nuclei(rgb: np.ndarray, mpp: float, params: NucleusParams = NucleusParams()) -> pd.DataFrame:
    """Nuclei of one RGB image.

    Args:
        rgb: (H, W, 3) uint8 H&E.
        mpp: µm per pixel of ``rgb``.
        params: see :class:`NucleusParams`.

    Returns:
        One row per nucleus: ``x``, ``y`` (centroid, px of ``rgb``, float64), ``area_um2``, ``hematoxylin`` (mean
        OD over the nucleus).
    """
    import cv2
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed

    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {rgb.shape}")
    if not mpp > 0:
        raise ValueError(f"mpp must be > 0, got {mpp}")
    f = work_factor(mpp, params)
    if f >= 2:  # pixel j of the reduced image averages input pixels [j f, (j + 1) f): centre j f + (f - 1) / 2
        h0, w0 = rgb.shape[:2]
        small = cv2.resize(np.ascontiguousarray(rgb[:h0 - h0 % f or None, :w0 - w0 % f or None, :3]),
                           (w0 // f, h0 // f), interpolation=cv2.INTER_AREA)
        if min(small.shape[:2]) == 0:
            return _empty()
        df = detect_nuclei(small, mpp * f, replace(params, work_mpp=None))
        df["x"] = df["x"] * f + (f - 1) / 2
        df["y"] = df["y"] * f + (f - 1) / 2
        return df
    hem = haematoxylin_od(rgb)
    sm = cv2.GaussianBlur(hem, (0, 0), params.smooth_um / mpp) if params.smooth_um > 0 else hem
    fg = sm > params.threshold_od
    r = int(round(params.open_um / mpp))
    if r >= 1:
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        fg = cv2.morphologyEx(fg.astype(np.uint8), cv2.MORPH_OPEN, k).astype(bool)
    fg = _fill_holes(fg, int(params.max_hole_um2 / (mpp * mpp)))
    if not fg.any():
        return _empty()
    dist = cv2.distanceTransform(fg.astype(np.uint8), cv2.DIST_L2, 5) * np.float32(mpp)  # µm
    if params.seed_smooth_um > 0:  # one maximum per convex blob (a spindle's flat ridge peaks at its middle)
        dist = cv2.GaussianBlur(dist, (0, 0), params.seed_smooth_um / mpp)
    md = max(1, int(round(params.min_distance_um / mpp)))
    fp = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * md + 1, 2 * md + 1))
    peak = (dist >= cv2.dilate(dist, fp)) & fg & (dist >= params.min_seed_um)
    comp, ncomp = ndi.label(fg)
    markers, nseed = ndi.label(peak)  # a plateau is one seed
    # components without a seed (small or flat) are seeded whole
    seeded = np.zeros(ncomp + 1, bool)
    seeded[comp[markers > 0]] = True
    seeded[0] = True
    lut = np.zeros(ncomp + 1, np.int32)
    lut[~seeded] = nseed + 1 + np.arange(int((~seeded).sum()), dtype=np.int32)
    markers = np.where(markers > 0, markers, lut[comp])
    lab = watershed(-dist, markers, mask=fg)
    n = int(lab.max())
    if n == 0:
        return _empty()
    flat = lab.ravel()
    npx = np.bincount(flat, minlength=n + 1)[1:].astype(np.float64)
    yy, xx = np.indices(lab.shape, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = np.bincount(flat, xx.ravel(), n + 1)[1:] / npx
        cy = np.bincount(flat, yy.ravel(), n + 1)[1:] / npx
        mean_h = np.bincount(flat, hem.ravel(), n + 1)[1:] / npx
    area = npx * mpp * mpp
    keep = (area >= params.min_area_um2) & (area <= params.max_area_um2)
    return pd.DataFrame({"x": cx[keep], "y": cy[keep], "area_um2": area[keep], "hematoxylin": mean_h[keep]})


# ---------------------------------------------------------------------------------------------------------------
# tiling


def tile_grid(width: int, height: int, tile_px: int) -> list[tuple[int, int]]:
    """Top-left level-0 (x, y) of the core tiles covering a ``width`` x ``height`` image, row-major."""
    return [(x, y) for y in range(0, height, tile_px) for x in range(0, width, tile_px)]


def tiles_on_tissue(tiles: list[tuple[int, int]], tile_px: int, mask: np.ndarray, downsample: float,
                    margin_px: float = 0.0) -> list[tuple[int, int]]:
    """The tiles whose square (grown by ``margin_px`` level-0 px) touches a True pixel of ``mask`` (thumbnail
    pixel j covers level-0 [j·downsample, (j+1)·downsample))."""
    h, w = mask.shape
    out = []
    for x, y in tiles:
        j0 = max(0, int(math.floor((x - margin_px) / downsample)))
        j1 = min(w, int(math.ceil((x + tile_px + margin_px) / downsample)))
        i0 = max(0, int(math.floor((y - margin_px) / downsample)))
        i1 = min(h, int(math.ceil((y + tile_px + margin_px) / downsample)))
        if j0 < j1 and i0 < i1 and mask[i0:i1, j0:j1].any():
            out.append((x, y))
    return out


def work_factor(mpp: float, params: NucleusParams = NucleusParams()) -> int:
    """The integer factor by which :func:`detect_nuclei` reduces an image of ``mpp`` µm/px (1 = native)."""
    return max(1, int(round(params.work_mpp / mpp))) if params.work_mpp else 1


def tiling(mpp: float, tile_px: int, halo_um: float, params: NucleusParams = NucleusParams()) -> tuple[int, int]:
    """(tile_px, halo_px) in level-0 px, both rounded up to a multiple of :func:`work_factor`, so that a tile's
    reduced pixels line up with those of the whole image (tiled and untiled detection agree)."""
    f = work_factor(mpp, params)
    return f * int(math.ceil(tile_px / f)), f * int(math.ceil(halo_um / mpp / f))


def detect_tile(read: Callable[[int, int, int, int], np.ndarray], size: tuple[int, int], xy: tuple[int, int],
                tile_px: int, halo_px: int, mpp: float, params: NucleusParams) -> pd.DataFrame:
    """Nuclei whose centroid lies in the core tile at ``xy`` (level-0 px, columns x, y, area_um2, hematoxylin).

    ``read(x, y, w, h)`` returns the level-0 RGB region with top-left (x, y); ``size`` is the image (width, height).
    The region read is the core grown by ``halo_px`` on every side, clipped to the image.
    """
    w0, h0 = size
    x, y = xy
    rx0, ry0 = max(0, x - halo_px), max(0, y - halo_px)
    rx1, ry1 = min(w0, x + tile_px + halo_px), min(h0, y + tile_px + halo_px)
    df = detect_nuclei(read(rx0, ry0, rx1 - rx0, ry1 - ry0), mpp, params)
    df["x"] += rx0
    df["y"] += ry0
    # core: [x - 0.5, x + tile - 0.5) in pixel-centre coordinates (pixel x covers [x - 0.5, x + 0.5))
    inside = (df.x >= x - 0.5) & (df.x < x + tile_px - 0.5) & (df.y >= y - 0.5) & (df.y < y + tile_px - 0.5)
    return df[inside.to_numpy()].reset_index(drop=True)


def detect_tiled(read: Callable[[int, int, int, int], np.ndarray], size: tuple[int, int], mpp: float,
                 tiles: list[tuple[int, int]] | None = None, tile_px: int = 1024, halo_um: float = 24.0,
                 params: NucleusParams = NucleusParams(), progress: bool = False) -> pd.DataFrame:
    """Run :func:`detect_tile` over ``tiles`` (default: all of the image; top-left corners on the grid of
    :func:`tiling`'s tile side) in this process; the level-0 table with columns :data:`COLUMNS`, sorted by (y, x)."""
    tile_px, halo_px = tiling(mpp, tile_px, halo_um, params)
    tiles = tile_grid(*size, tile_px) if tiles is None else tiles
    parts = [detect_tile(read, size, t, tile_px, halo_px, mpp, params) for t in _bar(tiles, progress)]
    return _finish(parts, mpp)


def _bar(items: Iterable, progress: bool, total: int | None = None) -> Iterator:
    """``items`` behind a tqdm bar over tiles (none when ``progress`` is False)."""
    from tqdm import tqdm

    return iter(tqdm(items, total=total, desc="nuclei", unit="tile", disable=not progress))


def _finish(parts: list[pd.DataFrame], mpp: float) -> pd.DataFrame:
    parts = [p for p in parts if len(p)]
    df = pd.concat(parts, ignore_index=True) if parts else _empty()
    df["x_um"] = df["x"] * mpp
    df["y_um"] = df["y"] * mpp
    return df[list(COLUMNS)].sort_values(["y", "x"], kind="stable").reset_index(drop=True)


# worker state: one open slide per process
_SLIDE = None


def _init_worker(path: str, mpp: float) -> None:
    global _SLIDE
    import cv2

    from preprocess.slide_io import HESlide

    cv2.setNumThreads(1)
    _SLIDE = HESlide(path, mpp=mpp)


def _read_worker(x: int, y: int, w: int, h: int) -> np.ndarray:
    return _SLIDE.read_region(x, y, 0, (w, h))


def _worker_tile(args: tuple) -> pd.DataFrame:
    size, xy, tile_px, halo_px, mpp, params = args
    return detect_tile(_read_worker, size, xy, tile_px, halo_px, mpp, params)


def slide_tissue_mask(slide, thumb_max: int = 2048) -> tuple[np.ndarray, float]:
    """Tissue mask of an open :class:`preprocess.slide_io.HESlide` on its thumbnail: (mask (h, w) bool, level-0 px
    per mask px)."""
    from preprocess.tissue import grid_tissue_mask

    thumb, ds = slide.thumbnail(thumb_max)
    mask, _ = grid_tissue_mask(thumb, slide.mpp * ds)
    return mask, ds


def detect_slide(he_path: str | os.PathLike, mpp: float | None = None, tile_px: int = 1024, halo_um: float = 24.0,
                 tissue_mask: bool | tuple[np.ndarray, float] = True, params: NucleusParams = NucleusParams(),
                 workers: int = 1, progress: bool = True) -> pd.DataFrame:
    """Nuclei of a whole H&E slide, tiled over level 0.

    Args:
        he_path: any slide :class:`preprocess.slide_io.HESlide` opens.
        mpp: level-0 µm/px; None = the slide's metadata.
        tile_px: side of the core tiles (level-0 px; rounded up to a multiple of :func:`work_factor`).
        halo_um: context read around each core (µm); must exceed the largest nucleus diameter.
        tissue_mask: True = only tiles touching the thumbnail's tissue mask; False = every tile; or a
            ``(mask (h, w) bool, level-0 px per mask px)`` of your own.
        params: :class:`NucleusParams`.
        workers: processes (each opens the slide once).
        progress: a tqdm bar over tiles.

    Returns:
        One row per nucleus, columns :data:`COLUMNS` (x, y level-0 px; x_um, y_um = x, y x mpp; area_um2;
        hematoxylin), sorted by (y, x). ``attrs``: ``mpp``, ``tiles`` (read), ``tissue_mm2`` (mask area, NaN
        without a mask), ``seconds``, ``params``.
    """
    from preprocess.slide_io import HESlide

    if tile_px < 64 or halo_um < 0:
        raise PipelineError(f"tile_px must be >= 64 and halo_um >= 0 (got {tile_px}, {halo_um})")
    t0 = time.perf_counter()
    with HESlide(he_path, mpp=mpp) as slide:
        mpp = slide.mpp
        size = tuple(int(v) for v in slide.dimensions)
        tile_px, halo_px = tiling(mpp, tile_px, halo_um, params)
        tiles = tile_grid(*size, tile_px)
        tissue_mm2 = float("nan")
        if tissue_mask is not False:
            mask, ds = slide_tissue_mask(slide) if tissue_mask is True else tissue_mask
            mask = np.asarray(mask, bool)
            tissue_mm2 = float(mask.sum()) * (ds * mpp) ** 2 / 1e6
            tiles = tiles_on_tissue(tiles, tile_px, mask, float(ds), margin_px=halo_px)
        log.info("%s: %d tiles of %d px (halo %d px) at %.3f µm/px", he_path, len(tiles), tile_px, halo_px, mpp)
        if workers <= 1 or len(tiles) <= 1:
            def read(x: int, y: int, w: int, h: int) -> np.ndarray:
                return slide.read_region(x, y, 0, (w, h))

            parts = [detect_tile(read, size, t, tile_px, halo_px, mpp, params) for t in _bar(tiles, progress)]
    if workers > 1 and len(tiles) > 1:
        import multiprocessing as mp

        jobs = [(size, t, tile_px, halo_px, mpp, params) for t in tiles]
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("forkserver"),
                                 initializer=_init_worker, initargs=(str(he_path), mpp)) as ex:
            parts = list(_bar(ex.map(_worker_tile, jobs), progress, len(jobs)))
    df = _finish(parts, mpp)
    df.attrs.update(mpp=mpp, tiles=len(tiles), tissue_mm2=tissue_mm2, seconds=time.perf_counter() - t0,
                    params=params.to_dict())
    return df

