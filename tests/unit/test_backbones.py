"""Backbone factory: forward/backward of every registered backbone at a tiny size, MUSK key layout and checkpoint
round trips (official flat layout with text branch, prefixes, position interpolation), DINOv2 original vs timm
layout, freezing, and error messages."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hex import backbones as bb
from hex.backbones.musk import POS_KEY
from tests.fixtures import ReferenceMusk

torch.set_num_threads(2)

# builder options giving a tiny version of each backbone (same code path); every registered name must be here
TINY_KW: dict[str, dict] = {
    "musk": dict(embed_dim=64, depth=2, num_heads=4, mlp_dim=128, img_size=64),
    "dinov2_vits14_reg": dict(embed_dim=48, depth=2, num_heads=2, img_size=56),
    "tiny": dict(widths=(8, 8, 16, 16), embed_dim=32, input_size=64),
    "timm:resnet10t": dict(zero_init_last=False),  # timm zero-inits residual BN gammas: no grads upstream
}
MUSK_TINY = TINY_KW["musk"]


def _input(model: bb.Backbone, batch: int = 2, seed: int = 0) -> torch.Tensor:
    size = min(model.input_size, 64)
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_every_registered_backbone_has_tiny_kwargs() -> None:
    assert set(bb.list_backbones()) <= set(TINY_KW)
    assert {"musk", "dinov2_vits14_reg", "tiny"} <= set(bb.list_backbones())
    assert bb.list_backbones("dino*") == ["dinov2_vits14_reg"]


@pytest.mark.parametrize("name", sorted(TINY_KW))
def test_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    model = bb.create(name, **TINY_KW[name])
    assert isinstance(model.embed_dim, int) and isinstance(model.input_size, int)
    assert len(model.mean) == 3 and len(model.std) == 3
    assert model.blocks() and all(isinstance(b, nn.Module) for b in model.blocks())
    model.train()
    x = _input(model)
    y = model(x)
    assert y.shape == (2, model.embed_dim)
    assert torch.isfinite(y).all()
    y.square().mean().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name}: no gradient for {n}"
            assert torch.isfinite(p.grad).all(), n
            assert p.grad.abs().sum() > 0, f"{name}: zero gradient for {n}"


def test_specs() -> None:
    musk = bb.get_spec("musk")
    assert (musk.embed_dim, musk.input_size, musk.mean, musk.std) == (1024, 384, (0.5,) * 3, (0.5,) * 3)
    assert (musk.hf_hub_id, musk.hf_filename) == ("xiangjx/musk", "model.safetensors")
    dino = bb.get_spec("dinov2_vits14_reg")
    assert (dino.embed_dim, dino.input_size, dino.mean) == (384, 224, bb.IMAGENET_MEAN)
    assert bb.get_spec("tiny").input_size == 224
    res = bb.get_spec("timm:resnet10t")
    assert (res.embed_dim, res.input_size, res.name) == (512, 176, "timm:resnet10t")
    small = bb.create("musk", **MUSK_TINY)
    assert (small.embed_dim, small.input_size, small.spec.name) == (64, 64, "musk")


def test_training_recipes_follow_the_weights() -> None:
    """Pretrained: the paper's MUSK recipe; from scratch: every block, a larger lr with a floor; tiny expects none."""
    musk = bb.get_spec("musk")
    assert musk.expects_weights and musk.recipe(True) == bb.PAPER_RECIPE
    assert (bb.PAPER_RECIPE.lr, bb.PAPER_RECIPE.gamma, bb.PAPER_RECIPE.unfreeze_last, bb.PAPER_RECIPE.lr_floor,
            bb.PAPER_RECIPE.batch_size) == (1e-5, 0.95, 4, 0.0, 48)
    scratch = musk.recipe(False)
    assert scratch.unfreeze_last == -1 and scratch.lr > musk.recipe(True).lr and scratch.lr_floor > 0
    assert bb.get_spec("dinov2_vits14_reg").expects_weights and bb.get_spec("timm:resnet10t").expects_weights
    tiny = bb.get_spec("tiny")
    assert not tiny.expects_weights
    assert (tiny.scratch.lr, tiny.scratch.unfreeze_last, tiny.scratch.batch_size) == (1e-3, -1, 32)
    # a spec survives its JSON form (saved beside weights), recipes included
    again = bb.BackboneSpec(**bb.create("tiny", embed_dim=32).spec.to_dict())
    assert again.scratch == tiny.scratch and isinstance(again.pretrained, bb.TrainRecipe)


