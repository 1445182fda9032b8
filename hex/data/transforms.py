"""Batch transforms of uint8 H&E patches, run on the training device: augmentation, resize, normalisation.

Images stay uint8 through the DataLoader (4x less copying and pinning than float). :class:`BatchTransform` then
runs batched: an optional stain normalisation to a fitted target (:mod:`hex.data.stain`, the same in training and
inference), flips + rot90 (on uint8), an optional continuous rotation (the original code's ``RandomRotation(90)``),
float conversion, an optional HED stain augmentation and colour jitter at the smaller of source/target resolution,
resize to the backbone input size, normalisation with the backbone mean/std.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as torchvision's rgb_to_grayscale
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.5959, -0.2746, -0.3213), (0.2115, -0.5227, 0.3112))
# Ruifrok & Johnston (2001) stain OD vectors (R, G, B), rows haematoxylin, eosin, DAB: skimage.color.rgb_from_hed
RGB_FROM_HED = ((0.65, 0.70, 0.29), (0.07, 0.99, 0.11), (0.27, 0.57, 0.78))
HED_SHIFT_PER_STRENGTH = 0.25  # stain augmentation: shift half-width (OD) per unit of strength
_LOG_ADJUST = math.log(1e-6)  # skimage's scale: stains = ln(rgb) / ln(1e-6), rgb in [1e-6, 1]


def _hed_matrices(device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rgb_from_hed, hed_from_rgb)`` (3,3) float32: rows of the first are the stains' OD vectors."""
    r = torch.tensor(RGB_FROM_HED, dtype=torch.float64)
    return r.float().to(device), torch.linalg.inv(r).float().to(device)


