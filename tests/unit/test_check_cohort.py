"""``preprocess.check_cohort`` on a tiny sample cohort and on broken copies of it; ``preprocess.status`` on an OUT
folder with a few stage files made by hand."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from pipeline import done as done_mod
from pipeline.errors import PipelineError
from pipeline.tables import read_clinical_table, read_fold
from preprocess.check_cohort import check_cohort, format_report, main
from preprocess.status import STAGES, StageState, format_status, slide_status
from preprocess.status import main as status_main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generator's 2-slide cohort as it comes (2 patients cannot fill its 5 folds: see below)."""
    out = tmp_path_factory.mktemp("cc") / "generated"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "sample_data.make_cohort", "--out", str(out), "--slides", "2",
                    "--tissue-mm", "0.5", "--workers", "1", "--log-level", "WARNING"],
                   check=True, cwd=REPO, env=env, capture_output=True)
    return out


@pytest.fixture(scope="module")
def cohort(generated: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 2-slide cohort made valid for every stage: both patients with an event, the two folds that 2 patients
    fill (splits_2..4 have an empty val column: test_generated_two_slide_cohort)."""
    out = _copy(generated, tmp_path_factory.mktemp("cc") / "cohort")
    clin = pd.read_csv(out / "clinical.csv", dtype=str)
    clin["censorship"] = "0"
    clin.to_csv(out / "clinical.csv", index=False)
    for k in (2, 3, 4):
        (out / "splits" / f"splits_{k}.csv").unlink()
    return out


def _copy(cohort: Path, dest: Path) -> Path:
    """A copy of the cohort whose CODEX files are links to the originals (they are the large ones)."""
    shutil.copytree(cohort, dest, ignore=shutil.ignore_patterns("codex"), symlinks=True)
    (dest / "codex").mkdir()
    for p in (cohort / "codex").iterdir():
        (dest / "codex" / p.name).symlink_to(p.resolve())
    return dest


def _errors(root: Path) -> str:
    res = check_cohort(root)
    assert not res.ok, format_report(res)
    assert main([str(root)]) == 1
    return "\n".join(f"{f.slide} {f.column} {f.message}" for f in res.errors())


@pytest.mark.slow
def test_sample_cohort_passes(cohort: Path, tmp_path: Path) -> None:
    res = check_cohort(cohort)
    assert res.ok and not res.findings, format_report(res)
    assert res.slides == ["slide_000", "slide_001"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # from any folder, installed
    proc = subprocess.run([sys.executable, "-m", "preprocess.check_cohort", str(cohort)], cwd=tmp_path,
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cohort OK: 2 slides, 0 errors" in proc.stdout
    assert proc.stdout.count(" ok ") >= 2 and "codex 0.377" in proc.stdout


def _warnings(root: Path) -> str:
    res = check_cohort(root)
    return "\n".join(f"{f.slide} {f.column} {f.message}" for f in res.warnings())


def test_duplicate_id_rescan(cohort: Path, tmp_path: Path) -> None:
    root = _copy(cohort, tmp_path / "c")
    shutil.copy(root / "he" / "slide_000.tif", root / "he" / "slide_000.v2.tif")
    # pairs.csv says which file is slide_000 and every stage reads that one: a warning naming both
    res = check_cohort(root)
    assert res.ok, format_report(res)
    warn = _warnings(root)
    assert "slide_000.tif, slide_000.v2.tif" in warn and "pairs.csv uses slide_000.tif" in warn
    assert "2 files: slide_000.tif" in format_report(res)
    # without pairs.csv the stages stop: an error naming both
    (root / "pairs.csv").unlink()
    err = _errors(root)
    assert "slide_000.v2.tif" in err and "share the slide id slide_000" in err


def test_symlink_with_other_name(cohort: Path, tmp_path: Path) -> None:
    root = _copy(cohort, tmp_path / "c")
    (tmp_path / "elsewhere").mkdir()
    shutil.move(root / "he" / "slide_001.tif", tmp_path / "elsewhere" / "scan_17.tif")
    (root / "he" / "slide_001.tif").symlink_to(tmp_path / "elsewhere" / "scan_17.tif")
    res = check_cohort(root)  # fine: outputs are named after the link; noted with the target
    assert res.ok and not res.warnings(), format_report(res)
    assert [(f.slide, f.level) for f in res.findings] == [("slide_001", "info")]
    assert "scan_17.tif" in res.findings[0].message and "ok, link to scan_17.tif" in format_report(res)
    assert main([str(root)]) == 0
    # a broken link
    (tmp_path / "elsewhere" / "scan_17.tif").rename(tmp_path / "elsewhere" / "moved.tif")
    err = _errors(root)
    assert "slide_001" in err and "symbolic link" in err and "does not exist" in err
    # two ids that are one file
    (root / "he" / "slide_001.tif").unlink()
    (root / "he" / "slide_001.tif").symlink_to(root / "he" / "slide_000.tif")
    err = _errors(root)
    assert "slides slide_000, slide_001 are one file" in err


def test_ids_differ_between_he_pairs_clinical_and_splits(cohort: Path, tmp_path: Path) -> None:
    root = _copy(cohort, tmp_path / "c")
    (root / "he" / "slide_001.tif").rename(root / "he" / "slide_1.tif")  # pairs.csv still names slide_001.tif
    clin = (root / "clinical.csv").read_text().splitlines()
    (root / "clinical.csv").write_text("\n".join([*clin, clin[-1].replace("slide_001", "slide_777")]) + "\n")
    (root / "splits" / "splits_0.csv").write_text("train,val\nslide_000,slide_001\nslide_999,\n")
    res = check_cohort(root)
    err, warn = _errors(root), _warnings(root)
    assert "slide_001" in err and "slide_001.tif" in err and "does not exist" in err
    assert "slide_1.tif" in warn and "does not list" in warn  # the renamed file is not processed
    assert "slide_777" in warn and "clinical" in warn
    assert "slide_999" in err and "splits_0.csv" in err
    assert res.source.endswith("pairs.csv")


def test_panel_with_two_markers_on_one_channel(cohort: Path, tmp_path: Path) -> None:
    root = _copy(cohort, tmp_path / "c")
    lines = (root / "marker_panel.csv").read_text().splitlines()
    ch = lines[2].split(",")[0]
    lines[3] = f"{ch},{lines[3].split(',')[1]}"  # the marker of channel 2 moved onto channel 1
    (root / "marker_panel.csv").write_text("\n".join(lines) + "\n")
    err = _errors(root)
    assert f"maps 2 markers to channel {ch}" in err and lines[2].split(",")[1] in err


def test_unwritable_output_folder(cohort: Path, tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("not a folder")
    out = tmp_path / "a_file" / "out"
    res = check_cohort(cohort, out)
    assert not res.ok and any("a_file" in f.message and "not a folder" in f.message for f in res.errors())
    assert main([str(cohort), "--out", str(out)]) == 1
    assert check_cohort(cohort, tmp_path / "new" / "out").ok and not (tmp_path / "new").exists()


def test_panel_name_mismatch(cohort: Path, tmp_path: Path) -> None:
    root = _copy(cohort, tmp_path / "c")
    lines = (root / "marker_panel.csv").read_text().splitlines()
    a, b = lines[2].split(","), lines[3].split(",")  # swap the markers of channels 1 and 2
    lines[2], lines[3] = f"{a[0]},{b[1]}", f"{b[0]},{a[1]}"
    (root / "marker_panel.csv").write_text("\n".join(lines) + "\n")
    err = _errors(root)
    assert "panel" in err and "disagree" in err and b[1] in err
    assert {line.split()[0] for line in err.splitlines()} == {"slide_000", "slide_001"}


def test_split_with_unknown_slide(cohort: Path, tmp_path: Path) -> None:
    root = _copy(cohort, tmp_path / "c")
    (root / "splits" / "splits_0.csv").write_text("train,val\nslide_000,slide_001\nslide_999,\n")
    err = _errors(root)
    assert "slide_999" in err and "splits_0.csv" in err


def test_patient_in_train_and_val(cohort: Path, tmp_path: Path) -> None:
    root = _copy(cohort, tmp_path / "c")
    clin = (root / "clinical.csv").read_text().replace("case_001,slide_001", "case_000,slide_001")
    (root / "clinical.csv").write_text(clin)
    (root / "splits" / "splits_0.csv").write_text("train,val\nslide_000,slide_001\n")
    err = _errors(root)
    assert "patient case_000" in err and "splits_0.csv" in err


def test_zero_byte_slide(cohort: Path, tmp_path: Path) -> None:
    root = _copy(cohort, tmp_path / "c")
    (root / "he" / "slide_001.tif").write_bytes(b"")
    err = _errors(root)
    assert "slide_001.tif is an empty (zero-byte) file" in err


def test_pixel_size_table_is_what_the_stages_use(cohort: Path, tmp_path: Path) -> None:
    """A slide without a level-0 pixel size: a warning, gone when COHORT/pixel_sizes.csv gives it (as the stages
    read it); a broken table is an error, with the stages' message."""
    from sample_data.writers import write_aperio_tiff
    from tests.fixtures import blob_slide

    root = _copy(cohort, tmp_path / "c")
    write_aperio_tiff(root / "he" / "slide_001.tif", blob_slide(600, 500, 0), mpp=None)
    res = check_cohort(root)
    assert any(f.slide == "slide_001" and f.column == "mpp" for f in res.findings)
    (root / "pixel_sizes.csv").write_text("slide_id,he_mpp,codex_mpp\nslide_001,0.5,\n")
    res = check_cohort(root)
    assert not any(f.slide == "slide_001" and f.column == "mpp" for f in res.findings)
    assert res.mpp["slide_001"].startswith("he 0.5 (table)")
    (root / "pixel_sizes.csv").write_text("slide_id,he_mpp,codex_mpp\nslide_001,-1,\n")
    assert "pixel-size table" in _errors(root)


def test_missing_cohort_is_one_line(tmp_path: Path) -> None:
    assert main([str(tmp_path / "nope")]) == 2


# ----------------------------------------------------------------------------------------------------------------
# cohorts on which check_cohort said OK and a stage stopped: now the same finding, with the stage's own message


def test_generated_two_slide_cohort(generated: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Folds without events and folds with an empty val column: errors where the stages stop, the warning the
    stage logs for a validation fold without events (with the fold and its counts)."""
    res = check_cohort(generated)
    err = {f.message for f in res.errors()}
    for k in (2, 3, 4):
        assert any(f"splits_{k}.csv: column 'val' lists no slides" in m for m in err)
    fold1 = [m for m in err if "fold 1 has no event in 'train'" in m]
    assert fold1 and "train 1 patients (0 events), val 1 patients (1 events)" in fold1[0]
    fold0 = [f.message for f in res.warnings() if "fold 0 has no event in 'val'" in f.message]
    assert fold0 and "val 1 patients (0 events)" in fold0[0]
    clinical = read_clinical_table(generated / "clinical.csv", "survival")
    with pytest.raises(PipelineError) as e:
        read_fold(generated / "splits" / "splits_1.csv", clinical)
    assert str(e.value) == fold1[0]
    with pytest.raises(PipelineError) as e:
        read_fold(generated / "splits" / "splits_2.csv", clinical)
    assert str(e.value) in err
    with caplog.at_level(logging.WARNING, logger="pipeline.tables"):
        read_fold(generated / "splits" / "splits_0.csv", clinical)
    assert fold0[0] in caplog.text


def test_39_row_panel(cohort: Path, tmp_path: Path) -> None:
    """Stage 03 stops on a panel without the 40 markers: check_cohort says so, in stage 03's words."""
    from preprocess.quantify.tables import resolve_tables

    root = _copy(cohort, tmp_path / "c")
    lines = (root / "marker_panel.csv").read_text().splitlines()
    (root / "marker_panel.csv").write_text("\n".join(lines[:-1]) + "\n")
    err = _errors(root)
    assert "lists 39 markers, expected 40" in err
    with pytest.raises(PipelineError) as e:
        resolve_tables(root, None, None, 40)
    assert str(e.value) in err


def test_response_coded_yes_no(cohort: Path, tmp_path: Path) -> None:
    root = _copy(cohort, tmp_path / "c")
    clin = pd.read_csv(root / "clinical.csv", dtype=str)
    clin["response"] = clin["response"].map({"0": "no", "1": "yes"})
    clin.to_csv(root / "clinical.csv", index=False)
    err = [f.message for f in check_cohort(root).errors()]
    assert main([str(root)]) == 1
    assert len(err) == 1 and str(root / "clinical.csv") in err[0] and "0 or 1 is expected" in err[0]
    first = clin.iloc[0]
    assert f"patient {first['case_id']}" in err[0] and repr(first["response"]) in err[0]
    with pytest.raises(PipelineError) as e:  # MICA's reader (stage 08/09 --task response)
        read_clinical_table(root / "clinical.csv", "response")
    assert str(e.value) == err[0]


def test_clinical_rules_are_stage_04s(cohort: Path, tmp_path: Path) -> None:
    """They were the reverse: check_cohort stopped on a table without survival columns (HEX training reads only the
    ids) and only warned about a split slide without a row (HEX training stops: its patient escapes the leakage
    check)."""
    from hex.data.splits import load_split

    root = _copy(cohort, tmp_path / "c")
    clin = pd.read_csv(root / "clinical.csv", dtype=str)
    clin[["case_id", "slide_id"]].to_csv(root / "clinical.csv", index=False)
    res = check_cohort(root)
    assert res.ok, format_report(res)
    assert any("the MICA stages need survival_months,censorship" in f.message for f in res.warnings())
    assert load_split(root / "splits" / "splits_0.csv", root / "clinical.csv")["val"] == ["slide_001"]
    clin.iloc[:1].to_csv(root / "clinical.csv", index=False)  # slide_001 has no row
    err = [f.message for f in check_cohort(root).errors() if "splits_0.csv" in f.message]
    assert len(err) == 1 and "slide_001" in err[0]
    with pytest.raises(PipelineError) as e:
        load_split(root / "splits" / "splits_0.csv", root / "clinical.csv")
    assert str(e.value) == err[0]


# ----------------------------------------------------------------------------------------------------------------
# status


def _h5(path: Path, **datasets) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f[k] = v


def _record(out: Path, folder: str, slide: str, inputs: dict | None = None) -> done_mod.DoneSpec:
    """A done-record for ``slide`` in ``OUT/folder/done/`` (as a stage would write it after the slide)."""
    spec = done_mod.DoneSpec(folder=out / folder, settings={}, schema=1, inputs=lambda s: dict(inputs or {}),
                             outputs=lambda s: [])
    done_mod.write_record(spec, slide)
    return spec


def test_status_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    coords = np.zeros((3, 2), np.int64)
    _h5(out / "patches" / "s1.h5", coords=coords)
    _h5(out / "patches" / "s2.h5", coords=coords)
    (out / "patches" / "run.log").write_text("10:00:00 ERROR pipeline.runner: s3: no tissue found in s3.tif\n")
    (out / "registration").mkdir()
    (out / "registration" / "s1.json").write_text(json.dumps({"status": "ok"}))
    (out / "registration" / "s2.json").write_text(json.dumps({"status": "flagged", "reason": "low NCC 0.1"}))
    (out / "markers").mkdir()
    (out / "markers" / "s1.csv").write_text("slide,index,x,y\n")
    _h5(out / "features" / "hex_tiny" / "h5_files" / "s1.h5", features=np.zeros((3, 4), np.float32))
    _h5(out / "codex_features" / "stats.h5", s2=np.zeros((40, 10), np.float32))
    _h5(out / "mica_runs" / "r0" / "ig" / "s1.h5", coords=coords)
    for folder, slides in (("patches", ["s1", "s2"]), ("registration", ["s1", "s2"]), ("markers", ["s1"]),
                           ("features/hex_tiny", ["s1"]), ("mica_runs/r0/ig", ["s1"])):
        for s in slides:
            _record(out, folder, s)
    # quantify failed for s2 (its failure record), and for s4, which has no other trace
    for s, why in (("s2", "CODEX image not found: s2.ome.tif"), ("s4", "no registration record")):
        done_mod.write_failure(_record(out, "markers", s), s, why)
    # the patch store: s1 made by an older version (no done-record), s2 made from a grid that was redone since
    _h5(out / "he_patches" / "s1.h5", imgs=np.zeros((3, 2, 2, 3), np.uint8))
    _h5(out / "he_patches" / "s2.h5", imgs=np.zeros((3, 2, 2, 3), np.uint8))
    _record(out, "he_patches", "s2", {"grid": out / "patches" / "s2.h5"})
    _h5(out / "patches" / "s2.h5", coords=np.zeros((4, 2), np.int64))  # redone: its size changes
    os.utime(out / "patches" / "s2.h5", ns=(1, 1))  # and its mtime, whatever the clock's resolution

    table = slide_status(out)
    assert sorted(table) == ["s1", "s2", "s3", "s4"]
    assert table["s1"]["patch"].state == "done" and table["s1"]["registration"].state == "done"
    assert table["s2"]["registration"].state == "flagged" and "low NCC" in table["s2"]["registration"].reason
    assert table["s3"]["patch"].state == "failed" and "no tissue" in table["s3"]["patch"].reason
    assert table["s2"]["markers"] == StageState("failed", "CODEX image not found: s2.ome.tif")
    assert table["s4"]["markers"] == StageState("failed", "no registration record")
    assert table["s3"]["markers"].state == "missing"
    assert table["s1"]["he_patches"].state == "stale" and "no done-record" in table["s1"]["he_patches"].reason
    assert table["s2"]["he_patches"].state == "stale" and "grid s2.h5" in table["s2"]["he_patches"].reason
    assert table["s1"]["features/hex_tiny"].state == "done" and table["s2"]["features/hex_tiny"].state == "missing"
    assert table["s2"]["codex_features/stats"].state == "done"
    assert table["s1"]["codex_features/stats"].state == "missing"
    assert table["s1"]["ig/r0"].state == "done"
    text = format_status(table)
    assert "patch: 2 done, 1 failed, 1 missing" in text and "he_patches: 0 done, 0 failed, 2 missing, 2 stale" in text
    assert status_main([str(out)]) == 0
    printed = capsys.readouterr().out
    assert "s3" in printed and "no tissue" in printed and "CODEX image not found" in printed
    assert [s.name for s in STAGES[:6]] == ["patch", "registration", "markers", "he_patches", "hex_pred",
                                            "virtual_codex"]
    assert status_main([str(tmp_path / "nope")]) == 2


def test_status_stage_table_is_in_one_place() -> None:
    """The docstring's stage list is made from STAGES (one table), and names every stage."""
    import preprocess.status as status

    assert "<STAGE TABLE>" not in (status.__doc__ or "")
    for st in STAGES:
        assert f"    {st.name:<20}{st.output}" in (status.__doc__ or "")
