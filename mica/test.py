"""Evaluate a trained MICA run fold by fold, and explain it with Integrated Gradients.

Commands (from the repository root; the run's config.json supplies the cohort, features and settings)::

    python -m mica.test --out OUT --run-name mica_coattn                 # metrics and plots
    python -m mica.test --out OUT --run-name mica_coattn --ig            # + IG attributions of every val slide
    python -m mica.test --out OUT --run-name mica_coattn --ig --ig-steps 50 --ig-batch 4 --cohort /data/lung
    # the outcome report with other runs' rows and a reference (test those runs first, --no-report)
    python -m mica.test --out OUT --run-name mica_coattn --compare mica_path mica_codex --truth truth.csv
    # an independent cohort: every fold's model and the ensemble (stage 09 on the run itself first)
    python -m mica.test --out OUT --run-name mica_coattn --external-out OUT2 --external-cohort /data/lung2

The outcome report (``test/report.md`` and its tables and figures, :mod:`mica.study.report`, built by
:func:`mica.compare.internal_report`): every row scored out of fold with 95% bootstrap CIs (``--bootstrap``
resamples of the patients, ``--seed``), paired comparisons of every pair, the clinical model and MICA + clinical on
``--covariates``, the multivariable Cox. ``--external-out``: :mod:`mica.external` writes
``external/{name}/predictions.csv`` (and the report when the cohort has outcomes).

Per fold k (each patient is evaluated by the fold whose validation side holds it): ``fold_k/test_predictions.csv``
(one row per patient: ``case_id,slides,time,censorship,risk,risk_group`` or ``case_id,slides,response,prob``).
Survival: c-index (sksurv), time-dependent AUC (sksurv ``cumulative_dynamic_auc`` at the quartiles of the val event
times inside the training follow-up), high/low risk split at the TRAINING fold's median risk, log-rank p
(lifelines), ``test/km_fold{k}.png``; pooled over folds: ``test/km_all_folds.png``. Response: AUC,
``test/roc_fold{k}.png`` and ``test/roc_all_folds.png``. ``test/summary.csv`` (per fold + mean and sd rows),
``test/summary.json``, ``test/td_auc.csv``.

``--ig``: captum IntegratedGradients on both inputs (see :mod:`mica.attribution`) -> ``ig/{slide}.h5``,
``ig/{slide}_heatmap.png`` (over the H&E thumbnail from COHORT/he when the slide is there, else a blank canvas),
``ig/ig_summary.csv`` (per slide completeness), ``ig/codex_attribution.csv`` + ``ig/codex_attribution_bar.png``
(cohort mean attribution per marker). IG is done per slide with these settings (``ig/done/{slide}.json``: steps,
baseline, target; input: the fold's checkpoint): a done slide is skipped, a retrained fold redoes its slides, other
IG settings stop before any work ("done with other settings: <diff>; pass --overwrite"); a unit that fails is
recorded and the others go on (exit 1). Metrics and plots are always recomputed.

Flags, the run (config.json, every fold's checkpoint), the split files and features of every fold, and the output
folders (writable) are checked before the first fold (exit 2, one line naming the path). A fold is scored only on the
inputs it was trained on (:mod:`mica.fold_inputs`): bags or CODEX features rebuilt since (stage 07 ``--overwrite``),
other split slides, or a checkpoint that does not record them stop the run with one line naming the fold and the
slide (retrain it with ``mica.train``, which retrains a fold whose inputs changed). The run ends with one
line: ``mica.test RUN: N folds scored (c_index m ± sd); IG: N slides done, N skipped (already done), N failed: ...``.
"""


from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mica import plots
from mica.attribution.explain import IGOptions, check_ig, cohort_marker_attribution, ig_settings, ig_spec, run_ig
from mica.checkpoint import check_fold_files, load_fold_model
from mica.checkpoint import write_csv as _write_csv
from mica.clinical import split_path
from mica.compare import ReportOptions, add_report_args, check_report_options
from mica.dataset import BagDataset, FeatureSource, build_fold, check_fold_inputs
from mica.fold_inputs import changed_inputs, fold_inputs
from mica.predict import patient_table, predict
from mica.train import config_from_record, feature_source
from pipeline import artifacts as art
from pipeline.cli import Context, Stage, config_from_args, require
from pipeline.dist import resolve_device
from pipeline.errors import EXIT_FAILED, PipelineError
from pipeline.io import ensure_writable, save_config, write_json
from pipeline.runner import StageReport
from pipeline.tables import read_clinical_table

