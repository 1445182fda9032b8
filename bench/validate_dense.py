"""Issue-19 acceptance driver (not CI): a dense HEX against a patch-level HEX on one cohort, as a user runs them.

    python -m bench.validate_dense --cohort COHORT --out OUT [--epochs 40] [--seed 31]

On a cohort made by ``sample_data.make_cohort`` (``--make-slides N`` makes it first with ``--seed``), through the
stage scripts with the demo's split (``splits_0.csv``: train on ``train``, test on ``val``) and the tiny backbone
on the CPU:

1. stages 01-02, stage 03 with ``DENSE=1`` (dense labels, 7 µm cells) and, in ``OUT_affine`` (the same patches and
   registrations), stage 03 with ``REGISTRATION_MODEL=affine`` (labels made without the displacement field);
2. stage 04 twice with the same data and budget: a patch-level run (``patch``) and a dense run (``dense``);
3. stage 06 of the patch run at ``--stride 56`` (28 µm map pixels) on the test slides: the upsampled baseline;
4. stage 05 of both; the dense run against the field labels (with the baseline) and against the affine-only labels;
5. stage 06 of the dense run (``DENSE=1``) on the test slides: the seam measure of ``bench.bench_dense_infer`` on each
   blended dense map.

Prints one table: mean r over the H&E-visible markers of the dense grid (dense model, upsampled baseline), the
patch-level r of both models, the dense r against affine-only labels, and the acceptance checks of issue 19.
Stages already done are skipped by the stages themselves (done-records), so a rerun finishes what is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from pipeline import artifacts as art

REPO = Path(__file__).resolve().parents[1]


def _run(env: dict[str, str], *cmd: str) -> None:
    print("+", " ".join(f"{k}={v}" for k, v in env.items()), *cmd, flush=True)
    r = subprocess.run(list(cmd), cwd=REPO, env={**os.environ, **env})
    if r.returncode != 0:
        sys.exit(f"validate_dense: {' '.join(cmd)} failed (exit {r.returncode})")


def _visible(cohort: Path) -> list[str]:
    return list(json.loads((cohort / "ground_truth.json").read_text())["visible_markers"])


def _dense_means(test_dir: Path, visible: list[str]) -> dict[str, float]:
    t = pd.read_csv(test_dir / "dense_pearson.csv").set_index("marker")
    v = t.loc[[m for m in visible if m in t.index]]
    return {c: float(v[c].mean()) for c in ("r_dense", "r_baseline", "r_patch")}


def _patch_mean(test_dir: Path, visible: list[str]) -> float:
    t = pd.read_csv(test_dir / "marker_pearson.csv").set_index("marker")
    return float(t.loc[[m for m in visible if m in t.index], "pearson"].mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.validate_dense", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cohort", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--make-slides", type=int, default=0, help="make the cohort first with this many slides")
    p.add_argument("--seed", type=int, default=31, help="generator seed with --make-slides")
    p.add_argument("--tissue-mm", type=float, default=1.5)
    p.add_argument("--epochs", type=int, default=40, help="epochs of both tiny HEX runs (the demo's 40)")
    p.add_argument("--grid", type=int, default=16, help="dense cells per patch side (16 = 7 µm at 20x)")
    p.add_argument("--workers", default="2")
    a = p.parse_args(argv)
    cohort, out = a.cohort.resolve(), a.out.resolve()
    out_aff = out.parent / (out.name + "_affine")
    out_base = out.parent / (out.name + "_baseline56")
    if a.make_slides and not (cohort / "ground_truth.json").is_file():
        _run({}, sys.executable, "-m", "sample_data.make_cohort", "--out", str(cohort), "--slides",
             str(a.make_slides), "--seed", str(a.seed), "--tissue-mm", str(a.tissue_mm), "--workers", a.workers)
    split = cohort / "splits" / "splits_0.csv"
    base = {"COHORT": str(cohort), "OUT": str(out), "WORKERS": a.workers}
    _run(base, "bash", "scripts/01_patch.sh")
    _run(base, "bash", "scripts/02_register.sh")
    _run({**base, "FIT_SPLIT": str(split), "DENSE": "1", "DENSE_GRID": str(a.grid)}, "bash", "scripts/03_quantify.sh")
    # affine-only labels: the same stage-01 grids and stage-02 registrations, stage 03 without the field
    out_aff.mkdir(parents=True, exist_ok=True)
    for key in (art.PATCH_GRID, art.REGISTRATION):
        link = key.dir(out_aff)
        if not link.exists():
            link.symlink_to(key.dir(out), target_is_directory=True)
    _run({**base, "OUT": str(out_aff), "FIT_SPLIT": str(split), "DENSE": "1", "DENSE_GRID": str(a.grid),
          "REGISTRATION_MODEL": "affine"}, "bash", "scripts/03_quantify.sh")
    train = {**base, "BACKBONE": "tiny", "EPOCHS": str(a.epochs), "WORKERS": "1", "GPUS": "0",
             "EXTRA": "--save-every 10"}
    _run({**train, "RUN": "patch"}, "bash", "scripts/04_train_hex.sh")
    _run({**train, "RUN": "dense", "DENSE": "1", "DENSE_GRID": str(a.grid)}, "bash", "scripts/04_train_hex.sh")
    val = pd.read_csv(split)["val"].dropna().astype(str).tolist()
    _run({**base, "OUT": str(out_base), "RUN": "patch", "CHECKPOINT": str(art.HEX_RUN.path(out, run="patch")),
          "WORKERS": "0", "GPUS": "0", "EXTRA": f"--stride 56 --map-formats npy --slides {' '.join(val)}"},
         "bash", "scripts/06_infer_wsi.sh")
    gt = f"--visible-markers {cohort / 'ground_truth.json'}"
    test = {**base, "WORKERS": "0", "GPUS": "0"}
    _run({**test, "RUN": "patch", "EXTRA": gt}, "bash", "scripts/05_test_hex.sh")
    _run({**test, "RUN": "dense", "DENSE_BASELINE": str(out_base), "EXTRA": gt}, "bash", "scripts/05_test_hex.sh")
    aff_dir = art.HEX_TEST.dir(out, run="dense").parent / "test_affine_labels"
    _run({**test, "RUN": "dense", "DENSE_LABELS": str(art.DENSE_LABELS.dir(out_aff)),
          "EXTRA": f"{gt} --test-dir {aff_dir}"}, "bash", "scripts/05_test_hex.sh")

    # the dense run's whole-slide maps on the test slides: seams where overlapping tiles are blended
    _run({**base, "RUN": "dense", "WORKERS": "0", "GPUS": "0", "DENSE": "1",
          "EXTRA": f"--map-formats npy --slides {' '.join(val)}"}, "bash", "scripts/06_infer_wsi.sh")
    from bench.bench_dense_infer import seam_ratio
    from hex.infer.dense_maps import dense_record

    seams = {}
    for s in val:
        rec = dense_record(out, s)
        step = int(round(float(rec["stride_level0"]) / float(rec["cell_px_level0"])))
        seams[s] = seam_ratio(art.VIRTUAL_CODEX.dir(out) / rec["file"], step)["ratio"]

    visible = _visible(cohort)
    dense = _dense_means(art.HEX_TEST.dir(out, run="dense"), visible)
    affine = _dense_means(aff_dir, visible)
    patch_r = _patch_mean(art.HEX_TEST.dir(out, run="patch"), visible)
    dense_patch_r = _patch_mean(art.HEX_TEST.dir(out, run="dense"), visible)
    rows = [("dense r at 7 µm, dense model", dense["r_dense"]),
            ("dense r at 7 µm, patch model's stride-56 map upsampled", dense["r_baseline"]),
            ("dense r at 7 µm, dense model vs affine-only labels", affine["r_dense"]),
            ("patch r, patch model", patch_r), ("patch r, dense model", dense_patch_r)]
    rows.append(("seams: border / inside step of the blended dense map, worst slide", max(seams.values())))
    print(f"\nvisible markers ({len(visible)}), val slides {val}")
    for name, v in rows:
        print(f"  {name:58s} {v:.3f}")
    checks = {"dense - baseline >= 0.1": dense["r_dense"] - dense["r_baseline"] >= 0.1,
              "dense patch r >= patch model's - 0.02": dense_patch_r >= patch_r - 0.02,
              "affine-only labels give a lower dense r": affine["r_dense"] < dense["r_dense"],
              "seams <= 1.2 on every test slide": max(seams.values()) <= 1.2}
    for k, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {k}")
    summary = {"dense": dense, "affine": affine, "patch_r": patch_r, "dense_patch_r": dense_patch_r,
               "seams": seams, "checks": checks, "val": val}
    (out / "validate_dense.json").write_text(json.dumps(summary, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
