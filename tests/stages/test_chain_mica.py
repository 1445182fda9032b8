"""Stages 07-09 (mica.extract_features, mica.train, mica.test) as users meet them (issue 11): slide identity from
the cohort resolver (links keep their names, pairs.csv wins), done-records keyed on settings and inputs (other
settings stop before any work, --overwrite redoes), failing before work, one last line, and no traceback for the
usual mistakes."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from hex import backbones as bb
from mica import extract_features as ef
from mica import test as mtest
from mica import train as mt
from mica.features import codex_features as cr
from mica.features.he_bags import feature_paths, read_feature_bag, write_feature_bag
from preprocess import patch
from sample_data.writers import write_aperio_tiff
from tests.fixtures import blob_slide, write_maps, write_synthetic_bags

pytestmark = pytest.mark.slow  # a chain / end-to-end module: scripts/test.sh runs it, -m "not slow" skips it

TRAIN_FAST = ["--encoder", "synth", "--codex-encoder", "synth_codex", "--mode", "path", "--model-dim", "16",
              "--epochs", "1", "--grad-accum", "4", "--lr", "2e-3", "--workers", "0", "--seed", "1"]


def _mtimes(paths: list[Path]) -> list[int]:
    return [p.stat().st_mtime_ns for p in paths]


def _last_line(caplog: pytest.LogCaptureFixture) -> str:
    return caplog.records[-1].getMessage()


@pytest.fixture(scope="module")
def he_cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """he/a.tif and he/linked.tif, a link to ../elsewhere/target_name.tif (another name); stage-01 grids; the
    weights of a random ``tiny`` backbone."""
    d = tmp_path_factory.mktemp("chain_mica")
    (d / "he").mkdir()
    (d / "elsewhere").mkdir()
    write_aperio_tiff(d / "he" / "a.tif", blob_slide(900, 800, 0), mpp=0.5, downsamples=(4,))
    write_aperio_tiff(d / "elsewhere" / "target_name.tif", blob_slide(800, 700, 1), mpp=0.5, downsamples=(4,))
    os.symlink(Path("..") / "elsewhere" / "target_name.tif", d / "he" / "linked.tif")
    out = d / "out"
    assert patch.main(["--cohort", str(d), "--out", str(out)]) == 0
    torch.manual_seed(1)
    w = bb.save_backbone(bb.create("tiny"), d / "tiny.safetensors")
    return d, out, w


def _he_args(d: Path, out: Path, w: Path, *extra: str, grids: Path | None = None) -> list[str]:
    """Flags of an H&E run on cohort ``d`` (grids: the fixture's ``d/out/patches`` unless given)."""
    return ["--cohort", str(d), "--out", str(out), "--patches", str(grids or d / "out" / "patches"), "--what", "he",
            "--encoder", "tiny", "--weights", str(w), "--workers", "0", "--batch-size", "8", *extra]


# ----------------------------------------------------------------------------------------------------------------
# stage 07: slide identity


def test_link_slide_features_are_named_after_the_link(he_cohort, tmp_path) -> None:
    d, out, w = he_cohort
    assert (out / "patches" / "linked.h5").is_file() and not (out / "patches" / "target_name.h5").exists()
    assert ef.main(_he_args(d, tmp_path, w)) == 0
    h5, pt = feature_paths(tmp_path, "tiny", "linked")
    assert h5.is_file() and pt.is_file()
    assert not feature_paths(tmp_path, "tiny", "target_name")[0].exists()
    _, coords, attrs = read_feature_bag(h5)
    assert attrs["slide_id"] == "linked" and attrs["he_path"].endswith("he/linked.tif") and len(coords) > 0
    rec = json.loads((tmp_path / "features/tiny/done/linked.json").read_text())
    assert rec["inputs"]["he"]["path"].endswith("he/linked.tif")


def test_pairs_csv_decides_the_slides(he_cohort, tmp_path) -> None:
    d, _, w = he_cohort
    c = tmp_path / "cohort"
    (c / "he").mkdir(parents=True)
    os.symlink(d / "he" / "a.tif", c / "he" / "a.tif")
    os.symlink(d / "he" / "linked.tif", c / "he" / "linked.tif")
    (c / "pairs.csv").write_text("he_slide,codex_image\nhe/a.tif,\n")       # linked.tif is not listed
    assert ef.main(_he_args(c, tmp_path / "o", w, grids=d / "out" / "patches")) == 0
    assert feature_paths(tmp_path / "o", "tiny", "a")[0].is_file()
    assert not feature_paths(tmp_path / "o", "tiny", "linked")[0].exists()
    assert json.loads((tmp_path / "o/features/tiny/config.json").read_text())["slides_resolved"] == ["a"]


def test_test_thumbnails_use_the_cohort_resolver(he_cohort, tmp_path) -> None:
    """mica.test finds a heatmap's H&E file as every stage names it: the link's name, pairs.csv when present."""
    d, _, _ = he_cohort
    inputs = object.__new__(mtest.RunInputs)
    inputs.cohort, inputs._he = d, None
    assert inputs.he_path("linked") == d / "he" / "linked.tif" and inputs.he_path("target_name") is None
    c = tmp_path / "cohort"
    c.mkdir()
    (c / "pairs.csv").write_text(f"he_slide,codex_image\n{d / 'he' / 'linked.tif'},\n")
    inputs.cohort, inputs._he = c, None
    assert inputs.he_path("linked") == d / "he" / "linked.tif" and inputs.he_path("a") is None


# ----------------------------------------------------------------------------------------------------------------
# stage 07: done means "with these inputs and settings"


def test_he_rerun_with_other_settings_stops_and_overwrite_redoes(he_cohort, tmp_path, caplog) -> None:
    d, _, w = he_cohort
    args = _he_args(d, tmp_path, w)
    assert ef.main(args) == 0
    files = [p for s in ("a", "linked") for p in feature_paths(tmp_path, "tiny", s)]
    cfg = tmp_path / "features/tiny/config.json"
    before = _mtimes(files)
    assert ef.main(args) == 0 and _mtimes(files) == before                    # same settings: skipped
    assert _last_line(caplog).startswith("H&E features (tiny): 0 done, 2 skipped (already done), 0 failed")
    cfg_before = cfg.read_bytes()
    caplog.clear()
    assert ef.main([*args, "--interpolation", "bilinear"]) == 2
    msg = _last_line(caplog)
    assert "done with other settings: interpolation \"bicubic\" -> \"bilinear\"" in msg and "--overwrite" in msg
    assert "\n" not in msg and "Traceback" not in caplog.text
    assert _mtimes(files) == before and cfg.read_bytes() == cfg_before        # nothing rewritten, config kept
    assert ef.main([*args, "--interpolation", "bilinear", "--overwrite"]) == 0
    assert all(a != b for a, b in zip(_mtimes(files), before))
    assert json.loads(cfg.read_text())["settings"]["interpolation"] == "bilinear"
    rec = json.loads((tmp_path / "features/tiny/done/a.json").read_text())
    assert rec["settings"]["interpolation"] == "bilinear" and rec["settings"]["weights_sha256"]
    assert read_feature_bag(files[0])[2]["interpolation"] == "bilinear"


def test_slides_outside_the_run_with_other_settings_stop_it(he_cohort, tmp_path, caplog) -> None:
    d, _, w = he_cohort
    assert ef.main(_he_args(d, tmp_path, w, "--slides", "a")) == 0
    assert ef.main(_he_args(d, tmp_path, w, "--slides", "linked", "--region-px", "1024")) == 2
    assert "slides outside this run (a) are done with other settings: region_px 2048 -> 1024" in _last_line(caplog)
    assert not feature_paths(tmp_path, "tiny", "linked")[0].exists()


def test_changed_grid_redoes_the_slide(he_cohort, tmp_path, caplog) -> None:
    d, out, w = he_cohort
    grids = tmp_path / "patches"
    grids.mkdir()
    for s in ("a", "linked"):
        (grids / f"{s}.h5").write_bytes((out / "patches" / f"{s}.h5").read_bytes())
    args = _he_args(d, tmp_path, w, grids=grids)
    assert ef.main(args) == 0
    files = [p for s in ("a", "linked") for p in feature_paths(tmp_path, "tiny", s)]
    before = _mtimes(files)
    with h5py.File(grids / "a.h5", "a") as f:                                 # stage 01 redone for slide a
        coords = f["coords"][:1]
        del f["coords"]
        f["coords"] = coords
    assert ef.main(args) == 0
    assert "input changed since it was done" in caplog.text
    after = _mtimes(files)
    assert after[:2] != before[:2] and after[2:] == before[2:]
    assert len(read_feature_bag(files[0])[1]) == 1


def test_codex_other_settings_stop_changed_map_redoes(tmp_path, caplog) -> None:
    write_maps(tmp_path, {"s1": (12, 15), "s2": (9, 9)})
    args = ["--out", str(tmp_path), "--what", "codex", "--codex-encoder", "stats", "--workers", "1"]
    assert ef.main(args) == 0
    parts = [cr.part_path(tmp_path, "stats", s) for s in ("s1", "s2")]
    combined = cr.combined_path(tmp_path, "stats")
    before, comb = _mtimes(parts), combined.stat().st_mtime_ns
    assert ef.main([*args, "--high", "0.3"]) == 2
    assert "done with other settings: high 0.5 -> 0.3" in _last_line(caplog)
    assert _mtimes(parts) == before and combined.stat().st_mtime_ns == comb
    np.save(tmp_path / "virtual_codex/s2.npy", np.zeros((9, 9, 40), np.float16))  # stage 06 redone for s2
    caplog.clear()
    assert ef.main(args) == 0
    assert _mtimes(parts)[0] == before[0] and _mtimes(parts)[1] != before[1]
    assert "CODEX features (stats): 1 done, 1 skipped (already done), 0 failed" in _last_line(caplog)
    with h5py.File(combined) as f:
        assert not f["s2"][:].any() and sorted(f) == ["s1", "s2"]
    assert ef.main([*args, "--high", "0.3", "--overwrite"]) == 0
    assert all(a != b for a, b in zip(_mtimes(parts), before))


# ----------------------------------------------------------------------------------------------------------------
# stage 08 / 09


@pytest.fixture()
def bags(tmp_path: Path) -> Path:
    write_synthetic_bags(tmp_path, n_patients=12, n_folds=2, seed=0, two_slide_every=4)
    return tmp_path


def _train(root: Path, *extra: str) -> list[str]:
    return ["--cohort", str(root), "--out", str(root), "--run-name", "r", *TRAIN_FAST, *extra]


def test_train_overwrite_retrains_and_last_line(bags: Path, caplog) -> None:
    assert mt.main(_train(bags, "--folds", "0")) == 0
    line = _last_line(caplog)
    assert line.startswith("mica.train r: folds 1 trained (0), 0 resumed, 0 skipped (already done); val c_index ")
    assert " ± " in line
    ck = bags / "mica_runs/r/fold_0/checkpoint.safetensors"
    before = ck.stat().st_mtime_ns
    assert mt.main(_train(bags, "--folds", "0")) == 0 and ck.stat().st_mtime_ns == before
    assert "0 trained, 0 resumed, 1 skipped (already done) (0)" in _last_line(caplog)
    assert mt.main(_train(bags, "--folds", "0", "--overwrite")) == 0
    assert ck.stat().st_mtime_ns != before
    assert "1 trained (0)" in _last_line(caplog)


def test_train_checks_every_fold_before_the_first(bags: Path, caplog) -> None:
    assert mt.main(_train(bags, "--folds", "0", "1", "4")) == 2
    assert "split files not found:" in _last_line(caplog) and "splits_4.csv" in _last_line(caplog)
    val1 = str(pd.read_csv(bags / "splits/splits_1.csv")["val"].dropna().iloc[0])
    (bags / "features/synth/pt_files" / f"{val1}.pt").unlink()
    (bags / "features/synth/h5_files" / f"{val1}.h5").unlink()
    assert mt.main(_train(bags, "--folds", "0", "1")) == 2
    assert f"slides ['{val1}']" in _last_line(caplog) and "no H&E features" in _last_line(caplog)
    assert not (bags / "mica_runs/r/fold_0").exists()                        # fold 0 was not trained first


def test_split_ids_must_be_cohort_slides(bags: Path, caplog) -> None:
    """A cohort with he/ (or pairs.csv): the splits name its slides, as every stage resolves them."""
    clin = pd.read_csv(bags / "clinical.csv")
    (bags / "he").mkdir()
    missing = str(clin["slide_id"].iloc[0])
    for s in clin["slide_id"].iloc[1:]:
        (bags / "he" / f"{s}.svs").write_bytes(b"")
    assert mt.main(_train(bags, "--folds", "0")) == 2
    assert f"names 1 slides that {bags / 'he'} does not hold: {missing}" in _last_line(caplog)


def test_test_ig_done_records_settings_and_overwrite(bags: Path, caplog) -> None:
    assert mt.main(_train(bags, "--folds", "0")) == 0
    args = ["--out", str(bags), "--run-name", "r", "--workers", "0", "--ig", "--ig-steps", "8", "--ig-limit", "2"]
    assert mtest.main(args) == 0
    line = _last_line(caplog)
    assert line.startswith("mica.test r: 1 folds scored (c_index ") and "IG slides: " in line
    ig = sorted((bags / "mica_runs/r/ig").glob("*.h5"))
    n = len(ig)
    assert n >= 2 and f"IG slides: {n} done, 0 skipped (already done), 0 failed" in line
    before = _mtimes(ig)
    assert mtest.main(args) == 0 and _mtimes(ig) == before
    assert f"IG slides: 0 done, {n} skipped (already done), 0 failed" in _last_line(caplog)
    assert mtest.main([*args, "--ig-steps", "10"]) == 2
    assert "IG: " in _last_line(caplog) and "steps 8 -> 10" in _last_line(caplog) and _mtimes(ig) == before
    assert mtest.main([*args, "--ig-steps", "10", "--overwrite"]) == 0
    assert all(a != b for a, b in zip(_mtimes(ig), before))
    assert mtest.main([*args, "--ig-steps", "10", "--folds", "0", "1"]) == 2      # fold 1 not trained: before work
    assert "fold_1/checkpoint.json does not exist" in _last_line(caplog)


# ----------------------------------------------------------------------------------------------------------------
# no traceback for the usual mistakes (exit 2, one line naming the path or flag)


def _call(main, argv: list[str], capsys, caplog) -> tuple[int, str]:
    caplog.clear()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse: a value outside the choices
        code = e.code
    cap = capsys.readouterr()
    text = cap.out + cap.err + caplog.text
    assert "Traceback" not in text, text
    return code, text


def _regular_file(tmp_path: Path) -> Path:
    f = tmp_path / "a_file"
    f.write_text("x")
    return f


def test_extract_features_user_errors(he_cohort, tmp_path, capsys, caplog) -> None:
    d, _, w = he_cohort
    code, text = _call(ef.main, _he_args(tmp_path / "nowhere", tmp_path / "o", w), capsys, caplog)
    assert code == 2 and f"H&E slide or folder not found: {tmp_path / 'nowhere' / 'he'}" in text
    out = _regular_file(tmp_path) / "out"
    code, text = _call(ef.main, _he_args(d, out, w), capsys, caplog)
    assert code == 2 and f"cannot create the output folder {out / 'features' / 'tiny'}" in text
    code, text = _call(ef.main, _he_args(d, tmp_path / "o", w, "--batch-size", "0"), capsys, caplog)
    assert code == 2 and "--batch-size 0: must be positive" in text
    code, text = _call(ef.main, _he_args(d, tmp_path / "o", w, "--what", "nope"), capsys, caplog)
    assert code == 2 and "invalid choice: 'nope'" in text
    assert not (tmp_path / "o" / "features" / "tiny" / "h5_files").exists()


def test_train_user_errors(bags: Path, tmp_path, capsys, caplog) -> None:
    code, text = _call(mt.main, ["--cohort", str(tmp_path / "nowhere"), "--out", str(tmp_path), *TRAIN_FAST],
                       capsys, caplog)
    assert code == 2 and f"cohort folder {tmp_path / 'nowhere'} does not exist" in text
    out = _regular_file(tmp_path) / "out"
    code, text = _call(mt.main, ["--cohort", str(bags), "--out", str(out), *TRAIN_FAST], capsys, caplog)
    assert code == 2 and f"cannot create the run folder {out / 'mica_runs' / 'mica_run'}" in text
    code, text = _call(mt.main, _train(bags, "--lr", "-1"), capsys, caplog)
    assert code == 2 and "--lr -1.0: must be > 0" in text
    code, text = _call(mt.main, _train(bags, "--mode", "nope"), capsys, caplog)
    assert code == 2 and "invalid choice: 'nope'" in text
    assert not (bags / "mica_runs" / "r").exists()


def test_test_user_errors(tmp_path, capsys, caplog) -> None:
    code, text = _call(mtest.main, ["--out", str(tmp_path), "--run-name", "none"], capsys, caplog)
    assert code == 2 and f"{tmp_path / 'mica_runs' / 'none' / 'config.json'} does not exist" in text
    run = tmp_path / "mica_runs" / "r"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"folds": [0]}))
    (run / "test").write_text("in the way")                                  # the output folder is a file
    code, text = _call(mtest.main, ["--out", str(tmp_path), "--run-name", "r"], capsys, caplog)
    assert code == 2 and f"cannot create the output folder {run / 'test'}" in text
    code, text = _call(mtest.main, ["--out", str(tmp_path), "--run-name", "r", "--ig-steps", "0"], capsys, caplog)
    assert code == 2 and "--ig-steps 0: must be >= 1" in text
    code, text = _call(mtest.main, ["--out", str(tmp_path), "--run-name", "r", "--ig-baseline", "nope"], capsys,
                       caplog)
    assert code == 2 and "invalid choice: 'nope'" in text


