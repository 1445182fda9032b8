"""MICA's use of the cohort tables: training units, patient outcomes, survival bins, the fold files and the slide
ids they name.

The clinical table and the split files are read and checked by :mod:`pipeline.tables` (one reader, one split parser,
one leakage check: the rules ``preprocess.check_cohort`` reports): :func:`pipeline.tables.read_clinical_table` with
``task`` survival or response, :func:`pipeline.tables.read_fold` for a fold file (slides in the clinical table, no
patient on both sides, events in a survival fold; its patient and event counts logged).

Slide ids are the names of :func:`pipeline.cohort.resolve_slides` (the file name up to its first dot, a link's
own name): when the cohort folder holds slides (``pairs.csv`` or ``he/``), the split ids must be among them
(:func:`check_cohort_ids`); ids that differ between the clinical table, the splits, the cohort and the feature
bags stop with one line that lists them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError
from pipeline.tables import ID_HINT

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unit:
    """One training item: a patient (all its slides of the split) or a single slide."""

    case_id: str
    slides: tuple[str, ...]


def make_units(slides: list[str], clinical: pd.DataFrame, unit: str = "patient") -> list[Unit]:
    """Group split slides into items: per patient (slide order of the split kept) or one per slide."""
    if unit == "slide":
        return [Unit(clinical.at[s, "case_id"], (s,)) for s in slides]
    if unit != "patient":
        raise PipelineError(f"--unit must be 'patient' or 'slide', not {unit!r}")
    groups: dict[str, list[str]] = {}
    for s in slides:
        groups.setdefault(clinical.at[s, "case_id"], []).append(s)
    return [Unit(c, tuple(ss)) for c, ss in groups.items()]


def patient_outcomes(clinical: pd.DataFrame, cases: list[str] | None = None) -> pd.DataFrame:
    """One row per patient (index case_id): per column the first non-missing value over its slides."""
    pt = clinical.reset_index(drop=True).groupby("case_id", sort=False).first()
    pt.insert(0, "case_id", pt.index)
    return pt if cases is None else pt.loc[list(dict.fromkeys(cases))]


def fold_bins(clinical: pd.DataFrame, train_slides: list[str], n_bins: int = 4,
              bins_from: str = "train") -> np.ndarray:
    """Hazard-bin edges (n_bins+1,) from the uncensored patient times of the training fold (or the whole cohort)."""
    from mica.survival import hazard_bins

    if bins_from not in ("train", "cohort"):
        raise PipelineError(f"--bins-from must be 'train' or 'cohort', not {bins_from!r}")
    cases = None if bins_from == "cohort" else [clinical.at[s, "case_id"] for s in train_slides]
    pt = patient_outcomes(clinical, cases)
    times, cens = pt["survival_months"].to_numpy(float), pt["censorship"].to_numpy(float)
    if not (cens == 0).any():
        raise PipelineError(f"{clinical.attrs.get('path', 'clinical table')}: only 0 uncensored patients in the "
                            f"{bins_from} set; hazard bins need observed events (censorship 0)")
    if int((cens == 0).sum()) < n_bins:
        log.warning("only %d uncensored patients in the %s set for %d hazard bins", int((cens == 0).sum()),
                    bins_from, n_bins)
    return np.asarray(hazard_bins(times, cens, n_bins=n_bins), dtype=np.float64)


def split_path(splits_dir: str | os.PathLike, fold: int) -> Path:
    """``splits_dir/splits_{fold}.csv``."""
    return Path(splits_dir) / f"splits_{fold}.csv"


def check_split_files(splits_dir: str | os.PathLike, folds: list[int]) -> None:
    """The folder and every fold's ``splits_{k}.csv`` exist, else one line naming the missing ones."""
    d = Path(splits_dir)
    if not d.is_dir():
        raise PipelineError(f"splits folder {d} does not exist; pass --splits-dir or --cohort (with splits/)")
    missing = [str(split_path(d, k)) for k in folds if not split_path(d, k).is_file()]
    if missing:
        have = sorted(p.name for p in d.glob("splits_*.csv"))
        raise PipelineError(f"split files not found: {', '.join(missing)} (the folder has {have or 'none'}); fix "
                            "--folds or add the files")


def check_cohort_ids(cohort: str | os.PathLike | None, slides: list[str], table: str) -> None:
    """When ``cohort`` holds slides (``pairs.csv`` or ``he/``), every id of ``slides`` is one of them, resolved by
    :func:`pipeline.cohort.resolve_slides`; else one line listing them (a cohort without slides: no check)."""
    if cohort is None:
        return
    cohort = Path(cohort)
    if not ((cohort / "pairs.csv").is_file() or (cohort / "he").is_dir()):
        return
    from pipeline.cohort import check_ids, resolve_slides

    check_ids(slides, resolve_slides(cohort, require_he=False), table,
              fix=f"fix the ids in {table} or the slide names ({ID_HINT})")
