"""Feature / label distribution smoothing (Yang et al., "Delving into Deep Imbalanced Regression", ICML 2021), per
marker.

Labels are in ``label_range`` (default [0, 1]) and fall into ``bucket_num`` equal-width buckets,
``b = clamp(floor((y - lo) / (hi - lo) * bucket_num), bucket_start, bucket_num - 1) - bucket_start`` (labels below
``bucket_start`` share its bucket, as in the DIR code).

FDS keeps, for every marker m and bucket b, running mean/variance of the (shared) head feature ``f`` (F-d) over the
training samples whose marker-m label falls in b. At each epoch start the running statistics are snapshotted and
smoothed across buckets with a symmetric kernel; during training each sample's feature is re-coloured per marker::

    f[m] = (f - mu[m, b]) * sqrt(clip(smoothed_var[m, b] / var[m, b], 0.1, 10)) + smoothed_mu[m, b]

``FDS.smooth`` returns ``(B, M, F)``: the HEX head applies its last linear layer per marker,
``out[:, m] = f[:, m, :] @ W[m] + b[m]`` with ``W = head.weight (M, F)``, ``b = head.bias (M,)`` (see
:func:`per_marker_linear`). Typical loop::

    for epoch in range(E):
        fds.update_last_epoch_stats(epoch)            # snapshot + smooth (acts once per new epoch)
        for x, y in loader:                           # y: (B, M) in [0, 1]
            f = trunk(x)                              # (B, F)
            f_m = fds.smooth(f, y, epoch)             # (B, M, F); identity broadcast before start_smooth
            pred = per_marker_linear(f_m, head_last)  # (B, M)
            feats.append(f.detach()); labels.append(y)
        fds.update_running_stats(torch.cat(feats), torch.cat(labels), epoch)  # all ranks call it (all_reduce)

Deviation from the DIR code (documented): buckets that never received a sample are left out of the cross-bucket
smoothing (normalised convolution) and their samples are not re-coloured; with every bucket populated this equals the
original reflect-padded convolution.

LDS (:func:`lds_weights`) re-weights the loss by the inverse of the kernel-smoothed (square-root) label density.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import distributed as dist
from torch import nn

log = logging.getLogger(__name__)

KERNELS = ("gaussian", "triang", "laplace")
_CHUNK = 2048  # rows per one-hot matmul in the bucket sums


def kernel_window(kernel: str = "gaussian", ks: int = 9, sigma: float = 2.0) -> torch.Tensor:
    """Symmetric smoothing window of odd length ``ks`` summing to 1, float32 (ks,).

    ``gaussian``: ``scipy.ndimage.gaussian_filter1d`` of a unit impulse (as in the DIR code); ``triang``:
    ``scipy.signal.windows.triang(ks)``; ``laplace``: ``exp(-|k| / sigma)``. ``sigma`` is in buckets.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose from {', '.join(KERNELS)}")
    if ks < 1 or ks % 2 == 0:
        raise ValueError(f"kernel size must be odd and positive, got {ks}")
    half = (ks - 1) // 2
    if kernel == "gaussian":
        from scipy.ndimage import gaussian_filter1d

        impulse = np.zeros(ks)
        impulse[half] = 1.0
        w = gaussian_filter1d(impulse, sigma=sigma)
    elif kernel == "triang":
        from scipy.signal.windows import triang

        w = triang(ks)
    else:
        w = np.exp(-np.abs(np.arange(-half, half + 1)) / sigma)
    return torch.as_tensor(w / w.sum(), dtype=torch.float32)


def label_buckets(
    labels: torch.Tensor, bucket_num: int = 50, bucket_start: int = 0, label_range: tuple[float, float] = (0.0, 1.0)
) -> torch.Tensor:
    """Bucket index (long, same shape as ``labels``) in ``[0, bucket_num - bucket_start)``."""
    lo, hi = label_range
    raw = torch.floor((labels.float() - lo) / (hi - lo) * bucket_num)
    raw = torch.nan_to_num(raw, nan=float(bucket_start))
    return raw.clamp(bucket_start, bucket_num - 1).long() - bucket_start


