"""Clinical baselines on the MICA folds, and the tabular discrete-time NLL head that checks ``mica.survival``.

* ``CovariateCoder``: the clinical design matrix, coded on the training table only (numeric columns stay numeric,
  other columns one-hot against their first level, missing values imputed, standardised with the training mean/sd)
  and applied unchanged to any later table (a validation fold, an external cohort).
* ``ClinicalCox``: Cox proportional hazards (lifelines ``CoxPHFitter``, small ridge penalizer) on the coded
  covariates: ``.risk(df)`` (log partial hazard) and ``.survival_at(df, times)`` (survival curves). With a model's
  risk as one more covariate it is the combined model (MICA + clinical).
* ``ClinicalLogistic``: logistic regression (sklearn) for the response task, ``.prob(df)``.
* ``cox_cindex`` / ``logistic_auc``: fit on a training fold, score a validation fold (c-index / ROC AUC).
* ``nll_cindex``: a small torch model (linear or one hidden layer) on the same covariates trained with the
  repository's ``hazard_bins`` / ``nll_survival_loss`` / ``risk_from_logits`` / ``c_index`` — the MICA survival head
  without the bags. On data nobody here made it should match Cox PH (``compare_folds`` on ``load_sksurv_dataset``).
* ``default_covariates``: the covariate columns of a clinical table (all but ids, outcomes and free text).

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
OUTCOME_COLUMNS = ("case_id", "slide_id", "survival_months", "censorship", "response")
MAX_FREE_TEXT_LEVELS = 20


def _is_numeric(col: pd.Series) -> tuple[bool, pd.Series]:
    """``(numeric?, the column as float)``: numeric when every non-missing value parses (bools as 0/1) and the
    column is not a pandas Categorical."""
    if col.dtype == bool:
        col = col.astype(float)
    num = pd.to_numeric(col, errors="coerce")
    ok = num.notna().sum() == col.notna().sum() and not isinstance(col.dtype, pd.CategoricalDtype)
    return bool(ok), num


def _as_category(col: pd.Series) -> pd.Series:
    return col.astype(object).where(col.notna(), "missing").astype(str)


@dataclass
class CovariateCoder:
    """The clinical design matrix, coded on one (training) table and applied unchanged to any later table.

    A column whose non-missing training values all parse as numbers (``pd.to_numeric``; bools as 0/1) is numeric,
    its missing values set to the training median (stage 1-4 coded as numbers therefore stays ordinal); a later
    value that does not parse counts as missing. Any other column is categorical: one indicator per training
    category except the first in sorted order (the reference; missing values are the category "missing"; a later
    category unseen in training gets all zeros). Columns are then standardised with the training mean and sd
    (``scale="all"``) or only the numeric ones (``scale="numeric"``: indicators stay 0/1); columns constant on the
    training table are dropped (logged).

    Fitted state: ``covariates`` (input columns), ``medians`` {numeric column: median}, ``levels`` {categorical
    column: sorted training levels}, ``mean``/``sd`` (P,) of the kept design columns, ``names`` (P,) of those
    columns (``col`` or ``col=level``), ``numeric`` (P,) bool.
    """

    covariates: list[str]
    medians: dict[str, float]
    levels: dict[str, list[str]]
    names: list[str]
    numeric: list[bool]
    mean: np.ndarray
    sd: np.ndarray
    keep: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, bool))

    @staticmethod
    def _check(df: pd.DataFrame, covariates: Sequence[str]) -> None:
        if not covariates:
            raise PipelineError("no clinical covariates given for the baseline; pass their column names")
        missing = [c for c in covariates if c not in df.columns]
        if missing:
            raise PipelineError(f"covariate column(s) {missing} not in the clinical table; "
                                f"available: {sorted(map(str, df.columns))}")

    @classmethod
    def fit(cls, train_df: pd.DataFrame, covariates: Sequence[str], scale: str = "all") -> CovariateCoder:
        """Code ``covariates`` of ``train_df`` (one row per patient); ``scale`` ``"all"`` or ``"numeric"``."""
        if scale not in ("all", "numeric"):
            raise PipelineError(f"CovariateCoder scale must be 'all' or 'numeric', not {scale!r}")
        cls._check(train_df, covariates)
        medians: dict[str, float] = {}
        levels: dict[str, list[str]] = {}
        names: list[str] = []
        numeric: list[bool] = []
        for col in covariates:
            is_num, num = _is_numeric(train_df[col])
            if is_num:
                vals = num.to_numpy(float)
                medians[col] = float(np.nanmedian(vals)) if np.isfinite(vals).any() else 0.0
                names.append(col)
                numeric.append(True)
            else:
                levels[col] = sorted(_as_category(train_df[col]).unique())
                names += [f"{col}={level}" for level in levels[col][1:]]
                numeric += [False] * (len(levels[col]) - 1)
        coder = cls(list(covariates), medians, levels, names, numeric, np.zeros(len(names)), np.ones(len(names)))
        x = coder._raw(train_df)
        mean, sd = x.mean(axis=0), x.std(axis=0)
        keep = sd > 1e-12
        if not keep.all():
            log.info("baseline: dropped covariates constant on the training fold: %s",
                     [n for n, k in zip(names, keep) if not k])
        if not keep.any():
            raise PipelineError(f"every covariate of {list(covariates)} is constant on the training fold")
        is_num = np.asarray(numeric, bool)
        if scale == "numeric":
            mean, sd = np.where(is_num, mean, 0.0), np.where(is_num, sd, 1.0)
        coder.names = [n for n, k in zip(names, keep) if k]
        coder.numeric = [bool(v) for v, k in zip(is_num, keep) if k]
        coder.mean, coder.sd = mean[keep], sd[keep]
        coder.keep = keep
        return coder

    def _raw(self, df: pd.DataFrame) -> np.ndarray:
        """The unscaled design (N, all training columns before dropping constants)."""
        self._check(df, self.covariates)
        cols: list[np.ndarray] = []
        for col in self.covariates:
            if col in self.medians:
                _, num = _is_numeric(df[col])
                vals = num.to_numpy(float)
                if (num.isna() & df[col].notna()).any():
                    log.warning("covariate %r: %d non-numeric value(s) treated as missing (training median %g)",
                                col, int((num.isna() & df[col].notna()).sum()), self.medians[col])
                cols.append(np.where(np.isnan(vals), self.medians[col], vals))
            else:
                cat = _as_category(df[col])
                cols += [(cat == level).to_numpy(float) for level in self.levels[col][1:]]
        return np.stack(cols, axis=1) if cols else np.empty((len(df), 0))

    def transform(self, df: pd.DataFrame) -> np.ndarray:
        """The design matrix (N,P) float64 of any table with the covariate columns, coded as on the training table."""
        return (self._raw(df)[:, self.keep] - self.mean) / self.sd

    def frame(self, df: pd.DataFrame) -> pd.DataFrame:
        """:meth:`transform` as a DataFrame with columns :attr:`names` and ``df``'s index."""
        return pd.DataFrame(self.transform(df), columns=self.names, index=df.index)


