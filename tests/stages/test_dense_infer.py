"""Stage 06 with --dense (hex.infer.dense_maps) on small synthetic slides, CPU.

Fast: a dark rectangle painted at a known level-0 position lands, in the dense OME-TIFF of a stand-in model whose
dense output is each cell's darkness, within one dense pixel of its H&E position (and the file reads back with
tifffile: 40 named channels, physical size = the cell, a tissue mask); spatial reads the dense map instead of the
patch map (lazily, bilinear at cells); --dense with a checkpoint without a dense head is one line (exit 2).
Slow: the stage with a tiny dense HEX: the patch outputs equal those of a run without --dense, the dense files and
the record's ``dense`` entry appear, a rerun skips, a rerun without --dense is "done with other settings".
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import torch

from bench.bench_dense_infer import DarkCells
from hex.infer import dense_maps as dm
from hex.infer import stage as infer_wsi
from hex.infer.predictions import InferConfig
from hex.model import HEX
from hex.trained_model import original_markers
from pipeline.io import write_json
from sample_data.writers import write_aperio_tiff
from tests.fixtures import save_run

PS, GRID, MPP = 112, 16, 0.5  # tile 112 px = 56 µm, cell 7 px = 3.5 µm
X0, X1, Y0, Y1 = 403, 611, 298, 530  # the dark rectangle, level-0 px [X0, X1) x [Y0, Y1), off the 7 px lattice
# DarkCells: a stand-in dense HEX, every marker of cell (i, j) = that cell's darkness 1 - mean(x) (inputs in [0, 1])


def _slide(path: Path) -> None:
    rgb = np.full((900, 1000, 3), 242, np.uint8)  # glass
    rgb[60:840, 50:950] = (220, 120, 180)  # pink tissue
    rgb[Y0:Y1, X0:X1] = (80, 30, 110)  # the feature
    path.parent.mkdir(parents=True, exist_ok=True)
    write_aperio_tiff(path, rgb, MPP)


@pytest.fixture(scope="module")
def dense_out(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """OUT with the dense map of slide ``s`` made by the stand-in, and a map record ``s.json`` describing it."""
    d = tmp_path_factory.mktemp("dense")
    he = d / "he" / "s.tif"
    _slide(he)
    out = d / "out"
    vc = out / "virtual_codex"
    meta = {"markers": original_markers(), "input_size": PS, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0),
            "checkpoint": "dark cells"}
    patch = InferConfig(pred_dir=out / "hex_pred", grid_dir=out / "patches", patch_size=PS, workers=0, batch_size=16,
                        min_tissue=0.5)
    cfg = dm.DenseConfig(out_dir=vc, patch=patch)
    desc = dm.dense_slide("s", he, DarkCells(), meta, cfg, torch.device("cpu"))
    write_json(vc / "s.json", {"slide": "s"})
    assert dm.attach_dense_record(vc, "s")
    return he, out, desc


def _crossings(profile: np.ndarray) -> tuple[float, float]:
    """Index positions (fractional) where a profile crosses halfway between its tissue and feature levels."""
    hi, lo = np.percentile(profile, 95), np.median(profile[profile > 0])
    half = (lo + hi) / 2
    above = profile > half
    i, j = int(np.argmax(above)), len(above) - int(np.argmax(above[::-1]))
    rise = i - 1 + (half - profile[i - 1]) / (profile[i] - profile[i - 1])
    fall = j - 1 + (profile[j - 1] - half) / (profile[j - 1] - profile[j])
    return rise, fall


def test_dark_rectangle_lands_within_one_dense_pixel_and_the_file_reads_back(dense_out) -> None:
    he, out, desc = dense_out
    c = PS // GRID
    path = out / "virtual_codex" / "s_dense.ome.tif"
    assert desc["cell_px_level0"] == c and desc["stride_level0"] == PS // 4 and desc["shape"] == [129, 143, 40]
    with tifffile.TiffFile(path) as t:
        img = t.series[0].levels[0].asarray()
        mask = t.series[1].asarray() > 0
        ome = t.ome_metadata
    assert img.shape == (40, 129, 143) and img.dtype == np.float32 and mask.shape == (129, 143)
    assert all(f'Name="{m}"' in ome for m in original_markers())
    assert f'PhysicalSizeX="{c * MPP}"' in ome and f'PhysicalSizeY="{c * MPP}"' in ome
    assert (img[:, ~mask] == 0).all() and mask.mean() > 0.5
    # H&E: the edge between pixel X0-1 and X0 is at level-0 x = X0 - 0.5; dense pixel q is centred at (q+1/2)c - 1/2
    r, q = int((Y0 + Y1) / 2 / c), int((X0 + X1) / 2 / c)
    x_edges = [(k + 0.5) * c - 0.5 for k in _crossings(img[5, r].astype(float))]
    y_edges = [(k + 0.5) * c - 0.5 for k in _crossings(img[5, :, q].astype(float))]
    for got, want in zip((*x_edges, *y_edges), (X0 - 0.5, X1 - 0.5, Y0 - 0.5, Y1 - 0.5)):
        assert abs(got - want) <= c, (got, want)
    inside = img[0, -(-Y0 // c):Y1 // c, -(-X0 // c):X1 // c]  # pixels wholly inside the rectangle
    assert np.ptp(inside) < 0.01 and inside.min() > img[0, r, 10] + 0.2
    assert (out / "virtual_codex" / "s_dense_preview.png").stat().st_size > 1000


def test_spatial_cells_read_the_dense_map(dense_out) -> None:
    from spatial.markers import read_virtual_map, sample_map, virtual_source

    _he, out, _ = dense_out
    assert virtual_source(out, "s") == "dense"
    vm = read_virtual_map(out, "s")
    assert vm.source == "dense" and vm.stride_level0 == PS // GRID and vm.markers == original_markers()
    pts = np.array([[(X0 + X1) / 2, (Y0 + Y1) / 2], [X0 - 30, (Y0 + Y1) / 2], [5.0, 5.0]])
    vals, inside = sample_map(vm, pts)
    assert inside.tolist() == [True, True, False] and np.isnan(vals[2]).all()
    assert vals[0, 0] > vals[1, 0] + 0.2  # the dark feature vs the tissue beside it, 30 px = 4 cells away
    dmap = dm.read_dense_map(out, "s")
    np.testing.assert_allclose(dm.sample_dense_map(dmap, pts[:2]), vals[:2], rtol=1e-6)
    dmap.close()


def test_dense_with_a_checkpoint_without_dense_head_is_one_line(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    he = tmp_path / "he" / "s.tif"
    _slide(he)
    torch.manual_seed(0)
    ck = save_run(tmp_path / "out", "tiny", HEX("tiny", num_markers=40, input_size=32), original_markers())
    with caplog.at_level(logging.INFO):
        rc = infer_wsi.main(["--he", str(he.parent), "--out", str(tmp_path / "out"), "--checkpoint", str(ck),
                             "--dense", "--patch-size", str(PS), "--workers", "0"])
    assert rc == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "no dense head" in errors[0] and "\n" not in errors[0], errors
    assert not (tmp_path / "out" / "hex_pred" / "s.h5").exists()
    assert infer_wsi.main(["--he", str(he.parent), "--out", str(tmp_path / "o2"), "--checkpoint", str(ck),
                           "--dense-stride", "56"]) == 2  # --dense-stride without --dense


@pytest.mark.slow
def test_stage_dense_keeps_the_patch_outputs_and_follows_the_done_rules(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    he = tmp_path / "he" / "s.tif"
    _slide(he)
    torch.manual_seed(0)
    model = HEX("tiny", num_markers=40, input_size=PS, unfreeze_last=-1, dense_grid=GRID)
    ck = save_run(tmp_path / "ck", "tiny", model, original_markers())
    common = ["--he", str(he.parent), "--checkpoint", str(ck), "--patch-size", str(PS), "--workers", "0",
              "--map-formats", "npy", "ome"]
    assert infer_wsi.main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert infer_wsi.main([*common, "--out", str(tmp_path / "dense"), "--dense"]) == 0
    pa, pb = (tmp_path / run / "hex_pred" / "s.h5" for run in ("plain", "dense"))
    with h5py.File(pa) as a, h5py.File(pb) as b:
        np.testing.assert_array_equal(a["codex_prediction"][:], b["codex_prediction"][:])
    assert np.array_equal(np.load(tmp_path / "plain" / "virtual_codex" / "s.npy"),
                          np.load(tmp_path / "dense" / "virtual_codex" / "s.npy"))
    assert not list((tmp_path / "plain" / "virtual_codex").glob("*dense*"))
    rec = json.loads((tmp_path / "dense" / "virtual_codex" / "s.json").read_text())
    assert rec["dense"]["grid"] == GRID and rec["dense"]["stride"] == PS // 4 and rec["dense"]["n_tiles"] > 0
    assert (tmp_path / "dense" / "virtual_codex" / "s_dense_preview.png").is_file()
    dmap = dm.read_dense_map(tmp_path / "dense", "s")
    assert np.isfinite(np.asarray(dmap.values)).all() and np.asarray(dmap.values)[dmap.mask].std() > 0
    dmap.close()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert infer_wsi.main([*common, "--out", str(tmp_path / "dense"), "--dense"]) == 0
    assert "0 done, 1 skipped" in caplog.records[-1].getMessage()
    assert infer_wsi.main([*common, "--out", str(tmp_path / "dense")]) == 2  # done with other settings
    # a slide done without --dense is redone with it
    assert infer_wsi.main([*common, "--out", str(tmp_path / "plain"), "--dense", "--dense-stride", "56"]) == 0
    assert json.loads((tmp_path / "plain" / "virtual_codex" / "s.json").read_text())["dense"]["stride"] == 56
