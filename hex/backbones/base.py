"""Backbone registry, the one generic builder, weight loading and saving.

A backbone maps normalised images ``(B, 3, S, S)`` float to embeddings ``(B, D)``. Registered builder functions only
construct a randomly initialised module; :func:`create` looks the name up, builds, and loads weights through the
backbone's own pure filter function (``checkpoint_filter``) followed by a strict load. Families of names such as
``timm:<model>`` are resolved by a handler registered for their prefix (:func:`register_prefix`), so this module
imports no backbone implementation.

Each :class:`BackboneSpec` also says how the backbone trains (:class:`TrainRecipe`): with pretrained weights (the
paper's MUSK fine-tuning recipe by default) and from random initialisation (every block, a larger lr, an lr floor),
and whether it is meant to be used with pretrained weights at all (``expects_weights``).

Weight sources (``weights=``):

* a local file: ``.safetensors`` (``safetensors.torch.load_file``) or ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt``
  (``torch.load(weights_only=True)``, never unpickling arbitrary objects). Containers ``state_dict`` / ``model`` /
  ``module`` are unwrapped and a key prefix (``module.``, ``model.``, ``visual.``, ...) is found and removed.
* ``hf_hub:<owner>/<repo>`` or ``hf_hub:<owner>/<repo>/<filename>``: downloaded with
  ``huggingface_hub.hf_hub_download``; the filename defaults to the spec's ``hf_filename``
  (``model.safetensors``).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

HF_HUB_PREFIX = "hf_hub:"
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_CONTAINER_KEYS = ("state_dict", "model", "module")


@dataclass(frozen=True)
class TrainRecipe:
    """Defaults of the ``hex.train`` flags a user leaves unset: Adam ``lr`` (all trainable groups), ExponentialLR
    factor ``gamma`` per epoch, ``lr_floor`` (the lr never decays below ``lr_floor x lr``; 0 = plain exponential
    decay), trainable trailing blocks ``unfreeze_last`` (-1 = all), per-process ``batch_size``, ``lds``
    (label-distribution-smoothing loss weights) and ``stain_aug`` (HED stain augmentation strength, 0 = off; see
    :func:`hex.data.transforms.hed_jitter_maps`)."""

    lr: float
    gamma: float = 0.95
    lr_floor: float = 0.0
    unfreeze_last: int = 4
    batch_size: int = 48
    lds: bool = False
    stain_aug: float = 0.0


# the original HEX training code on a pretrained MUSK: last 4 blocks, lr 1e-5 decayed by 0.95 per epoch, batch 48
PAPER_RECIPE = TrainRecipe(lr=1e-5, gamma=0.95, lr_floor=0.0, unfreeze_last=4, batch_size=48, lds=False)
# no pretrained weights: every block trains, 10x the lr, and the decay stops at 10 % of it (not a paper setting)
SCRATCH_RECIPE = TrainRecipe(lr=1e-4, gamma=0.95, lr_floor=0.1, unfreeze_last=-1, batch_size=48, lds=False)


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone name gives: embedding size ``embed_dim`` (D), square input side ``input_size`` (S, pixels),
    the per-channel RGB normalisation ``mean`` / ``std`` (on images scaled to [0, 1]), and how it trains:
    ``pretrained`` / ``scratch`` recipes (with / without weights) and ``expects_weights`` (a backbone meant to be
    fine-tuned from pretrained weights; training it from random initialisation is warned about)."""

    name: str
    embed_dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    description: str = ""
    hf_hub_id: str | None = None
    hf_filename: str = "model.safetensors"
    extra: dict = field(default_factory=dict, compare=False)
    pretrained: TrainRecipe = PAPER_RECIPE
    scratch: TrainRecipe = SCRATCH_RECIPE
    expects_weights: bool = True

    def __post_init__(self) -> None:
        for name in ("pretrained", "scratch"):  # from to_dict() / JSON: plain dicts
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, TrainRecipe(**value))

    def recipe(self, has_weights: bool) -> TrainRecipe:
        """The recipe for a run with (``has_weights``) or without pretrained weights."""
        return self.pretrained if has_weights else self.scratch

    def to_dict(self) -> dict:
        """JSON-serialisable form (saved beside weights)."""
        return asdict(self)


