"""Validation driver for MICA as a clinical study (not CI): an internal cohort and an independent one, every stage
as a user runs them, and the outcome reports of both.

    python -m bench.validate_mica                  # 200 + 100 patients of 0.8 mm, ~4 h on 2 CPU cores
    python -m bench.validate_mica --cohort /data/val_cohort --out /data/val_out --patients 300 --workers 8

Internal cohort (``--patients``, ``--seed``, 20x): ``sample_data.make_cohort``, then the numbered scripts with CPU
settings: 01 patch, 02 register, 03 quantify, 04 HEX (``tiny``, from scratch on fold 0's training slides, 40
epochs, stains normalised with Macenko to the first training slide's patches: ``--stain-norm``), 05 test,
06 whole-slide inference over the stage-01 grid, 07 feature bags (H&E: the HEX run's backbone ``hex:RUN``; CODEX:
``stats`` descriptors of the virtual CODEX), 08 MICA in the three modes for survival and response (5 folds), 09
test: path and codex first, then coattn with their rows, the clinical model (age, stage), coattn+clinical and the
generator's truth (``COMPARE``, ``TRUTH``) -> ``OUT/mica_runs/val_coattn_{task}/test/report.md``; integrated
gradients for the co-attention survival model.

Independent cohort (``--external-patients``, another seed and another site: the 40x twin, ``--external-he-mpp
0.25``): 01 under its own output root (with ``--external-hex`` also 02 and 03, and 05 scores the HEX run on its
labelled slides, ``EXTERNAL``), 06 and 07 with the internal HEX run (``CHECKPOINT``, ``WEIGHTS``), and 09 applies
every MICA run to it (``EXTERNAL``, ``EXTERNAL_OUT``) -> ``OUT/mica_runs/val_coattn_{task}/external/{cohort}/``.

Every stage skips what it finished, so a rerun continues. The tables go to ``OUT/validation.md``; the exit status
is 1 when a target is missed: coattn above clinical with the paired 95% CI of the difference in Harrell's C (AUC
for response) above 0, on both cohorts; coattn's per-fold mean C within 0.05 of the exact H&E-visible ceiling of
the internal cohort (``bench.count_ceiling.visible_ceiling``, same folds).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from pipeline import artifacts as art

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

MODES = ("path", "codex", "coattn")  # coattn last: its report holds the other two
TASKS = ("survival", "response")
HEX_FLAGS = "--lr 1e-3 --batch-size 32 --lds --unfreeze-last -1 --save-every 5"
HEX_RUN = "val_tiny"


def run_script(name: str, env: dict[str, str], log: Path) -> float:
    """Run ``scripts/{name}`` with ``env`` added; stdout/stderr appended to ``log``; returns seconds."""
    t0 = time.time()
    shown = " ".join(f"{k}={v}" for k, v in env.items() if k not in ("COHORT", "OUT"))
    print(f"[validate] {name} {shown}", flush=True)
    with open(log, "a") as f:
        f.write(f"\n===== {name} {env}\n")
        f.flush()
        rc = subprocess.call(["bash", str(SCRIPTS / name)], env={**os.environ, **env}, stdout=f,
                             stderr=subprocess.STDOUT, cwd=SCRIPTS.parent)
    dt = time.time() - t0
    if rc != 0:
        raise SystemExit(f"[validate] {name} failed (exit {rc}); see {log}")
    print(f"[validate]   {dt:.0f} s", flush=True)
    return dt


def make_cohort(cohort: Path, patients: int, tissue_mm: float, seed: int, workers: int, he_mpp: float = 0.5,
                codex: bool = True, stain_variation: str | None = None) -> float:
    """Generate a synthetic cohort unless it exists (H&E only without ``codex``; ``stain_variation`` None: the
    generator's default); returns seconds."""
    if (cohort / "ground_truth.json").exists():
        return 0.0
    t0 = time.time()
    subprocess.check_call([sys.executable, "-m", "sample_data.make_cohort", "--out", str(cohort), "--slides",
                           str(patients), "--patients", str(patients), "--tissue-mm", str(tissue_mm), "--seed",
                           str(seed), "--workers", str(workers), "--he-mpp", str(he_mpp),
                           *([] if codex else ["--no-codex"]),
                           *(["--stain-variation", stain_variation] if stain_variation else [])], cwd=SCRIPTS.parent)
    return time.time() - t0


def write_truth(cohort: Path, path: Path) -> Path:
    from bench.mica_vs_truth import write_truth_csv

    return write_truth_csv(cohort, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.validate_mica", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cohort", type=Path, default=Path("/tmp/hex_val/cohort"), help="cohort folder (made if missing)")
    p.add_argument("--out", type=Path, default=Path("/tmp/hex_val/out"), help="pipeline output root")
    p.add_argument("--patients", type=int, default=200, help="patients (one slide each)")
    p.add_argument("--tissue-mm", type=float, default=0.8, help="section diameter, mm")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--external-cohort", type=Path, default=Path("/tmp/hex_val/ext_cohort"),
                   help="independent cohort folder (made if missing)")
    p.add_argument("--external-out", type=Path, default=Path("/tmp/hex_val/ext_out"), help="its output root")
    p.add_argument("--external-patients", type=int, default=100, help="its patients (0: no independent cohort)")
    p.add_argument("--external-seed", type=int, default=2)
    p.add_argument("--external-he-mpp", type=float, default=0.25, help="its H&E µm/px (0.25: the 40x twin)")
    p.add_argument("--external-hex", action="store_true",
                   help="also stages 02-03 on it and HEX scored on its labelled slides (stage 05 EXTERNAL)")
    p.add_argument("--workers", type=int, default=2, help="slides in parallel in stages 01-03")
    p.add_argument("--hex-epochs", type=int, default=40, help="epochs of the tiny HEX model (the demo's 40)")
    p.add_argument("--stain-variation", choices=("none", "moderate", "strong"),
                   help="per-slide stain variation of both generated cohorts (default: the generator's, moderate)")
    p.add_argument("--stain-norm", choices=("none", "macenko", "reinhard"), default="macenko",
                   help="HEX's stain normalisation (hex.train --stain-norm; target: the patch store of fold 0's first "
                        "training slide), re-applied by stages 05-07 on both cohorts")
    p.add_argument("--mica-epochs", type=int, default=20, help="epochs of each MICA fold (paper: 20)")
    p.add_argument("--mica-extra", default="", help="extra flags for mica.train (e.g. '--grad-accum 8')")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the reports")
    p.add_argument("--no-ig", action="store_true", help="skip integrated gradients")
    p.add_argument("--start-at", type=int, default=1, choices=range(1, 5), metavar="{1-4}",
                   help="first stage to run: 4 reuses the stage 01-03 outputs already under --out/--external-out "
                        "(e.g. another HEX recipe on the same grids, labels and patch stores)")
    p.add_argument("--table-only", action="store_true", help="only print the tables of an existing run")
    return p


