"""Score phenotype assignments against the sample cohort's true cells (issue 18, "phenotypes" acceptance).

    python -m bench.phenotype_truth --cohort /tmp/ph_cohort --seed-note 21           # default gating table
    python -m bench.phenotype_truth --cohort /tmp/ph_cohort --gating my_gating.csv --radius-um 3

- :func:`true_cells`: each slide's true cells (nucleus centre in H&E level-0 px and µm, generator type, hidden
  states ``stem`` (TCF-1 on) and ``treg`` (FOXP3 on), compartment), read from ``COHORT/truth/cells/{slide}.csv.gz``
  (sample_data/cell_truth.py), or, for a cohort made before the generator wrote them, rebuilt from the cohort's own
  flags by the same code.
- :func:`measured_codex` : the *measured* CODEX at each true cell: the mean of every channel over a disk of
  ``radius_um`` around the nucleus centre, mapped H&E -> CODEX by the cohort's true transform
  (``sample_data.truth.true_transform``), sampled bilinearly; NaN for cells outside the CODEX field.
- :func:`cell_normalisation`: per-marker percentiles of those cell means over the cohort (default P1 / P99.5) and
  ``clip((raw - lo) / (hi - lo), 0, 1)`` -- the formula of the pipeline's normalisation
  (``preprocess.quantify.normalize``) applied at the cell level rather than to 112 µm patch means, so that "1" is a
  strong positive *cell*.
- :func:`truth_phenotypes` maps the generator's types to the gating phenotypes (stem_t = a T cell in the stem state,
  treg = a CD4 T cell in the treg state; red blood cells are not scored); :func:`score` gives macro-F1 and per-class
  precision / recall / F1 (sklearn).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

TRUTH_CELLS = "truth/cells/{slide}.csv.gz"
"""Per-slide true cells written by the generator (issue 18 item 7), relative to the cohort folder."""

SCORED = ("tumour", "cd8_t", "cd4_t", "stem_t", "treg", "b_cell", "macrophage", "neutrophil", "fibroblast",
          "endothelial", "plasma")
"""The phenotypes scored (the gating table's, without ``other``)."""


def _rebuild(cohort: Path, gt: dict) -> dict[str, pd.DataFrame]:
    """The truth tables of a cohort made before the generator wrote them: rebuilt from its own flags with the
    generator's code (``sample_data.cell_truth.cell_table``; no images)."""
    from sample_data import make_cohort, render
    from sample_data.cell_truth import cell_table

    args = argparse.Namespace(**gt["params"], out=cohort)
    _, jobs, _, _ = make_cohort.cohort_jobs(args, len(gt["patients"]))
    res = {}
    for job in jobs:
        _, layout, cells = make_cohort.slide_tissue(job)
        res[job.slide_id] = pd.DataFrame(cell_table(cells, layout, render.he_frame(layout.side_um, job.he_mpp)))
    return res


def true_cells(cohort: str | Path) -> dict[str, pd.DataFrame]:
    """``{slide: DataFrame}`` with the truth columns (``x``, ``y`` H&E level-0 px, ``type``, ``stem``, ``treg``, ...)
    and ``x_um``, ``y_um`` (µm: (px + 0.5) x he_mpp, the world frame)."""
    cohort = Path(cohort)
    gt = json.loads((cohort / "ground_truth.json").read_text())
    slides = sorted(gt["slides"])
    files = {s: cohort / TRUTH_CELLS.format(slide=s) for s in slides}
    if all(f.is_file() for f in files.values()):
        res = {s: pd.read_csv(f) for s, f in files.items()}
    else:
        res = _rebuild(cohort, gt)
    for s, df in res.items():
        mpp = float(gt["slides"][s]["he_mpp"])
        df["x_um"], df["y_um"] = (df["x"] + 0.5) * mpp, (df["y"] + 0.5) * mpp
        for c in ("stem", "treg"):
            df[c] = df[c].astype(bool)
    return res


def measured_codex(cohort: str | Path, slide: str, he_xy: np.ndarray, radius_um: float = 3.0) -> np.ndarray:
    """Mean of each CODEX channel (camera counts) over a disk of ``radius_um`` around each H&E level-0 point
    (N, 2) -> (N, C) float64; NaN where the disk leaves the CODEX image."""
    import tifffile
    from scipy import ndimage as ndi

    from sample_data.truth import true_transform

    cohort = Path(cohort)
    gt = json.loads((cohort / "ground_truth.json").read_text())
    mpp = float(gt["slides"][slide]["codex_mpp"])
    r = radius_um / mpp
    t = np.arange(-np.floor(r), np.floor(r) + 1)
    gx, gy = np.meshgrid(t, t)
    keep = gx ** 2 + gy ** 2 <= r * r
    off = np.c_[gx[keep], gy[keep]]
    q = true_transform(cohort, slide).he_to_codex(np.asarray(he_xy, np.float64))
    pts = (q[:, None, :] + off[None]).reshape(-1, 2)
    k = len(off)
    with tifffile.TiffFile(cohort / "codex" / f"{slide}.ome.tif") as tf:
        pages = tf.series[0].levels[0].pages
        h, w = pages[0].shape[-2:]
        inside = ((pts[:, 0] >= 0) & (pts[:, 1] >= 0) & (pts[:, 0] <= w - 1) & (pts[:, 1] <= h - 1))
        inside = inside.reshape(-1, k).all(1)
        out = np.full((len(q), len(pages)), np.nan)
        for c, page in enumerate(pages):
            ch = page.asarray().astype(np.float32)
            v = ndi.map_coordinates(ch, [pts[:, 1], pts[:, 0]], order=1, mode="nearest").reshape(-1, k)
            out[inside, c] = v[inside].mean(axis=1)
    return out


def cell_normalisation(raw: np.ndarray, low_pct: float = 1.0, high_pct: float = 99.5) -> np.ndarray:
    """Per-marker ``[lo, hi]`` percentiles of cell means (N, C) over the cohort's cells -> (2, C)."""
    return np.stack([np.nanpercentile(raw, low_pct, axis=0), np.nanpercentile(raw, high_pct, axis=0)])


def normalise(raw: np.ndarray, lohi: np.ndarray) -> np.ndarray:
    """``clip((raw - lo) / (hi - lo), 0, 1)`` per marker (0 where hi <= lo) -> float32 (N, C)."""
    lo, hi = lohi
    span = hi - lo
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(span > 0, (raw - lo) / np.where(span > 0, span, 1.0), 0.0)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def truth_phenotypes(cells: pd.DataFrame) -> np.ndarray:
    """The gating phenotype each true cell should get (N,) str; ``""`` for red blood cells (not scored)."""
    ph = cells["type"].astype(str).to_numpy().astype(object)
    ph[ph == "rbc"] = ""
    tcell = np.isin(ph, ["cd8_t", "cd4_t"])
    ph[(ph == "cd4_t") & cells["treg"].to_numpy()] = "treg"
    ph[tcell & cells["stem"].to_numpy() & (ph != "treg")] = "stem_t"
    return ph.astype(str)


def score(pred: np.ndarray, truth: np.ndarray, labels: tuple[str, ...] = SCORED) -> dict:
    """Macro-F1 over ``labels`` and per-class precision / recall / F1 / support, on the cells with a truth label.
    A prediction outside ``labels`` (``other``) counts as a miss."""
    from sklearn.metrics import f1_score, precision_recall_fscore_support

    ok = truth != ""
    y, p = truth[ok], np.asarray(pred)[ok]
    present = [c for c in labels if (y == c).any()]
    pr, rc, f1, n = precision_recall_fscore_support(y, p, labels=present, zero_division=0)
    return {"macro_f1": float(f1_score(y, p, labels=present, average="macro", zero_division=0)),
            "n_cells": int(ok.sum()),
            "per_class": pd.DataFrame({"precision": pr, "recall": rc, "f1": f1, "n": n}, index=present)}


def cohort_cells(cohort: str | Path, radius_um: float = 3.0, low_pct: float = 1.0, high_pct: float = 99.5
                 ) -> tuple[np.ndarray, np.ndarray, list[str], pd.DataFrame]:
    """All true cells of the cohort inside the CODEX field: ``(X normalised (N, C) float32, truth phenotypes (N,),
    markers, cells table with a ``slide`` column)``."""
    cohort = Path(cohort)
    gt = json.loads((cohort / "ground_truth.json").read_text())
    markers = list(gt["markers"])
    raws, tabs = [], []
    for s, df in true_cells(cohort).items():
        raw = measured_codex(cohort, s, df[["x", "y"]].to_numpy(), radius_um)
        ok = ~np.isnan(raw).any(1)
        raws.append(raw[ok])
        tabs.append(df[ok].assign(slide=s))
    raw = np.concatenate(raws)
    cells = pd.concat(tabs, ignore_index=True)
    X = normalise(raw, cell_normalisation(raw, low_pct, high_pct))
    return X, truth_phenotypes(cells), markers, cells


def main(argv: list[str] | None = None) -> int:
    from spatial.phenotypes import assign, default_gating, read_gating

    p = argparse.ArgumentParser(prog="python -m bench.phenotype_truth", description=__doc__.split("\n\n")[0])
    p.add_argument("--cohort", type=Path, required=True)
    p.add_argument("--gating", type=Path, help="gating table CSV (default: the shipped one)")
    p.add_argument("--radius-um", type=float, default=3.0)
    p.add_argument("--high-pct", type=float, default=99.5)
    a = p.parse_args(argv)
    X, truth, markers, _ = cohort_cells(a.cohort, a.radius_um, high_pct=a.high_pct)
    gating = read_gating(a.gating) if a.gating else default_gating()
    res = score(assign(X, markers, gating), truth)
    print(res["per_class"].round(3).to_string())
    print(f"macro-F1 {res['macro_f1']:.3f} over {res['n_cells']} cells ({a.cohort})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
