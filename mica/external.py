"""Apply a trained MICA run to an independent cohort: every fold's model and the fold ensemble.

The independent cohort went through stages 01, 06 and 07 under its own output root (``EXTERNAL_OUT``) with the
same encoders as the run. Its slides come from its clinical table (``COHORT2/clinical.csv``: ``case_id``,
``slide_id`` and, when known, the outcome) or, without one, from its feature bags (each slide its own patient, no
outcome). :func:`apply_run` writes ``OUT/mica_runs/RUN/external/{name}/``:

- ``predictions.csv``: ``case_id, slides``, the outcome when known, ``risk`` = the ensemble (mean of the folds' raw
  risks, :mod:`mica.study.predictions`), ``risk_fold{k}`` per fold, ``risk_group`` (high/low at the training
  cohort's cut-off: the median of the ensemble's risk over the training cohort's patients); response: ``prob``
  (mean of the folds' probabilities), ``prob_fold{k}``;
- ``fold_predictions.csv``: one row per fold and patient with the fold model's discrete survival curve
  (``surv_k``), from which the report computes survival at its times.

Same encoders (:func:`check_same_encoders`): the done-records of stage 07 say what made each bag (H&E encoder,
its weights' sha256, input size, resize, normalisation; CODEX descriptor settings), and the stage-06 predictions
record the HEX checkpoint the virtual CODEX came from. Any difference between the run's own features and the
independent cohort's stops with one line naming it. A fold is only applied with inputs it can read: another
feature dimension stops too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import torch

from mica.checkpoint import load_fold_model, write_csv
from mica.clinical import Unit, make_units
from mica.dataset import BagDataset, FeatureSource
from mica.predict import patient_table, predict
from mica.study.predictions import RunTables, surv_columns
from pipeline import artifacts as art
from pipeline import done as done_mod
from pipeline.errors import PipelineError
from pipeline.tables import read_clinical_table

log = logging.getLogger(__name__)

HE_IDENTITY = ("encoder", "weights", "weights_sha256", "embed_dim", "input_size", "interpolation", "mean", "std")
"""Settings of an H&E bag's done-record that make the features what they are (region size and --mpp do not)."""


def _records(folder: Path | None, slides: Sequence[str]) -> dict[str, dict[str, Any]]:
    out = {}
    d = None if folder is None else folder / "done"
    for s in slides:
        p = None if d is None else d / f"{s}.json"
        if p is not None and p.is_file():
            try:
                out[s] = json.loads(p.read_text()).get("settings", {})
            except ValueError:
                continue
    return out


def _identities(recs: dict[str, dict[str, Any]], keys: Sequence[str] | None) -> dict[str, list[str]]:
    """{identity as JSON: slides}."""
    out: dict[str, list[str]] = {}
    for s, st in recs.items():
        ident = {k: st.get(k) for k in keys} if keys else dict(st)
        out.setdefault(json.dumps(ident, sort_keys=True), []).append(s)
    return out


def _hex_checkpoints(out: Path | None, slides: Sequence[str]) -> dict[str, list[str]]:
    """{HEX checkpoint sha256: slides} of the stage-06 predictions the virtual CODEX of ``slides`` came from."""
    found: dict[str, list[str]] = {}
    for s in slides:
        p = None if out is None else art.PREDICTIONS.path(out, s)
        if p is None or not p.is_file():
            continue
        sha = art.h5_attrs(p, "06 (hex.infer_wsi)").get("checkpoint_sha256")
        if sha is not None:
            found.setdefault(sha.decode() if isinstance(sha, bytes) else str(sha), []).append(s)
    return found


def _diff(a: dict[str, list[str]], b: dict[str, list[str]]) -> str:
    """What differs between an identity only the cohort has and one of the run's (``key: run -> cohort``)."""
    theirs = next(k for k in b if k not in a)
    mine = next(iter(a))
    try:
        old, new = json.loads(mine), json.loads(theirs)
    except ValueError:  # a bare value (a checkpoint sha256)
        return f"the run's {mine} vs the cohort's {theirs} ({len(b[theirs])} slides, e.g. {b[theirs][0]})"
    if not isinstance(old, dict) or not isinstance(new, dict):
        return f"the run's {mine} vs the cohort's {theirs}"
    return (f"{', '.join(done_mod.diff_settings(old, new))} ({len(b[theirs])} of its slides, e.g. "
            f"{b[theirs][0]})")


