"""Raw per-patch marker means (pass 1 output): ``markers/raw/{slide}.csv`` and its sidecar ``{slide}.json``.

The CSV is ``slide,index,x,y,coverage,n_codex_px,<markers>`` for every grid patch. The sidecar names the inputs
it was made from (grid, registration record, displacement field, CODEX image) with their modification times, and
the resolved channels as (marker, channel index, OME name) triples. A raw file is *fresh* when both exist and
every input still exists with the modification time it had then (no clock comparison, so clock skew on shared
filesystems does not matter); only fresh files are skipped in pass 1 and pooled / labelled in pass 2, so a slide
whose registration was redone (or removed because it failed) never keeps labels from its old transform.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from preprocess.utils import PipelineError, write_json

log = logging.getLogger(__name__)

RAW_META_COLUMNS = ["slide", "index", "x", "y", "coverage", "n_codex_px"]


def raw_csv_path(out: str | os.PathLike, slide_id: str) -> Path:
    return Path(out) / "markers" / "raw" / f"{slide_id}.csv"


def raw_meta_path(out: str | os.PathLike, slide_id: str) -> Path:
    return Path(out) / "markers" / "raw" / f"{slide_id}.json"


def label_csv_path(out: str | os.PathLike, slide_id: str) -> Path:
    return Path(out) / "markers" / f"{slide_id}.csv"


def write_raw_meta(out: str | os.PathLike, slide_id: str, meta: dict[str, Any]) -> None:
    write_json(raw_meta_path(out, slide_id), meta)


def input_entry(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """``{"path", "mtime_ns"}`` of an input file as pass 1 reads it (None for no file)."""
    if path is None:
        return None
    return {"path": str(path), "mtime_ns": Path(path).stat().st_mtime_ns}


def stale_reason(out: str | os.PathLike, slide_id: str) -> str | None:
    """Why the raw means of ``slide_id`` cannot be used (None: they are fresh)."""
    csv, meta_path = raw_csv_path(out, slide_id), raw_meta_path(out, slide_id)
    if not csv.exists() or not meta_path.exists():
        return f"no raw marker means ({csv} and {meta_path.name})"
    try:
        meta = json.loads(meta_path.read_text())
        inputs = [e for e in (meta.get("inputs") or {}).values() if e]
        for e in inputs:
            p = Path(e["path"])
            if not p.exists():
                return f"its input {p} is gone"
            if p.stat().st_mtime_ns != int(e["mtime_ns"]):
                return f"{p} changed since {csv} was written"
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return f"{meta_path} is not a raw-means sidecar of this version"
    return None


def load_raw(path: str | os.PathLike, markers: list[str]):
    """Read a raw CSV and check it has the panel's markers (else it is stale: --overwrite)."""
    import pandas as pd

    df = pd.read_csv(path, dtype={"slide": str})
    missing = [m for m in RAW_META_COLUMNS + markers if m not in df.columns]
    if missing:
        raise PipelineError(f"raw marker file {path} lacks the columns {missing[:5]} (made with another panel?); "
                            "rerun with --overwrite")
    return df
