"""Per-slide pixel sizes, for a cohort where one value per run is wrong (``--pixel-sizes CSV``).

    slide_id,he_mpp,codex_mpp
    slide_000,0.25,
    slide_007,,0.377

``he_mpp`` / ``codex_mpp`` are the level-0 µm per pixel of the slide's H&E / CODEX image; an empty cell keeps what
the file's metadata says (or ``--mpp`` / ``--codex-mpp``). A slide's value in the table wins over its metadata and
over ``--mpp`` / ``--codex-mpp``, which still apply to every slide the table gives no value for. Stages 01 (H&E),
02 (both) and 03 (CODEX; H&E for the patch store and the scale check) read it from ``--pixel-sizes``, default
``COHORT/pixel_sizes.csv`` when it exists. The value a slide was made with is in the settings of its done-record,
so a changed row makes only that slide "done with other settings" (``--overwrite`` redoes it).
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

TABLE_NAME = "pixel_sizes.csv"
"""The default table in the cohort folder."""
COLUMNS = ("slide_id", "he_mpp", "codex_mpp")


@dataclass(frozen=True)
class PixelSizes:
    """The pixel sizes of a run: the table's per-slide values over the run's flags (None: the file's metadata).

    Attributes:
        path: the table read (None: no table).
        he / codex: {slide: level-0 µm/px} from the table (only the cells that hold a value).
        he_default / codex_default: ``--mpp`` / ``--codex-mpp`` (None when not given).
    """

    path: Path | None = None
    he: Mapping[str, float] = field(default_factory=dict)
    codex: Mapping[str, float] = field(default_factory=dict)
    he_default: float | None = None
    codex_default: float | None = None

    def he_mpp(self, slide: str) -> float | None:
        """The H&E level-0 µm/px to use for ``slide`` instead of its metadata (None: the metadata's)."""
        return self.he.get(slide, self.he_default)

    def codex_mpp(self, slide: str) -> float | None:
        """The CODEX level-0 µm/px to use for ``slide`` instead of its OME-XML (None: the OME-XML's)."""
        return self.codex.get(slide, self.codex_default)


def _value(path: Path, row: int, slide: str, column: str, text: str | None) -> float | None:
    text = (text or "").strip()
    if not text:
        return None
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and v > 0):
        raise PipelineError(f"pixel-size table {path}, row {row} ({slide}): {column} {text!r} is not a positive "
                            "number of µm per pixel; fix the value, or leave the cell empty to use the slide's "
                            "metadata")
    return v


def read_pixel_sizes(path: str | os.PathLike) -> tuple[dict[str, float], dict[str, float]]:
    """Read a table ``slide_id,he_mpp,codex_mpp`` -> ({slide: he_mpp}, {slide: codex_mpp}) for its non-empty cells.

    Raises:
        PipelineError: one line naming the file and the fix (missing file or columns, a value that is not a
            positive number, a slide listed twice).
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"pixel-size table not found: {path} (--pixel-sizes: a CSV with the columns "
                            f"{','.join(COLUMNS)})")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [c.strip() for c in reader.fieldnames or []]
        if not {"slide_id"} <= set(header) or not {"he_mpp", "codex_mpp"} & set(header):
            raise PipelineError(f"pixel-size table {path} has the columns {','.join(header) or '(none)'}; its "
                                f"header must be {','.join(COLUMNS)} (either value column may be left empty)")
        rows = [{(k or "").strip(): v for k, v in r.items()} for r in reader]
    he: dict[str, float] = {}
    codex: dict[str, float] = {}
    seen: set[str] = set()
    for i, r in enumerate(rows, start=2):
        slide = (r.get("slide_id") or "").strip()
        if not slide:
            raise PipelineError(f"pixel-size table {path}, row {i}: no slide_id; fill it in or delete the row")
        if slide in seen:
            raise PipelineError(f"pixel-size table {path} lists {slide} twice; keep one row per slide")
        seen.add(slide)
        for column, into in (("he_mpp", he), ("codex_mpp", codex)):
            v = _value(path, i, slide, column, r.get(column))
            if v is not None:
                into[slide] = v
    return he, codex


def resolve_pixel_sizes(table: str | os.PathLike | None, cohort: str | os.PathLike | None,
                        slides: Iterable[str], he_mpp: float | None = None,
                        codex_mpp: float | None = None) -> PixelSizes:
    """The run's :class:`PixelSizes`: ``table`` (``--pixel-sizes``), else ``COHORT/pixel_sizes.csv`` when it exists,
    else none; ``he_mpp`` / ``codex_mpp`` are ``--mpp`` / ``--codex-mpp``. Rows for slides outside ``slides`` (the
    cohort's) are named in one warning (a typo in an id would otherwise go unnoticed)."""
    path = Path(table) if table is not None else None
    if path is None and cohort is not None and (Path(cohort) / TABLE_NAME).is_file():
        path = Path(cohort) / TABLE_NAME
    if path is None:
        return PixelSizes(he_default=he_mpp, codex_default=codex_mpp)
    he, codex = read_pixel_sizes(path)
    known = set(slides)
    unknown = sorted((set(he) | set(codex)) - known)
    if unknown:
        log.warning("pixel-size table %s lists slides that are not in this cohort: %s%s; check their slide_id", path,
                    ", ".join(unknown[:5]), " ..." if len(unknown) > 5 else "")
    log.info("pixel sizes from %s: H&E of %d slides, CODEX of %d slides", path, len(he), len(codex))
    return PixelSizes(path, he, codex, he_mpp, codex_mpp)


def add_pixel_sizes_arg(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The ``--pixel-sizes`` flag (stages 01-03)."""
    p.add_argument("--pixel-sizes", type=Path, metavar="CSV",
                   help="per-slide level-0 µm/px, columns slide_id,he_mpp,codex_mpp (a cell may be empty): a slide's "
                        "value overrides its metadata and --mpp/--codex-mpp (default: COHORT/pixel_sizes.csv when it "
                        "exists)")