# ----------------------------------------------------------------------------------------------------------------
# issue 16: inputs each stage used to track its own way


def test_missing_virtual_codex_fails_that_slide_and_stage_08_names_stage_06(he_cohort, tmp_path, caplog) -> None:
    """One slide's virtual CODEX missing: stage 07 fails that slide naming the file and stage 06 (its last line counts
    each slide once, both modalities beside); stage 08 says which stage makes the missing input."""
    d, _, w = he_cohort
    write_maps(tmp_path, {"a": (12, 15)})                                 # stage 06 made no map for "linked"
    args = [*_he_args(d, tmp_path, w), "--what", "both", "--codex-encoder", "stats"]
    missing = tmp_path / "virtual_codex" / "linked.npy"
    assert ef.main(args) == 1
    line = _last_line(caplog)
    assert line.startswith("features: 1 slides done, 0 skipped (already done), 1 failed (H&E bags 2 done, 0 skipped, "
                           "0 failed; CODEX 1 done, 0 skipped, 1 failed): linked (CODEX: virtual CODEX map ")
    assert f"{missing} not found; run stage 06" in line and "\n" not in line
    (tmp_path / "clinical.csv").write_text("case_id,slide_id,survival_months,censorship\np1,a,10,0\np2,linked,20,0\n")
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "splits_0.csv").write_text("train,val\na,linked\n")
    caplog.clear()
    assert mt.main(["--clinical", str(tmp_path / "clinical.csv"), "--splits-dir", str(tmp_path / "splits"),
                    "--out", str(tmp_path), "--mode", "codex", "--codex-encoder", "stats", "--folds", "0",
                    "--workers", "0"]) == 2
    line = _last_line(caplog)
    assert "slides ['linked'] (1 of 2) of the split have no CODEX features" in line
    assert f"their virtual CODEX maps are missing too ({missing}, 1 slides): run stage 06" in line
    write_maps(tmp_path, {"linked": (9, 9)}, seed=1)                      # stage 06 run for it: stage 07 does it alone
    caplog.clear()
    assert ef.main(args) == 0
    assert _last_line(caplog) == ("features: 1 slides done, 1 skipped (already done), 0 failed (H&E bags 0 done, "
                                  "2 skipped, 0 failed; CODEX 1 done, 1 skipped, 0 failed)")


