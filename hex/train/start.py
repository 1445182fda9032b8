"""Starting a HEX training run, fresh or resumed: the run folder (writable, not another run's), the inputs (split,
resume checkpoint, datasets) and the model/optimiser state, fresh or restored from the checkpoint.

Used by :mod:`hex.train.stage`; every function raises :class:`~pipeline.errors.PipelineError` with the fix for bad
input.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from hex import backbones
from hex.data.datasets import build_dataset, marker_columns, resolve_markers_dir
from hex.data.splits import check_split_slides, load_split
from hex.evaluate.predict import resolve_amp
from hex.losses import build_loss
from hex.model import HEX, build_from_args, load_hex_checkpoint
from hex.train.checkpoints import check_same_run, find_resume, read_checkpoint, run_identity, run_outputs
from hex.train.config import TrainConfig
from hex.train.epoch import make_optimizer, make_scheduler
from pipeline import artifacts as art
from pipeline.dist import DistContext, broadcast_object, seed_everything
from pipeline.errors import PipelineError
from pipeline.io import ensure_writable

log = logging.getLogger("hex.train")

# ----------------------------------------------------------------------------------------------------------------
# inputs: split, resume checkpoint, datasets


def check_normalization_fit(markers_dir: Path, val_slides: list[str], strict: bool = False,
                            warn: bool = True) -> list[str]:
    """Validation slides whose patches were pooled into ``markers_dir/normalization.json``'s percentiles (their
    labels then leak into the training targets' scale); a warning, or an error with ``strict``. Returns them."""
    from preprocess.quantify.normalize import fit_leakage

    path = Path(markers_dir) / art.NORMALIZATION.name
    if not path.is_file():
        return []
    leaked = fit_leakage(json.loads(path.read_text()), list(val_slides))
    if leaked:
        msg = (f"{len(leaked)} validation slides of the split were in the normalisation fit set of {path} "
               f"(e.g. {leaked[:3]}): refit with `python -m preprocess.normalize --fit-split SPLIT` (or "
               "FIT_SPLIT= in scripts/03_quantify.sh)")
        if strict:
            raise PipelineError(msg + "; --strict-normalization makes this an error")
        if warn:
            log.warning("%s", msg)
    return leaked


def prepare_run_dir(cfg: TrainConfig, ctx: DistContext) -> None:
    """The run folder and its ``checkpoints/`` and ``tb/`` are writable (one line naming the folder), before the log
    file is opened there and before the first epoch; ``--check`` creates nothing."""
    run_dir = cfg.run_dir
    fix = "choose another --out (OUT) or --run-name (RUN)"
    if cfg.check:
        p = run_dir
        while not p.exists() and p != p.parent:
            p = p.parent
        if not p.is_dir():
            raise PipelineError(f"cannot create the run folder {run_dir}: {p} is not a folder; {fix}")
        ensure_writable(p, "folder", fix)
        return
    for folder in (run_dir, run_dir / "checkpoints", run_dir / "tb"):
        ensure_writable(folder, "run folder", fix)


def check_fresh_run(cfg: TrainConfig, run_dir: Path, markers: list[str]) -> bool:
    """A fresh run (nothing to resume, no ``--overwrite``) in a folder holding an earlier run's outputs stops, so
    that one run never mixes two runs' files; returns True when those outputs are of this very run interrupted
    before its first checkpoint (``--resume auto``, same run-defining flags in ``config.json``): they are replaced."""
    found = [p for p in run_outputs(run_dir) if p.name != "test"]
    if not found:
        return False
    names = ", ".join(p.name for p in found)
    why = ""
    cfg_path = run_dir / "config.json"
    if cfg.resume == "auto" and cfg_path.is_file():
        try:
            old_cfg = json.loads(cfg_path.read_text())
            old, new = run_identity(old_cfg, old_cfg.get("markers") or []), run_identity(cfg.flags(), markers)
        except (OSError, ValueError, TypeError, AttributeError):
            old, new = {}, {"unreadable": cfg_path.name}
        diff = [k for k in new if old.get(k) != new[k]]
        if not diff:
            log.warning("%s holds outputs of this run (%s) but no checkpoint to resume (interrupted before its first "
                        "--save-every epoch): starting afresh, they are replaced", run_dir, names)
            return True
        why = f" trained with other settings ({', '.join(diff)})"
    can_resume = cfg.resume != "auto" and any((run_dir / "checkpoints").glob("epoch_*.pt"))
    way = ("pass --resume auto to continue it, or --overwrite to start it afresh (deletes them)" if can_resume else
           "there is no checkpoint to resume: pass --overwrite to start it afresh (deletes them)")
    raise PipelineError(f"{run_dir} already holds a run{why} ({names}); {way}, or choose another --run-name (RUN)")


