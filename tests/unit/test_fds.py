"""FDS / LDS: kernels, bucket statistics, calibration, distributed synchronisation, LDS weights."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from hex.fds import FDS, KERNELS, kernel_window, label_buckets, lds_weights, per_marker_linear

torch.set_num_threads(2)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("ks", [1, 5, 9])
def test_kernel_windows_sum_to_one(kernel: str, ks: int) -> None:
    w = kernel_window(kernel, ks, sigma=2.0)
    assert w.shape == (ks,)
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    torch.testing.assert_close(w, w.flip(0))
    assert int(w.argmax()) == (ks - 1) // 2
    with pytest.raises(ValueError):
        kernel_window("box", 5, 1.0)
    with pytest.raises(ValueError):
        kernel_window(kernel, 4, 1.0)


def test_label_buckets() -> None:
    y = torch.tensor([0.0, 0.019, 0.02, 0.5, 0.999, 1.0, 1.7, -0.2])
    assert label_buckets(y, 50).tolist() == [0, 0, 1, 25, 49, 49, 49, 0]
    assert label_buckets(y, 50, bucket_start=2).tolist() == [0, 0, 0, 23, 47, 47, 47, 0]


def _bucketed(num: int, bucket_num: int, markers: int, seed: int = 0) -> torch.Tensor:
    """Labels (num, markers) spread over all buckets (centres)."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randint(0, bucket_num, (num, markers), generator=g)
    return (b.float() + 0.5) / bucket_num


