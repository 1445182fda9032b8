"""Backbone factory: ``create(name, weights=None, **kw) -> Backbone`` mapping (B, 3, S, S) images to (B, D).

Names: ``musk`` (MUSK-large, D=1024, S=384, Inception mean/std), ``dinov2_vits14_reg`` (D=384, S=224, ImageNet
mean/std), ``tiny`` (CPU CNN, D=192, S=224) and ``timm:<model_name>`` for any timm model. Each spec carries the training
recipes with and without pretrained weights (``get_spec(name).recipe(has_weights)``)::

    from hex import backbones
    bb = backbones.create("musk", weights="hf_hub:xiangjx/musk")   # or a local model.safetensors
    backbones.set_trainable(bb, unfreeze_last=4)                    # last 4 blocks + final norm trainable
    emb = bb(x)                                  # x: (B, 3, 384, 384) normalised -> (B, 1024)

The registry and builder live in :mod:`.base`; importing this package registers the implementations
(:mod:`.musk`, :mod:`.tiny`, :mod:`.vit`), and its names below are the factory's interface.
"""

from . import musk as _musk  # noqa: F401  (registers)
from . import tiny as _tiny  # noqa: F401  (registers)
from . import vit as _vit  # noqa: F401  (registers)
from .base import (
    HF_HUB_PREFIX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PAPER_RECIPE,
    Backbone,
    BackboneSpec,
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

__all__ = [  # the factory's interface (hex.backbones.create, ...), not names kept for older imports
    "HF_HUB_PREFIX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PAPER_RECIPE",
    "Backbone",
    "BackboneSpec",
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
