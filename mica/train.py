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
whose ``checkpoint.json`` says ``complete``; a fold killed mid-way (or stopped with Ctrl-C: exit 130) continues from
its last finished epoch (``fold_{k}/state.pt``: model, optimiser, RNG state, history; loaded with
``weights_only=True``) and reproduces the uninterrupted run. A fold is done only with the inputs it was trained on
(:mod:`mica.fold_inputs`: the feature bags of its split's slides, their encoders, the CODEX features): when stage 07
rebuilt them, the fold is retrained and the log says why. Per fold, the patients and events (survival) or positives
(response) of each side are logged before training, with a warning for a validation side without events (its c-index
is undefined: often an inverted censorship column). Changed training settings on an existing run are an error
(``--overwrite`` retrains every fold of ``--folds`` afresh). Flags, the run folder (writable), the clinical table,
every fold's split file and the features of all their slides are checked before the first fold (exit 2, one line
naming the path); the run ends with one line: ``mica.train RUN: folds N trained, N resumed, N skipped (already done);
val c_index m ± sd``.
Gradient accumulation: the optimiser steps every ``--grad-accum`` patients and once more at the end of an epoch for
the remainder (the original carried the remainder into the next epoch).
"""


from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from mica.checkpoint import fold_done, save_checkpoint
from mica.checkpoint import write_csv as _write_csv
from mica.clinical import patient_outcomes, split_path
from mica.dataset import BagDataset, FeatureSource, build_fold, check_fold_inputs
from mica.fold_inputs import changed_inputs, fold_inputs
from mica.predict import forward, item_loss, loader, predict, score
from pipeline import artifacts as art
from pipeline.cli import Context, Stage, config_from_args, require
from pipeline.dist import resolve_device, rng_state, seed_everything, set_rng_state
from pipeline.errors import PipelineError
from pipeline.io import atomic_path, ensure_writable, save_config, write_json
from pipeline.tables import read_clinical_table, read_fold

log = logging.getLogger("mica.train")

@dataclass
class TrainConfig:
    """Stage 08's settings (the flags of the same names; see ``build_parser``)."""

    out: Path
    cohort: Path | None = None
    clinical: Path | None = None
    splits_dir: Path | None = None
    run_name: str = "mica_run"
    encoder: str = "musk"
    features_dir: Path | None = None
    codex_encoder: str = "dinov2_vits14_reg"
    codex_features: Path | None = None
    overwrite: bool = False
    mode: str = "coattn"
    task: str = "survival"
    fusion: str = "concat"
    model_dim: int = 256
    n_bins: int = 4
    bins_from: str = "train"
    standardize: str = "none"
    unit: str = "patient"
    epochs: int = 20
    grad_accum: int = 32
    lr: float = 2e-4
    weight_decay: float = 1e-5
    dropout: float = 0.25
    alpha_surv: float = 0.0
    seed: int = 1
    folds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    keep: str = "last"
    device: str = "auto"
    workers: int = 2
    log_level: str = "INFO"

    @property
    def run_dir(self) -> Path:
        """``OUT/mica_runs/RUN``."""
        return art.MICA_RUN.dir(self.out, run=self.run_name)


# settings that may change when a run is resumed (where things are, which folds, how fast); every other setting of
# TrainConfig changes the models and must not (:func:`check_resume_config`)
FREE_KEYS = ("out", "cohort", "clinical", "splits_dir", "run_name", "overwrite", "folds", "device", "workers",
             "log_level")
RESUME_KEYS = tuple(f.name for f in fields(TrainConfig) if f.name not in FREE_KEYS)


def config_from_record(record: Mapping[str, Any], **overrides: Any) -> TrainConfig:
    """A run's :class:`TrainConfig` from its ``config.json`` (other keys ignored; paths stay as written)."""
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**({k: v for k, v in record.items() if k in names} | overrides))


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


