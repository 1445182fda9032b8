"""Score nucleus detection against the generator's cells (``truth/cells/{slide}.csv.gz``, sample_data/cell_truth.py).

    python -m sample_data.make_cohort --out /tmp/nuc_cohort --slides 3 --seed 11 --tissue-mm 0.8 --no-codex
    python -m bench.cell_truth --cohort /tmp/nuc_cohort --workers 2 [--json /tmp/nuc.json]

A detection matches a nucleated truth cell when their centres are within ``--max-um`` (default 4 µm), one-to-one
(the assignment with the most matches, then the smallest summed distance: scipy's linear_sum_assignment on the
candidate pairs a KD-tree finds, per connected group). Prints precision, recall and F1 per slide and pooled, the
recall per generator cell type, and the detection time per mm² of tissue (the thumbnail tissue mask's area).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

log = logging.getLogger("bench.cell_truth")


def read_truth_cells(cohort: str | Path, slide: str) -> pd.DataFrame:
    """The generator's cells of ``slide``: the csv.gz columns (x, y H&E level-0 px, type, nucleated, states,
    compartment) plus ``x_um``, ``y_um`` = x, y x the slide's he_mpp (the convention of spatial.nuclei)."""
    cohort = Path(cohort)
    gt = json.loads((cohort / "ground_truth.json").read_text())
    entry = gt["slides"][slide]
    rel = entry.get("cells")
    if rel is None:
        raise FileNotFoundError(f"{cohort}/ground_truth.json has no cell truth for {slide}: regenerate the cohort "
                                "with the current sample_data.make_cohort")
    df = pd.read_csv(cohort / rel)
    df["x_um"] = df["x"] * entry["he_mpp"]
    df["y_um"] = df["y"] * entry["he_mpp"]
    return df


def match_cells(pred_xy_um: np.ndarray, true_xy_um: np.ndarray, max_um: float = 4.0
                ) -> tuple[int, int, int, np.ndarray]:
    """One-to-one matching of predicted to true centres within ``max_um``.

    Args:
        pred_xy_um: (P, 2) predicted centres (µm).
        true_xy_um: (T, 2) true centres (µm).
    Returns:
        (tp, fp, fn, matches) with matches (tp, 2) int64 rows (pred index, true index).
    """
    p = np.asarray(pred_xy_um, np.float64).reshape(-1, 2)
    t = np.asarray(true_xy_um, np.float64).reshape(-1, 2)
    if len(p) == 0 or len(t) == 0:
        return 0, len(p), len(t), np.zeros((0, 2), np.int64)
    dist = cKDTree(p).sparse_distance_matrix(cKDTree(t), max_um, output_type="coo_matrix")
    keep = dist.data <= max_um
    pi, ti, d = dist.row[keep], dist.col[keep], dist.data[keep]
    if not len(pi):
        return 0, len(p), len(t), np.zeros((0, 2), np.int64)
    # connected groups of the bipartite candidate graph (pred nodes 0..P-1, true nodes P..P+T-1)
    from scipy.sparse import coo_matrix

    n = len(p) + len(t)
    graph = coo_matrix((np.ones(len(pi)), (pi, ti + len(p))), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    order = np.argsort(comp[pi], kind="stable")
    pi, ti, d = pi[order], ti[order], d[order]
    bounds = np.flatnonzero(np.diff(comp[pi])) + 1
    out = []
    big = 1e6
    for a, b in zip(np.r_[0, bounds], np.r_[bounds, len(pi)]):
        gp, gt_ = np.unique(pi[a:b]), np.unique(ti[a:b])
        if len(gp) == 1 and len(gt_) == 1:
            out.append((gp[0], gt_[0]))
            continue
        cost = np.full((len(gp), len(gt_)), big)
        cost[np.searchsorted(gp, pi[a:b]), np.searchsorted(gt_, ti[a:b])] = d[a:b]
        r, c = linear_sum_assignment(cost)
        ok = cost[r, c] < big
        out.extend(zip(gp[r[ok]], gt_[c[ok]]))
    m = np.array(out, np.int64).reshape(-1, 2)
    tp = len(m)
    return tp, len(p) - tp, len(t) - tp, m


def detection_f1(pred_xy_um: np.ndarray, true_xy_um: np.ndarray, max_um: float = 4.0) -> dict[str, float]:
    """Precision, recall, F1 and the counts (tp, fp, fn) of :func:`match_cells`."""
    tp, fp, fn, _ = match_cells(pred_xy_um, true_xy_um, max_um)
    return _prf(tp, fp, fn)


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"precision": prec, "recall": rec, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def score_slide(pred: pd.DataFrame, truth: pd.DataFrame, max_um: float = 4.0) -> dict:
    """Scores of one slide's detections (x_um, y_um) against its nucleated truth cells, with per-type recall
    counts (``by_type``: {type: [matched, total]}) and the distance of the matches (median, 95th pct, µm)."""
    tr = truth[truth["nucleated"] == 1].reset_index(drop=True)
    tp, fp, fn, m = match_cells(pred[["x_um", "y_um"]].to_numpy(), tr[["x_um", "y_um"]].to_numpy(), max_um)
    hit = np.zeros(len(tr), bool)
    hit[m[:, 1]] = True
    by_type = {str(k): [int(hit[g.index].sum()), len(g)] for k, g in tr.groupby("type")}
    d = np.hypot(*(pred[["x_um", "y_um"]].to_numpy()[m[:, 0]] - tr[["x_um", "y_um"]].to_numpy()[m[:, 1]]).T)
    dist = {"median_um": float(np.median(d)), "p95_um": float(np.quantile(d, 0.95))} if len(d) else {}
    return _prf(tp, fp, fn) | {"by_type": by_type} | dist


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.cell_truth", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cohort", type=Path, required=True, help="sample cohort with truth/cells/")
    ap.add_argument("--slides", nargs="*", default=None, help="slide ids (default: all)")
    ap.add_argument("--max-um", type=float, default=4.0, help="largest centre distance of a match (µm)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--tile-px", type=int, default=1024)
    ap.add_argument("--json", type=Path, default=None, help="write the scores here")
    return ap


