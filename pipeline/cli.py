"""The one runner every ``python -m`` stage entry goes through.

A stage module is a parser, a config dataclass and either a per-slide job or a whole-run function::

    def build_parser() -> argparse.ArgumentParser: ...

    @dataclass
    class PatchConfig: ...                         # library code takes this (or plain values), never a Namespace

    def make_config(args: argparse.Namespace) -> PatchConfig:
        ...                                        # flag checks: raise PipelineError (one line) before any work

    def plan(cfg: PatchConfig) -> SlideJob:        # per-slide: the slides, work(slide), done-spec, output folder
        ...

    STAGE = Stage("patch grid", build_parser, make_config, plan=plan)

    def main(argv: list[str] | None = None) -> int:
        return STAGE.main(argv)

or ``Stage(name, build_parser, make_config, run=run)`` with ``run(cfg, ctx) -> exit code`` for a whole-run stage
(training, testing, cohort-wide steps). The runner owns, in this order:

1. parsing (``--help`` returns 0, a bad flag prints the usage and returns 2; ``main()`` returns, never raises);
2. ``make_config(args)``: flag checks before any process group, so a bad flag stops every rank at once;
3. the distributed setup when ``distributed`` (``pipeline.dist.setup_dist(cfg.device)``; asking for CUDA where
   torch cannot use it stops here with the reason), else single-process values;
4. ``prepare(cfg, ctx)`` (optional): checks that need the device or write access, before a log file is opened;
5. per-slide stages (:class:`SlideJob`): the output folder is checked writable, slides done with other settings stop
   the run before any work (one line with the difference), ``run.log`` is opened, the resolved configuration is
   written beside the outputs (``config.json``, per shard), the slides run (:func:`pipeline.runner.run_slides`),
   and :meth:`StageReport.finish` writes the one last line;
6. the exit code: 0, 1 when some slides failed, 2 on bad input (a :class:`PipelineError` anywhere, logged as one
   line without a traceback), 130 on Ctrl-C (one line saying how to resume); the log file is closed and the process
   group destroyed in every case.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import done as done_mod
from pipeline.errors import EXIT_INPUT_ERROR, EXIT_INTERRUPTED, PipelineError
from pipeline.io import config_dict, ensure_writable, save_config
from pipeline.logs import close_log_file, setup_logging
from pipeline.runner import StageReport, run_slides, shard_file_name

log = logging.getLogger(__name__)

RESUME_HINT = "run the same command again to resume (finished slides are skipped)"


@dataclass
class SlideJob:
    """What a per-slide stage hands the runner (see the module docstring).

    Attributes:
        out_dir: the stage's output folder (checked writable; ``run.log`` and the resolved config go here).
        slides: the slide ids this run is responsible for (after ``--slides`` and ``--shard``).
        work: ``work(slide) -> result`` (atomic outputs; picklable when ``workers > 1``).
        done: the done-spec (what makes a slide done), or None with ``is_done``.
        config: the resolved configuration to save (a dataclass or a mapping; made JSON-able).
        overwrite / workers / fail_fast: the usual flags.
        shard: ``"i/n"`` for job arrays (the config file is named per shard).
        summary: ``summary(report) -> str`` appended to the last line (e.g. "1200 patches written ...").
        finish: ``finish(report) -> exit code`` instead of ``summary``, for a stage with more to do after the slides
            (stage 03's normalisation, stage 02's summary table): it logs the one last line (``report.finish``).
        is_done / outputs: for stages without done-records (see :func:`pipeline.runner.run_slides`).
        log_name: the log file in ``out_dir`` (default ``run.log``).
    """

    out_dir: Path
    slides: Sequence[str]
    work: Callable[[str], Any]
    done: done_mod.DoneSpec | None = None
    config: Any = None
    overwrite: bool = False
    workers: int = 1
    fail_fast: bool = False
    shard: str | None = None
    summary: Callable[[StageReport], str] | None = None
    finish: Callable[[StageReport], int] | None = None
    is_done: Callable[[str], bool] | None = None
    outputs: Callable[[str], Iterable[str | os.PathLike]] | None = None
    log_name: str = "run.log"
    extra_config: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Context:
    """Where this process sits in the job when a stage runs without a process group (``pipeline.dist.DistContext``
    has the same fields; ``device`` is the config's, unresolved). Under torchrun without a process group (e.g. MICA's
    fold-parallel training) rank and world size come from the environment."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: Any = "cpu"
    is_main: bool = True

    @classmethod
    def from_env(cls, device: Any = "cpu") -> Context:
        rank = int(os.environ.get("RANK", 0) or 0)
        return cls(rank, int(os.environ.get("LOCAL_RANK", 0) or 0), int(os.environ.get("WORLD_SIZE", 1) or 1),
                   device, rank == 0)


