"""Evaluate a trained MICA run fold by fold, and explain it with Integrated Gradients.

Commands (from the repository root; the run's config.json supplies the cohort, features and settings)::

    python -m mica.test --out OUT --run-name mica_coattn                 # metrics and plots
    python -m mica.test --out OUT --run-name mica_coattn --ig            # + IG attributions of every val slide
    python -m mica.test --out OUT --run-name mica_coattn --ig --ig-steps 50 --ig-batch 4 --cohort /data/lung

Per fold k (each patient is evaluated by the fold whose validation side holds it): ``fold_k/test_predictions.csv``
(one row per patient: ``case_id,slides,time,censorship,risk,risk_group`` or ``case_id,slides,response,prob``).
Survival: c-index (sksurv), time-dependent AUC (sksurv ``cumulative_dynamic_auc`` at the quartiles of the val event
times inside the training follow-up), high/low risk split at the TRAINING fold's median risk, log-rank p
(lifelines), ``test/km_fold{k}.png``; pooled over folds: ``test/km_all_folds.png``. Response: AUC,
``test/roc_fold{k}.png`` and ``test/roc_all_folds.png``. ``test/summary.csv`` (per fold + mean and sd rows),
``test/summary.json``, ``test/td_auc.csv``.

``--ig``: captum IntegratedGradients on both inputs (see ``mica.attribution``) -> ``ig/{slide}.h5``,
``ig/{slide}_heatmap.png`` (over the H&E thumbnail from COHORT/he when the slide is there, else a blank canvas),
``ig/ig_summary.csv`` (per slide completeness), ``ig/codex_attribution.csv`` + ``ig/codex_attribution_bar.png``
(cohort mean attribution per marker). IG is done per slide with these settings (``ig/done/{slide}.json``: steps,
baseline, target; input: the fold's checkpoint): a done slide is skipped, a retrained fold redoes its slides, other
IG settings stop before any work ("done with other settings: <diff>; pass --overwrite"); a unit that fails is
recorded and the others go on (exit 1). Metrics and plots are always recomputed.

Flags, the run (config.json, every fold's checkpoint), the split files and features of every fold, and the output
folders (writable) are checked before the first fold (exit 2, one line naming the path). The run ends with one
line: ``mica.test RUN: N folds scored (c_index m ± sd); IG: N slides done, N skipped (already done), N failed: ...``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mica import plots
from mica.checkpoint import check_fold_files, load_fold_model
from mica.checkpoint import write_csv as _write_csv
from mica.dataset import BagDataset, FeatureSource, build_fold, check_fold_inputs, read_clinical_table
from mica.explain import check_ig, cohort_marker_attribution, ig_settings, ig_spec, run_ig
from mica.predict import patient_table, predict
from pipeline.cli import run_logged
from pipeline.dist import resolve_device
from pipeline.errors import EXIT_INPUT_ERROR, PipelineError
from pipeline.io import ensure_writable, save_config, write_json
from pipeline.logs import setup_logging
from pipeline.runner import StageReport

# load_fold_model lives in mica.checkpoint, the IG functions in mica.explain (re-exported here)
__all__ = ["build_parser", "cohort_marker_attribution", "evaluate_fold", "load_fold_model", "load_run_config", "main",
           "run", "run_ig"]

log = logging.getLogger("mica.test")


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
    p.add_argument("--log-level", default="INFO")
    return p


# ----------------------------------------------------------------------------------------------------------------
# loading a run


def load_run_config(run_dir: Path) -> dict[str, Any]:
    p = run_dir / "config.json"
    if not p.is_file():
        raise PipelineError(f"{p} does not exist: is {run_dir} a mica.train run (OUT/mica_runs/RUN)?")
    return json.loads(p.read_text())


class RunInputs:
    """Clinical table, split files and feature source of a run (paths from its config, overridable)."""

    def __init__(self, cfg: dict[str, Any], args: argparse.Namespace):
        cohort = args.cohort or (Path(cfg["cohort"]) if cfg.get("cohort") else None)
        self.cohort = cohort
        self._he: dict[str, Path] | None = None
        clinical = args.clinical or cfg.get("clinical") or (cohort / "clinical.csv" if cohort else None)
        splits = args.splits_dir or cfg.get("splits_dir") or (cohort / "splits" if cohort else None)
        if clinical is None or splits is None:
            raise PipelineError("the run's config names no cohort: pass --cohort (or --clinical and --splits-dir)")
        self.clinical_csv, self.splits_dir = Path(clinical), Path(splits)
        self.task, self.mode, self.unit = cfg["task"], cfg["mode"], cfg["unit"]
        self.clinical = read_clinical_table(self.clinical_csv, self.task)
        self.cfg = cfg
        self.out = Path(args.out)

    def source(self) -> FeatureSource:
        c = self.cfg
        return FeatureSource(self.out, encoder=None if self.mode == "codex" else c["encoder"],
                             codex_encoder=None if self.mode == "path" else c["codex_encoder"],
                             features_dir=c.get("features_dir"), codex_features=c.get("codex_features"))

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
        tr, va, _ = build_fold(self.clinical, self.splits_dir / f"splits_{k}.csv", self.source(), self.unit,
                               self.mode, self.task, edges=None if edges is None else np.asarray(edges, float))
        return tr, va


# ----------------------------------------------------------------------------------------------------------------
# metrics


def evaluate_fold(model: torch.nn.Module, train_ds: BagDataset, val_ds: BagDataset, task: str, device: torch.device,
                  workers: int = 0) -> tuple[pd.DataFrame, dict[str, Any], pd.DataFrame]:
    """Patient-level val predictions (+ risk group), the fold's metrics and its time-dependent AUC rows."""
    from mica import survival as sv

    val = patient_table(predict(model, val_ds, device, task, workers, desc="val")[0], task)
    slides = {}
    for u in val_ds.units:
        slides.setdefault(u.case_id, []).extend(u.slides)
    val.insert(1, "slides", [";".join(slides[c]) for c in val["case_id"]])
    if task == "response":
        return val, {"auc": sv.binary_auc(val["response"], val["prob"]), "n_val": len(val)}, pd.DataFrame()
    train = patient_table(predict(model, train_ds, device, task, workers, desc="train")[0], task)
    thr = sv.median_threshold(train["risk"])
    high = val["risk"].to_numpy() > thr
    val["risk_group"] = np.where(high, "high", "low")
    times, aucs, mean_auc = sv.time_dependent_auc(train["time"], train["censorship"], val["time"],
                                                  val["censorship"], val["risk"])
    m = {"c_index": sv.c_index(val["time"], val["censorship"], val["risk"]), "td_auc_mean": mean_auc,
         "logrank_p": sv.logrank_pvalue(val["time"], val["censorship"], high), "risk_threshold": thr,
         "n_val": len(val), "n_events": int((val["censorship"] == 0).sum()), "n_high": int(high.sum())}
    return val, m, pd.DataFrame({"time": times, "auc": aucs})


