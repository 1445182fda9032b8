"""Generator artefacts and stain variation (sample_data/artefacts.py, render.draw_stain, make_cohort flags).

One tiny slide generated three ways from one seed: with ``--artefacts``, without (the clean twin), and without
stain variation. The artefacts' label mask is written and described in ground_truth.json; outside the artefacts the
twin's H&E is identical (their own random stream); stain variation changes colours only (its own stream).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from sample_data import artefacts, make_cohort, render

ARGS = ["--slides", "1", "--seed", "5", "--tissue-mm", "0.5", "--no-codex", "--workers", "1", "--log-level",
        "WARNING"]


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("artefact_cohorts")
    out = {}
    for name, extra in (("art", ["--artefacts"]), ("clean", []), ("flat", ["--stain-variation", "none"])):
        out[name] = root / name
        assert make_cohort.main(["--out", str(out[name]), *ARGS, *extra]) == 0
    return out


def _he(cohort: Path) -> np.ndarray:
    with tifffile.TiffFile(cohort / "he" / "slide_000.tif") as tf:
        return tf.pages[0].asarray()


def _gt(cohort: Path) -> dict:
    return json.loads((cohort / "ground_truth.json").read_text())


def test_masks_written_and_described(cohorts):
    rec = _gt(cohorts["art"])["slides"]["slide_000"]["artefacts"]
    mask = cv2.imread(str(cohorts["art"] / rec["mask"]), cv2.IMREAD_UNCHANGED)
    he = _he(cohorts["art"])
    d = rec["downsample"]
    assert mask.dtype == np.uint8 and mask.shape == (-(-he.shape[0] // d), -(-he.shape[1] // d))
    assert set(np.unique(mask)) - {0} == {artefacts.CODES[c] for c in rec["causes"]}
    assert rec["causes"] and all(v["fraction_of_tissue"] > 0 for v in rec["causes"].values())
    assert "artefacts" not in _gt(cohorts["clean"])["slides"]["slide_000"]
    assert not (cohorts["clean"] / "truth" / "artefacts").exists()


def test_clean_twin_identical_outside_the_artefacts(cohorts):
    a, c = _he(cohorts["art"]), _he(cohorts["clean"])
    rec = _gt(cohorts["art"])["slides"]["slide_000"]["artefacts"]
    mask = cv2.imread(str(cohorts["art"] / rec["mask"]), cv2.IMREAD_UNCHANGED) > 0
    d = rec["downsample"]
    near = cv2.dilate(mask.astype(np.uint8), np.ones((2 * 16 + 1,) * 2, np.uint8))  # 32 µm: soft edges
    near = np.kron(near, np.ones((d, d), np.uint8))[: a.shape[0], : a.shape[1]].astype(bool)
    tiles = 256  # JPEG tiles: one that holds no artefact pixel is encoded from identical pixels
    far = ~cv2.dilate(near.astype(np.uint8), np.ones((tiles, tiles), np.uint8)).astype(bool)
    assert far.mean() > 0.1
    assert np.array_equal(a[far], c[far])
    assert not np.array_equal(a[mask.repeat(d, 0).repeat(d, 1)[: a.shape[0], : a.shape[1]]],
                              c[mask.repeat(d, 0).repeat(d, 1)[: a.shape[0], : a.shape[1]]])


def test_own_streams_leave_everything_else_unchanged(cohorts):
    ga, gc, gf = (_gt(cohorts[k]) for k in ("art", "clean", "flat"))
    for k in ("clean", "flat"):
        assert (cohorts["art"] / "clinical.csv").read_text() == (cohorts[k] / "clinical.csv").read_text()
    strip = {"artefacts", "stain"}
    sa, sc, sf = ({k: v for k, v in g["slides"]["slide_000"].items() if k not in strip} for g in (ga, gc, gf))
    assert sa == sc == sf
    assert ga["patients"] == gc["patients"] == gf["patients"]
    assert (cohorts["art"] / "truth/cells/slide_000.csv.gz").read_bytes() == \
        (cohorts["clean"] / "truth/cells/slide_000.csv.gz").read_bytes()
    # the stain: same draw with and without artefacts; "none" is the profile exactly
    assert ga["slides"]["slide_000"]["stain"] == gc["slides"]["slide_000"]["stain"]
    flat = gf["slides"]["slide_000"]["stain"]
    assert flat["h_od"] == pytest.approx(list(render.STAIN_PROFILES["default"].h_od), abs=1e-6)
    assert flat["jpeg_quality"] == 90 and gc["slides"]["slide_000"]["stain"] != flat


def test_draw_stain_profiles_and_variation():
    rng = lambda: np.random.default_rng(0)  # noqa: E731
    base = render.draw_stain(None, "default", "none")
    assert np.allclose(base.h_od, render.HAEMATOXYLIN) and np.allclose(base.e_od, render.EOSIN)
    a, b = render.draw_stain(rng(), "default", "moderate"), render.draw_stain(rng(), "default", "moderate")
    assert a.to_dict() == b.to_dict() and 80 <= a.jpeg_quality <= 95
    strong = [render.draw_stain(np.random.default_rng(i), "default", "strong") for i in range(20)]
    moderate = [render.draw_stain(np.random.default_rng(i), "default", "moderate") for i in range(20)]
    spread = lambda xs: np.std([x.h_od for x in xs], axis=0).mean()  # noqa: E731
    assert spread(strong) > 1.5 * spread(moderate)
    for name in ("pale", "dark", "purple"):
        assert not np.allclose(render.draw_stain(None, name).h_od, base.h_od) or name == "pale"
    assert render.draw_stain(None, "pale").h_od.sum() < base.h_od.sum() < render.draw_stain(None, "dark").h_od.sum()
    with pytest.raises(ValueError):
        render.draw_stain(None, "hospital_x")
