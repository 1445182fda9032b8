"""Large synthetic H&E slides for benchmarks (``bench.bench_infer``): a tiled H&E-like texture (eosin field,
~7 µm haematoxylin nuclei, grain; JPEG-compresses like stained tissue) inside a superellipse of tissue on glass.
Also the slide's stage-01 grid and a first-k-tiles subset of it (for warm-ups). Unlike the sample cohort's
slides these carry no ground truth; they are cheap to make at any size.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np


def he_texture(size: int = 1024, seed: int = 0) -> np.ndarray:
    """A square H&E-like texture (size, size, 3) uint8 at 0.5 µm/px: a smooth eosin field, hematoxylin nuclei of
    ~7 µm and fine grain (JPEG-compresses ~5-10x at quality 90, like stained tissue)."""
    import cv2

    rng = np.random.default_rng(seed)
    low = cv2.resize(rng.random((size // 32, size // 32)).astype(np.float32), (size, size),
                     interpolation=cv2.INTER_CUBIC)
    img = np.empty((size, size, 3), np.float32)
    for ch, (base, amp) in enumerate(((225, 25), (150, 45), (200, 25))):
        img[..., ch] = base - amp * low
    nuclei = np.zeros((size, size), np.uint8)
    for x, y, r in zip(rng.integers(0, size, 1200), rng.integers(0, size, 1200), rng.integers(5, 9, 1200)):
        cv2.circle(nuclei, (int(x), int(y)), int(r), 1, -1)
    img[nuclei > 0] = (95, 60, 150)
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    return img.clip(0, 255).astype(np.uint8)


def synthetic_slide(width: int, height: int, seed: int = 0) -> np.ndarray:
    """An RGB slide (height, width, 3) uint8: the texture inside a superellipse |x/a|^4 + |y/b|^4 < 1 (a, b = 48%
    of the sides, ~85% of the area) on white glass. Filled row by row (no full-size temporaries)."""
    tex = he_texture(seed=seed)
    n = tex.shape[0]
    band = np.tile(tex, (1, -(-width // n), 1))[:, :width]
    img = np.full((height, width, 3), 242, np.uint8)
    a, b, cx, cy = 0.48 * width, 0.48 * height, width / 2, height / 2
    for y in range(height):
        t = 1 - ((y + 0.5 - cy) / b) ** 4
        if t <= 0:
            continue
        half = a * t**0.25
        x0, x1 = max(0, int(cx - half)), min(width, int(cx + half))
        img[y, x0:x1] = band[y % n, x0:x1]
    return img


def write_bench_slide(path: Path, tiles: int, seed: int = 0) -> dict[str, Any]:
    """Write a synthetic 0.5 µm/px Aperio slide with about ``tiles`` tissue tiles of 224 px; returns its size."""
    from sample_data.writers import write_aperio_tiff

    side = max(2, math.ceil(math.sqrt(tiles / 0.85))) * 224
    t0 = time.perf_counter()
    write_aperio_tiff(path, synthetic_slide(side, side, seed), mpp=0.5)
    return {"side_px": side, "mbytes": path.stat().st_size / 1e6, "write_s": time.perf_counter() - t0}


def stage01_grid(slide_id: str, he_path: Path, work: Path) -> float:
    """Stage 01's grid of the slide under ``work`` (``preprocess.patch.patch_slide``, defaults); returns seconds."""
    from preprocess.patch import PatchConfig, patch_slide

    t0 = time.perf_counter()
    patch_slide(slide_id, he_path, PatchConfig(out=work))
    return time.perf_counter() - t0


def subset_grid(src: Path, dst: Path, k: int) -> None:
    """A grid file with the first ``k`` tiles of ``src`` (same attributes): the stage warm-up on the same slide."""
    import h5py

    with h5py.File(src, "r") as f, h5py.File(dst, "w") as g:
        for name in ("coords", "tissue_fraction"):
            if name in f:
                g.create_dataset(name, data=f[name][:k])
        g.attrs.update(dict(f.attrs))
        g["coords"].attrs.update(dict(f["coords"].attrs))
