"""Fused attention for torchscale's ``MultiheadAttention`` (MUSK / BEiT-3) with the same parameters and keys.

torchscale 0.3.0 (``torchscale/component/multihead_attention.py``) computes attention in explicit steps: the
projected queries are multiplied by ``head_dim ** -0.5``, ``bmm(q, k^T)`` gives the (B*H, T, S) weights, the
optional masks are added, softmax runs in float32, dropout, then ``bmm(p, v)``, the sub-LayerNorm
``inner_attn_ln`` (BEiT-3 uses ``subln=True``) and ``out_proj``. :class:`SdpaMultiheadAttention` replaces the middle
part by :func:`torch.nn.functional.scaled_dot_product_attention`, which dispatches to the flash / memory-efficient
kernels on CUDA and never materialises the (B, H, T, S) weights.

It is a subclass that overrides ``forward`` only: :func:`set_attention` switches every torchscale
``MultiheadAttention`` inside a module between ``"sdpa"`` and ``"eager"`` by changing the instance's class, so the
parameters, buffers, submodule names (``q_proj.A``, ``inner_attn_ln.A``, ...) and state-dict keys are untouched,
and multiway branch selection stays with the ``MultiwayNetwork`` projections exactly as before.

Equivalence with the eager path (fp32: to rounding):

* scaling: SDPA's ``scale`` is set to the module's ``scaling`` (``head_dim ** -0.5``, torchscale scales q before
  the product; the result is the same softmax argument);
* ``attn_mask`` (2-D float, additive), ``rel_pos`` (B*H, T, S) and ``key_padding_mask`` (B, S), True = padded,
  become one additive float mask; without any of them no mask is passed, which lets CUDA use the flash kernel;
* ``assume_unpadded`` (set by :class:`hex.backbones.musk.MuskBackbone`): torchscale's ``Encoder`` always passes a
  ``key_padding_mask``, all False for image tokens (a vision-only forward never pads); with this flag the mask is
  not looked at, so no host-device synchronisation and no masked kernel is needed;
* dropout: ``dropout_module.p`` in training mode, 0 in eval (MUSK's ``attention_dropout`` is 0);
* ``incremental_state`` and ``xpos`` (decoding / XPOS models, never used by MUSK) fall back to the eager forward;
* the returned attention weights are ``None`` (torchscale's encoder layer discards them);
* eager ``nan_to_num``-s the weights before adding ``attn_mask``; SDPA does not (only matters for inf/NaN inputs).
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F
from torch import nn

with warnings.catch_warnings():  # torchscale imports timm.models.layers (deprecated path)
    warnings.simplefilter("ignore", FutureWarning)
    from torchscale.component.multihead_attention import MultiheadAttention

log = logging.getLogger(__name__)

ATTENTION_MODES = ("sdpa", "eager")


class SdpaMultiheadAttention(MultiheadAttention):
    """torchscale ``MultiheadAttention`` whose forward runs ``F.scaled_dot_product_attention``.

    Not built directly: :func:`set_attention` converts existing modules (same parameters and keys).
    ``forward(query (B,T,E), key (B,S,E), value (B,S,E), ...) -> (out (B,T,E), None)``.
    """

    #: skip ``key_padding_mask`` (the caller guarantees it is all False, as for MUSK's image tokens)
    assume_unpadded: bool = False

    def forward(  # same signature as torchscale's
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        incremental_state: dict | None = None,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        rel_pos: torch.Tensor | None = None,
        is_first_step: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if incremental_state is not None or self.xpos is not None or (attn_mask is not None and attn_mask.dim() != 2):
            return super().forward(query, key, value, incremental_state=incremental_state,
                                   key_padding_mask=key_padding_mask, attn_mask=attn_mask, rel_pos=rel_pos,
                                   is_first_step=is_first_step)
        bsz, tgt_len, embed_dim = query.shape
        src_len = key.shape[1]
        if embed_dim != self.embed_dim:
            raise ValueError(f"query dim {embed_dim} != {self.embed_dim}")
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).view(bsz, tgt_len, h, d).transpose(1, 2)  # (B,H,T,d)
        k = self.k_proj(key).view(bsz, src_len, h, d).transpose(1, 2)  # (B,H,S,d)
        v = self.v_proj(value).view(bsz, src_len, h, d).transpose(1, 2)
        mask = _additive_mask(q, bsz, h, tgt_len, src_len, attn_mask, rel_pos,
                              None if self.assume_unpadded else key_padding_mask)
        p = self.dropout_module.p if self.training else 0.0
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=self.scaling)
        attn = attn.transpose(1, 2).reshape(bsz, tgt_len, embed_dim)  # (B,T,H*d), heads as eager orders them
        if self.inner_attn_ln is not None:
            attn = self.inner_attn_ln(attn)
        return self.out_proj(attn), None


def _additive_mask(q: torch.Tensor, bsz: int, heads: int, tgt_len: int, src_len: int,
                   attn_mask: torch.Tensor | None, rel_pos: torch.Tensor | None,
                   key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """One float mask (broadcastable to (B,H,T,S)) added to the scaled scores, as eager adds its pieces; None when
    there is nothing to add (flash kernel allowed)."""
    mask: torch.Tensor | None = None
    if attn_mask is not None:  # (T,S) float: 0 or -1e8 after torchscale's EncoderLayer
        mask = attn_mask.to(q.dtype)
    if rel_pos is not None:  # (B*H,T,S) or (B,H,T,S)
        rp = rel_pos.reshape(bsz, heads, tgt_len, src_len).to(q.dtype)
        mask = rp if mask is None else mask + rp
    if key_padding_mask is not None:  # (B,S) True = padded -> -inf
        pad = torch.zeros(bsz, 1, 1, src_len, dtype=q.dtype, device=q.device)
        pad = pad.masked_fill(key_padding_mask.to(torch.bool).view(bsz, 1, 1, src_len), float("-inf"))
        mask = pad if mask is None else mask + pad
    return mask


def set_attention(module: nn.Module, mode: str = "sdpa", assume_unpadded: bool = False) -> int:
    """Switch every torchscale ``MultiheadAttention`` in ``module`` to ``mode`` (``"sdpa"`` or ``"eager"``) in place.

    Only the instances' classes change (parameters, buffers and state-dict keys stay). ``assume_unpadded``: the
    SDPA forward ignores ``key_padding_mask`` (safe only when it is always all False, e.g. image tokens).
    Returns the number of attention modules found.
    """
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {mode!r}")
    n = 0
    for m in module.modules():
        if isinstance(m, MultiheadAttention):
            m.__class__ = SdpaMultiheadAttention if mode == "sdpa" else MultiheadAttention
            if mode == "sdpa":
                m.assume_unpadded = assume_unpadded
            else:
                m.__dict__.pop("assume_unpadded", None)
            n += 1
    log.debug("attention %s on %d torchscale MultiheadAttention modules", mode, n)
    return n


def attention_mode(module: nn.Module) -> str | None:
    """``"sdpa"``, ``"eager"``, ``"mixed"`` or None (no torchscale attention in ``module``)."""
    kinds = {type(m) is SdpaMultiheadAttention for m in module.modules() if isinstance(m, MultiheadAttention)}
    if not kinds:
        return None
    if len(kinds) == 2:
        return "mixed"
    return "sdpa" if kinds == {True} else "eager"
