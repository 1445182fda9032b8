"""Acceptance of the artefact-aware tissue detection (issue 20): an artefact cohort and its clean twin.

    python -m bench.validate_artefacts --work /tmp/artefacts --seed 43 --slides 6 --tissue-mm 1.0

Generates (unless present) ``WORK/artefacts`` (``make_cohort --artefacts``) and ``WORK/clean`` (same seed without
it: the clean twin, identical H&E outside the artefacts), runs stage 01 on both with its defaults and on the twin
with every exclusion off, then measures against the truth masks (``truth/artefacts/{slide}.png``):

- contaminated: of the patches stage 01 keeps on the artefact cohort, the share that overlaps an artefact, a patch
  "overlapping" when >= ``--overlap`` (default 5%) of its area is artefact in the truth mask (also reported: any
  artefact pixel at all); acceptance <= 2%;
- clean kept: of the twin's kept patches that hold no artefact pixel in the artefact cohort, the share stage 01
  keeps there; acceptance >= 97%;
- twin kept: the share of the twin's patches (every exclusion off) that the default run keeps on the clean twin;
- per cause: pixel recall (truth pixels of the cause inside the tissue mask that some detector excludes) and patch
  recall (twin-kept patches with >= ``--overlap`` of the cause that are dropped), and the QC table's excluded
  fraction against the truth's.

Writes ``WORK/validate_artefacts.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import h5py
import numpy as np

from pipeline import artifacts as art
from preprocess import patch
from preprocess.slide_io import HESlide
from preprocess.tissue import grid_tissue_mask, slide_artefacts

CODES = {"ink": 1, "fold": 2, "bubble": 3, "blur": 4, "debris": 5}


def _cohort(out: Path, seed: int, slides: int, tissue_mm: float, artefacts: bool, workers: int) -> None:
    from sample_data import make_cohort

    if (out / "ground_truth.json").exists():
        return
    args = ["--out", str(out), "--slides", str(slides), "--seed", str(seed), "--tissue-mm", str(tissue_mm),
            "--no-codex", "--workers", str(workers), "--log-level", "WARNING"] + (["--artefacts"] if artefacts else [])
    if make_cohort.main(args) != 0:
        raise SystemExit(f"make_cohort failed for {out}")


def _stage01(cohort: Path, out: Path, extra: list[str], workers: int) -> None:
    if patch.main(["--cohort", str(cohort), "--out", str(out), "--workers", str(workers), *extra]) != 0:
        raise SystemExit(f"stage 01 failed on {cohort}")


def _coords(out: Path, slide: str) -> tuple[set[tuple[int, int]], int]:
    with h5py.File(art.PATCH_GRID.path(out, slide), "r") as f:
        return {tuple(map(int, c)) for c in f["coords"][:]}, int(f.attrs["patch_size_level0"])


def _patch_fractions(label: np.ndarray, d: int, coords: set[tuple[int, int]], ps0: int) -> dict:
    """{coord: (any-artefact fraction, {cause: fraction})} of each patch from the truth mask at downsample d."""
    out = {}
    for x, y in coords:
        sub = label[y // d:-(-(y + ps0) // d), x // d:-(-(x + ps0) // d)]
        n = max(sub.size, 1)
        out[(x, y)] = (float((sub > 0).sum()) / n, {c: float((sub == k).sum()) / n for c, k in CODES.items()})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.validate_artefacts", description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="working folder (cohorts and stage-01 outputs)")
    ap.add_argument("--seed", type=int, default=43, help="cohort seed (use one the detectors were not tuned on)")
    ap.add_argument("--slides", type=int, default=6)
    ap.add_argument("--tissue-mm", type=float, default=1.0)
    ap.add_argument("--overlap", type=float, default=0.05,
                    help="a patch overlaps an artefact when at least this fraction of its area is artefact")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(argv)
    w = args.work
    a_coh, c_coh = w / "artefacts", w / "clean"
    _cohort(a_coh, args.seed, args.slides, args.tissue_mm, True, args.workers)
    _cohort(c_coh, args.seed, args.slides, args.tissue_mm, False, args.workers)
    off = ["--no-ink", "--no-folds", "--no-bubbles", "--no-blur"]
    _stage01(a_coh, w / "out_artefacts", [], args.workers)
    _stage01(c_coh, w / "out_clean", [], args.workers)
    _stage01(c_coh, w / "out_clean_off", off, args.workers)
    _stage01(a_coh, w / "out_artefacts_off", off, args.workers)

    gt = json.loads((a_coh / "ground_truth.json").read_text())
    tot = {"kept": 0, "contaminated": 0, "touching": 0, "clean": 0, "clean_kept": 0, "twin_off": 0, "twin_on": 0,
           "off_kept": 0, "off_contaminated": 0}
    cause_px = {c: [0, 0] for c in CODES}
    cause_patch = {c: [0, 0] for c in CODES}
    per_slide = {}
    for s, rec in sorted(gt["slides"].items()):
        a = rec["artefacts"]
        label = cv2.imread(str(a_coh / a["mask"]), cv2.IMREAD_UNCHANGED)
        d = int(a["downsample"])
        kept_a, ps0 = _coords(w / "out_artefacts", s)
        kept_c, _ = _coords(w / "out_clean", s)
        kept_off, _ = _coords(w / "out_clean_off", s)
        kept_a_off, _ = _coords(w / "out_artefacts_off", s)
        fa = _patch_fractions(label, d, kept_a | kept_c | kept_off | kept_a_off, ps0)
        cont = [c for c in kept_a if fa[c][0] >= args.overlap]
        touch = [c for c in kept_a if fa[c][0] > 0]
        clean = [c for c in kept_c if fa[c][0] == 0]
        tot["kept"] += len(kept_a)
        tot["contaminated"] += len(cont)
        tot["touching"] += len(touch)
        tot["clean"] += len(clean)
        tot["clean_kept"] += sum(c in kept_a for c in clean)
        tot["twin_off"] += len(kept_off)
        tot["twin_on"] += len(kept_c & kept_off)
        tot["off_kept"] += len(kept_a_off)
        tot["off_contaminated"] += sum(fa[c][0] >= args.overlap for c in kept_a_off)
        for cause in CODES:
            hit = [c for c in kept_c if fa[c][1][cause] >= args.overlap]
            cause_patch[cause][0] += len(hit)
            cause_patch[cause][1] += sum(c not in kept_a for c in hit)
        # pixel recall: detectors run again on the artefact slide (the same functions stage 01 calls)
        with HESlide(a_coh / "he" / f"{s}.tif") as sl:
            thumb, ds = sl.thumbnail(2048)
            tis, _ = grid_tissue_mask(thumb, sl.mpp * ds)
            masks = slide_artefacts(sl, thumb, ds, tis)
        det = np.zeros_like(tis)
        for m in masks.values():
            det |= m
        lab_t = cv2.resize(label, (tis.shape[1], tis.shape[0]), interpolation=cv2.INTER_NEAREST)
        for cause, k in CODES.items():
            t = (lab_t == k) & tis
            cause_px[cause][0] += int(t.sum())
            cause_px[cause][1] += int((t & det).sum())
        qc = {r.split(",")[0]: float(r.split(",")[1])
              for r in (w / "out_artefacts" / "patches" / f"{s}_qc.csv").read_text().splitlines()[1:]}
        truth_frac = float(((lab_t > 0) & tis).sum()) / max(int(tis.sum()), 1)
        per_slide[s] = {"kept": len(kept_a), "contaminated": len(cont), "clean": len(clean),
                        "clean_kept": sum(c in kept_a for c in clean), "qc_total": round(qc["total"], 4),
                        "truth_total": round(truth_frac, 4), "causes": sorted(a["causes"])}
    res = {
        "seed": args.seed, "slides": args.slides, "overlap_threshold": args.overlap,
        "contaminated_share": tot["contaminated"] / max(tot["kept"], 1),
        "touching_share": tot["touching"] / max(tot["kept"], 1),
        "clean_kept_share": tot["clean_kept"] / max(tot["clean"], 1),
        "twin_kept_share": tot["twin_on"] / max(tot["twin_off"], 1),
        "without_detection_contaminated_share": tot["off_contaminated"] / max(tot["off_kept"], 1),
        "counts": tot,
        "pixel_recall": {c: (v[1] / v[0] if v[0] else None) for c, v in cause_px.items()},
        "patch_recall": {c: (v[1] / v[0] if v[0] else None) for c, v in cause_patch.items()},
        "patch_counts": cause_patch, "per_slide": per_slide,
    }
    (w / "validate_artefacts.json").write_text(json.dumps(res, indent=1) + "\n")
    print(f"kept patches overlapping an artefact (>= {args.overlap:.0%} of the patch): "
          f"{res['contaminated_share']:.2%} ({tot['contaminated']}/{tot['kept']}; any pixel: "
          f"{res['touching_share']:.2%}; without detection: {res['without_detection_contaminated_share']:.2%})")
    print(f"clean twin-kept patches kept on the artefact cohort: {res['clean_kept_share']:.2%} "
          f"({tot['clean_kept']}/{tot['clean']}); clean twin kept with detection on vs off: "
          f"{res['twin_kept_share']:.2%} ({tot['twin_on']}/{tot['twin_off']})")
    for c in CODES:
        pr, pa = res["pixel_recall"][c], res["patch_recall"][c]
        print(f"  {c:7s} pixel recall {'-' if pr is None else f'{pr:.2f}'}  patch recall "
              f"{'-' if pa is None else f'{pa:.2f}'} ({cause_patch[c][1]}/{cause_patch[c][0]})")
    ok = res["contaminated_share"] <= 0.02 and res["clean_kept_share"] >= 0.97
    print("acceptance:", "met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
