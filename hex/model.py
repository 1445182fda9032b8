"""HEX: an H&E patch encoder (``visual``) with a two-layer regression head to M CODEX marker intensities.

Layout (state-dict keys match the original HEX code, so its checkpoints load)::

    visual             backbone, (B,3,S,S) -> (B,D)                         keys visual.*
    regression_head    Linear(D,256)-ReLU-Dropout(.5)-Linear(256,128)-ReLU-Dropout(.5), (B,D) -> (B,128)
    regression_head1   Linear(128,M): weight (M,128), bias (M,)              keys regression_head1.weight/.bias
    fds                optional feature distribution smoothing (buffers only), keys fds.*
    dense_head         only with dense_grid G > 0 (:class:`DenseHead`), keys dense_head.*:
                       spatial tokens (B,C,h,w) -> (B,M,G,G)

The dense output (:meth:`HEX.forward_dense`) is a second head on the backbone's spatial tokens, trained jointly
with the patch head (the patch value stays the patch head's, not the mean of the dense map: the patch labels and
patch-level scores of a dense model stay those of the patch model, and a patch-only checkpoint fine-tunes into a
dense model with its patch head intact).

With FDS active (training, labels and epoch given) every marker gets its own calibrated copy of the 128-d feature,
f (B,M,128), and ``pred[:, m] = f[:, m] @ W[m] + b[m]``; otherwise ``pred = regression_head1(feat)``. This last layer
always runs in float32, also under autocast (``pred`` is float32).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from hex import backbones
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

FEATURE_DIM = 128
FDS_DEFAULTS: dict[str, Any] = {"bucket_num": 50, "start_update": 0, "start_smooth": 10, "kernel": "gaussian",
                                "ks": 9, "sigma": 2, "momentum": 0.9}


AREA_SAMPLES = 4  # samples per cell side of the dense head's area resize


def area_resize_matrix(n_in: int, grid: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(grid, n_in) float32: the 1-D area resize of the dense head (linear interpolation, align_corners=False, to
    ``AREA_SAMPLES * grid`` samples, then the mean of each ``AREA_SAMPLES``); each row sums to 1."""
    eye = torch.eye(n_in, device=device, dtype=torch.float32).unsqueeze(1)  # n_in unit signals (n_in, 1, n_in)
    up = F.interpolate(eye, size=AREA_SAMPLES * grid, mode="linear", align_corners=False)
    return F.avg_pool1d(up, AREA_SAMPLES).squeeze(1).T.contiguous()  # (grid, n_in)


class DenseHead(nn.Module):
    """Spatial tokens (B,C,h,w) -> dense prediction (B,M,G,G) float32.

    ``reduce`` 1x1 conv C->128, GroupNorm(8), GELU; ``refine`` 3x3 conv 128->128, GELU (at the token resolution);
    resize to G x G by area (bilinear to 4G x 4G, then the mean of each 4 x 4 block: each cell averages the feature
    surface over its square; e.g. tiny's 14x14 or MUSK's 24x24 tokens -> 16x16) and ``out`` 1x1 conv 128->M, both in
    float32 (also under autocast). GroupNorm, not BatchNorm: per-sample statistics, so training on R ranks with
    batch b equals one rank with batch R b.
    """

    def __init__(self, in_channels: int, num_markers: int, grid: int, width: int = 128):
        super().__init__()
        self.grid = int(grid)
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, width, 1, bias=False), nn.GroupNorm(8, width), nn.GELU())
        self.refine = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.GELU())
        self.out = nn.Conv2d(width, num_markers, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,C,h,w) -> (B,M,G,G) float32."""
        f = self.refine(self.reduce(tokens))  # (B,128,h,w)
        g = self.grid
        with torch.autocast(f.device.type, enabled=False):
            f = f.float()
            if tuple(f.shape[-2:]) != (g, g):
                # a cell's feature = the mean of the bilinear feature surface over the cell's square (4 x 4
                # samples), not its value at the cell centre: with a token grid that does not divide the cell grid
                # (tiny: 14 tokens for 16 cells) point samples make cell-to-cell steps vary periodically across
                # the patch (1.3x at its centre), which shows as seams once overlapping tiles are blended
                # (separable: bilinear and the block mean are both products of 1-D maps, so the resize is
                # rows @ f @ cols^T with two small matrices, ~100x cheaper than resampling 4G x 4G maps)
                rows = area_resize_matrix(f.shape[-2], g, f.device)
                cols = rows if f.shape[-1] == f.shape[-2] else area_resize_matrix(f.shape[-1], g, f.device)
                f = torch.einsum("gh,bchw,kw->bcgk", rows, f, cols)
            return self.out(f)  # (B,M,G,G)


class HEX(nn.Module):
    """HEX regressor. ``forward(x (B,3,S,S) float, labels (B,M) | None, epoch | None) -> (pred (B,M), feat (B,128))``.

    Args:
        backbone_name: a name from :func:`hex.backbones.list_backbones` or ``timm:<name>``.
        num_markers: M, the number of regression outputs.
        weights: backbone weights (local file or ``hf_hub:<repo>``), None = random init.
        unfreeze_last: trainable trailing backbone blocks (+ final norm); -1 = all, 0 = none.
        fds: None (no FDS) or a dict of :class:`hex.fds.FDS` options overriding :data:`FDS_DEFAULTS`.
        head_dropout: dropout of the two head layers (paper 0.5).
        dense_grid: G > 0 adds the dense head (``forward_dense``: M x G x G per patch); 0 = patch head only.
        **backbone_kw: builder options of the backbone (e.g. tiny MUSK sizes).
    """

    def __init__(self, backbone_name: str = "musk", num_markers: int = 40, weights: str | os.PathLike | None = None,
                 unfreeze_last: int = 4, fds: dict | None = None, head_dropout: float = 0.5, dense_grid: int = 0,
                 **backbone_kw: Any):
        super().__init__()
        self.visual = backbones.create(backbone_name, weights=weights, **backbone_kw)
        d = int(self.visual.embed_dim)
        self.regression_head = nn.Sequential(
            nn.Linear(d, 256), nn.ReLU(), nn.Dropout(head_dropout),
            nn.Linear(256, FEATURE_DIM), nn.ReLU(), nn.Dropout(head_dropout),
        )
        self.regression_head1 = nn.Linear(FEATURE_DIM, num_markers)
        self.dense_grid = int(dense_grid)
        if self.dense_grid < 0:
            raise ValueError(f"dense_grid must be >= 0 (0 = no dense head), got {dense_grid}")
        self.dense_head: DenseHead | None = None
        if self.dense_grid > 0:
            try:
                cin = int(self.visual.token_dim)
            except NotImplementedError as e:
                raise ValueError(str(e)) from e
            self.dense_head = DenseHead(cin, num_markers, self.dense_grid)
        self.fds: nn.Module | None = None
        fds_cfg = None
        if fds is not None:
            from hex.fds import FDS

            fds_cfg = {**FDS_DEFAULTS, **fds}
            self.fds = FDS(feature_dim=FEATURE_DIM, num_markers=num_markers, **fds_cfg)
        self.fds_active = self.fds is not None  # the training loop switches it off (paper: from epoch 50)
        self.backbone_frozen = False
        self.num_markers = num_markers
        self.unfreeze_last = unfreeze_last
        self.model_args: dict[str, Any] = {"backbone_name": backbone_name, "num_markers": num_markers,
                                           "unfreeze_last": unfreeze_last, "fds": fds_cfg,
                                           "head_dropout": head_dropout, "dense_grid": self.dense_grid,
                                           "backbone_kw": dict(backbone_kw)}
        backbones.set_trainable(self.visual, unfreeze_last)

    # --------------------------------------------------------------------------------------------------------------
    @property
    def input_size(self) -> int:
        """Square input side S in pixels."""
        return int(self.visual.input_size)

    @property
    def mean(self) -> tuple[float, float, float]:
        return tuple(self.visual.mean)  # type: ignore[return-value]

    @property
    def std(self) -> tuple[float, float, float]:
        return tuple(self.visual.std)  # type: ignore[return-value]

    def freeze_backbone(self) -> None:
        """Stop training the backbone (paper: from epoch 100): no gradients, eval mode from now on."""
        self.visual.requires_grad_(False)
        self.backbone_frozen = True
        self.visual.eval()

    def train(self, mode: bool = True) -> HEX:
        """Like ``nn.Module.train``, but a frozen backbone stays in eval mode, and so do BatchNorm layers whose
        parameters are all frozen (their running statistics must not drift while their weights are fixed)."""
        super().train(mode)
        if mode:
            if self.backbone_frozen:
                self.visual.eval()
            else:
                for m in self.visual.modules():
                    params = list(m.parameters())
                    if isinstance(m, _BatchNorm) and params and not any(p.requires_grad for p in params):
                        m.eval()
        return self

    def trainable_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by group: ``backbone`` and ``heads`` (patch heads, then the dense head)."""
        return {"backbone": [p for p in self.visual.parameters() if p.requires_grad],
                "heads": [p for n, p in self.named_parameters() if n.startswith(("regression_head", "dense_head."))
                          and p.requires_grad]}

    # --------------------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None,
                epoch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B,3,S,S) normalised images -> (pred (B,M), feat (B,128) head features before any FDS calibration)."""
        return self._patch_head(self.visual(x), x.device.type, labels, epoch)

    def forward_dense(self, x: torch.Tensor, labels: torch.Tensor | None = None,
                      epoch: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B,3,S,S) -> (pred (B,M), feat (B,128), dense (B,M,G,G) float32) from one backbone pass; ``pred`` and
        ``feat`` as :meth:`forward` (``labels`` (B,M) / ``epoch`` drive FDS); dense axis 2 = rows (y), 3 = columns
        (x) of the patch, cell (i, j) = the patch's (i, j)-th of G x G equal squares."""
        if self.dense_head is None:
            raise RuntimeError("this HEX has no dense head (built with dense_grid=0)")
        emb, tokens = self.visual.forward_tokens(x)  # (B,D), (B,C,h,w)
        pred, feat = self._patch_head(emb, x.device.type, labels, epoch)
        return pred, feat, self.dense_head(tokens)

    def _patch_head(self, emb: torch.Tensor, device_type: str, labels: torch.Tensor | None,
                    epoch: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """emb (B,D) -> (pred (B,M) float32, feat (B,128))."""
        feat = self.regression_head(emb)  # (B,128)
        use_fds = (self.training and self.fds is not None and self.fds_active and labels is not None
                   and epoch is not None and epoch >= int(getattr(self.fds, "start_smooth", 0)))
        # the per-marker output layer runs in float32 even under autocast: its outputs are the regression targets
        # in [0,1], where fp16/bf16 rounding (up to 4e-3 for bf16) is the size of the differences being learnt
        with torch.autocast(device_type, enabled=False):
            f = self.fds.smooth(feat.float(), labels, epoch) if use_fds else feat.float()  # (B,M,128) or (B,128)
            if f.dim() == 2:  # no FDS, or smoothing returned the shared feature unchanged
                return self.regression_head1(f), feat
            w, b = self.regression_head1.weight, self.regression_head1.bias  # (M,128), (M,)
            return torch.einsum("bmf,mf->bm", f.float(), w.float()) + b.float(), feat


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


# ----------------------------------------------------------------------------------------------------------------
# checkpoints


def read_checkpoint_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensor dict of a HEX checkpoint: ``.safetensors``, our ``epoch_{k}.pt`` (``model`` entry) or an original
    HEX ``.pth`` (possibly wrapped in ``state_dict``/``model``/``module``); read with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"checkpoint {path} does not exist")
    try:
        return backbones.read_state_dict(path)
    except ValueError as e:
        raise PipelineError(f"checkpoint {path}: {e}") from e