log = logging.getLogger("mica.test")


@dataclass
class TestConfig(ReportOptions):
    """Stage 09's settings (the flags of the same names; see ``build_parser``)."""

    __test__ = False  # not a pytest test class

    out: Path
    run_name: str = "mica_run"
    cohort: Path | None = None
    clinical: Path | None = None
    splits_dir: Path | None = None
    folds: list[int] | None = None
    device: str = "auto"
    workers: int = 2
    ig: bool = False
    ig_steps: int = 50
    ig_baseline: str = "zero"
    ig_batch: int = 0
    ig_limit: int = 0
    thumbnail_size: int = 1024
    overwrite: bool = False
    report: bool = True
    external_cohort: Path | None = None
    external_out: Path | None = None
    external_name: str | None = None
    external_clinical: Path | None = None
    log_level: str = "INFO"

    @property
    def external(self) -> str | None:
        """The independent cohort's name (``--external-name``, else the cohort folder's name), or None."""
        if self.external_out is None:
            return None
        return self.external_name or (self.external_cohort or self.external_out).resolve().name

    @property
    def run_dir(self) -> Path:
        """``OUT/mica_runs/RUN``."""
        return art.MICA_RUN.dir(self.out, run=self.run_name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mica.test", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="pipeline output root OUT")
    p.add_argument("--run-name", "--run", dest="run_name", default="mica_run", help="run folder OUT/mica_runs/RUN")
    p.add_argument("--cohort", type=Path, help="cohort folder (default: the run's); its he/ gives thumbnails")
    p.add_argument("--clinical", type=Path, help="clinical CSV (default: the run's)")
    p.add_argument("--splits-dir", type=Path, help="folder of splits_{k}.csv (default: the run's)")
    p.add_argument("--folds", type=int, nargs="+", help="folds to evaluate (default: the run's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers reading bags")
    ig = p.add_argument_group("integrated gradients")
    ig.add_argument("--ig", action="store_true", help="compute IG attributions of every validation slide")
    ig.add_argument("--ig-steps", type=int, default=50, help="integration steps (Gauss-Legendre)")
    ig.add_argument("--ig-baseline", choices=("zero", "mean"), default="zero",
                    help="zero features, or every patch/token replaced by its bag's mean")
    ig.add_argument("--ig-batch", type=int, default=0,
                    help="captum internal_batch_size (interpolated bags per forward); 0 = from the bag size")
    ig.add_argument("--ig-limit", type=int, default=0,
                    help="explain only the first N validation units per fold (0 = all)")
    ig.add_argument("--thumbnail-size", type=int, default=1024, help="longest side of heatmap thumbnails (px)")
    ig.add_argument("--overwrite", action="store_true",
                    help="recompute IG files that exist, also those made with other IG settings (metrics and plots "
                         "are always recomputed)")
    add_report_args(p)
    p.add_argument("--no-report", dest="report", action="store_false",
                   help="skip the outcome report (report.csv/.md, comparisons, figures with bootstrap CIs)")
    ext = p.add_argument_group("independent cohort (apply the trained run; stage 09 on the run itself first)")
    ext.add_argument("--external-out", type=Path, help="the independent cohort's output root (its stages 01, 06 and "
                     "07 with the run's encoders): scores it instead of the run's folds")
    ext.add_argument("--external-cohort", type=Path, help="its cohort folder (clinical.csv: case ids and, when "
                     "known, the outcome); without one each slide is a patient and there is no outcome")
    ext.add_argument("--external-clinical", type=Path, help="its clinical CSV (default EXTERNAL_COHORT/clinical.csv)")
    ext.add_argument("--external-name", help="its name under OUT/mica_runs/RUN/external/ (default: the cohort "
                     "folder's name)")
    p.add_argument("--log-level", default="INFO")
    return p


def make_config(args: argparse.Namespace) -> TestConfig:
    """The flags as a :class:`TestConfig`; a bad value, or a run without ``config.json``, stops here (one line)."""
    cfg = config_from_args(TestConfig, args)
    for flag, value, ok, want in (("--ig-steps", cfg.ig_steps, cfg.ig_steps >= 1, ">= 1"),
                                  ("--ig-batch", cfg.ig_batch, cfg.ig_batch >= 0, ">= 0"),
                                  ("--ig-limit", cfg.ig_limit, cfg.ig_limit >= 0, ">= 0"),
                                  ("--thumbnail-size", cfg.thumbnail_size, cfg.thumbnail_size >= 16, ">= 16"),
                                  ("--workers", cfg.workers, cfg.workers >= 0, ">= 0"),
                                  ("--folds", cfg.folds, not cfg.folds or min(cfg.folds) >= 0, "fold indices >= 0")):
        require(ok, f"{flag} {value}: must be {want}")
    check_report_options(cfg)
    require(cfg.external_out is None or cfg.external_out.is_dir(),
            f"--external-out {cfg.external_out} is not a folder (the independent cohort's OUT)")
    require(cfg.external_out is not None or (cfg.external_cohort is None and cfg.external_clinical is None),
            "--external-cohort/--external-clinical need --external-out (where its features are)")
    require(cfg.external_out is None or not cfg.ig, "--ig explains the run's own folds: drop it with --external-out")
    load_run_config(cfg.run_dir)
    return cfg


def prepare(cfg: TestConfig, ctx: Context) -> None:
    """The output folders (``test/``, and ``ig/`` with ``--ig``) are writable, before the log file opens."""
    if cfg.external is not None:
        ensure_writable(art.MICA_EXTERNAL.dir(cfg.out, run=cfg.run_name, cohort=cfg.external), "output folder",
                        f"check {cfg.run_dir}")
        return
    for d in (cfg.run_dir / "test", *([art.ATTRIBUTIONS.dir(cfg.out, run=cfg.run_name)] if cfg.ig else [])):
        ensure_writable(d, "output folder", f"check {cfg.run_dir}")


# ----------------------------------------------------------------------------------------------------------------
# loading a run


def load_run_config(run_dir: Path) -> dict[str, Any]:
    """The run's ``config.json`` (stage 08), or one line saying the folder is no MICA run."""
    p = run_dir / "config.json"
    if not p.is_file():
        raise PipelineError(f"{p} does not exist: is {run_dir} a mica.train run (OUT/mica_runs/RUN)?")
    return json.loads(p.read_text())


class RunInputs:
    """Clinical table, split files and feature source of a run (paths from its config, overridable by ``cfg``)."""

    def __init__(self, run_cfg: dict[str, Any], cfg: TestConfig):
        cohort = cfg.cohort or (Path(run_cfg["cohort"]) if run_cfg.get("cohort") else None)
        self.cohort = cohort
        self._he: dict[str, Path] | None = None
        clinical = cfg.clinical or run_cfg.get("clinical") or (cohort / "clinical.csv" if cohort else None)
        splits = cfg.splits_dir or run_cfg.get("splits_dir") or (cohort / "splits" if cohort else None)
        if clinical is None or splits is None:
            raise PipelineError("the run's config names no cohort: pass --cohort (or --clinical and --splits-dir)")
        self.clinical_csv, self.splits_dir = Path(clinical), Path(splits)
        self.task, self.mode, self.unit = run_cfg["task"], run_cfg["mode"], run_cfg["unit"]
        self.clinical = read_clinical_table(self.clinical_csv, self.task)
        self.cfg = run_cfg
        self.out = Path(cfg.out)

    def source(self) -> FeatureSource:
        """The run's feature bags (its encoders, under this OUT)."""
        return feature_source(config_from_record(self.cfg, out=self.out))

    def he_path(self, slide: str) -> Path | None:
        """The slide's H&E file in the cohort (:func:`pipeline.cohort.resolve_slides`: pairs.csv, else he/), for
        thumbnails; None without a cohort of slides (a warning once when it cannot be resolved)."""
        if self._he is None:
            self._he = {}
            c = self.cohort
            if c is not None and ((c / "pairs.csv").is_file() or (c / "he").is_dir()):
                from pipeline.cohort import resolve_slides

                try:
                    self._he = resolve_slides(c).he_paths()
                except PipelineError as e:
                    log.warning("heatmaps on a blank canvas (no thumbnails): %s", e)
        return self._he.get(slide)

    def fold(self, k: int, edges: list[float] | None) -> tuple[BagDataset, BagDataset]:
        tr, va, _ = build_fold(self.clinical, split_path(self.splits_dir, k), self.source(), self.unit, self.mode,
                               self.task, edges=None if edges is None else np.asarray(edges, float))
        return tr, va


def check_trained_inputs(fold_dir: Path, fold: int, source: FeatureSource, mode: str, slides: list[str]) -> None:
    """The fold's model was trained on the inputs it would now be scored on (:mod:`mica.fold_inputs`), else one
    line naming the fold, what changed and the fix."""
    try:
        meta = json.loads((fold_dir / "checkpoint.json").read_text())
    except ValueError as e:
        raise PipelineError(f"{fold_dir / 'checkpoint.json'} is not valid JSON ({e}); retrain the fold") from None
    diff = changed_inputs(meta.get("inputs"), fold_inputs(source, mode, slides))
    if diff:
        raise PipelineError(f"fold {fold} ({fold_dir}) was trained on other inputs than it would be scored on: "
                            f"{'; '.join(diff)}; retrain it (python -m mica.train with the run's flags and --folds "
                            f"{fold}: a fold whose inputs changed is retrained) or score it on the inputs it was "
                            "trained on")


# ----------------------------------------------------------------------------------------------------------------
# metrics


def evaluate_fold(model: torch.nn.Module, train_ds: BagDataset, val_ds: BagDataset, task: str, device: torch.device,
                  workers: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any], pd.DataFrame]:
    """Patient-level val and train predictions (val with its risk group), the fold's metrics and its
    time-dependent AUC rows."""
    from mica import survival as sv

    val = patient_table(predict(model, val_ds, device, task, workers, desc="val")[0], task)
    train = patient_table(predict(model, train_ds, device, task, workers, desc="train")[0], task)
    for table, ds in ((val, val_ds), (train, train_ds)):
        slides: dict[str, list[str]] = {}
        for u in ds.units:
            slides.setdefault(u.case_id, []).extend(u.slides)
        table.insert(1, "slides", [";".join(slides[c]) for c in table["case_id"]])
    if task == "response":
        return val, train, {"auc": sv.binary_auc(val["response"], val["prob"]), "n_val": len(val)}, pd.DataFrame()
    thr = sv.median_threshold(train["risk"])
    high = val["risk"].to_numpy() > thr
    val.insert(val.columns.get_loc("risk") + 1, "risk_group", np.where(high, "high", "low"))
    times, aucs, mean_auc = sv.time_dependent_auc(train["time"], train["censorship"], val["time"],
                                                  val["censorship"], val["risk"])
    m = {"c_index": sv.c_index(val["time"], val["censorship"], val["risk"]), "td_auc_mean": mean_auc,
         "logrank_p": sv.logrank_pvalue(val["time"], val["censorship"], high), "risk_threshold": thr,
         "n_val": len(val), "n_events": int((val["censorship"] == 0).sum()), "n_high": int(high.sum())}
    return val, train, m, pd.DataFrame({"time": times, "auc": aucs})