def test_rebuilt_bags_retrain_the_fold_and_the_old_model_is_not_scored(bags: Path, caplog) -> None:
    """Feature bags rebuilt after a MICA run (stage 07 --overwrite with other weights): stage 09 refuses to score the
    old model on them (one line naming the fold, the slide and the fix); stage 08 retrains the fold."""
    assert mt.main(_train(bags, "--folds", "0")) == 0
    ck = bags / "mica_runs/r/fold_0/checkpoint.safetensors"
    before = ck.stat().st_mtime_ns
    assert mt.main(_train(bags, "--folds", "0")) == 0 and ck.stat().st_mtime_ns == before    # same bags: done
    slide = str(pd.read_csv(bags / "splits/splits_0.csv")["train"].dropna().iloc[0])
    h5, pt = feature_paths(bags, "synth", slide)
    feats, coords, attrs = read_feature_bag(h5)
    write_feature_bag(h5, pt, feats + 1, coords, attrs)                   # new bags, same encoder name
    test_args = ["--out", str(bags), "--run-name", "r", "--workers", "0"]
    caplog.clear()
    assert mtest.main(test_args) == 2
    line = _last_line(caplog)
    assert line.startswith("fold 0 (") and "was trained on other inputs than it would be scored on" in line
    assert f"H&E bags of 1 slides changed since ({slide})" in line and "--folds 0" in line and "\n" not in line
    assert not (bags / "mica_runs/r/fold_0/test_predictions.csv").exists()
    caplog.clear()
    assert mt.main(_train(bags, "--folds", "0")) == 0
    assert f"fold 0: its inputs changed since it was trained: H&E bags of 1 slides changed since ({slide}); " \
           "retraining it" in caplog.text
    assert "folds 1 trained (0)" in _last_line(caplog) and ck.stat().st_mtime_ns != before
    assert mtest.main(test_args) == 0


