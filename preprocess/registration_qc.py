"""Image helpers and quality control for CODEX -> H&E registration (stage 02).

Everything here works on in-memory "working" images (a few µm per pixel) and 3x3 affines in the repository
convention: pixel (x, y) = (column, row), integer coordinates are pixel centres, and an affine maps homogeneous
(x, y, 1) of one image to the other.

- :func:`haematoxylin`, :func:`registration_tissue_mask`: the nuclei image and the tissue region of an H&E RGB image.
- :func:`warp`, :func:`ncc`, :func:`ncc_score`: the QC score = normalized cross-correlation of the H&E
  haematoxylin and the CODEX DAPI warped into H&E space, inside the H&E tissue that the CODEX covers.
- :func:`decompose_affine`, :func:`plausibility`: scale / rotation / shear of an affine and whether it is what two
  images of one section can be related by.
- :func:`save_overlay_png`: the QC figure (haematoxylin in magenta, warped DAPI in green, before / after / zoom).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import cv2
import numpy as np

# ----------------------------------------------------------------------------------------------------------------
# affines in the pixel-centre convention


def scale_to_level0(sx: float, sy: float | None = None) -> np.ndarray:
    """3x3 affine from pixels of an image downsampled by (sx, sy) to level-0 pixels.

    Pixel c of a level with downsample d is centred on level-0 coordinate (c + 0.5)·d − 0.5.
    """
    sy = sx if sy is None else sy
    return np.array([[sx, 0.0, (sx - 1) / 2], [0.0, sy, (sy - 1) / 2], [0.0, 0.0, 1.0]])


def apply_affine(affine: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Map points (N, 2) by a 3x3 affine -> (N, 2)."""
    xy = np.asarray(xy, dtype=np.float64)
    return xy @ affine[:2, :2].T + affine[:2, 2]