def summarise(rows: list[dict[str, Any]], metric_cols: Sequence[str]) -> pd.DataFrame:
    from mica.survival import mean_sd

    df = pd.DataFrame(rows)
    stats = {c: mean_sd(df[c]) for c in metric_cols if c in df}
    extra = [{"fold": "mean", **{c: v[0] for c, v in stats.items()}},
             {"fold": "sd", **{c: v[1] for c, v in stats.items()}}]
    return pd.concat([df, pd.DataFrame(extra)], ignore_index=True)


# ----------------------------------------------------------------------------------------------------------------
# main


def check_args(args: argparse.Namespace) -> None:
    """Flag values, before anything is read or written; one :class:`PipelineError` line naming the flag."""
    for flag, value, ok, want in (("--ig-steps", args.ig_steps, args.ig_steps >= 1, ">= 1"),
                                  ("--ig-batch", args.ig_batch, args.ig_batch >= 0, ">= 0"),
                                  ("--ig-limit", args.ig_limit, args.ig_limit >= 0, ">= 0"),
                                  ("--thumbnail-size", args.thumbnail_size, args.thumbnail_size >= 16, ">= 16"),
                                  ("--workers", args.workers, args.workers >= 0, ">= 0"),
                                  ("--folds", args.folds, not args.folds or min(args.folds) >= 0, "fold indices >= 0")):
        if not ok:
            raise PipelineError(f"{flag} {value}: must be {want}")


