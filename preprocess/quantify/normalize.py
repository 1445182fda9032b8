"""Pass 2 of stage 03: per-marker percentiles fitted on the slides you choose, applied to every slide.

value = clip((raw - P_low) / (P_high - P_low), 0, 1) per marker, with P_low / P_high the ``low_pct`` / ``high_pct``
percentiles of the raw patch means over the *fit slides'* patches with coverage >= ``min_coverage``. The fit set
is explicit (``fit_slides``; a split file's ``train`` column), so validation and test slides can stay out of the
percentiles; ``normalization.json`` records it (``fit_slides``) and the slides it was applied to. Slides whose raw
means are stale (:func:`preprocess.quantify.raw.stale_reason`) are neither pooled nor labelled, and an old label
file of theirs is removed.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from preprocess.quantify.raw import label_csv_path, load_raw, raw_csv_path, stale_reason
from preprocess.utils import PipelineError, atomic_path, remove_outputs, write_json

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2


def compute_normalization(values: np.ndarray, markers: list[str], low_pct: float, high_pct: float) -> dict:
    """Per-marker percentiles of raw patch means ``values`` (N, K) -> normalization record (JSON-ready)."""
    if len(values) == 0:
        raise PipelineError("no patch of the fit slides reaches --min-coverage; nothing to normalise "
                            "(check the registrations, the fit slides or lower --min-coverage)")
    lo = np.nanpercentile(values, low_pct, axis=0)
    hi = np.nanpercentile(values, high_pct, axis=0)
    flat = [m for m, a, b in zip(markers, lo, hi) if not b > a]
    if flat:
        log.warning("markers with P%g == P%g over the fit slides (normalised to 0): %s", high_pct, low_pct, flat)
    return {"schema_version": SCHEMA_VERSION, "markers": markers, "percentiles": [low_pct, high_pct],
            "values": [lo.tolist(), hi.tolist()], "n_patches": int(len(values)),
            "formula": "clip((raw - values[0]) / (values[1] - values[0]), 0, 1); 0 where values[1] <= values[0]"}


def apply_normalization(raw: np.ndarray, norm: dict) -> np.ndarray:
    """Normalise raw means (N, K) with a normalization record -> (N, K) float64 in [0, 1]."""
    lo, hi = (np.asarray(v, np.float64) for v in norm["values"])
    span = hi - lo
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(span > 0, (raw - lo) / np.where(span > 0, span, 1.0), 0.0)
    return np.clip(out, 0.0, 1.0)


def load_normalization(path: str | os.PathLike, markers: list[str]) -> dict:
    """A ``normalization.json`` for exactly ``markers`` (same order)."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"normalization file not found: {path}")
    norm = json.loads(path.read_text())
    if list(norm.get("markers", [])) != markers:
        raise PipelineError(f"normalization file {path} is for the markers {norm.get('markers', [])[:5]}..., "
                            f"not the panel's {markers[:5]}... (same markers in the same order needed)")
    return norm


def split_column(path: str | os.PathLike, column: str = "train") -> list[str]:
    """Slide ids of one column of a split file (``splits_k.csv``: train,val; empty cells ignored)."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"split file not found: {path}")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or column not in rows[0]:
        raise PipelineError(f"split file {path} has no column {column!r} (columns: {list(rows[0]) if rows else []})")
    ids = [r[column].strip() for r in rows if (r[column] or "").strip()]
    if not ids:
        raise PipelineError(f"split file {path}: column {column!r} is empty")
    return ids


def fit_leakage(norm: dict, slides: list[str]) -> list[str]:
    """The ``slides`` (e.g. a validation column) that were in the fit set of a normalization record.

    Records without ``fit_slides`` (older runs) list their pooled slides under ``slides``.
    """
    fit = set(norm.get("fit_slides") or norm.get("slides") or [])
    return sorted(s for s in slides if s in fit)


def fresh_slides(out: str | os.PathLike, slides: list[str], drop_stale_labels: bool = True) -> list[str]:
    """The slides whose raw means are fresh; a stale slide's label file is removed (it would be trusted)."""
    ok = []
    for s in slides:
        why = stale_reason(out, s)
        if why is None:
            ok.append(s)
            continue
        if drop_stale_labels and remove_outputs([label_csv_path(out, s)]):
            log.warning("%s: removed its marker labels %s (%s)", s, label_csv_path(out, s), why)
        else:
            log.info("%s: not normalised (%s)", s, why)
    return ok


