"""Stage 07, CODEX side: virtual CODEX maps in, one feature part per slide out, the combined table, the drivers.

Inputs (the registry's ``VIRTUAL_CODEX``, stage 06): ``OUT/virtual_codex/{slide}.npy`` (H', W', C) P99-normalised,
``{slide}_mask.png`` (255 = tissue) and ``{slide}.json`` (``markers``). Outputs (``CODEX_FEATURES`` and
``CODEX_FEATURE_TABLE``)::

    OUT/codex_features/{encdir}/{slide}.h5        per-slide part: features (C, D') float32 (the resumable unit)
    OUT/codex_features/{encdir}/done/{slide}.json what it was made with (:mod:`mica.features.done_records`)
    OUT/codex_features/{encdir}.h5                one (C, D') dataset per slide, rebuilt from the parts done with
                                                  this run's settings (:func:`assemble`)

A slide of the run without a map fails with one line naming the missing file and stage 06. The encoders themselves
(stats descriptors, channel images for DINOv2) are in :mod:`mica.features.codex_encoders`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mica.features import codex_encoders as ce
from pipeline import artifacts as art
from pipeline import done as done_mod
from pipeline.errors import PipelineError
from pipeline.io import atomic_path
from pipeline.runner import StageReport, plan_slides

log = logging.getLogger(__name__)

PART_SCHEMA = art.CODEX_FEATURES.schema
TABLE_SCHEMA = art.CODEX_FEATURE_TABLE.schema
STAGE_06 = "stage 06 (scripts/06_infer_wsi.sh: hex.infer_wsi, then hex.virtual_codex)"


# ----------------------------------------------------------------------------------------------------------------
# inputs: OUT/virtual_codex/{slide}.npy (+ {slide}_mask.png, {slide}.json), stage 06


def map_path(out: str | os.PathLike, slide: str) -> Path:
    """``OUT/virtual_codex/{slide}.npy``: the virtual CODEX map of one slide."""
    return art.VIRTUAL_CODEX.dir(out) / f"{slide}.npy"


def map_files(out: str | os.PathLike, slide: str) -> dict[str, Path]:
    """The files of stage 06 a slide's CODEX features are made from: ``map``, ``mask``, ``record``."""
    d = art.VIRTUAL_CODEX.dir(out)
    return {"map": map_path(out, slide), "mask": d / f"{slide}_mask.png",
            "record": art.VIRTUAL_CODEX.path(out, slide)}


def find_maps(out: str | os.PathLike) -> dict[str, Path]:
    """Virtual CODEX maps by slide id: ``OUT/virtual_codex/{slide}.npy`` (mask files excluded)."""
    d = art.VIRTUAL_CODEX.dir(out)
    return {p.stem: p for p in sorted(d.glob("*.npy")) if not p.stem.endswith("_mask") and not p.name.startswith(".")}


