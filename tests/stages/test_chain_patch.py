"""Stage 01 (preprocess.patch) and the patch store (preprocess.patch_store) as a user meets them (issue 11): slide
identity from pipeline.cohort, done-records keyed on settings and inputs, --labelled-only after a failed
quantification, stale temp files of a killed run, one-line errors (exit 2, no traceback) before any work, a partial
rerun with other settings (config.json does not claim them for the other slides), and per-slide pixel sizes
(``--pixel-sizes``) for a cohort with one slide lacking its pixel size."""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from pipeline import done as done_mod
from preprocess import patch, patch_store
from sample_data.writers import write_aperio_tiff
from tests.fixtures import blob_slide

pytestmark = pytest.mark.slow  # a chain / end-to-end module: scripts/test.sh runs it, -m "not slow" skips it


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small H&E slides (900 x 700 px at 0.5 µm/px: 12 grid cells of 224 px) named a, b, c."""
    d = tmp_path_factory.mktemp("src")
    for seed, name in enumerate("abc"):
        write_aperio_tiff(d / f"{name}.tif", blob_slide(900, 700, seed), mpp=0.5, downsamples=(4,))
    return d


def _cohort(root: Path, sources: Path, files: dict[str, str], copy: bool = False) -> Path:
    """A cohort folder ``root`` whose ``he/{name}`` are links to (or copies of) ``sources/{source}.tif``."""
    (root / "he").mkdir(parents=True)
    for name, src in files.items():
        if copy:
            shutil.copy(sources / f"{src}.tif", root / "he" / name)
        else:
            (root / "he" / name).symlink_to(sources / f"{src}.tif")
    return root


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def _no_traceback(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture) -> None:
    cap = capsys.readouterr()
    assert "Traceback" not in cap.out + cap.err + caplog.text
    assert not any(r.exc_info for r in caplog.records)


def _stamps(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "run.log"}


def test_rescan_beside_original_stops_stage01(sources: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                              capsys: pytest.CaptureFixture) -> None:
    cohort = _cohort(tmp_path / "c", sources, {"slide_000.tif": "a", "slide_000.v2.tif": "b", "slide_001.tif": "c"})
    out = tmp_path / "out"
    for mod in (patch, patch_store):
        caplog.clear()
        assert mod.main(["--cohort", str(cohort), "--out", str(out)]) == 2
        errors = _errors(caplog)
        assert len(errors) == 1 and "\n" not in errors[0], errors
        assert "slide_000.tif" in errors[0] and "slide_000.v2.tif" in errors[0]
        _no_traceback(caplog, capsys)
    assert not out.exists()  # nothing written, not even the log


def test_link_with_another_name_names_outputs_after_the_link(sources: Path, tmp_path: Path) -> None:
    cohort = _cohort(tmp_path / "c", sources, {"slide_000.tif": "a"})
    out = tmp_path / "out"
    args = ["--cohort", str(cohort), "--out", str(out)]
    assert patch.main(args) == 0
    assert patch_store.main(args) == 0
    assert sorted(p.name for p in (out / "patches").glob("*.h5")) == ["slide_000.h5"]
    assert sorted(p.name for p in (out / "he_patches").glob("*.h5")) == ["slide_000.h5"]
    assert (out / "patches" / "slide_000_tissue.png").exists()
    rec = json.loads((out / "patches" / "done" / "slide_000.json").read_text())
    assert rec["inputs"]["he"]["path"] == str(cohort / "he" / "slide_000.tif")  # the link, as written
    rec = json.loads((out / "he_patches" / "done" / "slide_000.json").read_text())
    assert rec["inputs"]["grid"]["path"] == str(out / "patches" / "slide_000.h5")


def test_rerun_with_other_settings_stops_and_overwrite_redoes(sources: Path, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture,
                                                              capsys: pytest.CaptureFixture) -> None:
    cohort = _cohort(tmp_path / "c", sources, {"slide_000.tif": "a", "slide_001.tif": "b"})
    out = tmp_path / "out"
    args = ["--cohort", str(cohort), "--out", str(out)]
    assert patch.main(args) == 0
    before = _stamps(out / "patches")
    assert "slide_000.h5" in before and "config.json" in before and "done/slide_000.json" in before
    config = (out / "patches" / "config.json").read_text()
    caplog.clear()
    assert patch.main([*args, "--min-tissue", "0.3"]) == 2
    errors = _errors(caplog)
    assert len(errors) == 1, errors
    assert "done with other settings: min_tissue 0.5 -> 0.3" in errors[0] and "pass --overwrite" in errors[0]
    assert "slide_000" in errors[0] and "slide_001" in errors[0]
    _no_traceback(caplog, capsys)
    assert _stamps(out / "patches") == before and (out / "patches" / "config.json").read_text() == config
    # the same settings again: skipped, nothing rewritten but the config
    assert patch.main(args) == 0
    assert {k: v for k, v in _stamps(out / "patches").items() if k != "config.json"} == \
        {k: v for k, v in before.items() if k != "config.json"}
    # --overwrite redoes every slide with the new settings, and the config and records say so
    assert patch.main([*args, "--min-tissue", "0.3", "--overwrite"]) == 0
    after = _stamps(out / "patches")
    assert after["slide_000.h5"] != before["slide_000.h5"] and after["slide_001.h5"] != before["slide_001.h5"]
    with h5py.File(out / "patches" / "slide_000.h5") as f:
        assert f.attrs["min_tissue"] == pytest.approx(0.3)
    assert json.loads((out / "patches" / "config.json").read_text())["min_tissue"] == 0.3
    rec = json.loads((out / "patches" / "done" / "slide_000.json").read_text())
    assert rec["settings"]["min_tissue"] == 0.3 and rec["schema"] == patch.SCHEMA_VERSION
    assert patch.main([*args, "--min-tissue", "0.3"]) == 0  # now done with these settings


def test_store_redoes_a_slide_whose_grid_was_redone_and_stops_on_other_settings(
        sources: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cohort = _cohort(tmp_path / "c", sources, {"slide_000.tif": "a", "slide_001.tif": "b"})
    out = tmp_path / "out"
    args = ["--cohort", str(cohort), "--out", str(out)]
    assert patch.main(args) == 0 and patch_store.main(args) == 0
    store = out / "he_patches"
    t0 = {s: (store / f"{s}.h5").stat().st_mtime_ns for s in ("slide_000", "slide_001")}
    assert patch.main([*args, "--slides", "slide_000", "--overwrite"]) == 0  # a redone grid: a new stamp
    caplog.clear()
    assert patch_store.main(args) == 0
    assert (store / "slide_000.h5").stat().st_mtime_ns != t0["slide_000"]  # redone
    assert (store / "slide_001.h5").stat().st_mtime_ns == t0["slide_001"]  # skipped
    assert "input changed since it was done" in caplog.text
    assert "1 done, 1 skipped (already done), 0 failed" in caplog.records[-1].getMessage()
    caplog.clear()
    assert patch_store.main([*args, "--compression", "lzf"]) == 2
    assert 'compression "gzip" -> "lzf"' in caplog.text and "pass --overwrite" in caplog.text


def test_labelled_only_stores_labelled_slides_and_names_the_quantify_failure(
        sources: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cohort = _cohort(tmp_path / "c", sources, {"slide_000.tif": "a", "slide_001.tif": "b"})
    out = tmp_path / "out"
    args = ["--cohort", str(cohort), "--out", str(out)]
    assert patch.main(args) == 0
    (out / "markers").mkdir()
    (out / "markers" / "slide_000.csv").write_text("slide,index,x,y,CD8\nslide_000,0,0,0,0.5\n")
    quantify = done_mod.DoneSpec(folder=out / "markers", settings={}, schema=1, inputs=lambda s: {},
                                 outputs=lambda s: [out / "markers" / f"{s}.csv"])
    done_mod.write_failure(quantify, "slide_001", "CODEX image not found: codex/slide_001.ome.tif")
    caplog.clear()
    assert patch_store.main([*args, "--labelled-only"]) == 1
    assert sorted(p.name for p in (out / "he_patches").glob("*.h5")) == ["slide_000.h5"]
    last = caplog.records[-1]
    assert last.levelno == logging.ERROR and last.getMessage().startswith("H&E patch store: 1 done")
    assert "slide_001" in last.getMessage() and "CODEX image not found" in last.getMessage()
    assert "quantify failed" in last.getMessage()
    # without the failure record the unlabelled slide is only reported as left out; the labelled one is skipped
    (out / "markers" / "done" / "slide_001.failed.json").unlink()
    caplog.clear()
    assert patch_store.main([*args, "--labelled-only"]) == 0
    msg = caplog.records[-1].getMessage()
    assert "0 done, 1 skipped" in msg and "left out" in msg and "slide_001" in msg
    assert not (out / "he_patches" / "slide_001.h5").exists()


def test_killed_runs_temp_file_is_removed_by_the_next_run(sources: Path, tmp_path: Path) -> None:
    cohort = _cohort(tmp_path / "c", sources, {"slide_000.tif": "a"})
    out = tmp_path / "out"
    (out / "patches").mkdir(parents=True)
    dead = 99_999_999  # above any Linux pid_max: no such process
    stale = out / "patches" / f".slide_000.{dead}.0123456789ab.tmp.h5"
    stale.write_bytes(b"half a grid")
    live = out / "patches" / f".slide_000.{os.getpid()}.0123456789ab.tmp.h5"  # this process: also stale here
    assert patch.main(["--cohort", str(cohort), "--out", str(out)]) == 0
    assert not stale.exists() and not live.exists()
    assert (out / "patches" / "slide_000.h5").exists()
    assert not [p.name for p in (out / "patches").iterdir() if ".tmp" in p.name]


def _bad_flag(mod) -> list[str]:
    return ["--min-tissue", "1.5"] if mod is patch else ["--jpeg-quality", "0"]


@pytest.mark.parametrize("mod", [patch, patch_store], ids=["patch", "patch_store"])
@pytest.mark.parametrize("case", ["missing_cohort", "unwritable_out", "bad_flag", "unknown_slide", "bad_shard"])
def test_user_errors_are_one_line_without_traceback(mod, case: str, sources: Path, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture,
                                                    capsys: pytest.CaptureFixture) -> None:
    cohort = _cohort(tmp_path / "c", sources, {"slide_000.tif": "a"})
    out = tmp_path / "out"
    if case == "missing_cohort":
        argv, expect = ["--cohort", str(tmp_path / "nope"), "--out", str(out)], str(tmp_path / "nope")
    elif case == "unwritable_out":
        (tmp_path / "a_file").write_text("not a folder")
        out = tmp_path / "a_file" / "out"
        argv, expect = ["--cohort", str(cohort), "--out", str(out)], str(out)
    elif case == "unknown_slide":
        argv, expect = ["--cohort", str(cohort), "--out", str(out), "--slides", "slide_999"], "slide_999"
    elif case == "bad_shard":
        argv, expect = ["--cohort", str(cohort), "--out", str(out), "--shard", "2/2"], "--shard"
    else:
        argv = ["--cohort", str(cohort), "--out", str(out), *_bad_flag(mod)]
        expect = _bad_flag(mod)[0]
    caplog.clear()
    assert mod.main(argv) == 2
    errors = _errors(caplog)
    assert len(errors) == 1 and "\n" not in errors[0] and expect in errors[0], errors
    _no_traceback(caplog, capsys)
    assert not (tmp_path / "out").exists()  # stopped before anything was written


@pytest.mark.parametrize("mod", [patch, patch_store], ids=["patch", "patch_store"])
def test_unparsable_flag_is_a_usage_error(mod, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert mod.main(["--out", str(tmp_path), "--workers", "two"]) == 2
    cap = capsys.readouterr()
    assert "--workers" in cap.err and "Traceback" not in cap.err


def test_done_spec_settings_cover_every_output_flag(tmp_path: Path) -> None:
    """The flags that change stage 01's grid are all in its done-record settings (a new flag must be added)."""
    cfg = patch.PatchConfig(out=tmp_path)
    spec = patch.done_spec(cfg, {})
    assert set(spec.settings) == {"patch_size", "target_mpp", "min_tissue", "mpp", "thumb_size", "sat_threshold",
                                  "min_saturation", "median_um", "close_um", "min_area_um2", "max_hole_um2",
                                  "artefacts"}
    assert set(spec.settings["artefacts"]) >= {"ink", "folds", "bubbles", "blur", "qc_mpp", "max_artefact"}
    store = patch_store.done_spec(patch_store.StoreConfig(out=tmp_path, patches_dir=tmp_path / "patches"), {})
    assert set(store.settings) == {"compression", "compression_level", "jpeg_quality", "png", "mpp"}
    assert isinstance(spec.inputs, functools.partial) and isinstance(store.inputs, functools.partial)


