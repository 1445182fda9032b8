"""Labels of an independent cohort in a run's units, for ``python -m hex.test --external-cohort NAME``.

A HEX run learns labels normalised with its training cohort's percentiles (the ``normalization.json`` stored in
the checkpoint: ``value = clip((raw - lo) / (hi - lo), 0, 1)`` per marker). Stage 03 on another cohort fits its
own percentiles, so its ``markers/{slide}.csv`` are in other units; MSE and r against them do not measure the
model. :func:`labels_in_run_units` re-expresses them with the run's percentiles:

* **from the raw means** (exact): stage 03 keeps the raw per-patch means in ``markers/raw/{slide}.csv`` (every grid
  patch, by ``index``). The labelled rows' raw means are normalised with the run's percentiles
  (:func:`preprocess.quantify.normalize.apply_normalization`, the function stage 03 uses), after checking that the
  cohort's own ``normalization.json`` turns them into the cohort's labels (to 1e-5; the CSVs hold 7 digits), so
  they are the means the labels were made from. The result equals what stage 03 writes with
  ``--normalization RUN_NORMALIZATION.json`` on that cohort.
* **by inverting the cohort's normalisation** (a slide without raw means, or whose raw means do not give its
  labels): ``raw = lo2 + v (hi2 - lo2)``, then the run's formula. This is exact for labels strictly inside (0, 1)
  (up to the CSVs' 7 digits), but **not** for clipped ones: a label 0 only says raw <= lo2, so where lo2 > lo1 the
  run-unit value lies anywhere in [0, (lo2 - lo1) / (hi1 - lo1)] and the inverse gives its upper end (likewise a
  label 1 where hi2 < hi1, and every label of a marker whose cohort percentiles are equal). Those labels are counted
  (``inexact_labels``) with the widest such interval (``max_inexact_width``); tests/stages/test_hex_external.py
  measures the effect against labels normalised with the run's percentiles directly.

When the cohort was already normalised with the run's file (no difference), the labels are used as they are.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hex.data.datasets import PatchDataset, normalization_differences, resolve_markers_dir
from pipeline import artifacts as art
from pipeline.errors import PipelineError
from preprocess.quantify.normalize import apply_normalization
from preprocess.quantify.raw import load_raw, raw_dir

log = logging.getLogger("hex.test")

RAW_SUBDIR = raw_dir(".").name
"""The raw means' folder inside a label folder (``markers/raw``, :mod:`preprocess.quantify.raw`)."""
CONSISTENCY_TOL = 1e-5
"""Largest difference between a label and its raw mean normalised with the cohort's file for the raw means to count
as the ones the labels were made from (the label CSVs hold 7 significant digits)."""


def _bounds(norm: dict, markers: Sequence[str], what: str) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) of ``markers`` (K,) from a normalization record, one line naming ``what`` when one is missing."""
    if not isinstance(norm, dict) or not {"markers", "values"} <= set(norm):
        raise PipelineError(f"{what} is not a normalization.json of stage 03 (no markers/values): cannot put the "
                            "labels into the run's units")
    pos = {m: i for i, m in enumerate(norm["markers"])}
    missing = [m for m in markers if m not in pos]
    if missing:
        raise PipelineError(f"{what} has no percentiles for the markers {missing[:5]}: cannot put their labels into "
                            "the run's units")
    lo, hi = (np.asarray([float(v[pos[m]]) for m in markers], np.float64) for v in norm["values"][:2])
    return lo, hi


def invert_normalization(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Raw means (N,K) that normalised labels ``values`` (N,K) in [0,1] came from, for percentiles ``lo``/``hi`` (K,):
    ``lo + v (hi - lo)``; ``lo`` where ``hi <= lo`` (the label is 0 whatever the raw mean). Exact only for
    0 < v < 1 (see the module docstring)."""
    span = hi - lo
    return np.where(span > 0, lo + values * np.where(span > 0, span, 0.0), lo)


def _inexact(values: np.ndarray, lo2: np.ndarray, hi2: np.ndarray, lo1: np.ndarray, hi1: np.ndarray) -> np.ndarray:
    """(N,K) width of the run-unit interval a clipped cohort label leaves open (0 where the inverse is exact)."""
    span1 = np.where(hi1 > lo1, hi1 - lo1, np.inf)
    low = np.clip((lo2 - lo1) / span1, 0, 1)         # a 0 label: run value in [0, low]
    high = np.clip((hi1 - hi2) / span1, 0, 1)         # a 1 label: run value in [1 - high, 1]
    width = np.where(values <= 0, low, 0.0) + np.where(values >= 1, high, 0.0)
    return np.where((hi2 > lo2)[None, :], width, np.where(hi1 > lo1, 1.0, 0.0)[None, :])


def _raw_rows(mdir: Path, slide: str, rows: np.ndarray, markers: Sequence[str]) -> tuple[np.ndarray | None, str]:
    """Raw means (n,K) of patches ``rows`` of ``slide`` from ``mdir/raw/{slide}.csv``, or (None, why not)."""
    path = mdir / RAW_SUBDIR / f"{slide}.csv"
    if not path.is_file():
        return None, f"no raw means {path}"
    try:
        df = load_raw(path, list(markers)).drop_duplicates("index").set_index("index")
    except PipelineError as e:
        return None, str(e)
    missing = np.setdiff1d(rows, df.index.to_numpy())
    if len(missing):
        return None, f"{path} lacks {len(missing)} labelled patches (e.g. index {int(missing[0])})"
    return df.loc[rows, list(markers)].to_numpy(np.float64), ""


