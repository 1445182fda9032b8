"""Split files and the clinical table: which slides train and validate, and the patient-leakage check.

* split ``splits_{k}.csv``: columns ``train``, ``val`` (slide ids, empty cells allowed where a column is shorter);
* clinical table ``clinical.csv``: ``case_id,slide_id`` (one row per slide). A patient whose slides sit in two
  columns is an error, and so is a split slide the clinical table does not list (``allow_unknown=True`` lets it be
  its own patient, with a warning), since the leakage check cannot see such slides.
* :func:`check_split_slides`: split ids without a label table or patches (a typo, another id spelling, a slide the
  earlier stages skipped) stop the stage with one line that lists them all, before any work.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from pipeline.cohort import clean_id, read_split  # noqa: F401 (read_split re-exported)
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)


def check_split_slides(slides: Sequence[str], markers_dir: str | os.PathLike, patches_dir: str | os.PathLike,
                       source: str | os.PathLike) -> None:
    """Every slide of ``slides`` (named by ``source``: a split file, ``--slides``) has a label table
    ``markers_dir/{slide}.csv`` and patches (``patches_dir/{slide}.h5`` or the PNG folder ``patches_dir/{slide}/``);
    else one :class:`PipelineError` line listing the slides that lack them."""
    mdir, pdir = Path(markers_dir), Path(patches_dir)
    no_labels = [s for s in slides if not (mdir / f"{s}.csv").is_file()]
    no_patches = [s for s in slides if s not in no_labels and not (pdir / f"{s}.h5").is_file()
                  and not (pdir / s).is_dir()]
    parts = []
    if no_labels:
        parts.append(f"{len(no_labels)} have no label table in {mdir} ({_listed(no_labels)})")
    if no_patches:
        parts.append(f"{len(no_patches)} have no patches in {pdir} ({_listed(no_patches)})")
    if parts:
        raise PipelineError(f"{source}: of its {len(slides)} slides {'; '.join(parts)}; fix the ids (the slide file "
                            "name up to its first dot) or run stages 01-03 for them")


def _listed(ids: Sequence[str], n: int = 10) -> str:
    return ", ".join(ids[:n]) + (f", ... ({len(ids) - n} more)" if len(ids) > n else "")


def read_clinical(path: str | os.PathLike) -> dict[str, str]:
    """Map slide id -> case (patient) id from a clinical CSV with ``case_id,slide_id`` columns."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"clinical table {path} does not exist")
    df = pd.read_csv(path, dtype=str)
    for col in ("case_id", "slide_id"):
        if col not in df.columns:
            raise PipelineError(f"clinical table {path} has no column {col!r} (columns: {list(df.columns)})")
    return {clean_id(s): clean_id(c) for s, c in zip(df["slide_id"], df["case_id"]) if pd.notna(s)}


def load_split(
    path: str | os.PathLike,
    clinical: str | os.PathLike | None = None,
    columns: Sequence[str] = ("train", "val"),
    allow_unknown: bool = False,
) -> dict[str, list[str]]:
    """Read the given split columns and check that no slide and (with ``clinical``) no patient is in two of them.

    Returns ``{column: [slide ids]}``. A slide missing from the clinical table is an error naming both files, unless
    ``allow_unknown`` (then it counts as its own patient, with a warning).
    """
    split = {c: read_split(path, c) for c in columns}
    case_of = read_clinical(clinical) if clinical is not None else {}
    if clinical is not None:
        unknown = sorted({s for ids in split.values() for s in ids if s not in case_of})
        if unknown and not allow_unknown:
            raise PipelineError(
                f"split {path}: {len(unknown)} slides are not in the clinical table {clinical} (e.g. {unknown[:5]}), "
                "so their patients cannot be checked for train/val leakage; add them to the table, or pass "
                "--allow-unknown-slides to treat each as its own patient")
        if unknown:
            log.warning("split %s: %d slides not in clinical table %s (treated as their own patient): %s",
                        path, len(unknown), clinical, unknown[:5])
    cols = list(columns)
    for i, a in enumerate(cols):
        for b in cols[i + 1:]:
            both = sorted(set(split[a]) & set(split[b]))
            if both:
                raise PipelineError(f"split file {path}: slides in both {a!r} and {b!r}: {both[:10]}")
            pa = {case_of.get(s, s) for s in split[a]}
            pb = {case_of.get(s, s) for s in split[b]}
            overlap = sorted(pa & pb)
            if overlap:
                raise PipelineError(
                    f"split file {path}: patients in both {a!r} and {b!r} (via {clinical}): {overlap[:10]}; "
                    "a patient's slides must all be on one side")
    return split