def config_from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """Build the dataclass ``cls`` from the parsed flags of the same names (``overrides`` win)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(overrides)
    return cls(**values)


def require(ok: bool, message: str) -> None:
    """Raise ``PipelineError(message)`` unless ``ok`` (flag checks in ``make_config``)."""
    if not ok:
        raise PipelineError(message)


def run_job(job: SlideJob, desc: str) -> int:
    """Steps 5-6 of the module docstring for one :class:`SlideJob`; returns the exit code."""
    out_dir = ensure_writable(job.out_dir)
    if job.done is not None:
        done_mod.stop_on_conflicts(job.done, list(job.slides), desc, job.overwrite)
    setup_logging(out_dir / job.log_name)
    try:
        cfg = config_dict(job.config) | {"slides_resolved": list(job.slides)} | dict(job.extra_config)
        if job.done is not None:
            cfg.setdefault("schema_version", job.done.schema)
            others = done_mod.other_settings(job.done, job.slides)
            if others:  # this config describes this run's slides only; the done-records hold each slide's settings
                cfg["other_settings"] = others
                first = next(iter(others))
                log.warning("%s: %d slides in %s were done with other settings than this run (%s: %s%s); config.json "
                            "lists them under other_settings, and each slide's done-record holds its own", desc,
                            len(others), out_dir, first, others[first], ", ..." if len(others) > 1 else "")
        save_config(out_dir, cfg, name=shard_file_name(job.shard))
        try:
            report = run_slides(job.slides, job.work, job.is_done, overwrite=job.overwrite, workers=job.workers,
                                skip_errors=not job.fail_fast, desc=desc, outputs=job.outputs, done=job.done)
        except PipelineError as e:  # --fail-fast: the first failing slide stops the run
            log.error("%s", e)
            return 1
        if job.finish is not None:
            return job.finish(report)
        return report.finish(desc, job.summary(report) if job.summary is not None else "")
    finally:
        close_log_file(out_dir / job.log_name)


@dataclass
class Stage:
    """One ``python -m`` entry (see the module docstring). Exactly one of ``plan`` and ``run`` is given.

    Attributes:
        name: what the stage's messages and last line start with ("patch grid").
        build_parser: the argparse parser (``--help`` explains units and defaults).
        make_config: flags -> config dataclass; raises :class:`PipelineError` for a bad value.
        plan: per-slide stages: config -> :class:`SlideJob`.
        run: whole-run stages: ``run(config, ctx) -> exit code``.
        distributed: join the torchrun process group (``config.device`` names the device).
        prepare: ``prepare(config, ctx)``: checks needing the device or write access, before the log file opens.
        log_file: whole-run stages: ``log_file(config)`` -> the main rank's log file (or None).
        resume_hint: what the Ctrl-C line tells the user (default: rerun, finished slides are skipped).
    """

    name: str
    build_parser: Callable[[], argparse.ArgumentParser]
    make_config: Callable[[argparse.Namespace], Any]
    plan: Callable[[Any], SlideJob] | None = None
    run: Callable[[Any, Any], int] | None = None
    distributed: bool = False
    prepare: Callable[[Any, Any], None] | None = None
    log_file: Callable[[Any], Path | None] | None = None
    resume_hint: str = RESUME_HINT

    def __post_init__(self) -> None:
        if (self.plan is None) == (self.run is None):
            raise TypeError(f"stage {self.name!r}: give exactly one of plan= and run=")

    def main(self, argv: Sequence[str] | None = None) -> int:
        """Run the stage; returns its exit code (never raises ``SystemExit``)."""
        try:
            args = self.build_parser().parse_args(argv)
        except SystemExit as e:  # argparse: --help (0) or a bad flag (2, usage already printed)
            return int(e.code or 0) if not isinstance(e.code, str) else EXIT_INPUT_ERROR
        rank = int(os.environ.get("RANK", 0) or 0)
        setup_logging(None, rank=rank)
        cleanup: Callable[[], None] = lambda: None  # noqa: E731
        path: Path | None = None
        try:
            cfg = self.make_config(args)
            if self.distributed:
                from pipeline.dist import cleanup_dist, setup_dist

                ctx = setup_dist(getattr(cfg, "device", "auto"))
                cleanup = cleanup_dist
            else:
                ctx = Context.from_env(getattr(cfg, "device", "cpu"))
            if self.prepare is not None:
                self.prepare(cfg, ctx)
            if self.plan is not None:
                return run_job(self.plan(cfg), self.name)
            path = self.log_file(cfg) if self.log_file is not None else None
            level = getattr(logging, str(getattr(cfg, "log_level", "INFO")).upper(), logging.INFO)
            setup_logging(path if ctx.is_main else None, level=level, rank=ctx.rank)
            return int(self.run(cfg, ctx) or 0)
        except PipelineError as e:
            log.error("%s", e)
            return EXIT_INPUT_ERROR
        except KeyboardInterrupt:
            log.error("%s: interrupted (Ctrl-C); %s", self.name, self.resume_hint)
            return EXIT_INTERRUPTED
        finally:
            if path is not None:
                close_log_file(path)
            cleanup()
