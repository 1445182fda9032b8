"""Stage 09's explanations: Integrated Gradients of every validation unit of a fold, written per slide with a
done-record, and the cohort's mean attribution per marker (used by :mod:`mica.test`).

Outputs in ``OUT/mica_runs/RUN/ig/`` (the registry's ``ATTRIBUTIONS``): ``{slide}.h5``
(:func:`mica.attribution.integrated_gradients.write_ig_h5`), ``{slide}_heatmap.png``, ``done/{slide}.json`` (settings
:func:`ig_settings`, input the fold's ``checkpoint.safetensors``), and ``codex_attribution.csv`` +
``codex_attribution_bar.png``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from mica import plots
from mica.checkpoint import write_csv as _write_csv
from mica.dataset import BagDataset, FeatureSource
from mica.features.done_records import check_outside
from mica.features.he_bags import bag_files
from pipeline import artifacts as art
from pipeline import done as done_mod
from pipeline.errors import PipelineError
from pipeline.io import remove_outputs
from pipeline.runner import StageReport

log = logging.getLogger("mica.test")


def _thumbnail(inputs: Any, slide: str, size: int) -> tuple[np.ndarray | None, float | None]:
    path = inputs.he_path(slide)
    if path is None:
        return None, None
    try:
        from preprocess.slide_io import HESlide

        with HESlide(path) as s:
            return s.thumbnail(size)
    except Exception as e:  # noqa: BLE001 - a thumbnail is decoration: fall back to a blank canvas
        log.warning("no thumbnail for %s (%s); heatmap on a blank canvas", slide, e)
        return None, None


def _patch_size(source: FeatureSource, slide: str, coords: np.ndarray) -> int:
    ps = source.patch_size_level0(slide) if source.path_dir is not None else None
    if ps:
        return ps
    d = np.diff(np.unique(coords[:, 0])) if len(coords) else np.array([])
    return int(d[d > 0].min()) if (d > 0).any() else 224


IG_SCHEMA = art.ATTRIBUTIONS.schema


@dataclass(frozen=True)
class IGOptions:
    """How IG runs (``mica.test``'s ``--ig-*`` flags): integration ``steps``, ``baseline`` (zero or mean), captum's
    internal ``batch`` (0 = from the bag size), ``limit`` (first N validation units per fold, 0 = all), the heatmap
    ``thumbnail_size`` (px), and ``overwrite`` (redo done slides)."""

    steps: int = 50
    baseline: str = "zero"
    batch: int = 0
    limit: int = 0
    thumbnail_size: int = 1024
    overwrite: bool = False


def ig_settings(steps: int, baseline: str, task: str, mode: str) -> dict[str, Any]:
    """What an IG file depends on besides its fold's checkpoint (``--ig-batch`` only changes the batching)."""
    return {"steps": steps, "baseline": baseline, "target": "risk" if task == "survival" else "logit",
            "task": task, "mode": mode}


def _ig_inputs(slide: str, checkpoint: Path, bags: Path | None, codex_parts: Path | None,
               codex: Path | None) -> dict[str, Path]:
    """The fold's model and the slide's inputs it is explained on, so rebuilt bags or CODEX tokens make its IG
    stale: the slide's own CODEX part file when there is one (rewritten only when stage 07 redoes that slide; the
    gathered table is rewritten by every stage-07 run), else the table."""
    roles = {"checkpoint": checkpoint}
    if bags is not None:
        roles["bag"] = Path(os.path.abspath(bag_files(bags, slide)[0]))
    part = codex_parts / art.CODEX_FEATURES.name.format(slide=slide) if codex_parts is not None else None
    if part is not None and part.is_file():
        roles["codex_tokens"] = Path(os.path.abspath(part))
    elif codex is not None:
        roles["codex_tokens"] = Path(os.path.abspath(codex))
    return roles


def _codex_parts(source: FeatureSource | None) -> Path | None:
    """The folder of the per-slide CODEX parts behind ``source``'s table (None for a table given explicitly)."""
    if source is None or source.out is None or source.codex_encdir is None or source.codex_file is None:
        return None
    parts = art.CODEX_FEATURES.dir(source.out, encoder=source.codex_encdir)
    return parts if source.codex_file == art.CODEX_FEATURE_TABLE.path(source.out, encoder=source.codex_encdir) else None


def _ig_outputs(slide: str, ig_dir: Path) -> list[Path]:
    return [ig_dir / f"{slide}.h5"]


def ig_spec(out: Path, run: str, fold: int, settings: dict[str, Any], source: FeatureSource | None = None
            ) -> done_mod.DoneSpec:
    """The done-spec of the IG files of run ``run``'s fold ``fold``'s validation slides (records in ``ig/done/``);
    its inputs are the fold's checkpoint and, with ``source``, the slide's H&E bag and CODEX tokens
    (:func:`_ig_inputs`)."""
    ig_dir = art.ATTRIBUTIONS.dir(out, run=run)
    ckpt = Path(os.path.abspath(art.MICA_RUN.dir(out, run=run) / f"fold_{fold}" / "checkpoint.safetensors"))
    return done_mod.DoneSpec(ig_dir, settings, IG_SCHEMA, inputs=functools.partial(
                                 _ig_inputs, checkpoint=ckpt, bags=source.path_dir if source is not None else None,
                                 codex_parts=_codex_parts(source), codex=source.codex_file if source else None),
                             outputs=functools.partial(_ig_outputs, ig_dir=ig_dir))


def check_ig(out: Path, run: str, val_slides: dict[int, list[str]], settings: dict[str, Any],
             overwrite: bool, source: FeatureSource | None = None) -> None:
    """Before any work: IG files of these folds' validation slides (or of others in ``ig/``) made with other
    settings stop the run (the rules of :mod:`mica.features.done_records`)."""
    conflicts: dict[str, str] = {}
    if not overwrite:
        for k, slides in val_slides.items():
            conflicts |= done_mod.conflicts(ig_spec(out, run, k, settings, source), slides)
    if conflicts:
        raise done_mod.conflict_error(conflicts, "IG")
    if val_slides:
        every = [s for ss in val_slides.values() for s in ss]
        check_outside(ig_spec(out, run, next(iter(val_slides)), settings, source), every, overwrite, "IG")


def run_ig(model: torch.nn.Module, meta: dict[str, Any], val_ds: BagDataset, fold: int, spec: done_mod.DoneSpec,
           inputs: Any, opts: IGOptions, device: torch.device,
           report: StageReport | None = None) -> list[dict]:
    """IG for every item of ``val_ds`` not done with ``spec``: per-slide h5 + heatmap + done-record; returns
    per-slide summary rows. A unit that fails is recorded in ``report`` (``failed``) and the next one goes on.
    ``inputs``: a :class:`mica.test.RunInputs` (``task``, ``mode``, ``he_path(slide)`` for thumbnails)."""
    from mica.attribution.integrated_gradients import integrated_gradients, read_ig_h5, split_to_slides, write_ig_h5

    report = report if report is not None else StageReport()
    ig_dir = Path(spec.folder)
    rows, markers = [], meta.get("markers") or val_ds.source.markers or [f"marker_{i}" for i in range(40)]
    target = spec.settings["target"]
    n = len(val_ds) if not opts.limit else min(len(val_ds), opts.limit)
    for i in tqdm(range(n), desc=f"IG fold {fold}", leave=False):
        unit = val_ds.units[i]
        states = [done_mod.check(spec, s) for s in unit.slides]
        if not opts.overwrite and all(st.state == "done" for st in states):
            old = [read_ig_h5(ig_dir / f"{s}.h5")["attrs"] for s in unit.slides]
            rows += [{"slide": s, **{k: a[k] for k in ("case_id", "fold", "f_x", "f_baseline", "delta_abs",
                                                       "delta")}} for s, a in zip(unit.slides, old)]
            report.skipped += list(unit.slides)
            continue
        for s, st in zip(unit.slides, states):
            if st.state == "redo" and st.reason != "not done":
                log.info("IG %s: %s", s, st.reason)
            done_mod.clear(spec, s)
            remove_outputs([ig_dir / f"{s}.h5", ig_dir / f"{s}_heatmap.png"])
        stamps = {s: {k: done_mod.file_stamp(v) for k, v in spec.inputs(s).items()} for s in unit.slides}
        try:
            item = val_ds[i]
            res = integrated_gradients(model, item, inputs.task, inputs.mode, opts.steps, opts.baseline,
                                       opts.batch or None, device)
            if np.isfinite(res["delta"]) and res["delta"] > 0.05 and res["delta_abs"] > 1e-3:
                log.warning("%s: IG completeness off by %.1f%% of f(x)-f(baseline) (raise --ig-steps)",
                            unit.case_id, 100 * res["delta"])
            for slide, a in split_to_slides(res, item, len(markers)).items():
                attrs = {"baseline": opts.baseline, "steps": opts.steps, "delta": res["delta"],
                         "delta_abs": res["delta_abs"], "f_x": res["f_x"], "f_baseline": res["f_baseline"],
                         "target": target, "markers": list(markers), "case_id": unit.case_id, "fold": fold,
                         "slides_of_patient": list(unit.slides), "checkpoint": str(spec.inputs(slide)["checkpoint"])}
                write_ig_h5(ig_dir / f"{slide}.h5", a["coords"], a["path_attr"], a["codex_attr"], attrs)
                if len(a["path_attr"]) and (a["coords"] >= 0).all():
                    thumb, ds = _thumbnail(inputs, slide, opts.thumbnail_size)
                    plots.heatmap_plot(a["coords"], a["path_attr"], ig_dir / f"{slide}_heatmap.png",
                                       _patch_size(val_ds.source, slide, a["coords"]), thumb, ds,
                                       title=f"{slide} ({target}; fold {fold})")
                done_mod.write_record(spec, slide, stamps[slide])
                report.done.append(slide)
                rows.append({"slide": slide, "case_id": unit.case_id, "fold": fold, "f_x": res["f_x"],
                             "f_baseline": res["f_baseline"], "delta_abs": res["delta_abs"], "delta": res["delta"]})
        except Exception as e:  # noqa: BLE001 - recorded per unit; the other units go on
            why = str(e) if isinstance(e, PipelineError) else f"{type(e).__name__}: {e}"
            (log.error if isinstance(e, PipelineError) else log.exception)("IG %s failed: %s", unit.case_id, why)
            for s in unit.slides:
                if s in report.done:
                    report.done.remove(s)
                    rows = [r for r in rows if r["slide"] != s]
                report.failed[s] = why
                remove_outputs([ig_dir / f"{s}.h5", ig_dir / f"{s}_heatmap.png"])
                with contextlib.suppress(OSError):
                    done_mod.write_failure(spec, s, why)
    return rows


def cohort_marker_attribution(ig_dir: Path, slides: Sequence[str]) -> pd.DataFrame | None:
    """Mean / sd / mean |.| of ``codex_attr`` per marker over ``slides``; CSV + bar PNG in ``ig_dir``."""
    from mica.attribution.integrated_gradients import read_ig_h5

    arrs, markers = [], None
    for s in slides:
        d = read_ig_h5(ig_dir / f"{s}.h5")
        if np.isfinite(d["codex_attr"]).all():
            arrs.append(d["codex_attr"])
            markers = d["attrs"]["markers"]
    if not arrs:
        return None
    a = np.stack(arrs)
    df = pd.DataFrame({"marker": markers, "mean": a.mean(0), "sd": a.std(0, ddof=1) if len(a) > 1 else 0.0,
                       "mean_abs": np.abs(a).mean(0), "n_slides": len(a)})
    _write_csv(df, ig_dir / "codex_attribution.csv")
    plots.marker_bar_plot(list(markers), df["mean"].to_numpy(), df["sd"].to_numpy(),
                          ig_dir / "codex_attribution_bar.png")
    return df
