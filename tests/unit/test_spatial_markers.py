"""spatial.markers: virtual maps sampled at cells, measured CODEX at cells through the registration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hex.infer.map_formats import write_ome_pyramid
from preprocess.quantify.geometry import CodexToHE
from spatial.markers import VirtualMap, measure_codex_at, normalise_measured, sample_map


def _vmap() -> VirtualMap:
    vals = np.zeros((3, 4, 2), np.float32)
    vals[..., 0] = np.arange(12, dtype=np.float32).reshape(3, 4)  # marker 0 = 4 r + c
    vals[..., 1] = 5.0
    mask = np.ones((3, 4), bool)
    mask[0, 3] = False  # no tissue there: its zero must not leak into neighbours
    vals[0, 3] = 0.0
    return VirtualMap(values=vals, mask=mask, markers=["a", "b"], stride_level0=100.0, mpp=0.5)


def test_sample_map_is_bilinear_between_pixel_centres() -> None:
    vm = _vmap()
    # pixel (r, c) is centred at level-0 ((c + 0.5) 100 - 0.5, (r + 0.5) 100 - 0.5) (level-0 pixel centres at
    # integers, as the stage-06 map's coverage rule)
    xy = np.array([[50.0, 50.0], [150.0, 250.0], [100.0, 100.0], [125.0, 175.0]]) - 0.5
    vals, inside = sample_map(vm, xy)
    assert inside.all()
    np.testing.assert_allclose(vals[:3, 0], [0.0, 9.0, 2.5], atol=1e-5)
    # (125, 175): u = 0.75, v = 1.25 -> between (1,0),(1,1),(2,0),(2,1): 4 + 0.75 + 0.25 * 4 = 5.75
    np.testing.assert_allclose(vals[3, 0], 5.75, atol=1e-5)
    np.testing.assert_allclose(vals[:, 1], 5.0, atol=1e-6)


def test_sample_map_ignores_pixels_outside_tissue_and_flags_points_with_none() -> None:
    vm = _vmap()
    vals, inside = sample_map(vm, np.array([[349.0, 51.0], [-500.0, -500.0]]))
    # next to the masked pixel (0, 3): only tissue neighbours count, so marker 1 stays 5 (not pulled towards 0)
    assert inside[0] and not inside[1]
    np.testing.assert_allclose(vals[0, 1], 5.0, atol=1e-6)
    assert np.isnan(vals[1]).all()


def test_measure_codex_at_cells_through_an_affine(tmp_path: Path) -> None:
    """A CODEX with a bright disk per 'cell' at known CODEX positions, an H&E twice as fine and shifted: the
    disk mean at each mapped H&E point is the disk's value, and points off the CODEX are invalid."""
    h, w = 300, 400
    img = np.zeros((h, w, 2), np.float32)
    cells_codex = np.array([[50, 60], [200, 150], [390, 290]], np.float64)
    yy, xx = np.mgrid[:h, :w]
    for k, (cx, cy) in enumerate(cells_codex):
        disk = (xx - cx) ** 2 + (yy - cy) ** 2 <= 6 ** 2
        img[disk, 0] = 10.0 * (k + 1)
        img[disk, 1] = 1.0
    path = tmp_path / "codex.ome.tif"
    write_ome_pyramid(path, img, ["A", "B"], pixel_size_um=0.5, tile=128)
    # CODEX px u -> H&E px x = 2 u + (30, 40)  (H&E at 0.25 µm/px)
    affine = np.array([[2.0, 0.0, 30.0], [0.0, 2.0, 40.0], [0.0, 0.0, 1.0]])
    he_pts = cells_codex * 2 + [30.0, 40.0]
    he_pts = np.vstack([he_pts, [[-1000.0, 5.0]]])
    raw, valid = measure_codex_at(path, CodexToHE(affine), [0, 1], he_pts, radius_um=2.0, block_px=128)
    assert valid.tolist() == [True, True, True, False]
    np.testing.assert_allclose(raw[:2, 0], [10.0, 20.0], atol=1e-4)
    np.testing.assert_allclose(raw[:2, 1], 1.0, atol=1e-5)
    assert raw[2, 0] == pytest.approx(30.0, abs=1e-3)  # at the image corner: the border is reflected
    assert np.isnan(raw[3]).all()


def test_normalise_measured_uses_the_labels_percentiles_and_keeps_nan() -> None:
    norm = {"values": [[0.0, 10.0], [2.0, 30.0]]}
    raw = np.array([[1.0, 20.0], [4.0, 5.0], [np.nan, np.nan]], np.float32)
    out = normalise_measured(raw, norm)
    np.testing.assert_allclose(out[:2], [[0.5, 0.5], [1.0, 0.0]])
    assert np.isnan(out[2]).all()


@pytest.mark.parametrize("n", [0])
def test_measure_codex_at_no_points(tmp_path: Path, n: int) -> None:
    raw, valid = measure_codex_at(tmp_path / "absent.ome.tif", CodexToHE(np.eye(3)), [0], np.zeros((n, 2)))
    assert raw.shape == (0, 1) and valid.shape == (0,)
