"""Accumulation of CODEX pixels into patch means: the CODEX is decoded once, in tile-aligned regions (threads over
regions); all the patches a region touches are accumulated at once (run-length sums along image rows,
``np.add.reduceat``).

No-data regions: stitched CODEX images have zero-filled areas (irregular ROIs, missing tiles), 0 in every
channel. A pixel is *zero area* when it lies in an all-zero area that holds a ``nodata_px`` square (see
:class:`ZeroAreas`); :class:`QuantResult` reports the zero-area fraction of every patch. Background-subtracted
glass is all-zero too, so the stage (:func:`preprocess.quantify.stage.quantify_slide`) counts as missing data only
the zero area beyond the patch's glass (1 - its stage-01 tissue fraction) and lowers the coverage by it.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from preprocess.pyramid import nominal_downsample
from preprocess.quantify.geometry import CodexToHE, PatchLookup, as_map, patch_coverage, regions_touched
from preprocess.quantify.readers import TiledRegionReader, ZarrRegionReader
from preprocess.slide_io import CodexImage

log = logging.getLogger(__name__)


def _sum_dtype(dtype: np.dtype, row_len: int) -> type:
    """Accumulator of run sums; runs never exceed one row, so uint32 holds a row of uint16 up to 65537 px."""
    dtype = np.dtype(dtype)
    if dtype.kind == "u" and dtype.itemsize <= 2 and row_len <= 65536:
        return np.uint32
    if dtype.kind in "iub":
        return np.int64
    return np.float64


class ZeroAreas:
    """Where a CODEX image is all-zero over areas that hold a ``nodata_px`` square (level-0 px), computed once per
    image at a pyramid level ~1/8 of that size (zero fill stays exactly 0 when area-averaged; at least
    ``min_px`` coarse px a side): a morphological opening of "every channel is 0". ``crop`` gives it for a
    level-0 region (nearest coarse pixel)."""

    def __init__(self, codex: CodexImage, channels: list[int], nodata_px: int):
        import cv2

        ds_all = [nominal_downsample(d) for d in codex.level_downsamples]
        self.level = max((i for i, d in enumerate(ds_all) if d == int(d) and d <= max(1, nodata_px // 8)),
                         default=0)
        self.ds = int(ds_all[self.level])
        arr = codex.level(self.level)
        anyc = np.zeros(arr.shape[1:], bool)
        for c in channels:
            anyc |= np.asarray(arr[c]) > 0
        k = 2 * (max(1, int(round(nodata_px / self.ds))) // 2) + 1  # odd: cv2's opening is centred only then
        self.mask = cv2.morphologyEx((~anyc).astype(np.uint8), cv2.MORPH_OPEN, np.ones((k, k), np.uint8)) > 0

    def crop(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """(h, w) bool of level-0 pixels [y0:y0+h, x0:x0+w] in zero areas."""
        hl, wl = self.mask.shape
        rows = np.minimum((y0 + np.arange(h)) // self.ds, hl - 1)
        cols = np.minimum((x0 + np.arange(w)) // self.ds, wl - 1)
        return self.mask[np.ix_(rows, cols)]


def accumulate_region(data: np.ndarray, x0: int, y0: int, mapping: np.ndarray | CodexToHE,
                      lookup: PatchLookup, zero: np.ndarray | None = None):
    """Per-patch sums of one CODEX region.

    Args:
        data: (C, h, w) CODEX level-0 pixels whose top-left pixel is (x0, y0).
        mapping: 3x3 CODEX level-0 px -> H&E level-0 px affine, or a :class:`CodexToHE` (with a field).
        lookup: the patches (H&E level-0).
        zero: (h, w) bool, pixels in zero areas (:class:`ZeroAreas`), or None.

    Returns:
        (patch indices (k,), sums (k, C) float64, pixel counts (k,) int64, counts of pixels outside zero areas
        (k,) int64) for the patches with >= 1 pixel here.
    """
    c, h, w = data.shape
    empty = np.zeros(0, np.int64), np.zeros((0, c)), np.zeros(0, np.int64), np.zeros(0, np.int64)
    if h == 0 or w == 0 or lookup.n == 0:
        return empty
    u = np.arange(x0, x0 + w, dtype=np.float64)
    v = np.arange(y0, y0 + h, dtype=np.float64)
    flat_data = data.reshape(c, h * w)
    has = (~zero).ravel().astype(np.uint32) if zero is not None else None
    sum_dtype = _sum_dtype(data.dtype, w)
    out_idx, out_sum, out_cnt, out_dat = [], [], [], []
    for lab in lookup.labels(u, v, mapping):
        flat = lab.ravel()
        if flat.max() < 0:
            continue
        start = np.empty(flat.size, bool)
        start[0] = True
        np.not_equal(flat[1:], flat[:-1], out=start[1:])
        start[::w] = True  # runs never cross a row (bounded sums, see _sum_dtype)
        starts = np.flatnonzero(start)
        run_lab = flat[starts]
        keep = run_lab >= 0
        run_len = np.diff(np.append(starts, flat.size))[keep]
        uniq, inv = np.unique(run_lab[keep], return_inverse=True)
        sums = np.empty((len(uniq), c), np.float64)
        for ch in range(c):  # 1-D reduceat per channel is ~2x faster than one 2-D call
            run_sum = np.add.reduceat(flat_data[ch], starts, dtype=sum_dtype)[keep]
            sums[:, ch] = np.bincount(inv, weights=run_sum, minlength=len(uniq))
        cnt = np.bincount(inv, weights=run_len, minlength=len(uniq)).astype(np.int64)
        if has is not None:
            run_dat = np.add.reduceat(has, starts)[keep]
            dat = np.bincount(inv, weights=run_dat, minlength=len(uniq)).astype(np.int64)
        else:
            dat = cnt
        out_idx.append(uniq)
        out_sum.append(sums)
        out_cnt.append(cnt)
        out_dat.append(dat)
    if not out_idx:
        return empty
    return np.concatenate(out_idx), np.concatenate(out_sum), np.concatenate(out_cnt), np.concatenate(out_dat)


@dataclass
class QuantResult:
    """Per-patch results of one slide: ``means`` (N, C) float64 over the CODEX pixels in the patch (NaN where
    none), ``counts`` (N,) those pixels, ``coverage`` (N,) fraction of the patch area covered by the mapped CODEX
    image, ``zero_fraction`` (N,) fraction of the patch's pixels in all-zero areas (0 without ``nodata_px``)."""

    means: np.ndarray
    counts: np.ndarray
    coverage: np.ndarray
    zero_fraction: np.ndarray | None = None