def test_bags_of_two_encoders_in_one_folder_stop_stage_08(bags: Path, caplog) -> None:
    """Each bag records its encoder: bags of two encoders in one folder ("hex:synth" and "hex_synth" share it) stop
    stage 08 with one line naming both."""
    other = str(pd.read_csv(bags / "clinical.csv")["slide_id"].iloc[0])
    with h5py.File(feature_paths(bags, "synth", other)[0], "a") as f:
        f.attrs["encoder"] = "hex:synth"
    assert mt.main(_train(bags, "--folds", "0")) == 2
    line = _last_line(caplog)
    assert "were made by 2 encoders: " in line and "'hex:synth' (" + other in line and "'synth' (" in line
    assert "\n" not in line and not (bags / "mica_runs/r/fold_0").exists()


def test_fold_event_counts_are_logged_and_a_val_side_without_events_warned(bags: Path, caplog) -> None:
    """Per fold, stage 08 logs the patients and events (response: positives) of each side and warns when the
    validation side has no event (an inverted censorship column looks like this)."""
    clin = pd.read_csv(bags / "clinical.csv")
    val = set(pd.read_csv(bags / "splits/splits_0.csv")["val"].dropna())
    clin.loc[clin["slide_id"].isin(val), "censorship"] = 1
    clin.to_csv(bags / "clinical.csv", index=False)
    n_val = clin.loc[clin["slide_id"].isin(val), "case_id"].nunique()
    assert mt.main(_train(bags, "--folds", "0")) == 0
    assert re.search(rf"train \d+ patients \(\d+ events\), val {n_val} patients \(0 events\)", caplog.text)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("no event in 'val'" in m and "censorship" in m for m in warned), warned
    caplog.clear()
    assert mt.main(_train(bags, "--folds", "0", "--task", "response", "--run-name", "resp")) == 0
    assert re.search(rf"fold 0: train \d+ patients \(\d+ positive\), val {n_val} patients \(\d+ positive\)",
                     caplog.text)


