"""Image encoders of stage 07 (H&E tiles; virtual CODEX channels for an image CODEX encoder): a ``hex.backbones``
name with weights, or the backbone of a trained HEX run, loaded once (:func:`load_encoder`), and the embedding of a
slide's tiles (:func:`encode_tiles`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import artifacts as art
from pipeline.errors import PipelineError

log = logging.getLogger("mica.extract_features")

HEX_PREFIX = "hex:"


# ----------------------------------------------------------------------------------------------------------------
# encoders


@dataclass
class ImageEncoder:
    """A loaded image encoder: ``module`` maps normalised (B, 3, S, S) float to (B, embed_dim)."""

    name: str
    module: nn.Module
    embed_dim: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    weights: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    stain_norm: dict[str, Any] | None = None  # a HEX run's recorded stain normalisation (hex.data.stain)

    def transform(self):
        """uint8 (B, 3, H, W) -> normalised (B, 3, S, S) (:class:`hex.data.transforms.BatchTransform`, no
        augmentation; a ``hex:RUN`` encoder's stain normalisation first, as in its training)."""
        from hex.data.transforms import BatchTransform

        return BatchTransform(self.input_size, self.mean, self.std, train=False, interpolation=self.interpolation,
                              stain_norm=self.stain_norm)


def load_encoder(name: str, out: Path | None = None, weights: str | None = None, interpolation: str | None = None,
                 **backbone_kw: Any) -> ImageEncoder:
    """Build ``name`` once: a ``hex.backbones`` name (+ ``weights``), or ``hex:RUN`` (the backbone of
    ``OUT/runs/RUN/best.safetensors``, or of the checkpoint ``weights``). ``interpolation`` overrides the resize
    mode (default: the HEX run's, else bicubic as MUSK/DINOv2 pre-processing). ``backbone_kw``: builder options
    (reduced sizes in tests). Raises :class:`PipelineError` for a missing file or an unknown name."""
    from hex import backbones

    if name.startswith(HEX_PREFIX):
        from hex.trained_model import load_trained

        run = name[len(HEX_PREFIX):]
        if not run:
            raise PipelineError("--encoder hex:RUN needs a run name (a folder OUT/runs/RUN with best.safetensors)")
        if out is None and weights is None:
            raise PipelineError(f"--encoder {name}: give --out (runs live in OUT/runs/) or --weights CHECKPOINT")
        ckpt = Path(weights) if weights is not None else art.HEX_RUN.path(out, run=run)
        if not ckpt.is_file():
            raise PipelineError(f"--encoder {name}: {ckpt} does not exist; train the HEX run first (stage 04) or give "
                                "one of its checkpoints with --weights")
        model, meta = load_trained(ckpt)
        visual = model.visual.eval()
        return ImageEncoder(name, visual, int(visual.embed_dim), int(meta["input_size"]), tuple(meta["mean"]),
                            tuple(meta["std"]), interpolation or meta.get("interpolation") or "bilinear",
                            str(ckpt), {"checkpoint_sha256": meta.get("checkpoint_sha256", ""),
                                                "hex_epoch": meta.get("epoch")}, meta.get("stain_norm"))
    try:
        spec = backbones.get_spec(name)
        with torch.random.fork_rng(devices=[]):  # random init: the same in every process and run
            torch.manual_seed(0)
            module = backbones.create(name, weights=weights, **backbone_kw)
    except ValueError as e:
        raise PipelineError(str(e).splitlines()[0]) from e
    except (FileNotFoundError, RuntimeError) as e:
        raise PipelineError(f"encoder {name!r}, weights {weights}: {str(e).splitlines()[0]}") from e
    if weights is None:
        hint = f" (e.g. --weights hf_hub:{spec.hf_hub_id})" if spec.hf_hub_id else ""
        log.warning("%s: no weights given, the encoder is RANDOMLY initialised%s", name, hint)
    return ImageEncoder(name, module.eval(), int(module.embed_dim), int(module.input_size), tuple(module.mean),
                        tuple(module.std), interpolation or "bicubic", str(weights) if weights else None)


def encode_tiles(enc: ImageEncoder, tiles: Any, device: torch.device, batch_size: int = 128, workers: int = 0,
                 amp: torch.dtype | None = None, progress: bool = False, desc: str = "tiles") -> np.ndarray:
    """(N, D) float32 features of every tile of a :class:`hex.infer.tiles.TileRegions`, row i = tile i."""
    from hex.evaluate.predict import prediction_fn, run_loop, wants_channels_last
    from hex.infer.tiles import make_tile_loader

    loader = make_tile_loader(tiles, batch_size, workers, pin_memory=device.type == "cuda")
    return run_loop(loader, prediction_fn(enc.module), enc.transform(), device, amp, n=tiles.num_tiles,
                    dim=enc.embed_dim, channels_last=wants_channels_last(enc.module, device), progress=progress,
                    desc=desc, total=tiles.num_tiles)
