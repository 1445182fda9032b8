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


# ---------------------------------------------------------------------------------------------------------------
# Artefacts: ink, folds, bubbles, blur (colour, darkness, ring and focus measures, each relative to the slide)
#
# What the established tools measure, and what is done here on a "QC image" at --qc-mpp (2 µm/px by default, read
# in tiles from the pyramid level closest to it; never finer than the thumbnail):
# - pen ink (HistoQC's pen-marking templates, GrandQC's "pen marking" class): ink is a dye outside the H&E cone.
#   In optical density (OD = -ln(I / white)) every haematoxylin/eosin/RBC mix absorbs green more than red
#   (OD_G / OD_R ~2.5 over a slide's tissue); green and blue markers absorb red most (OD_G / OD_R well below 1, and
#   about half the tissue's where ink lies on tissue) and black ink absorbs the three channels alike (OD_B / OD_G
#   near 1, where H&E stays near 0.5). Both ratios are taken relative to the slide's own tissue median.
# - folds (HistoQC's dark-tissue threshold, GrandQC's "fold" class): two layers of tissue are about twice as dark:
#   OD above ``fold_ratio`` x the median OD of the slide's tissue. Dark debris is caught by the same measure.
# - air bubbles (HistoQC's BubbleRegionByRegion: dark thin ridges by a Frangi filter): the refraction ring is a
#   thin, dark, grey (achromatic) outline; a closed ring is filled to the bubble it bounds.
# - blur (HistoQC's BlurDetectionModule: smoothed |Laplacian| of the grey image under a threshold; GrandQC's
#   "out of focus"): the high-frequency share of the detail energy, |I - G1(I)| / |G1(I) - G3(I)| smoothed, below
#   ``blur_ratio`` x the slide's tissue median (a ratio, so pale and dense tissue score alike; JPEG quality moves
#   the whole slide, not a region).

ARTEFACT_CAUSES = ("ink", "fold", "bubble", "blur")
QC_COLOURS = {"ink": (255, 0, 255), "fold": (255, 140, 0), "bubble": (0, 200, 255), "blur": (255, 230, 0)}  # RGB


@dataclass(frozen=True)
class ArtefactParams:
    """Switches and thresholds of the artefact exclusion (µm sizes; ratios are relative to the slide's tissue).

    Attributes:
        ink, folds, bubbles, blur: each exclusion on (True) or off.
        qc_mpp: µm/px of the QC image the measures are computed on (never finer than the thumbnail).
        ink_gr: OD_G / OD_R below this x its median over the slide's tissue is coloured ink (green and blue
            markers absorb red most; H&E mixes absorb green most).
        ink_bg: OD_B / OD_G above this x its tissue median, with OD_G / OD_R below 0.75 x its median and mean OD
            > 0.6, is black ink (absorbs the three channels alike).
        min_od: mean OD below which a pixel is too pale for a colour measure.
        bubble_chroma: OD chroma (max - min) / mean below this over a bubble-sized region is the grey tissue
            seen through an air bubble (H&E stays far above it).
        fold_ratio: mean OD above this x the slide's tissue median is a fold (or dark debris).
        blur_ratio: detail-energy ratio below this x the slide's tissue median is out of focus.
        blur_min_detail: a blurred region keeps at least this coarse detail energy (mean |G1 - G3| of the grey
            image, a fraction of white; tissue has ~0.04, blurred tissue ~0.02): flat colour is not out of focus.
        smooth_um: Gaussian sigma of the measures' smoothing (µm).
        blur_um: sigma of the focus measure's local averaging (µm).
        min_area_um2: excluded regions smaller than this are dropped (µm²).
        margin_um: each excluded region grows by this (µm; soft artefact edges).
        max_artefact: a patch is dropped when more than this fraction of its area is excluded.
    """

    ink: bool = True
    folds: bool = True
    bubbles: bool = True
    blur: bool = True
    qc_mpp: float = 2.0
    ink_gr: float = 0.55
    ink_bg: float = 1.35
    min_od: float = 0.08
    bubble_chroma: float = 0.3
    fold_ratio: float = 2.0
    blur_ratio: float = 0.6
    blur_min_detail: float = 0.008
    smooth_um: float = 6.0
    blur_um: float = 12.0
    min_area_um2: float = 400.0
    margin_um: float = 10.0
    max_artefact: float = 0.05

    @property
    def any(self) -> bool:
        return self.ink or self.folds or self.bubbles or self.blur

    def to_dict(self) -> dict:
        return asdict(self)


