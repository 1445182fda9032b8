"""Encoders of virtual CODEX maps: one D'-vector per marker channel, i.e. 40 tokens per slide for MICA.

Input: a virtual CODEX map (H', W', C) in P99-normalised units (~[0, 1]; 1 ~ the marker's 99th percentile over the
training tiles, 0 = no expression / no tissue) and its tissue mask (H', W') bool. Two encoders:

* **image encoders** (``dinov2_vits14_reg`` as the original MICA, or any ``hex.backbones`` name): each channel is
  clipped to [0, 1], scaled to uint8 (x 255, rounded), copied to 3 channels, resized to the backbone input size
  (224 px, bicubic with antialiasing when shrinking; results clamped and rounded to the uint8 grid, as PIL's resize
  of a uint8 image gives), normalised with the backbone mean/std (ImageNet) and embedded (CLS token, D' = 384).
  The [0, 1] clip only makes sense because the maps are P99-normalised: on raw intensities the x 255 step would
  saturate or, for values below 1/255, give all-black images. See :func:`channel_images`, :func:`to_model_input`.
* **stats** (:func:`stats_features`): per-channel spatial descriptors over the tissue pixels, CPU-fast and
  interpretable; the columns are :data:`STATS_FEATURES` (D' = 10), documented in :data:`STATS_DESCRIPTIONS`.

Reading the maps, writing the per-slide parts and the drivers of stage 07 are in :mod:`mica.features.codex_features`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

STATS_ENCODER = "stats"
HIGH_THRESHOLD = 0.5
"""'High expression' threshold in P99-normalised units (half the marker's 99th percentile; cohort-agnostic)."""
EPI_THRESHOLD = 0.5
"""A tissue pixel is epithelial when the mean of the epithelial channels exceeds this (P99-normalised units)."""
EPITHELIAL_MARKERS = ("Pan-Cytokeratin", "E-cadherin", "EpCAM")
_EPI_ALIASES = {"pancytokeratin", "panck", "cytokeratin", "ecadherin", "cdh1", "epcam"}

STATS_DESCRIPTIONS: dict[str, str] = {
    "mean": "level: mean of the channel over tissue pixels",
    "sd": "spread: standard deviation over tissue pixels",
    "p50": "median over tissue pixels",
    "p90": "90th percentile over tissue pixels",
    "frac_high": f"fraction of tissue pixels above the high threshold ({HIGH_THRESHOLD} P99-normalised units)",
    "moran_i": "spatial autocorrelation: Moran's I with binary 4-neighbour weights between tissue pixels "
               "(~1 = one smooth aggregate, ~0 = random, < 0 = checkerboard)",
    "corr_epi": "co-location: Pearson correlation over tissue pixels with the epithelial score (mean of the "
                "Pan-Cytokeratin/E-cadherin/EpCAM channels present; 0 without any)",
    "frac_high_in_epi": "fraction of the channel's high pixels lying in the epithelial region (epithelial score > "
                        f"{EPI_THRESHOLD}); 0 when the channel has no high pixel",
    "mean_epi": "mean over the epithelial region (tumour nests); 0 when there is none",
    "mean_stroma": "mean over tissue outside the epithelial region; 0 when there is none",
}
STATS_FEATURES: tuple[str, ...] = tuple(STATS_DESCRIPTIONS)


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def epithelial_channels(markers: Sequence[str]) -> list[int]:
    """Indices of the epithelial markers (Pan-Cytokeratin, E-cadherin, EpCAM; case/punctuation-insensitive)."""
    return [i for i, m in enumerate(markers) if _norm(m) in _EPI_ALIASES]


def tissue_values(vmap: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(n, C) float32 values of the tissue pixels of a (H, W, C) map (mask (H, W) bool)."""
    return np.asarray(vmap[mask], dtype=np.float32)


def morans_i(vmap: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Moran's I per channel (C,) of a (H, W, C) map over the tissue pixels, binary 4-neighbour weights.

    ``I = n / W * sum_ij w_ij z_i z_j / sum_i z_i^2`` with ``z`` the deviations from the tissue mean, ``w_ij = 1``
    for horizontally/vertically adjacent tissue pixels (both directions counted, so ``W = 2 E`` for E adjacent
    pairs). 0 for a constant channel or when no two tissue pixels touch.
    """
    mask = np.asarray(mask, bool)
    c = vmap.shape[-1]
    out = np.zeros(c, np.float32)
    n = int(mask.sum())
    eh = mask[:, :-1] & mask[:, 1:]
    ev = mask[:-1, :] & mask[1:, :]
    n_edges = int(eh.sum() + ev.sum())
    if n < 2 or n_edges == 0:
        return out
    for k in range(c):  # one (H, W) float64 plane at a time (a whole map in float64 can be hundreds of MB)
        z = np.zeros(mask.shape, np.float64)
        v = np.asarray(vmap[..., k][mask], np.float64)
        z[mask] = v - v.mean()
        denom = float((z * z).sum())
        if denom <= 1e-12:
            continue
        # z is 0 outside tissue, so products over all neighbour pairs equal products over tissue-tissue pairs
        cross = float((z[:, :-1] * z[:, 1:]).sum() + (z[:-1, :] * z[1:, :]).sum())
        out[k] = n * cross / (n_edges * denom)
    return out.astype(np.float32)


def _corr(vals: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Pearson r of each column of vals (n, C) with ref (n,); 0 where either is constant."""
    a = vals - vals.mean(axis=0, dtype=np.float64).astype(vals.dtype)
    b = (ref - ref.mean()).astype(vals.dtype)
    num = (a * b[:, None]).sum(axis=0, dtype=np.float64)
    den = np.sqrt((a * a).sum(axis=0, dtype=np.float64) * float((b.astype(np.float64) ** 2).sum()))
    return np.where(den > 1e-12, num / np.maximum(den, 1e-300), 0.0)


def stats_features(vmap: np.ndarray, mask: np.ndarray | None, markers: Sequence[str],
                   high: float = HIGH_THRESHOLD, epi_threshold: float = EPI_THRESHOLD) -> np.ndarray:
    """Per-channel spatial descriptors (C, len(STATS_FEATURES)) float32 of a (H, W, C) map.

    ``mask`` (H, W) bool = tissue pixels (None: pixels where any channel > 0). ``markers`` (C names) locate the
    epithelial channels; without any the co-location columns are 0 (warning). An empty mask gives all zeros.
    """
    vmap = np.asarray(vmap)
    if vmap.ndim != 3:
        raise ValueError(f"expected a (H, W, C) map, got shape {vmap.shape}")
    c = vmap.shape[-1]
    if len(markers) != c:
        raise ValueError(f"{len(markers)} marker names for a map with {c} channels")
    mask = (np.asarray(vmap) > 0).any(axis=-1) if mask is None else np.asarray(mask, bool)
    if mask.shape != vmap.shape[:2]:
        raise ValueError(f"tissue mask {mask.shape} does not match the map {vmap.shape[:2]}")
    out = np.zeros((c, len(STATS_FEATURES)), np.float64)
    vals = tissue_values(vmap, mask)  # (n, C) float32; sums below accumulate in float64
    if len(vals) == 0:
        return out.astype(np.float32)
    col = {k: i for i, k in enumerate(STATS_FEATURES)}
    hi = vals > high
    out[:, col["mean"]] = vals.mean(axis=0, dtype=np.float64)
    out[:, col["sd"]] = vals.std(axis=0, dtype=np.float64)
    q = np.quantile(vals, [0.5, 0.9], axis=0)
    out[:, col["p50"]], out[:, col["p90"]] = q[0], q[1]
    out[:, col["frac_high"]] = hi.mean(axis=0)
    out[:, col["moran_i"]] = morans_i(vmap, mask)
    epi = epithelial_channels(markers)
    if not epi:
        log.warning("no epithelial channel (%s) among the markers: co-location columns are 0",
                    "/".join(EPITHELIAL_MARKERS))
        return out.astype(np.float32)
    score = vals[:, epi].mean(axis=1, dtype=np.float64)
    region = score > epi_threshold
    out[:, col["corr_epi"]] = _corr(vals, score)
    n_hi = hi.sum(axis=0)
    out[:, col["frac_high_in_epi"]] = np.where(n_hi > 0, (hi & region[:, None]).sum(axis=0) / np.maximum(n_hi, 1), 0)
    if region.any():
        out[:, col["mean_epi"]] = vals[region].mean(axis=0, dtype=np.float64)
    if (~region).any():
        out[:, col["mean_stroma"]] = vals[~region].mean(axis=0, dtype=np.float64)
    return out.astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# image encoders (DINOv2 as the original MICA)


def channel_images(vmap: np.ndarray) -> torch.Tensor:
    """uint8 (C, 1, H, W) grey images of a (H, W, C) map: clip to [0, 1], x 255, rounded (one image per marker;
    it becomes 3 identical RGB channels in :func:`to_model_input`)."""
    x = np.clip(np.nan_to_num(np.asarray(vmap, np.float32), nan=0.0), 0.0, 1.0)
    img = np.rint(x * 255.0).astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)[:, None]))


def resize_grey(img: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, 1, H, W) -> float32 (B, 1, size, size) in [0, 1]: bicubic (antialiased when shrinking), clamped
    and rounded to the uint8 grid (what ``PIL.Image.resize(BICUBIC)`` of a uint8 image gives, up to rounding)."""
    x = img.float()
    if tuple(x.shape[-2:]) != (size, size):
        shrink = x.shape[-1] > size or x.shape[-2] > size
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=shrink)
        x = x.clamp(0, 255).round()
    return x / 255.0


def to_model_input(grey: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """float (B, 1, S, S) in [0, 1] -> normalised (B, 3, S, S): the grey image copied to R, G, B, then
    ``(x - mean) / std`` per channel."""
    m = torch.tensor(mean, dtype=grey.dtype, device=grey.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=grey.dtype, device=grey.device).view(1, 3, 1, 1)
    return (grey.expand(-1, 3, -1, -1) - m) / s


def channel_batches(items, batch_size: int):
    """(slide, images (C, 1, S, S)) items -> (batch (B, 1, S, S), [(slide, channel), ...]) batches of ``batch_size``
    images (the last may be smaller); a batch may hold the channels of several slides."""
    imgs: list[torch.Tensor] = []
    keys: list[tuple[str, int]] = []
    for slide, x in items:
        imgs += list(x)
        keys += [(slide, c) for c in range(len(x))]
        while len(imgs) >= batch_size:
            yield torch.stack(imgs[:batch_size]), keys[:batch_size]
            del imgs[:batch_size], keys[:batch_size]
    if imgs:
        yield torch.stack(imgs), keys
