"""Evaluate a trained HEX model on labelled patches: per-patch predictions, per-marker and per-slide correlations.

Commands (run from the repository root)::

    # validation slides of a split, best model of run RUN -> OUT/runs/RUN/test/
    python -m hex.test --out OUT --run RUN --data OUT --split COHORT/splits/splits_0.csv --split-column val \\
        --visible-markers COHORT/ground_truth.json
    # every labelled slide in OUT/markers, from an epoch checkpoint
    python -m hex.test --out OUT --run RUN --data OUT --checkpoint OUT/runs/RUN/checkpoints/epoch_120.pt
    # the original release's checkpoint.pth (heads only): backbone weights from --weights, its 40 marker names
    # from hex/markers_original.csv, matched to the label columns by name
    python -m hex.test --out OUT --run orig --data OUT --checkpoint checkpoint.pth --backbone musk \
        --weights musk/model.safetensors
    # several processes / GPUs (each sample predicted exactly once, gathered by index on rank 0)
    torchrun --standalone --nproc-per-node=4 -m hex.test --out OUT --run-name RUN --data OUT --split ...
    # an independent cohort (stages 01-03 under OUT2): every labelled slide, no split, labels put into the run's
    # units -> OUT/runs/RUN/external/cohort2/  (scripts/05_test_hex.sh: EXTERNAL=COHORT2 EXTERNAL_OUT=OUT2)
    python -m hex.test --out OUT --run RUN --data OUT2 --external-cohort cohort2

Outputs (rank 0, atomic): ``patch_predictions.csv`` (``slide,index,x,y,true_<m>...,pred_<m>...``),
``marker_pearson.csv`` (``marker,pearson,spearman,mse,n[,visible]`` + ``mean``/``median`` rows and, with
``--visible-markers``, ``mean_visible``/``mean_invisible``), ``slide_pearson.csv`` (per-slide per-marker r),
``summary.json``, ``marker_pearson_bar.png`` and ``scatter_grid.png``.

Training slides: a model of ours records its split (``best.json``: ``split``, ``train_slides``); evaluating any of
those slides (e.g. another fold's split with this fold's run) stops with one line naming them, unless
``--allow-train-slides`` (then ``summary.json`` lists them as ``train_slides_scored``). ``summary.json`` records what
was scored: ``split``, ``split_column``, ``slides``, ``checkpoint`` (+ sha256), ``trained_split``.

Reruns: ``TEST_DIR/done/evaluation.json`` records the settings (slides, split, visible markers, plots) and the
inputs (checkpoint, label and patch folders, with size and mtime). The same again is skipped; a changed input (the
model trained on, the labels redone) is redone, said so; other settings or another checkpoint file stop with
"done with other settings: <diff>; pass --overwrite" (exit 2), so results are never silently replaced.

The labels must be normalised like the checkpoint's training labels (``markers/normalization.json`` against the
one stored in the checkpoint): a difference stops the run, since MSE and r on differently normalised labels do not
measure the model (``--allow-normalization-mismatch`` evaluates anyway, with a warning).

Independent cohorts (``--external-cohort NAME``, with ``--data`` the cohort's own output root): the results go to
``OUT/runs/RUN/external/NAME/`` (same files), every labelled slide of ``DATA/markers`` is scored unless
``--split``/``--slides`` narrow it, and the cohort's labels, normalised with its own percentiles, are put into the
run's units instead of stopping (:mod:`hex.evaluate.external`): from the raw means stage 03 keeps in
``markers/raw/`` (exact: the labels stage 03 would write with the run's ``normalization.json``), else by inverting
the cohort's ``normalization.json``, which is inexact for clipped labels (0 or 1; counted in ``summary.json``).
``summary.json`` says what was applied under ``label_units`` (``mode``: ``as labelled`` / ``renormalised``, where
each normalisation came from, the slides done each way, ``inexact_labels``). The training-slide check is off there:
the cohort's slide ids name other slides, even where they equal training ids (``slide_000`` in both); a
``--data`` whose label folder is the one the run was trained on (its ``config.json``) is not another cohort and
stops.

Dense models (issue 19; a checkpoint whose ``model_args`` has ``dense_grid`` G > 0) are also scored at the cell
scale (:mod:`hex.evaluate.dense`), from the same prediction pass: ``dense_pearson.csv``
(``marker,r_dense,r_baseline,r_patch``: per-marker Pearson r pooled over every valid cell of the test slides),
``dense_summary.json``, ``dense_scatter.png`` and ``dense_side_by_side.png``. The dense labels are
``DATA/markers_dense/{slide}.h5`` (stage 03 with ``--dense-grid G``), or ``--dense-labels DIR`` (e.g. labels made
with ``--registration-model affine``); a test slide without them, or labels of another grid, stop with one line.
``--dense-baseline OUT_B`` scores a patch-level model's stage-06 map (``OUT_B/virtual_codex/{slide}.npy``, made at
``--stride 56``) upsampled bilinearly to the cell centres; without it ``r_baseline`` is empty. ``--no-dense``
scores the patch head only. Patch-only models and external cohorts (whose dense labels would be in the cohort's own
normalisation) are scored as before; their done-records do not change.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from hex.data.datasets import (
    LEGACY_PREFIX,
    build_dataset,
    list_labelled_slides,
    marker_columns,
    normalization_differences,
    resolve_markers_dir,
)
from hex.data.splits import check_split_slides
from hex.data.transforms import BatchTransform
from hex.evaluate import dense as dense_mod
from hex.evaluate.external import labels_in_run_units, training_labels_dir
from hex.evaluate.predict import predict_distributed, resolve_amp, wants_channels_last
from hex.evaluate.reports import write_reports
from hex.trained_model import add_checkpoint_args, check_backbone_kw, load_trained, training_split
from pipeline import artifacts as art
from pipeline import done as done_mod
from pipeline.cli import Stage, config_from_args, require
from pipeline.dist import DistContext, barrier
from pipeline.errors import PipelineError
from pipeline.io import config_dict, ensure_writable, remove_outputs, save_config
from pipeline.tables import read_split

log = logging.getLogger("hex.test")


# ----------------------------------------------------------------------------------------------------------------
# markers: the model's outputs matched to the label CSV's columns by name


def match_label_markers(model_markers: Sequence[str], csv_markers: Sequence[str],
                        original: bool = False) -> tuple[list[str], list[int]]:
    """Label columns to read and the model outputs they correspond to: ``(columns, output indices)``.

    Markers are matched by name; the model's order is kept and markers the labels lack are left out (warning).
    An original checkpoint (``original``) evaluated on legacy ``mean_intensity_channel{k}`` columns maps output k-1
    to channel k, as the release trained it. No marker in common is an error.
    """
    have = set(csv_markers)
    if original and csv_markers and all(c.startswith(LEGACY_PREFIX) for c in csv_markers) and \
            len(csv_markers) == len(model_markers):
        log.info("original checkpoint on legacy label columns: output k -> %s{k+1}", LEGACY_PREFIX)
        return list(csv_markers), list(range(len(model_markers)))
    cols = [m for m in model_markers if m in have]
    if not cols:
        raise PipelineError(f"the label CSVs share no marker with the model (model: {list(model_markers)[:5]}..., "
                            f"labels: {list(csv_markers)[:5]}...); use labels with the model's marker names")
    if len(cols) < len(model_markers):
        log.warning("labels lack %d of the model's %d markers (%s...): evaluating the %d in common",
                    len(model_markers) - len(cols), len(model_markers),
                    [m for m in model_markers if m not in have][:5], len(cols))
    pos = {m: i for i, m in enumerate(model_markers)}
    return cols, [pos[m] for m in cols]


def _first_csv_markers(markers_dir: Path, slides: Sequence[str]) -> list[str]:
    for s in slides:
        p = markers_dir / f"{s}.csv"
        if p.is_file():
            return marker_columns(pd.read_csv(p, nrows=0).columns)
    raise PipelineError(f"no label CSV for slides {list(slides)[:5]} in {markers_dir} (run the quantification stage)")


def read_visible_markers(path: str | os.PathLike) -> list[str]:
    """``visible_markers`` of a ``ground_truth.json`` (or a JSON list)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"--visible-markers file {path} does not exist")
    obj = json.loads(path.read_text())
    vis = obj.get("visible_markers") if isinstance(obj, dict) else obj
    if not isinstance(vis, list):
        raise PipelineError(f"{path} has no 'visible_markers' list")
    return [str(v) for v in vis]


