"""Score stage 10 against the generator's truth (a driver, not CI): cells, phenotypes, niches, outcome.

    python -m bench.validate_niches --cohort COHORT --out OUT [--outcome-out OUT2] [--run-stage]

``OUT`` holds stages 01-06 of ``COHORT`` (and 02-03 for the measured CODEX), e.g. the demo's; ``--run-stage`` runs
stage 10 there first (cells detected, default settings). The cohort must have ``truth/cells/{slide}.csv.gz``
(the generator writes them). Scores:

- cells: the detected nuclei of ``OUT/spatial/units/`` against the truth's nucleated cells (one-to-one within
  4 µm): precision, recall, F1;
- phenotypes at the TRUE cells (imported through ``spatial.units``, the same code path as ``--cells``): from the
  measured CODEX (the pipeline's own registration, disk means scaled over the cohort) and from the virtual CODEX,
  macro-F1 and per type against the generator's types (stem_t = T cell with the stem state, treg = CD4 with the
  Treg state), with the default gating table;
- niches: the detected cells matched to true cells; adjusted Rand index of ``niche`` (virtual) and
  ``niche_measured`` against the generator's compartments;
- outcome (``--outcome-out``: a stage-10 run on a >= 200-patient cohort): the niche richest in myeloid cells
  (macrophage + neutrophil) and the one richest in T cells, their HR per SD (q) and OR per SD (q).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from bench.cell_truth import match_cells
from bench.phenotype_truth import SCORED, score, truth_phenotypes
from pipeline import artifacts as art

T_CELLS = ("cd8_t", "cd4_t", "stem_t", "treg")
MYELOID = ("macrophage", "neutrophil")


def truth_cells(cohort: Path, slide: str) -> pd.DataFrame:
    """The generator's cells of one slide (nucleated only), with ``x_um, y_um`` = level-0 px x the H&E mpp (the
    pipeline's convention)."""
    gt = json.loads((cohort / "ground_truth.json").read_text())
    df = pd.read_csv(cohort / gt["slides"][slide]["cells"])
    df = df[df["nucleated"] == 1].reset_index(drop=True)
    mpp = float(gt["slides"][slide]["he_mpp"])
    df["x_um"], df["y_um"] = df["x"] * mpp, df["y"] * mpp
    for c in ("stem", "treg"):
        df[c] = df[c].astype(bool)
    return df


def score_detection(cohort: Path, out: Path, slides: list[str]) -> dict:
    from spatial.units import read_units

    tp = fp = fn = 0
    for s in slides:
        u = read_units(art.SPATIAL_UNITS.path(out, s))
        t = truth_cells(cohort, s)
        a, b, c, _ = match_cells(u.xy_um, t[["x_um", "y_um"]].to_numpy(), 4.0)
        tp, fp, fn = tp + a, fp + b, fn + c
    p, r = tp / max(1, tp + fp), tp / max(1, tp + fn)
    return {"precision": p, "recall": r, "f1": 2 * p * r / max(1e-12, p + r), "tp": tp, "fp": fp, "fn": fn}


def phenotypes_at_true_cells(cohort: Path, out: Path, slides: list[str]) -> dict:
    """Macro-F1 and per-type F1 of the default gating on the measured and on the virtual CODEX at the true cells."""
    from pipeline.cohort import resolve_slides
    from spatial.analysis import NicheSettings, fit_scaling, make_phenotyper
    from spatial.units import cell_units, read_units, write_units

    he = resolve_slides(cohort).he_paths()
    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files, truths = [], []
        for s in slides:
            t = truth_cells(cohort, s)
            t[["x", "y"]].to_csv(tmp / f"{s}.csv", index=False)
            u = cell_units(out, s, he[s], None, str(tmp), "px", 3.0, True)  # cells off the map are dropped
            f = tmp / f"{s}.h5"
            write_units(f, u)
            files.append(f)
            _, _, _, m = match_cells(u.xy_px, t[["x", "y"]].to_numpy(), 0.01)
            ph = np.full(len(u), "", object)
            ph[m[:, 0]] = truth_phenotypes(t)[m[:, 1]]
            truths.append(ph.astype(str))
        truth = np.concatenate(truths)
        for source in ("measured", "virtual"):
            scaling, _ = fit_scaling(files, source, sample_per_slide=10 ** 9)
            if scaling is None:
                continue
            ph = make_phenotyper(NicheSettings(), scaling.markers, None)
            pred = np.concatenate([np.asarray(ph.names + ["none"])[ph.codes(scaling.apply(
                read_units(f).measured if source == "measured" else read_units(f).virtual), scaling.markers)]
                for f in files])
            sc = score(pred, truth, SCORED)
            res[source] = {"macro_f1": sc["macro_f1"], "n_cells": sc["n_cells"],
                           "per_type": sc["per_class"].round(3).to_dict(orient="index")}
    return res


def invisible_types(cohort: Path) -> dict[str, list[str]]:
    """{phenotype: its gating markers that H&E does not show} (the generator's ``visible_markers``): the types the
    virtual CODEX cannot separate from the H&E."""
    from spatial.phenotypes import default_gating

    visible = set(json.loads((cohort / "ground_truth.json").read_text())["visible_markers"])
    out = {}
    for rule in default_gating().rules:
        hidden = sorted({c.marker for conj in rule.clauses for c in conj} - visible)
        if hidden:
            out[rule.phenotype] = hidden
    return out