def test_base_imports_no_backbone_module() -> None:
    """The registry resolves ``timm:`` through a registered prefix handler: base.py imports none of vit/musk/tiny."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(bb.base.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m and m.split(".")[-1] in ("vit", "musk", "tiny")}, imported
    with pytest.raises(ValueError, match="registered once"):
        bb.register_prefix("timm:", bb.get_spec, bb.create)


# ------------------------------------------------------------------------------------------------------------- MUSK
def test_musk_module_paths() -> None:
    model = bb.create("musk", **MUSK_TINY)
    keys = set(model.state_dict())
    for k in ("beit3.encoder.layers.0.self_attn.q_proj.A.weight", "beit3.encoder.layers.1.ffn.A.fc2.weight",
              "beit3.encoder.layers.0.ffn.A.ffn_layernorm.weight", "beit3.encoder.layer_norm.A.weight",
              "beit3.vision_embed.proj.weight", "beit3.vision_embed.cls_token", POS_KEY):
        assert k in keys, k
    assert not any(".B." in k or "text_embed" in k or "mask_token" in k for k in keys)
    names = dict(model.named_modules())
    assert model.blocks() == [names["beit3.encoder.layers.0"], names["beit3.encoder.layers.1"]]
    assert model.final_norm() is names["beit3.encoder.layer_norm"]
    assert model.state_dict()[POS_KEY].shape == (3 + 16, 64)  # 64 px / 16 = 4x4 grid, offset 2 + CLS


def _musk_reference_file(tmp_path, prefix: str = "", img_size: int = 64):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    kw = dict(MUSK_TINY, img_size=img_size)
    ref = ReferenceMusk(kw["embed_dim"], kw["depth"], kw["num_heads"], kw["mlp_dim"], img_size).eval()
    sd = {prefix + k: v.contiguous() for k, v in ref.state_dict().items()}
    assert len(ref.state_dict()) == 40 * kw["depth"] + 11 + 3  # 974 at depth 24, like the official file
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    return ref, path


@pytest.mark.parametrize("prefix", ["", "model.", "module."])
def test_musk_loads_official_layout(tmp_path, caplog, prefix: str) -> None:
    ref, path = _musk_reference_file(tmp_path, prefix)
    model = bb.create("musk", **MUSK_TINY).eval()
    with caplog.at_level(logging.INFO, logger="hex.backbones"):
        report = bb.load_weights(model, path)
    n_text = sum(1 for k in ref.state_dict() if ".B." in k) + 5  # B experts + text_embed, mask, 2 heads, logit scale
    assert len(report.dropped) == n_text and not report.unexpected
    assert any(k.endswith("language_head.weight") for k in report.dropped)
    assert "dropped" in caplog.text
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref.image_embedding(x), rtol=1e-5, atol=1e-5)


def test_musk_save_roundtrip(tmp_path) -> None:
    torch.manual_seed(2)
    a = bb.create("musk", **MUSK_TINY).eval()
    path = bb.save_backbone(a, tmp_path / "musk_tiny.safetensors")
    b = bb.create("musk", weights=path, **MUSK_TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    # torch container with a prefix and text-branch extras also loads
    ref, _ = _musk_reference_file(tmp_path)
    sd = {f"module.{k}": v for k, v in ref.state_dict().items()}
    torch.save({"model": sd, "epoch": 3}, tmp_path / "ckpt.pth")
    c = bb.create("musk", weights=tmp_path / "ckpt.pth", **MUSK_TINY).eval()
    with torch.no_grad():
        torch.testing.assert_close(c(x), ref.image_embedding(x), rtol=1e-5, atol=1e-5)


def test_musk_position_interpolation(tmp_path) -> None:
    ref, path = _musk_reference_file(tmp_path, img_size=64)  # 4x4 grid, 19 rows
    model = bb.create("musk", weights=path, **dict(MUSK_TINY, img_size=96)).eval()  # 6x6 grid, 39 rows
    src = ref.state_dict()["beit3.encoder.embed_positions.A.weight"]
    got = model.state_dict()[POS_KEY]
    assert got.shape == (39, 64)
    torch.testing.assert_close(got[:3], src[:3])
    grid = src[3:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(36, 64)
    torch.testing.assert_close(got[3:], want)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 96)).shape == (1, 64)


def test_musk_missing_trunk_key_is_an_error(tmp_path) -> None:
    from safetensors.torch import save_file

    sd = bb.create("musk", **MUSK_TINY).state_dict()
    del sd["beit3.encoder.layers.1.ffn.A.fc1.weight"]
    save_file(sd, str(tmp_path / "broken.safetensors"))
    with pytest.raises(RuntimeError, match="layers.1.ffn.A.fc1.weight"):
        bb.create("musk", weights=tmp_path / "broken.safetensors", **MUSK_TINY)


@pytest.mark.slow
def test_musk_full_size() -> None:
    model = bb.create("musk").eval()
    # every parameter of this module is used by the vision path (text branch B, text_embed, mask_token removed):
    # 24 x 12,596,224 per layer + patch embed 787,456 + CLS 1,024 + position table 579 x 1024 + final LN 2,048
    assert sum(p.numel() for p in model.parameters()) == 303_938_560
    sd = model.state_dict()
    assert len(sd) == 24 * 20 + 6 == 974 - 3 - (24 * 20 + 3) - 2  # official keys minus heads, B, text/mask embed
    assert sd[POS_KEY].shape == (579, 1024)
    assert "beit3.encoder.layers.23.ffn.A.fc1.weight" in sd and "beit3.encoder.layer_norm.A.bias" in sd
    assert len(model.blocks()) == 24
    with torch.no_grad():
        y = model(torch.randn(1, 3, 384, 384))
    assert y.shape == (1, 1024) and torch.isfinite(y).all()


# ----------------------------------------------------------------------------------------------------------- DINOv2
def _to_original_dinov2(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Invert timm's ``_convert_dinov2`` for a reg4 model: ``reg_token`` -> ``register_tokens``, the CLS position row
    moved back into ``pos_embed`` (timm folds it into ``cls_token``), ``mask_token`` added."""
    d = sd["cls_token"].shape[-1]
    p0 = torch.randn(1, 1, d, generator=torch.Generator().manual_seed(5)) * 0.02
    out = {}
    for k, v in sd.items():
        if k == "reg_token":
            out["register_tokens"] = v.clone()
        elif k == "cls_token":
            out["cls_token"] = v - p0
        elif k == "pos_embed":
            out["pos_embed"] = torch.cat([p0, v], dim=1)
        else:
            out[k] = v.clone()
    out["mask_token"] = torch.zeros(1, d)
    return out


