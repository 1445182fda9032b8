"""Slide identity: the one answer, for every stage, to "which slides does this cohort hold, and which files are they".

    from pipeline.cohort import resolve_slides
    cohort = resolve_slides(Path("/data/lung"))          # pairs.csv when present, else he/ (+ codex/)
    cohort.ids, cohort["slide_000"].he, cohort["slide_000"].codex

Rules (docs/FORMATS.md, "Slide identity"):

- **Source.** ``--pairs`` when given, else ``--he`` files/folders (H&E-only stages), else ``COHORT/pairs.csv`` when it
  exists, else the files of ``COHORT/he/`` (with ``COHORT/codex/{slide}.*`` as their CODEX).
- **Id** = the file name as written, up to its first dot (``slide_000.ome.tif`` -> ``slide_000``). A symbolic link
  keeps its own name (the id is the link's, never its target's), so every stage names outputs alike.
- **Stops** (one line that lists them): two H&E files with one id in a folder (a rescan ``slide_000.v2.tif`` beside
  ``slide_000.tif``: rename one, or list the one to use in ``pairs.csv``); two ids that are one file (links to the
  same target, or a pairs row repeated under another name); a pairs row or link whose file does not exist; no slide.
- **Warns**: with ``pairs.csv``, files in ``he/`` it does not list (they are not processed) and ids with several
  files in ``he/`` (``pairs.csv`` says which one is used).

Stage tables name slides too: :func:`check_ids` compares the ids of ``clinical.csv`` or a split with these.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

HE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
CODEX_EXTENSIONS = (".tif", ".tiff", ".qptiff", ".btf")


def slide_id_from_path(path: str | os.PathLike) -> str:
    """Slide id = file name up to its first dot (``slide_000.ome.tif`` -> ``slide_000``)."""
    return Path(path).name.split(".", 1)[0]


def select_slides(available: Sequence[str], wanted: Sequence[str] | None, source: str) -> list[str]:
    """Keep ``wanted`` slide ids (all when None); an id that is not available is an error naming ``source``."""
    if not wanted:
        return list(available)
    missing = [s for s in wanted if s not in set(available)]
    if missing:
        raise PipelineError(f"slides {missing} not found in {source}; available: {list(available)[:10]}...")
    return list(wanted)


@dataclass(frozen=True)
class Slide:
    """One slide: its id, the H&E file as written (absolute, links not followed) and its CODEX file (or None)."""

    slide_id: str
    he: Path
    codex: Path | None = None

    @property
    def he_target(self) -> Path:
        """The H&E file with links followed (what is actually read)."""
        return self.he.resolve()


@dataclass
class CohortSlides:
    """The resolved slides by id (sorted) and where they came from (``source``, for messages)."""

    slides: dict[str, Slide]
    source: str

    @property
    def ids(self) -> list[str]:
        return sorted(self.slides)

    def __getitem__(self, slide_id: str) -> Slide:
        return self.slides[slide_id]

    def __contains__(self, slide_id: object) -> bool:
        return slide_id in self.slides

    def __len__(self) -> int:
        return len(self.slides)

    def he_paths(self) -> dict[str, Path]:
        """{slide: H&E path as written}."""
        return {s: v.he for s, v in sorted(self.slides.items())}

    def pairs(self) -> dict[str, tuple[Path, Path | None]]:
        """{slide: (H&E path, CODEX path or None)}."""
        return {s: (v.he, v.codex) for s, v in sorted(self.slides.items())}


def _abs(p: Path) -> Path:
    """Absolute without following links (``Path.resolve`` would replace a link by its target)."""
    return Path(os.path.normpath(os.path.abspath(p)))


def _folder_files(folder: Path, extensions: Sequence[str]) -> dict[str, list[Path]]:
    """{id: [files]} of a folder's visible files with one of ``extensions`` (several files per id possible)."""
    out: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.suffix.lower() not in extensions or p.is_dir():
            continue
        out.setdefault(slide_id_from_path(p), []).append(_abs(p))
    return out


def _dup_message(dups: dict[str, list[Path]], where: str) -> str:
    items = "; ".join(f"{sid}: {', '.join(p.name for p in ps)}" for sid, ps in sorted(dups.items()))
    return (f"{where} holds several files with one slide id ({items}); rename or move the extra files (the id is the "
            "name up to its first dot), or list the one to use in pairs.csv")


