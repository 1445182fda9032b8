"""Regression losses for HEX: Barron's general adaptive robust loss, MSE and Huber.

Barron, "A General and Adaptive Robust Loss Function", CVPR 2019. With ``z = (x / c)^2``::

    rho(x, alpha, c) = |alpha - 2| / alpha * ((z / |alpha - 2| + 1)^(alpha / 2) - 1)
    alpha = 2     -> z / 2                       (L2)
    alpha = 0     -> log(z / 2 + 1)              (Cauchy)
    alpha = -inf  -> 1 - exp(-z / 2)             (Welsch)
    alpha = +inf  -> exp(z / 2) - 1

The adaptive loss is the negative log-likelihood of the matching density (``alpha`` in [0, 2])::

    nll(x) = rho(x, alpha, c) + log(c) + log Z(alpha),   Z(alpha) = integral exp(-rho(x, alpha, 1)) dx

``log Z`` is tabulated once per process by ``scipy.integrate.quad`` on a grid that is uniform in
``s = arccos(1 - alpha) / pi`` (dense near alpha = 0 and 2, where log Z is hardest to interpolate; log Z is even in
``s`` about both ends) and evaluated with a cubic Hermite (Catmull-Rom) interpolant in torch, differentiable in alpha.

All losses built by :func:`build_loss` map ``(pred (B, M), target (B, M), weight (B, M) | None) -> scalar``: the mean
over batch and markers of ``weight * elementwise_loss`` (LDS weights are normalised to mean 1 per marker);
``loss.masked(pred, target)`` is the mean over the elements whose target is finite (the dense head's labels: NaN =
no CODEX in the cell).
"""

from __future__ import annotations

import functools
import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

_TABLE_KNOTS = 1025
_ALPHA_MAX = 2.0


# ------------------------------------------------------------------------------------------------- the robust loss
def general_robust_loss(x: torch.Tensor, alpha: torch.Tensor | float, scale: torch.Tensor | float) -> torch.Tensor:
    """Barron's rho(x, alpha, c), elementwise with broadcasting; same units as ``(x / c)^2``.

    ``alpha`` may be any real or +-inf; 0, 2 and +-inf use their limits exactly, other values use
    ``b / a * expm1(a / 2 * log1p(z / b))`` with ``b = |a - 2|`` (``|a|`` and ``b`` floored at the dtype's eps), which
    stays accurate arbitrarily close to 0 and 2.
    Gradients are finite w.r.t. ``x``, ``alpha`` and ``scale`` everywhere (the unused branches get safe inputs).
    """
    x = torch.as_tensor(x)
    alpha = torch.as_tensor(alpha, dtype=x.dtype, device=x.device)
    scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    eps = torch.finfo(x.dtype).eps
    z = (x / scale) ** 2

    is_zero = alpha == 0
    is_two = alpha == 2
    is_neg_inf = alpha == -math.inf
    is_pos_inf = alpha == math.inf
    special = is_zero | is_two | is_neg_inf | is_pos_inf
    a = torch.where(special, torch.ones_like(alpha), alpha)  # placeholder keeps the general branch finite
    a_safe = torch.where(a >= 0, torch.ones_like(a), -torch.ones_like(a)) * a.abs().clamp_min(eps)
    b_safe = (a - 2).abs().clamp_min(eps)
    general = b_safe / a_safe * torch.expm1(0.5 * a_safe * torch.log1p(z / b_safe))

    loss = torch.where(is_zero, torch.log1p(0.5 * z), general)
    loss = torch.where(is_two, 0.5 * z, loss)
    loss = torch.where(is_neg_inf, -torch.expm1(-0.5 * z), loss)
    z_inf = torch.where(is_pos_inf, z, torch.zeros_like(z)).clamp_max(2.0 * math.log(torch.finfo(x.dtype).max) - 1)
    loss = torch.where(is_pos_inf, torch.expm1(0.5 * z_inf), loss)
    return loss


def _rho_scalar(x: float, alpha: float) -> float:
    """float64 rho(x, alpha, 1) for the quadrature (alpha in [0, 2])."""
    z = x * x
    if alpha == 0.0:
        return math.log1p(0.5 * z)
    if alpha == 2.0:
        return 0.5 * z
    b = abs(alpha - 2.0)
    return b / alpha * math.expm1(0.5 * alpha * math.log1p(z / b))


def partition_integral(alpha: float) -> float:
    """Z(alpha) = integral over the real line of exp(-rho(x, alpha, 1)) by ``scipy.integrate.quad``; alpha in [0, 2]."""
    from scipy.integrate import quad

    if not 0.0 <= alpha <= _ALPHA_MAX:
        raise ValueError(f"alpha must lie in [0, 2] for a normalisable density, got {alpha}")
    value, _ = quad(lambda t: math.exp(-_rho_scalar(t, alpha)), 0.0, math.inf, epsabs=1e-13, epsrel=1e-11, limit=200)
    return 2.0 * value


@functools.lru_cache(maxsize=1)
def _log_partition_table() -> np.ndarray:
    """log Z at alpha_k = 1 - cos(pi * s_k), s_k uniform on [0, 1] (``_TABLE_KNOTS`` knots); ~0.1 s, cached."""
    s = np.linspace(0.0, 1.0, _TABLE_KNOTS)
    alphas = np.clip(1.0 - np.cos(np.pi * s), 0.0, _ALPHA_MAX)
    alphas[0], alphas[-1] = 0.0, _ALPHA_MAX
    table = np.array([math.log(partition_integral(float(a))) for a in alphas])
    log.debug("tabulated log Z(alpha) at %d knots", _TABLE_KNOTS)
    return table


