"""Train HEX (H&E patch -> M CODEX marker intensities) with DDP; paper defaults unless flags say otherwise.

One process (CPU, or one GPU)::

    python -m hex.train --data OUT --split COHORT/splits/splits_0.csv --clinical COHORT/clinical.csv \\
        --out OUT --run hex_musk --backbone musk --weights /models/musk/model.safetensors

One node, 4 GPUs (``--batch-size`` is per process: global batch = 4 x 48 = 192)::

    torchrun --standalone --nproc-per-node=4 -m hex.train --data OUT --split ... --out OUT --run-name hex_musk ...

Two nodes x 8 GPUs (run on both; NODE_RANK 0 on the master)::

    torchrun --nnodes=2 --nproc-per-node=8 --node-rank=$NODE_RANK --rdzv-backend=c10d \\
        --rdzv-endpoint=$MASTER_ADDR:29500 --rdzv-id=hex -m hex.train --run-name hex_musk --resume auto ...

Under torchrun name the run with ``--run-name`` (``--run`` is accepted too, but torchrun's own argument parser reads
``--run`` after the module name as an abbreviation of its ``--run-path`` option and stops).

Fault tolerance: ``torchrun --max-restarts=3 ... --resume auto`` restarts resume from the newest
``checkpoints/epoch_{k}.pt`` of the run (architecture, optimiser, scheduler, scaler, loss parameters, FDS statistics,
RNG states of every rank and the best score come from the checkpoint).

Global batch: each optimiser step sees ``batch_size x world_size x grad_accum`` patches. To keep the paper's
global batch (48 per GPU x 8 GPUs = 384) on fewer GPUs, pass ``--global-batch-size 384``: gradient accumulation
becomes ``384 / (batch_size x world_size)`` (it must divide). The learning rate is not rescaled.

CPU demo with the ``tiny`` backbone trained from scratch (no pretrained weights: all blocks trainable, larger lr;
12-slide sample cohort, ~870 train patches: ~2.5 min on 2 cores, visible-marker mean r ~0.79)::

    python -m hex.train --data OUT --split COHORT/splits/splits_0.csv --clinical COHORT/clinical.csv --out OUT \\
        --run tiny_demo --backbone tiny --unfreeze-last -1 --lr 1e-3 --epochs 30 --batch-size 32 --lds \\
        --loss mse --no-fds --color-jitter 0 0 0 0 --workers 1

On a CPU shared with other jobs, export ``OMP_WAIT_POLICY=PASSIVE`` (or ``OMP_NUM_THREADS=1``): spinning OpenMP
threads otherwise make a 2-core step up to 20x slower.

Outputs under ``OUT/runs/RUN/`` (rank 0 writes, atomically): ``config.json``, ``train.log``, ``tb/`` (TensorBoard:
train loss, lr, per-marker val MSE and Pearson r), ``checkpoints/epoch_{k}.pt`` (every ``--save-every`` epochs and
the last), ``best.safetensors`` + ``best.json`` (highest validation mean Pearson r).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import logging
import math
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from hex import backbones
from hex.data import BatchTransform, build_dataset, load_split
from hex.dist import (
    DistContext,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    broadcast_object,
    cleanup_dist,
    close_log_file,
    rng_state,
    seed_everything,
    set_rng_state,
    setup_dist,
)
from hex.evaluate import autocast, predict_distributed, resolve_amp
from hex.losses import LOSSES, build_loss
from hex.metrics import mse as mse_per_marker
from hex.metrics import pearson as pearson_per_marker
from hex.model import HEX, build_from_args, inference_state_dict, load_hex_checkpoint
from preprocess.utils import PipelineError, atomic_path, save_config, setup_logging, write_json

log = logging.getLogger("hex.train")


# ----------------------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hex.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, type=Path, help="data root holding he_patches/ and markers/ (usually OUT)")
    g.add_argument("--markers-dir", type=Path, help="label CSV folder (default DATA/markers)")
    g.add_argument("--patches-dir", type=Path, help="patch folder (default DATA/he_patches)")
    g.add_argument("--split", required=True, type=Path, help="split CSV with train,val columns of slide ids")
    g.add_argument("--clinical", type=Path, help="clinical.csv (case_id,slide_id): patient overlap check")
    g.add_argument("--workers", type=int, default=4, help="DataLoader worker processes per rank")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, type=Path, help="output root OUT; the run goes to OUT/runs/RUN")
    g.add_argument("--run-name", "--run", dest="run", default="hex",
                   help="run name (under torchrun spell it --run-name: torchrun takes --run for its own --run-path)")
    g.add_argument("--save-every", type=int, default=5, help="checkpoint every k epochs (and after the last)")
    g.add_argument("--eval-every", type=int, default=1, help="validate every k epochs (and after the last)")
    g.add_argument("--resume", help="checkpoint path, or 'auto' = newest checkpoints/epoch_{k}.pt of the run (none: "
                                    "start fresh)")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default="musk",
                   help=f"backbone: {', '.join(backbones.list_backbones())} or timm:<name>")
    g.add_argument("--backbone-kw", type=json.loads, default={},
                   help='JSON builder options, e.g. \'{"embed_dim": 64, "depth": 2, "num_heads": 4, "mlp_dim": 128, '
                        '"img_size": 64}\' for a tiny MUSK')
    g.add_argument("--weights", help="backbone weights: local .safetensors/.pth/.bin or hf_hub:<repo>")
    g.add_argument("--init", type=Path, help="initialise from a HEX checkpoint (ours or original; heads-only ok)")
    g.add_argument("--input-size", type=int, help="input side in pixels (default: the backbone's, 384 for musk)")
    g.add_argument("--unfreeze-last", type=int, default=4,
                   help="trainable last backbone blocks (+ final norm); -1 = all, 0 = heads only")
    g.add_argument("--freeze-backbone-epoch", type=int, default=100,
                   help="from this epoch only the heads train (backbone in eval mode)")
    g.add_argument("--dropout", type=float, default=0.5, help="head dropout")
    g.add_argument("--color-jitter", type=float, nargs=4, default=(0.1, 0.1, 0.1, 0.01),
                   metavar=("B", "C", "S", "H"), help="training colour jitter (0 0 0 0 = off)")
    g.add_argument("--no-flips", action="store_true", help="no flip/rot90 augmentation")
    g.add_argument("--interpolation", choices=("bilinear", "bicubic"), default="bilinear",
                   help="resize to the input size (original HEX code: bilinear; MUSK pre-training: bicubic)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=120)
    g.add_argument("--batch-size", type=int, default=48, help="patches per step per process")
    g.add_argument("--global-batch-size", type=int, help="fix the global batch: sets gradient accumulation")
    g.add_argument("--lr", type=float, default=1e-5, help="Adam lr of backbone, heads and loss parameters")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--gamma", type=float, default=0.95, help="ExponentialLR factor per epoch")
    g.add_argument("--loss", choices=LOSSES, default="adaptive")
    g.add_argument("--fds", action=argparse.BooleanOptionalAction, default=True,
                   help="feature distribution smoothing over the 128-d head features")
    g.add_argument("--fds-buckets", type=int, default=50)
    g.add_argument("--fds-start-smooth", type=int, default=10, help="first epoch that smooths features")
    g.add_argument("--fds-stop-epoch", type=int, default=50, help="FDS off from this epoch")
    g.add_argument("--lds", action="store_true", help="label distribution smoothing loss weights")
    g.add_argument("--amp", choices=("auto", "fp16", "bf16", "none"), default="auto",
                   help="autocast on CUDA (auto: bf16 if supported else fp16 + GradScaler); never on CPU")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda")
    g.add_argument("--find-unused-parameters", action="store_true", help="DDP option for backbones with "
                   "trainable parameters outside the forward path")
    g.add_argument("--max-steps-per-epoch", type=int, help="cap optimiser steps per epoch (smoke tests)")
    return p


# ----------------------------------------------------------------------------------------------------------------
# helpers


class TrainStep(nn.Module):
    """Model + loss in one module, so DDP also averages the gradients of the loss parameters (adaptive loss).

    ``forward(x (B,3,S,S), labels (B,M), epoch, weight (B,M)|None) -> (loss scalar, pred (B,M), feat (B,128))``;
    the loss runs in float32 outside autocast.
    """

    def __init__(self, model: HEX, criterion: nn.Module):
        super().__init__()
        self.model = model
        self.criterion = criterion

    def forward(self, x: torch.Tensor, labels: torch.Tensor, epoch: int,
                weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pred, feat = self.model(x, labels, epoch)
        with torch.autocast(x.device.type, enabled=False):
            loss = self.criterion(pred.float(), labels.float(), weight)
        return loss, pred, feat


def build_model(args: argparse.Namespace, num_markers: int) -> HEX:
    """HEX from flags; ``--input-size`` goes to the backbone builder as ``img_size`` or ``input_size``."""
    fds = {"bucket_num": args.fds_buckets, "start_smooth": args.fds_start_smooth} if args.fds else None
    kw = dict(args.backbone_kw)
    if args.input_size is not None and "img_size" not in kw and "input_size" not in kw:
        for key in ("img_size", "input_size"):
            try:
                return HEX(args.backbone, num_markers, weights=args.weights, unfreeze_last=args.unfreeze_last,
                           fds=fds, head_dropout=args.dropout, **kw, **{key: args.input_size})
            except TypeError as e:
                if "unexpected keyword" not in str(e):
                    raise
        log.info("backbone %s takes no input-size option; images are resized to %d", args.backbone,
                 args.input_size)
    return HEX(args.backbone, num_markers, weights=args.weights, unfreeze_last=args.unfreeze_last, fds=fds,
               head_dropout=args.dropout, **kw)


def check_model_flags(args: argparse.Namespace) -> None:
    """Fail fast, before any data is read, on an unknown backbone or a missing weights / init file."""
    try:
        backbones.get_spec(args.backbone)
    except ValueError as e:
        raise PipelineError(f"--backbone: {e}") from e
    w = args.weights
    if w and not str(w).startswith(backbones.HF_HUB_PREFIX) and not Path(w).expanduser().is_file():
        raise PipelineError(f"--weights {w}: backbone weights file not found (a local .safetensors/.pth/.bin file, "
                            "or hf_hub:<repo>)")
    if args.init is not None and not args.init.is_file():
        raise PipelineError(f"--init {args.init}: HEX checkpoint not found")


def find_resume(resume: str | None, run_dir: Path) -> Path | None:
    """Checkpoint to resume from: ``auto`` = newest ``epoch_{k}.pt`` (None when there is none), else the path."""
    if not resume:
        return None
    if resume == "auto":
        ckpts = [(int(m.group(1)), p) for p in (run_dir / "checkpoints").glob("epoch_*.pt")
                 if (m := re.fullmatch(r"epoch_(\d+)\.pt", p.name))]
        return max(ckpts)[1] if ckpts else None
    path = Path(resume)
    if not path.is_file():
        raise PipelineError(f"--resume {path}: no such checkpoint")
    return path


def _plain(obj: Any) -> Any:
    """JSON round trip: only dict/list/str/int/float/bool/None remain (safe for ``torch.load(weights_only=True)``)."""
    return json.loads(json.dumps(obj, default=str))


def make_optimizer(model: HEX, criterion: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """Adam over the trainable backbone part, the heads and the loss parameters (same lr; empty groups skipped)."""
    groups = model.trainable_groups()
    groups["loss"] = [p for p in criterion.parameters() if p.requires_grad]
    param_groups = [{"params": ps, "name": name} for name, ps in groups.items() if ps]
    return torch.optim.Adam(param_groups, lr=args.lr, weight_decay=args.weight_decay)


def wrap_ddp(step: TrainStep, ctx: DistContext, args: argparse.Namespace) -> nn.Module:
    """DDP around the train step when distributed (buffers are synced once per epoch, not every forward)."""
    if ctx.world_size == 1:
        return step
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # buffers (BatchNorm statistics; FDS statistics are all-reduced by FDS itself) are synced once per epoch by
    # broadcast_buffers(), not at every forward; newer torch names this option forward_sync_buffers
    sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
            else {"broadcast_buffers": False})
    return DDP(step, device_ids=ids, find_unused_parameters=args.find_unused_parameters, **sync)


def loss_stats(criterion: nn.Module) -> dict[str, float]:
    """Mean shape/scale of the adaptive loss (empty for losses without parameters)."""
    robust = getattr(criterion, "robust", None)
    if robust is None:
        return {}
    with torch.no_grad():
        return {"alpha_mean": float(robust.alpha().mean()), "scale_mean": float(robust.scale().mean())}


# ----------------------------------------------------------------------------------------------------------------
# main


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ctx = setup_dist(args.device)
    run_dir = args.out / "runs" / args.run
    if ctx.is_main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    barrier()
    setup_logging(run_dir / "train.log" if ctx.is_main else None, rank=ctx.rank)
    try:
        return train(args, ctx, run_dir)
    except PipelineError as e:
        log.error("%s", e)
        return 2
    finally:
        close_log_file(run_dir / "train.log")
        cleanup_dist()


def train(args: argparse.Namespace, ctx: DistContext, run_dir: Path) -> int:
    rank, world, device, is_main = ctx.rank, ctx.world_size, ctx.device, ctx.is_main
    if args.epochs < 1 or args.batch_size < 1:
        raise PipelineError("--epochs and --batch-size must be >= 1")
    # rank 0 picks the checkpoint and every rank loads that one (a rank that cannot read it fails loudly), so ranks
    # never resume from different epochs
    resume_path = broadcast_object(find_resume(args.resume, run_dir) if is_main else None)
    if resume_path is not None and not Path(resume_path).is_file():
        raise PipelineError(f"rank {rank}: resume checkpoint {resume_path} is not readable here; OUT must be on a "
                            "filesystem that every node sees")
    if resume_path is None:
        check_model_flags(args)
    # ---- data
    split = load_split(args.split, args.clinical)
    ck: dict[str, Any] | None = None
    if resume_path is not None:
        ck = torch.load(resume_path, map_location="cpu", weights_only=True)
        if is_main:
            log.info("resuming from %s (epoch %d done); the architecture comes from the checkpoint", resume_path,
                     ck["epoch"])
    elif args.resume == "auto" and is_main:
        log.info("--resume auto: no checkpoint in %s, starting fresh", run_dir / "checkpoints")
    markers = ck["markers"] if ck is not None else None
    train_ds = build_dataset(args.data, split["train"], markers, args.markers_dir, args.patches_dir)
    val_ds = build_dataset(args.data, split["val"], train_ds.markers, args.markers_dir, args.patches_dir)
    m = len(train_ds.markers)

    # ---- model, loss, optimiser (same construction on every rank; DDP broadcasts rank 0's values)
    seed_everything(args.seed)
    if ck is not None:
        model = build_from_args(ck["model_args"], weights=None, with_fds=True)
        model.load_state_dict(ck["model"])
        input_size = int(ck["input_size"])
    else:
        model = build_model(args, m)
        if args.init is not None:
            load_hex_checkpoint(model, args.init, load_fds=False)  # fresh FDS statistics for a new run
        input_size = int(args.input_size or model.input_size)
    model.to(device)
    criterion = build_loss(args.loss, m).to(device)
    optimizer = make_optimizer(model, criterion, args)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=args.gamma)
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
    accum = 1
    if args.global_batch_size:
        per_step = args.batch_size * world
        if args.global_batch_size % per_step:
            raise PipelineError(f"--global-batch-size {args.global_batch_size} is not a multiple of batch size x "
                                f"world size = {per_step}")
        accum = args.global_batch_size // per_step
    lds_w = None
    if args.lds:
        from hex.fds import lds_weights

        lds_w = torch.as_tensor(np.asarray(lds_weights(torch.from_numpy(train_ds.labels))), dtype=torch.float32)

    # ---- loaders
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    per_rank = len(sampler)
    train_loader = DataLoader(
        train_ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
        pin_memory=device.type == "cuda", drop_last=per_rank % args.batch_size == 1,  # no 1-sample BatchNorm batch
        persistent_workers=args.workers > 0, prefetch_factor=4 if args.workers > 0 else None,
        generator=torch.Generator().manual_seed(args.seed))  # own RNG: loader never touches the global one
    interpolation = ck.get("interpolation", "bilinear") if ck is not None else args.interpolation
    train_tf = BatchTransform(input_size, model.mean, model.std, train=True, jitter=tuple(args.color_jitter),
                              flips=not args.no_flips, interpolation=interpolation)
    val_tf = BatchTransform(input_size, model.mean, model.std, train=False, interpolation=interpolation)

    if is_main:
        n_tr = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        log.info("%d train patches (%d slides), %d val patches (%d slides), %d markers", len(train_ds),
                 len(split["train"]), len(val_ds), len(split["val"]), m)
        log.info("backbone %s: %.2fM params, %.2fM trainable; input %d px; %d rank(s) on %s; amp %s",
                 model.model_args["backbone_name"], n_all / 1e6, n_tr / 1e6, input_size, world, device, amp)
        log.info("global batch %d = %d per rank x %d ranks x %d accumulation", args.batch_size * world * accum,
                 args.batch_size, world, accum)
        cfg = {**vars(args), "world_size": world, "grad_accum": accum,
               "global_batch": args.batch_size * world * accum, "input_size": input_size,
               "markers": train_ds.markers, "model_args": model.model_args, "resumed_from": resume_path,
               "n_train": len(train_ds), "n_val": len(val_ds)}
        save_config(run_dir, cfg, name="config.json" if ck is None else f"config_resume_epoch{start_epoch}.json")
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
        seed_everything(args.seed + 1000 * rank + start_epoch)

    step = TrainStep(model, criterion)
    ddp = wrap_ddp(step, ctx, args)
    meta = {"markers": train_ds.markers, "normalization": train_ds.normalization, "model_args": model.model_args,
            "input_size": input_size, "interpolation": interpolation, "mean": list(model.mean),
            "std": list(model.std)}

    for epoch in range(start_epoch, args.epochs):
        if epoch >= args.freeze_backbone_epoch and not model.backbone_frozen:
            if is_main:
                log.info("epoch %d: freezing the backbone (only the heads train from now on)", epoch)
            model.freeze_backbone()
            del ddp
            gc.collect()
            ddp = wrap_ddp(step, ctx, args)
        fds_on = model.fds is not None and epoch < args.fds_stop_epoch
        model.fds_active = fds_on
        collect_fds = fds_on and epoch >= int(getattr(model.fds, "start_update", 0))
        sampler.set_epoch(epoch)
        t0 = time.time()
        tr = train_one_epoch(ddp, step, optimizer, scaler, train_loader, train_tf, lds_w, epoch, accum, amp, device,
                             collect_fds, args.max_steps_per_epoch, is_main)
        if collect_fds:
            feats, labels = tr.pop("fds_feats"), tr.pop("fds_labels")
            model.fds.update_running_stats(feats, labels, epoch)
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
        last = epoch + 1 == args.epochs
        score = None
        if (epoch + 1) % args.eval_every == 0 or last:
            pred = predict_distributed(model, val_ds, val_tf, device, rank, world, batch_size=2 * args.batch_size,
                                       workers=0 if args.workers == 0 else min(args.workers, 2), amp=amp,
                                       progress=is_main, desc=f"val {epoch + 1}")
            r = pearson_per_marker(val_ds.labels, pred)
            e = mse_per_marker(val_ds.labels, pred)
            score = float(np.nanmean(r)) if np.isfinite(r).any() else -math.inf
            if is_main:
                writer.add_scalar("val/pearson_mean", score, epoch + 1)
                writer.add_scalar("val/mse_mean", float(np.nanmean(e)), epoch + 1)
                for name, rv, ev in zip(val_ds.markers, r, e):
                    tag = re.sub(r"[^A-Za-z0-9_.\-]", "_", name)  # TensorBoard tags: no spaces or slashes
                    writer.add_scalar(f"val_pearson/{tag}", float(rv), epoch + 1)
                    writer.add_scalar(f"val_mse/{tag}", float(ev), epoch + 1)
                log.info("epoch %d/%d: train loss %.4f (%.0f samples/s, data wait %.0f%%), val mean r %.4f, "
                         "mse %.5f", epoch + 1, args.epochs, tr["loss"], tr["samples"] / train_time,
                         100 * tr["data_wait"] / max(train_time, 1e-9), score, float(np.nanmean(e)))
            # the first evaluated epoch always writes best.* (even when every r is undefined), later ones must beat it
            if score > best["pearson"] or best["epoch"] < 0:
                best = {"pearson": score, "epoch": epoch + 1}
                if is_main:
                    save_best(run_dir, model, {**meta, "epoch": epoch + 1, "val_mean_pearson": score,
                                               "val_mean_mse": float(np.nanmean(e)),
                                               "val_pearson": dict(zip(val_ds.markers, map(float, r)))})
        elif is_main:
            log.info("epoch %d/%d: train loss %.4f (%.0f samples/s)", epoch + 1, args.epochs, tr["loss"],
                     tr["samples"] / train_time)
        if (epoch + 1) % args.save_every == 0 or last:
            rngs = all_gather_objects(rng_state())
            if is_main:
                path = run_dir / "checkpoints" / f"epoch_{epoch + 1}.pt"
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                         "loss": criterion.state_dict(), "epoch": epoch + 1, "rng": rngs, "best": best,
                         "backbone_frozen": model.backbone_frozen, "world_size": world,
                         "config": _plain(vars(args)), **_plain(meta)}
                with atomic_path(path) as tmp:
                    torch.save(state, tmp)
                log.info("saved %s", path)
        barrier()
    if writer is not None:
        writer.close()
    if is_main:
        log.info("done: best val mean Pearson r %.4f at epoch %d -> %s", best["pearson"], best["epoch"], run_dir)
    train_ds.close()
    val_ds.close()
    return 0


def train_one_epoch(ddp: nn.Module, step: TrainStep, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    loader: DataLoader, tf: BatchTransform, lds_w: torch.Tensor | None, epoch: int, accum: int,
                    amp: torch.dtype | None, device: torch.device, collect_fds: bool, max_steps: int | None,
                    is_main: bool) -> dict[str, Any]:
    """One pass over this rank's shard. Returns the mean loss over ranks, sample count (all ranks), seconds spent
    waiting for data and, with ``collect_fds``, this rank's head features (N,128) and labels (N,M) for FDS."""
    step.train()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    n_batches, n_samples, wait = 0, 0, 0.0
    feats, labs = [], []
    optimizer.zero_grad(set_to_none=True)
    n_micro = len(loader) if max_steps is None else min(len(loader), max_steps * accum)
    bar = tqdm(total=n_micro, desc=f"epoch {epoch + 1}", disable=not is_main, leave=False, unit="batch")
    t = time.time()
    for i, (img, y, idx) in enumerate(loader):
        if i >= n_micro:
            break
        wait += time.time() - t
        x = tf(img.to(device, non_blocking=True))
        y = y.to(device, non_blocking=True)
        w = lds_w[idx].to(device, non_blocking=True) if lds_w is not None else None
        boundary = (i + 1) % accum == 0 or i + 1 == n_micro
        sync = ddp.no_sync() if isinstance(ddp, DDP) and not boundary else contextlib.nullcontext()
        with sync:
            with autocast(device, amp):
                loss, _, feat = ddp(x, y, epoch, w)
            scaler.scale(loss / accum).backward()
        if boundary:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach().double()
        n_batches += 1
        n_samples += len(y)
        if collect_fds:
            feats.append(feat.detach().float())
            labs.append(y.detach().float())
        if is_main and (i % 10 == 0 or i + 1 == n_micro):
            bar.set_postfix(loss=f"{loss_sum.item() / n_batches:.4f}")
        bar.update(1)
        t = time.time()
    bar.close()
    tot = all_reduce_sum(torch.tensor([loss_sum.item(), n_batches, n_samples], dtype=torch.float64, device=device))
    out: dict[str, Any] = {"loss": float(tot[0] / max(tot[1], 1)), "samples": int(tot[2]), "data_wait": wait}
    if collect_fds:
        m = step.model.num_markers
        out["fds_feats"] = torch.cat(feats) if feats else torch.zeros(0, 128, device=device)
        out["fds_labels"] = torch.cat(labs) if labs else torch.zeros(0, m, device=device)
    return out


def save_best(run_dir: Path, model: HEX, meta: dict[str, Any]) -> None:
    """Write ``best.safetensors`` (backbone + heads) and ``best.json`` (how to rebuild and use it), atomically."""
    from safetensors.torch import save_file

    meta = {**_plain(meta), "backbone": model.model_args["backbone_name"],
            "backbone_kw": model.model_args["backbone_kw"], "num_markers": model.num_markers,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    with atomic_path(run_dir / "best.safetensors") as tmp:
        save_file(inference_state_dict(model), str(tmp), metadata={"format": "pt", "hex": json.dumps(meta)})
    write_json(run_dir / "best.json", meta)
    log.info("new best: epoch %d, val mean Pearson r %.4f -> %s", meta["epoch"], meta["val_mean_pearson"],
             run_dir / "best.safetensors")


if __name__ == "__main__":
    sys.exit(main())
