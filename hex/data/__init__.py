"""HEX training data: split files and the leakage check (:mod:`.splits`), label tables joined with the patch store
(:mod:`.datasets`), batch transforms on the training device (:mod:`.transforms`). Everything is importable from
``hex.data`` directly."""

from .datasets import (
    LEGACY_PREFIX,
    META_COLUMNS,
    PatchDataset,
    build_dataset,
    list_labelled_slides,
    load_normalization,
    marker_columns,
    normalization_differences,
    read_marker_csv,
    resolve_markers_dir,
)
from .splits import load_split, read_clinical, read_split
from .transforms import BatchTransform, colour_jitter_matrices, rotate_batch

__all__ = [
    "LEGACY_PREFIX",
    "META_COLUMNS",
    "BatchTransform",
    "PatchDataset",
    "build_dataset",
    "colour_jitter_matrices",
    "list_labelled_slides",
    "load_normalization",
    "load_split",
    "marker_columns",
    "normalization_differences",
    "read_clinical",
    "read_marker_csv",
    "read_split",
    "resolve_markers_dir",
    "rotate_batch",
]