def labels_in_run_units(ds: PatchDataset, markers_dir: str | os.PathLike, run_norm: dict | None,
                        cohort_norm: dict | None, markers: Sequence[str], checkpoint: str = "the checkpoint",
                        ) -> tuple[np.ndarray, dict[str, Any]]:
    """The labels of ``ds`` (N,K; columns ``markers`` of the label CSVs in ``markers_dir``, normalised with
    ``cohort_norm``) in the units of a run trained with ``run_norm``: ``(labels (N,K) float32 in [0,1], info)``.

    ``info`` (for ``summary.json``): ``mode`` (``"as labelled"``: the normalisations agree; ``"renormalised"``),
    ``run_normalization`` / ``cohort_normalization`` (where each came from), ``slides_from_raw``,
    ``slides_inverted`` (slide ids), ``inexact_labels``, ``inexact_fraction`` and ``max_inexact_width`` (see the
    module docstring). A checkpoint or cohort without a usable normalisation stops with one line.
    """
    mdir = Path(markers_dir)
    cohort_file = str(mdir / art.NORMALIZATION.name)
    if run_norm is None:
        raise PipelineError(f"{checkpoint} records no label normalisation (the original release?): cannot put the "
                            "external cohort's labels into its units; normalise that cohort with the training "
                            "cohort's file instead (stage 03 --normalization) and score it without --external-cohort")
    if cohort_norm is None:
        raise PipelineError(f"{cohort_file} does not exist: without the cohort's normalisation its labels cannot be "
                            "put into the run's units (run stage 03 on that cohort)")
    info: dict[str, Any] = {"run_normalization": f"stored in {checkpoint}", "cohort_normalization": cohort_file,
                            "slides_from_raw": [], "slides_inverted": [], "inexact_labels": 0,
                            "inexact_fraction": 0.0, "max_inexact_width": 0.0}
    y = np.asarray(ds.labels, np.float64)
    if not normalization_differences(run_norm, cohort_norm, markers):
        log.info("the labels in %s are normalised like the run's training labels: used as they are", mdir)
        return ds.labels, {**info, "mode": "as labelled"}
    lo1, hi1 = _bounds(run_norm, markers, f"the normalisation stored in {checkpoint}")
    lo2, hi2 = _bounds(cohort_norm, markers, cohort_file)
    run_rec, cohort_rec = {"values": [lo1, hi1]}, {"values": [lo2, hi2]}
    out = np.empty_like(y)
    widths = np.zeros_like(y)
    for k, slide in enumerate(ds.slides):
        sel = np.flatnonzero(ds.slide_idx == k)
        raw, why = _raw_rows(mdir, slide, ds.rows[sel], markers)
        if raw is not None:
            gap = float(np.nanmax(np.abs(apply_normalization(raw, cohort_rec) - y[sel]), initial=0.0))
            if gap > CONSISTENCY_TOL:
                raw, why = None, (f"its raw means give labels up to {gap:.3g} away from {mdir / slide}.csv with "
                                  f"{cohort_file} (redone after the labels?)")
        if raw is not None:
            out[sel] = apply_normalization(raw, run_rec)
            info["slides_from_raw"].append(slide)
            continue
        log.warning("%s: %s; its labels are put into the run's units by inverting %s (inexact where clipped)",
                    slide, why, cohort_file)
        out[sel] = apply_normalization(invert_normalization(y[sel], lo2, hi2), run_rec)
        widths[sel] = _inexact(y[sel], lo2, hi2, lo1, hi1)
        info["slides_inverted"].append(slide)
    n_inexact = int((widths > 0).sum())
    info |= {"mode": "renormalised", "inexact_labels": n_inexact,
             "inexact_fraction": float(n_inexact / widths.size) if widths.size else 0.0,
             "max_inexact_width": float(widths.max(initial=0.0))}
    log.info("labels of %d slides put into the run's units: %d from their raw means (exact), %d by inverting %s "
             "(%d of %d labels clipped there, only bounded: interval up to %.3g wide)",
             len(ds.slides), len(info["slides_from_raw"]), len(info["slides_inverted"]), cohort_file, n_inexact,
             widths.size, info["max_inexact_width"])
    return out.astype(np.float32), info


def training_labels_dir(checkpoint: str | os.PathLike) -> Path | None:
    """The label folder a run of ours was trained on (``--data``/``--markers-dir`` in the run's ``config.json``
    beside the checkpoint, or above ``checkpoints/``), resolved; None when unknown."""
    path = Path(checkpoint)
    cfg_path = (path.parent.parent if path.parent.name == "checkpoints" else path.parent) / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
        if not cfg.get("data"):
            return None
        return resolve_markers_dir(cfg["data"], cfg.get("markers_dir")).resolve()
    except (OSError, ValueError, AttributeError, TypeError):
        return None
