"""Clinical baselines on the MICA folds, and the tabular discrete-time NLL head that checks ``mica.survival``.

* ``cox_cindex``: Cox proportional hazards (lifelines ``CoxPHFitter``, small ridge penalizer) on clinical covariates.
* ``logistic_auc``: logistic regression (sklearn) for the response task.
* ``nll_cindex``: a small torch model (linear or one hidden layer) on the same covariates trained with the
  repository's ``hazard_bins`` / ``nll_survival_loss`` / ``risk_from_logits`` / ``c_index`` — the MICA survival head
  without the bags. On data nobody here made it should match Cox PH (``compare_folds`` on ``load_sksurv_dataset``).

All three take a training and a validation DataFrame (one row per patient) and the covariate column names; the
covariates are prepared on the training fold only (``prepare_covariates``: numeric columns stay numeric, other
columns are one-hot coded, missing values imputed, everything standardised with the training mean/sd).

    python -m mica.baselines                       # Cox PH vs NLL head on veterans + GBSG2, 5 folds
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from mica.survival import binary_auc, c_index, hazard_bins, nll_survival_loss, risk_from_logits, to_bins
from pipeline.cli import Stage, config_from_args, require
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

SKSURV_DATASETS = ("veterans", "gbsg2")


# ---------------------------------------------------------------------------------------------------- covariates
def prepare_covariates(train_df: pd.DataFrame, val_df: pd.DataFrame,
                       covariates: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Design matrices ``(X_train (Ntr,P), X_val (Nva,P), names (P,))`` float64 from the training fold.

    A column whose non-missing values all parse as numbers (``pd.to_numeric``; bools as 0/1) is numeric, its
    missing values set to the training median (stage 1-4 coded as numbers therefore stays ordinal). Any other column
    is categorical: one indicator per training category except the first (the reference; missing values are the
    category "missing"; a validation category unseen in training gets all zeros). Columns are standardised with
    the training mean and sd; columns constant on the training fold are dropped (logged).
    """
    if not covariates:
        raise PipelineError("no clinical covariates given for the baseline; pass their column names")
    missing = [c for c in covariates if c not in train_df.columns or c not in val_df.columns]
    if missing:
        raise PipelineError(f"covariate column(s) {missing} not in the clinical table; "
                            f"available: {sorted(train_df.columns)}")
    tr_cols: list[np.ndarray] = []
    va_cols: list[np.ndarray] = []
    names: list[str] = []
    for col in covariates:
        tr, va = train_df[col], val_df[col]
        both = pd.concat([tr, va], ignore_index=True)
        if both.dtype == bool:
            both = both.astype(float)
        num = pd.to_numeric(both, errors="coerce")
        if num.notna().sum() == both.notna().sum() and not isinstance(both.dtype, pd.CategoricalDtype):
            num_tr, num_va = num.iloc[:len(tr)].to_numpy(float), num.iloc[len(tr):].to_numpy(float)
            med = np.nanmedian(num_tr) if np.isfinite(num_tr).any() else 0.0
            tr_cols.append(np.where(np.isnan(num_tr), med, num_tr))
            va_cols.append(np.where(np.isnan(num_va), med, num_va))
            names.append(col)
            continue
        cat_tr = tr.astype(object).where(tr.notna(), "missing").astype(str)
        cat_va = va.astype(object).where(va.notna(), "missing").astype(str)
        levels = sorted(cat_tr.unique())
        for level in levels[1:]:
            tr_cols.append((cat_tr == level).to_numpy(float))
            va_cols.append((cat_va == level).to_numpy(float))
            names.append(f"{col}={level}")
    x_tr = np.stack(tr_cols, axis=1) if tr_cols else np.empty((len(train_df), 0))
    x_va = np.stack(va_cols, axis=1) if va_cols else np.empty((len(val_df), 0))
    mean, sd = x_tr.mean(axis=0), x_tr.std(axis=0)
    keep = sd > 1e-12
    if not keep.all():
        log.info("baseline: dropped covariates constant on the training fold: %s",
                 [n for n, k in zip(names, keep) if not k])
    if not keep.any():
        raise PipelineError(f"every covariate of {list(covariates)} is constant on the training fold")
    x_tr = (x_tr[:, keep] - mean[keep]) / sd[keep]
    x_va = (x_va[:, keep] - mean[keep]) / sd[keep]
    return x_tr, x_va, [n for n, k in zip(names, keep) if k]


