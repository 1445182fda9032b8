"""Stage 03, pass 2 on its own: fit the per-marker percentiles on the slides you choose, apply them to every slide.

    python -m preprocess.normalize --cohort sample_cohort --out outputs --fit-split sample_cohort/splits/splits_0.csv
    python -m preprocess.normalize --cohort sample_cohort --out outputs --fit-slides slide_000 slide_002
    python -m preprocess.normalize --cohort test_cohort --out test_out \\
        --normalization train_out/markers/normalization.json

Run it once after every shard of pass 1 (``python -m preprocess.quantify --shard i/n``) has finished: it reads the
fresh ``markers/raw/{slide}.{csv,json}`` of the cohort's slides (``--slides`` to restrict), fits the percentiles
on the fit set (``--fit-slides``; ``--fit-split`` = a split file's ``train`` column, so validation slides stay
out; default every slide), and writes ``markers/{slide}.csv`` and ``markers/normalization.json`` (``fit_slides``,
``applied_to``, ``values``, ``settings``, ...). Every run recomputes the normalisation with the settings given
now and rewrites the label files whose content changes (the log names the settings that changed since the last
run); ``--overwrite`` is accepted and changes nothing. The method is in :mod:`preprocess.quantify.normalize`.

Exit code: 0, or 2 for bad flags or inputs (a missing split or normalization file, no fresh raw means, an
unwritable output folder) -- nothing is written then.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import artifacts as art
from pipeline.cli import Stage, config_from_args
from pipeline.io import config_dict, ensure_writable, save_config
from preprocess.quantify.normalize import (
    NormSettings,
    add_normalization_args,
    check_normalization_args,
    resolve_inputs,
    run_normalization,
)
from preprocess.quantify.tables import add_table_args

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class NormalizeConfig(NormSettings):
    """The flags of ``python -m preprocess.normalize`` (same names)."""

    out: Path
    cohort: Path | None = None
    slides: list[str] | None = None
    overwrite: bool = False
    pairs: Path | None = None
    panel: Path | None = None
    num_markers: int = 40


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m preprocess.normalize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cohort", type=Path, help="cohort folder (pairs.csv or he/ + codex/, marker_panel.csv)")
    p.add_argument("--out", type=Path, required=True, help="output root (reads OUT/markers/raw, writes OUT/markers)")
    p.add_argument("--slides", nargs="+", help="normalise only these slide ids (default: every slide of the cohort)")
    p.add_argument("--overwrite", action="store_true",
                   help="accepted for symmetry with the other stages: every run rewrites the labels that change")
    add_table_args(p)
    add_normalization_args(p)
    return p


def make_config(args: argparse.Namespace) -> NormalizeConfig:
    """The flags as a :class:`NormalizeConfig` (the normalisation's flag checks first)."""
    check_normalization_args(args)
    return config_from_args(NormalizeConfig, args)


def _writable(cfg: NormalizeConfig, ctx: Any) -> None:
    ensure_writable(art.LABELS.dir(cfg.out))


def run(cfg: NormalizeConfig, ctx: Any) -> int:
    """Read the inputs, save the resolved configuration (``markers/config_normalize.json``), normalise."""
    tables, slides, plan = resolve_inputs(cfg, cfg.cohort, cfg.pairs, cfg.panel, cfg.num_markers, cfg.slides)
    save_config(art.LABELS.dir(cfg.out), config_dict(cfg) | {"markers": tables.markers, "slides_resolved": slides},
                name="config_normalize.json")
    run_normalization(cfg, cfg.out, slides, tables.markers, plan, others=tables.ids)
    return 0


STAGE = Stage("normalisation", build_parser, make_config, run=run, prepare=_writable,
              log_file=lambda cfg: art.LABELS.dir(cfg.out) / "run.log")


def main(argv: list[str] | None = None) -> int:
    return STAGE.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
