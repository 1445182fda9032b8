"""The rows of an outcome report: MICA runs, the clinical model, MICA + clinical, and a reference (the truth).

Internal report (the run's own folds, :func:`internal_rows`): every patient is scored out of fold. Runs compared
with the primary one must have the same folds with the same validation patients. ``clinical``: Cox PH (survival,
:class:`mica.baselines.ClinicalCox`) or logistic regression (response) on the clinical covariates, fitted per fold
on the fold's training patients; its risks pooled with the same z-scaling as MICA's. ``{primary}+clinical``: the
same model with the primary run's score as one more covariate, fitted on the training patients only, where the
score of a training patient is the fold model's own (in-sample) score of it -- the only one that exists without
nested folds, so the model leans on MICA more than out-of-sample scores would justify (stated in the report).

Independent cohort (:func:`external_rows`): MICA is the fold ensemble (and each fold's model as its own row); the
clinical and combined models are fitted on the whole training cohort (the combined one on the run's out-of-fold
scores) and applied to the independent cohort.

Reference rows: ``--truth CSV`` (``case_id`` and ``risk`` or ``prob``), e.g. the generator's true risk.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mica.study.predictions import RunTables, fold_survival_at, out_of_fold, training_scores
from mica.study.report import Cohort, Row
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

COMBINED_NOTE = ("the {p}+clinical model is fitted on each fold's training patients with the fold model's own "
                 "(in-sample) score of them, so it leans on {p} more than out-of-sample scores would justify")


def row_name(run: RunTables, runs: Sequence[RunTables]) -> str:
    """A run's row: its mode (coattn, path, codex), or its run name when two runs share a mode."""
    same = [r for r in runs if r.mode == run.mode]
    return run.mode if len(same) == 1 else run.run


def check_same_folds(primary: RunTables, other: RunTables) -> None:
    """Runs compared on one report must have the same folds with the same validation patients and task."""
    if other.task != primary.task:
        raise PipelineError(f"run {other.run} is a {other.task} run, {primary.run} a {primary.task} run; compare runs "
                            "of one task")
    a = {f.fold: set(f.val["case_id"]) for f in primary.folds}
    b = {f.fold: set(f.val["case_id"]) for f in other.folds}
    if a.keys() != b.keys():
        raise PipelineError(f"runs {primary.run} and {other.run} have other folds ({sorted(a)} vs {sorted(b)}); "
                            "compare runs trained on the same split files")
    for k in a:
        if a[k] != b[k]:
            raise PipelineError(f"fold {k}: runs {primary.run} and {other.run} validate on other patients "
                                f"({len(a[k] ^ b[k])} differ); compare runs trained on the same split files")


def read_truth(path: str | Path, task: str) -> pd.Series:
    """A reference score per patient (index case_id) from a CSV with ``case_id`` and ``risk`` (survival) or
    ``prob`` (response)."""
    col = "risk" if task == "survival" else "prob"
    p = Path(path)
    if not p.is_file():
        raise PipelineError(f"--truth {p} does not exist")
    df = pd.read_csv(p, dtype={"case_id": str})
    if "case_id" not in df or col not in df:
        raise PipelineError(f"--truth {p} needs columns case_id and {col} (the {task} task)")
    return df.drop_duplicates("case_id").set_index("case_id")[col].astype(float)


