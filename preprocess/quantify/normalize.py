"""Pass 2 of stage 03: per-marker percentiles fitted on the slides you choose, applied to every slide.

value = clip((raw - P_low) / (P_high - P_low), 0, 1) per marker, with P_low / P_high the ``low_pct`` / ``high_pct``
percentiles of the raw patch means over the *fit slides'* patches with coverage >= ``min_coverage``. The fit set
is explicit (``fit_slides``; a split file's ``train`` column), so validation and test slides can stay out of the
percentiles; ``normalization.json`` records it (``fit_slides``) and the slides it was applied to.

Keyed, by redoing: the step is cheap (it reads the raw CSVs), so every run recomputes the normalisation from the
fresh raw means (:func:`preprocess.quantify.raw.read_record`) and the settings given now, and rewrites each label
file ``markers/{slide}.csv`` whose content changes (a file whose bytes would be the same is left alone, so later
stages do not see a change that is none). ``normalization.json`` holds the settings it was made with
(``settings``: fit slides and their source, percentiles, coverage threshold, columns, or the applied file); when
they differ from the previous run's, the log says so (``normalisation settings changed since the last run: <diff>;
relabelling``) -- so labels made with another ``--fit-split`` or other percentiles are never kept. Labels that
this run cannot vouch for are removed: those of slides whose raw means are stale, and, when the percentiles
changed, those of cohort slides outside this run's ``--slides``. Raw means made with different pass-1 settings
(shards run with other flags) are not pooled: the step stops and names the difference.

Dense labels: when pass 1 made raw cell means (its settings hold ``dense_grid``), each label file gets its dense
twin ``markers_dense/{slide}.h5`` (:mod:`preprocess.quantify.dense`) with the same record and rows, rewritten only
when its content changes; without them, dense label files of the slides normalised are removed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pipeline import artifacts as art
from pipeline.cli import require
from pipeline.cohort import select_slides
from pipeline.done import diff_settings
from pipeline.errors import PipelineError
from pipeline.io import atomic_write_text, remove_outputs, write_json
from pipeline.tables import read_split
from preprocess.quantify.dense import dense_label_path, write_dense_labels
from preprocess.quantify.raw import (
    SLIDE_SETTINGS,
    label_csv_path,
    load_raw,
    raw_csv_path,
    raw_dense_path,
    raw_dir,
    raw_meta_path,
    read_record,
)
from preprocess.quantify.tables import Tables, resolve_tables

log = logging.getLogger(__name__)


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
    return {"schema_version": art.NORMALIZATION.schema, "markers": markers, "percentiles": [low_pct, high_pct],
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
    if not path.is_file():
        raise PipelineError(f"normalization file not found: {path} (--normalization)")
    try:
        norm = json.loads(path.read_text())
        norm["values"]  # noqa: B018 - its presence is the check
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PipelineError(f"{path} is not a normalization.json of stage 03 ({e})") from None
    if list(norm.get("markers", [])) != markers:
        raise PipelineError(f"normalization file {path} is for the markers {norm.get('markers', [])[:5]}..., "
                            f"not the panel's {markers[:5]}... (same markers in the same order needed)")
    return norm


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
        rec, why = read_record(out, s)
        if rec is not None:
            ok.append(s)
            continue
        if drop_stale_labels and remove_outputs([label_csv_path(out, s), dense_label_path(out, s)]):
            log.warning("%s: removed its marker labels %s (%s)", s, label_csv_path(out, s), why)
        else:
            log.info("%s: not normalised (%s)", s, why)
    return ok


def check_pass1_settings(out: str | os.PathLike, slides: list[str]) -> dict:
    """The pass-1 settings shared by the raw means of ``slides`` (a slide's own pixel size aside,
    :data:`~preprocess.quantify.raw.SLIDE_SETTINGS`); raw means made two ways stop (one line)."""
    groups: dict[str, list[str]] = {}
    settings: dict[str, dict] = {}
    for s in slides:
        rec, _ = read_record(out, s)
        st = {k: v for k, v in (rec or {}).get("settings", {}).items() if k not in SLIDE_SETTINGS}
        key = json.dumps(st, sort_keys=True)
        groups.setdefault(key, []).append(s)
        settings[key] = st
    if len(groups) > 1:
        (a, sa), (b, sb) = list(groups.items())[:2]
        raise PipelineError(
            f"the raw marker means in {raw_dir(out)} were made with different settings: "
            f"{', '.join(diff_settings(settings[a], settings[b]))} ({', '.join(sa[:3])} vs {', '.join(sb[:3])}); "
            "rerun `python -m preprocess.quantify` with one set of settings and --overwrite")
    return next(iter(settings.values()), {})


@dataclass
class Normalisation:
    """Outcome of the step: the record written, the slides labelled, which label files were (re)written."""

    norm: dict
    slides: list[str]
    written: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    dense_grid: int = 0
    dense_written: list[str] = field(default_factory=list)

    @property
    def summary(self) -> str:
        how = (f"from {self.norm['settings']['normalization_file']}" if self.norm["settings"]["mode"] == "fixed"
               else f"fitted on {len(self.norm['fit_slides'])} slides, {self.norm['n_patches']} patches")
        return (f"{len(self.slides)} slides normalised (P{self.norm['percentiles'][0]:g}..P"
                f"{self.norm['percentiles'][1]:g} {how}), {len(self.written)} label files written, "
                f"{len(self.slides) - len(self.written)} unchanged"
                + (f"; dense {self.dense_grid}x{self.dense_grid}: {len(self.dense_written)} files written, "
                   f"{len(self.slides) - len(self.dense_written)} unchanged" if self.dense_grid else ""))


def _write_if_changed(path: Path, text: str) -> bool:
    try:
        if path.read_text() == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    atomic_write_text(path, text)
    return True


def normalize_cohort(out: str | os.PathLike, slides: list[str], markers: list[str], min_coverage: float,
                     low_pct: float, high_pct: float, legacy_columns: bool, fixed: dict | None = None,
                     fit_slides: list[str] | None = None, settings: dict | None = None,
                     others: list[str] | None = None, dense_grid: int = 0) -> Normalisation:
    """Percentiles over ``fit_slides`` (default: all of ``slides``; unless ``fixed``), then
    ``markers/{slide}.csv`` for each of ``slides``; writes ``markers/normalization.json`` (with ``settings``).

    ``others``: cohort slides outside ``slides``; their label files are removed when the percentiles changed.
    ``dense_grid`` > 0 (pass 1 made raw cell means, ``markers/raw/{slide}_dense.h5``): also
    ``markers_dense/{slide}.h5`` for the rows of each label file, with the same normalisation
    (:func:`preprocess.quantify.dense.write_dense_labels`); 0: dense labels of ``slides`` are removed (made with
    percentiles this run cannot vouch for).
    """
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
        norm = {k: v for k, v in fixed.items() if k != "settings"} | {"applied_to": list(slides),
                                                                        "min_coverage": min_coverage}
    norm["settings"] = dict(settings or {})
    norm_path = art.NORMALIZATION.path(out)
    prev = _read_json(norm_path)
    if prev is not None and prev.get("settings") and prev["settings"] != norm["settings"]:
        log.info("normalisation settings changed since the last run: %s; relabelling",
                 ", ".join(diff_settings(prev["settings"], norm["settings"])))
    result = Normalisation(norm, list(slides), dense_grid=int(dense_grid))
    if prev is not None and (prev.get("values") != norm["values"] or prev.get("markers") != norm["markers"]):
        for s in others or []:
            if s not in slides and remove_outputs([label_csv_path(out, s), dense_label_path(out, s)]):
                result.removed.append(s)
        if result.removed:
            log.warning("removed the labels of %s: made with the earlier percentiles, not relabelled by this run "
                        "(--slides); normalise without --slides to label them", ", ".join(result.removed))
    if prev != json.loads(json.dumps(norm)):
        write_json(norm_path, norm)
    for s in tqdm(slides, desc="normalising", unit="slide", leave=False):
        df = raws[s]
        vals = apply_normalization(df[markers].to_numpy(np.float64), norm)
        outdf = df[["slide", "index", "x", "y"]].copy()
        outdf[markers] = vals
        if legacy_columns:
            for k in range(len(markers)):
                outdf[f"mean_intensity_channel{k + 1}"] = vals[:, k]
        if _write_if_changed(label_csv_path(out, s), outdf.to_csv(index=False, float_format="%.7g")):
            result.written.append(s)
        log.debug("%s: %d of its patches have coverage >= %.2f", s, len(df), min_coverage)
        if dense_grid:
            if write_dense_labels(dense_label_path(out, s), raw_dense_path(out, s), df["index"].to_numpy(),
                                  df[["x", "y"]].to_numpy(), markers,
                                  lambda raw: apply_normalization(raw, norm)):
                result.dense_written.append(s)
        elif remove_outputs([dense_label_path(out, s)]):
            log.warning("%s: removed its dense labels %s (pass 1 made no cell means this time: quantify with "
                        "--dense-grid G to make them)", s, dense_label_path(out, s))
    return result


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------------------------
# the step's options (shared by ``python -m preprocess.normalize`` and ``python -m preprocess.quantify``)


@dataclass(frozen=True, kw_only=True)
class NormSettings:
    """The flags of the normalisation step (:func:`add_normalization_args`), same names; the configs of both
    stage-03 commands extend it."""

    fit_slides: list[str] | None = None
    fit_split: Path | None = None
    fit_column: str = "train"
    min_coverage: float = 0.95
    low_pct: float = 1.0
    high_pct: float = 99.0
    normalization: Path | None = None
    legacy_columns: bool = False


def add_normalization_args(p: argparse.ArgumentParser) -> None:
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


def check_normalization_args(args: argparse.Namespace) -> None:
    """One line for a normalisation flag out of range or two fit sets at once (before any work)."""
    require(0 <= args.low_pct < args.high_pct <= 100,
            f"need 0 <= --low-pct < --high-pct <= 100 (got {args.low_pct}, {args.high_pct})")
    require(0 <= args.min_coverage <= 1, f"--min-coverage must be in [0, 1] (got {args.min_coverage})")
    require(sum(x is not None for x in (args.fit_slides, args.fit_split, args.normalization)) <= 1,
            "give at most one of --fit-slides, --fit-split and --normalization")


@dataclass(frozen=True)
class NormPlan:
    """What the step will fit on or apply, read before any work: ``fit`` (None: every slide normalised),
    ``source`` (for messages), ``fixed`` (a normalization record to apply, or None)."""

    fit: list[str] | None = None
    source: str = "every slide normalised"
    fixed: dict | None = None


def plan_normalization(cfg: NormSettings, markers: list[str], cohort_ids: list[str]) -> NormPlan:
    """Read ``--fit-split`` / ``--fit-slides`` / ``--normalization`` and check them against the cohort."""
    if cfg.normalization is not None:
        return NormPlan(fixed=load_normalization(cfg.normalization, markers), source=str(cfg.normalization))
    if cfg.fit_split is not None:
        fit, source = read_split(cfg.fit_split, cfg.fit_column), f"column {cfg.fit_column!r} of {cfg.fit_split}"
    elif cfg.fit_slides:
        fit, source = list(cfg.fit_slides), "--fit-slides"
    else:
        return NormPlan()
    unknown = [s for s in fit if s not in set(cohort_ids)]
    if unknown:
        raise PipelineError(f"fit slides {unknown[:5]} (from {source}) are not slides of the cohort; fix the ids or "
                            "drop them from the fit set")
    return NormPlan(fit=fit, source=source)


def resolve_inputs(cfg: NormSettings, cohort: Path | None, pairs: Path | None, panel: Path | None,
                   num_markers: int, slides: list[str] | None) -> tuple[Tables, list[str], NormPlan]:
    """What both stage-03 commands start with: the cohort's slides and panel (:func:`resolve_tables`), the
    ``--slides`` among them, and the normalisation's plan."""
    tables = resolve_tables(cohort, pairs, panel, num_markers)
    plan = plan_normalization(cfg, tables.markers, tables.ids)
    return tables, select_slides(tables.ids, slides, tables.source), plan


