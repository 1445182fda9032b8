"""Validate a cohort folder before any stage runs, and print one row per slide.

    python -m preprocess.check_cohort COHORT [--out OUT]

Checks (COHORT in the sample-cohort layout of docs/FORMATS.md):

- ``he/``: every file opens with OpenSlide, has a level-0 µm/px (else a warning: the stages need ``--mpp``), is not
  empty, has an ASCII name (warning otherwise); no two files share a slide id (the file name up to its first dot,
  so a rescan ``slide_000.v2.tif`` beside ``slide_000.tif`` is an error); a symbolic link must point to an existing
  file with the same slide id (stages name outputs after the link or after its target).
- ``pairs.csv``: its files exist and its slide ids are those of ``he/``.
- ``codex/``: every CODEX opens, has a pixel size (``PhysicalSizeX/Y``) and its OME channel names agree with
  ``marker_panel.csv`` (case and punctuation ignored).
- ``clinical.csv``: columns ``case_id,slide_id,survival_months,censorship``, one row per slide, slides in ``he/``.
- ``splits/splits_*.csv``: columns ``train,val``, slides in ``he/``, no slide and no patient (via ``clinical.csv``)
  in both columns.

Table columns: he, codex, mpp, panel, clinical, splits; each cell is ``ok`` or the (shortened) problem; every
problem is then listed in full. Exit status: 0 when nothing is an error (warnings do not fail), 1 when anything
is, 2 when COHORT is not a folder.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from preprocess.cohort_tables import COHORT_ROW, ERROR, WARNING, check_clinical, check_splits
from preprocess.panel import read_marker_panel, resolve_channel_map
from preprocess.slide_io import HE_EXTENSIONS, CodexImage, HESlide, read_pairs
from preprocess.utils import PipelineError, slide_id_from_path

log = logging.getLogger(__name__)

COLUMNS = ("he", "codex", "mpp", "panel", "clinical", "splits")


@dataclass(frozen=True)
class Finding:
    """One problem: the slide it concerns (``COHORT_ROW`` for the whole cohort), the table column, its level
    (``"error"`` or ``"warning"``) and a message naming the file and the fix."""

    slide: str
    column: str
    level: str
    message: str


@dataclass
class CohortCheck:
    """Outcome of :func:`check_cohort`: the slide ids of ``he/`` (sorted), every finding and per-slide mpp text."""

    slides: list[str]
    findings: list[Finding]
    mpp: dict[str, str]

    @property
    def ok(self) -> bool:
        return not any(f.level == ERROR for f in self.findings)

    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == ERROR]

    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == WARNING]


class _Collector:
    def __init__(self) -> None:
        self.findings: list[Finding] = []

    def add(self, slide: str, column: str, level: str, message: str) -> None:
        self.findings.append(Finding(slide, column, level, message))


# ----------------------------------------------------------------------------------------------------------------
# H&E


def _check_he(cohort: Path, c: _Collector, mpp: dict[str, str]) -> dict[str, Path]:
    """Check ``he/``; returns {slide id: path} of the files that pass (one per id)."""
    he_dir = cohort / "he"
    if not he_dir.is_dir():
        c.add(COHORT_ROW, "he", ERROR, f"H&E folder not found: {he_dir} (put the H&E slides in COHORT/he/)")
        return {}
    entries = sorted(p for p in he_dir.iterdir() if not p.name.startswith("."))
    by_id: dict[str, list[Path]] = {}
    for p in entries:
        if p.is_dir() and not p.name.lower().endswith(".mrxs"):  # .mrxs keeps a data folder beside the file
            if not (he_dir / f"{p.name}.mrxs").exists():
                c.add(COHORT_ROW, "he", WARNING, f"{p} is a folder, not a slide; it is ignored")
            continue
        if p.suffix.lower() not in HE_EXTENSIONS:
            c.add(COHORT_ROW, "he", WARNING, f"{p}: not an H&E slide extension ({', '.join(HE_EXTENSIONS)}); "
                                            "the stages ignore it")
            continue
        by_id.setdefault(slide_id_from_path(p), []).append(p)

    good: dict[str, Path] = {}
    targets: dict[Path, list[str]] = {}
    for sid, paths in sorted(by_id.items()):
        if len(paths) > 1:
            names = ", ".join(p.name for p in paths)
            c.add(sid, "he", ERROR, f"{len(paths)} H&E files share the slide id {sid} ({names}) in {he_dir}; keep one "
                                    "per slide (move rescans out of he/, or rename so the part before the first dot "
                                    "differs)")
            continue
        p = paths[0]
        if not p.name.isascii():
            c.add(sid, "he", WARNING, f"{p.name}: non-ASCII file name; some tools and clusters mangle it, rename it "
                                      "with ASCII characters")
        if p.is_symlink():
            target = Path(os.path.realpath(p))
            if not target.exists():
                c.add(sid, "he", ERROR, f"{p} is a symbolic link to {os.readlink(p)}, which does not exist; fix the "
                                        "link or copy the slide into he/")
                continue
            if slide_id_from_path(target) != sid:
                c.add(sid, "he", ERROR, f"{p} is a symbolic link to {target}, whose slide id "
                                        f"{slide_id_from_path(target)} differs from {sid}; stages would name outputs "
                                        "after either; rename the link or the target so both ids agree")
                continue
            targets.setdefault(target, []).append(sid)
        else:
            targets.setdefault(p.resolve(), []).append(sid)
        if p.stat().st_size == 0:
            c.add(sid, "he", ERROR, f"{p} is an empty (zero-byte) file; copy the slide again")
            continue
        if _open_he(sid, p, c, mpp):
            good[sid] = p
    for target, sids in targets.items():
        if len(sids) > 1:
            for sid in sids:
                c.add(sid, "he", ERROR, f"slides {', '.join(sids)} in {he_dir} are the same file {target}; keep one")
                good.pop(sid, None)
    return good


def _open_he(sid: str, p: Path, c: _Collector, mpp: dict[str, str]) -> bool:
    """Open ``p`` with OpenSlide; a missing level-0 µm/px is a warning (``--mpp`` fixes it), anything else an error."""
    try:
        with HESlide(p) as s:
            mpp[sid] = f"he {s.mpp:.3g}"
        return True
    except PipelineError as e:
        first = e
    try:  # does it open when the pixel size is given? then the metadata was the problem
        with HESlide(p, mpp=1.0):
            pass
    except PipelineError as e:
        c.add(sid, "he", ERROR, str(e))
        return False
    c.add(sid, "mpp", WARNING, str(first))
    mpp[sid] = "he ?"
    return True


# ----------------------------------------------------------------------------------------------------------------
# pairs, CODEX, panel


def _codex_paths(cohort: Path, he: dict[str, Path], all_ids: list[str], c: _Collector) -> dict[str, Path | None]:
    """{slide: CODEX path or None}: from ``pairs.csv`` (checked against ``he/``) or ``codex/{slide}.*``."""
    pairs_path = cohort / "pairs.csv"
    out: dict[str, Path | None] = {}
    if pairs_path.exists():
        try:
            read_pairs(pairs_path)  # its own checks: columns, a slide listed twice
        except PipelineError as e:
            c.add(COHORT_ROW, "codex", ERROR, str(e))
            return {}
        pairs = _pairs_as_written(pairs_path)
        for sid, (he_path, codex) in pairs.items():
            if sid not in all_ids:
                c.add(sid, "he", ERROR, f"pairs.csv ({pairs_path}) lists slide {sid} ({he_path}) that is not in "
                                        f"{cohort / 'he'} under that id; fix the row or the file name")
            if not he_path.exists():
                c.add(sid, "he", ERROR, f"pairs.csv ({pairs_path}) names the H&E file {he_path}, which does not exist")
            if codex is None:
                c.add(sid, "codex", WARNING, f"pairs.csv ({pairs_path}) gives no CODEX image for {sid}; it cannot be "
                                             "registered or labelled")
            elif not codex.exists():
                c.add(sid, "codex", ERROR, f"pairs.csv ({pairs_path}) names the CODEX image {codex}, which does not "
                                           "exist")
                codex = None
            out[sid] = codex
        for sid in all_ids:
            if sid not in pairs:
                c.add(sid, "codex", WARNING, f"slide {sid} is not in {pairs_path}; stages that read it skip the slide")
        return out
    c.add(COHORT_ROW, "codex", WARNING, f"no pairs.csv in {cohort}: CODEX images are looked up as codex/{{slide}}.*")
    codex_dir = cohort / "codex"
    found = {}
    if codex_dir.is_dir():
        for p in sorted(codex_dir.iterdir()):
            if not p.name.startswith("."):
                found.setdefault(slide_id_from_path(p), p)
    for sid in he:
        out[sid] = found.get(sid)
        if out[sid] is None:
            c.add(sid, "codex", WARNING, f"no CODEX image for {sid} in {codex_dir}")
    return out


def _pairs_as_written(path: Path) -> dict[str, tuple[Path, Path | None]]:
    """``pairs.csv`` rows by the slide id of the H&E path as written (a link keeps its own name; ``read_pairs``
    resolves links, so its ids are the targets')."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out: dict[str, tuple[Path, Path | None]] = {}
    for r in rows:
        he = path.parent / r["he_slide"].strip()
        cx = (r["codex_image"] or "").strip()
        out[slide_id_from_path(he)] = (he, path.parent / cx if cx else None)
    return out


def _check_codex(sid: str, path: Path, panel: list[tuple[int, str]] | None, panel_path: Path, c: _Collector,
                 mpp: dict[str, str]) -> None:
    if path.stat().st_size == 0:
        c.add(sid, "codex", ERROR, f"{path} is an empty (zero-byte) file; copy the CODEX image again")
        return
    try:
        codex = CodexImage(path)
    except PipelineError as e:
        try:  # opens with a given pixel size: the OME size was the problem
            CodexImage(path, mpp=1.0).close()
        except PipelineError as e2:
            c.add(sid, "codex", ERROR, str(e2))
            return
        c.add(sid, "mpp", WARNING, str(e))
        mpp[sid] = f"{mpp.get(sid, 'he -')}, codex ?"
        codex = CodexImage(path, mpp=1.0)
    else:
        mpp[sid] = f"{mpp.get(sid, 'he -')}, codex {codex.mpp:.3g}"
    with codex:
        if panel is None:
            return
        if not codex.channel_names:
            c.add(sid, "panel", WARNING, f"{path} has no OME channel names; the panel {panel_path} cannot be checked "
                                         "against it")
        try:
            resolve_channel_map(codex, [m for _, m in panel], panel, panel_path)
        except PipelineError as e:
            c.add(sid, "panel", ERROR, str(e))


# ----------------------------------------------------------------------------------------------------------------
# clinical and splits


def check_output_folder(out: Path, c: _Collector) -> None:
    """``out`` must be a writable folder, or creatable in a writable parent."""
    p = out.resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        c.add(COHORT_ROW, "he", ERROR, f"output folder {out}: {p} is not a folder; choose another OUT")
    elif not os.access(p, os.W_OK | os.X_OK):
        c.add(COHORT_ROW, "he", ERROR, f"output folder {out} is not writable ({p}); choose another OUT or fix its "
                                       "permissions")


def check_cohort(cohort: str | os.PathLike, out: str | os.PathLike | None = None) -> CohortCheck:
    """Run every check on ``cohort`` (and the output folder ``out`` when given); see the module docstring."""
    cohort = Path(cohort)
    if not cohort.is_dir():
        raise PipelineError(f"cohort folder not found: {cohort}")
    c = _Collector()
    mpp: dict[str, str] = {}
    he = _check_he(cohort, c, mpp)
    he_dir = cohort / "he"
    all_ids = sorted({slide_id_from_path(p) for p in he_dir.iterdir()
                      if not p.name.startswith(".") and p.suffix.lower() in HE_EXTENSIONS}) if he_dir.is_dir() else []
    codex = _codex_paths(cohort, he, all_ids, c)
    panel_path = cohort / "marker_panel.csv"
    panel = None
    if panel_path.exists():
        try:
            panel = read_marker_panel(panel_path)
        except PipelineError as e:
            c.add(COHORT_ROW, "panel", ERROR, str(e))
    else:
        c.add(COHORT_ROW, "panel", WARNING, f"no marker panel {panel_path}: stages map markers by OME channel names")
    for sid, path in sorted(codex.items()):
        if path is not None and sid in all_ids:
            _check_codex(sid, path, panel, panel_path, c, mpp)
    case_of = check_clinical(cohort, all_ids, c)
    check_splits(cohort, all_ids, case_of, c)
    if out is not None:
        check_output_folder(Path(out), c)
    return CohortCheck(slides=all_ids, findings=c.findings, mpp=mpp)


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def format_table(result: CohortCheck, width: int = 34) -> str:
    """One row per slide (plus ``(cohort)`` and slides only other tables name): ``ok`` or the first problem."""
    rows_ids = list(result.slides)
    rows_ids += sorted({f.slide for f in result.findings} - set(rows_ids) - {COHORT_ROW})
    if any(f.slide == COHORT_ROW for f in result.findings):
        rows_ids.append(COHORT_ROW)
    table = [["slide", *COLUMNS]]
    for sid in rows_ids:
        row = [sid]
        for col in COLUMNS:
            fs = [f for f in result.findings if f.slide == sid and f.column == col]
            fs.sort(key=lambda f: f.level != ERROR)
            if fs:
                tag = "ERROR" if fs[0].level == ERROR else "warn"
                cell = f"{tag}: {fs[0].message}"
            elif col == "mpp" and sid in result.mpp:
                cell = result.mpp[sid]
            else:
                cell = "ok" if sid in result.slides else ""
            row.append(_short(cell, width))
        table.append(row)
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in table)


def format_report(result: CohortCheck) -> str:
    """The table, every problem in full, and a one-line summary."""
    lines = [format_table(result), ""]
    for f in sorted(result.findings, key=lambda f: (f.level != ERROR, f.slide, f.column)):
        lines.append(f"{f.level.upper()} [{f.slide} / {f.column}] {f.message}")
    n_e, n_w = len(result.errors()), len(result.warnings())
    verdict = "cohort OK" if result.ok else "cohort has errors: fix them before running the stages"
    lines.append(f"{verdict}: {len(result.slides)} slides, {n_e} errors, {n_w} warnings")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m preprocess.check_cohort", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cohort", type=Path, help="cohort folder (he/, codex/, pairs.csv, marker_panel.csv, "
                                             "clinical.csv, splits/)")
    p.add_argument("--out", type=Path, default=None, help="output root the stages will write (checked writable)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = check_cohort(args.cohort, args.out)
    except PipelineError as e:
        log.error("%s", e)
        return 2
    print(format_report(result))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
