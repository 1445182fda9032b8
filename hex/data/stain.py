"""Stain normalisation of H&E patches to a target (Macenko or Reinhard, via torchstain), recorded with a HEX run.

A run trained with ``python -m hex.train --stain-norm macenko --stain-target target.png`` fits the normaliser once
on the target image (:func:`fit_stain_norm`) and stores the fitted parameters as plain JSON in its ``config.json``,
``best.json`` (and the safetensors header) and checkpoints, under ``stain_norm``::

    {"method": "macenko", "target": "/abs/target.png", "target_sha256": "...",
     "params": {"HERef": [[r, r], [g, g], [b, b]], "maxCRef": [h99, e99], "Io": 240, "alpha": 1, "beta": 0.1}}
    {"method": "reinhard", "target": ..., "target_sha256": ..., "params": {"means": [L, a, b], "stds": [L, a, b]}}

Everything that later reads the run (``hex.test``, ``hex.infer_wsi``, ``mica.extract_features --encoder hex:RUN``)
builds its :class:`hex.data.transforms.BatchTransform` with that record, so each patch is normalised exactly as in
training; the target image is not needed again.

Macenko (Macenko et al. 2009): per patch, the two stain OD vectors are estimated from the tissue pixels (OD >=
``beta`` in every channel) and the concentrations rescaled to the target's 99th percentiles, then re-rendered with
the target's vectors. A patch with less than :data:`MIN_TISSUE_FRACTION` tissue pixels (background) is left as it
is. Reinhard (Reinhard et al. 2001): per patch, each LAB channel is standardised and given the target's mean and
standard deviation. Both run per patch on the CPU (torchstain's torch backend); a few ms per 224-px patch.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

METHODS = ("none", "macenko", "reinhard")
# Macenko: transmitted light Io, angle percentile alpha (%), transparency threshold beta (OD in every channel).
# torchstain's defaults except beta (0.15 there): eosin's red OD is small (~0.1 per unit stain), so with 0.15 the
# eosin-only pixels of pale slides count as glass and both stain vectors are fitted on nuclei
MACENKO_DEFAULTS = {"Io": 240.0, "alpha": 1.0, "beta": 0.10}
MIN_TISSUE_FRACTION = 0.01  # Macenko: below this fraction of tissue pixels (OD >= beta in R, G and B) a patch is kept


MOSAIC_SIDE = 4  # a patch-store target is a MOSAIC_SIDE x MOSAIC_SIDE mosaic of evenly spaced patches


def patch_store_mosaic(path: str | Path, side: int = MOSAIC_SIDE) -> np.ndarray:
    """A ``side`` x ``side`` mosaic of evenly spaced patches (in grid order) of one patch store
    ``he_patches/{slide}.h5`` (stage 03): uint8 (side * P, side * P, 3) RGB for P-px patches, e.g. 896 x 896 px of
    16 patches of 224 px. Fewer patches than ``side**2`` repeat some."""
    from preprocess.patch_store_format import PatchStoreReader

    with PatchStoreReader(path) as r:
        if len(r) == 0:
            raise PipelineError(f"--stain-target {path}: the patch store holds no patches; choose another slide")
        idx = np.linspace(0, len(r) - 1, side * side).round().astype(int)
        tiles = [r[int(i)] for i in idx]
    rows = [np.concatenate(tiles[k * side:(k + 1) * side], axis=1) for k in range(side)]
    return np.concatenate(rows, axis=0)


def read_target(path: str | Path) -> np.ndarray:
    """The target image as uint8 (H, W, 3) RGB (an alpha channel is dropped): an image file, or a stage-03 patch
    store ``.h5`` (:func:`patch_store_mosaic` of its patches). PipelineError when unreadable."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"--stain-target {path}: file not found (an RGB PNG/JPEG/TIFF of well-stained H&E, or a "
                            "slide's patch store he_patches/{slide}.h5)")
    if path.suffix.lower() in (".h5", ".hdf5"):
        return patch_store_mosaic(path)
    try:
        with Image.open(path) as im:
            img = np.array(im.convert("RGB"), dtype=np.uint8)
    except OSError as e:
        raise PipelineError(f"--stain-target {path}: cannot read the image ({e}); give an RGB PNG/JPEG/TIFF") from e
    if min(img.shape[:2]) < 32:
        raise PipelineError(f"--stain-target {path}: {img.shape[1]}x{img.shape[0]} px is too small to fit a stain "
                            "normalisation; give a tissue region of at least 224 x 224 px")
    return img


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fit_stain_norm(method: str, target: str | Path | None) -> dict[str, Any] | None:
    """Fit ``method`` (``none``, ``macenko``, ``reinhard``) on the ``target`` image file; the JSON-ready record
    (see the module docstring) or None for ``none``. PipelineError for an unknown method, a missing target, or a
    target with too little stained tissue."""
    if method not in METHODS:
        raise PipelineError(f"--stain-norm {method}: choose one of {', '.join(METHODS)}")
    if method == "none":
        return None
    if target is None:
        raise PipelineError(f"--stain-norm {method} needs --stain-target PNG (a well-stained H&E tissue region)")
    path = Path(target).resolve()
    img = torch.from_numpy(read_target(path)).permute(2, 0, 1).contiguous()  # (3, H, W) uint8
    import torchstain

    if method == "macenko":
        if _tissue_fraction(img, MACENKO_DEFAULTS["Io"], MACENKO_DEFAULTS["beta"]) < MIN_TISSUE_FRACTION:
            raise PipelineError(f"--stain-target {path}: less than {MIN_TISSUE_FRACTION:.0%} of its pixels are "
                                "stained tissue; crop a region of tissue as the target")
        norm = torchstain.normalizers.MacenkoNormalizer(backend="torch")
        norm.fit(img, **MACENKO_DEFAULTS)
        params = {"HERef": norm.HERef.tolist(), "maxCRef": norm.maxCRef.tolist(), **MACENKO_DEFAULTS}
    else:
        norm = torchstain.normalizers.ReinhardNormalizer(backend="torch")
        norm.fit(img)
        params = {"means": norm.target_means.tolist(), "stds": norm.target_stds.tolist()}
    if not np.isfinite(np.concatenate([np.ravel(np.asarray(v, dtype=float)) for v in params.values()])).all():
        raise PipelineError(f"--stain-target {path}: the {method} fit gave non-finite values; is it an H&E image?")
    return {"method": method, "target": str(path), "target_sha256": _sha256(path), "params": params}


