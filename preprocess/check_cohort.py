"""Validate a cohort folder before any stage runs, and print one row per slide.

    python -m preprocess.check_cohort COHORT [--out OUT]

Checks (COHORT in the sample-cohort layout of docs/FORMATS.md). The slides are those every stage resolves
(:func:`pipeline.cohort.resolve_slides`): the rows of ``pairs.csv`` when it exists, else the files of ``he/``;
the id is the file name as written up to its first dot (a link keeps its own name).

- ``he/`` and ``pairs.csv``: two files with one id (a rescan ``slide_000.v2.tif`` beside ``slide_000.tif``) are an
  error without ``pairs.csv`` (every stage stops) and a warning naming the file used with it; ``he/`` files that
  ``pairs.csv`` does not list are a warning (not processed); a file or link that does not exist, or two ids that
  are one file (links, a repeated row), are errors; a link with another name is fine and noted with its target
  (outputs are named after the link). Every slide opens with OpenSlide, is not empty, has a level-0 µm/px (else a
  warning: the stages need ``--mpp``) and an ASCII name (warning otherwise). Whatever makes the stages' resolver
  stop is an error too.
- ``codex/`` (or the CODEX of ``pairs.csv``): every CODEX opens (OME-TIFF, QPTIFF of either dialect, MCMICRO's
  ``registration/{sample}.ome.tif`` + ``markers.csv``: :mod:`preprocess.codex_formats`; other formats get a note
  with the format, where the names come from and the DAPI channel), has a pixel size (``PhysicalSizeX/Y``, a
  QPTIFF's ``PixelSizeMicrons``; tags that disagree with it: a warning), has channel names or a panel (an error
  otherwise), and its channel names agree with ``marker_panel.csv`` (case and punctuation ignored); the panel maps
  one marker per channel and lists the markers stage 03 needs (its own check, 40 by default: a 39-row panel is an
  error).
- ``clinical.csv`` and ``splits/splits_*.csv``: every rule of :mod:`pipeline.tables`, the ones the stages raise
  (one reader, one split parser, one leakage check): columns and values (censorship and response 0/1, survival
  months >= 0, one row per slide, one outcome per patient), split columns of the cohort's slides, no slide or
  patient in both columns, every split slide in the clinical table, events in each survival fold (training: error,
  validation: warning). Clinical ids that are not the cohort's slides, and slides without a row, are warnings.
- ``--out``: the output root is a folder (or can be created) and writable.

Table columns: he, codex, mpp, panel, clinical, splits; each cell is ``ok`` (or a note) or the (shortened) problem;
every finding is then listed in full. Exit status: 0 when nothing is an error (warnings do not fail), 1 when
anything is, 2 when COHORT is not a folder (runs from any folder, through :class:`pipeline.cli.Stage`).
"""

from __future__ import annotations

import argparse
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from pipeline.cli import Stage
from pipeline.cohort import CODEX_EXTENSIONS, HE_EXTENSIONS, read_pairs_table, resolve_slides, slide_id_from_path
from pipeline.errors import PipelineError
from pipeline.tables import COHORT_ROW, ERROR, INFO, WARNING, Finding, check_cohort_tables
from preprocess.codex_formats import find_dapi, no_names_message
from preprocess.panel import read_marker_panel, resolve_channel_map
from preprocess.pixel_sizes import TABLE_NAME as PIXEL_TABLE
from preprocess.pixel_sizes import read_pixel_sizes
from preprocess.quantify.tables import add_table_args, resolve_tables
from preprocess.slide_io import CodexImage, HESlide

log = logging.getLogger(__name__)

COLUMNS = ("he", "codex", "mpp", "panel", "clinical", "splits")
_RANK = {ERROR: 0, WARNING: 1, INFO: 2}


@dataclass
class CohortCheck:
    """Outcome of :func:`check_cohort`: the cohort's slide ids as the stages resolve them (``pairs.csv`` when present,
    else ``he/``; sorted), every finding, per-slide mpp text and where the slides came from (``source``)."""

    slides: list[str]
    findings: list[Finding]
    mpp: dict[str, str]
    source: str = ""

    @property
    def ok(self) -> bool:
        return not any(f.level == ERROR for f in self.findings)

    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == ERROR]

    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == WARNING]

    def infos(self) -> list[Finding]:
        return [f for f in self.findings if f.level == INFO]