_TORCH_TABLES: dict[tuple[str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def _torch_table(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (str(device), torch.float64)
    if key not in _TORCH_TABLES:
        y = torch.as_tensor(_log_partition_table(), dtype=torch.float64, device=device)
        # Catmull-Rom tangents (per knot step); log Z is even in s about s = 0 and s = 1 -> zero end tangents
        padded = torch.cat([y[1:2], y, y[-2:-1]])
        m = 0.5 * (padded[2:] - padded[:-2])
        _TORCH_TABLES[key] = (y, m)
    return _TORCH_TABLES[key]


def log_partition(alpha: torch.Tensor, check: bool = True) -> torch.Tensor:
    """log Z(alpha) for alpha in [0, 2] (any shape, differentiable; computed in float64, returned in alpha's dtype).

    Accuracy vs direct quadrature: < 1e-7 over [0, 2]. ``check=False`` skips the range check (a host sync)."""
    alpha = torch.as_tensor(alpha)
    if check and torch.any((alpha < 0) | (alpha > _ALPHA_MAX)):
        raise ValueError("log_partition is defined for alpha in [0, 2]")
    y, m = _torch_table(alpha.device)
    a = alpha.to(torch.float64).clamp(1e-12, _ALPHA_MAX - 1e-12)
    u = torch.arccos(1.0 - a) / math.pi * (_TABLE_KNOTS - 1)
    i = u.detach().floor().long().clamp(0, _TABLE_KNOTS - 2)
    t = u - i.to(u.dtype)
    t2, t3 = t * t, t * t * t
    out = (
        (2 * t3 - 3 * t2 + 1) * y[i]
        + (t3 - 2 * t2 + t) * m[i]
        + (-2 * t3 + 3 * t2) * y[i + 1]
        + (t3 - t2) * m[i + 1]
    )
    return out.to(alpha.dtype if alpha.is_floating_point() else torch.get_default_dtype())


def _inv_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class AdaptiveRobustLoss(nn.Module):
    """Barron's adaptive loss with a learnable shape alpha and scale c per dimension.

    ``alpha = alpha_lo + (alpha_hi - alpha_lo) * sigmoid(latent_alpha)`` and ``c = softplus(latent_scale) + scale_lo``;
    ``alpha_init`` defaults to the middle of [alpha_lo, alpha_hi]. ``forward(residual (B, num_dims)) -> (B, num_dims)``
    negative log-likelihood ``rho(x, alpha, c) + log c + log Z(alpha)`` (nats; a proper density in x).
    ``alpha_lo == alpha_hi`` fixes alpha (no parameter).
    """

    def __init__(
        self,
        num_dims: int = 40,
        alpha_lo: float = 0.001,
        alpha_hi: float = 1.999,
        alpha_init: float | None = None,
        scale_lo: float = 1e-5,
        scale_init: float = 1.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= alpha_lo <= alpha_hi <= _ALPHA_MAX:
            raise ValueError(f"need 0 <= alpha_lo <= alpha_hi <= 2, got [{alpha_lo}, {alpha_hi}]")
        if scale_lo <= 0 or scale_init <= scale_lo:
            raise ValueError(f"need 0 < scale_lo < scale_init, got {scale_lo}, {scale_init}")
        self.num_dims = num_dims
        self.alpha_lo, self.alpha_hi, self.scale_lo = float(alpha_lo), float(alpha_hi), float(scale_lo)
        if alpha_lo == alpha_hi:
            self.register_buffer("fixed_alpha", torch.full((num_dims,), float(alpha_lo)))
            self.latent_alpha = None
        else:
            init = (alpha_lo + alpha_hi) / 2 if alpha_init is None else float(alpha_init)
            if not alpha_lo < init < alpha_hi:
                raise ValueError(f"alpha_init must lie strictly inside ({alpha_lo}, {alpha_hi}), got {init}")
            p = (init - alpha_lo) / (alpha_hi - alpha_lo)
            self.latent_alpha = nn.Parameter(torch.full((num_dims,), math.log(p / (1 - p))))
        self.latent_scale = nn.Parameter(torch.full((num_dims,), _inv_softplus(scale_init - scale_lo)))
        _log_partition_table()  # build the table now, not inside the first training step

    def alpha(self) -> torch.Tensor:
        """Current shape per dimension, (num_dims,)."""
        if self.latent_alpha is None:
            return self.fixed_alpha
        return self.alpha_lo + (self.alpha_hi - self.alpha_lo) * torch.sigmoid(self.latent_alpha)

    def scale(self) -> torch.Tensor:
        """Current scale c per dimension, (num_dims,), in the residual's units."""
        return F.softplus(self.latent_scale) + self.scale_lo

    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        """``residual``: (B, num_dims) -> per-element NLL (B, num_dims); half precision inputs are computed in
        float32."""
        if residual.shape[-1] != self.num_dims:
            raise ValueError(f"residual last dim {residual.shape[-1]} != num_dims {self.num_dims}")
        if residual.dtype in (torch.float16, torch.bfloat16):
            residual = residual.float()
        alpha = self.alpha().to(residual.dtype)
        scale = self.scale().to(residual.dtype)
        rho = general_robust_loss(residual, alpha, scale)
        return rho + torch.log(scale) + log_partition(alpha, check=False)


# --------------------------------------------------------------------------------------------- (pred, target) losses
class RegressionLoss(nn.Module):
    """Base: ``forward(pred (B, M), target (B, M), weight (B, M) | None) -> scalar`` = mean(weight * elementwise),
    computed in float32 at least."""

    def elementwise(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        if pred.dtype in (torch.float16, torch.bfloat16):  # fp16 autocast: losses in float32
            pred = pred.float()
        loss = self.elementwise(pred, target.to(pred.dtype))
        if weight is not None:
            loss = loss * weight.to(loss.dtype)
        return loss.mean()

    def masked(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean of the elementwise loss over the finite elements of ``target`` (NaN = no label): ``pred`` and
        ``target`` (N, M) (for the dense head N = B*G*G cells, M markers); 0 (with a zero gradient) when no element
        is finite. Computed in float32 at least."""
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        if pred.dtype in (torch.float16, torch.bfloat16):
            pred = pred.float()
        target = target.to(pred.dtype)
        valid = torch.isfinite(target)
        # a missing target is replaced by the (detached) prediction: residual 0, finite loss and gradient, masked out
        loss = self.elementwise(pred, torch.where(valid, target, pred.detach()))
        loss = torch.where(valid, loss, torch.zeros_like(loss))
        return loss.sum() / valid.sum().clamp_min(1).to(loss.dtype)


class AdaptiveLoss(RegressionLoss):
    """Adaptive robust NLL of ``pred - target`` (one alpha and scale per marker; its parameters are trainable, add
    them to the optimiser)."""

    def __init__(self, num_dims: int = 40, **kw) -> None:
        super().__init__()
        self.robust = AdaptiveRobustLoss(num_dims=num_dims, **kw)

    def elementwise(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.robust(pred - target)


class MSELoss(RegressionLoss):
    """Squared error ``(pred - target)^2``."""

    def elementwise(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (pred - target) ** 2


class HuberLoss(RegressionLoss):
    """Huber loss with threshold ``delta`` (in label units)."""

    def __init__(self, delta: float = 1.0) -> None:
        super().__init__()
        self.delta = float(delta)

    def elementwise(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.huber_loss(pred, target, reduction="none", delta=self.delta)


LOSSES = ("adaptive", "mse", "huber")


def build_loss(name: str, num_dims: int = 40, **kw) -> RegressionLoss:
    """``adaptive`` (kw: ``alpha_lo``, ``alpha_hi``, ``alpha_init``, ``scale_lo``, ``scale_init``), ``mse`` or
    ``huber`` (kw: ``delta``). Returns a module ``(pred, target, weight=None) -> scalar mean loss``."""
    if name == "adaptive":
        return AdaptiveLoss(num_dims=num_dims, **kw)
    if name == "mse":
        if kw:
            raise TypeError(f"mse takes no options, got {sorted(kw)}")
        return MSELoss()
    if name == "huber":
        return HuberLoss(**kw)
    raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")
