"""The dense (cell-scale) virtual CODEX of a slide: stage 06 with ``--dense`` (``DENSE=1 scripts/06_infer_wsi.sh``).

Geometry (issue 19's contract). A tile has side P level-0 px (the stage's tile, 224 px at 20x = 448 level-0 px at
40x); the model predicts a G x G grid of cells in it (``model.dense_grid``, default 16), cell side c = P / G level-0 px
(7 µm at 0.5 µm/px). The dense map has one pixel per cell of a lattice anchored at level-0 (0, 0): pixel (r, q)
covers level-0 x in [q c - 0.5, (q + 1) c - 0.5), y in [r c - 0.5, (r + 1) c - 0.5) (pixel centres at integers, as
the patch grid), so its centre is ((q + 1/2) c - 1/2, (r + 1/2) c - 1/2); the map is ceil(H0 / c) x ceil(W0 / c)
pixels, pixel side c x mpp µm.

The pass (:func:`dense_slide`): tiles every ``s`` level-0 px (``--dense-stride`` px at the target mpp, default half a
tile; s must be a multiple of c, so every tile lands on the lattice: its cell (i, j) is map pixel (y/c + i, x/c + j)),
kept by the tissue rule of the patch pass (:func:`hex.infer.tiles.tissue_tiles`: tissue fraction >= ``--min-tissue``).
Overlapping tiles are blended with a separable window w(i) w(j), w(i) = f + (1 - f) sin^2(pi (i + 1/2) / G)
(a Hann bump with floor f = :data:`WINDOW_FLOOR`, so a cell only one tile covers, e.g. at the tissue border, still
gets that tile's value): map = sum_t w_t v_t / sum_t w_t over the tiles t covering the pixel; 0 where none does (the
mask). With s = P / 2 the window sums to a constant over the lattice, so no tile border shows.

Memory does not grow with the slide's height: tiles are read in row order (regions of one tile row,
:func:`row_regions`) and accumulated into a band of map rows; rows that no later tile can reach are normalised and
written to a raw scratch file (channel-major, plain ``pwrite``, no memory map), the pyramid levels are built from it
band by band, and the OME-TIFF is written tile by tile from those files (:func:`hex.infer.map_formats.write_ome_pyramid`
with a :class:`~hex.infer.map_formats.PlaneSource`). Peak memory: the model, the loader's regions, and a band of
~(G + lag) map rows x W x M float32 (W = map width).

Outputs in ``OUT/virtual_codex/`` (written atomically):

- ``{slide}_dense.ome.tif``: pyramidal float32 OME-TIFF, axes CYX, M channels named by the markers, PhysicalSizeX/Y =
  c x mpp µm, tiled 256 px, zlib, 2x area-mean levels in SubIFDs; values in the model's normalised units, 0 outside
  the tiles; a second OME Image "tissue mask" (YX uint8, 255 = covered by a tile; tifffile ``series[1]``). The Image
  Description holds the map's description (JSON, :func:`dense_description`).
- ``{slide}_dense_preview.png``: the H&E of a window of up to 256 x 256 cells (1.8 mm at 20x: the window with most
  tissue) beside 3 markers (:func:`hex.infer.map_formats.choose_preview_markers`) at one pixel per cell.
- the description under key ``dense`` of ``{slide}.json`` (the map record of :mod:`hex.infer.maps`): ``file``,
  ``preview``, ``grid`` G, ``patch_size_level0`` P, ``cell_px_level0`` c, ``mpp``, ``cell_um``, ``shape`` [H, W, M],
  ``dtype``, ``stride`` (px at target mpp), ``stride_level0``, ``window``, ``window_floor``, ``n_tiles``,
  ``tissue_pixels``, ``markers``, ``levels``, ``preview_markers``, ``origin``, ``checkpoint``.

Reading: :func:`read_dense_map` (lazy values, the mask in memory) and :func:`sample_dense_map` (bilinear at level-0
points, between tissue pixel centres).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hex.infer.map_formats import choose_preview_markers, downsample2, pyramid_shapes, write_ome_pyramid
from hex.infer.map_sampling import sample_map
from pipeline import artifacts as art
from pipeline.errors import PipelineError
from pipeline.io import atomic_path, write_json

if TYPE_CHECKING:
    import torch

    from hex.infer.predictions import InferConfig

log = logging.getLogger("hex.infer_wsi")

WINDOW = "hann"  # w(i) = f + (1 - f) sin^2(pi (i + 1/2) / G), separable
WINDOW_FLOOR = 0.01
PREVIEW_CELLS = 256  # side of the preview window, cells
OME_TILE = 256
DTYPE = "float32"


# ----------------------------------------------------------------------------------------------------------------
# geometry


def blend_window(grid: int, floor: float = WINDOW_FLOOR) -> np.ndarray:
    """The (G, G) float32 blending weight of a tile's cells: outer product of w(i) = f + (1 - f) sin^2(pi (i + 1/2)
    / G), > 0 everywhere (so every covered pixel has weight) and shifted copies by G/2 sum to a constant."""
    i = np.arange(int(grid), dtype=np.float64)
    w = floor + (1.0 - floor) * np.sin(np.pi * (i + 0.5) / grid) ** 2
    return np.outer(w, w).astype(np.float32)


def dense_stride(patch_size: int, grid: int, stride: int | None) -> int:
    """``--dense-stride`` resolved (px at the target mpp): default a quarter of the tile (56 px for 224: every cell
    blended from 16 tiles, so no position in the tile shows as a seam); a stride that is not a multiple of
    the cell (patch_size / grid px) or not in [cell, patch_size] is a :class:`PipelineError` naming the flag."""
    if patch_size % grid:
        raise PipelineError(f"tile of {patch_size} px does not split into the model's {grid} x {grid} dense grid "
                            f"(--dense-grid {grid} of the checkpoint); use a --patch-size that is a multiple of {grid}")
    cell = patch_size // grid
    s = int(stride) if stride else max(cell, patch_size // 4 // cell * cell)
    if s % cell or not cell <= s <= patch_size:
        good = max(cell, patch_size // 4 // cell * cell)
        raise PipelineError(f"--dense-stride {s}: must be a multiple of the dense cell ({cell} px = {patch_size} px "
                            f"/ {grid}) between {cell} and {patch_size}, e.g. {good}")
    return s


def map_shape(width0: int, height0: int, cell_px: int) -> tuple[int, int]:
    """(H, W) of the dense map of a (width0, height0) level-0 slide: ceil(height0 / c), ceil(width0 / c)."""
    return -(-int(height0) // int(cell_px)), -(-int(width0) // int(cell_px))


def row_regions(coords: np.ndarray, patch_size_level0: int, max_width_level0: int) -> list[np.ndarray]:
    """Tile indices grouped into regions of one tile row each (same y), at most ``max_width_level0`` level-0 px wide
    (at least one tile), in row-major order: reading them in order finishes the map's rows from the top."""
    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    if not len(coords):
        return []
    order = np.lexsort((coords[:, 0], coords[:, 1]))
    out: list[np.ndarray] = []
    cur: list[int] = []
    y0 = x0 = None
    for i in order:
        x, y = int(coords[i, 0]), int(coords[i, 1])
        if cur and (y != y0 or x + patch_size_level0 - x0 > max(max_width_level0, patch_size_level0)):
            out.append(np.array(cur, np.int64))
            cur = []
        if not cur:
            y0, x0 = y, x
        cur.append(int(i))
    out.append(np.array(cur, np.int64))
    return out