def quantify_patches(codex: CodexImage, channels: list[int], coords: np.ndarray, size: int,
                     affine: np.ndarray | CodexToHE, region_px: int = 1024, threads: int = 1,
                     desc: str | None = None, nodata_px: int = 0,
                     zero_areas: ZeroAreas | None = None) -> QuantResult:
    """Mean of each of ``channels`` over the CODEX pixels inside every patch (see the module docstring).

    Args:
        codex: the CODEX image (its level 0 is read).
        channels: channel indices, in output column order.
        coords: (N, 2) H&E level-0 top-left (x, y) of the patches; ``size``: their side in H&E level-0 px.
        affine: 3x3 CODEX level-0 px -> H&E level-0 px, or a :class:`CodexToHE` (affine + displacement field).
        region_px: approximate side of the decoded regions (rounded to whole tiles), CODEX px.
        threads: regions decoded and accumulated in parallel (results are added in region order, so the
            output does not depend on ``threads``).
        nodata_px: smallest all-zero square (CODEX px) of the zero-area test; 0 = no test.
        zero_areas: the image's :class:`ZeroAreas` made once by the caller (several calls on one image: the dense
            labels' batches of cells); None: made here from ``nodata_px``.
    """
    mapping = as_map(affine)
    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    n, nc = len(coords), len(channels)
    w, h = codex.dimensions
    lookup = PatchLookup(coords, size)
    coverage = patch_coverage(coords, size, mapping, (w, h))
    if zero_areas is None and nodata_px > 0:
        zero_areas = ZeroAreas(codex, channels, nodata_px)
    try:
        reader: TiledRegionReader | ZarrRegionReader = TiledRegionReader(codex.path, channels, codex.shape)
    except Exception as e:  # noqa: BLE001 - any layout the direct reader does not handle goes through zarr
        log.info("%s: direct tile reads unavailable (%s); reading through zarr", codex.path, e)
        reader = ZarrRegionReader(codex, channels)
    tl, tw = reader.tile  # regions are whole tiles, about region_px^2 in area (strips: full rows)
    step_x = max(1, round(region_px / tw)) * tw
    step_y = max(1, round(region_px * region_px / step_x / tl)) * tl
    regions = regions_touched(coords, size, mapping, (w, h), (step_x, step_y))
    sums = np.zeros((n, nc), np.float64)
    counts = np.zeros(n, np.int64)
    data_counts = np.zeros(n, np.int64)

    def job(r: tuple[int, int]):
        x0, y0 = r[0] * step_x, r[1] * step_y
        data = reader.read(x0, y0, min(w, x0 + step_x), min(h, y0 + step_y))
        zero = zero_areas.crop(x0, y0, data.shape[2], data.shape[1]) if zero_areas is not None else None
        return accumulate_region(data, x0, y0, mapping, lookup, zero)

    try:
        with tqdm(total=len(regions), desc=desc, unit="region", leave=False,
                  **({} if desc else {"disable": True})) as bar:
            pool = ThreadPoolExecutor(max_workers=threads) if threads > 1 else None
            try:
                results = pool.map(job, regions) if pool is not None else map(job, regions)
                for idx, s, cnt, dat in results:
                    sums[idx] += s  # indices are unique within one region's result
                    counts[idx] += cnt
                    data_counts[idx] += dat
                    bar.update()
            finally:
                if pool is not None:
                    pool.shutdown(cancel_futures=True)
    finally:
        reader.close()
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], np.nan)
        zero = np.where(counts > 0, 1.0 - data_counts / np.maximum(counts, 1), 0.0)
    return QuantResult(means=means, counts=counts, coverage=coverage, zero_fraction=zero)
