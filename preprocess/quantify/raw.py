"""Raw per-patch marker means (pass 1 output): ``markers/raw/{slide}.csv``, its sidecar ``{slide}.json`` and the
slide's done-record ``markers/done/{slide}.json``.

The CSV is ``slide,index,x,y,coverage,n_codex_px,<markers>`` for every grid patch; with ``--dense-grid`` the cell
means of the patches with CODEX pixels are in ``{slide}_dense.h5`` (:mod:`preprocess.quantify.dense`). The sidecar
holds the resolved channels as (marker, channel index, OME name) triples and the registration's status. The
done-record (:mod:`pipeline.done`, written by the stage runner) names what they were made from: the settings that
change the values, and the input files (``codex``, ``grid``, ``registration``, ``field``, ``panel``) with their size and
mtime. Raw means are *fresh* when both files and the record exist and every input file still has the size and
mtime it had then (no clock comparison, so clock skew on shared filesystems does not matter): only fresh raw means
are skipped in pass 1 and pooled / labelled by the normalisation, so a slide whose registration was redone (or
removed because it failed), or whose panel was fixed, never keeps labels from the old inputs.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from pipeline import artifacts as art
from pipeline.done import changed_inputs
from pipeline.errors import PipelineError
from pipeline.io import write_json

log = logging.getLogger(__name__)

RAW_META_COLUMNS = ["slide", "index", "x", "y", "coverage", "n_codex_px"]
RAW_SCHEMA = art.LABELS.schema
"""Version of the pass-1 files (the done-record's ``schema``: the labels artifact's in :mod:`pipeline.artifacts`)."""
SLIDE_SETTINGS = ("codex_mpp",)
"""Done-record settings that belong to one slide (its pixel size, from ``--codex-mpp`` or the pixel-size table),
not to the run: raw means made with different values of these are pooled by the normalisation."""


def raw_dir(out: str | os.PathLike) -> Path:
    """``OUT/markers/raw``: the raw means of pass 1 and their sidecars."""
    return art.LABELS.dir(out) / "raw"


def raw_csv_path(out: str | os.PathLike, slide_id: str) -> Path:
    return raw_dir(out) / f"{slide_id}.csv"


def raw_meta_path(out: str | os.PathLike, slide_id: str) -> Path:
    return raw_dir(out) / f"{slide_id}.json"


def raw_dense_path(out: str | os.PathLike, slide_id: str) -> Path:
    """``OUT/markers/raw/{slide}_dense.h5``: pass 1's raw (un-normalised) cell means with ``--dense-grid``
    (:mod:`preprocess.quantify.dense`)."""
    return raw_dir(out) / f"{slide_id}_dense.h5"


def label_csv_path(out: str | os.PathLike, slide_id: str) -> Path:
    return art.LABELS.path(out, slide_id)


def record_path(out: str | os.PathLike, slide_id: str) -> Path:
    """The pass-1 done-record of a slide (``markers/done/{slide}.json``)."""
    return art.LABELS.records_dir(out) / f"{slide_id}.json"


def write_raw_meta(out: str | os.PathLike, slide_id: str, meta: dict[str, Any]) -> None:
    write_json(raw_meta_path(out, slide_id), meta)


def input_entry(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """``{"path", "mtime_ns"}`` of an input file as pass 1 reads it (None for no file), for the sidecar."""
    if path is None:
        return None
    return {"path": str(path), "mtime_ns": Path(path).stat().st_mtime_ns}


def read_record(out: str | os.PathLike, slide_id: str) -> tuple[dict[str, Any] | None, str | None]:
    """(the slide's pass-1 done-record, None) when its raw means are fresh, else (None, why not)."""
    csv, meta_path, rec_path = raw_csv_path(out, slide_id), raw_meta_path(out, slide_id), record_path(out, slide_id)
    if not csv.exists() or not meta_path.exists():
        return None, f"no raw marker means ({csv} and {meta_path.name})"
    try:
        rec = json.loads(rec_path.read_text())
        if rec.get("schema") != RAW_SCHEMA:
            return None, f"its raw means were made by another version (schema {rec.get('schema')}); rerun pass 1"
        for _, path, gone in changed_inputs(rec["inputs"])[:1]:
            return None, f"its input {path} is gone" if gone else f"{path} changed since {csv} was written"
        if int(rec.get("settings", {}).get("dense_grid", 0) or 0) > 0 and not raw_dense_path(out, slide_id).exists():
            return None, f"no raw dense means ({raw_dense_path(out, slide_id)}); rerun pass 1"
    except FileNotFoundError:
        return None, f"its raw means have no done-record ({rec_path}): made by an older version; rerun pass 1"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, f"{rec_path} is not a done-record of this version; rerun pass 1"
    return rec, None


def load_raw(path: str | os.PathLike, markers: list[str]):
    """Read a raw CSV and check it has the panel's markers (else it is stale: --overwrite)."""
    import pandas as pd

    df = pd.read_csv(path, dtype={"slide": str})
    missing = [m for m in RAW_META_COLUMNS + markers if m not in df.columns]
    if missing:
        raise PipelineError(f"raw marker file {path} lacks the columns {missing[:5]} (made with another panel?); "
                            "rerun with --overwrite")
    return df
