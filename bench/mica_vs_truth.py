"""Score MICA outputs against the sample cohort's ground truth (``bench.demo_summary``, ``bench.validate_mica``).

- :func:`true_risk_scores`: the generator's true risk and response probability of each patient, so that the c-index
  (or AUC) of the truth itself on a fold is the ceiling a model is compared with.
- :func:`patch_risk_deviation` / :func:`ig_risk_auroc`: which patches lie on the generator's risk-driving regions
  (``risk_masks/{slide}.png``: uint8 at H&E downsample 32, 128 neutral, > 128 cells that raise the hazard, < 128
  cells that lower it), and how well the magnitude of the integrated-gradient patch attributions ranks them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import artifacts as art

RISK_DEVIATION = 16
"""A patch is risk-driving when the mean |mask - 128| over its footprint exceeds this (tanh(h/0.3) > 0.126)."""


def true_risk_scores(cohort: Path) -> dict[str, dict[str, float]]:
    """``{case_id: {"true_risk": .., "true_response_prob": ..}}`` from ``ground_truth.json``."""
    gt = json.loads((Path(cohort) / "ground_truth.json").read_text())
    return {c: {"true_risk": float(p["true_risk"]), "true_response_prob": float(p["true_response_prob"])}
            for c, p in gt["patients"].items()}


def patch_risk_deviation(cohort: Path, slide: str, coords: np.ndarray, patch_size_level0: float,
                         gt: dict | None = None) -> np.ndarray:
    """Mean |risk mask - 128| (0..127) over each patch's footprint, (N,) float64; coords (N,2) level-0 top-left.
    ``gt``: the cohort's parsed ``ground_truth.json`` (read here when None)."""
    import cv2

    if gt is None:
        gt = json.loads((Path(cohort) / "ground_truth.json").read_text())
    info = gt["slides"][slide]
    mask = cv2.imread(str(Path(cohort) / info["risk_mask_png"]), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise FileNotFoundError(f"risk mask {Path(cohort) / info['risk_mask_png']} is missing or unreadable")
    ds = float(info.get("risk_mask_downsample", 32))
    dev = np.abs(mask.astype(np.float64) - 128.0)
    # integral image: exact mean over the mask pixels whose centres fall inside each patch
    ii = np.zeros((dev.shape[0] + 1, dev.shape[1] + 1))
    ii[1:, 1:] = dev.cumsum(0).cumsum(1)
    c = np.asarray(coords, np.float64)
    x0 = np.clip(np.ceil(c[:, 0] / ds - 0.5), 0, dev.shape[1]).astype(int)
    y0 = np.clip(np.ceil(c[:, 1] / ds - 0.5), 0, dev.shape[0]).astype(int)
    x1 = np.clip(np.ceil((c[:, 0] + patch_size_level0) / ds - 0.5), 0, dev.shape[1]).astype(int)
    y1 = np.clip(np.ceil((c[:, 1] + patch_size_level0) / ds - 0.5), 0, dev.shape[0]).astype(int)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    s = ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]
    return s / area


def ig_risk_auroc(cohort: Path, ig_dir: Path, slides: Sequence[str] | None = None,
                  patch_size_level0: float | None = None, threshold: float = RISK_DEVIATION) -> dict[str, float]:
    """AUROC of |path attribution| for risk-driving vs neutral patches, per slide and their mean.

    Reads ``ig_dir/{slide}.h5`` (``coords``, ``path_attr``; attr ``patch_size_level0`` when present). Slides whose
    patches are all of one class are skipped. Returns ``{slide: auroc, ..., "mean": .., "pooled": ..}``.
    """
    import h5py
    from sklearn.metrics import roc_auc_score

    ig_dir = Path(ig_dir)
    gt = json.loads((Path(cohort) / "ground_truth.json").read_text())
    files = sorted(ig_dir.glob("*.h5")) if slides is None else [ig_dir / f"{s}.h5" for s in slides]
    out: dict[str, float] = {}
    pooled_y, pooled_s = [], []
    for f in files:
        if not f.exists():
            continue
        with h5py.File(f, "r") as h:
            coords = h["coords"][:]
            attr = h["path_attr"][:].astype(np.float64)
            ps = float(h.attrs.get("patch_size_level0", patch_size_level0 or 224))
        if len(coords) == 0:
            continue
        y = patch_risk_deviation(cohort, f.stem, coords, ps, gt) > threshold
        if y.all() or not y.any():
            continue
        score = np.abs(attr)
        out[f.stem] = float(roc_auc_score(y, score))
        pooled_y.append(y)
        pooled_s.append(score / (np.abs(score).max() + 1e-12))
    if out:
        out["mean"] = float(np.mean(list(out.values())))
        out["pooled"] = float(roc_auc_score(np.concatenate(pooled_y), np.concatenate(pooled_s)))
    return out


def _fold_cases(cohort: Path, k: int) -> tuple[list[str], list[str]]:
    """(train case ids, val case ids) of ``splits/splits_{k}.csv`` through ``clinical.csv``."""
    clin = pd.read_csv(Path(cohort) / "clinical.csv", dtype={"slide_id": str, "case_id": str})
    case_of = dict(zip(clin["slide_id"], clin["case_id"]))
    split = pd.read_csv(Path(cohort) / "splits" / f"splits_{k}.csv", dtype=str)
    cases = {c: sorted({case_of[s] for s in split[c].dropna() if s in case_of}) for c in ("train", "val")}
    return cases["train"], cases["val"]


