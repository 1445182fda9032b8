"""Values of a virtual CODEX map at level-0 points: the one sampler of the patch maps (stage 06), the dense maps,
the upsampled baseline of ``hex.test`` and stage 10's cells.

A map pixel (r, q) of side ``s`` level-0 px covers [q s - 1/2, (q + 1) s - 1/2) (pixel centres at integers, the
convention of the patches), so its centre is at ((q + 1/2) s - 1/2, (r + 1/2) s - 1/2).
"""

from __future__ import annotations

import numpy as np


def sample_map(values: np.ndarray, mask: np.ndarray, pixel_level0: float, xy: np.ndarray,
               origin: tuple[int, int] = (0, 0)) -> tuple[np.ndarray, np.ndarray]:
    """Mask-weighted bilinear interpolation between the centres of the four map pixels around each point.

    Args:
        values: (h, w, M) map (or a window of one), rows = y. mask: (h, w) bool, True = tissue.
        pixel_level0: map pixel side s in level-0 px. xy: (K, 2) level-0 (x, y) px, pixel centres at integers.
        origin: (row, column) of ``values[0, 0]`` in the whole map, for a window.

    Returns:
        (K, M) float32 (each neighbour weighted by the mask, so no value leaks in from outside the tissue; NaN where
        none of the four neighbours is tissue or inside ``values``) and (K,) bool (a value was found).
    """
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    h, w, m = values.shape
    s = float(pixel_level0)
    u = (xy[:, 0] + 0.5) / s - 0.5 - origin[1]
    v = (xy[:, 1] + 0.5) / s - 0.5 - origin[0]
    c0, r0 = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    fu, fv = u - c0, v - r0
    acc = np.zeros((len(xy), m), np.float64)
    wsum = np.zeros(len(xy), np.float64)
    for dr, dc in ((0, 0), (0, 1), (1, 0), (1, 1)):
        r, c = r0 + dr, c0 + dc
        wt = (fv if dr else 1 - fv) * (fu if dc else 1 - fu)
        ok = (r >= 0) & (r < h) & (c >= 0) & (c < w)
        rr, cc = np.clip(r, 0, h - 1), np.clip(c, 0, w - 1)
        wk = np.where(ok & mask[rr, cc], wt, 0.0)
        acc += wk[:, None] * values[rr, cc]
        wsum += wk
    inside = wsum > 1e-9
    out = np.full((len(xy), m), np.nan, np.float32)
    out[inside] = (acc[inside] / wsum[inside, None]).astype(np.float32)
    return out, inside
