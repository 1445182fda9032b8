"""The cohort's tables, ``clinical.csv`` and ``splits/splits_{k}.csv``: one reader each, one patient-leakage check,
and one set of rules that ``preprocess.check_cohort`` reports (every finding) and the stages raise (the first error
as one :class:`PipelineError` line, warnings logged), so the two cannot disagree::

    from pipeline import tables
    clinical = tables.read_clinical_table(COHORT / "clinical.csv", task="survival")   # DataFrame by slide_id
    split = tables.read_fold(COHORT / "splits/splits_0.csv", clinical)                 # {"train": [...], "val": [...]}

Every rule below is a :class:`Finding` (level, one-line message naming the file, the row/slide/patient, the value and
the fix). A stage checks the rules of the columns it reads: MICA (``task`` ``"survival"`` or ``"response"``) every
outcome value the table has and the completeness of its task's columns, HEX training (``"patients"``) the ids only;
``check_cohort`` checks them all (``task=None``: each outcome column with the rules of the task that needs it).

Clinical table (MCAT format) ``case_id,slide_id[,survival_months,censorship][,response][,covariates...]``:

- a readable CSV with the columns ``case_id`` and ``slide_id`` (error); the outcome columns of the task: error in
  the stage, a warning in ``check_cohort`` (which does not know the task) when the table has neither set;
- one row per slide (error); a row without ``slide_id`` is ignored (warning); a slide without ``case_id`` (error);
- ``survival_months`` a number >= 0 (months), ``censorship`` 0 or 1 (1 = censored, 0 = event), ``response`` 0 or 1:
  any other value is an error naming the patient, the slide, the line and the value (a ``yes`` is never dropped
  silently); an empty survival cell is an error for survival, an empty response a warning for response (the patient
  is left out);
- a patient's slides agree on every outcome (error; an empty cell takes the value of the patient's other slides).

Split file ``splits_{k}.csv`` (the original release's layouts: any other column, e.g. ``patient_*`` or an unnamed
index, is ignored; ``4.0`` in a numeric column is id ``4``):

- a readable CSV with the columns ``train`` and ``val`` of SLIDE ids, empty cells where a column is shorter (error);
- each column lists slides, none twice (error); no slide in both columns (error);
- with the clinical table: every slide has a row (error: its patient would escape the leakage check; HEX training's
  ``--allow-unknown-slides`` makes it a warning and the slide its own patient), no patient in both columns (error);
- survival: the training column holds events (error: the hazard bins and the loss need them), the validation column
  too (warning: the fold's c-index is undefined); the per-fold counts are logged by the stages;
- with the cohort's slides (``check_cohort``): every id is one of them (error).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

ERROR, WARNING, INFO = "error", "warning", "info"
COHORT_ROW = "(cohort)"  # a finding about the whole cohort, not one slide
ID_COLUMNS = ("case_id", "slide_id")
SURVIVAL_COLUMNS = ("survival_months", "censorship")
RESPONSE = "response"
OUTCOME_COLUMNS = (*SURVIVAL_COLUMNS, RESPONSE)
SPLIT_COLUMNS = ("train", "val")
TASKS = ("survival", "response", "patients")
MCAT_HINT = "the MCAT format is case_id,slide_id,survival_months,censorship[,response,covariates...]"
ID_HINT = "slide ids are file names up to their first dot (slide_000.svs -> slide_000), as in he/ or pairs.csv"
_EXPECTED = {"survival_months": "a number of months >= 0 is expected",
             "censorship": "0 or 1 is expected (1 = censored, 0 = event)",
             RESPONSE: "0 or 1 is expected (1 = responder, 0 = not; empty when unknown)"}


@dataclass(frozen=True)
class Finding:
    """One broken (or noteworthy) thing: ``level`` (``"error"``, ``"warning"`` or ``"info"``), a one-line ``message``
    naming the file, the row or slide, the value and the fix; the slide it concerns (``COHORT_ROW`` for the whole
    cohort), ``check_cohort``'s table column (``"clinical"``, ``"splits"``, ...) and a short text for its cell."""

    level: str
    message: str
    slide: str = COHORT_ROW
    column: str = ""
    short: str = ""


