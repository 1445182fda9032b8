"""hex.model: forward shapes, state-dict layout, partial fine-tuning, FDS head, fp32 output layer under autocast,
checkpoint loading (ours, and the original release's real layout)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from hex.model import HEX, build_from_args, inference_state_dict, load_hex_checkpoint
from pipeline.errors import PipelineError
from tests.fixtures import ReferenceMusk

MUSK_TINY = {"embed_dim": 32, "depth": 3, "num_heads": 2, "mlp_dim": 64, "img_size": 32}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name,kw,size", [("tiny", {}, 64), ("musk", MUSK_TINY, 32)])
def test_forward_shapes_and_state_dict_keys(name: str, kw: dict, size: int) -> None:
    torch.manual_seed(0)
    model = HEX(name, num_markers=40, **kw)
    pred, feat = model(torch.randn(3, 3, size, size))
    assert pred.shape == (3, 40) and feat.shape == (3, 128)
    sd = model.state_dict()
    assert all(k.startswith(("visual.", "regression_head.", "regression_head1.")) for k in sd)
    assert sd["regression_head1.weight"].shape == (40, 128) and sd["regression_head1.bias"].shape == (40,)
    assert isinstance(model.regression_head1, torch.nn.Linear)
    assert [type(m).__name__ for m in model.regression_head] == ["Linear", "ReLU", "Dropout"] * 2
    assert model.regression_head[0].in_features == model.visual.embed_dim
    if name == "musk":
        assert any(k.startswith("visual.beit3.encoder.layers.") for k in sd)
        assert model.input_size == 32 and model.mean == (0.5, 0.5, 0.5)
    pred.sum().backward()  # every trainable parameter gets a gradient
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_set_trainable_and_backbone_freeze() -> None:
    model = HEX("tiny", num_markers=40, unfreeze_last=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    blocks = model.visual.blocks()
    last2 = {f"visual.{n}" for n, p in model.visual.named_parameters()
             if any(p is q for b in blocks[-2:] for q in b.parameters())}
    heads = {n for n, _ in model.named_parameters() if n.startswith("regression_head")}
    assert trainable == last2 | heads
    model.train()
    stem_bn = model.visual.stem[1]
    assert not stem_bn.training  # frozen BatchNorm keeps its running statistics
    assert model.visual.proj[1].training
    model.freeze_backbone()
    model.train()
    assert not any(p.requires_grad for p in model.visual.parameters())
    assert not any(m.training for m in model.visual.modules()) and model.regression_head.training
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("regression_head"))
    everything = HEX("tiny", unfreeze_last=-1)
    assert all(p.requires_grad for p in everything.parameters())
    heads_only = HEX("tiny", unfreeze_last=0)
    assert not any(p.requires_grad for p in heads_only.visual.parameters())


def test_fds_head_is_a_per_marker_linear() -> None:
    torch.manual_seed(0)
    model = HEX("tiny", num_markers=5, fds={"start_smooth": 0, "bucket_num": 10, "ks": 3})
    x, y = torch.randn(16, 3, 32, 32), torch.rand(16, 5)
    model.eval()
    with torch.no_grad():
        _, feat = model(x)
        model.fds.update_running_stats(feat, y, 0)
        model.fds.update_last_epoch_stats(1)
        smoothed = model.fds.smooth(feat, y, 1)  # (B, M, F)
        model.train()
        model.visual.eval()  # deterministic features; the FDS path stays on (model.training)
        model.regression_head.eval()
        pred, feat2 = model(x, y, 1)
    assert torch.allclose(feat2, feat)
    w, b = model.regression_head1.weight, model.regression_head1.bias
    expected = torch.stack([smoothed[:, m] @ w[m] + b[m] for m in range(5)], dim=1)
    assert torch.allclose(pred, expected, atol=1e-5)
    assert not torch.allclose(pred, model.regression_head1(feat), atol=1e-4)
    model.fds_active = False  # FDS off (paper: from epoch 50) -> the plain Linear(128, M)
    with torch.no_grad():
        pred_off, _ = model(x, y, 1)
    assert torch.allclose(pred_off, model.regression_head1(feat), atol=1e-6)


def test_own_checkpoint_roundtrip_and_rebuild(tmp_path: Path) -> None:
    torch.manual_seed(0)
    a = HEX("musk", num_markers=40, fds={}, **MUSK_TINY)
    path = tmp_path / "best.safetensors"
    save_file(inference_state_dict(a), str(path))
    b = build_from_args(a.model_args, with_fds=False)
    report = load_hex_checkpoint(b, path)
    assert report["backbone"] == "loaded"
    assert _same(inference_state_dict(a), b.state_dict())


# the original code's per-marker FDS module (hex/utils.py FDS): its buffers, as they appear in its state dict
_ORIG_FDS_BUFFERS = {"epoch": (1,), "running_mean": (50, 128), "running_var": (50, 128),
                     "running_mean_last_epoch": (50, 128), "running_var_last_epoch": (50, 128),
                     "smoothed_mean_last_epoch": (50, 128), "smoothed_var_last_epoch": (50, 128),
                     "num_samples_tracked": (50,), "kernel_window": (9,)}


def _original_checkpoint(prefix: str = "") -> tuple[dict[str, torch.Tensor], nn.Module, dict[str, torch.Tensor]]:
    """The original release's CustomModel state dict at a tiny MUSK size: ``visual`` = the whole MUSK model
    (``visual.beit3.*`` with both multiway branches, ``text_embed``, ``mask_token``, ``vision_head``,
    ``language_head``, ``logit_scale``), ``regression_head.*``, ``regression_head1.0.*`` (a Sequential) and 40
    per-marker ``FDS.{j}.*`` modules. Returns (state dict, the MUSK reference, the heads)."""
    torch.manual_seed(3)
    kw = MUSK_TINY
    musk = ReferenceMusk(kw["embed_dim"], kw["depth"], kw["num_heads"], kw["mlp_dim"], kw["img_size"]).eval()
    heads = {"regression_head.0.weight": torch.randn(256, 32) * 0.1, "regression_head.0.bias": torch.randn(256) * 0.1,
             "regression_head.3.weight": torch.randn(128, 256) * 0.1, "regression_head.3.bias": torch.randn(128) * 0.1,
             "regression_head1.0.weight": torch.randn(40, 128) * 0.1, "regression_head1.0.bias": torch.randn(40) * 0.1}
    sd = {f"visual.{k}": v for k, v in musk.state_dict().items()} | heads
    for j in range(40):
        sd |= {f"FDS.{j}.{name}": torch.rand(shape) for name, shape in _ORIG_FDS_BUFFERS.items()}
    return {prefix + k: v for k, v in sd.items()}, musk, heads


@pytest.mark.parametrize("prefix", ["", "module."])
def test_original_hex_checkpoint_layout_loads(tmp_path: Path, prefix: str) -> None:
    """The real layout: MUSK's text branch and heads dropped, its vision branch loaded, heads renamed, the 40 FDS
    modules left out; the model then predicts what the original network computes."""
    sd, musk, heads = _original_checkpoint(prefix)
    assert sum(".B." in k for k in sd) > 0 and any(k.endswith("visual.beit3.text_embed.weight") for k in sd)
    assert sum(k.endswith(".running_mean") and "FDS." in k for k in sd) == 40
    torch.save(sd, tmp_path / "checkpoint.pth")
    model = HEX("musk", num_markers=40, fds={}, **MUSK_TINY)
    report = load_hex_checkpoint(model, tmp_path / "checkpoint.pth")
    assert report["backbone"] == "loaded" and report["heads"] == 6 and not report["fds"]
    own = model.state_dict()
    vision = {k: v for k, v in musk.state_dict().items() if ".B." not in k and "text_embed" not in k
              and "mask_token" not in k and k.startswith("beit3.")}
    assert {k[len("visual."):] for k in own if k.startswith("visual.")} == set(vision)
    for k, v in vision.items():
        assert torch.equal(own[f"visual.{k}"], v), k
    assert torch.equal(own["regression_head1.weight"], heads["regression_head1.0.weight"])
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = musk.image_embedding(x)
        h = torch.relu(h @ heads["regression_head.0.weight"].T + heads["regression_head.0.bias"])
        h = torch.relu(h @ heads["regression_head.3.weight"].T + heads["regression_head.3.bias"])
        want = h @ heads["regression_head1.0.weight"].T + heads["regression_head1.0.bias"]
        torch.testing.assert_close(model(x)[0], want, rtol=1e-4, atol=1e-5)


def test_last_layer_runs_in_float32_under_autocast() -> None:
    """bf16 autocast: the backbone and first head layers run in bf16, the per-marker output layer in float32."""
    torch.manual_seed(0)
    model = HEX("tiny", num_markers=5, input_size=32, fds={"start_smooth": 0, "bucket_num": 10, "ks": 3}).eval()
    x, y = torch.randn(4, 3, 32, 32), torch.rand(4, 5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        pred, feat = model(x)
    assert feat.dtype == torch.bfloat16 and pred.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(pred, model.regression_head1(feat.float()))
        model.fds.update_running_stats(feat.float(), y, 0)
        model.fds.update_last_epoch_stats(1)
    model.train()
    model.visual.eval()
    model.regression_head.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        pred_fds, feat = model(x, y, 1)  # FDS path: per-marker calibrated features -> per-marker linear
    assert pred_fds.dtype == torch.float32
    f = model.fds.smooth(feat.float(), y, 1)
    want = torch.einsum("bmf,mf->bm", f, model.regression_head1.weight) + model.regression_head1.bias
    torch.testing.assert_close(pred_fds, want, rtol=0, atol=1e-6)


def test_heads_only_file_loads_into_the_heads(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    src = HEX("tiny", num_markers=40)
    heads = {k: v for k, v in src.state_dict().items() if k.startswith("regression_head")}
    torch.save({"state_dict": heads}, tmp_path / "heads.pt")
    dst = HEX("tiny", num_markers=40)
    backbone_before = {k: v.clone() for k, v in dst.visual.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="hex.model"):
        report = load_hex_checkpoint(dst, tmp_path / "heads.pt")
    assert report["backbone"] == "initialised"
    assert "backbone was left as initialised" in caplog.text
    assert _same(dst.visual.state_dict(), backbone_before)
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in heads.items())


def test_marker_count_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    src = HEX("tiny", num_markers=39)
    save_file(inference_state_dict(src), str(tmp_path / "m39.safetensors"))
    with pytest.raises(PipelineError, match="predicts 39 markers but the model has 40"):
        load_hex_checkpoint(HEX("tiny", num_markers=40), tmp_path / "m39.safetensors")


def test_backbone_mismatch_and_missing_files_are_clear_errors(tmp_path: Path) -> None:
    save_file(inference_state_dict(HEX("tiny", embed_dim=64)), str(tmp_path / "d64.safetensors"))
    with pytest.raises(PipelineError, match="different backbone embedding size"):
        load_hex_checkpoint(HEX("tiny"), tmp_path / "d64.safetensors")
    with pytest.raises(PipelineError, match="does not exist"):
        load_hex_checkpoint(HEX("tiny"), tmp_path / "nope.safetensors")
    save_file({"visual.stem.0.weight": torch.zeros(1)}, str(tmp_path / "backbone_only.safetensors"))
    with pytest.raises(PipelineError, match="lacks head weights"):
        load_hex_checkpoint(HEX("tiny"), tmp_path / "backbone_only.safetensors")
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        HEX("tiny", weights=tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="unknown backbone 'resnet_9000'"):
        HEX("resnet_9000")