def white_point(rgb: np.ndarray, tissue: np.ndarray | None = None) -> np.ndarray:
    """The slide's background white per channel (float32 (3,)): the median of the non-tissue pixels (of the
    brightest quarter of the image when no mask is given or it leaves none)."""
    px = rgb[..., :3].reshape(-1, 3).astype(np.float32)
    if tissue is not None and (~tissue).sum() >= 16:
        bg = px[~tissue.ravel()]
    else:
        lum = px.sum(axis=1)
        bg = px[lum >= np.quantile(lum, 0.75)]
    return np.maximum(np.median(bg, axis=0), 1.0).astype(np.float32)


def qc_measures(rgb: np.ndarray, white: np.ndarray, mpp: float) -> dict[str, np.ndarray]:
    """Per-pixel measures of one QC tile (h, w, 3) uint8 at ``mpp`` µm/px, each float32 (h, w).

    ``od_r``, ``od_g``, ``od_b``: optical density per channel; ``fine``, ``coarse``: |I - G1(I)| and |G1(I) -
    G3(I)| of the grey image (Gaussian sigmas 1 and 3 px at 2 µm/px, scaled to ``mpp``), the detail energy the focus
    measure compares; ``ring``: 1 on thin (< ~10 µm) dark achromatic lines (bubble outlines), else 0.
    """
    import cv2

    img = rgb[..., :3].astype(np.float32) / white[None, None, :]
    od = -np.log(np.clip(img, 1.0 / 255.0, 1.0))
    grey = img.mean(axis=2)
    s1 = max(0.5, 2.0 / mpp)
    g1 = cv2.GaussianBlur(grey, (0, 0), s1)
    g3 = cv2.GaussianBlur(grey, (0, 0), 3.0 * s1)
    fine = np.abs(grey - g1)
    coarse = np.abs(g1 - g3)
    mean_od = od.mean(axis=2)
    chroma = (od.max(axis=2) - od.min(axis=2)) / np.maximum(mean_od, 1e-3)
    dark_grey = ((mean_od > 0.45) & (chroma < 0.35)).astype(np.uint8)
    r = max(1, int(round(6.0 / mpp)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    thick = cv2.morphologyEx(dark_grey, cv2.MORPH_OPEN, kernel)
    ring = (dark_grey & (1 - thick)).astype(np.float32)
    return {"od_r": od[..., 0], "od_g": od[..., 1], "od_b": od[..., 2], "fine": fine, "coarse": coarse,
            "ring": ring}


def _resize(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    import cv2

    if a.shape == shape:
        return a
    shrink = shape[0] < a.shape[0]
    return cv2.resize(a, (shape[1], shape[0]), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _clean(mask: np.ndarray, grid_mpp: float, params: ArtefactParams) -> np.ndarray:
    """Drop regions smaller than ``min_area_um2`` and grow the rest by ``margin_um``."""
    import cv2
    from skimage import morphology

    min_px = int(np.ceil(params.min_area_um2 / grid_mpp ** 2))
    if min_px > 1 and mask.any():
        mask = morphology.remove_small_objects(mask, min_size=min_px)
    r = int(round(params.margin_um / grid_mpp))
    if r >= 1 and mask.any():
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        mask = cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)
    return mask


def artefact_masks(maps: dict[str, np.ndarray], tissue: np.ndarray, grid_mpp: float,
                   params: ArtefactParams = ArtefactParams()) -> dict[str, np.ndarray]:
    """Excluded regions by cause on the QC grid.

    Args:
        maps: :func:`qc_measures`' maps averaged onto the QC grid (each (h, w) float32).
        tissue: (h, w) bool tissue mask on the same grid (:func:`grid_tissue_mask`, resized).
        grid_mpp: µm per QC-grid pixel.
        params: switches and thresholds.

    Returns:
        ``{cause: (h, w) bool}`` for the causes of :data:`ARTEFACT_CAUSES` (all False when switched off); a pixel
        belongs to the first cause that claims it (bubble, ink, fold, blur), so the masks do not overlap.
    """
    import cv2
    from scipy import ndimage as ndi
    from skimage import morphology

    shape = tissue.shape
    sig = params.smooth_um / grid_mpp

    def smooth(a: np.ndarray, s: float = sig) -> np.ndarray:
        return cv2.GaussianBlur(a.astype(np.float32), (0, 0), s) if s >= 0.5 else a.astype(np.float32)

    od = np.stack([smooth(maps[k]) for k in ("od_r", "od_g", "od_b")], axis=-1)
    mean_od = od.mean(axis=2)
    out = {c: np.zeros(shape, bool) for c in ARTEFACT_CAUSES}
    coloured = mean_od > params.min_od
    # tissue plus what looks like it (ink on glass is saturated, so the saturation mask holds it)
    region = tissue | coloured
    taken = np.zeros(shape, bool)
    ring_any = smooth(maps["ring"], 1.0 / grid_mpp) > 0.2
    rr = max(1, int(round(8.0 / grid_mpp)))
    near_ring = cv2.dilate(ring_any.astype(np.uint8),
                           cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * rr + 1, 2 * rr + 1))).astype(bool)
    gr = od[..., 1] / np.maximum(od[..., 0], 1e-3)
    bg = od[..., 2] / np.maximum(od[..., 1], 1e-3)
    ref = tissue & coloured
    ref = ref if ref.sum() >= 16 else coloured
    gr_med = float(np.median(gr[ref])) if ref.any() else 2.5
    bg_med = float(np.median(bg[ref])) if ref.any() else 0.5
    inky = gr < params.ink_gr * gr_med
    if params.bubbles:
        ring = smooth(maps["ring"], 1.0 / grid_mpp) > 0.2
        r = max(1, int(round(4.0 / grid_mpp)))
        ring = cv2.morphologyEx(ring.astype(np.uint8), cv2.MORPH_CLOSE,
                                cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))).astype(bool)
        filled = ndi.binary_fill_holes(ring)
        min_px = np.pi * (30.0 / grid_mpp) ** 2  # a bubble encloses at least a 30 µm radius disc
        lab, n = ndi.label(filled)
        if n:
            sizes = ndi.sum(filled & ~ring, lab, index=np.arange(1, n + 1))
            keep = np.concatenate([[False], sizes >= min_px])
            bub = keep[lab]
        else:
            bub = np.zeros(shape, bool)
        # the colour shift inside: tissue seen through air is grey (low OD chroma) yet not dark
        chroma = (od.max(axis=2) - od.min(axis=2)) / np.maximum(mean_od, 1e-3)
        grey = coloured & (chroma < params.bubble_chroma) & (mean_od < 0.6) & ~inky
        grey = morphology.remove_small_objects(grey, min_size=int(np.ceil(min_px)))
        bub |= grey
        out["bubble"] = _clean(bub, grid_mpp, params) & ~taken
        taken |= out["bubble"]
    if params.ink:
        # black ink is dark grey like a bubble's ring: not next to one
        black = (bg > params.ink_bg * bg_med) & (gr < 0.75 * gr_med) & (mean_od > 0.6) & ~near_ring
        out["ink"] = _clean(coloured & (inky | black) & region, grid_mpp, params) & ~taken
    taken |= out["ink"]
    tis = tissue & ~taken
    if params.folds and tis.any():
        med = float(np.median(mean_od[tis]))
        fold = tis & (mean_od > params.fold_ratio * med)
        out["fold"] = _clean(fold, grid_mpp, params) & ~taken
        taken |= out["fold"]
    if params.blur and tis.any():
        s = params.blur_um / grid_mpp
        coarse, fine = smooth(maps["coarse"], s), smooth(maps["fine"], s)
        ratio = fine / np.maximum(coarse, 1e-4)
        core = tissue & ~taken
        core = ndi.binary_erosion(core, iterations=max(1, int(round(params.blur_um / grid_mpp))))
        ref = core if core.sum() >= 64 else (tissue & ~taken)
        med = float(np.median(ratio[ref]))
        # a region without structure at any scale (flat colour, no cells) has no focus to lose: blurred tissue
        # keeps its coarse detail (cells, ~2-6 µm), a flat colour has none
        structured = coarse > params.blur_min_detail
        # and little fine detail itself (a sharp tissue outline has a low ratio but plenty of fine detail)
        blur = tissue & ~taken & (ratio < params.blur_ratio * med) & structured
        blur &= fine < params.blur_ratio * float(np.median(fine[ref]))
        # the tissue's own outline is a strong coarse edge (a low ratio there): keep regions that reach the core
        lab, n = ndi.label(blur)
        if n:
            seeded = np.zeros(n + 1, bool)
            seeded[np.unique(lab[blur & core])] = True
            seeded[0] = False
            blur = seeded[lab]
        out["blur"] = _clean(blur, grid_mpp, params) & ~taken
    return out


