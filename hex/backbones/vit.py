"""timm backbones: ``dinov2_vits14_reg`` and the ``timm:<model_name>`` family.

Weights are adapted by the timm model module's own ``checkpoint_filter_fn`` (for ViTs
``timm.models.vision_transformer.checkpoint_filter_fn``), which also converts the original facebookresearch DINOv2
key layout (``register_tokens``, ``mask_token``, CLS position row) and resamples position embeddings.

Spatial tokens (:meth:`TimmBackbone.forward_tokens`, for the dense head) come from ``forward_features``: a 4-D
feature map is used as it is (NHWC models are permuted to channels first); a token sequence (ViTs) loses its
``num_prefix_tokens`` (CLS and registers) and is reshaped to the patch grid (DINOv2 at 224 px: 16x16).
"""

from __future__ import annotations

import logging
import sys

import torch
from torch import nn

from .base import IMAGENET_MEAN, IMAGENET_STD, Backbone, BackboneSpec, register_backbone, register_prefix

log = logging.getLogger(__name__)

TIMM_PREFIX = "timm:"
DINOV2_MODEL = "vit_small_patch14_reg4_dinov2"
DINOV2_SPEC = BackboneSpec(
    name="dinov2_vits14_reg",
    embed_dim=384,
    input_size=224,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    description="DINOv2 ViT-S/14 with 4 registers (timm vit_small_patch14_reg4_dinov2), CLS token, 224 px",
    hf_hub_id="timm/vit_small_patch14_reg4_dinov2.lvd142m",
    hf_filename="model.safetensors",
)


def _timm():
    import timm

    return timm


def _check_timm_name(model_name: str) -> None:
    if not _timm().is_model(model_name):
        raise ValueError(f"unknown timm model {model_name!r} (see timm.list_models())")


def timm_spec(model_name: str) -> BackboneSpec:
    """Spec of ``timm:<model_name>`` from its ``pretrained_cfg`` (input size, mean, std) and ``num_features``."""
    _check_timm_name(model_name)
    timm = _timm()
    try:
        with torch.device("meta"):
            model = timm.create_model(model_name, pretrained=False, num_classes=0)
    except Exception:  # a few models build tensors from data in __init__
        model = timm.create_model(model_name, pretrained=False, num_classes=0)
    cfg = model.pretrained_cfg
    return BackboneSpec(
        name=TIMM_PREFIX + model_name,
        embed_dim=int(model.num_features),
        input_size=int(cfg.get("input_size", (3, 224, 224))[-1]),
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
        description=f"timm {model_name} (pretrained_cfg {cfg.get('tag') or ''})".strip(),
        hf_hub_id=cfg.get("hf_hub_id"),
        hf_filename=cfg.get("hf_hub_filename") or "model.safetensors",
    )