class _Collector:
    def __init__(self) -> None:
        self.findings: list[Finding] = []

    def add(self, slide: str, column: str, level: str, message: str, short: str = "") -> None:
        self.findings.append(Finding(level, message, slide, column, short))


# ----------------------------------------------------------------------------------------------------------------
# slides: the rules of pipeline.cohort.resolve_slides, every problem listed instead of the first


def _he_files(he_dir: Path, c: _Collector) -> dict[str, list[Path]]:
    """{id: [files]} of ``he/`` as the stages list it (visible files with an H&E extension, names as written)."""
    by_id: dict[str, list[Path]] = {}
    for p in sorted(q for q in he_dir.iterdir() if not q.name.startswith(".")):
        if p.is_dir() and not p.name.lower().endswith(".mrxs"):  # .mrxs keeps a data folder beside the file
            if not (he_dir / f"{p.name}.mrxs").exists():
                c.add(COHORT_ROW, "he", WARNING, f"{p} is a folder, not a slide; it is ignored")
            continue
        if p.suffix.lower() not in HE_EXTENSIONS:
            c.add(COHORT_ROW, "he", WARNING, f"{p}: not an H&E slide extension ({', '.join(HE_EXTENSIONS)}); "
                                            "the stages ignore it")
            continue
        by_id.setdefault(slide_id_from_path(p), []).append(Path(os.path.abspath(p)))
    return by_id


def _codex_folder(cohort: Path, ids: list[str], c: _Collector) -> dict[str, Path | None]:
    """Without ``pairs.csv``: ``codex/{slide}.*`` (CODEX extensions) for each id; two files for one id: an error."""
    codex_dir = cohort / "codex"
    found: dict[str, list[Path]] = {}
    if codex_dir.is_dir():
        for p in sorted(codex_dir.iterdir()):
            if not p.name.startswith(".") and p.suffix.lower() in CODEX_EXTENSIONS and not p.is_dir():
                found.setdefault(slide_id_from_path(p), []).append(p)
    out: dict[str, Path | None] = {}
    for sid in ids:
        ps = found.get(sid, [])
        if len(ps) > 1:
            c.add(sid, "codex", ERROR, f"{len(ps)} CODEX images share the slide id {sid} in {codex_dir} "
                                       f"({', '.join(p.name for p in ps)}); keep one, or list it in pairs.csv")
        elif not ps:
            c.add(sid, "codex", WARNING, f"no CODEX image for {sid} in {codex_dir}")
        out[sid] = ps[0] if len(ps) == 1 else None
    return out


def _resolve(cohort: Path, c: _Collector) -> tuple[dict[str, tuple[Path, Path | None]], str]:
    """The cohort's slides {id: (H&E path as written, CODEX path or None)} and their source, as
    :func:`pipeline.cohort.resolve_slides` finds them: ``pairs.csv`` when present, else ``he/`` (+ ``codex/``)."""
    he_dir, pairs_path = cohort / "he", cohort / "pairs.csv"
    files = _he_files(he_dir, c) if he_dir.is_dir() else {}
    if pairs_path.exists():
        try:
            rows = read_pairs_table(pairs_path)  # columns, a slide listed twice
        except PipelineError as e:
            c.add(COHORT_ROW, "he", ERROR, str(e))
            return {}, str(pairs_path)
        slides = {sid: (he, cx) for sid, he, cx in rows}
        for sid, ps in sorted(files.items()):
            names = ", ".join(p.name for p in ps)
            if sid not in slides:
                c.add(sid, "he", WARNING, f"{he_dir} holds {names} (slide id {sid}), which {pairs_path} does not "
                                          "list: the stages do not process it (add a row, or move the file)",
                      short=f"not in {pairs_path.name}")
            elif len(ps) > 1:
                c.add(sid, "he", WARNING, f"{he_dir} holds {len(ps)} files with the slide id {sid} ({names}); "
                                          f"{pairs_path.name} uses {slides[sid][0].name} and every stage reads that "
                                          "one (move the others out of he/ to be sure)",
                      short=f"{len(ps)} files: {names}")
        for sid, (he, cx) in slides.items():
            if cx is None:
                c.add(sid, "codex", WARNING, f"{pairs_path} gives no CODEX image for {sid}; it cannot be registered "
                                             "or labelled")
            elif not cx.exists():
                c.add(sid, "codex", ERROR, f"{pairs_path} names the CODEX image {cx}, which does not exist")
                slides[sid] = (he, None)
        return slides, str(pairs_path)
    if not he_dir.is_dir():
        c.add(COHORT_ROW, "he", ERROR, f"H&E folder not found: {he_dir} (put the H&E slides in COHORT/he/, or list "
                                       "them in COHORT/pairs.csv)")
        return {}, str(he_dir)
    c.add(COHORT_ROW, "codex", WARNING, f"no pairs.csv in {cohort}: CODEX images are looked up as codex/{{slide}}.*")
    for sid, ps in sorted(files.items()):
        if len(ps) > 1:
            c.add(sid, "he", ERROR, f"{len(ps)} H&E files share the slide id {sid} ({', '.join(p.name for p in ps)}) "
                                    f"in {he_dir}; every stage stops on this: move rescans out of he/, rename so the "
                                    "part before the first dot differs, or list the one to use in pairs.csv",
                  short=f"{len(ps)} files: {', '.join(p.name for p in ps)}")
    ids = sorted(files)
    codex = _codex_folder(cohort, ids, c)
    return {sid: (files[sid][0], codex[sid]) for sid in ids}, str(he_dir)


