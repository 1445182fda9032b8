"""The 40-marker CODEX panel of the HEX paper, read from the committed ``marker_panel.csv``.

``MARKERS[i]`` is the marker imaged in channel ``i`` of every sample-cohort CODEX file (DAPI first).
"""

from __future__ import annotations

import csv
from pathlib import Path

PANEL_CSV = Path(__file__).with_name("marker_panel.csv")


def read_panel(path: str | Path = PANEL_CSV) -> list[str]:
    """Read a ``channel,marker`` CSV and return the marker names ordered by channel index.

    Raises ``ValueError`` when the channel indices are not exactly 0..n-1 or a marker name repeats.
    """
    with open(path, newline="") as f:
        rows = [(int(r["channel"]), r["marker"].strip()) for r in csv.DictReader(f)]
    rows.sort()
    channels = [c for c, _ in rows]
    names = [m for _, m in rows]
    if channels != list(range(len(rows))):
        raise ValueError(f"{path}: channel indices must be 0..{len(rows) - 1}, got {channels}")
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: duplicate marker names")
    return names


MARKERS: list[str] = read_panel()
"""The 40 marker names in channel order."""

MARKER_INDEX: dict[str, int] = {m: i for i, m in enumerate(MARKERS)}
"""Marker name -> channel index."""
