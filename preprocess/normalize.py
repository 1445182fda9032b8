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
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.io import save_config
from preprocess.quantify.normalize import add_normalization_args, resolve_run, run_normalization
from preprocess.quantify.tables import add_table_args

log = logging.getLogger(__name__)


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        tables, slides, plan = resolve_run(args)
        save_config(args.out / "markers", vars(args) | {"markers": tables.markers, "slides_resolved": slides},
                    name="config_normalize.json")
        run_normalization(args, args.out, slides, tables.markers, plan, others=tables.ids)
    except PipelineError as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
