"""Registration parameters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RegParams:
    """Registration parameters (units in the names: ``_um`` micrometres, ``_mpp`` µm per pixel, ``_px`` pixels)."""

    he_mpp: float | None = None  # override of the H&E level-0 pixel size
    codex_mpp: float | None = None  # override of the CODEX level-0 pixel size
    dapi_channel: int | None = None  # None: from the marker panel / OME channel names, else channel 0
    marker_panel: str | None = None
    panel_wins: bool = False  # a panel DAPI row whose OME channel has another name: warn instead of stopping
    thumbnail_mpp: float = 2.0  # coarse (keypoint) working resolution
    thumbnail_max_px: int = 2048  # ... coarsened further so that the larger image side stays below this
    n_keypoints: int = 5000
    block_mpp: float = 0.5  # pixel size of the block-shift step (H&E level read, area-averaged by an integer)
    block_size_um: float = 100.0
    max_blocks: int = 2000  # larger images get larger blocks, so that the grid has at most this many
    upsample: int = 10
    pcc_sigma: float = 1.0  # Gaussian sigma (block px) of palom's whitening before phase correlation
    min_tissue: float = 0.3  # fraction of a block that must be tissue for its shift to be measured
    min_blocks: int = 6  # fewer usable blocks: keep the coarse affine (+ median shift) and flag the slide
    ransac_um: float = 3.0  # RANSAC inlier distance of block shifts
    displacement: bool = True  # keep the block residuals as a displacement field on top of the affine
    field_outlier_um: float = 1.5  # a block this far from the plane through its neighbours is replaced
    min_field_blocks: int = 12  # fewer blocks measured: no displacement field (affine only)
    qc_mpp: float = 2.0
    qc_max_px: int = 4096
    ncc_threshold: float = 0.3
    max_scale_dev: float = 0.1
    max_shear: float = 0.05
    write_registered: bool = False
    tile_size: int = 512
    threads: int = 0  # dask threads for one slide (0: all cores / workers)
    extra: dict[str, Any] = field(default_factory=dict)
