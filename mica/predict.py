"""MICA predictions: items one by one through the model, per-item loss, per-patient tables and the validation
metric (c-index or AUC); used by ``mica.train`` (validation each epoch) and ``mica.test``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mica.dataset import BagDataset


def _identity(x: Any) -> Any:
    return x


def loader(ds: BagDataset, order: Sequence[int], workers: int) -> DataLoader:
    """Items one by one (batch 1, no collation) in ``order``, read by ``workers`` processes."""
    return DataLoader(ds, batch_size=None, sampler=list(order), num_workers=workers, collate_fn=_identity,
                      persistent_workers=False)


def forward(model: torch.nn.Module, item: dict[str, Any], device: torch.device) -> torch.Tensor:
    """(1, out_dim) logits of one item."""
    path = item["path"][None].to(device) if item["path"] is not None else None
    codex = item["codex"][None].to(device) if item["codex"] is not None else None
    return model(path, codex)


def item_loss(logits: torch.Tensor, item: dict[str, Any], task: str, alpha: float) -> torch.Tensor:
    from mica.survival import nll_survival_loss

    dev = logits.device
    if task == "survival":
        return nll_survival_loss(logits, item["y_bin"].view(1).to(dev), item["censorship"].view(1).to(dev), alpha)
    return F.binary_cross_entropy_with_logits(logits[:, 0], item["response"].view(1).to(dev))


@torch.no_grad()
def predict(model: torch.nn.Module, ds: BagDataset, device: torch.device, task: str, workers: int = 0,
            alpha: float = 0.0, desc: str = "predict") -> tuple[pd.DataFrame, float]:
    """Per-item predictions (risk = -sum S for survival, sigmoid prob for response) and the mean loss over the
    items with an outcome (NaN when none has one)."""
    from mica.survival import risk_from_logits, survival_curve

    model.eval()
    rows, losses = [], []
    for item in tqdm(loader(ds, range(len(ds)), workers), total=len(ds), desc=desc, leave=False):
        logits = forward(model, item, device)
        row: dict[str, Any] = {"case_id": item["case_id"], "slides": ";".join(item["slides"])}
        labelled = int(item["y_bin"]) >= 0 if task == "survival" else bool(torch.isfinite(item["response"]))
        if labelled:  # an independent cohort without outcome (or bins) has no loss
            losses.append(float(item_loss(logits, item, task, alpha)))
        if task == "survival":
            row.update(time=float(item["time"]), censorship=float(item["censorship"]), y_bin=int(item["y_bin"]),
                       risk=float(risk_from_logits(logits)[0]))
            row.update({f"surv_{k}": float(v) for k, v in enumerate(survival_curve(logits)[0].cpu())})
        else:
            z = float(logits[0, 0])
            row.update(response=float(item["response"]), logit=z, prob=float(1 / (1 + np.exp(-z))))
        rows.append(row)
    return pd.DataFrame(rows), float(np.mean(losses)) if losses else float("nan")


def patient_table(pred: pd.DataFrame, task: str) -> pd.DataFrame:
    """One row per patient: slide-level rows (``--unit slide``) averaged (risk, the discrete survival curve
    ``surv_k`` = S_k, the probability to outlive hazard bin k, and the logit; prob recomputed)."""
    if task == "survival":
        curve = {c: (c, "mean") for c in pred.columns if c.startswith("surv_")}
        return pred.groupby("case_id", sort=False).agg(time=("time", "first"), censorship=("censorship", "first"),
                                                       risk=("risk", "mean"), **curve).reset_index()
    g = pred.groupby("case_id", sort=False).agg(response=("response", "first"), logit=("logit", "mean")).reset_index()
    g["prob"] = 1 / (1 + np.exp(-g["logit"]))
    return g


def score(pred: pd.DataFrame, task: str) -> float:
    """Validation c-index (survival) or AUC (response) over patients."""
    from mica.survival import binary_auc, c_index

    pt = patient_table(pred, task)
    if task == "survival":
        return c_index(pt["time"], pt["censorship"], pt["risk"])
    return binary_auc(pt["response"], pt["prob"])
