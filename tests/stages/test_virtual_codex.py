"""hex.virtual_codex: tile predictions -> maps (npy, OME-TIFF, GeoJSON, preview), on synthetic prediction files."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from hex.infer.map_formats import (
    DEFAULT_PREVIEW_MARKERS,
    choose_preview_markers,
    downsample2,
    pyramid_shapes,
    write_ome_pyramid,
)
from hex.infer.maps import accumulate_map, is_done, main, write_slide_maps
from hex.infer.predictions import read_prediction
from pipeline.errors import PipelineError
from tests.fixtures import write_pred

MARKERS = [l.split(",", 1)[1] for l in
           (Path(__file__).parents[2] / "sample_data" / "marker_panel.csv").read_text().split("\n")[1:] if l]


def _ome_pixels(tif: tifffile.TiffFile) -> tuple[list[str], float, str]:
    xml = tif.ome_metadata
    names = re.findall(r'<Channel [^>]*Name="([^"]*)"', xml)
    px = re.search(r'<Pixels [^>]*PhysicalSizeX="([^"]+)"', xml).group(1)
    unit = re.search(r'<Pixels [^>]*PhysicalSizeXUnit="([^"]+)"', xml).group(1)
    return names, float(px), unit


# ----------------------------------------------------------------------------------------------------------------
# accumulate_map: hand-computed cases


def test_grid_not_at_origin_maps_one_tile_per_pixel():
    # P = s = 10, grid origin (5, 5): dividing coords by P would put both x = 5 and x = 15 ... fine, but x = 5 and
    # x = 9 (a grid at origin 9) collide under floor; the centre rule gives each tile exactly one pixel.
    coords = [(5, 5), (15, 5), (5, 15), (25, 15)]
    vals = np.array([[1.0], [2.0], [3.0], [4.0]])
    m, mask = accumulate_map(coords, vals, 10, 10)
    assert m.shape == (2, 3, 1) and m.dtype == np.float32
    assert m[..., 0].tolist() == [[1, 2, 0], [3, 0, 4]]
    assert mask.tolist() == [[True, True, False], [True, False, True]]
    # a grid starting at x = 9: tiles [9, 19) and [19, 29) contain centres 15 and 25 -> columns 1 and 2, no overlap
    m, mask = accumulate_map([(9, 0), (19, 0)], [[1.0], [2.0]], 10, 10)
    assert m[0, :, 0].tolist() == [0, 1, 2] and mask[0].tolist() == [False, True, True]


def test_stride_below_patch_means_overlaps():
    # P = 4, s = 2: each tile covers 2 x 2 map pixels; pixel (1, 1) is covered by all four tiles
    coords = [(0, 0), (2, 0), (0, 2), (2, 2)]
    a, b, c, d = 1.0, 2.0, 4.0, 8.0
    m, mask = accumulate_map(coords, [[a, 0], [b, 1], [c, 2], [d, 3]], 4, 2)
    assert m.shape == (3, 3, 2) and mask.all()
    expect = [[a, (a + b) / 2, b],
              [(a + c) / 2, (a + b + c + d) / 4, (b + d) / 2],
              [c, (c + d) / 2, d]]
    np.testing.assert_allclose(m[..., 0], expect)
    np.testing.assert_allclose(m[1, 1, 1], 1.5)


def test_offset_grid_non_multiple_and_ties():
    # s = 10, P = 20, tiles at x = 3 and x = 13: centres 5, 15 in [3, 23); 15, 25 in [13, 33)
    m, _ = accumulate_map([(3, 0), (13, 0)], [[1.0], [3.0]], 20, 10)
    np.testing.assert_allclose(m[0, :, 0], [1, 2, 3])
    # a centre on the left edge is inside, on the right edge outside: [5, 25) holds centres 5 and 15, not 25
    m, mask = accumulate_map([(5, 0)], [[1.0]], 20, 10, shape_level0=(10, 40))
    assert mask[0].tolist() == [True, True, False, False]


def test_canvas_from_slide_shape_clips_and_duplicates_average():
    # level-0 (height, width) = (95, 101), s = 10 -> canvas ceil -> (10, 11); a tile past the edge is clipped
    # (a tile at y = 95, P = 20 covers rows 9 and 10; row 10 is outside the canvas)
    m, mask = accumulate_map([(95, 95), (95, 95), (0, 0)], [[1.0], [3.0], [5.0]], 20, 10, shape_level0=(95, 101))
    assert m.shape == (10, 11, 1)
    assert m[9, 9, 0] == m[9, 10, 0] == pytest.approx(2.0)  # two tiles with the same coords -> mean
    assert m[0, 0, 0] == m[1, 1, 0] == 5.0 and mask.sum() == 2 + 4
    empty, emask = accumulate_map(np.zeros((0, 2)), np.zeros((0, 3)), 224, 56)
    assert empty.shape == (1, 1, 3) and not emask.any()


# ----------------------------------------------------------------------------------------------------------------
# outputs


@pytest.mark.parametrize("origin, tol_px", [((30, 17), 0.55), ((168, 112), 0.05)])
def test_known_feature_lands_at_its_physical_position(tmp_path, origin, tol_px):
    """Marker 0 is 1 inside a level-0 rectangle: each tile predicts the fraction of its area inside it. The 0.5
    crossings of the map, converted to µm with the OME PhysicalSize, sit on the rectangle's edges: within half a
    map pixel on a grid off the multiples of s (its tiles' mean centre is off the pixel centre by up to s/2),
    within 0.05 px on an aligned one (the spec asks for one pixel)."""
    s, p, mpp = 56, 224, 0.5
    x0e, x1e, y0e, y1e = 1210, 3470, 905, 2333  # rectangle [x0e, x1e) x [y0e, y1e), not multiples of s
    ox, oy = origin  # grid origin not at (0, 0)
    xs, ys = np.arange(ox, 4800 - p, s), np.arange(oy, 3300 - p, s)
    gx, gy = np.meshgrid(xs, ys)
    coords = np.stack([gx.ravel(), gy.ravel()], 1)
    fx = np.clip(np.minimum(coords[:, 0] + p, x1e) - np.maximum(coords[:, 0], x0e), 0, None) / p
    fy = np.clip(np.minimum(coords[:, 1] + p, y1e) - np.maximum(coords[:, 1], y0e), 0, None) / p
    vals = np.zeros((len(coords), 40), np.float32)
    vals[:, 0] = fx * fy
    vals[:, 5] = 0.25
    pred = write_pred(tmp_path / "s1.h5", coords, vals, p, s, mpp, slide_dimensions=(4800, 3300))
    res = write_slide_maps(pred, tmp_path / "vc", formats=("npy", "ome"))
    assert res["shape"] == [int(np.ceil(3300 / s)), int(np.ceil(4800 / s)), 40]
    with tifffile.TiffFile(tmp_path / "vc" / "s1.ome.tif") as tif:
        names, px_um, unit = _ome_pixels(tif)
        m0 = tif.series[0].levels[0].asarray()[0]  # channel 0, (H', W')
    assert unit == "µm" and px_um == pytest.approx(s * mpp)
    npy = np.load(tmp_path / "vc" / "s1.npy")
    np.testing.assert_allclose(npy[..., 0], m0, atol=1e-3)

    def crossings(profile: np.ndarray) -> tuple[float, float]:
        # pixel i's centre is at (i + 0.5) map px; linear interpolation of the 0.5 level, rising then falling
        up = int(np.argmax(profile >= 0.5))
        dn = len(profile) - int(np.argmax(profile[::-1] >= 0.5))  # first index below 0.5 after the plateau
        xu = up - 1 + (0.5 - profile[up - 1]) / (profile[up] - profile[up - 1])
        xd = dn - 1 + (profile[dn - 1] - 0.5) / (profile[dn - 1] - profile[dn])
        return (xu + 0.5) * px_um, (xd + 0.5) * px_um

    row = m0[int((y0e + y1e) / 2 / s)]
    col = m0[:, int((x0e + x1e) / 2 / s)]
    for got, want in zip((*crossings(row), *crossings(col)), (x0e, x1e, y0e, y1e)):
        assert abs(got - want * mpp) <= tol_px * px_um, (got, want * mpp)
    mask = np.asarray(Image.open(tmp_path / "vc" / "s1_mask.png"))
    assert mask.shape == m0.shape and mask[0, 0] == 0 and mask[2, 3] == 255  # tissue starts at the grid origin


def test_ome_pyramid_channels_and_pixel_size(tmp_path):
    # few tiles on a big slide (size from an attr): the canvas is 358 x 268 map px -> >= 2 levels
    s, mpp = 56, 0.25
    coords = np.array([[0, 0], [10000, 7000], [19800, 14800]])
    vals = np.random.default_rng(0).random((3, 40)).astype(np.float32)
    pred = write_pred(tmp_path / "big.h5", coords, vals, 224, s, mpp, slide_dimensions=(20000, 15000))
    res = write_slide_maps(pred, tmp_path / "vc", formats=("ome",))
    assert res["shape"] == [268, 358, 40] and res["pixel_size_um"] == pytest.approx(14.0)
    with tifffile.TiffFile(res["paths"]["ome"][0]) as tif:
        series = tif.series[0]
        assert series.axes == "CYX" and series.dtype == np.float32
        assert [lv.shape for lv in series.levels][:2] == [(40, 268, 358), (40, 134, 179)]
        assert len(series.levels) >= 2
        names, px_um, unit = _ome_pixels(tif)
        assert names == MARKERS and "Mac2/Galectin-3" in names
        assert px_um == pytest.approx(s * mpp) and unit == "µm"
        lv0 = series.levels[0].asarray()
        # tile (10000, 7000): rows 125..128 (7000 = 125 s), columns 179..182 (centre of 178 is 9996 < 10000)
        np.testing.assert_allclose(lv0[:, 125:129, 179:183], np.broadcast_to(vals[1][:, None, None], (40, 4, 4)),
                                   rtol=1e-6)
        assert not lv0[:, 124, 179:183].any() and not lv0[:, 125:129, 178].any() and not lv0[:, 125:129, 183].any()
        np.testing.assert_allclose(series.levels[1].asarray()[3], downsample2(lv0[3]), rtol=1e-6)


def test_pyramid_helpers():
    assert pyramid_shapes((1000, 300), 256) == [(1000, 300), (500, 150), (250, 75)]
    assert pyramid_shapes((100, 100), 256) == [(100, 100)]
    img = np.arange(15, dtype=np.float32).reshape(3, 5)
    d = downsample2(img)
    assert d.shape == (2, 3)
    assert d[0, 0] == pytest.approx((0 + 1 + 5 + 6) / 4) and d[1, 2] == pytest.approx(14.0)  # edge: own pixels


def test_write_ome_pyramid_rejects_bad_names(tmp_path):
    with pytest.raises(ValueError, match="names"):
        write_ome_pyramid(tmp_path / "x.ome.tif", np.zeros((4, 4, 2), np.float32), ["a"], 1.0)


def test_geojson_is_qupath_detections(tmp_path):
    s, p = 112, 224
    coords = np.array([[30, 40], [142, 40], [30, 152], [254, 264]])
    vals = np.random.default_rng(1).random((4, 40)).astype(np.float32)
    pred = write_pred(tmp_path / "g.h5", coords, vals, p, s)
    res = write_slide_maps(pred, tmp_path / "vc", formats=("geojson",))
    gj = json.loads(Path(res["paths"]["geojson"][0]).read_text())
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == len(coords)
    ids = [f["id"] for f in gj["features"]]
    assert len(set(ids)) == len(ids)
    for (x, y), v, feat in zip(coords, vals, gj["features"]):
        ring = feat["geometry"]["coordinates"][0]
        assert feat["geometry"]["type"] == "Polygon" and len(ring) == 5 and ring[0] == ring[-1]
        assert ring == [[x, y], [x + p, y], [x + p, y + p], [x, y + p], [x, y]]  # level-0 px
        props = feat["properties"]
        assert props["objectType"] == "detection"
        assert list(props["measurements"]) == MARKERS
        np.testing.assert_allclose(list(props["measurements"].values()), v, atol=5e-5)


def test_empty_slide_writes_zero_map_and_empty_collection(tmp_path, caplog):
    pred = write_pred(tmp_path / "e.h5", np.zeros((0, 2)), np.zeros((0, 40)), 224, 224,
                      slide_dimensions=(1000, 600))
    with caplog.at_level(logging.WARNING):
        res = write_slide_maps(pred, tmp_path / "vc")
    assert "no tiles" in caplog.text
    m = np.load(res["paths"]["npy"][0])
    assert m.shape == (3, 5, 40) and m.dtype == np.float16 and not m.any()
    assert json.loads(Path(res["paths"]["geojson"][0]).read_text())["features"] == []
    with tifffile.TiffFile(res["paths"]["ome"][0]) as tif:
        assert tif.series[0].shape == (40, 3, 5)
    assert Path(res["paths"]["preview"][0]).stat().st_size > 0 and res["n_tiles"] == 0


@pytest.mark.slow
def test_he_slide_gives_canvas_and_preview(tmp_path):
    from sample_data.writers import write_aperio_tiff

    he = tmp_path / "he" / "h1.tif"
    he.parent.mkdir()
    rgb = np.full((700, 900, 3), 240, np.uint8)
    rgb[200:500, 300:700] = (150, 60, 140)
    write_aperio_tiff(he, rgb, 0.5)
    coords = np.array([[x, y] for y in range(200, 500 - 112 + 1, 56) for x in range(300, 700 - 112 + 1, 56)])
    vals = np.random.default_rng(2).random((len(coords), 40)).astype(np.float32)
    pred = write_pred(tmp_path / "h1.h5", coords, vals, 112, 56, mpp=None, he_path=str(he))
    assert read_prediction(pred).mpp is None
    res = write_slide_maps(pred, tmp_path / "vc", preview_markers=["cd8", "Ki67"])
    assert res["shape"] == [int(np.ceil(700 / 56)), int(np.ceil(900 / 56)), 40]
    assert res["mpp"] == pytest.approx(0.5) and res["he_path"] == str(he)
    assert Image.open(res["paths"]["preview"][0]).size[0] > 300
    assert is_done(tmp_path / "vc", "h1") and not is_done(tmp_path / "vc", "other")
    again = write_slide_maps(pred, tmp_path / "vc", preview_markers=["cd8", "Ki67"])
    assert again["skipped"] is True
    with pytest.raises(PipelineError, match=r"done with other settings: preview_markers .*pass --overwrite"):
        write_slide_maps(pred, tmp_path / "vc")  # another preview choice: not silently kept, not silently redone
    assert write_slide_maps(pred, tmp_path / "vc", overwrite=True)["skipped"] is False


def test_preview_marker_choice():
    assert choose_preview_markers(MARKERS, None) == list(DEFAULT_PREVIEW_MARKERS)
    assert choose_preview_markers([f"m{i}" for i in range(12)], None) == [f"m{i}" for i in range(8)]
    assert choose_preview_markers(MARKERS, ["pd-l1"]) == ["PD-L1"]
    with pytest.raises(PipelineError, match="nope"):
        choose_preview_markers(MARKERS, ["nope"])


def test_cli_skips_done_reports_failures(tmp_path):
    out = tmp_path / "out"
    (out / "hex_pred").mkdir(parents=True)
    coords = np.array([[0, 0], [224, 0]])
    write_pred(out / "hex_pred" / "a.h5", coords, np.ones((2, 40)), 224, 224, slide_dimensions=(448, 224))
    (out / "hex_pred" / "bad.h5").write_bytes(b"not an hdf5 file")
    assert main(["--out", str(out), "--formats", "npy", "geojson"]) == 1
    vc = out / "virtual_codex"
    assert (vc / "a.npy").exists() and (vc / "a.geojson").exists() and not (vc / "a.ome.tif").exists()
    assert (vc / "config.json").exists() and not (vc / "bad.npy").exists()
    mtime = (vc / "a.json").stat().st_mtime_ns
    assert main(["--out", str(out), "--slides", "a", "--formats", "npy"]) == 0
    assert (vc / "a.json").stat().st_mtime_ns == mtime  # skipped: done
    assert main(["--out", str(out), "--slides", "a", "--formats", "ome"]) == 0  # new format -> redone
    assert (vc / "a.ome.tif").exists() and is_done(vc, "a", ["npy", "geojson", "ome"])
    (out / "hex_pred" / "a.h5").touch()  # new predictions -> stale record -> redone
    assert not is_done(vc, "a", ["npy"])
    assert main(["--out", str(tmp_path / "nothing")]) == 2
