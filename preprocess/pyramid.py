"""The one rule that picks a pyramid level for a wanted pixel size (H&E slides and CODEX images alike).

A level is usable for a target pixel size when its pixels are not coarser than the target, up to a relative
tolerance ``MPP_TOLERANCE`` (1%): a 0.502 µm/px Aperio level-0 serves a 0.5 µm/px target as it is, without
resampling. Downsamples that are within 1% of an integer are taken as that integer (pyramid levels of odd-sized
images report e.g. 3.9996 for a nominal 4).
"""

from __future__ import annotations

from collections.abc import Sequence

MPP_TOLERANCE = 0.01
"""Relative pixel-size tolerance: within it two pixel sizes are the same and nothing is resampled."""


def nominal_downsample(d: float) -> float:
    """A level downsample rounded to the integer it approximates (within 1%); otherwise unchanged."""
    r = round(d)
    return float(r) if r >= 1 and abs(d / r - 1) < MPP_TOLERANCE else float(d)


def same_mpp(a: float, b: float, tol: float = MPP_TOLERANCE) -> bool:
    """Whether two pixel sizes agree within the relative tolerance ``tol``."""
    return abs(a / b - 1.0) <= tol


def choose_level(level_downsamples: Sequence[float], level0_mpp: float, target_mpp: float,
                 tol: float = MPP_TOLERANCE) -> tuple[int, float]:
    """The coarsest level whose pixel size is at most ``target_mpp`` (x (1 + ``tol``)); level 0 when none is.

    Args:
        level_downsamples: level-0 px per level px, one per level (increasing).
        level0_mpp: µm per level-0 pixel (pass 1.0 to choose by downsample instead of by pixel size).
        target_mpp: the wanted µm per pixel (or downsample).

    Returns:
        (level index, its nominal downsample).
    """
    best, best_d = 0, nominal_downsample(level_downsamples[0]) if level_downsamples else 1.0
    for i, d in enumerate(level_downsamples):
        dn = nominal_downsample(d)
        if level0_mpp * dn <= target_mpp * (1.0 + tol):
            best, best_d = i, dn
    return best, best_d