def prepare_covariates(train_df: pd.DataFrame, val_df: pd.DataFrame,
                       covariates: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Design matrices ``(X_train (Ntr,P), X_val (Nva,P), names (P,))`` float64 of a :class:`CovariateCoder`
    fitted on ``train_df`` (the rules are its own)."""
    CovariateCoder._check(val_df, covariates)
    coder = CovariateCoder.fit(train_df, covariates)
    return coder.transform(train_df), coder.transform(val_df), list(coder.names)


def default_covariates(clinical: pd.DataFrame) -> list[str]:
    """The clinical covariates of a table: every column except ids and outcomes (``case_id``, ``slide_id``,
    ``survival_months``, ``censorship``, ``response`` and any ``*_id``), less free-text columns (more than
    ``MAX_FREE_TEXT_LEVELS`` distinct non-numeric values; logged). PipelineError naming the table when none remain."""
    where = clinical.attrs.get("path", "the clinical table")
    candidates = [c for c in clinical.columns
                  if str(c) not in OUTCOME_COLUMNS and not str(c).endswith("_id")]
    kept: list[str] = []
    for col in candidates:
        is_num, _ = _is_numeric(clinical[col])
        n_levels = clinical[col].dropna().astype(str).nunique()
        if not is_num and n_levels > MAX_FREE_TEXT_LEVELS:
            log.info("%s: column %r looks like free text (%d distinct values); not a covariate", where, col, n_levels)
            continue
        kept.append(str(col))
    if not kept:
        raise PipelineError(f"{where}: no clinical covariate columns besides ids and outcomes "
                            f"(columns: {', '.join(map(str, clinical.columns))}); add e.g. age and stage")
    return kept


def survival_columns(df: pd.DataFrame, time_col: str, cens_col: str) -> tuple[np.ndarray, np.ndarray]:
    """``(times (N,), censorship (N,) 0/1, 1 = censored)`` float64 of a table; one line naming a bad column."""
    for col in (time_col, cens_col):
        if col not in df.columns:
            raise PipelineError(f"survival column {col!r} not in the clinical table; available: {sorted(df.columns)}")
    t = pd.to_numeric(df[time_col], errors="coerce").to_numpy(float)
    c = pd.to_numeric(df[cens_col], errors="coerce").to_numpy(float)
    if not (np.isfinite(t).all() and np.isfinite(c).all()) or not np.isin(c, (0, 1)).all():
        raise PipelineError(f"{time_col!r} must be numbers and {cens_col!r} 0/1 (1 = censored) for every patient")
    return t, c


def _labels(df: pd.DataFrame, label_col: str) -> np.ndarray:
    if label_col not in df.columns:
        raise PipelineError(f"response column {label_col!r} not in the clinical table; available: {sorted(df.columns)}")
    y = pd.to_numeric(df[label_col], errors="coerce").to_numpy(float)
    if not np.isin(y, (0, 1)).all():
        raise PipelineError(f"response column {label_col!r} must be 0/1 for every patient")
    return y


# ---------------------------------------------------------------------------------------------------- Cox / logistic
@dataclass
class ClinicalCox:
    """Cox PH (lifelines ``CoxPHFitter``, ridge ``penalizer``) on a :class:`CovariateCoder` design fitted on the
    training table only. A covariate may be another model's risk (``train_df.assign(mica_risk=...)``, then
    ``[*covariates, "mica_risk"]``): the combined model."""

    coder: CovariateCoder
    model: Any  # lifelines.CoxPHFitter

    @property
    def names(self) -> list[str]:
        """The design columns (P,) the coefficients belong to (``col`` or ``col=level``)."""
        return list(self.coder.names)

    @classmethod
    def fit(cls, train_df: pd.DataFrame, covariates: Sequence[str], time_col: str = "survival_months",
            cens_col: str = "censorship", penalizer: float = 0.01) -> ClinicalCox:
        """Fit on ``train_df`` (one row per patient; ``censorship`` 1 = censored)."""
        from lifelines import CoxPHFitter

        t, c = survival_columns(train_df, time_col, cens_col)
        if not (c == 0).any():
            raise PipelineError(f"Cox baseline: no events ({cens_col} 0) in the {len(t)} training patients")
        coder = CovariateCoder.fit(train_df, covariates)
        fit_df = coder.frame(train_df).reset_index(drop=True).assign(__time__=t, __event__=1 - c)
        model = CoxPHFitter(penalizer=penalizer).fit(fit_df, duration_col="__time__", event_col="__event__")
        return cls(coder, model)

    def risk(self, df: pd.DataFrame) -> np.ndarray:
        """Log partial hazard (N,) (lifelines ``predict_log_partial_hazard``): higher = earlier event."""
        return self.model.predict_log_partial_hazard(self.coder.frame(df)).to_numpy(float)

    def survival_at(self, df: pd.DataFrame, times: Sequence[float] | np.ndarray) -> np.ndarray:
        """Survival probabilities (N,T) at ``times`` (same unit as the training times, any order):
        ``S0(t) ** exp(risk)`` with the Breslow baseline (lifelines ``baseline_cumulative_hazard_``) read as the
        step function it is (lifelines' ``predict_survival_function`` interpolates linearly between event times;
        the two agree at the training times); 1 before the first training time."""
        times = np.asarray(times, float).reshape(-1)
        base = self.model.baseline_cumulative_hazard_
        knots, h0 = base.index.to_numpy(float), base.to_numpy(float).reshape(-1)
        pos = np.searchsorted(knots, times, side="right") - 1
        h_t = np.where(pos >= 0, h0[np.clip(pos, 0, None)], 0.0)                      # (T,)
        partial = np.exp(self.risk(df))                                                 # (N,)
        return np.exp(-partial[:, None] * h_t[None, :])


@dataclass
class ClinicalLogistic:
    """Logistic regression (sklearn, L2 with inverse strength ``C``) on a :class:`CovariateCoder` design fitted on
    the training table only; a training table with one class predicts its rate."""

    coder: CovariateCoder
    model: Any  # sklearn LogisticRegression, or None for a one-class training table
    rate: float

    @property
    def names(self) -> list[str]:
        """The design columns (P,)."""
        return list(self.coder.names)

    @classmethod
    def fit(cls, train_df: pd.DataFrame, covariates: Sequence[str], label_col: str = "response",
            C: float = 1.0) -> ClinicalLogistic:
        """Fit on ``train_df`` (one row per patient, ``label_col`` 0/1)."""
        from sklearn.linear_model import LogisticRegression

        y = _labels(train_df, label_col)
        coder = CovariateCoder.fit(train_df, covariates)
        if np.unique(y).size < 2:
            log.warning("logistic baseline: training fold has one class only; predicting its rate")
            return cls(coder, None, float(y.mean()))
        model = LogisticRegression(C=C, max_iter=2000).fit(coder.transform(train_df), y)
        return cls(coder, model, float(y.mean()))

    def prob(self, df: pd.DataFrame) -> np.ndarray:
        """Probability of response (N,) in [0, 1]."""
        if self.model is None:
            return np.full(len(df), self.rate)
        return self.model.predict_proba(self.coder.transform(df))[:, 1]


def cox_cindex(train_df: pd.DataFrame, val_df: pd.DataFrame, covariates: Sequence[str],
               time_col: str = "survival_months", cens_col: str = "censorship",
               penalizer: float = 0.01) -> tuple[np.ndarray, float]:
    """:class:`ClinicalCox` fitted on ``train_df`` -> ``(risk_val (Nva,), c-index on val_df)``.

    ``risk_val`` is the log partial hazard (higher = shorter survival), the c-index ``mica.survival.c_index``.
    """
    t_va, c_va = survival_columns(val_df, time_col, cens_col)
    risk = ClinicalCox.fit(train_df, covariates, time_col, cens_col, penalizer=penalizer).risk(val_df)
    return risk, c_index(t_va, c_va, risk)


def logistic_auc(train_df: pd.DataFrame, val_df: pd.DataFrame, covariates: Sequence[str],
                 label_col: str = "response", C: float = 1.0) -> tuple[np.ndarray, float]:
    """:class:`ClinicalLogistic` fitted on ``train_df`` -> ``(prob_val (Nva,), ROC AUC on val_df)``.

    A training fold with one class only predicts its rate (AUC from ``binary_auc``, NaN if val has one class).
    """
    y_va = _labels(val_df, label_col)
    prob = ClinicalLogistic.fit(train_df, covariates, label_col, C=C).prob(val_df)
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
    t_tr, c_tr = survival_columns(train_df, time_col, cens_col)
    t_va, c_va = survival_columns(val_df, time_col, cens_col)
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
