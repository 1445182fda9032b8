"""Stages 02 (register) and 03 (quantify + normalisation) as a user meets them (issue 11).

- a panel with two markers on one channel, then the fixed panel: the rerun redoes the slides and the labels (the
  panel is an input of the done-record), never "already done" with the wrong labels;
- a rerun with other settings stops before any work (exit 2), outputs and config untouched;
- the normalisation follows its settings (another fit set / percentiles relabel; the same settings rewrite nothing);
- one bad slide in stage 03: the others are labelled, the last line names it and its reason, exit 1, its failure
  record exists and it has no label file;
- slides that are symbolic links with other names: registration and labels are named after the link, the ids of
  pipeline.cohort.resolve_slides (those of stage 01);
- no traceback, exit 2, for a missing input, an unwritable output and a bad flag value, in both stages;
- stage 03 as one command (``preprocess.labels``, what scripts/03_quantify.sh calls): quantify then the patch
  store, its exit-code rules and last line; Ctrl-C ends a stage with one line saying how to resume (exit 130);
- per-slide pixel sizes (``--pixel-sizes``) reach each slide's registration, raw means and done-record.

Registration is replaced by a fake ``register_pair`` (palom's work is tested in test_register.py): it writes the
record of a known affine, so that the chain register -> quantify runs in a second.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from pipeline.cohort import resolve_slides
from pipeline.done import read_failure
from preprocess import register
from preprocess.quantify import stage as q
from sample_data.writers import write_ome_pyramid

pytestmark = pytest.mark.slow  # a chain / end-to-end module: scripts/test.sh runs it, -m "not slow" skips it

CODEX_MPP = 0.377
MARKERS = ["DAPI", "CD8", "CD4", "CD20", "Ki67", "PanCK"]
QARGS = ["--num-markers", "0", "--region-px", "64"]


def _affine(deg: float, tx: float, ty: float, scale: float = 0.754) -> np.ndarray:
    c, s = np.cos(np.deg2rad(deg)) * scale, np.sin(np.deg2rad(deg)) * scale
    return np.array([[c, -s, tx], [s, c, ty], [0, 0, 1.0]])


AFFINES = {"s1": _affine(2.0, 10.0, 6.0), "s2": _affine(-4.0, 30.0, 20.0)}


def _write_grid(path: Path, size: int = 30, extent: tuple[int, int] = (150, 140)) -> None:
    xs, ys = np.arange(0, extent[0], size), np.arange(0, extent[1], size)
    coords = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2).astype(np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("coords", data=coords)
        f.attrs.update({"patch_size": 224, "patch_level": 0, "patch_size_level0": size, "mpp": 0.5,
                        "level0_mpp": 0.5})


def _write_reg(path: Path, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"affine_codex_to_he": np.asarray(affine).tolist(), "status": "ok", "reason": None}))


def _write_codex(path: Path, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = rng.integers(100, 5000, (len(MARKERS), 150, 170), dtype=np.uint16)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_ome_pyramid(path, data, MARKERS, mpp=CODEX_MPP, tile=64)
    return data


def _write_panel(path: Path, channels: list[int]) -> None:
    path.write_text("channel,marker\n" + "".join(f"{c},{m}\n" for c, m in zip(channels, MARKERS)))


@pytest.fixture()
def qstage(tmp_path: Path) -> tuple[Path, Path]:
    """Two slides for stage 03: CODEX images, a pairing table (its H&E files need not exist), a panel, grids and
    registration records under OUT."""
    cohort, out = tmp_path / "cohort", tmp_path / "out"
    for i, s in enumerate(("s1", "s2")):
        _write_codex(cohort / "codex" / f"{s}.ome.tif", seed=i)
        _write_grid(out / "patches" / f"{s}.h5")
        _write_reg(out / "registration" / f"{s}.json", AFFINES[s])
    (cohort / "pairs.csv").write_text("he_slide,codex_image\n" + "".join(
        f"he/{s}.svs,codex/{s}.ome.tif\n" for s in ("s1", "s2")))
    _write_panel(cohort / "marker_panel.csv", list(range(len(MARKERS))))
    return cohort, out


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """{relative path: (mtime_ns, bytes)} of every file under ``folder`` but the appended log."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix != ".log"}


