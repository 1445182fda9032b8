"""Tissue segmentation on a slide thumbnail, and the tissue fraction of square patches.

The mask is computed on an RGB thumbnail (a few thousand pixels wide): HSV saturation (stain is coloured, glass
and background are grey or white), a median blur, a threshold (Otsu's by default, never below a floor so that a
blank slide is not split into "tissue" and "less tissue"), then a morphological closing, removal of fragments
smaller than ``min_area_um2`` and filling of holes smaller than ``max_hole_um2``. Every size is given in µm or
µm² and converted with the thumbnail's pixel size, so the same flags work at any magnification.

Tissue fractions of patches are exact area fractions of the (piecewise-constant) thumbnail mask: the integral
image of the mask is bilinear inside each thumbnail pixel, so interpolating it at fractional patch edges gives
the covered area without resampling the mask.

Coordinates: thumbnail pixel j covers level-0 edge coordinates [j*ds, (j+1)*ds) where ds is the thumbnail
downsample (level-0 px per thumbnail px); a level-0 patch with top-left pixel x and size s covers [x, x+s).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TissueParams:
    """Thresholds of the tissue mask (sizes in µm / µm² so they do not depend on the thumbnail scale).

    Attributes:
        sat_threshold: fixed saturation threshold in [0, 1]; None = Otsu's threshold on the thumbnail.
        min_saturation: floor of the threshold in [0, 1] (a blank slide has saturation below it everywhere).
        median_um: side of the median blur applied to the saturation before thresholding (µm; 0 = none).
        close_um: radius of the morphological closing that joins nearby tissue (µm; 0 = none).
        min_area_um2: tissue fragments smaller than this are removed (µm²).
        max_hole_um2: holes (lumen, tears) smaller than this are filled (µm²).
    """

    sat_threshold: float | None = None
    min_saturation: float = 0.05
    median_um: float = 16.0
    close_um: float = 8.0
    min_area_um2: float = 10_000.0
    max_hole_um2: float = 10_000.0

    def to_dict(self) -> dict:
        return asdict(self)


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation (max - min) / max of an RGB image (h, w, 3) uint8, as float32 in [0, 1] (0 where max = 0)."""
    rgb = np.asarray(rgb)
    mx = rgb.max(axis=2).astype(np.float32)
    mn = rgb.min(axis=2).astype(np.float32)
    return np.where(mx > 0, (mx - mn) / np.maximum(mx, 1.0), 0.0).astype(np.float32)


def _otsu(values: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    values = values.ravel()
    if values.size == 0 or float(values.max()) == float(values.min()):
        return float(values.max()) if values.size else 0.0
    return float(threshold_otsu(values, nbins=256))


def grid_tissue_mask(rgb: np.ndarray, thumb_mpp: float,
                     params: TissueParams = TissueParams()) -> tuple[np.ndarray, float]:
    """Segment tissue on a thumbnail for the patch grid (HSV saturation; the registration's mask is
    :func:`preprocess.registration_qc.registration_tissue_mask`, an optical-density one).

    Args:
        rgb: thumbnail (h, w, 3) uint8.
        thumb_mpp: µm per thumbnail pixel (level-0 mpp x thumbnail downsample).
        params: thresholds, see :class:`TissueParams`.

    Returns:
        (mask (h, w) bool, the saturation threshold used in [0, 1]).
    """
    import cv2
    from skimage import morphology

    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"expected an RGB thumbnail (h, w, 3), got shape {rgb.shape}")
    sat = saturation(rgb[..., :3])
    k = int(round(params.median_um / thumb_mpp)) if params.median_um > 0 else 0
    if k >= 2:
        k = k + 1 if k % 2 == 0 else k
        sat8 = (sat * 255).round().astype(np.uint8)
        sat = cv2.medianBlur(sat8, min(k, 255)).astype(np.float32) / 255.0
    thr = params.sat_threshold if params.sat_threshold is not None else _otsu(sat)
    thr = max(float(thr), params.min_saturation)
    mask = sat > thr
    px_area = thumb_mpp**2
    r = int(round(params.close_um / thumb_mpp)) if params.close_um > 0 else 0
    if r >= 1 and mask.any():
        # pad so that the closing does not glue tissue to the image border
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        closed = cv2.morphologyEx(np.pad(mask, r).astype(np.uint8), cv2.MORPH_CLOSE, kernel)
        mask = closed[r:-r, r:-r].astype(bool)
    min_px = int(np.ceil(params.min_area_um2 / px_area))
    if min_px > 1:
        mask = morphology.remove_small_objects(mask, min_size=min_px)
    hole_px = int(np.ceil(params.max_hole_um2 / px_area))
    if hole_px > 1:
        mask = morphology.remove_small_holes(mask, area_threshold=hole_px)
    return mask.astype(bool), float(thr)


def patch_tissue_fraction(mask: np.ndarray, downsample: float, coords: np.ndarray, size_level0: float) -> np.ndarray:
    """Exact fraction of each square patch covered by the thumbnail mask.

    Args:
        mask: (h, w) bool thumbnail mask.
        downsample: level-0 px per thumbnail px (a float; thumbnails need not divide the slide evenly).
        coords: (N, 2) level-0 top-left pixel (x, y) of each patch.
        size_level0: patch side in level-0 px.

    Returns:
        (N,) float64 fractions in [0, 1]; parts of a patch outside the thumbnail count as background.
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    h, w = mask.shape
    integral = np.zeros((h + 1, w + 1), np.float64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.float64), axis=1)

    def area_to(xe: np.ndarray, ye: np.ndarray) -> np.ndarray:
        """Mask area in [0, xe) x [0, ye) (thumbnail edge coordinates), bilinear in the integral image."""
        xe = np.clip(xe, 0, w)
        ye = np.clip(ye, 0, h)
        x0 = np.minimum(np.floor(xe).astype(np.int64), w - 1)
        y0 = np.minimum(np.floor(ye).astype(np.int64), h - 1)
        fx, fy = xe - x0, ye - y0
        i00 = integral[y0, x0]
        i01 = integral[y0, x0 + 1]
        i10 = integral[y0 + 1, x0]
        i11 = integral[y0 + 1, x0 + 1]
        return (i00 * (1 - fx) * (1 - fy) + i01 * fx * (1 - fy) + i10 * (1 - fx) * fy + i11 * fx * fy)

    x0 = coords[:, 0] / downsample
    y0 = coords[:, 1] / downsample
    x1 = (coords[:, 0] + size_level0) / downsample
    y1 = (coords[:, 1] + size_level0) / downsample
    area = area_to(x1, y1) - area_to(x0, y1) - area_to(x1, y0) + area_to(x0, y0)
    return np.clip(area / ((x1 - x0) * (y1 - y0)), 0.0, 1.0)
