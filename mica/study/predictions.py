"""A MICA run's patient-level predictions, as the outcome study reads them.

Stage 09 writes, per fold k, ``fold_k/test_predictions.csv`` (the fold's validation patients) and
``fold_k/train_predictions.csv`` (its training patients, scored by the same model); each has ``case_id``, the
outcome (``time``, ``censorship`` or ``response``), the model's ``risk`` (higher = earlier event) and its discrete
survival curve ``surv_0..surv_{K-1}`` (survival), or ``logit`` and ``prob`` (response).

Pooling the folds (:func:`out_of_fold`). Each fold's model has its own risk scale, so the out-of-fold risks of
different folds are not comparable as they are. A fold's validation risks are put on a common scale with the
fold's own TRAINING patients: ``risk_z = (risk - mean_train) / sd_train`` (:data:`SCALING`), the same reference
the high/low split uses (``risk > median_train``). Survival curves and response probabilities are probabilities
and are pooled as they are.

An ensemble of the folds (:func:`ensemble`, independent cohorts) is the mean over the folds' models: mean raw risk
(every fold's risk is ``-sum_k S_k``, the expected number of bins survived, so raw risks share a unit), mean
survival curve, mean probability.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

SCALING = ("each fold's validation risks z-scored with the mean and sd of the same model's risks on the fold's "
           "training patients")


@dataclass
class FoldTable:
    """One fold's patient predictions: ``val`` and ``train`` (one row per patient), the model's hazard-bin
    ``edges`` (K+1,) (survival; None for response) and ``t_end``, the largest training time (months)."""

    fold: int
    val: pd.DataFrame
    train: pd.DataFrame
    edges: np.ndarray | None
    t_end: float = float("nan")

    @property
    def train_scale(self) -> tuple[float, float]:
        """(mean, sd) of the model's risk on its training patients (sd floored at 1e-12)."""
        r = self.train["risk"].to_numpy(float)
        return float(r.mean()), float(max(r.std(ddof=0), 1e-12))

    @property
    def threshold(self) -> float:
        """High/low cut-off: the median risk of the training patients (as ``mica.survival.median_threshold``)."""
        return float(np.median(self.train["risk"].to_numpy(float)))


@dataclass
class RunTables:
    """The fold tables of one run (``run``: its folder name; ``task``, ``mode`` from its config)."""

    run: str
    run_dir: Path
    task: str
    mode: str
    folds: list[FoldTable]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def case_ids(self) -> list[str]:
        return [c for f in self.folds for c in f.val["case_id"]]


def surv_columns(df: pd.DataFrame) -> list[str]:
    """The ``surv_k`` columns in bin order."""
    cols = [c for c in df.columns if c.startswith("surv_")]
    return sorted(cols, key=lambda c: int(c.split("_")[1]))


def _read(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise PipelineError(f"{path} does not exist: run stage 09 (python -m mica.test) on this run first")
    df = pd.read_csv(path, dtype={"case_id": str})
    if "case_id" not in df:
        raise PipelineError(f"{path} has no case_id column; rerun stage 09 on this run")
    return df


def load_run(run_dir: str | Path, folds: list[int] | None = None) -> RunTables:
    """The fold tables stage 09 wrote under ``run_dir`` (every fold of its config unless ``folds``)."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise PipelineError(f"{cfg_path} does not exist: is {run_dir} a mica.train run (OUT/mica_runs/RUN)?")
    cfg = json.loads(cfg_path.read_text())
    tables = []
    for k in folds or cfg["folds"]:
        fd = run_dir / f"fold_{k}"
        val, train = _read(fd / "test_predictions.csv"), _read(fd / "train_predictions.csv")
        meta = json.loads((fd / "checkpoint.json").read_text())
        edges = np.asarray(meta["bin_edges"], float) if meta.get("bin_edges") is not None else None
        t_end = float(train["time"].max()) if "time" in train else float("nan")
        if cfg["task"] == "survival" and not surv_columns(val):
            raise PipelineError(f"{fd / 'test_predictions.csv'} has no survival curve (surv_k columns): it was "
                                "written by an older stage 09; rerun python -m mica.test on this run")
        tables.append(FoldTable(int(k), val, train, edges, t_end))
    run = RunTables(run_dir.name, run_dir, cfg["task"], cfg["mode"], tables, cfg)
    dup = pd.Series(run.case_ids).duplicated()
    if dup.any():
        raise PipelineError(f"{run_dir}: patients {sorted(set(pd.Series(run.case_ids)[dup]))[:5]} are in the "
                            "validation side of several folds; out-of-fold pooling needs each patient in one fold")
    return run


def fold_survival_at(fold: FoldTable, df: pd.DataFrame, times: np.ndarray) -> np.ndarray:
    """(N,T) survival probabilities at ``times`` (months) of the patients of ``df`` (one of the fold's tables),
    from their discrete curves (:func:`mica.study.metrics.discrete_survival_at`)."""
    from mica.study.metrics import discrete_survival_at

    if fold.edges is None:
        raise PipelineError(f"fold {fold.fold}: no hazard-bin edges in its checkpoint.json (not a survival run)")
    return discrete_survival_at(df[surv_columns(df)].to_numpy(float), fold.edges, np.asarray(times, float),
                                fold.t_end)


def out_of_fold(run: RunTables, times: np.ndarray | None = None) -> tuple[pd.DataFrame, np.ndarray | None]:
    """Every patient once, scored by the fold whose validation side holds it.

    Returns ``(table, surv)``: ``table`` has ``case_id``, ``fold``, the outcome columns, ``risk`` (raw),
    ``score`` (survival: ``risk_z`` (:data:`SCALING`); response: ``prob``) and ``high`` (risk above the fold's
    training median); ``surv`` (N,T) at ``times`` (survival with ``times``; else None).
    """
    parts, curves = [], []
    for f in run.folds:
        v = f.val.copy()
        v["fold"] = f.fold
        if run.task == "survival":
            mean, sd = f.train_scale
            v["score"] = (v["risk"] - mean) / sd
            v["high"] = v["risk"].to_numpy(float) > f.threshold
            if times is not None:
                curves.append(fold_survival_at(f, f.val, times))
        else:
            v["score"] = v["prob"]
        parts.append(v)
    table = pd.concat(parts, ignore_index=True)
    return table, (np.concatenate(curves) if curves else None)


def training_scores(run: RunTables) -> dict[int, pd.DataFrame]:
    """Per fold, the fold model's scores of its own training patients (``case_id``, ``score``: survival
    ``risk_z`` with the same scale as :func:`out_of_fold`, response the logit), for models stacked on top of it
    (the MICA + clinical row, fitted on training patients only)."""
    out = {}
    for f in run.folds:
        t = f.train[["case_id"]].copy()
        if run.task == "survival":
            mean, sd = f.train_scale
            t["score"] = (f.train["risk"].to_numpy(float) - mean) / sd
        else:
            t["score"] = f.train["logit"].to_numpy(float)
        out[f.fold] = t
    return out
