"""Setting up a HEX training run: flag defaults from the backbone's recipe, checks that run before any process group,
the inputs (split, resume checkpoint, datasets) and the model/optimiser state, fresh or restored.

Used by :mod:`hex.train`; every function raises :class:`~pipeline.errors.PipelineError` with the fix for bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from hex import backbones
from hex.checkpoint import check_same_run, find_resume, read_checkpoint, run_identity, run_outputs
from hex.data import build_dataset, load_split, marker_columns, resolve_markers_dir
from hex.data.splits import check_split_slides
from hex.evaluate import resolve_amp
from hex.losses import build_loss
from hex.model import HEX, build_from_args, load_hex_checkpoint
from hex.train_loop import make_optimizer, make_scheduler
from pipeline.dist import DistContext, broadcast_object, seed_everything
from pipeline.errors import PipelineError
from pipeline.io import ensure_writable

log = logging.getLogger("hex.train")

RECIPE_FLAGS = ("lr", "gamma", "lr_floor", "unfreeze_last", "batch_size", "lds")


def resolve_recipe(args: argparse.Namespace) -> dict[str, Any]:
    """Fill the unset :data:`RECIPE_FLAGS` of ``args`` from the backbone's recipe (pretrained when ``--weights`` or
    ``--init`` is given, else scratch); returns ``{"recipe", "values", "warning"}`` for ``config.json``.

    A backbone that expects weights run without them is a warning (logged loudly), or with ``--require-weights`` a
    PipelineError."""
    try:
        spec = backbones.get_spec(args.backbone)
    except ValueError as e:
        raise PipelineError(f"--backbone: {e}") from e
    has_weights = bool(args.weights) or args.init is not None
    recipe = spec.recipe(has_weights)
    for k in RECIPE_FLAGS:
        if getattr(args, k) is None:
            setattr(args, k, getattr(recipe, k))
    warning = None
    if spec.expects_weights and not has_weights:
        warning = (f"backbone {args.backbone!r} is meant to be fine-tuned from pretrained weights, but neither "
                   "--weights nor --init is given: it trains from random initialisation (scratch recipe: "
                   f"unfreeze_last {args.unfreeze_last}, lr {args.lr:g}) and will fall far short of the paper; pass "
                   "WEIGHTS=/path/to/model.safetensors (see README, Weights)")
        if args.require_weights:
            raise PipelineError(warning.replace("it trains", "refusing to train") + " (--require-weights)")
    return {"recipe": "pretrained" if has_weights else "scratch", "values": {k: getattr(args, k) for k in
            RECIPE_FLAGS}, "warning": warning}


# flag -> (lowest allowed value, what it is): checked before any work
_MINIMA = {"epochs": (1, "epochs"), "batch_size": (1, "patches per step"), "save_every": (1, "epochs"),
           "eval_every": (1, "epochs"), "workers": (0, "DataLoader workers"), "keep_last": (0, "checkpoints"),
           "freeze_backbone_epoch": (0, "an epoch"), "fds_buckets": (1, "buckets"),
           "max_steps_per_epoch": (1, "optimiser steps"), "global_batch_size": (1, "patches")}


def check_values(args: argparse.Namespace) -> None:
    """Flag values in range (one line naming the flag), e.g. ``--epochs 0`` or ``--lr-floor 2``."""
    for key, (lo, what) in _MINIMA.items():
        v = getattr(args, key, None)
        if v is not None and v < lo:
            raise PipelineError(f"--{key.replace('_', '-')} {v}: must be >= {lo} ({what})")
    if not args.lr > 0 or not args.gamma > 0:
        raise PipelineError(f"--lr {args.lr:g} / --gamma {args.gamma:g}: both must be > 0")
    if not 0 <= args.lr_floor <= 1 or not 0 <= args.dropout < 1:
        raise PipelineError(f"--lr-floor {args.lr_floor:g} must be in [0, 1] and --dropout {args.dropout:g} in [0, 1)")


def check_flags(args: argparse.Namespace) -> None:
    """Cheap checks of flags and files, run on every rank before the process group starts."""
    args.recipe_info = resolve_recipe(args)
    check_values(args)
    if args.overwrite and args.resume not in (None, "auto"):
        raise PipelineError(f"--overwrite starts the run afresh (deleting its checkpoints), --resume {args.resume} "
                            "continues from a checkpoint: give one of them (--overwrite --resume auto = start afresh)")
    if not args.data.is_dir():
        raise PipelineError(f"--data {args.data}: folder not found (the output root of stages 01-03, with "
                            "he_patches/ and markers/)")
    for flag, folder in (("--markers-dir", args.markers_dir), ("--patches-dir", args.patches_dir)):
        if folder is not None and not folder.is_dir():
            raise PipelineError(f"{flag} {folder}: folder not found")
    if args.resume not in (None, "auto") and not Path(args.resume).is_file():
        raise PipelineError(f"--resume {args.resume}: no such checkpoint (a checkpoints/epoch_{{k}}.pt file, or "
                            "'auto')")
    w = args.weights
    if w and not str(w).startswith(backbones.HF_HUB_PREFIX) and not Path(w).expanduser().is_file():
        raise PipelineError(f"--weights {w}: backbone weights file not found (a local .safetensors/.pth/.bin file, "
                            "or hf_hub:<repo>)")
    for flag, path in (("--init", args.init), ("--split", args.split), ("--clinical", args.clinical)):
        if path is not None and not path.is_file():
            raise PipelineError(f"{flag} {path}: file not found")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.global_batch_size and args.global_batch_size % (args.batch_size * world):
        raise PipelineError(f"--global-batch-size {args.global_batch_size} is not a multiple of batch size x world "
                            f"size = {args.batch_size} x {world}")
    kw = args.backbone_kw or {}
    args.input_size = int(args.input_size or kw.get("img_size") or kw.get("input_size")
                          or backbones.get_spec(args.backbone).input_size)


# ----------------------------------------------------------------------------------------------------------------
# inputs: split, resume checkpoint, datasets


def check_normalization_fit(markers_dir: Path, val_slides: list[str], strict: bool = False,
                            warn: bool = True) -> list[str]:
    """Validation slides whose patches were pooled into ``markers_dir/normalization.json``'s percentiles (their
    labels then leak into the training targets' scale); a warning, or an error with ``strict``. Returns them."""
    from preprocess.quantify import fit_leakage

    path = Path(markers_dir) / "normalization.json"
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


