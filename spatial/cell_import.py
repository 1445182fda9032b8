"""Cells from elsewhere: a QuPath GeoJSON export or a CSV of centroids, as the same table as
:func:`spatial.nuclei.detect_slide` (x, y level-0 px; x_um, y_um; area_um2; hematoxylin; NaN where unknown).

    from spatial.cell_import import read_centroids_csv, read_qupath_geojson
    cells = read_qupath_geojson("slide_000.geojson", mpp=0.5)        # QuPath: File > Export objects as GeoJSON
    cells = read_centroids_csv("slide_000_cells.tsv", mpp=0.5)       # QuPath: Measure > Export measurements

Coordinates. This pipeline puts integer coordinates on pixel centres (docs/FORMATS.md); QuPath (like ImageJ)
puts the image's top-left corner at (0, 0), so pixel i spans [i, i + 1): QuPath coordinates (GeoJSON vertices,
"Centroid X µm" / "Centroid X px" columns) are shifted by -0.5 px here. Plain ``x, y`` / ``X, Y`` columns of a
CSV are taken in this pipeline's convention.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError
from spatial.nuclei import COLUMNS

QUPATH_OFFSET_PX = -0.5
"""Added to QuPath coordinates (top-left corner origin) to get this pipeline's (pixel-centre origin)."""

_GEOJSON_FIX = ("export the cells with QuPath's File > Export objects as GeoJSON (detections or cells), or give a "
                "CSV of centroids instead")
_H_MEASUREMENTS = ("Nucleus: Hematoxylin OD mean", "Hematoxylin: Nucleus: Mean", "Nucleus: Hematoxylin OD Mean")


def _check_mpp(path: Path, mpp: float) -> None:
    if not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
        raise PipelineError(f"{path}: the H&E level-0 µm/px must be a positive number (got {mpp!r}); pass --mpp")


def _ring_moments(ring) -> tuple[float, float, float]:
    """Signed area and area-weighted centroid sums (a, a·cx, a·cy) of a closed ring [[x, y], ...] (shoelace)."""
    p = np.asarray(ring, np.float64).reshape(-1, 2)[:, :2] if len(ring) else np.zeros((0, 2))
    if len(p) < 3:
        return 0.0, 0.0, 0.0
    x, y = p[:, 0], p[:, 1]
    x1, y1 = np.roll(x, -1), np.roll(y, -1)
    cross = x * y1 - x1 * y
    a = cross.sum() / 2.0
    return a, ((x + x1) * cross).sum() / 6.0, ((y + y1) * cross).sum() / 6.0


def _polygon_moments(rings) -> tuple[float, float, float]:
    """(area, area·cx, area·cy) of a GeoJSON polygon: exterior ring minus its holes (any ring orientation)."""
    out = np.zeros(3)
    for k, ring in enumerate(rings):
        m = np.array(_ring_moments(ring))
        sign = 1.0 if k == 0 else -1.0
        out += sign * m * (1.0 if m[0] >= 0 else -1.0)  # orientation-independent
    return float(out[0]), float(out[1]), float(out[2])


def _centres(geom: dict) -> list[tuple[float, float, float]]:
    """(x, y, area px²) of a GeoJSON geometry: one per Point / polygon object, area NaN for points; [] if empty."""
    kind, coords = geom.get("type"), geom.get("coordinates")
    if kind == "Point":
        return [(float(coords[0]), float(coords[1]), math.nan)]
    if kind == "MultiPoint":
        return [(float(c[0]), float(c[1]), math.nan) for c in coords]
    if kind in ("Polygon", "MultiPolygon"):
        polys = [coords] if kind == "Polygon" else coords
        a = cx = cy = 0.0
        for rings in polys:
            pa, px, py = _polygon_moments(rings)
            a, cx, cy = a + pa, cx + px, cy + py
        if a <= 0:
            verts = np.concatenate([np.asarray(r, np.float64).reshape(-1, 2) for rings in polys for r in rings[:1]])
            return [(float(verts[:, 0].mean()), float(verts[:, 1].mean()), 0.0)]
        return [(cx / a, cy / a, a)]
    if kind == "GeometryCollection":
        return [c for g in geom.get("geometries", []) for c in _centres(g)]
    raise ValueError(f"unsupported geometry type {kind!r}")


