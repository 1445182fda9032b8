"""Tiles of a whole-slide image read region by region, for DataLoader workers (HEX inference, feature extraction).

Public API (stable; ``mica`` feature extraction uses it too)::

    from hex.infer.tiles import TileRegions, make_tile_loader

    ds = TileRegions(he_path, coords, patch_size_level0=448, level=0, read_size=448, out_size=224)
    ds = TileRegions.from_grid(he_path, "OUT/patches/slide.h5")        # geometry from a stage-01 grid file
    ds, tissue_fraction, info = tissue_tiles(he_path, patch_size=224, stride=56)   # computed tissue grid
    for imgs, idx in make_tile_loader(ds, batch_size=128, workers=4, pin_memory=True):
        ...   # imgs: uint8 (B, 3, out_size, out_size) RGB, idx: int64 (B,) rows of ``coords``

* ``coords`` (N, 2) int64: level-0 top-left (x, y) of every tile; a tile covers ``patch_size_level0`` level-0 px
  (it is read as ``read_size`` px at pyramid ``level`` and resized to ``out_size`` with
  :func:`preprocess.patch_store.resize_patch`). Tiles may overlap (a stride below the tile size).
* The tiles are grouped into square REGIONS of about ``region_px`` px a side at ``level``
  (:func:`preprocess.patch_store.group_into_blocks`); each region is ONE ``read_region`` and its tiles are cut
  from it, exactly as the patch store (:func:`preprocess.patch_store.iter_patches`) does. With the same
  ``region_px`` (default 2048) the pixels equal ``he_patches/{slide}.h5`` for the same grid at any level; at
  level 0 (or whenever x / downsample is an integer) they are equal for any ``region_px``.
* ``TileRegions`` is a map-style dataset over regions: ``len(ds)`` regions, ``ds[r]`` = (tiles uint8
  (k, 3, S, S), indices int64 (k,)) of region r (every tile index appears in exactly one region).
* :func:`make_tile_loader` wraps it in an iterable dataset whose DataLoader workers each read whole regions
  (regions ``r ≡ worker_id (mod workers)``) and emit batches of exactly ``batch_size`` tiles (the last batch of
  each worker may be smaller); a worker holds one region and one batch in memory, never a whole level. Batches
  arrive in no particular order: place results by ``idx``.
* The slide is opened lazily once per process (OpenSlide handles are not shared across ``fork``).
* A :class:`pipeline.errors.PipelineError` raised while reading (a corrupt tile:
  :class:`preprocess.slide_io.SlideReadError`, one line naming the file, level and region) reaches the loop that
  iterates the loader as that same one-line error, also from DataLoader workers (whose own exceptions would carry
  the worker's traceback in their message).
* :func:`tissue_tiles` computes a grid with stage 01's own functions (``grid_geometry``, ``grid_tissue_mask``,
  ``patch_tissue_fraction``) at any stride: tiles of ``patch_size`` px at ``target_mpp`` µm/px (level-0 side
  P = round(patch_size * target_mpp / mpp)), top-left x, y = 0, s, 2s, ... (s = round(stride * P / patch_size)
  level-0 px), fully inside the slide, kept when their tissue fraction is >= ``min_tissue``. With stride =
  patch_size and the stage-01 defaults this is the stage-01 grid.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from pipeline.errors import PipelineError
from preprocess.patch import full_grid, grid_geometry, read_grid
from preprocess.patch_store import group_into_blocks, resize_patch
from preprocess.slide_io import HESlide
from preprocess.tissue import TissueParams, grid_tissue_mask, patch_tissue_fraction

log = logging.getLogger(__name__)

def region_block_level0(read_size: int, downsample: float, region_px: int = 2048) -> int:
    """Side in level-0 px of the square blocks that group tiles into regions (the patch store's rule):
    ``floor(region_px / read_size)`` tiles of ``read_size`` px at a level of this ``downsample``."""
    per_side = max(1, int(region_px) // max(1, int(read_size)))
    return int(round(per_side * read_size * downsample))


class TileRegions(Dataset):
    """The tiles at ``coords`` of one slide, grouped into regions (item = one region's tiles).

    Args:
        he_path: H&E slide (any OpenSlide format).
        coords: (N, 2) int64 level-0 top-left (x, y) of each tile; every tile must lie inside the slide.
        patch_size_level0: tile side in level-0 px (for the bounds check and :attr:`patch_size_level0`).
        level: pyramid level to read.
        read_size: tile side in px at ``level`` (usually round(patch_size_level0 / downsample)).
        out_size: side of the returned tiles in px (resized from ``read_size`` when different).
        region_px: approximate side of one region read at ``level``, px.
        mpp: level-0 µm/px overriding the slide metadata (only needed when the slide has none).

    Raises :class:`pipeline.errors.PipelineError` (one line naming the file) for an unreadable slide, a level the
    slide does not have, or tiles outside the slide.
    """

    def __init__(self, he_path: str | os.PathLike, coords: np.ndarray, patch_size_level0: int, level: int,
                 read_size: int | None, out_size: int, region_px: int = 2048, mpp: float | None = None):
        self.he_path = Path(he_path)
        self.coords = np.ascontiguousarray(np.asarray(coords, dtype=np.int64).reshape(-1, 2))
        self.patch_size_level0 = int(patch_size_level0)
        self.level, self.out_size = int(level), int(out_size)
        self.region_px, self.mpp_override = int(region_px), mpp
        with HESlide(self.he_path, mpp=mpp) as slide:
            if not 0 <= self.level < slide.level_count:
                raise PipelineError(f"{self.he_path} has {slide.level_count} pyramid levels, tiles ask for level "
                                    f"{self.level}; rebuild the grid for this slide (preprocess.patch --overwrite)")
            self.downsample = float(slide.level_downsamples[self.level])
            # None: the side at the level from the slide's own downsample, as the patch store computes it
            self.read_size = int(read_size) if read_size is not None else max(1, round(self.patch_size_level0
                                                                                     / self.downsample))
            self.dimensions = tuple(int(v) for v in slide.dimensions)
            self.mpp = float(slide.mpp)
        w0, h0 = self.dimensions
        c, s = self.coords, self.patch_size_level0
        if len(c) and (c.min() < 0 or (c[:, 0] + s).max() > w0 or (c[:, 1] + s).max() > h0):
            raise PipelineError(f"tiles of {s} level-0 px at the given coords fall outside {self.he_path} "
                                f"({w0}x{h0} px); was the grid made for another slide?")
        self.block_level0 = region_block_level0(self.read_size, self.downsample, self.region_px)
        self.regions: list[np.ndarray] = group_into_blocks(self.coords, self.block_level0)
        self._slide: HESlide | None = None
        self._pid = -1

    @classmethod
    def from_grid(cls, he_path: str | os.PathLike, grid: str | os.PathLike | tuple[np.ndarray, dict],
                  mpp: float | None = None, region_px: int = 2048) -> TileRegions:
        """Tiles of a stage-01 grid file ``patches/{slide}.h5`` (``coords`` + ``patch_size``, ``patch_level``,
        ``patch_size_level0`` attributes), or of its ``(coords, attrs)`` already read with
        :func:`preprocess.patch.read_grid`; ``read_size`` from the slide's own level downsample."""
        coords, attrs = read_grid(grid) if not isinstance(grid, tuple) else grid
        return cls(he_path, coords, int(attrs["patch_size_level0"]), int(attrs["patch_level"]), None,
                   int(attrs["patch_size"]), region_px=region_px, mpp=mpp)

    # ------------------------------------------------------------------------------------------------------------
    @property
    def num_tiles(self) -> int:
        """N, the number of tiles."""
        return len(self.coords)

    def __len__(self) -> int:
        return len(self.regions)

    def _handle(self) -> HESlide:
        if self._slide is None or self._pid != os.getpid():
            self._slide = HESlide(self.he_path, mpp=self.mpp_override)
            self._pid = os.getpid()
        return self._slide

    def read_region(self, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Region ``r``: (pixels (h, w, 3) uint8 at ``level``, tile indices (k,), tile offsets (k, 2) (x, y) in
        region px). Tile j is ``pixels[oy:oy+read_size, ox:ox+read_size]`` before resizing."""
        idx = self.regions[r]
        c = self.coords[idx]
        bx, by = (int(v) for v in c.min(axis=0))
        off = np.rint((c - np.array([bx, by])) / self.downsample).astype(np.int64)
        w, h = (int(v) for v in off.max(axis=0) + self.read_size)
        return self._handle().read_region(bx, by, self.level, (w, h)), idx, off

    def cut(self, pixels: np.ndarray, offset: np.ndarray) -> np.ndarray:
        """One tile (out_size, out_size, 3) uint8 at region offset (ox, oy)."""
        ox, oy = int(offset[0]), int(offset[1])
        return resize_patch(pixels[oy : oy + self.read_size, ox : ox + self.read_size], self.out_size)

    def __getitem__(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, idx, off = self.read_region(r)
        tiles = np.empty((len(idx), 3, self.out_size, self.out_size), np.uint8)
        for j, o in enumerate(off):
            tiles[j] = self.cut(pixels, o).transpose(2, 0, 1)
        return torch.from_numpy(tiles), torch.from_numpy(idx.astype(np.int64))

    def close(self) -> None:
        """Close this process's slide handle (reopened on next use)."""
        if self._slide is not None and self._pid == os.getpid():
            self._slide.close()
        self._slide, self._pid = None, -1

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_slide"], state["_pid"] = None, -1
        return state


class _WorkerError:
    """A :class:`PipelineError` raised in a DataLoader worker, sent to the main process as an item (an exception
    raised in a worker reaches it with the worker's traceback pasted into its message)."""

    def __init__(self, error: PipelineError):
        self.error = error


class TileBatches(IterableDataset):
    """Batches of ``batch_size`` tiles of a :class:`TileRegions`; each DataLoader worker reads its own regions.

    Iterating yields (imgs uint8 (B, 3, S, S), idx int64 (B,)); over all workers every tile index comes exactly
    once. Worker w of W takes regions w, w + W, w + 2W, ...; its last batch may hold fewer than ``batch_size``.
    """

    def __init__(self, regions: TileRegions, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.regions = regions
        self.batch_size = int(batch_size)

    def __len__(self) -> int:  # an upper bound used by progress bars only when one worker runs
        return math.ceil(self.regions.num_tiles / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        ds, b, s = self.regions, self.batch_size, self.regions.out_size
        buf = np.empty((b, 3, s, s), np.uint8)
        ibuf = np.empty(b, np.int64)
        n = 0
        try:
            for r in range(wid, len(ds), nw):
                try:
                    pixels, idx, off = ds.read_region(r)
                except PipelineError as e:
                    if info is None:
                        raise
                    yield _WorkerError(e)  # raised again, as it was, by TileLoader in the main process
                    return
                for i, o in zip(idx, off):
                    buf[n] = ds.cut(pixels, o).transpose(2, 0, 1)
                    ibuf[n] = i
                    n += 1
                    if n == b:
                        yield torch.from_numpy(buf.copy()), torch.from_numpy(ibuf.copy())
                        n = 0
            if n:
                yield torch.from_numpy(buf[:n].copy()), torch.from_numpy(ibuf[:n].copy())
        finally:
            if info is not None:
                ds.close()


class TileLoader:
    """Iterates a :class:`TileBatches` DataLoader (``.loader``); a :class:`PipelineError` of a worker is raised here
    as it was raised there (one line, e.g. :class:`preprocess.slide_io.SlideReadError` for a corrupt tile)."""

    def __init__(self, loader: DataLoader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for item in self.loader:
            if isinstance(item, _WorkerError):
                raise item.error
            yield item


def make_tile_loader(ds: TileRegions, batch_size: int, workers: int = 0, pin_memory: bool = False,
                     prefetch_factor: int = 2) -> TileLoader:
    """A DataLoader over ``ds`` yielding (imgs uint8 (B, 3, S, S), idx int64 (B,)) batches (see
    :class:`TileBatches`), wrapped in a :class:`TileLoader` that raises a worker's :class:`PipelineError` as it was.

    ``workers`` processes read regions in parallel (capped at the number of regions; 0 = read in this process);
    ``pin_memory`` pins each batch for ``non_blocking`` copies to CUDA.
    """
    workers = max(0, min(int(workers), len(ds)))
    kw = {"prefetch_factor": prefetch_factor} if workers > 0 else {}
    return TileLoader(DataLoader(TileBatches(ds, batch_size), batch_size=None, num_workers=workers,
                                 pin_memory=pin_memory, persistent_workers=False,
                                 generator=torch.Generator().manual_seed(0), **kw))


# ----------------------------------------------------------------------------------------------------------------
# grids computed on the fly


def strided_grid(width: int, height: int, size_level0: int, step_level0: int) -> np.ndarray:
    """Top-left (x, y) of all tiles of side ``size_level0`` fully inside a (width, height) level-0 image at
    x, y = 0, step, 2 step, ...; row-major (N, 2) int64 (``preprocess.patch.full_grid`` with a step)."""
    return full_grid(width, height, size_level0, step_level0)


def tissue_tiles(he_path: str | os.PathLike, patch_size: int = 224, stride: int | None = None,
                 target_mpp: float = 0.5, min_tissue: float = 0.5, thumb_size: int = 2048, mpp: float | None = None,
                 region_px: int = 2048, tissue: TissueParams | None = None) -> tuple[TileRegions, np.ndarray, dict]:
    """The tissue tiles of a slide on a grid of step ``stride`` (px at ``target_mpp``; None = ``patch_size``).

    Returns (tiles, tissue fractions (N,) float32, grid description: ``patch_size``, ``stride``, ``stride_level0``,
    ``min_tissue``, ``tissue_threshold``). ``tissue``: mask thresholds (default: stage 01's). No tissue gives zero
    tiles (not an error); a slide smaller than one tile is a :class:`PipelineError` naming the file.
    """
    stride = int(stride or patch_size)
    with HESlide(he_path, mpp=mpp) as slide:
        geom = grid_geometry(slide, patch_size, target_mpp)
        ps0, (w0, h0) = geom.patch_size_level0, slide.dimensions
        if w0 < ps0 or h0 < ps0:
            raise PipelineError(f"{he_path} is {w0}x{h0} px, smaller than one tile ({ps0} level-0 px = {patch_size} "
                                f"px at {target_mpp} µm/px, slide {slide.mpp:g} µm/px); check its µm/px (--mpp) or "
                                "leave it out")
        # the stride scales like the tile (a slide within 1% of target_mpp reads px as they are: 224 stays 224)
        step0 = max(1, int(round(stride * ps0 / patch_size)))
        grid = strided_grid(w0, h0, ps0, step0)
        thumb, ds = slide.thumbnail(thumb_size)
        mask, thr = grid_tissue_mask(thumb, slide.mpp * ds, tissue or TissueParams())
        frac = patch_tissue_fraction(mask, ds, grid, ps0) if mask.any() else np.zeros(len(grid))
    keep = frac >= min_tissue
    tiles = TileRegions(he_path, grid[keep], ps0, geom.patch_level, geom.read_size_at_level, patch_size,
                        region_px=region_px, mpp=mpp)
    info = {"patch_size": int(patch_size), "stride": stride, "stride_level0": step0, "min_tissue": float(min_tissue),
            "tissue_threshold": float(thr)}
    return tiles, frac[keep].astype(np.float32), info
