"""Tile predictions onto a map, and reading the prediction files of ``hex.infer_wsi`` (``hex_pred/{slide}.h5``).

The map geometry (one map pixel per stride step, coverage rule, canvas) is described in :mod:`hex.virtual_codex`,
which writes the maps; everything here is importable from ``hex.virtual_codex`` too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError

log = logging.getLogger("hex.virtual_codex")


# ----------------------------------------------------------------------------------------------------------------
# the map


def coverage_ranges(coords: np.ndarray, patch_size_level0: float,
                    stride_level0: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Map rows [r0, r1) and columns [c0, c1) each tile covers (before clipping to a canvas), int64 (N,) each.

    Pixel c is covered when x <= (c + 0.5)*s < x + P, i.e. c0 = ceil(x/s - 1/2), c1 = ceil((x + P)/s - 1/2)
    (exact for integer and half-integer inputs in float64).
    """
    xy = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    s, p = float(stride_level0), float(patch_size_level0)
    lo = np.ceil(xy / s - 0.5).astype(np.int64)
    hi = np.ceil((xy + p) / s - 0.5).astype(np.int64)
    return lo[:, 1], hi[:, 1], lo[:, 0], hi[:, 0]


def accumulate_map(coords: np.ndarray, values: np.ndarray, patch_size_level0: float, stride_level0: float,
                   shape_level0: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Average tile predictions onto a map with one pixel per stride step.

    Args:
        coords: (N, 2) level-0 top-left (x, y) of each tile (px).
        values: (N, M) predictions of each tile.
        patch_size_level0: tile side P in level-0 px. stride_level0: map pixel side s in level-0 px.
        shape_level0: (height, width) of the slide's level 0 in px (numpy order) -> canvas
            (ceil(height/s), ceil(width/s)); None -> the tiles' extent (at least 1 x 1). Tiles are clipped to it.

    Returns:
        map (H', W', M) float32 (mean of the covering tiles, 0 where none) and mask (H', W') bool (covered).
        The coverage rule is :func:`coverage_ranges`' (pixel centre inside the tile).
    """
    coords = np.asarray(coords).reshape(-1, 2)
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2 or len(values) != len(coords):
        raise ValueError(f"values must be (N, M) with N = {len(coords)} tiles, got {values.shape}")
    if not (stride_level0 > 0 and patch_size_level0 > 0):
        raise ValueError(f"patch size and stride must be > 0 (got {patch_size_level0}, {stride_level0})")
    r0, r1, c0, c1 = coverage_ranges(coords, patch_size_level0, stride_level0)
    if shape_level0 is not None:
        hh, ww = (max(1, int(np.ceil(v / float(stride_level0)))) for v in shape_level0)
    else:
        hh = max(1, int(r1.max(initial=0)))
        ww = max(1, int(c1.max(initial=0)))
    m = values.shape[1]
    r0, c0 = np.maximum(r0, 0), np.maximum(c0, 0)
    r1, c1 = np.minimum(r1, hh), np.minimum(c1, ww)
    nrow, ncol = np.maximum(r1 - r0, 0), np.maximum(c1 - c0, 0)
    empty = (nrow == 0) | (ncol == 0)
    if empty.any():
        log.warning("%d of %d tiles cover no map pixel (outside the canvas, or smaller than the stride)",
                    int(empty.sum()), len(coords))
    total = np.zeros((hh * ww, m), np.float32)
    count = np.zeros(hh * ww, np.int32)
    keep = ~empty
    r0, c0, nrow, ncol, vals = r0[keep], c0[keep], nrow[keep], ncol[keep], values[keep]
    start = r0 * ww + c0
    # one tile per start pixel -> each offset pass touches distinct pixels, so fancy-index += is exact and fast
    unique = np.unique(start).size == start.size
    for dr in range(int(nrow.max(initial=0))):
        for dc in range(int(ncol.max(initial=0))):
            sel = (nrow > dr) & (ncol > dc)
            if not sel.any():
                continue
            flat = start[sel] + dr * ww + dc
            if unique:
                total[flat] += vals[sel]
                count[flat] += 1
            else:
                np.add.at(total, flat, vals[sel])
                np.add.at(count, flat, 1)
    mask = count > 0
    total[mask] /= count[mask, None]
    return total.reshape(hh, ww, m), mask.reshape(hh, ww)


# ----------------------------------------------------------------------------------------------------------------
# reading predictions


@dataclass
class SlidePrediction:
    """The content of ``hex_pred/{slide}.h5`` that the maps need (level-0 px, µm)."""

    slide_id: str
    coords: np.ndarray  # (N, 2) int64 level-0 top-left x, y
    values: np.ndarray  # (N, M) float32
    markers: list[str]
    patch_size_level0: float
    stride_level0: float
    mpp: float | None
    he_path: Path | None
    checkpoint: str | None
    slide_size: tuple[int, int] | None  # level-0 (width, height) when the file records it


def _attr_str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _slide_size_from_attrs(attrs) -> tuple[int, int] | None:
    for key in ("slide_dimensions", "level0_dimensions", "dimensions"):
        if key in attrs:
            v = np.asarray(attrs[key]).ravel()
            if v.size == 2:
                return int(v[0]), int(v[1])
    if "slide_width" in attrs and "slide_height" in attrs:
        return int(attrs["slide_width"]), int(attrs["slide_height"])
    return None


def read_prediction(path: str | Path) -> SlidePrediction:
    """Read a ``hex_pred/{slide}.h5`` file; a missing dataset or attribute is a :class:`PipelineError` naming it."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise PipelineError(f"prediction file not found: {path} (run python -m hex.infer_wsi first)")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise PipelineError(f"cannot read the prediction file {path} ({e}); rerun hex.infer_wsi for it") from e
    with f:
        for key in ("coords", "codex_prediction"):
            if key not in f:
                raise PipelineError(f"{path} has no '{key}' dataset; it is not a hex.infer_wsi file (rerun it)")
        a = f.attrs
        for key in ("markers", "patch_size_level0"):
            if key not in a:
                raise PipelineError(f"{path} lacks the attribute '{key}'; rerun hex.infer_wsi for this slide")
        coords = np.asarray(f["coords"][:], dtype=np.int64).reshape(-1, 2)
        values = np.asarray(f["codex_prediction"][:], dtype=np.float32)
        markers = [_attr_str(m) for m in np.asarray(a["markers"]).ravel()]
        if values.ndim != 2 or values.shape != (len(coords), len(markers)):
            raise PipelineError(f"{path}: codex_prediction is {values.shape}, expected ({len(coords)}, "
                                f"{len(markers)}) (tiles x markers); rerun hex.infer_wsi for this slide")
        patch = float(a["patch_size_level0"])
        stride = float(a["stride_level0"]) if "stride_level0" in a else patch
        he = _attr_str(a["he_path"]) if "he_path" in a and _attr_str(a["he_path"]) else None
        return SlidePrediction(
            slide_id=_attr_str(a["slide_id"]) if "slide_id" in a else path.name.split(".", 1)[0],
            coords=coords, values=values, markers=markers, patch_size_level0=patch, stride_level0=stride,
            mpp=float(a["mpp"]) if "mpp" in a else None, he_path=Path(he) if he else None,
            checkpoint=_attr_str(a["checkpoint"]) if "checkpoint" in a else None,
            slide_size=_slide_size_from_attrs(a))