def _bump_mtime(path: Path, seconds: int = 5) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


# ----------------------------------------------------------------------------------------------------------------
# stage 03: the panel is an input; other settings stop; the normalisation follows its settings


def test_fixed_panel_redoes_the_labels(qstage, tmp_path, caplog):
    cohort, out = qstage
    panel = cohort / "marker_panel.csv"
    _write_panel(panel, [0, 1, 2, 2, 4, 5])  # CD20 on CD4's channel: a typo
    args = ["--cohort", str(cohort), "--out", str(out), *QARGS]
    caplog.set_level(logging.INFO)
    assert q.main([*args, "--panel-wins"]) == 0
    assert "gives one channel to several markers (channel 2: CD4, CD20)" in caplog.text
    raw = pd.read_csv(out / "markers" / "raw" / "s1.csv")
    assert np.array_equal(raw["CD4"].to_numpy(), raw["CD20"].to_numpy(), equal_nan=True)  # the wrong labels
    _write_panel(panel, list(range(len(MARKERS))))  # fixed
    _bump_mtime(panel)
    caplog.clear()
    assert q.main(args) == 0
    assert "slides already done" not in caplog.text  # not skipped
    assert "input changed since it was done (panel" in caplog.text and str(panel) in caplog.text
    fixed = pd.read_csv(out / "markers" / "raw" / "s1.csv")
    assert not np.allclose(fixed["CD4"], fixed["CD20"], equal_nan=True)
    # the labels are those of a clean run with the fixed panel, byte for byte
    clean = tmp_path / "clean"
    for s in ("s1", "s2"):
        _write_grid(clean / "patches" / f"{s}.h5")
        _write_reg(clean / "registration" / f"{s}.json", AFFINES[s])
    assert q.main(["--cohort", str(cohort), "--out", str(clean), *QARGS]) == 0
    for s in ("s1", "s2"):
        assert (out / "markers" / f"{s}.csv").read_bytes() == (clean / "markers" / f"{s}.csv").read_bytes()
    assert caplog.records[-1].getMessage().startswith("quantify: 2 done, 0 skipped")


def test_rerun_with_other_settings_stops_before_work(qstage, caplog):
    cohort, out = qstage
    args = ["--cohort", str(cohort), "--out", str(out), *QARGS]
    assert q.main(args) == 0
    before = _snapshot(out / "markers")
    assert "config.json" in before and "done/s1.json" in before and "s1.csv" in before
    caplog.clear()
    assert q.main([*args, "--nodata-um", "10"]) == 2
    assert "quantify: 2 slides are done with other settings: nodata_um 40.0 -> 10.0 (s1, s2)" in caplog.text
    assert "pass --overwrite" in caplog.text
    assert _snapshot(out / "markers") == before  # nothing rewritten, config.json included
    # another input file for a role (another registration folder) is a conflict too
    other = out / "registration_v2"
    for s in ("s1", "s2"):
        _write_reg(other / f"{s}.json", AFFINES[s])
    assert q.main([*args, "--registration", str(other)]) == 2
    assert "input registration" in caplog.text and _snapshot(out / "markers") == before
    # the same settings: skipped, nothing rewritten (the labels' bytes would be the same)
    caplog.clear()
    assert q.main(args) == 0
    assert "2 slides already done" in caplog.text
    assert {k: v for k, v in _snapshot(out / "markers").items() if k != "config.json"} == \
        {k: v for k, v in before.items() if k != "config.json"}
    # --overwrite redoes them with the new settings, and the config says so
    assert q.main([*args, "--nodata-um", "10", "--overwrite"]) == 0
    rec = json.loads((out / "markers" / "done" / "s1.json").read_text())
    assert rec["settings"]["nodata_um"] == 10.0
    assert json.loads((out / "markers" / "config.json").read_text())["nodata_um"] == 10.0


