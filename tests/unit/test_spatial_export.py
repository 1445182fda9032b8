"""Per-slide exports (``spatial.export``) and the niche map: the AnnData round-trips through ``anndata.read_h5ad``
with what scanpy/squidpy need (categorical cluster keys, ``obsm["spatial"]`` in µm, markers as ``var_names``), and
the GeoJSON parses as QuPath detections (Feature with a UUID id, ``objectType`` detection, ``classification``
name + RGB, a flat ``measurements`` map of numbers, level-0 px geometry)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from spatial import export, figures

MARKERS = ["DAPI", "CD8", "Pan-Cytokeratin", "CD68"]
MPP = 0.5


def _units(n: int = 50, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    x_px, y_px = rng.uniform(0, 2000, n), rng.uniform(0, 1000, n)
    obs = pd.DataFrame({"x_um": x_px * MPP, "y_um": y_px * MPP, "x_px": x_px, "y_px": y_px,
                        "phenotype": rng.choice(["CD8 T", "tumour", "other"], n),
                        "niche": rng.integers(0, 12, n), "area_um2": rng.uniform(20, 60, n)})
    return obs, rng.normal(size=(n, len(MARKERS))).astype(np.float32)


def test_h5ad_round_trips_with_what_squidpy_needs(tmp_path: Path) -> None:
    import anndata

    obs, X = _units()
    measured = X + 0.1
    settings = {"k": 10, "radius_um": None, "markers": MARKERS, "path": tmp_path, "nested": {"seed": np.int64(3)},
                "mixed": [1, "a"]}
    out = export.write_h5ad(tmp_path / "s.h5ad", obs, X, MARKERS, uns=settings, layers={"measured": measured},
                            phenotype_order=["tumour", "CD8 T", "B", "other"])
    assert out.is_file() and not list(tmp_path.glob("*.tmp*"))
    a = anndata.read_h5ad(out)
    assert a.shape == (50, 4) and list(a.var_names) == MARKERS and a.X.dtype == np.float32
    np.testing.assert_array_equal(a.X, X)
    np.testing.assert_array_equal(a.layers["measured"], measured)
    np.testing.assert_allclose(a.obsm["spatial"], obs[["x_um", "y_um"]].to_numpy())
    assert a.uns["spatial_units"] == "um" and a.uns["k"] == 10 and a.uns["nested"]["seed"] == 3
    assert a.uns["path"] == str(tmp_path) and json.loads(a.uns["mixed"]) == [1, "a"]
    assert isinstance(a.obs["phenotype"].dtype, pd.CategoricalDtype)
    assert list(a.obs["phenotype"].cat.categories) == ["tumour", "CD8 T", "B", "other"]
    assert (a.obs["phenotype"].astype(str).to_numpy() == obs["phenotype"].to_numpy()).all()
    assert isinstance(a.obs["niche"].dtype, pd.CategoricalDtype)
    assert list(a.obs["niche"].cat.categories) == [str(k) for k in sorted(obs["niche"].unique())]  # "2" before "10"
    assert (a.obs["niche"].astype(int).to_numpy() == obs["niche"].to_numpy()).all()
    assert len(a.uns["phenotype_colors"]) == 4 and a.uns["phenotype_colors"][3] == "#a0a0a0"          # other: grey
    assert len(a.uns["niche_colors"]) == a.obs["niche"].cat.categories.size
    assert list(a.obs_names[:2]) == ["0", "1"]


def test_h5ad_rejects_settings_that_are_not_json(tmp_path: Path) -> None:
    obs, X = _units(5)
    with pytest.raises(TypeError, match="JSON"):
        export.write_h5ad(tmp_path / "s.h5ad", obs, X, MARKERS, uns={"model": object()})
    assert not list(tmp_path.iterdir())


def test_empty_slide_gives_a_valid_h5ad(tmp_path: Path) -> None:
    import anndata

    obs, X = _units(0)
    a = anndata.read_h5ad(export.write_h5ad(tmp_path / "e.h5ad", obs, X, MARKERS))
    assert a.shape == (0, 4) and a.obsm["spatial"].shape == (0, 2)


def _check_feature(f: dict, markers: list[str]) -> None:
    """QuPath's GeoJSON object schema (qupath.lib.io.PathObjectTypeAdapters, v0.4+) for one detection."""
    assert f["type"] == "Feature"
    uuid.UUID(f["id"])                                                       # QuPath keeps a UUID id as the object id
    props = f["properties"]
    assert props["objectType"] == "detection"
    cls = props["classification"]
    assert isinstance(cls["name"], str) and len(cls["color"]) == 3
    assert all(isinstance(v, int) and 0 <= v <= 255 for v in cls["color"])
    meas = props["measurements"]
    assert isinstance(meas, dict) and set(meas) <= {*markers, "niche"} and "niche" in meas
    assert all(isinstance(v, int | float) and not isinstance(v, bool) for v in meas.values())


