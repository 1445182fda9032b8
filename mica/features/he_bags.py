"""H&E feature bags on disk (the registry's ``FEATURE_BAGS``): paths, the atomic writer and reader of one slide's
bag, and the extraction of one slide (stage 07, :mod:`mica.extract_features`).

Layout (stage 07 writes it, stages 08/09 read it)::

    OUT/features/{encdir}/h5_files/{slide}.h5   features (N, D) float32, coords (N, 2) int64 level-0 top-left
    OUT/features/{encdir}/pt_files/{slide}.pt   the (N, D) float32 tensor only (CLAM/MCAT convention)
    OUT/features/{encdir}/done/{slide}.json     what the bag was made with (:mod:`mica.features.done_records`)

``{encdir}`` is the encoder name with ``:`` and ``/`` replaced by ``_`` (``hex:demo`` -> ``hex_demo``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mica.features.image_encoders import ImageEncoder, encode_tiles
from pipeline import artifacts as art
from pipeline.io import atomic_path

log = logging.getLogger("mica.extract_features")

SCHEMA_VERSION = art.FEATURE_BAGS.schema


def encoder_dirname(name: str) -> str:
    """Folder name of an encoder: ``:`` and ``/`` replaced by ``_`` (``hex:demo_tiny`` -> ``hex_demo_tiny``)."""
    return name.replace(":", "_").replace("/", "_")


def features_dir(out: str | os.PathLike, encoder: str) -> Path:
    """``OUT/features/{encdir}``: the folder of one H&E encoder's bags (and of their done-records)."""
    return art.FEATURE_BAGS.dir(out, encoder=encoder_dirname(encoder))


def bag_files(folder: str | os.PathLike, slide: str) -> tuple[Path, Path]:
    """(h5, pt) paths of one slide's bag in a bag folder (``OUT/features/{encdir}`` or one given explicitly)."""
    h5 = Path(folder) / art.FEATURE_BAGS.name.format(slide=slide)
    pt = Path(folder) / art.FEATURE_BAGS.extra[0].format(slide=slide)
    return h5, pt


def feature_paths(out: str | os.PathLike, encoder: str, slide: str) -> tuple[Path, Path]:
    """(h5, pt) paths of one slide's bag under ``OUT/features/{encdir}/``."""
    return bag_files(features_dir(out, encoder), slide)


def write_feature_bag(h5_path: Path, pt_path: Path, features: np.ndarray, coords: np.ndarray,
                      attrs: dict[str, Any]) -> None:
    """Write ``features`` (N, D) float32 + ``coords`` (N, 2) int64 to HDF5 and the tensor alone to .pt, atomically
    (the .pt last)."""
    import h5py

    features = np.ascontiguousarray(features, np.float32)
    coords = np.ascontiguousarray(coords, np.int64).reshape(-1, 2)
    if len(features) != len(coords):
        raise ValueError(f"{len(features)} feature rows for {len(coords)} coords")
    rows = max(1, min(len(features), (1 << 20) // max(1, 4 * features.shape[1])))  # ~1 MiB chunks
    with atomic_path(h5_path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=features, chunks=(rows, features.shape[1]) if len(features) else None)
        f.create_dataset("coords", data=coords)
        for k, v in attrs.items():
            f.attrs[k] = v
    with atomic_path(pt_path) as tmp:
        torch.save(torch.from_numpy(features), tmp)


def read_feature_bag(h5_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(features (N, D) float32, coords (N, 2) int64, attrs) of a bag file."""
    import h5py

    with h5py.File(h5_path, "r") as f:
        return f["features"][:], f["coords"][:], dict(f.attrs)


# ----------------------------------------------------------------------------------------------------------------
# one slide


def grid_file(patches_dir: str | os.PathLike, slide: str) -> Path:
    """The stage-01 grid of ``slide`` in a grid folder (``OUT/patches`` or ``--patches``)."""
    return Path(patches_dir) / art.PATCH_GRID.name.format(slide=slide)


@dataclass
class HEConfig:
    """Settings of H&E extraction (the flags of :mod:`mica.extract_features` of the same names)."""

    out: Path
    patches_dir: Path
    batch_size: int = 128
    workers: int = 2
    amp: str = "auto"
    region_px: int = 2048
    mpp: float | None = None
    progress: bool = True


def extract_slide(slide: str, he_path: Path, enc: ImageEncoder, cfg: HEConfig, device: torch.device,
                  settings: dict[str, Any]) -> dict:
    """Features of one slide's grid -> ``features/{encdir}/{h5_files,pt_files}/{slide}.*``; returns a summary.
    ``settings`` (:func:`mica.features.done_records.he_settings`) are stored as JSON in the attr ``settings``."""
    from hex.evaluate.predict import resolve_amp
    from hex.infer.tiles import TileRegions
    from preprocess.patch import read_grid

    grid_path = grid_file(cfg.patches_dir, slide)
    _, gattrs = read_grid(grid_path)
    tiles = TileRegions.from_grid(he_path, grid_path, mpp=cfg.mpp, region_px=cfg.region_px)
    if tiles.num_tiles == 0:
        log.warning("%s: the grid %s is empty; writing (0, %d) features", slide, grid_path, enc.embed_dim)
    feats = encode_tiles(enc, tiles, device, cfg.batch_size, cfg.workers, resolve_amp(cfg.amp, device),
                         cfg.progress, desc=slide)
    attrs = {"encoder": enc.name, "embed_dim": enc.embed_dim, "input_size": enc.input_size,
             "interpolation": enc.interpolation, "weights": enc.weights or "", "slide_id": slide,
             "patch_size_level0": int(gattrs["patch_size_level0"]), "patch_size": int(gattrs["patch_size"]),
             "patch_level": int(gattrs["patch_level"]), "mpp": float(gattrs.get("mpp", 0.5)),
             "level0_mpp": float(gattrs.get("level0_mpp", tiles.mpp)), "source_grid": str(grid_path),
             "he_path": str(he_path), "coords_units": "level-0 pixels, top-left (x, y)",
             "schema_version": SCHEMA_VERSION, "settings": json.dumps(settings, default=str),
             **{k: v for k, v in enc.info.items() if v is not None}}
    h5_path, pt_path = feature_paths(cfg.out, enc.name, slide)
    write_feature_bag(h5_path, pt_path, feats, tiles.coords, attrs)
    return {"patches": int(len(feats))}
