"""Writers of the virtual CODEX outputs: pyramidal OME-TIFF, QuPath GeoJSON detections and the preview figure.

Each writer takes arrays that :func:`hex.infer.maps.accumulate_map` produced (a map (H', W', M) whose pixel is
one stride step s of the slide's level 0) and writes one file atomically (temp file, then ``os.replace``).

- OME-TIFF: one Image, axes CYX, float32, M channels named with the markers in the OME-XML, tiled and
  zlib-compressed, lower resolutions (2x area means) in SubIFDs, ``PhysicalSizeX/Y`` = s x mpp in µm. QuPath
  (Bio-Formats) and napari (tifffile) then scale it onto the H&E without manual settings.
  The writer also takes a :class:`PlaneSource` (bands of rows per level and channel) instead of an array, so a map
  larger than memory (the dense map of :mod:`hex.infer.dense_maps`) is written tile by tile, with an optional
  second OME Image "tissue mask".
- GeoJSON: a FeatureCollection with one Polygon per tile in level-0 px, ``properties.objectType = "detection"``
  and ``properties.measurements = {marker: value}`` (QuPath >= 0.4 conventions, read by *File > Import objects*;
  the feature ``id`` is a UUID, which QuPath keeps as the object's id). Features follow the rows of the
  prediction file, so feature i is tile i.
- Preview markers: :func:`choose_preview_markers` (the user's names matched loosely, else informative defaults).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from pipeline.errors import PipelineError
from pipeline.io import atomic_path

log = logging.getLogger(__name__)

DEFAULT_PREVIEW_MARKERS = ("Pan-Cytokeratin", "CD8", "CD68", "CD20", "Ki67", "PD-L1", "CD31", "aSMA")


# ----------------------------------------------------------------------------------------------------------------
# OME-TIFF


def downsample2(img: np.ndarray) -> np.ndarray:
    """Area mean of 2x2 blocks of a 2-D image -> (ceil(h/2), ceil(w/2)) float32; edge blocks average the pixels
    they have (odd sizes are not padded with zeros)."""
    h, w = img.shape
    ph, pw = h + (h % 2), w + (w % 2)
    s = np.zeros((ph, pw), np.float32)
    s[:h, :w] = img
    n = np.zeros((ph, pw), np.float32)
    n[:h, :w] = 1.0
    s = s.reshape(ph // 2, 2, pw // 2, 2).sum(axis=(1, 3))
    n = n.reshape(ph // 2, 2, pw // 2, 2).sum(axis=(1, 3))
    return s / n


def pyramid_shapes(shape: tuple[int, int], min_side: int = 256) -> list[tuple[int, int]]:
    """(H, W) of every pyramid level: level 0 = ``shape``, each next one halved (ceil) while the previous level's
    longest side exceeds ``min_side``."""
    shapes = [(int(shape[0]), int(shape[1]))]
    while max(shapes[-1]) > min_side:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


class PlaneSource(Protocol):
    """Bands of rows of one channel of one pyramid level, so a writer never needs the whole image in memory.

    ``shape`` is level 0's (H, W, C); level l has :func:`pyramid_shapes`' l-th (H, W) (each level the 2x2 area mean
    of the one before, :func:`downsample2`). ``band(level, channel, y0, y1)`` returns rows [y0, y1) of that plane,
    (y1 - y0, W_level) float32."""

    shape: tuple[int, int, int]

    def band(self, level: int, channel: int, y0: int, y1: int) -> np.ndarray: ...


class ArraySource:
    """A :class:`PlaneSource` over an (H, W, C) array in memory (the channel's plane is downsampled on demand; the
    last (channel, level) plane is cached)."""

    def __init__(self, image: np.ndarray):
        self.image = image
        self.shape = tuple(int(v) for v in image.shape)
        self._key: tuple[int, int] | None = None
        self._plane: np.ndarray | None = None

    def band(self, level: int, channel: int, y0: int, y1: int) -> np.ndarray:
        if self._key != (level, channel):
            plane = np.ascontiguousarray(self.image[:, :, channel], dtype=np.float32)
            for _ in range(level):
                plane = downsample2(plane)
            self._key, self._plane = (level, channel), plane
        return self._plane[y0:y1]  # type: ignore[index]


def write_ome_pyramid(path: str | os.PathLike, image: np.ndarray | PlaneSource, channel_names: Sequence[str],
                      pixel_size_um: float, *, name: str | None = None, description: str | None = None,
                      tile: int = 256, compression: str = "zlib",
                      mask: Callable[[int, int], np.ndarray] | None = None) -> list[tuple[int, int]]:
    """Write ``image`` (H, W, C) as a pyramidal float32 OME-TIFF with axes CYX.

    Args:
        path: the ``.ome.tif`` file (written atomically).
        image: (H, W, C) array, rows = y, written channel by channel (no full (C, H, W) copy is made); or a
            :class:`PlaneSource` giving bands of rows of each level (memory then stays one band of ``tile`` rows).
        channel_names: C names, stored as OME ``Channel/@Name``.
        pixel_size_um: level-0 pixel side in µm (``PhysicalSizeX/Y``, also the TIFF resolution tags).
        name: OME ``Image/@Name``; description: OME ``Image/Description``.
        tile: TIFF tile side (multiple of 16); levels halve until the longest side is <= ``tile``.
        compression: a tifffile compression name (zlib: readable by Bio-Formats/QuPath and every tifffile).
        mask: ``(y0, y1) -> (y1 - y0, W) uint8`` rows of a level-0 tissue mask, written as a second OME Image
            "tissue mask" (YX uint8, 255 = tissue; ``series[1]`` in tifffile); None = no mask image.

    Returns the (H, W) of every level (level 0 first).
    """
    import tifffile

    src: PlaneSource = image if not isinstance(image, np.ndarray) else ArraySource(image)
    h, w, c = src.shape
    if len(channel_names) != c:
        raise ValueError(f"{c} channels but {len(channel_names)} names")
    if not pixel_size_um > 0:
        raise ValueError(f"pixel size must be > 0 µm, got {pixel_size_um}")
    shapes = pyramid_shapes((h, w), min_side=tile)
    res = 1e4 / pixel_size_um  # pixels per cm
    opts = dict(photometric="minisblack", tile=(tile, tile), compression=compression, resolutionunit="CENTIMETER")

    def tiles(level: int) -> Iterator[np.ndarray]:
        hl, wl = shapes[level]
        for ci in range(c):
            for y in range(0, hl, tile):
                band = np.asarray(src.band(level, ci, y, min(y + tile, hl)), dtype=np.float32)
                for x in range(0, wl, tile):
                    yield band[:, x:x + tile]

    def mask_tiles() -> Iterator[np.ndarray]:
        for y in range(0, h, tile):
            band = np.asarray(mask(y, min(y + tile, h)), dtype=np.uint8)  # type: ignore[misc]
            for x in range(0, w, tile):
                yield band[:, x:x + tile]

    metadata = {"axes": "CYX", "Channel": {"Name": [str(n) for n in channel_names]},
                "PhysicalSizeX": float(pixel_size_um), "PhysicalSizeXUnit": "µm",
                "PhysicalSizeY": float(pixel_size_um), "PhysicalSizeYUnit": "µm"}
    if name:
        metadata["Name"] = name
    if description:
        metadata["Description"] = description
    with atomic_path(path, suffix=".ome.tif") as tmp, tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
        tif.write(tiles(0), shape=(c, *shapes[0]), dtype=np.float32, subifds=len(shapes) - 1,
                  resolution=(res, res), metadata=metadata, **opts)
        for lev in range(1, len(shapes)):
            f = 2**lev
            tif.write(tiles(lev), shape=(c, *shapes[lev]), dtype=np.float32, subfiletype=1,
                      resolution=(res / f, res / f), metadata=None, **opts)
        if mask is not None:
            tif.write(mask_tiles(), shape=(h, w), dtype=np.uint8, resolution=(res, res),
                      metadata={"axes": "YX", "Name": "tissue mask", "PhysicalSizeX": float(pixel_size_um),
                                "PhysicalSizeXUnit": "µm", "PhysicalSizeY": float(pixel_size_um),
                                "PhysicalSizeYUnit": "µm"}, **opts)
    return shapes


# ----------------------------------------------------------------------------------------------------------------
# GeoJSON (QuPath detections)


def _tile_uuid(slide_id: str, index: int) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"hex-virtual-codex/{slide_id}/{index}"))


def write_geojson(path: str | os.PathLike, coords: np.ndarray, values: np.ndarray, patch_size_level0: float,
                  markers: Sequence[str], slide_id: str, decimals: int = 4) -> int:
    """Write one FeatureCollection: a closed 5-point Polygon per tile (level-0 px, x right, y down) with the
    predictions as QuPath measurements. Returns the number of features.

    Args:
        coords: (N, 2) level-0 top-left x, y of each tile. values: (N, M) predictions (``markers`` order).
        patch_size_level0: tile side in level-0 px. decimals: digits after the point of the measurements.

    Non-finite predictions are left out of that tile's measurements (JSON has no NaN) with a warning.
    Features are formatted from one template and streamed to the file, so memory stays small for many tiles.
    """
    coords = np.asarray(coords)
    values = np.asarray(values, dtype=np.float64).reshape(len(coords), len(markers))
    p = float(patch_size_level0)
    integral = p.is_integer() and np.issubdtype(coords.dtype, np.integer)
    num = "%d" if integral else "%.3f"
    corners = ",".join([f"[{num},{num}]"] * 5)
    keys = [json.dumps(str(m), ensure_ascii=False).replace("%", "%%") for m in markers]
    head = ('{"type":"Feature","id":"%s","geometry":{"type":"Polygon","coordinates":[[' + corners + ']]},'
            '"properties":{"objectType":"detection","measurements":{')
    full = head + ",".join(f"{k}:%.{int(decimals)}f" for k in keys) + "}}}"
    finite = np.isfinite(values).all(axis=1)
    if not finite.all():
        log.warning("%s: %d tiles with non-finite predictions; those values are left out of the GeoJSON",
                    slide_id, int((~finite).sum()))
    xy = coords.astype(np.int64 if integral else np.float64).tolist()
    d = int(p) if integral else p
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write('{"type":"FeatureCollection","features":[')
        for i, ((x0, y0), row) in enumerate(zip(xy, values.tolist())):
            x1, y1 = x0 + d, y0 + d
            ring = (x0, y0, x1, y0, x1, y1, x0, y1, x0, y0)
            if i:
                f.write(",")
            if finite[i]:
                f.write(full % (_tile_uuid(slide_id, i), *ring, *row))
            else:
                meas = ",".join(f"{k.replace('%%', '%')}:{v:.{int(decimals)}f}" for k, v in zip(keys, row)
                                if math.isfinite(v))
                f.write((head % (_tile_uuid(slide_id, i), *ring)) + meas + "}}}")
        f.write("]}\n")
    return len(coords)


# ----------------------------------------------------------------------------------------------------------------
# preview


def _display_map(plane: np.ndarray, max_side: int) -> np.ndarray:
    while max(plane.shape) > max_side:
        plane = downsample2(plane)
    return plane


def write_preview(path: str | os.PathLike, image: np.ndarray, mask: np.ndarray, markers: Sequence[str],
                  show: Sequence[str], stride_level0: float, mpp: float,
                  thumbnail: tuple[np.ndarray, float] | None = None, title: str = "",
                  max_side: int = 800) -> None:
    """PNG: the H&E thumbnail (when given, as (rgb, level-0 px per thumbnail px)) beside one panel per marker of
    ``show``, each with its own colour bar (1st-99th percentile of the tissue pixels). All panels are drawn in
    level-0 px, so the H&E and the maps line up; pixels without tissue are grey.

    Args:
        image: (H', W', M) map; mask: (H', W') bool; markers: the M names; show: names to draw (subset of markers).
        stride_level0: map pixel side in level-0 px; mpp: level-0 µm/px (for the scale in the title).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = [list(markers).index(m) for m in show]
    n = len(idx)
    hmap, wmap = mask.shape
    extent = (0, wmap * stride_level0, hmap * stride_level0, 0)  # level-0 px, y down
    ncol_m = max(1, math.ceil(n / 2)) if n > 3 else max(1, n)
    nrow_m = 2 if n > 3 else 1
    has_he = thumbnail is not None
    ncol = ncol_m + (2 if has_he else 0)
    aspect = (hmap / max(wmap, 1)) if wmap else 1.0
    fig = plt.figure(figsize=(2.6 * ncol, 2.6 * nrow_m * min(max(aspect, 0.5), 2.0) + 0.6))
    gs = fig.add_gridspec(nrow_m, ncol)
    if has_he:
        rgb, ds = thumbnail
        ax = fig.add_subplot(gs[:, :2])
        ax.imshow(rgb, extent=(0, rgb.shape[1] * ds, rgb.shape[0] * ds, 0), interpolation="bilinear")
        ax.set_title("H&E")
        ax.set_xlim(0, max(extent[1], rgb.shape[1] * ds))
        ax.set_ylim(max(extent[2], rgb.shape[0] * ds), 0)
        ax.set_xticks([])
        ax.set_yticks([])
    m_small = _display_map(mask.astype(np.float32), max_side) > 0
    for k, ci in enumerate(idx):
        ax = fig.add_subplot(gs[k // ncol_m, (2 if has_he else 0) + k % ncol_m])
        plane = _display_map(np.asarray(image[:, :, ci], dtype=np.float32), max_side)
        vals = plane[m_small]
        lo, hi = (np.percentile(vals, [1, 99]) if vals.size else (0.0, 1.0))
        hi = hi if hi > lo else lo + 1e-6
        shown = np.where(m_small, plane, np.nan)
        cmap = plt.get_cmap("magma").with_extremes(bad="0.85")
        im = ax.imshow(shown, cmap=cmap, vmin=lo, vmax=hi, extent=extent, interpolation="nearest")
        if has_he:
            rgb, ds = thumbnail
            ax.set_xlim(0, max(extent[1], rgb.shape[1] * ds))
            ax.set_ylim(max(extent[2], rgb.shape[0] * ds), 0)
        ax.set_title(markers[ci], fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        cb.ax.tick_params(labelsize=6)
    fig.suptitle(f"{title}  virtual CODEX (normalised units), map pixel = {stride_level0:g} px "
                 f"= {stride_level0 * mpp:.3g} µm", fontsize=9)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def choose_preview_markers(markers: Sequence[str], wanted: Sequence[str] | None) -> list[str]:
    """``wanted`` matched to ``markers`` (case/punctuation ignored; an unknown name is a :class:`PipelineError`),
    else the informative defaults present, else the first 8."""
    by = {_norm(m): m for m in markers}
    if wanted:
        unknown = [w for w in wanted if _norm(w) not in by]
        if unknown:
            raise PipelineError(f"--preview-markers {unknown} are not among the predicted markers {list(markers)}")
        return [by[_norm(w)] for w in wanted]
    chosen = [by[_norm(w)] for w in DEFAULT_PREVIEW_MARKERS if _norm(w) in by]
    return chosen or list(markers[:8])
