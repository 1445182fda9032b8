"""Stages 01-03 on one generated slide whose CODEX is written as OME-TIFF, QPTIFF (Fusion, Vectra/Polaris) and
MCMICRO (``make_cohort --codex-format``, the same cells and pixels): the same registration and the same labels
(issue 20, deliverable 1)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from preprocess import patch, register
from preprocess.quantify import stage as quantify

pytestmark = pytest.mark.slow  # a chain module: scripts/test.sh runs it, -m "not slow" skips it

FORMATS = ("ome", "qptiff-fusion", "qptiff-vectra", "mcmicro")


@pytest.fixture(scope="module")
def outs(tmp_path_factory) -> dict[str, Path]:
    from sample_data.make_cohort import main

    root = tmp_path_factory.mktemp("codex_formats")
    args = ["--slides", "1", "--seed", "5", "--tissue-mm", "0.5", "--workers", "1", "--log-level", "WARNING"]
    res = {}
    for fmt in FORMATS:
        cohort, out = root / fmt, root / f"{fmt}_out"
        assert main(["--out", str(cohort), "--codex-format", fmt, *args]) == 0
        common = ["--cohort", str(cohort), "--out", str(out)]
        assert patch.main([*common, "--patch-size", "112"]) == 0
        assert register.main(common) == 0
        assert quantify.main(common) == 0
        res[fmt] = out
    return res


def test_pairs_point_at_each_format(outs):
    pairs = {fmt: (out.parent / fmt / "pairs.csv").read_text().splitlines()[1] for fmt, out in outs.items()}
    assert pairs["qptiff-fusion"].endswith("codex/slide_000.qptiff")
    assert pairs["mcmicro"].endswith("codex/slide_000/registration/slide_000.ome.tif")
    assert (outs["mcmicro"].parent / "mcmicro" / "codex" / "slide_000" / "markers.csv").is_file()


def test_same_registration_and_labels_as_ome(outs):
    ref = json.loads((outs["ome"] / "registration" / "slide_000.json").read_text())
    labels = pd.read_csv(outs["ome"] / "markers" / "slide_000.csv")
    for fmt in FORMATS[1:]:
        rec = json.loads((outs[fmt] / "registration" / "slide_000.json").read_text())
        assert rec["codex_mpp"] == ref["codex_mpp"] == 0.377, fmt  # vectra: the XML, not the 5%-off tags
        assert np.abs(np.array(rec["affine_codex_to_he"]) - np.array(ref["affine_codex_to_he"])).max() <= 1e-9, fmt
        got = pd.read_csv(outs[fmt] / "markers" / "slide_000.csv")
        assert list(got.columns) == list(labels.columns) and len(got) == len(labels) > 0, fmt
        num = labels.select_dtypes("number").columns
        assert np.abs(got[num].to_numpy() - labels[num].to_numpy()).max() <= 1e-6, fmt
