"""Train HEX (H&E patch -> M CODEX marker intensities) with DDP.

One process (CPU, or one GPU)::

    python -m hex.train --data OUT --split COHORT/splits/splits_0.csv --clinical COHORT/clinical.csv \\
        --out OUT --run-name hex_musk --backbone musk --weights /models/musk/model.safetensors

One node, 4 GPUs (``--batch-size`` is per process: global batch = 4 x 48 = 192; ``--standalone`` picks a free port,
so two jobs on one node do not collide)::

    torchrun --standalone --nproc-per-node=4 -m hex.train --device cuda --data OUT --split ... --run-name hex_musk

Two nodes x 8 GPUs (run on both; NODE_RANK 0 on the master)::

    torchrun --nnodes=2 --nproc-per-node=8 --node-rank=$NODE_RANK --rdzv-backend=c10d \\
        --rdzv-endpoint=$MASTER_ADDR:29500 --rdzv-id=hex -m hex.train --run-name hex_musk --resume auto ...

Under torchrun name the run with ``--run-name`` (torchrun reads ``--run`` after the module name as its own
``--run-path``). ``--check`` validates flags and inputs without training (the stage script runs it before torchrun,
so a bad input stops at once instead of failing on every rank and being retried by ``--max-restarts``).

Training defaults follow the backbone (``hex.backbones.get_spec(name).recipe(has_weights)``): with pretrained
``--weights`` (or ``--init``) the paper's recipe (MUSK: last 4 blocks + final norm, Adam lr 1e-5 for every group,
ExponentialLR 0.95 per epoch, batch 48); without weights every block trains at a larger lr whose decay stops at a
floor (``tiny``: lr 1e-3, floor 1e-4, batch 32, LDS weights: visible-marker mean r ~0.8 on the 12-slide sample
cohort in 40 epochs, ~3 min on 2 CPU cores). Any of ``--lr --gamma --lr-floor --unfreeze-last --batch-size
--lds`` overrides its recipe value. A backbone meant to be fine-tuned (``musk``, ``dinov2_vits14_reg``, ``timm:``)
without weights is warned about in the log and in ``config.json`` (``--require-weights``: an error).

Resume: ``--resume auto`` continues from the newest ``checkpoints/epoch_{k}.pt`` of the run (model, optimiser,
scheduler, scaler, loss parameters, FDS statistics, RNG states of every rank, best score). Flags that define the
run (``hex.train.checkpoints.RUN_KEYS``: backbone, weights, trainable blocks, input size, split, markers, loss,
FDS) must match the checkpoint's, else the run stops naming the keys (a fold's split file is one of them:
``FOLD=1`` with fold 0's ``RUN`` stops naming both split files). ``--keep-last K`` deletes all but the newest K. A
fresh run (no checkpoint to resume) in a run folder that holds another run's outputs stops instead of writing over them;
``--overwrite`` starts the run afresh: it deletes the folder's ``checkpoints/``, ``best.*``, ``tb/``, ``config*.json``
and ``test/`` (after every check passed, before the first epoch). ``--overwrite --resume auto`` = start afresh;
``--overwrite`` with a ``--resume`` path is refused. Before the first epoch the run folder, ``checkpoints/`` and
``tb/`` are checked writable (one line naming the folder).

Dense head (``--dense-grid G``): a second head on the backbone's spatial tokens (tiny: the stride-16 map; DINOv2:
the 16x16 patch tokens; MUSK: the 24x24 patch tokens; timm: the feature map) predicts the 40 markers on a G x G
grid of cells inside each patch, trained jointly with the patch head on the dense labels of stage 03
(``DATA/markers_dense/{slide}.h5``, made with the same ``--dense-grid``): loss = patch loss + ``--dense-weight`` x
dense loss (same ``--loss`` family, its own instance: per-marker alpha/scale for ``adaptive``; cells without CODEX
(NaN) masked out). Flips, rot90 and ``--rotation`` move the dense labels with their image. Model selection
(``best.*``) stays on the validation patch-level Pearson r. ``--init`` with a patch-level model fine-tunes it into a
dense one (the dense head starts from its initialisation). TensorBoard: ``train/loss_patch``, ``train/loss_dense``.

Stain robustness: ``--stain-aug S`` perturbs each training patch's haematoxylin, eosin and DAB amounts (colour
deconvolution with the Ruifrok-Johnston matrix; scale U[1-S, 1+S], shift U[-S/4, S/4] optical density; Tellez et al.
2018) before the colour jitter; the default comes from the backbone's recipe (``tiny``: see
``hex/backbones/tiny.py``). ``--stain-norm macenko|reinhard --stain-target PNG`` fits a stain normalisation
(torchstain) on the target image once and normalises every patch to it, in training and validation; the fitted
parameters are recorded in ``config.json`` (``stain_norm_fit``), ``best.json`` and the checkpoints (``stain_norm``),
and ``hex.test``, ``hex.infer_wsi`` and ``mica.extract_features --encoder hex:RUN`` apply the recorded
normalisation themselves (no flag to repeat).

Global batch: each optimiser step sees ``batch_size x world_size x grad_accum`` patches; ``--global-batch-size``
sets the accumulation (it must divide). The learning rate is not rescaled.

On a CPU shared with other jobs, export ``OMP_WAIT_POLICY=PASSIVE`` (or ``OMP_NUM_THREADS=1``): spinning OpenMP
threads otherwise make a 2-core step up to 20x slower.

Outputs under ``OUT/runs/RUN/`` (rank 0 writes, atomically): ``config.json``, ``train.log``, ``tb/`` (TensorBoard:
train loss, lr, per-marker val MSE and Pearson r), ``checkpoints/epoch_{k}.pt`` (every ``--save-every`` epochs and
the last), ``best.safetensors`` + ``best.json`` (highest validation mean Pearson r; a marker whose prediction
collapsed to a constant counts as r = 0). ``best.json`` (and the checkpoints) record the split file and its
``train_slides``/``val_slides``: ``hex.test`` refuses to score the training slides. The last line of the log says
how many epochs ran, the best epoch and score, and where the model is.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from hex import backbones
from hex.data.stain import METHODS
from hex.data.transforms import BatchTransform
from hex.evaluate.metrics import mse as mse_per_marker
from hex.evaluate.predict import predict_distributed
from hex.losses import LOSSES
from hex.model import HEX
from hex.train.checkpoints import (
    BEST_MODEL,
    prune_checkpoints,
    remove_run_outputs,
    save_best,
    save_checkpoint,
    training_state,
)
from hex.train.config import TrainConfig, make_config
from hex.train.epoch import TrainStep, loss_stats, selection_score, train_one_epoch, wrap_ddp
from hex.train.start import build_state, load_inputs, prepare_run_dir
from pipeline.cli import Stage
from pipeline.dist import (
    DistContext,
    all_gather_objects,
    barrier,
    broadcast_buffers,
    fail_together,
    rng_state,
    seed_everything,
    set_rng_state,
)
from pipeline.io import ensure_writable, save_config

log = logging.getLogger("hex.train")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hex.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, type=Path, help="data root holding he_patches/ and markers/ (usually OUT)")
    g.add_argument("--markers-dir", type=Path, help="label CSV folder (default DATA/markers)")
    g.add_argument("--patches-dir", type=Path, help="patch folder (default DATA/he_patches)")
    g.add_argument("--split", required=True, type=Path, help="split CSV with train,val columns of slide ids")
    g.add_argument("--clinical", type=Path, help="clinical.csv (case_id,slide_id): patient overlap check")
    g.add_argument("--allow-unknown-slides", action="store_true",
                   help="split slides missing from --clinical count as their own patient (default: an error)")
    g.add_argument("--strict-normalization", action="store_true",
                   help="stop (instead of warning) when validation slides were in the normalisation fit set")
    g.add_argument("--workers", type=int, default=4, help="DataLoader worker processes per rank")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, type=Path, help="output root OUT; the run goes to OUT/runs/RUN")
    g.add_argument("--run-name", "--run", dest="run", default="hex",
                   help="run name (under torchrun spell it --run-name: torchrun takes --run for its own --run-path)")
    g.add_argument("--save-every", type=int, default=5, help="checkpoint every k epochs (and after the last)")
    g.add_argument("--keep-last", type=int, default=0, metavar="K",
                   help="keep only the newest K epoch checkpoints (0 = all; a MUSK checkpoint is ~1.5 GB)")
    g.add_argument("--eval-every", type=int, default=1, help="validate every k epochs (and after the last)")
    g.add_argument("--resume", help="checkpoint path, or 'auto' = newest checkpoints/epoch_{k}.pt of the run (none: "
                                    "start fresh); its run-defining flags must match")
    g.add_argument("--overwrite", action="store_true",
                   help="start the run afresh: delete its checkpoints/, best.*, tb/, config*.json and test/ first "
                        "(with --resume auto: start afresh; with a --resume path: refused)")
    g.add_argument("--check", action="store_true", help="check flags and inputs (split, labels, patch stores, "
                   "resume checkpoint, device, writable run folder), write nothing, exit 0 or 2")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default="musk",
                   help=f"backbone: {', '.join(backbones.list_backbones())} or timm:<name>")
    g.add_argument("--backbone-kw", type=json.loads, default={},
                   help='JSON builder options, e.g. \'{"embed_dim": 64, "depth": 2, "num_heads": 4, "mlp_dim": 128, '
                        '"img_size": 64}\' for a tiny MUSK')
    g.add_argument("--weights", help="backbone weights: local .safetensors/.pth/.bin or hf_hub:<repo>")
    g.add_argument("--require-weights", action="store_true",
                   help="a backbone meant to be fine-tuned (musk, dinov2_vits14_reg, timm:) without --weights/--init "
                        "is an error instead of a warning")
    g.add_argument("--init", type=Path, help="initialise from a HEX checkpoint (ours or original; heads-only ok)")
    g.add_argument("--input-size", type=int, help="input side in pixels (default: the backbone's, 384 for musk)")
    g.add_argument("--unfreeze-last", type=int, help="trainable last backbone blocks (+ final norm); -1 = all, "
                   "0 = heads only (default: the backbone's recipe; paper 4)")
    g.add_argument("--freeze-backbone-epoch", type=int, default=100,
                   help="from this epoch only the heads train (backbone in eval mode)")
    g.add_argument("--dropout", type=float, default=0.5, help="head dropout")
    g.add_argument("--color-jitter", type=float, nargs=4, default=(0.1, 0.1, 0.1, 0.01),
                   metavar=("B", "C", "S", "H"), help="training colour jitter (0 0 0 0 = off)")
    g.add_argument("--no-flips", action="store_true", help="no flip/rot90 augmentation")
    g.add_argument("--rotation", type=float, default=0.0, metavar="DEG",
                   help="also rotate by a uniform angle in [-DEG, DEG] degrees (original code: 90; default 0 = only "
                        "the 8 flip/rot90 symmetries)")
    g.add_argument("--interpolation", choices=("bilinear", "bicubic"), default="bilinear",
                   help="resize to the input size (original HEX code: bilinear; MUSK pre-training: bicubic)")
    g = p.add_argument_group("stain robustness (see above)")
    g.add_argument("--stain-aug", type=float, metavar="S",
                   help="HED stain augmentation strength: per patch and stain (H, E, DAB) amounts scaled by U[1-S, "
                        "1+S] and shifted by U[-S/4, S/4] optical density; 0 = off (default: the backbone's recipe)")
    g.add_argument("--stain-norm", choices=METHODS, default="none",
                   help="normalise every patch's stains to --stain-target (Macenko or Reinhard, torchstain); recorded "
                        "in the run and applied the same way by hex.test, hex.infer_wsi and mica.extract_features")
    g.add_argument("--stain-target", type=Path, metavar="PNG",
                   help="target for --stain-norm: an RGB H&E tissue region (e.g. 1024 x 1024 px at 0.5 µm/px), or a "
                        "well-stained training slide's patch store OUT/he_patches/{slide}.h5 (a 4 x 4 mosaic of its "
                        "patches is the target; default: the split's first training slide's)")
    g.add_argument("--stain-cache-mb", type=float, default=2048, metavar="MIB",
                   help="with --stain-norm: keep up to this many MiB of normalised patches in memory per process "
                        "(training and validation each; a 224-px patch is 147 KiB), so each patch is normalised once, "
                        "not once per epoch (~15 ms a patch on one core); 0 = off. Does not change results")
    g = p.add_argument_group("optimisation (unset: the backbone's recipe, see above)")
    g.add_argument("--epochs", type=int, default=120)
    g.add_argument("--batch-size", type=int, help="patches per step per process (paper 48)")
    g.add_argument("--global-batch-size", type=int, help="fix the global batch: sets gradient accumulation")
    g.add_argument("--lr", type=float, help="Adam lr of backbone, heads and loss parameters (paper 1e-5)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--gamma", type=float, help="lr factor per epoch (paper 0.95)")
    g.add_argument("--lr-floor", type=float, help="the lr never decays below this fraction of --lr (paper 0)")
    g.add_argument("--loss", choices=LOSSES, default="adaptive")
    g.add_argument("--fds", action=argparse.BooleanOptionalAction, default=True,
                   help="feature distribution smoothing over the 128-d head features")
    g.add_argument("--fds-buckets", type=int, default=50)
    g.add_argument("--fds-start-smooth", type=int, default=10, help="first epoch that smooths features")
    g.add_argument("--fds-stop-epoch", type=int, default=50, help="FDS off from this epoch")
    g.add_argument("--lds", action=argparse.BooleanOptionalAction, help="label distribution smoothing loss weights")
    g.add_argument("--amp", choices=("auto", "fp16", "bf16", "none"), default="auto",
                   help="autocast on CUDA (auto: bf16 if supported else fp16 + GradScaler); never on CPU")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda (cuda where torch sees no GPU: an error)")
    g.add_argument("--find-unused-parameters", action="store_true", help="DDP option for backbones with "
                   "trainable parameters outside the forward path")
    g.add_argument("--max-steps-per-epoch", type=int, help="cap optimiser steps per epoch (smoke tests)")
    g = p.add_argument_group("dense head (cell-scale markers; see above)")
    g.add_argument("--dense-grid", type=int, default=0, metavar="G",
                   help="add a dense head predicting every marker on a G x G grid of cells per patch (16: 14 px = "
                        "7 um cells at 20x), trained on stage 03's dense labels (made with --dense-grid G); 0 = off")
    g.add_argument("--dense-weight", type=float, default=1.0, metavar="W",
                   help="loss = patch loss + W x dense loss (the --loss family per cell and marker, NaN cells "
                        "masked out)")
    g.add_argument("--dense-dir", type=Path, help="dense label folder (default DATA/markers_dense)")
    return p


# ----------------------------------------------------------------------------------------------------------------
# the stage


def run(cfg: TrainConfig, ctx: DistContext) -> int:
    """The stage body: ``--check`` stops after the inputs; else the inputs and the model state (fresh or resumed),
    the earlier run's outputs removed with ``--overwrite``, then the epochs (:func:`train`)."""
    run_dir = cfg.run_dir
    if cfg.check:
        inputs = load_inputs(cfg, run_dir, True)
        log.info("check passed: %d train / %d val patches, %s", len(inputs["train"]), len(inputs["val"]),
                 f"resume from {inputs['resume_path']}" if inputs["resume_path"] else "fresh run")
        return 0
    if cfg.recipe_info["warning"] and ctx.is_main:
        log.warning("!!! %s", cfg.recipe_info["warning"])
    with fail_together():
        inputs = load_inputs(cfg, run_dir, ctx.is_main)
        state = build_state(cfg, inputs["ck"], len(inputs["train"].markers), run_dir, ctx.device)
        if inputs["replace"] and ctx.is_main:  # every check passed: now the earlier run's outputs go
            gone = remove_run_outputs(run_dir)
            log.info("--overwrite: removed %s of the earlier run in %s", ", ".join(p.name for p in gone), run_dir)
            ensure_writable(run_dir / "checkpoints", "run folder")
    barrier()
    try:
        if state["start_epoch"] >= cfg.epochs:
            log.info("hex.train: run %s already finished (%d of %d epochs), nothing to do; best model %s; raise "
                     "--epochs to train on, or pass --overwrite to start afresh", run_dir, state["start_epoch"],
                     cfg.epochs, run_dir / BEST_MODEL)
            return 0
        return train(cfg, ctx, run_dir, inputs, state)
    finally:
        inputs["train"].close()
        inputs["val"].close()


