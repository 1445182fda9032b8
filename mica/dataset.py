"""MICA data: per-patient (or per-slide) feature bags of the folds (the tables are read by :mod:`pipeline.tables`).

Inputs (paths relative to the pipeline's ``OUT`` unless given explicitly):

* clinical CSV and split CSVs ``splits_{k}.csv``: see :mod:`pipeline.tables` (units, bins: :mod:`mica.clinical`);
* H&E bags ``features/{encdir}/pt_files/{slide}.pt`` ((N,Dp) float32 tensor) or ``h5_files/{slide}.h5``
  (``features`` (N,Dp), ``coords`` (N,2) level-0 top-left); coordinates always come from the h5 file when present;
* CODEX tokens ``codex_features/{codex_encdir}.h5``: one (40,Dc) dataset per slide, file attr ``markers``.

Units: ``--unit patient`` (default, the original's): one item per patient, the bags of its slides concatenated in
slide order and its CODEX token sets AVERAGED over slides (element-wise mean of the (40,Dc) arrays: simple, and the
model keeps exactly 40 tokens; ``slide_sizes`` lets attributions be split back to slides). ``--unit slide``: one
item per slide carrying its patient's outcome; metrics then average the slide risks of a patient.

Survival bins: 4 quartile bins of the TRAINING fold's uncensored patient times (``mica.survival.hazard_bins``);
``bins_from="cohort"`` uses every patient of the clinical table instead, as the original did.

Every bad input stops with one :class:`PipelineError` naming it: a split slide missing from the clinical table (or
from the cohort's slides), a patient on both sides of a split, slides of the splits without features (all folds at
once: :func:`check_fold_inputs`), a CODEX set whose row count is not 40 or not the length of its ``markers``
attribute.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from mica.clinical import Unit, check_cohort_ids, check_split_files, fold_bins, make_units, patient_outcomes, split_path
from mica.features.codex_features import STAGE_06, combined_path, find_maps, map_path, parts_dir
from mica.features.he_bags import bag_files, encoder_dirname
from mica.features.he_bags import features_dir as he_features_dir
from pipeline import artifacts as art
from pipeline import done as done_mod
from pipeline.errors import PipelineError
from pipeline.tables import read_fold

log = logging.getLogger(__name__)

N_MARKERS = 40


# ----------------------------------------------------------------------------------------------------------------
# feature files


class FeatureSource:
    """Where the bags of a run live; checks and loads them.

    Args:
        out: pipeline output root (``OUT``).
        encoder: H&E encoder name (folder ``features/{encoder_dirname(encoder)}``) or None (CODEX-only runs).
        codex_encoder: CODEX encoder name (file ``codex_features/{encoder_dirname(codex_encoder)}.h5``) or None.
        features_dir: explicit H&E features folder (holding ``pt_files/`` and/or ``h5_files/``), overrides encoder.
        codex_features: explicit CODEX features .h5 file, overrides codex_encoder.
        n_markers: expected tokens per slide (40 HEX markers).
    """

    def __init__(self, out: str | os.PathLike | None, encoder: str | None = None, codex_encoder: str | None = None,
                 features_dir: str | os.PathLike | None = None, codex_features: str | os.PathLike | None = None,
                 n_markers: int = N_MARKERS):
        self.n_markers = n_markers
        self.out = Path(out) if out is not None else None
        self.path_dir = Path(features_dir) if features_dir else (
            he_features_dir(out, encoder) if encoder and out is not None else None)
        self.codex_encdir = encoder_dirname(codex_encoder) if codex_encoder else None
        self.codex_file = Path(codex_features) if codex_features else (
            combined_path(out, self.codex_encdir) if self.codex_encdir and out is not None else None)
        self._codex: dict[str, np.ndarray] = {}
        self.markers: list[str] | None = None

    # -- H&E ---------------------------------------------------------------------------------------------------
    def files(self, slide: str) -> tuple[Path | None, Path | None]:
        """(pt, h5) bag files of ``slide`` that exist (None for a missing one)."""
        assert self.path_dir is not None
        h5, pt = bag_files(self.path_dir, slide)
        return (pt if pt.is_file() else None), (h5 if h5.is_file() else None)

    def _he_upstream(self, missing: list[str]) -> str:
        """What to run for slides without bags: stage 07, or stage 01 first when their grid is missing too, or the
        reason stage 07 recorded when it failed for them."""
        failed = {s: why for s in missing if (why := done_mod.read_failure(self.path_dir, s))}
        if failed:
            s = next(iter(failed))
            return (f"; stage 07 failed for {len(failed)} of them ({s}: {failed[s]}): fix that and rerun stage 07 "
                    "(mica.extract_features)")
        no_grid = [s for s in missing if self.out is not None and not art.PATCH_GRID.path(self.out, s).is_file()]
        if no_grid:
            return (f"; their patch grids are missing too ({art.PATCH_GRID.path(self.out, no_grid[0])}, "
                    f"{len(no_grid)} slides): run stage 01 (preprocess.patch), then stage 07 (mica.extract_features) "
                    "for them")
        return "; run stage 07 (mica.extract_features) for them"

    def check_path(self, slides: list[str], clinical_src: str = "the clinical table") -> None:
        """Every slide has a pt or h5 bag, else one error naming the slides, the folder and the stage that makes the
        missing input; the h5 bags record one encoder (attr ``encoder``), else one error naming both."""
        if self.path_dir is None:
            raise PipelineError("no H&E features folder: pass --encoder (with --out) or --features-dir")
        missing = [s for s in slides if self.files(s) == (None, None)]
        if missing:
            raise PipelineError(
                f"slides {missing[:10]} ({len(missing)} of {len(slides)}) of {clinical_src} and the split have no "
                f"H&E features in {self.path_dir}/pt_files or h5_files{self._he_upstream(missing)}"
                f"{'' if self.path_dir.is_dir() else ' (the folder does not exist: another --encoder?)'}")
        encoders = self.bag_encoders(slides)
        if len(encoders) > 1:
            each = "; ".join(f"{e!r} ({', '.join(ss[:3])}{', ...' if len(ss) > 3 else ''}: {len(ss)} slides)"
                             for e, ss in encoders.items())
            raise PipelineError(f"the H&E feature bags in {self.path_dir} were made by {len(encoders)} encoders: "
                                f"{each}; redo the folder's bags with one encoder (stage 07 --overwrite) or keep each "
                                "encoder's bags in its own folder (--encoder, --features-dir)")

    def bag_encoders(self, slides: list[str]) -> dict[str, list[str]]:
        """{encoder: slides} as the h5 bags of ``slides`` record it (attr ``encoder``; bags without it left out)."""
        out: dict[str, list[str]] = {}
        for s in slides:
            _, h5 = self.files(s)
            if h5 is None:
                continue
            with h5py.File(h5, "r") as f:
                enc = f.attrs.get("encoder")
            if enc is not None:
                out.setdefault(enc.decode() if isinstance(enc, bytes) else str(enc), []).append(s)
        return out

    def load_path(self, slide: str) -> tuple[torch.Tensor, np.ndarray]:
        """(N,Dp) float32 features and (N,2) int64 level-0 coords (-1 when only a pt file exists)."""
        pt, h5 = self.files(slide)
        coords = None
        if h5 is not None:
            with h5py.File(h5, "r") as f:
                if "coords" in f:
                    coords = np.asarray(f["coords"][:], dtype=np.int64)
                feats = None if pt is not None else torch.from_numpy(np.asarray(f["features"][:], dtype=np.float32))
        if pt is not None:
            feats = torch.load(pt, map_location="cpu", weights_only=True)
            if not isinstance(feats, torch.Tensor):
                raise PipelineError(f"{pt} holds a {type(feats).__name__}, not an (N,D) tensor")
            feats = feats.float()
        if feats.ndim != 2:
            raise PipelineError(f"H&E features of slide {slide} in {self.path_dir} have shape {tuple(feats.shape)}, "
                                "not (N,D)")
        if coords is None or len(coords) != len(feats):
            coords = np.full((len(feats), 2), -1, dtype=np.int64)
        return feats, coords

    def patch_size_level0(self, slide: str) -> int | None:
        """Patch side in level-0 px from the h5 bag's attrs (None when unknown)."""
        _, h5 = self.files(slide) if self.path_dir is not None else (None, None)
        if h5 is None:
            return None
        with h5py.File(h5, "r") as f:
            v = f.attrs.get("patch_size_level0")
        return int(v) if v is not None else None

    # -- CODEX -------------------------------------------------------------------------------------------------
    def _codex_upstream(self, missing: list[str]) -> str:
        """What to run for slides without CODEX features: stage 07, or stage 06 first when their virtual CODEX map
        is missing too, or the reason stage 07 recorded when it failed for them."""
        if self.out is None or self.codex_encdir is None:
            return "; run stage 07 (CODEX features) for them"
        parts = parts_dir(self.out, self.codex_encdir)
        failed = {s: why for s in missing if (why := done_mod.read_failure(parts, s))}
        no_map = [s for s in missing if not map_path(self.out, s).is_file()]
        if no_map:
            return (f"; their virtual CODEX maps are missing too ({map_path(self.out, no_map[0])}, {len(no_map)} "
                    f"slides): run {STAGE_06} for them, then stage 07 (CODEX features)")
        if failed:
            s = next(iter(failed))
            return f"; stage 07 failed for {len(failed)} of them ({s}: {failed[s]}): fix that and rerun stage 07"
        return "; run stage 07 (CODEX features) for them"

    def check_codex(self, slides: list[str]) -> None:
        """The CODEX file exists, its ``markers`` attr lists ``n_markers`` names, and every slide has an
        (n_markers, Dc) set; else one error naming the file, the slides and the stage that makes the missing input
        (reads shapes only)."""
        f_path = self.codex_file
        if f_path is None:
            raise PipelineError("no CODEX features: pass --codex-encoder (with --out) or --codex-features")
        if not f_path.is_file():
            hint = ""
            if self.out is not None and not find_maps(self.out):
                hint = f" ({art.VIRTUAL_CODEX.dir(self.out)} holds no virtual CODEX maps either: run {STAGE_06} first)"
            raise PipelineError(f"CODEX features file {f_path} does not exist; run stage 07 with this --codex-encoder"
                                f"{hint}")
        try:
            f = h5py.File(f_path, "r")
        except OSError as e:
            raise PipelineError(f"cannot read the CODEX features file {f_path} ({e}); rerun stage 07") from None
        with f:
            markers = f.attrs.get("markers")
            markers = [m.decode() if isinstance(m, bytes) else str(m) for m in markers] if markers is not None else None
            if markers is not None and len(markers) != self.n_markers:
                raise PipelineError(f"CODEX features {f_path}: attr 'markers' lists {len(markers)} markers, expected "
                                    f"{self.n_markers} (one token per HEX marker)")
            self.markers = markers
            missing = [s for s in slides if s not in f]
            if missing:
                raise PipelineError(f"slides {missing[:10]} ({len(missing)} of {len(slides)}) of the split have no "
                                    f"CODEX features in {f_path}{self._codex_upstream(missing)}")
            want = len(markers) if markers is not None else self.n_markers
            for s in slides:
                shape = f[s].shape
                if len(shape) != 2 or shape[0] != want:
                    raise PipelineError(f"CODEX features {f_path}: slide {s} has shape {shape}; expected ({want}, D) "
                                        f"(one row per marker, {want} markers)")

    def codex_encoder(self) -> str | None:
        """The encoder the CODEX features file records (attr ``encoder``), or None."""
        with h5py.File(self.codex_file, "r") as f:
            enc = f.attrs.get("encoder")
        return None if enc is None else (enc.decode() if isinstance(enc, bytes) else str(enc))

    def codex_digests(self, slides: list[str]) -> dict[str, str]:
        """{slide: sha256 of its (n_markers, Dc) float32 token set}: what the model saw, whatever file holds it."""
        with h5py.File(self.codex_file, "r") as f:
            return {s: hashlib.sha256(np.ascontiguousarray(f[s][:], np.float32).tobytes()).hexdigest()
                    for s in slides}

    def load_codex(self, slides: list[str]) -> None:
        """Read and check the (n_markers, Dc) token sets of ``slides`` (kept in memory: 40 x Dc per slide)."""
        self.check_codex(slides)
        with h5py.File(self.codex_file, "r") as f:
            for s in slides:
                self._codex[s] = np.asarray(f[s][:], dtype=np.float32)

    def codex(self, slide: str) -> np.ndarray:
        return self._codex[slide]


