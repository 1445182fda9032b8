"""Stage 03: mean intensity of every CODEX marker under every H&E patch, then cohort normalisation to [0, 1].

    python -m preprocess.quantify --cohort sample_cohort --out outputs --workers 2
    python -m preprocess.quantify --pairs pairs.csv --panel marker_panel.csv --out outputs --legacy-columns
    python -m preprocess.quantify --cohort test_cohort --out out_test \
        --normalization outputs/markers/normalization.json        # apply a training cohort's percentiles

Inputs (paths relative to ``--out`` unless given): ``patches/{slide}.h5`` (stage 01), ``registration/{slide}.json``
(stage 02: ``affine_codex_to_he`` maps CODEX level-0 pixel (x, y, 1) to H&E level-0 pixel coordinates; a record
with ``status: flagged`` is refused unless ``--allow-flagged``), ``pairs.csv`` (he_slide,codex_image) and the
marker panel (channel,marker: the markers, in panel order, and their 0-based channel in the CODEX file).

Two passes:
1. per slide, raw means -> ``markers/raw/{slide}.csv``: ``slide,index,x,y,coverage,n_codex_px,<markers>`` for every
   grid patch (``index`` = row in ``patches/{slide}.h5``; x, y = level-0 top-left). The mean of a marker is the
   average of the CODEX level-0 pixels whose centres, mapped through the affine, fall inside the patch
   (pixel centres at integer coordinates; a patch with top-left x and side s holds [x - 0.5, x + s - 0.5)).
   ``coverage`` is the exact fraction of the patch's area covered by the mapped CODEX image (polygon clipping).
   Cached: a slide whose raw file exists (and is newer than its grid and registration record) is skipped
   unless ``--overwrite``.
2. cohort normalisation over every slide of the pairing table that has a raw file, using only patches with
   coverage >= ``--min-coverage`` (default 0.95): per marker, value = clip((raw - P_low) / (P_high - P_low), 0, 1)
   with P_low / P_high the ``--low-pct`` / ``--high-pct`` percentiles (default 1 and 99) of the raw patch means
   over the cohort. Writes ``markers/{slide}.csv`` (``slide,index,x,y,<markers>``; patches below the coverage
   threshold are left out; ``--legacy-columns`` adds ``mean_intensity_channel{1..K}`` copies, K in panel order)
   and ``markers/normalization.json`` (markers, percentiles, values). With ``--normalization FILE`` the
   percentile values of an earlier run are applied instead (e.g. a test cohort normalised like the training one).

The CODEX is decoded once, in tile-aligned regions of about ``--region-px`` px (threads over regions); all the
patches a region touches are accumulated at once (run-length sums along image rows, np.add.reduceat).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from preprocess.patch import add_common_args, read_grid
from preprocess.slide_io import CodexImage, read_marker_panel, read_pairs, resolve_channels
from preprocess.utils import (
    PipelineError,
    atomic_path,
    default_threads,
    run_slides,
    save_config,
    select_slides,
    setup_logging,
    write_json,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
RAW_META_COLUMNS = ["slide", "index", "x", "y", "coverage", "n_codex_px"]


# ----------------------------------------------------------------------------------------------------------------
# registration record


def load_affine(path: str | os.PathLike, allow_flagged: bool = False) -> np.ndarray:
    """The 3x3 CODEX->H&E level-0 affine of a registration record; refuses ``status: flagged`` unless allowed."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"registration record not found: {path}; run `python -m preprocess.register` first")
    try:
        rec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PipelineError(f"registration record {path} is not valid JSON ({e})") from e
    status = rec.get("status", "ok")
    if status != "ok" and not allow_flagged:
        raise PipelineError(f"registration in {path} has status {status!r} ({rec.get('reason', 'no reason given')});"
                            " check its _qc.png, re-register, or pass --allow-flagged to use it anyway")
    try:
        a = np.asarray(rec["affine_codex_to_he"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as e:
        raise PipelineError(f"registration record {path} has no valid 'affine_codex_to_he' ({e})") from e
    if a.shape == (2, 3):
        a = np.vstack([a, [0.0, 0.0, 1.0]])
    if a.shape != (3, 3) or not np.all(np.isfinite(a)) or not np.allclose(a[2], [0, 0, 1]):
        raise PipelineError(f"registration record {path}: 'affine_codex_to_he' must be a finite 3x3 affine matrix")
    if abs(np.linalg.det(a[:2, :2])) < 1e-12:
        raise PipelineError(f"registration record {path}: 'affine_codex_to_he' is singular")
    return a


# ----------------------------------------------------------------------------------------------------------------
# patch geometry: which patch a mapped point falls in, and how much of each patch the CODEX covers


class PatchLookup:
    """Maps H&E level-0 points to patch indices for square patches of side ``size`` (level-0 px).

    Patches are grouped into lattices (patches whose top-left coordinates agree modulo ``size``); within a
    lattice they cannot overlap, so each lattice is a dense table cell -> patch index. A grid from stage 01 is one
    lattice; overlapping grids (stride < size) give several, and a point then counts for every patch holding it.
    """

    def __init__(self, coords: np.ndarray, size: int):
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        self.size = int(size)
        self.n = len(coords)
        self.lattices: list[tuple[float, float, np.ndarray]] = []  # (x edge origin, y edge origin, padded lut)
        if self.n == 0:
            return
        offsets = coords % self.size
        for off in np.unique(offsets, axis=0):
            idx = np.flatnonzero(np.all(offsets == off, axis=1))
            cell = (coords[idx] - off) // self.size
            c0 = cell.min(axis=0)
            cell -= c0
            ny, nx = int(cell[:, 1].max()) + 1, int(cell[:, 0].max()) + 1
            lut = np.full((ny + 2, nx + 2), -1, np.int64)  # a border of -1 so clipped indices need no mask
            if len(np.unique(cell, axis=0)) != len(cell):
                raise PipelineError("the patch grid has duplicate coordinates")
            lut[cell[:, 1] + 1, cell[:, 0] + 1] = idx
            origin = off + c0 * self.size - 0.5  # edge coordinate of the lattice's first cell
            self.lattices.append((float(origin[0]), float(origin[1]), lut))

    def labels(self, u: np.ndarray, v: np.ndarray, affine: np.ndarray):
        """Yield, per lattice, the patch index (h, w) int64 (-1 = none) of the CODEX pixel centres (u, v).

        Args:
            u: (w,) CODEX level-0 x of the pixel centres of a region; v: (h,) their y.
            affine: 3x3 CODEX level-0 px -> H&E level-0 px.
        """
        a = np.asarray(affine, np.float64)
        s = float(self.size)
        for ox, oy, lut in self.lattices:
            ny, nx = lut.shape[0] - 2, lut.shape[1] - 2
            # lattice cell coordinates of the mapped centres: floor((A @ (u, v, 1) - origin) / size)
            fx = (a[0, 0] / s * u)[None, :] + ((a[0, 1] * v + (a[0, 2] - ox)) / s)[:, None]
            fy = (a[1, 0] / s * u)[None, :] + ((a[1, 1] * v + (a[1, 2] - oy)) / s)[:, None]
            np.floor(fx, out=fx)
            np.floor(fy, out=fy)
            np.clip(fx, -1, nx, out=fx)
            np.clip(fy, -1, ny, out=fy)
            # flat index into the padded table: (cy + 1) * (nx + 2) + (cx + 1)
            fy *= nx + 2
            fy += fx
            fy += nx + 3
            yield np.take(lut.ravel(), fy.astype(np.int64))


def _polygon_area(p: np.ndarray) -> float:
    if len(p) < 3:
        return 0.0
    x, y = p[:, 0], p[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _clip_polygon(poly: list[tuple[float, float]], axis: int, bound: float, keep_below: bool):
    """Sutherland-Hodgman clip of a polygon against the half-plane coord[axis] <= bound (or >= bound)."""
    out = []
    n = len(poly)
    for i in range(n):
        cur, nxt = poly[i], poly[(i + 1) % n]
        cin = cur[axis] <= bound if keep_below else cur[axis] >= bound
        nin = nxt[axis] <= bound if keep_below else nxt[axis] >= bound
        if cin:
            out.append(cur)
        if cin != nin:
            t = (bound - cur[axis]) / (nxt[axis] - cur[axis])
            out.append((cur[0] + t * (nxt[0] - cur[0]), cur[1] + t * (nxt[1] - cur[1])))
    return out


def codex_coverage(coords: np.ndarray, size: int, affine: np.ndarray, codex_wh: tuple[int, int]) -> np.ndarray:
    """Fraction of each patch's area covered by the CODEX image mapped through ``affine`` (exact).

    Args:
        coords: (N, 2) level-0 top-left (x, y) of the H&E patches.
        size: patch side in H&E level-0 px.
        affine: 3x3 CODEX level-0 px -> H&E level-0 px.
        codex_wh: CODEX level-0 (width, height); the image covers [-0.5, w - 0.5] x [-0.5, h - 0.5].

    Returns:
        (N,) float64 in [0, 1].
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    w, h = codex_wh
    corners = np.array([[-0.5, -0.5, 1], [w - 0.5, -0.5, 1], [w - 0.5, h - 0.5, 1], [-0.5, h - 0.5, 1]])
    poly = (corners @ np.asarray(affine, np.float64).T)[:, :2]
    e0, e1 = poly[1] - poly[0], poly[2] - poly[1]
    if e0[0] * e1[1] - e0[1] * e1[0] < 0:  # orient so that "inside" is the non-negative side of every edge
        poly = poly[::-1]
    x0, y0 = coords[:, 0] - 0.5, coords[:, 1] - 0.5
    x1, y1 = x0 + size, y0 + size
    box = np.stack([np.stack([x0, y0], 1), np.stack([x1, y0], 1), np.stack([x1, y1], 1), np.stack([x0, y1], 1)], 1)
    # signed side of every box corner for every polygon edge: >= 0 inside
    side = np.empty((len(coords), 4, 4))
    for e in range(4):
        a, b = poly[e], poly[(e + 1) % 4]
        side[:, :, e] = (b[0] - a[0]) * (box[..., 1] - a[1]) - (b[1] - a[1]) * (box[..., 0] - a[0])
    inside = np.all(side >= 0, axis=(1, 2))
    outside = np.any(np.all(side <= 0, axis=1), axis=1)
    outside |= (x1 <= poly[:, 0].min()) | (x0 >= poly[:, 0].max()) | (y1 <= poly[:, 1].min()) | (y0 >= poly[:, 1].max())
    cov = np.where(inside, 1.0, 0.0)
    pl = [tuple(p) for p in poly]
    for i in np.flatnonzero(~inside & ~outside):
        p = _clip_polygon(pl, 0, x0[i], False)
        p = _clip_polygon(p, 0, x1[i], True) if p else p
        p = _clip_polygon(p, 1, y0[i], False) if p else p
        p = _clip_polygon(p, 1, y1[i], True) if p else p
        cov[i] = _polygon_area(np.asarray(p)) / float(size * size) if p else 0.0
    return np.clip(cov, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# region reads


class TiledRegionReader:
    """Reads (C, h, w) regions of level 0 of a tiled multi-page TIFF by decoding its tiles directly.

    One page per channel (OME-TIFF CYX); each tile is read with ``os.pread`` and decoded by tifffile's own
    decoder (imagecodecs releases the GIL), so several threads can read regions at once. ``read`` returns a view
    into a tile-aligned buffer. Raises ValueError at construction when the file does not have that layout
    (callers fall back to :meth:`CodexImage.read_region`).
    """

    def __init__(self, path: str | os.PathLike, channels: list[int], shape: tuple[int, int, int]):
        import tifffile

        self.path = str(path)
        self._tif = tifffile.TiffFile(self.path)
        try:
            series = self._tif.series[0]
            pages = list(series.levels[0].pages)
            c, h, w = shape
            if len(pages) != c:
                raise ValueError(f"{len(pages)} pages for {c} channels")
            key = pages[0].keyframe
            if not key.is_tiled or key.tiledepth != 1 or key.samplesperpixel != 1 or key.shape[-2:] != (h, w):
                raise ValueError("level 0 is not tiled one channel per page")
            self._pages = [pages[i] for i in channels]
            for p in self._pages:
                if p.keyframe.hash != key.hash:
                    raise ValueError("channels have different tiling or encoding")
            self._decode = key.decode  # built once here; thread-safe afterwards
            self._jpegtables = getattr(key, "jpegtables", None)
            self.tile = (int(key.tilelength), int(key.tilewidth))
            self._ntx = (w + self.tile[1] - 1) // self.tile[1]
            self._offsets = [np.asarray(p.dataoffsets) for p in self._pages]
            self._counts = [np.asarray(p.databytecounts) for p in self._pages]
            self.dtype = key.dtype
            self.shape = (len(channels), h, w)
        except Exception:
            self._tif.close()
            raise
        self._fd = os.open(self.path, os.O_RDONLY)

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Level-0 pixels [y0:y1, x0:x1] of the selected channels, (C, y1 - y0, x1 - x0)."""
        tl, tw = self.tile
        tx0, tx1 = x0 // tw, (x1 - 1) // tw + 1
        ty0, ty1 = y0 // tl, (y1 - 1) // tl + 1
        buf = np.zeros((len(self._pages), (ty1 - ty0) * tl, (tx1 - tx0) * tw), self.dtype)
        kw = {"jpegtables": self._jpegtables} if self._jpegtables is not None else {}
        for c in range(len(self._pages)):
            offs, cnts = self._offsets[c], self._counts[c]
            for ty in range(ty0, ty1):
                for tx in range(tx0, tx1):
                    i = ty * self._ntx + tx
                    if cnts[i] == 0:
                        continue
                    seg, _, _ = self._decode(os.pread(self._fd, int(cnts[i]), int(offs[i])), i, **kw)
                    seg = seg.reshape(seg.shape[-3], seg.shape[-2])
                    yy, xx = (ty - ty0) * tl, (tx - tx0) * tw
                    buf[c, yy : yy + seg.shape[0], xx : xx + seg.shape[1]] = seg[:tl, :tw]
        return buf[:, y0 - ty0 * tl : y1 - ty0 * tl, x0 - tx0 * tw : x1 - tx0 * tw]

    def close(self) -> None:
        os.close(self._fd)
        self._tif.close()


class _ZarrRegionReader:
    """Fallback: CodexImage.read_region (zarr), serialised with a lock."""

    def __init__(self, codex: CodexImage, channels: list[int]):
        self._codex, self._channels = codex, channels
        self._lock = threading.Lock()
        self.tile = tuple(int(v) for v in codex.level(0).chunks[-2:])

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        with self._lock:
            return self._codex.read_region(x0, y0, x1, y1, 0, channels=self._channels)

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------------------------
# accumulation


def _sum_dtype(dtype: np.dtype, row_len: int) -> type:
    """Accumulator of run sums; runs never exceed one row, so uint32 holds a row of uint16 up to 65537 px."""
    dtype = np.dtype(dtype)
    if dtype.kind == "u" and dtype.itemsize <= 2 and row_len <= 65536:
        return np.uint32
    if dtype.kind in "iub":
        return np.int64
    return np.float64


def accumulate_region(data: np.ndarray, x0: int, y0: int, affine: np.ndarray,
                      lookup: PatchLookup) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-patch sums of one CODEX region.

    Args:
        data: (C, h, w) CODEX level-0 pixels whose top-left pixel is (x0, y0).
        affine: 3x3 CODEX level-0 px -> H&E level-0 px.
        lookup: the patches (H&E level-0).

    Returns:
        (patch indices (k,), sums (k, C) float64, pixel counts (k,) int64) for the patches with >= 1 pixel here.
    """
    c, h, w = data.shape
    if h == 0 or w == 0 or lookup.n == 0:
        return np.zeros(0, np.int64), np.zeros((0, c)), np.zeros(0, np.int64)
    u = np.arange(x0, x0 + w, dtype=np.float64)
    v = np.arange(y0, y0 + h, dtype=np.float64)
    flat_data = data.reshape(c, h * w)
    sum_dtype = _sum_dtype(data.dtype, w)
    out_idx, out_sum, out_cnt = [], [], []
    for lab in lookup.labels(u, v, affine):
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
        out_idx.append(uniq)
        out_sum.append(sums)
        out_cnt.append(np.bincount(inv, weights=run_len, minlength=len(uniq)).astype(np.int64))
    if not out_idx:
        return np.zeros(0, np.int64), np.zeros((0, c)), np.zeros(0, np.int64)
    return np.concatenate(out_idx), np.concatenate(out_sum), np.concatenate(out_cnt)


def regions_touched(coords: np.ndarray, size: int, affine: np.ndarray, codex_wh: tuple[int, int],
                    region: tuple[int, int]) -> list[tuple[int, int]]:
    """(column, row) of the CODEX regions of ``region`` = (width, height) px that hold pixels of some patch."""
    w, h = codex_wh
    rw, rh = region
    nrx, nry = (w + rw - 1) // rw, (h + rh - 1) // rh
    if len(coords) == 0:
        return []
    inv = np.linalg.inv(np.asarray(affine, np.float64))
    c = np.asarray(coords, np.float64)
    corners = [(-0.5, -0.5), (size - 0.5, -0.5), (size - 0.5, size - 0.5), (-0.5, size - 0.5)]
    pts = np.stack([np.c_[c[:, 0] + dx, c[:, 1] + dy, np.ones(len(c))] @ inv.T for dx, dy in corners], 1)
    lo = np.floor(pts[..., :2].min(axis=1)).astype(np.int64)
    hi = np.ceil(pts[..., :2].max(axis=1)).astype(np.int64)
    ok = (hi[:, 0] >= 0) & (hi[:, 1] >= 0) & (lo[:, 0] <= w - 1) & (lo[:, 1] <= h - 1)
    lo = np.clip(lo[ok], 0, [w - 1, h - 1]) // [rw, rh]
    hi = np.clip(hi[ok], 0, [w - 1, h - 1]) // [rw, rh]
    mark = np.zeros((nry, nrx), bool)
    if len(lo):
        span = (hi - lo).max(axis=0) + 1
        for dx in range(int(span[0])):
            for dy in range(int(span[1])):
                mark[np.minimum(lo[:, 1] + dy, hi[:, 1]), np.minimum(lo[:, 0] + dx, hi[:, 0])] = True
    ry, rx = np.nonzero(mark)
    return list(zip(rx.tolist(), ry.tolist()))


@dataclass
class QuantResult:
    """Per-patch results of one slide: ``means`` (N, C) float64 (NaN where no CODEX pixel), ``counts`` (N,)
    CODEX pixels averaged, ``coverage`` (N,) fraction of the patch area covered by the CODEX."""

    means: np.ndarray
    counts: np.ndarray
    coverage: np.ndarray


def quantify_patches(codex: CodexImage, channels: list[int], coords: np.ndarray, size: int, affine: np.ndarray,
                     region_px: int = 1024, threads: int = 1, desc: str | None = None) -> QuantResult:
    """Mean of each of ``channels`` over the CODEX pixels inside every patch (see the module docstring).

    Args:
        codex: the CODEX image (its level 0 is read).
        channels: channel indices, in output column order.
        coords: (N, 2) H&E level-0 top-left (x, y) of the patches; ``size``: their side in H&E level-0 px.
        affine: 3x3 CODEX level-0 px -> H&E level-0 px.
        region_px: approximate side of the decoded regions (rounded to whole tiles), CODEX px.
        threads: regions decoded and accumulated in parallel.
    """
    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    n, nc = len(coords), len(channels)
    w, h = codex.dimensions
    lookup = PatchLookup(coords, size)
    coverage = codex_coverage(coords, size, affine, (w, h))
    try:
        reader: TiledRegionReader | _ZarrRegionReader = TiledRegionReader(codex.path, channels, codex.shape)
    except Exception as e:  # noqa: BLE001 - any layout the direct reader does not handle goes through zarr
        log.info("%s: direct tile reads unavailable (%s); reading through zarr", codex.path, e)
        reader = _ZarrRegionReader(codex, channels)
    tl, tw = reader.tile  # regions are whole tiles, about region_px^2 in area (strips: full rows)
    step_x = max(1, round(region_px / tw)) * tw
    step_y = max(1, round(region_px * region_px / step_x / tl)) * tl
    regions = regions_touched(coords, size, affine, (w, h), (step_x, step_y))
    sums = np.zeros((n, nc), np.float64)
    counts = np.zeros(n, np.int64)

    def job(rx: int, ry: int):
        x0, y0 = rx * step_x, ry * step_y
        data = reader.read(x0, y0, min(w, x0 + step_x), min(h, y0 + step_y))
        return accumulate_region(data, x0, y0, affine, lookup)

    try:
        bar = tqdm(total=len(regions), desc=desc, unit="region", leave=False,
                   **({} if desc else {"disable": True}))
        if threads <= 1:
            results = (job(rx, ry) for rx, ry in regions)
            for idx, s, cnt in results:
                sums[idx] += s
                counts[idx] += cnt
                bar.update()
        else:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                futures = [pool.submit(job, rx, ry) for rx, ry in regions]
                for fut in as_completed(futures):
                    idx, s, cnt = fut.result()
                    sums[idx] += s  # indices are unique within one region's result
                    counts[idx] += cnt
                    bar.update()
        bar.close()
    finally:
        reader.close()
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], np.nan)
    return QuantResult(means=means, counts=counts, coverage=coverage)


# ----------------------------------------------------------------------------------------------------------------
# pass 1: raw means per slide


@dataclass(frozen=True)
class QuantConfig:
    """Everything one slide's job needs (picklable for the process pool)."""

    out: Path
    patches_dir: Path
    registration_dir: Path
    markers: tuple[str, ...]
    panel: tuple[tuple[int, str], ...] | None
    panel_path: str | None
    codex_mpp: float | None = None
    he_mpp: float | None = None
    allow_flagged: bool = False
    region_px: int = 1024
    threads: int = 1


def raw_csv_path(out: Path, slide_id: str) -> Path:
    return Path(out) / "markers" / "raw" / f"{slide_id}.csv"


def quantify_slide(slide_id: str, codex_path: str | os.PathLike | None, cfg: QuantConfig) -> dict:
    """Pass 1 for one slide: raw per-patch means -> ``markers/raw/{slide}.csv``; returns a summary dict."""
    import pandas as pd

    grid_path = Path(cfg.patches_dir) / f"{slide_id}.h5"
    coords, attrs = read_grid(grid_path)
    affine = load_affine(Path(cfg.registration_dir) / f"{slide_id}.json", cfg.allow_flagged)
    size = int(attrs["patch_size_level0"])
    if codex_path is None or not str(codex_path).strip() or Path(codex_path).is_dir():
        raise PipelineError(f"slide {slide_id} has no CODEX image in the pairing table")
    with CodexImage(codex_path, mpp=cfg.codex_mpp) as codex:
        channels = resolve_channels(codex, list(cfg.markers), [tuple(p) for p in cfg.panel] if cfg.panel else None,
                                    cfg.panel_path)
        he_mpp = cfg.he_mpp or attrs.get("level0_mpp")
        if he_mpp:
            scale = math.sqrt(abs(np.linalg.det(affine[:2, :2])))
            expected = codex.mpp / float(he_mpp)
            if abs(scale / expected - 1) > 0.1:
                log.warning("%s: the affine scales CODEX px by %.4f but the pixel sizes give %.4f (%.4f / %.4f "
                            "µm/px); check the registration or --codex-mpp/--mpp", slide_id, scale, expected,
                            codex.mpp, float(he_mpp))
        res = quantify_patches(codex, channels, coords, size, affine, cfg.region_px, cfg.threads,
                               desc=f"{slide_id} regions")
    if not np.any(res.coverage > 0):
        raise PipelineError(f"no patch of {slide_id} overlaps its CODEX image {codex_path} through the affine in "
                            f"{Path(cfg.registration_dir) / f'{slide_id}.json'}; check the registration")
    df = pd.DataFrame(res.means, columns=list(cfg.markers))
    df.insert(0, "n_codex_px", res.counts)
    df.insert(0, "coverage", res.coverage)
    df.insert(0, "y", coords[:, 1])
    df.insert(0, "x", coords[:, 0])
    df.insert(0, "index", np.arange(len(coords)))
    df.insert(0, "slide", slide_id)
    with atomic_path(raw_csv_path(cfg.out, slide_id)) as tmp:
        df.to_csv(tmp, index=False)
    log.info("%s: %d patches, %d with coverage > 0, median coverage %.3f", slide_id, len(coords),
             int((res.coverage > 0).sum()), float(np.median(res.coverage)))
    return {"patches": len(coords), "covered": int((res.coverage > 0).sum())}


def _work(slide_id: str, pairs: dict[str, tuple[Path, Path | None]], cfg: QuantConfig) -> dict:
    return quantify_slide(slide_id, pairs[slide_id][1], cfg)


def _is_done(slide_id: str, out: Path, inputs: tuple[Path, ...] = ()) -> bool:
    """Raw means exist and are newer than the slide's grid and registration record (else they are redone)."""
    raw = raw_csv_path(out, slide_id)
    if not raw.exists():
        return False
    newer = [p for p in (Path(d) / f"{slide_id}{ext}" for d, ext in zip(inputs, (".h5", ".json")))
             if p.exists() and p.stat().st_mtime > raw.stat().st_mtime]
    if newer:
        log.info("%s: %s changed since %s was written; recomputing", slide_id, newer[0], raw)
    return not newer


# ----------------------------------------------------------------------------------------------------------------
# pass 2: cohort normalisation


def load_raw(path: Path, markers: list[str]):
    """Read a raw CSV and check it has the panel's markers (else it is stale: --overwrite)."""
    import pandas as pd

    df = pd.read_csv(path, dtype={"slide": str})
    missing = [m for m in RAW_META_COLUMNS + markers if m not in df.columns]
    if missing:
        raise PipelineError(f"raw marker file {path} lacks the columns {missing[:5]} (made with another panel?); "
                            "rerun with --overwrite")
    return df


def compute_normalization(values: np.ndarray, markers: list[str], low_pct: float, high_pct: float) -> dict:
    """Per-marker percentiles of raw patch means ``values`` (N, K) -> normalization record (JSON-ready)."""
    if len(values) == 0:
        raise PipelineError("no patch reaches --min-coverage in any slide; nothing to normalise "
                            "(check the registrations or lower --min-coverage)")
    lo = np.nanpercentile(values, low_pct, axis=0)
    hi = np.nanpercentile(values, high_pct, axis=0)
    flat = [m for m, a, b in zip(markers, lo, hi) if not b > a]
    if flat:
        log.warning("markers with P%g == P%g over the cohort (normalised to 0): %s", high_pct, low_pct, flat)
    return {"schema_version": SCHEMA_VERSION, "markers": markers, "percentiles": [low_pct, high_pct],
            "values": [lo.tolist(), hi.tolist()], "n_patches": int(len(values)),
            "formula": "clip((raw - values[0]) / (values[1] - values[0]), 0, 1); 0 where values[1] <= values[0]"}


def apply_normalization(raw: np.ndarray, norm: dict) -> np.ndarray:
    """Normalise raw means (N, K) with a normalization record -> (N, K) float64 in [0, 1]."""
    lo, hi = (np.asarray(v, np.float64) for v in norm["values"])
    span = hi - lo
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(span > 0, (raw - lo) / np.where(span > 0, span, 1.0), 0.0)
    return np.clip(out, 0.0, 1.0)


def load_normalization(path: Path, markers: list[str]) -> dict:
    if not path.exists():
        raise PipelineError(f"normalization file not found: {path}")
    norm = json.loads(path.read_text())
    if list(norm.get("markers", [])) != markers:
        raise PipelineError(f"normalization file {path} is for the markers {norm.get('markers', [])[:5]}..., "
                            f"not the panel's {markers[:5]}... (same markers in the same order needed)")
    return norm


def normalize_cohort(out: Path, slides: list[str], markers: list[str], min_coverage: float, low_pct: float,
                     high_pct: float, legacy_columns: bool, fixed: dict | None = None) -> dict:
    """Pass 2: percentiles over ``slides`` (unless ``fixed``), then ``markers/{slide}.csv`` for each of them."""
    raws = {}
    for s in tqdm(slides, desc="reading raw means", unit="slide", leave=False):
        df = load_raw(raw_csv_path(out, s), markers)
        raws[s] = df[(df["coverage"] >= min_coverage) & (df["n_codex_px"] > 0)]
    if fixed is None:
        values = np.concatenate([d[markers].to_numpy(np.float64) for d in raws.values()]) if raws else np.zeros(
            (0, len(markers)))
        norm = compute_normalization(values, markers, low_pct, high_pct)
        norm |= {"slides": slides, "min_coverage": min_coverage}
        write_json(Path(out) / "markers" / "normalization.json", norm)
    else:
        norm = fixed
        write_json(Path(out) / "markers" / "normalization.json", fixed | {"applied_to": slides})
    for s, df in tqdm(raws.items(), desc="normalising", unit="slide", leave=False):
        vals = apply_normalization(df[markers].to_numpy(np.float64), norm)
        outdf = df[["slide", "index", "x", "y"]].copy()
        outdf[markers] = vals
        if legacy_columns:
            for k in range(len(markers)):
                outdf[f"mean_intensity_channel{k + 1}"] = vals[:, k]
        with atomic_path(Path(out) / "markers" / f"{s}.csv") as tmp:
            outdf.to_csv(tmp, index=False, float_format="%.7g")
        log.info("%s: %d of its patches have coverage >= %.2f", s, len(df), min_coverage)
    return norm


# ----------------------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m preprocess.quantify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--pairs", type=Path, help="pairing table he_slide,codex_image (default COHORT/pairs.csv)")
    p.add_argument("--panel", type=Path, help="marker panel channel,marker (default COHORT/marker_panel.csv)")
    p.add_argument("--patches", type=Path, help="folder of the grid files (default OUT/patches)")
    p.add_argument("--registration", type=Path, help="folder of registration records (default OUT/registration)")
    p.add_argument("--channels-by", choices=["index", "name"], default="index",
                   help="find each marker's channel by the panel's channel index (default) or by the OME channel "
                        "names (then every marker name must be in the CODEX file)")
    p.add_argument("--num-markers", type=int, default=40, help="markers the panel must list (0 = any; default 40)")
    p.add_argument("--codex-mpp", type=float, help="CODEX level-0 µm/px when the OME-XML has none")
    p.add_argument("--mpp", type=float, help="H&E level-0 µm/px (default: from the grid file; used for a check)")
    p.add_argument("--allow-flagged", action="store_true", help="use registrations with status 'flagged'")
    p.add_argument("--min-coverage", type=float, default=0.95,
                   help="drop patches whose area is covered by the CODEX less than this fraction (default 0.95)")
    p.add_argument("--low-pct", type=float, default=1.0, help="percentile mapped to 0 (default 1)")
    p.add_argument("--high-pct", type=float, default=99.0, help="percentile mapped to 1 (default 99, as the paper)")
    p.add_argument("--normalization", type=Path,
                   help="apply the percentiles of this normalization.json instead of computing them")
    p.add_argument("--legacy-columns", action="store_true",
                   help="also write mean_intensity_channel{1..K} columns (the original HEX CSV layout)")
    p.add_argument("--region-px", type=int, default=1024, help="side of the decoded CODEX regions, px (default 1024)")
    p.add_argument("--threads", type=int, default=0,
                   help="threads per slide over regions (default: CPU cores / --workers, at most 4)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out_dir = args.out / "markers"
    setup_logging(out_dir / "run.log")
    try:
        if not (0 <= args.low_pct < args.high_pct <= 100):
            raise PipelineError(f"need 0 <= --low-pct < --high-pct <= 100 (got {args.low_pct}, {args.high_pct})")
        pairs_path = args.pairs or (args.cohort / "pairs.csv" if args.cohort else None)
        panel_path = args.panel or (args.cohort / "marker_panel.csv" if args.cohort else None)
        if pairs_path is None or panel_path is None:
            raise PipelineError("give --cohort, or both --pairs and --panel")
        pairs = read_pairs(pairs_path)
        panel = read_marker_panel(panel_path)
        markers = [m for _, m in panel]
        if args.num_markers and len(markers) != args.num_markers:
            raise PipelineError(f"marker panel {panel_path} lists {len(markers)} markers, expected "
                                f"{args.num_markers} (--num-markers 0 accepts any number)")
        slides = select_slides(sorted(pairs), args.slides, str(pairs_path))
        fixed = load_normalization(args.normalization, markers) if args.normalization else None
    except PipelineError as e:
        log.error("%s", e)
        return 2
    threads = args.threads or default_threads(args.workers)
    cfg = QuantConfig(out=args.out, patches_dir=args.patches or args.out / "patches",
                      registration_dir=args.registration or args.out / "registration", markers=tuple(markers),
                      panel=tuple(panel) if args.channels_by == "index" else None, panel_path=str(panel_path),
                      codex_mpp=args.codex_mpp, he_mpp=args.mpp, allow_flagged=args.allow_flagged,
                      region_px=args.region_px, threads=threads)
    save_config(out_dir, vars(args) | {"pairs_resolved": pairs_path, "panel_resolved": panel_path,
                                       "markers": markers, "slides_resolved": slides, "threads_resolved": threads,
                                       "schema_version": SCHEMA_VERSION})
    try:
        report = run_slides(slides, functools.partial(_work, pairs=pairs, cfg=cfg),
                            functools.partial(_is_done, out=args.out, inputs=(cfg.patches_dir, cfg.registration_dir)),
                            overwrite=args.overwrite, workers=args.workers,
                            skip_errors=not args.fail_fast, desc="marker means (raw)")
    except PipelineError as e:  # --fail-fast
        log.error("%s", e)
        return 1
    # the cohort = every slide of the pairing table with raw means (this run's or cached)
    cohort = [s for s in sorted(pairs) if raw_csv_path(args.out, s).exists() and s not in report.failed]
    if fixed is not None:
        cohort = [s for s in slides if s in cohort]
    try:
        if not cohort:
            raise PipelineError("no slide has raw marker means; nothing to normalise")
        norm = normalize_cohort(args.out, cohort, markers, args.min_coverage, args.low_pct, args.high_pct,
                                args.legacy_columns, fixed)
    except PipelineError as e:
        log.error("%s", e)
        return 1
    log.info("normalised %d slides over %d patches (P%g..P%g) into %s", len(cohort),
             norm.get("n_patches", -1), norm["percentiles"][0], norm["percentiles"][1], out_dir)
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