def normalize_hex_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip ``module.`` / ``_orig_mod.`` prefixes, map the original ``regression_head1.0.*`` to
    ``regression_head1.*`` and move the original per-marker ``FDS.{j}.*`` buffers out of the way (``_orig_fds.``)."""
    out = {}
    for k, v in sd.items():
        while k.startswith(("module.", "_orig_mod.")):
            k = k.split(".", 1)[1]
        k = re.sub(r"^regression_head1\.0\.", "regression_head1.", k)
        if k.startswith("FDS."):
            k = "_orig_fds." + k[4:]
        out[k] = v
    return out


def load_hex_checkpoint(model: HEX, path: str | os.PathLike, strict_backbone: bool = True,
                        load_fds: bool = True) -> dict[str, Any]:
    """Load a HEX checkpoint (ours or the original code's) into ``model``; returns what was loaded.

    Heads must be present (``regression_head.*``, ``regression_head1.*``); their marker count must match the model.
    A file without ``visual.*`` keys loads into the heads only and the backbone keeps its initialisation (logged).
    Backbone keys are loaded directly when they match, else through the backbone's own checkpoint filter (which
    drops e.g. MUSK's text branch); FDS buffers load when ``load_fds`` and the model has FDS with the same shapes.
    ``strict_backbone=False`` logs (instead of raising) backbone weights that do not fit.

    Dense head (``dense_head.*``): a patch-only checkpoint loads into a dense model (the dense head keeps its
    initialisation, logged: fine-tuning a patch model into a dense one); a dense checkpoint loads into a patch model
    (its dense head is ignored, logged). ``report["dense"]``: ``"loaded"``, ``"initialised"``, ``"ignored"`` or
    ``None`` (neither has one).
    """
    path = Path(path)
    model = unwrap_model(model)  # type: ignore[assignment]
    sd = normalize_hex_keys(read_checkpoint_state(path))
    own = model.state_dict()
    head_keys = [k for k in own if k.startswith("regression_head")]
    missing_heads = [k for k in head_keys if k not in sd]
    if missing_heads:
        raise PipelineError(f"checkpoint {path} lacks head weights {missing_heads[:4]}: not a HEX checkpoint "
                            "(backbone-only weights go to --weights)")
    w = sd["regression_head1.weight"]
    if w.shape[0] != model.num_markers:
        raise PipelineError(f"checkpoint {path} predicts {w.shape[0]} markers but the model has {model.num_markers}; "
                            "use the same marker panel (or build the model with num_markers="
                            f"{w.shape[0]})")
    for k in head_keys:
        if sd[k].shape != own[k].shape:
            raise PipelineError(f"checkpoint {path}: {k} has shape {tuple(sd[k].shape)}, model expects "
                                f"{tuple(own[k].shape)} (different backbone embedding size?)")
    heads = {k: sd[k] for k in head_keys}
    model.load_state_dict(heads, strict=False)
    report: dict[str, Any] = {"path": str(path), "heads": len(heads), "backbone": "initialised", "fds": False,
                              "dense": _load_dense_head(model, sd, path)}

    visual = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    if not visual:
        log.info("%s holds heads only: loaded %d head tensors; the backbone was left as initialised", path, len(heads))
    else:
        vown = model.visual.state_dict()
        if set(vown) <= set(visual) and all(visual[k].shape == vown[k].shape for k in vown):
            extra = sorted(set(visual) - set(vown))
            model.visual.load_state_dict({k: visual[k] for k in vown}, strict=True)
            if extra:
                log.info("%s: ignored %d backbone keys the model does not use (e.g. %s)", path, len(extra),
                         ", ".join(extra[:3]))
        else:
            try:
                backbones.load_state_dict_into(model.visual, visual, source=str(path))
            except RuntimeError as e:
                if strict_backbone:
                    raise PipelineError(f"backbone weights in {path} do not fit {model.model_args['backbone_name']!r} "
                                        f"with {model.model_args['backbone_kw']}: {e}") from e
                log.warning("%s: backbone not loaded (%s)", path, e)
                return report
        report["backbone"] = "loaded"
        log.info("loaded backbone (%d tensors) and heads from %s", len(vown), path)

    fds_sd = {k[len("fds."):]: v for k, v in sd.items() if k.startswith("fds.")}
    if model.fds is not None and fds_sd and load_fds:
        fown = model.fds.state_dict()
        if set(fown) == set(fds_sd) and all(fown[k].shape == fds_sd[k].shape for k in fown):
            model.fds.load_state_dict(fds_sd)
            report["fds"] = True
        else:
            log.info("%s: FDS statistics do not match this model's FDS; left as initialised", path)
    ignored = sorted(k for k in sd if not k.startswith(("visual.", "regression_head", "fds.", "dense_head.")))
    if ignored:
        log.info("%s: ignored %d keys (e.g. %s)", path, len(ignored), ", ".join(ignored[:3]))
    return report


def _load_dense_head(model: HEX, sd: Mapping[str, torch.Tensor], path: Path) -> str | None:
    """Load ``dense_head.*`` of ``sd`` into ``model`` where both have one; returns what happened (see
    :func:`load_hex_checkpoint`)."""
    dense = {k[len("dense_head."):]: v for k, v in sd.items() if k.startswith("dense_head.")}
    if model.dense_head is None:
        if dense:
            log.info("%s: ignored its dense head (%d tensors): this model has no dense head (dense_grid 0)", path,
                     len(dense))
            return "ignored"
        return None
    if not dense:
        log.info("%s has no dense head: the dense head (dense_grid %d) keeps its initialisation", path,
                 model.dense_grid)
        return "initialised"
    own = model.dense_head.state_dict()
    bad = [k for k in own if k not in dense or dense[k].shape != own[k].shape]
    if bad:
        k = bad[0]
        raise PipelineError(f"checkpoint {path}: dense_head.{k} has shape "
                            f"{tuple(dense[k].shape) if k in dense else 'missing'}, model expects {tuple(own[k].shape)}"
                            " (another backbone token size or marker panel?)")
    model.dense_head.load_state_dict({k: dense[k] for k in own})
    return "loaded"


def inference_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Backbone + heads tensors (the dense head's ``dense_head.*`` too; no FDS buffers), contiguous CPU copies ready
    for ``safetensors``."""
    sd = unwrap_model(model).state_dict()
    return {k: v.detach().cpu().contiguous().clone() for k, v in sd.items() if not k.startswith("fds.")}


def build_from_args(model_args: Mapping[str, Any], weights: str | os.PathLike | None = None,
                    with_fds: bool = True) -> HEX:
    """Rebuild a model from the ``model_args`` saved in a checkpoint / ``best.json`` (FDS dropped unless
    ``with_fds``; ``dense_grid`` absent, as in checkpoints from before the dense head, = 0)."""
    a = dict(model_args)
    return HEX(a["backbone_name"], num_markers=int(a["num_markers"]), weights=weights,
               unfreeze_last=int(a.get("unfreeze_last", 4)), fds=a.get("fds") if with_fds else None,
               head_dropout=float(a.get("head_dropout", 0.5)), dense_grid=int(a.get("dense_grid") or 0),
               **dict(a.get("backbone_kw") or {}))