def summarise(rows: list[dict[str, Any]], metric_cols: Sequence[str]) -> pd.DataFrame:
    from mica.survival import mean_sd

    df = pd.DataFrame(rows)
    stats = {c: mean_sd(df[c]) for c in metric_cols if c in df}
    extra = [{"fold": "mean", **{c: v[0] for c, v in stats.items()}},
             {"fold": "sd", **{c: v[1] for c, v in stats.items()}}]
    return pd.concat([df, pd.DataFrame(extra)], ignore_index=True)


# ----------------------------------------------------------------------------------------------------------------
# main


def final_line(run_name: str, rows: list[dict[str, Any]], metric: str, ig: StageReport | None) -> str:
    """``mica.test RUN: 2 folds scored (c_index 0.70 ± 0.05); IG: 10 done, 2 skipped (already done), 0 failed``."""
    from mica.survival import mean_sd

    mean, sd = mean_sd([r[metric] for r in rows])
    line = f"mica.test {run_name}: {len(rows)} folds scored ({metric} {mean:.4f} ± {sd:.4f})"
    return line if ig is None else f"{line}; {ig.final_line('IG slides')}"


def evaluate(cfg: TestConfig) -> dict[str, Any]:
    """Evaluate (and with ``--ig`` explain) the run; returns the summary dict also written to test/summary.json
    (``ig.failed``: {slide: reason} of the IG units that failed)."""
    from mica import survival as sv

    run_dir = cfg.run_dir
    run_cfg = load_run_config(run_dir)
    inputs = RunInputs(run_cfg, cfg)
    device = resolve_device(cfg.device)
    folds = cfg.folds or run_cfg["folds"]
    test_dir, ig_dir = run_dir / "test", art.ATTRIBUTIONS.dir(cfg.out, run=cfg.run_name)
    for k in folds:  # every input of every fold before the first one is scored
        check_fold_files(run_dir / f"fold_{k}")
    source = inputs.source()
    splits = check_fold_inputs(inputs.clinical, inputs.splits_dir, list(folds), source, inputs.mode, inputs.cohort)
    for k in folds:
        check_trained_inputs(run_dir / f"fold_{k}", k, source, inputs.mode, splits[k]["train"] + splits[k]["val"])
    settings = ig_settings(cfg.ig_steps, cfg.ig_baseline, inputs.task, inputs.mode)
    if cfg.ig:
        check_ig(cfg.out, cfg.run_name, {k: splits[k]["val"] for k in folds}, settings, cfg.overwrite, source)
    opts = IGOptions(cfg.ig_steps, cfg.ig_baseline, cfg.ig_batch, cfg.ig_limit, cfg.thumbnail_size, cfg.overwrite)
    save_config(test_dir, cfg)
    rows, pooled, td_rows, ig_rows = [], [], [], []
    ig_report = StageReport() if cfg.ig else None
    for k in folds:
        fold_dir = run_dir / f"fold_{k}"
        model, meta = load_fold_model(fold_dir, device)
        train_ds, val_ds = inputs.fold(k, meta.get("bin_edges"))
        val, train, m, td = evaluate_fold(model, train_ds, val_ds, inputs.task, device, cfg.workers)
        val.insert(0, "fold", k)
        _write_csv(val, fold_dir / "test_predictions.csv")
        _write_csv(train, fold_dir / "train_predictions.csv")
        pooled.append(val)
        rows.append({"fold": str(k), **m, "epoch": meta["epoch"] + 1})
        if inputs.task == "survival":
            plots.km_plot(val["time"], val["censorship"], val["risk_group"] == "high", m["logrank_p"],
                          test_dir / f"km_fold{k}.png", title=f"fold {k}: c-index {m['c_index']:.3f}")
            td_rows += [{"fold": k, **r} for r in td.to_dict("records")]
        else:
            plots.roc_plot(val["response"], val["prob"], test_dir / f"roc_fold{k}.png", title=f"fold {k}")
        log.info("fold %d: %s", k, {a: (round(b, 4) if isinstance(b, float) else b) for a, b in m.items()})
        if cfg.ig:
            ig_rows += run_ig(model, meta, val_ds, k, ig_spec(cfg.out, cfg.run_name, k, settings, source), inputs, opts,
                              device, ig_report)
    allv = pd.concat(pooled, ignore_index=True)
    summary: dict[str, Any] = {"run": str(run_dir), "task": inputs.task, "mode": inputs.mode, "folds": folds}
    metric = "c_index" if inputs.task == "survival" else "auc"
    if inputs.task == "survival":
        table = summarise(rows, ("c_index", "td_auc_mean", "logrank_p"))
        p_all = sv.logrank_pvalue(allv["time"], allv["censorship"], allv["risk_group"] == "high")
        plots.km_plot(allv["time"], allv["censorship"], allv["risk_group"] == "high", p_all,
                      test_dir / "km_all_folds.png", title="all folds (each patient split by its training median)")
        summary["pooled_logrank_p"] = p_all
        _write_csv(pd.DataFrame(td_rows, columns=["fold", "time", "auc"]), test_dir / "td_auc.csv")
    else:
        table = summarise(rows, ("auc",))
        plots.roc_plot(allv["response"], allv["prob"], test_dir / "roc_all_folds.png", title="all folds (pooled)")
        summary["pooled_auc"] = sv.binary_auc(allv["response"], allv["prob"])
    _write_csv(table, test_dir / "summary.csv")
    summary["per_fold"] = table.to_dict("records")
    if ig_report is not None:
        summary["ig"] = {"slides": len(ig_rows), "done": len(ig_report.done), "skipped": len(ig_report.skipped),
                         "failed": dict(ig_report.failed)}
    if cfg.ig and ig_rows:
        ig = pd.DataFrame(ig_rows)
        _write_csv(ig, ig_dir / "ig_summary.csv")
        cohort_marker_attribution(ig_dir, ig["slide"].tolist())
        summary["ig"] |= {"max_rel_delta": float(np.nanmax(ig["delta"])),
                          "median_rel_delta": float(np.nanmedian(ig["delta"]))}
        log.info("IG: %d slides, completeness |delta| / |f(x)-f(b)|: median %.2g, max %.2g", len(ig),
                 summary["ig"]["median_rel_delta"], summary["ig"]["max_rel_delta"])
    if cfg.report:
        from mica.compare import internal_report
        from mica.study.report import summary_lines

        result = internal_report(cfg.out, [cfg.run_name, *cfg.compare], cfg)
        summary["report"] = summary_lines(result, result.settings["rows"][0],
                                          "clinical" if "clinical" in result.settings["rows"] else None)
    write_json(test_dir / "summary.json", summary)
    log.info("test summary (%s):\n%s", test_dir / "summary.csv", table.to_string(index=False))
    line = final_line(cfg.run_name, rows, metric, ig_report)
    if summary.get("report"):
        line += f"; pooled: {', '.join(summary['report'])}"
    (log.error if ig_report is not None and ig_report.failed else log.info)("%s", line)
    return summary


