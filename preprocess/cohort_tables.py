"""The table and folder checks of :mod:`preprocess.check_cohort`: ``clinical.csv``, ``splits/splits_*.csv``, the
marker panel's channels and the output folder.

Each check adds findings to the collector it is given (``c.add(slide, column, level, message)``), using the slide
ids found in ``he/``; see :mod:`preprocess.check_cohort` for the rules and the report.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

COHORT_ROW = "(cohort)"
ERROR, WARNING, INFO = "error", "warning", "info"
CLINICAL_COLUMNS = ("case_id", "slide_id", "survival_months", "censorship")


def _read_csv(path: Path, c: Any, column: str):
    import pandas as pd

    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:  # noqa: BLE001 - pandas raises several types for unreadable CSVs
        c.add(COHORT_ROW, column, ERROR, f"cannot read {path} as CSV ({type(e).__name__}: {e})")
        return None


def check_clinical(cohort: Path, ids: list[str], c: Any, source: str = "") -> dict[str, str]:
    """Check ``clinical.csv`` against the cohort's slide ``ids`` (from ``source``: pairs.csv or he/); returns
    {slide: case id}."""
    source = source or str(cohort / "he")
    path = cohort / "clinical.csv"
    if not path.exists():
        c.add(COHORT_ROW, "clinical", WARNING, f"no clinical table {path}: the MICA stages (08, 09) need it")
        return {}
    df = _read_csv(path, c, "clinical")
    if df is None:
        return {}
    missing = [k for k in CLINICAL_COLUMNS if k not in df.columns]
    if missing:
        c.add(COHORT_ROW, "clinical", ERROR, f"clinical table {path} lacks the columns {missing} (needs "
                                             f"{','.join(CLINICAL_COLUMNS)})")
        return {}
    case_of: dict[str, str] = {}
    for sid, rows in df.groupby("slide_id"):
        if len(rows) > 1:
            c.add(str(sid), "clinical", ERROR, f"clinical table {path} has {len(rows)} rows for slide {sid}; keep one "
                                               "row per slide")
        case_of[str(sid)] = str(rows["case_id"].iloc[0])
        row = rows.iloc[0]
        bad = [k for k in ("survival_months", "censorship") if not _is_number(row[k])]
        if bad:
            c.add(str(sid), "clinical", ERROR, f"clinical table {path}: slide {sid} has no numeric {bad}")
        elif row["censorship"].strip() not in ("0", "1", "0.0", "1.0"):
            c.add(str(sid), "clinical", ERROR, f"clinical table {path}: censorship of {sid} is {row['censorship']!r}; "
                                               "use 1 = censored, 0 = event")
    for sid in sorted(set(case_of) - set(ids)):
        c.add(sid, "clinical", WARNING, f"clinical table {path} lists slide {sid}, which is not a slide of the "
                                        f"cohort ({source}); the MICA stages leave it out")
    for sid in ids:
        if sid not in case_of:
            c.add(sid, "clinical", WARNING, f"slide {sid} has no row in {path}; the MICA stages leave it out")
    return case_of


def _is_number(v: str) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return bool(str(v).strip()) and str(v).strip().lower() != "nan"


def check_splits(cohort: Path, ids: list[str], case_of: dict[str, str], c: Any, source: str = "") -> None:
    """Check ``splits/splits_*.csv`` against the cohort's slide ``ids`` (from ``source``) and the patients of
    ``case_of``: unknown slides, a slide or a patient in train and val."""
    source = source or str(cohort / "he")
    split_dir = cohort / "splits"
    files = sorted(split_dir.glob("splits_*.csv")) if split_dir.is_dir() else []
    if not files:
        c.add(COHORT_ROW, "splits", WARNING, f"no split files {split_dir}/splits_*.csv: training stages need them")
        return
    listed: set[str] = set()
    for path in files:
        df = _read_csv(path, c, "splits")
        if df is None:
            continue
        if not {"train", "val"} <= set(df.columns):
            c.add(COHORT_ROW, "splits", ERROR, f"split file {path} must have the columns train,val (slide ids)")
            continue
        cols = {k: [s.strip() for s in df[k] if s.strip()] for k in ("train", "val")}
        for k, values in cols.items():
            listed.update(values)
            for sid in sorted(set(values) - set(ids)):
                c.add(sid, "splits", ERROR, f"split file {path} lists slide {sid} in {k!r}, which is not a slide "
                                            f"of the cohort ({source}; split files hold slide ids, not case ids)")
        for sid in sorted(set(cols["train"]) & set(cols["val"])):
            c.add(sid, "splits", ERROR, f"split file {path} lists slide {sid} in both train and val")
        if case_of:
            train_cases = {case_of[s]: s for s in cols["train"] if s in case_of}
            for s in cols["val"]:
                case = case_of.get(s)
                if case in train_cases and train_cases[case] != s:
                    c.add(s, "splits", ERROR, f"split file {path}: patient {case} is in train ({train_cases[case]}) "
                                              f"and val ({s}); keep a patient's slides in one column")
    for sid in ids:
        if sid not in listed:
            c.add(sid, "splits", WARNING, f"slide {sid} is in no split file of {split_dir}")


# ----------------------------------------------------------------------------------------------------------------
# panel and output folder


def check_panel_channels(panel: list[tuple[int, str]], panel_path: Path, c: Any) -> bool:
    """One marker per channel, channels >= 0; returns False (an error added) otherwise."""
    by_channel: dict[int, list[str]] = {}
    for ch, m in panel:
        by_channel.setdefault(ch, []).append(m)
    ok = True
    for ch, ms in sorted(by_channel.items()):
        if ch < 0:
            c.add(COHORT_ROW, "panel", ERROR, f"marker panel {panel_path} maps {', '.join(ms)} to channel {ch}; "
                                              "channels are 0-based indices >= 0")
            ok = False
        elif len(ms) > 1:
            c.add(COHORT_ROW, "panel", ERROR, f"marker panel {panel_path} maps {len(ms)} markers to channel {ch} "
                                              f"({', '.join(ms)}); each channel holds one marker: fix the channel "
                                              "indices (duplicate labels otherwise)")
            ok = False
    return ok


def check_output_folder(out: Path, c: Any) -> None:
    """``out`` must be a writable folder, or creatable in a writable parent (probed with a file written and removed
    in the deepest folder that exists; nothing is created)."""
    p = Path(os.path.abspath(out))
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        c.add(COHORT_ROW, "he", ERROR, f"output folder {out}: {p} is not a folder; choose another OUT")
        return
    probe = p / f".check_cohort.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        c.add(COHORT_ROW, "he", ERROR, f"output folder {out} is not writable ({p}: {e.strerror or e}); choose "
                                       "another OUT or fix its permissions")
