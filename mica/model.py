"""MICA: H&E patch bags fused with virtual-CODEX marker tokens for survival (K hazard bins) or response (1 logit).

Modes (``MICA(mode=...)``), shapes for a batch of B bags of N patches (B = 1 in training)::

    path  (B,N,Dp) --path_fc--> (B,N,d)                              Linear(Dp,d)-ReLU-Dropout
    codex (B,T,Dc) --codex_fc--> (B,T,d)                             Linear(Dc,d)-ReLU-Dropout, T = 40 markers

    coattn  co-attention: queries = CODEX tokens, keys/values = patches, 1 head -> (B,T,d) CODEX-guided H&E tokens
            path branch:  TransformerEncoder(2 x [d, 8 heads, FFN 2d]) on the T co-attended tokens -> gated pool -> rho
            codex branch: TransformerEncoder on the T CODEX tokens -> gated pool -> rho
            fusion: concat (2d -> d -> d, ReLU) or gated bilinear -> classifier Linear(d, out_dim)
    path    gated-attention MIL: gated pool over the N patches -> rho -> classifier
    codex   TransformerEncoder on the T tokens -> gated pool -> rho -> classifier

Every attention over patches has the T (=40) tokens or a single score per patch on the query side, so memory and
time are linear in N (the (B,T,N) co-attention map is the largest tensor); no (N,N) attention is ever formed.
``out_dim`` = ``n_bins`` (survival: hazard logits, see ``mica.survival``) or 1 (response logit).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pipeline.errors import PipelineError

MODES = ("coattn", "path", "codex")
STANDARDIZE = ("none", "codex", "path", "both")
TASKS = ("survival", "response")
FUSIONS = ("concat", "bilinear")


def _fc(d_in: int, d_out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_out), nn.ReLU(), nn.Dropout(dropout))


class GatedAttentionPool(nn.Module):
    """Gated attention pooling (Ilse et al. 2018): ``a = w^T (tanh(V h) * sigmoid(U h))``, softmax over tokens.

    ``forward(h (B,N,d)) -> (pooled (B,d), weights (B,N))``; weights sum to 1 over N. The score layer has no
    bias: a constant shift cancels in the softmax, so that bias would never receive a gradient.
    """

    def __init__(self, d: int = 256, hidden: int = 256, dropout: float = 0.25) -> None:
        super().__init__()
        self.attn_a = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.attn_b = nn.Sequential(nn.Linear(d, hidden), nn.Sigmoid(), nn.Dropout(dropout))
        self.attn_c = nn.Linear(hidden, 1, bias=False)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.attn_c(self.attn_a(h) * self.attn_b(h)).squeeze(-1)   # (B,N)
        weights = torch.softmax(scores, dim=-1)                              # (B,N)
        return torch.bmm(weights.unsqueeze(1), h).squeeze(1), weights        # (B,d), (B,N)


class BilinearFusion(nn.Module):
    """Gated bilinear fusion of two (B,d) vectors -> (B,d).

    Each modality is gated by a bilinear score of both (``g_i = sigmoid(Bilinear(h1,h2))``), reduced to ``d_small``,
    padded with a constant 1 and combined by an outer product ((d_small+1)^2 terms keep the unimodal ones), then
    Linear -> ReLU -> Linear -> ReLU to d.
    """

    def __init__(self, d: int = 256, d_small: int = 32, dropout: float = 0.25) -> None:
        super().__init__()
        self.proj1, self.proj2 = _fc(d, d_small, dropout), _fc(d, d_small, dropout)
        self.gate1, self.gate2 = nn.Bilinear(d, d, d_small), nn.Bilinear(d, d, d_small)
        self.out = nn.Sequential(nn.Linear((d_small + 1) ** 2, d), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(d, d), nn.ReLU())

    def forward(self, h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
        z1 = self.proj1(h1) * torch.sigmoid(self.gate1(h1, h2))              # (B,s)
        z2 = self.proj2(h2) * torch.sigmoid(self.gate2(h1, h2))              # (B,s)
        one = torch.ones_like(z1[:, :1])
        z1, z2 = torch.cat([z1, one], 1), torch.cat([z2, one], 1)            # (B,s+1)
        outer = torch.einsum("bi,bj->bij", z1, z2).flatten(1)                # (B,(s+1)^2)
        return self.out(outer)


def _transformer(d: int, heads: int, ffn: int, layers: int, dropout: float) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(d_model=d, nhead=heads, dim_feedforward=ffn, dropout=dropout,
                                       activation="relu", batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)


class TokenBranch(nn.Module):
    """Transformer over T tokens, gated pooling, rho: ``(B,T,d) -> (pooled (B,d), weights (B,T))``."""

    def __init__(self, d: int, heads: int, ffn: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.transformer = _transformer(d, heads, ffn, layers, dropout)
        self.pool = GatedAttentionPool(d, d, dropout)
        self.rho = _fc(d, d, dropout)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, weights = self.pool(self.transformer(tokens))
        return self.rho(pooled), weights


class MICA(nn.Module):
    """MICA model. ``forward(path (B,N,Dp) | None, codex (B,T,Dc) | None) -> logits (B, out_dim)``.

    Args:
        mode: "coattn" (both inputs), "path" (H&E bag only; ``codex`` ignored), "codex" (tokens only; ``path``
            ignored).
        task: "survival" (``out_dim = n_bins`` hazard logits) or "response" (``out_dim = 1`` logit).
        path_dim: Dp, per-patch H&E feature size (1024 for MUSK).
        codex_dim: Dc, per-marker CODEX token size (384 for DINOv2-small).
        n_tokens: T, the number of CODEX tokens (40 markers).
        n_bins: hazard bins for survival.
        d: model width (256); transformer FFN 2d, ``heads`` heads, ``layers`` layers.
        dropout: 0.25 everywhere (fc, attention pooling, transformers, rho).
        fusion: "concat" (2d -> d -> d) or "bilinear" (``BilinearFusion``), coattn only.
        standardize: inputs standardised inside the model, ``"none"``, ``"codex"``, ``"path"`` or ``"both"``:
            x -> (x - shift) / scale with buffers (CODEX (T,Dc), H&E (Dp,)) that :meth:`fit_standardization` sets
            from the training fold, so the checkpoint carries them and test / IG see the same inputs (IG
            attributes the raw features).
    """

    def __init__(self, mode: str = "coattn", task: str = "survival", path_dim: int = 1024, codex_dim: int = 384,
                 n_tokens: int = 40, n_bins: int = 4, d: int = 256, dropout: float = 0.25, fusion: str = "concat",
                 heads: int = 8, layers: int = 2, standardize: str = "none") -> None:
        super().__init__()
        for name, value, allowed in (("mode", mode, MODES), ("task", task, TASKS), ("fusion", fusion, FUSIONS),
                                     ("standardize", standardize, STANDARDIZE)):
            if value not in allowed:
                raise PipelineError(f"unknown MICA {name} {value!r}; choose one of {', '.join(allowed)}")
        if d % heads:
            raise PipelineError(f"MICA width d={d} must be divisible by heads={heads}")
        self.mode, self.task, self.n_tokens = mode, task, n_tokens
        self.path_dim, self.codex_dim = path_dim, codex_dim
        self.out_dim = n_bins if task == "survival" else 1
        self.model_args: dict[str, Any] = {"mode": mode, "task": task, "path_dim": path_dim, "codex_dim": codex_dim,
                                           "n_tokens": n_tokens, "n_bins": n_bins, "d": d, "dropout": dropout,
                                           "fusion": fusion, "heads": heads, "layers": layers,
                                           "standardize": standardize}
        uses_path, uses_codex = mode in ("coattn", "path"), mode in ("coattn", "codex")
        self.std_path = uses_path and standardize in ("path", "both")
        self.std_codex = uses_codex and standardize in ("codex", "both")
        if self.std_path:
            self.register_buffer("path_shift", torch.zeros(path_dim))
            self.register_buffer("path_scale", torch.ones(path_dim))
        if self.std_codex:
            self.register_buffer("codex_shift", torch.zeros(n_tokens, codex_dim))
            self.register_buffer("codex_scale", torch.ones(n_tokens, codex_dim))
        if uses_path:
            self.path_fc = _fc(path_dim, d, dropout)
        if uses_codex:
            self.codex_fc = _fc(codex_dim, d, dropout)
        if mode == "coattn":
            self.coattn = nn.MultiheadAttention(d, num_heads=1, batch_first=True)
            self.path_branch = TokenBranch(d, heads, 2 * d, layers, dropout)
        if mode == "path":
            self.path_pool = GatedAttentionPool(d, d, dropout)
            self.path_rho = _fc(d, d, dropout)
        if uses_codex:
            self.codex_branch = TokenBranch(d, heads, 2 * d, layers, dropout)
        if mode == "coattn":
            self.fusion = (nn.Sequential(nn.Linear(2 * d, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU())
                           if fusion == "concat" else BilinearFusion(d, dropout=dropout))
        self.classifier = nn.Linear(d, self.out_dim)

    # ------------------------------------------------------------------ inputs
    def _check(self, x: torch.Tensor | None, name: str, dim: int, n: int | None = None) -> torch.Tensor:
        if x is None:
            raise PipelineError(f"MICA mode {self.mode!r} needs the {name} input, got None")
        if x.ndim == 2:  # a single unbatched bag
            x = x.unsqueeze(0)
        if x.ndim != 3 or x.shape[-1] != dim or (n is not None and x.shape[1] != n) or x.shape[1] == 0:
            want = f"(B,{n if n is not None else 'N>=1'},{dim})"
            raise PipelineError(f"MICA {name} input has shape {tuple(x.shape)}, expected {want}; check the "
                                f"feature files against the model's {name}_dim / n_tokens")
        return x.to(next(self.parameters()).dtype)

    @torch.no_grad()
    def fit_standardization(self, path_sample: torch.Tensor | None, codex_units: torch.Tensor | None) -> None:
        """Set the standardisation buffers from training data: ``path_sample`` (M,Dp) patches pooled over the
        training bags, ``codex_units`` (U,T,Dc) the training units' token sets; each feature gets its mean and sd
        (an sd below 1e-6 of the largest, e.g. a constant descriptor, keeps scale 1)."""
        for on, x, name in ((self.std_path, path_sample, "path"), (self.std_codex, codex_units, "codex")):
            if not on:
                continue
            if x is None or len(x) < 2:
                raise PipelineError(f"MICA --standardize {name}: needs at least 2 training items")
            x = x.double()
            mu, sd = x.mean(0), x.std(0)
            sd = torch.where(sd > 1e-6 * sd.max().clamp_min(1e-12), sd, torch.ones_like(sd))
            getattr(self, f"{name}_shift").copy_(mu.to(getattr(self, f"{name}_shift").dtype))
            getattr(self, f"{name}_scale").copy_(sd.to(getattr(self, f"{name}_scale").dtype))

    # ------------------------------------------------------------------ forward
    def _forward(self, path: torch.Tensor | None, codex: torch.Tensor | None,
                 need_weights: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        attn: dict[str, torch.Tensor] = {}
        if self.mode in ("coattn", "path"):
            x = self._check(path, "path", self.path_dim)
            if self.std_path:
                x = (x - self.path_shift) / self.path_scale
            h_path = self.path_fc(x)                                                        # (B,N,d)
        if self.mode in ("coattn", "codex"):
            x = self._check(codex, "codex", self.codex_dim, self.n_tokens)
            if self.std_codex:
                x = (x - self.codex_shift) / self.codex_scale
            h_codex = self.codex_fc(x)                                                      # (B,T,d)
            if self.mode == "coattn" and h_codex.shape[0] != h_path.shape[0]:
                raise PipelineError(f"MICA path batch {h_path.shape[0]} != codex batch {h_codex.shape[0]}")

        if self.mode == "path":
            pooled, w = self.path_pool(h_path)                                                  # (B,d), (B,N)
            attn["path_pool"] = w
            attn["patch"] = w
            return self.classifier(self.path_rho(pooled)), attn

        z_codex, w_codex = self.codex_branch(h_codex)                                          # (B,d), (B,T)
        attn["codex_pool"] = w_codex
        if self.mode == "codex":
            return self.classifier(z_codex), attn

        # CODEX tokens query the patches: (B,T,d) tokens, (B,T,N) weights; memory O(T*N)
        h_co, w_co = self.coattn(h_codex, h_path, h_path, need_weights=need_weights)
        z_path, w_path = self.path_branch(h_co)                                                # (B,d), (B,T)
        attn["path_pool"] = w_path
        if need_weights:
            attn["coattn"] = w_co
            attn["patch"] = torch.bmm(w_path.unsqueeze(1), w_co).squeeze(1)                   # (B,N)
        if isinstance(self.fusion, BilinearFusion):
            fused = self.fusion(z_path, z_codex)
        else:
            fused = self.fusion(torch.cat([z_path, z_codex], dim=1))                           # (B,d)
        return self.classifier(fused), attn

    def forward(self, path: torch.Tensor | None = None, codex: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, out_dim). ``path`` (B,N,Dp) or (N,Dp); ``codex`` (B,T,Dc) or (T,Dc)."""
        return self._forward(path, codex, need_weights=False)[0]

    def forward_with_attention(self, path: torch.Tensor | None = None,
                               codex: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and attention maps (each sums to 1 over its last axis):

        ``coattn`` (B,T,N) co-attention of each CODEX token over the patches (coattn mode); ``path_pool`` (B,N) the
        gated pooling over patches (path mode) or (B,T) over the co-attended tokens (coattn mode); ``codex_pool``
        (B,T) pooling over the CODEX tokens (coattn, codex); ``patch`` (B,N) one weight per patch (path: the pooling;
        coattn: ``path_pool @ coattn``, the pooled token's share of each patch), for heatmaps.
        """
        return self._forward(path, codex, need_weights=True)


def build_model(model_args: Mapping[str, Any]) -> MICA:
    """Rebuild a ``MICA`` from its ``model_args`` (as saved in a checkpoint's JSON); unknown keys are an error."""
    args = dict(model_args)
    known = set(inspect.signature(MICA).parameters)
    unknown = sorted(set(args) - known)
    if unknown:
        raise PipelineError(f"unknown MICA model_args {unknown}; known: {sorted(known)}")
    return MICA(**args)
