"""The one stage runner (pipeline.cli.Stage): exit codes, one-line errors, Ctrl-C, the resolved config, the last
line, and a partial rerun's config.json that does not claim its settings for the other slides."""

from __future__ import annotations

import argparse
import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline import done as done_mod
from pipeline.cli import SlideJob, Stage, config_from_args, require
from pipeline.errors import EXIT_INPUT_ERROR, EXIT_INTERRUPTED, PipelineError


@dataclass
class ToyConfig:
    out: Path
    slides: list[str]
    value: float
    overwrite: bool = False
    fail: str | None = None
    interrupt: bool = False


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="toy")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--slides", nargs="+", default=["a", "b"])
    p.add_argument("--value", type=float, default=0.5, help="a setting in [0, 1]")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--fail")
    p.add_argument("--interrupt", action="store_true")
    return p


def _config(args: argparse.Namespace) -> ToyConfig:
    require(0 <= args.value <= 1, f"--value {args.value}: must be in [0, 1]")
    return config_from_args(ToyConfig, args)


def _output(slide: str, out: Path) -> list[Path]:
    return [out / "toy" / f"{slide}.txt"]


def _work(slide: str, cfg: ToyConfig) -> int:
    if cfg.interrupt:
        raise KeyboardInterrupt
    if slide == cfg.fail:
        raise PipelineError(f"{slide}.txt is broken; fix it")
    _output(slide, cfg.out)[0].write_text(str(cfg.value))
    return 1


def _plan(cfg: ToyConfig) -> SlideJob:
    spec = done_mod.DoneSpec(cfg.out / "toy", {"value": cfg.value}, 1, inputs=lambda s: {},
                             outputs=functools.partial(_output, out=cfg.out))
    return SlideJob(cfg.out / "toy", cfg.slides, functools.partial(_work, cfg=cfg), done=spec, config=cfg,
                    overwrite=cfg.overwrite, summary=lambda r: f"{sum(r.results.values())} files")


STAGE = Stage("toy stage", _parser, _config, plan=_plan)


def test_per_slide_stage_writes_config_records_and_one_last_line(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    assert STAGE.main(["--out", str(tmp_path)]) == 0
    cfg = json.loads((tmp_path / "toy" / "config.json").read_text())
    assert cfg["value"] == 0.5 and cfg["slides_resolved"] == ["a", "b"] and cfg["schema_version"] == 1
    assert (tmp_path / "toy" / "done" / "a.json").exists()
    assert caplog.records[-1].getMessage() == "toy stage: 2 done, 0 skipped (already done), 0 failed; 2 files"
    caplog.clear()
    assert STAGE.main(["--out", str(tmp_path)]) == 0  # rerun: both skipped
    assert "0 done, 2 skipped" in caplog.records[-1].getMessage()


def test_bad_flags_and_bad_input_exit_2_with_one_line(tmp_path, caplog, capsys):
    assert STAGE.main(["--help"]) == 0
    assert STAGE.main(["--out", str(tmp_path), "--no-such-flag"]) == EXIT_INPUT_ERROR
    assert STAGE.main(["--out", str(tmp_path), "--value", "3"]) == EXIT_INPUT_ERROR
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == ["--value 3.0: must be in [0, 1]"]
    assert errors[0].exc_info is None
    assert not (tmp_path / "toy").exists()  # nothing was made before the flags were checked


def test_failed_slide_exits_1_and_names_it(tmp_path, caplog):
    assert STAGE.main(["--out", str(tmp_path), "--fail", "b"]) == 1
    assert caplog.records[-1].getMessage().endswith("1 failed: b (b.txt is broken; fix it); 1 files")
    assert done_mod.read_failure(tmp_path / "toy", "b") == "b.txt is broken; fix it"


def test_ctrl_c_ends_with_one_line_saying_how_to_resume(tmp_path, caplog):
    assert STAGE.main(["--out", str(tmp_path), "--interrupt"]) == EXIT_INTERRUPTED
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None
    assert "interrupted" in errors[0].getMessage() and "resume" in errors[0].getMessage()
    assert STAGE.main(["--out", str(tmp_path)]) == 0  # the same command resumes


def test_partial_rerun_config_does_not_claim_its_settings_for_other_slides(tmp_path, caplog):
    assert STAGE.main(["--out", str(tmp_path)]) == 0
    assert STAGE.main(["--out", str(tmp_path), "--slides", "a", "--value", "0.9", "--overwrite"]) == 0
    cfg = json.loads((tmp_path / "toy" / "config.json").read_text())
    assert cfg["value"] == 0.9 and cfg["slides_resolved"] == ["a"]
    assert cfg["other_settings"] == {"b": "value 0.9 -> 0.5"}
    assert json.loads((tmp_path / "toy" / "done" / "b.json").read_text())["settings"] == {"value": 0.5}
    assert any("other settings than this run" in r.getMessage() for r in caplog.records)


def test_stage_needs_exactly_one_of_plan_and_run():
    with pytest.raises(TypeError):
        Stage("x", _parser, _config)
    with pytest.raises(TypeError):
        Stage("x", _parser, _config, plan=_plan, run=lambda c, x: 0)


def test_whole_run_stage_gets_config_and_context(tmp_path):
    seen = {}

    def run(cfg: ToyConfig, ctx) -> int:
        seen.update(value=cfg.value, rank=ctx.rank, main=ctx.is_main)
        return 3

    stage = Stage("whole", _parser, _config, run=run, log_file=lambda c: c.out / "run.log")
    assert stage.main(["--out", str(tmp_path), "--value", "0.25"]) == 3
    assert seen == {"value": 0.25, "rank": 0, "main": True}
    assert (tmp_path / "run.log").exists()
