"""MUSK attention through ``F.scaled_dot_product_attention`` equals torchscale's eager matmul + softmax path (fp32,
CPU, 1e-5) in eval and train mode, gradients included, with identical state-dict keys; masks, relative position
bias and multiway branch selection at the module level; the ``attention`` flag from ``create`` and ``HEX``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hex import backbones as bb
from hex.backbones.musk_attention import SdpaMultiheadAttention, attention_mode, set_attention

torch.set_num_threads(2)

MUSK_TINY = dict(embed_dim=64, depth=2, num_heads=4, mlp_dim=128, img_size=64)  # as tests/test_backbones.py
TOL = 1e-5


def _perturb(model: torch.nn.Module, seed: int = 0, std: float = 0.15) -> None:
    """Weights large enough that the softmax is far from uniform (the 0.02 init would hide a wrong scaling)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def _pair(**kw) -> tuple[bb.Backbone, bb.Backbone]:
    """The same tiny MUSK twice (same weights): SDPA and eager attention."""
    sdpa = bb.create("musk", **{**MUSK_TINY, **kw})
    _perturb(sdpa)
    eager = bb.create("musk", attention="eager", **{**MUSK_TINY, **kw})
    eager.load_state_dict(sdpa.state_dict(), strict=True)
    return sdpa, eager


def _images(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_default_is_sdpa_and_flag_selects_eager() -> None:
    sdpa, eager = _pair()
    assert attention_mode(sdpa) == "sdpa" and attention_mode(eager) == "eager"
    assert sdpa.attention == "sdpa" and eager.attention == "eager"
    assert sum(isinstance(m, SdpaMultiheadAttention) for m in sdpa.modules()) == MUSK_TINY["depth"]
    with pytest.raises(ValueError, match="attention"):
        bb.create("musk", attention="flash", **MUSK_TINY)


def test_state_dict_keys_identical_and_cross_loadable() -> None:
    torch.manual_seed(0)
    sdpa = bb.create("musk", **MUSK_TINY)
    torch.manual_seed(0)
    eager = bb.create("musk", attention="eager", **MUSK_TINY)
    a, b = sdpa.state_dict(), eager.state_dict()
    assert sorted(a) == sorted(b)
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    assert "beit3.encoder.layers.0.self_attn.inner_attn_ln.A.weight" in a  # BEiT-3 sub-LN kept
    _perturb(eager, seed=3)
    sdpa.load_state_dict(eager.state_dict(), strict=True)
    eager.load_state_dict(sdpa.state_dict(), strict=True)
    assert all(torch.equal(v, eager.state_dict()[k]) for k, v in sdpa.state_dict().items())
    assert [n for n, _ in sdpa.named_parameters()] == [n for n, _ in eager.named_parameters()]


def test_saved_files_load_across_modes(tmp_path) -> None:
    sdpa, eager = _pair()
    sdpa.eval(), eager.eval()
    torch.save(sdpa.state_dict(), tmp_path / "sdpa.pt")
    fresh = bb.create("musk", attention="eager", **MUSK_TINY).eval()
    fresh.load_state_dict(torch.load(tmp_path / "sdpa.pt", weights_only=True), strict=True)
    path = bb.save_backbone(eager, tmp_path / "eager.safetensors")
    from_file = bb.create("musk", weights=path, **MUSK_TINY).eval()  # sdpa model from an eager model's file
    assert attention_mode(from_file) == "sdpa"
    x = _images(batch=2, seed=6)
    with torch.no_grad():
        ref = eager(x)
        assert torch.equal(fresh(x), ref)
        assert (from_file(x) - ref).abs().max() <= TOL


def test_eval_forward_equals_eager(monkeypatch) -> None:
    sdpa, eager = _pair()
    sdpa.eval(), eager.eval()
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("attn_mask"))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    x = _images()
    with torch.no_grad():
        ya, yb = sdpa(x), eager(x)
    assert len(calls) == MUSK_TINY["depth"] and all(m is None for m in calls)  # fused path, no mask (flash allowed)
    assert ya.shape == (3, 64) and ya.std() > 0.1
    assert (ya - yb).abs().max().item() <= TOL
    # the outputs depend on the attention: a model with uniform attention would differ by far more than TOL
    assert (ya - ya.mean(0)).abs().max() > 100 * TOL


def test_train_mode_outputs_and_gradients_equal_eager() -> None:
    sdpa, eager = _pair()
    sdpa.train(), eager.train()  # MUSK: dropout, attention dropout and drop path are all 0
    x = _images(batch=2, seed=4)
    outs = []
    for m in (sdpa, eager):
        y = m(x)
        (y.square().mean() + y[:, :5].sum()).backward()
        outs.append(y.detach())
    assert (outs[0] - outs[1]).abs().max().item() <= TOL
    ga = dict(sdpa.named_parameters())
    for n, p in eager.named_parameters():
        assert p.grad is not None and ga[n].grad is not None, n
        torch.testing.assert_close(ga[n].grad, p.grad, atol=TOL, rtol=1e-4, msg=n)
    assert any(ga[n].grad.abs().max() > 1e-3 for n in ga if "q_proj" in n)  # gradients reach the queries


