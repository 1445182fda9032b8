"""The per-slide stage runner and job-array shards.

One loop for all per-slide stages (TRIDENT-style, without its pitfalls): skip slides already done with these inputs
and settings -> clear what a redo replaces -> do the work (which writes to a temp file and ``os.replace``s it) ->
record the outcome (a done-record, or a failure record with the reason); :class:`StageReport` gives the counts and
the stage's one last line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from pipeline import done as done_mod
from pipeline.errors import PipelineError
from pipeline.io import remove_outputs, remove_stale_temps

log = logging.getLogger(__name__)


def default_threads(workers: int, cap: int = 4) -> int:
    """Threads per slide when ``workers`` slides run in parallel: the cores left to each, between 1 and ``cap``."""
    return max(1, min(cap, (os.cpu_count() or 1) // max(1, workers)))


def parse_shard(shard: str | None) -> tuple[int, int] | None:
    """``"i/n"`` (job-array shard, 0 <= i < n) -> (i, n); None -> None."""
    if not shard:
        return None
    try:
        i, n = (int(v) for v in str(shard).split("/"))
    except ValueError:
        raise PipelineError(f"--shard {shard!r}: expected i/n with 0 <= i < n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise PipelineError(f"--shard {shard!r}: expected i/n with 0 <= i < n, e.g. 0/4")
    return i, n


def shard_slides(slides: Sequence[str], shard: str | None) -> list[str]:
    """Job-array share of ``slides``: shard ``i/n`` takes every n-th slide of the sorted list, from i (0-based);
    the shards of one n partition the list (the rule of ``hex.infer_wsi`` too)."""
    parsed = parse_shard(shard)
    ordered = sorted(slides)
    return ordered if parsed is None else ordered[parsed[0] :: parsed[1]]


def shard_file_name(shard: str | None, stem: str = "config", suffix: str = ".json") -> str:
    """``config.json``, or ``config_shard{i}of{n}.json`` for a job-array shard, so shards do not overwrite each
    other's resolved configuration (or log, or summary: ``stem``/``suffix``)."""
    parsed = parse_shard(shard)
    return f"{stem}{suffix}" if parsed is None else f"{stem}_shard{parsed[0]}of{parsed[1]}{suffix}"


def _ignore_sigint() -> None:
    """Pool workers leave Ctrl-C to the parent, which stops them (one line instead of a traceback per worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Terminate the pool's worker processes (their slides' temp files are removed by the next run)."""
    for p in list(getattr(pool, "_processes", {}).values()):
        with contextlib.suppress(Exception):
            p.terminate()


@dataclass
class StageReport:
    """Outcome counts of one stage over many slides."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        return f"{len(self.done)} done, {len(self.skipped)} skipped (already done), {len(self.failed)} failed"

    @property
    def ok(self) -> bool:
        return not self.failed

    def final_line(self, desc: str, extra: str = "") -> str:
        """``desc: 3 done, 1 skipped (already done), 1 failed: slide_004 (reason); extra``."""
        line = f"{desc}: {self.summary()}"
        if self.failed:
            line += ": " + "; ".join(f"{s} ({r})" for s, r in self.failed.items())
        return line + (f"; {extra}" if extra else "")

    def finish(self, desc: str, extra: str = "") -> int:
        """Log the stage's last line (ERROR when a slide failed) and return its exit code (0, or 1 on failure)."""
        log.log(logging.ERROR if self.failed else logging.INFO, "%s", self.final_line(desc, extra))
        return 0 if self.ok else 1