def run_normalization(cfg: NormSettings, out: Path, candidates: list[str], markers: list[str], plan: NormPlan,
                      others: list[str] | None = None) -> Normalisation:
    """Normalise the fresh slides among ``candidates`` with the settings ``cfg``."""
    slides = fresh_slides(out, candidates)
    if not slides:
        raise PipelineError(f"no slide has fresh raw marker means in {raw_dir(out)}; run "
                            "`python -m preprocess.quantify` (pass 1) first")
    if plan.fit is not None:
        missing = [s for s in plan.fit if s not in slides]
        if missing:
            raise PipelineError(f"fit slides {missing[:5]} (from {plan.source}) have no fresh raw marker means in "
                                f"{raw_dir(out)}; quantify them first or drop them from the fit set")
    pass1 = check_pass1_settings(out, sorted(set(slides) | set(plan.fit or [])))
    settings = {"mode": "fixed", "normalization_file": str(cfg.normalization),
                "min_coverage": cfg.min_coverage} if plan.fixed else {
        "mode": "fit", "fit_slides": plan.fit if plan.fit is not None else sorted(slides), "fit_source": plan.source,
        "low_pct": cfg.low_pct, "high_pct": cfg.high_pct, "min_coverage": cfg.min_coverage}
    settings |= {"legacy_columns": bool(cfg.legacy_columns), "pass1": pass1}
    res = normalize_cohort(out, slides, markers, cfg.min_coverage, cfg.low_pct, cfg.high_pct,
                           cfg.legacy_columns, plan.fixed, plan.fit, settings, others,
                           dense_grid=int(pass1.get("dense_grid", 0) or 0))
    flagged = [s for s in slides if (_read_json(raw_meta_path(out, s)) or {}).get("registration_status") == "flagged"]
    if flagged:
        log.warning("the labels of %s come from flagged registrations (quantified with --allow-flagged)",
                    ", ".join(flagged))
    log.info("normalisation: %s into %s%s", res.summary, art.LABELS.dir(out),
             f" and {art.DENSE_LABELS.dir(out)}" if res.dense_grid else "")
    return res