def _survival_columns(df: pd.DataFrame, time_col: str, cens_col: str) -> tuple[np.ndarray, np.ndarray]:
    for col in (time_col, cens_col):
        if col not in df.columns:
            raise PipelineError(f"survival column {col!r} not in the clinical table; available: {sorted(df.columns)}")
    t = pd.to_numeric(df[time_col], errors="coerce").to_numpy(float)
    c = pd.to_numeric(df[cens_col], errors="coerce").to_numpy(float)
    if not (np.isfinite(t).all() and np.isfinite(c).all()) or not np.isin(c, (0, 1)).all():
        raise PipelineError(f"{time_col!r} must be numbers and {cens_col!r} 0/1 (1 = censored) for every patient")
    return t, c


# ---------------------------------------------------------------------------------------------------- Cox / logistic
def cox_cindex(train_df: pd.DataFrame, val_df: pd.DataFrame, covariates: Sequence[str],
               time_col: str = "survival_months", cens_col: str = "censorship",
               penalizer: float = 0.01) -> tuple[np.ndarray, float]:
    """Cox PH (lifelines, ridge ``penalizer``) fitted on ``train_df`` -> ``(risk_val (Nva,), c-index on val_df)``.

    ``risk_val`` is the log partial hazard (higher = shorter survival), the c-index ``mica.survival.c_index``.
    """
    from lifelines import CoxPHFitter

    x_tr, x_va, names = prepare_covariates(train_df, val_df, covariates)
    t_tr, c_tr = _survival_columns(train_df, time_col, cens_col)
    t_va, c_va = _survival_columns(val_df, time_col, cens_col)
    cols = [f"x{i}" for i in range(len(names))]
    fit_df = pd.DataFrame(x_tr, columns=cols).assign(_T=t_tr, _E=1 - c_tr)
    cph = CoxPHFitter(penalizer=penalizer)
    cph.fit(fit_df, duration_col="_T", event_col="_E")
    beta = cph.params_.loc[cols].to_numpy(float)
    risk = x_va @ beta
    return risk, c_index(t_va, c_va, risk)


def logistic_auc(train_df: pd.DataFrame, val_df: pd.DataFrame, covariates: Sequence[str],
                 label_col: str = "response", C: float = 1.0) -> tuple[np.ndarray, float]:
    """Logistic regression (sklearn, L2 with inverse strength ``C``) -> ``(prob_val (Nva,), ROC AUC on val_df)``.

    A training fold with one class only predicts its rate (AUC from ``binary_auc``, NaN if val has one class).
    """
    from sklearn.linear_model import LogisticRegression

    x_tr, x_va, _ = prepare_covariates(train_df, val_df, covariates)
    y_tr = pd.to_numeric(train_df[label_col], errors="coerce").to_numpy(float)
    y_va = pd.to_numeric(val_df[label_col], errors="coerce").to_numpy(float)
    if not (np.isin(y_tr, (0, 1)).all() and np.isin(y_va, (0, 1)).all()):
        raise PipelineError(f"response column {label_col!r} must be 0/1 for every patient")
    if np.unique(y_tr).size < 2:
        log.warning("logistic baseline: training fold has one class only; predicting its rate")
        prob = np.full(len(val_df), y_tr.mean())
    else:
        prob = LogisticRegression(C=C, max_iter=2000).fit(x_tr, y_tr).predict_proba(x_va)[:, 1]
    return prob, binary_auc(y_va, prob)