# ----------------------------------------------------------------------------------------------------------------
# scratch planes (raw files, no memory map) and the band accumulator


class RawPlanes:
    """C float32 planes (H, W) in one raw scratch file, channel-major: rows are written with ``pwrite`` and read
    with ``pread`` (the page cache, not this process, holds them). Unwritten rows read as 0 (sparse file)."""

    def __init__(self, path: str | os.PathLike, channels: int, height: int, width: int):
        self.path = Path(path)
        self.shape = (int(channels), int(height), int(width))
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self._fd, 4 * channels * height * width)

    def _off(self, ch: int, row: int) -> int:
        _, h, w = self.shape
        return 4 * (ch * h + row) * w

    def write_rows(self, r0: int, rows: np.ndarray) -> None:
        """rows (k, W, C) float32 -> rows [r0, r0 + k) of every channel."""
        for ch in range(self.shape[0]):
            buf = np.ascontiguousarray(rows[:, :, ch], dtype=np.float32)
            os.pwrite(self._fd, buf.tobytes(), self._off(ch, r0))

    def write_plane_rows(self, ch: int, r0: int, rows: np.ndarray) -> None:
        """rows (k, W) float32 -> rows [r0, r0 + k) of channel ``ch``."""
        os.pwrite(self._fd, np.ascontiguousarray(rows, dtype=np.float32).tobytes(), self._off(ch, r0))

    def read(self, ch: int, y0: int, y1: int) -> np.ndarray:
        """Rows [y0, y1) of channel ``ch``: (y1 - y0, W) float32."""
        w = self.shape[2]
        n = 4 * (y1 - y0) * w
        data = os.pread(self._fd, n, self._off(ch, y0))
        return np.frombuffer(data, np.float32).reshape(y1 - y0, w).copy()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