# ----------------------------------------------------------------------------------------------------------------
# dataset


class BagDataset(Dataset):
    """Items for MICA: one dict per unit (patient or slide).

    Keys: ``path`` (N,Dp) float32 tensor (N = patches of all the unit's slides) or None, ``codex`` (40,Dc) float32
    tensor or None, ``codex_slides`` (S,40,Dc) (the per-slide sets averaged into ``codex``), ``coords`` (N,2) int64,
    ``slides`` list, ``slide_sizes`` list of N_s, ``case_id``, ``y_bin`` long (-1 without survival), ``censorship``
    float, ``time`` float months, ``response`` float (NaN when absent).
    """

    def __init__(self, units: list[Unit], clinical: pd.DataFrame, source: FeatureSource, edges: np.ndarray | None,
                 use_path: bool = True, use_codex: bool = True):
        self.units, self.clinical, self.source = units, clinical, source
        self.edges = edges
        self.use_path, self.use_codex = use_path, use_codex
        slides = [s for u in units for s in u.slides]
        src = clinical.attrs.get("path", "the clinical table")
        if use_path:
            source.check_path(slides, src)
        if use_codex:
            source.load_codex(slides)
        pt = patient_outcomes(clinical, [u.case_id for u in units])
        self.time = np.array([pt.at[u.case_id, "survival_months"] if "survival_months" in pt else np.nan
                              for u in units], dtype=np.float64)
        self.censorship = np.array([pt.at[u.case_id, "censorship"] if "censorship" in pt else np.nan
                                    for u in units], dtype=np.float64)
        self.response = np.array([pt.at[u.case_id, "response"] if "response" in pt else np.nan for u in units],
                                 dtype=np.float64)
        if edges is not None and np.isfinite(self.time).all():
            from mica.survival import to_bins

            self.y_bin = np.asarray(to_bins(self.time, edges), dtype=np.int64)
        else:
            self.y_bin = np.full(len(units), -1, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, i: int) -> dict[str, Any]:
        u = self.units[i]
        path = coords = None
        sizes = [0] * len(u.slides)
        if self.use_path:
            parts = [self.source.load_path(s) for s in u.slides]
            dims = {p[0].shape[1] for p in parts}
            if len(dims) > 1:
                raise PipelineError(f"patient {u.case_id}: slides {list(u.slides)} have H&E features of different "
                                    f"dimensions {sorted(dims)} in {self.source.path_dir}")
            sizes = [len(p[0]) for p in parts]
            if sum(sizes) == 0:
                raise PipelineError(f"slides {list(u.slides)} of patient {u.case_id} have empty H&E bags (0 patches) "
                                    f"in {self.source.path_dir}; drop them from the split or re-run stages 01/07")
            path = torch.cat([p[0] for p in parts])
            coords = np.concatenate([p[1] for p in parts])
        codex = codex_slides = None
        if self.use_codex:
            codex_slides = torch.from_numpy(np.stack([self.source.codex(s) for s in u.slides]))
            codex = codex_slides.mean(0)
        return {"path": path, "codex": codex, "codex_slides": codex_slides, "coords": coords,
                "slides": list(u.slides), "slide_sizes": sizes, "case_id": u.case_id,
                "y_bin": torch.tensor(int(self.y_bin[i])), "censorship": torch.tensor(float(self.censorship[i])),
                "time": torch.tensor(float(self.time[i])), "response": torch.tensor(float(self.response[i]))}

    def feature_sample(self, per_bag: int = 256, seed: int = 0) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Training data for input standardisation: up to ``per_bag`` random patches of every unit's H&E bag,
        pooled (M,Dp), and every unit's CODEX token set (U,T,Dc) (None for an input the dataset does not use)."""
        rng = np.random.default_rng(seed)
        path = None
        if self.use_path:
            parts = []
            for u in self.units:
                x = torch.cat([self.source.load_path(s)[0] for s in u.slides])
                parts.append(x[torch.from_numpy(rng.permutation(len(x))[:per_bag])] if len(x) > per_bag else x)
            path = torch.cat(parts)
        codex = None
        if self.use_codex:
            codex = torch.from_numpy(np.stack([np.mean([self.source.codex(s) for s in u.slides], axis=0)
                                               for u in self.units]))
        return path, codex


