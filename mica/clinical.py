"""MICA tables: the clinical CSV, the fold splits, training units, survival bins, and the slide ids they name.

* clinical CSV (MCAT format): ``case_id,slide_id,survival_months,censorship`` (1 = censored), optional ``response``
  (0/1) and covariates; one row per slide, patient fields repeated on each of the patient's slides;
* split CSV ``splits_{k}.csv``: columns ``train``, ``val`` of SLIDE ids, empty cells where a column is shorter (any
  other column, e.g. the original release's ``patient_*`` columns, is ignored).

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
from typing import Any

import numpy as np
import pandas as pd

from pipeline.cohort import clean_id, read_split
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

REQUIRED = ("case_id", "slide_id")
SURVIVAL_COLUMNS = ("survival_months", "censorship")
ID_HINT = "slide ids are file names up to their first dot (slide_000.svs -> slide_000), as in he/ or pairs.csv"


# ----------------------------------------------------------------------------------------------------------------
# clinical table and splits


def read_clinical_table(path: str | os.PathLike, task: str = "survival") -> pd.DataFrame:
    """Read an MCAT-format clinical CSV -> DataFrame indexed by ``slide_id`` (str ids, float months, int censorship).

    ``task="survival"`` requires ``survival_months`` and ``censorship``; ``task="response"`` requires ``response``.
    A patient whose slides disagree on an outcome field is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"clinical table {path} does not exist; pass --clinical or --cohort")
    df = _read_csv(path, "clinical table", dtype={"case_id": str, "slide_id": str})
    need = list(REQUIRED) + (list(SURVIVAL_COLUMNS) if task == "survival" else ["response"])
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise PipelineError(f"clinical table {path} lacks columns {missing} (has {list(df.columns)}); the MCAT format "
                            "is case_id,slide_id,survival_months,censorship[,response,covariates...]")
    df = df[df["slide_id"].notna()].copy()
    df["slide_id"] = [clean_id(s) for s in df["slide_id"]]
    df["case_id"] = [clean_id(c) for c in df["case_id"]]
    dup = sorted(df["slide_id"][df["slide_id"].duplicated()].unique())
    if dup:
        raise PipelineError(f"clinical table {path}: slides listed more than once: {dup[:10]}")
    for col in (*SURVIVAL_COLUMNS, "response"):
        if col in df.columns:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    if task == "survival":
        bad = df["survival_months"].isna() | df["censorship"].isna() | ~df["censorship"].isin([0, 1]) \
            | (df["survival_months"] < 0)
        if bad.any():
            raise PipelineError(f"clinical table {path}: slides {list(df['slide_id'][bad])[:10]} need survival_months "
                                ">= 0 and censorship 0/1 (1 = censored)")
    if "response" in df.columns:
        bad = df["response"].notna() & ~df["response"].isin([0, 1])
        if bad.any():
            raise PipelineError(f"clinical table {path}: response must be 0/1 "
                                f"(slides {list(df['slide_id'][bad])[:10]})")
    for col in (*SURVIVAL_COLUMNS, "response"):
        if col in df.columns:
            n = df.groupby("case_id")[col].nunique(dropna=True)
            if (n > 1).any():
                raise PipelineError(f"clinical table {path}: patients {list(n.index[n > 1])[:10]} have different "
                                    f"{col!r} on different slides; a patient has one outcome")
    df.attrs["path"] = str(path)
    return df.set_index("slide_id", drop=False)


def read_fold(split_csv: str | os.PathLike, clinical: pd.DataFrame,
              columns: tuple[str, ...] = ("train", "val")) -> dict[str, list[str]]:
    """Slide ids per split column, checked: every slide in the clinical table, no slide or patient on both sides."""
    if Path(split_csv).is_file():  # an unreadable CSV: one line (read_split would pass pandas' error on)
        _read_csv(Path(split_csv), "split file", dtype=str)
    split = {c: read_split(split_csv, c) for c in columns}
    src = clinical.attrs.get("path", "the clinical table")
    for c, ids in split.items():
        unknown = [s for s in ids if s not in clinical.index]
        if unknown:
            raise PipelineError(f"split file {split_csv}: column {c!r} names slides not in {src}: {unknown[:10]}; "
                                f"fix the split or add the slides to the clinical table ({ID_HINT})")
    for i, a in enumerate(columns):
        for b in columns[i + 1:]:
            both = sorted(set(split[a]) & set(split[b]))
            if both:
                raise PipelineError(f"split file {split_csv}: slides in both {a!r} and {b!r}: {both[:10]}")
            case = clinical["case_id"]
            pa = {case[s] for s in split[a]}
            for p in sorted(pa & {case[s] for s in split[b]}):
                sa = [s for s in split[a] if case[s] == p]
                sb = [s for s in split[b] if case[s] == p]
                raise PipelineError(f"split file {split_csv}: patient {p} is in both {a!r} (slides {sa}) and {b!r} "
                                    f"(slides {sb}): patient leakage; put all of a patient's slides on one side")
    return split


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


def _read_csv(path: Path, what: str, **kw: Any) -> pd.DataFrame:
    """``pd.read_csv`` with one-line errors for files that are not readable CSV tables."""
    try:
        return pd.read_csv(path, **kw)
    except (OSError, UnicodeDecodeError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise PipelineError(f"cannot read the {what} {path} as CSV ({type(e).__name__}: {str(e).splitlines()[0]}); "
                            "save it as a UTF-8 CSV with a header row") from None


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
