"""Slide identity (pipeline.cohort) and the stage runner's done-records, stale temps and writable checks."""

from __future__ import annotations

import functools
import json
import logging
import os
import stat
from pathlib import Path

import pytest

from pipeline import done as done_mod
from pipeline.cohort import check_ids, resolve_slides
from pipeline.errors import PipelineError
from pipeline.io import atomic_path, ensure_writable, remove_stale_temps
from pipeline.runner import run_slides


def _touch(p: Path, text: str = "x") -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


# ----------------------------------------------------------------------------------------------------------------
# slide identity


def test_rescan_beside_original_stops_naming_both(tmp_path: Path) -> None:
    _touch(tmp_path / "he" / "slide_000.tif")
    _touch(tmp_path / "he" / "slide_000.v2.tif")
    _touch(tmp_path / "he" / "slide_001.tif")
    with pytest.raises(PipelineError, match=r"slide_000: slide_000.tif, slide_000.v2.tif"):
        resolve_slides(tmp_path)


def test_pairs_table_decides_between_rescans(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _touch(tmp_path / "he" / "slide_000.tif")
    _touch(tmp_path / "he" / "slide_000.v2.tif")
    _touch(tmp_path / "codex" / "slide_000.ome.tif")
    (tmp_path / "pairs.csv").write_text("he_slide,codex_image\nhe/slide_000.v2.tif,codex/slide_000.ome.tif\n")
    c = resolve_slides(tmp_path)
    assert c.ids == ["slide_000"] and c["slide_000"].he.name == "slide_000.v2.tif"
    assert "uses slide_000.v2.tif" in caplog.text


def test_link_keeps_its_own_name(tmp_path: Path) -> None:
    target = _touch(tmp_path / "store" / "S123-A.tif")
    (tmp_path / "he").mkdir()
    os.symlink(target, tmp_path / "he" / "slide_007.tif")
    os.symlink(tmp_path / "store", tmp_path / "codex_store")
    _touch(tmp_path / "codex" / "slide_007.ome.tif")
    c = resolve_slides(tmp_path)
    assert c.ids == ["slide_007"]
    assert c["slide_007"].he.name == "slide_007.tif" and c["slide_007"].he_target == target.resolve()
    assert c["slide_007"].codex is not None and c["slide_007"].codex.name == "slide_007.ome.tif"
    # pairs.csv naming the link: the same id
    (tmp_path / "pairs.csv").write_text("he_slide,codex_image\nhe/slide_007.tif,codex/slide_007.ome.tif\n")
    assert resolve_slides(tmp_path).ids == ["slide_007"]
    assert list(resolve_slides(pairs=tmp_path / "pairs.csv").pairs()) == ["slide_007"]


def test_two_ids_one_file_and_broken_link_stop(tmp_path: Path) -> None:
    target = _touch(tmp_path / "he" / "slide_000.tif")
    os.symlink(target, tmp_path / "he" / "slide_009.tif")
    with pytest.raises(PipelineError, match=r"slide_000, slide_009 are all"):
        resolve_slides(tmp_path)
    (tmp_path / "he" / "slide_009.tif").unlink()
    os.symlink(tmp_path / "nowhere.tif", tmp_path / "he" / "slide_009.tif")
    with pytest.raises(PipelineError, match=r"not found for 1 slides: slide_009"):
        resolve_slides(tmp_path)


def test_pairs_table_errors(tmp_path: Path) -> None:
    _touch(tmp_path / "he" / "a.tif")
    (tmp_path / "pairs.csv").write_text("he_slide,codex_image\nhe/a.tif,\nhe/a.tif,\n")
    with pytest.raises(PipelineError, match=r"lists slide a twice \(lines 2 and 3\)"):
        resolve_slides(tmp_path)
    (tmp_path / "pairs.csv").write_text("he,codex\nhe/a.tif,\n")
    with pytest.raises(PipelineError, match="must have the columns"):
        resolve_slides(tmp_path)
    (tmp_path / "pairs.csv").write_text("he_slide,codex_image\nhe/missing.tif,\n")
    with pytest.raises(PipelineError, match="not found for 1 slides: missing"):
        resolve_slides(tmp_path)


def test_check_ids_lists_unknown(tmp_path: Path) -> None:
    _touch(tmp_path / "he" / "a.tif")
    c = resolve_slides(tmp_path)
    check_ids(["a"], c, "clinical.csv")
    with pytest.raises(PipelineError, match=r"clinical.csv names 2 slides .*: b, c"):
        check_ids(["a", "c", "b"], c, "clinical.csv")


# ----------------------------------------------------------------------------------------------------------------
# done-records through run_slides


def _work(slide: str, out: Path, tag: str) -> int:
    with atomic_path(out / f"{slide}.txt") as tmp:
        tmp.write_text(tag)
    return 1


def _spec(out: Path, inp: Path, **settings) -> done_mod.DoneSpec:
    return done_mod.DoneSpec(out, settings, 1, inputs=lambda s: {"input": inp / f"{s}.in"},
                             outputs=lambda s: [out / f"{s}.txt"])


def test_rerun_with_other_settings_stops_before_work(tmp_path: Path) -> None:
    inp, out = tmp_path / "in", tmp_path / "out"
    for s in "ab":
        _touch(inp / f"{s}.in")
    r = run_slides("ab", functools.partial(_work, out=out, tag="0.5"), done=_spec(out, inp, min_tissue=0.5))
    assert r.done == ["a", "b"]
    r = run_slides("ab", functools.partial(_work, out=out, tag="0.5"), done=_spec(out, inp, min_tissue=0.5))
    assert r.skipped == ["a", "b"] and not r.done
    with pytest.raises(PipelineError, match=r"done with other settings: min_tissue 0.5 -> 0.3 \(a, b\); pass "
                                            r"--overwrite"):
        run_slides("ab", functools.partial(_work, out=out, tag="0.3"), done=_spec(out, inp, min_tissue=0.3))
    assert (out / "a.txt").read_text() == "0.5"  # nothing was redone
    r = run_slides("ab", functools.partial(_work, out=out, tag="0.3"), done=_spec(out, inp, min_tissue=0.3),
                   overwrite=True)
    assert r.done == ["a", "b"] and (out / "a.txt").read_text() == "0.3"
    rec = json.loads((out / "done" / "a.json").read_text())
    assert rec["settings"] == {"min_tissue": 0.3} and rec["inputs"]["input"]["path"].endswith("a.in")


def test_changed_input_redoes_only_that_slide(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    inp, out = tmp_path / "in", tmp_path / "out"
    for s in "ab":
        _touch(inp / f"{s}.in")
    spec = _spec(out, inp, k=1)
    run_slides("ab", functools.partial(_work, out=out, tag="v1"), done=spec)
    _touch(inp / "a.in", "a fixed panel, longer")
    r = run_slides("ab", functools.partial(_work, out=out, tag="v2"), done=spec)
    assert r.done == ["a"] and r.skipped == ["b"]
    assert "input changed since it was done" in caplog.text


def test_outputs_without_record_are_redone_and_failures_recorded(tmp_path: Path) -> None:
    inp, out = tmp_path / "in", tmp_path / "out"
    _touch(inp / "a.in")
    _touch(out / "a.txt", "from an older version")
    spec = _spec(out, inp, k=1)
    r = run_slides(["a"], functools.partial(_work, out=out, tag="new"), done=spec)
    assert r.done == ["a"] and (out / "a.txt").read_text() == "new"

    def boom(slide: str) -> None:
        raise PipelineError("the slide is unreadable")

    r = run_slides(["a"], boom, done=spec, overwrite=True)
    assert r.failed == {"a": "the slide is unreadable"}
    assert not (out / "a.txt").exists() and not spec.record_path("a").exists()
    assert done_mod.read_failure(out, "a") == "the slide is unreadable"
    assert r.finish("stage") == 1 and "a (the slide is unreadable)" in r.final_line("stage")


def test_stale_temps_of_killed_run_removed_on_redo(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    dead = out / ".slide_000.99999999.0123456789ab.tmp.h5"  # pid 99999999 does not exist
    live = out / f".slide_000.{os.getpid() + 0}.0123456789ab.tmp.h5"
    other = out / ".slide_0001.99999999.0123456789ab.tmp.h5"
    for p in (dead, live, other):
        p.write_text("half")
    gone = remove_stale_temps([out / "slide_000.h5"])
    assert dead in gone and live in gone  # our own pid's leftovers are stale too
    assert other.exists()


def test_atomic_outputs_get_the_usual_mode(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "best.safetensors") as tmp:
        fd = os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600)  # as safetensors' writer does
        os.close(fd)
    mode = stat.S_IMODE((tmp_path / "best.safetensors").stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_ensure_writable_names_the_path(tmp_path: Path) -> None:
    blocker = _touch(tmp_path / "a_file")
    with pytest.raises(PipelineError, match=rf"cannot create the output folder {blocker}/out"):
        ensure_writable(blocker / "out")
    assert ensure_writable(tmp_path / "new" / "out").is_dir()
