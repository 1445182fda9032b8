"""Generate the synthetic paired H&E / CODEX lung-cancer cohort that every stage of the pipeline is scored against.

    python -m sample_data.make_cohort --out sample_cohort --slides 12 --seed 0
    python -m sample_data.make_cohort --out /tmp/tiny --slides 3 --tissue-mm 0.6 --workers 1
    python -m sample_data.make_cohort --out /tmp/tables --slides 200 --tables-only   # outcomes only, no images

Each slide is a latent tissue (tumour nests, stroma, lymphoid aggregates, vessels, air spaces, myeloid foci) filled
with individual cells (sample_data/tissue.py), rendered twice from the same cells (sample_data/render.py): an H&E
at 0.5 µm/px (``--he-mpp 0.25``: 40x) and a 40-channel CODEX at 0.377 µm/px placed by a known random affine plus a
smooth non-rigid displacement (``--warp-um``, sample_data/warp.py). Layout of ``--out`` (docs/FORMATS.md,
"Sample cohort layout"):

    he/{slide}.tif            Aperio-style tiled JPEG pyramid (OpenSlide: all levels, openslide.mpp-x = --he-mpp)
    codex/{slide}.ome.tif     pyramidal OME-TIFF, uint16, CYX, 40 named channels, PhysicalSizeX/Y = 0.377 µm
                              (--codex-format: codex/{slide}.qptiff, or MCMICRO's codex/{slide}/registration/
                              {slide}.ome.tif + codex/{slide}/markers.csv; pairs.csv points at it)
    pairs.csv                 he_slide,codex_image (paths relative to --out)
    marker_panel.csv          channel,marker
    clinical.csv              case_id,slide_id,survival_months,censorship,response,age,stage
    splits/splits_{k}.csv     train,val slide ids, patient-level folds, k = 0..4
    ground_truth.json         seed, markers, visible_markers, per-slide affine_codex_to_he (+ warp, no-data box),
                              per-patient true risk
    warps/{slide}.npy         (2, Gy, Gx) float32 displacement D (H&E level-0 px) at nodes j·S, i·S (--warp-um > 0)
    risk_masks/{slide}.png    uint8 map at H&E downsample 32: 128 neutral, > 128 cells that raise the hazard
                              (myeloid foci), < 128 cells that lower it (CD8 / TCF-1+ T cells at tumour nests)
    truth/cells/{slide}.csv.gz  every cell: nucleus centre x, y (H&E level-0 px), type, nucleated, hidden states,
                              compartment (sample_data/cell_truth.py; also with --tables-only)
    preview.png               first slide: H&E thumbnail, DAPI and three markers

The same seed gives the same files (no timestamps in any of them). H&E rendering, CODEX rendering and the warp
draw from their own random streams, so ``--he-mpp 0.25`` gives the 40x twin of a 20x cohort: same cells, same
CODEX files, same displacement in µm.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import multiprocessing as mp
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from . import artefacts, outcomes, render, tissue
from .cell_truth import COLUMN_NOTES, COMPARTMENTS, write_cell_truth
from .panel import MARKERS, PANEL_CSV
from .preview import write_preview
from .warp import MIN_CORR_UM, displaced, make_warp
from .writers import CODEX_FORMATS, codex_rel_path, write_aperio_tiff, write_codex

log = logging.getLogger("sample_data.make_cohort")

HE_MPP = 0.5
CODEX_MPP = 0.377
RISK_MASK_DOWNSAMPLE = 32
CELL_TRUTH_DIR = "truth/cells"
ARTEFACT_DIR = "truth/artefacts"


@dataclass(frozen=True)
class SlideJob:
    """Everything one worker needs to generate one slide."""

    out: str
    slide_id: str
    patient: tissue.Patient
    entropy: int
    spawn_key: tuple[int, ...]
    tissue_um: float
    margin_um: float
    density: float
    rotation_deg: float
    shift_um: float
    codex_coverage: float
    images: bool
    he_mpp: float = HE_MPP
    warp_um: float = 0.0
    codex: bool = True
    warp_corr_um: float = MIN_CORR_UM
    nodata_frac: float = 0.0  # side of a zero-filled square in the CODEX, as a fraction of its side (0: none)
    codex_format: str = "ome"  # writers.CODEX_FORMATS: the same CODEX pixels as OME-TIFF, QPTIFF or MCMICRO
    stain_profile: str = "default"  # render.STAIN_PROFILES
    stain_variation: str = "moderate"  # render.STAIN_VARIATIONS, drawn from sub-stream 4
    artefacts: bool = False  # sample_data/artefacts.py, drawn from sub-stream 5


def _rng(job: SlideJob, stream: int | None = None) -> np.random.Generator:
    """The slide's random stream (layout, cells, placement), or its sub-stream 1 (H&E), 2 (CODEX), 3 (warp),
    4 (stain variation), 5 (artefacts)."""
    key = job.spawn_key if stream is None else (*job.spawn_key, stream)
    return np.random.default_rng(np.random.SeedSequence(job.entropy, spawn_key=key))


def nodata_box(shape: tuple[int, int], frac: float) -> list[int]:
    """[x0, y0, x1, y1) CODEX level-0 px of the zero-filled square: side ``frac`` x the image, right of centre."""
    h, w = shape
    side = int(round(frac * min(h, w)))
    x0, y0 = int(round(0.6 * w - side / 2)), int(round(0.5 * h - side / 2))
    return [x0, y0, min(w, x0 + side), min(h, y0 + side)]


def _zero_box(channels, box: list[int]):
    """The channel images with ``box`` zero-filled (a missing tile / region outside the stitched ROI)."""
    x0, y0, x1, y1 = box
    for ch in channels:
        ch[y0:y1, x0:x1] = 0
        yield ch


def slide_tissue(job: SlideJob) -> tuple[np.random.Generator, tissue.Layout, tissue.Cells]:
    """The slide's latent layout and its cells with their expression (no images); also the slide's random stream,
    positioned after them (what :func:`generate_slide` draws next from)."""
    rng = _rng(job)
    p = job.patient
    jitter = tissue.Patient(case_id=p.case_id, age=p.age, stage=p.stage, hot=p.hot + rng.normal(0, 0.25),
                            myeloid=p.myeloid + rng.normal(0, 0.25),
                            tumour_frac=float(np.clip(p.tumour_frac + rng.normal(0, 0.04), 0.15, 0.6)),
                            offsets=p.offsets)
    slide_offsets = {k: float(rng.normal(0, 0.3)) for k in tissue.PROGRAMMES}
    layout = tissue.make_layout(rng, jitter, job.tissue_um, job.margin_um)
    cells = tissue.place_cells(rng, layout, jitter, job.density)
    cells.expr = tissue.express(rng, cells, layout, jitter, slide_offsets)
    return rng, layout, cells


def generate_slide(job: SlideJob) -> dict:
    """Generate one slide (layout, cells, images, risk mask); returns its ground truth and outcome features."""
    cv2.setNumThreads(1)
    t0, c0 = time.perf_counter(), time.process_time()
    rng, layout, cells = slide_tissue(job)

    # CODEX field: a square of codex_coverage x the tissue diameter, shifted and rotated
    he = render.he_frame(layout.side_um, job.he_mpp)
    theta = np.deg2rad(rng.uniform(-job.rotation_deg, job.rotation_deg))
    centre = (layout.side_um / 2 + rng.uniform(-job.shift_um, job.shift_um),
              layout.side_um / 2 + rng.uniform(-job.shift_um, job.shift_um))
    n_cx = 16 * max(4, int(round(job.codex_coverage * job.tissue_um / CODEX_MPP / 16)))  # even pyramid levels
    cx = render.codex_frame(centre, theta, (n_cx, n_cx), CODEX_MPP)
    affine = he.um_to_px @ cx.px_to_um
    coverage = _codex_tissue_coverage(layout, cx)
    warp = make_warp(_rng(job, 3), layout.side_um, job.warp_um, job.warp_corr_um) if job.warp_um > 0 else None
    box = nodata_box(cx.shape, job.nodata_frac) if job.nodata_frac > 0 else None

    mask_rel = _write_risk_mask(Path(job.out), job.slide_id, cells, layout, he, job.he_mpp)
    out = Path(job.out)
    cells_rel = f"{CELL_TRUTH_DIR}/{job.slide_id}.csv.gz"
    write_cell_truth(out / cells_rel, cells, layout, he)  # draws no random numbers
    warp_rel = f"warps/{job.slide_id}.npy"
    nodes, step = warp.he_nodes(he.shape, job.he_mpp) if warp is not None else (None, None)
    if nodes is not None:
        np.save(out / warp_rel, nodes, allow_pickle=False)

    timing = {"cells": time.perf_counter() - t0}
    if job.images:
        ras = render.rasterise(cells, layout, he)
        stain = render.draw_stain(_rng(job, 4), job.stain_profile, job.stain_variation)
        rgb = render.render_he(_rng(job, 1), cells, layout, he, ras, stain)
        del ras
        if job.artefacts:
            art_mask, art_ds, art_causes = artefacts.add_artefacts(_rng(job, 5), rgb, layout, he)
            art_rel = f"{ARTEFACT_DIR}/{job.slide_id}.png"
            cv2.imwrite(str(out / art_rel), art_mask)
            art_truth = {"mask": art_rel, "downsample": art_ds, "causes": art_causes,
                         "codes": dict(artefacts.CODES)}
        write_aperio_tiff(out / "he" / f"{job.slide_id}.tif", rgb, job.he_mpp, app_mag=int(round(10 / job.he_mpp)),
                          quality=stain.jpeg_quality)
        del rgb
        timing["he"] = time.perf_counter() - t0 - sum(timing.values())
    if job.images and job.codex:
        c_cells, c_layout = displaced(cells, layout, warp) if warp is not None else (cells, layout)
        ras = render.rasterise(c_cells, c_layout, cx)
        chans = render.codex_channels(_rng(job, 2), c_cells, c_layout, cx, ras)
        if box is not None:
            chans = _zero_box(chans, box)
        write_codex(job.codex_format, out, job.slide_id, chans, MARKERS, cx.shape, CODEX_MPP,
                    uid_seed=f"{job.entropy}/{job.slide_id}")
        timing["codex"] = time.perf_counter() - t0 - sum(timing.values())
    timing["cpu"] = time.process_time() - c0
    log.debug("%s: %d cells, %s", job.slide_id, len(cells), {k: round(v, 2) for k, v in timing.items()})
    truth = {
        "he_mpp": job.he_mpp,
        "codex_mpp": CODEX_MPP,
        "affine_codex_to_he": [[round(float(v), 10) for v in row] for row in affine],
        "warp": _warp_entry(step, warp_rel, job.warp_um),
        "risk_mask_png": mask_rel,
        "risk_mask_downsample": RISK_MASK_DOWNSAMPLE,
        "cells": cells_rel,
        "he_shape": list(he.shape),
        "codex_shape": list(cx.shape),
        "codex_rotation_deg": round(float(np.rad2deg(theta)), 6),
        "codex_tissue_coverage": round(coverage, 4),
        "n_cells": len(cells),
    }
    if box is not None:
        truth["nodata_box_codex_px"] = box
    if job.images:
        truth["stain"] = {"profile": job.stain_profile, "variation": job.stain_variation} | stain.to_dict()
    if job.images and job.artefacts:
        truth["artefacts"] = art_truth
    return {"slide_id": job.slide_id, "case_id": job.patient.case_id, "n_cells": len(cells),
            "features": outcomes.slide_features(cells, layout), "ground_truth": truth, "timing": timing}


def _warp_entry(step: float | None, rel: str, amplitude_um: float) -> dict | None:
    """Ground-truth entry of the displacement (docs/FORMATS.md convention); None without one."""
    if step is None:
        return None
    return {"file": rel, "step_px": step, "amplitude_um": amplitude_um,
            "units": "(dx, dy) H&E level-0 px at nodes (x, y) = (j, i) * step_px; x_codex = "
                     "inv(affine_codex_to_he) @ (x_he - D(x_he)), D bilinear between nodes"}


def _write_risk_mask(out: Path, slide_id: str, cells, layout, he: render.Frame, he_mpp: float) -> str:
    """risk_masks/{slide}.png at H&E downsample 32: 128 neutral, > 128 raises the hazard, < 128 lowers it."""
    contrib = outcomes.risk_contributions(cells, layout)
    d = RISK_MASK_DOWNSAMPLE * he_mpp
    nm = -(-he.shape[0] // RISK_MASK_DOWNSAMPLE)
    hist, _, _ = np.histogram2d(cells.y, cells.x, bins=nm, range=[[0, nm * d], [0, nm * d]], weights=contrib)
    hist = cv2.GaussianBlur(hist.astype(np.float32), (0, 0), 1.5)
    mask = np.clip(np.rint(128 + 127 * np.tanh(hist / 0.3)), 0, 255).astype(np.uint8)
    rel = f"risk_masks/{slide_id}.png"
    cv2.imwrite(str(out / rel), mask)
    return rel


def _codex_tissue_coverage(layout: tissue.Layout, frame: render.Frame) -> float:
    """Fraction of the tissue (coarse layout grid) that falls inside the CODEX field."""
    ys, xs = np.nonzero(layout.tissue > 0)
    g = layout.grid_um
    pts = np.stack([(xs + 0.5) * g, (ys + 0.5) * g, np.ones_like(xs, float)])
    px = frame.um_to_px @ pts
    h, w = frame.shape
    inside = (px[0] >= -0.5) & (px[0] < w - 0.5) & (px[1] >= -0.5) & (px[1] < h - 0.5)
    return float(inside.mean()) if inside.size else 0.0


def _assign_slides(rng: np.random.Generator, n_slides: int, n_patients: int) -> list[int]:
    """Patient index of every slide: each patient gets one slide, the rest go to random patients (≤ 3 each)."""
    owners = list(range(n_patients))
    counts = [1] * n_patients
    while len(owners) < n_slides:
        i = int(rng.integers(n_patients))
        if counts[i] < 3:
            counts[i] += 1
            owners.append(i)
    return sorted(owners)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m sample_data.make_cohort", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="output folder")
    ap.add_argument("--slides", type=int, default=12, help="number of slides")
    ap.add_argument("--seed", type=int, default=0, help="random seed (same seed -> same files)")
    ap.add_argument("--patients", type=int, default=None,
                    help="number of patients (default: max(min(slides, 5), ceil(0.75 x slides)))")
    ap.add_argument("--tissue-mm", type=float, default=1.5, help="tissue diameter (mm)")
    ap.add_argument("--margin-um", type=float, default=50.0, help="extra glass around the tissue frame (µm)")
    ap.add_argument("--cell-density", type=float, default=1.0, help="multiplier of all cell densities")
    ap.add_argument("--rotation-deg", type=float, default=5.0, help="CODEX rotation drawn from ±this (deg)")
    ap.add_argument("--shift-um", type=float, default=150.0,
                    help="CODEX field centre offset from the tissue centre, drawn from ±this per axis (µm)")
    ap.add_argument("--no-codex", action="store_true",
                    help="H&E only (no CODEX images): a cohort for the outcome stages (01, 06-09), about half the "
                         "time; everything else (cells, outcomes, splits, truth) is identical")
    ap.add_argument("--codex-coverage", type=float, default=0.9,
                    help="CODEX field side as a fraction of the tissue diameter")
    ap.add_argument("--warp-um", type=float, default=8.0,
                    help="amplitude (µm, the largest displacement) of the smooth non-rigid warp of the CODEX "
                         "placement; 0 = affine only")
    ap.add_argument("--warp-corr-mm", type=float, default=MIN_CORR_UM / 1000,
                    help=f"correlation length of the warp (mm, at least {MIN_CORR_UM / 1000:g})")
    ap.add_argument("--he-mpp", type=float, default=HE_MPP, help="H&E level-0 µm/px (0.25 = 40x)")
    ap.add_argument("--nodata-slides", type=int, default=0,
                    help="the first N slides get a zero-filled square in their CODEX (missing tiles)")
    ap.add_argument("--nodata-frac", type=float, default=0.3, help="side of that square / the CODEX side")
    ap.add_argument("--stain-profile", default="default", choices=sorted(render.STAIN_PROFILES),
                    help="the cohort's base H&E stain (haematoxylin/eosin OD vectors and amounts, background white): "
                         "default, or a hospital-like shift (pale, dark, purple)")
    ap.add_argument("--stain-variation", default="moderate", choices=list(render.STAIN_VARIATIONS),
                    help="per-slide random variation around the profile (H and E vectors and amounts, background "
                         "white balance, JPEG quality 80-95 moderate / 60-95 strong; none: the profile exactly, "
                         "JPEG quality 90), from its own random stream: nothing else in a slide changes")
    ap.add_argument("--artefacts", action="store_true",
                    help="paint pen/ink strokes, tissue folds, air bubbles, out-of-focus regions and debris onto the "
                         "H&E (each slide a random subset, from its own random stream: without the flag the same "
                         f"seed gives the clean twin); label masks in {ARTEFACT_DIR}/{{slide}}.png (0 none, 1 ink, "
                         "2 fold, 3 bubble, 4 blur, 5 debris; downsample in ground_truth.json)")
    ap.add_argument("--codex-format", choices=CODEX_FORMATS, default="ome",
                    help="file format of the CODEX images (same pixels in each): ome = codex/{slide}.ome.tif; "
                         "qptiff-fusion / qptiff-vectra = codex/{slide}.qptiff (Akoya PhenoCycler-Fusion / Vectra "
                         "Polaris layout, names in each page's XML; vectra's TIFF resolution tags disagree with its "
                         "XML by 5%%); mcmicro = codex/{slide}/registration/{slide}.ome.tif + markers.csv")
    ap.add_argument("--censoring", type=float, default=0.3, help="target fraction of censored patients")
    ap.add_argument("--workers", type=int, default=2, help="processes (slides in parallel)")
    ap.add_argument("--tables-only", action="store_true",
                    help="skip the H&E/CODEX images (clinical tables, splits, ground truth, risk masks only)")
    ap.add_argument("--log-level", default="INFO")
    return ap


def cohort_jobs(args: argparse.Namespace, n_pat: int
                ) -> tuple[list[tissue.Patient], list[SlideJob], np.random.Generator, np.random.Generator]:
    """The cohort's patients and slide jobs from the parsed flags (``ground_truth.json`` ``params`` hold them), and
    the outcome and split random streams: ``(patients, jobs, rng_out, rng_split)``. Same flags -> same cohort."""
    root = np.random.SeedSequence(args.seed)
    rng_pat, rng_out, rng_split = (np.random.default_rng(s) for s in root.spawn(3))
    patients = [tissue.sample_patient(rng_pat, f"case_{i:03d}") for i in range(n_pat)]
    owners = _assign_slides(rng_pat, args.slides, n_pat)
    jobs = [SlideJob(out=str(args.out), slide_id=f"slide_{i:03d}", patient=patients[owners[i]], entropy=args.seed,
                     spawn_key=(1000 + i,), tissue_um=1000.0 * args.tissue_mm, margin_um=args.margin_um,
                     density=args.cell_density, rotation_deg=args.rotation_deg, shift_um=args.shift_um,
                     codex_coverage=args.codex_coverage, images=not args.tables_only, he_mpp=args.he_mpp,
                     warp_um=args.warp_um, warp_corr_um=1000.0 * args.warp_corr_mm,
                     codex=not getattr(args, "no_codex", False),  # older cohorts' params lack it
                     nodata_frac=args.nodata_frac if i < args.nodata_slides else 0.0,
                     codex_format=getattr(args, "codex_format", "ome"),
                     stain_profile=getattr(args, "stain_profile", "default"),  # older cohorts' params lack them
                     stain_variation=getattr(args, "stain_variation", "none"),
                     artefacts=getattr(args, "artefacts", False)) for i in range(args.slides)]
    return patients, jobs, rng_out, rng_split


def main(argv: list[str] | None = None) -> int:
    """Generate the cohort; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.slides < 1:
        raise SystemExit("--slides must be >= 1")
    n_pat = args.patients or max(min(args.slides, 5), math.ceil(0.75 * args.slides))
    if not 1 <= n_pat <= args.slides:
        raise SystemExit("--patients must be between 1 and --slides")
    out: Path = args.out
    if args.warp_um < 0 or args.he_mpp <= 0 or not 0 < args.nodata_frac < 1:
        raise SystemExit("--warp-um must be >= 0, --he-mpp > 0 and 0 < --nodata-frac < 1")
    for sub in ("he", "splits", "risk_masks", CELL_TRUTH_DIR) + (("warps",) if args.warp_um > 0 else ()) + \
            (() if args.no_codex else ("codex",)) + ((ARTEFACT_DIR,) if args.artefacts else ()):
        (out / sub).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    patients, jobs, rng_out, rng_split = cohort_jobs(args, n_pat)
    log.info("generating %d slides of %d patients into %s (%d workers)", len(jobs), n_pat, out, args.workers)
    if args.workers > 1 and len(jobs) > 1:
        ctx = mp.get_context("forkserver")
        with ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx) as ex:
            results = list(tqdm(ex.map(generate_slide, jobs), total=len(jobs), desc="slides", unit="slide"))
    else:
        results = [generate_slide(j) for j in tqdm(jobs, desc="slides", unit="slide")]

    # outcomes per patient
    by_case: dict[str, list[dict]] = {}
    for r in results:
        by_case.setdefault(r["case_id"], []).append(r)
    risk, resp_p, scores = [], [], []
    for p in patients:
        sc = outcomes.patient_scores([r["features"] for r in by_case[p.case_id]])
        scores.append(sc)
        risk.append(outcomes.true_risk(sc, p.age, p.stage, float(rng_out.normal(0, 0.3))))
        resp_p.append(outcomes.response_prob(sc, p.stage))
    months, cens = outcomes.survival(rng_out, np.array(risk), args.censoring)
    response = (rng_out.uniform(size=n_pat) < np.array(resp_p)).astype(int)
    idx = {p.case_id: i for i, p in enumerate(patients)}

    with open(out / "clinical.csv", "w", newline="") as f:
        wr = csv.writer(f, lineterminator="\n")
        wr.writerow(["case_id", "slide_id", "survival_months", "censorship", "response", "age", "stage"])
        for r in results:
            i = idx[r["case_id"]]
            p = patients[i]
            wr.writerow([p.case_id, r["slide_id"], f"{months[i]:.1f}", int(cens[i]), int(response[i]), p.age, p.stage])
    with open(out / "pairs.csv", "w", newline="") as f:
        wr = csv.writer(f, lineterminator="\n")
        wr.writerow(["he_slide", "codex_image"])
        for r in results:
            wr.writerow([f"he/{r['slide_id']}.tif",
                         "" if args.no_codex else codex_rel_path(args.codex_format, r["slide_id"])])
    shutil.copyfile(PANEL_CSV, out / "marker_panel.csv")
    folds = outcomes.patient_folds(rng_split, [p.case_id for p in patients])
    outcomes.write_splits(out / "splits", {r["slide_id"]: r["case_id"] for r in results}, folds)

    gt = {
        "seed": args.seed,
        "markers": list(MARKERS),
        "visible_markers": [m for m in MARKERS if m in tissue.VISIBLE_MARKERS],
        "slides": {r["slide_id"]: r["ground_truth"] | {"case_id": r["case_id"]} for r in results},
        "cell_truth": {"file": "per slide: slides[slide].cells (gzip CSV, one row per cell)",
                       "columns": COLUMN_NOTES, "compartments": list(COMPARTMENTS)},
        "patients": {
            p.case_id: {
                "true_risk": round(risk[i], 6),
                "true_response_prob": round(resp_p[i], 6),
                "scores": {k: round(v, 6) for k, v in scores[i].items()},
                "latents": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(p).items()
                            if k not in ("case_id", "offsets")},
                "fold": folds[p.case_id],
            }
            for i, p in enumerate(patients)
        },
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                   if k not in ("out", "workers", "log_level")},
    }
    if not args.tables_only and not args.no_codex:
        write_preview(out, results[0]["slide_id"], args.he_mpp,
                      codex_rel=codex_rel_path(args.codex_format, results[0]["slide_id"]))
    # last and atomic: ground_truth.json is what marks a finished cohort (scripts/demo.sh reuses one that has it)
    tmp = out / ".ground_truth.json.tmp"
    tmp.write_text(json.dumps(gt, indent=1) + "\n")
    os.replace(tmp, out / "ground_truth.json")
    dt = time.perf_counter() - t0
    tot = {k: sum(r["timing"].get(k, 0.0) for r in results) for k in ("cells", "he", "codex", "cpu")}
    log.info("done: %d slides, %d cells in %.1f s (summed worker seconds: %s), %.0f%% censored", len(results),
             sum(r["n_cells"] for r in results), dt, {k: round(v, 1) for k, v in tot.items()}, 100 * cens.mean())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
