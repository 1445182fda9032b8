"""Print what the demo made, scored against the sample cohort's ground truth.

    python -m bench.demo_summary --cohort demo_out/cohort --out demo_out --outcome-out demo_out/outcome

Each section appears only when its artifacts exist, so the summary also works part-way through the pipeline. Paths
under OUT come from the artifact registry (``pipeline.artifacts``).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from pipeline import artifacts as art


def _section(title: str) -> None:
    print(f"\n--- {title}")


def _existing(artifact: art.Artifact, out: Path, **kw: str) -> list[Path]:
    """The artifact's main files under ``out``, sorted: ``*`` for every variable of its template not in ``kw``
    (``_existing(art.MICA_RUN, out)``: every ``mica_runs/*/summary.csv``)."""
    free = {n: "*" for n in re.findall(r"\{(\w+)\}", artifact.template()) if n not in kw}
    return sorted(out.glob(artifact.path(".", **free, **kw).as_posix()))


def summarize(cohort: Path, out: Path) -> None:
    gt_path = cohort / "ground_truth.json"
    if not gt_path.exists():
        print(f"no cohort at {cohort}")
        return
    gt = json.loads(gt_path.read_text())
    slides = sorted(gt["slides"])
    _section("sample cohort")
    print(f"{cohort}: {len(slides)} slides, {len(gt['patients'])} patients, {len(gt['markers'])} markers "
          f"({len(gt['visible_markers'])} visible in H&E); preview: {cohort / 'preview.png'}")

    if art.PATCH_GRID.dir(out).is_dir():
        import h5py

        counts = []
        for s in slides:
            f = art.PATCH_GRID.path(out, s)
            if f.exists():
                with h5py.File(f, "r") as h:
                    counts.append(len(h["coords"]))
        if counts:
            _section("01 patch grid")
            print(f"{len(counts)} slides, {sum(counts)} patches (min {min(counts)}, max {max(counts)} per slide)")

    reg = [art.REGISTRATION.path(out, s) for s in slides]
    recs = [json.loads(f.read_text()) for f in reg if f.exists()]
    if recs:
        ncc = [r["qc"]["ncc_after"] for r in recs if isinstance(r.get("qc", {}).get("ncc_after"), float)]
        flagged = sum(r.get("status") != "ok" for r in recs)
        _section("02 registration")
        print(f"{len(recs)} slides, {flagged} flagged; QC NCC after registration {min(ncc):.3f}-{max(ncc):.3f}"
              if ncc else f"{len(recs)} slides, {flagged} flagged")
    summarize_registration_truth(cohort, out)

    csvs = [f for f in (art.LABELS.path(out, s) for s in slides) if f.exists()]
    if csvs:
        import pandas as pd

        n = sum(len(pd.read_csv(c, usecols=["index"])) for c in csvs)
        _section("03 marker labels")
        print(f"{len(csvs)} slides, {n} labelled patches in {art.LABELS.dir(out)}")

    for run in (i["run"] for i in art.HEX_TEST.instances(out)):
        table = art.HEX_TEST.path(out, run=run)
        if not table.exists():
            continue
        import pandas as pd

        df = pd.read_csv(table)
        df = df[df["marker"].isin(gt["markers"])]
        vis = df[df["marker"].isin(gt["visible_markers"])]["pearson"]
        inv = df[~df["marker"].isin(gt["visible_markers"])]["pearson"]
        _section(f"05 HEX test ({run})")
        print(f"mean Pearson r: visible markers {vis.mean():.3f} (n={len(vis)}), "
              f"invisible markers {inv.mean():.3f} (n={len(inv)}), all {df['pearson'].mean():.3f}")
        best = df.sort_values("pearson", ascending=False)
        print("best: " + ", ".join(f"{m} {r:.2f}" for m, r in zip(best["marker"][:5], best["pearson"][:5])))
        print(f"plots and tables: {table.parent}")

    summarize_infer(out)
    summarize_mica(cohort, out)


def summarize_registration_truth(cohort: Path, out: Path, label_sub: int = 4) -> None:
    """Stages 02-03 against the true map (affine + warp): error at patch centres through the registration's field
    (affine-only beside it; targets median <= 1 µm, p95 <= 3 µm), and the raw labels of fully covered patches vs
    an oracle under the true warp (target r >= 0.97 per marker)."""
    import h5py
    import pandas as pd

    from sample_data.truth import errors_um, marker_pearsons, oracle_patch_means, record_transform, true_transform

    gt = json.loads((cohort / "ground_truth.json").read_text())
    rows = []
    for s in sorted(gt["slides"]):
        rec, grid = art.REGISTRATION.path(out, s), art.PATCH_GRID.path(out, s)
        if not rec.exists() or not grid.exists():
            continue
        with h5py.File(grid, "r") as h:
            coords, size = h["coords"][:], int(h.attrs["patch_size_level0"])
        est, true = record_transform(rec), true_transform(cohort, s)
        mpp = gt["slides"][s]["he_mpp"]
        centres = coords + (size - 1) / 2.0
        e, a = errors_um(est, true, centres, mpp), errors_um(est.affine_only(), true, centres, mpp)
        r_min = None
        raw_path = art.LABELS.dir(out) / "raw" / f"{s}.csv"  # stage 03's unnormalised means
        if raw_path.exists():
            raw = pd.read_csv(raw_path)
            raw = raw[raw["coverage"] >= 0.999]
            orc = oracle_patch_means(cohort / "codex" / f"{s}.ome.tif", true, raw[["x", "y"]].to_numpy(), size,
                                     label_sub)
            rs = marker_pearsons(raw[gt["markers"]].to_numpy(), orc, gt["markers"])
            r_min = min(rs.values()) if rs else None
        rows.append((s, np.median(e), np.percentile(e, 95), np.median(a), np.percentile(a, 95), r_min))
    if not rows:
        return
    warp = max((gt["slides"][s].get("warp") or {}).get("amplitude_um", 0) for s in gt["slides"])
    _section(f"02-03 vs the true map (warp up to {warp:g} µm): error at patch centres (µm), labels vs oracle")
    for s, med, p95, amed, ap95, r in rows:
        rtxt = f"  labels min r {r:.4f}" if r is not None else ""
        print(f"{s}: field median {med:.3f}  p95 {p95:.3f}  | affine only median {amed:.3f}  p95 {ap95:.3f}{rtxt}")
    rmins = [r[5] for r in rows if r[5] is not None]
    print(f"worst: median {max(r[1] for r in rows):.3f} µm (target <= 1), p95 {max(r[2] for r in rows):.3f} µm "
          f"(target <= 3); affine only {max(r[3] for r in rows):.3f} / {max(r[4] for r in rows):.3f} µm"
          + (f"; labels min r {min(rmins):.4f} (target >= 0.97)" if rmins else ""))


def infer_consistency(out: Path, run: str) -> dict | None:
    """Stage 06 vs stage 05 on the held-out slides: max |hex_pred - hex.test prediction| at the same patches, and the
    largest difference of per-marker Pearson r (hex_pred vs labels, against ``marker_pearson.csv``) of HEX run
    ``run``; None when the run has no test predictions or stage 06 predicted another grid."""
    import h5py
    import pandas as pd

    from hex.evaluate.metrics import pearson

    pp = art.HEX_TEST.dir(out, run=run) / "patch_predictions.csv"
    mp = art.HEX_TEST.path(out, run=run)
    if not pp.exists() or not mp.exists():
        return None
    test = pd.read_csv(pp)
    markers = [c[len("pred_"):] for c in test.columns if c.startswith("pred_")]
    parts = []
    for slide, df in test.groupby("slide", sort=True):
        f = art.PREDICTIONS.path(out, slide)
        if not f.exists():
            return None
        with h5py.File(f, "r") as h:
            names = [str(m) for m in h.attrs["markers"]]
            coords = h["coords"][:]
            pred = h["codex_prediction"][:]
        pos = {(int(x), int(y)): i for i, (x, y) in enumerate(coords)}
        rows = [pos.get((int(x), int(y)), -1) for x, y in zip(df["x"], df["y"])]
        if min(rows, default=0) < 0:
            return None  # hex_pred was made on another grid (e.g. --stride): nothing to compare at the same patches
        cols = [names.index(m) for m in markers]
        parts.append((df, pred[np.asarray(rows)][:, cols]))
    if not parts:
        return None
    ref = np.concatenate([d[[f"pred_{m}" for m in markers]].to_numpy(np.float64) for d, _ in parts])
    wsi = np.concatenate([p for _, p in parts]).astype(np.float64)
    y = np.concatenate([d[[f"true_{m}" for m in markers]].to_numpy(np.float64) for d, _ in parts])
    r_wsi = pearson(y, wsi)
    table = pd.read_csv(mp).set_index("marker")
    r_test = table.loc[markers, "pearson"].to_numpy(np.float64)
    ok = np.isfinite(r_wsi) & np.isfinite(r_test)
    return {"n": len(ref), "slides": len(parts), "max_abs_diff": float(np.abs(ref - wsi).max()),
            "max_r_diff": float(np.abs(r_wsi[ok] - r_test[ok]).max()) if ok.any() else float("nan"),
            "mean_r": float(np.nanmean(r_wsi))}


def summarize_infer(out: Path) -> None:
    """Section 06: prediction files, the consistency check against hex.test, and where the previews are."""
    preds = _existing(art.PREDICTIONS, out)
    if not preds:
        return
    _section(f"06 whole-slide inference ({art.PREDICTIONS.folder}/, {art.VIRTUAL_CODEX.folder}/)")
    print(f"{len(preds)} slides predicted in {art.PREDICTIONS.dir(out)}")
    for run in (i["run"] for i in art.HEX_RUN.instances(out)):
        c = infer_consistency(out, run)
        if c is None:
            continue
        print(f"consistency with 05 ({run}, {c['slides']} held-out slides, {c['n']} patches): max |diff| "
              f"{c['max_abs_diff']:.2e} (target <= 1e-4), per-marker r max diff {c['max_r_diff']:.2e}, "
              f"mean r {c['mean_r']:.3f}")
    maps = art.VIRTUAL_CODEX.dir(out)
    previews = sorted(maps.glob("*_preview.png"))
    if previews:
        n_ome = len(list(maps.glob("*.ome.tif")))
        print(f"virtual CODEX: {n_ome} OME-TIFFs; preview: {previews[0]}")


def _report_table(md: Path) -> None:
    """The first results table of a ``report.md`` (and the comparisons of its primary row)."""
    lines = md.read_text().splitlines()
    keep = [ln for ln in lines if ln.startswith("|") or ln.startswith("##") or "patients," in ln]
    print("\n".join(keep[:40]))


def summarize_mica(cohort: Path, out: Path) -> None:
    """Sections 07-09 of one output root: feature bags, the outcome reports (the run's own folds and independent
    cohorts) and the IG checks against the generator's risk masks."""
    bags = {i["encoder"]: _existing(art.FEATURE_BAGS, out, **i) for i in art.FEATURE_BAGS.instances(out)}
    bags = {e: files for e, files in bags.items() if files}
    if bags:
        _section(f"07 feature bags ({out})")
        for e, files in bags.items():
            print(f"H&E {e}: {len(files)} slides in {art.FEATURE_BAGS.dir(out, encoder=e)}")
        for f in _existing(art.CODEX_FEATURE_TABLE, out):
            print(f"CODEX {f.stem}: {f}")
    for rep in _existing(art.MICA_REPORT, out):
        md = rep.parent / "report.md"
        if md.exists():
            _section(f"09 outcome report of {rep.parent.parent.name} (its own 5 folds, out of fold): {md}")
            _report_table(md)
    for pred in _existing(art.MICA_EXTERNAL, out):
        md = pred.parent / "report.md"
        _section(f"09 {pred.parent.parent.parent.name} on the independent cohort {pred.parent.name}: "
                 f"{md if md.exists() else pred}")
        if md.exists():
            _report_table(md)
    for run_dir in _existing(art.MICA_RUN, out):
        ig = art.ATTRIBUTIONS.dir(out, run=run_dir.parent.name)
        if not ig.is_dir():
            continue
        import pandas as pd

        from bench.mica_vs_truth import ig_risk_auroc

        _section(f"09 integrated gradients ({run_dir.parent.name})")
        summ = ig / "ig_summary.csv"
        if summ.exists():
            t = pd.read_csv(summ)
            print(f"{len(t)} slides; completeness |sum(attr) - (f(x) - f(0))| / |f(x) - f(0)|: median "
                  f"{t['delta'].abs().median():.4f}, max {t['delta'].abs().max():.4f}")
        auc = ig_risk_auroc(cohort, ig)
        if auc:
            print(f"|patch attribution| vs the generator's risk masks: mean per-slide AUROC {auc['mean']:.3f} "
                  f"(pooled {auc['pooled']:.3f})")
        print(f"heatmaps and the marker bar plot: {ig}")


def summarize_niches(cohort: Path, out: Path) -> None:
    """Stage 10: the cohort summary (niches, their composition, the niche-outcome table) and, where the cohort has
    the generator's cells, the detection F1 and the niches' adjusted Rand index against the true compartments."""
    summ = art.SPATIAL_COHORT.dir(out) / "summary.txt"
    if not summ.exists():
        return
    _section(f"10 spatial niches ({art.SPATIAL_COHORT.dir(out)})")
    print(summ.read_text().rstrip())
    slides = sorted(p.name.split(".")[0] for p in art.SPATIAL_UNITS.dir(out).glob("*.h5"))
    if slides and (cohort / "truth" / "cells").is_dir():
        from bench.validate_niches import niche_ari, score_detection

        d = score_detection(cohort, out, slides)
        print(f"nuclei vs the generator's cells (4 µm): precision {d['precision']:.3f}, recall {d['recall']:.3f}, "
              f"F1 {d['f1']:.3f}")
        for k, v in niche_ari(cohort, out, slides).items():
            print(f"{k} vs the true compartments: adjusted Rand index {v:.3f}")
    print(f"AnnData (scanpy/squidpy) and niche maps: {art.SPATIAL.dir(out)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cohort", type=Path, required=True, help="sample cohort folder (has ground_truth.json)")
    p.add_argument("--out", type=Path, required=True, help="pipeline output root")
    p.add_argument("--outcome-out", type=Path, help="output root of the demo's outcome cohort (stages 01, 06-10; "
                   "its cohort in OUTCOME_OUT/cohort)")
    a = p.parse_args(argv)
    summarize(a.cohort, a.out)
    if a.outcome_out is not None and a.outcome_out.is_dir():
        summarize_mica(a.outcome_out / "cohort", a.outcome_out)
        summarize_niches(a.outcome_out / "cohort", a.outcome_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
