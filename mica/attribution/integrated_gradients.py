"""Integrated Gradients (captum) for MICA on both inputs: one score per H&E patch and one per CODEX marker token.

Target: the survival risk ``-sum_k S_k`` (``mica.survival.risk_from_logits``) or the response logit; the model runs in
eval mode (no dropout). Attributions are computed on the H&E bag (B,N,Dp) and on the per-slide CODEX token sets
(B,S,40,Dc) that the model sees averaged over slides, so a patient's attributions split exactly back to its slides:
patches by position in the concatenated bag, CODEX tokens by slide. Per-patch attribution = sum over the Dp features;
per-marker attribution = sum over the Dc features of the token.

Completeness: ``sum(attributions) = f(x) - f(baseline)`` up to the integral's discretisation; captum's convergence
delta (``sum - (f(x)-f(b))``) is reported absolute and relative to ``|f(x)-f(b)|``.

``ig/{slide}.h5``: ``coords`` (N,2) int64, ``path_attr`` (N,) float32, ``codex_attr`` (40,) float32 (NaN when the
mode does not use the input; (0,) path arrays in codex mode); attrs ``baseline``, ``steps``, ``delta`` (relative),
``delta_abs``, ``f_x``, ``f_baseline``, ``target``, ``markers``, ``case_id``, ``fold``, ``slides_of_patient``,
``checkpoint``, ``schema_version``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn

from pipeline import artifacts as art
from pipeline.errors import PipelineError
from pipeline.io import atomic_path

log = logging.getLogger(__name__)

SCHEMA_VERSION = art.ATTRIBUTIONS.schema
BASELINES = ("zero", "mean")


class ScalarTarget(nn.Module):
    """``(path (B,N,Dp)?, codex_slides (B,S,T,Dc)?) -> (B,)``: risk (survival) or logit (response) of a MICA model.

    Inputs present depend on the mode: coattn (path, codex_slides), path (path,), codex (codex_slides,).
    """

    def __init__(self, model: nn.Module, task: str, mode: str):
        super().__init__()
        self.model, self.task, self.mode = model, task, mode

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        path = inputs[0] if self.mode in ("coattn", "path") else None
        codex = inputs[-1].mean(1) if self.mode in ("coattn", "codex") else None   # (B,S,T,Dc) -> (B,T,Dc)
        logits = self.model(path, codex)
        if self.task == "survival":
            from mica.survival import risk_from_logits

            return risk_from_logits(logits)
        return logits[:, 0]


def auto_internal_batch(n_patches: int, dim: int, steps: int, budget_elems: int = 2 ** 26) -> int:
    """Interpolation points per forward so that one forward holds about ``budget_elems`` input floats."""
    return int(max(1, min(steps, budget_elems // max(1, n_patches * max(dim, 256)))))


def _baseline(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "zero":
        return torch.zeros_like(x)
    if kind == "mean":  # every patch / token replaced by the mean over the bag / tokens
        return x.mean(dim=-2, keepdim=True).expand_as(x).contiguous()
    raise PipelineError(f"--ig-baseline must be one of {BASELINES}, not {kind!r}")


def integrated_gradients(model: nn.Module, item: dict[str, Any], task: str, mode: str, steps: int = 50,
                         baseline: str = "zero", internal_batch_size: int | None = None,
                         device: torch.device | str = "cpu") -> dict[str, Any]:
    """IG of one item (a dataset dict of :class:`mica.dataset.BagDataset`).

    Returns ``path_attr`` (N,) or None, ``codex_attr`` (S,T) or None, ``f_x``, ``f_baseline``, ``delta_abs``,
    ``delta`` (relative), ``internal_batch_size``.
    """
    from captum.attr import IntegratedGradients

    model.eval()
    target = ScalarTarget(model, task, mode).to(device)
    inputs: list[torch.Tensor] = []
    if mode in ("coattn", "path"):
        inputs.append(item["path"][None].to(device).float())                  # (1,N,Dp)
    if mode in ("coattn", "codex"):
        inputs.append(item["codex_slides"][None].to(device).float())          # (1,S,T,Dc)
    bases = [_baseline(x, baseline) for x in inputs]
    n = int(inputs[0].shape[1]) if mode != "codex" else 1
    dim = int(inputs[0].shape[-1])
    ib = internal_batch_size or auto_internal_batch(n, dim, steps)
    ig = IntegratedGradients(target)
    attrs, delta = ig.attribute(tuple(inputs), baselines=tuple(bases), n_steps=steps, internal_batch_size=ib,
                                return_convergence_delta=True)
    with torch.no_grad():
        f_x, f_b = float(target(*inputs)[0]), float(target(*bases)[0])
    diff = f_x - f_b
    out: dict[str, Any] = {"path_attr": None, "codex_attr": None, "f_x": f_x, "f_baseline": f_b,
                           "delta_abs": float(delta.abs().sum()), "internal_batch_size": ib}
    out["delta"] = out["delta_abs"] / abs(diff) if abs(diff) > 1e-12 else float("nan")
    i = 0
    if mode in ("coattn", "path"):
        out["path_attr"] = attrs[i][0].sum(-1).detach().cpu().numpy().astype(np.float32)      # (N,)
        i += 1
    if mode in ("coattn", "codex"):
        out["codex_attr"] = attrs[i][0].sum(-1).detach().cpu().numpy().astype(np.float32)     # (S,T)
    return out


def split_to_slides(result: dict[str, Any], item: dict[str, Any], n_tokens: int = 40) -> dict[str, dict[str, Any]]:
    """Per-slide arrays of one item's IG result: ``{slide: {coords, path_attr (N_s,), codex_attr (T,)}}``."""
    out: dict[str, dict[str, Any]] = {}
    start = 0
    coords = item["coords"]
    for j, (slide, n) in enumerate(zip(item["slides"], item["slide_sizes"])):
        if result["path_attr"] is not None:
            pa = result["path_attr"][start:start + n]
            co = np.asarray(coords[start:start + n], dtype=np.int64)
        else:
            pa, co = np.zeros(0, np.float32), np.zeros((0, 2), np.int64)
        ca = result["codex_attr"][j] if result["codex_attr"] is not None else np.full(n_tokens, np.nan, np.float32)
        out[slide] = {"coords": co, "path_attr": pa, "codex_attr": np.asarray(ca, np.float32)}
        start += n
    return out


def write_ig_h5(path: str | os.PathLike, coords: np.ndarray, path_attr: np.ndarray, codex_attr: np.ndarray,
                attrs: dict[str, Any]) -> Path:
    """Write one slide's attributions (layout in the module docstring), atomically."""
    path = Path(path)
    with atomic_path(path, suffix=".h5") as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("coords", data=np.asarray(coords, np.int64).reshape(-1, 2))
        f.create_dataset("path_attr", data=np.asarray(path_attr, np.float32).reshape(-1))
        f.create_dataset("codex_attr", data=np.asarray(codex_attr, np.float32).reshape(-1))
        f.attrs["schema_version"] = SCHEMA_VERSION
        for k, v in attrs.items():
            f.attrs[k] = v if v is not None else ""
    return path


def read_ig_h5(path: str | os.PathLike) -> dict[str, Any]:
    """Arrays and attrs of an ``ig/{slide}.h5`` file."""
    with h5py.File(path, "r") as f:
        out: dict[str, Any] = {k: f[k][:] for k in ("coords", "path_attr", "codex_attr")}
        out["attrs"] = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in f.attrs.items()}
    return out