def test_rebuilt_bags_make_the_runs_attributions_stale_in_status(bags: Path, caplog) -> None:
    """After stage 07 --overwrite, ``preprocess.status`` no longer calls the IG of the slides with new bags done."""
    from preprocess.status import slide_status

    assert mt.main(_train(bags, "--folds", "0")) == 0
    assert mtest.main(["--out", str(bags), "--run-name", "r", "--workers", "0", "--ig", "--ig-steps", "4",
                       "--ig-limit", "1"]) == 0
    slide = sorted(p.stem for p in (bags / "mica_runs/r/ig").glob("*.h5"))[0]
    assert slide_status(bags, [slide])[slide]["ig/r"].state == "done"
    h5, pt = feature_paths(bags, "synth", slide)
    feats, coords, attrs = read_feature_bag(h5)
    write_feature_bag(h5, pt, feats + 1, coords, attrs)
    state = slide_status(bags, [slide])[slide]["ig/r"]
    assert state.state == "stale" and "bag" in state.reason


def test_a_stage_07_rerun_that_redoes_nothing_leaves_the_attributions_done(bags: Path, caplog) -> None:
    """The IG record stamps the slide's own CODEX part, not the gathered table every stage-07 run rewrites."""
    from preprocess.status import slide_status

    clin = pd.read_csv(bags / "clinical.csv")
    parts = bags / "codex_features" / "synth_codex"
    parts.mkdir(parents=True, exist_ok=True)
    for s in clin["slide_id"]:
        (parts / f"{s}.h5").write_bytes(b"part")  # only stamped here
    assert mt.main(_train(bags, "--folds", "0", "--mode", "coattn")) == 0
    assert mtest.main(["--out", str(bags), "--run-name", "r", "--workers", "0", "--ig", "--ig-steps", "4",
                       "--ig-limit", "1"]) == 0
    slide = sorted(p.stem for p in (bags / "mica_runs/r/ig").glob("*.h5"))[0]
    table = bags / "codex_features" / "synth_codex.h5"
    os.utime(table, ns=(1, 1))                                  # gathered again, nothing redone
    assert slide_status(bags, [slide])[slide]["ig/r"].state == "done"
    (parts / f"{slide}.h5").write_bytes(b"redone part")         # stage 07 redid this slide
    assert slide_status(bags, [slide])[slide]["ig/r"].state == "stale"
