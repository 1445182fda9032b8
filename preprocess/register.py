"""Stage 02: register each CODEX image (DAPI) to its H&E slide (haematoxylin) with palom.

Usage (from the repository root)::

    python -m preprocess.register --cohort sample_cohort --out outputs
    python -m preprocess.register --cohort sample_cohort --out outputs --slides slide_000 slide_003 --overwrite
    python -m preprocess.register --pairs my_pairs.csv --out outputs --codex-mpp 0.377 --write-registered
    COHORT=/data/lung OUT=/scratch/hex bash scripts/02_register.sh

Inputs: a pairing table ``pairs.csv`` (``he_slide,codex_image``, paths relative to the CSV; default
``COHORT/pairs.csv``). Outputs under ``OUT/registration/``:

- ``{slide}.json``: ``he``, ``codex``, ``he_mpp``, ``codex_mpp``, ``affine_codex_to_he`` (3x3, CODEX level-0 px
  (x, y, 1) -> H&E level-0 px, integer coordinates = pixel centres), ``affine_coarse``, ``block_shifts``,
  ``qc`` (``ncc_before`` / ``ncc_coarse`` / ``ncc_after`` and diagnostics), ``status`` (``ok`` | ``flagged``),
  ``reason``.
- ``{slide}_qc.png``: haematoxylin (magenta) over warped DAPI (green): before, coarse, after, and a zoom.
- ``{slide}_registered.ome.tif`` with ``--write-registered``: the CODEX resampled into the H&E pixel grid
  (pyramidal OME-TIFF, channel names kept, PhysicalSize = H&E mpp), streamed tile by tile.
- ``config.json`` (resolved arguments), ``register.log``, ``summary.csv`` (one row per slide).

Method, per pair:

1. Working images at ``--thumbnail-mpp`` µm/px (both images resampled to the same pixel size, using the pixel sizes
   from the files or ``--mpp`` / ``--codex-mpp``): H&E -> haematoxylin (``rgb2hed``), CODEX -> DAPI.
2. Coarse affine: palom ``Aligner.coarse_register_affine`` (ORB keypoints + RANSAC) on these images.
3. Block shifts: the H&E haematoxylin at pyramid level ``--block-level`` is cut into ``--block-size`` µm blocks;
   palom ``compute_shifts`` warps the DAPI (the finest CODEX level) by the coarse affine and finds each block's
   shift by phase correlation with ``--upsample`` sub-pixel upsampling; blocks without tissue or not fully
   covered by the CODEX are masked; ``constrain_shifts`` is run as palom's outlier check (it raises when all
   shifts are identical: caught, recorded).
4. Refinement: each block centre c (H&E) is matched to its CODEX point A_coarse^-1(c) and to c + shift; an affine is
   fitted to these pairs by RANSAC then least squares with iterative trimming of outlier blocks. That affine is
   ``affine_codex_to_he``.
5. QC: NCC of the haematoxylin and the DAPI warped by the transform, at ``--qc-mpp`` µm/px inside the H&E tissue
   that the CODEX covers, for the pixel-size-only placement (before), the coarse and the final affine. A slide is
   ``flagged`` (not failed) when NCC after < ``--ncc-threshold``, when the affine is implausible (scale off the
   pixel-size ratio by more than ``--max-scale-dev``, shear above ``--max-shear``, a reflection), when palom's
   feature matching returned its identity placeholder, or when too few blocks were usable to refine.

Exit code: 0 when every slide was registered (flagged slides included, they are listed), 1 when any slide failed
(unreadable or missing file, missing pair, missing pixel size), 2 for argument errors.
"""

from __future__ import annotations

