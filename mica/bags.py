"""H&E feature bags on disk: folder names, paths, and the (atomic) writer and reader of one slide's bag.

Layout (stage 07 writes it, stages 08/09 read it)::

    OUT/features/{encdir}/h5_files/{slide}.h5   features (N, D) float32, coords (N, 2) int64 level-0 top-left
    OUT/features/{encdir}/pt_files/{slide}.pt   the (N, D) float32 tensor only (CLAM/MCAT convention)
    OUT/features/{encdir}/done/{slide}.json     what the bag was made with (pipeline.done)

``{encdir}`` is the encoder name with ``:`` and ``/`` replaced by ``_`` (``hex:demo`` -> ``hex_demo``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.io import atomic_path


def encoder_dirname(name: str) -> str:
    """Folder name of an encoder: ``:`` and ``/`` replaced by ``_`` (``hex:demo_tiny`` -> ``hex_demo_tiny``)."""
    return name.replace(":", "_").replace("/", "_")


def features_dir(out: str | os.PathLike, encoder: str) -> Path:
    """``OUT/features/{encdir}``: the folder of one H&E encoder's bags (and of their done-records)."""
    return Path(out) / "features" / encoder_dirname(encoder)


def feature_paths(out: str | os.PathLike, encoder: str, slide: str) -> tuple[Path, Path]:
    """(h5, pt) paths of one slide's bag under ``OUT/features/{encdir}/``."""
    d = features_dir(out, encoder)
    return d / "h5_files" / f"{slide}.h5", d / "pt_files" / f"{slide}.pt"


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
