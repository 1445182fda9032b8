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
(cohort mean attribution per marker). Slides with an up-to-date ``ig/{slide}.h5`` are skipped unless --overwrite.
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
from tqdm.auto import tqdm

from hex.cli import run_logged
from hex.dist import resolve_device
from mica import plots
from mica.dataset import BagDataset, FeatureSource, build_fold, read_clinical_table
from mica.train import patient_table, predict
from preprocess.utils import PipelineError, atomic_path, save_config, write_json

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
    ig.add_argument("--overwrite", action="store_true", help="recompute IG files that exist")
    p.add_argument("--log-level", default="INFO")
    return p


# ----------------------------------------------------------------------------------------------------------------
# loading a run


def load_run_config(run_dir: Path) -> dict[str, Any]:
    p = run_dir / "config.json"
    if not p.is_file():
        raise PipelineError(f"{p} does not exist: is {run_dir} a mica.train run (OUT/mica_runs/RUN)?")
    return json.loads(p.read_text())


def load_fold_model(fold_dir: Path, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The kept model of a fold (strict load of ``checkpoint.safetensors``) and its ``checkpoint.json``."""
    from safetensors.torch import load_file

    from mica.model import build_model

    meta_p = fold_dir / "checkpoint.json"
    if not meta_p.is_file():
        raise PipelineError(f"{meta_p} does not exist: train this fold first (python -m mica.train ...)")
    meta = json.loads(meta_p.read_text())
    if not meta.get("complete"):
        log.warning("%s: the fold's training did not finish; evaluating the checkpoint of epoch %d", fold_dir,
                    meta["epoch"] + 1)
    model = build_model(meta["model_args"])
    state = load_file(str(fold_dir / "checkpoint.safetensors"))
    want, have = set(model.state_dict()), set(state)
    if want != have:
        raise PipelineError(f"{fold_dir / 'checkpoint.safetensors'} does not fit the model its checkpoint.json "
                            f"describes (missing {sorted(want - have)[:5]}, unexpected {sorted(have - want)[:5]}); "
                            "was it written by another version of mica.model? retrain the fold")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), meta


class RunInputs:
    """Clinical table, split files and feature source of a run (paths from its config, overridable)."""

    def __init__(self, cfg: dict[str, Any], args: argparse.Namespace):
        cohort = args.cohort or (Path(cfg["cohort"]) if cfg.get("cohort") else None)
        self.cohort = cohort
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

    def fold(self, k: int, edges: list[float] | None) -> tuple[BagDataset, BagDataset]:
        tr, va, _ = build_fold(self.clinical, self.splits_dir / f"splits_{k}.csv", self.source(), self.unit,
                               self.mode, self.task, edges=None if edges is None else np.asarray(edges, float))
        return tr, va


# ----------------------------------------------------------------------------------------------------------------
# metrics


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


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
# integrated gradients


def _thumbnail(cohort: Path | None, slide: str, size: int) -> tuple[np.ndarray | None, float | None]:
    if cohort is None or not (cohort / "he").is_dir():
        return None, None
    try:
        from preprocess.slide_io import HESlide, list_he_slides

        path = list_he_slides(cohort / "he").get(slide)
        if path is None:
            return None, None
        with HESlide(path) as s:
            return s.thumbnail(size)
    except Exception as e:  # a thumbnail is decoration: fall back to a blank canvas
        log.warning("no thumbnail for %s (%s); heatmap on a blank canvas", slide, e)
        return None, None


def _patch_size(source: FeatureSource, slide: str, coords: np.ndarray) -> int:
    ps = source.patch_size_level0(slide) if source.path_dir is not None else None
    if ps:
        return ps
    d = np.diff(np.unique(coords[:, 0])) if len(coords) else np.array([])
    return int(d[d > 0].min()) if (d > 0).any() else 224


def run_ig(model: torch.nn.Module, meta: dict[str, Any], val_ds: BagDataset, fold: int, ig_dir: Path,
           inputs: RunInputs, args: argparse.Namespace, device: torch.device, checkpoint_tag: str) -> list[dict]:
    """IG for every item of ``val_ds``: per-slide h5 + heatmap; returns per-slide summary rows."""
    from mica.attribution import integrated_gradients, read_ig_h5, split_to_slides, write_ig_h5

    rows, markers = [], meta.get("markers") or val_ds.source.markers or [f"marker_{i}" for i in range(40)]
    target = "risk" if inputs.task == "survival" else "logit"
    n = len(val_ds) if not args.ig_limit else min(len(val_ds), args.ig_limit)
    for i in tqdm(range(n), desc=f"IG fold {fold}", leave=False):
        unit = val_ds.units[i]
        files = [ig_dir / f"{s}.h5" for s in unit.slides]
        if not args.overwrite and all(f.is_file() for f in files):
            old = [read_ig_h5(f)["attrs"] for f in files]
            if all(a.get("checkpoint") == checkpoint_tag and a.get("steps") == args.ig_steps
                   and a.get("baseline") == args.ig_baseline for a in old):
                rows += [{"slide": s, **{k: a[k] for k in ("case_id", "fold", "f_x", "f_baseline", "delta_abs",
                                                           "delta")}} for s, a in zip(unit.slides, old)]
                continue
        item = val_ds[i]
        res = integrated_gradients(model, item, inputs.task, inputs.mode, args.ig_steps, args.ig_baseline,
                                   args.ig_batch or None, device)
        if np.isfinite(res["delta"]) and res["delta"] > 0.05 and res["delta_abs"] > 1e-3:
            log.warning("%s: IG completeness off by %.1f%% of f(x)-f(baseline) (raise --ig-steps)", unit.case_id,
                        100 * res["delta"])
        for slide, a in split_to_slides(res, item, len(markers)).items():
            attrs = {"baseline": args.ig_baseline, "steps": args.ig_steps, "delta": res["delta"],
                     "delta_abs": res["delta_abs"], "f_x": res["f_x"], "f_baseline": res["f_baseline"],
                     "target": target, "markers": list(markers), "case_id": unit.case_id, "fold": fold,
                     "slides_of_patient": list(unit.slides), "checkpoint": checkpoint_tag}
            write_ig_h5(ig_dir / f"{slide}.h5", a["coords"], a["path_attr"], a["codex_attr"], attrs)
            if len(a["path_attr"]) and (a["coords"] >= 0).all():
                thumb, ds = _thumbnail(inputs.cohort, slide, args.thumbnail_size)
                plots.heatmap_plot(a["coords"], a["path_attr"], ig_dir / f"{slide}_heatmap.png",
                                   _patch_size(val_ds.source, slide, a["coords"]), thumb, ds,
                                   title=f"{slide} ({target}; fold {fold})")
            rows.append({"slide": slide, "case_id": unit.case_id, "fold": fold, "f_x": res["f_x"],
                         "f_baseline": res["f_baseline"], "delta_abs": res["delta_abs"], "delta": res["delta"]})
    return rows


def cohort_marker_attribution(ig_dir: Path, slides: Sequence[str]) -> pd.DataFrame | None:
    """Mean / sd / mean |.| of ``codex_attr`` per marker over ``slides``; CSV + bar PNG in ``ig_dir``."""
    from mica.attribution import read_ig_h5

    arrs, markers = [], None
    for s in slides:
        d = read_ig_h5(ig_dir / f"{s}.h5")
        if np.isfinite(d["codex_attr"]).all():
            arrs.append(d["codex_attr"])
            markers = d["attrs"]["markers"]
    if not arrs:
        return None
    a = np.stack(arrs)
    df = pd.DataFrame({"marker": markers, "mean": a.mean(0), "sd": a.std(0, ddof=1) if len(a) > 1 else 0.0,
                       "mean_abs": np.abs(a).mean(0), "n_slides": len(a)})
    _write_csv(df, ig_dir / "codex_attribution.csv")
    plots.marker_bar_plot(list(markers), df["mean"].to_numpy(), df["sd"].to_numpy(),
                          ig_dir / "codex_attribution_bar.png")
    return df


# ----------------------------------------------------------------------------------------------------------------
# main


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate (and with ``--ig`` explain) the run; returns the summary dict also written to test/summary.json."""
    from mica import survival as sv

    run_dir = Path(args.out) / "mica_runs" / args.run_name
    cfg = load_run_config(run_dir)
    inputs = RunInputs(cfg, args)
    device = resolve_device(args.device)
    folds = args.folds or cfg["folds"]
    test_dir, ig_dir = run_dir / "test", run_dir / "ig"
    save_config(test_dir, args)
    rows, pooled, td_rows, ig_rows = [], [], [], []
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
            st = (fold_dir / "checkpoint.safetensors").stat()
            tag = f"{fold_dir / 'checkpoint.safetensors'}:{st.st_size}:{int(st.st_mtime)}"
            ig_rows += run_ig(model, meta, val_ds, k, ig_dir, inputs, args, device, tag)
    allv = pd.concat(pooled, ignore_index=True)
    summary: dict[str, Any] = {"run": str(run_dir), "task": inputs.task, "mode": inputs.mode, "folds": folds}
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
    if args.ig and ig_rows:
        ig = pd.DataFrame(ig_rows)
        _write_csv(ig, ig_dir / "ig_summary.csv")
        cohort_marker_attribution(ig_dir, ig["slide"].tolist())
        summary["ig"] = {"slides": len(ig), "max_rel_delta": float(np.nanmax(ig["delta"])),
                         "median_rel_delta": float(np.nanmedian(ig["delta"]))}
        log.info("IG: %d slides, completeness |delta| / |f(x)-f(b)|: median %.2g, max %.2g", len(ig),
                 summary["ig"]["median_rel_delta"], summary["ig"]["max_rel_delta"])
    write_json(test_dir / "summary.json", summary)
    log.info("test summary (%s):\n%s", test_dir / "summary.csv", table.to_string(index=False))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run_dir = args.out / "mica_runs" / args.run_name
    log_file = run_dir / "test" / "test.log" if run_dir.is_dir() else None
    return run_logged(lambda: run(args), log_file, args.log_level, logger=log)


if __name__ == "__main__":
    sys.exit(main())
