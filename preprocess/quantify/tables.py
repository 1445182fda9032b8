"""The slides and marker panel of stage 03 (pass 1 and the normalisation step share them).

Slides come from :func:`pipeline.cohort.resolve_slides` (``--pairs``, else ``COHORT/pairs.csv``, else
``COHORT/he/`` with ``COHORT/codex/{slide}.*``), ids from the names as written (a link keeps its own name), so that
the ids are those of stage 01's ``patches/{slide}.h5`` and stage 02's ``registration/{slide}.json``. Stage 03 never
reads H&E pixels: the H&E files need not exist here.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.cohort import resolve_slides
from pipeline.errors import PipelineError
from preprocess.panel import read_marker_panel

log = logging.getLogger(__name__)


@dataclass
class Tables:
    """Resolved inputs: ``pairs`` {slide: (he, codex or None)} (paths as written), ``source`` (the pairing table or
    the cohort's he/ folder, for messages), ``panel`` [(channel, marker)], ``markers`` in panel order."""

    source: str
    pairs: dict[str, tuple[Path, Path | None]]
    panel_path: Path
    panel: list[tuple[int, str]]
    markers: list[str]

    @property
    def ids(self) -> list[str]:
        return sorted(self.pairs)


def add_table_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pairs", type=Path,
                   help="pairing table he_slide,codex_image (default COHORT/pairs.csv, else COHORT/he + COHORT/codex)")
    p.add_argument("--panel", type=Path, help="marker panel channel,marker (default COHORT/marker_panel.csv)")
    p.add_argument("--num-markers", type=int, default=40, help="markers the panel must list (0 = any; default 40)")


def shared_channels(panel: list[tuple[int, str]]) -> dict[int, list[str]]:
    """{channel: markers} for the channels the panel gives to more than one marker (their labels would be equal)."""
    by_ch: dict[int, list[str]] = {}
    for c, m in panel:
        by_ch.setdefault(c, []).append(m)
    return {c: ms for c, ms in sorted(by_ch.items()) if len(ms) > 1}


def resolve_tables(cohort: Path | None, pairs: Path | None, panel: Path | None, num_markers: int) -> Tables:
    """Slides and panel from ``--pairs`` / ``--panel`` or the ``--cohort`` folder; the panel must list
    ``num_markers`` markers (``--num-markers``; 0 = any number).

    Raises:
        PipelineError: one line (no cohort / pairs, a missing pairing table or panel, a bad panel, duplicate ids).
    """
    if cohort is None and pairs is None:
        raise PipelineError("give --cohort (a folder with pairs.csv, or he/ and codex/), or --pairs and --panel")
    if cohort is not None and not Path(cohort).is_dir():
        raise PipelineError(f"cohort folder not found: {cohort}")
    panel_path = panel or (Path(cohort) / "marker_panel.csv" if cohort else None)
    if panel_path is None:
        raise PipelineError("give --panel (channel,marker CSV) or --cohort with a marker_panel.csv")
    panel_rows = read_marker_panel(panel_path)
    markers = [m for _, m in panel_rows]
    if num_markers and len(markers) != num_markers:
        raise PipelineError(f"marker panel {panel_path} lists {len(markers)} markers, expected "
                            f"{num_markers} (--num-markers 0 accepts any number)")
    shared = shared_channels(panel_rows)
    if shared:
        log.warning("marker panel %s gives one channel to several markers (%s): their labels will be identical; "
                    "fix the panel's channel column (a rerun then redoes every slide)", panel_path,
                    "; ".join(f"channel {c}: {', '.join(ms)}" for c, ms in shared.items()))
    slides = resolve_slides(cohort, pairs=pairs, need_codex=True, require_he=False)
    return Tables(slides.source, slides.pairs(), Path(panel_path), panel_rows, markers)