def evaluate_external(cfg: TestConfig) -> pd.DataFrame:
    """Apply the run's fold models to an independent cohort (:mod:`mica.external`) and, when it has outcomes,
    write its report; returns the predictions table."""
    from mica.compare import EXTERNAL_RECORD, external_report
    from mica.external import apply_run, read_external_clinical
    from mica.study.predictions import load_run

    run_cfg = load_run_config(cfg.run_dir)
    tables = load_run(cfg.run_dir, cfg.folds)
    name = cfg.external
    assert name is not None and cfg.external_out is not None
    dest = art.MICA_EXTERNAL.dir(cfg.out, run=cfg.run_name, cohort=name)
    run_source = feature_source(config_from_record(run_cfg, out=cfg.out))
    ext_source = feature_source(config_from_record(run_cfg, out=cfg.external_out, features_dir=None,
                                                   codex_features=None))
    clinical = read_external_clinical(cfg.external_cohort, cfg.external_clinical, tables.task)
    save_config(dest, cfg)
    pred, _ = apply_run(tables, run_source, ext_source, clinical, dest, resolve_device(cfg.device), cfg.workers)
    clin_path = cfg.external_clinical or (cfg.external_cohort / "clinical.csv" if cfg.external_cohort else None)
    write_json(dest / EXTERNAL_RECORD, {"name": name, "cohort": None if cfg.external_cohort is None else
                                        str(cfg.external_cohort.resolve()), "out": str(cfg.external_out.resolve()),
                                        "clinical": str(clin_path) if clinical is not None and clin_path else None,
                                        "patients": len(pred), "folds": [f.fold for f in tables.folds]})
    line = f"mica.test {cfg.run_name} on {name}: {len(pred)} patients scored by {len(tables.folds)} folds"
    if cfg.report:
        result = external_report(cfg.out, [cfg.run_name, *cfg.compare], name, cfg)
        if result is not None:
            from mica.study.report import summary_lines

            line += "; " + ", ".join(summary_lines(result, result.settings["rows"][0], "clinical" if "clinical" in
                                                   result.settings["rows"] else None))
        else:
            line += " (no outcome: risk table and groups only)"
    log.info("%s", line)
    return pred


def run(cfg: TestConfig, ctx: Context) -> int:
    """Stage 09 (see the module docstring); exit code 0, or 1 when an IG unit failed."""
    if cfg.external is not None:
        evaluate_external(cfg)
        return 0
    return EXIT_FAILED if evaluate(cfg).get("ig", {}).get("failed") else 0


STAGE = Stage("mica.test", build_parser, make_config, run=run, prepare=prepare,
              log_file=lambda cfg: (cfg.run_dir / "test" / "test.log" if cfg.external is None else
                                    art.MICA_EXTERNAL.dir(cfg.out, run=cfg.run_name, cohort=cfg.external) / "test.log"),
              resume_hint="run the same command again to resume (metrics are recomputed, IG slides already done are "
                          "skipped)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run stage 09; exit code 0, 1 when an IG unit failed, 2 for a bad flag, input or output folder, 130 on
    Ctrl-C."""
    return STAGE.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