def _measurement(props: dict, names: tuple[str, ...]) -> float:
    """A QuPath measurement by name (dict in QuPath >= 0.3, list of {name, value} before); NaN if absent."""
    m = props.get("measurements")
    if isinstance(m, list):
        m = {d.get("name"): d.get("value") for d in m if isinstance(d, dict)}
    if not isinstance(m, dict):
        return math.nan
    for n in names:
        v = m.get(n)
        if isinstance(v, (int, float)):
            return float(v)
    return math.nan


def _class_name(props: dict) -> str | None:
    c = props.get("classification")
    if isinstance(c, dict):
        if c.get("name"):
            return str(c["name"])
        if c.get("names"):
            return ": ".join(map(str, c["names"]))
    if isinstance(c, str):
        return c
    return None


def read_qupath_geojson(path: str | os.PathLike, mpp: float) -> pd.DataFrame:
    """Cells of a QuPath GeoJSON export (a FeatureCollection, one Feature, or a list of Features).

    Keeps detections and cells (``properties.objectType`` ``detection`` / ``cell``, or none given) and point
    annotations (Point / MultiPoint geometries: one cell per point). A cell's centre is the area centroid of its
    ``nucleusGeometry`` when present, else of its geometry; its area (µm²) that polygon's (NaN for points);
    ``hematoxylin`` QuPath's "Nucleus: Hematoxylin OD mean" when measured, else NaN; ``qupath_class`` the
    classification name when any cell has one.

    Args:
        path: the .geojson / .json file.
        mpp: level-0 µm/px of the H&E the coordinates refer to.

    Returns:
        Columns ``x, y`` (level-0 px, pixel-centre convention), ``x_um, y_um`` (= x, y x mpp), ``area_um2``,
        ``hematoxylin`` [, ``qupath_class``], sorted by (y, x).
    """
    path = Path(path)
    _check_mpp(path, mpp)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"cell file not found: {path}; check the path") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PipelineError(f"{path} is not GeoJSON ({type(e).__name__}: {e}); {_GEOJSON_FIX}") from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        feats = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        feats = [data]
    else:
        feats = data
    if not isinstance(feats, list):
        raise PipelineError(f"{path} holds no GeoJSON features (expected a FeatureCollection or a list of "
                            f"Features); {_GEOJSON_FIX}")
    rows, classes = [], []
    for i, f in enumerate(feats):
        if not isinstance(f, dict) or not isinstance(f.get("geometry"), dict):
            raise PipelineError(f"{path}: feature {i} has no geometry; {_GEOJSON_FIX}")
        props = f.get("properties") or {}
        kind = str(props.get("objectType", props.get("object_type", "detection"))).lower()
        geom = f.get("nucleusGeometry") or props.get("nucleusGeometry") or f["geometry"]
        is_points = f["geometry"].get("type") in ("Point", "MultiPoint")
        if kind not in ("detection", "cell") and not (kind == "annotation" and is_points):
            continue  # annotations (regions), tiles, TMA cores
        try:
            centres = _centres(geom)
        except (ValueError, TypeError, IndexError, KeyError) as e:
            raise PipelineError(f"{path}: feature {i} has an unreadable geometry ({e}); {_GEOJSON_FIX}") from None
        h = _measurement(props, _H_MEASUREMENTS)
        cls = _class_name(props)
        for x, y, a in centres:
            rows.append((x + QUPATH_OFFSET_PX, y + QUPATH_OFFSET_PX, a * mpp * mpp, h))
            classes.append(cls)
    if not rows:
        raise PipelineError(f"{path} holds no detections or cells ({len(feats)} features, none of objectType "
                            f"detection/cell and no point annotations); {_GEOJSON_FIX}")
    arr = np.asarray(rows, np.float64)
    df = pd.DataFrame({"x": arr[:, 0], "y": arr[:, 1], "area_um2": arr[:, 2], "hematoxylin": arr[:, 3]})
    if any(c is not None for c in classes):
        df["qupath_class"] = pd.array(classes, dtype="string")
    return _table(path, df, mpp)