# ----------------------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hex.test", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="output root OUT (runs live in OUT/runs/RUN)")
    p.add_argument("--run-name", "--run", dest="run", default="hex",
                   help="run name under OUT/runs/ (--run-name under torchrun, which reads --run itself)")
    p.add_argument("--data", type=Path, help="data root holding he_patches/ and markers/ (default: OUT)")
    p.add_argument("--markers-dir", type=Path, help="label CSV folder (default DATA/markers)")
    p.add_argument("--patches-dir", type=Path, help="patch folder (default DATA/he_patches)")
    p.add_argument("--split", type=Path, help="split CSV; without it every labelled slide in the marker folder")
    p.add_argument("--split-column", default="val", help="column of --split to evaluate (default val)")
    p.add_argument("--slides", nargs="+", help="explicit slide ids (instead of --split)")
    p.add_argument("--visible-markers", type=Path, help="ground_truth.json with visible_markers: report means")
    p.add_argument("--test-dir", type=Path, help="output folder (default OUT/runs/RUN/test)")
    p.add_argument("--batch-size", type=int, default=128, help="patches per forward per process")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes per rank")
    p.add_argument("--amp", choices=("auto", "fp16", "bf16", "none"), default="auto", help="autocast (CUDA only)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--allow-normalization-mismatch", action="store_true",
                   help="evaluate labels whose normalization.json differs from the checkpoint's (default: an error)")
    p.add_argument("--external-cohort", metavar="NAME",
                   help="score an independent cohort: its labelled slides under --data (another OUT, no split "
                        "needed), labels put into the run's normalisation (from its markers/raw means, else by "
                        "inverting its normalization.json), no training-slide check (its ids name other slides); "
                        "results in OUT/runs/RUN/external/NAME")
    p.add_argument("--allow-train-slides", action="store_true",
                   help="score slides the model was trained on (default: an error; summary.json lists them)")
    p.add_argument("--overwrite", action="store_true",
                   help="redo results done with other settings (default: an error; the same settings: skipped)")
    g = p.add_argument_group("dense models (dense_grid > 0)")
    g.add_argument("--dense-labels", type=Path, metavar="DIR",
                   help="dense label folder with {slide}.h5 (default DATA/markers_dense, stage 03 --dense-grid); "
                        "e.g. labels made with --registration-model affine")
    g.add_argument("--dense-baseline", type=Path, metavar="OUT_B",
                   help="OUT root of a patch-level run's stage-06 maps (virtual_codex/{slide}.npy/.json, made at "
                        "--stride 56): the baseline upsampled to the dense grid (default: none, r_baseline empty)")
    g.add_argument("--no-dense", action="store_true",
                   help="score only the patch head of a dense model (no dense_pearson.csv)")
    add_checkpoint_args(p, "best.safetensors (default OUT/runs/RUN/best.safetensors)")
    return p


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """One field per flag of ``python -m hex.test`` (same names; see its ``--help``)."""

    out: Path
    run: str = "hex"
    data: Path | None = None
    markers_dir: Path | None = None
    patches_dir: Path | None = None
    split: Path | None = None
    split_column: str = "val"
    slides: list[str] | None = None
    visible_markers: Path | None = None
    test_dir: Path | None = None
    batch_size: int = 128
    workers: int = 2
    amp: str = "auto"
    device: str = "auto"
    no_plots: bool = False
    allow_normalization_mismatch: bool = False
    external_cohort: str | None = None
    allow_train_slides: bool = False
    overwrite: bool = False
    dense_labels: Path | None = None
    dense_baseline: Path | None = None
    no_dense: bool = False
    checkpoint: Path | None = None
    backbone: str | None = None
    weights: str | None = None
    backbone_kw: dict[str, Any] | None = None

    @property
    def run_dir(self) -> Path:
        """``OUT/runs/RUN``."""
        return art.HEX_RUN.dir(self.out, run=self.run)

    @property
    def results_dir(self) -> Path:
        """Where the results go: ``--test-dir``, default ``OUT/runs/RUN/test`` (``--external-cohort NAME``:
        ``OUT/runs/RUN/external/NAME``)."""
        if self.test_dir is not None:
            return self.test_dir
        if self.external_cohort:
            return art.HEX_EXTERNAL.dir(self.out, run=self.run, cohort=self.external_cohort)
        return art.HEX_TEST.dir(self.out, run=self.run)


