"""The pairing table and marker panel of stage 03 (pass 1 and the normalisation step share them)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from preprocess.panel import read_marker_panel
from preprocess.slide_io import read_pairs
from preprocess.utils import PipelineError


@dataclass
class Tables:
    """Resolved inputs: ``pairs`` {slide: (he, codex)}, ``panel`` [(channel, marker)], ``markers`` in panel order."""

    pairs_path: Path
    pairs: dict
    panel_path: Path
    panel: list[tuple[int, str]]
    markers: list[str]


def add_table_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pairs", type=Path, help="pairing table he_slide,codex_image (default COHORT/pairs.csv)")
    p.add_argument("--panel", type=Path, help="marker panel channel,marker (default COHORT/marker_panel.csv)")
    p.add_argument("--num-markers", type=int, default=40, help="markers the panel must list (0 = any; default 40)")


def resolve_tables(args: argparse.Namespace) -> Tables:
    """Pairs and panel from ``--pairs`` / ``--panel`` or the cohort folder; the panel must list ``--num-markers``."""
    pairs_path = args.pairs or (args.cohort / "pairs.csv" if args.cohort else None)
    panel_path = args.panel or (args.cohort / "marker_panel.csv" if args.cohort else None)
    if pairs_path is None or panel_path is None:
        raise PipelineError("give --cohort, or both --pairs and --panel")
    pairs = read_pairs(pairs_path)
    panel = read_marker_panel(panel_path)
    markers = [m for _, m in panel]
    if args.num_markers and len(markers) != args.num_markers:
        raise PipelineError(f"marker panel {panel_path} lists {len(markers)} markers, expected "
                            f"{args.num_markers} (--num-markers 0 accepts any number)")
    return Tables(Path(pairs_path), pairs, Path(panel_path), panel, markers)
