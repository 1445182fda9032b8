"""Backbone factory: ``create(name, weights=None, **kw) -> Backbone`` mapping (B, 3, S, S) images to (B, D).

Names: ``musk`` (MUSK-large, D=1024, S=384, Inception mean/std), ``dinov2_vits14_reg`` (D=384, S=224, ImageNet
mean/std), ``tiny`` (CPU CNN, D=192, S=224) and ``timm:<model_name>`` for any timm model. Each spec carries the training
recipes with and without pretrained weights (``get_spec(name).recipe(has_weights)``)::

    from hex.backbones import create, set_trainable
    bb = create("musk", weights="hf_hub:xiangjx/musk")      # or a local model.safetensors
    set_trainable(bb, unfreeze_last=4)                      # last 4 blocks + final norm trainable
    emb = bb(x)                                             # x: (B, 3, 384, 384) normalised -> (B, 1024)
"""

from . import musk as _musk  # noqa: F401  (registers)
from . import tiny as _tiny  # noqa: F401  (registers)
from . import vit as _vit  # noqa: F401  (registers)
from .base import (
    HF_HUB_PREFIX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    INCEPTION_MEAN,
    INCEPTION_STD,
    PAPER_RECIPE,
    SCRATCH_RECIPE,
    Backbone,
    BackboneSpec,
    LoadReport,
    TrainRecipe,
    create,
    get_spec,
    list_backbones,
    load_state_dict_into,
    load_weights,
    read_state_dict,
    register_backbone,
    register_prefix,
    save_backbone,
    set_trainable,
)
from .musk import MuskBackbone
from .tiny import TinyCNN
from .vit import TIMM_PREFIX, TimmBackbone

__all__ = [
    "HF_HUB_PREFIX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INCEPTION_MEAN",
    "INCEPTION_STD",
    "PAPER_RECIPE",
    "SCRATCH_RECIPE",
    "TIMM_PREFIX",
    "Backbone",
    "BackboneSpec",
    "LoadReport",
    "MuskBackbone",
    "TimmBackbone",
    "TinyCNN",
    "TrainRecipe",
    "create",
    "get_spec",
    "list_backbones",
    "load_state_dict_into",
    "load_weights",
    "read_state_dict",
    "register_backbone",
    "register_prefix",
    "save_backbone",
    "set_trainable",
]
