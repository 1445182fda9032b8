"""Geometry of the marker quantification: the registration's CODEX -> H&E map, which patch a CODEX pixel falls in,
how much of each patch the CODEX covers, and which CODEX regions hold pixels of some patch.

The map is the record's affine A (CODEX level-0 px (x, y, 1) -> H&E level-0 px), through its displacement field D
when it has one: the H&E point x shows CODEX point ``inv(A) @ (x - D(x))``; the CODEX pixel u lands at the x with
x = A u + D(x) (Newton steps, exact to ~1e-9 px). Pixel centres are at integer coordinates; a patch with top-left
x and side s holds [x - 0.5, x + s - 0.5).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from preprocess.registration.field import DisplacementField, load_field_entry

# ----------------------------------------------------------------------------------------------------------------
# the registration's map


@dataclass
class CodexToHE:
    """CODEX level-0 px -> H&E level-0 px: ``affine`` (3x3), plus ``field`` (None: affine only)."""

    affine: np.ndarray
    field: DisplacementField | None = None

    def he_to_codex(self, pts: np.ndarray) -> np.ndarray:
        """CODEX level-0 points (N, 2) shown at H&E level-0 points (N, 2)."""
        from preprocess.registration.record_qc import he_to_codex_points

        return he_to_codex_points(self.affine, self.field, np.asarray(pts, np.float64).reshape(-1, 2))

    def grid_to_he(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """H&E level-0 (X, Y), each (h, w) float64, of the CODEX pixel centres (u (w,), v (h,))."""
        a = self.affine
        yx = a[0, 0] * u[None, :] + (a[0, 1] * v + a[0, 2])[:, None]
        yy = a[1, 0] * u[None, :] + (a[1, 1] * v + a[1, 2])[:, None]
        if self.field is None:
            return yx, yy
        return self.field.solve_he_grid(yx, yy)

    def local_affines(self, he_pts: np.ndarray) -> np.ndarray:
        """(N, 3, 3) CODEX -> H&E affines, each the map linearised at one H&E point (the affine itself without a
        field): x ~ p + inv(I - dD(p)) @ A @ (u - u_p)."""
        pts = np.asarray(he_pts, np.float64).reshape(-1, 2)
        n = len(pts)
        if self.field is None:
            return np.broadcast_to(self.affine, (n, 3, 3)).copy()
        lin = np.linalg.inv(self.field.jacobian_he(pts)) @ self.affine[:2, :2]
        up = self.he_to_codex(pts)
        out = np.zeros((n, 3, 3))
        out[:, :2, :2] = lin
        out[:, :2, 2] = pts - np.einsum("nij,nj->ni", lin, up)
        out[:, 2, 2] = 1.0
        return out


def load_registration(path: str | os.PathLike, allow_flagged: bool = False) -> tuple[CodexToHE, dict]:
    """The map of a registration record (its affine, and its displacement field when the record names one) and
    the record; refuses ``status: flagged`` unless allowed."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"registration record not found: {path}; run `python -m preprocess.register` first")
    try:
        rec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PipelineError(f"registration record {path} is not valid JSON ({e})") from e
    status = rec.get("status", "ok")
    if status != "ok" and not allow_flagged:
        raise PipelineError(f"registration in {path} has status {status!r} ({rec.get('reason', 'no reason given')});"
                            " check its _qc.png, re-register, or pass --allow-flagged to use it anyway")
    try:
        a = np.asarray(rec["affine_codex_to_he"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as e:
        raise PipelineError(f"registration record {path} has no valid 'affine_codex_to_he' ({e})") from e
    if a.shape == (2, 3):
        a = np.vstack([a, [0.0, 0.0, 1.0]])
    if a.shape != (3, 3) or not np.all(np.isfinite(a)) or not np.allclose(a[2], [0, 0, 1]):
        raise PipelineError(f"registration record {path}: 'affine_codex_to_he' must be a finite 3x3 affine matrix")
    if abs(np.linalg.det(a[:2, :2])) < 1e-12:
        raise PipelineError(f"registration record {path}: 'affine_codex_to_he' is singular")
    return CodexToHE(a, load_field_entry(rec.get("displacement"), path.parent)), rec


def as_map(m: np.ndarray | CodexToHE) -> CodexToHE:
    """An affine (3x3) or a :class:`CodexToHE` as a :class:`CodexToHE`."""
    return m if isinstance(m, CodexToHE) else CodexToHE(np.asarray(m, np.float64))


# ----------------------------------------------------------------------------------------------------------------
# which patch a mapped point falls in


class PatchLookup:
    """Maps H&E level-0 points to patch indices for square patches of side ``size`` (level-0 px).

    Patches are grouped into lattices (patches whose top-left coordinates agree modulo ``size``); within a
    lattice they cannot overlap, so each lattice is a dense table cell -> patch index. A grid from stage 01 is one
    lattice; overlapping grids (stride < size) give several, and a point then counts for every patch holding it.
    """

    def __init__(self, coords: np.ndarray, size: int):
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        self.size = int(size)
        self.n = len(coords)
        self.lattices: list[tuple[float, float, np.ndarray]] = []  # (x edge origin, y edge origin, padded lut)
        if self.n == 0:
            return
        offsets = coords % self.size
        for off in np.unique(offsets, axis=0):
            idx = np.flatnonzero(np.all(offsets == off, axis=1))
            cell = (coords[idx] - off) // self.size
            c0 = cell.min(axis=0)
            cell -= c0
            ny, nx = int(cell[:, 1].max()) + 1, int(cell[:, 0].max()) + 1
            lut = np.full((ny + 2, nx + 2), -1, np.int64)  # a border of -1 so clipped indices need no mask
            if len(np.unique(cell, axis=0)) != len(cell):
                raise PipelineError("the patch grid has duplicate coordinates")
            lut[cell[:, 1] + 1, cell[:, 0] + 1] = idx
            origin = off + c0 * self.size - 0.5  # edge coordinate of the lattice's first cell
            self.lattices.append((float(origin[0]), float(origin[1]), lut))

    def labels(self, u: np.ndarray, v: np.ndarray, mapping: np.ndarray | CodexToHE):
        """Yield, per lattice, the patch index (h, w) int64 (-1 = none) of the CODEX pixel centres (u, v).

        Args:
            u: (w,) CODEX level-0 x of the pixel centres of a region; v: (h,) their y.
            mapping: 3x3 CODEX level-0 px -> H&E level-0 px affine, or a :class:`CodexToHE` (with a field).
        """
        m = as_map(mapping)
        s = float(self.size)
        xy = m.grid_to_he(u, v) if m.field is not None else None
        a = m.affine
        for ox, oy, lut in self.lattices:
            ny, nx = lut.shape[0] - 2, lut.shape[1] - 2
            # lattice cell coordinates of the mapped centres: floor((x - origin) / size)
            if xy is None:  # affine: separable, one multiply-add per pixel
                fx = (a[0, 0] / s * u)[None, :] + ((a[0, 1] * v + (a[0, 2] - ox)) / s)[:, None]
                fy = (a[1, 0] / s * u)[None, :] + ((a[1, 1] * v + (a[1, 2] - oy)) / s)[:, None]
            else:
                fx, fy = (xy[0] - ox) / s, (xy[1] - oy) / s
            np.floor(fx, out=fx)
            np.floor(fy, out=fy)
            np.clip(fx, -1, nx, out=fx)
            np.clip(fy, -1, ny, out=fy)
            # flat index into the padded table: (cy + 1) * (nx + 2) + (cx + 1)
            fy *= nx + 2
            fy += fx
            fy += nx + 3
            yield np.take(lut.ravel(), fy.astype(np.int64))


# ----------------------------------------------------------------------------------------------------------------
# how much of each patch the (mapped) CODEX image covers


def _polygon_area(p: np.ndarray) -> float:
    if len(p) < 3:
        return 0.0
    x, y = p[:, 0], p[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _clip_polygon(poly: list[tuple[float, float]], axis: int, bound: float, keep_below: bool):
    """Sutherland-Hodgman clip of a polygon against the half-plane coord[axis] <= bound (or >= bound)."""
    out = []
    n = len(poly)
    for i in range(n):
        cur, nxt = poly[i], poly[(i + 1) % n]
        cin = cur[axis] <= bound if keep_below else cur[axis] >= bound
        nin = nxt[axis] <= bound if keep_below else nxt[axis] >= bound
        if cin:
            out.append(cur)
        if cin != nin:
            t = (bound - cur[axis]) / (nxt[axis] - cur[axis])
            out.append((cur[0] + t * (nxt[0] - cur[0]), cur[1] + t * (nxt[1] - cur[1])))
    return out


def codex_coverage(coords: np.ndarray, size: int, affine: np.ndarray, codex_wh: tuple[int, int]) -> np.ndarray:
    """Fraction of each patch's area covered by the CODEX image mapped through ``affine`` (exact).

    Args:
        coords: (N, 2) level-0 top-left (x, y) of the H&E patches.
        size: patch side in H&E level-0 px.
        affine: 3x3 CODEX level-0 px -> H&E level-0 px, or (N, 3, 3): one affine per patch (the registration's
            map linearised at each patch, see :meth:`CodexToHE.local_affines`).
        codex_wh: CODEX level-0 (width, height); the image covers [-0.5, w - 0.5] x [-0.5, h - 0.5].

    Returns:
        (N,) float64 in [0, 1].
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    n = len(coords)
    aff = np.asarray(affine, np.float64)
    aff = np.broadcast_to(aff, (n, 3, 3)) if aff.ndim == 2 else aff
    w, h = codex_wh
    corners = np.array([[-0.5, -0.5, 1], [w - 0.5, -0.5, 1], [w - 0.5, h - 0.5, 1], [-0.5, h - 0.5, 1]])
    poly = np.einsum("kj,nij->nki", corners, aff)[..., :2]  # (N, 4, 2)
    e0, e1 = poly[:, 1] - poly[:, 0], poly[:, 2] - poly[:, 1]
    flip = e0[:, 0] * e1[:, 1] - e0[:, 1] * e1[:, 0] < 0  # orient so that "inside" is the non-negative side
    poly[flip] = poly[flip, ::-1]
    x0, y0 = coords[:, 0] - 0.5, coords[:, 1] - 0.5
    x1, y1 = x0 + size, y0 + size
    box = np.stack([np.stack([x0, y0], 1), np.stack([x1, y0], 1), np.stack([x1, y1], 1), np.stack([x0, y1], 1)], 1)
    # signed side of every box corner for every polygon edge: >= 0 inside
    side = np.empty((n, 4, 4))
    for e in range(4):
        a, b = poly[:, e], poly[:, (e + 1) % 4]
        side[:, :, e] = ((b[:, 0] - a[:, 0])[:, None] * (box[..., 1] - a[:, 1][:, None])
                         - (b[:, 1] - a[:, 1])[:, None] * (box[..., 0] - a[:, 0][:, None]))
    inside = np.all(side >= 0, axis=(1, 2))
    outside = np.any(np.all(side <= 0, axis=1), axis=1)
    outside |= ((x1 <= poly[..., 0].min(1)) | (x0 >= poly[..., 0].max(1)) | (y1 <= poly[..., 1].min(1))
                | (y0 >= poly[..., 1].max(1)))
    cov = np.where(inside, 1.0, 0.0)
    for i in np.flatnonzero(~inside & ~outside):
        p = _clip_polygon([tuple(q) for q in poly[i]], 0, x0[i], False)
        p = _clip_polygon(p, 0, x1[i], True) if p else p
        p = _clip_polygon(p, 1, y0[i], False) if p else p
        p = _clip_polygon(p, 1, y1[i], True) if p else p
        cov[i] = _polygon_area(np.asarray(p)) / float(size * size) if p else 0.0
    return np.clip(cov, 0.0, 1.0)


def patch_coverage(coords: np.ndarray, size: int, mapping: np.ndarray | CodexToHE,
                   codex_wh: tuple[int, int]) -> np.ndarray:
    """:func:`codex_coverage` through a registration map (with a field: the map linearised at each patch centre,
    exact to the field's curvature over one patch)."""
    m = as_map(mapping)
    coords = np.asarray(coords, np.float64).reshape(-1, 2)
    if m.field is None:
        return codex_coverage(coords, size, m.affine, codex_wh)
    return codex_coverage(coords, size, m.local_affines(coords + (size - 1) / 2.0), codex_wh)


# ----------------------------------------------------------------------------------------------------------------
# which CODEX regions to read


def regions_touched(coords: np.ndarray, size: int, mapping: np.ndarray | CodexToHE, codex_wh: tuple[int, int],
                    region: tuple[int, int]) -> list[tuple[int, int]]:
    """(column, row) of the CODEX regions of ``region`` = (width, height) px that hold pixels of some patch."""
    w, h = codex_wh
    rw, rh = region
    nrx, nry = (w + rw - 1) // rw, (h + rh - 1) // rh
    if len(coords) == 0:
        return []
    m = as_map(mapping)
    c = np.asarray(coords, np.float64)
    corners = [(-0.5, -0.5), (size - 0.5, -0.5), (size - 0.5, size - 0.5), (-0.5, size - 0.5)]
    pts = np.stack([m.he_to_codex(np.c_[c[:, 0] + dx, c[:, 1] + dy]) for dx, dy in corners], 1)
    margin = 0 if m.field is None else 2  # a field bends the patch edges between its corners (by << 1 px)
    lo = np.floor(pts.min(axis=1)).astype(np.int64) - margin
    hi = np.ceil(pts.max(axis=1)).astype(np.int64) + margin
    ok = (hi[:, 0] >= 0) & (hi[:, 1] >= 0) & (lo[:, 0] <= w - 1) & (lo[:, 1] <= h - 1)
    lo = np.clip(lo[ok], 0, [w - 1, h - 1]) // [rw, rh]
    hi = np.clip(hi[ok], 0, [w - 1, h - 1]) // [rw, rh]
    mark = np.zeros((nry, nrx), bool)
    if len(lo):
        span = (hi - lo).max(axis=0) + 1
        for dx in range(int(span[0])):
            for dy in range(int(span[1])):
                mark[np.minimum(lo[:, 1] + dy, hi[:, 1]), np.minimum(lo[:, 0] + dx, hi[:, 0])] = True
    ry, rx = np.nonzero(mark)
    return list(zip(rx.tolist(), ry.tolist()))
