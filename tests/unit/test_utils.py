"""Shared stage utilities: atomic writes, config JSON, the per-slide stage runner, numbered scripts."""

import json
import os
from functools import partial
from pathlib import Path

import pytest

from pipeline.cohort import select_slides, slide_id_from_path
from pipeline.errors import PipelineError
from pipeline.io import atomic_path, save_config, write_json
from pipeline.runner import parse_shard, run_slides, shard_file_name, shard_slides

REPO = Path(__file__).resolve().parents[2]


def test_atomic_path_renames_on_success_and_cleans_on_error(tmp_path):
    target = tmp_path / "sub" / "a.h5"
    with atomic_path(target) as tmp:
        assert tmp != target and tmp.parent == target.parent
        tmp.write_text("x")
        assert not target.exists()
    assert target.read_text() == "x"

    with pytest.raises(ValueError), atomic_path(tmp_path / "b.csv") as tmp:
        tmp.write_text("half")
        raise ValueError("crash")
    assert not (tmp_path / "b.csv").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_write_json_and_config(tmp_path):
    import argparse

    import numpy as np

    write_json(tmp_path / "a.json", {"m": np.eye(2), "p": tmp_path, "v": np.float32(1.5)})
    d = json.loads((tmp_path / "a.json").read_text())
    assert d["m"] == [[1.0, 0.0], [0.0, 1.0]] and d["v"] == 1.5
    p = save_config(tmp_path, argparse.Namespace(lr=1e-5, out=tmp_path))
    cfg = json.loads(p.read_text())
    assert cfg["lr"] == 1e-5 and "_argv" in cfg


def test_slide_ids_and_selection():
    assert slide_id_from_path("/x/slide_000.ome.tif") == "slide_000"
    assert select_slides(["a", "b"], None, "here") == ["a", "b"]
    assert select_slides(["a", "b"], ["b"], "here") == ["b"]
    with pytest.raises(PipelineError, match="here"):
        select_slides(["a"], ["zz"], "here")


def _work(slide: str, out: str) -> str:
    if slide == "bad":
        raise PipelineError(f"{slide}: no tissue")
    with atomic_path(Path(out) / f"{slide}.txt") as tmp:
        tmp.write_text(slide)
    return slide.upper()


@pytest.mark.parametrize("workers", [1, 2])
def test_run_slides_skips_done_records_failures(tmp_path, workers):
    (tmp_path / "a.txt").write_text("old")
    work = partial(_work, out=str(tmp_path))
    done = lambda s: (tmp_path / f"{s}.txt").exists()  # noqa: E731
    rep = run_slides(["a", "b", "c", "bad"], work, done, workers=workers)
    assert rep.skipped == ["a"] and sorted(rep.done) == ["b", "c"] and list(rep.failed) == ["bad"]
    assert not rep.ok and rep.results["b"] == "B"
    assert (tmp_path / "a.txt").read_text() == "old"
    rep = run_slides(["a"], work, done, overwrite=True)
    assert rep.done == ["a"] and (tmp_path / "a.txt").read_text() == "a"
    with pytest.raises(PipelineError):
        run_slides(["bad"], work, done, skip_errors=False)


def test_shards_partition_the_sorted_slides():
    slides = [f"s{i}" for i in (3, 0, 7, 1, 9, 4, 2)]
    parts = [shard_slides(slides, f"{i}/3") for i in range(3)]
    assert parts[0] == ["s0", "s3", "s9"] and sorted(sum(parts, [])) == sorted(slides)
    assert shard_slides(slides, None) == sorted(slides) and parse_shard("2/5") == (2, 5)
    assert shard_file_name("1/4") == "config_shard1of4.json" and shard_file_name(None) == "config.json"
    for bad in ("3/3", "-1/2", "1", "a/b"):
        with pytest.raises(PipelineError, match="--shard"):
            parse_shard(bad)


def test_run_slides_removes_the_outputs_of_slides_it_redoes(tmp_path):
    """A slide that is redone loses its old outputs first, so a failure leaves nothing stale behind."""
    for s in ("bad", "ok"):
        (tmp_path / f"{s}.txt").write_text("old")
        (tmp_path / f"{s}.extra").write_text("old")
    outputs = lambda s: [tmp_path / f"{s}.txt", tmp_path / f"{s}.extra"]  # noqa: E731
    rep = run_slides(["bad", "ok"], partial(_work, out=str(tmp_path)), lambda s: False, outputs=outputs)
    assert list(rep.failed) == ["bad"] and not (tmp_path / "bad.txt").exists()
    assert not (tmp_path / "bad.extra").exists() and (tmp_path / "ok.txt").read_text() == "ok"
    (tmp_path / "ok.extra").write_text("kept")
    rep = run_slides(["ok"], partial(_work, out=str(tmp_path)), lambda s: True, outputs=outputs)
    assert rep.skipped == ["ok"] and (tmp_path / "ok.extra").read_text() == "kept"  # skipped slides keep theirs


def test_stage_scripts_follow_the_calling_convention():
    """Every numbered script exists, and its variables are overridable from the environment."""
    names = ["01_patch", "02_register", "03_quantify", "04_train_hex", "05_test_hex", "06_infer_wsi",
             "07_features", "08_train_mica", "09_test_mica"]
    for n in names:
        text = (REPO / "scripts" / f"{n}.sh").read_text()
        assert 'COHORT=${COHORT:-' in text and 'OUT=${OUT:-' in text, n
        assert "python -m" in text or "torchrun" in text, n


def test_atomic_outputs_get_normal_permissions(tmp_path):
    with atomic_path(tmp_path / "x.json") as tmp:
        tmp.write_text("{}")
    mode = (tmp_path / "x.json").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask
