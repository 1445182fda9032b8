"""mica.model: shapes for every mode x task, gradients, batching, eval determinism, bag permutation invariance,
memory linear in the bag size (no (N,N) tensor in forward or backward)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mica.model import MICA, build_model
from pipeline.errors import PipelineError

DP, DC, T = 24, 12, 40
TINY = {"path_dim": DP, "codex_dim": DC, "n_tokens": T, "d": 32, "heads": 4}
MODES_TASKS = list(itertools.product(("coattn", "path", "codex"), ("survival", "response")))


def _inputs(b: int = 1, n: int = 57, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, DP, generator=g), torch.randn(b, T, DC, generator=g)


def _model(mode: str, task: str = "survival", **kw) -> MICA:
    torch.manual_seed(0)
    return MICA(mode=mode, task=task, **{**TINY, **kw})


@pytest.mark.parametrize("mode,task", MODES_TASKS)
def test_forward_shapes_and_attention(mode: str, task: str) -> None:
    m = _model(mode, task).eval()
    path, codex = _inputs(b=2, n=57)
    out = m(path if mode != "codex" else None, codex if mode != "path" else None)
    assert out.shape == (2, 4 if task == "survival" else 1) and m.out_dim == out.shape[1]
    assert torch.isfinite(out).all()
    logits, attn = m.forward_with_attention(path, codex)
    torch.testing.assert_close(logits, out)
    expected = {"coattn": {"coattn": (2, T, 57), "path_pool": (2, T), "codex_pool": (2, T), "patch": (2, 57)},
                "path": {"path_pool": (2, 57), "patch": (2, 57)},
                "codex": {"codex_pool": (2, T)}}[mode]
    assert {k: tuple(v.shape) for k, v in attn.items()} == expected
    for v in attn.values():  # every map is a distribution over its last axis
        torch.testing.assert_close(v.sum(-1), torch.ones(v.shape[:-1]))
    # one unbatched bag (N,D) is accepted as B=1
    assert m(path[0], codex[0]).shape == (1, out.shape[1])


@pytest.mark.parametrize("mode,task,fusion", [(m, t, "concat") for m, t in MODES_TASKS] +
                         [("coattn", "survival", "bilinear")])
def test_backward_reaches_every_parameter(mode: str, task: str, fusion: str) -> None:
    m = _model(mode, task, fusion=fusion).train()
    path, codex = _inputs(b=1, n=33)
    m(path, codex).sum().backward()
    params = dict(m.named_parameters())
    assert params
    no_grad = [n for n, p in params.items() if p.grad is None or float(p.grad.abs().max()) < 1e-8]
    assert not no_grad, f"parameters without gradient: {no_grad}"


@pytest.mark.parametrize("mode", ["coattn", "path", "codex"])
def test_batch_equals_single_bags_and_eval_is_deterministic(mode: str) -> None:
    m = _model(mode).eval()
    path, codex = _inputs(b=3, n=40)
    batched = m(path, codex)
    singles = torch.cat([m(path[i:i + 1], codex[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, singles, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m(path, codex), batched, rtol=0, atol=0)
    m.train()  # dropout on: two passes differ
    assert not torch.allclose(m(path, codex), m(path, codex))


@pytest.mark.parametrize("mode", ["coattn", "path"])
def test_path_bag_permutation_invariance(mode: str) -> None:
    m = _model(mode).eval()
    path, codex = _inputs(b=1, n=200)
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, attn = m.forward_with_attention(path, codex)
        out_p, attn_p = m.forward_with_attention(path[:, perm], codex)
    torch.testing.assert_close(out_p, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attn_p["patch"], attn["patch"][:, perm], rtol=1e-5, atol=1e-6)
    # but the model does look at the patches: changing one patch's features changes the output
    path2 = path.clone()
    path2[0, :20] += 3.0
    assert not torch.allclose(m(path2, codex), out, atol=1e-5)


class _LargestTensor(TorchDispatchMode):
    """Records the largest numel of any tensor an op returns (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.max_numel, self.shape = 0, ()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.max_numel:
                self.max_numel, self.shape = t.numel(), tuple(t.shape)
        return out


@pytest.mark.parametrize("mode", ["coattn", "path"])
def test_memory_linear_in_bag_size(mode: str) -> None:
    """No intermediate (forward or backward) exceeds N x max(Dp, 2d, T) (2d: the packed key/value projection of the
    co-attention): no (N,N) attention over patches."""
    m = _model(mode).train()
    largest = {}
    for n in (1000, 4000):
        path, codex = _inputs(b=1, n=n)
        path.requires_grad_(True)  # as under integrated gradients
        with _LargestTensor() as rec:
            m(path, codex).sum().backward()
        largest[n] = rec.max_numel
        assert rec.max_numel <= n * max(DP, 2 * TINY["d"], T), f"N={n}: a {rec.shape} tensor"
    assert largest[4000] <= 4.5 * largest[1000]


def test_large_bag_full_size_step() -> None:
    """The paper-size model (1024-d patches, 384-d tokens) trains a step on a 20k-patch bag."""
    torch.manual_seed(0)
    m = MICA("coattn").train()
    path, codex = torch.randn(1, 20_000, 1024), torch.randn(1, 40, 384)
    with _LargestTensor() as rec:
        m(path, codex).sum().backward()
    assert rec.max_numel <= 20_000 * 1024
    assert all(p.grad is not None for p in m.parameters())


def test_model_args_roundtrip_and_errors() -> None:
    m = _model("coattn", "response", fusion="bilinear")
    args = json.loads(json.dumps(m.model_args))
    m2 = build_model(args)
    assert m2.model_args == m.model_args
    m2.load_state_dict(m.state_dict(), strict=True)
    with pytest.raises(PipelineError, match="unknown MICA model_args"):
        build_model({**args, "bogus": 1})
    with pytest.raises(PipelineError, match="mode"):
        MICA(mode="nope")
    path, codex = _inputs()
    with pytest.raises(PipelineError, match="codex input"):
        m(path, None)
    with pytest.raises(PipelineError, match=r"expected \(B,40,12\)"):
        m(path, codex[:, :39])
    with pytest.raises(PipelineError, match="path input"):
        m(path[..., :5], codex)


def test_standardization_is_the_fold_z_score_and_travels_with_the_state() -> None:
    torch.manual_seed(0)
    kw = {"mode": "coattn", "path_dim": 6, "codex_dim": 5, "n_tokens": 4, "d": 16, "heads": 2, "dropout": 0.0}
    plain = MICA(**kw).eval()
    std = MICA(**kw, standardize="both").eval()
    std.load_state_dict(plain.state_dict(), strict=False)  # same weights; buffers stay at identity
    path_tr = torch.randn(50, 6) * torch.tensor([1, 10, 100, 0.1, 1, 5]) + 3
    codex_tr = torch.randn(20, 4, 5) * 7 - 2
    codex_tr[:, 0, 0] = 0.5  # a constant descriptor keeps scale 1
    std.fit_standardization(path_tr, codex_tr)
    assert torch.equal(std.codex_scale[0, 0], torch.tensor(1.0))
    path, codex = torch.randn(1, 9, 6) * 10, torch.randn(1, 4, 5) * 7
    mu_p, sd_p = path_tr.mean(0), path_tr.std(0)
    mu_c, sd_c = codex_tr.mean(0), codex_tr.std(0)
    sd_c[0, 0] = 1.0
    want = plain((path - mu_p) / sd_p, (codex - mu_c) / sd_c)
    torch.testing.assert_close(std(path, codex), want, rtol=1e-4, atol=1e-5)
    again = build_model(json.loads(json.dumps(std.model_args))).eval()
    again.load_state_dict(std.state_dict(), strict=True)  # the buffers are in the checkpoint
    torch.testing.assert_close(again(path, codex), std(path, codex))
    with pytest.raises(PipelineError, match="standardize"):
        MICA(**kw, standardize="zscore")
