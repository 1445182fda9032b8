"""Marker values at units (cells or tiles): the virtual CODEX of stage 06 and, where a slide has it, the measured CODEX.

- Virtual, at cells: :func:`sample_map` reads the finest map of the slide (``OUT/virtual_codex/{slide}.npy``: one
  pixel per stride step, pixel (r, c) centred at level-0 ((c + 1/2) s, (r + 1/2) s)) by bilinear interpolation
  between the pixel centres that hold tissue (the mask weights the four neighbours, so no value leaks in from the
  zeros outside tissue). With ``STRIDE=56`` the map has 28 µm pixels: cells inherit the markers of their
  surroundings, not their own. When stage 06 also made the dense map (``--dense``: one pixel per cell, 7 µm,
  ``{slide}_dense.ome.tif``), :func:`read_virtual_map` returns it instead (``source`` "dense", else "patch") and
  :func:`sample_map` samples it the same way (:func:`hex.infer.dense_maps.sample_dense_map`, read lazily).
- Virtual, at tiles: :func:`tile_units` gives every tile of ``OUT/hex_pred/{slide}.h5`` (any stride) with its 40
  predictions, centred at the tile's centre.
- Measured, at cells: :func:`measure_codex_at` maps each H&E point into the CODEX through the stage-02 registration
  (affine + displacement field, :class:`preprocess.quantify.geometry.CodexToHE`) and takes the mean of each channel
  over the pixels of a disk of ``radius_um`` there (the CODEX read block by block with stage 03's tile reader, so a
  million cells read each CODEX pixel about once). Stage 10 rescales these raw means over the cohort
  (:mod:`spatial.analysis`); :func:`normalise_measured` puts them into the labels' units instead, with stage 03's
  ``markers/normalization.json`` (percentiles of 112 µm patch means, so a positive cell sits at or above 1 and is
  clipped there).
- Measured, at tiles: the stage-03 labels (``OUT/markers/{slide}.csv``) of the tiles of the stage-01 grid.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import artifacts as art
from pipeline.errors import PipelineError


@dataclass
class VirtualMap:
    """One slide's virtual CODEX map: ``values`` (H', W', M) float32 in normalised units, ``mask`` (H', W') bool
    (tissue), ``markers`` (M names), ``stride_level0`` (level-0 px per map pixel), ``mpp`` (level-0 µm/px);
    ``source`` "patch" (the stride map ``{slide}.npy``) or "dense" (then ``dense`` is the cell-scale map, ``values``
    its lazy reader and ``stride_level0`` its cell side)."""

    values: Any
    mask: np.ndarray
    markers: list[str]
    stride_level0: float
    mpp: float
    source: str = "patch"
    dense: Any = None

    @property
    def pixel_um(self) -> float:
        """Side of a map pixel, µm."""
        return float(self.stride_level0 * self.mpp)


def virtual_source(out: str | os.PathLike, slide: str) -> str:
    """Which map :func:`read_virtual_map` reads for ``slide``: "dense" (stage 06 ``--dense``) or "patch"."""
    from hex.infer.dense_maps import has_dense_map

    return "dense" if has_dense_map(out, slide) else "patch"


def read_virtual_map(out: str | os.PathLike, slide: str) -> VirtualMap:
    """The stage-06 map of ``slide`` under the OUT root ``out``: its dense map when it has one (see
    :func:`virtual_source`), else the stride map (npy + mask + record); a missing or unreadable one is a
    :class:`PipelineError` naming it and stage 06."""
    from hex.infer.dense_maps import has_dense_map, read_dense_map
    from mica.features.codex_features import load_map

    if has_dense_map(out, slide):
        d = read_dense_map(out, slide)
        return VirtualMap(values=d.values, mask=d.mask, markers=list(d.markers), stride_level0=d.cell_px_level0,
                          mpp=d.mpp, source="dense", dense=d)

    vmap, mask, markers = load_map(out, slide)
    rec_path = art.VIRTUAL_CODEX.path(out, slide)
    try:
        rec = json.loads(Path(rec_path).read_text())
        stride, mpp = float(rec["stride_level0"]), float(rec["mpp"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PipelineError(f"{rec_path} does not give the map's stride_level0 and mpp ({e}); rerun stage 06 "
                            "(scripts/06_infer_wsi.sh) for this slide") from None
    return VirtualMap(values=np.asarray(vmap, np.float32), mask=np.asarray(mask, bool), markers=list(markers),
                      stride_level0=stride, mpp=mpp)


def sample_map(vmap: VirtualMap, xy_px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Markers of the map at level-0 points.

    Args:
        vmap: the slide's map. xy_px: (N, 2) level-0 (x, y) px of the H&E.
    Returns:
        values (N, M) float32 (mask-weighted bilinear interpolation between tissue pixel centres; NaN where none of
        the four neighbours is tissue) and inside (N,) bool (at least one tissue neighbour). A dense map
        (``source`` "dense") is sampled by :func:`hex.infer.dense_maps.sample_dense_map` (its pixel centres).
    """
    if vmap.dense is not None:
        from hex.infer.dense_maps import sample_dense_map

        vals = sample_dense_map(vmap.dense, xy_px)
        return vals, ~np.isnan(vals).all(axis=1)
    from hex.infer.map_sampling import sample_map as sample_values

    return sample_values(vmap.values, vmap.mask, vmap.stride_level0, xy_px)


