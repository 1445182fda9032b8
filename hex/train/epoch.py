"""One HEX training epoch and the pieces around it: the model + loss step, optimiser, lr schedule, DDP wrapper,
model-selection score.

Gradient accumulation: micro-batches are grouped ``accum`` at a time and each group makes one optimiser step; a
micro-batch's loss is divided by the size of its own group, so the last, partial group of an epoch (fewer than
``accum`` micro-batches) steps on the mean gradient of what it has, not on a gradient shrunk by ``size / accum``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from hex.data.transforms import BatchTransform
from hex.evaluate.metrics import pearson
from hex.evaluate.predict import autocast
from hex.model import HEX
from pipeline.dist import DistContext, all_reduce_sum

log = logging.getLogger(__name__)

COLLAPSE_RANGE = 1e-6  # a prediction varying less than this over the validation patches (labels in [0,1]): constant


class TrainStep(nn.Module):
    """Model + loss in one module, so DDP also averages the gradients of the loss parameters (adaptive loss).

    ``forward(x (B,3,S,S), labels (B,M), epoch, weight (B,M)|None) -> (loss scalar, pred (B,M), feat (B,128))``;
    the loss runs in float32 outside autocast.

    With ``dense_criterion`` (a dense HEX): ``forward(..., dense=(B,M,G,G))`` runs ``model.forward_dense`` and
    returns ``(loss, pred, feat, parts)``, loss = patch loss + ``dense_weight`` x dense loss, the dense loss the mean
    of ``dense_criterion`` over the cells' finite labels (NaN = no CODEX, masked out; LDS weights are for the patch
    loss only), ``parts`` = detached (patch loss, dense loss) (2,).
    """

    def __init__(self, model: HEX, criterion: nn.Module, dense_criterion: nn.Module | None = None,
                 dense_weight: float = 1.0):
        super().__init__()
        self.model = model
        self.criterion = criterion
        self.dense_criterion = dense_criterion
        self.dense_weight = float(dense_weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor, epoch: int, weight: torch.Tensor | None = None,
                dense: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        if self.dense_criterion is None:
            pred, feat = self.model(x, labels, epoch)
            with torch.autocast(x.device.type, enabled=False):
                loss = self.criterion(pred.float(), labels.float(), weight)
            return loss, pred, feat
        if dense is None:
            raise ValueError("a dense train step needs the dense labels (B,M,G,G)")
        pred, feat, dpred = self.model.forward_dense(x, labels, epoch)
        with torch.autocast(x.device.type, enabled=False):
            patch = self.criterion(pred.float(), labels.float(), weight)
            m = dpred.shape[1]
            cells = self.dense_criterion.masked(dpred.float().permute(0, 2, 3, 1).reshape(-1, m),
                                                dense.float().permute(0, 2, 3, 1).reshape(-1, m))  # (B*G*G, M)
            loss = patch + self.dense_weight * cells
        return loss, pred, feat, torch.stack([patch.detach(), cells.detach()])


def make_optimizer(model: HEX, criterion: nn.Module, lr: float, weight_decay: float = 0.0,
                   dense_criterion: nn.Module | None = None) -> torch.optim.Optimizer:
    """Adam over the trainable backbone part, the heads (the dense head too) and the loss parameters (the dense
    loss's after the patch loss's; same lr; empty groups skipped)."""
    groups = model.trainable_groups()
    groups["loss"] = [p for p in criterion.parameters() if p.requires_grad]
    if dense_criterion is not None:
        groups["loss"] += [p for p in dense_criterion.parameters() if p.requires_grad]
    param_groups = [{"params": ps, "name": name} for name, ps in groups.items() if ps]
    return torch.optim.Adam(param_groups, lr=lr, weight_decay=weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, gamma: float,
                   floor: float = 0.0) -> torch.optim.lr_scheduler.LRScheduler:
    """lr of epoch e = lr x max(gamma^e, floor): ExponentialLR (the paper's, floor 0) that stops decaying at
    ``floor x lr``."""
    if not 0 <= floor <= 1:
        raise ValueError(f"lr floor must be in [0, 1], got {floor}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: max(gamma ** e, floor))


def wrap_ddp(step: TrainStep, ctx: DistContext, find_unused_parameters: bool = False) -> nn.Module:
    """DDP around the train step when distributed (buffers are synced once per epoch, not every forward)."""
    if ctx.world_size == 1:
        return step
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # buffers (BatchNorm statistics; FDS statistics are all-reduced by FDS itself) are synced once per epoch by
    # broadcast_buffers(), not at every forward; newer torch names this option forward_sync_buffers
    sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
            else {"broadcast_buffers": False})
    return DDP(step, device_ids=ids, find_unused_parameters=find_unused_parameters, **sync)


def loss_stats(criterion: nn.Module) -> dict[str, float]:
    """Mean shape/scale of the adaptive loss (empty for losses without parameters)."""
    robust = getattr(criterion, "robust", None)
    if robust is None:
        return {}
    with torch.no_grad():
        return {"alpha_mean": float(robust.alpha().mean()), "scale_mean": float(robust.scale().mean())}


def selection_score(y: np.ndarray, pred: np.ndarray) -> tuple[float, np.ndarray, int]:
    """Model-selection score of validation predictions: ``(mean r, per-marker r (M,), collapsed count)``.

    A marker whose prediction collapsed to a constant (its range over the patches below ``COLLAPSE_RANGE`` label
    units, while its labels vary) counts as r = 0, so a collapse lowers the mean instead of dropping out of it (or
    adding rounding noise: r of a constant column is 0/0); markers with constant labels stay undefined (NaN) and
    are left out. ``-inf`` when no marker has a score.
    """
    r = pearson(y, pred)
    if len(y) > 1:
        varies = np.ptp(np.asarray(y, np.float64), axis=0) > 0
        collapsed = (np.ptp(np.asarray(pred, np.float64), axis=0) < COLLAPSE_RANGE) & varies
        r = np.where(collapsed, 0.0, np.where(varies, r, np.nan))
    else:
        collapsed = np.zeros_like(r, bool)
    score = float(np.nanmean(r)) if np.isfinite(r).any() else -math.inf
    return score, r, int(collapsed.sum())


def train_one_epoch(ddp: nn.Module, step: TrainStep, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    loader: DataLoader, tf: BatchTransform, lds_w: torch.Tensor | None, epoch: int, accum: int,
                    amp: torch.dtype | None, device: torch.device, collect_fds: bool, max_steps: int | None,
                    is_main: bool) -> dict[str, Any]:
    """One pass over this rank's shard. Returns the mean loss over ranks, sample count (all ranks), seconds spent
    waiting for data and, with ``collect_fds``, this rank's head features (N,128) and labels (N,M) for FDS. Batches
    with dense labels (a 4th element, (B,M,G,G)) get the same augmentation as their images, and the result also
    holds ``loss_patch`` and ``loss_dense`` (means over ranks)."""
    step.train()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    parts_sum = torch.zeros(2, device=device, dtype=torch.float64)
    n_batches, n_samples, wait = 0, 0, 0.0
    feats, labs = [], []
    optimizer.zero_grad(set_to_none=True)
    n_micro = len(loader) if max_steps is None else min(len(loader), max_steps * accum)
    bar = tqdm(total=n_micro, desc=f"epoch {epoch + 1}", disable=not is_main, leave=False, unit="batch")
    t = time.time()
    for i, batch in enumerate(loader):
        if i >= n_micro:
            break
        wait += time.time() - t
        img, y, idx = batch[:3]
        extra: dict[str, torch.Tensor] = {}
        if len(batch) > 3:  # dense labels: the same flips/rotation as the images
            x, extra["dense"] = tf(img.to(device, non_blocking=True), batch[3].to(device, non_blocking=True))
        else:
            x = tf(img.to(device, non_blocking=True))
        y = y.to(device, non_blocking=True)
        w = lds_w[idx].to(device, non_blocking=True) if lds_w is not None else None
        group_start = i - i % accum
        group_size = min(accum, n_micro - group_start)  # the last group of the epoch may be partial
        boundary = i + 1 == group_start + group_size
        sync = ddp.no_sync() if isinstance(ddp, DDP) and not boundary else contextlib.nullcontext()
        with sync:
            with autocast(device, amp):
                res = ddp(x, y, epoch, w, **extra)
            loss, feat = res[0], res[2]
            scaler.scale(loss / group_size).backward()
        if len(res) > 3:
            parts_sum += res[3].double()
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
            bar.set_postfix(loss=f"{loss_sum.item() / n_batches:.4f}", refresh=False)  # drawn at the next update
        bar.update(1)
        t = time.time()
    bar.close()
    vals = [loss_sum.item(), n_batches, n_samples]
    if getattr(step, "dense_criterion", None) is not None:  # the same on every rank: one all-reduce shape
        vals += parts_sum.tolist()
    tot = all_reduce_sum(torch.tensor(vals, dtype=torch.float64, device=device))
    out: dict[str, Any] = {"loss": float(tot[0] / max(tot[1], 1)), "samples": int(tot[2]), "data_wait": wait}
    if len(tot) > 3:
        out["loss_patch"], out["loss_dense"] = float(tot[3] / max(tot[1], 1)), float(tot[4] / max(tot[1], 1))
    if collect_fds:
        m = step.model.num_markers
        out["fds_feats"] = torch.cat(feats) if feats else torch.zeros(0, 128, device=device)
        out["fds_labels"] = torch.cat(labs) if labs else torch.zeros(0, m, device=device)
    return out