def read_mask(npy_path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """Tissue mask (H', W') bool beside a map: ``{slide}_mask.png`` (stage 06: 255 = tissue) or ``{slide}_mask.npy``;
    None when there is none. A mask of another shape is a :class:`PipelineError`."""
    base = npy_path.with_name(npy_path.stem + "_mask")
    for p in (base.with_suffix(".png"), base.with_suffix(".npy")):
        if not p.is_file():
            continue
        if p.suffix == ".png":
            from PIL import Image

            with Image.open(p) as im:
                mask = np.asarray(im.convert("L")) > 127
        else:
            mask = np.load(p, allow_pickle=False) > 0
        if mask.shape != tuple(shape):
            raise PipelineError(f"tissue mask {p} is {mask.shape}, its map {npy_path} is {tuple(shape)}; rerun "
                                f"{STAGE_06} for this slide")
        return mask
    return None


def read_markers(out: str | os.PathLike, slide: str, npy_path: Path) -> list[str]:
    """Marker names of a map (HEX output order): ``virtual_codex/{slide}.json`` ``markers``, else the ``markers``
    attribute of the slide's stage-06 predictions (``hex_pred/{slide}.h5``)."""
    rec = npy_path.with_suffix(".json")
    if rec.is_file():
        try:
            markers = json.loads(rec.read_text()).get("markers")
        except json.JSONDecodeError:
            markers = None
        if markers:
            return [str(m) for m in markers]
    pred = art.PREDICTIONS.path(out, slide)
    if pred.is_file():
        attrs = art.h5_attrs(pred, "06")
        if "markers" in attrs:
            return [m.decode() if isinstance(m, bytes) else str(m) for m in np.atleast_1d(attrs["markers"])]
    raise PipelineError(f"no marker names for {npy_path}: neither {rec} nor {pred} (attr 'markers') lists them; "
                        f"rerun {STAGE_06} for this slide")


def load_map(out: str | os.PathLike, slide: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(map (H', W', C) float16/32, tissue mask (H', W') bool, C marker names) of one slide; the mask falls back to
    'any channel > 0' (0 = no tissue in the maps). A missing map is a :class:`PipelineError` naming it and stage 06."""
    npy_path = map_path(out, slide)
    if not npy_path.is_file():
        raise PipelineError(f"virtual CODEX map {npy_path} not found; run {STAGE_06} for this slide")
    try:
        vmap = np.load(npy_path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise PipelineError(f"cannot read {npy_path} ({e}); rerun {STAGE_06} for this slide") from e
    if vmap.ndim != 3:
        raise PipelineError(f"{npy_path} has shape {vmap.shape}; expected (H', W', markers)")
    markers = read_markers(out, slide, npy_path)
    if len(markers) != vmap.shape[-1]:
        raise PipelineError(f"{npy_path} has {vmap.shape[-1]} channels but {len(markers)} marker names")
    mask = read_mask(npy_path, vmap.shape[:2])
    if mask is None:
        mask = (vmap > 0).any(axis=-1)
    return vmap, mask, markers


# ----------------------------------------------------------------------------------------------------------------
# outputs: OUT/codex_features/{encdir}/{slide}.h5 (parts) -> OUT/codex_features/{encdir}.h5


def parts_dir(out: str | os.PathLike, encdir: str) -> Path:
    """``OUT/codex_features/{encdir}``: the per-slide parts of one CODEX encoder (and their done-records)."""
    return art.CODEX_FEATURES.dir(out, encoder=encdir)


def part_path(out: str | os.PathLike, encdir: str, slide: str) -> Path:
    """``OUT/codex_features/{encdir}/{slide}.h5``."""
    return art.CODEX_FEATURES.path(out, slide, encoder=encdir)


def combined_path(out: str | os.PathLike, encdir: str) -> Path:
    """``OUT/codex_features/{encdir}.h5``."""
    return art.CODEX_FEATURE_TABLE.path(out, encoder=encdir)


def write_part(path: Path, feats: np.ndarray, markers: Sequence[str], attrs: dict) -> None:
    """One slide's (C, D') features with its marker names and settings, atomically."""
    import h5py

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=np.asarray(feats, np.float32))
        f.attrs["markers"] = list(markers)
        for k, v in attrs.items():
            f.attrs[k] = v


def part_slides(out: str | os.PathLike, encdir: str) -> list[str]:
    """Slides with a part file in ``OUT/codex_features/{encdir}/``."""
    return sorted(p.stem for p in parts_dir(out, encdir).glob("*.h5") if not p.name.startswith("."))


def assemble(out: str | os.PathLike, encdir: str, encoder: str, feature_names: Sequence[str] | None = None,
             slides: Sequence[str] | None = None) -> Path:
    """Write ``codex_features/{encdir}.h5`` from the parts of ``slides`` (default: every part in
    ``codex_features/{encdir}/``), atomically.

    File attrs: ``encoder``, ``markers``, ``schema_version``, ``feature_dim`` (+ ``feature_names``); one (C, D')
    float32 dataset per slide with attr ``source``. Parts with different marker lists are a :class:`PipelineError`.
    """
    import h5py

    names = part_slides(out, encdir) if slides is None else sorted(slides)
    parts = [part_path(out, encdir, s) for s in names]
    dst = combined_path(out, encdir)
    markers: list[str] | None = None
    dim = None
    with atomic_path(dst) as tmp, h5py.File(tmp, "w") as g:
        for p in parts:
            with h5py.File(p, "r") as f:
                m = [str(x) for x in f.attrs["markers"]]
                feats = f["features"][:]
                source = str(f.attrs.get("source", ""))
            if markers is None:
                markers, dim = m, feats.shape[1]
            elif m != markers or feats.shape[1] != dim:
                raise PipelineError(f"{p}: markers/feature size differ from the other slides' ({len(m)} markers, D' "
                                    f"{feats.shape[1]} vs {len(markers)}, {dim}); rerun with --overwrite")
            ds = g.create_dataset(p.stem, data=feats.astype(np.float32))
            ds.attrs["source"] = source
        g.attrs["encoder"] = encoder
        g.attrs["markers"] = markers or []
        g.attrs["schema_version"] = TABLE_SCHEMA
        g.attrs["feature_dim"] = int(dim or 0)
        if feature_names is not None:
            g.attrs["feature_names"] = list(feature_names)
    log.info("%s: %d slides", dst, len(parts))
    return dst


# ----------------------------------------------------------------------------------------------------------------
# drivers


def stats_slide(slide: str, out: Path, encdir: str, high: float, settings: Mapping[str, Any] | str) -> dict:
    """Stats features of one slide -> its part file (module level: runs in a process pool)."""
    vmap, mask, markers = load_map(out, slide)
    feats = ce.stats_features(vmap, mask, markers, high=high)
    write_part(part_path(out, encdir, slide), feats, markers,
               {"encoder": ce.STATS_ENCODER, "source": str(map_path(out, slide)), "settings": _as_json(settings),
                "feature_names": list(ce.STATS_FEATURES), "schema_version": PART_SCHEMA})
    return {"tissue_pixels": int(mask.sum())}


def _as_json(settings: Mapping[str, Any] | str) -> str:
    return settings if isinstance(settings, str) else json.dumps(dict(settings), default=str)


class MapImages(Dataset):
    """Item i = (slide, uint8 grey images (C, 1, S, S) of its channels resized to S, markers, error message)."""

    def __init__(self, out: Path, slides: Sequence[str], size: int):
        self.out, self.slides, self.size = out, list(slides), int(size)

    def __len__(self) -> int:
        return len(self.slides)

    def __getitem__(self, i: int):
        s = self.slides[i]
        try:
            vmap, _, markers = load_map(self.out, s)
            grey = ce.resize_grey(ce.channel_images(vmap), self.size)
            return s, (grey * 255).round().to(torch.uint8), markers, ""
        except PipelineError as e:
            return s, None, None, str(e)


def _plan(slides: Sequence[str], spec: done_mod.DoneSpec, overwrite: bool, rep: StageReport) -> tuple[list, dict]:
    """The slides to do and their input stamps (:func:`pipeline.runner.plan_slides`); the skipped go to ``rep``."""
    todo, skipped, stamps = plan_slides(slides, spec, overwrite=overwrite, desc="CODEX features")
    rep.skipped.extend(skipped)
    return todo, stamps


@torch.inference_mode()
def run_image(slides: Sequence[str], out: Path, encdir: str, name: str, module: nn.Module, input_size: int,
              mean: Sequence[float], std: Sequence[float], device: torch.device, spec: done_mod.DoneSpec,
              batch_size: int = 64, workers: int = 0, amp: torch.dtype | None = None, overwrite: bool = False,
              skip_errors: bool = True, progress: bool = True) -> StageReport:
    """Image-encoder features (C, D) of each slide's channels, batched across slides (a batch may hold channels of
    several slides); each map is loaded once (DataLoader ``workers``). Writes one part and its done-record per
    slide; ``spec`` (:func:`mica.features.done_records.codex_spec`) decides what counts as done."""
    from hex.evaluate.predict import autocast

    rep = StageReport()
    todo, stamps = _plan(slides, spec, overwrite, rep)
    loader = DataLoader(MapImages(out, todo, input_size), batch_size=None, num_workers=min(workers, len(todo)))
    pending: dict[str, list] = {}  # slide -> [features (C, D) or None, markers, channels filled]

    def fail(s: str, err: str) -> None:
        if not skip_errors:
            raise PipelineError(err)
        rep.failed[s] = err
        log.error("%s: %s", s, err)
        with contextlib.suppress(OSError):
            done_mod.write_failure(spec, s, err)

    def items():
        for s, grey, markers, err in tqdm(loader, desc=f"CODEX features ({name})", unit="slide", disable=not progress):
            if err:
                fail(s, err)
                continue
            pending[s] = [None, list(markers), 0]
            yield s, grey

    module.eval()
    for batch, keys in ce.channel_batches(items(), batch_size):
        x = ce.to_model_input(batch.to(device, non_blocking=True).float() / 255.0, mean, std)
        with autocast(device, amp):
            y = module(x).float().cpu().numpy()
        for (s, c), row in zip(keys, y):
            entry = pending[s]
            if entry[0] is None:
                entry[0] = np.zeros((len(entry[1]), row.shape[0]), np.float32)
            entry[0][c] = row
            entry[2] += 1
            if entry[2] == len(entry[1]):
                write_part(part_path(out, encdir, s), entry[0], entry[1],
                           {"encoder": name, "source": str(map_path(out, s)),
                            "settings": _as_json(spec.settings), "schema_version": PART_SCHEMA})
                done_mod.write_record(spec, s, stamps[s])
                del pending[s]
                rep.done.append(s)
    log.info("CODEX features (%s): %s", name, rep.summary())
    return rep
