"""One outcome report per cohort: every row (model) scored on the same patients with bootstrap CIs, paired
comparisons of every pair of rows, the multivariable Cox of the primary model, and the figures.

Files written to ``dest`` (``OUT/mica_runs/RUN/test/`` for the run's own folds, ``.../external/{cohort}/`` for an
independent cohort; :data:`pipeline.artifacts.MICA_REPORT`):

- ``report.csv``: ``row,metric,value,lo,hi`` -- every metric pooled over the cohort's patients with its percentile
  bootstrap CI (patients resampled with replacement, ``n_boot`` times, seeded);
- ``report_folds.csv``: ``row,fold,metric,value`` -- the same metrics per validation fold (run's own folds), whose
  mean and sd ``report.md`` shows;
- ``comparisons.csv``: ``row_a,row_b,metric,delta,lo,hi,p,rel_improvement`` -- the paired bootstrap of every pair
  of rows (the same resampled patients for both rows): delta = a - b with its CI and two-sided p, and the relative
  change (:func:`mica.study.bootstrap.paired_difference`);
- ``cox_multivariable.csv`` (survival, when covariates are given): HR per SD of the primary row's risk with the
  clinical covariates, 95% CI, p and the Schoenfeld test of proportional hazards (:mod:`mica.study.cox`);
- ``report.md`` (a results table), ``report.json`` (the settings: times, tau, resamples, seed, scaling);
- ``predictions.csv`` (``report_predictions.csv`` for an independent cohort, whose ``predictions.csv`` is the
  ensemble's table): per patient its fold, outcome, every row's score and the primary row's ``risk_group``;
- figures: ``km_risk_groups.png`` (Kaplan-Meier of the primary row's risk groups with CI bands and the
  number at risk), ``forest_cox.png``, ``compare_{metric}.png`` (all rows with CIs), ``roc.png`` with its bootstrap
  band and ``calibration.png`` (response).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mica.checkpoint import write_csv
from pipeline.errors import PipelineError
from pipeline.io import atomic_path, write_json

log = logging.getLogger(__name__)

SURVIVAL_COMPARED = ("c_harrell", "c_uno", "td_auc_mean", "ibs")
RESPONSE_COMPARED = ("auc", "balanced_accuracy", "brier")
METRIC_NAMES = {"c_harrell": "Harrell's C", "c_uno": "Uno's C", "td_auc_mean": "mean td-AUC", "ibs": "IBS",
                "auc": "AUC", "balanced_accuracy": "balanced accuracy", "brier": "Brier"}


@dataclass
class Cohort:
    """The N patients a report scores, in row order: outcome arrays (N,), and each patient's validation fold
    (the run's own folds) or None (an independent cohort)."""

    name: str
    task: str
    case_id: np.ndarray
    time: np.ndarray | None = None
    event: np.ndarray | None = None
    response: np.ndarray | None = None
    fold: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.case_id)
        for k in ("time", "event", "response", "fold"):
            v = getattr(self, k)
            if v is not None and len(v) != n:
                raise PipelineError(f"cohort {self.name}: {k} has {len(v)} values for {n} patients")

    @property
    def n(self) -> int:
        return len(self.case_id)

    @property
    def has_outcome(self) -> bool:
        return (self.time is not None and self.event is not None) if self.task == "survival" else \
            self.response is not None


@dataclass
class Row:
    """One model's predictions of the cohort's patients: ``score`` (N,) (survival: risk, higher = earlier event;
    response: probability) and, when the model gives one, ``surv`` (N,T) survival at the report's times."""

    name: str
    score: np.ndarray
    surv: np.ndarray | None = None


@dataclass
class StudySettings:
    """How a report is scored. ``times`` (months) for td-AUC and Brier (default: the quartiles of the observed
    event times), ``tau`` the truncation of Uno's C (default :func:`mica.study.metrics.default_tau`)."""

    n_boot: int = 1000
    seed: int = 0
    level: float = 0.95
    times: list[float] | None = None
    tau: float | None = None
    time_unit: str = "months"
    scaling: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class StudyResult:
    report: pd.DataFrame
    folds: pd.DataFrame
    comparisons: pd.DataFrame
    settings: dict[str, Any]
    idx: np.ndarray


def _metric_fn(cohort: Cohort, row: Row, times: np.ndarray, tau: float):
    from mica.study import metrics as mt

    if cohort.task == "survival":
        def fn(ix: np.ndarray) -> dict[str, float]:
            return mt.survival_metrics(cohort.time[ix], cohort.event[ix], row.score[ix],
                                       None if row.surv is None else row.surv[ix], times, tau)
    else:
        def fn(ix: np.ndarray) -> dict[str, float]:
            return mt.response_metrics(cohort.response[ix], row.score[ix])
    return fn