def plan_slides(
    slides: Iterable[str],
    done: Any = None,
    is_done: Callable[[str], bool] | None = None,
    *,
    overwrite: bool = False,
    desc: str = "slides",
    outputs: Callable[[str], Iterable[str | os.PathLike]] | None = None,
) -> tuple[list[str], list[str], dict[str, dict]]:
    """Decide which slides to (re)do, as :func:`run_slides` does, and clear the way for them.

    Returns (todo, skipped, stamps): ``stamps`` = each todo slide's input stamps taken now (for its done-record).
    The todo slides' records, outputs (``outputs`` or ``done.outputs``) and stale temp files are removed. A slide
    done with other settings raises one :class:`PipelineError` before anything is removed (unless ``overwrite``).
    """
    if done is None and is_done is None:
        raise TypeError("plan_slides needs is_done or done")
    if outputs is None and done is not None:
        outputs = done.outputs
    todo, skipped, conflicts, reasons = [], [], {}, {}
    for s in slides:
        if done is not None:
            st = done_mod.check(done, s)
            if st.state == "done" and not overwrite:
                skipped.append(s)
            elif st.state == "conflict" and not overwrite:
                conflicts[s] = st.reason
            else:
                todo.append(s)
                if st.state != "done" and st.reason != "not done":
                    reasons[s] = st.reason
        elif not overwrite and is_done(s):
            skipped.append(s)
        else:
            todo.append(s)
    if conflicts:
        raise done_mod.conflict_error(conflicts, desc)
    if skipped:
        log.info("%s: %d slides already done (use --overwrite to redo)", desc, len(skipped))
    for s, why in reasons.items():
        log.info("%s: %s", s, why)
    stamps: dict[str, dict] = {}
    for s in todo:
        if done is not None:
            done_mod.clear(done, s)
            stamps[s] = {k: done_mod.file_stamp(v) for k, v in done.inputs(s).items()}
        if outputs is not None:
            outs = list(outputs(s))
            gone = remove_outputs(outs) + remove_stale_temps(outs)
            if gone:
                log.debug("%s: removed earlier outputs %s before redoing it", s, [str(p) for p in gone])
    return todo, skipped, stamps


def run_slides(
    slides: Iterable[str],
    work: Callable[[str], Any],
    is_done: Callable[[str], bool] | None = None,
    *,
    overwrite: bool = False,
    workers: int = 1,
    skip_errors: bool = True,
    desc: str = "slides",
    outputs: Callable[[str], Iterable[str | os.PathLike]] | None = None,
    done: Any = None,
) -> StageReport:
    """Run ``work(slide)`` for every slide not already done (unless ``overwrite``).

    ``done`` (a :class:`pipeline.done.DoneSpec`) decides what "done" means: the slide's outputs exist and its
    done-record holds these settings and inputs (:func:`pipeline.done.check`). A slide done with *other*
    settings stops the run before any work with one :class:`PipelineError` (unless ``overwrite``); a changed input
    redoes it. Without ``done``, ``is_done(slide)`` decides (the outputs are not keyed on settings).

    ``outputs(slide)`` (default: ``done.outputs``) lists the slide's output files: those of every slide that is
    (re)done are removed first, with the temp files a killed run left for them, so a slide that fails leaves
    nothing behind that a later stage would trust.

    ``work`` must write its outputs atomically and be picklable when ``workers > 1`` (a module-level function or
    a ``functools.partial`` of one). With ``skip_errors`` a failing slide is recorded and the loop goes on; the
    caller decides the exit code from ``report.ok`` (:meth:`StageReport.finish`). :class:`PipelineError` messages
    are logged without a traceback (they are user errors); anything else is logged with its traceback.
    """
    report = StageReport()
    todo, report.skipped, stamps = plan_slides(slides, done, is_done, overwrite=overwrite, desc=desc, outputs=outputs)

    def _record(slide: str, fn: Callable[[], Any]) -> None:
        try:
            report.results[slide] = fn()
            report.done.append(slide)
            if done is not None:
                done_mod.write_record(done, slide, stamps[slide])
        except PipelineError as e:
            if not skip_errors:
                raise
            report.failed[slide] = str(e)
            log.error("%s: %s", slide, e)
        except Exception as e:  # noqa: BLE001 - recorded, re-raised when not skipping errors
            if not skip_errors:
                raise
            report.failed[slide] = f"{type(e).__name__}: {e}"
            log.exception("%s failed", slide)
        if slide in report.failed and done is not None:
            with contextlib.suppress(OSError):
                done_mod.write_failure(done, slide, report.failed[slide])

    if workers <= 1 or len(todo) <= 1:
        for s in tqdm(todo, desc=desc, unit="slide", disable=not todo):
            _record(s, lambda s=s: work(s))
    else:
        pool = ProcessPoolExecutor(max_workers=workers, initializer=_ignore_sigint)
        try:
            futures = {pool.submit(work, s): s for s in todo}
            for fut in tqdm(as_completed(futures), total=len(futures), desc=desc, unit="slide"):
                _record(futures[fut], fut.result)
        except KeyboardInterrupt:  # Ctrl-C: the workers ignore it (no tracebacks from them); stop them now
            _stop_workers(pool)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    log.debug("%s: %s", desc, report.summary())  # the stage logs its one last line (StageReport.finish)
    return report
