"""The one prediction loop: ``hex.test``, ``hex.train``'s validation, ``hex.infer_wsi`` and feature extraction.

::

    from hex.evaluate.predict import resolve_amp, run_loop, prediction_fn

    amp = resolve_amp("auto", device)                 # bf16 (else fp16) on CUDA, None on CPU
    out = run_loop(loader, prediction_fn(model), transform, device, amp=amp, n=len(ds))   # (N, M) float32

* ``loader`` is any iterable of batches (a DataLoader) whose FIRST element is a uint8 (B, 3, H, W) image batch
  and, when ``n`` is given, whose LAST element is the int64 (B,) row of each sample in the output.
* ``forward`` maps the transformed float batch (B, 3, S, S) to (B, F) (predictions, or features for MICA); an
  ``nn.Module`` forward is put in eval mode. Everything runs under ``torch.inference_mode()``.
* On CUDA: autocast with ``amp`` (bf16 where supported, else fp16), ``non_blocking`` host-to-device copies (the
  loader should pin memory), optional channels-last inputs for convolutional backbones, and device-to-host copies
  of the outputs that overlap the next batch. On CPU: float32 (autocast is never used on CPU).
* Dense models (``model.dense_grid`` G > 0, ``model.forward_dense(x) -> (pred, feat, dense (B, M, G, G))``):
  :func:`predict` / :func:`predict_distributed` with ``dense=True`` return ``(pred (N, M), dense (N, M, G, G))``
  from one pass (:func:`dense_prediction_fn` concatenates both into the (B, F) rows :func:`run_loop` handles).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from pipeline.dist import all_gather_objects, shard_indices

log = logging.getLogger(__name__)

def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``--amp``: CUDA only (``auto`` = bf16 where supported, else fp16); None on CPU."""
    if device.type != "cuda":
        if amp not in ("auto", "none"):
            log.warning("--amp %s ignored: mixed precision is used on CUDA only (CPU bf16 autocast is much slower "
                        "than fp32 here)", amp)
        return None
    if amp == "none":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype``, or a no-op when None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def wants_channels_last(model: nn.Module, device: torch.device) -> bool:
    """True on CUDA for mostly-convolutional models (more than 2 Conv2d layers; a ViT has one, its patch embedding),
    where channels-last memory format speeds up cuDNN convolutions."""
    return device.type == "cuda" and sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 2