def check_record(record: Mapping[str, Any] | None, where: str = "stain_norm") -> None:
    """A recorded normalisation (from a run's best.json) is usable: known method and its parameters present."""
    if record is None:
        return
    method, params = record.get("method"), record.get("params") or {}
    need = {"macenko": ("HERef", "maxCRef", "Io", "alpha", "beta"), "reinhard": ("means", "stds")}.get(method)
    if need is None:
        raise PipelineError(f"{where}: unknown stain normalisation method {method!r} (known: macenko, reinhard)")
    missing = [k for k in need if k not in params]
    if missing:
        raise PipelineError(f"{where}: the {method} stain normalisation lacks {missing}; a damaged best.json?")


def _tissue_fraction(img: torch.Tensor, io: float, beta: float) -> float:
    """Fraction of pixels of a uint8 (3, H, W) image whose OD (torchstain's: -ln((I+1)/Io)) is >= beta in every
    channel (Macenko's tissue pixels)."""
    od = -torch.log((img.float() + 1) / io)
    return float((od >= beta).all(0).float().mean())


class StainNormalizer:
    """Apply a recorded normalisation (:func:`fit_stain_norm`) to uint8 batches: ``(B, 3, H, W) -> (B, 3, H, W)``
    uint8 on the batch's device (computed per patch on the CPU, ~15 ms for a 224-px Macenko patch on one core).

    ``cache_mb > 0`` memoises the normalised patches, keyed by their content (BLAKE2b of the uint8 bytes), in an
    LRU of at most that many MiB: training sees every patch once per epoch and the normalisation of a patch does not
    change, so from the second epoch on a patch that fits costs a hash instead of a fit. ``hits`` / ``misses``
    count lookups. Inference sees each patch once and leaves it at 0."""

    def __init__(self, record: Mapping[str, Any], cache_mb: float = 0.0) -> None:
        import torchstain

        check_record(record)
        self.cache_bytes = int(cache_mb * 2**20)
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._cached_bytes = 0
        self.hits = self.misses = 0
        self.method = str(record["method"])
        p = record["params"]
        if self.method == "macenko":
            self._norm = torchstain.normalizers.MacenkoNormalizer(backend="torch")
            self._norm.HERef = torch.tensor(p["HERef"], dtype=torch.float32)
            self._norm.maxCRef = torch.tensor(p["maxCRef"], dtype=torch.float32)
            self._kw = {"Io": float(p["Io"]), "alpha": float(p["alpha"]), "beta": float(p["beta"])}
        else:
            self._norm = torchstain.normalizers.ReinhardNormalizer(backend="torch")
            self._norm.target_means = torch.tensor(p["means"], dtype=torch.float32)
            self._norm.target_stds = torch.tensor(p["stds"], dtype=torch.float32)

    def normalise_image(self, img: torch.Tensor) -> torch.Tensor:
        """One uint8 (3, H, W) CPU image -> normalised uint8 (3, H, W); unchanged when it holds too little tissue
        (Macenko) or is uniform (Reinhard), or when the fit fails on it."""
        try:
            if self.method == "macenko":
                if _tissue_fraction(img, self._kw["Io"], self._kw["beta"]) < MIN_TISSUE_FRACTION:
                    return img
                out, _, _ = self._norm.normalize(img, stains=False, **self._kw)  # (H, W, 3) int
                out = out.permute(2, 0, 1)
            else:
                out = self._norm.normalize(img).permute(2, 0, 1)  # (H, W, 3) uint8
        except (RuntimeError, ValueError):  # e.g. a singular fit on an unusual patch (torch.linalg errors)
            return img
        if out.is_floating_point() and not torch.isfinite(out).all():
            return img
        return out.clamp(0, 255).to(torch.uint8)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.method == "reinhard":  # a uniform patch (std 0) would divide by zero: keep it
            flat = x.reshape(x.shape[0], -1)
            uniform = (flat.amax(1) == flat.amin(1)).tolist()
        else:
            uniform = [False] * x.shape[0]
        cpu = x.detach().cpu()
        out = torch.stack([img if u else self._normalise_cached(img) for img, u in zip(cpu, uniform)])
        return out.to(x.device, non_blocking=True)

    def _normalise_cached(self, img: torch.Tensor) -> torch.Tensor:
        """:meth:`normalise_image` through the content-keyed LRU (when ``cache_mb > 0``)."""
        if self.cache_bytes <= 0:
            return self.normalise_image(img)
        arr = img.contiguous().numpy()
        key = (arr.shape, hashlib.blake2b(arr.tobytes(), digest_size=16).digest())
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            self.hits += 1
            return hit
        self.misses += 1
        out = self.normalise_image(img).clone()
        size = out.numel() * out.element_size()
        if size <= self.cache_bytes:
            self._cache[key] = out
            self._cached_bytes += size
            while self._cached_bytes > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= old.numel() * old.element_size()
        return out