def fit_affine_lstsq(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares 3x3 affine mapping ``src`` (N, 2) onto ``dst`` (N, 2); N >= 3 non-collinear points."""
    a = np.hstack([src, np.ones((len(src), 1))])
    sol, *_ = np.linalg.lstsq(a, dst, rcond=None)  # (3, 2)
    m = np.eye(3)
    m[:2, :] = sol.T
    return m


@dataclass
class AffineParts:
    """``M = R(rotation) @ [[scale_x, shear * scale_y], [0, scale_y]]`` for the linear part of an affine."""

    scale_x: float
    scale_y: float
    rotation_deg: float
    shear: float
    det: float

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items()}


def decompose_affine(affine: np.ndarray) -> AffineParts:
    """Rotation, per-axis scale and shear (tan of the shear angle) of the 2x2 part of ``affine`` (QR-style)."""
    m = np.asarray(affine, dtype=np.float64)[:2, :2]
    det = float(np.linalg.det(m))
    sx = float(math.hypot(m[0, 0], m[1, 0]))
    if sx == 0:
        return AffineParts(0.0, 0.0, 0.0, float("inf"), det)
    rot = math.degrees(math.atan2(m[1, 0], m[0, 0]))
    sy = det / sx
    shear_term = (m[0, 0] * m[0, 1] + m[1, 0] * m[1, 1]) / sx
    shear = shear_term / sy if sy != 0 else float("inf")
    return AffineParts(sx, sy, rot, shear, det)


def plausibility(affine: np.ndarray, expected_scale: float, max_scale_dev: float,
                 max_shear: float) -> tuple[bool, str, AffineParts]:
    """Whether ``affine`` (CODEX level-0 px -> H&E level-0 px) can relate two scans of one section.

    The expected scale is codex_mpp / he_mpp; each axis scale may deviate from it by ``max_scale_dev`` (relative)
    and the shear may not exceed ``max_shear``; a reflection (negative determinant) is implausible too.
    Returns (ok, reason, parts).
    """
    parts = decompose_affine(affine)
    if not np.all(np.isfinite(affine)):
        return False, "affine has non-finite entries", parts
    problems = []
    if parts.det <= 0:
        problems.append("the affine flips the image (negative determinant)")
    for name, s in (("x", parts.scale_x), ("y", abs(parts.scale_y))):
        dev = s / expected_scale - 1
        if abs(dev) > max_scale_dev:
            problems.append(f"scale {name} {s:.4f} is {100 * dev:+.1f}% off the pixel-size ratio {expected_scale:.4f}")
    if abs(parts.shear) > max_shear:
        problems.append(f"shear {parts.shear:.3f} exceeds {max_shear}")
    return (not problems), "; ".join(problems), parts


# ----------------------------------------------------------------------------------------------------------------
# nuclei images


def haematoxylin(rgb: np.ndarray) -> np.ndarray:
    """Haematoxylin optical density (h, w) float32 (>= 0) of an RGB uint8 image (h, w, 3) (skimage ``rgb2hed``)."""
    from skimage.color import rgb2hed

    h = rgb2hed(rgb)[..., 0].astype(np.float32)
    h -= h.min() if h.size else 0
    return h


def registration_tissue_mask(rgb: np.ndarray, mpp: float, min_od: float = 0.1, smooth_um: float = 8.0) -> np.ndarray:
    """Tissue (h, w) bool of an RGB H&E working image at ``mpp`` µm/px, for the registration's block selection and
    NCC (summed optical density; the patch grid's mask is :func:`preprocess.tissue.grid_tissue_mask`).

    The summed optical density is smoothed over ``smooth_um`` (so nuclei and stroma form one region) and
    thresholded by Otsu's method, at least at ``min_od`` so that an empty (all-background) image gives no tissue.
    """
    from skimage.filters import threshold_otsu

    od = -np.log((rgb.astype(np.float32) + 1.0) / 256.0).sum(axis=2)
    if od.size == 0 or np.ptp(od) == 0:
        return np.zeros(od.shape, bool)
    od = cv2.GaussianBlur(od, (0, 0), max(0.5, smooth_um / mpp))
    thr = max(float(threshold_otsu(od)), min_od)
    mask = (od > thr).astype(np.uint8)
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, k)
    return mask.astype(bool)


def robust_normalize(img: np.ndarray, mask: np.ndarray | None = None, pct: tuple[float, float] = (1, 99.5)
                     ) -> np.ndarray:
    """Rescale to [0, 1] between percentiles (taken inside ``mask`` when given); float32."""
    vals = img[mask] if mask is not None and mask.any() else img.ravel()
    if vals.size == 0:
        return np.zeros_like(img, dtype=np.float32)
    lo, hi = np.percentile(vals, pct)
    if hi <= lo:
        hi = lo + 1e-6
    return np.clip((img.astype(np.float32) - lo) / (hi - lo), 0, 1)


# ----------------------------------------------------------------------------------------------------------------
# warping and NCC


def warp(img: np.ndarray, affine: np.ndarray, out_shape: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Warp ``img`` (h, w) into an (H, W) = ``out_shape`` grid; ``affine`` maps ``img`` px -> output px."""
    flags = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    src = img if img.dtype != np.bool_ else img.astype(np.uint8)
    out = cv2.warpAffine(src, np.asarray(affine, np.float64)[:2], (int(out_shape[1]), int(out_shape[0])),
                         flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out.astype(bool) if img.dtype == np.bool_ else out


def ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Normalized cross-correlation of ``a`` and ``b`` (same shape) over ``mask``; NaN when undefined."""
    if mask.sum() < 16:
        return float("nan")
    x = a[mask].astype(np.float64)
    y = b[mask].astype(np.float64)
    x -= x.mean()
    y -= y.mean()
    den = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum() / den) if den > 0 else float("nan")


def ncc_score(he_nuclei: np.ndarray, he_tissue: np.ndarray, dapi: np.ndarray, affine_work: np.ndarray,
              sigma: float = 1.0, erode_px: int = 2) -> tuple[float, float]:
    """QC score of one transform at working resolution.

    Args:
        he_nuclei: H&E haematoxylin (H, W) at the working resolution.
        he_tissue: H&E tissue mask (H, W).
        dapi: CODEX DAPI (h, w) at the working resolution.
        affine_work: 3x3, DAPI working px -> H&E working px.
        sigma: Gaussian smoothing (working px) of both images before the correlation.
        erode_px: margin dropped inside the CODEX footprint (interpolation edge).

    Returns:
        (NCC inside H&E tissue covered by the CODEX, covered fraction of the H&E tissue).
    """
    shape = he_nuclei.shape
    warped = warp(dapi.astype(np.float32), affine_work, shape)
    foot = warp(np.ones(dapi.shape, np.uint8), affine_work, shape, nearest=True)
    return ncc_in_footprint(he_nuclei, he_tissue, warped, foot, sigma, erode_px)


def ncc_in_footprint(he_nuclei: np.ndarray, he_tissue: np.ndarray, warped: np.ndarray, foot: np.ndarray,
                     sigma: float = 1.0, erode_px: int = 2) -> tuple[float, float]:
    """:func:`ncc_score` of a DAPI already warped into the H&E working grid (``warped``, its footprint ``foot``
    (H, W) uint8/bool): (NCC inside the covered tissue, covered fraction of the tissue)."""
    foot = foot.astype(np.uint8)
    if erode_px > 0:
        foot = cv2.erode(foot, np.ones((2 * erode_px + 1, 2 * erode_px + 1), np.uint8))
    foot = foot.astype(bool)
    mask = foot & he_tissue
    if sigma > 0:
        a = cv2.GaussianBlur(he_nuclei.astype(np.float32), (0, 0), sigma)
        b = cv2.GaussianBlur(warped.astype(np.float32), (0, 0), sigma)
    else:
        a, b = he_nuclei, warped
    covered = float(mask.sum() / max(1, he_tissue.sum()))
    return ncc(a, b, mask), covered


# ----------------------------------------------------------------------------------------------------------------
# QC figure


def two_colour(he_nuclei: np.ndarray, dapi: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """RGB (h, w, 3) float in [0, 1]: haematoxylin in magenta, DAPI in green (white where they coincide)."""
    h = robust_normalize(he_nuclei, mask)
    d = robust_normalize(dapi, mask if mask is not None and mask.any() else None)
    return np.stack([h, d, h], axis=-1)


def save_overlay_png(path: str | os.PathLike, panels: list[tuple[str, np.ndarray]], title: str) -> None:
    """Save side-by-side RGB panels (list of (title, (h, w, 3) float image)) as a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from pipeline.io import atomic_path

    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.6), squeeze=False)
    for ax, (t, img) in zip(axes[0], panels):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(t, fontsize=8)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