def test_normalisation_follows_its_settings(qstage, caplog):
    cohort, out = qstage
    args = ["--cohort", str(cohort), "--out", str(out), *QARGS]
    labels = out / "markers" / "s2.csv"
    assert q.main(args) == 0
    first = labels.read_bytes()
    caplog.clear()
    assert q.main([*args, "--fit-slides", "s1"]) == 0  # pass 1 skipped, the labels follow the new fit set
    assert "normalisation settings changed since the last run: fit_slides" in caplog.text
    norm = json.loads((out / "markers" / "normalization.json").read_text())
    assert norm["fit_slides"] == ["s1"] and norm["settings"]["fit_source"] == "--fit-slides"
    second = labels.read_bytes()
    assert second != first
    t = labels.stat().st_mtime_ns
    caplog.clear()
    assert q.main([*args, "--fit-slides", "s1"]) == 0  # the same settings: no label file is rewritten
    assert labels.stat().st_mtime_ns == t and "0 label files written, 2 unchanged" in caplog.text
    assert q.main([*args, "--fit-slides", "s1", "--high-pct", "90"]) == 0
    assert labels.read_bytes() != second
    assert json.loads((out / "markers" / "normalization.json").read_text())["percentiles"] == [1.0, 90.0]
    # a split file that does not exist stops before any work
    caplog.clear()
    assert q.main([*args, "--fit-split", str(cohort / "no_split.csv"), "--overwrite"]) == 2
    assert "split file not found" in caplog.text and "quantify: " not in caplog.text


# ----------------------------------------------------------------------------------------------------------------
# stage 03: one bad slide


def test_one_bad_slide_others_labelled(qstage, caplog):
    cohort, out = qstage
    args = ["--cohort", str(cohort), "--out", str(out), *QARGS]
    assert q.main(args) == 0
    assert (out / "markers" / "s2.csv").exists()
    (out / "registration" / "s2.json").unlink()  # its re-registration failed and removed the record
    caplog.clear()
    assert q.main(args) == 1
    last = caplog.records[-1].getMessage()
    assert last.startswith("quantify: 0 done, 1 skipped (already done), 1 failed: s2 (registration record not found")
    assert "labels: 1 slides normalised" in last
    reason = read_failure(out / "markers", "s2")
    assert reason is not None and "registration record not found" in reason and "s2.json" in reason
    assert (out / "markers" / "s1.csv").exists()
    assert not (out / "markers" / "s2.csv").exists() and not (out / "markers" / "raw" / "s2.csv").exists()
    assert json.loads((out / "markers" / "normalization.json").read_text())["applied_to"] == ["s1"]
    # fixed: the rerun redoes s2 only, and its failure record goes
    _write_reg(out / "registration" / "s2.json", AFFINES["s2"])
    assert q.main(args) == 0
    assert read_failure(out / "markers", "s2") is None and (out / "markers" / "s2.csv").exists()


# ----------------------------------------------------------------------------------------------------------------
# stage 02 (fake registration) and the chain


@pytest.fixture()
def fake_registration(monkeypatch):
    """Replace palom's registration by a record of the known affine (and a QC figure); returns the calls."""
    calls: list[tuple[str, str]] = []

    def fake(he_path, codex_path, params, qc_png=None, field_npy=None):
        calls.append((str(he_path), str(codex_path)))
        Path(qc_png).write_bytes(b"png")
        key = "s2" if "2" in Path(codex_path).resolve().name else "s1"
        return {"he": str(he_path), "codex": str(codex_path), "he_mpp": 0.5, "codex_mpp": CODEX_MPP,
                "affine_codex_to_he": AFFINES[key].tolist(), "displacement": None, "status": "ok", "reason": None,
                "qc": {"ncc_before": 0.1, "ncc_coarse": 0.6, "ncc_affine": 0.8, "ncc_after": 0.9,
                       "n_blocks_used": 10, "n_blocks_measured": 12, "seconds": {"total": 0.0}}}

    monkeypatch.setattr(register, "register_pair", fake)
    return calls


