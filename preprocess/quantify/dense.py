"""Dense (cell-scale) marker labels: the registered CODEX mean of every marker on a G x G grid of cells inside
every labelled patch (stage 03 with ``--dense-grid G``).

Geometry. A patch of side P level-0 px (``patch_size_level0`` of the stage-01 grid) holds G x G cells of side
c = P / G px (G = 16: 14 px = 7 µm at 20x, 28 px at 40x); P % G != 0 is an error naming ``--dense-grid``. Cell
(i, j) of the patch with top-left (x, y) is the square patch of top-left (x + j c, y + i c) and side c, with the
patches' pixel-edge convention ([x + j c - 0.5, x + (j+1) c - 0.5), pixel centres at integers). Its mean is
computed exactly as a patch's (:func:`preprocess.quantify.accumulate.quantify_patches` on the cells: the same
registration map, affine + displacement field or the affine only with ``--registration-model affine``, and the same
zero-area test). A cell is NaN when it holds no CODEX pixel or when less than half of it (``CELL_MIN_COVERAGE``)
holds CODEX data: its area outside the mapped CODEX image, and, in a patch with missing data (zero area beyond its
glass, see :func:`preprocess.quantify.stage.missing_data_fraction`), its zero area.

Files:
- pass 1: ``markers/raw/{slide}_dense.h5`` (:func:`preprocess.quantify.raw.raw_dense_path`): ``values`` (K, M, G,
  G) float32 raw means of the K grid patches with CODEX pixels, ``index`` (K,) their rows in the grid, ``coords``
  (K, 2), and the attrs of the labels below;
- pass 2 (:func:`preprocess.quantify.normalize.normalize_cohort`): ``markers_dense/{slide}.h5``
  (``pipeline.artifacts.DENSE_LABELS``) for exactly the rows of ``markers/{slide}.csv``, normalised with the patch
  labels' ``normalization.json``: ``values`` (N, M, G, G) float16 in [0, 1] (NaN = no data), ``index`` (N,) int64,
  ``coords`` (N, 2) int64 level-0 top-left; attrs ``schema_version``, ``markers`` (JSON list), ``grid`` G,
  ``cell_px_level0`` c, ``cell_um`` c * mpp, ``patch_size_level0`` P, ``mpp`` (H&E level-0 µm/px; NaN unknown),
  ``registration`` ("affine+field" or "affine"). Read with :func:`read_dense_labels`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm.auto import tqdm

from pipeline import artifacts as art
from pipeline.errors import PipelineError
from pipeline.io import atomic_path
from preprocess.quantify.accumulate import ZeroAreas, quantify_patches
from preprocess.quantify.geometry import CodexToHE
from preprocess.slide_io import CodexImage

log = logging.getLogger(__name__)

DENSE_SCHEMA = art.DENSE_LABELS.schema
CELL_MIN_COVERAGE = 0.5
"""A cell with less of its area holding CODEX data than this is NaN."""
BATCH_PATCHES = 1024
"""Patches whose cells are quantified at once (G = 16: 262144 cells, ~100 MB of sums for 40 markers)."""
ATTRS = ("grid", "cell_px_level0", "cell_um", "patch_size_level0", "mpp", "registration")
"""Attributes the raw file and the labels share (besides ``markers`` and ``schema_version``)."""


def dense_label_path(out_or_data_root: str | os.PathLike, slide: str) -> Path:
    """``{root}/markers_dense/{slide}.h5`` (``pipeline.artifacts.DENSE_LABELS``)."""
    return art.DENSE_LABELS.path(out_or_data_root, slide)


def cell_side(patch_size_level0: int, grid: int, where: str = "") -> int:
    """Cell side c = P / G level-0 px; P % G != 0 (or G < 1) is a :class:`PipelineError` naming ``--dense-grid``."""
    p = int(patch_size_level0)
    if grid < 1 or p % grid:
        divisors = [d for d in range(2, min(p, 64) + 1) if p % d == 0]
        raise PipelineError(f"--dense-grid {grid} does not divide the patch side {p} px{where}; use a divisor of {p} "
                            f"({', '.join(map(str, divisors[-6:]))}; 16 = 14 px = 7 µm cells for 224 px at 20x)")
    return p // grid


def registration_name(mapping: CodexToHE) -> str:
    """``"affine+field"`` when the map has a displacement field, else ``"affine"``."""
    return "affine+field" if mapping.field is not None else "affine"


def cell_coords(coords: np.ndarray, size: int, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """The cells of patches (module docstring), each once: overlapping patches share cells.

    Args:
        coords: (N, 2) level-0 top-left (x, y) of the patches; ``size``: their side P (px); ``grid``: G.

    Returns:
        (cells (K, 2) int64 level-0 top-left of the distinct cells, inverse (N, G, G) int64: the cell of patch n at
        row i, column j).
    """
    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    c = cell_side(size, grid)
    off = np.arange(grid, dtype=np.int64) * c
    n = len(coords)
    xs = np.broadcast_to(coords[:, 0, None, None] + off[None, None, :], (n, grid, grid))
    ys = np.broadcast_to(coords[:, 1, None, None] + off[None, :, None], (n, grid, grid))
    cells, inverse = np.unique(np.stack([xs, ys], -1).reshape(-1, 2), axis=0, return_inverse=True)
    return cells, inverse.reshape(n, grid, grid)


def quantify_dense(codex: CodexImage, channels: list[int], coords: np.ndarray, size: int, grid: int,
                   mapping: np.ndarray | CodexToHE, patch_missing: np.ndarray | None = None, region_px: int = 1024,
                   threads: int = 1, nodata_px: int = 0, zero_areas: ZeroAreas | None = None) -> np.ndarray:
    """Raw mean of each of ``channels`` in every cell of the patches ``coords`` (N, 2) of side ``size``.

    Args:
        patch_missing: (N,) missing-data fraction of each patch (zero area beyond its glass); where > 0 the zero
            area of its cells counts as no data. None: no zero-area test.
        nodata_px / zero_areas: the zero-area test of :func:`quantify_patches` (CODEX px; or made once by the caller).

    Returns:
        (N, C, G, G) float32: axis 2 = rows (y), axis 3 = columns (x); NaN where a cell holds no CODEX pixel or less
        than ``CELL_MIN_COVERAGE`` of it holds CODEX data.
    """
    cells, inv = cell_coords(coords, size, grid)
    res = quantify_patches(codex, channels, cells, size // grid, mapping, region_px, threads, nodata_px=nodata_px,
                           zero_areas=zero_areas)
    cov = res.coverage[inv]
    if patch_missing is not None and res.zero_fraction is not None:
        missing = (np.asarray(patch_missing) > 0)[:, None, None]
        cov = np.where(missing, cov * (1.0 - res.zero_fraction[inv]), cov)
    values = np.moveaxis(res.means[inv].astype(np.float32), 3, 1)  # (N, G, G, C) -> (N, C, G, G)
    bad = (res.counts[inv] == 0) | (cov < CELL_MIN_COVERAGE)
    values[np.broadcast_to(bad[:, None], values.shape)] = np.nan
    return values


def write_raw_dense(path: str | os.PathLike, codex: CodexImage, channels: list[int], markers: Sequence[str],
                    coords: np.ndarray, rows: np.ndarray, size: int, grid: int, mapping: CodexToHE,
                    patch_missing: np.ndarray | None, mpp: float | None, region_px: int = 1024, threads: int = 1,
                    nodata_px: int = 0, zero_areas: ZeroAreas | None = None, desc: str | None = None) -> None:
    """Pass 1: the raw cell means of the grid patches ``rows`` (K,) of ``coords`` (N, 2) -> ``path`` (module
    docstring), atomically, in batches of :data:`BATCH_PATCHES` patches (memory does not grow with the slide)."""
    rows = np.asarray(rows, np.int64)
    c = cell_side(size, grid)
    m = len(markers)
    missing = None if patch_missing is None else np.asarray(patch_missing)[rows]
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("index", data=rows)
        f.create_dataset("coords", data=np.asarray(coords, np.int64)[rows].reshape(-1, 2))
        v = f.create_dataset("values", (len(rows), m, grid, grid), np.float32,
                             chunks=(max(1, min(16, len(rows))), m, grid, grid), compression="gzip",
                             compression_opts=1, shuffle=True)
        f.attrs.update(_attrs(markers, grid, c, size, mpp, registration_name(mapping)))
        f.attrs["units"] = "values: raw CODEX mean per cell (not normalised), NaN = no data"
        for start in tqdm(range(0, len(rows), BATCH_PATCHES), desc=desc, unit="batch", leave=False,
                          **({} if desc else {"disable": True})):
            sel = slice(start, start + BATCH_PATCHES)
            v[sel] = quantify_dense(codex, channels, coords[rows[sel]], size, grid, mapping,
                                    None if missing is None else missing[sel], region_px, threads, nodata_px,
                                    zero_areas)


def _attrs(markers: Sequence[str], grid: int, c: int, size: int, mpp: float | None, registration: str) -> dict:
    mpp_f = float(mpp) if mpp else float("nan")
    return {"schema_version": DENSE_SCHEMA, "markers": json.dumps(list(markers)), "grid": int(grid),
            "cell_px_level0": float(c), "cell_um": float(c) * mpp_f, "patch_size_level0": int(size), "mpp": mpp_f,
            "registration": registration}


class _Unchanged(Exception):
    """The labels written equal the file already there: keep that one (and its mtime)."""


def _same_file(a: h5py.File, b: h5py.File) -> bool:
    if set(a.keys()) != set(b.keys()) or json.dumps({k: _plain(v) for k, v in a.attrs.items()}, sort_keys=True) != \
            json.dumps({k: _plain(v) for k, v in b.attrs.items()}, sort_keys=True):
        return False
    for k in a:
        if a[k].shape != b[k].shape or a[k].dtype != b[k].dtype:
            return False
        step = BATCH_PATCHES
        for s in range(0, max(1, a[k].shape[0]), step):
            if not np.array_equal(a[k][s:s + step], b[k][s:s + step], equal_nan=a[k].dtype.kind == "f"):
                return False
    return True


def _plain(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, float) and v != v:
        return "nan"
    return v.item() if hasattr(v, "item") else v


def write_dense_labels(path: str | os.PathLike, raw_path: str | os.PathLike, index: np.ndarray,
                       coords: np.ndarray, markers: Sequence[str],
                       normalize: Callable[[np.ndarray], np.ndarray]) -> bool:
    """Pass 2: the dense labels of the patch label rows ``index`` (N,) (``coords`` (N, 2)) from the raw cell means
    in ``raw_path``, each (n, M) block of cell values through ``normalize`` (the patch labels' normalisation;
    NaN stays NaN) -> ``path`` (float16), atomically. Returns False when the file there already held exactly
    these labels (then it is left alone)."""
    index = np.asarray(index, np.int64)
    markers = list(markers)
    try:
        raw = h5py.File(raw_path, "r")
    except OSError as e:
        raise PipelineError(f"raw dense means {raw_path} unreadable ({e}); rerun pass 1 with --overwrite") from None
    with raw:
        if json.loads(raw.attrs.get("markers", "[]")) != markers:
            raise PipelineError(f"raw dense means {raw_path} are for other markers than the panel's; rerun pass 1 "
                                "with --overwrite")
        rindex = raw["index"][:]
        order = np.argsort(rindex, kind="stable")
        pos = order[np.clip(np.searchsorted(rindex, index, sorter=order), 0, max(len(rindex) - 1, 0))] if len(
            rindex) else np.zeros(0, np.int64)
        lacking = index[rindex[pos] != index] if len(rindex) else index
        if len(lacking):
            raise PipelineError(f"raw dense means {raw_path} lack {len(lacking)} patches of the labels (e.g. index "
                                f"{int(lacking[0])}); rerun pass 1 with --overwrite")
        grid = int(raw.attrs["grid"])
        m = len(markers)
        path = Path(path)
        try:
            with atomic_path(path) as tmp:
                with h5py.File(tmp, "w") as f:
                    f.create_dataset("index", data=index)
                    f.create_dataset("coords", data=np.asarray(coords, np.int64).reshape(-1, 2))
                    v = f.create_dataset("values", (len(index), m, grid, grid), np.float16,
                                         chunks=(1, m, grid, grid), compression="gzip", compression_opts=4)
                    f.attrs.update({"schema_version": DENSE_SCHEMA, "markers": json.dumps(markers)}
                                   | {k: raw.attrs[k] for k in ATTRS})
                    for s in range(0, len(index), BATCH_PATCHES):
                        p = pos[s:s + BATCH_PATCHES]
                        srt = np.argsort(p, kind="stable")
                        block = np.empty((len(p), m, grid, grid), np.float32)
                        block[srt] = raw["values"][p[srt]]  # h5py reads increasing indices
                        flat = np.moveaxis(block, 1, 3).reshape(-1, m)
                        out = np.asarray(normalize(flat), np.float64)
                        out[np.isnan(flat)] = np.nan
                        v[s:s + len(p)] = np.moveaxis(out.reshape(len(p), grid, grid, m), 3, 1).astype(np.float16)
                if path.exists():
                    try:
                        with h5py.File(tmp, "r") as a, h5py.File(path, "r") as b:
                            same = _same_file(a, b)
                    except OSError:
                        same = False
                    if same:
                        raise _Unchanged
        except _Unchanged:
            return False
    return True


@dataclass
class DenseLabels:
    """A slide's dense labels (module docstring): ``values`` (N, M, G, G) float32 in [0, 1], NaN = no data;
    ``index`` (N,) int64 patch rows of the stage-01 grid (the rows of ``markers/{slide}.csv``); ``coords`` (N, 2)
    int64 level-0 top-left; ``cell_px_level0`` c = P / G; ``cell_um`` c * mpp (NaN: mpp unknown); ``registration``
    "affine+field" or "affine"."""

    values: np.ndarray
    index: np.ndarray
    coords: np.ndarray
    markers: list[str]
    grid: int
    cell_px_level0: float
    cell_um: float
    registration: str


def read_dense_labels(path: str | os.PathLike, markers: Sequence[str] | None = None) -> DenseLabels:
    """Read ``markers_dense/{slide}.h5``; with ``markers``, they must be the file's (same order). A missing or
    foreign file, another schema or other markers are one :class:`PipelineError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"dense labels not found: {path}; run stage 03 with --dense-grid G "
                            "(DENSE=1 bash scripts/03_quantify.sh)")
    try:
        with h5py.File(path, "r") as f:
            schema = f.attrs.get("schema_version")
            if schema is None or int(schema) != DENSE_SCHEMA:
                raise PipelineError(f"{path} has dense-label schema {schema}, this code reads {DENSE_SCHEMA}; rerun "
                                    "stage 03 with --dense-grid G")
            names = json.loads(f.attrs["markers"])
            out = DenseLabels(values=f["values"][:].astype(np.float32), index=f["index"][:].astype(np.int64),
                              coords=f["coords"][:].astype(np.int64), markers=list(names), grid=int(f.attrs["grid"]),
                              cell_px_level0=float(f.attrs["cell_px_level0"]), cell_um=float(f.attrs["cell_um"]),
                              registration=str(f.attrs["registration"]))
    except (OSError, KeyError, ValueError) as e:
        raise PipelineError(f"{path} is not a dense-label file of stage 03 ({e}); rerun stage 03 with --dense-grid "
                            "G") from None
    if markers is not None and list(markers) != out.markers:
        raise PipelineError(f"dense labels {path} are for the markers {out.markers[:5]}..., not {list(markers)[:5]}"
                            "... (same markers in the same order needed); rerun stage 03 with this panel")
    return out