def internal(args: argparse.Namespace, cohort: Path, out: Path, log: Path, times: dict[str, float]) -> None:
    base = {"COHORT": str(cohort), "OUT": str(out), "WORKERS": str(args.workers)}
    times["cohort"] = make_cohort(cohort, args.patients, args.tissue_mm, args.seed, args.workers,
                                  stain_variation=args.stain_variation)
    truth = write_truth(cohort, out / "truth.csv")
    for s in ("01_patch.sh", "02_register.sh", "03_quantify.sh"):
        if int(s[:2]) >= args.start_at:
            times[s] = run_script(s, base, log)
    # target: hex.train's default, the first training slide of fold 0 (the split HEX trains on)
    extra = HEX_FLAGS + ("" if args.stain_norm == "none" else f" --stain-norm {args.stain_norm}")
    hex_env = {**base, "RUN": HEX_RUN, "BACKBONE": "tiny", "EPOCHS": str(args.hex_epochs), "GPUS": "0",
               "WORKERS": "1", "EXTRA": extra}
    times["04_train_hex.sh"] = run_script("04_train_hex.sh", hex_env, log)
    times["05_test_hex.sh"] = run_script("05_test_hex.sh", {**base, "RUN": HEX_RUN, "WORKERS": "0"}, log)
    times["06_infer_wsi.sh"] = run_script("06_infer_wsi.sh", {**base, "RUN": HEX_RUN, "WORKERS": "1"}, log)
    times["07_features.sh"] = run_script("07_features.sh", {**base, "HEX_RUN": HEX_RUN, "CODEX_ENCODER": "stats",
                                                             "WORKERS": "1"}, log)
    for task in TASKS:
        for mode in MODES:
            env = {**base, "RUN": f"val_{mode}_{task}", "MODE": mode, "TASK": task, "ENCODER": f"hex:{HEX_RUN}",
                   "CODEX_ENCODER": "stats", "EPOCHS": str(args.mica_epochs), "WORKERS": "0",
                   "EXTRA": args.mica_extra}
            times[f"08 {mode} {task}"] = run_script("08_train_mica.sh", env, log)
        for mode in MODES:
            env = {**base, "RUN": f"val_{mode}_{task}", "MODE": mode, "TASK": task, "WORKERS": "0", "IG": "0",
                   "BOOTSTRAP": str(args.bootstrap)}
            if mode == "coattn":
                env |= {"COMPARE": f"val_path_{task} val_codex_{task}", "TRUTH": str(truth),
                        "IG": "1" if task == "survival" and not args.no_ig else "0"}
            else:
                env["EXTRA"] = "--no-report"
            times[f"09 {mode} {task}"] = run_script("09_test_mica.sh", env, log)