def _linked_cohort(root: Path) -> Path:
    """A cohort whose he/ and codex/ files are links with other names (no pairs.csv)."""
    cohort = root / "cohort"
    (cohort / "he").mkdir(parents=True)
    (cohort / "codex").mkdir()
    for i, (s, target) in enumerate((("slide_a", "S-1001"), ("slide_b", "S-2002"))):
        he = root / "scanner" / f"{target}.svs"
        he.parent.mkdir(exist_ok=True)
        he.write_bytes(b"an H&E slide")
        os.symlink(he, cohort / "he" / f"{s}.svs")
        cx = root / "codex_runs" / f"run_{target}.ome.tif"
        _write_codex(cx, seed=i)
        os.symlink(cx, cohort / "codex" / f"{s}.ome.tif")
    _write_panel(cohort / "marker_panel.csv", list(range(len(MARKERS))))
    return cohort


def test_linked_slides_are_named_after_the_link(tmp_path, fake_registration, caplog):
    cohort = _linked_cohort(tmp_path)
    out = tmp_path / "out"
    ids = resolve_slides(cohort).ids  # what stage 01 names its grids
    assert ids == ["slide_a", "slide_b"]
    for s in ids:
        _write_grid(out / "patches" / f"{s}.h5")
    assert register.main(["--cohort", str(cohort), "--out", str(out)]) == 0
    assert sorted(p.stem for p in (out / "registration").glob("slide_*.json")) == ids
    assert not list((out / "registration").glob("S-*")) and not list((out / "registration").glob("run_*"))
    assert sorted(fake_registration) == [(str(cohort / "he" / f"{s}.svs"), str(cohort / "codex" / f"{s}.ome.tif"))
                                         for s in ids]  # the links as written
    rec = json.loads((out / "registration" / "done" / "slide_a.json").read_text())
    assert rec["inputs"]["he"]["path"] == str(cohort / "he" / "slide_a.svs")
    assert rec["inputs"]["panel"]["path"] == str(cohort / "marker_panel.csv")
    assert q.main(["--cohort", str(cohort), "--out", str(out), *QARGS]) == 0
    assert sorted(p.stem for p in (out / "markers").glob("*.csv")) == ids
    df = pd.read_csv(out / "markers" / "slide_a.csv", dtype={"slide": str})
    assert set(df["slide"]) == {"slide_a"} and len(df) > 0
    assert "patch grid not found" not in caplog.text


def test_register_conflict_changed_input_and_failure_record(tmp_path, fake_registration, caplog):
    cohort = _linked_cohort(tmp_path)
    out = tmp_path / "out"
    args = ["--cohort", str(cohort), "--out", str(out)]
    assert register.main(args) == 0
    before = _snapshot(out / "registration")
    caplog.clear()
    assert register.main([*args, "--ncc-threshold", "0.5"]) == 2
    assert "register: 2 slides are done with other settings: ncc_threshold 0.3 -> 0.5" in caplog.text
    assert _snapshot(out / "registration") == before and len(fake_registration) == 2  # no work, no new config
    # --workers and --panel-wins are not settings: skipped
    caplog.clear()
    assert register.main([*args, "--workers", "2", "--panel-wins"]) == 0
    assert "2 slides already done" in caplog.text and len(fake_registration) == 2
    # a changed H&E file (a rescan under the same name) redoes that slide, and says so
    _bump_mtime(tmp_path / "scanner" / "S-1001.svs")
    caplog.clear()
    assert register.main(args) == 0
    assert len(fake_registration) == 3 and "input changed since it was done (he" in caplog.text
    # a slide without its CODEX fails with its reason recorded; the last line names it
    (cohort / "codex" / "slide_b.ome.tif").unlink()
    caplog.clear()
    assert register.main([*args, "--overwrite"]) == 1
    last = caplog.records[-1].getMessage()
    assert last.startswith("registration: 1 done, 0 skipped (already done), 1 failed: slide_b (slide slide_b has no "
                           "CODEX image")
    assert "slide_b has no CODEX image" in (read_failure(out / "registration", "slide_b") or "")
    assert not (out / "registration" / "slide_b.json").exists()