def _check_he(slides: dict[str, tuple[Path, Path | None]], c: _Collector, mpp: dict[str, str],
              skip: set[str], table: dict[str, float]) -> None:
    """Each slide's H&E file: exists (a link: its target; another name is fine, noted with the target), not empty,
    opens, has a pixel size, ASCII name; no two ids are one file. ``skip``: ids already in error (not opened)."""
    targets: dict[Path, list[str]] = {}
    for sid, (p, _) in sorted(slides.items()):
        if sid in skip:
            continue
        if not p.name.isascii():
            c.add(sid, "he", WARNING, f"{p.name}: non-ASCII file name; some tools and clusters mangle it, rename it "
                                      "with ASCII characters")
        if p.is_symlink() and not p.exists():
            c.add(sid, "he", ERROR, f"{p} is a symbolic link to {os.readlink(p)}, which does not exist; fix the "
                                    "link or copy the slide there")
            continue
        if not p.exists():
            c.add(sid, "he", ERROR, f"the H&E file {p} of slide {sid} does not exist; fix the path or the file name")
            continue
        target = Path(os.path.realpath(p))
        targets.setdefault(target, []).append(sid)
        if p.is_symlink() and slide_id_from_path(target) != sid:
            c.add(sid, "he", INFO, f"{p} is a symbolic link to {target}: every stage names this slide {sid}, after "
                                   "the link", short=f"ok, link to {target.name}")
        if p.stat().st_size == 0:
            c.add(sid, "he", ERROR, f"{p} is an empty (zero-byte) file; copy the slide again")
            continue
        _open_he(sid, p, c, mpp, table.get(sid))
    for target, sids in sorted(targets.items()):
        if len(sids) > 1:
            for sid in sids:
                c.add(sid, "he", ERROR, f"slides {', '.join(sids)} are one file {target} (links or a repeated row); "
                                        "keep one id per slide (one slide under two ids lands in two splits)")


def _open_he(sid: str, p: Path, c: _Collector, mpp: dict[str, str], given: float | None = None) -> bool:
    """Open ``p`` with OpenSlide; a missing level-0 µm/px is a warning (``--mpp`` or the pixel-size table fixes it),
    anything else an error. ``given``: the slide's value in ``pixel_sizes.csv`` (what the stages use)."""
    try:
        with HESlide(p, mpp=given) as s:
            mpp[sid] = f"he {s.mpp:.3g}" + (" (table)" if given is not None else "")
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


def _stages_agree(cohort: Path, c: _Collector) -> None:
    """What the stages themselves do (:func:`pipeline.cohort.resolve_slides`): a stop not found above is added."""
    quiet = logging.getLogger("pipeline.cohort")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its warnings are findings already
    try:
        resolve_slides(cohort)
    except PipelineError as e:
        if not any(f.level == ERROR and f.column in ("he", "codex") for f in c.findings):
            c.add(COHORT_ROW, "he", ERROR, f"the stages stop on this cohort: {e}")
    finally:
        quiet.setLevel(level)


# ----------------------------------------------------------------------------------------------------------------
# CODEX and panel


