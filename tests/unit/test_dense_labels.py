"""Dense (cell-scale) labels: cell geometry, cell means against known patterns and brute force, the field, errors."""

import json

import h5py
import numpy as np
import pytest

from pipeline.errors import PipelineError
from preprocess.quantify import accumulate, dense
from preprocess.quantify.geometry import CodexToHE
from preprocess.registration.field import DisplacementField
from preprocess.slide_io import CodexImage
from sample_data.writers import write_ome_pyramid
from tests.stages.test_quantify import _affine, _grid, brute_force

CODEX_MPP = 0.5


def _cells_brute(data, coords, size, grid, affine, field=None, step=1.0):
    """(N, C, G, G) brute-force cell means (each cell a patch of side size / grid) and (N, G, G) pixel counts."""
    c = size // grid
    cells = np.array([[x + j * c, y + i * c] for x, y in coords for i in range(grid) for j in range(grid)])
    means, counts = brute_force(data, cells, c, affine, field, step)
    n = len(coords)
    return np.moveaxis(means.reshape(n, grid, grid, -1), 3, 1), counts.reshape(n, grid, grid)


@pytest.fixture(scope="module")
def blocks(tmp_path_factory):
    """Channel 0: a 7 x 7 px block pattern (block (r, q) = 10 r + q + 1); channel 1: noise; 56 x 56 px."""
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[0:56, 0:56]
    data = np.stack([(10 * (yy // 7) + xx // 7 + 1).astype(np.uint16),
                     rng.integers(0, 4000, (56, 56)).astype(np.uint16)])
    path = tmp_path_factory.mktemp("dense") / "blocks.ome.tif"
    write_ome_pyramid(path, data, ["A", "B"], mpp=CODEX_MPP, tile=16)
    return path, data


def test_cell_side_and_cells():
    assert dense.cell_side(224, 16) == 14 and dense.cell_side(448, 16) == 28
    with pytest.raises(PipelineError, match=r"--dense-grid 15 does not divide the patch side 224 px of g\.h5"):
        dense.cell_side(224, 15, " of g.h5")
    coords = np.array([[0, 0], [14, 0], [100, 50]])  # the first two overlap by 14 of their 28 px
    cells, inv = dense.cell_coords(coords, 28, 4)
    assert inv.shape == (3, 4, 4) and len(cells) == 16 + 8 + 16  # shared cells counted once
    np.testing.assert_array_equal(cells[inv[2, 1, 3]], [100 + 3 * 7, 50 + 7])  # row i = y, column j = x
    np.testing.assert_array_equal(cells[inv[0, 2, 2]], cells[inv[1, 2, 0]])


def test_cell_means_are_the_block_values_and_average_to_the_patch(blocks):
    path, data = blocks
    coords = _grid(56, 56, 28)  # 4 patches, each 4 x 4 cells of 7 px, through the identity
    with CodexImage(path) as codex:
        vals = dense.quantify_dense(codex, [0, 1], coords, 28, 4, _affine())
        patch = accumulate.quantify_patches(codex, [0, 1], coords, 28, _affine())
    assert vals.shape == (4, 2, 4, 4) and vals.dtype == np.float32
    for n, (x, y) in enumerate(coords):
        expect = 10 * (y // 7 + np.arange(4))[:, None] + (x // 7 + np.arange(4))[None, :] + 1
        np.testing.assert_array_equal(vals[n, 0], expect)
    ref, counts = _cells_brute(data, coords, 28, 4, _affine())
    assert (counts == 49).all()
    np.testing.assert_allclose(vals, ref, rtol=1e-6)
    # fully covered, equal cells: the mean of the G x G cell means is the patch mean
    np.testing.assert_allclose(vals.mean(axis=(2, 3)), patch.means, rtol=1e-6)


def test_a_bright_block_lands_in_its_registered_cell(tmp_path):
    """A bright 7 x 7 block at CODEX (x 0..6, y 7..13), shifted by the affine by (+7, 0) px: cell (row 1, col 1)."""
    data = np.full((1, 40, 40), 10, np.uint16)
    data[0, 7:14, 0:7] = 1000
    path = tmp_path / "bright.ome.tif"
    write_ome_pyramid(path, data, ["A"], mpp=CODEX_MPP, tile=16)
    with CodexImage(path) as codex:
        vals = dense.quantify_dense(codex, [0], np.array([[0, 0]]), 28, 4, _affine(tx=7.0))
    expect = np.full((4, 4), 10.0)
    expect[1, 1] = 1000.0
    expect[:, 0] = np.nan  # H&E x 0..6 shows CODEX x -7..-1: no CODEX pixel
    np.testing.assert_array_equal(vals[0, 0], expect)
    with CodexImage(path) as codex:  # shifted by 3 / 4 px: 4 / 3 of column 0's 7 px columns hold CODEX pixels
        three, four = (dense.quantify_dense(codex, [0], np.array([[0, 0]]), 28, 4, _affine(tx=t))[0, 0]
                       for t in (3.0, 4.0))
    assert not np.isnan(three).any() and np.isnan(four[:, 0]).all() and not np.isnan(four[:, 1:]).any()


def test_zero_area_cells_are_nan_only_in_patches_with_missing_data(tmp_path):
    """An all-zero 14 x 14 px block: glass when the patch has no missing data (cells 0), missing data otherwise."""
    data = np.full((2, 64, 64), 50, np.uint16)
    data[:, 14:28, 0:14] = 0
    path = tmp_path / "hole.ome.tif"
    write_ome_pyramid(path, data, ["A", "B"], mpp=CODEX_MPP, tile=16)
    with CodexImage(path) as codex:
        zero = accumulate.ZeroAreas(codex, [0, 1], 10)
        glass, missing = (dense.quantify_dense(codex, [0, 1], np.array([[0, 0]]), 28, 4, _affine(),
                                               patch_missing=np.array([m]), nodata_px=10, zero_areas=zero)[0, 0]
                          for m in (0.0, 0.2))
    hole = np.zeros((4, 4), bool)
    hole[2:4, 0:2] = True  # rows y 14..27, columns x 0..13
    assert (glass[hole] == 0).all() and (glass[~hole] == 50).all()
    assert np.isnan(missing[hole]).all() and (missing[~hole] == 50).all()


@pytest.mark.parametrize("affine", [_affine(1.3, 8.0, 3.0, -2.0), _affine(0.754, -5.0, 10.0, 4.0)])
def test_cell_means_equal_brute_force_with_a_field(blocks, affine):
    """A scaled, rotated affine plus a smooth field: every cell is the brute-force mean of the pixels mapped into it,
    and the affine alone gives other cells (the field moves them)."""
    from scipy import ndimage as ndi

    path, data = blocks
    rng = np.random.default_rng(4)
    field = ndi.gaussian_filter(rng.normal(0, 30, (2, 5, 5)), (0, 1.0, 1.0)).astype(np.float32)  # |grad| < 0.3
    mapping = CodexToHE(affine, DisplacementField(field, 24.0))
    coords = _grid(70, 60, 28, start=(2, 1))
    with CodexImage(path) as codex:
        vals = dense.quantify_dense(codex, [0, 1], coords, 28, 4, mapping, region_px=32, threads=2)
        flat = dense.quantify_dense(codex, [0, 1], coords, 28, 4, affine, region_px=32)
    ref, counts = _cells_brute(data, coords, 28, 4, affine, field, 24.0)
    assert np.abs(field).max() > 3
    # NaN exactly where a cell has no pixel or less than half of it is inside the mapped CODEX
    assert np.isnan(vals).any() and (~np.isnan(vals)).sum() > 50
    ok = ~np.isnan(vals[:, 0])
    assert (counts[ok] > 0).all()
    np.testing.assert_allclose(vals.transpose(1, 0, 2, 3)[:, ok], ref.transpose(1, 0, 2, 3)[:, ok], rtol=1e-5)
    both = ok & ~np.isnan(flat[:, 0])
    assert np.abs(vals[:, 0][both] - flat[:, 0][both]).max() > 1  # the field moves cells


def test_a_shifting_field_moves_the_dense_labels_by_one_cell(blocks):
    """A field of +7 px in x everywhere (one cell) vs the affine only: the dense values move one column right."""
    path, _ = blocks
    field = np.zeros((2, 4, 4), np.float32)
    field[0] = 7.0
    coords = np.array([[7, 0], [7, 28]])
    with CodexImage(path) as codex:
        with_field = dense.quantify_dense(codex, [0, 1], coords, 28, 4, CodexToHE(_affine(), DisplacementField(
            field, 30.0)))
        affine_only = dense.quantify_dense(codex, [0, 1], coords, 28, 4, CodexToHE(_affine()))
    np.testing.assert_allclose(with_field[..., 1:], affine_only[..., :-1], rtol=1e-6)
    assert not np.allclose(with_field[..., 1:], affine_only[..., 1:])


def test_reader_checks_file_schema_and_markers(tmp_path):
    with pytest.raises(PipelineError, match=r"dense labels not found: .*s1\.h5; run stage 03 with --dense-grid"):
        dense.read_dense_labels(dense.dense_label_path(tmp_path, "s1"))
    assert dense.dense_label_path(tmp_path, "s1") == tmp_path / "markers_dense" / "s1.h5"
    raw = tmp_path / "raw.h5"
    with h5py.File(raw, "w") as f:
        f["index"] = np.array([0, 2, 5])
        f["coords"] = np.array([[0, 0], [20, 0], [40, 20]])
        f["values"] = np.arange(3 * 2 * 2 * 2, dtype=np.float32).reshape(3, 2, 2, 2)
        f["values"][1, 0, 0, 0] = np.nan
        f.attrs.update(dense._attrs(["A", "B"], 2, 10, 20, 0.5, "affine"))
    out = dense.dense_label_path(tmp_path, "s1")
    def norm(v):  # like apply_normalization for a flat marker: NaN in, a number out; the writer restores the NaN
        return np.nan_to_num(v / 100.0)

    assert dense.write_dense_labels(out, raw, np.array([5, 2]), np.array([[40, 20], [20, 0]]), ["A", "B"], norm)
    assert not dense.write_dense_labels(out, raw, np.array([5, 2]), np.array([[40, 20], [20, 0]]), ["A", "B"],
                                        norm)  # same content: left alone
    lab = dense.read_dense_labels(out, ["A", "B"])
    assert lab.grid == 2 and lab.cell_px_level0 == 10 and lab.cell_um == 5.0 and lab.registration == "affine"
    np.testing.assert_array_equal(lab.index, [5, 2])
    with h5py.File(raw) as f:
        expect = f["values"][:][[2, 1]] / 100.0
    np.testing.assert_allclose(lab.values, expect.astype(np.float16), equal_nan=True)
    assert np.isnan(lab.values[1, 0, 0, 0]) and lab.values.dtype == np.float32
    with pytest.raises(PipelineError, match="lack 1 patches of the labels .*index 3"):
        dense.write_dense_labels(out, raw, np.array([3]), np.array([[0, 0]]), ["A", "B"], lambda v: v)
    with pytest.raises(PipelineError, match=r"s1\.h5 are for the markers \['A', 'B'\]"):
        dense.read_dense_labels(out, ["B", "A"])
    with h5py.File(out, "a") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(PipelineError, match="schema 99"):
        dense.read_dense_labels(out)
    assert json.loads(h5py.File(raw).attrs["markers"]) == ["A", "B"]