def train(cfg: TrainConfig, ctx: DistContext, run_dir: Path, inputs: dict[str, Any],
          state: dict[str, Any]) -> int:
    """The epochs from ``state["start_epoch"]`` to ``cfg.epochs``: train, validate every ``eval_every`` epochs
    (``best.*`` on a better score), checkpoint every ``save_every``; the last line says what ran and where the
    model is."""
    rank, world, device, is_main = ctx.rank, ctx.world_size, ctx.device, ctx.is_main
    train_ds, val_ds, ck = inputs["train"], inputs["val"], inputs["ck"]
    model, criterion, optimizer, scheduler, scaler, amp = (state[k] for k in ("model", "criterion", "optimizer",
                                                                              "scheduler", "scaler", "amp"))
    dense_criterion = state.get("dense_criterion")
    start_epoch, best, m = state["start_epoch"], state["best"], len(train_ds.markers)
    accum = cfg.global_batch_size // (cfg.batch_size * world) if cfg.global_batch_size else 1
    lds_w = None
    if cfg.lds:
        from hex.fds import lds_weights

        lds_w = torch.as_tensor(np.asarray(lds_weights(torch.from_numpy(train_ds.labels))), dtype=torch.float32)
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    train_loader = DataLoader(
        train_ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
        pin_memory=device.type == "cuda", drop_last=len(sampler) % cfg.batch_size == 1,  # no 1-sample BN batch
        persistent_workers=cfg.workers > 0, prefetch_factor=4 if cfg.workers > 0 else None,
        generator=torch.Generator().manual_seed(cfg.seed))  # own RNG: loader never touches the global one
    input_size = int(ck["input_size"]) if ck is not None else cfg.input_size
    interpolation = ck.get("interpolation", "bilinear") if ck is not None else cfg.interpolation
    stain = stain_record(cfg, ck, is_main)
    train_tf = BatchTransform(input_size, model.mean, model.std, train=True, jitter=tuple(cfg.color_jitter),
                              flips=not cfg.no_flips, interpolation=interpolation, rotation=cfg.rotation,
                              stain_aug=cfg.stain_aug, stain_norm=stain, stain_cache_mb=cfg.stain_cache_mb)
    val_tf = BatchTransform(input_size, model.mean, model.std, train=False, interpolation=interpolation,
                            stain_norm=stain, stain_cache_mb=cfg.stain_cache_mb)
    config = cfg.flags()
    if is_main:
        n_tr = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("%d train patches (%d slides), %d val patches (%d slides), %d markers", len(train_ds),
                 len(inputs["split"]["train"]), len(val_ds), len(inputs["split"]["val"]), m)
        if model.dense_grid:
            log.info("dense head: %dx%d cells per patch from %d-channel tokens, labels %s, loss = patch + %g x dense "
                     "(model selection: validation patch-level r)", model.dense_grid, model.dense_grid,
                     model.visual.token_dim, cfg.dense_labels_dir, cfg.dense_weight)
        log.info("backbone %s (%s recipe): %.2fM params, %.2fM trainable; input %d px; %d rank(s) on %s; amp %s; "
                 "lr %g (x%g per epoch, floor %g); global batch %d = %d x %d ranks x %d accumulation",
                 model.model_args["backbone_name"], cfg.recipe_info["recipe"],
                 sum(p.numel() for p in model.parameters()) / 1e6, n_tr / 1e6, input_size, world, device, amp,
                 cfg.lr, cfg.gamma, cfg.lr_floor, cfg.batch_size * world * accum, cfg.batch_size, world, accum)
        saved = {**config, "world_size": world, "grad_accum": accum, "global_batch": cfg.batch_size * world * accum,
               "input_size": input_size, "markers": train_ds.markers, "model_args": model.model_args,
               "resumed_from": inputs["resume_path"], "n_train": len(train_ds), "n_val": len(val_ds),
               "recipe": cfg.recipe_info, "warnings": [w for w in [cfg.recipe_info["warning"]] if w],
               "stain_norm_fit": stain}
        save_config(run_dir, saved, name="config.json" if ck is None else f"config_resume_epoch{start_epoch}.json")
    writer = None
    if is_main:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_epoch + 1 if start_epoch else None)
    # restore RNG last: nothing random may run between here and the first epoch in a fresh run either
    if ck is not None and len(ck.get("rng", [])) == world:
        set_rng_state(ck["rng"][rank])
    else:
        if ck is not None and is_main:
            log.warning("checkpoint RNG states are from %d ranks, now %d: reseeding", len(ck.get("rng", [])), world)
        seed_everything(cfg.seed + 1000 * rank + start_epoch)

    step = TrainStep(model, criterion, dense_criterion, cfg.dense_weight)
    ddp = wrap_ddp(step, ctx, cfg.find_unused_parameters)
    meta = {"markers": train_ds.markers, "normalization": train_ds.normalization, "model_args": model.model_args,
            "input_size": input_size, "interpolation": interpolation, "mean": list(model.mean),
            "std": list(model.std), "stain_norm": stain, "split": str(Path(cfg.split).resolve()),
            "train_slides": list(inputs["split"]["train"]), "val_slides": list(inputs["split"]["val"])}
    for epoch in range(start_epoch, cfg.epochs):
        if epoch >= cfg.freeze_backbone_epoch and not model.backbone_frozen:
            if is_main:
                log.info("epoch %d: freezing the backbone (only the heads train from now on)", epoch)
            model.freeze_backbone()
            del ddp
            gc.collect()
            ddp = wrap_ddp(step, ctx, cfg.find_unused_parameters)
        fds_on = model.fds is not None and epoch < cfg.fds_stop_epoch
        model.fds_active = fds_on
        collect_fds = fds_on and epoch >= int(getattr(model.fds, "start_update", 0))
        sampler.set_epoch(epoch)
        t0 = time.time()
        tr = train_one_epoch(ddp, step, optimizer, scaler, train_loader, train_tf, lds_w, epoch, accum, amp, device,
                             collect_fds, cfg.max_steps_per_epoch, is_main)
        if collect_fds:
            model.fds.update_running_stats(tr.pop("fds_feats"), tr.pop("fds_labels"), epoch)
            model.fds.update_last_epoch_stats(epoch + 1)
        broadcast_buffers(model, skip_prefixes=("fds.",))
        lr = optimizer.param_groups[0]["lr"]  # the lr this epoch trained with
        scheduler.step()
        train_time = time.time() - t0
        if is_main:
            writer.add_scalar("train/loss", tr["loss"], epoch + 1)
            writer.add_scalar("train/lr", lr, epoch + 1)
            writer.add_scalar("train/samples_per_s", tr["samples"] / train_time, epoch + 1)
            for k, v in loss_stats(criterion).items():
                writer.add_scalar(f"train/loss_{k}", v, epoch + 1)
            if "loss_dense" in tr:
                writer.add_scalar("train/loss_patch", tr["loss_patch"], epoch + 1)
                writer.add_scalar("train/loss_dense", tr["loss_dense"], epoch + 1)
                for k, v in loss_stats(dense_criterion).items():
                    writer.add_scalar(f"train/loss_dense_{k}", v, epoch + 1)
        last = epoch + 1 == cfg.epochs
        if (epoch + 1) % cfg.eval_every == 0 or last:
            score = validate(model, val_ds, val_tf, ctx, cfg, amp, epoch, writer, tr, train_time)
            # the first evaluated epoch always writes best.* (even when every r is undefined), later ones must beat it
            if score["score"] > best["pearson"] or best["epoch"] < 0:
                best = {"pearson": score["score"], "epoch": epoch + 1}
                if is_main:
                    save_best(run_dir, model, {**meta, "epoch": epoch + 1, "val_mean_pearson": score["score"],
                                               "val_mean_mse": score["mse"], "val_collapsed": score["collapsed"],
                                               "val_pearson": dict(zip(val_ds.markers, map(float, score["r"])))})
        elif is_main:
            log.info("epoch %d/%d: train loss %.4f%s (%.0f samples/s)", epoch + 1, cfg.epochs, tr["loss"],
                     _dense_text(tr, cfg.dense_weight), tr["samples"] / train_time)
        if (epoch + 1) % cfg.save_every == 0 or last:
            rngs = all_gather_objects(rng_state())
            if is_main:
                save_checkpoint(run_dir / "checkpoints" / f"epoch_{epoch + 1}.pt",
                                training_state(model, optimizer, scheduler, scaler, criterion, epoch + 1, rngs, best,
                                               world, config, meta, dense_criterion))
                prune_checkpoints(run_dir / "checkpoints", cfg.keep_last)
        barrier()
    if writer is not None:
        writer.close()
    if is_main:
        last_ck = run_dir / "checkpoints" / f"epoch_{cfg.epochs}.pt"
        log.info("hex.train: %d epochs run (%d-%d of %d), best val mean Pearson r %.4f at epoch %d -> %s; last "
                 "checkpoint %s", cfg.epochs - start_epoch, start_epoch + 1, cfg.epochs, cfg.epochs,
                 best["pearson"], best["epoch"], run_dir / BEST_MODEL, last_ck)
    return 0