def _zscore(values: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return (values - ref.mean()) / max(ref.std(ddof=0), 1e-12)


def _clinical_models(task: str):
    from mica.baselines import ClinicalCox, ClinicalLogistic

    return ClinicalCox if task == "survival" else ClinicalLogistic


def _fit(task: str, train: pd.DataFrame, covariates: Sequence[str]):
    model = _clinical_models(task)
    return model.fit(train, list(covariates))


def _predict(task: str, model, train: pd.DataFrame, df: pd.DataFrame, times: np.ndarray | None
             ) -> tuple[np.ndarray, np.ndarray | None]:
    if task == "survival":
        risk = _zscore(model.risk(df), model.risk(train))
        return risk, (model.survival_at(df, times) if times is not None else None)
    return model.prob(df), None


def internal_rows(primary: RunTables, others: Sequence[RunTables], clinical: pd.DataFrame | None,
                  covariates: Sequence[str], times: np.ndarray | None, truth: pd.Series | None = None
                  ) -> tuple[Cohort, list[Row], np.ndarray | None, list[str]]:
    """The cohort (every patient once, out of fold), the rows, the primary run's high-risk group and notes.

    ``clinical``: one row per patient (index case_id) with the covariates; ``times`` (T,) for survival curves.
    """
    task = primary.task
    oof, surv = out_of_fold(primary, times)
    ids = oof["case_id"].astype(str).to_numpy()
    if task == "survival":
        cohort = Cohort("internal, out of fold", task, ids, time=oof["time"].to_numpy(float),
                        event=(oof["censorship"].to_numpy(float) == 0), fold=oof["fold"].to_numpy(int))
    else:
        cohort = Cohort("internal, out of fold", task, ids, response=oof["response"].to_numpy(float),
                        fold=oof["fold"].to_numpy(int))
    runs = [primary, *others]
    rows = [Row(row_name(primary, runs), oof["score"].to_numpy(float), surv)]
    for r in others:
        check_same_folds(primary, r)
        o, s = out_of_fold(r, times)
        pos = pd.Series(np.arange(len(o)), index=o["case_id"].astype(str)).loc[ids].to_numpy()
        rows.append(Row(row_name(r, runs), o["score"].to_numpy(float)[pos], None if s is None else s[pos]))
    notes = []
    if clinical is not None and covariates:
        pname = rows[0].name
        clin_score, comb_score = np.full(len(ids), np.nan), np.full(len(ids), np.nan)
        clin_surv = None if times is None or task != "survival" else np.full((len(ids), len(times)), np.nan)
        comb_surv = None if clin_surv is None else clin_surv.copy()
        tr_scores = training_scores(primary)
        val_mica = oof["score"] if task == "survival" else oof["logit"]
        for f in primary.folds:
            m = cohort.fold == f.fold
            val_ids, train_ids = ids[m], f.train["case_id"].astype(str).tolist()
            tr, va = clinical.loc[train_ids], clinical.loc[val_ids]
            model = _fit(task, tr, covariates)
            clin_score[m], s = _predict(task, model, tr, va, times)
            if clin_surv is not None:
                clin_surv[m] = s
            tr2 = tr.assign(mica_score=tr_scores[f.fold]["score"].to_numpy(float))
            va2 = va.assign(mica_score=val_mica.to_numpy(float)[m])
            model2 = _fit(task, tr2, [*covariates, "mica_score"])
            comb_score[m], s2 = _predict(task, model2, tr2, va2, times)
            if comb_surv is not None:
                comb_surv[m] = s2
        rows += [Row("clinical", clin_score, clin_surv), Row(f"{pname}+clinical", comb_score, comb_surv)]
        notes.append(COMBINED_NOTE.format(p=pname))
    if truth is not None:
        rows.append(_truth_row(truth, ids))
    groups = oof["high"].to_numpy(bool) if task == "survival" else None
    return cohort, rows, groups, notes


def _fold_curves(run: RunTables, fold_preds: pd.DataFrame, ids: np.ndarray, times: np.ndarray | None
                 ) -> dict[int, np.ndarray]:
    """{fold: (N,T) survival at ``times``} of each fold model on the patients ``ids`` (fold_predictions.csv)."""
    if times is None:
        return {}
    out = {}
    for f in run.folds:
        fp = fold_preds[fold_preds["fold"] == f.fold].set_index("case_id").loc[list(ids)].reset_index()
        out[f.fold] = fold_survival_at(f, fp, times)
    return out


def _truth_row(truth: pd.Series, ids: np.ndarray) -> Row:
    missing = [c for c in ids if c not in truth.index]
    if missing:
        raise PipelineError(f"--truth has no value for {len(missing)} patients ({', '.join(missing[:3])}, ...)")
    return Row("truth", truth.loc[list(ids)].to_numpy(float))


def external_rows(primary: RunTables, ext: pd.DataFrame, fold_preds: pd.DataFrame, train_clinical: pd.DataFrame
                  | None, ext_clinical: pd.DataFrame | None, covariates: Sequence[str], times: np.ndarray | None,
                  cohort_name: str, truth: pd.Series | None = None,
                  others: Sequence[tuple[RunTables, pd.DataFrame, pd.DataFrame]] = ()
                  ) -> tuple[Cohort, list[Row], np.ndarray | None, list[str]]:
    """Rows of an independent cohort from :func:`mica.external.apply_run`'s tables (``ext`` = predictions.csv,
    ``fold_preds`` = fold_predictions.csv); clinical models fitted on ``train_clinical`` (the training cohort,
    one row per patient, index case_id). ``others``: (run, predictions, fold predictions) of other runs applied to
    the same cohort, each a row (its fold ensemble)."""
    from mica.external import training_ensemble

    task = primary.task
    ids = ext["case_id"].astype(str).to_numpy()
    if task == "survival":
        cohort = Cohort(cohort_name, task, ids, time=ext["time"].to_numpy(float),
                        event=(ext["censorship"].to_numpy(float) == 0))
    else:
        cohort = Cohort(cohort_name, task, ids, response=ext["response"].to_numpy(float))
    runs = [primary, *(o[0] for o in others)]
    name = row_name(primary, runs)
    key = "risk" if task == "survival" else "prob"
    fold_surv = _fold_curves(primary, fold_preds, ids, times) if task == "survival" else {}
    ens = ext[key].to_numpy(float)
    ens_surv = np.mean(list(fold_surv.values()), axis=0) if fold_surv else None
    rows = [Row(name, ens, ens_surv)]
    rows += [Row(f"{name} fold {f.fold}", ext[f"{key}_fold{f.fold}"].to_numpy(float), fold_surv.get(f.fold))
             for f in primary.folds]
    for run, pred, fp in others:
        if run.task != task:
            raise PipelineError(f"run {run.run} is a {run.task} run, {primary.run} a {task} run")
        p = pred.set_index("case_id")
        missing = [c for c in ids if c not in p.index]
        if missing:
            raise PipelineError(f"run {run.run} on {cohort_name} has no prediction of {len(missing)} patients "
                                f"({', '.join(missing[:3])}); apply it to the same cohort again")
        curves = _fold_curves(run, fp, ids, times) if task == "survival" else {}
        rows.append(Row(row_name(run, runs), p.loc[list(ids), key].to_numpy(float),
                        np.mean(list(curves.values()), axis=0) if curves else None))
    notes = [f"{name} = mean of the {len(primary.folds)} fold models ({'raw risk' if task == 'survival' else 'prob'}"
             f"{', survival curves' if fold_surv else ''}); '{name} fold k' = fold k's model alone"]
    if train_clinical is not None and ext_clinical is not None and covariates:
        oof, _ = out_of_fold(primary)
        train_ids = oof["case_id"].astype(str).tolist()
        tr = train_clinical.loc[train_ids]
        va = ext_clinical.loc[list(ids)]
        model = _fit(task, tr, covariates)
        s, c = _predict(task, model, tr, va, times)
        rows.append(Row("clinical", s, c))
        te = training_ensemble(primary).set_index("case_id")
        if task == "survival":
            tr_mica = oof["score"].to_numpy(float)
            va_mica = _zscore(ens, te["risk"].to_numpy(float))
        else:
            tr_mica = oof["logit"].to_numpy(float)
            p = np.clip(ens, 1e-6, 1 - 1e-6)
            va_mica = np.log(p / (1 - p))
        tr2, va2 = tr.assign(mica_score=tr_mica), va.assign(mica_score=va_mica)
        model2 = _fit(task, tr2, [*covariates, "mica_score"])
        s2, c2 = _predict(task, model2, tr2, va2, times)
        rows.append(Row(f"{name}+clinical", s2, c2))
        notes.append(f"clinical and {name}+clinical fitted on the training cohort's {len(train_ids)} patients "
                     f"({name}'s out-of-fold scores), applied unchanged to this cohort")
    if truth is not None:
        rows.append(_truth_row(truth, ids))
    groups = (ext["risk_group"] == "high").to_numpy() if task == "survival" else None
    return cohort, rows, groups, notes
