"""The prediction file of one slide, ``hex_pred/{slide}.h5`` (layout: :mod:`hex.infer.stage`): its tile grid (the
stage-01 grid or a computed tissue grid), the model's predictions on the tiles, writing the file
(:func:`infer_slide`) and reading it back (:func:`read_prediction`, used by the maps and by stage 07)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hex.data.transforms import BatchTransform
from hex.evaluate.predict import prediction_fn, run_loop, wants_channels_last
from hex.infer.tiles import TileRegions, make_tile_loader, tissue_tiles
from pipeline import artifacts as art
from pipeline.errors import PipelineError
from pipeline.io import atomic_path
from preprocess.patch import read_grid, read_tissue_fraction

log = logging.getLogger("hex.infer_wsi")


@dataclass(frozen=True)
class InferConfig:
    """Grid and reading settings of one run (``patch_size``/``stride`` None = the stage-01 grid's)."""

    pred_dir: Path
    grid_dir: Path
    patch_size: int | None = None
    stride: int | None = None
    target_mpp: float = 0.5
    min_tissue: float = 0.5
    thumb_size: int = 2048
    mpp: float | None = None
    region_px: int = 2048
    batch_size: int = 128
    workers: int = 4
    raw_units: bool = False


# ----------------------------------------------------------------------------------------------------------------
# grid


def _use_stage01_grid(attrs: dict | None, cfg: InferConfig) -> bool:
    if attrs is None:
        return False
    size = int(attrs["patch_size"])
    same_mpp = abs(float(attrs.get("mpp", cfg.target_mpp)) - cfg.target_mpp) < 1e-6
    return same_mpp and cfg.patch_size in (None, size) and cfg.stride in (None, size)


def build_tiles(slide_id: str, he_path: Path, cfg: InferConfig) -> tuple[TileRegions, np.ndarray, dict[str, Any]]:
    """Tiles of one slide, their tissue fractions (N,) and the grid attributes of the prediction file."""

    grid_file = cfg.grid_dir / f"{slide_id}.h5"
    grid = read_grid(grid_file) if grid_file.is_file() else None  # read once: (coords, attrs)
    attrs = grid[1] if grid is not None else None
    if _use_stage01_grid(attrs, cfg):
        tiles = TileRegions.from_grid(he_path, grid, mpp=cfg.mpp, region_px=cfg.region_px)
        frac = read_tissue_fraction(grid_file, tiles.num_tiles).astype(np.float32)
        size = int(attrs["patch_size"])
        info = {"grid_source": str(grid_file), "patch_size": size, "stride": size,
                "stride_level0": tiles.patch_size_level0, "min_tissue": float(attrs.get("min_tissue", np.nan))}
        if "level0_mpp" in attrs and abs(float(attrs["level0_mpp"]) - tiles.mpp) > 0.01 * tiles.mpp:
            log.warning("%s: the grid was made at %.4f µm/px, the slide reads %.4f µm/px (--mpp?)", slide_id,
                        float(attrs["level0_mpp"]), tiles.mpp)
    else:
        size = cfg.patch_size or (int(attrs["patch_size"]) if attrs is not None else 224)
        tiles, frac, info = tissue_tiles(he_path, size, cfg.stride or size, cfg.target_mpp, cfg.min_tissue,
                                         cfg.thumb_size, cfg.mpp, cfg.region_px)
        info["grid_source"] = "computed"
    info |= {"patch_size_level0": tiles.patch_size_level0, "patch_level": tiles.level,
             "read_size_at_level": tiles.read_size, "level_downsample": tiles.downsample,
             "target_mpp": cfg.target_mpp, "mpp": tiles.mpp, "slide_dimensions": np.asarray(tiles.dimensions)}
    return tiles, np.asarray(frac, np.float32), info


# ----------------------------------------------------------------------------------------------------------------
# units


def denormalize(pred: np.ndarray, markers: Sequence[str], normalization: dict | None) -> np.ndarray:
    """Raw marker units (N,M) = p_low + pred * (p_high - p_low), percentiles matched to ``markers`` by name.

    ``normalization`` is a ``markers/normalization.json`` record (``markers`` + ``values`` [lows, highs]) or a
    ``{marker: {"p_low", "p_high"}}`` mapping."""
    if not normalization:
        raise PipelineError("--raw-units needs the label percentiles the model was trained with; this checkpoint "
                            "has none (e.g. the original release): pass --normalization markers/normalization.json")
    if "values" in normalization and "markers" in normalization:
        lo_hi = {m: (float(a), float(b)) for m, a, b in zip(normalization["markers"], *normalization["values"])}
    else:
        lo_hi = {m: (float(v["p_low"]), float(v["p_high"])) for m, v in normalization.items() if isinstance(v, dict)}
    missing = [m for m in markers if m not in lo_hi]
    if missing:
        raise PipelineError(f"the normalization percentiles lack markers {missing[:5]}; pass a --normalization file "
                            "for this model's markers")
    lo = np.array([lo_hi[m][0] for m in markers], np.float32)
    hi = np.array([lo_hi[m][1] for m in markers], np.float32)
    return (lo + pred * (hi - lo)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# one slide


def infer_slide(slide_id: str, he_path: Path, model: torch.nn.Module, meta: dict[str, Any], cfg: InferConfig,
                device: torch.device, amp: torch.dtype | None, normalization: dict | None,
                progress: bool = False) -> dict[str, Any]:
    """Predict every tile of one slide and write ``hex_pred/{slide}.h5``; returns a summary (``warning`` set when
    the slide has no tissue)."""
    import h5py

    if he_path.is_file() and he_path.stat().st_size == 0:
        raise PipelineError(f"{he_path} is an empty (0-byte) file: the copy or download did not finish; copy the "
                            "slide again or remove it")
    t0 = time.perf_counter()
    tiles, frac, info = build_tiles(slide_id, he_path, cfg)
    markers = list(meta["markers"])
    out: dict[str, Any] = {"patches": tiles.num_tiles, "warning": None}
    if tiles.num_tiles == 0:
        pred = np.zeros((0, len(markers)), np.float32)
        out["warning"] = (f"no tissue tile in {he_path} (--min-tissue {cfg.min_tissue}): wrote an empty prediction "
                          "file (0 tiles); check the slide is not blank or lower --min-tissue")
    else:
        tf = BatchTransform(int(meta["input_size"]), meta["mean"], meta["std"], train=False,
                            interpolation=meta.get("interpolation") or "bilinear", stain_norm=meta.get("stain_norm"))
        loader = make_tile_loader(tiles, cfg.batch_size, cfg.workers, pin_memory=device.type == "cuda")
        pred = run_loop(loader, prediction_fn(model), tf, device, amp, n=tiles.num_tiles, dim=len(markers),
                        channels_last=wants_channels_last(model, device), progress=progress, desc=slide_id,
                        total=tiles.num_tiles)
    raw = denormalize(pred, markers, normalization) if cfg.raw_units else None
    path = cfg.pred_dir / f"{slide_id}.h5"
    attrs = {**info, "markers": np.array(markers, dtype=h5py.string_dtype()), "checkpoint": meta["checkpoint"],
             "checkpoint_sha256": meta["checkpoint_sha256"], "normalization": json.dumps(normalization),
             "units": "normalised [0, 1] (label percentiles, see normalization)", "slide_id": slide_id,
             "he_path": str(he_path), "schema_version": art.PREDICTIONS.schema,
             "coords_units": "level-0 pixels, top-left (x, y)"}
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("coords", data=tiles.coords.astype(np.int64))
        f.create_dataset("codex_prediction", data=pred.astype(np.float32))
        f.create_dataset("tissue_fraction", data=frac)
        if raw is not None:
            f.create_dataset("codex_prediction_raw", data=raw)
        for k, v in attrs.items():
            f.attrs[k] = v
    dt = time.perf_counter() - t0
    out |= {"seconds": dt, "patches_per_s": tiles.num_tiles / max(dt, 1e-9), "path": str(path)}
    return out


# ----------------------------------------------------------------------------------------------------------------
# reading a prediction file


@dataclass
class SlidePrediction:
    """The content of ``hex_pred/{slide}.h5`` that the maps need (level-0 px, µm)."""

    slide_id: str
    coords: np.ndarray  # (N, 2) int64 level-0 top-left x, y
    values: np.ndarray  # (N, M) float32
    markers: list[str]
    patch_size_level0: float
    stride_level0: float
    mpp: float | None
    he_path: Path | None
    checkpoint: str | None
    slide_size: tuple[int, int] | None  # level-0 (width, height) when the file records it


def _attr_str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def read_header(path: str | Path) -> dict[str, Any]:
    """The ``markers`` (list) and ``he_path`` (str) attributes of a prediction file, without reading its arrays;
    the keys it lacks are left out, and an unreadable file gives ``{}`` (:func:`read_prediction` names the
    problem when the slide is processed)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            a = f.attrs
            out: dict[str, Any] = {}
            if "markers" in a:
                out["markers"] = [_attr_str(m) for m in np.asarray(a["markers"]).ravel()]
            if "he_path" in a:
                out["he_path"] = _attr_str(a["he_path"])
            return out
    except OSError:
        return {}


def _slide_size_from_attrs(attrs) -> tuple[int, int] | None:
    for key in ("slide_dimensions", "level0_dimensions", "dimensions"):
        if key in attrs:
            v = np.asarray(attrs[key]).ravel()
            if v.size == 2:
                return int(v[0]), int(v[1])
    if "slide_width" in attrs and "slide_height" in attrs:
        return int(attrs["slide_width"]), int(attrs["slide_height"])
    return None


def read_prediction(path: str | Path) -> SlidePrediction:
    """Read a ``hex_pred/{slide}.h5`` file; a missing dataset or attribute is a :class:`PipelineError` naming it."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise PipelineError(f"prediction file not found: {path} (run python -m hex.infer_wsi first)")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise PipelineError(f"cannot read the prediction file {path} ({e}); rerun hex.infer_wsi for it") from e
    with f:
        for key in ("coords", "codex_prediction"):
            if key not in f:
                raise PipelineError(f"{path} has no '{key}' dataset; it is not a hex.infer_wsi file (rerun it)")
        a = f.attrs
        for key in ("markers", "patch_size_level0"):
            if key not in a:
                raise PipelineError(f"{path} lacks the attribute '{key}'; rerun hex.infer_wsi for this slide")
        coords = np.asarray(f["coords"][:], dtype=np.int64).reshape(-1, 2)
        values = np.asarray(f["codex_prediction"][:], dtype=np.float32)
        markers = [_attr_str(m) for m in np.asarray(a["markers"]).ravel()]
        if values.ndim != 2 or values.shape != (len(coords), len(markers)):
            raise PipelineError(f"{path}: codex_prediction is {values.shape}, expected ({len(coords)}, "
                                f"{len(markers)}) (tiles x markers); rerun hex.infer_wsi for this slide")
        patch = float(a["patch_size_level0"])
        stride = float(a["stride_level0"]) if "stride_level0" in a else patch
        he = _attr_str(a["he_path"]) if "he_path" in a and _attr_str(a["he_path"]) else None
        return SlidePrediction(
            slide_id=_attr_str(a["slide_id"]) if "slide_id" in a else path.name.split(".", 1)[0],
            coords=coords, values=values, markers=markers, patch_size_level0=patch, stride_level0=stride,
            mpp=float(a["mpp"]) if "mpp" in a else None, he_path=Path(he) if he else None,
            checkpoint=_attr_str(a["checkpoint"]) if "checkpoint" in a else None,
            slide_size=_slide_size_from_attrs(a))
