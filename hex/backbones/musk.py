"""MUSK-large vision encoder: torchscale BEiT-3, vision branch ``A`` only.

Facts (from the public MUSK code, ``musk/modeling.py`` ``_get_large_config`` / ``MUSK.forward`` and
``musk/utils.py`` ``load_model_and_may_interpolate``):

* ``EncoderConfig(img_size=384, patch_size=16, vocab_size=64010, multiway=True, layernorm_embedding=False,
  normalize_output=True, no_output_layer=True, drop_path_rate=0, encoder_embed_dim=1024, encoder_attention_heads=16,
  encoder_ffn_embed_dim=4096, encoder_layers=24)`` on ``torchscale.model.BEiT3.BEiT3`` held as attribute ``beit3``.
* Image embedding with ``with_head=False, out_norm=False``: ``beit3(visual_tokens=x)["encoder_out"][:, 0]``, the CLS
  token after the final ``encoder.layer_norm`` (multiway branch ``A``). 577 tokens at 384 px (24x24 + CLS).
* Position table ``beit3.encoder.embed_positions.A.weight``: 579 rows, positions start at 2 (fairseq), so the first
  3 rows (2 padding rows + CLS) are kept and the 24x24 grid is resized bicubically when the input size changes.
* Checkpoint (``hf_hub:xiangjx/musk``, ``model.safetensors``): a flat dict of 974 tensors = the 971 of ``BEiT3``
  (both branches) + ``vision_head.weight``, ``language_head.weight``, ``logit_scale``.

This module keeps exactly the parameters the vision path uses (303,938,560 at full size): the text branch (every
multiway ``B``), ``text_embed`` and ``vision_embed.mask_token`` (masked-image pretraining only) are removed after a
meta-device build, so their checkpoint keys are dropped (and reported) by :meth:`MuskBackbone.checkpoint_filter`.
Module paths stay ``beit3.encoder.layers.{i}`` / ``beit3.encoder.layer_norm`` so the official file loads unchanged.

Attention runs through ``F.scaled_dot_product_attention`` by default (``attention="sdpa"``, see
:mod:`hex.backbones.musk_attention`: same parameters and keys, fp32 outputs equal to torchscale's own matmul +
softmax path to rounding); ``attention="eager"`` keeps torchscale's forward.
"""

from __future__ import annotations

import logging
import math
import warnings

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from .base import INCEPTION_MEAN, INCEPTION_STD, Backbone, BackboneSpec, register_backbone

log = logging.getLogger(__name__)

MUSK_SPEC = BackboneSpec(
    name="musk",
    embed_dim=1024,
    input_size=384,
    mean=INCEPTION_MEAN,
    std=INCEPTION_STD,
    description="MUSK-large vision encoder (BEiT-3 on torchscale, CLS after final norm, no head), 384 px",
    hf_hub_id="xiangjx/musk",
    hf_filename="model.safetensors",
)

POS_KEY = "beit3.encoder.embed_positions.A.weight"
POS_OFFSET = 2  # fairseq: positions start at 2; row 2 is the CLS token
_DROP_PREFIXES = ("beit3.text_embed.", "vision_head.", "language_head.")
_DROP_KEYS = ("logit_scale", "beit3.vision_embed.mask_token")


def _import_beit3():
    with warnings.catch_warnings():  # torchscale imports timm.models.layers (deprecated path)
        warnings.simplefilter("ignore", FutureWarning)
        from torchscale.architecture.config import EncoderConfig
        from torchscale.model.BEiT3 import BEiT3
    return EncoderConfig, BEiT3


def _strip_text_branch(beit3: nn.Module) -> None:
    """Remove what a vision-only forward never touches: multiway ``B`` experts, text embedding, mask token."""
    for module in list(beit3.modules()):
        if hasattr(module, "A") and hasattr(module, "B") and hasattr(module, "split_position"):
            del module.B  # MultiwayNetwork / MutliwayEmbedding: split_position == -1 only calls A
    beit3.text_embed = None
    beit3.vision_embed.mask_token = None


@torch.no_grad()
def _init_weights(module: nn.Module) -> None:
    """Random init after ``to_empty`` (tests, training from scratch): trunc-normal(0.02) linears and position table,
    unit LayerNorms, default conv, zero CLS token."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.LayerNorm):
            m.reset_parameters()
        elif isinstance(m, nn.Conv2d):
            m.reset_parameters()
        elif isinstance(m, nn.Embedding):
            trunc_normal_(m.weight, std=0.02)
    cls = getattr(getattr(module, "vision_embed", None), "cls_token", None)
    if cls is not None:
        cls.zero_()


def resize_pos_table(table: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Resize a BEiT-3 vision position table ``(3 + g*g, D)`` to ``(3 + n, D)`` with ``n = num_patches`` (a square):
    the first 3 rows are kept, the ``g x g`` grid is resized bicubically (``align_corners=False``), as MUSK does."""
    extra = POS_OFFSET + 1
    old = int(round(math.sqrt(table.shape[0] - extra)))
    new = int(round(math.sqrt(num_patches)))
    if old * old != table.shape[0] - extra or new * new != num_patches:
        raise ValueError(f"position table {tuple(table.shape)} / {num_patches} patches are not square grids")
    if old == new:
        return table
    grid = table[extra:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new * new, -1).to(table.dtype)
    log.info("resized MUSK position embedding grid %dx%d -> %dx%d", old, old, new, new)
    return torch.cat([table[:extra], grid], dim=0)