# CSV: (x column, y column, units, QuPath coordinates)
_CSV_LAYOUTS = (
    ("x", "y", None, False),
    ("X", "Y", None, False),
    ("Centroid X µm", "Centroid Y µm", "um", True),
    ("Centroid X um", "Centroid Y um", "um", True),
    ("Centroid X px", "Centroid Y px", "px", True),
)
_AREA_COLUMNS = ("area_um2", "Nucleus: Area µm^2", "Nucleus: Area")
_CLASS_COLUMNS = ("qupath_class", "Class", "Classification")


def read_centroids_csv(path: str | os.PathLike, mpp: float, units: str = "px") -> pd.DataFrame:
    """Cells of a CSV / TSV of centroids.

    Columns: ``x, y`` or ``X, Y`` (in ``units``: "px" level-0 pixels, pixel-centre convention, or "um"), or
    QuPath's measurement export ``Centroid X µm, Centroid Y µm`` (or ``... px``; QuPath convention, units from the
    header). Optional: ``area_um2`` / ``Nucleus: Area µm^2`` / ``Nucleus: Area`` (µm²), ``Nucleus: Hematoxylin OD
    mean``, ``Class`` / ``Classification`` (-> ``qupath_class``). Comma or tab separated.

    Returns:
        The table of :func:`read_qupath_geojson` (area / hematoxylin NaN where the file has none).
    """
    path = Path(path)
    _check_mpp(path, mpp)
    if units not in ("px", "um"):
        raise PipelineError(f"{path}: units must be 'px' or 'um' (got {units!r})")
    if not path.exists():
        raise PipelineError(f"cell file not found: {path}; check the path")
    try:
        with open(path, encoding="utf-8-sig") as fh:
            head = fh.readline()
        sep = "\t" if head.count("\t") > head.count(",") else ","
        raw = pd.read_csv(path, sep=sep, encoding="utf-8-sig")
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise PipelineError(f"{path} is not a readable CSV/TSV ({type(e).__name__}: {e}); save it as a comma- or "
                            "tab-separated text file with a header row") from None
    raw.columns = [str(c).strip() for c in raw.columns]
    layout = next((lay for lay in _CSV_LAYOUTS if lay[0] in raw.columns and lay[1] in raw.columns), None)
    if layout is None:
        raise PipelineError(f"{path} has no centroid columns (found: {', '.join(map(str, raw.columns[:12]))}); "
                            "it needs x,y (level-0 px, or µm with units='um'), X,Y, or QuPath's 'Centroid X µm', "
                            "'Centroid Y µm'")
    cx, cy, u, qupath = layout
    u = u or units
    xy = raw[[cx, cy]].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(xy).all(1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise PipelineError(f"{path}: row {row + 2} has no numeric {cx}/{cy} ({raw.iloc[row][[cx, cy]].tolist()}); "
                            "fix or drop that row")
    if u == "um":
        xy = xy / mpp
    if qupath:
        xy = xy + QUPATH_OFFSET_PX
    area_col = next((c for c in _AREA_COLUMNS if c in raw.columns), None)
    h_col = next((c for c in _H_MEASUREMENTS if c in raw.columns), None)
    df = pd.DataFrame({
        "x": xy[:, 0], "y": xy[:, 1],
        "area_um2": pd.to_numeric(raw[area_col], errors="coerce").to_numpy(np.float64) if area_col else np.nan,
        "hematoxylin": pd.to_numeric(raw[h_col], errors="coerce").to_numpy(np.float64) if h_col else np.nan,
    })
    cls_col = next((c for c in _CLASS_COLUMNS if c in raw.columns), None)
    if cls_col:
        df["qupath_class"] = raw[cls_col].astype("string").to_numpy()
    return _table(path, df, mpp)


def _table(path: Path, df: pd.DataFrame, mpp: float) -> pd.DataFrame:
    """Add µm coordinates, order the columns as :data:`spatial.nuclei.COLUMNS` (+ qupath_class), sort by (y, x)."""
    if len(df) == 0:
        raise PipelineError(f"{path} holds no cells; check it is the right export")
    df["x_um"] = df["x"] * mpp
    df["y_um"] = df["y"] * mpp
    cols = list(COLUMNS) + (["qupath_class"] if "qupath_class" in df.columns else [])
    return df[cols].sort_values(["y", "x"], kind="stable").reset_index(drop=True)