# ---------------------------------------------------------------------------------------------------- tabular NLL
class TabularNLL(nn.Module):
    """Discrete-time hazard head on P covariates: ``(B,P) -> (B,K)`` logits.

    ``hidden=0``: linear, ``logits = x W^T + b`` (K risk scores); ``hidden>0``: Linear(P,hidden)-ReLU-Dropout-Linear.
    """

    def __init__(self, n_features: int, n_bins: int = 4, hidden: int = 0, dropout: float = 0.1) -> None:
        super().__init__()
        self.net = (nn.Linear(n_features, n_bins) if hidden <= 0 else
                    nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(hidden, n_bins)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def fit_nll_tabular(x: np.ndarray, times: np.ndarray, censorship: np.ndarray, n_bins: int = 4, hidden: int = 0,
                    epochs: int = 300, lr: float = 1e-2, weight_decay: float = 1e-3, alpha: float = 0.0,
                    seed: int = 0) -> tuple[TabularNLL, np.ndarray]:
    """Train ``TabularNLL`` full-batch with Adam on ``nll_survival_loss`` -> ``(model in eval mode, bin edges)``.

    Args:
        x: (N,P) standardised covariates; times (N,) and censorship (N,) (1 = censored).
        n_bins: hazard bins from ``hazard_bins`` on these (training) times; hidden: 0 = linear head.
        epochs, lr, weight_decay (L2 on the weights via AdamW's decoupled decay), alpha: as ``nll_survival_loss``.
    """
    edges = hazard_bins(times, censorship, n_bins)
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(to_bins(times, edges))
    ct = torch.as_tensor(censorship, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):  # init and dropout reproducible, the caller's RNG untouched
        torch.manual_seed(seed)
        model = TabularNLL(x.shape[1], n_bins, hidden).train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        for _ in range(epochs):
            opt.zero_grad(set_to_none=True)
            nll_survival_loss(model(xt), yt, ct, alpha=alpha).backward()
            opt.step()
    return model.eval(), edges


def nll_cindex(train_df: pd.DataFrame, val_df: pd.DataFrame, covariates: Sequence[str],
               time_col: str = "survival_months", cens_col: str = "censorship", n_bins: int = 4, hidden: int = 0,
               epochs: int = 300, lr: float = 1e-2, weight_decay: float = 1e-3,
               seed: int = 0) -> tuple[np.ndarray, float]:
    """The tabular NLL head (``fit_nll_tabular``) on clinical covariates -> ``(risk_val (Nva,), c-index)``;
    risk = ``risk_from_logits`` (-sum of the survival curve), bins from the training fold's uncensored times."""
    x_tr, x_va, _ = prepare_covariates(train_df, val_df, covariates)
    t_tr, c_tr = _survival_columns(train_df, time_col, cens_col)
    t_va, c_va = _survival_columns(val_df, time_col, cens_col)
    model, _ = fit_nll_tabular(x_tr, t_tr, c_tr, n_bins=n_bins, hidden=hidden, epochs=epochs, lr=lr,
                               weight_decay=weight_decay, seed=seed)
    with torch.no_grad():
        risk = risk_from_logits(model(torch.as_tensor(x_va, dtype=torch.float32))).double().numpy()
    return risk, c_index(t_va, c_va, risk)


# ---------------------------------------------------------------------------------------------------- real data
def load_sksurv_dataset(name: str) -> tuple[pd.DataFrame, list[str], str, str]:
    """A scikit-survival bundled dataset as ``(df, covariates, time_col, cens_col)`` in the MICA convention.

    ``veterans`` (veterans' lung cancer trial, 137 patients, days) or ``gbsg2`` (German breast cancer study, 686
    patients, days). ``df`` has the covariates (categoricals as they come; ``prepare_covariates`` codes them),
    ``survival_days`` and ``censorship`` (1 = censored).
    """
    from sksurv import datasets

    loaders = {"veterans": datasets.load_veterans_lung_cancer, "gbsg2": datasets.load_gbsg2}
    if name not in loaders:
        raise PipelineError(f"unknown dataset {name!r}; choose one of {', '.join(SKSURV_DATASETS)}")
    x, y = loaders[name]()
    event_field, time_field = y.dtype.names
    df = x.reset_index(drop=True).copy()
    df["survival_days"] = y[time_field].astype(float)
    df["censorship"] = 1.0 - y[event_field].astype(float)
    return df, list(x.columns), "survival_days", "censorship"


def compare_folds(df: pd.DataFrame, covariates: Sequence[str], time_col: str, cens_col: str, n_folds: int = 5,
                  seed: int = 0, penalizer: float = 0.01, **nll_kw) -> pd.DataFrame:
    """Cox PH vs the tabular NLL head on the same ``KFold(n_folds, shuffle=True, random_state=seed)`` folds.

    Returns one row per fold: ``fold, n_val, events_val, cox, nll`` (validation c-indices), plus a ``mean`` row.
    ``nll_kw`` go to ``nll_cindex`` (n_bins, hidden, epochs, lr, weight_decay, seed).
    """
    from sklearn.model_selection import KFold

    rows = []
    for k, (tr, va) in enumerate(KFold(n_folds, shuffle=True, random_state=seed).split(df)):
        train_df, val_df = df.iloc[tr].reset_index(drop=True), df.iloc[va].reset_index(drop=True)
        _, cox = cox_cindex(train_df, val_df, covariates, time_col, cens_col, penalizer=penalizer)
        _, nll = nll_cindex(train_df, val_df, covariates, time_col, cens_col, **nll_kw)
        rows.append({"fold": k, "n_val": len(va), "events_val": int((1 - val_df[cens_col]).sum()),
                     "cox": cox, "nll": nll})
    out = pd.DataFrame(rows)
    mean = {"fold": "mean", "n_val": out["n_val"].sum(), "events_val": out["events_val"].sum(),
            "cox": out["cox"].mean(), "nll": out["nll"].mean()}
    return pd.concat([out, pd.DataFrame([mean])], ignore_index=True)


# ---------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Cox PH vs the discrete-time NLL head on scikit-survival's bundled "
                                "datasets (5-fold validation c-index per fold and mean).")
    p.add_argument("--datasets", nargs="+", choices=SKSURV_DATASETS, default=list(SKSURV_DATASETS))
    p.add_argument("--folds", type=int, default=5, help="KFold folds (shuffled)")
    p.add_argument("--seed", type=int, default=0, help="KFold shuffle seed and NLL model seed")
    p.add_argument("--n-bins", type=int, default=4, help="hazard bins (quantiles of uncensored training times)")
    p.add_argument("--hidden", type=int, default=0, help="NLL head hidden units (0: linear)")
    p.add_argument("--epochs", type=int, default=300, help="full-batch Adam steps of the NLL head")
    p.add_argument("--penalizer", type=float, default=0.01, help="Cox ridge penalizer (lifelines)")
    return p