def validate(model: HEX, val_ds: Any, val_tf: BatchTransform, ctx: DistContext, cfg: TrainConfig,
             amp: torch.dtype | None, epoch: int, writer: Any, tr: dict[str, Any], train_time: float) -> dict[str, Any]:
    """Predict the validation patches (all ranks), score them (:func:`hex.train.epoch.selection_score`) and log."""
    pred = predict_distributed(model, val_ds, val_tf, ctx.device, ctx.rank, ctx.world_size,
                               batch_size=2 * cfg.batch_size, workers=0 if cfg.workers == 0 else min(cfg.workers, 2),
                               amp=amp, progress=ctx.is_main, desc=f"val {epoch + 1}")
    score, r, collapsed = selection_score(val_ds.labels, pred)
    e = mse_per_marker(val_ds.labels, pred)
    if ctx.is_main:
        writer.add_scalar("val/pearson_mean", score, epoch + 1)
        writer.add_scalar("val/mse_mean", float(np.nanmean(e)), epoch + 1)
        writer.add_scalar("val/collapsed_markers", collapsed, epoch + 1)
        for name, rv, ev in zip(val_ds.markers, r, e):
            tag = re.sub(r"[^A-Za-z0-9_.\-]", "_", name)  # TensorBoard tags: no spaces or slashes
            writer.add_scalar(f"val_pearson/{tag}", float(rv), epoch + 1)
            writer.add_scalar(f"val_mse/{tag}", float(ev), epoch + 1)
        log.info("epoch %d/%d: train loss %.4f%s (%.0f samples/s, data wait %.0f%%), val mean r %.4f, mse %.5f%s",
                 epoch + 1, cfg.epochs, tr["loss"], _dense_text(tr, cfg.dense_weight), tr["samples"] / train_time,
                 100 * tr["data_wait"] / max(train_time, 1e-9), score, float(np.nanmean(e)),
                 f" ({collapsed} markers collapsed to a constant prediction, counted as r = 0)" if collapsed else "")
    return {"score": score, "r": r, "mse": float(np.nanmean(e)), "collapsed": collapsed}


