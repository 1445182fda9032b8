"""How much survival signal each MICA input holds: linear Cox probes on the same 5 folds (not CI).

    python -m bench.mica_ceiling --cohort /tmp/hex_val/cohort --out /tmp/hex_val/out     # after validate_mica.py

Reads a cohort made by ``sample_data.make_cohort`` and the outputs of ``bench.validate_mica`` (stages 01-07) and
prints the mean c-index over the cohort's folds of:

- the generator's risk and its parts (``ground_truth.json`` scores): ``truth`` (as the validation table),
  ``image part`` (CD8 / TCF-1 / myeloid terms only, no age, stage or noise), ``myeloid term``, ``T-cell terms``;
- an elastic-net Cox model (scikit-survival ``CoxnetSurvivalAnalysis``, inputs z-scored with the training fold's
  mean / sd) fitted on each fold's training patients, on per-slide summaries of: the *measured* CODEX patch labels
  (``markers/{slide}.csv``: mean, mean over the PanCK-high half of the patches, P90 per marker), the same
  summaries of HEX's predictions on the same patches (``hex_pred/{slide}.h5``), the ``stats`` CODEX tokens
  (``codex_features/stats.h5``) and the H&E bags (mean and max over patches of ``features/{enc}/h5_files``);
- the same inputs for the response task (when ``clinical.csv`` has ``response``): the validation AUC of an L2
  logistic regression (:func:`logistic_probe`), in a third column.

The measured-label probe bounds what any model of patch-level marker means can reach: the generator's risk
counts cells (CD8 T cells in or at tumour nests per tumour area, ...), which 224 px patch means blur
(``bench.count_ceiling``: what exact cell counts would reach).

It also prints a reference for the integrated-gradient check (``bench.mica_vs_truth.ig_risk_auroc``: mean
per-slide AUROC of |patch attribution| for the risk-mask patches): the same AUROC for a hand-made patch score that
knows which markers matter, CD8 + TCF-1 + CD68 + CD66b, from the measured labels and from HEX's predictions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import artifacts as art


def _surv(clin: pd.DataFrame, slides: list[str]) -> np.ndarray:
    return np.array([(bool(1 - clin.at[s, "censorship"]), float(clin.at[s, "survival_months"])) for s in slides],
                    dtype=[("event", bool), ("time", float)])


def cindex(y: np.ndarray, risk: np.ndarray) -> float:
    from sksurv.metrics import concordance_index_censored

    return float(concordance_index_censored(y["event"], y["time"], risk)[0])


def folds(cohort: Path) -> list[tuple[list[str], list[str]]]:
    out = []
    for p in sorted((cohort / "splits").glob("splits_*.csv"), key=lambda q: int(q.stem.split("_")[1])):
        sp = pd.read_csv(p)
        out.append((list(sp["train"].dropna()), list(sp["val"].dropna())))
    return out


def probe(X: dict[str, np.ndarray], clin: pd.DataFrame, splits: list, alpha: float) -> tuple[float, float]:
    """Mean ± sd over folds of the val c-index of an elastic-net Cox model on ``X`` (z-scored on train)."""
    import warnings

    from sksurv.linear_model import CoxnetSurvivalAnalysis

    res = []
    for tr, va in splits:
        a, b = np.stack([X[s] for s in tr]), np.stack([X[s] for s in va])
        mu, sd = a.mean(0), a.std(0) + 1e-8
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = CoxnetSurvivalAnalysis(l1_ratio=0.5, alphas=[alpha], max_iter=100000).fit((a - mu) / sd,
                                                                                            _surv(clin, tr))
        res.append(cindex(_surv(clin, va), m.predict((b - mu) / sd)))
    return float(np.mean(res)), float(np.std(res))


def logistic_probe(X: dict[str, np.ndarray], y: dict[str, int], splits: list, fit: bool = True) -> tuple[float, float]:
    """Mean ± sd over folds of the val AUC of an L2 logistic regression on ``X`` (z-scored on train); ``fit=False``
    scores ``X``'s single column as it is."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    res = []
    for tr, va in splits:
        a, b = np.stack([X[s] for s in tr]), np.stack([X[s] for s in va])
        yt, yv = np.array([y[s] for s in tr]), np.array([y[s] for s in va])
        if fit:
            mu, sd = a.mean(0), a.std(0) + 1e-8
            score = LogisticRegression(max_iter=2000).fit((a - mu) / sd, yt).predict_proba((b - mu) / sd)[:, 1]
        else:
            score = b[:, 0]
        res.append(roc_auc_score(yv, score))
    return float(np.mean(res)), float(np.std(res))


def marker_summary(values: np.ndarray, names: list[str]) -> np.ndarray:
    """(3*C,) per-slide summary of patch values (N, C): mean, mean over the PanCK-high half, P90."""
    pk = values[:, names.index("Pan-Cytokeratin")]
    epi = pk > np.quantile(pk, 0.5)
    return np.concatenate([values.mean(0), (values[epi] if epi.any() else values).mean(0),
                           np.quantile(values, 0.9, axis=0)])


