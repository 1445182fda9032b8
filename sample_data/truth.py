"""Ground-truth maps of the sample cohort and registration errors against them, independent of the pipeline's code.

Both the cohort's truth and a registration record follow one convention (docs/FORMATS.md): a 3x3 affine A (CODEX
level-0 px -> H&E level-0 px) and optionally a displacement D (``{"file": ..., "step_px": S}``: (2, Gy, Gx) (dx,
dy) in H&E level-0 px at nodes (j·S, i·S), bilinear, edge-clamped), with ``x_codex = inv(A) @ (x_he - D(x_he))``.
Here D is sampled with ``scipy.ndimage.map_coordinates`` (order 1, mode "nearest") and the CODEX -> H&E direction
is solved by fixed-point iteration, so the checks do not reuse ``preprocess.registration.field``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi


@dataclass
class Transform:
    """A (``affine``, ``field`` (2, Gy, Gx) or None, ``step``) CODEX <-> H&E transform."""

    affine: np.ndarray
    field: np.ndarray | None = None
    step: float = 1.0

    @classmethod
    def from_entry(cls, affine, entry: dict | None, base: str | Path) -> Transform:
        """From an affine and a ``{"file", "step_px"}`` entry whose file is relative to ``base``."""
        if not entry:
            return cls(np.asarray(affine, np.float64))
        return cls(np.asarray(affine, np.float64), np.load(Path(base) / entry["file"]).astype(np.float64),
                   float(entry["step_px"]))

    def displacement(self, pts: np.ndarray) -> np.ndarray:
        """D at H&E level-0 points (N, 2) -> (N, 2) px (zero without a field)."""
        if self.field is None:
            return np.zeros_like(pts, dtype=np.float64)
        c = np.stack([pts[:, 1] / self.step, pts[:, 0] / self.step])
        return np.stack([ndi.map_coordinates(self.field[k], c, order=1, mode="nearest") for k in range(2)], 1)

    def he_to_codex(self, pts: np.ndarray) -> np.ndarray:
        pts = np.asarray(pts, np.float64).reshape(-1, 2)
        inv = np.linalg.inv(self.affine)
        q = pts - self.displacement(pts)
        return q @ inv[:2, :2].T + inv[:2, 2]

    def codex_to_he(self, pts: np.ndarray, iters: int = 10) -> np.ndarray:
        pts = np.asarray(pts, np.float64).reshape(-1, 2)
        y = pts @ self.affine[:2, :2].T + self.affine[:2, 2]
        x = y.copy()
        if self.field is not None:
            for _ in range(iters):
                x = y + self.displacement(x)
        return x

    def affine_only(self) -> Transform:
        return Transform(self.affine)


def true_transform(cohort: str | Path, slide: str) -> Transform:
    """The cohort's true transform of ``slide`` (affine + warp when the cohort has one)."""
    rec = json.loads((Path(cohort) / "ground_truth.json").read_text())["slides"][slide]
    return Transform.from_entry(rec["affine_codex_to_he"], rec.get("warp"), cohort)


def record_transform(record_path: str | Path) -> Transform:
    """The transform of a registration record ``registration/{slide}.json`` (its field file sits next to it)."""
    rec = json.loads(Path(record_path).read_text())
    return Transform.from_entry(rec["affine_codex_to_he"], rec.get("displacement"), Path(record_path).parent)


def errors_um(est: Transform, true: Transform, he_points: np.ndarray, he_mpp: float) -> np.ndarray:
    """Registration error (µm) at H&E level-0 points (N, 2): each point is sent to CODEX space by the truth and
    back to the H&E by the estimate; the error is how far it lands from where it started."""
    return np.linalg.norm(est.codex_to_he(true.he_to_codex(he_points)) - he_points, axis=1) * he_mpp


def oracle_patch_means(codex_path: str | Path, true: Transform, coords: np.ndarray, size: int,
                       sub: int = 2) -> np.ndarray:
    """Mean of each CODEX channel over each H&E patch box under the true map: the level-0 channel (read with
    tifffile) sampled bilinearly (scipy) at every ``sub``-th pixel centre of the box, mapped H&E -> CODEX.

    Args:
        coords: (N, 2) H&E level-0 top-left (x, y); ``size``: patch side in H&E level-0 px.

    Returns:
        (N, C) float64; NaN for boxes that leave the CODEX image.
    """
    import tifffile

    t = np.arange(0, size, sub, dtype=np.float64)
    gx, gy = np.meshgrid(t, t)
    k = gx.size
    pts = (np.asarray(coords, np.float64)[:, None, :] + np.c_[gx.ravel(), gy.ravel()][None]).reshape(-1, 2)
    q = true.he_to_codex(pts)
    with tifffile.TiffFile(codex_path) as tf:
        pages = tf.series[0].levels[0].pages
        h, w = pages[0].shape[-2:]
        inside = ((q[:, 0] >= 0) & (q[:, 1] >= 0) & (q[:, 0] <= w - 1) & (q[:, 1] <= h - 1)).reshape(-1, k).all(1)
        out = np.full((len(coords), len(pages)), np.nan)
        for c, page in enumerate(pages):
            ch = page.asarray().astype(np.float32)
            v = ndi.map_coordinates(ch, [q[:, 1], q[:, 0]], order=1, mode="nearest").reshape(-1, k)
            out[inside, c] = v[inside].mean(axis=1)
    return out


def marker_pearsons(values: np.ndarray, oracle: np.ndarray, markers: list[str]) -> dict[str, float]:
    """Pearson r per marker between per-patch values (N, K) and oracle means (N, K), over the patches the oracle
    has; markers without signal there (sd < 1e-3 x mean) are left out."""
    ok = ~np.isnan(oracle).any(axis=1)
    rs = {}
    for j, m in enumerate(markers):
        pred, ref = values[ok, j], oracle[ok, j]
        if ok.sum() < 3 or ref.std() < 1e-3 * max(ref.mean(), 1.0):
            continue
        rs[m] = float(np.corrcoef(pred, ref)[0, 1])
    return rs
