"""The HEX stages (04 hex.train, 05 hex.test, 06 hex.infer_wsi + hex.virtual_codex) as users meet them (issue 11).

Each test reproduces a mistake of the issue and checks that it now stops with one line (or gives the right result):
another fold's split on resume; scoring the run's training slides (``FOLD=1`` with fold 0's run); ``--overwrite``
starting a run afresh; an unwritable run folder stopping before the first epoch; ``best.safetensors`` and epoch
checkpoints in the usual file mode; a rerun with other settings (stride, checkpoint, preview markers) stopping with
"done with other settings"; split ids without labels; slide ids of linked files; and, for every stage, a missing
input, an unwritable output and a bad flag value giving exit 2 and one line, never a traceback. Tiny models, CPU.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from bench.synthetic_hex_data import write_synthetic_dataset
from hex.evaluate import stage as hex_test
from hex.infer import maps as virtual_codex
from hex.infer import stage as infer_wsi
from hex.model import HEX
from hex.train import stage as hex_train
from hex.trained_model import original_markers
from pipeline.errors import PipelineError
from sample_data.writers import write_aperio_tiff
from tests.fixtures import blob_slide, save_run, write_pred

pytestmark = pytest.mark.slow  # a chain / end-to-end module: scripts/test.sh runs it, -m "not slow" skips it

FAST = ["--backbone", "tiny", "--input-size", "32", "--batch-size", "8", "--workers", "0", "--no-fds",
        "--epochs", "1"]
PS = 112  # infer_wsi tile size (56 µm): a few dozen tiles per small slide


def _train_argv(root: Path, out: Path, run: str, *extra: str, split: Path | None = None) -> list[str]:
    return ["--data", str(root), "--split", str(split or root / "splits" / "splits_0.csv"), "--clinical",
            str(root / "clinical.csv"), "--out", str(out), "--run-name", run, *FAST, *extra]


def _one_error(caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture) -> str:
    """The single ERROR line of a stage that stopped, after checking that nothing printed a traceback."""
    text = capfd.readouterr().err + caplog.text
    assert "Traceback" not in text, text[-3000:]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    return errors[0]


def _mode() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 slides x 8 patches of 32 px, 8 markers; splits_0: train slide_000-001, val slide_002-003."""
    root = tmp_path_factory.mktemp("chain_data")
    write_synthetic_dataset(root, n_slides=4, n_per_slide=8, num_markers=8, n_visible=4, size=32, seed=3)
    return root