def _check_codex(sid: str, path: Path, panel: list[tuple[int, str]] | None, panel_path: Path, c: _Collector,
                 mpp: dict[str, str], given: float | None = None) -> None:
    if path.stat().st_size == 0:
        c.add(sid, "codex", ERROR, f"{path} is an empty (zero-byte) file; copy the CODEX image again")
        return
    try:
        codex = CodexImage(path, mpp=given)
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
        mpp[sid] = f"{mpp.get(sid, 'he -')}, codex {codex.mpp:.3g}" + (" (table)" if given is not None else "")
    with codex:
        _codex_notes(sid, codex, panel, panel_path, c)
        if panel is None:
            return
        if not codex.channel_names:
            c.add(sid, "panel", WARNING, f"{path} has no channel names ({codex.format}); the panel {panel_path} "
                                         "cannot be checked against it")
        try:
            resolve_channel_map(codex, [m for _, m in panel], panel, panel_path)
        except PipelineError as e:
            c.add(sid, "panel", ERROR, str(e))


def _codex_notes(sid: str, codex: CodexImage, panel: list[tuple[int, str]] | None, panel_path: Path,
                 c: _Collector) -> None:
    """What the stages see of a CODEX file in another format than OME-TIFF (QPTIFF, MCMICRO): the format, where its
    names come from and its DAPI channel (a note); a QPTIFF whose TIFF tags and XML disagree on the pixel size (a
    warning: the XML is used); a file without names and no panel (an error: stage 03 needs one)."""
    if codex.mpp_warning:
        c.add(sid, "mpp", WARNING, codex.mpp_warning)
    if codex.channel_names is None and panel is None:
        c.add(sid, "codex", ERROR, no_names_message(codex))
        return
    if codex.format == "ome-tiff":
        return
    dapi = find_dapi(codex.channel_names)
    names = codex.channel_names
    if dapi is None:
        dapi, names = find_dapi(codex.band_names), codex.band_names
    where = f"DAPI = channel {dapi} ({names[dapi]})" if dapi is not None else "no DAPI by name"
    c.add(sid, "codex", INFO, f"{codex.format}, {codex.num_channels} channels, {codex.mpp:.4g} µm/px, names from "
                              f"{codex.names_source}, {where}", short=f"{codex.format}, {where}")


def check_panel_channels(panel: list[tuple[int, str]], panel_path: Path, c: _Collector) -> bool:
    """One marker per channel, channels >= 0; returns False (an error added) otherwise."""
    by_channel: dict[int, list[str]] = {}
    for ch, m in panel:
        by_channel.setdefault(ch, []).append(m)
    ok = True
    for ch, ms in sorted(by_channel.items()):
        if ch < 0:
            c.add(COHORT_ROW, "panel", ERROR, f"marker panel {panel_path} maps {', '.join(ms)} to channel {ch}; "
                                              "channels are 0-based indices >= 0")
            ok = False
        elif len(ms) > 1:
            c.add(COHORT_ROW, "panel", ERROR, f"marker panel {panel_path} maps {len(ms)} markers to channel {ch} "
                                              f"({', '.join(ms)}); each channel holds one marker: fix the channel "
                                              "indices (duplicate labels otherwise)")
            ok = False
    return ok


def _stage03_agrees(cohort: Path, panel_path: Path, c: _Collector) -> None:
    """Stage 03's own check of the panel (:func:`preprocess.quantify.tables.resolve_tables` with its default
    ``--num-markers``, the 40 HEX markers): its stop on the panel is a panel error, in its words (its stops on the
    slides are the resolver's, reported above)."""
    parser = argparse.ArgumentParser()
    add_table_args(parser)
    quiet = [logging.getLogger(n) for n in ("pipeline.cohort", "preprocess.quantify.tables")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)  # their warnings are findings already
    try:
        resolve_tables(cohort, None, panel_path, parser.get_default("num_markers"))
    except PipelineError as e:
        if str(e).startswith(f"marker panel {panel_path}"):
            c.add(COHORT_ROW, "panel", ERROR, str(e))
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)


# ----------------------------------------------------------------------------------------------------------------
# output folder and the whole check


def check_output_folder(out: Path, c: _Collector) -> None:
    """``out`` must be a writable folder, or creatable in a writable parent (probed with a file written and removed
    in the deepest folder that exists; nothing is created)."""
    p = Path(os.path.abspath(out))
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        c.add(COHORT_ROW, "he", ERROR, f"output folder {out}: {p} is not a folder; choose another OUT")
        return
    probe = p / f".check_cohort.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        c.add(COHORT_ROW, "he", ERROR, f"output folder {out} is not writable ({p}: {e.strerror or e}); choose "
                                       "another OUT or fix its permissions")