def normalize_cohort(out: str | os.PathLike, slides: list[str], markers: list[str], min_coverage: float,
                     low_pct: float, high_pct: float, legacy_columns: bool, fixed: dict | None = None,
                     fit_slides: list[str] | None = None) -> dict:
    """Percentiles over ``fit_slides`` (default: all of ``slides``; unless ``fixed``), then
    ``markers/{slide}.csv`` for each of ``slides``; writes ``markers/normalization.json``."""
    out = Path(out)
    fit = list(slides) if fit_slides is None else list(fit_slides)
    raws = {}
    for s in tqdm(sorted(set(slides) | (set(fit) if fixed is None else set())), desc="reading raw means",
                  unit="slide", leave=False):
        df = load_raw(raw_csv_path(out, s), markers)
        raws[s] = df[(df["coverage"] >= min_coverage) & (df["n_codex_px"] > 0)]
    if fixed is None:
        values = np.concatenate([raws[s][markers].to_numpy(np.float64) for s in fit]) if fit else np.zeros(
            (0, len(markers)))
        norm = compute_normalization(values, markers, low_pct, high_pct)
        norm |= {"fit_slides": fit, "applied_to": list(slides), "min_coverage": min_coverage}
    else:
        norm = fixed | {"applied_to": list(slides)}
    write_json(out / "markers" / "normalization.json", norm)
    for s in tqdm(slides, desc="normalising", unit="slide", leave=False):
        df = raws[s]
        vals = apply_normalization(df[markers].to_numpy(np.float64), norm)
        outdf = df[["slide", "index", "x", "y"]].copy()
        outdf[markers] = vals
        if legacy_columns:
            for k in range(len(markers)):
                outdf[f"mean_intensity_channel{k + 1}"] = vals[:, k]
        with atomic_path(label_csv_path(out, s)) as tmp:
            outdf.to_csv(tmp, index=False, float_format="%.7g")
        log.info("%s: %d of its patches have coverage >= %.2f", s, len(df), min_coverage)
    return norm


# ----------------------------------------------------------------------------------------------------------------
# the step's options (shared by ``python -m preprocess.normalize`` and ``python -m preprocess.quantify``)


def add_normalization_args(p) -> None:
    """Flags of the normalisation step."""
    g = p.add_argument_group("normalisation (pass 2; runs once, after every shard of pass 1)")
    g.add_argument("--fit-slides", nargs="+", metavar="SLIDE",
                   help="fit the percentiles on these slides only (default: every slide normalised)")
    g.add_argument("--fit-split", type=Path, metavar="CSV",
                   help="fit on the --fit-column column of this split file (e.g. COHORT/splits/splits_0.csv), so "
                        "that validation slides stay out of the percentiles")
    g.add_argument("--fit-column", default="train", help="column of --fit-split (default train)")
    g.add_argument("--min-coverage", type=float, default=0.95,
                   help="drop patches whose area is covered by CODEX pixels with data less than this fraction "
                        "(default 0.95)")
    g.add_argument("--low-pct", type=float, default=1.0, help="percentile mapped to 0 (default 1)")
    g.add_argument("--high-pct", type=float, default=99.0, help="percentile mapped to 1 (default 99, as the paper)")
    g.add_argument("--normalization", type=Path,
                   help="apply the percentiles of this normalization.json instead of fitting them")
    g.add_argument("--legacy-columns", action="store_true",
                   help="also write mean_intensity_channel{1..K} columns (the original HEX CSV layout)")


def check_normalization_args(args) -> None:
    if not (0 <= args.low_pct < args.high_pct <= 100):
        raise PipelineError(f"need 0 <= --low-pct < --high-pct <= 100 (got {args.low_pct}, {args.high_pct})")
    if sum(x is not None for x in (args.fit_slides, args.fit_split, args.normalization)) > 1:
        raise PipelineError("give at most one of --fit-slides, --fit-split and --normalization")


def resolve_run(args):
    """What both stage-03 commands start with: logging to ``OUT/markers/run.log``, the checks, and the inputs:
    (Tables, the ``--slides`` of the pairing table)."""
    from preprocess.quantify.tables import resolve_tables
    from preprocess.utils import select_slides, setup_logging

    setup_logging(Path(args.out) / "markers" / "run.log")
    check_normalization_args(args)
    tables = resolve_tables(args)
    return tables, select_slides(sorted(tables.pairs), args.slides, str(tables.pairs_path))


def run_normalization(args, out: Path, candidates: list[str], markers: list[str]) -> dict:
    """Normalise the fresh slides among ``candidates`` with the options of :func:`add_normalization_args`."""
    fixed = load_normalization(args.normalization, markers) if args.normalization else None
    slides = fresh_slides(out, candidates)
    if not slides:
        raise PipelineError(f"no slide has fresh raw marker means in {Path(out) / 'markers' / 'raw'}; run "
                            "`python -m preprocess.quantify` (pass 1) first")
    fit = None
    if args.fit_split is not None:
        fit = split_column(args.fit_split, args.fit_column)
        source = f"column {args.fit_column!r} of {args.fit_split}"
    elif args.fit_slides:
        fit, source = list(args.fit_slides), "--fit-slides"
    if fit is not None:
        missing = [s for s in fit if s not in slides]
        if missing:
            raise PipelineError(f"fit slides {missing[:5]} (from {source}) have no fresh raw marker means in "
                                f"{Path(out) / 'markers' / 'raw'}; quantify them first or drop them from the fit set")
    norm = normalize_cohort(out, slides, markers, args.min_coverage, args.low_pct, args.high_pct,
                            args.legacy_columns, fixed, fit)
    log.info("normalised %d slides (P%g..P%g %s) into %s", len(slides), norm["percentiles"][0],
             norm["percentiles"][1], "from " + str(args.normalization) if fixed else
             f"fitted on {len(norm['fit_slides'])} slides, {norm['n_patches']} patches", Path(out) / "markers")
    return norm