def main(argv: list[str] | None = None) -> int:
    from spatial.nuclei import detect_slide

    args = build_parser().parse_args(argv)
    logging.basicConfig(level="WARNING")
    gt = json.loads((args.cohort / "ground_truth.json").read_text())
    slides = args.slides or sorted(gt["slides"])
    per, tot, secs, mm2 = {}, {"tp": 0, "fp": 0, "fn": 0}, 0.0, 0.0
    by_type: dict[str, list[int]] = {}
    for s in slides:
        t0 = time.perf_counter()
        pred = detect_slide(args.cohort / "he" / f"{s}.tif", tile_px=args.tile_px, workers=args.workers,
                            progress=False)
        dt = time.perf_counter() - t0
        sc = score_slide(pred, read_truth_cells(args.cohort, s), args.max_um)
        sc |= {"seconds": dt, "tissue_mm2": pred.attrs["tissue_mm2"], "n_pred": len(pred)}
        per[s] = sc
        secs += dt
        mm2 += pred.attrs["tissue_mm2"]
        for k in tot:
            tot[k] += sc[k]
        for k, (a, b) in sc["by_type"].items():
            by_type.setdefault(k, [0, 0])
            by_type[k][0] += a
            by_type[k][1] += b
        print(f"{s}: P {sc['precision']:.3f} R {sc['recall']:.3f} F1 {sc['f1']:.3f} (tp {sc['tp']}, fp {sc['fp']}, "
              f"fn {sc['fn']}; median dist {sc.get('median_um', float('nan')):.2f} µm) {dt:.1f} s, "
              f"{sc['tissue_mm2']:.3f} mm²")
    pooled = _prf(**tot)
    print(f"pooled ({len(slides)} slides, ≤ {args.max_um:g} µm): P {pooled['precision']:.3f} "
          f"R {pooled['recall']:.3f} F1 {pooled['f1']:.3f}; {secs / max(mm2, 1e-9):.1f} s per mm² of tissue")
    print("recall by type: " + ", ".join(f"{k} {a / b:.3f} ({b})" for k, (a, b) in sorted(by_type.items())))
    if args.json:
        args.json.write_text(json.dumps({"pooled": pooled, "by_type": by_type, "slides": per,
                                         "s_per_mm2": secs / max(mm2, 1e-9)}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
