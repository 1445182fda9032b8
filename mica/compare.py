"""Outcome report of one or several MICA runs on the same patients: metrics with bootstrap CIs, paired comparisons,
multivariable Cox and figures (:mod:`mica.study.report`).

Commands (from the repository root; stage 09 writes the predictions these read)::

    # the run's own folds, with the other modes and the generator's truth -> OUT/mica_runs/demo_coattn/test/
    python -m mica.compare --out OUT --runs demo_coattn demo_path demo_codex --truth truth.csv
    # an independent cohort the runs were applied to (mica.test --external-cohort ... --external-name lung2)
    python -m mica.compare --out OUT --runs demo_coattn --external lung2 --bootstrap 2000 --times 12 24 36

The first run is the primary one: the report goes to its folder (``test/`` or ``external/{name}/``, or ``--dest``)
and its rows are ``coattn`` (or the run's mode), the other runs' modes, ``clinical`` (Cox PH / logistic regression
on ``--covariates``, fitted on training patients only), ``coattn+clinical`` and ``truth`` (``--truth``). Runs must
share their folds (the same validation patients per fold). Survival metrics: Harrell's C, Uno's C (IPCW, truncated
at ``--tau``), time-dependent AUC and Brier score at ``--times`` and the integrated Brier score; response: AUC,
balanced accuracy, Brier, calibration. Every value has a 95% percentile bootstrap CI (patients resampled
``--bootstrap`` times, ``--seed``); every pair of rows a paired bootstrap difference with its CI and p.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mica.clinical import patient_outcomes
from mica.study.predictions import SCALING, load_run
from mica.study.report import StudyResult, StudySettings, summary_lines, write_report
from pipeline import artifacts as art
from pipeline.cli import Context, Stage, config_from_args, require
from pipeline.errors import PipelineError
from pipeline.tables import read_clinical_table

log = logging.getLogger("mica.compare")

EXTERNAL_RECORD = "external.json"
"""Written by ``mica.test --external-cohort`` beside predictions.csv: where the independent cohort came from."""


@dataclass(kw_only=True)
class ReportOptions:
    """How stage 09 and ``mica.compare`` score a report (the flags of the same names); the base of both stages'
    configs."""

    compare: list[str] = field(default_factory=list)
    truth: Path | None = None
    covariates: list[str] | None = None
    bootstrap: int = 1000
    seed: int = 0
    times: list[float] | None = None
    tau: float | None = None


def add_report_args(p: argparse.ArgumentParser, runs_flag: bool = False) -> None:
    """The report flags shared by ``mica.test`` and ``mica.compare``."""
    g = p.add_argument_group("outcome report (mica.study)")
    if not runs_flag:
        g.add_argument("--compare", nargs="+", default=[], metavar="RUN",
                       help="other runs (same folds) whose rows go into this run's report (their stage 09 first)")
    g.add_argument("--truth", type=Path, help="CSV case_id,risk (survival) or case_id,prob (response): a reference "
                   "row 'truth' (e.g. a synthetic cohort's true risk)")
    g.add_argument("--covariates", nargs="+", help="clinical covariates of the clinical, MICA+clinical and "
                   "multivariable Cox models (default: every clinical column but ids and outcomes)")
    g.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the patients for the 95%% CIs")
    g.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    g.add_argument("--times", type=float, nargs="+", help="times (months) of td-AUC and Brier (default: the "
                   "quartiles of the observed event times)")
    g.add_argument("--tau", type=float, help="truncation time (months) of Uno's C (default: see mica.study.metrics)")


def check_report_options(o: ReportOptions) -> None:
    require(o.bootstrap >= 10, f"--bootstrap {o.bootstrap}: must be >= 10 (1000 for a paper)")
    require(not o.times or min(o.times) > 0, "--times: must be > 0 months")
    require(o.tau is None or o.tau > 0, f"--tau {o.tau}: must be > 0 months")
    if o.truth is not None:
        require(Path(o.truth).is_file(), f"--truth {o.truth} does not exist")


def _clinical_of(run_cfg: dict[str, Any]) -> tuple[pd.DataFrame, Path]:
    path = run_cfg.get("clinical") or (Path(run_cfg["cohort"]) / "clinical.csv" if run_cfg.get("cohort") else None)
    if path is None:
        raise PipelineError("the run's config names no clinical table")
    table = read_clinical_table(Path(path), "patients")
    return patient_outcomes(table), Path(path)


def _covariates(opts: ReportOptions, clinical: pd.DataFrame, source: Path) -> list[str]:
    from mica.baselines import default_covariates

    if opts.covariates:
        missing = [c for c in opts.covariates if c not in clinical.columns]
        if missing:
            raise PipelineError(f"--covariates {missing} are not columns of {source} (it has "
                                f"{', '.join(map(str, clinical.columns))})")
        return list(opts.covariates)
    try:
        return default_covariates(clinical)
    except PipelineError as e:
        log.warning("no clinical rows: %s", e)
        return []


def settings_of(opts: ReportOptions, scaling: str = "", notes: Sequence[str] = ()) -> StudySettings:
    return StudySettings(n_boot=opts.bootstrap, seed=opts.seed, times=opts.times, tau=opts.tau, scaling=scaling,
                         notes=list(notes))


def internal_report(out: Path, runs: Sequence[str], opts: ReportOptions, dest: Path | None = None
                    ) -> StudyResult:
    """The report of ``runs`` (first = primary) on their own folds -> ``OUT/mica_runs/{runs[0]}/test/``."""
    from mica.study.report import Cohort, study_times
    from mica.study.rows import internal_rows, read_truth

    tables = [load_run(art.MICA_RUN.dir(out, run=r)) for r in runs]
    primary = tables[0]
    clinical, source = _clinical_of(primary.config)
    covariates = _covariates(opts, clinical, source)
    truth = read_truth(opts.truth, primary.task) if opts.truth else None
    times = None
    if primary.task == "survival":  # the times come from the validation patients' outcomes alone
        val = pd.concat([f.val for f in primary.folds])
        probe = Cohort("internal", "survival", val["case_id"].to_numpy(), time=val["time"].to_numpy(float),
                       event=val["censorship"].to_numpy(float) == 0)
        times, _ = study_times(probe, settings_of(opts))
    cohort, rows, groups, notes = internal_rows(primary, tables[1:], clinical, covariates, times, truth)
    dest = dest or art.MICA_REPORT.dir(out, run=runs[0])
    settings = settings_of(opts, SCALING if primary.task == "survival" else "probabilities pooled as they are",
                           notes)
    settings.times = None if times is None else [float(t) for t in times]
    result = write_report(dest, cohort, rows, settings, rows[0].name, groups, clinical, covariates)
    _log_result(result, rows[0].name, dest)
    return result


def external_report(out: Path, runs: Sequence[str], name: str, opts: ReportOptions, dest: Path | None = None
                    ) -> StudyResult | None:
    """The report of the runs applied to the independent cohort ``name`` (``mica.test --external-cohort``) ->
    ``OUT/mica_runs/{runs[0]}/external/{name}/``; None (logged) when the cohort has no outcome."""
    from mica.study.report import Cohort, study_times
    from mica.study.rows import external_rows, read_truth

    primary = load_run(art.MICA_RUN.dir(out, run=runs[0]))
    ext_dir = art.MICA_EXTERNAL.dir(out, run=runs[0], cohort=name)
    rec_path = ext_dir / EXTERNAL_RECORD
    if not rec_path.is_file():
        raise PipelineError(f"{rec_path} does not exist: apply the run to the cohort first (python -m mica.test "
                            f"--run-name {runs[0]} --external-cohort ... --external-out ... --external-name {name})")
    rec = json.loads(rec_path.read_text())
    ext = pd.read_csv(ext_dir / "predictions.csv", dtype={"case_id": str})
    fold_preds = pd.read_csv(ext_dir / "fold_predictions.csv", dtype={"case_id": str})
    outcome = ("time" in ext and "censorship" in ext) if primary.task == "survival" else "response" in ext
    if not outcome:
        log.info("%s has no outcome: predictions.csv (risk table and groups) only, no report", name)
        return None
    train_clin, source = _clinical_of(primary.config)
    ext_clin = None
    if rec.get("clinical"):
        ext_clin = patient_outcomes(read_clinical_table(Path(rec["clinical"]), "patients"))
    covariates = _covariates(opts, train_clin, source)
    if ext_clin is not None:
        covariates = [c for c in covariates if c in ext_clin.columns]
    truth = read_truth(opts.truth, primary.task) if opts.truth else None
    others = []
    for r in runs[1:]:
        d = art.MICA_EXTERNAL.dir(out, run=r, cohort=name)
        if not (d / "predictions.csv").is_file():
            raise PipelineError(f"{d / 'predictions.csv'} does not exist: apply run {r} to {name} first (python -m "
                                f"mica.test --run-name {r} --external-out ... --external-name {name} --no-report)")
        others.append((load_run(art.MICA_RUN.dir(out, run=r)),
                       pd.read_csv(d / "predictions.csv", dtype={"case_id": str}),
                       pd.read_csv(d / "fold_predictions.csv", dtype={"case_id": str})))
    times = None
    if primary.task == "survival":
        probe = Cohort(name, "survival", ext["case_id"].to_numpy(), time=ext["time"].to_numpy(float),
                       event=ext["censorship"].to_numpy(float) == 0)
        times, _ = study_times(probe, settings_of(opts))
    cohort, rows, groups, notes = external_rows(primary, ext, fold_preds, train_clin, ext_clin, covariates, times,
                                                name, truth, others)
    settings = settings_of(opts, "", notes)
    settings.times = None if times is None else [float(t) for t in times]
    dest = dest or ext_dir
    result = write_report(dest, cohort, rows, settings, rows[0].name, groups, ext_clin, covariates)
    _log_result(result, rows[0].name, dest)
    return result


def _log_result(result: StudyResult, primary: str, dest: Path) -> None:
    rows = result.settings["rows"]
    against = "clinical" if "clinical" in rows else None
    log.info("report (%s): %s", dest / "report.md", "; ".join(summary_lines(result, primary, against)))


# ----------------------------------------------------------------------------------------------------------------
# CLI


@dataclass
class CompareConfig(ReportOptions):
    """``python -m mica.compare``'s settings (the flags of the same names; ``compare`` unused: ``runs``)."""

    out: Path
    runs: list[str]
    external: str | None = None
    dest: Path | None = None
    log_level: str = "INFO"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mica.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="pipeline output root OUT (mica_runs/ inside)")
    p.add_argument("--runs", nargs="+", required=True, help="runs OUT/mica_runs/RUN; the first is the primary")
    p.add_argument("--external", metavar="NAME", help="the independent cohort NAME the runs were applied to "
                   "(OUT/mica_runs/RUN/external/NAME) instead of the runs' own folds")
    p.add_argument("--dest", type=Path, help="report folder (default: the primary run's test/ or external/NAME/)")
    add_report_args(p, runs_flag=True)
    p.add_argument("--log-level", default="INFO")
    return p


