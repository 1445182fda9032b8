"""Which stages are done for each slide of an output root: done, flagged, stale, failed (with the reason) or missing.

    python -m preprocess.status OUT [--cohort COHORT]

A stage counts as done for a slide when its output exists under its final name (every stage writes atomically, so
a name that exists is a complete file); HDF5 outputs are also opened. The stages and what marks them done:

    patch           patches/{slide}.h5
    registration    registration/{slide}.json (its "status": ok = done, flagged = flagged, with its "reason")
    markers         markers/{slide}.csv
    he_patches      he_patches/{slide}.h5 (stale when older than patches/{slide}.h5)
    hex_pred        hex_pred/{slide}.h5
    virtual_codex   virtual_codex/{slide}.json
    features/E      features/E/h5_files/{slide}.h5, one column per encoder folder E
    codex_features/E  a dataset {slide} in codex_features/E.h5
    ig/R            mica_runs/R/ig/{slide}.h5, one column per MICA run R

A slide without the output is "failed" when the stage left a reason for it (``registration/summary.csv`` rows with
status failed, or an ERROR line ``{slide}: reason`` in the stage's ``*.log`` files), else "missing". Slides are
those of ``COHORT/he/`` with ``--cohort``, else every slide id any output names. The exit status is 0 (the command
only reports).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from preprocess.utils import PipelineError

log = logging.getLogger(__name__)

STATES = ("done", "flagged", "stale", "failed", "missing")


@dataclass(frozen=True)
class StageState:
    """State of one stage for one slide: one of ``STATES`` and a reason ("" when none)."""

    state: str
    reason: str = ""


def _h5_ok(path: Path) -> str | None:
    """None when ``path`` opens as HDF5, else the error."""
    import h5py

    try:
        with h5py.File(path, "r"):
            return None
    except OSError as e:
        return f"unreadable HDF5 {path.name}: {e}"


def _file_state(path: Path) -> StageState | None:
    if not path.is_file():
        return None
    if path.suffix == ".h5":
        err = _h5_ok(path)
        if err:
            return StageState("failed", err)
    return StageState("done")


def _registration_state(out: Path, slide: str) -> StageState | None:
    path = out / "registration" / f"{slide}.json"
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return StageState("failed", f"unreadable record {path.name}: {e}")
    if rec.get("status") == "flagged":
        return StageState("flagged", str(rec.get("reason") or "flagged by QC"))
    return StageState("done")


def _he_patches_state(out: Path, slide: str) -> StageState | None:
    st = _file_state(out / "he_patches" / f"{slide}.h5")
    grid = out / "patches" / f"{slide}.h5"
    if st is not None and st.state == "done" and grid.exists() and \
            grid.stat().st_mtime > (out / "he_patches" / f"{slide}.h5").stat().st_mtime:
        return StageState("stale", "patches/{slide}.h5 is newer: rerun stage 03".replace("{slide}", slide))
    return st


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


def _simple(folder: str, suffix: str) -> Callable[[Path, str], StageState | None]:
    return lambda out, slide: _file_state(out / folder / f"{slide}{suffix}")


STAGES: list[tuple[str, Callable[[Path, str], StageState | None]]] = [
    ("patch", _simple("patches", ".h5")),
    ("registration", _registration_state),
    ("markers", _simple("markers", ".csv")),
    ("he_patches", _he_patches_state),
    ("hex_pred", _simple("hex_pred", ".h5")),
    ("virtual_codex", _simple("virtual_codex", ".json")),
]
_STAGE_DIRS = {"patch": "patches", "registration": "registration", "markers": "markers",
               "he_patches": "he_patches", "hex_pred": "hex_pred", "virtual_codex": "virtual_codex"}


def _ids_in(folder: Path, suffix: str) -> set[str]:
    if not folder.is_dir():
        return set()
    return {p.name[: -len(suffix)] for p in folder.iterdir()
            if p.name.endswith(suffix) and not p.name.startswith(".") and "." not in p.name[: -len(suffix)]}


def _dynamic_stages(out: Path) -> list[tuple[str, Callable[[Path, str], StageState | None], Path]]:
    """Columns per feature encoder, CODEX-feature file and MICA run found under ``out``."""
    cols: list[tuple[str, Callable[[Path, str], StageState | None], Path]] = []
    for d in sorted((out / "features").glob("*/h5_files")):
        cols.append((f"features/{d.parent.name}", lambda o, s, d=d: _file_state(d / f"{s}.h5"), d.parent))
    for f in sorted((out / "codex_features").glob("*.h5")):
        if f.name.startswith("."):
            continue
        cols.append((f"codex_features/{f.stem}", lambda o, s, f=f: _codex_feature_state(f, s), f.with_suffix("")))
    for d in sorted((out / "mica_runs").glob("*/ig")):
        cols.append((f"ig/{d.parent.name}", lambda o, s, d=d: _file_state(d / f"{s}.h5"), d))
    return cols


def _codex_feature_state(path: Path, slide: str) -> StageState | None:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return StageState("done") if slide in f else None
    except OSError as e:
        return StageState("failed", f"unreadable HDF5 {path.name}: {e}")


def _slides_in(out: Path) -> set[str]:
    ids: set[str] = set()
    for folder, suffix in (("patches", ".h5"), ("registration", ".json"), ("markers", ".csv"), ("he_patches", ".h5"),
                           ("hex_pred", ".h5"), ("virtual_codex", ".json")):
        ids |= _ids_in(out / folder, suffix)
    for d in list((out / "features").glob("*/h5_files")) + list((out / "mica_runs").glob("*/ig")):
        ids |= _ids_in(d, ".h5")
    for f in (out / "codex_features").glob("*.h5"):
        import h5py

        try:
            with h5py.File(f, "r") as h:
                ids |= set(h.keys())
        except OSError:
            continue
    ids -= {"summary", "config", "normalization", "run"}
    return ids


def slide_status(out: str | Path, slides: list[str] | None = None) -> dict[str, dict[str, StageState]]:
    """{slide: {stage column: StageState}} for ``slides`` (default: every slide an output names), sorted."""
    out = Path(out)
    if not out.is_dir():
        raise PipelineError(f"output folder not found: {out}")
    dynamic = _dynamic_stages(out)
    failures = {name: _log_failures(out / _STAGE_DIRS[name]) for name, _ in STAGES}
    failures.update({name: _log_failures(folder) for name, _, folder in dynamic})
    ids = sorted(slides) if slides is not None else sorted(_slides_in(out) | {s for f in failures.values() for s in f})
    table: dict[str, dict[str, StageState]] = {}
    for s in ids:
        row: dict[str, StageState] = {}
        for name, fn in [(n, f) for n, f in STAGES] + [(n, f) for n, f, _ in dynamic]:
            st = fn(out, s)
            if st is None:
                reason = failures[name].get(s)
                st = StageState("failed", reason) if reason else StageState("missing")
            row[name] = st
        table[s] = row
    return table


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
                   help="cohort folder: report the slides of COHORT/he/ (default: every slide an output names)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        slides = None
        if args.cohort is not None:
            from preprocess.slide_io import list_he_slides

            slides = sorted(list_he_slides(args.cohort / "he"))
        table = slide_status(args.out, slides)
    except PipelineError as e:
        log.error("%s", e)
        return 2
    print(format_status(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