@pytest.fixture(scope="module")
def trained(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUT with run ``fold0``: 1 epoch on splits_0 (read only in the tests)."""
    out = tmp_path_factory.mktemp("chain_trained")
    assert hex_train.main(_train_argv(data, out, "fold0", "--save-every", "1")) == 0
    return out


@pytest.fixture(scope="module")
def wsi(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A cohort with one slide ``a`` (he/a.tif, 0.5 µm/px) and a random tiny HEX; returns (COHORT, checkpoint)."""
    d = tmp_path_factory.mktemp("chain_wsi")
    (d / "he").mkdir()
    write_aperio_tiff(d / "he" / "a.tif", blob_slide(600, 500, 0), mpp=0.5, downsamples=(4,))
    torch.manual_seed(0)
    ck = save_run(d / "models", "tiny", HEX("tiny", num_markers=40, input_size=32, unfreeze_last=-1),
                  original_markers())
    return d, ck


# ------------------------------------------------------------------------------------------------- 04 hex.train
def test_resume_with_another_fold_split_stops_naming_both_files(data: Path, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture,
                                                                capfd: pytest.CaptureFixture) -> None:
    split0 = data / "splits" / "splits_0.csv"
    assert hex_train.main(_train_argv(data, tmp_path, "hex", "--resume", "auto")) == 0
    fold1 = tmp_path / "splits_1.csv"  # FOLD=1 with the run of fold 0 (same content: only the file differs)
    shutil.copy(split0, fold1)
    caplog.clear()
    capfd.readouterr()
    assert hex_train.main(_train_argv(data, tmp_path, "hex", "--resume", "auto", "--epochs", "2", split=fold1)) == 2
    msg = _one_error(caplog, capfd)
    assert str(split0.resolve()) in msg and str(fold1.resolve()) in msg and "use a new --run-name" in msg, msg
    assert not (tmp_path / "runs" / "hex" / "checkpoints" / "epoch_2.pt").exists()


def test_train_overwrite_starts_the_run_afresh(data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                               capfd: pytest.CaptureFixture) -> None:
    run = tmp_path / "runs" / "o"
    assert hex_train.main(_train_argv(data, tmp_path, "o", "--save-every", "1")) == 0
    ep1 = run / "checkpoints" / "epoch_1.pt"
    # a fresh run in the folder of another would write over it: stops, naming the way out
    caplog.clear()
    capfd.readouterr()
    assert hex_train.main(_train_argv(data, tmp_path, "o")) == 2
    msg = _one_error(caplog, capfd)
    assert f"{run} already holds a run" in msg and "pass --resume auto to continue it, or --overwrite" in msg, msg
    caplog.clear()
    assert hex_train.main(_train_argv(data, tmp_path, "o", "--overwrite", "--resume", str(ep1))) == 2
    assert "--overwrite starts the run afresh" in _one_error(caplog, capfd)
    # what an afresh run must not keep: a later checkpoint (--resume auto would continue from it), old events
    shutil.copy(ep1, run / "checkpoints" / "epoch_7.pt")
    (run / "tb" / "events.out.tfevents.0.old").write_text("old")
    (run / "config_resume_epoch7.json").write_text("{}")
    before = torch.load(ep1, weights_only=True)["model"]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert hex_train.main(_train_argv(data, tmp_path, "o", "--overwrite", "--resume", "auto", "--seed", "5")) == 0
    assert not (run / "checkpoints" / "epoch_7.pt").exists() and not (run / "tb" / "events.out.tfevents.0.old").exists()
    assert not (run / "config_resume_epoch7.json").exists()
    assert json.loads((run / "config.json").read_text())["resumed_from"] is None
    after = torch.load(ep1, weights_only=True)["model"]
    assert any(not torch.equal(before[k], after[k]) for k in before)  # retrained from scratch (another seed)
    last = [r.getMessage() for r in caplog.records if r.name == "hex.train"][-1]
    assert last.startswith("hex.train: 1 epochs run (1-1 of 1), best val mean Pearson r") and \
        f"at epoch 1 -> {run / 'best.safetensors'}; last checkpoint {ep1}" in last, last


def test_run_interrupted_before_its_first_checkpoint(data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                     capfd: pytest.CaptureFixture) -> None:
    """--resume auto without a checkpoint: the same run starts afresh (its leftovers replaced); another fold's split
    stops instead of writing over fold 0's best model."""
    run = tmp_path / "runs" / "hex"
    assert hex_train.main(_train_argv(data, tmp_path, "hex", "--resume", "auto")) == 0
    (run / "checkpoints" / "epoch_1.pt").unlink()  # as if killed before its first --save-every epoch
    fold1 = tmp_path / "splits_1.csv"
    shutil.copy(data / "splits" / "splits_0.csv", fold1)
    best = (run / "best.safetensors").stat().st_mtime_ns
    caplog.clear()
    capfd.readouterr()
    assert hex_train.main(_train_argv(data, tmp_path, "hex", "--resume", "auto", split=fold1)) == 2
    msg = _one_error(caplog, capfd)
    assert f"{run} already holds a run trained with other settings (split)" in msg and "--overwrite" in msg, msg
    assert (run / "best.safetensors").stat().st_mtime_ns == best
    assert hex_train.main(_train_argv(data, tmp_path, "hex", "--resume", "auto")) == 0  # the same run: afresh
    assert "no checkpoint to resume (interrupted" in caplog.text and (run / "checkpoints" / "epoch_1.pt").is_file()


@pytest.mark.parametrize("where", ["out_under_a_file", "checkpoints_is_a_file"])
def test_unwritable_run_folder_stops_before_the_first_epoch(data: Path, tmp_path: Path, where: str,
                                                            caplog: pytest.LogCaptureFixture,
                                                            capfd: pytest.CaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def no_epoch(*a: object, **k: object) -> None:
        raise AssertionError("an epoch started although the run folder is not writable")

    monkeypatch.setattr(hex_train, "train_one_epoch", no_epoch)
    if where == "out_under_a_file":
        (tmp_path / "a_file").write_text("not a folder")
        out, bad = tmp_path / "a_file" / "out", tmp_path / "a_file" / "out" / "runs" / "r"
    else:
        out, bad = tmp_path / "out", tmp_path / "out" / "runs" / "r" / "checkpoints"
        bad.parent.mkdir(parents=True)
        bad.write_text("a file where the checkpoint folder goes")
    assert hex_train.main(_train_argv(data, out, "r")) == 2
    msg = _one_error(caplog, capfd)
    assert str(bad) in msg and "run folder" in msg, msg


def test_best_and_epoch_checkpoints_get_the_usual_mode(trained: Path) -> None:
    run = trained / "runs" / "fold0"
    for p in (run / "best.safetensors", run / "best.json", run / "checkpoints" / "epoch_1.pt"):
        assert stat.S_IMODE(p.stat().st_mode) == _mode(), (p, oct(p.stat().st_mode))


def test_split_ids_without_labels_are_listed_in_one_line(data: Path, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture,
                                                         capfd: pytest.CaptureFixture) -> None:
    bad = tmp_path / "split.csv"
    pd.DataFrame({"train": ["slide_000", "slide-001", "slide_999"], "val": ["slide_002", None, None]}).to_csv(
        bad, index=False)
    assert hex_train.main(_train_argv(data, tmp_path, "s", "--allow-unknown-slides", split=bad)) == 2
    msg = _one_error(caplog, capfd)
    assert str(bad) in msg and "2 have no label table" in msg and "slide-001, slide_999" in msg, msg


# -------------------------------------------------------------------------------------------------- 05 hex.test
def test_hex_test_refuses_the_runs_training_slides(data: Path, trained: Path, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture,
                                                   capfd: pytest.CaptureFixture) -> None:
    """FOLD=1 with fold 0's run: fold 1's validation slides were fold 0's training slides."""
    fold1 = tmp_path / "splits_1.csv"
    pd.DataFrame({"train": ["slide_002", "slide_003"], "val": ["slide_000", "slide_002"]}).to_csv(fold1, index=False)
    base = ["--out", str(trained), "--run-name", "fold0", "--data", str(data), "--workers", "0", "--no-plots",
            "--test-dir", str(tmp_path / "t"), "--split", str(fold1)]
    assert hex_test.main(base) == 2
    msg = _one_error(caplog, capfd)
    split0 = (data / "splits" / "splits_0.csv").resolve()
    assert "1 of the 2 slides to score were in the model's training split" in msg and f"{split0} (slide_000;" in msg
    assert "--allow-train-slides" in msg and not (tmp_path / "t" / "summary.json").exists()
    assert hex_test.main([*base, "--allow-train-slides"]) == 0
    s = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert (s["split"], s["split_column"], s["slides"]) == (str(fold1), "val", ["slide_000", "slide_002"])
    assert s["train_slides_scored"] == ["slide_000"] and s["trained_split"] == str(split0)
    assert s["checkpoint"].endswith("best.safetensors") and len(s["checkpoint_sha256"]) == 64


def test_hex_test_rerun_skips_the_same_and_stops_on_other_settings(data: Path, trained: Path, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture,
                                                                   capfd: pytest.CaptureFixture) -> None:
    base = ["--out", str(trained), "--run-name", "fold0", "--data", str(data), "--workers", "0", "--no-plots",
            "--test-dir", str(tmp_path / "t")]
    summary = tmp_path / "t" / "summary.json"
    assert hex_test.main([*base, "--split", str(data / "splits" / "splits_0.csv")]) == 0
    mtime = summary.stat().st_mtime_ns
    assert hex_test.main([*base, "--split", str(data / "splits" / "splits_0.csv")]) == 0  # the same: skipped
    assert summary.stat().st_mtime_ns == mtime
    caplog.clear()
    capfd.readouterr()
    assert hex_test.main([*base, "--slides", "slide_003"]) == 2  # other slides into the same folder: stops
    msg = _one_error(caplog, capfd)
    assert 'done with other settings: slides ["slide_002", "slide_003"] -> ["slide_003"]' in msg and \
        "pass --overwrite" in msg, msg
    assert summary.stat().st_mtime_ns == mtime
    assert hex_test.main([*base, "--slides", "slide_003", "--overwrite"]) == 0
    assert json.loads(summary.read_text())["slides"] == ["slide_003"]


# ---------------------------------------------------------------------------------------- 06 infer_wsi + maps
def test_infer_wsi_rerun_with_other_settings_stops(wsi: tuple[Path, Path], tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture,
                                                   capfd: pytest.CaptureFixture) -> None:
    cohort, ck = wsi
    base = ["--cohort", str(cohort), "--out", str(tmp_path), "--workers", "0", "--no-maps", "--patch-size", str(PS),
            "--min-tissue", "0.3"]
    h5, cfg = tmp_path / "hex_pred" / "a.h5", tmp_path / "hex_pred" / "config.json"
    assert infer_wsi.main([*base, "--checkpoint", str(ck), "--stride", "56"]) == 0
    stamps = (h5.stat().st_mtime_ns, cfg.stat().st_mtime_ns)
    caplog.clear()
    capfd.readouterr()
    assert infer_wsi.main([*base, "--checkpoint", str(ck), "--stride", str(PS)]) == 2
    msg = _one_error(caplog, capfd)
    assert "1 slides are done with other settings: stride 56 -> 112 (a)" in msg and "pass --overwrite" in msg, msg
    assert (h5.stat().st_mtime_ns, cfg.stat().st_mtime_ns) == stamps  # nothing redone, config.json not rewritten
    other = tmp_path / "other.safetensors"  # another checkpoint file: stops too, naming both
    shutil.copy(ck, other)
    shutil.copy(ck.with_suffix(".json"), other.with_suffix(".json"))
    caplog.clear()
    assert infer_wsi.main([*base, "--checkpoint", str(other), "--stride", "56"]) == 2
    msg = _one_error(caplog, capfd)
    assert f"input checkpoint {ck} -> {other}" in msg, msg
    assert infer_wsi.main([*base, "--checkpoint", str(ck), "--stride", "56"]) == 0  # the same: skipped
    assert h5.stat().st_mtime_ns == stamps[0]
    assert infer_wsi.main([*base, "--checkpoint", str(ck), "--stride", str(PS), "--overwrite"]) == 0
    with h5py.File(h5) as f:
        assert f.attrs["stride_level0"] == PS
    rec = json.loads((tmp_path / "hex_pred" / "done" / "a.json").read_text())
    assert rec["settings"]["stride"] == PS and rec["inputs"]["he"]["path"] == str(cohort / "he" / "a.tif")
    assert json.loads(cfg.read_text())["settings"]["stride"] == PS


def test_infer_wsi_names_a_linked_slide_by_its_link(wsi: tuple[Path, Path], tmp_path: Path) -> None:
    cohort, ck = wsi
    (tmp_path / "c" / "he").mkdir(parents=True)
    (tmp_path / "c" / "he" / "case7.tif").symlink_to(cohort / "he" / "a.tif")
    out = tmp_path / "out"
    assert infer_wsi.main(["--cohort", str(tmp_path / "c"), "--out", str(out), "--checkpoint", str(ck),
                           "--workers", "0", "--patch-size", str(PS), "--no-maps"]) == 0
    assert [p.name for p in (out / "hex_pred").glob("*.h5")] == ["case7.h5"]
    with h5py.File(out / "hex_pred" / "case7.h5") as f:
        assert f.attrs["slide_id"] == "case7" and f.attrs["he_path"] == str(tmp_path / "c" / "he" / "case7.tif")


def _last_line(caplog: pytest.LogCaptureFixture) -> str:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("hex.infer_wsi: ")][-1]


def test_infer_wsi_last_line_counts_slides_with_their_maps(wsi: tuple[Path, Path], tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 16: stage 06's last line counted only the predictions. A slide is done when its prediction and its
    maps are: maps made now for a prediction made earlier count as done, and a slide whose maps fail is failed."""
    cohort, ck = wsi
    base = ["--cohort", str(cohort), "--out", str(tmp_path), "--checkpoint", str(ck), "--workers", "0",
            "--patch-size", str(PS)]
    assert infer_wsi.main([*base, "--no-maps"]) == 0
    assert _last_line(caplog).startswith("hex.infer_wsi: 1 done, 0 skipped (already done), 0 failed")
    assert infer_wsi.main(base) == 0  # the prediction is done, its maps are made now: the slide is done
    assert _last_line(caplog).startswith("hex.infer_wsi: 1 done, 0 skipped (already done), 0 failed")
    assert (tmp_path / "virtual_codex" / "a.npy").is_file()
    assert infer_wsi.main(base) == 0  # both done earlier: skipped
    assert _last_line(caplog).startswith("hex.infer_wsi: 0 done, 1 skipped (already done), 0 failed")

    def no_maps(*a: object, **k: object) -> dict:
        raise PipelineError("disk full")

    monkeypatch.setattr(infer_wsi, "write_slide_maps", no_maps)
    assert infer_wsi.main([*base, "--overwrite"]) == 1  # the prediction is redone, its maps fail: the slide fails
    assert _last_line(caplog).startswith("hex.infer_wsi: 0 done, 0 skipped (already done), 1 failed: a (maps: "
                                         "disk full)")


@pytest.mark.parametrize("stage", ["hex.infer_wsi", "hex.test"])
def test_ctrl_c_in_the_work_is_one_line_saying_how_to_resume(stage: str, wsi: tuple[Path, Path], data: Path,
                                                             trained: Path, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture,
                                                             capfd: pytest.CaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(*a: object, **k: object) -> None:
        raise KeyboardInterrupt

    if stage == "hex.infer_wsi":
        cohort, ck = wsi
        monkeypatch.setattr(infer_wsi, "infer_slide", interrupt)
        argv = ["--cohort", str(cohort), "--out", str(tmp_path), "--checkpoint", str(ck), "--workers", "0",
                "--patch-size", str(PS)]
    else:
        monkeypatch.setattr(hex_test, "predict_distributed", interrupt)
        argv = ["--out", str(trained), "--run-name", "fold0", "--data", str(data), "--workers", "0", "--no-plots",
                "--split", str(data / "splits" / "splits_0.csv"), "--test-dir", str(tmp_path / "t")]
    capfd.readouterr()
    assert MAINS[stage](argv) == 130
    msg = _one_error(caplog, capfd)
    assert msg == f"{stage}: interrupted (Ctrl-C); run the same command again to resume (finished slides are " \
                  "skipped)", msg


def test_virtual_codex_rerun_with_other_preview_markers_stops(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                              capfd: pytest.CaptureFixture) -> None:
    (tmp_path / "hex_pred").mkdir()
    write_pred(tmp_path / "hex_pred" / "a.h5", np.array([[0, 0], [224, 0]]), np.ones((2, 40)), 224, 224,
               slide_dimensions=(448, 224))
    base = ["--out", str(tmp_path), "--formats", "npy", "preview"]
    assert virtual_codex.main([*base, "--preview-markers", "CD8"]) == 0
    npy = tmp_path / "virtual_codex" / "a.npy"
    mtime = npy.stat().st_mtime_ns
    assert json.loads((tmp_path / "virtual_codex" / "done" / "a.json").read_text())["settings"] == {
        "preview_markers": ["CD8"]}
    caplog.clear()
    capfd.readouterr()
    assert virtual_codex.main([*base, "--preview-markers", "CD68"]) == 2
    msg = _one_error(caplog, capfd)
    assert 'done with other settings: preview_markers ["CD8"] -> ["CD68"] (a)' in msg and "--overwrite" in msg, msg
    assert npy.stat().st_mtime_ns == mtime
    assert virtual_codex.main([*base, "--preview-markers", "CD68", "--overwrite"]) == 0
    assert npy.stat().st_mtime_ns != mtime


# ------------------------------------------------------------- every stage: missing input, unwritable, bad flag
def _stage_argv(stage: str, kind: str, tmp: Path, data: Path, trained: Path, wsi: tuple[Path, Path]) -> list[str]:
    """The command line of one user mistake; ``tmp/a_file`` is a regular file (root ignores chmod)."""
    (tmp / "a_file").write_text("not a folder")
    cohort, ck = wsi
    if stage == "hex.train":
        argv = _train_argv(data, tmp / "out", "r")
        if kind == "missing_input":
            argv[argv.index("--split") + 1] = str(tmp / "no_such_split.csv")
        elif kind == "unwritable_output":
            argv[argv.index("--out") + 1] = str(tmp / "a_file" / "out")
        else:
            argv += ["--epochs", "0"]
        return argv
    if stage == "hex.test":
        argv = ["--out", str(trained), "--run-name", "fold0", "--data", str(data), "--workers", "0", "--test-dir",
                str(tmp / "out" / "t")]
        return argv + {"missing_input": ["--split", str(tmp / "no_such_split.csv")],
                       "unwritable_output": ["--test-dir", str(tmp / "a_file" / "t")],
                       "bad_flag": ["--batch-size", "0"]}[kind]
    if stage == "hex.infer_wsi":
        argv = ["--cohort", str(cohort), "--out", str(tmp / "out"), "--checkpoint", str(ck), "--workers", "0"]
        return argv + {"missing_input": ["--cohort", str(tmp / "no_such_cohort")],
                       "unwritable_output": ["--out", str(tmp / "a_file" / "out")],
                       "bad_flag": ["--min-tissue", "2"]}[kind]
    (tmp / "out").mkdir()
    if kind != "missing_input":
        (tmp / "out" / "hex_pred").mkdir()
        write_pred(tmp / "out" / "hex_pred" / "a.h5", np.array([[0, 0]]), np.ones((1, 40)), 224, 224)
    if kind == "unwritable_output":
        (tmp / "out" / "virtual_codex").write_text("a file where the maps go")
    return ["--out", str(tmp / "out")] + (["--preview-markers", "no_such_marker"] if kind == "bad_flag" else [])


MAINS = {"hex.train": hex_train.main, "hex.test": hex_test.main, "hex.infer_wsi": infer_wsi.main,
         "hex.virtual_codex": virtual_codex.main}
EXPECT = {("hex.train", "missing_input"): "no_such_split.csv: file not found",
          ("hex.train", "unwritable_output"): "cannot create the run folder",
          ("hex.train", "bad_flag"): "--epochs 0: must be >= 1",
          ("hex.test", "missing_input"): "no_such_split.csv: file not found",
          ("hex.test", "unwritable_output"): "cannot create the test folder",
          ("hex.test", "bad_flag"): "--batch-size 0: must be >= 1",
          ("hex.infer_wsi", "missing_input"): "no_such_cohort: folder not found",
          ("hex.infer_wsi", "unwritable_output"): "cannot create the output folder",
          ("hex.infer_wsi", "bad_flag"): "--min-tissue 2.0: a tissue fraction in [0, 1]",
          ("hex.virtual_codex", "missing_input"): "no predictions folder",
          ("hex.virtual_codex", "unwritable_output"): "cannot create the output folder",
          ("hex.virtual_codex", "bad_flag"): "--preview-markers ['no_such_marker'] are not among"}


@pytest.mark.parametrize("stage,kind", list(EXPECT))
def test_user_mistakes_are_one_line_without_traceback(stage: str, kind: str, data: Path, trained: Path,
                                                      wsi: tuple[Path, Path], tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture,
                                                      capfd: pytest.CaptureFixture) -> None:
    argv = _stage_argv(stage, kind, tmp_path, data, trained, wsi)
    capfd.readouterr()
    assert MAINS[stage](argv) == 2
    msg = _one_error(caplog, capfd)
    assert EXPECT[stage, kind] in msg, msg
    if kind == "unwritable_output":
        assert "a_file" in msg or "virtual_codex" in msg, msg  # names the path
    else:  # found before any output folder is made
        made = {"hex.train": tmp_path / "out" / "runs", "hex.test": tmp_path / "out" / "t",
                "hex.infer_wsi": tmp_path / "out" / "hex_pred", "hex.virtual_codex": tmp_path / "out" / "virtual_codex"}
        assert not made[stage].exists(), made[stage]


@pytest.mark.parametrize("stage", list(MAINS))
def test_unparsable_flag_value_returns_2(stage: str, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    assert MAINS[stage](["--out", str(tmp_path), "--workers", "many"]) == 2
    err = capfd.readouterr().err
    assert "invalid int value: 'many'" in err and "Traceback" not in err
