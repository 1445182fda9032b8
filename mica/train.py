"""Train MICA (H&E bag + virtual-CODEX tokens -> survival hazards or response logit), k-fold; the paper's defaults.

One process (CPU or one GPU), the original's setting (coattn, survival, 5 folds, 20 epochs, batch 1 x accumulation
32, Adam 2e-4, weight decay 1e-5, dropout 0.25)::

    python -m mica.train --cohort COHORT --out OUT --run-name mica_coattn --encoder musk \\
        --codex-encoder dinov2_vits14_reg

Fold-parallel: one fold per process (no process group: folds are independent; fold k goes to rank k % WORLD_SIZE,
GPU LOCAL_RANK); the last process to finish writes ``summary.csv``::

    torchrun --standalone --nproc-per-node=5 -m mica.train --cohort COHORT --out OUT --run-name mica_coattn ...

Job arrays: ``--folds 3`` per job; rerun with all folds afterwards (finished folds are skipped) to get the summary.

Other modes and tasks, and the demo's CPU-sized settings::

    python -m mica.train ... --mode path          # gated-attention MIL over patches only
    python -m mica.train ... --mode codex         # the 40 CODEX tokens only
    python -m mica.train ... --task response      # one logit, BCE loss, validation AUC
    python -m mica.train --cohort COHORT --out OUT --run-name demo --encoder hex:demo_tiny --codex-encoder stats \\
        --model-dim 64 --epochs 10 --grad-accum 8 --lr 5e-4 --workers 0

Outputs under ``OUT/mica_runs/RUN/`` (written atomically): ``config.json``, ``train.log``, ``summary.csv`` (per fold
the validation c-index or AUC of the kept epoch, then ``mean`` and ``sd`` rows (sample sd)), and per fold
``fold_{k}/``: ``checkpoint.safetensors`` (model weights) + ``checkpoint.json`` (``model_args``, epoch, bin edges,
metrics, ``complete``), ``val_predictions.csv`` (``case_id,slides,time,censorship,y_bin,risk`` or
``case_id,slides,response,prob,logit``), ``history.csv`` (per-epoch losses and metric), ``tb/`` (TensorBoard).

Which epoch is kept: ``--keep last`` (default, the original's) or ``--keep best`` (highest validation c-index/AUC;
chosen on the validation fold itself, so its score is optimistic). Resume: rerunning the same command skips folds
whose ``checkpoint.json`` says ``complete``; a fold killed mid-way continues from its last finished epoch
(``fold_{k}/state.pt``: model, optimiser, RNG state, history; loaded with ``weights_only=True``) and reproduces the
uninterrupted run. Changed training settings on an existing run are an error (``--overwrite`` retrains every fold
of ``--folds`` afresh). Flags, the run folder (writable), the clinical table, every fold's split file and the
features of all their slides are checked before the first fold (exit 2, one line naming the path); the run ends
with one line: ``mica.train RUN: folds N trained, N resumed, N skipped (already done); val c_index m ± sd``.
Gradient accumulation: the optimiser steps every ``--grad-accum`` patients and once more at the end of an epoch for
the remainder (the original carried the remainder into the next epoch).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from mica.checkpoint import fold_done, save_checkpoint
from mica.checkpoint import write_csv as _write_csv
from mica.dataset import BagDataset, FeatureSource, build_fold, check_fold_inputs, read_clinical_table, split_path
from mica.predict import forward, item_loss, loader, patient_table, predict, score  # noqa: F401 - patient_table: API
from pipeline.cli import run_logged
from pipeline.dist import resolve_device, rng_state, seed_everything, set_rng_state
from pipeline.errors import EXIT_INPUT_ERROR, PipelineError
from pipeline.io import atomic_path, ensure_writable, save_config, write_json
from pipeline.logs import setup_logging

log = logging.getLogger("mica.train")

# settings that must not change when a run is resumed
RESUME_KEYS = ("mode", "task", "fusion", "model_dim", "n_bins", "bins_from", "unit", "encoder", "codex_encoder",
               "features_dir", "codex_features", "grad_accum", "lr", "weight_decay", "dropout", "alpha_surv", "seed",
               "keep", "epochs", "standardize")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mica.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--cohort", type=Path, help="cohort folder: clinical.csv and splits/splits_{k}.csv inside")
    io.add_argument("--clinical", type=Path, help="clinical CSV (default COHORT/clinical.csv)")
    io.add_argument("--splits-dir", type=Path, help="folder of splits_{k}.csv (default COHORT/splits)")
    io.add_argument("--out", type=Path, required=True, help="pipeline output root OUT (features/ and mica_runs/)")
    io.add_argument("--run-name", "--run", dest="run_name", default="mica_run", help="run folder OUT/mica_runs/RUN")
    io.add_argument("--encoder", default="musk", help="H&E encoder whose bags to use: OUT/features/{encoder}/")
    io.add_argument("--features-dir", type=Path, help="explicit H&E features folder (pt_files/, h5_files/)")
    io.add_argument("--codex-encoder", default="dinov2_vits14_reg",
                    help="CODEX encoder whose tokens to use: OUT/codex_features/{codex_encoder}.h5")
    io.add_argument("--codex-features", type=Path, help="explicit CODEX features .h5 (one (40,D) set per slide)")
    io.add_argument("--overwrite", action="store_true",
                    help="retrain every fold of --folds afresh (also done ones, also with other settings)")
    m = p.add_argument_group("model and data")
    m.add_argument("--mode", choices=("coattn", "path", "codex"), default="coattn",
                   help="coattn: CODEX tokens attend over H&E patches (the paper); path / codex: one modality")
    m.add_argument("--task", choices=("survival", "response"), default="survival",
                   help="survival: discrete-time hazards (NLL loss, c-index); response: one logit (BCE, AUC)")
    m.add_argument("--fusion", choices=("concat", "bilinear"), default="concat", help="fusion of the two branches")
    m.add_argument("--model-dim", type=int, default=256, help="hidden width d of the model")
    m.add_argument("--n-bins", type=int, default=4, help="hazard bins (quantiles of uncensored times)")
    m.add_argument("--bins-from", choices=("train", "cohort"), default="train",
                   help="bins from the training fold's uncensored times, or from the whole cohort (the original)")
    m.add_argument("--standardize", choices=("none", "codex", "path", "both"), default="none",
                   help="standardise these inputs per feature with the training fold's mean and sd (kept in the "
                        "checkpoint): codex = the CODEX tokens (the stats descriptors have very different ranges), "
                        "path = the H&E patch features (default none, as the original; on the validation cohort "
                        "codex gave no gain: README)")
    m.add_argument("--unit", choices=("patient", "slide"), default="patient",
                   help="patient: a patient's slides are one bag (concatenated patches, averaged CODEX tokens)")
    t = p.add_argument_group("optimisation (defaults: the original)")
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--grad-accum", type=int, default=32, help="patients per optimiser step (batch is 1 patient)")
    t.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate")
    t.add_argument("--weight-decay", type=float, default=1e-5, help="Adam (L2) weight decay")
    t.add_argument("--dropout", type=float, default=0.25)
    t.add_argument("--alpha-surv", type=float, default=0.0, help="weight of the uncensored term of the NLL loss")
    t.add_argument("--seed", type=int, default=1, help="fold k is seeded with seed + k")
    t.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="fold indices k of splits_{k}.csv")
    t.add_argument("--keep", choices=("last", "best"), default="last",
                   help="kept epoch: last (the original) or best validation c-index/AUC (optimistic)")
    t.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda:N")
    t.add_argument("--workers", type=int, default=2, help="DataLoader workers reading bags")
    p.add_argument("--log-level", default="INFO")
    return p


# ----------------------------------------------------------------------------------------------------------------
# data and model


def resolve_inputs(args: argparse.Namespace) -> tuple[Path, Path]:
    """(clinical CSV, splits folder) from --clinical/--splits-dir or --cohort."""
    clinical = args.clinical or (args.cohort / "clinical.csv" if args.cohort else None)
    splits = args.splits_dir or (args.cohort / "splits" if args.cohort else None)
    if clinical is None or splits is None:
        raise PipelineError("pass --cohort COHORT (or both --clinical and --splits-dir)")
    return Path(clinical), Path(splits)


def feature_source(args: argparse.Namespace) -> FeatureSource:
    return FeatureSource(args.out, encoder=None if args.mode == "codex" else args.encoder,
                         codex_encoder=None if args.mode == "path" else args.codex_encoder,
                         features_dir=args.features_dir, codex_features=args.codex_features)


def model_args_for(args: argparse.Namespace, ds: BagDataset) -> dict[str, Any]:
    """Model constructor arguments: flags plus the feature widths read from the data."""
    item = ds[0]
    return {"mode": args.mode, "task": args.task, "path_dim": int(item["path"].shape[1]) if item["path"] is not None
            else 1024, "codex_dim": int(item["codex"].shape[1]) if item["codex"] is not None else 384,
            "n_tokens": int(item["codex"].shape[0]) if item["codex"] is not None else 40, "n_bins": args.n_bins,
            "d": args.model_dim, "dropout": args.dropout, "fusion": args.fusion, "standardize": args.standardize}


# ----------------------------------------------------------------------------------------------------------------
# one fold


def train_fold(args: argparse.Namespace, fold: int, run_dir: Path, device: torch.device | str = "cpu",
               clinical: pd.DataFrame | None = None) -> dict[str, Any]:
    """Train (or resume, or skip when complete) fold ``fold``; returns its ``checkpoint.json`` metadata."""
    from mica.model import build_model

    device = torch.device(device)
    fold_dir = run_dir / f"fold_{fold}"
    done = fold_done(fold_dir)
    if done is not None:
        log.info("fold %d already done (epoch %d, %s %.4f): skipped", fold, done["epoch"] + 1, done["metric_name"],
                 done["metrics"][done["metric_name"]])
        return done
    fold_dir.mkdir(parents=True, exist_ok=True)
    clinical_csv, splits_dir = resolve_inputs(args)
    if clinical is None:
        clinical = read_clinical_table(clinical_csv, args.task)
    split_csv = split_path(splits_dir, fold)
    train_ds, val_ds, edges = build_fold(clinical, split_csv, feature_source(args), args.unit, args.mode, args.task,
                                         args.n_bins, args.bins_from)
    seed_everything(args.seed + fold)
    model = build_model(model_args_for(args, train_ds))
    if args.standardize != "none":
        model.fit_standardization(*train_ds.feature_sample(seed=args.seed + fold))
    model = model.to(device)
    margs = model.model_args
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                           weight_decay=args.weight_decay)
    metric_name = "c_index" if args.task == "survival" else "auc"
    start, history, best = 0, [], {"epoch": -1, "value": -np.inf}
    state_path = fold_dir / "state.pt"
    if state_path.is_file():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        set_rng_state(st["rng"])
        start, best = int(st["epoch"]) + 1, {"epoch": int(st["best_epoch"]), "value": float(st["best_value"])}
        history = pd.read_csv(fold_dir / "history.csv").to_dict("records")[:start]
        log.info("fold %d: resuming after epoch %d", fold, start - 1)
    meta_base = {"fold": fold, "model_args": margs, "bin_edges": None if edges is None else list(map(float, edges)),
                 "metric_name": metric_name, "task": args.task, "mode": args.mode, "unit": args.unit,
                 "encoder": args.encoder, "codex_encoder": args.codex_encoder, "split": str(split_csv),
                 "markers": train_ds.source.markers, "n_train": len(train_ds), "n_val": len(val_ds), "keep": args.keep}
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(str(fold_dir / "tb"), purge_step=start if start else None)
    accum = max(1, args.grad_accum)
    try:
        for epoch in range(start, args.epochs):
            t0 = time.time()
            model.train()
            order = np.random.default_rng([args.seed, fold, epoch]).permutation(len(train_ds))
            opt.zero_grad(set_to_none=True)
            losses = []
            bar = tqdm(loader(train_ds, order, args.workers), total=len(train_ds), leave=False,
                       desc=f"fold {fold} epoch {epoch + 1}/{args.epochs}")
            for i, item in enumerate(bar):
                loss = item_loss(forward(model, item, device), item, args.task, args.alpha_surv)
                (loss / accum).backward()
                losses.append(loss.item())
                if (i + 1) % accum == 0 or i + 1 == len(train_ds):
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                bar.set_postfix(loss=f"{np.mean(losses):.4f}", refresh=False)  # drawn at the next update
            bar.close()
            pred, val_loss = predict(model, val_ds, device, args.task, args.workers, args.alpha_surv,
                                     desc=f"fold {fold} val")
            value = score(pred, args.task)
            rec = {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val_loss, metric_name: value,
                   "seconds": time.time() - t0}
            history.append(rec)
            writer.add_scalar("train/loss", rec["train_loss"], epoch + 1)
            writer.add_scalar("val/loss", val_loss, epoch + 1)
            writer.add_scalar(f"val/{metric_name}", value, epoch + 1)
            writer.flush()
            log.info("fold %d epoch %d/%d: train loss %.4f, val loss %.4f, val %s %.4f (%.1f s)", fold, epoch + 1,
                     args.epochs, rec["train_loss"], val_loss, metric_name, value, rec["seconds"])
            improved = np.isfinite(value) and value > best["value"]
            if improved:
                best = {"epoch": epoch, "value": float(value)}
            last = epoch + 1 == args.epochs
            # best: an epoch better than all before; an all-NaN metric (e.g. no event in val) keeps the last epoch
            if (last and (args.keep == "last" or best["epoch"] < 0)) or (args.keep == "best" and improved):
                _write_csv(pred, fold_dir / "val_predictions.csv")
                save_checkpoint(fold_dir, model, {**meta_base, "epoch": epoch, "complete": False,
                                                  "metrics": {metric_name: value, "val_loss": val_loss,
                                                              "train_loss": rec["train_loss"]}})
            _write_csv(pd.DataFrame(history), fold_dir / "history.csv")
            with atomic_path(state_path) as tmp:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": rng_state(),
                            "epoch": epoch, "best_epoch": best["epoch"], "best_value": best["value"]}, tmp)
    finally:
        writer.close()
    meta = json.loads((fold_dir / "checkpoint.json").read_text())
    meta.update(complete=True, history=history, time=time.strftime("%Y-%m-%d %H:%M:%S"))
    write_json(fold_dir / "checkpoint.json", meta)
    state_path.unlink(missing_ok=True)
    log.info("fold %d done: kept epoch %d (--keep %s), val %s %.4f", fold, meta["epoch"] + 1, args.keep,
             metric_name, meta["metrics"][metric_name])
    return meta


# ----------------------------------------------------------------------------------------------------------------
# the run


def write_summary(run_dir: Path, metas: list[dict[str, Any]]) -> pd.DataFrame:
    """``summary.csv``: one row per fold (kept epoch's validation metric) + ``mean`` and ``sd`` rows."""
    from mica.survival import mean_sd

    name = metas[0]["metric_name"]
    rows = [{"fold": str(m["fold"]), name: m["metrics"][name], "val_loss": m["metrics"]["val_loss"],
             "epoch": m["epoch"] + 1, "n_train": m["n_train"], "n_val": m["n_val"]} for m in metas]
    df = pd.DataFrame(rows)
    stats = {c: mean_sd(df[c]) for c in (name, "val_loss")}
    df = pd.concat([df, pd.DataFrame([{"fold": "mean", **{c: v[0] for c, v in stats.items()}},
                                      {"fold": "sd", **{c: v[1] for c, v in stats.items()}}])], ignore_index=True)
    _write_csv(df, run_dir / "summary.csv")
    return df


def check_resume_config(run_dir: Path, args: argparse.Namespace) -> None:
    """An existing run's ``config.json`` holds the same :data:`RESUME_KEYS` (unless ``--overwrite``), else one line
    with the differences."""
    p = run_dir / "config.json"
    if not p.is_file() or args.overwrite:
        return
    try:
        old = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise PipelineError(f"cannot read {p} ({e}); pass --overwrite to retrain the run, or another "
                            "--run-name") from None
    new = {k: v for k, v in vars(args).items()}
    diff = {k: (old.get(k), str(new.get(k)) if isinstance(new.get(k), Path) else new.get(k)) for k in RESUME_KEYS
            if k in old and str(old.get(k)) != str(new.get(k))}
    if diff:
        raise PipelineError(f"run {run_dir} exists with other settings {diff} (old, new); use another --run-name or "
                            "--overwrite to retrain")


def check_args(args: argparse.Namespace) -> None:
    """Flag values, before anything is read or written; one :class:`PipelineError` line naming the flag."""
    checks = (("--epochs", args.epochs, args.epochs >= 1, ">= 1"),
              ("--grad-accum", args.grad_accum, args.grad_accum >= 1, ">= 1"),
              ("--lr", args.lr, args.lr > 0, "> 0"),
              ("--weight-decay", args.weight_decay, args.weight_decay >= 0, ">= 0"),
              ("--dropout", args.dropout, 0 <= args.dropout < 1, "in [0, 1)"),
              ("--alpha-surv", args.alpha_surv, 0 <= args.alpha_surv <= 1, "in [0, 1]"),
              ("--model-dim", args.model_dim, args.model_dim >= 1, ">= 1"),
              ("--n-bins", args.n_bins, args.n_bins >= 1, ">= 1"),
              ("--workers", args.workers, args.workers >= 0, ">= 0"),
              ("--folds", args.folds, all(k >= 0 for k in args.folds) and len(set(args.folds)) == len(args.folds),
               "distinct fold indices >= 0"))
    for flag, value, ok, want in checks:
        if not ok:
            raise PipelineError(f"{flag} {value}: must be {want}")
    if args.cohort is None and (args.clinical is None or args.splits_dir is None):
        raise PipelineError("pass --cohort COHORT (or both --clinical and --splits-dir)")
    if args.cohort is not None and not args.cohort.is_dir():
        raise PipelineError(f"cohort folder {args.cohort} does not exist; pass --cohort (clinical.csv, splits/)")


def _fold_status(fold_dir: Path) -> str:
    if fold_done(fold_dir) is not None:
        return "skipped"
    return "resumed" if (fold_dir / "state.pt").is_file() else "trained"


def final_line(run_name: str, status: dict[int, str], metas: list[dict[str, Any]] | None,
               waiting: list[int]) -> str:
    """``mica.train RUN: 2 folds trained (0, 1), 1 resumed (2), 0 skipped (already done); val c_index 0.71 ± 0.03
    over 3 folds``: this process's folds and, once every fold is done, the run's mean ± sd (sample sd)."""
    from mica.survival import mean_sd

    parts = []
    for what, label in (("trained", "trained"), ("resumed", "resumed"), ("skipped", "skipped (already done)")):
        ks = [k for k, st in status.items() if st == what]
        parts.append(f"{len(ks)} {label}" + (f" ({', '.join(map(str, ks))})" if ks else ""))
    line = f"mica.train {run_name}: folds {', '.join(parts)}"
    if metas:
        name = metas[0]["metric_name"]
        mean, sd = mean_sd([m["metrics"][name] for m in metas])
        line += f"; val {name} {mean:.4f} ± {sd:.4f} over {len(metas)} folds"
    if waiting:
        line += f"; folds {waiting} not finished yet (other processes: the last writes summary.csv)"
    return line


def run(args: argparse.Namespace) -> pd.DataFrame | None:
    """Train every fold of ``args.folds`` assigned to this process; returns the summary once all folds are done.

    Every input of every fold (clinical table, split files, the features of their slides) and the run's settings
    are checked before the first fold, so a bad input stops the run before any training."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(args.device, int(os.environ.get("LOCAL_RANK", 0)))
    run_dir = Path(args.out) / "mica_runs" / args.run_name
    clinical_csv, splits_dir = resolve_inputs(args)
    clinical = read_clinical_table(clinical_csv, args.task)
    check_fold_inputs(clinical, splits_dir, list(args.folds), feature_source(args), args.mode, args.cohort)
    check_resume_config(run_dir, args)
    if rank == 0:
        save_config(run_dir, args)
        if args.overwrite:
            stale = sorted(p.name for p in run_dir.glob("fold_*") if p.name not in {f"fold_{k}" for k in args.folds})
            if stale:
                log.warning("%s: %s stay from an earlier run (not in --folds, not retrained)", run_dir, stale)
    mine = [f for i, f in enumerate(args.folds) if i % world == rank]
    status: dict[int, str] = {}
    for fold in mine:
        if args.overwrite and (run_dir / f"fold_{fold}").exists():
            shutil.rmtree(run_dir / f"fold_{fold}")
        status[fold] = _fold_status(run_dir / f"fold_{fold}")
        train_fold(args, fold, run_dir, device, clinical)
    metas = [fold_done(run_dir / f"fold_{f}") for f in args.folds]
    waiting = [f for f, m in zip(args.folds, metas) if m is None]
    df = None
    if not waiting:
        df = write_summary(run_dir, metas)  # type: ignore[arg-type]
        log.info("summary (%s):\n%s", run_dir / "summary.csv", df.to_string(index=False))
    log.info("%s", final_line(args.run_name, status, None if waiting else metas, waiting))  # type: ignore[arg-type]
    return df


def main(argv: Sequence[str] | None = None) -> int:
    """Run stage 08; exit code 0, or 2 for a bad flag, input or output folder (one line, no traceback)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a bad flag (2, usage printed); main() returns, never exits
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_INPUT_ERROR
    rank = int(os.environ.get("RANK", 0))
    run_dir = args.out / "mica_runs" / args.run_name
    try:
        check_args(args)
        ensure_writable(run_dir, "run folder", "choose another --out or --run-name")
    except PipelineError as e:
        setup_logging(None, rank=rank)
        log.error("%s", e)
        return EXIT_INPUT_ERROR
    return run_logged(lambda: run(args), run_dir / "train.log", args.log_level, rank=rank, logger=log)


if __name__ == "__main__":
    sys.exit(main())