def external(args: argparse.Namespace, out: Path, log: Path, times: dict[str, float]) -> None:
    ext, eout = args.external_cohort.resolve(), args.external_out.resolve()
    eout.mkdir(parents=True, exist_ok=True)
    times["external cohort"] = make_cohort(ext, args.external_patients, args.tissue_mm, args.external_seed,
                                           args.workers, args.external_he_mpp, codex=args.external_hex,
                                           stain_variation=args.stain_variation)
    truth = write_truth(ext, eout / "truth.csv")
    base = {"COHORT": str(ext), "OUT": str(eout), "WORKERS": str(args.workers)}
    ckpt = str(art.HEX_RUN.path(out, run=HEX_RUN))
    for s in ("01_patch.sh", *(("02_register.sh", "03_quantify.sh") if args.external_hex else ())):
        if int(s[:2]) >= args.start_at:
            times[f"ext {s}"] = run_script(s, base, log)
    if args.external_hex:
        times["ext 05 (HEX on the independent cohort)"] = run_script(
            "05_test_hex.sh", {"COHORT": str(ext), "OUT": str(out), "RUN": HEX_RUN, "WORKERS": "0",
                               "EXTERNAL": str(ext), "EXTERNAL_OUT": str(eout)}, log)
    times["ext 06"] = run_script("06_infer_wsi.sh", {**base, "RUN": HEX_RUN, "CHECKPOINT": ckpt, "WORKERS": "1"}, log)
    times["ext 07"] = run_script("07_features.sh", {**base, "ENCODER": f"hex:{HEX_RUN}", "WEIGHTS": ckpt,
                                                    "CODEX_ENCODER": "stats", "WORKERS": "1"}, log)
    for task in TASKS:
        for mode in MODES:
            env = {"COHORT": str(args.cohort.resolve()), "OUT": str(out), "RUN": f"val_{mode}_{task}", "MODE": mode,
                   "TASK": task, "WORKERS": "0", "EXTERNAL": str(ext), "EXTERNAL_OUT": str(eout),
                   "BOOTSTRAP": str(args.bootstrap)}
            if mode == "coattn":
                env |= {"COMPARE": f"val_path_{task} val_codex_{task}", "TRUTH": str(truth)}
            else:
                env["EXTRA"] = "--no-report"
            times[f"ext 09 {mode} {task}"] = run_script("09_test_mica.sh", env, log)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cohort, out = args.cohort.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "validate.log"
    times: dict[str, float] = {}
    if not args.table_only:
        internal(args, cohort, out, log, times)
        if args.external_patients > 0:
            external(args, out, log, times)
    from bench.count_ceiling import visible_ceiling

    ceiling = visible_ceiling(cohort) if (cohort / "ground_truth.json").is_file() else None
    return report(out, args.external_cohort.resolve().name if args.external_patients > 0 else None, times, ceiling)


