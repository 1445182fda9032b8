"""Imported cells (spatial/cell_import.py): a QuPath GeoJSON and CSVs holding the centroids of a detected table give
that table; QuPath's corner-origin coordinates are shifted to pixel centres; bad files give one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.errors import PipelineError
from spatial.cell_import import read_centroids_csv, read_qupath_geojson
from spatial.nuclei import COLUMNS, detect_tiled

MPP = 0.5


@pytest.fixture(scope="module")
def detected() -> pd.DataFrame:
    """A detect_tiled table of a small synthetic image (dark discs on pink)."""
    rng = np.random.default_rng(0)
    n = 160
    yy, xx = np.mgrid[0:n, 0:n] * MPP
    h = np.zeros((n, n))
    for x, y in rng.uniform(8, 72, (12, 2)):
        h = np.maximum(h, (np.hypot(xx - x, yy - y) < 2.8).astype(float))
    od = h[..., None] * np.array([0.6, 0.65, 0.27]) + 0.3 * np.array([0.07, 0.99, 0.11])
    img = np.clip(255 * np.exp(-od), 0, 255).astype(np.uint8)
    df = detect_tiled(lambda x, y, w, hh: img[y:y + hh, x:x + w], (n, n), MPP, tile_px=64, halo_um=10)
    assert len(df) >= 8
    return df


def _square(x: float, y: float, r: float) -> list:
    """A closed square ring of side 2r around (x, y) (QuPath coordinates)."""
    return [[[x - r, y - r], [x + r, y - r], [x + r, y + r], [x - r, y + r], [x - r, y - r]]]


def _same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns)[:len(COLUMNS)] == list(COLUMNS)
    assert len(a) == len(b)
    np.testing.assert_allclose(a[["x", "y", "x_um", "y_um"]].to_numpy(), b[["x", "y", "x_um", "y_um"]].to_numpy(),
                               atol=1e-9)


def test_geojson_same_table(detected: pd.DataFrame, tmp_path: Path) -> None:
    """FeatureCollection of QuPath cells (nucleusGeometry squares), a list of detections (polygons) and of points:
    the detected table's centroids, areas from the polygons, classes kept, annotations skipped."""
    q = detected[["x", "y"]].to_numpy() + 0.5  # QuPath: top-left corner at (0, 0)
    cells = [{"type": "Feature", "id": str(i), "geometry": {"type": "Polygon", "coordinates": _square(x + 3, y, 6)},
              "nucleusGeometry": {"type": "Polygon", "coordinates": _square(x, y, 2)},
              "properties": {"objectType": "cell", "classification": {"name": "Tumor", "color": [200, 0, 0]},
                             "measurements": {"Nucleus: Hematoxylin OD mean": 0.4}}}
             for i, (x, y) in enumerate(q)]
    region = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": _square(50, 50, 50)},
              "properties": {"objectType": "annotation"}}
    (tmp_path / "cells.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [region, *cells]}))
    got = read_qupath_geojson(tmp_path / "cells.geojson", MPP)
    _same(got, detected)
    assert list(got.columns) == [*COLUMNS, "qupath_class"] and (got.qupath_class == "Tumor").all()
    np.testing.assert_allclose(got.area_um2, 16 * MPP * MPP)  # the 4 x 4 px nucleus, not the 12 x 12 cell
    np.testing.assert_allclose(got.hematoxylin, 0.4)

    dets = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": _square(x, y, 3)},
             "properties": {"object_type": "detection", "measurements": [{"name": "Area", "value": 1}]}}
            for x, y in q]  # QuPath 0.2: object_type, measurements as a list
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    got = read_qupath_geojson(tmp_path / "dets.json", MPP)
    _same(got, detected)
    assert list(got.columns) == list(COLUMNS) and got.hematoxylin.isna().all()

    pts = {"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": q.tolist()},
           "properties": {"objectType": "annotation"}}
    (tmp_path / "pts.geojson").write_text(json.dumps(pts))
    got = read_qupath_geojson(tmp_path / "pts.geojson", MPP)
    _same(got, detected)
    assert got.area_um2.isna().all()


def test_csv_same_table(detected: pd.DataFrame, tmp_path: Path) -> None:
    """x,y px; X,Y µm (units='um'); QuPath's measurement TSV (Centroid X µm, corner origin): the same table."""
    d = detected
    d[["x", "y"]].to_csv(tmp_path / "px.csv", index=False)
    _same(read_centroids_csv(tmp_path / "px.csv", MPP), d)
    pd.DataFrame({"X": d.x_um, "Y": d.y_um}).to_csv(tmp_path / "um.csv", index=False)
    _same(read_centroids_csv(tmp_path / "um.csv", MPP, units="um"), d)
    qp = pd.DataFrame({"Image": "s.tif", "Class": "Immune cells", "Centroid X µm": (d.x + 0.5) * MPP,
                       "Centroid Y µm": (d.y + 0.5) * MPP, "Nucleus: Area µm^2": 20.0})
    qp.to_csv(tmp_path / "qupath.tsv", sep="\t", index=False)
    got = read_centroids_csv(tmp_path / "qupath.tsv", MPP)
    _same(got, d)
    assert (got.area_um2 == 20.0).all() and (got.qupath_class == "Immune cells").all()
    assert got.hematoxylin.isna().all()


@pytest.mark.parametrize("content, name, match", [
    ("{not json", "a.geojson", "is not GeoJSON"),
    ('{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {"type": "Polygon", '
     '"coordinates": [[[0, 0], [9, 0], [9, 9], [0, 0]]]}, "properties": {"objectType": "annotation"}}]}',
     "b.geojson", "holds no detections or cells"),
    ('{"type": "Feature", "properties": {}}', "c.geojson", "has no geometry"),
])
def test_bad_geojson(tmp_path: Path, content: str, name: str, match: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(PipelineError, match=match) as e:
        read_qupath_geojson(tmp_path / name, MPP)
    assert name in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("content, kwargs, match", [
    ("a,b\n1,2\n", {}, "has no centroid columns"),
    ("x,y\n1,2\n3,oops\n", {}, "row 3 has no numeric"),
    ("x,y\n1,2\n", {"units": "mm"}, "units must be"),
    ("x,y\n1,2\n", {"mpp": 0}, "positive number"),
    ("x,y\n", {}, "holds no cells"),
])
def test_bad_csv(tmp_path: Path, content: str, kwargs: dict, match: str) -> None:
    (tmp_path / "c.csv").write_text(content)
    with pytest.raises(PipelineError, match=match) as e:
        read_centroids_csv(tmp_path / "c.csv", **({"mpp": MPP} | kwargs))
    assert "c.csv" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(PipelineError, match="not found"):
        read_centroids_csv(tmp_path / "missing.csv", MPP)