@dataclass
class LoadReport:
    """Outcome of a weight load: ``dropped`` keys removed on purpose by the filter (e.g. MUSK's text branch),
    ``unexpected`` keys left over after the filter (ignored, logged), ``source`` the file that was read."""

    source: str
    loaded: int
    dropped: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


class Backbone(nn.Module):
    """Base class of every backbone returned by :func:`create`.

    Subclasses set ``embed_dim``, ``input_size``, ``mean``, ``std`` (via :meth:`_set_spec`), implement ``forward``
    ``(B, 3, S, S) -> (B, embed_dim)``, :meth:`blocks` and :meth:`final_norm`, and may override
    :meth:`weights_module` / :meth:`checkpoint_filter` to adapt checkpoints. Backbones usable by the dense HEX head
    also implement :meth:`forward_tokens` and :attr:`token_dim`.
    """

    spec: BackboneSpec
    embed_dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def _set_spec(self, spec: BackboneSpec) -> None:
        self.spec = spec
        self.embed_dim = int(spec.embed_dim)
        self.input_size = int(spec.input_size)
        self.mean = tuple(float(v) for v in spec.mean)
        self.std = tuple(float(v) for v in spec.std)

    @property
    def token_dim(self) -> int:
        """Channels C of the spatial token map of :meth:`forward_tokens`."""
        raise NotImplementedError(f"backbone {self.spec.name!r} ({type(self).__name__}) has no spatial token map: "
                                  "it cannot feed a dense head (--dense-grid)")

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (B, 3, S, S) normalised image -> ``(emb (B, embed_dim), tokens (B, token_dim, h, w))``: the same
        embedding as ``forward`` and a spatial feature map of the patch (rows = y, columns = x), from one pass."""
        raise NotImplementedError(f"backbone {self.spec.name!r} ({type(self).__name__}) has no spatial token map: "
                                  "it cannot feed a dense head (--dense-grid)")

    def blocks(self) -> list[nn.Module]:
        """Ordered trunk blocks, input side first (what ``set_trainable(unfreeze_last=k)`` counts)."""
        raise NotImplementedError

    def final_norm(self) -> nn.Module | None:
        """The normalisation applied after the last block, if any (unfrozen with the last blocks)."""
        return None

    def weights_module(self) -> nn.Module:
        """The module whose ``state_dict`` a checkpoint file holds (``self`` unless a wrapper)."""
        return self

    def checkpoint_filter(self, state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Adapt a prefix-free checkpoint to :meth:`weights_module`; returns ``(state_dict, dropped_keys)``.
        Pure: the input dict is not modified."""
        return dict(state_dict), []


Builder = Callable[..., Backbone]


@dataclass(frozen=True)
class _Entry:
    spec: BackboneSpec
    builder: Builder


@dataclass(frozen=True)
class _Family:
    spec: Callable[[str], BackboneSpec]
    builder: Callable[..., Backbone]


_REGISTRY: dict[str, _Entry] = {}
_FAMILIES: dict[str, _Family] = {}  # name prefix ("timm:") -> handler of the names after it