def final_line(run_name: str, rows: list[dict[str, Any]], metric: str, ig: StageReport | None) -> str:
    """``mica.test RUN: 2 folds scored (c_index 0.70 ± 0.05); IG: 10 done, 2 skipped (already done), 0 failed``."""
    from mica.survival import mean_sd

    mean, sd = mean_sd([r[metric] for r in rows])
    line = f"mica.test {run_name}: {len(rows)} folds scored ({metric} {mean:.4f} ± {sd:.4f})"
    return line if ig is None else f"{line}; {ig.final_line('IG slides')}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate (and with ``--ig`` explain) the run; returns the summary dict also written to test/summary.json
    (``ig.failed``: {slide: reason} of the IG units that failed)."""
    from mica import survival as sv

    run_dir = Path(args.out) / "mica_runs" / args.run_name
    cfg = load_run_config(run_dir)
    inputs = RunInputs(cfg, args)
    device = resolve_device(args.device)
    folds = args.folds or cfg["folds"]
    test_dir, ig_dir = run_dir / "test", run_dir / "ig"
    for k in folds:  # every input of every fold before the first one is scored
        check_fold_files(run_dir / f"fold_{k}")
    splits = check_fold_inputs(inputs.clinical, inputs.splits_dir, list(folds), inputs.source(), inputs.mode,
                               inputs.cohort)
    settings = ig_settings(args, inputs.task, inputs.mode)
    if args.ig:
        check_ig(run_dir, {k: splits[k]["val"] for k in folds}, settings, args.overwrite)
    save_config(test_dir, args)
    rows, pooled, td_rows, ig_rows = [], [], [], []
    ig_report = StageReport() if args.ig else None
    for k in folds:
        fold_dir = run_dir / f"fold_{k}"
        model, meta = load_fold_model(fold_dir, device)
        train_ds, val_ds = inputs.fold(k, meta.get("bin_edges"))
        val, m, td = evaluate_fold(model, train_ds, val_ds, inputs.task, device, args.workers)
        val.insert(0, "fold", k)
        _write_csv(val, fold_dir / "test_predictions.csv")
        pooled.append(val)
        rows.append({"fold": str(k), **m, "epoch": meta["epoch"] + 1})
        if inputs.task == "survival":
            plots.km_plot(val["time"], val["censorship"], val["risk_group"] == "high", m["logrank_p"],
                          test_dir / f"km_fold{k}.png", title=f"fold {k}: c-index {m['c_index']:.3f}")
            td_rows += [{"fold": k, **r} for r in td.to_dict("records")]
        else:
            plots.roc_plot(val["response"], val["prob"], test_dir / f"roc_fold{k}.png", title=f"fold {k}")
        log.info("fold %d: %s", k, {a: (round(b, 4) if isinstance(b, float) else b) for a, b in m.items()})
        if args.ig:
            ig_rows += run_ig(model, meta, val_ds, k, ig_spec(run_dir, k, settings), inputs, args, device,
                              ig_report)
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
    if args.ig and ig_rows:
        ig = pd.DataFrame(ig_rows)
        _write_csv(ig, ig_dir / "ig_summary.csv")
        cohort_marker_attribution(ig_dir, ig["slide"].tolist())
        summary["ig"] |= {"max_rel_delta": float(np.nanmax(ig["delta"])),
                          "median_rel_delta": float(np.nanmedian(ig["delta"]))}
        log.info("IG: %d slides, completeness |delta| / |f(x)-f(b)|: median %.2g, max %.2g", len(ig),
                 summary["ig"]["median_rel_delta"], summary["ig"]["max_rel_delta"])
    write_json(test_dir / "summary.json", summary)
    log.info("test summary (%s):\n%s", test_dir / "summary.csv", table.to_string(index=False))
    line = final_line(args.run_name, rows, metric, ig_report)
    (log.error if ig_report is not None and ig_report.failed else log.info)("%s", line)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Run stage 09; exit code 0, 1 when an IG unit failed, 2 for a bad flag, input or output folder."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a bad flag (2, usage printed); main() returns, never exits
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_INPUT_ERROR
    run_dir = args.out / "mica_runs" / args.run_name
    try:
        check_args(args)
        load_run_config(run_dir)
        for d in (run_dir / "test", *([run_dir / "ig"] if args.ig else [])):
            ensure_writable(d, "output folder", f"check {run_dir}")
    except PipelineError as e:
        setup_logging(None)
        log.error("%s", e)
        return EXIT_INPUT_ERROR
    result: dict[str, Any] = {}
    code = run_logged(lambda: result.update(run(args)), run_dir / "test" / "test.log", args.log_level, logger=log)
    return 1 if code == 0 and result.get("ig", {}).get("failed") else code


if __name__ == "__main__":
    sys.exit(main())
