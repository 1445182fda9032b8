"""Block refinement: palom's block-wise phase-correlation shifts around the coarse affine, and the robust affine
refitted to them.

The H&E haematoxylin is cut into ``block_size_um`` blocks at ``block_mpp`` µm/px (the pyramid level that
:func:`preprocess.pyramid.choose_level` picks, area-averaged by an integer factor when it is finer, e.g. 2 for a
0.25 µm/px 40x level 0); palom ``compute_shifts`` warps the DAPI (the CODEX level at that pixel size) by the coarse
affine and finds each block's shift with sub-pixel upsampling; blocks without tissue or not fully covered by the
CODEX are masked; ``constrain_shifts`` is palom's outlier check (it raises when all shifts are identical: caught,
recorded). Each block centre c (H&E) is matched to its CODEX point A_coarse^-1(c) and to c + shift; an affine is
fitted to these pairs by RANSAC, then least squares with iterative trimming of outlier blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from preprocess.pyramid import nominal_downsample, same_mpp
from preprocess.registration.params import RegParams
from preprocess.registration.work_images import WorkImage
from preprocess.registration_qc import apply_affine, fit_affine_lstsq, haematoxylin, scale_to_level0
from preprocess.slide_io import CodexImage, HESlide


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
        centres: (N, 2) block centres, H&E level-0 px (masked blocks included), row-major over ``grid_shape``.
        shifts: (N, 2) measured (dx, dy) in H&E level-0 px, NaN for masked blocks / failed correlations.
        codex_points: (N, 2) CODEX level-0 points A_coarse^-1(centre) that the shifts move onto centre + shift.
        valid: (N,) blocks whose shift was measured (tissue, covered by the CODEX).
        used: (N,) blocks kept by the robust fit.
        residual_um: (N,) distance between the fitted affine and each block's measurement, µm (NaN if not measured).
        block_px: block side in block-step px; ``block_ds``: level-0 px per block-step px.
        notes: what happened (fallbacks, palom's outlier check).
        refined: whether the affine was fitted from the blocks.
    """

    affine: np.ndarray
    centres: np.ndarray
    shifts: np.ndarray
    codex_points: np.ndarray
    valid: np.ndarray
    used: np.ndarray
    residual_um: np.ndarray
    block_px: int
    block_ds: float
    level: int
    grid_shape: tuple[int, int]
    notes: list[str]
    refined: bool
    palom_outliers: int | None

    @property
    def measured(self) -> np.ndarray:
        """(N,) blocks with a finite shift."""
        return np.all(np.isfinite(self.shifts), axis=1)

    def residuals_px(self, affine: np.ndarray) -> np.ndarray:
        """(N, 2) measured H&E position minus where ``affine`` puts the block's CODEX point (NaN if unmeasured)."""
        return self.centres + self.shifts - apply_affine(affine, self.codex_points)


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


def block_step_geometry(he: HESlide, block_mpp: float) -> tuple[int, int, float]:
    """(pyramid level to read, integer area-averaging factor, level-0 px per block-step px) for ``block_mpp``."""
    level, d = he.level_for_mpp(block_mpp)
    level_mpp = he.mpp * d
    k = 1
    if not same_mpp(level_mpp, block_mpp):
        k = max(1, int(round(block_mpp / level_mpp)))
        if not same_mpp(level_mpp * k, block_mpp, 0.05):
            k = 1  # no integer factor reaches it: work at the (finer) level as it is
    return level, k, d * k


def _block_mask(centres, xs, ys, inv_blk, l_ref, tissue: WorkImage, mw: int, mh: int, min_tissue: float):
    """(gy, gx) blocks fully covered by the CODEX (level-m px) with at least ``min_tissue`` tissue."""
    gy, gx = len(ys) - 1, len(xs) - 1
    valid = np.zeros((gy, gx), bool)
    t_inv = np.linalg.inv(tissue.to_level0)
    th, tw = tissue.img.shape
    for r in range(gy):
        for c in range(gx):
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
            valid[r, c] = frac >= min_tissue
    return valid