def inputs(cohort: Path, out: Path, slides: list[str]) -> dict[str, dict[str, np.ndarray]]:
    import h5py

    X: dict[str, dict[str, np.ndarray]] = {"measured CODEX labels": {}, "HEX predictions": {},
                                           "stats CODEX tokens": {}, "H&E bag (mean, max)": {}}
    codex_h5 = art.CODEX_FEATURE_TABLE.path(out, encoder="stats")
    he_bags = [i["encoder"] for i in art.FEATURE_BAGS.instances(out)]
    with h5py.File(codex_h5, "r") if codex_h5.exists() else _Null() as cf:
        for s in slides:
            lab = pd.read_csv(art.LABELS.path(out, s))
            names = list(lab.columns[4:])
            X["measured CODEX labels"][s] = marker_summary(lab[names].to_numpy(float), names)
            with h5py.File(art.PREDICTIONS.path(out, s), "r") as f:
                pn = [m.decode() if isinstance(m, bytes) else str(m) for m in f.attrs["markers"]]
                X["HEX predictions"][s] = marker_summary(f["codex_prediction"][:].astype(float), pn)
            if cf is not None:
                X["stats CODEX tokens"][s] = np.asarray(cf[s][:], float).ravel()
            if he_bags:
                with h5py.File(art.FEATURE_BAGS.path(out, s, encoder=he_bags[0]), "r") as f:
                    a = f["features"][:].astype(float)
                X["H&E bag (mean, max)"][s] = np.concatenate([a.mean(0), a.max(0)])
    return {k: v for k, v in X.items() if len(v) == len(slides)}


RISK_MARKERS = ("CD8", "TCF-1", "CD68", "CD66b")


def ig_reference(cohort: Path, out: Path, slides: list[str]) -> dict[str, float]:
    """Mean per-slide AUROC with which sum(RISK_MARKERS) per patch finds the risk-mask patches (IG's yardstick)."""
    import h5py
    from sklearn.metrics import roc_auc_score

    from bench.mica_vs_truth import RISK_DEVIATION, patch_risk_deviation

    gt = json.loads((cohort / "ground_truth.json").read_text())
    res: dict[str, list[float]] = {"measured CODEX labels": [], "HEX predictions": []}
    for s in slides:
        lab = pd.read_csv(art.LABELS.path(out, s))
        with h5py.File(art.PREDICTIONS.path(out, s), "r") as f:
            names = [m.decode() if isinstance(m, bytes) else str(m) for m in f.attrs["markers"]]
            pred = dict(zip(map(tuple, f["coords"][:].tolist()), f["codex_prediction"][:].astype(float)))
            ps = float(f.attrs["patch_size_level0"])
        coords = lab[["x", "y"]].to_numpy()
        keep = np.array([tuple(c) in pred for c in coords.tolist()])
        y = patch_risk_deviation(cohort, s, coords[keep], ps, gt) > RISK_DEVIATION
        if y.all() or not y.any():
            continue
        hx = np.stack([pred[tuple(c)] for c in coords[keep].tolist()])
        res["measured CODEX labels"].append(roc_auc_score(y, lab.loc[keep, list(RISK_MARKERS)].sum(1)))
        res["HEX predictions"].append(roc_auc_score(y, hx[:, [names.index(m) for m in RISK_MARKERS]].sum(1)))
    return {k: float(np.mean(v)) for k, v in res.items() if v}


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.mica_ceiling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cohort", type=Path, default=Path("/tmp/hex_val/cohort"))
    p.add_argument("--out", type=Path, default=Path("/tmp/hex_val/out"))
    p.add_argument("--alphas", type=float, nargs="+", default=[0.03, 0.1], help="elastic-net penalties tried")
    args = p.parse_args(argv)
    clin = pd.read_csv(args.cohort / "clinical.csv").set_index("slide_id")
    gt = json.loads((args.cohort / "ground_truth.json").read_text())
    slides = sorted(clin.index)
    splits = folds(args.cohort)
    y = _surv(clin, slides)
    sc = {k: np.array([gt["patients"][clin.at[s, "case_id"]]["scores"][k] for s in slides])
          for k in ("cd8", "tcf1", "myeloid")}
    parts = {"truth (true_risk)": np.array([gt["patients"][clin.at[s, "case_id"]]["true_risk"] for s in slides]),
             "image part of the true risk": -1.2 * sc["cd8"] - 0.8 * sc["tcf1"] + 1.2 * sc["myeloid"],
             "T-cell terms only": -1.2 * sc["cd8"] - 0.8 * sc["tcf1"], "myeloid term only": 1.2 * sc["myeloid"]}
    idx = {s: i for i, s in enumerate(slides)}
    resp = {s: int(clin.at[s, "response"]) for s in slides} if "response" in clin else None
    print("| input | c-index (mean ± sd over folds) | response AUC (logistic probe) |\n|---|---|---|")
    for name, r in parts.items():
        vals = [cindex(_surv(clin, va), r[[idx[s] for s in va]]) for _, va in splits]
        print(f"| {name} | {np.mean(vals):.3f} ± {np.std(vals):.3f} | |")
    for name, X in inputs(args.cohort, args.out, slides).items():
        best = max((probe(X, clin, splits, a) + (a,) for a in args.alphas), key=lambda t: t[0])
        auc = "{:.3f} ± {:.3f}".format(*logistic_probe(X, resp, splits)) if resp else ""
        print(f"| probe: {name} | {best[0]:.3f} ± {best[1]:.3f} (alpha {best[2]}) | {auc} |")
    print(f"({len(slides)} slides, {len(splits)} folds; c-index over all patients of the truth: "
          f"{cindex(y, parts['truth (true_risk)']):.3f})")
    print(f"\n| patch score ({' + '.join(RISK_MARKERS)}) | mean per-slide AUROC for the risk-mask patches |\n|---|---|")
    for name, auc in ig_reference(args.cohort, args.out, slides).items():
        print(f"| {name} | {auc:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