class RawMask:
    """A (H, W) uint8 mask in a raw scratch file (255 = tissue), written and read by rows."""

    def __init__(self, path: str | os.PathLike, height: int, width: int):
        self.path = Path(path)
        self.shape = (int(height), int(width))
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self._fd, height * width)

    def write_rows(self, r0: int, rows: np.ndarray) -> None:
        os.pwrite(self._fd, np.ascontiguousarray(rows, np.uint8).tobytes(), r0 * self.shape[1])

    def read(self, y0: int, y1: int) -> np.ndarray:
        w = self.shape[1]
        return np.frombuffer(os.pread(self._fd, (y1 - y0) * w, y0 * w), np.uint8).reshape(y1 - y0, w).copy()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


class BandAccumulator:
    """Weighted sums of tile predictions over a band of map rows, flushed to ``planes``/``mask`` as rows finish.

    Args:
        shape: (H, W) of the map. channels: M. grid: G (a tile covers G x G map pixels). window: (G, G) weights.
        tile_rows: the map row r0 = y / c of every tile that will be added (with repeats), so the accumulator knows
            when no pending tile reaches a row any more. planes, mask: where finished rows go.

    :meth:`add` takes tiles in any order; rows above the first tile row with a pending tile are final and are
    normalised (sum w v / sum w, 0 where sum w = 0) and written. The band grows when tiles arrive far ahead.
    """

    def __init__(self, shape: tuple[int, int], channels: int, grid: int, window: np.ndarray,
                 tile_rows: np.ndarray, planes: RawPlanes, mask: RawMask):
        self.h, self.w = (int(v) for v in shape)
        self.m, self.g = int(channels), int(grid)
        self.window = np.asarray(window, np.float32)
        rows, counts = np.unique(np.asarray(tile_rows, np.int64), return_counts=True)
        self._rows, self._left = rows, counts.astype(np.int64)
        self._pos = {int(r): i for i, r in enumerate(rows)}
        self._next = 0  # index into _rows of the first tile row with tiles pending
        self.base = 0  # map row of band row 0 (= rows flushed so far)
        cap = min(self.h, 2 * self.g)
        self.acc = np.zeros((cap, self.w, self.m), np.float32)
        self.wsum = np.zeros((cap, self.w), np.float32)
        self.planes, self.mask = planes, mask
        self.tissue_pixels = 0
        self.max_band_rows = cap

    def _ensure(self, end_row: int) -> None:
        need = end_row - self.base
        if need <= len(self.acc):
            return
        cap = max(need, 2 * len(self.acc))
        acc = np.zeros((cap, self.w, self.m), np.float32)
        wsum = np.zeros((cap, self.w), np.float32)
        acc[:len(self.acc)] = self.acc
        wsum[:len(self.wsum)] = self.wsum
        self.acc, self.wsum = acc, wsum
        self.max_band_rows = max(self.max_band_rows, cap)

    def add(self, cells: np.ndarray, dense: np.ndarray) -> None:
        """cells (B, 2) int: map (row, col) of each tile's top-left cell; dense (B, M, G, G) float32."""
        g, win = self.g, self.window
        cells = np.asarray(cells, np.int64).reshape(-1, 2)
        if len(cells):
            self._ensure(int(cells[:, 0].max()) + g)
        for (r, q), d in zip(cells, np.asarray(dense, np.float32)):
            rr = int(r) - self.base
            if rr < 0:
                raise RuntimeError(f"tile at map row {r} arrived after row {self.base} was written")
            self.acc[rr:rr + g, q:q + g] += win[:, :, None] * d.transpose(1, 2, 0)
            self.wsum[rr:rr + g, q:q + g] += win
            self._left[self._pos[int(r)]] -= 1
        while self._next < len(self._rows) and self._left[self._next] == 0:
            self._next += 1
        self._flush(int(self._rows[self._next]) if self._next < len(self._rows) else self.h)

    def _flush(self, upto: int) -> None:
        """Write map rows [base, upto) (final: no pending tile reaches them)."""
        while self.base < upto:
            k = min(upto - self.base, len(self.acc))
            ws = self.wsum[:k]
            cover = ws > 0
            vals = np.where(cover[:, :, None], self.acc[:k] / np.where(cover, ws, 1.0)[:, :, None], 0.0)
            self.planes.write_rows(self.base, vals.astype(np.float32))
            self.mask.write_rows(self.base, cover.astype(np.uint8) * 255)
            self.tissue_pixels += int(cover.sum())
            rest = len(self.acc) - k
            self.acc[:rest] = self.acc[k:]
            self.wsum[:rest] = self.wsum[k:]
            self.acc[rest:] = 0
            self.wsum[rest:] = 0
            self.base += k

    def finish(self) -> None:
        """Write the remaining rows (every tile must have been added)."""
        if self._next < len(self._rows):
            raise RuntimeError(f"{int(self._left.sum())} tiles were never added")
        self._flush(self.h)


