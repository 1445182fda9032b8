"""``preprocess.check_cohort`` on a tiny sample cohort and on broken copies of it; ``preprocess.status`` on an OUT
folder with a few stage files made by hand."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from preprocess.check_cohort import check_cohort, format_report, main
from preprocess.status import STAGES, format_status, slide_status
from preprocess.status import main as status_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cc") / "cohort"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "sample_data.make_cohort", "--out", str(out), "--slides", "2",
                    "--tissue-mm", "0.5", "--workers", "1", "--log-level", "WARNING"],
                   check=True, cwd=REPO, env=env, capture_output=True)
    return out


def _copy(cohort: Path, dest: Path) -> Path:
    """A copy of the cohort whose CODEX files are links to the originals (they are the large ones)."""
    shutil.copytree(cohort, dest, ignore=shutil.ignore_patterns("codex"))
    (dest / "codex").mkdir()
    for p in (cohort / "codex").iterdir():
        (dest / "codex" / p.name).symlink_to(p)
    return dest


def _errors(root: Path) -> str:
    res = check_cohort(root)
    assert not res.ok, format_report(res)
    assert main([str(root)]) == 1
    return "\n".join(f"{f.slide} {f.column} {f.message}" for f in res.errors())


def test_sample_cohort_passes(cohort: Path) -> None:
    res = check_cohort(cohort)
    assert res.ok and not res.findings, format_report(res)
    assert res.slides == ["slide_000", "slide_001"]
    proc = subprocess.run([sys.executable, "-m", "preprocess.check_cohort", str(cohort)], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cohort OK: 2 slides, 0 errors" in proc.stdout
    assert proc.stdout.count(" ok ") >= 2 and "codex 0.377" in proc.stdout


def test_duplicate_id_rescan(cohort: Path, tmp_path: Path) -> None:
    root = _copy(cohort, tmp_path / "c")
    shutil.copy(root / "he" / "slide_000.tif", root / "he" / "slide_000.v2.tif")
    err = _errors(root)
    assert "slide_000.v2.tif" in err and "share the slide id slide_000" in err


def test_symlink_with_other_name(cohort: Path, tmp_path: Path) -> None:
    root = _copy(cohort, tmp_path / "c")
    (tmp_path / "elsewhere").mkdir()
    shutil.move(root / "he" / "slide_001.tif", tmp_path / "elsewhere" / "scan_17.tif")
    (root / "he" / "slide_001.tif").symlink_to(tmp_path / "elsewhere" / "scan_17.tif")
    err = _errors(root)
    assert "symbolic link" in err and "scan_17" in err and "slide_001" in err


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


def test_missing_cohort_is_one_line(tmp_path: Path) -> None:
    assert main([str(tmp_path / "nope")]) == 2


# ----------------------------------------------------------------------------------------------------------------
# status


def _h5(path: Path, **datasets) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f[k] = v


def test_status_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    coords = np.zeros((3, 2), np.int64)
    _h5(out / "patches" / "s1.h5", coords=coords)
    _h5(out / "patches" / "s2.h5", coords=coords)
    (out / "patches" / "run.log").write_text("10:00:00 ERROR preprocess.utils: s3: no tissue found in s3.tif\n")
    (out / "registration").mkdir()
    (out / "registration" / "s1.json").write_text(json.dumps({"status": "ok"}))
    (out / "registration" / "s2.json").write_text(json.dumps({"status": "flagged", "reason": "low NCC 0.1"}))
    (out / "markers").mkdir()
    (out / "markers" / "s1.csv").write_text("slide,index,x,y\n")
    _h5(out / "features" / "hex_tiny" / "h5_files" / "s1.h5", features=np.zeros((3, 4), np.float32))
    _h5(out / "codex_features" / "stats.h5", s2=np.zeros((40, 10), np.float32))
    _h5(out / "mica_runs" / "r0" / "ig" / "s1.h5", coords=coords)

    table = slide_status(out)
    assert sorted(table) == ["s1", "s2", "s3"]
    assert table["s1"]["patch"].state == "done" and table["s1"]["registration"].state == "done"
    assert table["s2"]["registration"].state == "flagged" and "low NCC" in table["s2"]["registration"].reason
    assert table["s3"]["patch"].state == "failed" and "no tissue" in table["s3"]["patch"].reason
    assert table["s2"]["markers"].state == "missing"
    assert table["s1"]["features/hex_tiny"].state == "done" and table["s2"]["features/hex_tiny"].state == "missing"
    assert table["s2"]["codex_features/stats"].state == "done"
    assert table["s1"]["codex_features/stats"].state == "missing"
    assert table["s1"]["ig/r0"].state == "done"
    text = format_status(table)
    assert "patch: 2 done, 1 failed, 0 missing" in text
    assert status_main([str(out)]) == 0
    printed = capsys.readouterr().out
    assert "s3" in printed and "no tissue" in printed
    assert {s for s, _ in STAGES} >= {"patch", "registration", "markers", "he_patches", "hex_pred", "virtual_codex"}