def register_backbone(spec: BackboneSpec) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder(**kw) -> Backbone`` (random init) under ``spec.name``.

    Raises ``ValueError`` when the name is already registered or contains ``:`` (reserved for name families such
    as ``timm:``).
    """

    def deco(builder: Builder) -> Builder:
        if spec.name in _REGISTRY:
            raise ValueError(f"backbone {spec.name!r} is already registered")
        if ":" in spec.name:
            raise ValueError(f"backbone names may not contain ':', reserved for prefixes such as 'timm:' "
                             f"(got {spec.name!r})")
        _REGISTRY[spec.name] = _Entry(spec, builder)
        return builder

    return deco


def register_prefix(prefix: str, spec: Callable[[str], BackboneSpec], builder: Callable[..., Backbone]) -> None:
    """Handle every name ``prefix + <rest>``: ``spec(rest)`` gives its spec, ``builder(rest, **kw)`` builds it.

    ``prefix`` must end with ``:``; registering one twice is a ``ValueError``."""
    if not prefix.endswith(":") or prefix in _FAMILIES:
        raise ValueError(f"name prefix {prefix!r} must end with ':' and be registered once")
    _FAMILIES[prefix] = _Family(spec, builder)


def _family(name: str) -> tuple[_Family, str] | None:
    for prefix, fam in _FAMILIES.items():
        if name.startswith(prefix):
            return fam, name[len(prefix):]
    return None


def list_backbones(pattern: str | None = None) -> list[str]:
    """Registered backbone names (sorted), optionally filtered by a shell pattern such as ``"dino*"``.

    Any timm model is also available as ``timm:<model_name>`` (not listed)."""
    names = sorted(_REGISTRY)
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def _unknown(name: str) -> ValueError:
    families = ", ".join(f"'{p}<name>'" for p in _FAMILIES)
    return ValueError(f"unknown backbone {name!r}; available: {', '.join(list_backbones())}"
                      + (f", or {families} (e.g. timm: for any timm model)" if families else ""))


def get_spec(name: str) -> BackboneSpec:
    """Default spec of a backbone name (what :func:`create` gives without size overrides)."""
    fam = _family(name)
    if fam is not None:
        return fam[0].spec(fam[1])
    if name not in _REGISTRY:
        raise _unknown(name)
    return _REGISTRY[name].spec


def create(name: str, weights: str | os.PathLike | None = None, **kw) -> Backbone:
    """Build backbone ``name`` and optionally load ``weights`` (local file or ``hf_hub:<repo>[/<file>]``).

    ``kw`` are builder options (e.g. reduced sizes for tests: ``create('musk', embed_dim=64, depth=2, num_heads=4,
    mlp_dim=128, img_size=64)``); the returned module's ``embed_dim``/``input_size`` reflect them.

    Raises ``ValueError`` (unknown name), ``FileNotFoundError`` (missing local file), ``RuntimeError`` (hub download
    impossible, or trunk keys missing after the filter).
    """
    fam = _family(name)
    if fam is not None:
        model = fam[0].builder(fam[1], **kw)
    elif name in _REGISTRY:
        model = _REGISTRY[name].builder(**kw)
    else:
        raise _unknown(name)
    if weights is not None:
        load_weights(model, weights)
    return model


# ----------------------------------------------------------------------------------------------------------- loading
def resolve_weights(weights: str | os.PathLike, spec: BackboneSpec | None = None) -> Path:
    """Local path of ``weights``; downloads ``hf_hub:`` references (RuntimeError with instructions when offline)."""
    text = str(weights)
    if text.startswith(HF_HUB_PREFIX):
        ref = text[len(HF_HUB_PREFIX) :].strip("/")
        parts = ref.split("/")
        if len(parts) < 2:
            raise ValueError(f"hf_hub reference must be 'hf_hub:<owner>/<repo>[/<filename>]', got {text!r}")
        repo_id = "/".join(parts[:2])
        filename = "/".join(parts[2:]) or (spec.hf_filename if spec is not None else "model.safetensors")
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(repo_id=repo_id, filename=filename))
        except Exception as err:  # offline, gated repo, missing file...
            raise RuntimeError(
                f"could not download {filename!r} from the Hugging Face Hub repo {repo_id!r} ({type(err).__name__}: "
                f"{err}). On a machine with internet access, download https://huggingface.co/{repo_id} file "
                f"{filename!r} (accept the model licence there if the repo is gated), copy it here and pass its "
                f"local path as the weights instead of {text!r}."
            ) from err
    path = Path(text).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    return path


def unwrap_state_dict(obj: object) -> dict[str, torch.Tensor]:
    """Tensor dict inside a checkpoint object: descends into ``state_dict`` / ``model`` / ``module`` containers and
    keeps tensor entries only."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file (``.safetensors`` or torch ``.pth``/``.pt``/``.bin``/``.ckpt``, ``weights_only=True``) and
    unwrap containers. Raises ``FileNotFoundError`` naming the path when it does not exist."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if suffix in _TORCH_SUFFIXES:
        return unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    raise ValueError(f"unsupported weights file type {suffix!r} ({path}); use .safetensors, .pth, .pt, .bin or .ckpt")


