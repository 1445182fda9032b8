"""Real data nobody here made (scikit-survival's bundled veterans' lung cancer trial and GBSG2): the repository's
discrete-time NLL head (``hazard_bins`` + ``nll_survival_loss`` + ``risk_from_logits`` + ``c_index``) on the tabular
covariates matches Cox PH within 0.03 c-index on the same 5 folds, and ``c_index`` equals scikit-survival's and
lifelines' on the same predictions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import KFold

from mica.baselines import compare_folds, load_sksurv_dataset, nll_cindex
from mica.survival import c_index

pytestmark = pytest.mark.slow  # fits on two real data sets (~9 s)

TOLERANCE = 0.03


@pytest.mark.parametrize("name", ["veterans", "gbsg2"])
def test_nll_head_matches_cox_on_the_same_folds(name: str) -> None:
    df, covariates, time_col, cens_col = load_sksurv_dataset(name)
    assert len(df) == {"veterans": 137, "gbsg2": 686}[name]
    table = compare_folds(df, covariates, time_col, cens_col, n_folds=5, seed=0)
    print(f"\n{name}: 5-fold c-index, Cox PH vs discrete-time NLL head\n{table.round(4).to_string(index=False)}")
    folds, mean = table.iloc[:5], table.iloc[5]
    assert folds[["cox", "nll"]].notna().all().all()
    assert mean["cox"] > 0.62 and mean["nll"] > 0.62            # both learn something on real data
    assert abs(mean["nll"] - mean["cox"]) <= TOLERANCE, f"{name}: NLL {mean['nll']:.4f} vs Cox {mean['cox']:.4f}"


def _out_of_fold_risk(name: str) -> tuple[pd.DataFrame, np.ndarray, str, str]:
    df, covariates, time_col, cens_col = load_sksurv_dataset(name)
    risk = np.empty(len(df))
    for tr, va in KFold(5, shuffle=True, random_state=0).split(df):
        risk[va], _ = nll_cindex(df.iloc[tr], df.iloc[va], covariates, time_col, cens_col)
    return df, risk, time_col, cens_col


@pytest.mark.parametrize("name", ["veterans", "gbsg2"])
def test_c_index_equals_sksurv_and_lifelines(name: str) -> None:
    from lifelines.utils import concordance_index
    from sksurv.metrics import concordance_index_censored

    df, risk, time_col, cens_col = _out_of_fold_risk(name)
    t, c = df[time_col].to_numpy(float), df[cens_col].to_numpy(float)
    assert len(np.unique(t)) < len(t)            # the data have tied times: the tie rules are exercised
    for r in (risk, np.round(risk, 2)):          # continuous risks, then many tied risks
        ours = c_index(t, c, r)
        sk = concordance_index_censored(c == 0, t, r)[0]
        ll = concordance_index(t, -r, 1 - c)     # lifelines: higher score = longer survival
        print(f"{name}: c-index ours {ours:.12f} sksurv {sk:.12f} lifelines {ll:.12f}")
        assert abs(ours - sk) < 1e-9 and abs(ours - ll) < 1e-9
