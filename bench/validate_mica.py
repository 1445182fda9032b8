"""Validation driver for MICA (not CI): a synthetic cohort large enough to learn outcome, stages 01-09, scored.

    python -m bench.validate_mica                                   # 200 patients of 0.8 mm, ~1 h on 2 CPU cores
    python -m bench.validate_mica --cohort /data/val_cohort --out /data/val_out --patients 300 --workers 8

Builds ``--patients`` patients with one small section each (``sample_data.make_cohort``), then runs the numbered
scripts in order with CPU settings, exactly as a user would: 01 patch, 02 register, 03 quantify, 04 HEX (``tiny``,
trained from scratch on fold 0's training slides), 05 test, 06 whole-slide inference over the stage-01 grid, 07
feature bags (H&E: the HEX run's backbone, ``hex:RUN``; CODEX: ``stats`` descriptors of the virtual CODEX maps),
08 MICA in the three modes for survival and response (5 folds), 09 test with integrated gradients for the
co-attention survival model. Every stage skips what it already finished, so a rerun continues.

It prints, per fold and as mean ± sd, the c-index (and AUC for response) of the generator's own true risk on the
same validation patients (the ceiling), of ``coattn``, ``path``, ``codex`` and of the clinical baseline (Cox PH /
logistic regression on age and stage), plus the AUROC with which the IG patch attributions find the generator's
risk-driving regions. The tables also go to ``OUT/validation.md``; the exit status is 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from pipeline import artifacts as art

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

MODES = ("coattn", "path", "codex")
HEX_FLAGS = "--lr 1e-3 --batch-size 32 --lds --unfreeze-last -1 --save-every 5"


def run_script(name: str, env: dict[str, str], log: Path) -> float:
    """Run ``scripts/{name}`` with ``env`` added; stdout/stderr appended to ``log``; returns seconds."""
    t0 = time.time()
    print(f"[validate] {name} {' '.join(f'{k}={v}' for k, v in env.items() if k not in ('COHORT', 'OUT'))}",
          flush=True)
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.validate_mica", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cohort", type=Path, default=Path("/tmp/hex_val/cohort"), help="cohort folder (made if missing)")
    p.add_argument("--out", type=Path, default=Path("/tmp/hex_val/out"), help="pipeline output root")
    p.add_argument("--patients", type=int, default=200, help="patients (one slide each)")
    p.add_argument("--tissue-mm", type=float, default=0.8, help="section diameter, mm")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workers", type=int, default=2, help="slides in parallel in stages 01-03")
    p.add_argument("--hex-epochs", type=int, default=15, help="epochs of the tiny HEX model")
    p.add_argument("--mica-epochs", type=int, default=20, help="epochs of each MICA fold (paper: 20)")
    p.add_argument("--mica-extra", default="", help="extra flags for mica.train (e.g. '--grad-accum 8')")
    p.add_argument("--no-ig", action="store_true", help="skip integrated gradients")
    p.add_argument("--table-only", action="store_true", help="only print the tables of an existing run")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cohort, out = args.cohort.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "validate.log"
    base = {"COHORT": str(cohort), "OUT": str(out), "WORKERS": str(args.workers)}
    times: dict[str, float] = {}
    if not args.table_only:
        if not (cohort / "ground_truth.json").exists():
            t0 = time.time()
            subprocess.check_call([sys.executable, "-m", "sample_data.make_cohort", "--out", str(cohort), "--slides",
                                   str(args.patients), "--patients", str(args.patients), "--tissue-mm",
                                   str(args.tissue_mm), "--seed", str(args.seed), "--workers", str(args.workers)],
                                  cwd=SCRIPTS.parent)
            times["cohort"] = time.time() - t0
        for s in ("01_patch.sh", "02_register.sh", "03_quantify.sh"):
            times[s] = run_script(s, base, log)
        hex_env = {**base, "RUN": "val_tiny", "BACKBONE": "tiny", "EPOCHS": str(args.hex_epochs), "GPUS": "0",
                   "WORKERS": "1", "EXTRA": HEX_FLAGS}
        times["04_train_hex.sh"] = run_script("04_train_hex.sh", hex_env, log)
        times["05_test_hex.sh"] = run_script("05_test_hex.sh", {**base, "RUN": "val_tiny", "WORKERS": "0"}, log)
        times["06_infer_wsi.sh"] = run_script("06_infer_wsi.sh", {**base, "RUN": "val_tiny", "WORKERS": "1"}, log)
        times["07_features.sh"] = run_script("07_features.sh", {**base, "HEX_RUN": "val_tiny", "CODEX_ENCODER": "stats",
                                                                 "WORKERS": "1"}, log)
        for task in ("survival", "response"):
            for mode in MODES:
                env = {**base, "RUN": f"val_{mode}_{task}", "MODE": mode, "TASK": task, "ENCODER": "hex:val_tiny",
                       "CODEX_ENCODER": "stats", "EPOCHS": str(args.mica_epochs), "WORKERS": "0",
                       "EXTRA": args.mica_extra}
                times[f"08 {mode} {task}"] = run_script("08_train_mica.sh", env, log)
                ig = "1" if (mode == "coattn" and task == "survival" and not args.no_ig) else "0"
                times[f"09 {mode} {task}"] = run_script("09_test_mica.sh", {**env, "IG": ig}, log)
    return report(cohort, out, times)


def report(cohort: Path, out: Path, times: dict[str, float]) -> int:
    """Print (and write to OUT/validation.md) the outcome tables and the IG check."""
    from bench.mica_vs_truth import format_table, ig_risk_auroc, outcome_table

    lines = [f"# MICA validation: {cohort} -> {out}", ""]
    missed: list[str] = []
    if times:
        lines += ["stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()), ""]
    for task, metric in (("survival", "c-index"), ("response", "AUC")):
        runs = {m: f"val_{m}_{task}" for m in MODES}
        df = outcome_table(cohort, out, runs, task=task)
        lines += [f"## {task}: {metric} on the validation patients of each fold (truth = generator's true "
                  f"{'risk' if task == 'survival' else 'response probability'})", "```",
                  format_table(df, metric), "```", ""]
        m = df.set_index("fold").loc["mean"]
        lines.append(f"coattn - truth: {m['coattn'] - m['truth']:+.3f} (target within 0.05); coattn - path: "
                     f"{m['coattn'] - m['path']:+.3f}; coattn - clinical: {m['coattn'] - m['clinical']:+.3f}")
        lines.append("")
        if not (m["coattn"] >= m["truth"] - 0.05 and m["coattn"] > m["path"] and m["coattn"] > m["clinical"]):
            missed.append(f"{task}: coattn not within 0.05 of the truth and above path and clinical")
    ig_dir = art.ATTRIBUTIONS.dir(out, run="val_coattn_survival")
    if ig_dir.is_dir():
        auc = ig_risk_auroc(cohort, ig_dir)
        if auc:
            lines.append(f"IG patch attributions vs risk masks: mean per-slide AUROC {auc['mean']:.3f} over "
                         f"{len(auc) - 2} slides (pooled {auc['pooled']:.3f}); target >= 0.7")
            if auc["mean"] < 0.7:
                missed.append("IG AUROC below 0.7")
    if missed:
        lines += ["", "targets missed: " + "; ".join(missed)]
    text = "\n".join(lines)
    print(text)
    (out / "validation.md").write_text(text + "\n")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
