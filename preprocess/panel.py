"""Marker panel and channel mapping: which CODEX channel holds each marker, checked against the OME names.

The marker panel CSV (``channel,marker``; channel = 0-based index in the CODEX file) is the user's mapping. When
the CODEX file names its channels too, the two must agree (case, spaces and punctuation ignored): a panel made for
another acquisition would otherwise label CD8 with whatever channel sits at its index. A mismatch stops with the
list of (marker, channel, OME name) that disagree; ``panel_wins=True`` (``--panel-wins``) keeps the panel's
indices and only warns. Every resolved mapping is returned as (marker, channel index, OME name) triples so that
stages can write it next to their outputs.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from pathlib import Path

from pipeline.errors import PipelineError
from preprocess.codex_formats import DAPI_NAMES, find_dapi, is_dapi_name, no_names_message
from preprocess.slide_io import CodexImage

log = logging.getLogger(__name__)

__all__ = ["DAPI_NAMES", "find_dapi", "is_dapi_name", "norm_name", "read_marker_panel", "resolve_channel_map",
           "resolve_channels", "find_dapi_channel"]


def norm_name(s: str) -> str:
    """A name compared case- and punctuation-insensitively (``Pan-Cytokeratin`` = ``pancytokeratin``)."""
    return re.sub(r"[^a-z0-9]", "", s.lower())


def read_marker_panel(path: str | os.PathLike) -> list[tuple[int, str]]:
    """Read a marker panel CSV (``channel,marker``; channel = 0-based index in the CODEX file)."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"marker panel not found: {path} (a CSV with columns channel,marker)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"channel", "marker"} <= set(rows[0]):
        raise PipelineError(f"marker panel {path} must have the columns channel,marker")
    try:
        panel = [(int(r["channel"]), r["marker"].strip()) for r in rows]
    except ValueError as e:
        raise PipelineError(f"marker panel {path}: channel must be a 0-based integer ({e})") from e
    names = [m for _, m in panel]
    if len(set(names)) != len(names):
        raise PipelineError(f"marker panel {path} lists a marker twice")
    return panel


def _check_names(codex: CodexImage, mapping: list[tuple[str, int, str | None]], panel_path, panel_wins: bool,
                 same=None) -> None:
    """Stop (or warn with ``panel_wins``) when panel markers and the file's channel names disagree (two names of a
    nuclear stain agree: the panel's DAPI is a QPTIFF's DAPI-01)."""
    same = same or (lambda m, n: norm_name(m) == norm_name(n) or (is_dapi_name(m) and is_dapi_name(n)))
    differ = [(m, i, n) for m, i, n in mapping if n is not None and not same(m, n)]
    if not differ:
        return
    listed = ", ".join(f"{m!r} -> channel {i} named {n!r}" for m, i, n in differ[:8])
    more = f" (and {len(differ) - 8} more)" if len(differ) > 8 else ""
    if panel_wins:
        log.warning("%s: the panel %s and the channel names disagree (panel wins): %s%s", codex.path,
                    panel_path, listed, more)
        return
    raise PipelineError(f"marker panel {panel_path} and the channel names of {codex.path} disagree: {listed}"
                        f"{more}; fix the panel's channel indices, or pass --panel-wins to use the panel as it is")


def resolve_channel_map(codex: CodexImage, markers: list[str], panel: list[tuple[int, str]] | None,
                        panel_path: str | os.PathLike | None = None,
                        panel_wins: bool = False) -> list[tuple[str, int, str | None]]:
    """(marker, channel index in ``codex``, OME channel name or None) for each of ``markers``, in their order.

    With a panel the indices come from it (they must exist in the image, and agree with the OME names unless
    ``panel_wins``); without one, the OME channel names must contain every marker.
    """
    names = codex.channel_names
    if panel is not None:
        by_name = {norm_name(m): c for c, m in panel}
        missing = [m for m in markers if norm_name(m) not in by_name]
        if missing:
            raise PipelineError(f"marker panel {panel_path} does not map the markers {missing}; add rows for them")
        idx = [by_name[norm_name(m)] for m in markers]
        bad = [(m, i) for m, i in zip(markers, idx) if i >= codex.num_channels or i < 0]
        if bad:
            raise PipelineError(
                f"CODEX image {codex.path} has {codex.num_channels} channels but the panel {panel_path} maps "
                f"{bad[:5]} beyond them; check the panel matches this image"
            )
        mapping = [(m, i, names[i] if names else None) for m, i in zip(markers, idx)]
        _check_names(codex, mapping, panel_path, panel_wins)
        return mapping
    if not names:
        raise PipelineError(no_names_message(codex))
    by_name = {norm_name(n): i for i, n in enumerate(names)}
    unknown = [m for m in markers if norm_name(m) not in by_name]
    if unknown:
        raise PipelineError(
            f"CODEX image {codex.path} ({codex.num_channels} channels) lacks the markers {unknown}; "
            "give a marker panel CSV (channel,marker) that maps them"
        )
    return [(m, by_name[norm_name(m)], names[by_name[norm_name(m)]]) for m in markers]


def resolve_channels(codex: CodexImage, markers: list[str], panel: list[tuple[int, str]] | None,
                     panel_path: str | os.PathLike | None = None, panel_wins: bool = False) -> list[int]:
    """Channel index in ``codex`` of each of ``markers`` (see :func:`resolve_channel_map`)."""
    return [i for _, i, _ in resolve_channel_map(codex, markers, panel, panel_path, panel_wins)]


def find_dapi_channel(codex: CodexImage, panel_path: str | os.PathLike | None,
                      panel_wins: bool = False) -> tuple[int, str, str | None]:
    """DAPI channel: from the marker panel, else the channel names (OME-XML, QPTIFF biomarkers or fluorophores,
    markers.csv; :func:`~preprocess.codex_formats.find_dapi`), else 0. Returns (index, source, channel name).

    A panel row for DAPI whose OME channel is named something else stops (unless ``panel_wins``), as in
    :func:`resolve_channel_map`.
    """
    names = codex.channel_names
    if panel_path and Path(panel_path).exists():
        for idx, name in read_marker_panel(panel_path):
            if is_dapi_name(name):
                if idx >= codex.num_channels:
                    raise PipelineError(f"marker panel {panel_path} puts DAPI at channel {idx} but {codex.path} has "
                                        f"{codex.num_channels} channels")
                ome = names[idx] if names else None
                _check_names(codex, [(name, idx, ome)], panel_path, panel_wins,
                             same=lambda m, n: is_dapi_name(n) or norm_name(m) == norm_name(n))
                return idx, f"marker panel {panel_path}", ome
    for listed, what in ((names, f"channel names ({getattr(codex, 'names_source', 'OME-XML')})"),
                         (getattr(codex, "band_names", None), "QPTIFF fluorophore names")):
        i = find_dapi(listed)
        if i is not None:
            return i, what, listed[i]
    return 0, "default (channel 0; pass --dapi-channel to choose)", names[0] if names else None