class MuskBackbone(Backbone):
    """MUSK vision encoder. ``forward(x: (B, 3, S, S)) -> (B, D)`` with S = ``img_size`` (default 384), D = 1024.

    Inputs must be normalised with the Inception mean/std (0.5, 0.5, 0.5) after resizing to S (bicubic).
    """

    def __init__(
        self,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_dim: int | None = None,
        img_size: int = 384,
        patch_size: int = 16,
        drop_path_rate: float = 0.0,
        attention: str = "sdpa",
    ) -> None:
        super().__init__()
        from .musk_attention import ATTENTION_MODES

        if attention not in ATTENTION_MODES:
            raise ValueError(f"MUSK attention must be one of {ATTENTION_MODES}, got {attention!r}")
        EncoderConfig, BEiT3 = _import_beit3()
        args = EncoderConfig(
            img_size=img_size,
            patch_size=patch_size,
            vocab_size=64010,
            multiway=True,
            layernorm_embedding=False,
            normalize_output=True,
            no_output_layer=True,
            drop_path_rate=drop_path_rate,
            encoder_embed_dim=embed_dim,
            encoder_attention_heads=num_heads,
            encoder_ffn_embed_dim=mlp_dim if mlp_dim is not None else 4 * embed_dim,
            encoder_layers=depth,
        )
        with torch.device("meta"):  # no memory for the ~370M text-branch parameters that are thrown away
            beit3 = BEiT3(args)
        _strip_text_branch(beit3)
        beit3.to_empty(device="cpu")
        _init_weights(beit3)
        self.beit3 = beit3
        self.set_attention(attention)
        spec = MUSK_SPEC
        if (embed_dim, img_size) != (spec.embed_dim, spec.input_size):
            spec = BackboneSpec(**{**spec.to_dict(), "embed_dim": embed_dim, "input_size": img_size})
        self._set_spec(spec)

    def set_attention(self, mode: str) -> None:
        """``"sdpa"`` (fused ``scaled_dot_product_attention``) or ``"eager"`` (torchscale's matmul + softmax), in
        place; parameters and state-dict keys do not change. Image tokens are never padded, so the SDPA path skips
        torchscale's all-False key padding mask."""
        from .musk_attention import set_attention

        set_attention(self.beit3, mode, assume_unpadded=True)
        self.attention = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, 3, S, S) normalised image -> (B, D) CLS embedding after the final LayerNorm (branch A)."""
        return self.beit3(visual_tokens=x)["encoder_out"][:, 0]

    @property
    def token_dim(self) -> int:
        """Channels of the patch-token map (= ``embed_dim``)."""
        return int(self.embed_dim)

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (B, 3, S, S) -> ``(emb (B, D), tokens (B, D, S/16, S/16))``: the CLS embedding of ``forward`` and the
        patch tokens after the final LayerNorm (24x24 at 384 px), from one encoder pass."""
        out = self.beit3(visual_tokens=x)["encoder_out"]  # (B, 1 + h*w, D)
        ph, pw = self.beit3.vision_embed.patch_size  # (16, 16)
        h, w = x.shape[-2] // ph, x.shape[-1] // pw
        tokens = out[:, 1:].transpose(1, 2).reshape(out.shape[0], out.shape[2], h, w)
        return out[:, 0], tokens

    def blocks(self) -> list[nn.Module]:
        return list(self.beit3.encoder.layers)

    def final_norm(self) -> nn.Module | None:
        return self.beit3.encoder.layer_norm

    def checkpoint_filter(self, state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Drop text-branch / head / mask-token keys (returned), resize the position table to this input size."""
        out: dict[str, torch.Tensor] = {}
        dropped: list[str] = []
        for k, v in state_dict.items():
            if k.startswith(_DROP_PREFIXES) or k in _DROP_KEYS or (k.startswith("beit3.") and ".B." in k):
                dropped.append(k)
                continue
            out[k] = v
        if POS_KEY in out:
            out[POS_KEY] = resize_pos_table(out[POS_KEY], self.beit3.vision_embed.num_patches)
        return out, dropped


@register_backbone(MUSK_SPEC)
def musk(**kw) -> MuskBackbone:
    """MUSK-large (``embed_dim``, ``depth``, ``num_heads``, ``mlp_dim``, ``img_size``, ``patch_size`` override the
    size: same code path, e.g. 64-d / 2 layers / 64 px in tests; ``attention="sdpa"|"eager"``, default sdpa)."""
    return MuskBackbone(**kw)