_logged: set[str] = set()


def raise_findings(findings: Iterable[Finding], logger: logging.Logger | None = None) -> None:
    """The stages' side of the rules: each warning logged (once per process: folds are checked twice, before the
    run and at the fold), then the first error raised as one :class:`PipelineError` line (``"(N more errors)"``)."""
    findings = list(findings)
    for f in findings:
        if f.level == WARNING and f.message not in _logged:
            _logged.add(f.message)
            (logger or log).warning("%s", f.message)
    errs = [f for f in findings if f.level == ERROR]
    if errs:
        more = (f" ({len(errs) - 1} more errors: `python -m preprocess.check_cohort COHORT` lists them all)"
                if len(errs) > 1 else "")
        raise PipelineError(errs[0].message + more)


def clean_id(v: object) -> str:
    """A slide or case id from a table cell: stripped, and ``"4.0"`` (pandas' float of a numeric id) -> ``"4"``."""
    s = str(v).strip()
    return s[:-2] if re.fullmatch(r"\d+\.0", s) else s


def _listed(ids: Sequence[object], n: int = 10) -> str:
    return ", ".join(map(str, ids[:n])) + (f", ... ({len(ids) - n} more)" if len(ids) > n else "")


def _read_csv(path: Path, what: str, column: str) -> tuple[pd.DataFrame | None, list[Finding]]:
    """``path`` as strings (empty and NA cells NaN), or an error finding: not readable as a CSV table."""
    try:
        return pd.read_csv(path, dtype=str), []
    except (OSError, UnicodeDecodeError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        return None, [Finding(ERROR, f"cannot read the {what} {path} as CSV ({type(e).__name__}: {first}); save it "
                                     "as a UTF-8 CSV with a header row", column=column)]


# ----------------------------------------------------------------------------------------------------------------
# clinical table


def _number(v: object) -> float | None:
    """A numeric cell's value, or None when it is not a number (``yes``, ``1;2``, ``inf``)."""
    try:
        x = float(str(v).strip())
    except ValueError:
        return None
    return x if np.isfinite(x) else None


def _valid(col: str, x: float | None) -> bool:
    if x is None:
        return False
    return x >= 0 if col == "survival_months" else x in (0.0, 1.0)


def _checks(task: str | None, col: str) -> bool:
    """Whether ``task`` (None: every task) needs the outcome column ``col`` on every patient."""
    if task is None:
        return True
    return (task == "survival" and col in SURVIVAL_COLUMNS) or (task == "response" and col == RESPONSE)


def _missing_columns(cols: Sequence[str], task: str | None) -> list[str]:
    """The columns ``task`` reads that ``cols`` lacks: the ids always, the outcome columns of survival / response."""
    need = [*ID_COLUMNS, *{"survival": SURVIVAL_COLUMNS, "response": (RESPONSE,)}.get(task or "", ())]
    return [c for c in need if c not in cols]


def clinical_findings(df: pd.DataFrame, path: str | os.PathLike, task: str | None = None) -> list[Finding]:
    """Every rule of the module docstring on a clinical table read as strings (``pd.read_csv(dtype=str)``)."""
    out: list[Finding] = []

    def add(level: str, message: str, slide: str = COHORT_ROW) -> None:
        out.append(Finding(level, f"clinical table {path}: {message}", slide, "clinical"))

    cols = list(df.columns)
    missing = _missing_columns(cols, task)
    if missing:
        return [Finding(ERROR, f"clinical table {path} lacks columns {missing} (has {cols}); {MCAT_HINT}",
                        column="clinical")]
    survival = [c for c in SURVIVAL_COLUMNS if c in cols]
    if task is None and len(survival) < len(SURVIVAL_COLUMNS) and (survival or RESPONSE not in cols):
        lack = [c for c in SURVIVAL_COLUMNS if c not in cols] + ([] if survival or RESPONSE in cols else [RESPONSE])
        add(WARNING, f"no column {lack} (has {cols}): the MICA stages need survival_months,censorship "
                     "(--task survival) or response (--task response)")
    line = pd.Series(np.arange(len(df)) + 2, index=df.index)  # line numbers in the file (line 1: the header)
    no_slide = df["slide_id"].isna() | (df["slide_id"].astype(str).str.strip() == "")
    if no_slide.any():
        add(WARNING, f"lines {_listed(list(line[no_slide]))} have no slide_id and are ignored")
    df = df[~no_slide]
    sid = df["slide_id"].map(clean_id)
    case = df["case_id"].map(lambda v: "" if pd.isna(v) else clean_id(v))
    no_case = case == ""
    if no_case.any():
        i = no_case.idxmax()
        more = f" (and {int(no_case.sum()) - 1} more slides)" if no_case.sum() > 1 else ""
        add(ERROR, f"slide {sid[i]} (line {line[i]}) has no case_id{more}; every slide needs its patient's id", sid[i])
    dup = sorted(sid[sid.duplicated()].unique())
    if dup:
        add(ERROR, f"slides listed more than once: {dup[:10]}; keep one row per slide (patient fields repeated on "
                   "each of the patient's slides)", dup[0])
    outcomes = [c for c in OUTCOME_COLUMNS if c in cols and task != "patients"]  # HEX training reads the ids only
    for col in outcomes:
        raw = df[col]
        empty = raw.isna() | (raw.astype(str).str.strip() == "")
        values = raw.map(_number)
        bad = ~empty & ~pd.Series([_valid(col, x) for x in values], index=df.index)
        if bad.any():
            i = bad.idxmax()
            others = [repr(v) for v in sorted({str(v).strip() for v in raw[bad]} - {str(raw[i]).strip()})]
            also = f": also {_listed(others, 5)}" if others else ""
            more = f" ({int(bad.sum())} rows have such values{also})" if bad.sum() > 1 else ""
            add(ERROR, f"{col} of patient {case[i]} (slide {sid[i]}, line {line[i]}) is {str(raw[i]).strip()!r}: "
                       f"{_EXPECTED[col]}{more}; recode the column", sid[i])
        if not _checks(task, col) or not empty.any():
            continue
        if col in SURVIVAL_COLUMNS:
            add(ERROR, f"slides {_listed(list(sid[empty]))} (patients {_listed(sorted(set(case[empty])))}) have no "
                       f"{col}; --task survival needs it on every row (a response-only table leaves out the "
                       "survival columns)", sid[empty].iloc[0])
        else:
            known = set(case[~empty])
            lost = sorted(set(case[empty]) - known)
            if lost:
                add(WARNING, f"patients {_listed(lost)} have no {col} value: --task response leaves them out",
                    sid[empty & case.isin(lost)].iloc[0])
    for col in outcomes:
        vals = pd.DataFrame({"case": case, "sid": sid, "v": df[col].map(_number)}).dropna(subset=["v"])
        n = vals.groupby("case")["v"].nunique()
        if (n > 1).any():
            p = n.index[n > 1][0]
            rows = vals[vals["case"] == p]
            add(ERROR, f"patients {_listed(list(n.index[n > 1]))} have different {col!r} on different slides (patient "
                       f"{p}: {', '.join(f'{s} {v:g}' for s, v in zip(rows['sid'], rows['v']))}); a patient has one "
                       "outcome", rows["sid"].iloc[0])
    return out


def clinical_frame(df: pd.DataFrame, path: str | os.PathLike, task: str | None = None) -> pd.DataFrame:
    """The typed table of a clinical CSV read as strings: indexed by ``slide_id`` (also a column; the first row of a
    slide listed twice), str ids, outcome columns float (NaN where empty or invalid), numeric covariates numeric;
    ``attrs["path"]``, ``attrs["task"]``."""
    df = df[df["slide_id"].notna() & (df["slide_id"].astype(str).str.strip() != "")].copy()
    df["slide_id"] = df["slide_id"].map(clean_id)
    df["case_id"] = df["case_id"].map(lambda v: "" if pd.isna(v) else clean_id(v))
    df = df.drop_duplicates("slide_id")
    for col in df.columns:
        if col in OUTCOME_COLUMNS:
            df[col] = [x if _valid(col, x) else np.nan for x in df[col].map(_number)]
            df[col] = df[col].astype(np.float64)
            if not df[col].isna().any() and col != "survival_months":
                df[col] = df[col].astype(np.int64)
        elif col not in ID_COLUMNS:
            try:
                df[col] = pd.to_numeric(df[col])
            except (TypeError, ValueError):
                pass  # a text covariate (stage "IIb") stays text
    df.attrs["path"], df.attrs["task"] = str(path), task
    return df.set_index("slide_id", drop=False)


def load_clinical(path: str | os.PathLike, task: str | None = None) -> tuple[pd.DataFrame | None, list[Finding]]:
    """Read ``path`` and check it for ``task``; never raises: (typed table or None when unreadable, findings)."""
    path = Path(path)
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {TASKS} or None, not {task!r}")
    if not path.is_file():
        return None, [Finding(ERROR, f"clinical table {path} does not exist; pass --clinical or --cohort",
                              column="clinical")]
    raw, found = _read_csv(path, "clinical table", "clinical")
    if raw is None:
        return None, found
    found = clinical_findings(raw, path, task)
    return (None if _missing_columns(list(raw.columns), task) else clinical_frame(raw, path, task)), found


def read_clinical_table(path: str | os.PathLike, task: str | None = "survival") -> pd.DataFrame:
    """The stages' reader: the typed table of :func:`clinical_frame`; the first error as one line, warnings logged.

    ``task``: ``"survival"`` needs ``survival_months`` and ``censorship``, ``"response"`` needs ``response``,
    ``"patients"`` reads the ids only (HEX training), None checks every outcome column present (``check_cohort``).
    """
    table, found = load_clinical(path, task)
    raise_findings(found)
    assert table is not None  # an unreadable table is an error finding
    return table


def case_of(clinical: pd.DataFrame) -> dict[str, str]:
    """{slide id: case (patient) id} of a table from :func:`read_clinical_table`."""
    return dict(zip(clinical["slide_id"], clinical["case_id"]))


# ----------------------------------------------------------------------------------------------------------------
# split files


def fold_of(path: str | os.PathLike) -> str:
    """``"fold 3"`` for ``.../splits_3.csv``, else the file name (for messages)."""
    m = re.fullmatch(r"splits_(\d+)\.csv", Path(path).name)
    return f"fold {m.group(1)}" if m else Path(path).name


def parse_split(path: str | os.PathLike, columns: Sequence[str] = SPLIT_COLUMNS
                ) -> tuple[dict[str, list[str]], list[Finding]]:
    """Slide ids per column of a split CSV (stripped, empty cells skipped, ``4.0`` -> ``4``; other columns ignored)
    and the findings of the file alone: missing or unreadable, a missing column, a column without slides, an id
    twice in a column. Never raises; a column in error is absent from the dict."""
    path = Path(path)
    if not path.is_file():
        return {}, [Finding(ERROR, f"split file not found: {path} does not exist (a CSV with train,val columns of "
                                   "slide ids)", column="splits")]
    df, found = _read_csv(path, "split file", "splits")
    if df is None:
        return {}, found
    split: dict[str, list[str]] = {}
    for col in columns:
        if col not in df.columns:
            found.append(Finding(ERROR, f"split file {path} has no column {col!r} (columns: {list(df.columns)}); "
                                        "split files have train,val columns of slide ids", column="splits"))
            continue
        ids = [clean_id(v) for v in df[col].dropna() if str(v).strip()]
        if not ids:
            found.append(Finding(ERROR, f"split file {path}: column {col!r} lists no slides ({fold_of(path)} cannot "
                                        "be trained or scored); list its slides or remove the file", column="splits"))
            continue
        dup = sorted({s for s in ids if ids.count(s) > 1})
        if dup:
            found.append(Finding(ERROR, f"split file {path}: column {col!r} lists slides more than once: {dup[:10]}",
                                 dup[0], "splits"))
        split[col] = list(dict.fromkeys(ids))
    return split, found


def read_split(path: str | os.PathLike, column: str) -> list[str]:
    """Slide ids in ``column`` of a split CSV (:func:`parse_split`); any finding of the column is one line."""
    split, found = parse_split(path, (column,))
    raise_findings(found)
    return split[column]


def patient_leaks(split: Mapping[str, Sequence[str]], cases: Mapping[str, str]
                  ) -> list[tuple[str, str, list[str], str, list[str]]]:
    """THE leakage check: (patient, column a, its slides there, column b, its slides there) for every patient with
    slides in two columns of ``split``; ``cases`` maps slide -> patient (a slide it lacks is its own patient)."""
    cols = list(split)
    leaks = []
    for i, a in enumerate(cols):
        for b in cols[i + 1:]:
            pa = {cases.get(s, s) for s in split[a]}
            for p in sorted(pa & {cases.get(s, s) for s in split[b]}):
                leaks.append((p, a, [s for s in split[a] if cases.get(s, s) == p],
                              b, [s for s in split[b] if cases.get(s, s) == p]))
    return leaks


def fold_counts(split: Mapping[str, Sequence[str]], clinical: pd.DataFrame) -> dict[str, tuple[int, int]]:
    """{column: (patients, events)} of a split's slides in the clinical table (an event: censorship 0)."""
    out = {}
    for col, slides in split.items():
        known = [s for s in slides if s in clinical.index]
        rows = clinical.loc[known]
        events = int((rows.groupby("case_id")["censorship"].min() == 0).sum()) if "censorship" in rows else 0
        out[col] = (rows["case_id"].nunique(), events)
    return out


def format_counts(counts: Mapping[str, tuple[int, int]]) -> str:
    """``train 16 patients (9 events), val 4 patients (2 events)``."""
    return ", ".join(f"{c} {n} patients ({e} events)" for c, (n, e) in counts.items())


def split_findings(path: str | os.PathLike, split: Mapping[str, Sequence[str]], clinical: pd.DataFrame | None = None,
                   *, task: str | None = None, allow_unknown: bool = False, slides: Collection[str] | None = None,
                   source: str = "") -> list[Finding]:
    """The rules between a parsed split, the clinical table (when given) and the cohort's ``slides`` (when given,
    named by ``source``): slides in two columns, slides without a clinical row, patient leakage, folds without
    events (``task`` survival, or None with survival columns), ids that are not slides of the cohort."""
    out: list[Finding] = []

    def add(level: str, message: str, slide: str = COHORT_ROW) -> None:
        out.append(Finding(level, f"split file {path}: {message}", slide, "splits"))

    cols = list(split)
    for i, a in enumerate(cols):
        for b in cols[i + 1:]:
            both = sorted(set(split[a]) & set(split[b]))
            if both:
                add(ERROR, f"slides in both {a!r} and {b!r}: {both[:10]}", both[0])
    if clinical is not None:
        src = clinical.attrs.get("path", "the clinical table")
        for col in cols:
            unknown = [s for s in split[col] if s not in clinical.index]
            if unknown and allow_unknown:
                add(WARNING, f"column {col!r} names slides not in {src}: {unknown[:10]} (--allow-unknown-slides: "
                             "each counts as its own patient)", unknown[0])
            elif unknown:
                add(ERROR, f"column {col!r} names slides not in {src}: {unknown[:10]} ({len(unknown)} slides are not "
                           "in the clinical table, so their patients escape the leakage check); add them to the "
                           f"table or fix the split ({ID_HINT}), or let HEX training count each as its own patient "
                           "with --allow-unknown-slides", unknown[0])
        leaks = patient_leaks(split, case_of(clinical))
        if leaks:
            p, a, sa, b, sb = leaks[0]
            add(ERROR, f"patient {p} is in both {a!r} (slides {sa}) and {b!r} (slides {sb}): patient leakage "
                       f"(patients in both columns: {_listed(sorted({x[0] for x in leaks}))}); put all of a patient's "
                       "slides on one side", sb[0])
        survival = task == "survival" or (task is None and set(SURVIVAL_COLUMNS) <= set(clinical.columns))
        if survival and {"train", "val"} <= set(cols):
            counts = fold_counts(split, clinical)
            fix = "move patients with an event (censorship 0) into it, or check the censorship column (1 = censored)"
            for col, level, why in (("train", ERROR, "survival training needs events (hazard bins, loss)"),
                                    ("val", WARNING, "the fold's c-index is undefined")):
                n, e = counts[col]
                if n and not e:
                    add(level, f"{fold_of(path)} has no event in {col!r} ({format_counts(counts)}): {why}; {fix}")
    if slides is not None:
        known = set(slides)
        for col in cols:
            unknown = [s for s in split[col] if s not in known]
            if unknown:
                add(ERROR, f"column {col!r} names {len(unknown)} slides that {source or 'the cohort'} does not hold: "
                           f"{_listed(unknown)}; fix the ids (split files hold slide ids, not case ids; {ID_HINT})",
                    unknown[0])
    return out


def read_fold(path: str | os.PathLike, clinical: pd.DataFrame | None = None, columns: Sequence[str] = SPLIT_COLUMNS,
              allow_unknown: bool = False, logger: logging.Logger | None = None) -> dict[str, list[str]]:
    """The stages' split loader: :func:`parse_split` and :func:`split_findings` against ``clinical`` (its
    ``attrs["task"]`` decides the event rules); the first error as one line, warnings logged, and for survival the
    fold's patient and event counts logged once. Returns ``{column: [slide ids]}``."""
    split, found = parse_split(path, columns)
    task = clinical.attrs.get("task") if clinical is not None else None
    if not any(f.level == ERROR for f in found):
        found += split_findings(path, split, clinical, task=task, allow_unknown=allow_unknown)
    raise_findings(found, logger)
    if clinical is not None and task == "survival" and {"train", "val"} <= set(split):
        line = f"{path} ({fold_of(path)}): {format_counts(fold_counts(split, clinical))}"
        if line not in _logged:
            _logged.add(line)
            (logger or log).info("%s", line)
    return split


# ----------------------------------------------------------------------------------------------------------------
# the cohort folder (check_cohort)


def check_cohort_tables(cohort: str | os.PathLike, slides: Collection[str], source: str = "") -> list[Finding]:
    """Every rule on ``cohort/clinical.csv`` and ``cohort/splits/splits_*.csv`` against the cohort's ``slides``
    (named by ``source``: pairs.csv or he/), for every task (``check_cohort``'s part)."""
    cohort = Path(cohort)
    source = source or str(cohort / "he")
    out: list[Finding] = []
    path = cohort / "clinical.csv"
    clinical = None
    if not path.exists():
        out.append(Finding(WARNING, f"no clinical table {path}: the MICA stages (08, 09) need it, and HEX training "
                                    "(04) its patients for the leakage check", column="clinical"))
    else:
        clinical, found = load_clinical(path)
        out += found
    if clinical is not None:
        extra = sorted(set(clinical.index) - set(slides))
        if extra:
            out.append(Finding(WARNING, f"clinical table {path} lists {len(extra)} slides that {source} does not "
                                        f"hold: {_listed(extra)}; the stages leave them out", extra[0], "clinical"))
        for sid in sorted(set(slides) - set(clinical.index)):
            out.append(Finding(WARNING, f"slide {sid} has no row in {path}; the MICA stages cannot use it (and a "
                                        "split that lists it stops them)", sid, "clinical"))
    split_dir = cohort / "splits"
    files = sorted(split_dir.glob("splits_*.csv")) if split_dir.is_dir() else []
    if not files:
        out.append(Finding(WARNING, f"no split files {split_dir}/splits_*.csv: training stages need them",
                           column="splits"))
    listed: set[str] = set()
    for f in files:
        split, found = parse_split(f)
        out += found
        out += split_findings(f, split, clinical, slides=slides, source=source)
        listed.update(s for ids in split.values() for s in ids)
    if files:
        for sid in sorted(set(slides) - listed):
            out.append(Finding(WARNING, f"slide {sid} is in no split file of {split_dir}", sid, "splits"))
    return out