class TimmBackbone(Backbone):
    """A timm model with ``num_classes=0`` (pooled features). ``forward(x: (B, 3, S, S)) -> (B, num_features)``.

    ``self.model`` is the timm model; checkpoint files hold its state dict (timm key layout).
    """

    def __init__(self, model_name: str, spec: BackboneSpec | None = None, **kw) -> None:
        super().__init__()
        _check_timm_name(model_name)
        self.model = _timm().create_model(model_name, pretrained=False, num_classes=0, **kw)
        cfg = self.model.pretrained_cfg
        base = spec if spec is not None else timm_spec(model_name)
        img_size = kw.get("img_size")
        if img_size is None:
            img_size = base.input_size
        elif not isinstance(img_size, int):
            img_size = int(img_size[-1])
        self._set_spec(
            BackboneSpec(
                **{
                    **base.to_dict(),
                    "embed_dim": int(self.model.num_features),
                    "input_size": int(img_size),
                    "mean": tuple(cfg.get("mean", base.mean)),
                    "std": tuple(cfg.get("std", base.std)),
                }
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, 3, S, S) normalised image -> (B, D) pooled features."""
        return self.model(x)

    @property
    def token_dim(self) -> int:
        """Channels of :meth:`forward_tokens`' map (timm ``num_features``)."""
        return int(self.model.num_features)

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (B, 3, S, S) -> ``(emb (B, D), tokens (B, C, h, w))``: ``emb`` = ``forward(x)`` (timm's
        ``forward_head`` of the same features); tokens = the feature map, or the patch tokens (no CLS/registers)
        on their ``h x w`` grid."""
        feats = self.model.forward_features(x)
        emb = self.model.forward_head(feats)
        if feats.dim() == 4:
            if str(getattr(self.model, "output_fmt", "NCHW")) in ("NHWC", "Format.NHWC"):
                feats = feats.permute(0, 3, 1, 2)
            return emb, feats
        if feats.dim() != 3:
            raise NotImplementedError(f"timm model {type(self.model).__name__}: forward_features gives a "
                                      f"{feats.dim()}-D output; no spatial token map")
        tokens = feats[:, int(getattr(self.model, "num_prefix_tokens", 0)):]  # (B, h*w, C)
        grid = getattr(getattr(self.model, "patch_embed", None), "dynamic_feat_size", None)
        if callable(grid):
            h, w = (int(v) for v in grid(tuple(x.shape[-2:])))
        else:
            h = w = int(round(tokens.shape[1] ** 0.5))
        if h * w != tokens.shape[1]:
            raise NotImplementedError(f"timm model {type(self.model).__name__}: {tokens.shape[1]} patch tokens do "
                                      "not form a grid")
        return emb, tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)

    def blocks(self) -> list[nn.Module]:
        m = self.model
        for attr in ("blocks", "stages"):
            seq = getattr(m, attr, None)
            if isinstance(seq, nn.Module) and len(list(seq.children())) > 0:
                return list(seq.children())
        layers = [getattr(m, f"layer{i}") for i in range(1, 5) if isinstance(getattr(m, f"layer{i}", None), nn.Module)]
        if layers:
            return layers
        raise NotImplementedError(f"no blocks/stages/layer1..4 found on timm model {type(m).__name__}")

    def final_norm(self) -> nn.Module | None:
        m = self.model
        norms = [getattr(m, a) for a in ("norm", "fc_norm", "head_norm") if isinstance(getattr(m, a, None), nn.Module)]
        head = getattr(m, "head", None)
        if isinstance(getattr(head, "norm", None), nn.Module):
            norms.append(head.norm)
        norms = [n for n in norms if not isinstance(n, nn.Identity) and any(True for _ in n.parameters())]
        if not norms:
            return None
        return norms[0] if len(norms) == 1 else nn.ModuleList(norms)

    def weights_module(self) -> nn.Module:
        return self.model

    def checkpoint_filter(self, state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Pass through the timm model module's ``checkpoint_filter_fn`` (layout conversion, pos-embed resampling)."""
        module = sys.modules.get(type(self.model).__module__)
        fn = getattr(module, "checkpoint_filter_fn", None)
        if fn is None:
            return dict(state_dict), []
        return fn(dict(state_dict), self.model), []


@register_backbone(DINOV2_SPEC)
def dinov2_vits14_reg(**kw) -> TimmBackbone:
    """DINOv2 ViT-S/14-reg4 at 224 px (``img_size`` and other timm ViT arguments override, e.g. ``depth``)."""
    kw.setdefault("img_size", DINOV2_SPEC.input_size)
    return TimmBackbone(DINOV2_MODEL, spec=DINOV2_SPEC, **kw)


def build_timm(model_name: str, **kw) -> TimmBackbone:
    """Builder of the ``timm:<model_name>`` family (kwargs go to ``timm.create_model``)."""
    return TimmBackbone(model_name, spec=None, **kw)


register_prefix(TIMM_PREFIX, timm_spec, build_timm)
