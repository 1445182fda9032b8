"""Faults of real slides (issue 20): a slide whose file opens but holds a corrupt JPEG tile, and a slide smaller than
one patch, in a cohort with good slides.

Every stage that reads H&E fails THAT slide with one line naming the file, the level and the region (x, y, w, h),
prints no traceback (also when the reads happen in DataLoader workers or a process pool), exits 1, and finishes the
other slides. Fast: HESlide's error and its state; stage 01 (thumbnail read) serially and with --workers 2; the
tiny slide. Slow: the patch store, stage 06 (DataLoader workers) and stage 07 on a tile stage 01 does not read.
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hex.infer.tiles import TileRegions, make_tile_loader
from preprocess import patch
from preprocess.slide_io import HESlide, SlideReadError
from sample_data.writers import write_aperio_tiff
from tests.fault_fixtures import corrupt_tile
from tests.fixtures import blob_slide

W, H = 900, 700  # 4 x 3 grid cells of 224 px at 0.5 µm/px; JPEG tiles of 256 px, level 1 at downsample 4
BAD_XY = (400, 350)  # level-0 px inside the tissue blob: tile 5 (256..512, 256..512) of level 0
BAD_TILE = (256, 256, 256, 256)  # its box x, y, w, h (level-0 px)
KEEP_ALL = ["--min-tissue", "0"]  # stage 01 keeps every grid cell: the good slides always have outputs to check


def _hits_bad_tile(x: int, y: int, w: int, h: int) -> bool:
    bx, by, bw, bh = BAD_TILE
    return x < bx + bw and bx < x + w and y < by + bh and by < y + h


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """good slides a, c; b = a slide like them with its level-0 tile at BAD_XY corrupted; tiny = 150 x 120 px."""
    d = tmp_path_factory.mktemp("faults")
    for seed, name in enumerate("abc"):
        write_aperio_tiff(d / f"{name}_good.tif", blob_slide(W, H, seed), mpp=0.5, downsamples=(4,))
    corrupt_tile(d / "b_good.tif", d / "b_bad.tif", level=0, xy=BAD_XY)
    write_aperio_tiff(d / "tiny.tif", blob_slide(150, 120, 3), mpp=0.5, downsamples=(2,))
    return d


def _cohort(root: Path, sources: Path, files: dict[str, str]) -> Path:
    (root / "he").mkdir(parents=True)
    for sid, src in files.items():
        (root / "he" / f"{sid}.tif").symlink_to(sources / src)
    return root


def _bad_cohort(root: Path, sources: Path) -> Path:
    return _cohort(root, sources, {"a": "a_good.tif", "b": "b_bad.tif", "c": "c_good.tif"})


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def _one_line_failure(caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture, slide_file: Path,
                      level: int, desc: str) -> str:
    """The stage's error lines are single lines, the last one reads ``desc: 2 done, ..., 1 failed: b (cannot read
    FILE at level L, region x=.. y=.. w=.. h=..: ...)``; no traceback anywhere (fd level: worker processes too).
    Returns the last line."""
    errors = _errors(caplog)
    assert errors and all("\n" not in e for e in errors), errors
    last = errors[-1]
    assert re.match(rf"{re.escape(desc)}.*: 2 done, 0 skipped \(already done\), 1 failed: b \(cannot read ", last), last
    assert str(slide_file) in last and f"at level {level}, region x=" in last, last
    region = re.search(r"region x=(\d+) y=(\d+) w=(\d+) h=(\d+) ", last)
    assert region and "Bogus marker length" in last, last
    assert level != 0 or _hits_bad_tile(*(int(v) for v in region.groups())), last  # the region read holds the tile
    cap = capfd.readouterr()
    assert "Traceback" not in cap.out + cap.err + caplog.text, cap.err[-3000:]
    assert not any(r.exc_info for r in caplog.records)
    return last


# ------------------------------------------------------------------------------------------------- the reader
def test_corrupt_tile_raises_one_line_naming_the_region(sources: Path) -> None:
    bad = sources / "b_bad.tif"
    with HESlide(bad) as s, HESlide(sources / "b_good.tif") as good:
        assert s.read_region(0, 0, 1, s.level_dimensions[1]).shape == (175, 225, 3)  # other levels read fine
        assert s.read_region(0, 0, 0, (200, 200)).shape == (200, 200, 3)  # and other tiles
        with pytest.raises(SlideReadError) as e:
            s.read_region(300, 300, 0, (100, 120))
        msg = str(e.value)
        assert msg.startswith(f"cannot read {bad} at level 0, region x=300 y=300 w=100 h=120 ") and "\n" not in msg
        assert "OpenSlideError: Bogus marker length" in msg
        # OpenSlide's handle is spoilt after the error; reads of other regions still work, the bad one fails again
        np.testing.assert_array_equal(s.read_region(0, 0, 0, (200, 200)), good.read_region(0, 0, 0, (200, 200)))
        with pytest.raises(SlideReadError, match="region x=260 y=500 w=4 h=4 "):
            s.read_region(260, 500, 0, (4, 4))
        assert s.dimensions == (W, H) and s.level_count == 2 and s.level_downsamples == (1.0, 4.0)
    # crosses process pools as it is (the pools' own serialiser)
    copy = ForkingPickler.loads(ForkingPickler.dumps(e.value))
    assert type(copy) is SlideReadError and str(copy) == msg


def test_threads_name_only_the_regions_that_hold_the_bad_tile(sources: Path) -> None:
    """Reads in threads share one handle (as the patch store's --threads): a read beside the bad one must not fail
    with its error (OpenSlide's error state is per handle) and must return the right pixels."""
    boxes = [(x, y, 112, 112) for y in range(0, H - 112, 112) for x in range(0, W - 112, 112)]
    with HESlide(sources / "b_bad.tif") as s, HESlide(sources / "b_good.tif") as good:
        def read(box: tuple[int, int, int, int]) -> np.ndarray | str:
            try:
                return s.read_region(box[0], box[1], 0, box[2:])
            except SlideReadError as e:
                return str(e)

        for _ in range(3):
            with ThreadPoolExecutor(4) as pool:
                got = list(pool.map(read, boxes))
            for box, g in zip(boxes, got):
                if _hits_bad_tile(*box):
                    assert isinstance(g, str) and f"region x={box[0]} y={box[1]} w=112 h=112 " in g
                else:
                    assert not isinstance(g, str), g
                    np.testing.assert_array_equal(g, good.read_region(box[0], box[1], 0, box[2:]))


def test_tile_loader_workers_raise_the_one_line_error(sources: Path, capfd: pytest.CaptureFixture) -> None:
    ds = TileRegions(sources / "b_bad.tif", torch.tensor([[0, 0], [448, 448], [224, 448]]).numpy(), 224, 0, 224, 32,
                     region_px=224)
    with pytest.raises(SlideReadError) as e:
        for _ in make_tile_loader(ds, batch_size=1, workers=2):
            pass
    assert "\n" not in str(e.value) and "at level 0, region x=" in str(e.value)
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_nuclei_tiles_raise_the_one_line_error(sources: Path, workers: int, capfd: pytest.CaptureFixture) -> None:
    """Stage 10's nucleus detection reads level-0 tiles, with ``workers`` a process pool (forkserver)."""
    from spatial.nuclei import detect_slide

    with pytest.raises(SlideReadError) as e:
        detect_slide(sources / "b_bad.tif", tile_px=256, tissue_mask=False, workers=workers, progress=False)
    msg = str(e.value)
    region = re.search(r"at level 0, region x=(\d+) y=(\d+) w=(\d+) h=(\d+) ", msg)
    assert "\n" not in msg and region and _hits_bad_tile(*(int(v) for v in region.groups())), msg
    assert "Traceback" not in capfd.readouterr().err


# ------------------------------------------------------------------------------------------------- stage 01
@pytest.mark.parametrize("workers", ["1", "2"])
def test_stage01_fails_the_corrupt_slide_only(sources: Path, tmp_path: Path, workers: str,
                                              caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture) -> None:
    cohort, out = _bad_cohort(tmp_path / "c", sources), tmp_path / "out"
    assert patch.main(["--cohort", str(cohort), "--out", str(out), "--workers", workers, *KEEP_ALL]) == 1
    # the thumbnail (level 0 of this small slide) is the region that fails
    last = _one_line_failure(caplog, capfd, cohort / "he" / "b.tif", 0, "patch grid")
    assert f"region x=0 y=0 w={W} h={H} " in last
    for sid in ("a", "c"):
        with h5py.File(out / "patches" / f"{sid}.h5") as f:
            assert len(f["coords"]) > 0
        assert (out / "patches" / f"{sid}_tissue.png").is_file()
        assert (out / "patches" / "done" / f"{sid}.json").is_file()
    assert not (out / "patches" / "b.h5").exists() and (out / "patches" / "done" / "b.failed.json").is_file()


def test_stage01_slide_smaller_than_a_patch(sources: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                            capfd: pytest.CaptureFixture) -> None:
    cohort = _cohort(tmp_path / "c", sources, {"a": "a_good.tif", "tiny": "tiny.tif"})
    assert patch.main(["--cohort", str(cohort), "--out", str(tmp_path / "out"), *KEEP_ALL]) == 1
    last = _errors(caplog)[-1]
    assert f"1 failed: tiny (slide {cohort / 'he' / 'tiny.tif'} is 150 x 120 px at level 0" in last, last
    assert "smaller than one 224 px patch at 0.5 µm/px" in last and "--min-tissue" not in last, last
    assert "Traceback" not in capfd.readouterr().err
    assert (tmp_path / "out" / "patches" / "a.h5").is_file()


# ------------------------------------------------------------------------------------------------- later stages
@pytest.mark.slow
def test_patch_store_hex_infer_and_features_fail_the_corrupt_slide_only(
        sources: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture) -> None:
    """Stage 01 reads the thumbnail from level 1 (--thumb-size 200), so only the later stages meet the level-0
    tile: the patch store, stage 06 with 2 DataLoader workers and several regions, stage 07 likewise."""
    from hex import backbones as bb
    from hex.infer import stage as infer_wsi
    from hex.model import HEX
    from hex.trained_model import original_markers
    from mica import extract_features as ef
    from mica.features.he_bags import feature_paths
    from preprocess import patch_store
    from tests.fixtures import save_run

    cohort, out = _bad_cohort(tmp_path / "c", sources), tmp_path / "out"
    bad = cohort / "he" / "b.tif"
    common = ["--cohort", str(cohort), "--out", str(out)]
    assert patch.main([*common, "--thumb-size", "200", *KEEP_ALL]) == 0
    grid = {}
    for sid in "abc":
        with h5py.File(out / "patches" / f"{sid}.h5") as f:
            grid[sid] = f["coords"][:]
    assert any(x <= BAD_XY[0] < x + 224 and y <= BAD_XY[1] < y + 224 for x, y in grid["b"])  # the tile is in a patch

    caplog.clear()
    assert patch_store.main([*common, "--region-px", "300", "--threads", "4"]) == 1
    _one_line_failure(caplog, capfd, bad, 0, "H&E patch store")
    for sid in "ac":
        with h5py.File(out / "he_patches" / f"{sid}.h5") as f:
            assert f["imgs"].shape == (len(grid[sid]), 224, 224, 3)
    assert not (out / "he_patches" / "b.h5").exists()

    torch.manual_seed(0)
    ck = save_run(out, "tiny", HEX("tiny", num_markers=40, input_size=32, unfreeze_last=-1), original_markers())
    caplog.clear()
    assert infer_wsi.main([*common, "--checkpoint", str(ck), "--workers", "2", "--region-px", "300", "--batch-size",
                           "4", "--no-maps"]) == 1
    _one_line_failure(caplog, capfd, bad, 0, "")
    for sid in "ac":
        with h5py.File(out / "hex_pred" / f"{sid}.h5") as f:
            assert f["codex_prediction"].shape == (len(grid[sid]), 40)
    assert not (out / "hex_pred" / "b.h5").exists()

    w = bb.save_backbone(bb.create("tiny"), tmp_path / "tiny.safetensors")
    caplog.clear()
    assert ef.main([*common, "--what", "he", "--encoder", "tiny", "--weights", str(w), "--workers", "2",
                    "--region-px", "300", "--batch-size", "4"]) == 1
    _one_line_failure(caplog, capfd, bad, 0, "H&E features (tiny)")
    for sid in "ac":
        assert feature_paths(out, "tiny", sid)[0].is_file()
    assert not feature_paths(out, "tiny", "b")[0].exists()