def prepare_run_dir(args: argparse.Namespace, ctx: DistContext) -> None:
    """The run folder and its ``checkpoints/`` and ``tb/`` are writable (one line naming the folder), before the log
    file is opened there and before the first epoch; ``--check`` creates nothing."""
    run_dir = args.out / "runs" / args.run
    fix = "choose another --out (OUT) or --run-name (RUN)"
    if args.check:
        p = run_dir
        while not p.exists() and p != p.parent:
            p = p.parent
        if not p.is_dir():
            raise PipelineError(f"cannot create the run folder {run_dir}: {p} is not a folder; {fix}")
        ensure_writable(p, "folder", fix)
        return
    for folder in (run_dir, run_dir / "checkpoints", run_dir / "tb"):
        ensure_writable(folder, "run folder", fix)


def check_fresh_run(args: argparse.Namespace, run_dir: Path, markers: list[str]) -> bool:
    """A fresh run (nothing to resume, no ``--overwrite``) in a folder holding an earlier run's outputs stops, so
    that one run never mixes two runs' files; returns True when those outputs are of this very run interrupted
    before its first checkpoint (``--resume auto``, same run-defining flags in ``config.json``): they are replaced."""
    found = [p for p in run_outputs(run_dir) if p.name != "test"]
    if not found:
        return False
    names = ", ".join(p.name for p in found)
    why = ""
    cfg_path = run_dir / "config.json"
    if args.resume == "auto" and cfg_path.is_file():
        try:
            old_cfg = json.loads(cfg_path.read_text())
            old, new = run_identity(old_cfg, old_cfg.get("markers") or []), run_identity(vars(args), markers)
        except (OSError, ValueError, TypeError, AttributeError):
            old, new = {}, {"unreadable": cfg_path.name}
        diff = [k for k in new if old.get(k) != new[k]]
        if not diff:
            log.warning("%s holds outputs of this run (%s) but no checkpoint to resume (interrupted before its first "
                        "--save-every epoch): starting afresh, they are replaced", run_dir, names)
            return True
        why = f" trained with other settings ({', '.join(diff)})"
    can_resume = args.resume != "auto" and any((run_dir / "checkpoints").glob("epoch_*.pt"))
    way = ("pass --resume auto to continue it, or --overwrite to start it afresh (deletes them)" if can_resume else
           "there is no checkpoint to resume: pass --overwrite to start it afresh (deletes them)")
    raise PipelineError(f"{run_dir} already holds a run{why} ({names}); {way}, or choose another --run-name (RUN)")