def outcome_table(cohort: Path, out: Path, runs: dict[str, str], task: str = "survival",
                  covariates: Sequence[str] = ("age", "stage"), folds: Sequence[int] = range(5)) -> pd.DataFrame:
    """Per-fold c-index (survival) or AUC (response) of the truth, each MICA run and the clinical baseline.

    ``runs`` maps a column label (e.g. ``coattn``) to a MICA run name (``art.MICA_RUN``); its
    ``fold_{k}/val_predictions.csv`` gives the predictions. ``truth`` scores the generator's ``true_risk`` (or
    ``true_response_prob``) on the same validation patients; ``clinical`` is Cox PH (or logistic regression) on
    ``covariates`` fitted on the training patients of the fold (:mod:`mica.baselines`). Rows: folds, then ``mean``,
    ``sd`` and ``pooled`` (one c-index/AUC over every fold's out-of-fold predictions; the only meaningful number when
    folds hold a handful of patients, as in the demo).
    """
    from mica.baselines import cox_cindex, logistic_auc

    score_col = "risk" if task == "survival" else "prob"
    truth = true_risk_scores(cohort)
    clin = pd.read_csv(Path(cohort) / "clinical.csv", dtype={"slide_id": str, "case_id": str})
    pat = clin.groupby("case_id", sort=True).first().reset_index()
    rows = []
    pooled: dict[str, list[pd.DataFrame]] = {}
    for k in folds:
        tr, va = _fold_cases(cohort, k)
        ptr, pva = pat[pat["case_id"].isin(tr)], pat[pat["case_id"].isin(va)]
        row: dict[str, float] = {"fold": k, "n_val": len(pva)}
        scores = {"truth": np.array([truth[c]["true_risk" if task == "survival" else "true_response_prob"]
                                     for c in pva["case_id"]])}
        if task == "survival":
            scores["clinical"] = cox_cindex(ptr, pva, list(covariates))[0]
        else:
            scores["clinical"] = logistic_auc(ptr, pva, list(covariates))[0]
        for label, run in runs.items():
            f = art.MICA_RUN.dir(out, run=run) / f"fold_{k}" / "val_predictions.csv"
            if f.exists():
                pr = pd.read_csv(f, dtype={"case_id": str}).groupby("case_id", sort=True).mean(numeric_only=True)
                scores[label] = pr[score_col].reindex(pva["case_id"]).to_numpy(np.float64)
            else:
                scores[label] = np.full(len(pva), np.nan)
        for label, sc in scores.items():
            row[label] = _metric(pva, np.asarray(sc, np.float64), task)
            pooled.setdefault(label, []).append(pva.assign(_score=np.asarray(sc, np.float64)))
        rows.append(row)
    df = pd.DataFrame(rows)
    cols = [c for c in df.columns if c not in ("fold", "n_val")]
    mean = {"fold": "mean", "n_val": df["n_val"].sum(), **{c: df[c].mean() for c in cols}}
    sd = {"fold": "sd", "n_val": np.nan, **{c: df[c].std(ddof=1) for c in cols}}
    allp = {"fold": "pooled", "n_val": df["n_val"].sum()}
    for c in cols:
        d = pd.concat(pooled[c], ignore_index=True)
        allp[c] = _metric(d, d["_score"].to_numpy(), task)
    return pd.concat([df, pd.DataFrame([mean, sd, allp])], ignore_index=True)


def _metric(pat: pd.DataFrame, score: np.ndarray, task: str) -> float:
    """c-index (survival) or AUC (response) of ``score`` on the patients ``pat``; NaN when undefined."""
    from mica.survival import binary_auc, c_index

    ok = np.isfinite(score)
    if ok.sum() < 2:
        return float("nan")
    p = pat[ok]
    if task == "survival":
        if (p["censorship"] == 0).sum() == 0:
            return float("nan")
        return float(c_index(p["survival_months"].to_numpy(), p["censorship"].to_numpy(), score[ok]))
    return float(binary_auc(p["response"].to_numpy(), score[ok]))


def format_table(df: pd.DataFrame, metric: str) -> str:
    """Fixed-width text of :func:`outcome_table` (3 decimals), headed by the metric name."""
    cols = [c for c in df.columns if c not in ("fold", "n_val")]
    lines = [f"{metric:>8s} {'n_val':>5s} " + " ".join(f"{c:>8s}" for c in cols)]
    for _, r in df.iterrows():
        n = "" if r["n_val"] != r["n_val"] else f"{int(r['n_val'])}"
        lines.append(f"{str(r['fold']):>8s} {n:>5s} " + " ".join(f"{r[c]:8.3f}" for c in cols))
    return "\n".join(lines)


def write_truth_csv(cohort: Path, path: Path) -> Path:
    """``case_id,risk,prob``: the generator's true risk and response probability per patient, the reference row
    ``truth`` of ``mica.test --truth`` / ``mica.compare --truth``."""
    scores = true_risk_scores(cohort)
    df = pd.DataFrame({"case_id": list(scores), "risk": [v["true_risk"] for v in scores.values()],
                       "prob": [v["true_response_prob"] for v in scores.values()]})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.mica_vs_truth --cohort COHORT --truth-csv FILE``: write the truth table of a synthetic
    cohort (made by sample_data.make_cohort) for the outcome report."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.mica_vs_truth", description=main.__doc__)
    p.add_argument("--cohort", type=Path, required=True, help="synthetic cohort (ground_truth.json inside)")
    p.add_argument("--truth-csv", type=Path, required=True, help="output CSV case_id,risk,prob")
    args = p.parse_args(argv)
    print(write_truth_csv(args.cohort, args.truth_csv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
