"""Issue-20 acceptance driver for the CODEX formats (not CI): the same cohort with its CODEX as OME-TIFF, QPTIFF
(PhenoCycler-Fusion and Vectra/Polaris dialects) and MCMICRO, through stages 01-03, against the OME-TIFF path.

    python -m bench.validate_codex_formats --root /tmp/codexfmt [--seed 41 --slides 3 --tissue-mm 1.0]

For each format: ``sample_data.make_cohort --codex-format FMT`` (same seed: the same cells and CODEX pixels),
``preprocess.check_cohort`` (its codex / mpp / panel findings), then stages 01 (patch grid), 02 (register) and 03
(``preprocess.quantify``: raw means and normalised labels) with the stages' defaults. Compared with the OME-TIFF
cohort, per slide: the registration error at patch centres against the generator's true map (median, µm;
acceptance: |difference| <= 0.05 µm), the largest affine difference, and the labels (``markers/{slide}.csv``;
acceptance: max |diff| <= 1e-6). The converter (``python -m preprocess.convert_codex``) turns each non-OME CODEX of
the first slide into an OME-TIFF that must read back in tifffile with the file's 40 names (DAPI by name),
PhysicalSizeX = 0.377 µm and the OME twin's level-0 pixels.
Writes ``ROOT/summary.json`` and prints one table. Work already done is skipped by the stages themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
FORMATS = ("ome", "qptiff-fusion", "qptiff-vectra", "mcmicro")


def _run(*cmd: str) -> float:
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", *cmd], cwd=REPO, env=os.environ.copy())
    if r.returncode != 0:
        sys.exit(f"validate_codex_formats: {' '.join(cmd)} failed (exit {r.returncode})")
    return time.perf_counter() - t0


def _reg_error(cohort: Path, out: Path, slide: str) -> tuple[float, np.ndarray]:
    import h5py

    from sample_data.truth import errors_um, record_transform, true_transform

    gt = json.loads((cohort / "ground_truth.json").read_text())
    rec_path = out / "registration" / f"{slide}.json"
    with h5py.File(out / "patches" / f"{slide}.h5", "r") as h:
        coords, size = h["coords"][:], int(h.attrs["patch_size_level0"])
    err = errors_um(record_transform(rec_path), true_transform(cohort, slide), coords + (size - 1) / 2.0,
                    gt["slides"][slide]["he_mpp"])
    return float(np.median(err)), np.array(json.loads(rec_path.read_text())["affine_codex_to_he"])


def _check(cohort: Path) -> list[str]:
    """``preprocess.check_cohort``'s findings on the CODEX columns (codex, mpp, panel); a tiny cohort's splits may
    have errors of their own (folds without validation slides) that do not concern the formats."""
    from preprocess.check_cohort import check_cohort

    found = [f"{f.level} [{f.slide} / {f.column}] {f.message}" for f in check_cohort(cohort).findings
             if f.column in ("codex", "mpp", "panel")]
    print("\n".join(found) or "check_cohort: nothing on codex / mpp / panel", flush=True)
    return found


def _converter_check(src: Path, ome_twin: Path, dst: Path, markers: list[str]) -> dict:
    import tifffile

    _run("preprocess.convert_codex", str(src), str(dst))
    from preprocess.codex_formats import is_dapi_name, ome_channels_and_mpp

    with tifffile.TiffFile(dst) as t, tifffile.TiffFile(ome_twin) as ref:
        xml = t.ome_metadata or ""
        names = ome_channels_and_mpp(xml, dst)[0] or []
        # the file's own names (a Fusion QPTIFF calls the nuclear stain DAPI-01): the panel's markers, DAPI by name
        names_ok = len(names) == len(markers) and all(
            n == m or (is_dapi_name(n) and is_dapi_name(m)) for n, m in zip(names, markers))
        mpp_ok = 'PhysicalSizeX="0.377"' in xml and 'PhysicalSizeXUnit="µm"' in xml
        s = t.series[0]
        same = bool(np.array_equal(s.asarray(), ref.series[0].asarray()))
        return {"names": names_ok, "first_names": names[:3], "mpp": mpp_ok, "levels": len(s.levels),
                "level0_equal_ome": same}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.validate_codex_formats", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, required=True, help="folder for the cohorts and outputs")
    p.add_argument("--seed", type=int, default=41)
    p.add_argument("--slides", type=int, default=3)
    p.add_argument("--tissue-mm", type=float, default=1.0)
    p.add_argument("--workers", default="2")
    p.add_argument("--compare-only", action="store_true", help="only compare the outputs already in ROOT")
    a = p.parse_args(argv)
    root = a.root.resolve()
    times: dict[str, dict[str, float]] = {}
    checks: dict[str, list[str]] = {}
    for fmt in FORMATS if not a.compare_only else ():
        cohort, out = root / fmt, root / f"{fmt}_out"
        t: dict[str, float] = {}
        if not (cohort / "ground_truth.json").is_file():
            t["make_cohort"] = _run("sample_data.make_cohort", "--out", str(cohort), "--slides", str(a.slides),
                                    "--seed", str(a.seed), "--tissue-mm", str(a.tissue_mm), "--workers", a.workers,
                                    "--codex-format", fmt, "--log-level", "WARNING")
        checks[fmt] = _check(cohort)
        common = ("--cohort", str(cohort), "--out", str(out), "--workers", a.workers)
        t["01"] = _run("preprocess.patch", *common)
        t["02"] = _run("preprocess.register", *common)
        t["03"] = _run("preprocess.quantify", *common)
        times[fmt] = t

    gt = json.loads((root / "ome" / "ground_truth.json").read_text())
    slides, markers = sorted(gt["slides"]), list(gt["markers"])
    ref_out = root / "ome_out"
    rows, ok = [], True
    for fmt in FORMATS:
        out = root / f"{fmt}_out"
        for s in slides:
            med, aff = _reg_error(root / fmt, out, s)
            ref_med, ref_aff = _reg_error(root / "ome", ref_out, s)
            lab = pd.read_csv(out / "markers" / f"{s}.csv")
            ref = pd.read_csv(ref_out / "markers" / f"{s}.csv")
            num = ref.select_dtypes("number").columns
            same_shape = list(lab.columns) == list(ref.columns) and len(lab) == len(ref)
            diff = float(np.abs(lab[num].to_numpy() - ref[num].to_numpy()).max()) if same_shape else float("inf")
            row = {"format": fmt, "slide": s, "reg_error_median_um": med, "reg_error_diff_um": abs(med - ref_med),
                   "affine_max_diff": float(np.abs(aff - ref_aff).max()), "labels_max_abs_diff": diff,
                   "patches": len(lab)}
            ok &= row["reg_error_diff_um"] <= 0.05 and diff <= 1e-6
            rows.append(row)
    conv = {}
    for fmt in FORMATS[1:]:
        pairs = pd.read_csv(root / fmt / "pairs.csv")
        src = root / fmt / pairs["codex_image"].iloc[0]
        conv[fmt] = _converter_check(src, root / "ome" / "codex" / f"{slides[0]}.ome.tif",
                                     root / f"converted_{fmt}.ome.tif", markers)
        ok &= conv[fmt]["names"] and conv[fmt]["mpp"] and conv[fmt]["level0_equal_ome"]
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print("converter:", json.dumps(conv))
    print("check_cohort:", json.dumps(checks, indent=1))
    print("stage seconds:", json.dumps({f: {k: round(v, 1) for k, v in t.items()} for f, t in times.items()}))
    summary = {"seed": a.seed, "slides": a.slides, "tissue_mm": a.tissue_mm, "rows": rows, "converter": conv,
               "check_cohort": checks, "seconds": times, "acceptance": bool(ok)}
    (root / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"acceptance (reg error diff <= 0.05 µm, labels max |diff| <= 1e-6, converter reads back): "
          f"{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
