"""Per-slide outputs that users open in other tools: AnnData for scanpy / squidpy, GeoJSON detections for QuPath.

- :func:`write_h5ad`: one AnnData per slide, ``X`` (N, M) float32 markers (normalised units), ``var_names`` the
  markers, ``obs`` the units (``phenotype`` and ``niche`` as categoricals of strings, coordinates in µm and level-0
  px), ``obsm["spatial"]`` (N, 2) x, y in µm (``uns["spatial_units"] = "um"``), ``layers["measured"]`` the measured
  CODEX at the same units where the slide has it, ``uns`` the run settings plus scanpy's ``{key}_colors``. Read with
  ``anndata.read_h5ad``; squidpy runs on it as it is::

      import anndata, squidpy as sq
      adata = anndata.read_h5ad("OUT/spatial/slide_000.h5ad")
      sq.gr.spatial_neighbors(adata, coord_type="generic", n_neighs=10)
      sq.gr.nhood_enrichment(adata, cluster_key="phenotype")   # -> adata.uns["phenotype_nhood_enrichment"]

- :func:`write_qupath_detections`: a GeoJSON FeatureCollection in level-0 px of the H&E (x right, y down), one
  Feature per unit with a UUID ``id`` and ``properties`` ``objectType: "detection"``, ``classification: {"name":
  phenotype, "color": [r, g, b]}`` and ``measurements: {marker: value, ..., "niche": k}`` (the flat name -> number
  map of QuPath >= 0.4; QuPath's *File > Import objects* or drag-and-drop reads it). The geometry is a Point at the
  centroid or a small circle Polygon. Conventions follow :func:`hex.infer.map_formats.write_geojson` (the tile
  maps): same streaming writer, measurement names = marker names, non-finite values left out.

Colours are fixed per niche index and per phenotype name (:func:`niche_colour`, :func:`phenotype_colours`), so a
niche or phenotype has one colour in every slide's figure, GeoJSON and AnnData.
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.io import atomic_path

log = logging.getLogger(__name__)

SPATIAL_KEY = "spatial"
MEASURED_LAYER = "measured"
# matplotlib's tab10 then the light half of tab20, greys left out (grey means "none"): 18 distinct colours
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194),
    (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150),
    (197, 176, 213), (196, 156, 148), (247, 182, 210), (219, 219, 141), (158, 218, 229))
GREY = (160, 160, 160)
UNASSIGNED = ("other", "unassigned", "unknown", "")


def niche_colour(k: int) -> tuple[int, int, int]:
    """RGB 0-255 of niche ``k`` (the palette repeats after 18 niches); a negative k (unassigned) is grey."""
    return GREY if k < 0 else PALETTE[k % len(PALETTE)]


def phenotype_colours(names: Sequence[str]) -> dict[str, tuple[int, int, int]]:
    """{phenotype: RGB 0-255}: the palette in the order of ``names`` (pass the cohort's list, e.g. the gating
    table's, so each phenotype keeps its colour on every slide); ``other`` / ``unassigned`` are grey."""
    out: dict[str, tuple[int, int, int]] = {}
    i = 0
    for n in dict.fromkeys(map(str, names)):
        if n.lower() in UNASSIGNED:
            out[n] = GREY
        else:
            out[n] = PALETTE[i % len(PALETTE)]
            i += 1
    return out


def _hex(rgb: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(v) for v in rgb))


# ----------------------------------------------------------------------------------------------------------------
# AnnData