import argparse
import csv
import functools
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from preprocess.registration_qc import (
    apply_affine,
    fit_affine_lstsq,
    haematoxylin,
    ncc_score,
    plausibility,
    robust_normalize,
    save_overlay_png,
    scale_to_level0,
    tissue_mask,
    two_colour,
    warp,
)
from preprocess.slide_io import CodexImage, HESlide, read_marker_panel, read_pairs
from preprocess.utils import (
    PipelineError,
    atomic_write_text,
    run_slides,
    save_config,
    select_slides,
    setup_logging,
    write_json,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DAPI_NAMES = ("dapi", "hoechst", "hoechst33342", "nuclei", "dna")


# ----------------------------------------------------------------------------------------------------------------
# parameters


@dataclass
class RegParams:
    """Registration parameters (units in the names: ``_um`` micrometres, ``_mpp`` µm per pixel, ``_px`` pixels)."""

    he_mpp: float | None = None  # override of the H&E level-0 pixel size
    codex_mpp: float | None = None  # override of the CODEX level-0 pixel size
    dapi_channel: int | None = None  # None: from the marker panel / OME channel names, else channel 0
    marker_panel: str | None = None
    thumbnail_mpp: float = 2.0  # coarse (keypoint) working resolution
    thumbnail_max_px: int = 2048  # ... coarsened further so that the larger image side stays below this
    n_keypoints: int = 5000
    block_level: int = 0  # H&E pyramid level of the block-shift step
    block_size_um: float = 100.0
    max_blocks: int = 2000  # larger images get larger blocks, so that the grid has at most this many
    upsample: int = 10
    pcc_sigma: float = 1.0  # Gaussian sigma (block-level px) of palom's whitening before phase correlation
    min_tissue: float = 0.3  # fraction of a block that must be tissue for its shift to be measured
    min_blocks: int = 6  # fewer usable blocks: keep the coarse affine (+ median shift) and flag the slide
    ransac_um: float = 3.0  # RANSAC inlier distance of block shifts
    qc_mpp: float = 2.0
    qc_max_px: int = 4096
    ncc_threshold: float = 0.3
    max_scale_dev: float = 0.1
    max_shear: float = 0.05
    write_registered: bool = False
    tile_size: int = 512
    threads: int = 0  # dask threads for one slide (0: all cores / workers)
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# working images


def nominal_downsample(d: float) -> float:
    """A level downsample rounded to the integer it approximates (within 1%); otherwise unchanged."""
    r = round(d)
    return float(r) if r >= 1 and abs(d / r - 1) < 0.01 else float(d)


@dataclass
class WorkImage:
    """A whole-image working copy at a known pixel size.

    Attributes:
        img: (h, w) float32 (or (h, w, 3) uint8 for RGB).
        to_level0: 3x3 affine, working px -> level-0 px.
        mpp: µm per working pixel (nominal).
    """

    img: np.ndarray
    to_level0: np.ndarray
    mpp: float


def work_mpp(level0_mpp: float, dims: tuple[int, int], target_mpp: float, max_px: int) -> float:
    """Working pixel size: ``target_mpp``, coarsened so the image stays within ``max_px`` on its longer side."""
    return max(target_mpp, level0_mpp, max(dims) * level0_mpp / max_px)


def read_he_work(he: HESlide, mpp: float) -> WorkImage:
    """The whole H&E as RGB (h, w, 3) uint8 at ``mpp`` µm/px, read from the finest sufficient pyramid level."""
    ds = mpp / he.mpp
    w0, h0 = he.dimensions
    wt, ht = max(1, round(w0 / ds)), max(1, round(h0 / ds))
    level = he.best_level_for_downsample(ds)
    d = nominal_downsample(he.level_downsamples[level])
    lw, lh = he.level_dimensions[level]
    img = he.read_region(0, 0, level, (lw, lh))
    if (lw, lh) != (wt, ht):
        img = cv2.resize(img, (wt, ht), interpolation=cv2.INTER_AREA)
    return WorkImage(img, scale_to_level0(d * lw / wt, d * lh / ht), mpp)


def codex_level_for(codex: CodexImage, max_mpp: float) -> tuple[int, float]:
    """The coarsest CODEX level whose pixel size is <= ``max_mpp`` (level 0 if none); (level, nominal downsample)."""
    best, best_d = 0, 1.0
    for i, d in enumerate(codex.level_downsamples):
        dn = nominal_downsample(d)
        if codex.mpp * dn <= max_mpp * 1.01:
            best, best_d = i, dn
    return best, best_d


def read_codex_work(codex: CodexImage, channel: int, mpp: float) -> WorkImage:
    """One CODEX channel (h, w) float32 at ``mpp`` µm/px (area-averaged from the finest sufficient level)."""
    ds = mpp / codex.mpp
    w0, h0 = codex.dimensions
    wt, ht = max(1, round(w0 / ds)), max(1, round(h0 / ds))
    level, d = codex_level_for(codex, mpp)
    arr = codex.level(level)
    img = np.asarray(arr[channel]).astype(np.float32)
    lh, lw = img.shape
    if (lw, lh) != (wt, ht):
        img = cv2.resize(img, (wt, ht), interpolation=cv2.INTER_AREA)
    return WorkImage(img, scale_to_level0(d * lw / wt, d * lh / ht), mpp)


def find_dapi_channel(codex: CodexImage, panel_path: str | os.PathLike | None) -> tuple[int, str]:
    """DAPI channel index: from the marker panel, else the OME channel names, else 0. Returns (index, source)."""
    if panel_path and Path(panel_path).exists():
        for idx, name in read_marker_panel(panel_path):
            if name.strip().lower().replace(" ", "") in DAPI_NAMES:
                if idx >= codex.num_channels:
                    raise PipelineError(f"marker panel {panel_path} puts DAPI at channel {idx} but {codex.path} has "
                                        f"{codex.num_channels} channels")
                return idx, f"marker panel {panel_path}"
    if codex.channel_names:
        for i, name in enumerate(codex.channel_names):
            if name.strip().lower().replace(" ", "").split("-")[0] in DAPI_NAMES:
                return i, "OME channel names"
    return 0, "default (channel 0; pass --dapi-channel to choose)"


# ----------------------------------------------------------------------------------------------------------------
# palom steps


def coarse_affine(he_nuclei: WorkImage, dapi: WorkImage, n_keypoints: int) -> tuple[np.ndarray, bool]:
    """Coarse CODEX level-0 -> H&E level-0 affine from keypoints on the two working images (palom).

    Returns (3x3 affine, matched) where ``matched`` is False when palom's feature matching gave up and returned its
    identity placeholder (it only logs a warning).
    """
    import palom

    ref = robust_normalize(he_nuclei.img)
    mov = robust_normalize(dapi.img)
    aligner = palom.align.Aligner(None, None, ref, mov, 1, 1)
    aligner.coarse_register_affine(n_keypoints=n_keypoints, plot_match_result=False)
    m = np.asarray(aligner.coarse_affine_matrix, dtype=np.float64)  # DAPI working px -> haematoxylin working px
    matched = not np.allclose(m, np.eye(3)) and bool(np.all(np.isfinite(m)))
    return he_nuclei.to_level0 @ m @ np.linalg.inv(dapi.to_level0), matched


def _chunk_sizes(n: int, b: int) -> tuple[int, ...]:
    """Split n pixels into blocks of b; a remainder smaller than b/2 joins the last block."""
    if n <= b:
        return (n,)
    k, rem = divmod(n, b)
    sizes = [b] * k
    if rem >= b / 2:
        sizes.append(rem)
    else:
        sizes[-1] += rem
    return tuple(sizes)


@dataclass
class BlockResult:
    """Block-shift refinement of one pair.

    Attributes:
        affine: 3x3 refined CODEX level-0 -> H&E level-0 affine (the coarse one when refinement was impossible).
        centres: (N, 2) block centres, H&E level-0 px (masked blocks included).
        shifts: (N, 2) measured (dx, dy) in H&E level-0 px, NaN for masked blocks / failed correlations.
        valid: (N,) blocks whose shift was measured (tissue, covered by the CODEX).
        used: (N,) blocks kept by the robust fit.
        residual_um: (N,) distance between the fitted affine and each block's measurement, µm (NaN if not measured).
        notes: what happened (fallbacks, palom's outlier check).
        refined: whether the affine was fitted from the blocks.
    """

    affine: np.ndarray
    centres: np.ndarray
    shifts: np.ndarray
    valid: np.ndarray
    used: np.ndarray
    residual_um: np.ndarray
    block_px: int
    level: int
    grid_shape: tuple[int, int]
    notes: list[str]
    refined: bool
    palom_outliers: int | None


def robust_affine_fit(src: np.ndarray, dst: np.ndarray, ransac_px: float, floor_px: float, min_points: int,
                      max_iter: int = 10) -> tuple[np.ndarray, np.ndarray] | None:
    """Affine mapping ``src`` (N, 2) onto ``dst`` (N, 2) robust to outlier points.

    RANSAC (skimage) with inlier distance ``ransac_px`` picks the consensus set, then least squares is refitted on
    the points whose residual is below max(``floor_px``, 3 x median inlier residual) until the set is stable.
    Returns (3x3 affine, inlier mask (N,)) or None when fewer than ``min_points`` spread-out inliers remain.
    """
    from skimage.measure import ransac
    from skimage.transform import AffineTransform

    n = len(src)
    if n < max(3, min_points):
        return None
    try:
        _, inl = ransac((src, dst), AffineTransform, min_samples=3, residual_threshold=ransac_px, max_trials=2000,
                        rng=0)
    except Exception:  # noqa: BLE001 - degenerate samples: no consensus
        return None
    if inl is None or inl.sum() < max(3, min_points):
        return None
    for _ in range(max_iter):
        m = fit_affine_lstsq(src[inl], dst[inl])
        r = np.linalg.norm(apply_affine(m, src) - dst, axis=1)
        thr = max(floor_px, 3.0 * float(np.median(r[inl])))
        new = r <= thr
        if new.sum() < max(3, min_points):
            break
        if np.array_equal(new, inl):
            break
        inl = new
    m = fit_affine_lstsq(src[inl], dst[inl])
    # the inliers must span two dimensions, else the affine is undetermined across them
    c = src[inl] - src[inl].mean(0)
    sv = np.linalg.svd(c, compute_uv=False)
    if len(sv) < 2 or sv[1] < 1e-3 * max(sv[0], 1e-9) or sv[1] / math.sqrt(len(c)) < 1.0:
        return None
    return m, inl


def block_refine(he: HESlide, codex: CodexImage, dapi_channel: int, coarse: np.ndarray, tissue: WorkImage,
                 p: RegParams) -> BlockResult:
    """Measure block shifts with palom around ``coarse`` and fit the refined affine (see the module docstring).

    Args:
        he, codex: the open pair.
        dapi_channel: CODEX channel index of DAPI.
        coarse: 3x3 coarse CODEX level-0 -> H&E level-0 affine.
        tissue: H&E tissue mask (bool image) with its working-px -> level-0 mapping.
        p: parameters (block size in µm, level, upsample...).
    """
    import dask.array as da
    import palom

    level = min(p.block_level, he.level_count - 1)
    d = nominal_downsample(he.level_downsamples[level])
    ref_mpp = he.mpp * d
    lw, lh = he.level_dimensions[level]
    bpx = max(32, round(p.block_size_um / ref_mpp))
    if (lw / bpx) * (lh / bpx) > p.max_blocks:
        bpx = int(math.ceil(math.sqrt(lw * lh / p.max_blocks)))
    chunks = (_chunk_sizes(lh, bpx), _chunk_sizes(lw, bpx))
    l_ref = scale_to_level0(d)
    mlevel, dm = codex_level_for(codex, ref_mpp)
    l_mov = scale_to_level0(dm)
    a_blk = np.linalg.inv(l_ref) @ coarse @ l_mov  # CODEX level-m px -> H&E level px
    inv_blk = np.linalg.inv(a_blk)
    _, mh, mw = codex.level(mlevel).shape

    ys = np.concatenate([[0], np.cumsum(chunks[0])])
    xs = np.concatenate([[0], np.cumsum(chunks[1])])
    grid_shape = (len(chunks[0]), len(chunks[1]))
    valid = np.zeros(grid_shape, bool)
    centres = np.zeros((*grid_shape, 2))
    t_inv = np.linalg.inv(tissue.to_level0)
    th, tw = tissue.img.shape
    for r in range(grid_shape[0]):
        for c in range(grid_shape[1]):
            x0, x1, y0, y1 = xs[c], xs[c + 1], ys[r], ys[r + 1]
            centres[r, c] = (x0 + (x1 - x0 - 1) / 2, y0 + (y1 - y0 - 1) / 2)
            corners = np.array([[x0, y0], [x1 - 1, y0], [x0, y1 - 1], [x1 - 1, y1 - 1]], float)
            cm = apply_affine(inv_blk, corners)
            if cm.min() < 1 or cm[:, 0].max() > mw - 2 or cm[:, 1].max() > mh - 2:
                continue  # not fully covered by the CODEX
            tc = apply_affine(t_inv @ l_ref, corners)
            tx0, ty0 = np.clip(np.floor(tc.min(0)).astype(int), 0, [tw - 1, th - 1])
            tx1, ty1 = np.clip(np.ceil(tc.max(0)).astype(int) + 1, 1, [tw, th])
            frac = float(tissue.img[ty0:ty1, tx0:tx1].mean()) if tx1 > tx0 and ty1 > ty0 else 0.0
            valid[r, c] = frac >= p.min_tissue

    def _he_block(block_info=None):
        info = block_info[None]
        (y0, y1), (x0, x1) = info["array-location"]
        r, c = info["chunk-location"]
        if not valid[r, c]:
            return np.zeros((y1 - y0, x1 - x0), np.float32)
        rgb = he.read_region(int(round(x0 * d)), int(round(y0 * d)), level, (x1 - x0, y1 - y0))
        return haematoxylin(rgb)

    def _mask_block(block_info=None):
        info = block_info[None]
        r, c = info["chunk-location"]
        return np.full(info["chunk-shape"], valid[r, c], bool)

    ref = da.map_blocks(_he_block, chunks=chunks, dtype=np.float32, meta=np.empty((0, 0), np.float32))
    mask = da.map_blocks(_mask_block, chunks=chunks, dtype=bool, meta=np.empty((0, 0), bool))
    mov = da.from_zarr(codex.level(mlevel))[dapi_channel].astype(np.float32)

    notes: list[str] = []
    aligner = palom.align.Aligner(ref, mov, None, None, 1, 1)
    aligner.coarse_affine_matrix = a_blk
    aligner.compute_shifts(mask=mask, pcc_kwargs={"upsample": int(p.upsample), "sigma": float(p.pcc_sigma)})
    raw = np.asarray(aligner.shifts, dtype=np.float64).reshape(-1, 2)  # (N, 2) as (dy, dx), block-level px
    raw[~valid.ravel()] = np.nan
    raw[~np.all(np.isfinite(raw), axis=1)] = np.nan
    palom_outliers = None
    try:
        aligner.constrain_shifts()
        constrained = np.asarray(aligner.shifts).reshape(-1, 2)
        meas = np.all(np.isfinite(raw), axis=1)
        palom_outliers = int((np.abs(constrained[meas] - raw[meas]) > 1e-9).any(axis=1).sum())
    except Exception as e:  # noqa: BLE001 - palom raises e.g. when all shifts are identical
        notes.append(f"palom constrain_shifts failed ({type(e).__name__}: {e}); outliers left to the robust fit")

    cen = centres.reshape(-1, 2)
    measured = np.all(np.isfinite(raw), axis=1)
    src = apply_affine(inv_blk, cen)  # CODEX level-m px
    dst = cen + raw[:, ::-1]  # H&E level px
    n_meas = int(measured.sum())
    used = np.zeros(len(cen), bool)
    fit = robust_affine_fit(src[measured], dst[measured], ransac_px=p.ransac_um / ref_mpp,
                            floor_px=0.5 / ref_mpp, min_points=p.min_blocks)
    refined = fit is not None
    if fit is not None:
        f_blk, inl = fit
        used[np.flatnonzero(measured)[inl]] = True
    else:
        f_blk = a_blk.copy()
        if n_meas:
            med = np.median(raw[measured], axis=0)  # (dy, dx)
            f_blk = np.array([[1, 0, med[1]], [0, 1, med[0]], [0, 0, 1]]) @ a_blk
            notes.append(f"only {n_meas} block shifts measured (or no consensus): coarse affine + median shift")
        else:
            notes.append("no block shift could be measured: coarse affine kept")
    resid = np.full(len(cen), np.nan)
    resid[measured] = np.linalg.norm(apply_affine(f_blk, src[measured]) - dst[measured], axis=1) * ref_mpp
    affine = l_ref @ f_blk @ np.linalg.inv(l_mov)
    return BlockResult(
        affine=affine,
        centres=apply_affine(l_ref, cen),
        shifts=raw[:, ::-1] * d,
        valid=valid.ravel(),
        used=used,
        residual_um=resid,
        block_px=bpx,
        level=level,
        grid_shape=grid_shape,
        notes=notes,
        refined=refined,
        palom_outliers=palom_outliers,
    )


# ----------------------------------------------------------------------------------------------------------------
# one pair


def _placement_by_pixel_size(he_dims: tuple[int, int], codex_dims: tuple[int, int], scale: float) -> np.ndarray:
    """The 'before' transform: scale by the pixel-size ratio, image centres aligned (no registration)."""
    m = np.eye(3)
    m[0, 0] = m[1, 1] = scale
    cx, cy = (codex_dims[0] - 1) / 2, (codex_dims[1] - 1) / 2
    hx, hy = (he_dims[0] - 1) / 2, (he_dims[1] - 1) / 2
    m[0, 2], m[1, 2] = hx - scale * cx, hy - scale * cy
    return m


def _zoom_panel(he: HESlide, codex: CodexImage, dapi_channel: int, affine: np.ndarray, centre: np.ndarray,
                size_um: float = 150.0) -> np.ndarray:
    """Two-colour crop (H&E level 0) around ``centre`` (H&E level-0 px) with the DAPI warped by ``affine``."""
    n = max(16, int(round(size_um / he.mpp)))
    w0, h0 = he.dimensions
    x0 = int(np.clip(centre[0] - n / 2, 0, max(0, w0 - n)))
    y0 = int(np.clip(centre[1] - n / 2, 0, max(0, h0 - n)))
    rgb = he.read_region(x0, y0, 0, (min(n, w0), min(n, h0)))
    hh, ww = rgb.shape[:2]
    corners = np.array([[x0, y0], [x0 + ww, y0], [x0, y0 + hh], [x0 + ww, y0 + hh]], float)
    cc = apply_affine(np.linalg.inv(affine), corners)
    cx0, cy0 = np.floor(cc.min(0)).astype(int) - 2
    cx1, cy1 = np.ceil(cc.max(0)).astype(int) + 3
    region = codex.read_region(cx0, cy0, cx1, cy1, level=0, channels=[dapi_channel])[0].astype(np.float32)
    sx0, sy0 = max(0, cx0), max(0, cy0)
    t = np.array([[1, 0, -x0], [0, 1, -y0], [0, 0, 1]]) @ affine @ np.array([[1, 0, sx0], [0, 1, sy0], [0, 0, 1]])
    dapi = warp(region, t, (hh, ww)) if region.size else np.zeros((hh, ww), np.float32)
    return two_colour(haematoxylin(rgb), dapi)


def register_pair(he_path: str | os.PathLike, codex_path: str | os.PathLike, p: RegParams,
                  qc_png: str | os.PathLike | None = None) -> dict[str, Any]:
    """Register one CODEX image to its H&E slide; returns the registration record (see the module docstring).

    Raises:
        PipelineError: unreadable / missing files, missing pixel size.
    """
    import dask

    t_start = time.perf_counter()
    threads = p.threads or max(1, os.cpu_count() or 1)
    with HESlide(he_path, mpp=p.he_mpp) as he, CodexImage(codex_path, mpp=p.codex_mpp) as codex, \
            dask.config.set(scheduler="threads", num_workers=threads):
        dapi_ch, dapi_src = (p.dapi_channel, "--dapi-channel") if p.dapi_channel is not None else \
            find_dapi_channel(codex, p.marker_panel)
        if not 0 <= dapi_ch < codex.num_channels:
            raise PipelineError(f"DAPI channel {dapi_ch} is out of range for {codex.path} ({codex.num_channels} "
                                "channels); pass --dapi-channel")
        expected_scale = codex.mpp / he.mpp
        log.info("%s: H&E %dx%d px at %.4f µm, CODEX %dx%d px at %.4f µm, DAPI = channel %d (%s)",
                 Path(he_path).name, *he.dimensions, he.mpp, *codex.dimensions, codex.mpp, dapi_ch, dapi_src)

        # 1-2. coarse
        t0 = time.perf_counter()
        thumb_mpp = max(work_mpp(he.mpp, he.dimensions, p.thumbnail_mpp, p.thumbnail_max_px),
                        work_mpp(codex.mpp, codex.dimensions, p.thumbnail_mpp, p.thumbnail_max_px))
        he_thumb = read_he_work(he, thumb_mpp)
        he_h = WorkImage(haematoxylin(he_thumb.img), he_thumb.to_level0, thumb_mpp)
        dapi_thumb = read_codex_work(codex, dapi_ch, thumb_mpp)
        coarse, matched = coarse_affine(he_h, dapi_thumb, p.n_keypoints)
        t_coarse = time.perf_counter() - t0

        # QC working images (also the tissue mask of the block step)
        qc_mpp = max(work_mpp(he.mpp, he.dimensions, p.qc_mpp, p.qc_max_px),
                     work_mpp(codex.mpp, codex.dimensions, p.qc_mpp, p.qc_max_px))
        he_qc = read_he_work(he, qc_mpp) if not math.isclose(qc_mpp, thumb_mpp) else he_thumb
        he_qc_h = haematoxylin(he_qc.img) if he_qc is not he_thumb else he_h.img
        tissue = tissue_mask(he_qc.img, qc_mpp)
        dapi_qc = read_codex_work(codex, dapi_ch, qc_mpp) if he_qc is not he_thumb else dapi_thumb
        tissue_w = WorkImage(tissue, he_qc.to_level0, qc_mpp)

        # 3-4. block shifts and refinement
        t0 = time.perf_counter()
        blocks = block_refine(he, codex, dapi_ch, coarse, tissue_w, p)
        t_blocks = time.perf_counter() - t0
        final = blocks.affine

        # 5. QC
        before = _placement_by_pixel_size(he.dimensions, codex.dimensions, expected_scale)
        to_work = np.linalg.inv(he_qc.to_level0)
        scores = {}
        for name, m in (("before", before), ("coarse", coarse), ("after", final)):
            scores[name] = ncc_score(he_qc_h, tissue, dapi_qc.img, to_work @ m @ dapi_qc.to_level0)
        ok_shape, why_shape, parts = plausibility(final, expected_scale, p.max_scale_dev, p.max_shear)
        reasons = []
        if not matched:
            reasons.append("palom feature matching found no consensus (identity placeholder returned)")
        if not ok_shape:
            reasons.append(f"implausible affine: {why_shape}")
        ncc_after = scores["after"][0]
        if not np.isfinite(ncc_after):
            reasons.append("NCC after is undefined (the CODEX does not overlap the H&E tissue)")
        elif ncc_after < p.ncc_threshold:
            reasons.append(f"NCC after {ncc_after:.3f} < threshold {p.ncc_threshold}")
        if not blocks.refined:
            reasons.append("block-shift refinement unavailable: " + "; ".join(blocks.notes[-1:]))
        status = "flagged" if reasons else "ok"

        used = blocks.used
        resid_used = blocks.residual_um[used]
        qc = {
            "ncc_before": scores["before"][0],
            "ncc_coarse": scores["coarse"][0],
            "ncc_after": ncc_after,
            "ncc_threshold": p.ncc_threshold,
            "qc_mpp": qc_mpp,
            "tissue_covered_fraction": scores["after"][1],
            "expected_scale": expected_scale,
            "affine_parts": parts.as_dict(),
            "coarse_matched": matched,
            "thumbnail_mpp": thumb_mpp,
            "n_blocks": int(blocks.valid.size),
            "n_blocks_measured": int(np.isfinite(blocks.shifts).all(axis=1).sum()),
            "n_blocks_used": int(used.sum()),
            "palom_constrain_outliers": blocks.palom_outliers,
            "block_residual_um_median": float(np.median(resid_used)) if used.any() else None,
            "block_residual_um_p95": float(np.percentile(resid_used, 95)) if used.any() else None,
            "coarse_to_final_um_median": _median_displacement_um(coarse, final, blocks.centres[blocks.valid],
                                                                 he.mpp),
            "notes": blocks.notes,
            "seconds": {"coarse": t_coarse, "blocks": t_blocks},
        }
        block_list = [
            {"x": round(float(c[0]), 2), "y": round(float(c[1]), 2), "dx": round(float(s[0]), 4),
             "dy": round(float(s[1]), 4), "used": bool(u), "residual_um": round(float(r), 4)}
            for c, s, u, r in zip(blocks.centres, blocks.shifts, blocks.used, blocks.residual_um)
            if np.all(np.isfinite(s))
        ]
        record: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "he": str(Path(he_path)),
            "codex": str(Path(codex_path)),
            "he_mpp": he.mpp,
            "codex_mpp": codex.mpp,
            "dapi_channel": dapi_ch,
            "affine_codex_to_he": final.tolist(),
            "affine_coarse": coarse.tolist(),
            "block_shifts": block_list,
            "block_grid": {
                "units": "block_shifts: H&E level-0 px; (x, y) block centre, (dx, dy) its measured shift after "
                         "affine_coarse; used = kept by the robust affine fit; residual_um = distance to the fit",
                "level": blocks.level,
                "block_size_px": blocks.block_px,
                "block_size_um": blocks.block_px * he.mpp * nominal_downsample(he.level_downsamples[blocks.level]),
                "upsample": p.upsample,
                "grid_shape": list(blocks.grid_shape),
            },
            "qc": qc,
            "status": status,
            "reason": "; ".join(reasons) if reasons else None,
        }

        if qc_png is not None:
            t0 = time.perf_counter()
            foot = warp(np.ones(dapi_qc.img.shape, np.uint8), to_work @ final @ dapi_qc.to_level0,
                        he_qc_h.shape, nearest=True).astype(bool)
            panels = []
            for name, m in (("before (pixel size only)", before), ("coarse (keypoints)", coarse),
                            ("after (block-refined)", final)):
                warped = warp(dapi_qc.img, to_work @ m @ dapi_qc.to_level0, he_qc_h.shape)
                key = name.split(" ")[0]
                panels.append((f"{name}: NCC {scores[key][0]:.3f}", two_colour(he_qc_h, warped, tissue & foot)))
            pick = blocks.used if blocks.used.any() else blocks.valid
            if pick.any():
                cands = blocks.centres[pick]
                centre = cands[np.argmin(np.linalg.norm(cands - np.median(cands, axis=0), axis=1))]
                panels.append(("after, zoom 150 µm at H&E level 0",
                               _zoom_panel(he, codex, dapi_ch, final, centre)))
            title = (f"{Path(he_path).name} <- {Path(codex_path).name}: {status}"
                     + (f" ({record['reason']})" if reasons else "")
                     + "\nmagenta: H&E haematoxylin, green: CODEX DAPI warped to H&E")
            save_overlay_png(qc_png, panels, title[:400])
            qc["seconds"]["qc_png"] = time.perf_counter() - t0
    qc["seconds"]["total"] = time.perf_counter() - t_start
    return _finite_or_none(record)