def make_config(args: argparse.Namespace) -> EvalConfig:
    """Flag values and input files, before any work (one line naming the flag or file)."""
    cfg = config_from_args(EvalConfig, args)
    for flag, v, lo in (("--batch-size", cfg.batch_size, 1), ("--workers", cfg.workers, 0)):
        require(v >= lo, f"{flag} {v}: must be >= {lo}")
    for flag, path in (("--split", cfg.split), ("--visible-markers", cfg.visible_markers),
                       ("--checkpoint", cfg.checkpoint)):
        require(path is None or path.is_file(), f"{flag} {path}: file not found")
    data_flag = "--data" if cfg.data is not None else "--out (the data root when --data is not given)"
    for flag, folder in ((data_flag, cfg.data or cfg.out), ("--markers-dir", cfg.markers_dir),
                         ("--patches-dir", cfg.patches_dir)):
        require(folder is None or folder.is_dir(), f"{flag} {folder}: folder not found")
    check_backbone_kw(cfg.backbone_kw)
    for flag, folder in (("--dense-labels", cfg.dense_labels), ("--dense-baseline", cfg.dense_baseline)):
        require(folder is None or folder.is_dir(), f"{flag} {folder}: folder not found")
        require(folder is None or not cfg.no_dense, f"{flag} and --no-dense contradict each other: give one")
        require(folder is None or cfg.external_cohort is None,
                f"{flag}: dense evaluation is not done for --external-cohort (its dense labels are in the cohort's "
                "normalisation); drop one of them")
    if cfg.dense_baseline is not None:
        vc = art.VIRTUAL_CODEX.dir(cfg.dense_baseline)
        require(vc.is_dir(), f"--dense-baseline {cfg.dense_baseline}: no {vc} (run stage 06 with the patch-level "
                             "run at --stride 56 and --out OUT_B)")
    if cfg.external_cohort is not None:
        name = cfg.external_cohort
        require(bool(name) and name not in (".", "..") and "/" not in name and os.sep not in name,
                f"--external-cohort {name!r}: give the cohort a plain folder name (e.g. its folder's name)")
        require(cfg.data is not None or cfg.markers_dir is not None,
                "--external-cohort needs --data: the external cohort's output root (EXTERNAL_OUT), not OUT")
        require(not cfg.allow_normalization_mismatch, "--external-cohort puts the labels into the run's units; "
                "--allow-normalization-mismatch (score them as they are) contradicts it: give one of them")
    return cfg