@dataclass
class BaselinesConfig:
    """``python -m mica.baselines``'s settings (the flags of the same names)."""

    datasets: list[str] = field(default_factory=lambda: list(SKSURV_DATASETS))
    folds: int = 5
    seed: int = 0
    n_bins: int = 4
    hidden: int = 0
    epochs: int = 300
    penalizer: float = 0.01


def make_config(args: argparse.Namespace) -> BaselinesConfig:
    """The flags as a :class:`BaselinesConfig`; a value the folds or the head cannot use stops here (one line)."""
    cfg = config_from_args(BaselinesConfig, args)
    for flag, value, ok, want in (("--folds", cfg.folds, cfg.folds >= 2, ">= 2"),
                                  ("--n-bins", cfg.n_bins, cfg.n_bins >= 1, ">= 1"),
                                  ("--hidden", cfg.hidden, cfg.hidden >= 0, ">= 0"),
                                  ("--epochs", cfg.epochs, cfg.epochs >= 1, ">= 1"),
                                  ("--penalizer", cfg.penalizer, cfg.penalizer >= 0, ">= 0")):
        require(ok, f"{flag} {value}: must be {want}")
    return cfg


def run(cfg: BaselinesConfig, ctx: Any) -> int:
    """Print, per dataset, the validation c-index of Cox PH and of the NLL head on the same folds; returns 0."""
    for name in cfg.datasets:
        df, covariates, time_col, cens_col = load_sksurv_dataset(name)
        table = compare_folds(df, covariates, time_col, cens_col, n_folds=cfg.folds, seed=cfg.seed,
                              penalizer=cfg.penalizer, n_bins=cfg.n_bins, hidden=cfg.hidden, epochs=cfg.epochs)
        print(f"{name}: validation c-index, Cox PH vs discrete-time NLL head\n{table.round(4).to_string(index=False)}")
    return 0


STAGE = Stage("mica.baselines", build_parser, make_config, run=run)


def main(argv: list[str] | None = None) -> int:
    return STAGE.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
