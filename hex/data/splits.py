"""Which slides HEX trains and validates on: a split file checked against the clinical table, and the slides' inputs.

* :func:`load_split`: the split ``splits_{k}.csv`` (columns ``train``, ``val`` of slide ids) and, with the clinical
  table ``clinical.csv`` (``case_id,slide_id``, one row per slide), the patient-leakage check, by the rules of
  :mod:`pipeline.tables` (the ones ``preprocess.check_cohort`` reports). A split slide the clinical table does not
  list is an error (``allow_unknown=True``: its own patient, with a warning), since the leakage check cannot see it.
* :func:`check_split_slides`: split ids without a label table or patches (a typo, another id spelling, a slide the
  earlier stages skipped) stop the stage with one line that lists them all, before any work.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.tables import read_clinical_table, read_fold

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


def load_split(
    path: str | os.PathLike,
    clinical: str | os.PathLike | None = None,
    columns: Sequence[str] = ("train", "val"),
    allow_unknown: bool = False,
) -> dict[str, list[str]]:
    """Read the given split columns and check that no slide and (with ``clinical``) no patient is in two of them.

    Returns ``{column: [slide ids]}``. A slide missing from the clinical table is an error naming both files, unless
    ``allow_unknown`` (then it counts as its own patient, with a warning). Only the ids of the clinical table are
    read (``task="patients"``): its outcome columns are MICA's.
    """
    table = read_clinical_table(clinical, task="patients") if clinical is not None else None
    return read_fold(path, table, tuple(columns), allow_unknown=allow_unknown, logger=log)