def prepare(cfg: EvalConfig, ctx: DistContext) -> None:
    """The results folder is writable, before the log file opens there."""
    ensure_writable(cfg.results_dir, "test folder", "choose another --test-dir or --out")


def check_normalization(meta: dict[str, Any], labels: dict | None, markers: Sequence[str], allow: bool) -> None:
    """Stop when the labels were normalised differently from the checkpoint's training labels (``allow``: warn)."""
    diffs = normalization_differences(meta.get("normalization"), labels, markers)
    if not diffs:
        if meta.get("normalization") is None or labels is None:
            log.info("label normalisation not compared (the %s has none)",
                     "checkpoint" if meta.get("normalization") is None else "label folder")
        return
    msg = (f"the labels' normalization.json differs from the one checkpoint {meta.get('checkpoint')} was trained on "
           f"({len(diffs)} differences, e.g. {'; '.join(diffs[:3])}): MSE and r on differently normalised labels do "
           "not measure the model; normalise these slides with the training cohort's file (preprocess.quantify "
           "--normalization), or pass --allow-normalization-mismatch")
    if not allow:
        raise PipelineError(msg)
    log.warning("%s", msg.replace(", or pass --allow-normalization-mismatch", " (allowed)"))


def check_train_slides(slides: Sequence[str], trained: dict[str, Any] | None, allow: bool) -> list[str]:
    """The slides of ``slides`` the model was trained on (``trained``: :func:`hex.trained_model.training_split`); any is
    an error naming them and the split, unless ``allow`` (a warning). Returns them."""
    if trained is None:
        log.info("the checkpoint records no training split: cannot check that the scored slides are held out")
        return []
    seen = sorted(set(slides) & set(trained["train_slides"]))
    if seen:
        msg = (f"{len(seen)} of the {len(slides)} slides to score were in the model's training split "
               f"{trained['split']} ({', '.join(seen[:10])}{' ...' if len(seen) > 10 else ''}; from "
               f"{trained['source']}): a score on them does not measure the model. Evaluate the run of this fold "
               "(RUN/FOLD), or pass --allow-train-slides")
        if not allow:
            raise PipelineError(msg)
        log.warning("%s", msg.replace(", or pass --allow-train-slides", " (allowed: --allow-train-slides)"))
    return seen