def rgb_to_hed(x: torch.Tensor) -> torch.Tensor:
    """Colour deconvolution of float RGB images (B,3,H,W) in [0,255] into haematoxylin, eosin and DAB amounts
    (B,3,H,W), in the units of ``skimage.color.rgb2hed`` (optical density ln(1/rgb) / ln(1e6)) but without its
    clamp at 0, so that :func:`hed_to_rgb` inverts it exactly."""
    _, hed_from_rgb = _hed_matrices(x.device)
    od = torch.log(torch.clamp(x / 255.0, min=1e-6)) / _LOG_ADJUST
    return torch.einsum("bchw,cd->bdhw", od, hed_from_rgb)


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hed`: stain amounts (B,3,H,W) -> float RGB (B,3,H,W) in [0,255] (clamped)."""
    rgb_from_hed, _ = _hed_matrices(hed.device)
    od = torch.einsum("bdhw,dc->bchw", hed, rgb_from_hed)
    return torch.clamp(255.0 * torch.exp(od * _LOG_ADJUST), 0.0, 255.0)


def hed_jitter_maps(n: int, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample HED stain perturbations as affine maps of optical density (Tellez et al. 2018): for each sample
    and stain channel (H, E, DAB) a scale ``alpha ~ U[1-s, 1+s]`` and a shift ``beta ~ U[-b, b]``, ``b =``
    :data:`HED_SHIFT_PER_STRENGTH` ``x s`` (in :func:`rgb_to_hed` units x ln(1e6), i.e. natural-log optical
    density: b = 0.05 lets the background lose or gain up to ~3-5 % of its light per stain) act on the stain
    amounts; composed with the deconvolution this is ``od -> A od + c`` with A (n,3,3), c (n,3,1) on the CPU (draws
    from the CPU torch RNG: alpha first, then beta). ``s = 0.4`` covers stain amounts 0.6-1.4x the training ones.
    """
    alpha = 1 - strength + 2 * strength * torch.rand(n, 3)
    beta = (torch.rand(n, 3) * 2 - 1) * (HED_SHIFT_PER_STRENGTH * strength)
    rgb_from_hed, hed_from_rgb = _hed_matrices()
    # row-vector convention of skimage: hed = od @ H, od' = (alpha * hed + beta') @ R; as column vectors:
    a = rgb_from_hed.T @ (alpha.unsqueeze(-1) * hed_from_rgb.T)  # R^T diag(alpha) H^T
    c = (beta @ rgb_from_hed).unsqueeze(-1) / -_LOG_ADJUST  # beta in natural-log OD -> skimage units
    return a, c


def colour_jitter_matrices(n: int, amounts: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample affine colour maps ``x -> A x + k * g`` for images in [0,1]: A (n,3,3) and k (n,) on the CPU,
    where ``g`` is the image's mean gray level (the contrast pivot; the offset is the same on all three channels).

    Composes brightness ``b``, contrast ``c`` (blend with the mean gray), saturation ``s`` (blend with the pixel's
    gray) and hue ``h`` (rotation by ``2 pi h`` of the YIQ chroma plane), with ``b, c, s ~ U[1-a, 1+a]`` and
    ``h ~ U[-a_h, a_h]`` as torchvision's ColorJitter draws them.
    """
    ab, ac, as_, ah = (float(a) for a in amounts)
    b = 1 - ab + 2 * ab * torch.rand(n)
    c = 1 - ac + 2 * ac * torch.rand(n)
    s = 1 - as_ + 2 * as_ * torch.rand(n)
    theta = -(torch.rand(n) * 2 - 1) * ah * 2 * math.pi  # sign: positive h turns like HSV hue
    eye = torch.eye(3).expand(n, 3, 3)
    luma = torch.tensor(_LUMA).view(1, 1, 3).expand(n, 3, 3)  # every row = luma weights: (1 w^T)
    sat = s.view(n, 1, 1) * eye + (1 - s).view(n, 1, 1) * luma
    yiq = torch.tensor(_RGB_TO_YIQ)
    rot = torch.zeros(n, 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2] = torch.cos(theta), -torch.sin(theta)
    rot[:, 2, 1], rot[:, 2, 2] = torch.sin(theta), torch.cos(theta)
    hue = torch.linalg.inv(yiq) @ rot @ yiq
    a = hue @ sat * (c * b).view(n, 1, 1)
    return a, (1 - c) * b  # (hue @ sat) maps gray to gray, so the contrast offset stays (1-c) b g on every channel


@dataclass
class BatchTransform:
    """uint8 (B,3,H,W) batch -> normalised float32 (B,3,S,S) on the batch's device.

    Training: a random element of the dihedral group per sample (horizontal/vertical flips and rot90; on uint8),
    with ``rotation > 0`` a rotation by an angle drawn uniformly from [-rotation, rotation] degrees (bilinear,
    black corners, as torchvision's ``RandomRotation`` but interpolated; the original code uses 90), then colour
    jitter (brightness/contrast/saturation/hue = 0.1/0.1/0.1/0.01). Jitter and normalisation are folded
    into one per-sample 3x3 affine map, applied in a single batched matmul and clamped once to the image range, at
    the smaller of the source and target resolutions (resizing is linear, so the order does not matter). Unlike
    torchvision's ColorJitter the four factors compose in a fixed order without intermediate clamping, and hue
    rotates the YIQ chroma plane instead of shifting HSV hue (identical to first order; <= 3.6 degrees here).
    With ``stain_aug = s > 0`` (training) each sample's haematoxylin, eosin and DAB amounts are first scaled and
    shifted in optical density (:func:`hed_jitter_maps`; drawn after the rotation angles, before the jitter).
    Random numbers come from the CPU torch RNG: results do not depend on the device, and a restored RNG state
    replays them; with ``stain_aug = 0`` the draws are those of a transform without it.

    ``stain_norm``: a fitted stain normalisation (:func:`hex.data.stain.fit_stain_norm`, as recorded in a run's
    ``best.json``) applied to every uint8 patch first, in training and in inference alike (deterministic);
    ``stain_cache_mb`` > 0 memoises the normalised patches (:class:`hex.data.stain.StainNormalizer`; for training,
    which revisits every patch each epoch).
    """

    input_size: int
    mean: Sequence[float]
    std: Sequence[float]
    train: bool = False
    jitter: tuple[float, float, float, float] = (0.1, 0.1, 0.1, 0.01)
    flips: bool = True
    interpolation: str = "bilinear"
    rotation: float = 0.0
    stain_aug: float = 0.0
    stain_norm: dict | None = None
    stain_cache_mb: float = 0.0
    _normalizer: Any = field(default=None, init=False, repr=False, compare=False)

    def _stain_normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 batch -> the same batch with its stains normalised to the recorded target (``stain_norm``)."""
        if self._normalizer is None:
            from hex.data.stain import StainNormalizer

            self._normalizer = StainNormalizer(self.stain_norm, cache_mb=self.stain_cache_mb)
        return self._normalizer(x)

    def _hed(self, x: torch.Tensor) -> torch.Tensor:
        """HED stain augmentation (:func:`hed_jitter_maps`, strength ``stain_aug``) of a float batch in [0,255]."""
        n, dev = x.shape[0], x.device
        a, c = hed_jitter_maps(n, self.stain_aug)
        od = torch.log(torch.clamp(x.reshape(n, 3, -1) / 255.0, min=1e-6)) / _LOG_ADJUST
        od = torch.baddbmm(c.to(dev), a.to(dev), od)
        return torch.clamp(255.0 * torch.exp(od * _LOG_ADJUST), 0.0, 255.0).view_as(x)

    def _colour(self, x: torch.Tensor, colour: bool) -> torch.Tensor:
        """HED augmentation (training, ``stain_aug > 0``), then jitter and normalisation (:meth:`_affine`)."""
        if self.train and self.stain_aug > 0:
            x = self._hed(x)
        return self._affine(x, colour)

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (self.input_size, self.input_size):
            return x
        return F.interpolate(x, size=(self.input_size, self.input_size), mode=self.interpolation,
                             align_corners=False, antialias=self.interpolation in ("bilinear", "bicubic"))

    @staticmethod
    def _geometry(x: torch.Tensor, dense: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Random flip/rot90 per sample of a square uint8 batch (8 dihedral elements, uniform); the same element
        is applied to the sample's ``dense`` map (B,M,G,G) when given."""
        n = x.shape[0]
        code = torch.randint(0, 8, (n,)).tolist()
        out = torch.empty_like(x)
        dense_out = None if dense is None else torch.empty_like(dense)
        for i, c in enumerate(code):
            out[i].copy_(_dihedral(x[i], c))
            if dense_out is not None:
                dense_out[i].copy_(_dihedral(dense[i], c))
        return out, dense_out

    def _affine(self, x: torch.Tensor, colour: bool) -> torch.Tensor:
        """(B,3,H,W) float in [0,255] -> normalised, with the per-sample colour map when ``colour``."""
        n, dev = x.shape[0], x.device
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1)
        offset = (-mean / std).expand(n, 3, 1).to(dev)  # (n,3,1)
        if colour:
            a, k = colour_jitter_matrices(n, self.jitter)
            sub = x[:, :, ::4, ::4]  # mean gray from a 1/16 subsample (the contrast pivot)
            gray = (sub * torch.tensor(_LUMA, device=dev).view(1, 3, 1, 1)).sum(1).mean(dim=(1, 2)) / 255
            offset = offset + (k.to(dev) * gray).view(n, 1, 1) / std.to(dev)
        else:
            a = torch.eye(3).expand(n, 3, 3)
        a = a / (255.0 * std)  # fold 1/255 and 1/std into the matrix
        y = torch.baddbmm(offset, a.to(dev), x.reshape(n, 3, -1))
        if colour:
            y = torch.clamp(y, (-mean / std).to(dev), ((1 - mean) / std).to(dev))
        return y.view_as(x)

    def __call__(self, x: torch.Tensor,
                 dense: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``x`` uint8 (B,3,H,W) -> normalised float32 (B,3,S,S). With ``dense`` (B,M,G,G) float labels of the same
        patches (NaN = no data) returns ``(x, dense)``: ``dense`` gets the same flip/rot90 and rotation as its image
        (rotation: nearest cell, NaN outside the rotated patch); without it the result and the random draws are
        those of the image alone."""
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a uint8 (B,3,H,W) batch, got {x.dtype} {tuple(x.shape)}")
        if dense is not None and (dense.ndim != 4 or dense.shape[0] != x.shape[0] or dense.shape[-1] != dense.shape[-2]
                                  or not dense.is_floating_point()):
            raise ValueError(f"expected a float (B,M,G,G) dense batch for {x.shape[0]} images, got {dense.dtype} "
                             f"{tuple(dense.shape)}")
        colour = self.train and any(self.jitter)
        if self.stain_norm:
            x = self._stain_normalise(x)
        if self.train and self.flips and x.shape[-1] == x.shape[-2]:
            x, dense = self._geometry(x, dense)
        x = x.float()
        if self.train and self.rotation > 0:
            angles = (torch.rand(x.shape[0]) * 2 - 1) * self.rotation
            x = rotate_batch(x, angles)
            if dense is not None:
                dense = rotate_dense(dense, angles)
        if x.shape[-1] < self.input_size:  # upsampling: colour at the (smaller) source resolution
            x = self._resize(self._colour(x, colour))
        else:
            x = self._colour(self._resize(x), colour)
        return x if dense is None else (x, dense)


def _dihedral(v: torch.Tensor, code: int) -> torch.Tensor:
    """Element ``code`` (0-7) of the dihedral group on the last two axes of ``v``: bit 0 flips columns, bit 1 rows,
    bit 2 transposes."""
    if code & 1:
        v = v.flip(-1)
    if code & 2:
        v = v.flip(-2)
    if code & 4:
        v = v.transpose(-1, -2)
    return v


def rotate_dense(dense: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate dense maps (B,M,G,G) like :func:`rotate_batch` rotates their images (same angles, same centre), by
    nearest cell; cells whose centre falls outside the source patch become NaN (no label)."""
    inside = rotate_batch(torch.ones_like(dense[:, :1]), degrees, mode="nearest") > 0.5  # (B,1,G,G)
    out = rotate_batch(torch.nan_to_num(dense, nan=0.0), degrees, mode="nearest")
    nan_src = rotate_batch(torch.isnan(dense).to(dense.dtype), degrees, mode="nearest") > 0.5
    return torch.where(inside & ~nan_src, out, torch.full_like(out, float("nan")))


def rotate_batch(x: torch.Tensor, degrees: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Rotate each image of a float batch (B,C,H,W) about its centre by ``degrees`` (B,) counter-clockwise (as
    ``torchvision.transforms.functional.rotate``), ``mode`` bilinear (or nearest), zeros outside the source; same
    shape out."""
    n, _, h, w = x.shape
    t = degrees.to(torch.float64) * math.pi / 180
    cos, sin = torch.cos(t), torch.sin(t)
    # output pixel (u, v) in normalised coords samples the input at R(-t) (u, v), with the aspect ratio restored
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * h / w
    theta[:, 1, 0], theta[:, 1, 1] = sin * w / h, cos
    grid = F.affine_grid(theta.to(x.device, torch.float32), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)