def test_switching_back_and_forth_changes_nothing() -> None:
    sdpa, eager = _pair()
    sdpa.eval(), eager.eval()
    x = _images(batch=2, seed=5)
    with torch.no_grad():
        ref = eager(x)
        sdpa.set_attention("eager")
        assert attention_mode(sdpa) == "eager" and torch.equal(sdpa(x), ref)
        sdpa.set_attention("sdpa")
        assert (sdpa(x) - ref).abs().max() <= TOL
    assert sorted(sdpa.state_dict()) == sorted(eager.state_dict())


def test_hex_backbone_kw_passes_attention() -> None:
    from hex.model import HEX, build_from_args

    model = HEX("musk", num_markers=3, attention="eager", **MUSK_TINY)
    assert attention_mode(model.visual) == "eager"
    assert model.model_args["backbone_kw"]["attention"] == "eager"
    assert attention_mode(build_from_args(model.model_args).visual) == "eager"
    assert attention_mode(HEX("musk", num_markers=3, **MUSK_TINY).visual) == "sdpa"


# ------------------------------------------------------------------------------------------- module level: masks
def _attention_pair(multiway: bool, dropout: float = 0.0):
    from torchscale.component.multihead_attention import MultiheadAttention

    from hex.backbones.musk import _import_beit3

    EncoderConfig, _ = _import_beit3()
    args = EncoderConfig(encoder_embed_dim=32, encoder_attention_heads=4, multiway=multiway)
    torch.manual_seed(2)
    eager = MultiheadAttention(args, 32, 4, dropout=dropout, self_attention=True, subln=True)
    _perturb(eager, seed=2, std=0.2)
    sdpa = MultiheadAttention(args, 32, 4, dropout=dropout, self_attention=True, subln=True)
    sdpa.load_state_dict(eager.state_dict())
    assert set_attention(sdpa, "sdpa") == 1  # assume_unpadded False: masks honoured
    return sdpa.eval(), eager.eval()


@pytest.mark.parametrize("masks", ["none", "padding", "attn_mask", "rel_pos", "all"])
def test_module_masks_equal_eager(masks: str) -> None:
    sdpa, eager = _attention_pair(multiway=False)
    g = torch.Generator().manual_seed(7)
    bsz, n = 3, 9
    x = torch.randn(bsz, n, 32, generator=g)
    kw: dict = {"key_padding_mask": torch.zeros(bsz, n, dtype=torch.bool)}
    if masks in ("padding", "all"):
        kw["key_padding_mask"][0, 6:] = True
        kw["key_padding_mask"][2, 3:] = True
    if masks in ("attn_mask", "all"):  # EncoderLayer's form: 0 / -1e8 additive (T, S)
        kw["attn_mask"] = (torch.rand(n, n, generator=g) < 0.3).float().fill_diagonal_(0) * -1e8
    if masks in ("rel_pos", "all"):
        kw["rel_pos"] = torch.randn(bsz * 4, n, n, generator=g)
    with torch.no_grad():
        ya, wa = sdpa(x, x, x, **kw)
        yb, _ = eager(x, x, x, **kw)
    assert wa is None
    assert (ya - yb).abs().max().item() <= TOL


@pytest.mark.parametrize("split", [-1, 0, 4])
def test_module_multiway_branch_selection(split: int) -> None:
    """``split_position`` -1: branch A only (MUSK images), 0: B only, k: A for the first k tokens, B after."""
    from torchscale.component.multiway_network import set_split_position

    sdpa, eager = _attention_pair(multiway=True)
    for m in (sdpa, eager):
        m.apply(set_split_position(split))
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ya, _ = sdpa(x, x, x)
        yb, _ = eager(x, x, x)
        sdpa.apply(set_split_position(4 if split != 4 else -1))
        yc, _ = sdpa(x, x, x)
    assert (ya - yb).abs().max().item() <= TOL
    assert (ya - yc).abs().max().item() > 1e-3  # the branch choice matters, so the check above means something


def test_module_dropout_only_in_training() -> None:
    sdpa, eager = _attention_pair(multiway=False, dropout=0.5)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert (sdpa(x, x, x)[0] - eager(x, x, x)[0]).abs().max() <= TOL  # eval: no dropout
        sdpa.train()
        torch.manual_seed(0)
        y1 = sdpa(x, x, x)[0]
        torch.manual_seed(1)
        y2 = sdpa(x, x, x)[0]
    assert (y1 - y2).abs().max() > 1e-3
