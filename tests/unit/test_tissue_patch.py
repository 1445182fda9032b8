"""Tissue mask and patch grid: tissue found / blank slide refused, grid geometry from mpp, coords in tissue, CLI."""

import subprocess
import sys

import h5py
import numpy as np
import pytest

from pipeline.errors import PipelineError
from preprocess import patch
from preprocess.slide_io import HESlide
from preprocess.tissue import TissueParams, grid_tissue_mask, patch_tissue_fraction
from sample_data.writers import write_aperio_tiff


def he_image(w, h, seed=0, blank=False):
    """Synthetic H&E (h, w, 3) uint8 and its true tissue mask: two ellipses (one with a small hole) + a speck."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    tissue = ((xx - 0.35 * w) / (0.25 * w)) ** 2 + ((yy - 0.5 * h) / (0.35 * h)) ** 2 < 1
    tissue |= ((xx - 0.75 * w) / (0.15 * w)) ** 2 + ((yy - 0.4 * h) / (0.25 * h)) ** 2 < 1
    hole = (xx - 0.35 * w) ** 2 + (yy - 0.5 * h) ** 2 < (0.02 * w) ** 2
    speck = (xx - 0.1 * w) ** 2 + (yy - 0.9 * h) ** 2 < (0.006 * w) ** 2
    img = np.full((h, w, 3), 238, np.int16) + rng.integers(-4, 5, (h, w, 3))
    if not blank:
        stain = np.array([200, 110, 175]) + rng.integers(-25, 25, (h, w, 3))
        img = np.where((tissue & ~hole | speck)[..., None], stain, img)
    return img.clip(0, 255).astype(np.uint8), tissue


@pytest.fixture(scope="module")
def he_slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("he")
    img, tissue = he_image(1600, 1200)
    write_aperio_tiff(d / "s05.tif", img, mpp=0.5, downsamples=(4,))
    big, big_tissue = he_image(2400, 2000, seed=1)
    write_aperio_tiff(d / "s025.tif", big, mpp=0.25, downsamples=(2, 8))
    write_aperio_tiff(d / "blank.tif", he_image(800, 600, blank=True)[0], mpp=0.5, downsamples=(4,))
    write_aperio_tiff(d / "nompp.tif", img[:600, :800], mpp=None, downsamples=(4,))
    return d, {"s05": tissue, "s025": big_tissue}


def test_tissue_mask_finds_tissue_removes_specks_fills_holes(he_slides):
    d, truth = he_slides
    with HESlide(d / "s05.tif") as s:
        thumb, ds = s.thumbnail(400)
    mask, thr = grid_tissue_mask(thumb, 0.5 * ds)
    t = truth["s05"][:: int(ds), :: int(ds)][: mask.shape[0], : mask.shape[1]]
    iou = (mask & t).sum() / (mask | t).sum()
    assert iou > 0.93 and 0.05 <= thr < 0.5
    h, w = mask.shape
    assert mask[int(0.5 * h), int(0.35 * w)]  # the small hole is filled
    assert not mask[int(0.9 * h) - 3 : int(0.9 * h) + 3, int(0.1 * w) - 3 : int(0.1 * w) + 3].any()  # speck removed
    # thresholds are parameters: a huge minimum area removes everything
    empty, _ = grid_tissue_mask(thumb, 0.5 * ds, TissueParams(min_area_um2=1e9))
    assert not empty.any()


def test_patch_tissue_fraction_is_exact():
    rng = np.random.default_rng(0)
    mask = rng.random((37, 41)) > 0.5
    ds = 7.3  # level-0 px per thumbnail px, not an integer
    up = np.repeat(np.repeat(mask, 73, axis=0), 73, axis=1)  # 10x finer than level 0 (7.3 * 10 = 73)
    coords = np.array([[0, 0], [13, 29], [100, 57], [250, 200]])
    frac = patch_tissue_fraction(mask, ds, coords, 40)
    for (x, y), f in zip(coords, frac):
        ref = up[y * 10 : (y + 40) * 10, x * 10 : (x + 40) * 10].mean()
        assert f == pytest.approx(ref, abs=1e-9)


def test_grid_geometry_from_mpp(he_slides):
    d, _ = he_slides
    with HESlide(d / "s05.tif") as s:
        g = patch.grid_geometry(s)
        assert (g.patch_size_level0, g.patch_level, g.read_size_at_level) == (224, 0, 224)
    with HESlide(d / "s025.tif") as s:
        g = patch.grid_geometry(s)  # 40x slide with a 2x level: read 224 px at level 1
        assert (g.patch_size_level0, g.patch_level, g.read_size_at_level, g.level_downsample) == (448, 1, 224, 2.0)
    with HESlide(d / "s025.tif", mpp=0.3) as s:  # no level matches: read 373 px at level 0, resized later
        g = patch.grid_geometry(s)
        assert (g.patch_size_level0, g.patch_level, g.read_size_at_level) == (373, 0, 373)
    np.testing.assert_array_equal(patch.full_grid(1000, 500, 448), [[0, 0], [448, 0]])
    # within the 1% pixel-size tolerance nothing is resampled: an Aperio 0.502 µm slide reads 224 px as they are
    for mpp, expect in ((0.502, (224, 0, 224)), (0.4975, (224, 0, 224)), (0.51, (220, 0, 220))):
        with HESlide(d / "s05.tif", mpp=mpp) as s:
            g = patch.grid_geometry(s)
            assert (g.patch_size_level0, g.patch_level, g.read_size_at_level) == expect, mpp
    with HESlide(d / "s025.tif", mpp=0.252) as s:  # 40x at 0.252: its 2x level (0.504 µm) is read as it is
        g = patch.grid_geometry(s)
        assert (g.patch_size_level0, g.patch_level, g.read_size_at_level) == (448, 1, 224)
        assert g.attrs()["patch_mpp"] == pytest.approx(0.504)


def test_patch_stage_writes_grid_in_tissue(he_slides, tmp_path):
    d, truth = he_slides
    out = tmp_path / "out"
    assert patch.main(["--he", str(d / "s05.tif"), str(d / "s025.tif"), "--out", str(out)]) == 0
    for sid, ps0, level in (("s05", 224, 0), ("s025", 448, 1)):
        with h5py.File(out / "patches" / f"{sid}.h5") as f:
            coords = f["coords"][:]
            assert coords.dtype == np.int64 and coords.shape[1] == 2 and len(coords) > 0
            for obj in (f, f["coords"]):
                assert obj.attrs["patch_size"] == 224 and obj.attrs["patch_size_level0"] == ps0
                assert obj.attrs["patch_level"] == level and obj.attrs["mpp"] == 0.5
            assert f.attrs["level0_mpp"] == pytest.approx(0.5 if sid == "s05" else 0.25)
            assert f.attrs["schema_version"] == 1
        assert np.all(coords % ps0 == 0)
        t = truth[sid]
        for x, y in coords:  # every kept patch is at least ~half tissue in the ground truth
            assert t[y : y + ps0, x : x + ps0].mean() > 0.4
        # and every patch that is fully tissue is kept
        full = [(x, y) for x, y in patch.full_grid(t.shape[1], t.shape[0], ps0) if t[y : y + ps0, x : x + ps0].all()]
        assert set(map(tuple, full)) <= set(map(tuple, coords))
        assert (out / "patches" / f"{sid}_tissue.png").stat().st_size > 0
    assert (out / "patches" / "config.json").exists() and (out / "patches" / "run.log").exists()


def test_blank_slide_and_missing_mpp_are_clear_errors(he_slides, tmp_path, caplog):
    d, _ = he_slides
    cfg = patch.PatchConfig(out=tmp_path)
    with pytest.raises(PipelineError, match=r"no tissue found in .*blank\.tif.*--min-saturation"):
        patch.patch_slide("blank", d / "blank.tif", cfg)
    with pytest.raises(PipelineError, match=r"nompp\.tif.*--mpp"):
        patch.patch_slide("nompp", d / "nompp.tif", cfg)
    assert patch.patch_slide("nompp", d / "nompp.tif", patch.PatchConfig(out=tmp_path, mpp=0.5))["patches"] > 0
    with pytest.raises(PipelineError, match="--min-tissue"):
        patch.patch_slide("s05", d / "s05.tif", patch.PatchConfig(out=tmp_path, min_tissue=1.01))
    # through the CLI: the failing slide is reported, the others are written, the exit code is non-zero
    rc = patch.main(["--he", str(d / "blank.tif"), str(d / "s05.tif"), "--out", str(tmp_path / "o")])
    assert rc == 1 and (tmp_path / "o" / "patches" / "s05.h5").exists()
    assert not (tmp_path / "o" / "patches" / "blank.h5").exists() and "blank.tif" in caplog.text
    assert patch.main(["--he", str(d / "blank.tif"), "--out", str(tmp_path / "o2"), "--fail-fast"]) == 1


@pytest.mark.slow
def test_shards_partition_the_slides_and_a_failed_redo_leaves_nothing(he_slides, tmp_path):
    d, _ = he_slides
    args = ["--cohort", str(d.parent / "c"), "--out", str(tmp_path)]
    (d.parent / "c").mkdir(exist_ok=True)
    (d.parent / "c" / "he").mkdir(exist_ok=True)
    for name in ("s05", "s025", "blank"):
        link = d.parent / "c" / "he" / f"{name}.tif"
        if not link.exists():
            link.symlink_to(d / f"{name}.tif")
    assert patch.main([*args, "--shard", "0/2"]) == 1  # sorted [blank, s025, s05]: shard 0 = blank, s05
    assert sorted(p.name for p in (tmp_path / "patches").glob("*.h5")) == ["s05.h5"]
    assert patch.main([*args, "--shard", "1/2"]) == 0
    assert sorted(p.name for p in (tmp_path / "patches").glob("*.h5")) == ["s025.h5", "s05.h5"]
    assert (tmp_path / "patches" / "config_shard1of2.json").exists()
    # s05 redone with a setting that fails (no fragment is large enough to be tissue): its old grid does not stay
    # behind for the later stages
    assert patch.main([*args, "--slides", "s05", "--min-area-um2", "1e12", "--overwrite"]) == 1
    assert not (tmp_path / "patches" / "s05.h5").exists() and not (tmp_path / "patches" / "s05_tissue.png").exists()


def test_skip_and_overwrite(he_slides, tmp_path):
    d, _ = he_slides
    args = ["--he", str(d / "s05.tif"), "--out", str(tmp_path)]
    assert patch.main(args) == 0
    f = tmp_path / "patches" / "s05.h5"
    t0 = f.stat().st_mtime_ns
    assert patch.main(args) == 0 and f.stat().st_mtime_ns == t0  # same settings: skipped
    # other settings: stops before any work (tests/test_chain_patch.py has the message), --overwrite redoes it
    assert patch.main(args + ["--min-tissue", "0.9"]) == 2 and f.stat().st_mtime_ns == t0
    assert patch.main(args + ["--min-tissue", "0.9", "--overwrite"]) == 0 and f.stat().st_mtime_ns != t0
    with h5py.File(f) as h:
        assert h.attrs["min_tissue"] == 0.9 and h["tissue_fraction"][:].min() >= 0.9


@pytest.mark.slow
def test_cli_subprocess(he_slides, tmp_path):
    d, _ = he_slides
    r = subprocess.run([sys.executable, "-m", "preprocess.patch", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--min-tissue" in r.stdout and "µm" in r.stdout
    cohort = tmp_path / "cohort"
    (cohort / "he").mkdir(parents=True)
    (cohort / "he" / "s05.tif").symlink_to(d / "s05.tif")
    r = subprocess.run([sys.executable, "-m", "preprocess.patch", "--cohort", str(cohort), "--out",
                        str(tmp_path / "out"), "--workers", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "patches" / "s05.h5").exists()
