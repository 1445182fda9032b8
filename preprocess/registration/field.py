"""Displacement fields on top of the CODEX -> H&E affine: the non-rigid part of a registration.

Convention (the registration record and the sample cohort's ground truth share it): ``D`` is a (2, Gy, Gx)
float32 array of (dx, dy) in H&E level-0 px at the nodes x = j·S, y = i·S (S = ``step_px``); between nodes it is
bilinear, beyond the last node it keeps the edge value. A point x_he of the H&E shows the tissue at CODEX level-0
px ``x_codex = A^-1 (x_he - D(x_he))`` (A = ``affine_codex_to_he``). The inverse direction, CODEX -> H&E, solves
x_he = A x_codex + D(x_he) by Newton steps (D is smooth: a few steps reach 1e-9 px).

:func:`field_from_blocks` turns palom's block shifts into such a field: residuals of the blocks after the affine,
outlier blocks (far from a plane fitted to their neighbours) replaced from the neighbours, gaps filled from
weighted planes through the measured blocks around them, then sampled at the node lattice.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.io import atomic_path


@dataclass
class DisplacementField:
    """D(x_he) in H&E level-0 px on a node lattice (see the module docstring).

    Attributes:
        d: (2, Gy, Gx) float32, (dx, dy) at node (i, j) = level-0 (x, y) = (j·step, i·step).
        step: node spacing S in H&E level-0 px.
    """

    d: np.ndarray
    step: float

    def __post_init__(self) -> None:
        self.d = np.asarray(self.d, np.float32)
        if self.d.ndim != 3 or self.d.shape[0] != 2 or min(self.d.shape[1:]) < 1 or not self.step > 0:
            raise ValueError(f"a displacement field is (2, Gy, Gx) with step > 0, got {self.d.shape}, {self.step}")
        self._rows = self.d.reshape(2, -1).T.astype(np.float64)  # (Gy*Gx, 2): node (i, j) at row i*Gx + j

    # -- evaluation ------------------------------------------------------------------------------------------
    def sample(self, x: np.ndarray, y: np.ndarray, gradient: bool = False):
        """(dx, dy) at H&E level-0 points (arrays of any one shape), bilinear, edge-clamped; float64.

        With ``gradient`` also the four partial derivatives (d dx/dx, d dx/dy, d dy/dx, d dy/dy) (zero across a
        clamped edge).
        """
        gy, gx = self.d.shape[1:]
        shape = np.shape(x)
        fx = np.clip(np.asarray(x, np.float64).ravel() / self.step, 0, gx - 1)
        fy = np.clip(np.asarray(y, np.float64).ravel() / self.step, 0, gy - 1)
        j0 = np.minimum(fx.astype(np.int64), max(gx - 2, 0))
        i0 = np.minimum(fy.astype(np.int64), max(gy - 2, 0))
        tx, ty = (fx - j0)[:, None], (fy - i0)[:, None]
        idx = i0 * gx + j0
        dj, di = (1 if gx > 1 else 0), (gx if gy > 1 else 0)
        tab = self._rows
        v00, v01 = tab.take(idx, axis=0), tab.take(idx + dj, axis=0)  # (n, 2): both components at once
        v10, v11 = tab.take(idx + di, axis=0), tab.take(idx + di + dj, axis=0)
        top = v00 + tx * (v01 - v00)
        bot = v10 + tx * (v11 - v10)
        val = top + ty * (bot - top)
        out = (val[:, 0].reshape(shape), val[:, 1].reshape(shape))
        if not gradient:
            return out
        ex = ((fx > 0) & (fx < gx - 1))[:, None] / self.step  # zero slope beyond the clamped edge
        ey = ((fy > 0) & (fy < gy - 1))[:, None] / self.step
        ddx = (v01 - v00 + ty * (v11 - v10 - v01 + v00)) * ex  # d/dx of (dx, dy)
        ddy = (bot - top) * ey  # d/dy of (dx, dy)
        return (*out, ddx[:, 0].reshape(shape), ddy[:, 0].reshape(shape), ddx[:, 1].reshape(shape),
                ddy[:, 1].reshape(shape))

    def he_to_codex(self, affine: np.ndarray, pts: np.ndarray) -> np.ndarray:
        """CODEX level-0 points (N, 2) of H&E level-0 points (N, 2): A^-1 (x - D(x))."""
        pts = np.asarray(pts, np.float64).reshape(-1, 2)
        dx, dy = self.sample(pts[:, 0], pts[:, 1])
        inv = np.linalg.inv(np.asarray(affine, np.float64))
        q = np.c_[pts[:, 0] - dx, pts[:, 1] - dy]
        return q @ inv[:2, :2].T + inv[:2, 2]

    def solve_he(self, yx: np.ndarray, yy: np.ndarray, steps: int = 3,
                 start: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Solve x = y + D(x) for x, given y = A x_codex (arrays of one shape, H&E level-0 px); float64.

        The start (default x = y + D(y)) is refined by ``steps`` Newton steps with the bilinear field's exact
        Jacobian.
        """
        if start is None:
            dx, dy = self.sample(yx, yy)
            x, y = yx + dx, yy + dy
        else:
            x, y = start
        for _ in range(steps):
            dx, dy, a, b, c, d = self.sample(x, y, gradient=True)
            rx, ry = x - yx - dx, y - yy - dy  # residual F(x) = x - y - D(x)
            # (I - dD) delta = -r
            m00, m01, m10, m11 = 1.0 - a, -b, -c, 1.0 - d
            det = m00 * m11 - m01 * m10
            x = x - (m11 * rx - m01 * ry) / det
            y = y - (-m10 * rx + m00 * ry) / det
        return x, y

    def solve_he_grid(self, yx: np.ndarray, yy: np.ndarray, coarse: int = 16,
                      steps: int = 2) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`solve_he` for (h, w) arrays that are an affine image of a pixel grid (a CODEX region): solved
        exactly every ``coarse`` px, D interpolated linearly in between (within ~0.05 px), then ``steps`` Newton
        steps at every pixel (within ~1e-5 px, ~1e-9 px away from the field's node lines)."""
        h, w = yx.shape
        if h * w <= 4 * coarse * coarse * 64:
            return self.solve_he(yx, yy)
        ri = np.unique(np.append(np.arange(0, h, coarse), h - 1))
        ci = np.unique(np.append(np.arange(0, w, coarse), w - 1))
        cyx, cyy = yx[np.ix_(ri, ci)], yy[np.ix_(ri, ci)]
        cx, cy = self.solve_he(cyx, cyy)
        wr, wc = _linear_weights(ri, h), _linear_weights(ci, w)
        x0 = yx + wr @ (cx - cyx) @ wc.T
        y0 = yy + wr @ (cy - cyy) @ wc.T
        return self.solve_he(yx, yy, steps, start=(x0, y0))

    def codex_to_he(self, affine: np.ndarray, pts: np.ndarray, steps: int = 3) -> np.ndarray:
        """H&E level-0 points (N, 2) of CODEX level-0 points (N, 2): the x with x = A x_codex + D(x)."""
        pts = np.asarray(pts, np.float64).reshape(-1, 2)
        a = np.asarray(affine, np.float64)
        y = pts @ a[:2, :2].T + a[:2, 2]
        x, yy = self.solve_he(y[:, 0], y[:, 1], steps)
        return np.c_[x, yy]

    def jacobian_he(self, pts: np.ndarray) -> np.ndarray:
        """(N, 2, 2) derivative of x_he - D(x_he) w.r.t. x_he (I - dD) at H&E level-0 points (N, 2)."""
        pts = np.asarray(pts, np.float64).reshape(-1, 2)
        _, _, a, b, c, d = self.sample(pts[:, 0], pts[:, 1], gradient=True)
        return np.stack([np.stack([1 - a, -b], -1), np.stack([-c, 1 - d], -1)], -2)

    def magnitude_um(self, mpp: float) -> np.ndarray:
        """|D| at the nodes, µm, (Gy, Gx)."""
        return np.hypot(self.d[0], self.d[1]) * mpp

    # -- files -----------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the node array as ``.npy`` (atomically)."""
        with atomic_path(path, suffix=".npy") as tmp, open(tmp, "wb") as f:
            np.save(f, self.d, allow_pickle=False)

    @classmethod
    def load(cls, path: str | os.PathLike, step: float) -> DisplacementField:
        """Read a node array ``.npy`` (2, Gy, Gx) written by :meth:`save` (or the sample cohort)."""
        path = Path(path)
        if not path.exists():
            raise PipelineError(f"displacement field not found: {path}; re-register the slide")
        try:
            d = np.load(path, allow_pickle=False)
            return cls(d, float(step))
        except (ValueError, OSError) as e:
            raise PipelineError(f"displacement field {path} is not a (2, Gy, Gx) array ({e}); re-register") from e


def _linear_weights(knots: np.ndarray, n: int) -> np.ndarray:
    """(n, len(knots)) weights of linear interpolation at 0..n-1 from values at the increasing ``knots``."""
    t = np.arange(n, dtype=np.float64)
    k = np.clip(np.searchsorted(knots, t, side="right") - 1, 0, len(knots) - 2)
    f = (t - knots[k]) / (knots[k + 1] - knots[k])
    wts = np.zeros((n, len(knots)))
    wts[np.arange(n), k] = 1 - f
    wts[np.arange(n), k + 1] = f
    return wts


def node_shape(dims: tuple[int, int], step: float) -> tuple[int, int]:
    """(Gy, Gx) of a node lattice with spacing ``step`` covering a (width, height) level-0 image."""
    w, h = dims
    return int(math.ceil(max(h - 1, 0) / step)) + 1, int(math.ceil(max(w - 1, 0) / step)) + 1


def load_field_entry(entry: dict | None, base: str | os.PathLike) -> DisplacementField | None:
    """The field of a ``{"file": ..., "step_px": S}`` entry (file relative to ``base``); None for no entry."""
    if not entry:
        return None
    try:
        rel, step = entry["file"], float(entry["step_px"])
    except (KeyError, TypeError, ValueError) as e:
        raise PipelineError(f"displacement entry {entry!r} next to {base} needs 'file' and 'step_px' ({e})") from e
    return DisplacementField.load(Path(base) / rel, step)


# ----------------------------------------------------------------------------------------------------------------
# from block shifts


def _plane_deviation(res: np.ndarray, ok: np.ndarray, radius: int) -> np.ndarray:
    """(gy, gx) distance of each measured block's residual (gy, gx, 2) from a plane fitted to its measured
    neighbours within ``radius`` blocks (0 where there are fewer than 4 neighbours or no measurement)."""
    gy, gx = ok.shape
    dev = np.zeros(ok.shape)
    for r, c in zip(*np.nonzero(ok)):
        r0, r1, c0, c1 = max(0, r - radius), min(gy, r + radius + 1), max(0, c - radius), min(gx, c + radius + 1)
        sub = ok[r0:r1, c0:c1].copy()
        sub[r - r0, c - c0] = False
        nr, nc = np.nonzero(sub)
        if len(nr) < 4:
            continue
        a = np.c_[np.ones(len(nr)), nr + r0 - r, nc + c0 - c]
        if np.linalg.matrix_rank(a) < 3:
            pred = res[nr + r0, nc + c0].mean(axis=0)
        else:
            sol, *_ = np.linalg.lstsq(a, res[nr + r0, nc + c0], rcond=None)
            pred = sol[0]
        dev[r, c] = np.linalg.norm(res[r, c] - pred)
    return dev


def _outliers(res: np.ndarray, ok: np.ndarray, radius: int, thr_px: float, rounds: int = 20) -> np.ndarray:
    """Blocks whose residual is more than ``thr_px`` off the plane through their neighbours. One bad block pulls
    its neighbours' planes too, so each round removes only the worst block of each neighbourhood, then looks
    again."""
    from scipy import ndimage as ndi

    ok = ok.copy()
    bad = np.zeros_like(ok)
    for _ in range(rounds):
        dev = _plane_deviation(res, ok, radius)
        cand = ok & (dev > thr_px)
        if not cand.any():
            break
        top = ndi.maximum_filter(np.where(cand, dev, 0.0), size=2 * radius + 1, mode="constant")
        worst = cand & (dev >= top)
        bad |= worst
        ok &= ~worst
    return bad


def _fill(res: np.ndarray, ok: np.ndarray, reach: int = 3) -> np.ndarray:
    """Residuals (gy, gx, 2) everywhere: measured blocks keep theirs (they are precise to a few hundredths of a
    µm), a gap within ``reach`` blocks of a measured one gets the value at it of a weighted plane through the
    measured blocks around it (unbiased for the linear trend of a smooth deformation, also at the tissue edge),
    farther gaps the value of the nearest filled block. float64."""
    from scipy import ndimage as ndi

    gy, gx = ok.shape
    out = np.where(ok[..., None], res, 0.0).astype(np.float64)
    if not ok.any():
        return out
    dist = ndi.distance_transform_edt(~ok)
    done = ok.copy()
    for r, c in zip(*np.nonzero(~ok & (dist <= reach))):
        for rad in (2, 3, 5, 8):
            r0, r1, c0, c1 = max(0, r - rad), min(gy, r + rad + 1), max(0, c - rad), min(gx, c + rad + 1)
            nr, nc = np.nonzero(ok[r0:r1, c0:c1])
            if len(nr) < 6:
                continue
            dr, dc = nr + r0 - r, nc + c0 - c
            a = np.c_[np.ones(len(nr)), dr, dc]
            if np.linalg.matrix_rank(a) < 3:
                continue
            wt = np.sqrt(np.exp(-(dr**2 + dc**2) / (2.0 * (rad / 1.5) ** 2)))[:, None]
            sol, *_ = np.linalg.lstsq(a * wt, res[nr + r0, nc + c0] * wt, rcond=None)
            out[r, c] = sol[0]
            done[r, c] = True
            break
    if not done.all():
        _, (ii, jj) = ndi.distance_transform_edt(~done, return_indices=True)
        out[~done] = out[ii[~done], jj[~done]]
    return out


@dataclass
class FieldFit:
    """The field fitted to one slide's blocks, with what was kept: ``used`` (N,) blocks whose residual shaped the
    field, ``outliers`` (N,) measured blocks replaced from their neighbours, ``notes``."""

    field: DisplacementField
    used: np.ndarray
    outliers: np.ndarray
    notes: list[str]


def field_from_blocks(centres: np.ndarray, residual: np.ndarray, measured: np.ndarray, grid_shape: tuple[int, int],
                      he_dims: tuple[int, int], step_px: float, outlier_px: float, radius: int = 2) -> FieldFit:
    """Displacement field from per-block residuals after the affine.

    Args:
        centres: (N, 2) block centres, H&E level-0 px, row-major over ``grid_shape`` (gy, gx) blocks.
        residual: (N, 2) measured H&E position minus the affine's (H&E level-0 px) = D at the block.
        measured: (N,) blocks with a measurement.
        he_dims: H&E level-0 (width, height); the node lattice covers it.
        step_px: node spacing (H&E level-0 px), usually the block size.
        outlier_px: a block further than this from the plane through its neighbours is replaced.
        radius: neighbourhood (blocks) of that outlier check.
    """
    from scipy.interpolate import RegularGridInterpolator

    gy, gx = grid_shape
    res = np.where(measured[:, None], residual, 0.0).reshape(gy, gx, 2)
    ok = measured.reshape(gy, gx).copy()
    notes: list[str] = []
    out = _outliers(res, ok, radius, outlier_px)
    ok &= ~out
    if out.any():
        notes.append(f"{int(out.sum())} blocks off the local displacement by > {outlier_px:.1f} px: replaced "
                     "from their neighbours")
    filled = _fill(res, ok)
    cen = centres.reshape(gy, gx, 2)
    ys, xs = cen[:, 0, 1], cen[0, :, 0]
    shape = node_shape(he_dims, step_px)
    ny, nx = np.meshgrid(np.arange(shape[0]) * step_px, np.arange(shape[1]) * step_px, indexing="ij")
    qy, qx = np.clip(ny, ys.min(), ys.max()), np.clip(nx, xs.min(), xs.max())
    d = np.zeros((2, *shape), np.float32)
    for k in range(2):
        if gy == 1 or gx == 1:  # one row / column of blocks: interpolate along the other axis only
            axis_vals, coord = (xs, qx) if gy == 1 else (ys, qy)
            d[k] = np.interp(coord, axis_vals, filled[..., k].ravel())
        else:
            interp = RegularGridInterpolator((ys, xs), filled[..., k], method="linear")
            d[k] = interp(np.stack([qy, qx], -1))
    return FieldFit(DisplacementField(d, step_px), ok.ravel(), out.ravel(), notes)
