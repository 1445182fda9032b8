"""Barron's general robust loss: limits, continuity, log-partition accuracy, gradients, normalisation; build_loss."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F
from scipy.integrate import quad
from scipy.special import k1

from hex import losses
from hex.losses import AdaptiveRobustLoss, build_loss, general_robust_loss, log_partition

torch.set_num_threads(2)


def _rho_reference(x: float, alpha: float) -> float:
    """Plain power form of rho(x, alpha, 1) (float64), valid away from alpha = 0 and 2."""
    b = abs(alpha - 2)
    return b / alpha * ((x * x / b + 1) ** (alpha / 2) - 1)


X = torch.linspace(-6, 6, 49, dtype=torch.float64)


@pytest.mark.parametrize("scale", [0.3, 1.0, 2.5])
def test_special_cases(scale: float) -> None:
    z = (X / scale) ** 2
    torch.testing.assert_close(general_robust_loss(X, 2.0, scale), 0.5 * z)
    torch.testing.assert_close(general_robust_loss(X, 0.0, scale), torch.log(0.5 * z + 1))
    torch.testing.assert_close(general_robust_loss(X, -math.inf, scale), 1 - torch.exp(-0.5 * z))
    torch.testing.assert_close(general_robust_loss(X, math.inf, scale), torch.exp(0.5 * z) - 1)
    torch.testing.assert_close(general_robust_loss(X, 1.0, scale), torch.sqrt(z + 1) - 1)  # pseudo-Huber
    torch.testing.assert_close(general_robust_loss(X, -2.0, scale), 2 * z / (z + 4))  # Geman-McClure


@pytest.mark.parametrize("alpha", [-3.0, -0.5, 0.25, 0.9, 1.3, 1.75, 3.0])
def test_generic_alpha_matches_power_form(alpha: float) -> None:
    want = torch.tensor([_rho_reference(float(x), alpha) for x in X], dtype=torch.float64)
    torch.testing.assert_close(general_robust_loss(X, alpha, 1.0), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_continuity_near_zero_and_two(dtype: torch.dtype) -> None:
    x = X.to(dtype)
    at0, at2 = general_robust_loss(x, 0.0, 1.0), general_robust_loss(x, 2.0, 1.0)
    for d in (1e-9, 1e-7, 1e-5):
        # rho(alpha) - rho(0) ~ alpha * log(1 + z/2)^2 / 4 and rho(2 - b) - z/2 ~ (z b / 4)(1 + log(b / z))
        torch.testing.assert_close(general_robust_loss(x, d, 1.0), at0, rtol=0, atol=2e-4 if d > 1e-6 else 2e-6)
        torch.testing.assert_close(general_robust_loss(x, 2 - d, 1.0), at2, rtol=0, atol=3e-3 if d > 1e-6 else 1e-4)
    assert torch.isfinite(general_robust_loss(x, torch.tensor(2.0, dtype=dtype) - 1e-7, 1.0)).all()


def test_gradients_finite_everywhere() -> None:
    for alpha in (0.0, 1e-8, 1.0, 2.0 - 1e-8, 2.0, -math.inf, math.inf, -2.0):
        x = torch.tensor([-2.0, 0.0, 0.5, 3.0], dtype=torch.float64, requires_grad=True)
        a = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
        c = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        general_robust_loss(x, a, c).sum().backward()
        for t in (x, a, c):
            assert torch.isfinite(t.grad).all(), alpha
    x = torch.tensor([-1.3, 0.2, 2.1], dtype=torch.float64, requires_grad=True)
    a = torch.tensor([0.4, 1.1, 1.8], dtype=torch.float64, requires_grad=True)
    c = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(general_robust_loss, (x, a, c))


def _log_z_direct(alpha: float) -> float:
    """Independent quadrature over the whole real line, split at 0."""

    def f(t: float) -> float:
        if alpha == 0:
            return 1.0 / (0.5 * t * t + 1)
        if alpha == 2:
            return math.exp(-0.5 * t * t)
        return math.exp(-_rho_reference(t, alpha))

    left, _ = quad(f, -math.inf, 0, epsabs=1e-13, epsrel=1e-12, limit=400)
    right, _ = quad(f, 0, math.inf, epsabs=1e-13, epsrel=1e-12, limit=400)
    return math.log(left + right)


@pytest.mark.parametrize("alpha", [0.0, 0.001, 0.01, 0.5, 1.0, 1.5, 1.99, 1.999, 2.0])
def test_log_partition_matches_integration(alpha: float) -> None:
    got = float(log_partition(torch.tensor(alpha, dtype=torch.float64)))
    assert abs(got - _log_z_direct(alpha)) < 1e-4
    assert abs(got - _log_z_direct(alpha)) < 1e-7  # in fact far tighter


def test_log_partition_closed_forms() -> None:
    a = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    want = torch.tensor([math.log(math.pi * math.sqrt(2)), math.log(2 * math.e * k1(1.0)), 0.5 * math.log(2 * math.pi)],
                        dtype=torch.float64)
    torch.testing.assert_close(log_partition(a), want, rtol=0, atol=1e-9)
    assert log_partition(torch.tensor([0.5, 1.5])).dtype == torch.float32


def test_log_partition_gradient() -> None:
    a = torch.tensor([0.05, 0.7, 1.3, 1.95], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(log_partition, (a,))
    h = 1e-4
    for alpha in (0.3, 1.0, 1.7):
        fd = (_log_z_direct(alpha + h) - _log_z_direct(alpha - h)) / (2 * h)
        g = torch.func.grad(log_partition)(torch.tensor(alpha, dtype=torch.float64))
        assert abs(float(g) - fd) < 1e-5


def test_table_is_fast_and_cached() -> None:
    losses._log_partition_table.cache_clear()
    t0 = time.process_time()  # CPU time: robust to other processes sharing the cores
    losses._log_partition_table()
    assert time.process_time() - t0 < 1.0
    t0 = time.process_time()
    AdaptiveRobustLoss(num_dims=4)
    assert time.process_time() - t0 < 0.1


def test_adaptive_loss_parameters_and_gradients() -> None:
    loss = AdaptiveRobustLoss(num_dims=3, alpha_init=1.2, scale_init=0.5)
    torch.testing.assert_close(loss.alpha(), torch.full((3,), 1.2))
    torch.testing.assert_close(loss.scale(), torch.full((3,), 0.5))
    default = AdaptiveRobustLoss(num_dims=2)
    torch.testing.assert_close(default.alpha(), torch.full((2,), 1.0))
    torch.testing.assert_close(default.scale(), torch.ones(2))
    residual = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    nll = loss(residual)
    assert nll.shape == (16, 3)
    nll.mean().backward()
    assert loss.latent_alpha.grad is not None and (loss.latent_alpha.grad.abs() > 0).all()
    assert loss.latent_scale.grad is not None and (loss.latent_scale.grad.abs() > 0).all()
    with pytest.raises(ValueError):
        AdaptiveRobustLoss(alpha_lo=0.5, alpha_hi=2.5)
    with pytest.raises(ValueError):
        AdaptiveRobustLoss(alpha_init=1.999)
    fixed = AdaptiveRobustLoss(num_dims=2, alpha_lo=1.0, alpha_hi=1.0)
    assert fixed.latent_alpha is None and torch.equal(fixed.alpha(), torch.ones(2))


@pytest.mark.parametrize("alpha,scale", [(0.2, 0.5), (1.0, 1.0), (1.8, 2.0)])
def test_nll_is_a_density(alpha: float, scale: float) -> None:
    loss = AdaptiveRobustLoss(num_dims=1, alpha_init=alpha, scale_init=scale).double()

    def density(x: float) -> float:
        with torch.no_grad():
            return math.exp(-float(loss(torch.tensor([[x]], dtype=torch.float64))))

    total = quad(density, -math.inf, 0, limit=400)[0] + quad(density, 0, math.inf, limit=400)[0]
    assert abs(total - 1.0) < 1e-6


def test_adaptive_learns_heavier_tails_for_outliers() -> None:
    """A few optimiser steps on Cauchy-like residuals push alpha down (the loss adapts its shape)."""
    torch.manual_seed(0)
    residual = torch.distributions.StudentT(1.0).sample((512, 2)) * 0.1
    loss = AdaptiveRobustLoss(num_dims=2)
    opt = torch.optim.Adam(loss.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        loss(residual).mean().backward()
        opt.step()
    assert (loss.alpha() < 0.5).all()


def test_build_loss() -> None:
    g = torch.Generator().manual_seed(1)
    pred, target = torch.rand(8, 5, generator=g), torch.rand(8, 5, generator=g)
    weight = torch.rand(8, 5, generator=g) + 0.5
    torch.testing.assert_close(build_loss("mse", 5)(pred, target), F.mse_loss(pred, target))
    torch.testing.assert_close(build_loss("mse", 5)(pred, target, weight), (weight * (pred - target) ** 2).mean())
    torch.testing.assert_close(build_loss("huber", 5, delta=0.1)(pred, target),
                               F.huber_loss(pred, target, delta=0.1))
    adaptive = build_loss("adaptive", 5, alpha_init=0.5)
    assert len(list(adaptive.parameters())) == 2
    value = adaptive(pred, target, weight)
    assert value.ndim == 0 and torch.isfinite(value)
    torch.testing.assert_close(value, (weight * adaptive.robust(pred - target)).mean())
    half = build_loss("adaptive", 5)(pred.half(), target)
    assert half.dtype == torch.float32 and torch.isfinite(half)
    with pytest.raises(ValueError, match="adaptive"):
        build_loss("l7", 5)
    with pytest.raises(ValueError):
        build_loss("mse", 5)(pred, target[:, :4])
