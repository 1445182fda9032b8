"""Which stages are done for each slide of an output root: done, flagged, stale, failed (with the reason) or missing.

    python -m preprocess.status OUT [--cohort COHORT]

A stage counts as done for a slide when its output exists under its final name (every stage writes atomically, so
a name that exists is a complete file; HDF5 outputs are also opened) and, for the stages that keep done-records
(``{folder}/done/{slide}.json``, :mod:`pipeline.done`), its record is there and its input files are the ones it
was made from. The stages are the per-slide artifacts of :mod:`pipeline.artifacts` (OUT-relative; ``{E}``/``{R}``:
one column per encoder / run folder or file found):

<STAGE TABLE>

"stale": the output exists but its done-record is missing (an older version or an interrupted run made it) or an
input file changed since (e.g. a redone grid under an old patch store): the next run of the stage redoes it. A
slide is "failed" when the stage's failure record ``{folder}/done/{slide}.failed.json`` gives a reason (the last
run of that slide failed), or, without the output, when the stage left one elsewhere (``summary*.csv`` rows with
status failed, an ERROR line ``{slide}: reason`` in its ``*.log`` files); else "missing". Slides are the
cohort's (``--cohort``: ``pairs.csv`` when present, else ``he/``), else every slide id any output or record names.
The exit status is 0 (the command only reports), 2 when OUT or COHORT cannot be read.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import artifacts as art
from pipeline.cli import Stage, config_from_args
from pipeline.done import DONE_DIR, changed_inputs, read_failure
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

STATES = ("done", "flagged", "stale", "failed", "missing")


@dataclass(frozen=True)
class StageState:
    """State of one stage for one slide: one of ``STATES`` and a reason ("" when none)."""

    state: str
    reason: str = ""


@dataclass(frozen=True)
class StageColumn:
    """One status column, made from an artifact of the registry (the docstring's list is made from them).

    Attributes:
        name: column name; ``{E}``/``{R}`` in it makes one column per match of the same part of ``output``.
        output: the slide's output under OUT (``{slide}``; without ``{slide}`` the slide is a dataset in the file).
        records: folder under OUT whose ``done/`` holds the done- and failure records, or None.
        logs: folder under OUT with the stage's ``*.log`` / ``summary*.csv``.
        key: the artifact's registry key.
        note: what else marks the state (for the docstring).
    """

    name: str
    output: str
    records: str | None
    logs: str
    key: str
    note: str = ""


_TEMPLATE_VAR = re.compile(r"\{(?!slide\})(\w)\w*\}")


def _short(template: str) -> str:
    """``features/{encoder}`` -> ``features/{E}``: the registry's variables as one capital letter."""
    return _TEMPLATE_VAR.sub(lambda m: "{" + m.group(1).upper() + "}", template)


def stage_columns(registry: dict[str, art.Artifact] = art.REGISTRY) -> tuple[StageColumn, ...]:
    """The status columns: every per-slide artifact of ``registry`` (``{slide}`` in its name, or done-records), and
    the cohort-wide files whose ``column`` names one; in registry order (stage order)."""
    cols = []
    for a in registry.values():
        if a.column == "" or (a.column is None and "{slide}" not in a.name and not a.records):
            continue
        output = _short(a.template())
        records = _short(a.folder) if a.records else None
        notes = []
        if a.key == art.REGISTRATION.key:
            notes.append('its "status": ok = done, flagged = flagged (with its "reason")')
        if "{slide}" not in output:
            notes.append("a dataset named after the slide in the file")
        notes += [f"one column per {v} found" for v in re.findall(r"\{(?!slide\})(\w+)\}", a.template())]
        cols.append(StageColumn(_short(a.column or a.folder), output, records, records or str(Path(output).parent),
                                a.key, "; ".join(notes)))
    return tuple(cols)


STAGES: tuple[StageColumn, ...] = stage_columns()
_NOT_SLIDES = {"summary", "config", "normalization", "run"}
_VAR = re.compile(r"\{([A-Z])\}")


def _stage_table() -> str:
    rows = []
    for st in STAGES:
        marks = st.output + (f" (records in {st.records}/done/)" if st.records else "")
        line = f"    {st.name:<20}{marks}"
        note = f"; {st.note}" if st.note else ""
        rows.append(line + note if len(line + note) <= 116 else f"{line}\n    {'':<20}{note[2:]}")
    return "\n".join(rows)


__doc__ = (__doc__ or "").replace("<STAGE TABLE>", _stage_table())


@dataclass(frozen=True)
class Column:
    """A stage expanded for one output root: its column name and its templates with ``{E}``/``{R}`` filled in."""

    name: str
    output: str
    records: str | None
    logs: str
    key: str

    @property
    def per_file(self) -> bool:
        """The slides are datasets of one file (no ``{slide}`` in the output)."""
        return "{slide}" not in self.output

    def path(self, out: Path, slide: str) -> Path:
        return out / (self.output if self.per_file else self.output.replace("{slide}", slide))


def _fill(template: str, values: dict[str, str]) -> str:
    return _VAR.sub(lambda k: values[k.group(1)], template)


def columns(out: Path) -> list[Column]:
    """The stage columns of ``out``: the fixed ones, and one per folder/file found for templated stages."""
    cols = []
    for st in STAGES:
        if not _VAR.search(st.name):
            cols.append(Column(st.name, st.output, st.records, st.logs, st.key))
            continue
        base = st.output.split("{slide}")[0].rstrip("/") if "{slide}" in st.output else st.output
        rx = re.compile("^" + re.sub(r"\\\{([A-Z])\\\}", r"(?P<\1>[^/]+)", re.escape(base)) + "$")
        for match in sorted(out.glob(_VAR.sub("*", base))):
            m = rx.match(match.relative_to(out).as_posix())
            if m is None or any(v.startswith(".") for v in m.groupdict().values()):
                continue
            v = m.groupdict()
            cols.append(Column(_fill(st.name, v), _fill(st.output, v), _fill(st.records, v) if st.records else None,
                               _fill(st.logs, v), st.key))
    return cols


def _h5_ok(path: Path) -> str | None:
    """None when ``path`` opens as HDF5, else the error."""
    import h5py

    try:
        with h5py.File(path, "r"):
            return None
    except OSError as e:
        return f"unreadable HDF5 {path.name}: {e}"


def _output_state(col: Column, out: Path, slide: str) -> StageState | None:
    """The state its output shows (None: no output)."""
    path = col.path(out, slide)
    if not path.is_file():
        return None
    if col.per_file:
        import h5py

        try:
            with h5py.File(path, "r") as f:
                return StageState("done") if slide in f else None
        except OSError as e:
            return StageState("failed", f"unreadable HDF5 {path.name}: {e}")
    if path.suffix == ".h5":
        err = _h5_ok(path)
        if err:
            return StageState("failed", err)
    if col.key == art.REGISTRATION.key:
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            return StageState("failed", f"unreadable record {path.name}: {e}")
        if rec.get("status") == "flagged":
            return StageState("flagged", str(rec.get("reason") or "flagged by QC"))
    return StageState("done")


def _record_state(folder: Path, slide: str) -> StageState | None:
    """"stale" when the done-record is missing, unreadable, or an input file (not a folder) changed since."""
    path = folder / DONE_DIR / f"{slide}.json"
    try:
        rec = json.loads(path.read_text())
    except FileNotFoundError:
        return StageState("stale", "no done-record (an older version or an interrupted run): the next run redoes it")
    except (OSError, ValueError):
        return StageState("stale", f"unreadable done-record {path}: the next run redoes it")
    changed = [f"{role} {Path(p).name}" for role, p, _ in changed_inputs(rec.get("inputs") or {}, files_only=True)]
    if changed:
        return StageState("stale", f"input changed since it was done ({', '.join(changed)}): the next run redoes it")
    return None


_ERROR_LINE = re.compile(r"\bERROR\s+\S+:\s+(?P<slide>[A-Za-z0-9_-]+): (?P<reason>.*)$")
_EXCEPTION_LINE = re.compile(r"\bERROR\s+\S+:\s+(?P<slide>[A-Za-z0-9_-]+) failed$")


def _log_failures(folder: Path) -> dict[str, str]:
    """{slide: reason} from ``ERROR ...: {slide}: reason`` lines of the ``*.log`` files in ``folder`` (the last
    one per slide), plus ``summary*.csv`` rows whose status is ``failed``."""
    failed: dict[str, str] = {}
    if not folder.is_dir():
        return failed
    for p in sorted(folder.glob("*.log"), key=lambda p: p.stat().st_mtime):
        try:
            lines = p.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            m = _ERROR_LINE.search(line)
            if m:
                failed[m["slide"]] = m["reason"].strip()
            elif m := _EXCEPTION_LINE.search(line):
                failed[m["slide"]] = f"an exception (traceback in {p})"
    for p in sorted(folder.glob("summary*.csv")):
        with open(p, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("status") == "failed" and row.get("slide"):
                    failed[row["slide"]] = row.get("reason") or "failed"
    return failed


def stage_state(col: Column, out: Path, slide: str, log_failures: dict[str, str]) -> StageState:
    """The state of one stage column for one slide (see the module docstring for the order of the rules)."""
    st = _output_state(col, out, slide)
    failure = read_failure(out / col.records, slide) if col.records else None
    if failure is not None and (st is None or st.state != "failed"):
        return StageState("failed", failure)
    if st is None:
        reason = log_failures.get(slide)
        return StageState("failed", reason) if reason else StageState("missing")
    if st.state in ("done", "flagged") and col.records:
        return _record_state(out / col.records, slide) or st
    return st


def _ids_in(folder: Path, suffix: str) -> set[str]:
    if not folder.is_dir():
        return set()
    return {p.name[: -len(suffix)] for p in folder.iterdir()
            if p.name.endswith(suffix) and not p.name.startswith(".") and "." not in p.name[: -len(suffix)]}


def _slides_in(out: Path, cols: list[Column]) -> set[str]:
    """Every slide id an output or a record of ``cols`` names."""
    import h5py

    ids: set[str] = set()
    for col in cols:
        if col.per_file:
            try:
                with h5py.File(out / col.output, "r") as h:
                    ids |= set(h.keys())
            except OSError:
                pass
        else:
            rel = Path(col.output)
            ids |= _ids_in(out / rel.parent, rel.name.replace("{slide}", ""))
        if col.records:
            ids |= _ids_in(out / col.records / DONE_DIR, ".failed.json")
    return ids - _NOT_SLIDES


def slide_status(out: str | Path, slides: list[str] | None = None) -> dict[str, dict[str, StageState]]:
    """{slide: {stage column: StageState}} for ``slides`` (default: every slide an output names), sorted."""
    out = Path(out)
    if not out.is_dir():
        raise PipelineError(f"output folder not found: {out}")
    cols = columns(out)
    failures = {col.name: _log_failures(out / col.logs) for col in cols}
    ids = sorted(slides) if slides is not None else sorted(_slides_in(out, cols) |
                                                           {s for f in failures.values() for s in f})
    return {s: {col.name: stage_state(col, out, s, failures[col.name]) for col in cols} for s in ids}


def format_status(table: dict[str, dict[str, StageState]], width: int = 40) -> str:
    """The per-slide table (``done``, ``flagged: reason``, ``failed: reason``, ...), then counts per stage."""
    if not table:
        return "no slides found"
    cols = list(next(iter(table.values())))
    rows = [["slide", *cols]]
    for s, row in table.items():
        cells = []
        for c in cols:
            st = row[c]
            text = st.state if not st.reason else f"{st.state}: {st.reason}"
            cells.append(text if len(text) <= width else text[: width - 3] + "...")
        rows.append([s, *cells])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.append("")
    for c in cols:
        counts = {k: sum(row[c].state == k for row in table.values()) for k in STATES}
        extra = "".join(f", {counts[k]} {k}" for k in ("flagged", "stale") if counts[k])
        lines.append(f"{c}: {counts['done']} done, {counts['failed']} failed, {counts['missing']} missing{extra}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m preprocess.status", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="output root of the stages (OUT)")
    p.add_argument("--cohort", type=Path, default=None,
                   help="cohort folder: report its slides (pairs.csv when present, else he/; default: every slide "
                        "an output names)")
    return p


@dataclass(frozen=True)
class StatusConfig:
    """The arguments of ``python -m preprocess.status``; it logs warnings and errors only (the table is printed)."""

    out: Path
    cohort: Path | None = None
    log_level: str = "WARNING"


def make_config(args: argparse.Namespace) -> StatusConfig:
    return config_from_args(StatusConfig, args)


def run(cfg: StatusConfig, ctx: Any) -> int:
    """Print the table of ``cfg.out`` (the cohort's slides with ``cfg.cohort``); 0, it only reports."""
    slides = None
    if cfg.cohort is not None:
        from pipeline.cohort import resolve_slides

        if not cfg.cohort.is_dir():
            raise PipelineError(f"cohort folder not found: {cfg.cohort}")
        slides = resolve_slides(cfg.cohort, require_he=False).ids
    print(format_status(slide_status(cfg.out, slides)))
    return 0


STAGE = Stage("status", build_parser, make_config, run=run)


def main(argv: list[str] | None = None) -> int:
    return STAGE.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