def test_running_stats_match_direct_computation() -> None:
    g = torch.Generator().manual_seed(0)
    fds = FDS(feature_dim=4, num_markers=2, bucket_num=10, ks=5, start_smooth=1)
    y = _bucketed(300, 10, 2)
    f = torch.randn(300, 4, generator=g) + y[:, :1] * 3
    fds.update_running_stats(f, y, epoch=0)
    b = fds.buckets(y)
    for m in range(2):
        for k in range(10):
            sel = f[b[:, m] == k]
            torch.testing.assert_close(fds.running_mean[m, k], sel.mean(0), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(fds.running_var[m, k], sel.var(0, unbiased=True), rtol=1e-5, atol=1e-5)
            assert fds.num_samples_tracked[m, k] == len(sel)
    # momentum: the next epoch mixes 10 % new statistics into 90 % old
    old = fds.running_mean.clone()
    f2 = f + 1.0
    fds.update_running_stats(f2, y, epoch=1)
    torch.testing.assert_close(fds.running_mean, 0.9 * old + 0.1 * (old + 1.0), rtol=1e-5, atol=1e-5)


def test_before_start_smooth_features_are_broadcast() -> None:
    fds = FDS(feature_dim=6, num_markers=3, bucket_num=10, ks=5, start_smooth=5)
    f = torch.randn(4, 6)
    out = fds.smooth(f, torch.rand(4, 3), epoch=4)
    assert out.shape == (4, 3, 6)
    assert torch.equal(out, f.unsqueeze(1).expand(4, 3, 6))


def test_constant_distribution_leaves_features_unchanged() -> None:
    """Every populated bucket holds the same feature vectors -> identical statistics -> identity calibration.
    Buckets 6..9 stay empty (labels < 0.6) and must not disturb the smoothing."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(12, 5, generator=g) * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0]) + 2.0
    feats, labels = [], []
    for k in range(6):
        feats.append(base)
        labels.append(torch.full((12, 2), (k + 0.5) / 10))
    f, y = torch.cat(feats), torch.cat(labels)
    fds = FDS(feature_dim=5, num_markers=2, bucket_num=10, ks=5, sigma=1.0, start_smooth=1)
    fds.update_running_stats(f, y, epoch=0)
    assert fds.update_last_epoch_stats(1)
    assert not fds.update_last_epoch_stats(1)  # once per epoch
    query = torch.randn(7, 5, generator=g)
    qy = torch.rand(7, 2, generator=g)  # some fall into the empty buckets: passed through
    out = fds.smooth(query, qy, epoch=1)
    torch.testing.assert_close(out, query.unsqueeze(1).expand(7, 2, 5), rtol=1e-5, atol=1e-5)


def test_outlier_bucket_is_calibrated_towards_neighbours() -> None:
    g = torch.Generator().manual_seed(2)
    n, bucket_num, outlier = 5000, 20, 8
    y = _bucketed(n, bucket_num, 2, seed=3)
    f = torch.randn(n, 3, generator=g)
    in_outlier = (y[:, 0] * bucket_num).long() == outlier
    f[in_outlier] += torch.tensor([5.0, 0.0, 0.0])  # marker 0, bucket 8: mean shifted in feature 0
    f[in_outlier, 1] *= 4.0  # ... and 16x the variance in feature 1
    fds = FDS(feature_dim=3, num_markers=2, bucket_num=bucket_num, ks=9, sigma=2.0, start_smooth=1)
    fds.update_running_stats(f, y, epoch=0)
    fds.update_last_epoch_stats(1)
    out = fds.smooth(f[in_outlier], y[in_outlier], epoch=1)  # (n_b, 2, 3)
    before, after = f[in_outlier], out[:, 0]
    neighbours = f[~in_outlier & ((y[:, 0] * bucket_num).long() - outlier).abs().le(4)]
    # mean pulled from 5 towards the neighbours' ~0: smoothed = centre weight (~0.2) x 5
    assert before[:, 0].mean() > 4.5
    assert 0.5 < after[:, 0].mean() < 1.6
    assert (after[:, 0].mean() - neighbours[:, 0].mean()).abs() < (before[:, 0].mean() - neighbours[:, 0].mean()).abs()
    # spread shrunk towards the neighbours' (clipped at sqrt(0.1) of the original at most)
    assert after[:, 1].std() < 0.6 * before[:, 1].std()
    # marker 1 labels are unrelated to the outlier: its calibration changes these features much less
    assert (out[:, 1, 0].mean() - before[:, 0].mean()).abs() < 1.0


def test_smooth_is_differentiable_and_feeds_per_marker_head() -> None:
    fds = FDS(feature_dim=4, num_markers=3, bucket_num=10, ks=5, start_smooth=1)
    y = _bucketed(200, 10, 3)
    fds.update_running_stats(torch.randn(200, 4) * 2, y, epoch=0)
    fds.update_last_epoch_stats(1)
    f = torch.randn(8, 4, requires_grad=True)
    head = nn.Linear(4, 3)
    out = per_marker_linear(fds.smooth(f, y[:8], epoch=1), head)
    assert out.shape == (8, 3)
    out.sum().backward()
    assert f.grad is not None and f.grad.abs().sum() > 0
    half = fds.smooth(f.detach().half(), y[:8], epoch=1)  # fp16 autocast features: calibrated in float32
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, fds.smooth(f.detach().half().float(), y[:8], epoch=1))
    # without calibration the per-marker head is the plain linear layer
    x = torch.randn(5, 4)
    torch.testing.assert_close(per_marker_linear(x.unsqueeze(1).expand(5, 3, 4), head), head(x))


def test_state_dict_roundtrip() -> None:
    a = FDS(feature_dim=4, num_markers=2, bucket_num=10, ks=5, start_smooth=1)
    a.update_running_stats(torch.randn(50, 4), torch.rand(50, 2), epoch=0)
    a.update_last_epoch_stats(1)
    b = FDS(feature_dim=4, num_markers=2, bucket_num=10, ks=5, start_smooth=1)
    b.load_state_dict(a.state_dict())
    assert int(b.epoch) == 1 and torch.equal(b.smoothed_mean_last_epoch, a.smoothed_mean_last_epoch)
    assert "kernel_window" not in a.state_dict()


def _worker(rank: int, world: int, store_path: str, out_path: str) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(4)
        f, y = torch.randn(120, 6, generator=g), torch.rand(120, 3, generator=g)
        fds = FDS(feature_dim=6, num_markers=3, bucket_num=10, ks=5)
        fds.update_running_stats(f[rank::world], y[rank::world], epoch=0)  # each rank sees half the data
        if rank == 0:
            torch.save(fds.state_dict(), out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gloo_two_ranks_match_single_process(tmp_path) -> None:
    """2 real gloo ranks, each with half of the samples: the all-reduced statistics equal one process with all of
    them (without the all-reduce each rank would hold its half's statistics)."""
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "rank0.pt")), nprocs=2, join=True)
    g = torch.Generator().manual_seed(4)
    f, y = torch.randn(120, 6, generator=g), torch.rand(120, 3, generator=g)
    local = FDS(feature_dim=6, num_markers=3, bucket_num=10, ks=5)
    local.update_running_stats(f, y, epoch=0)
    synced = torch.load(tmp_path / "rank0.pt", weights_only=True)
    for name in ("running_mean", "running_var", "num_samples_tracked"):
        torch.testing.assert_close(synced[name], getattr(local, name), rtol=1e-5, atol=1e-6)


def test_lds_weights() -> None:
    g = torch.Generator().manual_seed(5)
    common = torch.rand(950, 1, generator=g) * 0.2  # labels mostly in [0, 0.2)
    rare = 0.8 + torch.rand(50, 1, generator=g) * 0.2
    y = torch.cat([torch.cat([common, rare]), torch.rand(1000, 1, generator=g)], dim=1)  # marker 1 uniform
    w = lds_weights(y, bucket_num=50, kernel="gaussian", ks=9, sigma=2)
    assert w.shape == (1000, 2) and w.dtype == torch.float32
    torch.testing.assert_close(w.mean(0), torch.ones(2))
    assert w[950:, 0].mean() > 2 * w[:950, 0].mean()
    assert w[:, 1].std() < w[:, 0].std()  # a flat label distribution is barely re-weighted
    w_inv = lds_weights(y, reweight="inv")
    assert w_inv[950:, 0].mean() / w_inv[:950, 0].mean() > w[950:, 0].mean() / w[:950, 0].mean()
    assert torch.equal(lds_weights(y, reweight="none"), torch.ones(1000, 2))
    for kernel in KERNELS:
        assert torch.isfinite(lds_weights(y, kernel=kernel)).all()
    with pytest.raises(ValueError):
        lds_weights(y, reweight="log")
