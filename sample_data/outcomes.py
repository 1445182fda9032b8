"""Patient outcomes of the synthetic cohort: spatial-composition features, true risk, survival, response, splits.

The hazard and the immunotherapy response depend on what the tissue shows:

- protective: CD8 T cells in or at tumour nests, TCF-1+ (stem-like) T cells in or at nests;
- harmful: macrophages and neutrophils inside myeloid foci;
- clinical covariates: age, stage; plus noise.

``true_risk`` is the log-hazard (higher = shorter survival). Survival times are Weibull; censoring times are
exponential with a scale chosen so that about ``censoring`` of the patients are censored.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .panel import MARKER_INDEX
from .tissue import CD4T, CD8T, MACRO, NEUTRO, TUMOUR, Cells, Layout

NEST_MARGIN_UM = 10.0
"""Cells within this distance (µm) outside a tumour nest count as 'at the nest'."""

# reference centre / scale of the log-density features, measured on generated cohorts (0.6-1.5 mm tissue)
_REF = {"cd8": (0.93, 0.45), "tcf1": (1.23, 0.5), "myeloid": (1.13, 0.6), "pdl1": (0.30, 0.11)}
WEIBULL_SHAPE = 1.5
BASE_SCALE_MONTHS = 40.0


def cells_counted(cells: Cells, layout: Layout) -> dict[str, np.ndarray]:
    """Boolean per-cell masks (N,) of the cells the outcome model counts.

    ``cd8``: CD8 T cells in or within ``NEST_MARGIN_UM`` of a tumour nest; ``tcf1``: TCF-1+ T cells there;
    ``myeloid``: macrophages and neutrophils inside myeloid foci; ``pdl1``: PD-L1+ tumour cells.
    """
    t = cells.type
    e = cells.expr
    if e is None:
        raise ValueError("cells have no expression")
    at_nest = layout.sample("tumour", cells.x, cells.y) > -NEST_MARGIN_UM
    tcell = (t == CD8T) | (t == CD4T)
    return {
        "cd8": (t == CD8T) & at_nest,
        "tcf1": tcell & (e[:, MARKER_INDEX["TCF-1"]] > 0.3) & at_nest,
        "myeloid": ((t == MACRO) | (t == NEUTRO)) & (layout.sample("myeloid", cells.x, cells.y) > 0.5),
        "pdl1": (t == TUMOUR) & (e[:, MARKER_INDEX["PD-L1"]] > 0.3),
    }


def slide_features(cells: Cells, layout: Layout) -> dict[str, float]:
    """Cell counts and areas (mm²) of one slide that the outcome model uses."""
    g2 = layout.grid_um ** 2 / 1e6
    tissue = layout.tissue > 0
    m = cells_counted(cells, layout)
    return {
        "tissue_mm2": float(tissue.sum() * g2),
        "tumour_mm2": float(((layout.tumour > 0) & tissue).sum() * g2),
        "n_cd8_nest": int(m["cd8"].sum()),
        "n_tcf1_nest": int(m["tcf1"].sum()),
        "n_myeloid_foci": int(m["myeloid"].sum()),
        "n_tumour": int((cells.type == TUMOUR).sum()),
        "n_pdl1_tumour": int(m["pdl1"].sum()),
    }


def risk_contributions(cells: Cells, layout: Layout) -> np.ndarray:
    """Per-cell direction of the hazard, float32 (N,): -1 CD8 and -0.7 TCF-1+ T cells at nests, +1 myeloid in foci.

    Used to draw the risk mask (where the tissue carries the prognostic signal).
    """
    m = cells_counted(cells, layout)
    return (-1.0 * m["cd8"] - 0.7 * m["tcf1"] + 1.0 * m["myeloid"]).astype(np.float32)


def patient_scores(feats: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Standardised composition scores of one patient from the features of its slides (pooled counts/areas)."""
    s = {k: sum(f[k] for f in feats) for k in feats[0]}
    tum = max(s["tumour_mm2"], 1e-3)
    raw = {
        "cd8": np.log1p(s["n_cd8_nest"] / tum / 50.0),
        "tcf1": np.log1p(s["n_tcf1_nest"] / tum / 20.0),
        "myeloid": np.log1p(s["n_myeloid_foci"] / max(s["tissue_mm2"], 1e-3) / 50.0),
        "pdl1": s["n_pdl1_tumour"] / max(s["n_tumour"], 1),
    }
    return {k: float((v - _REF[k][0]) / _REF[k][1]) for k, v in raw.items()} | {f"raw_{k}": float(v)
                                                                            for k, v in raw.items()}


def true_risk(scores: Mapping[str, float], age: float, stage: int, noise: float) -> float:
    """Log-hazard of a patient (higher = shorter survival)."""
    return float(-1.2 * scores["cd8"] - 0.8 * scores["tcf1"] + 1.2 * scores["myeloid"]
                 + 0.04 * (age - 66.0) + 0.5 * (stage - 2) + noise)


def response_prob(scores: Mapping[str, float], stage: int) -> float:
    """Probability of response to immunotherapy."""
    x = -0.3 + 1.0 * scores["cd8"] + 0.8 * scores["tcf1"] + 0.7 * scores["pdl1"] - 0.6 * scores["myeloid"] \
        - 0.3 * (stage - 2)
    return float(1.0 / (1.0 + np.exp(-x)))


def survival(rng: np.random.Generator, risk: np.ndarray, censoring: float,
             max_follow_up: float = 180.0) -> tuple[np.ndarray, np.ndarray]:
    """Weibull event times with log-hazard ``risk`` (P,), censored so that ~``censoring`` of patients are censored.

    Returns (months (P,) float, censorship (P,) int: 1 = censored).
    """
    u = rng.uniform(1e-9, 1.0, risk.shape)
    t_event = BASE_SCALE_MONTHS * (-np.log(u)) ** (1.0 / WEIBULL_SHAPE) * np.exp(-risk / WEIBULL_SHAPE)
    e = rng.exponential(1.0, risk.shape)
    best, best_c = None, None
    for scale in np.geomspace(1.0, 1e5, 400):
        c = np.minimum(scale * e, max_follow_up)
        frac = float(np.mean(c < t_event))
        if best is None or abs(frac - censoring) < best - 1e-12:
            best, best_c = abs(frac - censoring), c
    assert best_c is not None
    cens = (best_c < t_event).astype(int)
    months = np.round(np.maximum(np.minimum(t_event, best_c), 0.1), 1)
    return months, cens


def patient_folds(rng: np.random.Generator, case_ids: Sequence[str], k: int = 5) -> dict[str, int]:
    """Assign patients to ``k`` folds at random, balanced (fold sizes differ by at most one)."""
    order = rng.permutation(len(case_ids))
    return {case_ids[i]: int(j % k) for j, i in enumerate(order)}


def write_splits(out_dir: Path, slide_case: Mapping[str, str], folds: Mapping[str, int], k: int = 5) -> None:
    """Write ``splits_{i}.csv`` (columns train,val; slide ids; empty cells where a column is shorter)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for i in range(k):
        val = [s for s, c in slide_case.items() if folds[c] == i]
        train = [s for s, c in slide_case.items() if folds[c] != i]
        with open(out_dir / f"splits_{i}.csv", "w", newline="") as f:
            wr = csv.writer(f, lineterminator="\n")
            wr.writerow(["train", "val"])
            for r in range(max(len(train), len(val))):
                wr.writerow([train[r] if r < len(train) else "", val[r] if r < len(val) else ""])
