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


def _file_mode() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()
"""Mode of every output file: what ``open()`` gives under this process's umask (0644 under the usual 022)."""

_TEMP_RE = r"^\.{stem}\.(\d+)\.[0-9a-f]{{12}}\.tmp"


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
        if tmp_path.is_file():  # writers that create their own files (safetensors: 0600) get the usual mode too
            os.chmod(tmp_path, FILE_MODE)
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def remove_stale_temps(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Delete the temp files that :func:`atomic_path` left for ``paths`` in a killed run; returns those removed.

    A temp file of a process that is still running (same pid, alive) is kept: it may be writing it now.
    """
    import re

    removed = []
    for p in map(Path, paths):
        if not p.parent.is_dir():
            continue
        rx = re.compile(_TEMP_RE.format(stem=re.escape(p.stem)))
        for q in p.parent.iterdir():
            m = rx.match(q.name)
            if m is None or (int(m.group(1)) != os.getpid() and _pid_alive(int(m.group(1)))):
                continue
            if q.is_dir() and not q.is_symlink():
                import shutil

                shutil.rmtree(q, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    q.unlink()
            removed.append(q)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def ensure_writable(folder: str | os.PathLike, what: str = "output folder", fix: str = "choose another --out") -> Path:
    """Create ``folder`` if needed and check a file can be written in it; else one-line :class:`PipelineError`.

    Stages call it before the first slide or epoch, so an unwritable output stops the run at once, naming the path.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PipelineError(f"cannot create the {what} {folder} ({e.strerror or e}); {fix} or fix its "
                            "permissions") from None
    probe = folder / f".write_test.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PipelineError(f"the {what} {folder} is not writable ({e.strerror or e}); {fix} or fix its "
                            "permissions") from None
    return folder


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
    from preprocess import done as done_mod

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

    ``done`` (a :class:`preprocess.done.DoneSpec`) decides what "done" means: the slide's outputs exist and its
    done-record holds these settings and inputs (:func:`preprocess.done.check`). A slide done with *other*
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
    from preprocess import done as done_mod

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
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(work, s): s for s in todo}
            for fut in tqdm(as_completed(futures), total=len(futures), desc=desc, unit="slide"):
                _record(futures[fut], fut.result)
    log.debug("%s: %s", desc, report.summary())  # the stage logs its one last line (StageReport.finish)
    return report
