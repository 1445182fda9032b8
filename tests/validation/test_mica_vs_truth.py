"""bench.mica_vs_truth: the risk-mask footprint means and the IG AUROC that the demo summary and bench.validate_mica
report."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import h5py
import numpy as np

from bench.mica_vs_truth import ig_risk_auroc, patch_risk_deviation


def _cohort(tmp_path: Path) -> Path:
    """One slide whose risk mask (downsample 32) is 128 except a 255 block over level-0 [224, 448) x [0, 224)."""
    mask = np.full((14, 14), 128, np.uint8)
    mask[0:7, 7:14] = 255
    (tmp_path / "risk_masks").mkdir()
    cv2.imwrite(str(tmp_path / "risk_masks" / "s.png"), mask)
    gt = {"slides": {"s": {"risk_mask_png": "risk_masks/s.png", "risk_mask_downsample": 32}}, "patients": {}}
    (tmp_path / "ground_truth.json").write_text(json.dumps(gt))
    return tmp_path


def test_footprint_mean_of_the_mask(tmp_path: Path) -> None:
    c = _cohort(tmp_path)
    coords = np.array([[0, 0], [224, 0], [112, 0], [0, 224]])
    dev = patch_risk_deviation(c, "s", coords, 224)
    # x = 112: the 7 mask pixels whose centres lie in [112, 336) are columns 3..9, of which 7..9 are 255
    np.testing.assert_allclose(dev, [0, 127, 127 * 3 / 7, 0])


def test_ig_auroc_ranks_attributions(tmp_path: Path) -> None:
    c = _cohort(tmp_path)
    ig = tmp_path / "ig"
    ig.mkdir()
    coords = np.array([[x, y] for y in (0, 224) for x in (0, 224)])  # the block is the second patch
    for name, attr in (("s", [0.1, -2.0, 0.2, 0.0]),):  # |attr| largest on the risk block
        with h5py.File(ig / f"{name}.h5", "w") as f:
            f["coords"], f["path_attr"] = coords, np.array(attr)
            f.attrs["patch_size_level0"] = 224
    assert ig_risk_auroc(c, ig)["s"] == 1.0
    with h5py.File(ig / "s.h5", "a") as f:
        f["path_attr"][...] = [2.0, 0.05, 0.2, 0.1]  # every neutral patch above the risk block
    assert ig_risk_auroc(c, ig)["s"] == 0.0