class DenseLevels:
    """The pyramid of a dense map in raw scratch files: level 0 = ``planes``, each next level the 2x2 area mean
    (:func:`hex.infer.map_formats.downsample2`) of the one before, built band by band. A
    :class:`hex.infer.map_formats.PlaneSource` for :func:`write_ome_pyramid`."""

    def __init__(self, planes: RawPlanes, folder: Path, tile: int = OME_TILE):
        c, h, w = planes.shape
        self.shape = (h, w, c)
        self.shapes = pyramid_shapes((h, w), min_side=tile)
        self.levels = [planes]
        band = 2 * tile
        for lev, (hl, wl) in enumerate(self.shapes[1:], start=1):
            prev = self.levels[-1]
            cur = RawPlanes(folder / f"level{lev}.f32", c, hl, wl)
            for ch in range(c):
                for y in range(0, prev.shape[1], band):
                    part = downsample2(prev.read(ch, y, min(y + band, prev.shape[1])))
                    cur.write_plane_rows(ch, y // 2, part)
            self.levels.append(cur)

    def band(self, level: int, channel: int, y0: int, y1: int) -> np.ndarray:
        return self.levels[level].read(channel, y0, y1)

    def close(self) -> None:
        for lv in self.levels[1:]:
            lv.close()


# ----------------------------------------------------------------------------------------------------------------
# paths and the description


def dense_paths(out_dir: str | Path, slide_id: str) -> dict[str, Path]:
    """``{"ome": {slide}_dense.ome.tif, "preview": {slide}_dense_preview.png}`` in ``out_dir`` (virtual_codex/)."""
    d = Path(out_dir)
    return {"ome": d / f"{slide_id}_dense.ome.tif", "preview": d / f"{slide_id}_dense_preview.png"}


def dense_outputs(out: str | Path, slide_id: str) -> list[Path]:
    """The dense files of ``slide_id`` under the OUT root ``out`` (done-record outputs of stage 06 with --dense)."""
    return list(dense_paths(art.VIRTUAL_CODEX.dir(out), slide_id).values())


def _ome_description(xml: str) -> str | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for el in root.iter():
        if el.tag.endswith("}Description") or el.tag == "Description":
            return el.text
    return None


def dense_description(ome_path: str | Path) -> dict[str, Any] | None:
    """The description (JSON) a dense OME-TIFF carries in its OME Image Description, or None (no file, another
    file)."""
    import tifffile

    p = Path(ome_path)
    if not p.is_file():
        return None
    try:
        with tifffile.TiffFile(p) as t:
            text = _ome_description(t.ome_metadata or "")
        rec = json.loads(text) if text else None
    except (OSError, ValueError, tifffile.TiffFileError):
        return None
    return rec if isinstance(rec, dict) and "cell_px_level0" in rec else None


def attach_dense_record(out_dir: str | Path, slide_id: str) -> bool:
    """Put the dense map's description (from its OME-TIFF) under key ``dense`` of ``{slide}.json`` when it is not
    there already; True when the record changed. No map record or no dense map: nothing to do."""
    rec_path = Path(out_dir) / f"{slide_id}.json"
    desc = dense_description(dense_paths(out_dir, slide_id)["ome"])
    if desc is None or not rec_path.is_file():
        return False
    rec = json.loads(rec_path.read_text())
    if rec.get("dense") == desc:
        return False
    rec["dense"] = desc
    write_json(rec_path, rec)
    return True


# ----------------------------------------------------------------------------------------------------------------
# the preview


def _preview_window(mask: RawMask, cells: int = PREVIEW_CELLS, block: int = 16) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) map px of the window of up to ``cells`` x ``cells`` with the most tissue (blocks of
    ``block`` px counted row band by row band)."""
    h, w = mask.shape
    hb, wb = -(-h // block), -(-w // block)
    counts = np.zeros((hb, wb), np.int64)
    for by in range(hb):
        rows = mask.read(by * block, min(h, (by + 1) * block)) > 0
        pad = np.zeros((rows.shape[0], wb * block), bool)
        pad[:, :w] = rows
        counts[by] = pad.reshape(rows.shape[0], wb, block).sum(axis=(0, 2))
    kh, kw = min(hb, -(-min(cells, h) // block)), min(wb, -(-min(cells, w) // block))
    cs = np.zeros((hb + 1, wb + 1), np.int64)
    cs[1:, 1:] = counts.cumsum(0).cumsum(1)
    tot = cs[kh:, kw:] - cs[:-kh, kw:] - cs[kh:, :-kw] + cs[:-kh, :-kw]
    by, bx = np.unravel_index(int(np.argmax(tot)), tot.shape)
    hh, ww = min(cells, h), min(cells, w)
    y0 = min(int(by) * block, h - hh)
    x0 = min(int(bx) * block, w - ww)
    return y0, y0 + hh, x0, x0 + ww


def write_dense_preview(path: Path, levels: DenseLevels, mask: RawMask, markers: Sequence[str], show: Sequence[str],
                        cell_px: int, mpp: float, he_path: Path | None, title: str = "") -> list[int]:
    """PNG: the H&E of the window with most tissue (:func:`_preview_window`) beside ``show`` markers at one pixel
    per cell (1st-99th percentile of the window's tissue pixels, grey outside tissue); returns the window
    [y0, y1, x0, x1] in map px."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y0, y1, x0, x1 = _preview_window(mask)
    m = mask.read(y0, y1)[:, x0:x1] > 0
    ext = ((x0 * cell_px - 0.5) * mpp, (x1 * cell_px - 0.5) * mpp, (y1 * cell_px - 0.5) * mpp,
           (y0 * cell_px - 0.5) * mpp)  # µm, y down
    panels = len(show) + (1 if he_path is not None else 0)
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.4), squeeze=False)
    k = 0
    if he_path is not None:
        from PIL import Image

        from preprocess.slide_io import HESlide

        with HESlide(he_path) as s:
            side0 = (x1 - x0) * cell_px
            lev = s.best_level_for_downsample(max(1.0, side0 / 768))
            ds = s.level_downsamples[lev]
            wl = max(1, int(round((x1 - x0) * cell_px / ds)))
            hl = max(1, int(round((y1 - y0) * cell_px / ds)))
            rgb = s.read_region(x0 * cell_px, y0 * cell_px, lev, (wl, hl))
        if max(rgb.shape[:2]) > 768:
            f = 768 / max(rgb.shape[:2])
            rgb = np.asarray(Image.fromarray(rgb).resize((max(1, round(rgb.shape[1] * f)),
                                                          max(1, round(rgb.shape[0] * f))), Image.BILINEAR))
        axes[0, 0].imshow(rgb, extent=ext, interpolation="bilinear")
        axes[0, 0].set_title("H&E", fontsize=9)
        k = 1
    cmap = plt.get_cmap("magma").with_extremes(bad="0.85")
    for name in show:
        ci = list(markers).index(name)
        plane = levels.band(0, ci, y0, y1)[:, x0:x1]
        vals = plane[m]
        lo, hi = np.percentile(vals, [1, 99]) if vals.size else (0.0, 1.0)
        hi = hi if hi > lo else lo + 1e-6
        ax = axes[0, k]
        im = ax.imshow(np.where(m, plane, np.nan), cmap=cmap, vmin=lo, vmax=hi, extent=ext, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
        k += 1
    for ax in axes[0]:
        ax.set_xlabel("µm", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle(f"{title}  dense virtual CODEX (normalised units), pixel = one cell of {cell_px} px "
                 f"= {cell_px * mpp:.3g} µm", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return [int(y0), int(y1), int(x0), int(x1)]


# ----------------------------------------------------------------------------------------------------------------
# one slide


@dataclass(frozen=True)
class DenseConfig:
    """Settings of the dense pass: the output folder, ``patch`` = the patch pass's grid, tissue, reading and batch
    settings (:class:`hex.infer.predictions.InferConfig`, the same flags), ``stride`` px at the target mpp of the
    dense tiles (None = a quarter of the tile) and the preview's markers."""

    out_dir: Path
    patch: InferConfig
    stride: int | None = None
    preview_markers: list[str] | None = None


def dense_patch_size(slide_id: str, cfg: DenseConfig) -> int:
    """The tile side (px at the target mpp) of the dense pass of a slide: ``--patch-size``, else its stage-01
    grid's, else 224 (as the patch pass)."""
    if cfg.patch.patch_size:
        return int(cfg.patch.patch_size)
    if cfg.patch.grid_dir is not None and (Path(cfg.patch.grid_dir) / f"{slide_id}.h5").is_file():
        from preprocess.patch import read_grid

        return int(read_grid(Path(cfg.patch.grid_dir) / f"{slide_id}.h5")[1]["patch_size"])
    return 224


def model_grid(model: torch.nn.Module) -> int:
    """G of a model with a dense head (``model.dense_grid``), 0 without one."""
    g = int(getattr(model, "dense_grid", 0) or 0)
    return g if g > 0 and hasattr(model, "forward_dense") else 0


def dense_slide(slide_id: str, he_path: Path, model: torch.nn.Module, meta: dict[str, Any], cfg: DenseConfig,
                device: torch.device, amp: torch.dtype | None = None, progress: bool = False) -> dict[str, Any]:
    """The dense pass of one slide -> ``{slide}_dense.ome.tif`` and ``{slide}_dense_preview.png`` in
    ``cfg.out_dir``; returns the description (the ``dense`` key of ``{slide}.json``) with ``seconds``,
    ``tiles_per_s`` and ``max_band_rows`` added.

    ``model.forward_dense(x (B,3,S,S)) -> (pred, feat, dense (B,M,G,G))``; ``meta``: ``markers``, ``input_size``,
    ``mean``, ``std``, ``interpolation``, ``checkpoint`` (as :func:`hex.trained_model.load_trained`).
    """
    import torch

    from hex.data.transforms import BatchTransform
    from hex.evaluate.predict import autocast
    from hex.infer.tiles import make_tile_loader, tissue_tiles

    grid = model_grid(model)
    if not grid:
        raise PipelineError(f"--dense: the checkpoint {meta.get('checkpoint')} has no dense head (dense_grid 0); "
                            "train one with --dense-grid 16 (DENSE=1 bash scripts/04_train_hex.sh) or drop --dense")
    t0 = time.perf_counter()
    markers = list(meta["markers"])
    size = dense_patch_size(slide_id, cfg)
    stride = dense_stride(size, grid, cfg.stride)
    pc = cfg.patch
    tiles, _frac, info = tissue_tiles(he_path, size, stride, pc.target_mpp, pc.min_tissue, pc.thumb_size, pc.mpp,
                                      pc.region_px)
    p0, s0 = tiles.patch_size_level0, int(info["stride_level0"])
    if p0 % grid or s0 % (p0 // grid):
        raise PipelineError(f"{he_path}: tiles of {p0} level-0 px ({size} px at {cfg.patch.target_mpp} µm/px, slide "
                            f"{tiles.mpp:g} µm/px) do not split into the model's {grid} x {grid} cells with a stride "
                            f"of {s0} level-0 px on the cell lattice; give --mpp or a --target-mpp matching a "
                            "pyramid level of the slide")
    c = p0 // grid
    mpp = float(tiles.mpp)
    w0, h0 = tiles.dimensions
    hh, ww = map_shape(w0, h0, c)
    tiles.regions = row_regions(tiles.coords, p0, int(round(cfg.patch.region_px * tiles.downsample)))
    cells = tiles.coords[:, ::-1] // c  # (row, col) of each tile's top-left cell
    paths = dense_paths(cfg.out_dir, slide_id)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    n = tiles.num_tiles
    if n == 0:
        log.warning("%s: no tissue tile for the dense pass (--min-tissue %s); the dense map is all zero", slide_id,
                    cfg.patch.min_tissue)
    with tempfile.TemporaryDirectory(dir=cfg.out_dir, prefix=f".{slide_id}_dense_") as scratch:
        planes = RawPlanes(Path(scratch) / "level0.f32", len(markers), hh, ww)
        mask = RawMask(Path(scratch) / "mask.u8", hh, ww)
        levels = None
        try:
            accum = BandAccumulator((hh, ww), len(markers), grid, blend_window(grid), cells[:, 0], planes, mask)
            t_model = time.perf_counter()
            if n:
                tf = BatchTransform(int(meta["input_size"]), meta["mean"], meta["std"], train=False,
                                    interpolation=meta.get("interpolation") or "bilinear",
                                    stain_norm=meta.get("stain_norm"))
                loader = make_tile_loader(tiles, pc.batch_size, pc.workers, pin_memory=device.type == "cuda")
                from tqdm import tqdm

                model.eval()
                with tqdm(total=n, desc=f"{slide_id} dense", unit="tile", disable=not progress, leave=False) as bar, \
                        torch.inference_mode():
                    for imgs, idx in loader:
                        x = tf(imgs.to(device, non_blocking=True))
                        with autocast(device, amp):
                            _pred, _feat, dense = model.forward_dense(x)
                        d = dense.float().cpu().numpy()
                        if d.shape[1:] != (len(markers), grid, grid):
                            raise PipelineError(f"the model's dense output is {tuple(d.shape[1:])}, expected "
                                                f"({len(markers)}, {grid}, {grid}) (markers, grid, grid)")
                        accum.add(cells[idx.numpy()], d)
                        bar.update(len(idx))
            accum.finish()
            t_model = time.perf_counter() - t_model
            levels = DenseLevels(planes, Path(scratch))
            shown = choose_preview_markers(markers, cfg.preview_markers)[:3]
            desc = {"file": paths["ome"].name, "preview": paths["preview"].name, "grid": grid,
                    "patch_size": size, "patch_size_level0": p0, "cell_px_level0": c, "mpp": mpp, "cell_um": c * mpp,
                    "shape": [hh, ww, len(markers)], "dtype": DTYPE, "stride": stride, "stride_level0": s0,
                    "window": WINDOW, "window_floor": WINDOW_FLOOR, "n_tiles": int(n),
                    "tissue_pixels": int(accum.tissue_pixels), "markers": markers,
                    "levels": [list(s) for s in levels.shapes], "preview_markers": shown,
                    "origin": "pixel (r, q) covers level-0 x in [q c - 0.5, (q+1) c - 0.5), y in [r c - 0.5, "
                              "(r+1) c - 0.5); 0 and mask 0 where no tile",
                    "checkpoint": meta.get("checkpoint"), "units": "normalised (as the patch predictions)"}
            write_ome_pyramid(paths["ome"], levels, markers, c * mpp, name=f"{slide_id} dense",
                              description=json.dumps(desc), tile=OME_TILE,
                              mask=lambda y0, y1: mask.read(y0, y1))
            desc["preview_window"] = write_dense_preview(paths["preview"], levels, mask, markers, shown, c, mpp,
                                                         he_path, title=slide_id)
        finally:
            if levels is not None:
                levels.close()
            planes.close()
            mask.close()
    dt = time.perf_counter() - t0
    log.info("%s: dense map %dx%dx%d (cell %.3g µm), %d tiles, %.1f tiles/s -> %s", slide_id, hh, ww, len(markers),
             c * mpp, n, n / max(t_model, 1e-9), paths["ome"])
    return {**desc, "seconds": dt, "tiles_per_s": n / max(t_model, 1e-9), "max_band_rows": accum.max_band_rows}


# ----------------------------------------------------------------------------------------------------------------
# reading


class DenseValues:
    """Lazy (H, W, M) float32 view of a dense OME-TIFF's level 0: ``values[y0:y1, x0:x1]`` reads only the tiles it
    needs (tifffile + zarr); ``np.asarray(values)`` reads it all."""

    def __init__(self, tif: Any, level: int = 0):
        import zarr

        self._z = zarr.open(tif.series[0].aszarr(level=level), mode="r")  # (C, H, W)
        c, h, w = self._z.shape
        self.shape = (int(h), int(w), int(c))

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        ys, xs = key
        return np.asarray(self._z[:, ys, xs], np.float32).transpose(1, 2, 0)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self[:, :]
        return a.astype(dtype) if dtype is not None else a


@dataclass
class DenseMap:
    """One slide's dense virtual CODEX (see the module docstring): ``values`` (H, W, M) float32 (a lazy
    :class:`DenseValues` from :func:`read_dense_map`, or an array), ``mask`` (H, W) bool (tissue), ``markers``,
    ``cell_px_level0`` c, ``mpp`` (level-0 µm/px). Pixel (r, q) is centred at level-0 ((q + 1/2) c - 1/2,
    (r + 1/2) c - 1/2). Close it (or use it as a context manager) to release the file."""

    values: Any
    mask: np.ndarray
    markers: list[str]
    cell_px_level0: float
    mpp: float
    path: Path | None = None
    _tif: Any = None

    @property
    def cell_um(self) -> float:
        """Side of a dense pixel, µm."""
        return float(self.cell_px_level0 * self.mpp)

    def close(self) -> None:
        if self._tif is not None:
            self._tif.close()
            self._tif = None

    def __enter__(self) -> DenseMap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def dense_record(out: str | os.PathLike, slide: str) -> dict[str, Any] | None:
    """The ``dense`` entry of ``OUT/virtual_codex/{slide}.json`` when the slide has a dense map file, else None."""
    rec_path = art.VIRTUAL_CODEX.path(out, slide)
    try:
        rec = json.loads(Path(rec_path).read_text()).get("dense")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(rec, dict):
        return None
    return rec if (Path(rec_path).parent / str(rec.get("file", ""))).is_file() else None


def has_dense_map(out: str | os.PathLike, slide: str) -> bool:
    """True when stage 06 made a dense map of ``slide`` (``--dense``) under the OUT root ``out``."""
    return dense_record(out, slide) is not None


def read_dense_map(out: str | os.PathLike, slide: str, markers: Sequence[str] | None = None) -> DenseMap:
    """The dense map of ``slide`` under the OUT root ``out``: lazy values, the tissue mask in memory. ``markers``:
    check these are among the map's. A slide without one, or an unreadable file, is a :class:`PipelineError`."""
    import tifffile

    rec = dense_record(out, slide)
    vc = art.VIRTUAL_CODEX.dir(out)
    if rec is None:
        raise PipelineError(f"{slide} has no dense virtual CODEX in {vc} (no 'dense' entry in {slide}.json or no "
                            f"{slide}_dense.ome.tif); run stage 06 with --dense (DENSE=1 bash scripts/06_infer_wsi.sh)")
    path = vc / rec["file"]
    try:
        tif = tifffile.TiffFile(path)
        values = DenseValues(tif)
        mask = tif.series[1].asarray() > 0 if len(tif.series) > 1 else None
    except Exception as e:  # noqa: BLE001 - tifffile/zarr raise many types for a damaged file
        raise PipelineError(f"cannot read the dense map {path} ({type(e).__name__}: {e}); rerun stage 06 with "
                            "--dense --overwrite for this slide") from None
    names = list(rec["markers"])
    if mask is None or values.shape != (*mask.shape, len(names)):
        tif.close()
        raise PipelineError(f"{path} is not a dense map of {len(names)} markers with a tissue mask; rerun stage 06 "
                            "with --dense --overwrite for this slide")
    missing = [m for m in (markers or []) if m not in names]
    if missing:
        tif.close()
        raise PipelineError(f"the dense map {path} lacks the markers {missing[:5]}")
    return DenseMap(values=values, mask=mask, markers=names, cell_px_level0=float(rec["cell_px_level0"]),
                    mpp=float(rec["mpp"]), path=path, _tif=tif)


def sample_dense_map(dmap: DenseMap, xy_level0: np.ndarray, block: int = 256) -> np.ndarray:
    """Markers of the dense map at level-0 points: (N, M) float32.

    Bilinear interpolation between the centres of the four nearest pixels (pixel (r, q) centred at
    ((q + 1/2) c - 1/2, (r + 1/2) c - 1/2)), each neighbour weighted by the mask (no value leaks in from outside the
    tissue); NaN where none of the four is tissue. The values are read in windows of ``block`` pixels, so a lazy
    map reads each tile about once.
    """
    xy = np.asarray(xy_level0, np.float64).reshape(-1, 2)
    h, w = dmap.mask.shape
    m = len(dmap.markers)
    out = np.full((len(xy), m), np.nan, np.float32)
    if not len(xy):
        return out
    c = float(dmap.cell_px_level0)
    u, v = (xy[:, 0] + 0.5) / c - 0.5, (xy[:, 1] + 0.5) / c - 0.5
    c0, r0 = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    near = (r0 >= -1) & (r0 < h) & (c0 >= -1) & (c0 < w)
    key = np.clip(r0, 0, h - 1) // block * (w // block + 1) + np.clip(c0, 0, w - 1) // block
    for k in np.unique(key[near]):
        sel = np.flatnonzero(near & (key == k))
        ya, xa = max(0, int(r0[sel].min())), max(0, int(c0[sel].min()))
        yb, xb = min(h, int(r0[sel].max()) + 2), min(w, int(c0[sel].max()) + 2)
        win = np.asarray(dmap.values[ya:yb, xa:xb], np.float32)
        vals, good = sample_map(win, dmap.mask[ya:yb, xa:xb], c, xy[sel], origin=(ya, xa))
        out[sel[good]] = vals[good]
    return out
