"""H&E patch store: contents equal direct read_region (level 0, level 1, resized), layout, PNG legacy, skip, CLI."""

import subprocess
import sys

import cv2
import h5py
import numpy as np
import pytest

from preprocess import patch, patch_store
from preprocess.patch_store_format import PatchStoreReader
from preprocess.slide_io import HESlide
from sample_data.writers import write_aperio_tiff
from tests.fixtures import blob_slide


@pytest.fixture(scope="module")
def gridded(tmp_path_factory):
    """Three slides (0.5 µm/px; 0.25 µm/px with a 2x level; 0.3 µm/px -> resized) with their grids."""
    d = tmp_path_factory.mktemp("store")
    (d / "he").mkdir()
    write_aperio_tiff(d / "he" / "a.tif", blob_slide(1200, 1000, 0), mpp=0.5, downsamples=(4,))
    write_aperio_tiff(d / "he" / "b.tif", blob_slide(2000, 1600, 1), mpp=0.25, downsamples=(2, 8))
    write_aperio_tiff(d / "he" / "c.tif", blob_slide(1300, 1100, 2), mpp=0.3, downsamples=(4,))
    out = d / "out"
    assert patch.main(["--cohort", str(d), "--out", str(out)]) == 0
    return d, out


@pytest.mark.slow
def test_store_equals_direct_reads(gridded):
    d, out = gridded
    assert patch_store.main(["--cohort", str(d), "--out", str(out), "--region-px", "500"]) == 0
    for sid, level, read in (("a", 0, 224), ("b", 1, 224), ("c", 0, 373)):
        with h5py.File(out / "patches" / f"{sid}.h5") as g, h5py.File(out / "he_patches" / f"{sid}.h5") as f:
            coords = g["coords"][:]
            np.testing.assert_array_equal(f["coords"][:], coords)
            imgs = f["imgs"]
            assert imgs.shape == (len(coords), 224, 224, 3) and imgs.dtype == np.uint8
            assert imgs.chunks == (1, 224, 224, 3)
            assert f.attrs["patch_level"] == level and f.attrs["read_size_at_level"] == read
            assert f.attrs["patch_size"] == 224 and f["coords"].attrs["patch_size_level0"] == g.attrs[
                "patch_size_level0"]
            with HESlide(d / "he" / f"{sid}.tif") as s:
                for i in range(len(coords)):
                    x, y = coords[i]
                    direct = patch_store.resize_patch(s.read_region(x, y, level, (read, read)), 224)
                    np.testing.assert_array_equal(imgs[i], direct)


def test_compression_lossless_by_default_jpeg_as_an_option(gridded, tmp_path):
    """gzip (default) and lzf store the same pixels as no compression, in fewer bytes, readable by plain h5py; JPEG
    stores one JPEG per patch, read back through PatchStoreReader, close to the pixels and smaller still."""
    d, out = gridded
    base = ["--he", str(d / "he" / "a.tif"), "--patches", str(out / "patches")]
    sizes, imgs = {}, {}
    for comp in ("none", "gzip", "lzf", "jpeg"):
        o = tmp_path / comp
        extra = [] if comp == "gzip" else ["--compression", comp]  # gzip is the default
        assert patch_store.main([*base, "--out", str(o), *extra]) == 0
        path = o / "he_patches" / "a.h5"
        sizes[comp] = path.stat().st_size
        with PatchStoreReader(path) as r:
            imgs[comp] = np.stack([r[i] for i in range(len(r))])
            assert r.encoding == ("jpeg" if comp == "jpeg" else "raw")
        with h5py.File(path) as f:
            assert f.attrs["imgs_encoding"] == r.encoding
            if comp != "jpeg":
                assert f["imgs"].compression == (None if comp == "none" else comp)
                np.testing.assert_array_equal(f["imgs"][:], imgs[comp])
    np.testing.assert_array_equal(imgs["gzip"], imgs["none"])
    np.testing.assert_array_equal(imgs["lzf"], imgs["none"])
    err = np.abs(imgs["jpeg"].astype(int) - imgs["none"]).mean()
    print(f"store sizes {sizes}, JPEG mean abs error {err:.2f}")
    assert imgs["jpeg"].shape == imgs["none"].shape and err < 4
    assert sizes["jpeg"] < sizes["gzip"] < sizes["none"]


def test_blocks_cover_every_patch_once():
    rng = np.random.default_rng(0)
    coords = rng.integers(0, 50, (300, 2)) * 224
    blocks = patch_store.group_into_blocks(coords, 224 * 7)
    allidx = np.concatenate(blocks)
    assert sorted(allidx.tolist()) == list(range(300))
    for b in blocks:
        k = coords[b] // (224 * 7)
        assert (k == k[0]).all()


def test_png_legacy_layout_and_skip(gridded, tmp_path):
    d, out = gridded
    o2 = tmp_path / "o2"
    args = ["--he", str(d / "he" / "a.tif"), "--out", str(o2), "--patches", str(out / "patches"), "--png"]
    assert patch_store.main(args) == 0
    h5 = o2 / "he_patches" / "a.h5"
    with h5py.File(h5) as f:
        imgs = f["imgs"][:]
    pngs = sorted((o2 / "he_patches" / "a").glob("a_*.png"))
    assert len(pngs) == len(imgs)
    for i in (0, len(imgs) - 1):
        png = cv2.imread(str(o2 / "he_patches" / "a" / f"a_{i}.png"))[..., ::-1]
        np.testing.assert_array_equal(png, imgs[i])
    t0 = h5.stat().st_mtime_ns
    assert patch_store.main(args) == 0 and h5.stat().st_mtime_ns == t0  # skipped
    assert patch_store.main(args + ["--overwrite"]) == 0 and h5.stat().st_mtime_ns != t0
    assert not list((o2 / "he_patches").glob(".*tmp*"))  # no temporary leftovers


def test_missing_grid_is_an_error(gridded, tmp_path, caplog):
    d, _ = gridded
    rc = patch_store.main(["--he", str(d / "he" / "a.tif"), "--out", str(tmp_path)])
    assert rc == 1 and "a.h5" in caplog.text and "preprocess.patch" in caplog.text


def test_cli_subprocess(gridded, tmp_path):
    d, out = gridded
    r = subprocess.run([sys.executable, "-m", "preprocess.patch_store", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--png" in r.stdout and "µm/px" in r.stdout
    r = subprocess.run([sys.executable, "-m", "preprocess.patch_store", "--cohort", str(d), "--out", str(tmp_path),
                        "--patches", str(out / "patches"), "--slides", "a", "c", "--workers", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "he_patches" / "a.h5").exists() and (tmp_path / "he_patches" / "c.h5").exists()
    assert not (tmp_path / "he_patches" / "b.h5").exists()