def _plain(obj: Any) -> Any:
    """``obj`` as JSON types (numpy values -> Python, Path -> str); TypeError for anything else."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic | np.ndarray):
        return _plain(obj.tolist())
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"uns values must be JSON-able; got {type(obj).__name__}: {obj!r:.80}")


def _uns_value(v: Any) -> Any:
    """A JSON value as h5ad stores it: dicts recursively, a list of only numbers or only strings as is, any other
    list (mixed, nested dicts) as its JSON text."""
    if isinstance(v, dict):
        return {k: _uns_value(x) for k, x in v.items()}
    if isinstance(v, list):
        if all(isinstance(x, str) for x in v) or all(isinstance(x, int | float) and not isinstance(x, bool)
                                                     for x in v):
            return v
        return json.dumps(v)
    return v


def niche_categories(niche: np.ndarray | pd.Series) -> pd.Categorical:
    """Niche ids (ints) as a categorical of strings ordered by the number (``"2" < "10"``)."""
    k = pd.Series(niche).astype(int)
    return pd.Categorical(k.astype(str), categories=[str(v) for v in sorted(k.unique())])


def write_h5ad(path: str | os.PathLike, obs: pd.DataFrame, X: np.ndarray, markers: Sequence[str],
               spatial_xy_um: np.ndarray | None = None, uns: Mapping[str, Any] | None = None,
               layers: Mapping[str, np.ndarray] | None = None,
               phenotype_order: Sequence[str] | None = None) -> Path:
    """Write one slide's units as an AnnData ``.h5ad`` atomically; returns the path.

    Args:
        obs: (N, .) the units: ``x_um, y_um, x_px, y_px``, ``phenotype`` (str), ``niche`` (int), any other column.
            ``phenotype`` becomes a categorical (categories in ``phenotype_order`` when given, else sorted) and
            ``niche`` a categorical of strings (scanpy / squidpy's ``cluster_key`` must be categorical); the index
            becomes strings (``"0"``.. when it was a RangeIndex).
        X: (N, M) marker values (normalised units), stored float32. markers: (M,) names, the ``var_names``.
        spatial_xy_um: (N, 2) x, y in µm for ``obsm["spatial"]``; None takes ``obs[["x_um", "y_um"]]``.
        uns: the run settings, JSON types only (numpy values and paths are converted; anything else: TypeError).
            ``spatial_units = "um"`` and ``{phenotype,niche}_colors`` (scanpy's colour lists) are added.
        layers: e.g. ``{"measured": X2}`` (N, M) the measured CODEX at the same units (NaN where not measured).
    """
    import anndata

    n = len(obs)
    X = np.asarray(X, dtype=np.float32).reshape(n, len(markers))
    o = obs.copy()
    o.index = pd.Index([str(i) for i in (range(n) if isinstance(obs.index, pd.RangeIndex) else obs.index)],
                       dtype=object)
    if "phenotype" in o:
        cats = list(dict.fromkeys(map(str, phenotype_order))) if phenotype_order is not None else None
        present = sorted(set(o["phenotype"].astype(str)))
        if cats is not None:
            cats += [c for c in present if c not in cats]
        o["phenotype"] = pd.Categorical(o["phenotype"].astype(str), categories=cats or present)
    if "niche" in o:
        o["niche"] = niche_categories(o["niche"].to_numpy())
    xy = (o[["x_um", "y_um"]].to_numpy(np.float64) if spatial_xy_um is None
          else np.asarray(spatial_xy_um, dtype=np.float64).reshape(n, 2))
    info = _uns_value(_plain(dict(uns or {})))
    info["spatial_units"] = "um"
    if "phenotype" in o:
        colours = phenotype_colours(list(o["phenotype"].cat.categories))
        info["phenotype_colors"] = [_hex(colours[c]) for c in o["phenotype"].cat.categories]
    if "niche" in o:
        info["niche_colors"] = [_hex(niche_colour(int(c))) for c in o["niche"].cat.categories]
    var = pd.DataFrame(index=pd.Index([str(m) for m in markers], name="marker"))
    if var.index.duplicated().any():
        raise ValueError(f"marker names repeat: {var.index[var.index.duplicated()].tolist()}")
    adata = anndata.AnnData(X=X, obs=o, var=var, obsm={SPATIAL_KEY: xy}, uns=info,
                            layers={k: np.asarray(v, dtype=np.float32).reshape(n, len(markers))
                                    for k, v in (layers or {}).items()})
    with atomic_path(path, suffix=".h5ad") as tmp:
        adata.write_h5ad(tmp)
    return Path(path)


# ----------------------------------------------------------------------------------------------------------------
# QuPath GeoJSON


def unit_uuid(slide_id: str, index: int) -> str:
    """The deterministic UUID of unit ``index`` of a slide (QuPath keeps it as the object's id)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"hex-spatial/{slide_id}/{index}"))


def circle_offsets(radius_px: float, vertices: int = 12) -> np.ndarray:
    """(vertices + 1, 2) offsets of a closed regular polygon of radius ``radius_px`` (first point repeated)."""
    a = np.linspace(0.0, 2 * np.pi, vertices, endpoint=False)
    ring = np.column_stack([np.cos(a), np.sin(a)]) * float(radius_px)
    return np.vstack([ring, ring[:1]])


def write_qupath_detections(path: str | os.PathLike, units: pd.DataFrame, X: np.ndarray, markers: Sequence[str],
                            slide_id: str, mpp: float, shape: str = "point", radius_um: float = 4.0,
                            colours: Mapping[str, Sequence[int]] | None = None, decimals: int = 4) -> int:
    """Write one slide's units as QuPath detections (GeoJSON FeatureCollection) atomically; returns the count.

    Args:
        units: (N, .) with ``x_px, y_px`` (centroids, H&E level-0 px), ``phenotype`` (str, the classification)
            and ``niche`` (int, a measurement; -1 = none).
        X: (N, M) marker values (normalised units), the measurements, named by ``markers``.
        mpp: µm per level-0 px of the H&E (for ``radius_um``). shape: ``"point"`` (a Point per unit) or
            ``"circle"`` (a 12-gon of radius ``radius_um``, for QuPath tools that need an area).
        colours: {phenotype: (r, g, b) 0-255}; None: :func:`phenotype_colours` of the sorted phenotypes.

    Features are streamed from a template (feature i = row i of ``units``); non-finite marker values are left out
    of that unit's measurements (JSON has no NaN), with one warning.
    """
    if shape not in ("point", "circle"):
        raise ValueError(f"shape must be 'point' or 'circle', not {shape!r}")
    n = len(units)
    X = np.asarray(X, dtype=np.float64).reshape(n, len(markers))
    xy = units[["x_px", "y_px"]].to_numpy(np.float64)
    pheno = units["phenotype"].astype(str).to_numpy()
    niche = units["niche"].to_numpy().astype(np.int64) if "niche" in units else None
    colours = dict(colours) if colours is not None else phenotype_colours(sorted(set(pheno)))
    classes = {}
    for p in sorted(set(pheno)):
        rgb = [int(v) for v in colours.get(p, GREY)]
        classes[p] = json.dumps({"name": p, "color": rgb}, ensure_ascii=False)
    keys = [json.dumps(str(m), ensure_ascii=False).replace("%", "%%") for m in markers]
    if shape == "point":
        geom = '{"type":"Point","coordinates":[%.2f,%.2f]}'
        ring = None
    else:
        ring = circle_offsets(float(radius_um) / float(mpp))
        geom = '{"type":"Polygon","coordinates":[[' + ",".join(["[%.2f,%.2f]"] * len(ring)) + ']]}'
    head = '{"type":"Feature","id":"%s","geometry":' + geom + ',"properties":{"objectType":"detection",' \
           '"classification":%s,"measurements":{'
    meas = ",".join(f"{k}:%.{int(decimals)}f" for k in keys)
    finite = np.isfinite(X).all(axis=1)
    if not finite.all():
        log.warning("%s: %d units with non-finite marker values; those values are left out of the GeoJSON",
                    slide_id, int((~finite).sum()))
    offsets = ring.tolist() if ring is not None else None
    niches = niche.tolist() if niche is not None else [None] * n
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write('{"type":"FeatureCollection","features":[')
        for i, ((x, y), row, p, k) in enumerate(zip(xy.tolist(), X.tolist(), pheno.tolist(), niches)):
            if i:
                f.write(",")
            coords = (x, y) if offsets is None else tuple(v for dx, dy in offsets for v in (x + dx, y + dy))
            f.write(head % (unit_uuid(slide_id, i), *coords, classes[p]))
            if finite[i]:
                body = meas % tuple(row) if keys else ""
            else:
                body = ",".join(f"{m.replace('%%', '%')}:{v:.{int(decimals)}f}" for m, v in zip(keys, row)
                                if math.isfinite(v))
            if k is not None:
                body += ("," if body else "") + f'"niche":{k}'
            f.write(body + "}}}")
        f.write("]}\n")
    return n