def make_config(args: argparse.Namespace) -> CompareConfig:
    cfg = config_from_args(CompareConfig, args)
    check_report_options(cfg)
    require(len(set(cfg.runs)) == len(cfg.runs), f"--runs {cfg.runs}: a run is named twice")
    for r in cfg.runs:
        d = art.MICA_RUN.dir(cfg.out, run=r)
        require((d / "config.json").is_file(), f"--runs {r}: {d / 'config.json'} does not exist (a mica.train run?)")
    return cfg


def run(cfg: CompareConfig, ctx: Context) -> int:
    if cfg.external:
        external_report(cfg.out, cfg.runs, cfg.external, cfg, cfg.dest)
    else:
        internal_report(cfg.out, cfg.runs, cfg, cfg.dest)
    return 0


def _dest(cfg: CompareConfig) -> Path:
    if cfg.dest is not None:
        return cfg.dest
    if cfg.external:
        return art.MICA_EXTERNAL.dir(cfg.out, run=cfg.runs[0], cohort=cfg.external)
    return art.MICA_REPORT.dir(cfg.out, run=cfg.runs[0])


STAGE = Stage("mica.compare", build_parser, make_config, run=run, log_file=lambda cfg: _dest(cfg) / "compare.log")


def main(argv: Sequence[str] | None = None) -> int:
    """Build the report; exit 0, 2 for a bad flag or input."""
    return STAGE.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())