def load_inputs(cfg: TrainConfig, run_dir: Path, is_main: bool) -> dict[str, Any]:
    """Split (leakage-checked, every slide labelled and patched), the resume checkpoint (checked to belong to this
    run; none with ``--overwrite``), the datasets; ``replace``: the run folder's earlier outputs are to be deleted
    before the first epoch (``--overwrite``, or :func:`check_fresh_run`)."""
    # rank 0 picks the checkpoint and every rank loads that one, so ranks never resume from different epochs
    resume_path = broadcast_object(find_resume(None if cfg.overwrite else cfg.resume, run_dir)
                                   if is_main else None)
    if resume_path is not None and not Path(resume_path).is_file():
        raise PipelineError(f"resume checkpoint {resume_path} is not readable on this node; OUT must be on a "
                            "filesystem that every node sees")
    split = load_split(cfg.split, cfg.clinical, allow_unknown=cfg.allow_unknown_slides)
    mdir = resolve_markers_dir(cfg.data, cfg.markers_dir)
    check_split_slides([*split["train"], *split["val"]], mdir, cfg.patches_dir or art.PATCH_STORE.dir(cfg.data),
                       f"split {cfg.split}")
    csv = mdir / f"{split['train'][0]}.csv"
    csv_markers = marker_columns(pd.read_csv(csv, nrows=0).columns)
    check_normalization_fit(mdir, split["val"], strict=cfg.strict_normalization, warn=is_main)
    replace = bool(cfg.overwrite) and bool(run_outputs(run_dir))
    if resume_path is None and not cfg.overwrite and is_main:
        replace = check_fresh_run(cfg, run_dir, csv_markers)
    ck = None
    if resume_path is not None:
        ck = read_checkpoint(Path(resume_path))
        check_same_run(ck, cfg.flags(), csv_markers, Path(resume_path))
        if is_main:
            log.info("resuming from %s (epoch %d done); the architecture comes from the checkpoint", resume_path,
                     ck["epoch"])
    elif cfg.resume == "auto" and is_main:
        log.info("--resume auto: no checkpoint in %s, starting fresh", run_dir / "checkpoints")
    markers = ck["markers"] if ck is not None else None
    # dense labels for training only: validation (model selection) scores the patch head
    train_ds = build_dataset(cfg.data, split["train"], markers, cfg.markers_dir, cfg.patches_dir,
                             dense_dir=cfg.dense_labels_dir, dense_grid=cfg.dense_grid or None)
    val_ds = build_dataset(cfg.data, split["val"], train_ds.markers, cfg.markers_dir, cfg.patches_dir)
    return {"split": split, "ck": ck, "resume_path": resume_path, "train": train_ds, "val": val_ds,
            "replace": replace}


def build_state(cfg: TrainConfig, ck: dict[str, Any] | None, num_markers: int, run_dir: Path,
                device: torch.device) -> dict[str, Any]:
    """Model, loss (and the dense loss of a dense run, else None), optimiser, scheduler, scaler, start epoch and
    best score: fresh, or restored from ``ck``."""
    seed_everything(cfg.seed)
    if ck is not None:
        model = build_from_args(ck["model_args"], weights=None, with_fds=True)
        model.load_state_dict(ck["model"])
    else:
        model = build_model(cfg, num_markers)
        if cfg.init is not None:
            load_hex_checkpoint(model, cfg.init, load_fds=False)  # fresh FDS statistics for a new run
    model.to(device)
    criterion = build_loss(cfg.loss, num_markers).to(device)
    # the dense loss: same family, its own instance (adaptive: its own alpha/scale per marker)
    dense_criterion = build_loss(cfg.loss, num_markers).to(device) if model.dense_grid else None
    optimizer = make_optimizer(model, criterion, cfg.lr, cfg.weight_decay, dense_criterion)
    scheduler = make_scheduler(optimizer, cfg.gamma, cfg.lr_floor)
    amp = resolve_amp(cfg.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    start_epoch, best = 0, {"pearson": -math.inf, "epoch": -1}
    if ck is not None:
        criterion.load_state_dict(ck["loss"])
        if dense_criterion is not None:
            dense_criterion.load_state_dict(ck["dense_loss"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        start_epoch, best = int(ck["epoch"]), dict(ck["best"])
        best_json = run_dir / "best.json"  # a better model may have been saved after this checkpoint
        if best_json.is_file():
            saved = json.loads(best_json.read_text())
            if float(saved.get("val_mean_pearson", -math.inf)) > best["pearson"]:
                best = {"pearson": float(saved["val_mean_pearson"]), "epoch": int(saved.get("epoch", -1))}
        if ck.get("backbone_frozen"):
            model.freeze_backbone()
    return {"model": model, "criterion": criterion, "dense_criterion": dense_criterion, "optimizer": optimizer,
            "scheduler": scheduler, "amp": amp, "scaler": scaler, "start_epoch": start_epoch, "best": best}


def build_model(cfg: TrainConfig, num_markers: int) -> HEX:
    """HEX from the flags; an ``--input-size`` other than the backbone's goes to its builder as ``input_size`` or
    ``img_size`` (a builder with neither keeps its size and the images are resized to ``--input-size``)."""
    fds = {"bucket_num": cfg.fds_buckets, "start_smooth": cfg.fds_start_smooth} if cfg.fds else None
    kw = dict(cfg.backbone_kw)
    common = {"weights": cfg.weights, "unfreeze_last": cfg.unfreeze_last, "fds": fds, "head_dropout": cfg.dropout,
              "dense_grid": cfg.dense_grid}
    try:
        if not {"img_size", "input_size"} & set(kw) and cfg.input_size != backbones.get_spec(cfg.backbone).input_size:
            for key in ("input_size", "img_size"):
                try:
                    return HEX(cfg.backbone, num_markers, **common, **kw, **{key: cfg.input_size})
                except TypeError as e:
                    if "unexpected keyword" not in str(e):
                        raise
            log.info("backbone %s takes no input-size option; images are resized to %d", cfg.backbone,
                     cfg.input_size)
        return HEX(cfg.backbone, num_markers, **common, **kw)
    except (FileNotFoundError, ValueError, TypeError, RuntimeError) as e:
        raise PipelineError(f"cannot build backbone {cfg.backbone!r} with {kw} and weights {cfg.weights}: "
                            f"{e}") from e