def _headline(report_dir: Path, metric: str) -> tuple[str, bool]:
    """The coattn row and its comparisons with clinical and path, and whether coattn beats clinical (CI > 0)."""
    rep = pd.read_csv(report_dir / "report.csv").set_index(["row", "metric"])
    comp = pd.read_csv(report_dir / "comparisons.csv")
    lines, ok = [], False
    for row in ("coattn", "path", "codex", "clinical", "coattn+clinical", "truth"):
        if (row, metric) in rep.index:
            r = rep.loc[(row, metric)]
            lines.append(f"  {row:16s} {r['value']:.3f} ({r['lo']:.3f} to {r['hi']:.3f})")
    for other in ("clinical", "path", "codex"):
        c = comp[(comp["row_a"] == "coattn") & (comp["row_b"] == other) & (comp["metric"] == metric)]
        if not c.empty:
            r = c.iloc[0]
            p = "<0.001" if r["p"] < 0.001 else f"{r['p']:.3g}"
            lines.append(f"  coattn - {other}: {r['delta']:+.3f} ({r['lo']:+.3f} to {r['hi']:+.3f}), p {p}, "
                         f"relative {100 * r['rel_improvement']:+.1f}%")
            if other == "clinical":
                ok = bool(r["lo"] > 0)
    return "\n".join(lines), ok


def report(out: Path, ext_name: str | None, times: dict[str, float],
           ceiling: tuple[float, float, float] | None = None) -> int:
    """Print (and write to OUT/validation.md) the headline of every report and the targets; ``ceiling``: the
    cohort's H&E-visible survival ceiling (:func:`bench.count_ceiling.visible_ceiling`)."""
    lines = [f"# MICA validation: {out}", ""]
    missed: list[str] = []
    if times:
        lines += ["stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()), ""]
    for task, metric in (("survival", "c_harrell"), ("response", "auc")):
        run = f"val_coattn_{task}"
        places = [("internal, 5-fold out of fold", art.MICA_REPORT.dir(out, run=run))]
        if ext_name:
            places.append((f"independent cohort {ext_name}", art.MICA_EXTERNAL.dir(out, run=run, cohort=ext_name)))
        for what, d in places:
            if not (d / "report.csv").is_file():
                lines.append(f"## {task}, {what}: no report in {d}")
                missed.append(f"{task} {what}: no report")
                continue
            text, ok = _headline(d, metric)
            lines += [f"## {task}, {what} ({metric}, 95% bootstrap CI): {d / 'report.md'}", "```", text, "```", ""]
            if not ok:
                missed.append(f"{task} {what}: coattn - clinical CI not above 0")
    folds_csv = art.MICA_REPORT.dir(out, run="val_coattn_survival") / "report_folds.csv"
    if ceiling and folds_csv.is_file():
        f = pd.read_csv(folds_csv)
        c = f[(f["row"] == "coattn") & (f["metric"] == "c_harrell")]["value"]
        gap = ceiling[0] - c.mean()
        lines += ["## survival: coattn vs the exact H&E-visible ceiling (bench.count_ceiling, same folds)",
                  f"  coattn per-fold mean C {c.mean():.3f} ± {c.std():.3f}; ceiling {ceiling[0]:.3f} ± "
                  f"{ceiling[1]:.3f}; gap {gap:.3f} (target <= 0.05)", ""]
        if gap > 0.05:
            missed.append(f"survival: coattn {gap:.3f} below the H&E-visible ceiling (target <= 0.05)")
    ig_dir = art.ATTRIBUTIONS.dir(out, run="val_coattn_survival")
    if ig_dir.is_dir():
        from bench.mica_vs_truth import ig_risk_auroc

        cohort_dir = Path(pd.read_json(art.MICA_RUN.dir(out, run="val_coattn_survival") / "config.json",
                                       typ="series")["cohort"])
        auc = ig_risk_auroc(cohort_dir, ig_dir)
        if auc:
            lines.append(f"IG patch attributions vs risk masks: mean per-slide AUROC {auc['mean']:.3f} over "
                         f"{len(auc) - 2} slides (pooled {auc['pooled']:.3f})")
    if missed:
        lines += ["", "targets missed: " + "; ".join(missed)]
    text = "\n".join(lines)
    print(text)
    (out / "validation.md").write_text(text + "\n")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