def per_marker_linear(features: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """``out[:, m] = features[:, m, :] @ linear.weight[m] + linear.bias[m]``: (B, M, F) -> (B, M)."""
    out = (features * linear.weight.unsqueeze(0)).sum(-1)
    return out if linear.bias is None else out + linear.bias


def _smooth_buckets(stat: torch.Tensor, mask: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Normalised convolution over the bucket axis with reflect padding.

    ``stat``: (M, K, F); ``mask``: (M, K) bool of populated buckets; ``window``: (ks,). Buckets whose window holds no
    populated bucket keep their own value. Returns (M, K, F)."""
    m_, k_, f_ = stat.shape
    half = (window.numel() - 1) // 2
    w = window.to(stat).view(1, 1, -1)
    valid = mask.to(stat.dtype)
    x = (stat * valid.unsqueeze(-1)).permute(0, 2, 1).reshape(m_ * f_, 1, k_)
    v = valid.view(m_, 1, k_)
    if half > 0:
        x = F.pad(x, (half, half), mode="reflect")
        v = F.pad(v, (half, half), mode="reflect")
    num = F.conv1d(x, w).view(m_, f_, k_).permute(0, 2, 1)
    den = F.conv1d(v, w).view(m_, k_, 1)
    return torch.where(den > 1e-12, num / den.clamp_min(1e-12), stat)


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class FDS(nn.Module):
    """Per-marker feature distribution smoothing.

    Buffers (saved in checkpoints), with K = ``bucket_num - bucket_start``: ``running_mean``/``running_var``
    (M, K, F), their epoch-start snapshots ``running_mean_last_epoch``/``running_var_last_epoch``, the smoothed
    snapshots ``smoothed_mean_last_epoch``/``smoothed_var_last_epoch``, ``num_samples_tracked`` (M, K) and ``epoch``.
    """

    def __init__(
        self,
        feature_dim: int = 128,
        num_markers: int = 40,
        bucket_num: int = 50,
        bucket_start: int = 0,
        label_range: tuple[float, float] = (0.0, 1.0),
        start_update: int = 0,
        start_smooth: int = 10,
        kernel: str = "gaussian",
        ks: int = 9,
        sigma: float = 2.0,
        momentum: float | None = 0.9,
    ) -> None:
        super().__init__()
        num_buckets = bucket_num - bucket_start
        if num_buckets < 1 or bucket_start < 0:
            raise ValueError(f"need 0 <= bucket_start < bucket_num, got {bucket_start}, {bucket_num}")
        if (ks - 1) // 2 >= num_buckets and ks > 1:
            raise ValueError(f"kernel size {ks} too large for {num_buckets} buckets")
        self.feature_dim, self.num_markers = feature_dim, num_markers
        self.bucket_num, self.bucket_start, self.num_buckets = bucket_num, bucket_start, num_buckets
        self.label_range = (float(label_range[0]), float(label_range[1]))
        self.start_update, self.start_smooth = start_update, start_smooth
        self.momentum = momentum
        self.kernel, self.ks, self.sigma = kernel, ks, sigma
        self.register_buffer("kernel_window", kernel_window(kernel, ks, sigma), persistent=False)
        shape = (num_markers, num_buckets, feature_dim)
        self.register_buffer("epoch", torch.tensor(start_update, dtype=torch.long))
        self.register_buffer("running_mean", torch.zeros(shape))
        self.register_buffer("running_var", torch.ones(shape))
        self.register_buffer("running_mean_last_epoch", torch.zeros(shape))
        self.register_buffer("running_var_last_epoch", torch.ones(shape))
        self.register_buffer("smoothed_mean_last_epoch", torch.zeros(shape))
        self.register_buffer("smoothed_var_last_epoch", torch.ones(shape))
        self.register_buffer("num_samples_tracked", torch.zeros(num_markers, num_buckets))
        self.register_buffer("tracked_last_epoch", torch.zeros(num_markers, num_buckets, dtype=torch.bool))

    def extra_repr(self) -> str:
        return (f"feature_dim={self.feature_dim}, num_markers={self.num_markers}, buckets={self.num_buckets}, "
                f"kernel={self.kernel}(ks={self.ks}, sigma={self.sigma}), momentum={self.momentum}, "
                f"start_update={self.start_update}, start_smooth={self.start_smooth}")

    def buckets(self, labels: torch.Tensor) -> torch.Tensor:
        """(N, M) labels -> (N, M) long bucket indices in [0, K)."""
        return label_buckets(labels, self.bucket_num, self.bucket_start, self.label_range)

    def reset(self) -> None:
        """Forget all statistics."""
        for name in ("running_mean", "running_mean_last_epoch", "smoothed_mean_last_epoch", "num_samples_tracked"):
            getattr(self, name).zero_()
        for name in ("running_var", "running_var_last_epoch", "smoothed_var_last_epoch"):
            getattr(self, name).fill_(1.0)
        self.tracked_last_epoch.zero_()

    @torch.no_grad()
    def update_last_epoch_stats(self, epoch: int) -> bool:
        """At the start of ``epoch`` (== stored epoch + 1): snapshot running stats and smooth them across buckets per
        marker. Returns whether it acted (it acts once per new epoch)."""
        if epoch != int(self.epoch) + 1:
            return False
        self.epoch.fill_(epoch)
        self.running_mean_last_epoch.copy_(self.running_mean)
        self.running_var_last_epoch.copy_(self.running_var)
        mask = self.num_samples_tracked > 0
        self.tracked_last_epoch.copy_(mask)
        self.smoothed_mean_last_epoch.copy_(_smooth_buckets(self.running_mean, mask, self.kernel_window))
        self.smoothed_var_last_epoch.copy_(_smooth_buckets(self.running_var, mask, self.kernel_window))
        log.info("FDS: smoothed statistics for epoch %d (%d/%d marker-buckets populated)", epoch, int(mask.sum()),
                 mask.numel())
        return True

    @torch.no_grad()
    def bucket_sums(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per (marker, bucket) count, feature sum and squared sum of this process' samples, float64
        (M, K, 1 + 2F): ``[..., 0]`` counts, ``[..., 1:F+1]`` sums, ``[..., F+1:]`` squared sums."""
        n, f_ = features.shape
        m_, k_ = self.num_markers, self.num_buckets
        out = torch.zeros(m_ * k_, 1 + 2 * f_, dtype=torch.float64, device=features.device)
        idx = self.buckets(labels) + torch.arange(m_, device=labels.device) * k_  # (N, M) flat (marker, bucket)
        for start in range(0, n, _CHUNK):
            feats = features[start : start + _CHUNK].detach().to(torch.float64)
            rows = torch.cat([torch.ones_like(feats[:, :1]), feats, feats * feats], dim=1)  # (n, 1 + 2F)
            onehot = torch.zeros(rows.shape[0], m_ * k_, dtype=torch.float64, device=features.device)
            onehot.scatter_(1, idx[start : start + _CHUNK].to(features.device), 1.0)
            out += onehot.T @ rows
        return out.view(m_, k_, 1 + 2 * f_)

    @torch.no_grad()
    def update_running_stats(self, features: torch.Tensor, labels: torch.Tensor, epoch: int) -> None:
        """Fold this epoch's features ``(N, F)`` with labels ``(N, M)`` into the running per-bucket statistics.

        Collective under torch.distributed: every rank must call it; counts, sums and squared sums are all-reduced
        before means and (unbiased; 0 for a single sample) variances are formed. Momentum update
        ``running = (1 - momentum) * current + momentum * running`` (plain overwrite at ``epoch == start_update``;
        ``momentum=None`` uses the cumulative average). Buckets without samples this epoch are unchanged.
        """
        if epoch < int(self.epoch):
            return
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"features must be (N, {self.feature_dim}), got {tuple(features.shape)}")
        if labels.shape != (features.shape[0], self.num_markers):
            raise ValueError(f"labels must be ({features.shape[0]}, {self.num_markers}), got {tuple(labels.shape)}")
        sums = _all_reduce_sum(self.bucket_sums(features, labels))
        f_ = self.feature_dim
        count = sums[..., 0]
        seen = count > 0
        n = count.clamp_min(1).unsqueeze(-1)
        mean = sums[..., 1 : f_ + 1] / n
        var = ((sums[..., f_ + 1 :] - n * mean * mean) / (n - 1).clamp_min(1)).clamp_min(0)
        var = torch.where((count > 1).unsqueeze(-1), var, torch.zeros_like(var))
        self.num_samples_tracked += count.to(self.num_samples_tracked)
        if epoch == self.start_update:
            factor = torch.zeros_like(count)
        elif self.momentum is not None:
            factor = torch.full_like(count, float(self.momentum))
        else:
            factor = 1 - count / self.num_samples_tracked.to(count).clamp_min(1)
        factor = torch.where(seen, factor, torch.ones_like(factor)).unsqueeze(-1)
        dtype = self.running_mean.dtype
        self.running_mean.copy_(((1 - factor) * mean + factor * self.running_mean.double()).to(dtype))
        self.running_var.copy_(((1 - factor) * var + factor * self.running_var.double()).to(dtype))
        log.info("FDS: updated running statistics with epoch %d features (%d samples)", epoch,
                 int(count[0].sum()) if count.numel() else 0)

    def smooth(self, features: torch.Tensor, labels: torch.Tensor, epoch: int) -> torch.Tensor:
        """Per-marker calibrated features: ``features`` (B, F), ``labels`` (B, M) -> (B, M, F).

        Before ``start_smooth`` returns ``features`` broadcast to (B, M, F) (a view); afterwards the result is at least
        float32 (half precision features are calibrated in float32). Differentiable w.r.t.
        ``features``; statistics are constants. Feature dimensions with zero snapshot variance, and buckets that had
        no samples, are passed through unchanged.
        """
        b_, f_ = features.shape
        if epoch < self.start_smooth:
            return features.unsqueeze(1).expand(b_, self.num_markers, f_)
        dtype = torch.promote_types(features.dtype, torch.float32)  # fp16 autocast: calibrate in float32
        idx = self.buckets(labels).to(features.device)  # (B, M)
        marker = torch.arange(self.num_markers, device=features.device).expand_as(idx)
        m1 = self.running_mean_last_epoch[marker, idx].to(dtype)  # (B, M, F)
        v1 = self.running_var_last_epoch[marker, idx].to(dtype)
        m2 = self.smoothed_mean_last_epoch[marker, idx].to(dtype)
        v2 = self.smoothed_var_last_epoch[marker, idx].to(dtype)
        bucket_ok = self.tracked_last_epoch[marker, idx] & (v1.sum(-1) >= 1e-10)  # (B, M)
        valid = (v1 > 0) & bucket_ok.unsqueeze(-1)
        factor = torch.where(valid, (v2 / v1.clamp_min(1e-30)).clamp(0.1, 10.0), torch.ones_like(v1))
        x = features.unsqueeze(1).to(dtype)
        return torch.where(valid, (x - m1) * factor.sqrt() + m2, x.expand_as(m1))


def lds_weights(
    labels: torch.Tensor,
    bucket_num: int = 50,
    kernel: str = "gaussian",
    ks: int = 9,
    sigma: float = 2.0,
    reweight: str = "sqrt_inv",
    label_range: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """Label-distribution-smoothing loss weights, (N, M) labels -> (N, M) float32, mean 1 per marker.

    Per marker: bucket counts (``sqrt`` of them for ``sqrt_inv``; raw for ``inv``) are convolved with the kernel
    (zero padding, as in the DIR code) and each sample gets the inverse of its bucket's smoothed value.
    ``reweight='none'`` returns ones.
    """
    labels = torch.as_tensor(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (N, M), got {tuple(labels.shape)}")
    if reweight not in ("sqrt_inv", "inv", "none"):
        raise ValueError(f"reweight must be 'sqrt_inv', 'inv' or 'none', got {reweight!r}")
    n, m_ = labels.shape
    if reweight == "none" or n == 0:
        return torch.ones(n, m_, dtype=torch.float32)
    idx = label_buckets(labels.cpu(), bucket_num, 0, label_range)  # (N, M)
    counts = torch.zeros(m_, bucket_num, dtype=torch.float64)
    counts.scatter_add_(1, idx.T, torch.ones(m_, n, dtype=torch.float64))
    density = counts.sqrt() if reweight == "sqrt_inv" else counts
    window = kernel_window(kernel, ks, sigma).to(torch.float64).view(1, 1, -1)
    smoothed = F.conv1d(density.unsqueeze(1), window, padding=(ks - 1) // 2).squeeze(1)  # (M, K)
    per_sample = smoothed.gather(1, idx.T).T  # (N, M), > 0: every used bucket has a count
    w = 1.0 / per_sample
    w = w / w.mean(0, keepdim=True)
    return w.to(torch.float32)