def study_times(cohort: Cohort, settings: StudySettings) -> tuple[np.ndarray, float]:
    """The evaluation times (T,) and tau of a survival report (stated in report.json)."""
    from mica.study import metrics as mt

    times = np.asarray(settings.times, float) if settings.times else mt.evaluation_times(cohort.time, cohort.event)
    tau = float(settings.tau) if settings.tau else mt.default_tau(cohort.time, cohort.event)
    return times, tau


def score_rows(cohort: Cohort, rows: Sequence[Row], settings: StudySettings) -> StudyResult:
    """Every row's metrics (pooled with CIs, per fold) and every pair's paired bootstrap."""
    from mica.study import bootstrap as bs

    if not cohort.has_outcome:
        raise PipelineError(f"cohort {cohort.name} has no outcome to score")
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise PipelineError(f"report rows must have distinct names, got {names}")
    for r in rows:
        if len(r.score) != cohort.n:
            raise PipelineError(f"row {r.name}: {len(r.score)} predictions for {cohort.n} patients")
    times, tau = (study_times(cohort, settings) if cohort.task == "survival" else (np.empty(0), float("nan")))
    idx = bs.resample_indices(cohort.n, settings.n_boot, settings.seed)
    everyone = np.arange(cohort.n)
    points, boots, report, folds = {}, {}, [], []
    for r in rows:
        fn = _metric_fn(cohort, r, times, tau)
        points[r.name] = fn(everyone)
        log.info("bootstrap of %s: %d resamples of %d patients", r.name, len(idx), cohort.n)
        if cohort.task == "survival":  # every resample at once; equals fn on each resample (tests/unit)
            boots[r.name] = bs.bootstrap_survival(cohort.time, cohort.event, r.score, r.surv, times, tau, idx)
        else:
            boots[r.name] = bs.bootstrap_response(cohort.response, r.score, idx)
        ci = bs.percentile_ci(points[r.name], boots[r.name], settings.level)
        report += [{"row": r.name, **rec} for rec in ci.to_dict("records")]
        if cohort.fold is not None:
            for k in sorted(set(cohort.fold.tolist())):
                m = np.flatnonzero(cohort.fold == k)
                folds += [{"row": r.name, "fold": int(k), "metric": a, "value": b} for a, b in fn(m).items()]
    compared = SURVIVAL_COMPARED if cohort.task == "survival" else RESPONSE_COMPARED
    comps = []
    for a, b in itertools.combinations(names, 2):
        keep = [m for m in compared if m in points[a] and m in points[b]]
        d = bs.paired_difference({m: points[a][m] for m in keep}, {m: points[b][m] for m in keep},
                                 boots[a][keep], boots[b][keep], settings.level)
        comps += [{"row_a": a, "row_b": b, **rec} for rec in d.to_dict("records")]
    info = {"cohort": cohort.name, "task": cohort.task, "patients": cohort.n, **_counts(cohort),
            "bootstrap": {"resamples": settings.n_boot, "seed": settings.seed, "level": settings.level,
                          "unit": "patients resampled with replacement; CI = percentile interval"},
            "rows": names, "scaling": settings.scaling, "notes": settings.notes}
    if cohort.task == "survival":
        info |= {"times": [float(t) for t in times], "tau": tau, "time_unit": settings.time_unit}
    return StudyResult(pd.DataFrame(report, columns=["row", "metric", "value", "lo", "hi"]),
                       pd.DataFrame(folds, columns=["row", "fold", "metric", "value"]),
                       pd.DataFrame(comps, columns=["row_a", "row_b", "metric", "delta", "lo", "hi", "p",
                                                    "rel_improvement"]), info, idx)


def _counts(cohort: Cohort) -> dict[str, int]:
    if cohort.task == "survival":
        return {"events": int(np.sum(cohort.event))}
    return {"responders": int(np.nansum(cohort.response))}


# ----------------------------------------------------------------------------------------------------------------
# writing


def _fmt(v: float, lo: float | None = None, hi: float | None = None, digits: int = 3) -> str:
    if v is None or not np.isfinite(v):
        return "n/a"
    s = f"{v:.{digits}f}"
    if lo is not None and hi is not None and np.isfinite(lo) and np.isfinite(hi):
        s += f" ({lo:.{digits}f} to {hi:.{digits}f})"
    return s


