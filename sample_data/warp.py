"""Non-rigid truth of the synthetic cohort: a smooth random displacement between the H&E and the CODEX placement.

Serial or re-stained sections are not related by one affine; the cohort adds a smooth random displacement field
d(w) (world µm, amplitude up to ``amplitude_um``, correlation length ``corr_um`` >= 1.5 mm) on top of the CODEX
affine: the CODEX is rendered from the same cells moved from w to w - d(w). d is bilinear on a world-frame node
lattice (``node_um`` apart), so it does not depend on the H&E pixel size: a 20x and a 40x twin share their CODEX.
The ground truth stores it in the pipeline's convention (docs/FORMATS.md): D(x_he) = d(w(x_he)) / he_mpp sampled
at the H&E nodes x = j·S, y = i·S (S = ``node_um`` / he_mpp px), bilinear between nodes, edge values beyond the
last node; the true H&E -> CODEX map is ``x_codex = inv(A) @ (x_he - D(x_he))``. The H&E nodes sit half an H&E
pixel off the world nodes, so the stored bilinear D differs from the rendered d by a few nm (< 0.01 µm, measured
for a 15 µm warp), far below any registration error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage as ndi

from .cells import Cells
from .layout import Layout, smooth_field

MIN_CORR_UM = 1500.0
"""Shortest correlation length of the displacement (µm): local deformation of serial sections is smooth."""


@dataclass
class Warp:
    """The displacement of one slide: ``grid`` (2, G, G) float64 (dx, dy) in µm at world points (j, i)·``node_um``,
    bilinear in between, edge values beyond."""

    grid: np.ndarray
    node_um: float

    def d_um(self, x_um: np.ndarray, y_um: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """d(w) in µm at world points (µm)."""
        xs = np.asarray(x_um, np.float64) / self.node_um
        ys = np.asarray(y_um, np.float64) / self.node_um
        coords = np.stack([ys.ravel(), xs.ravel()])
        out = [ndi.map_coordinates(self.grid[k], coords, order=1, mode="nearest").reshape(np.shape(xs))
               for k in range(2)]
        return out[0], out[1]

    def inverse_um(self, vx: np.ndarray, vy: np.ndarray, iters: int = 6) -> tuple[np.ndarray, np.ndarray]:
        """World points w with w - d(w) = v (fixed point; d is smooth, a few iterations reach 1e-6 µm)."""
        wx, wy = np.asarray(vx, np.float64), np.asarray(vy, np.float64)
        for _ in range(iters):
            dx, dy = self.d_um(wx, wy)
            wx, wy = vx + dx, vy + dy
        return wx, wy

    def he_nodes(self, he_shape: tuple[int, int], he_mpp: float) -> tuple[np.ndarray, float]:
        """The ground-truth array: D (2, Gy, Gx) float32 in H&E level-0 px at H&E nodes (j, i)·S, and S (px)."""
        h, w = he_shape
        step = self.node_um / he_mpp
        gy, gx = int(math.ceil((h - 1) / step)) + 1, int(math.ceil((w - 1) / step)) + 1
        xx, yy = np.meshgrid((np.arange(gx) * step + 0.5) * he_mpp, (np.arange(gy) * step + 0.5) * he_mpp)
        dx, dy = self.d_um(xx, yy)
        return (np.stack([dx, dy]) / he_mpp).astype(np.float32), float(step)


def make_warp(rng: np.random.Generator, side_um: float, amplitude_um: float, corr_um: float = MIN_CORR_UM,
              node_um: float = 50.0) -> Warp:
    """Draw a smooth displacement over the world frame [0, side_um)²: two independent smooth Gaussian fields
    (correlation length ``corr_um``, at least :data:`MIN_CORR_UM`), scaled so that the largest |d| on the lattice
    is ``amplitude_um``."""
    g = int(math.ceil(side_um / node_um)) + 1
    corr = max(float(corr_um), MIN_CORR_UM)
    d = np.stack([smooth_field(rng, (g, g), corr / node_um) for _ in range(2)]).astype(np.float64)
    top = float(np.hypot(d[0], d[1]).max())
    return Warp(d * (amplitude_um / top if top > 0 else 0.0), float(node_um))


def displaced(cells: Cells, layout: Layout, warp: Warp) -> tuple[Cells, Layout]:
    """The cells and layout as the CODEX sees them: every world point w moved to w - d(w).

    Cell centres and vessel centres move; the coarse layout maps are resampled (map'(v) = map(w), w - d(w) = v).
    Cell shapes and orientations are kept (the field's strain is ~1e-2).
    """
    dx, dy = warp.d_um(cells.x, cells.y)
    moved = replace(cells, x=(cells.x - dx).astype(np.float32), y=(cells.y - dy).astype(np.float32))
    g = layout.grid_um
    n = layout.tissue.shape[0]
    cc = (np.arange(n, dtype=np.float64) + 0.5) * g
    vx, vy = np.meshgrid(cc, cc)
    wx, wy = warp.inverse_um(vx, vy)
    coords = np.stack([wy / g - 0.5, wx / g - 0.5])

    def resample(m: np.ndarray) -> np.ndarray:
        return ndi.map_coordinates(m, coords, order=1, mode="nearest").astype(m.dtype)

    ves = layout.vessels.copy()
    if len(ves):
        vdx, vdy = warp.d_um(ves[:, 0], ves[:, 1])
        ves[:, 0] -= vdx.astype(np.float32)
        ves[:, 1] -= vdy.astype(np.float32)
    new = replace(layout, tissue=resample(layout.tissue), tumour=resample(layout.tumour),
                  airspace=resample(layout.airspace), aggregate=resample(layout.aggregate), vessels=ves)
    return moved, new