@dataclass
class TileUnits:
    """Every tile of a slide's ``hex_pred`` file: ``xy_px`` (N, 2) level-0 centres, ``values`` (N, M) predictions,
    ``markers``, ``patch_size_level0``, ``stride_level0``, ``mpp``."""

    xy_px: np.ndarray
    values: np.ndarray
    markers: list[str]
    patch_size_level0: float
    stride_level0: float
    mpp: float | None


def tile_units(out: str | os.PathLike, slide: str) -> TileUnits:
    """The tiles of ``OUT/hex_pred/{slide}.h5`` as units (their centres)."""
    from hex.infer.predictions import read_prediction

    pred = read_prediction(art.PREDICTIONS.path(out, slide))
    centre = pred.coords.astype(np.float64) + pred.patch_size_level0 / 2.0
    return TileUnits(xy_px=centre, values=pred.values, markers=list(pred.markers),
                     patch_size_level0=float(pred.patch_size_level0), stride_level0=float(pred.stride_level0),
                     mpp=float(pred.mpp) if pred.mpp else None)


def measured_tile_labels(out: str | os.PathLike, slide: str, xy_px: np.ndarray, patch_size_level0: float,
                         markers: list[str]) -> np.ndarray | None:
    """The stage-03 labels (``OUT/markers/{slide}.csv``, normalised units) of the tiles centred at ``xy_px``
    (N, 2): (N, M) float32 with NaN for tiles without a label, or None when the slide has no labels file."""
    import pandas as pd

    path = art.LABELS.path(out, slide)
    if not Path(path).is_file():
        return None
    df = pd.read_csv(path)
    missing = [m for m in markers if m not in df.columns]
    if missing:
        raise PipelineError(f"{path} lacks the markers {missing[:5]}; rerun stage 03 with the run's panel")
    key = {(int(x), int(y)): i for i, (x, y) in enumerate(zip(df["x"], df["y"]))}
    tl = np.rint(np.asarray(xy_px, np.float64) - patch_size_level0 / 2.0).astype(np.int64)
    rows = np.array([key.get((int(x), int(y)), -1) for x, y in tl], np.int64)
    vals = df[markers].to_numpy(np.float32)
    out_ = np.full((len(tl), len(markers)), np.nan, np.float32)
    out_[rows >= 0] = vals[rows[rows >= 0]]
    return out_


def disk_offsets(radius_px: float) -> np.ndarray:
    """(K, 2) integer (dx, dy) offsets of the pixels whose centres lie within ``radius_px`` of a pixel centre (at
    least the centre itself)."""
    r = max(0.5, float(radius_px))
    k = int(np.floor(r))
    yy, xx = np.mgrid[-k:k + 1, -k:k + 1]
    keep = xx ** 2 + yy ** 2 <= r ** 2
    return np.stack([xx[keep], yy[keep]], 1).astype(np.int64)


def _reader(codex, channels: list[int]):
    """The fast tile reader of stage 03 when the file allows it, else the zarr one."""
    from preprocess.quantify.readers import TiledRegionReader, ZarrRegionReader

    try:
        return TiledRegionReader(codex.path, channels, codex.shape)
    except (ValueError, OSError, AttributeError):
        return ZarrRegionReader(codex, channels)


