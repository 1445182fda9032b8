"""hex.infer.dense_maps without a slide: the blending window, the band accumulator (constant tiles give a constant
map, any arrival order gives the in-memory blend, the band stays small), the pyramid written band by band equals the
array writer's, row regions, the stride rule, and the sampler at pixel centres."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from hex.infer import dense_maps as dm
from hex.infer.map_formats import write_ome_pyramid
from pipeline.errors import PipelineError

G = 8


def _reference(shape: tuple[int, int], cells: np.ndarray, dense: np.ndarray, window: np.ndarray) -> np.ndarray:
    """The blend in memory: sum w v / sum w, 0 where no tile."""
    h, w = shape
    acc = np.zeros((h, w, dense.shape[1]), np.float64)
    ws = np.zeros((h, w), np.float64)
    for (r, q), d in zip(cells, dense):
        acc[r:r + G, q:q + G] += window[:, :, None] * d.transpose(1, 2, 0)
        ws[r:r + G, q:q + G] += window
    return np.where(ws[..., None] > 0, acc / np.maximum(ws, 1e-30)[..., None], 0.0)


def _blend(tmp_path: Path, shape: tuple[int, int], cells: np.ndarray, dense: np.ndarray, batch: int,
           order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dm.BandAccumulator]:
    m = dense.shape[1]
    planes = dm.RawPlanes(tmp_path / "p.f32", m, *shape)
    mask = dm.RawMask(tmp_path / "m.u8", *shape)
    acc = dm.BandAccumulator(shape, m, G, dm.blend_window(G), cells[:, 0], planes, mask)
    order = np.arange(len(cells)) if order is None else order
    for i in range(0, len(order), batch):
        sel = order[i:i + batch]
        acc.add(cells[sel], dense[sel])
    acc.finish()
    out = np.stack([planes.read(ch, 0, shape[0]) for ch in range(m)], axis=-1)
    return out, mask.read(0, shape[0]) > 0, acc


def _lattice(rows: int, cols: int, step: int, r0: int = 3, q0: int = 2) -> np.ndarray:
    rr, qq = np.meshgrid(np.arange(rows) * step + r0, np.arange(cols) * step + q0, indexing="ij")
    return np.stack([rr.ravel(), qq.ravel()], 1)


def test_window_is_a_positive_bump_whose_half_shifts_sum_to_a_constant() -> None:
    w = dm.blend_window(G)
    f = dm.WINDOW_FLOOR
    edge = f + (1 - f) * np.sin(np.pi / (2 * G)) ** 2
    assert w.shape == (G, G) and (w > 0).all() and w.min() == pytest.approx(edge**2, rel=1e-5)
    assert np.allclose(w, w.T) and np.allclose(w, w[::-1, ::-1])
    assert w[G // 2 - 1, G // 2 - 1] == w.max()
    s = np.zeros((2 * G, 2 * G))
    for dy in (0, G // 2, G):
        for dx in (0, G // 2, G):
            s[dy:dy + G, dx:dx + G] += w
    inner = s[G // 2:G + G // 2, G // 2:G + G // 2]  # covered by 4 tiles everywhere
    assert np.ptp(inner) < 1e-5 * inner.mean()


def test_constant_tiles_give_a_constant_map_without_seams(tmp_path: Path) -> None:
    cells = _lattice(5, 6, G // 2)
    vals = np.array([0.3, 0.7, 1.5], np.float32)
    dense = np.broadcast_to(vals[None, :, None, None], (len(cells), 3, G, G)).copy()
    shape = (3 + 4 * (G // 2) + G + 2, 2 + 5 * (G // 2) + G + 1)
    rng = np.random.default_rng(0)
    out, mask, _ = _blend(tmp_path, shape, cells, dense, batch=7, order=rng.permutation(len(cells)))
    cover = np.zeros(shape, bool)
    for r, q in cells:
        cover[r:r + G, q:q + G] = True
    assert (mask == cover).all()
    np.testing.assert_allclose(out[cover], np.broadcast_to(vals, (int(cover.sum()), 3)), rtol=1e-6)
    assert (out[~cover] == 0).all()


def test_any_arrival_order_gives_the_in_memory_blend_and_the_band_stays_small(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    cells = _lattice(12, 4, G // 2)
    cells = cells[rng.random(len(cells)) > 0.2]  # holes, as tissue leaves them
    dense = rng.random((len(cells), 2, G, G)).astype(np.float32)
    shape = (3 + 11 * (G // 2) + G + 5, 2 + 3 * (G // 2) + G)
    ref = _reference(shape, cells, dense, dm.blend_window(G))
    for k, order in enumerate((None, rng.permutation(len(cells)))):
        (tmp_path / str(k)).mkdir()
        out, _, acc = _blend(tmp_path / str(k), shape, cells, dense, batch=3, order=order)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
        if order is None:  # row order: the band holds ~G + a batch's rows, not the map
            assert acc.max_band_rows <= 2 * G < shape[0]


def test_pyramid_written_band_by_band_equals_the_array_writer(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    h, w, m = 70, 53, 3
    img = rng.random((h, w, m)).astype(np.float32)
    planes = dm.RawPlanes(tmp_path / "p.f32", m, h, w)
    planes.write_rows(0, img)
    levels = dm.DenseLevels(planes, tmp_path, tile=16)
    mask = (rng.random((h, w)) > 0.5).astype(np.uint8) * 255
    names = ["CD8", "CD20", "Ki67"]
    write_ome_pyramid(tmp_path / "a.ome.tif", img, names, 7.0, tile=16)
    write_ome_pyramid(tmp_path / "b.ome.tif", levels, names, 7.0, tile=16, mask=lambda y0, y1: mask[y0:y1],
                      description=json.dumps({"cell_px_level0": 14, "note": "<&>"}))
    with tifffile.TiffFile(tmp_path / "a.ome.tif") as a, tifffile.TiffFile(tmp_path / "b.ome.tif") as b:
        la, lb = a.series[0].levels, b.series[0].levels
        assert len(la) == len(lb) == 4 and lb[0].shape == (m, h, w) and lb[1].shape == (m, 35, 27)
        for x, y in zip(la, lb):
            np.testing.assert_array_equal(x.asarray(), y.asarray())
        assert (b.series[1].asarray() == mask).all()
        assert 'Name="Ki67"' in b.ome_metadata and 'PhysicalSizeX="7.0"' in b.ome_metadata
    assert dm.dense_description(tmp_path / "b.ome.tif") == {"cell_px_level0": 14, "note": "<&>"}
    assert dm.dense_description(tmp_path / "a.ome.tif") is None


def test_row_regions_one_tile_row_each_bounded_width_row_major() -> None:
    xy = np.array([[x, y] for y in (0, 56, 112) for x in range(0, 1000, 56)], np.int64)[::-1]
    regions = dm.row_regions(xy, 112, 400)
    got = np.concatenate(regions)
    assert sorted(got.tolist()) == list(range(len(xy)))
    ys = [int(xy[r[0], 1]) for r in regions]
    assert ys == sorted(ys)
    for r in regions:
        assert len(set(xy[r, 1].tolist())) == 1
        assert xy[r, 0].max() + 112 - xy[r, 0].min() <= 400


def test_dense_stride_default_quarter_tile_and_multiples_of_the_cell() -> None:
    assert dm.dense_stride(224, 16, None) == 56  # a quarter of the tile (40x: 448 px tiles -> 112)
    assert dm.dense_stride(448, 16, None) == 112
    assert dm.dense_stride(224, 16, 112) == 112
    with pytest.raises(PipelineError, match="--dense-stride 50"):
        dm.dense_stride(224, 16, 50)
    with pytest.raises(PipelineError, match="--dense-stride 448"):
        dm.dense_stride(224, 16, 448)
    with pytest.raises(PipelineError, match="dense grid"):
        dm.dense_stride(100, 16, None)


def test_sample_dense_map_bilinear_between_tissue_pixel_centres() -> None:
    h, w, c = 40, 50, 14
    vals = np.zeros((h, w, 2), np.float32)
    vals[..., 0] = np.arange(w)[None, :]  # column index
    vals[..., 1] = np.arange(h)[:, None]  # row index
    mask = np.ones((h, w), bool)
    mask[:, 30:] = False
    d = dm.DenseMap(values=vals, mask=mask, markers=["x", "y"], cell_px_level0=c, mpp=0.5)
    centre = lambda q, r: ((q + 0.5) * c - 0.5, (r + 0.5) * c - 0.5)  # noqa: E731
    pts = np.array([centre(3, 4), centre(10.5, 20.25), centre(29.5, 2), centre(35, 5), (-100.0, 5.0)])
    out = dm.sample_dense_map(d, pts, block=8)
    np.testing.assert_allclose(out[0], [3, 4], atol=1e-5)
    np.testing.assert_allclose(out[1], [10.5, 20.25], atol=1e-5)
    np.testing.assert_allclose(out[2], [29, 2], atol=1e-5)  # the neighbour outside tissue carries no weight
    assert np.isnan(out[3]).all() and np.isnan(out[4]).all()