@pytest.mark.slow
def test_dinov2_original_and_timm_layouts(tmp_path) -> None:
    torch.manual_seed(3)
    src = bb.create("dinov2_vits14_reg").eval()
    assert (src.embed_dim, src.input_size) == (384, 224)
    assert 21_000_000 < sum(p.numel() for p in src.parameters()) < 22_500_000
    timm_path = bb.save_backbone(src, tmp_path / "timm_layout.safetensors")
    orig = _to_original_dinov2(src.model.state_dict())
    assert "register_tokens" in orig and "reg_token" not in orig
    torch.save(orig, tmp_path / "dinov2_vits14_reg4_pretrain.pth")

    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        want = src(x)
        a = bb.create("dinov2_vits14_reg", weights=timm_path).eval()
        b = bb.create("dinov2_vits14_reg", weights=tmp_path / "dinov2_vits14_reg4_pretrain.pth").eval()
        torch.testing.assert_close(a(x), want)
        torch.testing.assert_close(b(x), want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_dinov2_original_518_checkpoint_is_resampled(tmp_path) -> None:
    big = bb.create("dinov2_vits14_reg", img_size=518)  # the released checkpoints' 37x37 grid
    torch.save(_to_original_dinov2(big.model.state_dict()), tmp_path / "orig518.pth")
    model = bb.create("dinov2_vits14_reg", weights=tmp_path / "orig518.pth")
    assert model.model.pos_embed.shape == (1, 16 * 16, 384)
    torch.testing.assert_close(model.model.reg_token, big.model.reg_token)


# ---------------------------------------------------------------------------------------------------------- freezing
def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_set_trainable_musk() -> None:
    model = bb.create("musk", **dict(MUSK_TINY, depth=3))
    bb.set_trainable(model, 1)
    names = _trainable(model)
    assert names and all(n.startswith(("beit3.encoder.layers.2.", "beit3.encoder.layer_norm.")) for n in names)
    assert "beit3.encoder.layer_norm.A.weight" in names and "beit3.encoder.layers.2.ffn.A.fc1.weight" in names
    bb.set_trainable(model, 2)
    assert any(n.startswith("beit3.encoder.layers.1.") for n in _trainable(model))
    assert not any(n.startswith(("beit3.encoder.layers.0.", "beit3.vision_embed")) for n in _trainable(model))
    bb.set_trainable(model, 0)
    assert not _trainable(model)
    bb.set_trainable(model, -1)
    assert _trainable(model) == {n for n, _ in model.named_parameters()}


def test_set_trainable_timm_and_tiny() -> None:
    dino = bb.create("dinov2_vits14_reg", **dict(TINY_KW["dinov2_vits14_reg"], depth=3))
    bb.set_trainable(dino, 2)
    names = _trainable(dino)
    assert names and all(n.startswith(("model.blocks.1.", "model.blocks.2.", "model.norm.")) for n in names)
    assert "model.norm.weight" in names
    tiny = bb.create("tiny", **TINY_KW["tiny"])
    bb.set_trainable(tiny, 1)
    assert _trainable(tiny) == {n for n, _ in tiny.proj.named_parameters(prefix="proj")}
    assert tiny.final_norm() is None
    res = bb.create("timm:resnet10t")
    bb.set_trainable(res, 1)
    assert _trainable(res) and all(n.startswith("model.layer4.") for n in _trainable(res))


# ------------------------------------------------------------------------------------------------------------ errors
def test_unknown_names() -> None:
    with pytest.raises(ValueError, match="musk") as err:
        bb.create("not_a_backbone")
    assert "dinov2_vits14_reg" in str(err.value) and "timm:" in str(err.value)
    with pytest.raises(ValueError, match="unknown timm model"):
        bb.create("timm:definitely_not_a_timm_model")
    with pytest.raises(ValueError):
        bb.get_spec("nope")


def test_duplicate_registration_raises() -> None:
    spec = bb.BackboneSpec("tiny", 8, 32, bb.IMAGENET_MEAN, bb.IMAGENET_STD)
    with pytest.raises(ValueError, match="already registered"):
        bb.register_backbone(spec)(lambda **kw: None)
    with pytest.raises(ValueError, match="reserved"):
        bb.register_backbone(bb.BackboneSpec("timm:x", 8, 32, bb.IMAGENET_MEAN, bb.IMAGENET_STD))(lambda **kw: None)
    assert bb.list_backbones().count("tiny") == 1


def test_missing_file(tmp_path) -> None:
    missing = tmp_path / "nope" / "model.safetensors"
    with pytest.raises(FileNotFoundError, match="nope/model.safetensors"):
        bb.create("tiny", weights=missing)
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported"):
        bb.create("tiny", weights=tmp_path / "w.npz")


def test_hf_hub_offline_error(tmp_path, monkeypatch) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    with pytest.raises(RuntimeError, match="model.safetensors") as err:
        bb.create("musk", weights="hf_hub:xiangjx/musk", **MUSK_TINY)
    msg = str(err.value)
    assert "xiangjx/musk" in msg and "local path" in msg
    with pytest.raises(RuntimeError, match="pytorch_model.bin"):
        bb.create("tiny", weights="hf_hub:someone/repo/pytorch_model.bin")