def make_config(args: argparse.Namespace) -> TrainConfig:
    """The flags as a :class:`TrainConfig`; a bad value stops here with one line naming the flag, before anything
    is read or written."""
    cfg = config_from_args(TrainConfig, args)
    checks = (("--epochs", cfg.epochs, cfg.epochs >= 1, ">= 1"),
              ("--grad-accum", cfg.grad_accum, cfg.grad_accum >= 1, ">= 1"),
              ("--lr", cfg.lr, cfg.lr > 0, "> 0"),
              ("--weight-decay", cfg.weight_decay, cfg.weight_decay >= 0, ">= 0"),
              ("--dropout", cfg.dropout, 0 <= cfg.dropout < 1, "in [0, 1)"),
              ("--alpha-surv", cfg.alpha_surv, 0 <= cfg.alpha_surv <= 1, "in [0, 1]"),
              ("--model-dim", cfg.model_dim, cfg.model_dim >= 1, ">= 1"),
              ("--n-bins", cfg.n_bins, cfg.n_bins >= 1, ">= 1"),
              ("--workers", cfg.workers, cfg.workers >= 0, ">= 0"),
              ("--folds", cfg.folds, all(k >= 0 for k in cfg.folds) and len(set(cfg.folds)) == len(cfg.folds),
               "distinct fold indices >= 0"))
    for flag, value, ok, want in checks:
        require(ok, f"{flag} {value}: must be {want}")
    require(cfg.cohort is not None or (cfg.clinical is not None and cfg.splits_dir is not None),
            "pass --cohort COHORT (or both --clinical and --splits-dir)")
    require(cfg.cohort is None or cfg.cohort.is_dir(),
            f"cohort folder {cfg.cohort} does not exist; pass --cohort (clinical.csv, splits/)")
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# data and model


def resolve_inputs(cfg: TrainConfig) -> tuple[Path, Path]:
    """(clinical CSV, splits folder) from --clinical/--splits-dir or --cohort."""
    clinical = cfg.clinical or (cfg.cohort / "clinical.csv" if cfg.cohort else None)
    splits = cfg.splits_dir or (cfg.cohort / "splits" if cfg.cohort else None)
    if clinical is None or splits is None:
        raise PipelineError("pass --cohort COHORT (or both --clinical and --splits-dir)")
    return Path(clinical), Path(splits)


def feature_source(cfg: TrainConfig) -> FeatureSource:
    """The run's bags: ``OUT/features/{encoder}`` and ``OUT/codex_features/{codex_encoder}.h5`` (or the explicit
    ones), each only where the mode reads it."""
    return FeatureSource(cfg.out, encoder=None if cfg.mode == "codex" else cfg.encoder,
                         codex_encoder=None if cfg.mode == "path" else cfg.codex_encoder,
                         features_dir=cfg.features_dir, codex_features=cfg.codex_features)


def model_args_for(cfg: TrainConfig, ds: BagDataset) -> dict[str, Any]:
    """Model constructor arguments: flags plus the feature widths read from the data."""
    item = ds[0]
    return {"mode": cfg.mode, "task": cfg.task, "path_dim": int(item["path"].shape[1]) if item["path"] is not None
            else 1024, "codex_dim": int(item["codex"].shape[1]) if item["codex"] is not None else 384,
            "n_tokens": int(item["codex"].shape[0]) if item["codex"] is not None else 40, "n_bins": cfg.n_bins,
            "d": cfg.model_dim, "dropout": cfg.dropout, "fusion": cfg.fusion, "standardize": cfg.standardize}