def niche_ari(cohort: Path, out: Path, slides: list[str]) -> dict:
    """ARI of the detected cells' niches (virtual, measured) against the true compartments of their matches."""
    import anndata
    from sklearn.metrics import adjusted_rand_score

    cols: dict[str, list] = {"niche": [], "niche_measured": [], "truth": []}
    for s in slides:
        ad = anndata.read_h5ad(art.SPATIAL.path(out, s))
        t = truth_cells(cohort, s)
        _, _, _, m = match_cells(ad.obs[["x_um", "y_um"]].to_numpy(), t[["x_um", "y_um"]].to_numpy(), 4.0)
        cols["truth"] += list(t["compartment"].to_numpy()[m[:, 1]])
        for c in ("niche", "niche_measured"):
            cols[c] += list(ad.obs[c].astype(str).to_numpy()[m[:, 0]]) if c in ad.obs else [None] * len(m)
    out_ = {}
    for c in ("niche", "niche_measured"):
        v = np.asarray(cols[c], dtype=object)
        ok = v != None  # noqa: E711
        if ok.any():
            out_[c] = float(adjusted_rand_score(np.asarray(cols["truth"], dtype=object)[ok], v[ok]))
    return out_


def outcome_check(out: Path, units: str = "cells") -> dict:
    """The myeloid-richest and T-cell-richest niches and their association rows."""
    cohort_dir = (art.SPATIAL_COHORT if units == "cells" else art.SPATIAL_TILES_COHORT).dir(out)
    comp = pd.read_csv(cohort_dir / "composition.csv", index_col=0)
    share = {"myeloid": comp.reindex(list(MYELOID)).fillna(0).sum(), "t_cells": comp.reindex(list(T_CELLS)).fillna(0)
             .sum()}
    res: dict = {}
    for what, s in share.items():
        niche = str(s.idxmax())
        row = {"niche": niche, "share": float(s.max())}
        for kind, eff in (("survival", "hr_per_sd"), ("response", "or_per_sd")):
            p = cohort_dir / f"association_{kind}.csv"
            if p.is_file():
                tab = pd.read_csv(p).set_index("feature")
                if niche in tab.index:
                    row[kind] = {"effect": float(tab.loc[niche, eff]), "lo": float(tab.loc[niche, "lo"]),
                                 "hi": float(tab.loc[niche, "hi"]), "q": float(tab.loc[niche, "q"])}
        res[what] = row
    return res


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.validate_niches", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cohort", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="OUT of stages 01-06 (and 10) of COHORT")
    p.add_argument("--outcome-out", type=Path, help="OUT of a stage-10 run on a >= 200-patient cohort")
    p.add_argument("--outcome-units", choices=("cells", "tiles"), default="cells")
    p.add_argument("--run-stage", action="store_true", help="run stage 10 on OUT first (cells detected)")
    p.add_argument("--json", type=Path, help="write the scores here too")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.logs import setup_logging

    setup_logging()
    if args.run_stage:
        from spatial import niches

        rc = niches.main(["--cohort", str(args.cohort), "--out", str(args.out)])
        if rc:
            return rc
    slides = sorted(p.name.split(".")[0] for p in art.SPATIAL_UNITS.dir(args.out).glob("*.h5"))
    res = {"detection": score_detection(args.cohort, args.out, slides),
           "phenotypes_at_true_cells": phenotypes_at_true_cells(args.cohort, args.out, slides),
           "niche_ari": niche_ari(args.cohort, args.out, slides)}
    if args.outcome_out:
        res["outcome"] = outcome_check(args.outcome_out, args.outcome_units)
    d = res["detection"]
    print(f"cells: precision {d['precision']:.3f} recall {d['recall']:.3f} F1 {d['f1']:.3f} (target >= 0.85)")
    for src, r in res["phenotypes_at_true_cells"].items():
        print(f"phenotypes at true cells, {src}: macro-F1 {r['macro_f1']:.3f} over {r['n_cells']} cells"
              + (" (target >= 0.85)" if src == "measured" else ""))
        for typ, v in r["per_type"].items():
            print(f"  {typ:<11} F1 {v['f1']:.3f}  precision {v['precision']:.3f}  recall {v['recall']:.3f}  "
                  f"n {int(v['n'])}")
    hidden = invisible_types(args.cohort)
    res["types_hidden_from_he"] = hidden
    print("types the H&E cannot separate (gating markers not visible in H&E): "
          + "; ".join(f"{t} ({', '.join(m)})" for t, m in hidden.items()))
    for k, v in res["niche_ari"].items():
        print(f"niches vs compartments, {k}: ARI {v:.3f}" + (" (target >= 0.5)" if k == "niche_measured" else ""))
    for what, r in res.get("outcome", {}).items():
        parts = [f"{what}-richest niche {r['niche']} ({100 * r['share']:.0f}% {what})"]
        for kind in ("survival", "response"):
            if kind in r:
                e = r[kind]
                parts.append(f"{kind} {e['effect']:.2f} ({e['lo']:.2f}-{e['hi']:.2f}) q {e['q']:.2g}")
        print("outcome: " + "; ".join(parts))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
