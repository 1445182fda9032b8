"""Done-records: a slide counts as done only with the inputs and settings that produced its outputs.

Every per-slide stage keeps, next to its outputs, ``{stage folder}/done/{slide}.json``::

    {"schema": 2, "settings": {"min_tissue": 0.5, ...},
     "inputs": {"he": {"path": "/data/he/slide_000.svs", "size": 123, "mtime_ns": 169...}, ...},
     "outputs": ["slide_000.h5", "slide_000_tissue.png"], "time": "2026-12-01 12:00:00"}

A rerun compares the record with what it would do now (:func:`check`):

- outputs missing, no record (outputs of an older version) or another schema -> the slide is redone, and the log says
  why;
- an input file changed (size or mtime: an upstream stage was redone, the panel was fixed) -> redone, said so;
- other settings or other input files (another path for a role) -> a *conflict*: the stage stops before any work
  with ``done with other settings: <diff>; pass --overwrite`` (:func:`conflict_error`), so that one output folder
  never mixes slides made two ways and ``config.json`` describes every output in it.

A slide that fails leaves ``done/{slide}.failed.json`` with the reason (read by ``preprocess.status``).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.io import write_json

DONE_DIR = "done"


def file_stamp(path: str | os.PathLike) -> dict[str, Any]:
    """``{"path", "size", "mtime_ns"}`` of an input file (a folder: its newest file); missing -> size -1."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return {"path": str(p), "size": -1, "mtime_ns": 0}
    if p.is_dir():
        mt = max([st.st_mtime_ns] + [q.stat().st_mtime_ns for q in p.rglob("*") if q.is_file()])
        return {"path": str(p), "size": 0, "mtime_ns": int(mt)}
    return {"path": str(p), "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def _plain(v: Any) -> Any:
    """JSON-comparable form of a setting (tuples -> lists, paths -> str, numpy scalars -> Python)."""
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        return v.item()
    return v


@dataclass(frozen=True)
class DoneSpec:
    """What makes one stage's slide output: where records live, the settings, the schema, and each slide's files.

    Args:
        folder: the stage's output folder; records go to ``folder/done/{slide}.json``.
        settings: every setting that changes the outputs (JSON-able; not workers, threads or logging).
        schema: the stage's output schema version (bump it when the code changes what it writes).
        inputs: slide -> {role: input file}, e.g. ``{"he": ..., "grid": ...}`` (picklable: a module-level
            function or a ``functools.partial``).
        outputs: slide -> the output files that must all exist for the slide to count as done.
        slide_settings: slide -> the settings that differ per slide (e.g. a pixel-size table's value), merged
            over ``settings`` in that slide's record (:meth:`settings_of`); None when every slide has ``settings``.
    """

    folder: Path
    settings: Mapping[str, Any]
    schema: int
    inputs: Callable[[str], Mapping[str, str | os.PathLike]]
    outputs: Callable[[str], Sequence[str | os.PathLike]]
    slide_settings: Callable[[str], Mapping[str, Any]] | None = None

    def settings_of(self, slide: str) -> dict[str, Any]:
        """The settings that make ``slide``: ``settings`` with its per-slide ones (``slide_settings``) over them."""
        return {**self.settings, **(self.slide_settings(slide) if self.slide_settings is not None else {})}

    def record_path(self, slide: str) -> Path:
        return Path(self.folder) / DONE_DIR / f"{slide}.json"

    def failed_path(self, slide: str) -> Path:
        return Path(self.folder) / DONE_DIR / f"{slide}.failed.json"


@dataclass(frozen=True)
class DoneState:
    """``state``: "done" (skip), "redo" (do it, ``reason`` says why) or "conflict" (``reason`` is the diff)."""

    state: str
    reason: str = ""


def diff_settings(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``["min_tissue 0.5 -> 0.3", ...]``: the settings whose value differs (a missing one shows as ``unset``)."""
    old, new = _plain(old), _plain(new)
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "unset"), new.get(k, "unset")
        if a != b:
            out.append(f"{k} {json.dumps(a)} -> {json.dumps(b)}")
    return out


def changed_inputs(inputs: Mapping[str, Mapping[str, Any]], files_only: bool = False) -> list[tuple[str, str, bool]]:
    """``(role, path, gone)`` of each input of a record (``{role: file_stamp}``) whose size or mtime differs now;
    ``gone``: the file existed when recorded and does not now. ``files_only`` skips inputs that are folders."""
    out = []
    for role, was in sorted(inputs.items()):
        path = str(was.get("path", ""))
        if files_only and Path(path).is_dir():
            continue
        now = file_stamp(path)
        if (was.get("size"), was.get("mtime_ns")) != (now["size"], now["mtime_ns"]):
            out.append((role, path, now["size"] < 0 <= int(was.get("size", -1))))
    return out


def check(spec: DoneSpec, slide: str) -> DoneState:
    """Compare the slide's done-record with ``spec`` (see the module docstring)."""
    outs = [Path(p) for p in spec.outputs(slide)]
    if not all(p.exists() for p in outs):
        return DoneState("redo", "not done")
    try:
        rec = json.loads(spec.record_path(slide).read_text())
    except FileNotFoundError:
        return DoneState("redo", f"its outputs have no done-record ({spec.record_path(slide)}): made by an older "
                                 "version or an interrupted run; redoing it")
    except (OSError, ValueError):
        return DoneState("redo", f"unreadable done-record {spec.record_path(slide)}; redoing it")
    if rec.get("schema") != spec.schema:
        return DoneState("redo", f"made by another version of the code (schema {rec.get('schema')} -> "
                                 f"{spec.schema}); redoing it")
    diffs = diff_settings(rec.get("settings", {}), spec.settings_of(slide))
    now = {k: str(Path(v)) for k, v in spec.inputs(slide).items()}
    was = rec.get("inputs", {})
    for role in sorted(set(was) | set(now)):
        a, b = was.get(role, {}).get("path", "unset"), now.get(role, "unset")
        if a != b:
            diffs.append(f"input {role} {a} -> {b}")
    if diffs:
        return DoneState("conflict", ", ".join(diffs))
    changed = [f"{role} {path}" for role, path, _ in changed_inputs(was)]
    if changed:
        return DoneState("redo", f"input changed since it was done ({'; '.join(changed)}); redoing it")
    return DoneState("done")


def write_record(spec: DoneSpec, slide: str, inputs: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Record that ``slide`` is done with ``spec`` (atomically); removes an earlier failure record.

    ``inputs`` are the stamps taken *before* the work (so an input that changed during it redoes the slide next
    time); default: stamps taken now.
    """
    stamps = dict(inputs) if inputs is not None else {k: file_stamp(v) for k, v in spec.inputs(slide).items()}
    path = spec.record_path(slide)
    write_json(path, {"schema": spec.schema, "settings": _plain(spec.settings_of(slide)), "inputs": stamps,
                      "outputs": [Path(p).name for p in spec.outputs(slide)],
                      "time": time.strftime("%Y-%m-%d %H:%M:%S")})
    with contextlib.suppress(FileNotFoundError):
        spec.failed_path(slide).unlink()
    return path


def write_failure(spec: DoneSpec, slide: str, reason: str) -> None:
    """Record why ``slide`` failed (``done/{slide}.failed.json``) and drop its done-record."""
    clear(spec, slide)
    write_json(spec.failed_path(slide), {"reason": reason, "time": time.strftime("%Y-%m-%d %H:%M:%S")})


def clear(spec: DoneSpec, slide: str) -> None:
    """Remove the slide's done-record (before it is redone)."""
    with contextlib.suppress(FileNotFoundError):
        spec.record_path(slide).unlink()


def read_failure(folder: str | os.PathLike, slide: str) -> str | None:
    """The reason recorded by :func:`write_failure`, or None."""
    try:
        return str(json.loads((Path(folder) / DONE_DIR / f"{slide}.failed.json").read_text())["reason"])
    except (OSError, ValueError, KeyError):
        return None


def conflict_error(conflicts: Mapping[str, str], desc: str) -> PipelineError:
    """One line for the slides whose outputs were made with other settings or inputs."""
    first = next(iter(conflicts))
    groups: dict[str, list[str]] = {}
    for s, d in conflicts.items():
        groups.setdefault(d, []).append(s)
    diff = conflicts[first]
    names = groups[diff]
    more = len(conflicts) - len(names)
    return PipelineError(
        f"{desc}: {len(conflicts)} slides are done with other settings: {diff} "
        f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}"
        f"{f'; {more} more with other differences' if more else ''}); pass --overwrite to redo them with these "
        "settings, or use another --out")


def conflicts(spec: DoneSpec, slides: Sequence[str]) -> dict[str, str]:
    """{slide: diff} of the slides done with other settings or input files than ``spec``."""
    return {s: st.reason for s in slides if (st := check(spec, s)).state == "conflict"}


def recorded_slides(folder: str | os.PathLike) -> list[str]:
    """Slides with a done-record in ``folder/done/``."""
    d = Path(folder) / DONE_DIR
    if not d.is_dir():
        return []
    return sorted(p.name[: -len(".json")] for p in d.glob("*.json") if not p.name.endswith(".failed.json"))


def other_settings(spec: DoneSpec, exclude: Sequence[str] = ()) -> dict[str, str]:
    """{slide: diff} of the slides of ``spec.folder`` (outside ``exclude``) whose done-record holds other settings
    than ``spec``: a run over some slides (``--slides``, ``--shard``) must not claim its settings for them."""
    skip, out = set(exclude), {}
    for slide in recorded_slides(spec.folder):
        if slide in skip:
            continue
        try:
            rec = json.loads(spec.record_path(slide).read_text())
        except (OSError, ValueError):
            continue
        diffs = diff_settings(spec.settings_of(slide), rec.get("settings", {}))
        if diffs:
            out[slide] = ", ".join(diffs)
    return out


def stop_on_conflicts(spec: DoneSpec, slides: Sequence[str], desc: str, overwrite: bool = False) -> None:
    """Raise the one-line :func:`conflict_error` when a slide is done with other settings (unless ``overwrite``).

    Stages call it before ``save_config`` and before any work, so that the run config always describes the outputs.
    """
    if not overwrite:
        found = conflicts(spec, slides)
        if found:
            raise conflict_error(found, desc)