def log_response_counts(clinical: pd.DataFrame, splits: dict[int, dict[str, list[str]]]) -> None:
    """Per fold, the patients with a response value and the positives of each side (survival folds are counted by
    :func:`pipeline.tables.read_fold`); a validation side with one class is a warning (its AUC is undefined)."""
    for k, split in splits.items():
        counts = {}
        for col in ("train", "val"):
            cases = [clinical.at[s, "case_id"] for s in split[col]]
            resp = patient_outcomes(clinical, cases)["response"].dropna()
            counts[col] = (len(resp), int((resp == 1).sum()))
        line = ", ".join(f"{c} {n} patients ({p} positive)" for c, (n, p) in counts.items())
        log.info("fold %d: %s", k, line)
        n, p = counts["val"]
        if n and p in (0, n):
            log.warning("fold %d: the validation side has %s (%s): its AUC is undefined; check the response column "
                        "(1 = responder, 0 = not) or the split", k, "no positive" if p == 0 else "only positives", line)


# ----------------------------------------------------------------------------------------------------------------
# one fold


def done_with(fold_dir: Path, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """The fold's ``checkpoint.json`` when it is complete and was trained on ``inputs``, else None."""
    meta = fold_done(fold_dir)
    return meta if meta is not None and not changed_inputs(meta.get("inputs"), inputs) else None


def fold_state(fold_dir: Path, inputs: dict[str, Any]) -> tuple[str, str]:
    """(``"skipped"`` | ``"resumed"`` | ``"trained"``, why the fold must be retrained or ""): a complete fold whose
    recorded inputs (:mod:`mica.fold_inputs`) are ``inputs`` is skipped, a started one (``state.pt``) resumed; one
    done or started on other inputs is retrained (``why`` says what changed)."""
    meta = fold_done(fold_dir)
    if meta is not None:
        diff = changed_inputs(meta.get("inputs"), inputs)
        return ("trained", f"its inputs changed since it was trained: {'; '.join(diff)}") if diff else ("skipped", "")
    state_path = fold_dir / "state.pt"
    if state_path.is_file():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        diff = changed_inputs(json.loads(st["inputs"]), inputs) if "inputs" in st else []
        return ("trained", f"its inputs changed since its training started: {'; '.join(diff)}") if diff \
            else ("resumed", "")
    return "trained", ""


def train_fold(cfg: TrainConfig, fold: int, run_dir: Path, device: torch.device | str = "cpu",
               clinical: pd.DataFrame | None = None, inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train (or resume, or skip when complete with the same ``inputs``) fold ``fold``; returns its
    ``checkpoint.json`` metadata. ``inputs``: :func:`mica.fold_inputs.fold_inputs` of the fold (computed when None);
    a fold done or started on other inputs is cleared and trained afresh."""
    from mica.model import build_model

    device = torch.device(device)
    fold_dir = run_dir / f"fold_{fold}"
    clinical_csv, splits_dir = resolve_inputs(cfg)
    if clinical is None:
        clinical = read_clinical_table(clinical_csv, cfg.task)
    split_csv = split_path(splits_dir, fold)
    source = feature_source(cfg)
    if inputs is None:
        split = read_fold(split_csv, clinical)
        inputs = fold_inputs(source, cfg.mode, split["train"] + split["val"])
    state, why = fold_state(fold_dir, inputs)
    if why:
        log.info("fold %d: %s; retraining it", fold, why)
        shutil.rmtree(fold_dir)
    done = fold_done(fold_dir) if state == "skipped" else None
    if done is not None:
        log.info("fold %d already done (epoch %d, %s %.4f): skipped", fold, done["epoch"] + 1, done["metric_name"],
                 done["metrics"][done["metric_name"]])
        return done
    fold_dir.mkdir(parents=True, exist_ok=True)
    train_ds, val_ds, edges = build_fold(clinical, split_csv, source, cfg.unit, cfg.mode, cfg.task, cfg.n_bins,
                                         cfg.bins_from)
    seed_everything(cfg.seed + fold)
    model = build_model(model_args_for(cfg, train_ds))
    if cfg.standardize != "none":
        model.fit_standardization(*train_ds.feature_sample(seed=cfg.seed + fold))
    model = model.to(device)
    margs = model.model_args
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                           weight_decay=cfg.weight_decay)
    metric_name = "c_index" if cfg.task == "survival" else "auc"
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
                 "metric_name": metric_name, "task": cfg.task, "mode": cfg.mode, "unit": cfg.unit,
                 "encoder": cfg.encoder, "codex_encoder": cfg.codex_encoder, "split": str(split_csv),
                 "markers": train_ds.source.markers, "n_train": len(train_ds), "n_val": len(val_ds), "keep": cfg.keep,
                 "inputs": inputs}
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(str(fold_dir / "tb"), purge_step=start if start else None)
    accum = max(1, cfg.grad_accum)
    try:
        for epoch in range(start, cfg.epochs):
            t0 = time.time()
            model.train()
            order = np.random.default_rng([cfg.seed, fold, epoch]).permutation(len(train_ds))
            opt.zero_grad(set_to_none=True)
            losses = []
            bar = tqdm(loader(train_ds, order, cfg.workers), total=len(train_ds), leave=False,
                       desc=f"fold {fold} epoch {epoch + 1}/{cfg.epochs}")
            for i, item in enumerate(bar):
                loss = item_loss(forward(model, item, device), item, cfg.task, cfg.alpha_surv)
                (loss / accum).backward()
                losses.append(loss.item())
                if (i + 1) % accum == 0 or i + 1 == len(train_ds):
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                bar.set_postfix(loss=f"{np.mean(losses):.4f}", refresh=False)  # drawn at the next update
            bar.close()
            pred, val_loss = predict(model, val_ds, device, cfg.task, cfg.workers, cfg.alpha_surv,
                                     desc=f"fold {fold} val")
            value = score(pred, cfg.task)
            rec = {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val_loss, metric_name: value,
                   "seconds": time.time() - t0}
            history.append(rec)
            writer.add_scalar("train/loss", rec["train_loss"], epoch + 1)
            writer.add_scalar("val/loss", val_loss, epoch + 1)
            writer.add_scalar(f"val/{metric_name}", value, epoch + 1)
            writer.flush()
            log.info("fold %d epoch %d/%d: train loss %.4f, val loss %.4f, val %s %.4f (%.1f s)", fold, epoch + 1,
                     cfg.epochs, rec["train_loss"], val_loss, metric_name, value, rec["seconds"])
            improved = np.isfinite(value) and value > best["value"]
            if improved:
                best = {"epoch": epoch, "value": float(value)}
            last = epoch + 1 == cfg.epochs
            # best: an epoch better than all before; an all-NaN metric (e.g. no event in val) keeps the last epoch
            if (last and (cfg.keep == "last" or best["epoch"] < 0)) or (cfg.keep == "best" and improved):
                _write_csv(pred, fold_dir / "val_predictions.csv")
                save_checkpoint(fold_dir, model, {**meta_base, "epoch": epoch, "complete": False,
                                                  "metrics": {metric_name: value, "val_loss": val_loss,
                                                              "train_loss": rec["train_loss"]}})
            _write_csv(pd.DataFrame(history), fold_dir / "history.csv")
            with atomic_path(state_path) as tmp:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": rng_state(),
                            "epoch": epoch, "best_epoch": best["epoch"], "best_value": best["value"],
                            "inputs": json.dumps(inputs)}, tmp)
    finally:
        writer.close()
    meta = json.loads((fold_dir / "checkpoint.json").read_text())
    meta.update(complete=True, history=history, time=time.strftime("%Y-%m-%d %H:%M:%S"))
    write_json(fold_dir / "checkpoint.json", meta)
    state_path.unlink(missing_ok=True)
    log.info("fold %d done: kept epoch %d (--keep %s), val %s %.4f", fold, meta["epoch"] + 1, cfg.keep,
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


def check_resume_config(run_dir: Path, cfg: TrainConfig) -> None:
    """An existing run's ``config.json`` holds the same :data:`RESUME_KEYS` (unless ``--overwrite``), else one line
    with the differences."""
    p = run_dir / "config.json"
    if not p.is_file() or cfg.overwrite:
        return
    try:
        old = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise PipelineError(f"cannot read {p} ({e}); pass --overwrite to retrain the run, or another "
                            "--run-name") from None
    new = {k: getattr(cfg, k) for k in RESUME_KEYS}
    diff = {k: (old.get(k), str(new.get(k)) if isinstance(new.get(k), Path) else new.get(k)) for k in RESUME_KEYS
            if k in old and str(old.get(k)) != str(new.get(k))}
    if diff:
        raise PipelineError(f"run {run_dir} exists with other settings {diff} (old, new); use another --run-name or "
                            "--overwrite to retrain")


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


def run(cfg: TrainConfig, ctx: Context) -> int:
    """Train every fold of ``cfg.folds`` assigned to this process (fold-parallel: the i-th fold goes to rank
    i % WORLD_SIZE; no process group) and, once all folds are done, write ``summary.csv``; returns 0.

    Every input of every fold (clinical table, split files, the features of their slides) and the run's settings
    are checked before the first fold, so a bad input stops the run before any training."""
    device = resolve_device(cfg.device, ctx.local_rank)
    run_dir = cfg.run_dir
    clinical_csv, splits_dir = resolve_inputs(cfg)
    clinical = read_clinical_table(clinical_csv, cfg.task)
    source = feature_source(cfg)
    splits = check_fold_inputs(clinical, splits_dir, list(cfg.folds), source, cfg.mode, cfg.cohort)
    check_resume_config(run_dir, cfg)
    if ctx.is_main:
        if cfg.task == "response":
            log_response_counts(clinical, splits)
        save_config(run_dir, cfg)
        if cfg.overwrite:
            stale = sorted(p.name for p in run_dir.glob("fold_*") if p.name not in {f"fold_{k}" for k in cfg.folds})
            if stale:
                log.warning("%s: %s stay from an earlier run (not in --folds, not retrained)", run_dir, stale)
    mine = [f for i, f in enumerate(cfg.folds) if i % ctx.world_size == ctx.rank]
    inputs = {k: fold_inputs(source, cfg.mode, splits[k]["train"] + splits[k]["val"]) for k in cfg.folds}
    status: dict[int, str] = {}
    for fold in mine:
        fold_dir = run_dir / f"fold_{fold}"
        if cfg.overwrite and fold_dir.exists():
            shutil.rmtree(fold_dir)
        status[fold] = fold_state(fold_dir, inputs[fold])[0]
        train_fold(cfg, fold, run_dir, device, clinical, inputs[fold])
    # the summary waits for every fold done with these inputs (other processes may still be retraining theirs)
    metas = [done_with(run_dir / f"fold_{f}", inputs[f]) for f in cfg.folds]
    waiting = [f for f, m in zip(cfg.folds, metas) if m is None]
    if not waiting:
        df = write_summary(run_dir, metas)  # type: ignore[arg-type]
        log.info("summary (%s):\n%s", run_dir / "summary.csv", df.to_string(index=False))
    log.info("%s", final_line(cfg.run_name, status, None if waiting else metas, waiting))  # type: ignore[arg-type]
    return 0


def prepare(cfg: TrainConfig, ctx: Context) -> None:
    """The run folder is writable, before its log file opens."""
    ensure_writable(cfg.run_dir, "run folder", "choose another --out or --run-name")


STAGE = Stage("mica.train", build_parser, make_config, run=run, prepare=prepare,
              log_file=lambda cfg: cfg.run_dir / "train.log",
              resume_hint="run the same command again to resume (finished folds are skipped, a fold stopped mid-way "
                          "continues after its last finished epoch)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run stage 08; exit code 0, 2 for a bad flag, input or output folder (one line, no traceback), 130 on Ctrl-C
    (one line: rerun the same command to resume)."""
    return STAGE.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