# ----------------------------------------------------------------------------------------------------------------
# no traceback for the expected mistakes, in both stages


def _no_traceback(capsys, caplog) -> str:
    cap = capsys.readouterr()
    text = cap.out + cap.err + caplog.text
    assert "Traceback" not in text and not any(r.exc_info for r in caplog.records)
    return text


@pytest.mark.parametrize("case", ["missing_input", "unwritable_output", "bad_flag"])
def test_register_errors_without_traceback(tmp_path, case, capsys, caplog, fake_registration):
    cohort = _linked_cohort(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out, extra, expect = tmp_path / "out", [], ""
    if case == "missing_input":
        extra, expect = ["--pairs", str(tmp_path / "nope.csv")], str(tmp_path / "nope.csv")
    elif case == "unwritable_output":
        out, expect = blocker / "out", str(blocker / "out" / "registration")
    else:
        extra, expect = ["--upsample", "0"], "--upsample must be >= 1"
    assert register.main(["--cohort", str(cohort), "--out", str(out), *extra]) == 2
    text = _no_traceback(capsys, caplog)
    assert expect in text and not fake_registration
    # a value argparse cannot parse: its usage line, exit 2
    assert register.main(["--cohort", str(cohort), "--out", str(out), "--workers", "two"]) == 2
    assert "invalid int value" in _no_traceback(capsys, caplog)


@pytest.mark.parametrize("case", ["missing_input", "unwritable_output", "bad_flag"])
def test_quantify_errors_without_traceback(qstage, tmp_path, case, capsys, caplog):
    cohort, out = qstage
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    extra, expect = [], ""
    if case == "missing_input":
        extra, expect = ["--panel", str(tmp_path / "nope.csv")], str(tmp_path / "nope.csv")
    elif case == "unwritable_output":
        out, expect = blocker / "out", str(blocker / "out" / "markers")
    else:
        extra, expect = ["--nodata-um", "-1"], "--nodata-um must be >= 0"
    assert q.main(["--cohort", str(cohort), "--out", str(out), *QARGS, *extra]) == 2
    text = _no_traceback(capsys, caplog)
    assert expect in text
    assert not (out / "markers" / "raw").exists() if case != "unwritable_output" else True
    assert q.main(["--cohort", str(cohort), "--out", str(out), "--region-px", "big"]) == 2
    assert "invalid int value" in _no_traceback(capsys, caplog)


def test_missing_stage_inputs_stop_before_work(qstage, tmp_path, caplog):
    """No patch grids / registrations at all, or a cohort without pairs.csv and he/: one line, exit 2."""
    cohort, out = qstage
    assert q.main(["--cohort", str(cohort), "--out", str(tmp_path / "fresh"), *QARGS]) == 2
    assert f"patch grid folder not found: {tmp_path / 'fresh' / 'patches'}" in caplog.text
    empty = tmp_path / "empty_cohort"
    empty.mkdir()
    _write_panel(empty / "marker_panel.csv", list(range(len(MARKERS))))
    assert q.main(["--cohort", str(empty), "--out", str(out), *QARGS]) == 2
    assert str(empty / "he") in caplog.text
    assert register.main(["--cohort", str(empty), "--out", str(out)]) == 2
    assert "Traceback" not in caplog.text


def test_shards_with_other_settings_are_not_pooled(qstage, caplog):
    """Each shard checks only its own slides: the normalisation finds raw means made two ways and stops."""
    from preprocess.normalize import main as normalize_main

    cohort, out = qstage
    args = ["--cohort", str(cohort), "--out", str(out), *QARGS]
    assert q.main([*args, "--shard", "0/2"]) == 0
    assert q.main([*args, "--shard", "1/2", "--nodata-um", "10"]) == 0
    assert normalize_main(["--cohort", str(cohort), "--out", str(out), "--num-markers", "0"]) == 2
    assert "were made with different settings: nodata_um 40.0 -> 10.0 (s1 vs s2)" in caplog.text
    assert not (out / "markers" / "s1.csv").exists() and not (out / "markers" / "normalization.json").exists()


# ----------------------------------------------------------------------------------------------------------------
# stage 03 as one command (python -m preprocess.labels; scripts/03_quantify.sh calls it): two steps, their exit codes


@pytest.fixture
def steps(monkeypatch):
    """The two steps (and the normalisation) replaced by fakes that record their arguments and return ``rc``."""
    from preprocess import labels

    calls: dict[str, list[list[str]]] = {"quantify": [], "store": [], "normalize": []}
    rc = {"quantify": 0, "store": 0, "normalize": 0}

    def fake(name):
        def main(argv):
            calls[name].append(list(argv))
            return rc[name]
        return main

    monkeypatch.setattr(labels.quantify, "main", fake("quantify"))
    monkeypatch.setattr(labels.patch_store, "main", fake("store"))
    monkeypatch.setattr(labels.normalize, "main", fake("normalize"))
    return labels, calls, rc


@pytest.mark.parametrize("q_rc,s_rc,rc,store_runs,last", [
    (0, 0, 0, True, "stage 03: quantify: ok; patch store: ok"),
    (1, 0, 1, True, "stage 03: quantify failed for some slides (exit 1); patch store: ok"),
    (0, 1, 1, True, "stage 03: quantify: ok; patch store failed (exit 1)"),
    (1, 1, 1, True, "stage 03: quantify failed for some slides (exit 1); patch store failed (exit 1)"),
    (2, 0, 2, False, "stage 03: quantify stopped before any slide (exit 2"),
    (130, 0, 130, False, "stage 03: quantify ended with exit 130; patch store not run"),
])
def test_stage_03_runs_the_store_after_a_quantify_failure(steps, tmp_path, capsys, q_rc, s_rc, rc, store_runs, last):
    labels, calls, rcs = steps
    rcs.update(quantify=q_rc, store=s_rc)
    argv = ["--cohort", str(tmp_path / "c"), "--out", str(tmp_path / "o"), "--workers", "2",
            "--quantify-flags=--allow-flagged", "--store-flags=--png", "--", "--overwrite"]
    assert labels.main(argv) == rc
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(last), lines[-1]
    assert ("preprocess.status" in lines[-1]) == (rc == 1)  # a failed step points at the status table
    (quant,) = calls["quantify"]
    assert quant[:6] == ["--cohort", str(tmp_path / "c"), "--out", str(tmp_path / "o"), "--workers", "2"]
    assert "--allow-flagged" in quant and "--png" not in quant and quant[-1] == "--overwrite"
    assert len(calls["store"]) == int(store_runs)
    if store_runs:
        store = calls["store"][0]
        assert "--labelled-only" in store and "--png" in store and "--allow-flagged" not in store
        assert store[-1] == "--overwrite"  # an argument after -- reaches both steps
    assert not calls["normalize"]


@pytest.mark.parametrize("extra", [["--shard", "0/2"], ["--quantify-flags=--no-normalize"],
                                   ["--", "--no-normalize"]])
def test_stage_03_pass_1_only_stores_every_slide(steps, tmp_path, extra):
    """Without the normalisation there are no labels yet (they come with --normalize-only): no --labelled-only."""
    labels, calls, _ = steps
    assert labels.main(["--out", str(tmp_path), *extra]) == 0
    (store,) = calls["store"]
    assert "--labelled-only" not in store and ("--shard" not in extra or store[-2:] == ["--shard", "0/2"])


def test_stage_03_normalize_only(steps, tmp_path):
    labels, calls, rcs = steps
    rcs["normalize"] = 2
    argv = ["--cohort", "c", "--out", "o", "--workers", "2", "--fit-split", "split.csv", "--normalize-only",
            "--quantify-flags=--legacy-columns", "--", "--slides", "a"]
    assert labels.main(argv) == 2  # its exit status, as it is
    (norm,) = calls["normalize"]
    assert norm == ["--cohort", "c", "--out", "o", "--fit-split", "split.csv", "--legacy-columns", "--slides", "a"]
    assert not calls["quantify"] and not calls["store"]


def test_stage_03_script_is_one_call_of_preprocess_labels(tmp_path):
    """scripts/03_quantify.sh holds no logic: its variables become the flags of python -m preprocess.labels."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$ARGS_FILE"\n')
    (fake / "python").chmod(0o755)
    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")} | {
        "PATH": f"{fake}:{os.environ['PATH']}", "VIRTUAL_ENV": str(tmp_path / "none"), "ARGS_FILE": str(tmp_path / "a"),
        "COHORT": "c", "OUT": "o", "EXTRA": "--allow-flagged --legacy-columns", "STORE_EXTRA": "--png",
        "SHARD": "1/3", "FIT_SPLIT": "s.csv", "NORMALIZE_ONLY": ""}
    r = subprocess.run(["bash", str(repo / "scripts" / "03_quantify.sh"), "--overwrite", "--slides", "s 1"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    args = (tmp_path / "a").read_text().splitlines()
    assert args == ["-m", "preprocess.labels", "--cohort", str(tmp_path / "c"), "--out", str(tmp_path / "o"),
                    "--workers", "2", "--shard", "1/3", "--fit-split", str(tmp_path / "s.csv"),
                    "--quantify-flags=--allow-flagged --legacy-columns", "--store-flags=--png", "--", "--overwrite",
                    "--slides", "s 1"]
    from preprocess import labels

    cfg = labels.make_config(labels.build_parser().parse_args(args[2:]))
    quant, store = labels.step_argvs(cfg)
    assert quant[-5:] == ["--allow-flagged", "--legacy-columns", "--overwrite", "--slides", "s 1"]
    assert store[-4:] == ["--png", "--overwrite", "--slides", "s 1"] and "--labelled-only" not in store


def test_stage_03_for_real_labels_then_stores(qstage, tmp_path, capsys):
    """The real steps on the two-slide cohort: labels written; its pairs name H&E files that do not exist, so the
    store stops before any slide, and the last line says so."""
    from preprocess import labels

    cohort, out = qstage
    rc = labels.main(["--cohort", str(cohort), "--out", str(out), "--", *QARGS])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert (out / "markers" / "s1.csv").exists() and (out / "markers" / "s2.csv").exists()
    assert rc == 2 and last.startswith("stage 03: quantify: ok; patch store failed (exit 2)"), last


# ----------------------------------------------------------------------------------------------------------------
# Ctrl-C: one line saying how to resume, exit 130


def _interrupted(*args, **kwargs):
    raise KeyboardInterrupt


def _one_resume_line(rc: int, caplog, capsys) -> None:
    assert rc == 130
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None
    assert "interrupted" in errors[0].getMessage() and "resume" in errors[0].getMessage()
    assert "Traceback" not in capsys.readouterr().err


def test_ctrl_c_in_quantify_ends_with_one_line_saying_how_to_resume(qstage, monkeypatch, caplog, capsys):
    cohort, out = qstage
    monkeypatch.setattr(q, "quantify_slide", _interrupted)
    _one_resume_line(q.main(["--cohort", str(cohort), "--out", str(out), *QARGS]), caplog, capsys)
    assert not (out / "markers" / "done" / "s1.json").exists()  # nothing claims to be done


def test_ctrl_c_in_register_ends_with_one_line_saying_how_to_resume(tmp_path, monkeypatch, caplog, capsys):
    cohort = _linked_cohort(tmp_path)
    monkeypatch.setattr(register, "register_pair", _interrupted)
    _one_resume_line(register.main(["--cohort", str(cohort), "--out", str(tmp_path / "out")]), caplog, capsys)


# ----------------------------------------------------------------------------------------------------------------
# per-slide pixel sizes (--pixel-sizes, default COHORT/pixel_sizes.csv)


def test_pixel_size_table_reaches_registration_per_slide(tmp_path, monkeypatch):
    """Stage 02: a slide's row gives its H&E / CODEX pixel size to its registration and its done-record; the other
    slide keeps --mpp / --codex-mpp (here: none, its metadata)."""
    cohort = _linked_cohort(tmp_path)
    out = tmp_path / "out"
    seen = {}

    def fake(he_path, codex_path, params, qc_png=None, field_npy=None):
        seen[Path(he_path).stem] = (params.he_mpp, params.codex_mpp)
        Path(qc_png).write_bytes(b"png")
        return {"affine_codex_to_he": AFFINES["s1"].tolist(), "displacement": None, "status": "ok", "reason": None,
                "qc": {"ncc_before": 0.1, "ncc_coarse": 0.6, "ncc_affine": 0.8, "ncc_after": 0.9,
                       "n_blocks_used": 10, "n_blocks_measured": 12, "seconds": {"total": 0.0}}}

    monkeypatch.setattr(register, "register_pair", fake)
    (cohort / "pixel_sizes.csv").write_text("slide_id,he_mpp,codex_mpp\nslide_b,0.26,0.4\n")
    assert register.main(["--cohort", str(cohort), "--out", str(out), "--codex-mpp", "0.38"]) == 0
    assert seen == {"slide_a": (None, 0.38), "slide_b": (0.26, 0.4)}
    for s, (he, cx) in seen.items():
        rec = json.loads((out / "registration" / "done" / f"{s}.json").read_text())["settings"]
        assert (rec["he_mpp"], rec["codex_mpp"]) == (he, cx)


def test_pixel_size_table_reaches_quantify_per_slide(qstage, caplog):
    """Stage 03: a slide's codex_mpp from the table is the one its raw means are made with (the no-data square is
    40 µm in its pixels) and the one in its done-record; a changed row stops that slide only."""
    cohort, out = qstage
    args = ["--cohort", str(cohort), "--out", str(out), *QARGS]
    (cohort / "pixel_sizes.csv").write_text("slide_id,he_mpp,codex_mpp\ns2,,0.5\n")
    assert q.main(args) == 0
    meta = {s: json.loads((out / "markers" / "raw" / f"{s}.json").read_text()) for s in ("s1", "s2")}
    assert meta["s1"]["nodata_px"] == round(40 / CODEX_MPP) and meta["s2"]["nodata_px"] == 80
    rec = {s: json.loads((out / "markers" / "done" / f"{s}.json").read_text())["settings"] for s in ("s1", "s2")}
    assert rec["s1"]["codex_mpp"] is None and rec["s2"]["codex_mpp"] == 0.5
    (cohort / "pixel_sizes.csv").write_text("slide_id,he_mpp,codex_mpp\ns2,,0.45\n")
    caplog.clear()
    assert q.main(args) == 2
    assert "1 slides are done with other settings: codex_mpp 0.5 -> 0.45 (s2)" in caplog.text
    (cohort / "pixel_sizes.csv").write_text("slide_id,codex_mpp\ns2,big\n")
    assert q.main(args) == 2
    assert f"pixel-size table {cohort / 'pixel_sizes.csv'}, row 2 (s2): codex_mpp 'big'" in caplog.text
