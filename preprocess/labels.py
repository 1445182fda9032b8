"""Stage 03 as one command: marker quantification, then the H&E patch store of the slides it labelled.

    python -m preprocess.labels --cohort sample_cohort --out outputs --workers 2
    python -m preprocess.labels --cohort C --out O --quantify-flags="--legacy-columns" --store-flags="--png" \\
        -- --overwrite --slides slide_000          # after --: flags for both steps
    python -m preprocess.labels --cohort C --out O --shard 3/10      # job array task: pass 1 + its patch stores
    python -m preprocess.labels --cohort C --out O --normalize-only  # once, after every shard
    COHORT=/data/lung OUT=/scratch/hex bash scripts/03_quantify.sh   # the same, from the stage script

Two steps, each a stage of its own with its own last line:

1. ``python -m preprocess.quantify`` (pass 1 per slide, then the normalisation) with ``--cohort``, ``--out``,
   ``--workers``, ``--shard``, ``--fit-split``, the ``--quantify-flags`` and the flags after ``--``;
2. ``python -m preprocess.patch_store`` with ``--cohort``, ``--out``, ``--workers``, ``--shard``, the
   ``--store-flags`` and the flags after ``--``, and ``--labelled-only`` (it stores the slides quantify labelled
   and names the ones it failed), except when there are no labels yet: with ``--shard`` or a ``--no-normalize``
   among the quantify flags (pass 1 only; the labels come with ``--normalize-only``) every slide is stored.

The store runs even when quantify failed for some slides (exit 1); a quantify that stopped before any slide (exit
2: bad input or flags) or ended otherwise (130: Ctrl-C) stops the stage. The last line (stderr) says how each
step ended: ``stage 03: quantify: ok; patch store: ok``, or with ``quantify failed for some slides (exit 1)`` /
``patch store failed (exit N)`` and a pointer to ``python -m preprocess.status``. Exit status: quantify's when it
failed, else the store's. ``--normalize-only`` runs ``python -m preprocess.normalize`` alone (``--cohort``,
``--out``, ``--fit-split``, the quantify flags and the flags after ``--``) and returns its exit status.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.cli import Stage, config_from_args
from pipeline.errors import EXIT_INPUT_ERROR
from preprocess import normalize, patch_store
from preprocess.quantify import stage as quantify

log = logging.getLogger(__name__)

STATUS_HINT = "python -m preprocess.status {out} lists the failed slides"


@dataclass(frozen=True)
class LabelsConfig:
    """The flags of ``python -m preprocess.labels`` (same names); ``args``: the flags after ``--``."""

    out: Path
    cohort: Path | None = None
    workers: int | None = None
    shard: str | None = None
    fit_split: Path | None = None
    normalize_only: bool = False
    quantify_flags: str = ""
    store_flags: str = ""
    args: list[str] = field(default_factory=list)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m preprocess.labels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cohort", type=Path, help="cohort folder (passed to both steps)")
    p.add_argument("--out", type=Path, required=True, help="output root (passed to both steps)")
    p.add_argument("--workers", type=int, help="slides processed in parallel (passed to both steps)")
    p.add_argument("--shard", metavar="I/N", help="job arrays: this task's share of the slides (both steps)")
    p.add_argument("--fit-split", type=Path, metavar="CSV", help="passed to quantify / normalize only")
    p.add_argument("--normalize-only", action="store_true",
                   help="only the normalisation (python -m preprocess.normalize), after every shard")
    p.add_argument("--quantify-flags", default="", metavar="FLAGS",
                   help="more flags for preprocess.quantify (or preprocess.normalize), split at whitespace; give "
                        "them as --quantify-flags='--legacy-columns --allow-flagged'")
    p.add_argument("--store-flags", default="", metavar="FLAGS",
                   help="more flags for preprocess.patch_store, split at whitespace (e.g. --store-flags='--png')")
    p.add_argument("args", nargs="*", metavar="-- FLAGS",
                   help="flags for both steps, after -- (e.g. -- --overwrite --slides slide_000)")
    return p


def make_config(args: argparse.Namespace) -> LabelsConfig:
    return config_from_args(LabelsConfig, args)


def _common(cfg: LabelsConfig, workers: bool = True, shard: bool = True) -> list[str]:
    argv = [*(["--cohort", str(cfg.cohort)] if cfg.cohort is not None else []), "--out", str(cfg.out)]
    if workers and cfg.workers is not None:
        argv += ["--workers", str(cfg.workers)]
    if shard and cfg.shard:
        argv += ["--shard", cfg.shard]
    return argv


def step_argvs(cfg: LabelsConfig) -> tuple[list[str], list[str]]:
    """The arguments of the two steps (quantify, patch store), as the module docstring says."""
    fit = ["--fit-split", str(cfg.fit_split)] if cfg.fit_split is not None else []
    quantify = [*_common(cfg), *fit, *cfg.quantify_flags.split(), *cfg.args]
    pass1_only = bool(cfg.shard) or "--no-normalize" in [*cfg.quantify_flags.split(), *cfg.args]
    store = [*_common(cfg), *([] if pass1_only else ["--labelled-only"]), *cfg.store_flags.split(), *cfg.args]
    return quantify, store


def _say(line: str) -> None:
    """The stage's last line, on stderr as it is (no log prefix), after both steps' own last lines."""
    print(line, file=sys.stderr, flush=True)


def run_steps(cfg: LabelsConfig, quantify: Callable[[Sequence[str]], int],
              store: Callable[[Sequence[str]], int]) -> int:
    """Quantify, then the patch store, with the exit-code rules of the module docstring; returns the exit code."""
    q_argv, s_argv = step_argvs(cfg)
    q = quantify(q_argv)
    if q == 0:
        q_msg = "quantify: ok"
    elif q == 1:
        q_msg = "quantify failed for some slides (exit 1)"
    elif q == EXIT_INPUT_ERROR:
        _say("stage 03: quantify stopped before any slide (exit 2: bad input or flags, see above); patch store not "
             "run")
        return q
    else:
        _say(f"stage 03: quantify ended with exit {q}; patch store not run")
        return q
    s = store(s_argv)
    s_msg = "patch store: ok" if s == 0 else f"patch store failed (exit {s})"
    if q or s:
        _say(f"stage 03: {q_msg}; {s_msg} ({STATUS_HINT.format(out=cfg.out)})")
        return q or s
    _say(f"stage 03: {q_msg}; {s_msg}")
    return 0


def run(cfg: LabelsConfig, ctx: Any) -> int:
    """``--normalize-only``: the normalisation alone; else :func:`run_steps` with the two stages' entries."""
    if cfg.normalize_only:
        fit = ["--fit-split", str(cfg.fit_split)] if cfg.fit_split is not None else []
        return normalize.main([*_common(cfg, workers=False, shard=False), *fit, *cfg.quantify_flags.split(),
                               *cfg.args])
    return run_steps(cfg, quantify.main, patch_store.main)


STAGE = Stage("stage 03", build_parser, make_config, run=run)


def main(argv: list[str] | None = None) -> int:
    return STAGE.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
