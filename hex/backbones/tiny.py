"""``tiny``: a small CNN that trains from scratch on CPU (tests, the demo).

224 px input -> 4x4 stride-4 stem (56x56; one cell = 2 um at 0.5 mpp, finer than a nucleus) -> three stride-2 stages
of two 3x3 conv-BN-ReLU (28, 14, 7) -> 1x1 projection to ``embed_dim`` -> global average pool. Enough to pick up
nuclear size/darkness and stain colour/texture; ~0.3 M parameters, several hundred 224-px patches/s forward+backward
on two CPU threads (batch 64).

Spatial tokens (:meth:`TinyCNN.forward_tokens`, for the dense head): the stage-2 map (S/16: 14x14 at 224 px, one
cell 16 px) concatenated with the final projection (S/32) upsampled bilinearly to S/16: ``widths[2] + embed_dim``
channels (64 + 192 = 256 by default).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import IMAGENET_MEAN, IMAGENET_STD, Backbone, BackboneSpec, TrainRecipe, register_backbone

# from scratch on the 12-slide sample cohort (the demo's settings): every block, lr 1e-3 decaying by 0.95 per epoch
# to a floor of 1e-4, batch 32, LDS weights for the skewed marker distributions -> visible-marker r ~0.8 in 40 epochs
TINY_SCRATCH = TrainRecipe(lr=1e-3, gamma=0.95, lr_floor=0.1, unfreeze_last=-1, batch_size=32, lds=True)
# weights of an earlier tiny run: the same, at a tenth of the lr
TINY_PRETRAINED = TrainRecipe(lr=1e-4, gamma=0.95, lr_floor=0.1, unfreeze_last=-1, batch_size=32, lds=True)

TINY_SPEC = BackboneSpec(
    name="tiny",
    embed_dim=192,
    input_size=224,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    description="small conv-BN-ReLU CNN (stem + 3 stages + 1x1 projection, GAP), trains from scratch on CPU",
    pretrained=TINY_PRETRAINED,
    scratch=TINY_SCRATCH,
    expects_weights=False,
)


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    pad = 0 if kernel == stride else kernel // 2
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=pad, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class TinyCNN(Backbone):
    """``forward(x: (B, 3, S, S)) -> (B, embed_dim)``; any S divisible by 32 works (GAP), 224 is the default.

    ``blocks()`` = ``[stem, stage1, stage2, stage3, proj]``; BatchNorm lives inside the blocks (no final norm).
    """

    def __init__(
        self, widths: tuple[int, int, int, int] = (16, 32, 64, 128), embed_dim: int = 192, input_size: int = 224
    ) -> None:
        super().__init__()
        w0, w1, w2, w3 = widths
        self.stem = _conv_bn_relu(3, w0, 4, 4)  # S/4
        self.stage1 = nn.Sequential(_conv_bn_relu(w0, w1, 3, 2), _conv_bn_relu(w1, w1, 3, 1))  # S/8
        self.stage2 = nn.Sequential(_conv_bn_relu(w1, w2, 3, 2), _conv_bn_relu(w2, w2, 3, 1))  # S/16
        self.stage3 = nn.Sequential(_conv_bn_relu(w2, w3, 3, 2), _conv_bn_relu(w3, w3, 3, 1))  # S/32
        self.proj = _conv_bn_relu(w3, embed_dim, 1, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        spec = TINY_SPEC
        if (embed_dim, input_size) != (spec.embed_dim, spec.input_size):
            spec = BackboneSpec(**{**spec.to_dict(), "embed_dim": embed_dim, "input_size": input_size})
        self._set_spec(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, 3, S, S) normalised image -> (B, embed_dim)."""
        for block in self.blocks():
            x = block(x)
        return self.pool(x).flatten(1)

    @property
    def token_dim(self) -> int:
        """Channels of :meth:`forward_tokens`' map: stage-2 width + ``embed_dim``."""
        return int(self.stage2[-1][0].out_channels) + int(self.embed_dim)

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (B, 3, S, S) -> ``(emb (B, embed_dim), tokens (B, token_dim, S/16, S/16))``; ``emb`` equals
        ``forward(x)``."""
        s16 = self.stage2(self.stage1(self.stem(x)))  # (B, w2, S/16, S/16)
        top = self.proj(self.stage3(s16))  # (B, D, S/32, S/32)
        up = F.interpolate(top, size=s16.shape[-2:], mode="bilinear", align_corners=False)
        return self.pool(top).flatten(1), torch.cat([s16, up], dim=1)

    def blocks(self) -> list[nn.Module]:
        return [self.stem, self.stage1, self.stage2, self.stage3, self.proj]


@register_backbone(TINY_SPEC)
def tiny(**kw) -> TinyCNN:
    """Small CPU CNN (``widths``, ``embed_dim``, ``input_size`` override)."""
    return TinyCNN(**kw)