def check_cohort(cohort: str | os.PathLike, out: str | os.PathLike | None = None) -> CohortCheck:
    """Run every check on ``cohort`` (and the output folder ``out`` when given); see the module docstring."""
    cohort = Path(cohort)
    if not cohort.is_dir():
        raise PipelineError(f"cohort folder not found: {cohort}")
    c = _Collector()
    mpp: dict[str, str] = {}
    slides, source = _resolve(cohort, c)
    he_table: dict[str, float] = {}
    codex_table: dict[str, float] = {}
    if (cohort / PIXEL_TABLE).exists():  # the per-slide pixel sizes every stage reads (preprocess.pixel_sizes)
        try:
            he_table, codex_table = read_pixel_sizes(cohort / PIXEL_TABLE)
        except PipelineError as e:
            c.add(COHORT_ROW, "mpp", ERROR, str(e))
    in_error = {f.slide for f in c.findings if f.level == ERROR and f.column == "he"}
    _check_he(slides, c, mpp, in_error, he_table)
    if slides:
        _stages_agree(cohort, c)
    ids = sorted(slides)
    panel_path = cohort / "marker_panel.csv"
    panel = None
    if panel_path.exists():
        try:
            panel = read_marker_panel(panel_path)
        except PipelineError as e:
            c.add(COHORT_ROW, "panel", ERROR, str(e))
        else:
            if check_panel_channels(panel, panel_path, c):
                _stage03_agrees(cohort, panel_path, c)
    else:
        c.add(COHORT_ROW, "panel", WARNING, f"no marker panel {panel_path}: stages map markers by OME channel names")
    for sid, (_, path) in sorted(slides.items()):
        if path is not None:
            _check_codex(sid, path, panel, panel_path, c, mpp, codex_table.get(sid))
    c.findings.extend(check_cohort_tables(cohort, ids, source))
    if out is not None:
        check_output_folder(Path(out), c)
    return CohortCheck(slides=ids, findings=c.findings, mpp=mpp, source=source)


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
            fs.sort(key=lambda f: _RANK[f.level])
            if fs and fs[0].level == INFO:
                cell = fs[0].short or f"ok: {fs[0].message}"
            elif fs:
                tag = "ERROR" if fs[0].level == ERROR else "warn"
                cell = f"{tag}: {fs[0].short or fs[0].message}"
            elif col == "mpp" and sid in result.mpp:
                cell = result.mpp[sid]
            else:
                cell = "ok" if sid in result.slides else ""
            row.append(_short(cell, width))
        table.append(row)
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in table)


def format_report(result: CohortCheck) -> str:
    """The table, every finding in full (errors, then warnings, then notes), and a one-line summary."""
    lines = [format_table(result), ""]
    for f in sorted(result.findings, key=lambda f: (_RANK[f.level], f.slide, f.column)):
        lines.append(f"{f.level.upper()} [{f.slide} / {f.column}] {f.message}")
    n_e, n_w, n_i = len(result.errors()), len(result.warnings()), len(result.infos())
    verdict = "cohort OK" if result.ok else "cohort has errors: fix them before running the stages"
    notes = f", {n_i} notes" if n_i else ""
    lines.append(f"{verdict}: {len(result.slides)} slides, {n_e} errors, {n_w} warnings{notes} (slides from "
                 f"{result.source})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m preprocess.check_cohort", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cohort", type=Path, help="cohort folder (he/, codex/, pairs.csv, marker_panel.csv, "
                                             "clinical.csv, splits/)")
    p.add_argument("--out", type=Path, default=None, help="output root the stages will write (checked writable)")
    return p


@dataclass(frozen=True)
class CheckConfig:
    """The flags: the cohort folder, the output root to probe (or None); the stages' own logging stays quiet."""

    cohort: Path
    out: Path | None = None
    log_level: str = "WARNING"


def make_config(args: argparse.Namespace) -> CheckConfig:
    return CheckConfig(args.cohort, args.out)


def run(cfg: CheckConfig, ctx: object = None) -> int:
    """Print the report; 0 when nothing is an error, 1 otherwise (a missing COHORT: PipelineError, exit 2)."""
    result = check_cohort(cfg.cohort, cfg.out)
    print(format_report(result))
    return 0 if result.ok else 1


STAGE = Stage("check_cohort", build_parser, make_config, run=run)


def main(argv: list[str] | None = None) -> int:
    return STAGE.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