def check_external(name: str, mdir: Path, ckpt: Path, slides: Sequence[str], trained: dict[str, Any] | None) -> None:
    """``--external-cohort``: the label folder must not be the one the run was trained on (then it is no other
    cohort and the training-slide check applies: stop, one line); slide ids shared with the training split are
    logged, not an error (another cohort's slides)."""
    own = training_labels_dir(ckpt)
    if own is not None and mdir.resolve() == own:
        raise PipelineError(f"--external-cohort {name}: the labels {mdir} are the ones {ckpt} was trained on, not an "
                            "independent cohort; score this cohort without --external-cohort (e.g. --split ... "
                            "--split-column val), or point --data at the other cohort's output root")
    shared = sorted(set(slides) & set(trained["train_slides"])) if trained else []
    if shared:
        log.info("%d slide ids of cohort %s are also ids of the run's training slides (%s...): other slides of "
                 "another cohort, not checked", len(shared), name, ", ".join(shared[:3]))


def _outputs(test_dir: Path, plots: bool, _key: str = "", dense: bool = False) -> list[Path]:
    names = ["patch_predictions.csv", "marker_pearson.csv", "slide_pearson.csv", "summary.json"]
    out = [test_dir / n for n in names + (["marker_pearson_bar.png", "scatter_grid.png"] if plots else [])]
    return out + (dense_mod.dense_outputs(test_dir, plots) if dense else [])


@dataclass(frozen=True)
class DensePlan:
    """Dense evaluation of a run: the model's grid G, the dense label folder, the baseline OUT root (or None)."""

    grid: int
    labels: Path
    baseline: Path | None


def plan_dense(cfg: EvalConfig, ckpt: Path, slides: Sequence[str], data: Path) -> DensePlan | None:
    """Whether the run is scored at the cell scale too (a checkpoint with ``dense_grid`` > 0, not ``--no-dense``,
    not an external cohort), with its inputs checked (one line naming a missing or mismatched file)."""
    if cfg.no_dense:
        return None
    grid = dense_mod.checkpoint_dense_grid(ckpt)
    if grid <= 0:
        if cfg.dense_labels is not None or cfg.dense_baseline is not None:
            flag = "--dense-labels" if cfg.dense_labels is not None else "--dense-baseline"
            raise PipelineError(f"{flag}: the checkpoint {ckpt} has no dense head (dense_grid 0); score a run "
                                "trained with --dense-grid, or drop the flag")
        return None
    if cfg.external_cohort:
        log.info("dense evaluation is not done for external cohorts (their dense labels are in the cohort's own "
                 "normalisation): patch head only")
        return None
    labels = cfg.dense_labels or art.DENSE_LABELS.dir(data)
    dense_mod.check_dense_inputs(slides, labels, grid, ckpt, cfg.dense_baseline)
    return DensePlan(grid, labels, cfg.dense_baseline)


def _done_spec(cfg: EvalConfig, test_dir: Path, ckpt: Path, slides: list[str], mdir: Path,
               pdir: Path, dense: DensePlan | None = None) -> done_mod.DoneSpec:
    """What makes the results: settings and inputs (see the module docstring); a dense plan adds its grid and
    baseline to the settings, its label and baseline folders to the inputs and its files to the outputs."""
    def _abs(p: Path | None) -> str | None:
        return str(Path(p).resolve()) if p is not None else None

    settings = {"slides": list(slides), "split": _abs(cfg.split) if not cfg.slides else None,
                "split_column": cfg.split_column if cfg.split is not None and not cfg.slides else None,
                "visible_markers": _abs(cfg.visible_markers), "plots": not cfg.no_plots,
                "backbone": cfg.backbone, "weights": cfg.weights, "backbone_kw": cfg.backbone_kw}
    if cfg.external_cohort:  # only then: results of the other path keep their done-records
        settings["external_cohort"] = cfg.external_cohort
    inputs = {"checkpoint": _abs(ckpt), "labels": _abs(mdir), "patches": _abs(pdir)}
    if dense is not None:  # only then: patch-only results keep their done-records
        settings["dense"] = {"grid": dense.grid, "baseline": _abs(dense.baseline)}
        inputs["dense_labels"] = _abs(dense.labels)
        if dense.baseline is not None:
            inputs["dense_baseline"] = _abs(art.VIRTUAL_CODEX.dir(dense.baseline))
    return done_mod.DoneSpec(test_dir, settings, art.HEX_TEST.schema, inputs=lambda _s: inputs,
                             outputs=functools.partial(_outputs, test_dir, not cfg.no_plots, dense=dense is not None))