def _fmt_p(p: float) -> str:
    if p is None or not np.isfinite(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def markdown(result: StudyResult, primary: str, cox: pd.DataFrame | None = None, cox_global_p: float | None = None,
             figures: Sequence[str] = ()) -> str:
    """``report.md``: the results table (pooled value with 95% CI, per-fold mean ± sd), the comparisons of the
    primary row, the multivariable Cox and the settings."""
    info = result.settings
    task = info["task"]
    compared = SURVIVAL_COMPARED if task == "survival" else RESPONSE_COMPARED
    rep = result.report.set_index(["row", "metric"])
    lines = [f"# Outcome report: {info['cohort']}", ""]
    counts = f"{info['patients']} patients, " + (f"{info['events']} events" if task == "survival" else
                                                  f"{info['responders']} responders")
    lines += [f"{counts}; 95% CIs from {info['bootstrap']['resamples']} bootstrap resamples of the patients "
              f"(seed {info['bootstrap']['seed']}).", ""]
    has_folds = not result.folds.empty
    head = ["model", *(METRIC_NAMES.get(m, m) for m in compared)]
    if has_folds:
        head.append(f"{METRIC_NAMES[compared[0]]} per fold (mean ± sd)")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in info["rows"]:
        cells = [f"**{row}**" if row == primary else row]
        for m in compared:
            if (row, m) in rep.index:
                r = rep.loc[(row, m)]
                cells.append(_fmt(r["value"], r["lo"], r["hi"]))
            else:
                cells.append("n/a")
        if has_folds:
            f = result.folds[(result.folds["row"] == row) & (result.folds["metric"] == compared[0])]["value"]
            f = f[np.isfinite(f.to_numpy(float))]
            cells.append(f"{f.mean():.3f} ± {f.std(ddof=1) if len(f) > 1 else 0.0:.3f} ({len(f)} folds)"
                         if len(f) else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    if task == "survival":
        lines += ["", f"td-AUC and Brier at {', '.join(f'{t:g}' for t in info['times'])} {info['time_unit']}; "
                  f"Uno's C truncated at tau = {info['tau']:g} {info['time_unit']}; IBS over the same range (lower "
                  "is better; rows without a survival curve have none)."]
    c = result.comparisons
    folds_of = f"{primary} fold "  # the ensemble against its own fold models: in comparisons.csv only
    comps = c[((c["row_a"] == primary) | (c["row_b"] == primary)) & ~c["row_a"].str.startswith(folds_of)
              & ~c["row_b"].str.startswith(folds_of)]
    if not comps.empty:
        lines += ["", f"## {primary} against each other model (paired bootstrap on the same patients)", "",
                  "| comparison | metric | difference (95% CI) | p | relative change |", "|---|---|---|---|---|"]
        for c in comps.to_dict("records"):
            sign = 1 if c["row_a"] == primary else -1
            other = c["row_b"] if sign == 1 else c["row_a"]
            lo, hi = (c["lo"], c["hi"]) if sign == 1 else (-c["hi"], -c["lo"])
            rel = c["rel_improvement"] if sign == 1 else float("nan")
            lines.append(f"| {primary} vs {other} | {METRIC_NAMES.get(c['metric'], c['metric'])} | "
                         f"{_fmt(sign * c['delta'], lo, hi)} | {_fmt_p(c['p'])} | "
                         f"{'n/a' if not np.isfinite(rel) else f'{100 * rel:+.1f}%'} |")
        lines += ["", "Relative change = (a - b) / b (for IBS and Brier (b - a) / b, so positive = a better), the "
                  "way the paper states its improvements; all pairs are in comparisons.csv."]
    if cox is not None and not cox.empty:
        lines += ["", f"## Multivariable Cox ({primary} risk per SD with the clinical covariates)", "",
                  "| covariate | HR (95% CI) | p | PH test p |", "|---|---|---|---|"]
        for c in cox.to_dict("records"):
            lines.append(f"| {c['covariate']} | {_fmt(c['hr'], c['lo'], c['hi'], 2)} | {_fmt_p(c['p'])} | "
                         f"{_fmt_p(c['ph_p'])} |")
        if cox_global_p is not None:
            lines.append(f"\nSchoenfeld test of proportional hazards, global p = {_fmt_p(cox_global_p)}.")
    if info.get("scaling"):
        lines += ["", f"Pooling over folds: {info['scaling']}."]
    lines += [f"- {n}" for n in info.get("notes", [])]
    if figures:
        lines += ["", "Figures: " + ", ".join(f"`{f}`" for f in figures)]
    return "\n".join(lines) + "\n"


def write_report(dest: str | Path, cohort: Cohort, rows: Sequence[Row], settings: StudySettings, primary: str,
                 groups: np.ndarray | None = None, clinical: pd.DataFrame | None = None,
                 covariates: Sequence[str] = ()) -> StudyResult:
    """Score ``rows`` on ``cohort`` and write the report files and figures to ``dest`` (see the module docstring).

    ``groups`` (N,) bool: the primary row's high-risk group (cut-off from training patients) for the KM figure;
    ``clinical``: one row per patient (index case_id) with ``covariates`` for the multivariable Cox.
    """
    from mica import plots

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    result = score_rows(cohort, rows, settings)
    write_csv(result.report, dest / "report.csv")
    write_csv(result.folds, dest / "report_folds.csv")
    write_csv(result.comparisons, dest / "comparisons.csv")
    write_csv(rows_frame(cohort, rows, None if groups is None else {"risk_group": np.where(groups, "high", "low")}),
              dest / "predictions.csv" if cohort.fold is not None else dest / "report_predictions.csv")
    figures: list[str] = []
    cox = gp = None
    by_name = {r.name: r for r in rows}
    if cohort.task == "survival":
        if groups is not None:
            from mica.survival import logrank_pvalue

            cens = 1 - cohort.event.astype(float)
            p = logrank_pvalue(cohort.time, cens, groups)
            plots.km_plot(cohort.time, cens, groups, p, dest / "km_risk_groups.png",
                          title=f"{primary}: high vs low risk ({cohort.name})", time_unit=settings.time_unit)
            figures.append("km_risk_groups.png")
            result.settings["km_logrank_p"] = p
        if clinical is not None and covariates:
            from mica.study.cox import multivariable_cox

            df = clinical.loc[list(cohort.case_id), list(covariates)].reset_index(drop=True).assign(
                **{f"{primary}_risk": by_name[primary].score, "_time": cohort.time,
                   "_cens": 1 - cohort.event.astype(float)})
            try:
                cox, gp = multivariable_cox(df, f"{primary}_risk", list(covariates), "_time", "_cens")
                write_csv(cox, dest / "cox_multivariable.csv")
                plots.forest_plot(cox, dest / "forest_cox.png", title=f"multivariable Cox ({cohort.name})")
                figures.append("forest_cox.png")
                result.settings["cox_global_ph_p"] = gp
            except PipelineError as e:
                log.warning("multivariable Cox not fitted: %s", e)
    else:
        from mica.study.metrics import calibration_table

        prim = by_name[primary]
        plots.roc_band_plot(cohort.response, prim.score, result.idx, dest / "roc.png",
                            title=f"{primary} ({cohort.name})")
        cal = calibration_table(cohort.response, prim.score)
        write_csv(cal, dest / "calibration.csv")
        plots.calibration_plot(cal, dest / "calibration.png", title=f"{primary} calibration ({cohort.name})")
        figures += ["roc.png", "calibration.png"]
    compared = SURVIVAL_COMPARED if cohort.task == "survival" else RESPONSE_COMPARED
    for m in compared:
        if (result.report["metric"] == m).any():
            plots.comparison_plot(result.report, m, dest / f"compare_{m}.png",
                                  title=f"{METRIC_NAMES.get(m, m)} with 95% CI ({cohort.name})")
            figures.append(f"compare_{m}.png")
    write_json(dest / "report.json", {**result.settings, "primary": primary, "figures": figures,
                                      "settings": asdict(settings)})
    with atomic_path(dest / "report.md", suffix=".md") as tmp:
        Path(tmp).write_text(markdown(result, primary, cox, gp, figures))
    return result


def summary_lines(result: StudyResult, primary: str, against: str | None = None) -> list[str]:
    """Short log lines: the primary row's headline metric with CI, and its difference to ``against``."""
    metric = "c_harrell" if result.settings["task"] == "survival" else "auc"
    rep = result.report.set_index(["row", "metric"])
    out = []
    if (primary, metric) in rep.index:
        r = rep.loc[(primary, metric)]
        out.append(f"{primary} {METRIC_NAMES[metric]} {_fmt(r['value'], r['lo'], r['hi'])}")
    if against is not None:
        c = result.comparisons
        m = c[(c["row_a"] == primary) & (c["row_b"] == against) & (c["metric"] == metric)]
        if not m.empty:
            r = m.iloc[0]
            out.append(f"vs {against} {r['delta']:+.3f} ({r['lo']:+.3f} to {r['hi']:+.3f}, p {_fmt_p(r['p'])})")
    return out


def rows_frame(cohort: Cohort, rows: Sequence[Row], extra: Mapping[str, np.ndarray] | None = None) -> pd.DataFrame:
    """The per-patient table of every row's score (``predictions.csv`` of a report)."""
    df = pd.DataFrame({"case_id": cohort.case_id})
    if cohort.fold is not None:
        df["fold"] = cohort.fold
    if cohort.task == "survival" and cohort.time is not None:
        df["time"], df["censorship"] = cohort.time, 1 - cohort.event.astype(int)
    elif cohort.response is not None:
        df["response"] = cohort.response
    for r in rows:
        df[r.name] = r.score
    for k, v in (extra or {}).items():
        df[k] = v
    return df