def check_same_encoders(run_source: FeatureSource, ext_source: FeatureSource, run_slides: Sequence[str],
                        ext_slides: Sequence[str], mode: str) -> list[str]:
    """Stop (one line) when the independent cohort's features were made otherwise than the run's; returns what was
    compared (for the report). A side without records of a kind (features made elsewhere) is a warning."""
    from mica.features.codex_features import parts_dir

    checked = []
    if mode in ("coattn", "path"):
        mine, theirs = run_source.bag_encoders(list(run_slides)), ext_source.bag_encoders(list(ext_slides))
        if mine and theirs and set(theirs) != set(mine):
            raise PipelineError(f"the independent cohort's H&E bags ({ext_source.path_dir}) were made by encoder "
                                f"{', '.join(sorted(theirs))}, the run's by {', '.join(sorted(mine))}; run stage 07 "
                                "on it with the run's encoder")
    if mode in ("coattn", "codex"):
        mine, theirs = run_source.codex_encoder(), ext_source.codex_encoder()
        if mine is not None and theirs is not None and mine != theirs:
            raise PipelineError(f"the independent cohort's CODEX features ({ext_source.codex_file}) were made by "
                                f"encoder {theirs}, the run's by {mine}; run stage 07 on it with the run's encoder")
    kinds = []
    if mode in ("coattn", "path"):
        kinds.append(("H&E bags", _identities(_records(run_source.path_dir, run_slides), HE_IDENTITY),
                      _identities(_records(ext_source.path_dir, ext_slides), HE_IDENTITY)))
    if mode in ("coattn", "codex"):
        enc = run_source.codex_encdir
        kinds.append(("CODEX features", _identities(_records(parts_dir(run_source.out, enc), run_slides), None),
                      _identities(_records(parts_dir(ext_source.out, ext_source.codex_encdir), ext_slides), None)))
        kinds.append(("virtual CODEX (HEX checkpoint sha256)", _hex_checkpoints(run_source.out, run_slides),
                      _hex_checkpoints(ext_source.out, ext_slides)))
    for what, mine, theirs in kinds:
        if not mine or not theirs:
            log.warning("%s: no records to compare on the %s side; make sure the independent cohort's features come "
                        "from the same encoder", what, "run's" if not mine else "independent cohort's")
            continue
        if set(theirs) - set(mine):
            raise PipelineError(f"the independent cohort's {what} were made otherwise than the run's: "
                                f"{_diff(mine, theirs)}; redo stage "
                                f"{'06 and 07' if 'HEX' in what else '07'} for it with the run's settings")
        checked.append(what)
    return checked


def external_units(clinical: pd.DataFrame | None, slides: Sequence[str]) -> list[Unit]:
    """Patients of the independent cohort: from its clinical table (every patient of ``slides``), or one per
    slide without a table."""
    if clinical is None:
        return [Unit(s, (s,)) for s in slides]
    return make_units([s for s in clinical.index if s in set(slides)], clinical, "patient")


def bag_slides(source: FeatureSource, mode: str) -> list[str]:
    """The slides that have features in ``source`` (H&E bags when the mode reads them, else CODEX tokens)."""
    if mode in ("coattn", "path"):
        d = source.path_dir
        if d is None or not d.is_dir():
            raise PipelineError(f"the independent cohort has no H&E features folder {d}: run stage 07 on it with the "
                                "run's encoder")
        names = {p.stem for sub in ("h5_files", "pt_files") for p in (d / sub).glob("*") if p.suffix in (".h5", ".pt")}
        return sorted(names)
    if source.codex_file is None or not source.codex_file.is_file():
        raise PipelineError(f"the independent cohort has no CODEX features file {source.codex_file}: run stages 06 "
                            "and 07 on it with the run's encoders")
    with h5py.File(source.codex_file, "r") as f:
        return sorted(k for k in f.keys() if isinstance(f[k], h5py.Dataset))


def read_external_clinical(cohort: Path | None, clinical_csv: Path | None, task: str) -> pd.DataFrame | None:
    """The independent cohort's clinical table (``--external-clinical``, else COHORT2/clinical.csv), or None."""
    path = clinical_csv or (cohort / "clinical.csv" if cohort is not None else None)
    if path is None or not Path(path).is_file():
        if clinical_csv is not None:
            raise PipelineError(f"{clinical_csv} does not exist; give the independent cohort's clinical CSV")
        return None
    try:
        return read_clinical_table(Path(path), task)
    except PipelineError as e:
        log.warning("%s: no usable %s outcome (%s); scoring without outcomes", path, task, e)
        table = read_clinical_table(Path(path), "patients")
        return table.drop(columns=[c for c in ("survival_months", "censorship", "response") if c in table])