_KEY = "evaluation"  # the done-record: TEST_DIR/done/evaluation.json


def evaluate_run(cfg: EvalConfig, ctx: DistContext) -> int:
    """The stage body: resolve and check the slides, the done-record and the training split (before any work), load
    the model, build the dataset, predict on every rank, write the reports on rank 0."""
    test_dir = cfg.results_dir
    data = cfg.data or cfg.out
    ckpt = cfg.checkpoint or art.HEX_RUN.path(cfg.out, run=cfg.run)
    if not ckpt.is_file():
        raise PipelineError(f"checkpoint {ckpt} does not exist (train run {cfg.run} first, or pass --checkpoint)")
    mdir = resolve_markers_dir(data, cfg.markers_dir)
    pdir = cfg.patches_dir or art.PATCH_STORE.dir(data)
    if cfg.slides:
        slides, source = list(cfg.slides), "--slides"
    elif cfg.split is not None:
        slides, source = read_split(cfg.split, cfg.split_column), f"split {cfg.split} column {cfg.split_column}"
    else:
        slides, source = list_labelled_slides(mdir), f"the label folder {mdir}"
        if not slides:
            raise PipelineError(f"no label CSVs in {mdir}")
    check_split_slides(slides, mdir, pdir, source)
    visible = read_visible_markers(cfg.visible_markers) if cfg.visible_markers else None
    trained = training_split(ckpt)
    if cfg.external_cohort:
        check_external(cfg.external_cohort, mdir, ckpt, slides, trained)
        seen: list[str] = []
    else:
        seen = check_train_slides(slides, trained, cfg.allow_train_slides)
    dense = plan_dense(cfg, ckpt, slides, data)
    spec = _done_spec(cfg, test_dir, ckpt, slides, mdir, pdir, dense)
    state = done_mod.check(spec, _KEY)
    if not cfg.overwrite and state.state == "done":
        log.info("hex.test: 0 done, 1 skipped (already done with these settings: %s; pass --overwrite to redo)",
                 test_dir / "summary.json")
        return 0
    if not cfg.overwrite and state.state == "conflict":
        raise PipelineError(f"hex.test: the results in {test_dir} are done with other settings: {state.reason}; "
                            "pass --overwrite to redo them with these settings, or use another --test-dir")
    if state.reason not in ("", "not done") and ctx.is_main:
        log.info("hex.test: %s", state.reason)
    stamps = {k: done_mod.file_stamp(v) for k, v in spec.inputs(_KEY).items()}
    model, meta = load_trained(ckpt, backbone=cfg.backbone, weights=cfg.weights, backbone_kw=cfg.backbone_kw)
    if dense is not None and int(getattr(model, "dense_grid", 0) or 0) != dense.grid:
        raise PipelineError(f"checkpoint {ckpt} records dense_grid {dense.grid} but its model has "
                            f"{getattr(model, 'dense_grid', 0)}; a damaged best.json? pass --no-dense")
    model.to(ctx.device)
    channels_last = wants_channels_last(model, ctx.device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    cols, outputs = match_label_markers(meta["markers"], _first_csv_markers(mdir, slides),
                                        original=meta.get("checkpoint_kind") == "original")
    ds = build_dataset(data, slides, markers=cols, markers_dir=cfg.markers_dir, patches_dir=cfg.patches_dir)
    if cfg.external_cohort:
        ds.labels, units = labels_in_run_units(ds, mdir, meta.get("normalization"), ds.normalization, cols,
                                               checkpoint=str(ckpt))
    else:
        check_normalization(meta, ds.normalization, cols, cfg.allow_normalization_mismatch)
        units = {"mode": "as labelled", "cohort_normalization": str(mdir / art.NORMALIZATION.name)}
    ds.markers = [meta["markers"][k] for k in outputs]  # report under the model's names
    if dense is not None:
        dense_mod.check_dense_rows(ds, dense.labels, cols, dense.grid)
    tf = BatchTransform(int(meta["input_size"]), meta["mean"], meta["std"], train=False,
                        interpolation=meta.get("interpolation") or "bilinear", stain_norm=meta.get("stain_norm"))
    amp = resolve_amp(cfg.amp, ctx.device)
    if ctx.is_main:
        log.info("model %s (epoch %s) on %d patches of %d slides (%s), %d rank(s)", ckpt, meta.get("epoch"), len(ds),
                 len(slides), source, ctx.world_size)
        done_mod.clear(spec, _KEY)
        # no earlier file survives a redo (e.g. plots of another run, dense files of a dense evaluation)
        remove_outputs(_outputs(test_dir, True, dense=True))
    pred = predict_distributed(model, ds, tf, ctx.device, ctx.rank, ctx.world_size, batch_size=cfg.batch_size,
                               workers=cfg.workers, amp=amp, progress=ctx.is_main, channels_last=channels_last,
                               dense=dense is not None)
    dense_pred = None
    if dense is not None:
        pred, dense_pred = pred
        dense_pred = dense_pred[:, outputs]
    pred = pred[:, outputs]
    if ctx.is_main:
        info = {"split": str(cfg.split) if cfg.split is not None and not cfg.slides else None,
                "split_column": cfg.split_column if cfg.split is not None and not cfg.slides else None,
                "slides": slides, "checkpoint": str(ckpt), "checkpoint_sha256": meta["checkpoint_sha256"],
                "epoch": meta.get("epoch"), "trained_split": trained["split"] if trained else None,
                "train_slides_scored": seen, "external_cohort": cfg.external_cohort, "label_units": units}
        save_config(test_dir, {**config_dict(cfg), "checkpoint": str(ckpt), "world_size": ctx.world_size,
                               "slides": slides, "checkpoint_sha256": meta["checkpoint_sha256"],
                               "checkpoint_kind": meta["checkpoint_kind"], "markers": ds.markers},
                    name="test_config.json")
        if dense is not None:
            info["dense"] = _dense_reports(test_dir, ds, pred, dense_pred, dense, cols, visible, not cfg.no_plots)
        s = write_reports(test_dir, ds, pred, visible, plots=not cfg.no_plots, info=info)
        done_mod.write_record(spec, _KEY, stamps)
        msg = f"mean Pearson r {s['mean_pearson']:.4f} (median {s['median_pearson']:.4f})"
        if visible is not None:
            msg += (f"; visible {s['mean_pearson_visible']:.4f}, invisible {s['mean_pearson_invisible']:.4f}")
        if dense is not None:
            d = s["dense"]
            msg += (f"; dense {dense.grid}x{dense.grid}: r_dense {_fmt(d['mean_r_dense'])}, r_baseline "
                    f"{_fmt(d['mean_r_baseline'])}")
        log.info("hex.test: 1 done: %s over %d patches of %d slides (%s) -> %s", msg, len(ds), len(slides), source,
                 test_dir)
    barrier()
    return 0


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _dense_reports(test_dir: Path, ds: Any, pred: Any, dense_pred: Any, dense: DensePlan, cols: Sequence[str],
                   visible: Sequence[str] | None, plots: bool) -> dict[str, Any]:
    """Read the dense labels (and the baseline), write the dense files; returns what ``summary.json`` keeps of
    them (means, files)."""
    targets = dense_mod.read_targets(ds, dense.labels, cols, dense.grid)
    baseline, strides = (dense_mod.baseline_for(ds, dense.baseline, ds.markers, dense.grid, targets.cell_px_level0)
                         if dense.baseline is not None else (None, {}))
    info = {"dense_labels": str(dense.labels), "dense_label_files": targets.paths,
            "baseline": str(dense.baseline) if dense.baseline is not None else None,
            "baseline_stride_level0": strides or None}
    d = dense_mod.write_dense_reports(test_dir, ds, pred, dense_pred, targets, baseline, visible, plots, info)
    keep = [k for k in d if k.startswith("mean_r_")] + ["grid", "cell_um", "registration", "n_cells"]
    return {k: d[k] for k in keep} | {"baseline": info["baseline"], "table": str(test_dir / dense_mod.CSV_NAME)}


STAGE = Stage("hex.test", build_parser, make_config, run=evaluate_run, distributed=True, prepare=prepare,
              log_file=lambda cfg: cfg.results_dir / "test.log")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hex.test``; returns the exit code (0, 2 bad input, 130 Ctrl-C)."""
    return STAGE.main(argv)