def load_inputs(args: argparse.Namespace, run_dir: Path, is_main: bool) -> dict[str, Any]:
    """Split (leakage-checked, every slide labelled and patched), the resume checkpoint (checked to belong to this
    run; none with ``--overwrite``), the datasets; ``replace``: the run folder's earlier outputs are to be deleted
    before the first epoch (``--overwrite``, or :func:`check_fresh_run`)."""
    # rank 0 picks the checkpoint and every rank loads that one, so ranks never resume from different epochs
    resume_path = broadcast_object(find_resume(None if args.overwrite else args.resume, run_dir)
                                   if is_main else None)
    if resume_path is not None and not Path(resume_path).is_file():
        raise PipelineError(f"resume checkpoint {resume_path} is not readable on this node; OUT must be on a "
                            "filesystem that every node sees")
    split = load_split(args.split, args.clinical, allow_unknown=args.allow_unknown_slides)
    mdir = resolve_markers_dir(args.data, args.markers_dir)
    check_split_slides([*split["train"], *split["val"]], mdir, args.patches_dir or args.data / "he_patches",
                       f"split {args.split}")
    csv = mdir / f"{split['train'][0]}.csv"
    csv_markers = marker_columns(pd.read_csv(csv, nrows=0).columns)
    check_normalization_fit(mdir, split["val"], strict=args.strict_normalization, warn=is_main)
    replace = bool(args.overwrite) and bool(run_outputs(run_dir))
    if resume_path is None and not args.overwrite and is_main:
        replace = check_fresh_run(args, run_dir, csv_markers)
    ck = None
    if resume_path is not None:
        ck = read_checkpoint(Path(resume_path))
        check_same_run(ck, vars(args), csv_markers, Path(resume_path))
        if is_main:
            log.info("resuming from %s (epoch %d done); the architecture comes from the checkpoint", resume_path,
                     ck["epoch"])
    elif args.resume == "auto" and is_main:
        log.info("--resume auto: no checkpoint in %s, starting fresh", run_dir / "checkpoints")
    markers = ck["markers"] if ck is not None else None
    train_ds = build_dataset(args.data, split["train"], markers, args.markers_dir, args.patches_dir)
    val_ds = build_dataset(args.data, split["val"], train_ds.markers, args.markers_dir, args.patches_dir)
    return {"split": split, "ck": ck, "resume_path": resume_path, "train": train_ds, "val": val_ds,
            "replace": replace}


def build_state(args: argparse.Namespace, ck: dict[str, Any] | None, num_markers: int, run_dir: Path,
                device: torch.device) -> dict[str, Any]:
    """Model, loss, optimiser, scheduler, scaler, start epoch and best score: fresh, or restored from ``ck``."""
    seed_everything(args.seed)
    if ck is not None:
        model = build_from_args(ck["model_args"], weights=None, with_fds=True)
        model.load_state_dict(ck["model"])
    else:
        model = build_model(args, num_markers)
        if args.init is not None:
            load_hex_checkpoint(model, args.init, load_fds=False)  # fresh FDS statistics for a new run
    model.to(device)
    criterion = build_loss(args.loss, num_markers).to(device)
    optimizer = make_optimizer(model, criterion, args.lr, args.weight_decay)
    scheduler = make_scheduler(optimizer, args.gamma, args.lr_floor)
    amp = resolve_amp(args.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    start_epoch, best = 0, {"pearson": -math.inf, "epoch": -1}
    if ck is not None:
        criterion.load_state_dict(ck["loss"])
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
    return {"model": model, "criterion": criterion, "optimizer": optimizer, "scheduler": scheduler, "amp": amp,
            "scaler": scaler, "start_epoch": start_epoch, "best": best}


def build_model(args: argparse.Namespace, num_markers: int) -> HEX:
    """HEX from flags; an ``--input-size`` other than the backbone's goes to its builder as ``input_size`` or
    ``img_size`` (a builder with neither keeps its size and the images are resized to ``--input-size``)."""
    fds = {"bucket_num": args.fds_buckets, "start_smooth": args.fds_start_smooth} if args.fds else None
    kw = dict(args.backbone_kw)
    common = {"weights": args.weights, "unfreeze_last": args.unfreeze_last, "fds": fds, "head_dropout": args.dropout}
    try:
        if not {"img_size", "input_size"} & set(kw) and args.input_size != backbones.get_spec(args.backbone).input_size:
            for key in ("input_size", "img_size"):
                try:
                    return HEX(args.backbone, num_markers, **common, **kw, **{key: args.input_size})
                except TypeError as e:
                    if "unexpected keyword" not in str(e):
                        raise
            log.info("backbone %s takes no input-size option; images are resized to %d", args.backbone,
                     args.input_size)
        return HEX(args.backbone, num_markers, **common, **kw)
    except (FileNotFoundError, ValueError, TypeError, RuntimeError) as e:
        raise PipelineError(f"cannot build backbone {args.backbone!r} with {kw} and weights {args.weights}: "
                            f"{e}") from e


