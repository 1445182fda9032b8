"""The coarse CODEX -> H&E affine (palom's ORB keypoints + RANSAC) and the pixel-size-only placement."""

from __future__ import annotations

import numpy as np

from preprocess.registration.work_images import WorkImage
from preprocess.registration_qc import robust_normalize


def coarse_affine(he_nuclei: WorkImage, dapi: WorkImage, n_keypoints: int) -> tuple[np.ndarray, bool]:
    """Coarse CODEX level-0 -> H&E level-0 affine from keypoints on the two working images (palom).

    Returns (3x3 affine, matched) where ``matched`` is False when palom's feature matching gave up and returned its
    identity placeholder (it only logs a warning).
    """
    import palom

    ref = robust_normalize(he_nuclei.img)
    mov = robust_normalize(dapi.img)
    aligner = palom.align.Aligner(None, None, ref, mov, 1, 1)
    aligner.coarse_register_affine(n_keypoints=n_keypoints, plot_match_result=False)
    m = np.asarray(aligner.coarse_affine_matrix, dtype=np.float64)  # DAPI working px -> haematoxylin working px
    matched = not np.allclose(m, np.eye(3)) and bool(np.all(np.isfinite(m)))
    return he_nuclei.to_level0 @ m @ np.linalg.inv(dapi.to_level0), matched


def placement_by_pixel_size(he_dims: tuple[int, int], codex_dims: tuple[int, int], scale: float) -> np.ndarray:
    """The 'before' transform: scale by the pixel-size ratio, image centres aligned (no registration)."""
    m = np.eye(3)
    m[0, 0] = m[1, 1] = scale
    cx, cy = (codex_dims[0] - 1) / 2, (codex_dims[1] - 1) / 2
    hx, hy = (he_dims[0] - 1) / 2, (he_dims[1] - 1) / 2
    m[0, 2], m[1, 2] = hx - scale * cx, hy - scale * cy
    return m
