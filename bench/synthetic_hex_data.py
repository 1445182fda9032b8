"""A tiny synthetic HEX training set in the pipeline layout, for benchmarks and tests (no ground truth beyond the
labels' own formula): ``write_synthetic_dataset(root, ...)`` writes patch stores (or the legacy PNG layout), label
CSVs whose first markers are functions of the patch colour, ``normalization.json``, a clinical table and a split.

    from bench.synthetic_hex_data import write_synthetic_dataset
    info = write_synthetic_dataset(tmp, n_slides=4, n_per_slide=12)   # tmp/he_patches/, tmp/markers/, ...
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
from PIL import Image

from hex.data.datasets import LEGACY_PREFIX
from pipeline import artifacts as art
from pipeline.io import write_json


def synthetic_patches(n: int, rng: np.random.Generator, size: int = 224) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random H&E-like patches (N,size,size,3) uint8 and their per-channel mean colour (N,3) in [0,1].

    Each patch is a random base colour with a smooth blob texture, so simple colour statistics are learnable.
    """
    base = rng.uniform(0.15, 0.9, size=(n, 1, 1, 3)).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    imgs = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        fx, fy, ph = rng.uniform(2, 8), rng.uniform(2, 8), rng.uniform(0, 2 * math.pi)
        tex = 0.08 * np.sin(2 * math.pi * fx * xx + ph) * np.cos(2 * math.pi * fy * yy)
        noise = rng.normal(0, 0.03, size=(size, size, 1)).astype(np.float32)
        im = np.clip(base[i] + tex[..., None] + noise, 0, 1)
        imgs[i] = (im * 255).round().astype(np.uint8)
    return imgs, imgs.reshape(n, -1, 3).mean(axis=1) / 255.0


def synthetic_labels(colour: np.ndarray, num_markers: int, n_visible: int, rng: np.random.Generator) -> np.ndarray:
    """(N,M) labels in [0,1]: the first ``n_visible`` markers are fixed functions of mean colour, the rest noise."""
    r, g, b = colour[:, 0], colour[:, 1], colour[:, 2]
    funcs = [r, g, b, 1 - r, (r + b) / 2, 1 - g, (r + g) / 2, (g + b) / 2]
    y = rng.uniform(0, 1, size=(len(colour), num_markers)).astype(np.float32)
    for m in range(min(n_visible, num_markers)):
        y[:, m] = np.clip(funcs[m % len(funcs)] + rng.normal(0, 0.02, len(colour)), 0, 1)
    return y


def write_synthetic_dataset(
    root: str | os.PathLike,
    n_slides: int = 4,
    n_per_slide: int = 12,
    num_markers: int = 40,
    n_visible: int = 8,
    size: int = 224,
    seed: int = 0,
    legacy: bool = False,
    both: bool = False,
) -> dict[str, Any]:
    """Write a tiny cohort in the pipeline layout under ``root`` and return its description.

    Writes ``he_patches/{slide}.h5`` (or, with ``legacy``, ``he_patches/{slide}/{slide}_{i}.png`` and
    ``mean_intensity_channel{i}`` CSV columns; ``both`` writes PNGs next to the h5 stores under ``he_png/``),
    ``markers/{slide}.csv``, ``markers/normalization.json``, ``clinical.csv`` (two slides per patient),
    ``splits/splits_0.csv`` (last patient's slides in ``val``) and ``ground_truth.json``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    slides = [f"slide_{i:03d}" for i in range(n_slides)]
    markers = [f"{LEGACY_PREFIX}{i + 1}" for i in range(num_markers)] if legacy else [f"M{i:02d}" for i in
                                                                                        range(num_markers)]
    store_dir, labels_dir = art.PATCH_STORE.dir(root), art.LABELS.dir(root)
    labels_dir.mkdir(parents=True, exist_ok=True)
    store_dir.mkdir(parents=True, exist_ok=True)
    for slide in slides:
        imgs, colour = synthetic_patches(n_per_slide, rng, size)
        y = synthetic_labels(colour, num_markers, n_visible, rng)
        coords = np.stack([np.arange(n_per_slide) * size, np.full(n_per_slide, 1000)], axis=1).astype(np.int64)
        if not legacy:
            with h5py.File(art.PATCH_STORE.path(root, slide), "w") as f:
                f.create_dataset("imgs", data=imgs, chunks=(1, size, size, 3))
                f.create_dataset("coords", data=coords)
        if legacy or both:
            d = (root / "he_png" if both and not legacy else store_dir) / slide
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n_per_slide):
                Image.fromarray(imgs[i]).save(d / f"{slide}_{i}.png")
        df = pd.DataFrame({"slide": slide, "index": np.arange(n_per_slide), "x": coords[:, 0], "y": coords[:, 1]})
        df = pd.concat([df, pd.DataFrame(y, columns=markers)], axis=1)
        df.to_csv(art.LABELS.path(root, slide), index=False)
    write_json(art.NORMALIZATION.path(root),  # the layout preprocess.quantify writes
               {"schema_version": 1, "markers": markers, "percentiles": [1.0, 99.0],
                "values": [[0.0] * num_markers, [1.0] * num_markers]})
    cases = [f"case_{i // 2:03d}" for i in range(n_slides)]
    pd.DataFrame({"case_id": cases, "slide_id": slides, "survival_months": 12.0, "censorship": 0}).to_csv(
        root / "clinical.csv", index=False)
    last = cases[-1]
    train = [s for s, c in zip(slides, cases) if c != last]
    val = [s for s, c in zip(slides, cases) if c == last]
    (root / "splits").mkdir(exist_ok=True)
    pd.DataFrame({"train": pd.Series(train), "val": pd.Series(val)}).to_csv(root / "splits" / "splits_0.csv",
                                                                           index=False)
    info = {"slides": slides, "markers": markers, "visible_markers": markers[:n_visible], "train": train,
            "val": val}
    write_json(root / "ground_truth.json", {"seed": seed, "markers": markers, "visible_markers": markers[:n_visible]})
    return info