def test_qupath_points_follow_the_detection_schema(tmp_path: Path) -> None:
    obs, X = _units()
    X[3, 1] = np.nan
    n = export.write_qupath_detections(tmp_path / "s.geojson", obs, X, MARKERS, "slide_000", MPP)
    doc = json.loads((tmp_path / "s.geojson").read_text())
    assert n == 50 and doc["type"] == "FeatureCollection" and len(doc["features"]) == 50
    for f in doc["features"]:
        _check_feature(f, MARKERS)
    ids = [f["id"] for f in doc["features"]]
    assert len(set(ids)) == 50 and ids[0] == export.unit_uuid("slide_000", 0)        # unique and deterministic
    f0 = doc["features"][0]
    assert f0["geometry"]["type"] == "Point"
    np.testing.assert_allclose(f0["geometry"]["coordinates"], obs.loc[0, ["x_px", "y_px"]].to_numpy(float), atol=0.01)
    assert f0["properties"]["classification"]["name"] == obs.loc[0, "phenotype"]
    assert f0["properties"]["measurements"]["niche"] == obs.loc[0, "niche"]
    assert f0["properties"]["measurements"]["CD68"] == pytest.approx(X[0, 3], abs=1e-4)
    assert "CD8" not in doc["features"][3]["properties"]["measurements"]                 # NaN left out
    colours = {f["properties"]["classification"]["name"]: tuple(f["properties"]["classification"]["color"])
               for f in doc["features"]}
    assert colours["other"] == export.GREY and len(set(colours.values())) == 3


def test_qupath_circles_are_closed_rings_of_the_radius(tmp_path: Path) -> None:
    obs, X = _units(5)
    export.write_qupath_detections(tmp_path / "c.geojson", obs, X, MARKERS, "s", MPP, shape="circle", radius_um=4.0)
    f = json.loads((tmp_path / "c.geojson").read_text())["features"][2]
    _check_feature(f, MARKERS)
    ring = np.array(f["geometry"]["coordinates"][0])
    assert f["geometry"]["type"] == "Polygon" and (ring[0] == ring[-1]).all() and len(ring) == 13
    r = np.hypot(*(ring - obs.loc[2, ["x_px", "y_px"]].to_numpy(float)).T)
    np.testing.assert_allclose(r, 4.0 / MPP, atol=0.02)


def test_niche_map_over_the_thumbnail(tmp_path: Path) -> None:
    obs, _ = _units(400)
    thumb = np.full((100, 200, 3), 230, np.uint8)
    niche = obs["niche"].to_numpy()
    niche[:5] = -1
    p = figures.niche_map(tmp_path / "map.png", obs["x_px"], obs["y_px"], niche, thumb, downsample=10.0,
                          n_niches=12, title="slide_000", max_points=300)
    assert p.is_file() and matplotlib.image.imread(p).shape[0] > 100
    assert export.niche_colour(3) == export.niche_colour(21) and export.niche_colour(-1) == export.GREY