def block_refine(he: HESlide, codex: CodexImage, dapi_channel: int, coarse: np.ndarray, tissue: WorkImage,
                 p: RegParams) -> BlockResult:
    """Measure block shifts with palom around ``coarse`` and fit the refined affine (see the module docstring).

    Args:
        he, codex: the open pair.
        dapi_channel: CODEX channel index of DAPI.
        coarse: 3x3 coarse CODEX level-0 -> H&E level-0 affine.
        tissue: H&E tissue mask (bool image) with its working-px -> level-0 mapping.
        p: parameters (block size in µm, block pixel size, upsample...).
    """
    import dask.array as da
    import palom

    level, k, d = block_step_geometry(he, p.block_mpp)
    ref_mpp = he.mpp * d
    w0, h0 = he.dimensions
    lw, lh = max(1, int(w0 // d)), max(1, int(h0 // d))  # whole block-step px inside the slide
    bpx = max(32, round(p.block_size_um / ref_mpp))
    if (lw / bpx) * (lh / bpx) > p.max_blocks:
        bpx = int(math.ceil(math.sqrt(lw * lh / p.max_blocks)))
    chunks = (_chunk_sizes(lh, bpx), _chunk_sizes(lw, bpx))
    l_ref = scale_to_level0(d)
    mlevel, dm = codex.level_for_mpp(ref_mpp)
    l_mov = scale_to_level0(dm)
    a_blk = np.linalg.inv(l_ref) @ coarse @ l_mov  # CODEX level-m px -> block-step px
    inv_blk = np.linalg.inv(a_blk)
    _, mh, mw = codex.level(mlevel).shape

    ys = np.concatenate([[0], np.cumsum(chunks[0])])
    xs = np.concatenate([[0], np.cumsum(chunks[1])])
    grid_shape = (len(chunks[0]), len(chunks[1]))
    centres = np.zeros((*grid_shape, 2))
    valid = _block_mask(centres, xs, ys, inv_blk, l_ref, tissue, mw, mh, p.min_tissue)
    level_ds = nominal_downsample(he.level_downsamples[level])

    def _he_block(block_info=None):
        info = block_info[None]
        (y0, y1), (x0, x1) = info["array-location"]
        r, c = info["chunk-location"]
        if not valid[r, c]:
            return np.zeros((y1 - y0, x1 - x0), np.float32)
        rgb = he.read_region(int(round(x0 * d)), int(round(y0 * d)), level, (k * (x1 - x0), k * (y1 - y0)))
        if k > 1:
            rgb = cv2.resize(rgb, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
        return haematoxylin(rgb)

    def _mask_block(block_info=None):
        info = block_info[None]
        r, c = info["chunk-location"]
        return np.full(info["chunk-shape"], valid[r, c], bool)

    ref = da.map_blocks(_he_block, chunks=chunks, dtype=np.float32, meta=np.empty((0, 0), np.float32))
    mask = da.map_blocks(_mask_block, chunks=chunks, dtype=bool, meta=np.empty((0, 0), bool))
    mov = da.from_zarr(codex.level(mlevel))[dapi_channel].astype(np.float32)

    notes: list[str] = []
    if k > 1:
        notes.append(f"block step at {ref_mpp:.3f} µm/px: H&E level {level} ({he.mpp * level_ds:.3f} µm/px) "
                     f"area-averaged {k}x{k}")
    aligner = palom.align.Aligner(ref, mov, None, None, 1, 1)
    aligner.coarse_affine_matrix = a_blk
    aligner.compute_shifts(mask=mask, pcc_kwargs={"upsample": int(p.upsample), "sigma": float(p.pcc_sigma)})
    raw = np.asarray(aligner.shifts, dtype=np.float64).reshape(-1, 2)  # (N, 2) as (dy, dx), block-step px
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
    dst = cen + raw[:, ::-1]  # block-step px
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
    return BlockResult(
        affine=l_ref @ f_blk @ np.linalg.inv(l_mov),
        centres=apply_affine(l_ref, cen),
        shifts=raw[:, ::-1] * d,
        codex_points=apply_affine(l_mov, src),
        valid=valid.ravel(),
        used=used,
        residual_um=resid,
        block_px=bpx,
        block_ds=d,
        level=level,
        grid_shape=grid_shape,
        notes=notes,
        refined=refined,
        palom_outliers=palom_outliers,
    )