def read_pairs_table(path: str | os.PathLike) -> list[tuple[str, Path, Path | None]]:
    """Rows of ``pairs.csv`` (``he_slide,codex_image``; relative paths from the CSV's folder) as
    ``(slide id, H&E path, CODEX path or None)``; ids from the names as written (links not followed)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"pairing table not found: {path} (a CSV with columns he_slide,codex_image)")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise PipelineError(f"cannot read the pairing table {path} ({e}); save it as a UTF-8 CSV") from None
    if not rows or not {"he_slide", "codex_image"} <= {(k or "").strip() for k in rows[0]}:
        raise PipelineError(f"pairing table {path} must have the columns he_slide,codex_image and one row per slide")
    out, seen = [], {}
    for i, r in enumerate(rows, start=2):
        r = {(k or "").strip(): (v or "").strip() for k, v in r.items()}
        if not r["he_slide"]:
            raise PipelineError(f"pairing table {path} line {i}: empty he_slide; give the H&E file of every row")
        he = _abs(path.parent / r["he_slide"])
        sid = slide_id_from_path(he)
        if sid in seen:
            raise PipelineError(f"pairing table {path} lists slide {sid} twice (lines {seen[sid]} and {i}); keep one "
                                "row per slide")
        seen[sid] = i
        cx = r["codex_image"]
        out.append((sid, he, _abs(path.parent / cx) if cx else None))
    return out


def _check_files(slides: dict[str, Slide], source: str) -> None:
    """Every H&E file exists (a link: its target), and no two ids are one file."""
    missing = [f"{s} ({v.he}{' -> ' + os.readlink(v.he) if v.he.is_symlink() else ''})"
               for s, v in slides.items() if not v.he.exists()]
    if missing:
        raise PipelineError(f"{source}: H&E file not found for {len(missing)} slides: {'; '.join(missing[:10])}"
                            f"{' ...' if len(missing) > 10 else ''}; fix the path, the link or the table")
    by_target: dict[Path, list[str]] = {}
    for s, v in slides.items():
        by_target.setdefault(v.he_target, []).append(s)
    same = {t: ids for t, ids in by_target.items() if len(ids) > 1}
    if same:
        items = "; ".join(f"{', '.join(ids)} are all {t}" for t, ids in sorted(same.items()))
        raise PipelineError(f"{source}: several slide ids are one H&E file ({items}); keep one name per slide (a "
                            "slide under two ids would land in two splits)")


def _codex_for(folder: Path | None, ids: Iterable[str]) -> dict[str, Path | None]:
    if folder is None or not folder.is_dir():
        return {s: None for s in ids}
    files = _folder_files(folder, CODEX_EXTENSIONS)
    wanted = set(ids)
    dups = {s: ps for s, ps in files.items() if len(ps) > 1 and s in wanted}
    if dups:
        raise PipelineError(_dup_message(dups, str(folder)))
    return {s: files[s][0] if s in files else None for s in ids}


def resolve_slides(cohort: str | os.PathLike | None = None, *, pairs: str | os.PathLike | None = None,
                   he: Sequence[str | os.PathLike] | None = None, need_codex: bool = False,
                   require_he: bool = True) -> CohortSlides:
    """Resolve a cohort's slides by the rules of the module docstring.

    Args:
        cohort: cohort folder (``he/``, ``codex/``, ``pairs.csv``).
        pairs: an explicit pairing table (overrides ``COHORT/pairs.csv``).
        he: explicit H&E files or folders (H&E-only stages, instead of the cohort's).
        need_codex: the stage needs CODEX images: without ``pairs.csv`` they come from ``COHORT/codex/``.
        require_he: every H&E file must exist (False for stages that never read the H&E pixels, e.g. quantify).

    Raises:
        PipelineError: one line naming the files and the fix (duplicate ids, one file under two ids, a missing
            file, no slide at all).
    """
    cohort = Path(cohort) if cohort is not None else None
    pairs_path = Path(pairs) if pairs is not None else None
    if pairs_path is None and not he and cohort is not None and (cohort / "pairs.csv").exists():
        pairs_path = cohort / "pairs.csv"
    if pairs_path is not None:
        rows = read_pairs_table(pairs_path)
        slides = {sid: Slide(sid, h, c) for sid, h, c in rows}
        source = str(pairs_path)
        he_dir = cohort / "he" if cohort is not None else None
        if he_dir is not None and he_dir.is_dir() and he_dir.resolve() == pairs_path.parent.joinpath("he").resolve():
            files = _folder_files(he_dir, HE_EXTENSIONS)
            extra = sorted(s for s in files if s not in slides)
            if extra:
                log.warning("%s holds %d H&E files that %s does not list (not processed): %s%s", he_dir, len(extra),
                            pairs_path.name, ", ".join(extra[:10]), " ..." if len(extra) > 10 else "")
            dups = {s: ps for s, ps in files.items() if len(ps) > 1 and s in slides}
            for s, ps in sorted(dups.items()):
                log.warning("%s holds %d files with slide id %s (%s); %s uses %s", he_dir, len(ps), s,
                            ", ".join(p.name for p in ps), pairs_path.name, slides[s].he.name)
    else:
        if he:
            folders = [Path(p) for p in he]
            source = ", ".join(str(p) for p in folders)
        elif cohort is not None:
            folders, source = [cohort / "he"], str(cohort / "he")
        else:
            raise PipelineError("give --cohort (a folder with he/ or pairs.csv) or the slide files")
        found: dict[str, list[Path]] = {}
        for p in folders:
            if p.is_dir():
                for sid, ps in _folder_files(p, HE_EXTENSIONS).items():
                    found.setdefault(sid, []).extend(ps)
            elif p.exists() or p.is_symlink():
                found.setdefault(slide_id_from_path(p), []).append(_abs(p))
            else:
                raise PipelineError(f"H&E slide or folder not found: {p}")
        dups = {s: ps for s, ps in found.items() if len(set(ps)) > 1}
        if dups:
            raise PipelineError(_dup_message(dups, source))
        codex = _codex_for(cohort / "codex" if cohort is not None and (need_codex or not he) else None, found)
        slides = {sid: Slide(sid, ps[0], codex[sid]) for sid, ps in found.items()}
    if not slides:
        raise PipelineError(f"no H&E slides found in {source} (extensions: {', '.join(HE_EXTENSIONS)})")
    if require_he:
        _check_files(slides, source)
    return CohortSlides(dict(sorted(slides.items())), source)


def check_ids(named: Iterable[str], cohort: CohortSlides, table: str | os.PathLike, fix: str = "") -> None:
    """Every id ``table`` names (``clinical.csv``, a split) is a slide of ``cohort``; else one line listing them."""
    unknown = sorted({str(s) for s in named} - set(cohort.slides))
    if unknown:
        raise PipelineError(f"{table} names {len(unknown)} slides that {cohort.source} does not hold: "
                            f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}"
                            f"{'; ' + fix if fix else '; fix the ids (the file name up to its first dot)'}")

