"""Shared helpers for every stage: atomic writes, resolved-config JSON, logging, and the per-slide stage runner.

The stage runner follows one loop for all per-slide stages (TRIDENT-style, without its pitfalls):
skip slides already done -> check inputs -> do the work (which writes to a temp file and ``os.replace``s it)
-> record the outcome; at the end it logs counts of done / skipped / failed and the caller exits non-zero when
any slide failed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger(__name__)


class PipelineError(RuntimeError):
    """Bad input a user can fix; the message names the file and the fix."""


# ----------------------------------------------------------------------------------------------------------------
# atomic writes


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``, on error removed.

    A crash never leaves a half-written file under the final name, so "exists" can mean "done".
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix if suffix is not None else "".join(path.suffixes[-1:])
    # a unique name that the writer creates itself, so the file gets the usual umask permissions (mkstemp: 0600)
    tmp_path = path.parent / f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp{suffix}"
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    if isinstance(obj, set):
        return sorted(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically (numpy values and paths are converted)."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def save_config(out_dir: str | os.PathLike, config: Any, name: str = "config.json") -> Path:
    """Save the resolved configuration of a run (an argparse Namespace or a dict) as JSON next to its outputs."""
    cfg = dict(vars(config)) if not isinstance(config, dict) else dict(config)
    cfg["_argv"] = sys.argv
    cfg["_time"] = time.strftime("%Y-%m-%d %H:%M:%S")
    path = Path(out_dir) / name
    write_json(path, cfg)
    return path


def default_threads(workers: int, cap: int = 4) -> int:
    """Threads per slide when ``workers`` slides run in parallel: the cores left to each, between 1 and ``cap``."""
    return max(1, min(cap, (os.cpu_count() or 1) // max(1, workers)))


# ----------------------------------------------------------------------------------------------------------------
# logging


def setup_logging(log_file: str | os.PathLike | None = None, level: int = logging.INFO, rank: int = 0) -> None:
    """Log to stderr (and to ``log_file`` when given). Ranks other than 0 only log warnings."""
    root = logging.getLogger()
    root.setLevel(level if rank == 0 else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
               for h in root.handlers):
        sh = logging.StreamHandler()
        sh.setFormatter(fmt)
        root.addHandler(sh)
    if log_file is not None and rank == 0:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        root.addHandler(fh)
    for noisy in ("PIL", "matplotlib", "h5py", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ----------------------------------------------------------------------------------------------------------------
# slide ids and selection


def slide_id_from_path(path: str | os.PathLike) -> str:
    """Slide id = file name up to its first dot (``slide_000.ome.tif`` -> ``slide_000``)."""
    return Path(path).name.split(".", 1)[0]


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


def shard_config_name(shard: str | None, stem: str = "config") -> str:
    """``config.json``, or ``config_shard{i}of{n}.json`` for a job-array shard (shards do not overwrite each
    other's resolved configuration)."""
    parsed = parse_shard(shard)
    return f"{stem}.json" if parsed is None else f"{stem}_shard{parsed[0]}of{parsed[1]}.json"


def remove_outputs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Delete the files (or folders) that exist among ``paths``; returns those removed.

    Stages call it before they redo a slide, so that a slide failing on a rerun leaves no earlier output that a
    later stage would trust.
    """
    import shutil

    removed = []
    for p in map(Path, paths):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        elif p.exists() or p.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            removed.append(p)
    return removed


def select_slides(available: Sequence[str], wanted: Sequence[str] | None, source: str) -> list[str]:
    """Keep ``wanted`` slide ids (all when None); an id that is not available is an error naming ``source``."""
    if not wanted:
        return list(available)
    missing = [s for s in wanted if s not in set(available)]
    if missing:
        raise PipelineError(f"slides {missing} not found in {source}; available: {list(available)[:10]}...")
    return list(wanted)


# ----------------------------------------------------------------------------------------------------------------
# the stage runner


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


def run_slides(
    slides: Iterable[str],
    work: Callable[[str], Any],
    is_done: Callable[[str], bool],
    *,
    overwrite: bool = False,
    workers: int = 1,
    skip_errors: bool = True,
    desc: str = "slides",
    outputs: Callable[[str], Iterable[str | os.PathLike]] | None = None,
) -> StageReport:
    """Run ``work(slide)`` for every slide not already done (unless ``overwrite``).

    ``outputs(slide)``, when given, lists the slide's output files: those of every slide that is (re)done are
    removed first, so a slide that fails leaves none behind (no stale output that a later stage would trust).

    ``work`` must write its outputs atomically and be picklable when ``workers > 1`` (a module-level function or
    a ``functools.partial`` of one). With ``skip_errors`` a failing slide is recorded and the loop goes on; the
    caller decides the exit code from ``report.ok``. :class:`PipelineError` messages are logged without a
    traceback (they are user errors); anything else is logged with its traceback.
    """
    report = StageReport()
    todo = []
    for s in slides:
        if not overwrite and is_done(s):
            report.skipped.append(s)
        else:
            todo.append(s)
    if report.skipped:
        log.info("%s: %d slides already done (use --overwrite to redo)", desc, len(report.skipped))

    for s in todo:
        if outputs is not None:
            gone = remove_outputs(outputs(s))
            if gone:
                log.debug("%s: removed earlier outputs %s before redoing it", s, [str(p) for p in gone])

    def _record(slide: str, fn: Callable[[], Any]) -> None:
        try:
            report.results[slide] = fn()
            report.done.append(slide)
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

    if workers <= 1 or len(todo) <= 1:
        for s in tqdm(todo, desc=desc, unit="slide", disable=not todo):
            _record(s, lambda s=s: work(s))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(work, s): s for s in todo}
            for fut in tqdm(as_completed(futures), total=len(futures), desc=desc, unit="slide"):
                _record(futures[fut], fut.result)
    log.info("%s: %s", desc, report.summary())
    return report