def slide_artefacts(slide, thumb: np.ndarray, thumb_ds: float, tissue: np.ndarray,
                    params: ArtefactParams = ArtefactParams(), tile: int = 2048) -> dict[str, np.ndarray]:
    """Excluded regions by cause on the thumbnail grid, measured on a QC image read from ``slide``.

    Args:
        slide: an open :class:`preprocess.slide_io.HESlide` (``mpp``, ``dimensions``, ``level_downsamples``,
            ``level_dimensions``, ``level_for_mpp``, ``read_region``).
        thumb: the thumbnail (h, w, 3) uint8 the tissue mask was made on; ``thumb_ds`` its level-0 px per px.
        tissue: (h, w) bool tissue mask of the thumbnail.
        params: see :class:`ArtefactParams`.
        tile: side of the regions read at the QC level (px at that level).

    Returns:
        ``{cause: (h, w) bool}`` (:func:`artefact_masks`, resized to the thumbnail grid by nearest neighbour).

    The QC image is the pyramid level closest to (not coarser than) ``qc_mpp``, read in tiles with a margin and
    resized to ``qc_mpp``; its measures are averaged onto the QC grid: the thumbnail's when that is coarser than
    ``qc_mpp`` (real slides), else a grid of ``qc_mpp`` pixels (small slides).
    """
    import cv2

    h, w = tissue.shape
    if not params.any or not tissue.any():
        return {c: np.zeros((h, w), bool) for c in ARTEFACT_CAUSES}
    mpp0 = float(slide.mpp)
    thumb_mpp = mpp0 * thumb_ds
    w0, h0 = slide.dimensions
    if thumb_mpp >= params.qc_mpp:
        grid_ds, gh, gw = float(thumb_ds), h, w
    else:
        grid_ds = params.qc_mpp / mpp0
        gh, gw = max(1, int(round(h0 / grid_ds))), max(1, int(round(w0 / grid_ds)))
    grid_mpp = mpp0 * grid_ds
    white = white_point(thumb, tissue)
    level, _ = slide.level_for_mpp(params.qc_mpp)
    lds = float(slide.level_downsamples[level])
    lw, lh = slide.level_dimensions[level]
    f = min(1.0, (mpp0 * lds) / params.qc_mpp)  # level px -> QC px
    qc_mpp = mpp0 * lds / f
    margin = int(np.ceil(24 / f))  # level px of context around each tile (~24 QC px)
    keys = ("od_r", "od_g", "od_b", "fine", "coarse", "ring")
    sums = {k: np.zeros(gh * gw, np.float64) for k in keys}
    count = np.zeros(gh * gw, np.float64)
    for ty in range(0, lh, tile):
        for tx in range(0, lw, tile):
            x0, y0 = max(0, tx - margin), max(0, ty - margin)
            x1, y1 = min(lw, tx + tile + margin), min(lh, ty + tile + margin)
            rgb = slide.read_region(int(round(x0 * lds)), int(round(y0 * lds)), level, (x1 - x0, y1 - y0))
            if f < 0.99:
                rgb = cv2.resize(rgb, (max(1, int(round((x1 - x0) * f))), max(1, int(round((y1 - y0) * f)))),
                                 interpolation=cv2.INTER_AREA)
            m = qc_measures(rgb, white, qc_mpp)
            qh, qw = rgb.shape[:2]
            # QC px centres in level-0 px; the tile's own (not margin) pixels only
            cx = (x0 + (np.arange(qw) + 0.5) * (x1 - x0) / qw) * lds
            cy = (y0 + (np.arange(qh) + 0.5) * (y1 - y0) / qh) * lds
            sx = (cx >= tx * lds) & (cx < min(tx + tile, lw) * lds)
            sy = (cy >= ty * lds) & (cy < min(ty + tile, lh) * lds)
            gx = np.minimum((cx[sx] / grid_ds).astype(np.int64), gw - 1)
            gy = np.minimum((cy[sy] / grid_ds).astype(np.int64), gh - 1)
            idx = (gy[:, None] * gw + gx[None, :]).ravel()
            count += np.bincount(idx, minlength=gh * gw)
            for k in keys:
                sums[k] += np.bincount(idx, weights=m[k][np.ix_(sy, sx)].ravel(), minlength=gh * gw)
    cnt = np.maximum(count, 1.0)
    maps = {k: (sums[k] / cnt).reshape(gh, gw).astype(np.float32) for k in keys}
    empty = (count == 0).reshape(gh, gw)
    if empty.any():  # grid pixels between QC pixels (grid finer than the level read): nearest filled value
        from scipy import ndimage as ndi

        idx = ndi.distance_transform_edt(empty, return_distances=False, return_indices=True)
        maps = {k: v[idx[0], idx[1]] for k, v in maps.items()}
    tis_grid = _resize(tissue.astype(np.float32), (gh, gw)) >= 0.5
    masks = artefact_masks(maps, tis_grid, grid_mpp, params)
    if (gh, gw) == (h, w):
        return masks
    return {c: cv2.resize(m.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
            for c, m in masks.items()}