def build_fold(clinical: pd.DataFrame, split_csv: str | os.PathLike, source: FeatureSource, unit: str = "patient",
               mode: str = "coattn", task: str = "survival", n_bins: int = 4, bins_from: str = "train",
               edges: np.ndarray | None = None) -> tuple[BagDataset, BagDataset, np.ndarray | None]:
    """Train and val datasets of one split file (+ the bin edges; given ``edges`` are reused, e.g. at test time).

    ``task="response"`` drops units without a response value (warning).
    """
    split = read_fold(split_csv, clinical)
    if task == "survival" and edges is None:
        edges = fold_bins(clinical, split["train"], n_bins, bins_from)
    use_path, use_codex = mode in ("coattn", "path"), mode in ("coattn", "codex")
    out = []
    for col in ("train", "val"):
        units = make_units(split[col], clinical, unit)
        if task == "response":
            resp = patient_outcomes(clinical, [u.case_id for u in units])["response"]
            keep = [u for u in units if not np.isnan(resp[u.case_id])]
            if len(keep) < len(units):
                log.warning("%s %s: %d units without a response value dropped", split_csv, col, len(units) - len(keep))
            units = keep
        if not units:
            raise PipelineError(f"split file {split_csv}: column {col!r} has no usable {unit}s for task {task}")
        out.append(BagDataset(units, clinical, source, edges, use_path, use_codex))
    return out[0], out[1], edges


def check_fold_inputs(clinical: pd.DataFrame, splits_dir: str | os.PathLike, folds: list[int], source: FeatureSource,
                      mode: str = "coattn", cohort: str | os.PathLike | None = None) -> dict[int, dict[str, list[str]]]:
    """Every input of every fold, before the first fold is trained or scored: the split files (readable, ids in the
    clinical table and, when ``cohort`` holds slides, among them; no patient on both sides) and the features of all
    their slides. Returns {fold: {"train": [...], "val": [...]}}; raises one :class:`PipelineError` line."""
    check_split_files(splits_dir, folds)
    splits = {k: read_fold(split_path(splits_dir, k), clinical) for k in folds}
    slides = list(dict.fromkeys(s for sp in splits.values() for col in sp.values() for s in col))
    check_cohort_ids(cohort, slides, f"the split files of {splits_dir}")
    src = clinical.attrs.get("path", "the clinical table")
    if mode in ("coattn", "path"):
        source.check_path(slides, src)
    if mode in ("coattn", "codex"):
        source.check_codex(slides)
    return splits