def test_partial_rerun_config_does_not_claim_its_settings_for_the_other_slides(
        sources: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``MIN_TISSUE=0.9 ... --slides slide_000 --overwrite`` after a run of both slides at 0.5: config.json covers
    this run's slide and names the other one as done with other settings; that one's done-record keeps 0.5."""
    cohort = _cohort(tmp_path / "c", sources, {"slide_000.tif": "a", "slide_001.tif": "b"})
    out = tmp_path / "out"
    args = ["--cohort", str(cohort), "--out", str(out)]
    assert patch.main([*args, "--min-tissue", "0.5"]) == 0
    caplog.clear()
    assert patch.main([*args, "--min-tissue", "0.9", "--slides", "slide_000", "--overwrite"]) == 0
    cfg = json.loads((out / "patches" / "config.json").read_text())
    assert cfg["min_tissue"] == 0.9 and cfg["slides_resolved"] == ["slide_000"]
    assert cfg["other_settings"] == {"slide_001": "min_tissue 0.9 -> 0.5"}
    records = {s: json.loads((out / "patches" / "done" / f"{s}.json").read_text())["settings"]
               for s in ("slide_000", "slide_001")}
    assert records["slide_000"]["min_tissue"] == 0.9 and records["slide_001"]["min_tissue"] == 0.5
    with h5py.File(out / "patches" / "slide_001.h5") as f:
        assert f.attrs["min_tissue"] == pytest.approx(0.5)  # untouched
    assert "other settings than this run" in caplog.text


def _nompp_cohort(sources: Path, root: Path) -> Path:
    """slide_000 (0.5 µm/px in its metadata) and slide_001 (the same pixels, 0.25 µm/px, no pixel size at all)."""
    cohort = _cohort(root, sources, {"slide_000.tif": "a"})
    write_aperio_tiff(cohort / "he" / "slide_001.tif", blob_slide(900, 700, 1), mpp=None, downsamples=(4,))
    return cohort


def test_pixel_size_table_gives_one_slide_its_pixel_size(sources: Path, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """One slide lacks a pixel size: without a table it fails (naming --pixel-sizes); COHORT/pixel_sizes.csv gives
    it one, the other keeps its metadata, each done-record holds its own value; a changed row stops that slide
    only; the patch store takes the same table."""
    cohort = _nompp_cohort(sources, tmp_path / "c")
    out = tmp_path / "out"
    args = ["--cohort", str(cohort), "--out", str(out)]
    assert patch.main(args) == 1
    assert "--pixel-sizes" in done_mod.read_failure(out / "patches", "slide_001")
    (cohort / "pixel_sizes.csv").write_text("slide_id,he_mpp,codex_mpp\nslide_001,0.25,\n")
    assert patch.main(args) == 0  # the default table of the cohort
    with h5py.File(out / "patches" / "slide_000.h5") as a, h5py.File(out / "patches" / "slide_001.h5") as b:
        assert a.attrs["level0_mpp"] == pytest.approx(0.5) and b.attrs["level0_mpp"] == pytest.approx(0.25)
        assert a.attrs["patch_size_level0"] == 224 and b.attrs["patch_size_level0"] == 448
    rec = {s: json.loads((out / "patches" / "done" / f"{s}.json").read_text())["settings"]["mpp"]
           for s in ("slide_000", "slide_001")}
    assert rec == {"slide_000": None, "slide_001": 0.25}
    assert patch.main(args) == 0 and "2 slides already done" in caplog.text
    # another value for slide_001: only it is done with other settings
    table = tmp_path / "sizes.csv"
    table.write_text("slide_id,he_mpp\nslide_001,0.3\n")
    caplog.clear()
    assert patch.main([*args, "--pixel-sizes", str(table)]) == 2
    assert "1 slides are done with other settings: mpp 0.25 -> 0.3 (slide_001)" in caplog.text
    # --mpp still applies to every slide the table gives no value for
    assert patch.main([*args, "--mpp", "0.5"]) == 2
    assert "mpp null -> 0.5 (slide_000)" in caplog.text and "slide_001" not in _errors(caplog)[-1]
    assert patch_store.main(args) == 0
    with h5py.File(out / "he_patches" / "slide_001.h5") as f:
        assert f.attrs["level0_mpp"] == pytest.approx(0.25) and f["imgs"].shape[0] > 0
    assert json.loads((out / "he_patches" / "done" / "slide_001.json").read_text())["settings"]["mpp"] == 0.25


@pytest.mark.parametrize("text, expect", [
    ("slide,mpp\nslide_001,0.25\n", "its header must be slide_id,he_mpp,codex_mpp"),
    ("slide_id,he_mpp,codex_mpp\nslide_001,zero,\n", "row 2 (slide_001): he_mpp 'zero' is not a positive number"),
    ("slide_id,he_mpp,codex_mpp\nslide_001,-0.25,\n", "he_mpp '-0.25' is not a positive number"),
    ("slide_id,he_mpp,codex_mpp\nslide_001,0.25,\nslide_001,0.3,\n", "lists slide_001 twice; keep one row"),
    ("slide_id,he_mpp,codex_mpp\n,0.25,\n", "row 2: no slide_id"),
])
def test_bad_pixel_size_table_is_one_line(sources: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                          capsys: pytest.CaptureFixture, text: str, expect: str) -> None:
    cohort = _nompp_cohort(sources, tmp_path / "c")
    (cohort / "pixel_sizes.csv").write_text(text)
    out = tmp_path / "out"
    for mod in (patch, patch_store):
        caplog.clear()
        assert mod.main(["--cohort", str(cohort), "--out", str(out)]) == 2
        (error,) = _errors(caplog)
        assert str(cohort / "pixel_sizes.csv") in error and expect in error, error
        _no_traceback(caplog, capsys)
    assert patch.main(["--cohort", str(cohort), "--out", str(out), "--pixel-sizes", str(tmp_path / "no.csv")]) == 2
    assert f"pixel-size table not found: {tmp_path / 'no.csv'}" in _errors(caplog)[-1]
    assert not (out / "patches" / "done").exists()  # nothing done before the table was read


def test_status_works_from_any_folder(sources: Path, tmp_path: Path) -> None:
    """``python -m preprocess.status OUT`` from a folder outside the repository, without PYTHONPATH."""
    cohort = _cohort(tmp_path / "c", sources, {"slide_000.tif": "a"})
    out = tmp_path / "out"
    assert patch.main(["--cohort", str(cohort), "--out", str(out)]) == 0
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-m", "preprocess.status", str(out)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "patch: 1 done, 0 failed" in r.stdout and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "preprocess.status", str(tmp_path / "nope")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().endswith(f"output folder not found: {tmp_path / 'nope'}")
