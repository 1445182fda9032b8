"""MICA data: per-patient (or per-slide) feature bags of the folds (the tables are read by :mod:`mica.clinical`).

Inputs (paths relative to the pipeline's ``OUT`` unless given explicitly):

* clinical CSV and split CSVs ``splits_{k}.csv``: see :mod:`mica.clinical` (re-exported here);
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

import logging
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from mica.bags import encoder_dirname
from mica.clinical import (  # noqa: F401 - re-exported: the tables' readers lived here
    ID_HINT,
    REQUIRED,
    SURVIVAL_COLUMNS,
    Unit,
    check_cohort_ids,
    check_split_files,
    fold_bins,
    make_units,
    patient_outcomes,
    read_clinical_table,
    read_fold,
    split_path,
)
from pipeline.errors import PipelineError

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
        self.path_dir = Path(features_dir) if features_dir else (
            Path(out) / "features" / encoder_dirname(encoder) if encoder and out is not None else None)
        self.codex_file = Path(codex_features) if codex_features else (
            Path(out) / "codex_features" / f"{encoder_dirname(codex_encoder)}.h5"
            if codex_encoder and out is not None else None)
        self._codex: dict[str, np.ndarray] = {}
        self.markers: list[str] | None = None

    # -- H&E ---------------------------------------------------------------------------------------------------
    def _files(self, slide: str) -> tuple[Path | None, Path | None]:
        assert self.path_dir is not None
        pt, h5 = self.path_dir / "pt_files" / f"{slide}.pt", self.path_dir / "h5_files" / f"{slide}.h5"
        return (pt if pt.is_file() else None), (h5 if h5.is_file() else None)

    def check_path(self, slides: list[str], clinical_src: str = "the clinical table") -> None:
        """Every slide has a pt or h5 bag, else one error naming the slides and the folder."""
        if self.path_dir is None:
            raise PipelineError("no H&E features folder: pass --encoder (with --out) or --features-dir")
        missing = [s for s in slides if self._files(s) == (None, None)]
        if missing:
            raise PipelineError(
                f"slides {missing[:10]} ({len(missing)} of {len(slides)}) of {clinical_src} and the split have no "
                f"H&E features in {self.path_dir}/pt_files or h5_files; run stage 07 (mica.extract_features) for them"
                f"{'' if self.path_dir.is_dir() else ' (the folder does not exist: another --encoder?)'}")

    def load_path(self, slide: str) -> tuple[torch.Tensor, np.ndarray]:
        """(N,Dp) float32 features and (N,2) int64 level-0 coords (-1 when only a pt file exists)."""
        pt, h5 = self._files(slide)
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
        _, h5 = self._files(slide) if self.path_dir is not None else (None, None)
        if h5 is None:
            return None
        with h5py.File(h5, "r") as f:
            v = f.attrs.get("patch_size_level0")
        return int(v) if v is not None else None

    # -- CODEX -------------------------------------------------------------------------------------------------
    def check_codex(self, slides: list[str]) -> None:
        """The CODEX file exists, its ``markers`` attr lists ``n_markers`` names, and every slide has an
        (n_markers, Dc) set; else one error naming the file and the slides (reads shapes only)."""
        f_path = self.codex_file
        if f_path is None:
            raise PipelineError("no CODEX features: pass --codex-encoder (with --out) or --codex-features")
        if not f_path.is_file():
            raise PipelineError(f"CODEX features file {f_path} does not exist; run stage 07 with this --codex-encoder")
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
                                    f"CODEX features in {f_path}; run stage 07 (CODEX features) for them")
            want = len(markers) if markers is not None else self.n_markers
            for s in slides:
                shape = f[s].shape
                if len(shape) != 2 or shape[0] != want:
                    raise PipelineError(f"CODEX features {f_path}: slide {s} has shape {shape}; expected ({want}, D) "
                                        f"(one row per marker, {want} markers)")

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


# ----------------------------------------------------------------------------------------------------------------
# synthetic bags (tests, smoke runs)


def write_synthetic_bags(root: str | os.PathLike, n_patients: int = 20, dim: int = 16, codex_dim: int = 8,
                         n_folds: int = 2, seed: int = 0, encoder: str = "synth", codex_encoder: str = "synth_codex",
                         two_slide_every: int = 5) -> dict[str, Any]:
    """A tiny cohort of feature bags with a planted signal, in the layouts this module reads.

    Patient p has risk ``r_p ~ U(0, 0.6)``; a fraction ``r_p`` of its patches are "planted" (feature 0 raised by 3),
    survival time ``60 exp(-5 r_p)`` months (x small noise), ~20% censored (earlier time), response = r_p above the
    median; CODEX token 3, feature 0 = 2 r_p. Every ``two_slide_every``-th patient has two slides. Writes
    ``root/clinical.csv``, ``root/splits/splits_{k}.csv`` (patient folds), ``root/features/{encoder}/pt_files`` +
    ``h5_files`` (with an extra ``planted`` (N,) dataset) and ``root/codex_features/{codex_encoder}.h5``.
    Returns ``{"planted": {slide: bool (N,)}, "risk": {case: r}}``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    fdir = root / "features" / encoder_dirname(encoder)
    (fdir / "pt_files").mkdir(parents=True, exist_ok=True)
    (fdir / "h5_files").mkdir(parents=True, exist_ok=True)
    (root / "codex_features").mkdir(parents=True, exist_ok=True)
    risk = rng.uniform(0, 0.6, n_patients)
    rows, planted, folds = [], {}, rng.permutation(n_patients) % n_folds
    t = 60 * np.exp(-5 * risk) * np.exp(rng.normal(0, 0.1, n_patients))
    cens = (rng.uniform(size=n_patients) < 0.2).astype(int)
    t = np.where(cens == 1, t * rng.uniform(0.5, 1.0, n_patients), t)
    markers = [f"M{i}" for i in range(N_MARKERS)]
    with h5py.File(root / "codex_features" / f"{encoder_dirname(codex_encoder)}.h5", "w") as fc:
        fc.attrs["markers"] = markers
        fc.attrs["encoder"] = codex_encoder
        for p in range(n_patients):
            for j in range(2 if two_slide_every and p % two_slide_every == 0 else 1):
                slide = f"s{p:03d}_{j}"
                n = int(rng.integers(30, 81))
                x = rng.normal(0, 1, (n, dim)).astype(np.float32)
                mask = rng.uniform(size=n) < risk[p]
                x[mask, 0] += 3.0
                side = int(np.ceil(np.sqrt(n)))
                coords = np.stack([np.arange(n) % side, np.arange(n) // side], 1).astype(np.int64) * 224
                torch.save(torch.from_numpy(x), fdir / "pt_files" / f"{slide}.pt")
                with h5py.File(fdir / "h5_files" / f"{slide}.h5", "w") as f:
                    f["features"], f["coords"], f["planted"] = x, coords, mask
                    f.attrs["patch_size_level0"] = 224
                    f.attrs["encoder"] = encoder
                c = rng.normal(0, 1, (N_MARKERS, codex_dim)).astype(np.float32)
                c[3, 0] = 2 * risk[p]
                fc[slide] = c
                planted[slide] = mask
                rows.append({"case_id": f"p{p:03d}", "slide_id": slide, "survival_months": round(float(t[p]), 3),
                             "censorship": int(cens[p]), "response": int(risk[p] > np.median(risk)),
                             "age": float(rng.normal(65, 8))})
    df = pd.DataFrame(rows)
    df.to_csv(root / "clinical.csv", index=False)
    (root / "splits").mkdir(exist_ok=True)
    for k in range(n_folds):
        val = [r["slide_id"] for r in rows if folds[int(r["case_id"][1:])] == k]
        train = [r["slide_id"] for r in rows if folds[int(r["case_id"][1:])] != k]
        n = max(len(train), len(val))
        pd.DataFrame({"train": train + [""] * (n - len(train)), "val": val + [""] * (n - len(val))}).to_csv(
            root / "splits" / f"splits_{k}.csv", index=False)
    return {"planted": planted, "risk": {f"p{p:03d}": float(risk[p]) for p in range(n_patients)}}