def _finite_or_none(obj: Any) -> Any:
    """NaN / inf floats -> None, recursively (so the JSON stays standard)."""
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite_or_none(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _median_displacement_um(a: np.ndarray, b: np.ndarray, he_pts: np.ndarray, he_mpp: float) -> float | None:
    """Median distance (µm) between where ``a`` and ``b`` send the CODEX points that ``b`` maps to ``he_pts``."""
    if len(he_pts) == 0:
        return None
    src = apply_affine(np.linalg.inv(b), he_pts)
    return float(np.median(np.linalg.norm(apply_affine(a, src) - he_pts, axis=1)) * he_mpp)


# ----------------------------------------------------------------------------------------------------------------
# stage


def _outputs(out_dir: Path, slide: str) -> tuple[Path, Path, Path]:
    reg = out_dir / "registration"
    return reg / f"{slide}.json", reg / f"{slide}_qc.png", reg / f"{slide}_registered.ome.tif"


def register_slide(slide: str, pairs: dict[str, tuple[Path, Path]], pairs_path: str, out_dir: str,
                   params: RegParams) -> dict[str, Any]:
    """Stage work for one slide (module level so that a process pool can pickle it); writes its outputs."""
    if slide not in pairs:
        raise PipelineError(f"slide {slide} has no row in the pairing table {pairs_path}")
    he_path, codex_path = pairs[slide]
    if codex_path is None or codex_path.is_dir():
        raise PipelineError(f"slide {slide} has no CODEX image in the pairing table {pairs_path} (empty codex_image)")
    if not he_path.exists():
        raise PipelineError(f"H&E slide not found: {he_path} (listed for {slide} in {pairs_path})")
    if not codex_path.exists():
        raise PipelineError(f"CODEX image not found: {codex_path} (listed for {slide} in {pairs_path})")
    json_path, png_path, ome_path = _outputs(Path(out_dir), slide)
    record = register_pair(he_path, codex_path, params, qc_png=png_path)
    record["slide"] = slide
    if params.write_registered:
        from preprocess.registration_export import write_registered_ome

        t0 = time.perf_counter()
        with CodexImage(codex_path, mpp=params.codex_mpp) as codex, HESlide(he_path, mpp=params.he_mpp) as he:
            write_registered_ome(codex, np.asarray(record["affine_codex_to_he"]), he.dimensions, he.mpp, ome_path,
                                 tile=params.tile_size)
        record["registered_ome"] = str(ome_path)
        record["qc"]["seconds"]["registered_ome"] = time.perf_counter() - t0
    write_json(json_path, record)
    q = record["qc"]
    log.info("%s: %s, NCC before %s coarse %s after %s, %d/%d blocks used, %.1f s%s", slide, record["status"],
             _fmt(q["ncc_before"]), _fmt(q["ncc_coarse"]), _fmt(q["ncc_after"]), q["n_blocks_used"],
             q["n_blocks_measured"], q["seconds"]["total"], f" -- {record['reason']}" if record["reason"] else "")
    return {"status": record["status"], "reason": record["reason"], "ncc_before": q["ncc_before"],
            "ncc_after": q["ncc_after"]}


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _is_done(slide: str, out_dir: str, write_registered: bool) -> bool:
    js, png, ome = _outputs(Path(out_dir), slide)
    return js.exists() and png.exists() and (ome.exists() or not write_registered)


def _route_palom_logs() -> None:
    """Send palom's loguru messages (INFO and above) to the ``palom`` std logger instead of raw stderr."""
    try:
        from loguru import logger as loguru_logger
    except ImportError:  # pragma: no cover - palom depends on loguru
        return
    pl = logging.getLogger("palom")

    def sink(message) -> None:
        rec = message.record
        pl.log(logging.WARNING if rec["level"].no >= 30 else logging.DEBUG, rec["message"])

    loguru_logger.remove()
    loguru_logger.add(sink, level="INFO", format="{message}")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only when there is one (not None / False) and the help text does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        h = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in h:
            return h
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The stage's argument parser (``python -m preprocess.register --help``)."""
    p = argparse.ArgumentParser(prog="python -m preprocess.register", description=__doc__.split("\n\n")[0],
                                formatter_class=_HelpFormatter)
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--cohort", type=Path, help="cohort folder (he/, codex/, pairs.csv, marker_panel.csv)")
    io.add_argument("--pairs", type=Path, help="pairing table he_slide,codex_image (default: COHORT/pairs.csv)")
    io.add_argument("--marker-panel", type=Path,
                    help="channel,marker CSV used to find DAPI (default: COHORT/marker_panel.csv when present)")
    io.add_argument("--out", type=Path, default=Path("outputs"), help="output root; writes OUT/registration/")
    io.add_argument("--slides", nargs="+", help="slide ids to register (default: every row of the pairing table)")
    io.add_argument("--overwrite", action="store_true", help="redo slides whose outputs exist")
    io.add_argument("--workers", type=int, default=1, help="slides registered in parallel (processes)")
    io.add_argument("--fail-fast", action="store_true", help="stop at the first failing slide")
    px = p.add_argument_group("pixel sizes")
    px.add_argument("--mpp", type=float, help="H&E level-0 µm/px (overrides the slide metadata)")
    px.add_argument("--codex-mpp", type=float, help="CODEX level-0 µm/px (overrides the OME PhysicalSizeX)")
    px.add_argument("--dapi-channel", type=int, help="CODEX DAPI channel index (default: from the panel / names)")
    reg = p.add_argument_group("registration")
    d = RegParams()
    reg.add_argument("--thumbnail-mpp", type=float, default=d.thumbnail_mpp,
                     help="µm/px of the coarse (keypoint) working images")
    reg.add_argument("--thumbnail-max-px", type=int, default=d.thumbnail_max_px,
                     help="the coarse working images are coarsened so their longer side stays below this")
    reg.add_argument("--n-keypoints", type=int, default=d.n_keypoints, help="ORB keypoints of the coarse step")
    reg.add_argument("--block-level", type=int, default=d.block_level,
                     help="H&E pyramid level of the block-shift step (0 = full resolution)")
    reg.add_argument("--block-size", type=float, default=d.block_size_um, help="block side in µm")
    reg.add_argument("--max-blocks", type=int, default=d.max_blocks,
                     help="blocks are enlarged so that the grid over the whole H&E has at most this many")
    reg.add_argument("--upsample", type=int, default=d.upsample, help="phase-correlation sub-pixel upsampling")
    reg.add_argument("--pcc-sigma", type=float, default=d.pcc_sigma,
                     help="Gaussian sigma (block-level px) of palom's whitening before phase correlation")
    reg.add_argument("--min-tissue", type=float, default=d.min_tissue,
                     help="tissue fraction a block needs for its shift to be measured")
    reg.add_argument("--min-blocks", type=int, default=d.min_blocks,
                     help="fewest usable blocks to fit the refined affine (else coarse + median shift, flagged)")
    q = p.add_argument_group("quality control")
    q.add_argument("--qc-mpp", type=float, default=d.qc_mpp, help="µm/px of the NCC working images")
    q.add_argument("--ncc-threshold", type=float, default=d.ncc_threshold,
                   help="flag slides whose NCC after registration is below this (synthetic cohort: correct "
                        "pairs 0.90-0.93, another slide's CODEX <= 0.18, a correct pair 5 / 10 µm off 0.4-0.55 / "
                        "0.05-0.23; real pairs score lower: check the _qc.png of a few slides)")
    q.add_argument("--max-scale-dev", type=float, default=d.max_scale_dev,
                   help="flag affines whose scale deviates from the pixel-size ratio by more than this (relative)")
    q.add_argument("--max-shear", type=float, default=d.max_shear, help="flag affines with more shear than this")
    w = p.add_argument_group("registered image")
    w.add_argument("--write-registered", action="store_true",
                   help="also write the CODEX resampled into the H&E grid as a pyramidal OME-TIFF")
    w.add_argument("--tile-size", type=int, default=d.tile_size, help="tile side (px) of the registered OME-TIFF")
    return p


def _params_from_args(args: argparse.Namespace, marker_panel: Path | None, threads: int) -> RegParams:
    return RegParams(
        he_mpp=args.mpp, codex_mpp=args.codex_mpp, dapi_channel=args.dapi_channel,
        marker_panel=str(marker_panel) if marker_panel else None,
        thumbnail_mpp=args.thumbnail_mpp, thumbnail_max_px=args.thumbnail_max_px, n_keypoints=args.n_keypoints,
        block_level=args.block_level, block_size_um=args.block_size, max_blocks=args.max_blocks, upsample=args.upsample,
        pcc_sigma=args.pcc_sigma, min_tissue=args.min_tissue, min_blocks=args.min_blocks, qc_mpp=args.qc_mpp,
        ncc_threshold=args.ncc_threshold, max_scale_dev=args.max_scale_dev, max_shear=args.max_shear,
        write_registered=args.write_registered, tile_size=args.tile_size, threads=threads,
    )


def _write_summary(path: Path, slides: list[str], out_dir: Path, failed: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    for s in slides:
        js = _outputs(out_dir, s)[0]
        if s in failed:
            rows.append({"slide": s, "status": "failed", "reason": failed[s]})
            continue
        if not js.exists():
            continue
        import json

        rec = json.loads(js.read_text())
        q = rec.get("qc", {})
        rows.append({"slide": s, "status": rec.get("status"), "reason": rec.get("reason") or "",
                     "ncc_before": q.get("ncc_before"), "ncc_coarse": q.get("ncc_coarse"),
                     "ncc_after": q.get("ncc_after"), "n_blocks_used": q.get("n_blocks_used"),
                     "seconds": (q.get("seconds") or {}).get("total")})
    cols = ["slide", "status", "reason", "ncc_before", "ncc_coarse", "ncc_after", "n_blocks_used", "seconds"]
    import io

    buf = io.StringIO()
    wr = csv.DictWriter(buf, fieldnames=cols)
    wr.writeheader()
    for r in rows:
        wr.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())
    return rows


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    reg_dir = args.out / "registration"
    setup_logging(reg_dir / "register.log")
    _route_palom_logs()
    try:
        if args.pairs is None and args.cohort is None:
            raise PipelineError("give --cohort (with COHORT/pairs.csv) or --pairs")
        pairs_path = args.pairs if args.pairs is not None else args.cohort / "pairs.csv"
        pairs = read_pairs(pairs_path)
        slides = select_slides(sorted(pairs), args.slides, str(pairs_path))
        panel = args.marker_panel
        if panel is None and args.cohort is not None and (args.cohort / "marker_panel.csv").exists():
            panel = args.cohort / "marker_panel.csv"
        if panel is not None and not Path(panel).exists():
            raise PipelineError(f"marker panel not found: {panel}")
        for name, v in (("--mpp", args.mpp), ("--codex-mpp", args.codex_mpp), ("--block-size", args.block_size),
                        ("--thumbnail-mpp", args.thumbnail_mpp), ("--qc-mpp", args.qc_mpp)):
            if v is not None and v <= 0:
                raise PipelineError(f"{name} must be positive (got {v})")
        if args.upsample < 1:
            raise PipelineError(f"--upsample must be >= 1 (got {args.upsample})")
    except PipelineError as e:
        log.error("%s", e)
        return 2
    workers = max(1, min(args.workers, len(slides)))
    threads = max(1, (os.cpu_count() or 1) // workers)
    params = _params_from_args(args, panel, threads)
    cfg = vars(args).copy()
    cfg.update(pairs=str(pairs_path), marker_panel=str(panel) if panel else None, resolved_params=asdict(params),
               slides=slides)
    save_config(reg_dir, cfg)
    log.info("registering %d slides from %s into %s", len(slides), pairs_path, reg_dir)
    work = functools.partial(register_slide, pairs=pairs, pairs_path=str(pairs_path), out_dir=str(args.out),
                             params=params)
    is_done = functools.partial(_is_done, out_dir=str(args.out), write_registered=args.write_registered)
    report = run_slides(slides, work, is_done, overwrite=args.overwrite, workers=workers,
                        skip_errors=not args.fail_fast, desc="register")
    rows = _write_summary(reg_dir / "summary.csv", slides, args.out, report.failed)
    flagged = [r for r in rows if r["status"] == "flagged"]
    if flagged:
        log.warning("%d flagged slides (check their _qc.png): %s", len(flagged),
                    "; ".join(f"{r['slide']}: {r['reason']}" for r in flagged))
    if report.failed:
        log.error("%d slides failed: %s", len(report.failed), "; ".join(f"{k}: {v}" for k, v in report.failed.items()))
    log.info("registration: %s; %d flagged; summary in %s", report.summary(), len(flagged), reg_dir / "summary.csv")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