def apply_run(run: RunTables, run_source: FeatureSource, ext_source: FeatureSource, clinical: pd.DataFrame | None,
              dest: Path, device: torch.device, workers: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every fold's model on the independent cohort -> (``predictions.csv``, ``fold_predictions.csv``) tables,
    written to ``dest``. Checks the encoders first (:func:`check_same_encoders`)."""
    task, mode = run.task, run.mode
    slides = bag_slides(ext_source, mode)
    units = external_units(clinical, slides)
    if not units:
        where = ext_source.path_dir if mode != "codex" else ext_source.codex_file
        raise PipelineError(f"no slide of the independent cohort has features in {where}"
                            f"{' and its clinical table' if clinical is not None else ''}; run stages 01, 06 and 07 "
                            "on it with the run's encoders")
    ext_slides = [s for u in units for s in u.slides]
    run_slides = list(dict.fromkeys(s for f in run.folds for t in (f.val, f.train)
                                    for ss in t["slides"] for s in str(ss).split(";")))
    if mode in ("coattn", "path"):
        ext_source.check_path(ext_slides, "the independent cohort")
    if mode in ("coattn", "codex"):
        ext_source.check_codex(ext_slides)
    check_same_encoders(run_source, ext_source, run_slides, ext_slides, mode)
    table = clinical if clinical is not None else pd.DataFrame(
        {"case_id": ext_slides, "slide_id": ext_slides}).set_index("slide_id", drop=False)
    ds = BagDataset(units, table, ext_source, None, mode in ("coattn", "path"), mode in ("coattn", "codex"))
    per_fold = []
    for f in run.folds:
        model, meta = load_fold_model(run.run_dir / f"fold_{f.fold}", device)
        pred, _ = predict(model, ds, device, task, workers, desc=f"fold {f.fold}")
        pt = patient_table(pred, task)
        pt.insert(0, "fold", f.fold)
        per_fold.append(pt)
    long = pd.concat(per_fold, ignore_index=True)
    key = "risk" if task == "survival" else "prob"
    wide = long.pivot(index="case_id", columns="fold", values=key)
    wide.columns = [f"{key}_fold{k}" for k in wide.columns]
    order = [u.case_id for u in units]
    wide = wide.loc[order]
    out = pd.DataFrame({"case_id": order, "slides": [";".join(u.slides) for u in units]})
    first = per_fold[0].set_index("case_id").loc[order]
    if task == "survival":
        if clinical is not None and "survival_months" in clinical:
            out["time"], out["censorship"] = first["time"].to_numpy(), first["censorship"].to_numpy()
        out["risk"] = wide.mean(axis=1).to_numpy()
        cut = training_cutoff(run)
        out["risk_group"] = np.where(out["risk"].to_numpy() > cut, "high", "low")
    else:
        if clinical is not None and "response" in clinical:
            out["response"] = first["response"].to_numpy()
        out["prob"] = wide.mean(axis=1).to_numpy()
    out = pd.concat([out, wide.reset_index(drop=True)], axis=1)
    dest.mkdir(parents=True, exist_ok=True)
    write_csv(out, dest / "predictions.csv")
    keep = ["fold", "case_id", key, *([] if task != "survival" else surv_columns(long)),
            *(["logit"] if task == "response" else [])]
    write_csv(long[keep], dest / "fold_predictions.csv")
    log.info("%s: %d patients of the independent cohort scored by %d folds -> %s", run.run, len(out),
             len(run.folds), dest / "predictions.csv")
    return out, long


def training_ensemble(run: RunTables) -> pd.DataFrame:
    """The fold ensemble on the training cohort: per patient the mean over folds of each fold model's raw risk
    (or probability / logit) of it (every fold's model scores every patient: its train and val sides)."""
    key = "risk" if run.task == "survival" else "prob"
    parts = [pd.concat([f.val, f.train])[["case_id", key, *(["logit"] if run.task == "response" else [])]]
             for f in run.folds]
    return pd.concat(parts).groupby("case_id", sort=False).mean(numeric_only=True).reset_index()


def training_cutoff(run: RunTables) -> float:
    """High/low cut-off of the ensemble: the median of its risk over the training cohort's patients."""
    return float(np.median(training_ensemble(run)["risk"].to_numpy(float)))