def stain_record(cfg: TrainConfig, ck: dict[str, Any] | None, log_it: bool) -> dict[str, Any] | None:
    """The stain normalisation of the run: a resumed run keeps its checkpoint's fitted record (``--stain-norm`` and
    ``--stain-target`` match it, :data:`hex.train.checkpoints.RUN_KEYS`), a fresh one uses ``cfg.stain_fit``."""
    rec = cfg.stain_fit
    if ck is not None and ck.get("stain_norm") is not None:
        old = ck["stain_norm"]
        if log_it and rec is not None and old.get("target_sha256") != rec.get("target_sha256"):
            log.warning("--stain-target %s changed since the checkpoint was written: the run keeps the checkpoint's "
                        "fitted %s normalisation", rec["target"], old.get("method"))
        rec = old
    if log_it and rec is not None:
        log.info("stain normalisation: %s to %s (recorded in best.json; applied by hex.test, hex.infer_wsi and "
                 "mica.extract_features)", rec["method"], rec["target"])
    return rec


def _dense_text(tr: dict[str, Any], weight: float) -> str:
    """`` (patch 0.1234 + 1 x dense 0.2345)`` for a dense run's epoch result, else ``""``."""
    if "loss_dense" not in tr:
        return ""
    return f" (patch {tr['loss_patch']:.4f} + {weight:g} x dense {tr['loss_dense']:.4f})"


STAGE = Stage("hex.train", build_parser, make_config, run=run, distributed=True, prepare=prepare_run_dir,
              log_file=lambda cfg: None if cfg.check else cfg.run_dir / "train.log")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hex.train``; returns the exit code (0, 2 bad input, 130 Ctrl-C)."""
    return STAGE.main(argv)
