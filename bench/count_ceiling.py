"""What exact cell counts would reach on a synthetic cohort: the generator's cells rebuilt, Cox probes (not CI).

    python -m bench.count_ceiling --cohort /tmp/hex_val/cohort          # a cohort made by sample_data.make_cohort

``bench.mica_ceiling`` probes what the pipeline's *inputs* hold (measured CODEX patch labels, HEX predictions,
feature bags). This script asks the question before that: how much of the generator's risk could any model of
these images reach, if it counted cells perfectly? It rebuilds every slide's latent layout and cells from the
cohort's own flags (``ground_truth.json`` ``params``; ``sample_data.make_cohort.cohort_jobs`` / ``slide_tissue``,
byte-identical to the generation, no images) and fits the same elastic-net Cox probes on the same 5 folds as
``mica_ceiling.py`` on:

- ``exact counts the risk uses``: the generator's own per-slide scores (CD8 and TCF-1+ T cells at tumour nests,
  myeloid cells in foci) recomputed from the rebuilt cells (a check: they equal ``ground_truth.json``'s);
- ``exact counts H&E shows``: T cells (CD8 and CD4 look the same in H&E) at nests per tumour area and myeloid cells
  in foci per tissue area, counted cell by cell. TCF-1 is a hidden cell state (``sample_data.celltypes``), so
  this is the most any H&E model -- and virtual CODEX, which is computed from the H&E -- could know;
- ``exact patch counts``: the same cell types counted per ``--patch-um`` square patch (112 µm = 224 px at
  0.5 µm/px) and summarised per slide (tumour-area-weighted CD8 and TCF-1+ counts, mean myeloid count): what a
  perfect patch-level CODEX (cell counts, not intensities) would give.

With ``--out`` (the pipeline's outputs) it also prints the yardstick of the integrated-gradient check: the mean
per-slide AUROC with which exact per-patch cell counts find the risk-mask patches on the stage-01 patches.

The same inputs are probed for the response task with an L2 logistic regression (AUC on each fold's validation
patients against the observed response; ``truth`` = the generator's response probability). The response also uses
the fraction of PD-L1+ tumour cells, a hidden state like TCF-1: ``exact counts the response uses`` includes it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from pipeline import artifacts as art


def cell_masks(layout, cells) -> dict[str, np.ndarray]:
    """Boolean per-cell masks (N,) the probes count: the generator's own (``outcomes.cells_counted``: ``cd8``,
    ``tcf1``, ``myeloid``, ``pdl1``) and what H&E shows: ``tcell`` (CD8 or CD4), ``tcell_at_nest``, ``myeloid_any``
    (macrophages, neutrophils), ``myeloid_in_foci``, plus ``cd8_any`` and ``tcf1_any`` (anywhere, for patch counts)."""
    from sample_data import outcomes
    from sample_data.panel import MARKER_INDEX
    from sample_data.tissue import CD4T, CD8T, MACRO, NEUTRO

    t = cells.type
    tcell = (t == CD8T) | (t == CD4T)
    myeloid = (t == MACRO) | (t == NEUTRO)
    at_nest = layout.sample("tumour", cells.x, cells.y) > -outcomes.NEST_MARGIN_UM
    return outcomes.cells_counted(cells, layout) | {
        "tcell": tcell, "tcell_at_nest": tcell & at_nest, "myeloid_any": myeloid,
        "myeloid_in_foci": myeloid & (layout.sample("myeloid", cells.x, cells.y) > 0.5),
        "cd8_any": t == CD8T, "tcf1_any": tcell & (cells.expr[:, MARKER_INDEX["TCF-1"]] > 0.3)}


def slide_counts(layout, cells, masks: dict[str, np.ndarray], patch_um: float) -> dict[str, np.ndarray]:
    """Per-slide probe inputs of one slide: ``visible`` (2,), ``patch`` (3,) (see the module docstring);
    ``masks`` from :func:`cell_masks`."""
    from sample_data import outcomes

    f = outcomes.slide_features(cells, layout)
    visible = np.array([np.log1p(masks["tcell_at_nest"].sum() / max(f["tumour_mm2"], 1e-3) / 50.0),
                        np.log1p(masks["myeloid_in_foci"].sum() / max(f["tissue_mm2"], 1e-3) / 50.0)])
    # exact counts per square patch of the tissue (>= half tissue on the layout grid)
    g = layout.grid_um
    n = int(layout.side_um // patch_um)
    tissue, tumour = layout.tissue > 0, (layout.tumour > 0) & (layout.tissue > 0)
    px, py = (cells.x // patch_um).astype(int), (cells.y // patch_um).astype(int)
    rows = []
    for a in range(n):
        for b in range(n):
            sl = (slice(int(a * patch_um / g), int((a + 1) * patch_um / g)),
                  slice(int(b * patch_um / g), int((b + 1) * patch_um / g)))
            if tissue[sl].mean() < 0.5:
                continue
            m = (py == a) & (px == b)
            rows.append((tumour[sl].mean(), (m & masks["cd8_any"]).sum(), (m & masks["tcf1_any"]).sum(),
                         (m & masks["myeloid_any"]).sum()))
    r = np.array(rows, float).reshape(-1, 4)
    w = r[:, 0]
    patch = np.array([np.log1p((r[:, 1] * w).sum() / max(w.sum(), 1e-3)),
                      np.log1p((r[:, 2] * w).sum() / max(w.sum(), 1e-3)),
                      np.log1p(r[:, 3].mean() if len(r) else 0.0)])
    return {"features": f, "visible": visible, "patch": patch}


def patch_aurocs(cohort: Path, out: Path, slide: str, cells, masks: dict[str, np.ndarray], he_mpp: float,
                 gt: dict) -> dict[str, float]:
    """AUROC with which exact per-patch cell counts find the risk-mask patches of one slide (the IG check's
    labels, ``bench.mica_vs_truth``), on the slide's stage-01 patches (stage 03's ``markers/{slide}.csv``, 224 px);
    empty when the slide has patches of one class only. ``masks`` from :func:`cell_masks`."""
    from sklearn.metrics import roc_auc_score

    from bench.mica_vs_truth import RISK_DEVIATION, patch_risk_deviation

    coords = pd.read_csv(art.LABELS.path(out, slide))[["x", "y"]].to_numpy(float)
    ps = 224.0
    y = patch_risk_deviation(cohort, slide, coords, ps, gt) > RISK_DEVIATION
    if y.all() or not y.any():
        return {}
    ux, uy = cells.x / he_mpp, cells.y / he_mpp                    # H&E level-0 px (the layout's origin)

    def per_patch(mask: np.ndarray) -> np.ndarray:
        return np.array([(mask & (ux >= x) & (ux < x + ps) & (uy >= y0) & (uy < y0 + ps)).sum() for x, y0 in coords])

    m = masks
    return {"cells the risk counts": roc_auc_score(y, per_patch(m["cd8"] | m["tcf1"] | m["myeloid"])),
            "T cells at nests + myeloid in foci (H&E-visible)":
                roc_auc_score(y, per_patch(m["tcell_at_nest"] | m["myeloid_in_foci"])),
            "all T cells + all myeloid cells": roc_auc_score(y, per_patch(m["tcell"] | m["myeloid_any"]))}


def rebuild(cohort: Path, patch_um: float, out: Path | None = None) -> tuple[dict[str, dict], dict]:
    """``({slide: slide_counts(...)}, ground truth)`` for every slide of ``cohort``, cells rebuilt from its flags;
    with ``out`` (the pipeline's output root) each entry also holds ``ig_ref`` (:func:`patch_aurocs`)."""
    from sample_data import make_cohort

    gt = json.loads((cohort / "ground_truth.json").read_text())
    args = argparse.Namespace(**gt["params"], out=cohort)             # the flags it was made with (seed included)
    _, jobs, _, _ = make_cohort.cohort_jobs(args, len(gt["patients"]))
    res = {}
    for job in tqdm(jobs, desc="cells", unit="slide"):
        _, layout, cells = make_cohort.slide_tissue(job)
        masks = cell_masks(layout, cells)
        res[job.slide_id] = slide_counts(layout, cells, masks, patch_um)
        if out is not None:
            res[job.slide_id]["ig_ref"] = patch_aurocs(cohort, out, job.slide_id, cells, masks, job.he_mpp, gt)
    return res, gt


VISIBLE = "exact counts H&E shows (T cells at nests, myeloid in foci)"


def visible_ceiling(cohort: Path, alphas: tuple[float, ...] = (0.001, 0.01, 0.1),
                    patch_um: float = 112.0) -> tuple[float, float, float]:
    """The H&E-visible survival ceiling of ``cohort`` on its own 5 folds: ``(mean, sd, alpha)`` of the best
    elastic-net Cox probe's c-index on exact counts of what H&E shows (the yardstick of ``bench.validate_mica``)."""
    from bench.mica_ceiling import folds, probe

    clin = pd.read_csv(cohort / "clinical.csv").set_index("slide_id")
    counts, _ = rebuild(cohort, patch_um)
    x = {s: counts[s]["visible"] for s in sorted(clin.index)}
    splits = folds(cohort)
    return max((probe(x, clin, splits, a) + (a,) for a in alphas), key=lambda t: t[0])


def main(argv: list[str] | None = None) -> int:
    from bench.mica_ceiling import _surv, cindex, folds, logistic_probe, probe
    from sample_data import outcomes

    p = argparse.ArgumentParser(prog="python -m bench.count_ceiling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cohort", type=Path, default=Path("/tmp/hex_val/cohort"))
    p.add_argument("--out", type=Path, default=None,
                   help="pipeline output root: adds the IG yardstick on its stage-01 patches (markers/{slide}.csv)")
    p.add_argument("--patch-um", type=float, default=112.0, help="side of the square patches, µm")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.001, 0.01, 0.1], help="elastic-net penalties")
    args = p.parse_args(argv)
    clin = pd.read_csv(args.cohort / "clinical.csv").set_index("slide_id")
    counts, gt = rebuild(args.cohort, args.patch_um, args.out)
    slides = sorted(clin.index)
    case = {s: clin.at[s, "case_id"] for s in slides}
    by_case: dict[str, list[str]] = {}
    for s in slides:
        by_case.setdefault(case[s], []).append(s)
    # check: the rebuilt cells give the generator's scores
    rebuilt = {c: outcomes.patient_scores([counts[s]["features"] for s in ss]) for c, ss in by_case.items()}
    worst = max(abs(rebuilt[c][k] - gt["patients"][c]["scores"][k])
                for c in by_case for k in ("cd8", "tcf1", "myeloid"))
    splits = folds(args.cohort)
    truth = np.array([gt["patients"][case[s]]["true_risk"] for s in slides])
    idx = {s: i for i, s in enumerate(slides)}
    print(f"rebuilt {len(slides)} slides; largest |score - ground_truth.json| {worst:.1e}\n")
    print("| input | c-index (mean ± sd over folds) |\n|---|---|")
    vals = [cindex(_surv(clin, va), truth[[idx[s] for s in va]]) for _, va in splits]
    print(f"| truth (true_risk) | {np.mean(vals):.3f} ± {np.std(vals):.3f} |")
    X = {"exact counts the risk uses (CD8, TCF-1+, myeloid)":
         {s: np.array([gt["patients"][case[s]]["scores"][k] for k in ("cd8", "tcf1", "myeloid")]) for s in slides},
         VISIBLE: {s: counts[s]["visible"] for s in slides},
         f"exact patch counts ({args.patch_um:g} µm patches)": {s: counts[s]["patch"] for s in slides}}
    for name, x in X.items():
        best = max((probe(x, clin, splits, a) + (a,) for a in args.alphas), key=lambda t: t[0])
        print(f"| Cox probe: {name} | {best[0]:.3f} ± {best[1]:.3f} (alpha {best[2]:g}) |")
    print("\n| input (response) | AUC (mean ± sd over folds) |\n|---|---|")
    resp = {s: int(clin.at[s, "response"]) for s in slides}
    prob = {s: np.array([gt["patients"][case[s]]["true_response_prob"]]) for s in slides}
    X = {"truth (true_response_prob)": prob,
         "exact counts the response uses (CD8, TCF-1+, PD-L1+, myeloid)":
         {s: np.array([gt["patients"][case[s]]["scores"][k] for k in ("cd8", "tcf1", "pdl1", "myeloid")])
          for s in slides}} | {k: v for k, v in X.items() if not k.startswith("exact counts the risk")}
    for name, x in X.items():
        m, sd = logistic_probe(x, resp, splits, fit=not name.startswith("truth"))
        print(f"| {name} | {m:.3f} ± {sd:.3f} |")
    refs = [c["ig_ref"] for c in counts.values() if c.get("ig_ref")]
    if refs:
        print(f"\n| exact per-patch count ({len(refs)} slides) | mean per-slide AUROC for the risk-mask patches |"
              "\n|---|---|")
        for k in refs[0]:
            print(f"| {k} | {np.mean([r[k] for r in refs]):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
