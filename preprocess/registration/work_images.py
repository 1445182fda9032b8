"""Whole-image working copies of the H&E and the CODEX at a chosen pixel size (a few µm per pixel)."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from preprocess.registration_qc import scale_to_level0
from preprocess.slide_io import CodexImage, HESlide


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


def _resized(img: np.ndarray, level_wh: tuple[int, int], target_wh: tuple[int, int], d: float):
    lw, lh = level_wh
    wt, ht = target_wh
    if (lw, lh) != (wt, ht):
        img = cv2.resize(img, (wt, ht), interpolation=cv2.INTER_AREA)
    return img, scale_to_level0(d * lw / wt, d * lh / ht)


def read_he_work(he: HESlide, mpp: float) -> WorkImage:
    """The whole H&E as RGB (h, w, 3) uint8 at ``mpp`` µm/px, read from the finest sufficient pyramid level."""
    ds = mpp / he.mpp
    w0, h0 = he.dimensions
    wt, ht = max(1, round(w0 / ds)), max(1, round(h0 / ds))
    level, d = he.level_for_mpp(mpp)
    lw, lh = he.level_dimensions[level]
    img, to0 = _resized(he.read_region(0, 0, level, (lw, lh)), (lw, lh), (wt, ht), d)
    return WorkImage(img, to0, mpp)


def read_codex_work(codex: CodexImage, channel: int, mpp: float) -> WorkImage:
    """One CODEX channel (h, w) float32 at ``mpp`` µm/px (area-averaged from the finest sufficient level)."""
    ds = mpp / codex.mpp
    w0, h0 = codex.dimensions
    wt, ht = max(1, round(w0 / ds)), max(1, round(h0 / ds))
    level, d = codex.level_for_mpp(mpp)
    img = np.asarray(codex.level(level)[channel]).astype(np.float32)
    lh, lw = img.shape
    img, to0 = _resized(img, (lw, lh), (wt, ht), d)
    return WorkImage(img, to0, mpp)