def measure_codex_at(codex_path: str | os.PathLike, mapping, channels: list[int], xy_he_px: np.ndarray,
                     radius_um: float = 3.0, codex_mpp: float | None = None, block_px: int = 1024,
                     progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Raw mean of each CODEX channel in a disk around each H&E point, through the registration.

    Args:
        codex_path: the CODEX image (OME-TIFF). mapping: :class:`preprocess.quantify.geometry.CodexToHE` (the
            stage-02 record's map). channels: CODEX channel index of each marker (M). xy_he_px: (N, 2) H&E level-0
            points. radius_um: disk radius, µm (3 µm ~ a nucleus). codex_mpp: CODEX level-0 µm/px (default: the
            file's). block_px: CODEX block side read at once (each block is read once, with a margin of the radius).
    Returns:
        raw (N, M) float32: the mean over the disk's pixels (centres within the radius of the mapped point's
        nearest pixel) that lie inside the image; NaN (and valid False) where the point maps outside the CODEX.
    """
    from preprocess.slide_io import CodexImage

    pts = np.asarray(xy_he_px, np.float64).reshape(-1, 2)
    out = np.full((len(pts), len(channels)), np.nan, np.float32)
    valid = np.zeros(len(pts), bool)
    if len(pts) == 0:
        return out, valid
    with CodexImage(codex_path, mpp=codex_mpp) as codex:
        mpp = codex_mpp or codex.mpp
        if not mpp:
            raise PipelineError(f"{codex_path} has no pixel size; give the CODEX µm/px (--codex-mpp or "
                                "COHORT/pixel_sizes.csv)")
        off = disk_offsets(radius_um / mpp)
        k = int(np.abs(off).max())
        w, h = codex.dimensions
        uv = mapping.he_to_codex(pts)
        ci, ri = np.rint(uv[:, 0]).astype(np.int64), np.rint(uv[:, 1]).astype(np.int64)
        inside = (ci >= 0) & (ci < w) & (ri >= 0) & (ri < h)
        bx, by = ci // block_px, ri // block_px
        blocks = np.unique(np.stack([bx[inside], by[inside]], 1), axis=0)
        it = blocks
        if progress:
            from tqdm import tqdm

            it = tqdm(blocks, desc=f"CODEX at cells {Path(codex_path).name}", unit="block", leave=False)
        reader = _reader(codex, list(channels))
        try:
            for gx, gy in it:
                sel = np.flatnonzero(inside & (bx == gx) & (by == gy))
                x0 = max(0, int(ci[sel].min()) - k)
                y0 = max(0, int(ri[sel].min()) - k)
                x1 = min(w, int(ci[sel].max()) + k + 1)
                y1 = min(h, int(ri[sel].max()) + k + 1)
                region = reader.read(x0, y0, x1, y1)  # (M, y1 - y0, x1 - x0), the file's dtype
                cc = ci[sel, None] + off[None, :, 0] - x0
                rr = ri[sel, None] + off[None, :, 1] - y0
                ok = (cc >= 0) & (cc < x1 - x0) & (rr >= 0) & (rr < y1 - y0)
                cc, rr = np.clip(cc, 0, x1 - x0 - 1), np.clip(rr, 0, y1 - y0 - 1)
                n_ok = ok.sum(1)
                for j in range(len(channels)):
                    vals = region[j][rr, cc].astype(np.float32)
                    out[sel, j] = np.where(ok, vals, 0.0).sum(1) / n_ok
                valid[sel] = True
        finally:
            reader.close()
    return out, valid


def normalise_measured(raw: np.ndarray, norm: dict) -> np.ndarray:
    """Raw CODEX means (N, M) -> the labels' normalised units with a stage-03 ``normalization.json`` record
    (``clip((raw - p_low) / (p_high - p_low), 0, 1)``); NaN stays NaN."""
    from preprocess.quantify.normalize import apply_normalization

    nan = np.isnan(raw)
    out = apply_normalization(np.nan_to_num(raw), norm).astype(np.float32)
    out[nan] = np.nan
    return out