def strip_prefix(state_dict: Mapping[str, torch.Tensor], anchor: str) -> dict[str, torch.Tensor]:
    """Remove the key prefix that wraps a model's keys (``module.``, ``model.``, ``visual.``, ``_orig_mod.`` ...).

    ``anchor`` is a key the model certainly has (its first state-dict key). When the checkpoint lacks it but exactly
    one key ends with ``"." + anchor``, that key's prefix is taken and only keys carrying it are kept (so a HEX
    checkpoint ``visual.beit3.*`` + heads yields the ``beit3.*`` part).
    """
    if anchor in state_dict:
        return dict(state_dict)
    hits = [k for k in state_dict if k.endswith("." + anchor)]
    if len(hits) != 1:
        return dict(state_dict)
    prefix = hits[0][: -len(anchor)]
    out = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    log.info("stripped key prefix %r (%d of %d keys kept)", prefix, len(out), len(state_dict))
    return out


def load_state_dict_into(model: Backbone, state_dict: Mapping[str, torch.Tensor], source: str = "<dict>") -> LoadReport:
    """Filter ``state_dict`` for ``model`` and load it strictly: missing keys raise ``RuntimeError``, keys the filter
    dropped on purpose and any leftovers are logged and returned in the report."""
    target = model.weights_module()
    own = target.state_dict()
    sd = strip_prefix(state_dict, next(iter(own))) if own else dict(state_dict)
    sd, dropped = model.checkpoint_filter(sd)
    missing, unexpected = target.load_state_dict(sd, strict=False)
    if missing:
        raise RuntimeError(
            f"{len(missing)} backbone keys missing from {source} for {model.spec.name!r}: "
            f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}"
        )
    if dropped:
        log.info("%s: dropped %d keys not used by %r (e.g. %s)", source, len(dropped), model.spec.name,
                 ", ".join(dropped[:5]))
    if unexpected:
        log.warning("%s: ignored %d unexpected keys for %r: %s", source, len(unexpected), model.spec.name,
                    ", ".join(unexpected[:10]))
    loaded = len(sd) - len(unexpected)
    log.info("loaded %d tensors into %r from %s", loaded, model.spec.name, source)
    return LoadReport(source=source, loaded=loaded, dropped=list(dropped), unexpected=list(unexpected))


def load_weights(model: Backbone, weights: str | os.PathLike) -> LoadReport:
    """Resolve ``weights`` (path or ``hf_hub:``), read, filter and strictly load into ``model``."""
    path = resolve_weights(weights, model.spec)
    return load_state_dict_into(model, read_state_dict(path), source=str(path))


def save_backbone(model: Backbone, path: str | os.PathLike) -> Path:
    """Write ``model.weights_module()``'s state dict as safetensors (atomically) with the spec as
    metadata; ``create(name, weights=path, <same kw>)`` restores it."""
    from safetensors.torch import save_file

    from pipeline.io import atomic_path

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.weights_module().state_dict().items()}
    with atomic_path(path) as tmp:  # the usual file mode, and no half-written file under the final name
        save_file(tensors, str(tmp), metadata={"backbone": model.spec.name, "spec": json.dumps(model.spec.to_dict())})
    return path


# -------------------------------------------------------------------------------------------------------- freezing
def set_trainable(backbone: Backbone, unfreeze_last: int) -> None:
    """Freeze every parameter, then unfreeze the last ``unfreeze_last`` blocks and the final norm.

    ``unfreeze_last < 0``: everything trainable; ``0``: nothing trainable. Only ``requires_grad`` changes: putting
    frozen BatchNorm layers in eval mode is the caller's business.
    """
    if unfreeze_last < 0:
        backbone.requires_grad_(True)
        return
    backbone.requires_grad_(False)
    if unfreeze_last == 0:
        return
    blocks = backbone.blocks()
    if unfreeze_last > len(blocks):
        log.warning("unfreeze_last=%d > %d blocks of %r: unfreezing all blocks", unfreeze_last, len(blocks),
                    backbone.spec.name)
    for block in blocks[-unfreeze_last:]:
        block.requires_grad_(True)
    norm = backbone.final_norm()
    if norm is not None:
        norm.requires_grad_(True)