def prediction_fn(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> model(x)[0]`` for models returning ``(pred, feat)`` (HEX), ``x -> model(x)`` otherwise; eval mode."""
    model.eval()

    def fwd(x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        return out[0] if isinstance(out, tuple | list) else out

    fwd.module = model  # type: ignore[attr-defined]
    return fwd


def dense_prediction_fn(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> cat(pred (B, M), dense (B, M, G, G) flattened)`` (B, M + M G G) float32 for a dense model
    (``model.forward_dense``); split it back with :func:`split_dense`. Eval mode."""
    model.eval()
    if int(getattr(model, "dense_grid", 0) or 0) <= 0 or not hasattr(model, "forward_dense"):
        raise ValueError("dense prediction needs a model with dense_grid > 0 and forward_dense")

    def fwd(x: torch.Tensor) -> torch.Tensor:
        pred, _feat, dense = model.forward_dense(x)
        return torch.cat([pred.float(), dense.float().flatten(1)], dim=1)

    fwd.module = model  # type: ignore[attr-defined]
    return fwd


def split_dense(rows: np.ndarray, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows (N, M + M G G) of :func:`dense_prediction_fn` -> ``(pred (N, M), dense (N, M, G, G))`` float32."""
    n, f = rows.shape
    m, rem = divmod(f, 1 + grid * grid)
    if rem:
        raise ValueError(f"{f} outputs per sample are not M + M*{grid}*{grid}")
    return rows[:, :m], rows[:, m:].reshape(n, m, grid, grid)


@torch.inference_mode()
def run_loop(loader: Iterable[Sequence[Any]], forward: Callable[[torch.Tensor], torch.Tensor],
             transform: Callable[[torch.Tensor], torch.Tensor], device: torch.device, amp: torch.dtype | None = None,
             *, n: int | None = None, dim: int | None = None, channels_last: bool = False, progress: bool = False,
             desc: str = "predict", total: int | None = None, unit: str = "patch") -> np.ndarray:
    """Run ``forward(transform(imgs))`` over ``loader``; returns float32 outputs (rows, F).

    Args:
        loader: batches ``(imgs uint8 (B,3,H,W), ..., idx int64 (B,))`` (``idx`` needed only with ``n``).
        forward: (B,3,S,S) float -> (B,F); an ``nn.Module`` (or :func:`prediction_fn`'s result) is put in eval mode.
        transform: uint8 (B,3,H,W) on ``device`` -> normalised float (B,3,S,S), e.g.
            ``hex.data.transforms.BatchTransform``.
        device: where the model lives; CUDA gets non-blocking copies and ``amp`` autocast.
        amp: autocast dtype (CUDA only; see :func:`resolve_amp`).
        n: place row ``idx[j]`` of each batch into an (n, F) array and check every row was filled exactly once;
            None = rows in loader order.
        dim: F, used only for the shape of an empty result when the loader yields nothing.
        channels_last: feed channels-last inputs (CUDA, convolutional models; see :func:`wants_channels_last`).
        progress: show a tqdm bar counting samples (``unit``/s); ``total`` = expected samples for the bar.
    """
    module = forward if isinstance(forward, nn.Module) else getattr(forward, "module", None)
    if isinstance(module, nn.Module):
        module.eval()
    cuda = device.type == "cuda"
    rows: list[np.ndarray] = []
    out: np.ndarray | None = None
    seen = np.zeros(n, np.int64) if n is not None else None
    pending: list[tuple[torch.Tensor, torch.Tensor | None, Any]] = []  # (host output, idx, CUDA event)

    def drain(keep: int) -> None:
        nonlocal out
        while len(pending) > keep:
            host, idx, event = pending.pop(0)
            if event is not None:
                event.synchronize()
            arr = host.numpy()
            if seen is None:
                rows.append(arr.copy() if cuda else arr)
                continue
            if out is None:
                out = np.zeros((n, arr.shape[1]), np.float32)
            ii = idx.numpy()
            out[ii] = arr
            np.add.at(seen, ii, 1)

    bar = tqdm(total=total, desc=desc, unit=unit, disable=not progress, leave=False)
    try:
        for batch in loader:
            imgs = batch[0]
            idx = batch[-1].to(torch.int64).cpu() if n is not None else None
            x = transform(imgs.to(device, non_blocking=True))
            if channels_last and cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp):
                y = forward(x)
            y = y.float()
            if y.ndim != 2:
                y = y.reshape(y.shape[0], -1)
            if cuda:
                host = torch.empty(y.shape, dtype=torch.float32, pin_memory=True)
                host.copy_(y, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                pending.append((host, idx, event))
                drain(keep=1)  # the previous batch's copy is done by now; this one overlaps the next batch
            else:
                pending.append((y, idx, None))
                drain(keep=0)
            bar.update(int(imgs.shape[0]))
        drain(keep=0)
    finally:
        bar.close()
    if seen is None:
        return np.concatenate(rows) if rows else np.zeros((0, dim or 0), np.float32)
    if out is None:
        out = np.zeros((n, dim or 0), np.float32)
    if not (seen == 1).all():
        raise RuntimeError(f"prediction loop filled {int((seen == 1).sum())}/{n} rows exactly once "
                           f"({int((seen == 0).sum())} never, {int((seen > 1).sum())} more than once)")
    return out


# ----------------------------------------------------------------------------------------------------------------
# labelled patch datasets (hex.test, hex.train validation)


class _Positions(Dataset):
    """``dataset[indices[j]]`` with its position ``j`` appended (so run_loop places rows by position)."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]):
        self.sub = Subset(dataset, list(indices))

    def __len__(self) -> int:
        return len(self.sub)

    def __getitem__(self, j: int) -> tuple[Any, ...]:
        item = self.sub[j]
        return (item[0], j)


def predict(model: nn.Module, dataset: Dataset, indices: Sequence[int], transform: Callable[[torch.Tensor],
            torch.Tensor], device: torch.device, batch_size: int = 128, workers: int = 0,
            amp: torch.dtype | None = None, progress: bool = False, desc: str = "predict",
            channels_last: bool = False, dense: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Predictions (len(indices), M) float32 for ``dataset[indices]`` in that order (model in eval mode).

    ``dataset`` items give a uint8 (3,H,W) image first (``hex.data.datasets.PatchDataset``: ``(img, labels, i)``).
    ``channels_last`` feeds channels-last inputs on CUDA (convert the model with
    ``model.to(memory_format=torch.channels_last)`` first; see :func:`wants_channels_last`).
    ``dense``: a dense model's ``(pred (n, M), dense (n, M, G, G))`` from one pass (G = ``model.dense_grid``).
    """
    dim = len(getattr(dataset, "markers", ())) or None
    g = int(model.dense_grid) if dense else 0
    if not len(indices):
        empty = np.zeros((0, dim or 0), np.float32)
        return (empty, np.zeros((0, dim or 0, g, g), np.float32)) if dense else empty
    # own generator: creating the iterator draws a seed, which must not consume the global RNG (exact resume)
    loader = DataLoader(_Positions(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=False,
                        generator=torch.Generator().manual_seed(0))
    if dense:
        rows = run_loop(loader, dense_prediction_fn(model), transform, device, amp, n=len(indices),
                        channels_last=channels_last, progress=progress, desc=desc, total=len(indices))
        return split_dense(rows, g)
    return run_loop(loader, prediction_fn(model), transform, device, amp, n=len(indices), dim=dim,
                    channels_last=channels_last, progress=progress, desc=desc, total=len(indices))


def predict_distributed(model: nn.Module, dataset: Dataset, transform: Callable[[torch.Tensor], torch.Tensor],
                        device: torch.device, rank: int, world_size: int, dense: bool = False,
                        **kw: Any) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Predictions (N,M) for the whole dataset on every rank: each rank predicts a contiguous shard (no padding,
    no duplicates), shards are gathered and placed by sample index. ``dense``: ``(pred (N, M), dense (N, M, G,
    G))`` of a dense model, gathered the same way."""
    mine = shard_indices(len(dataset), rank, world_size)
    if dense:
        return _predict_distributed_dense(model, dataset, transform, device, mine, **kw)
    pred = predict(model, dataset, mine, transform, device, **kw)
    m = pred.shape[1] if pred.size else len(getattr(dataset, "markers", ()))
    full = np.full((len(dataset), m), np.nan, np.float32)
    seen = np.zeros(len(dataset), np.int64)
    for idx, p in all_gather_objects((np.asarray(mine, np.int64), pred)):
        if len(idx):
            full[idx] = p
        seen[idx] += 1
    if not (seen == 1).all():
        raise RuntimeError(f"distributed prediction covered {int((seen == 1).sum())}/{len(dataset)} samples once")
    return full


def _predict_distributed_dense(model: nn.Module, dataset: Dataset, transform: Callable[[torch.Tensor], torch.Tensor],
                               device: torch.device, mine: list[int], **kw: Any) -> tuple[np.ndarray, np.ndarray]:
    pred, dense = predict(model, dataset, mine, transform, device, dense=True, **kw)
    g = int(model.dense_grid)
    m = pred.shape[1] if pred.size else len(getattr(dataset, "markers", ()))
    full = np.full((len(dataset), m), np.nan, np.float32)
    full_dense = np.full((len(dataset), m, g, g), np.nan, np.float32)
    seen = np.zeros(len(dataset), np.int64)
    for idx, p, d in all_gather_objects((np.asarray(mine, np.int64), pred, dense)):
        if len(idx):
            full[idx] = p
            full_dense[idx] = d
        seen[idx] += 1
    if not (seen == 1).all():
        raise RuntimeError(f"distributed prediction covered {int((seen == 1).sum())}/{len(dataset)} samples once")
    return full, full_dense
