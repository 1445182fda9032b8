"""The settings of a HEX training run: :class:`TrainConfig` (one field per ``hex.train`` flag) and
:func:`make_config`, which fills the flags left unset from the backbone's recipe and checks values and files before
any process group starts (one line naming the flag or file)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hex import backbones
from hex.data.stain import fit_stain_norm
from pipeline import artifacts as art
from pipeline.cli import config_from_args
from pipeline.errors import PipelineError

RECIPE_FLAGS = ("lr", "gamma", "lr_floor", "unfreeze_last", "batch_size", "lds", "stain_aug")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One field per flag of ``python -m hex.train`` (same names; see its ``--help`` for units and defaults).

    After :func:`make_config` the recipe flags (:data:`RECIPE_FLAGS`) and ``input_size`` are set and
    ``recipe_info`` says where their values came from (``{"recipe", "values", "warning"}``, saved in config.json),
    and ``stain_fit`` holds the stain normalisation fitted on ``stain_target`` (:func:`hex.data.stain.fit_stain_norm`;
    None with ``--stain-norm none``).
    """

    # data
    data: Path
    markers_dir: Path | None = None
    patches_dir: Path | None = None
    split: Path
    clinical: Path | None = None
    allow_unknown_slides: bool = False
    strict_normalization: bool = False
    workers: int = 4
    # output
    out: Path
    run: str = "hex"
    save_every: int = 5
    keep_last: int = 0
    eval_every: int = 1
    resume: str | None = None
    overwrite: bool = False
    check: bool = False
    # model
    backbone: str = "musk"
    backbone_kw: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    require_weights: bool = False
    init: Path | None = None
    input_size: int | None = None
    unfreeze_last: int | None = None
    freeze_backbone_epoch: int = 100
    dropout: float = 0.5
    color_jitter: tuple[float, float, float, float] = (0.1, 0.1, 0.1, 0.01)
    no_flips: bool = False
    rotation: float = 0.0
    interpolation: str = "bilinear"
    stain_aug: float | None = None
    stain_norm: str = "none"
    stain_target: Path | None = None
    stain_cache_mb: float = 2048.0
    # optimisation (None: the backbone's recipe)
    epochs: int = 120
    batch_size: int | None = None
    global_batch_size: int | None = None
    lr: float | None = None
    weight_decay: float = 0.0
    gamma: float | None = None
    lr_floor: float | None = None
    loss: str = "adaptive"
    fds: bool = True
    fds_buckets: int = 50
    fds_start_smooth: int = 10
    fds_stop_epoch: int = 50
    lds: bool | None = None
    amp: str = "auto"
    seed: int = 0
    device: str = "auto"
    find_unused_parameters: bool = False
    max_steps_per_epoch: int | None = None
    # dense head (0 = off)
    dense_grid: int = 0
    dense_weight: float = 1.0
    dense_dir: Path | None = None
    recipe_info: dict[str, Any] | None = None
    stain_fit: dict[str, Any] | None = None

    @property
    def dense_labels_dir(self) -> Path | None:
        """Folder of the dense labels (``--dense-dir``, default ``DATA/markers_dense``); None without a dense head."""
        if not self.dense_grid:
            return None
        return self.dense_dir if self.dense_dir is not None else art.DENSE_LABELS.dir(self.data)

    @property
    def run_dir(self) -> Path:
        """``OUT/runs/RUN``."""
        return art.HEX_RUN.dir(self.out, run=self.run)

    def flags(self) -> dict[str, Any]:
        """The resolved flags (every field but ``recipe_info`` and ``stain_fit``): ``config.json`` and the
        checkpoints' ``config``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("recipe_info", "stain_fit")}


def resolve_recipe(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its unset :data:`RECIPE_FLAGS` taken from the backbone's recipe (pretrained when ``weights`` or
    ``init`` is given, else scratch) and ``recipe_info`` = ``{"recipe", "values", "warning"}``.

    A backbone that expects weights run without them is a warning (logged loudly), or with ``require_weights`` a
    PipelineError."""
    try:
        spec = backbones.get_spec(cfg.backbone)
    except ValueError as e:
        raise PipelineError(f"--backbone: {e}") from e
    has_weights = bool(cfg.weights) or cfg.init is not None
    recipe = spec.recipe(has_weights)
    values = {k: getattr(recipe, k) if getattr(cfg, k) is None else getattr(cfg, k) for k in RECIPE_FLAGS}
    warning = None
    if spec.expects_weights and not has_weights:
        warning = (f"backbone {cfg.backbone!r} is meant to be fine-tuned from pretrained weights, but neither "
                   "--weights nor --init is given: it trains from random initialisation (scratch recipe: "
                   f"unfreeze_last {values['unfreeze_last']}, lr {values['lr']:g}) and will fall far short of the "
                   "paper; pass WEIGHTS=/path/to/model.safetensors (see README, Weights)")
        if cfg.require_weights:
            raise PipelineError(warning.replace("it trains", "refusing to train") + " (--require-weights)")
    info = {"recipe": "pretrained" if has_weights else "scratch", "values": values, "warning": warning}
    return dataclasses.replace(cfg, **values, recipe_info=info)


# flag -> (lowest allowed value, what it is): checked before any work
_MINIMA = {"epochs": (1, "epochs"), "batch_size": (1, "patches per step"), "save_every": (1, "epochs"),
           "eval_every": (1, "epochs"), "workers": (0, "DataLoader workers"), "keep_last": (0, "checkpoints"),
           "freeze_backbone_epoch": (0, "an epoch"), "fds_buckets": (1, "buckets"),
           "max_steps_per_epoch": (1, "optimiser steps"), "global_batch_size": (1, "patches"),
           "stain_cache_mb": (0, "MiB")}


def check_values(cfg: TrainConfig) -> None:
    """Flag values in range (one line naming the flag), e.g. ``--epochs 0`` or ``--lr-floor 2``."""
    for key, (lo, what) in _MINIMA.items():
        v = getattr(cfg, key)
        if v is not None and v < lo:
            raise PipelineError(f"--{key.replace('_', '-')} {v}: must be >= {lo} ({what})")
    if not cfg.lr > 0 or not cfg.gamma > 0:
        raise PipelineError(f"--lr {cfg.lr:g} / --gamma {cfg.gamma:g}: both must be > 0")
    if not 0 <= cfg.lr_floor <= 1 or not 0 <= cfg.dropout < 1:
        raise PipelineError(f"--lr-floor {cfg.lr_floor:g} must be in [0, 1] and --dropout {cfg.dropout:g} in [0, 1)")
    if not 0 <= cfg.stain_aug < 1:
        raise PipelineError(f"--stain-aug {cfg.stain_aug:g}: must be in [0, 1) (0 = off; 0.05-0.2 typical)")
    if cfg.dense_grid < 0 or not cfg.dense_weight >= 0:
        raise PipelineError(f"--dense-grid {cfg.dense_grid} must be >= 0 (0 = no dense head) and --dense-weight "
                            f"{cfg.dense_weight:g} >= 0")


def make_config(args: argparse.Namespace) -> TrainConfig:
    """The flags as a :class:`TrainConfig`, recipe filled in and checked (cheap checks of values and files, run on
    every rank before the process group starts)."""
    cfg = resolve_recipe(config_from_args(TrainConfig, args, color_jitter=tuple(args.color_jitter)))
    check_values(cfg)
    if cfg.overwrite and cfg.resume not in (None, "auto"):
        raise PipelineError(f"--overwrite starts the run afresh (deleting its checkpoints), --resume {cfg.resume} "
                            "continues from a checkpoint: give one of them (--overwrite --resume auto = start afresh)")
    if not cfg.data.is_dir():
        raise PipelineError(f"--data {cfg.data}: folder not found (the output root of stages 01-03, with "
                            "he_patches/ and markers/)")
    for flag, folder in (("--markers-dir", cfg.markers_dir), ("--patches-dir", cfg.patches_dir),
                         ("--dense-dir", cfg.dense_dir)):
        if folder is not None and not folder.is_dir():
            raise PipelineError(f"{flag} {folder}: folder not found")
    if cfg.dense_grid and cfg.dense_dir is None and not art.DENSE_LABELS.dir(cfg.data).is_dir():
        raise PipelineError(f"--dense-grid {cfg.dense_grid}: no dense labels in {art.DENSE_LABELS.dir(cfg.data)}; "
                            f"run stage 03 with --dense-grid {cfg.dense_grid} (DENSE=1 bash scripts/03_quantify.sh) "
                            "or pass --dense-dir")
    if cfg.resume not in (None, "auto") and not Path(cfg.resume).is_file():
        raise PipelineError(f"--resume {cfg.resume}: no such checkpoint (a checkpoints/epoch_{{k}}.pt file, or "
                            "'auto')")
    w = cfg.weights
    if w and not str(w).startswith(backbones.HF_HUB_PREFIX) and not Path(w).expanduser().is_file():
        raise PipelineError(f"--weights {w}: backbone weights file not found (a local .safetensors/.pth/.bin file, "
                            "or hf_hub:<repo>)")
    for flag, path in (("--init", cfg.init), ("--split", cfg.split), ("--clinical", cfg.clinical)):
        if path is not None and not path.is_file():
            raise PipelineError(f"{flag} {path}: file not found")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.global_batch_size and cfg.global_batch_size % (cfg.batch_size * world):
        raise PipelineError(f"--global-batch-size {cfg.global_batch_size} is not a multiple of batch size x world "
                            f"size = {cfg.batch_size} x {world}")
    if cfg.stain_norm == "none" and cfg.stain_target is not None:
        raise PipelineError(f"--stain-target {cfg.stain_target} is given without --stain-norm: add --stain-norm "
                            "macenko (or reinhard), or drop --stain-target")
    kw = cfg.backbone_kw or {}
    size = int(cfg.input_size or kw.get("img_size") or kw.get("input_size")
               or backbones.get_spec(cfg.backbone).input_size)
    return dataclasses.replace(cfg, input_size=size,
                               stain_fit=fit_stain_norm(cfg.stain_norm, stain_target_path(cfg)))


def stain_target_path(cfg: TrainConfig) -> Path | None:
    """``--stain-target``, or with ``--stain-norm`` and no target the patch store of the split's first training slide
    (``he_patches/{slide}.h5``: its 4 x 4 patch mosaic is the target); None without ``--stain-norm``."""
    if cfg.stain_norm == "none" or cfg.stain_target is not None:
        return cfg.stain_target
    from pipeline.tables import read_split

    train = read_split(cfg.split, "train")
    if not train:
        raise PipelineError(f"--split {cfg.split}: no training slides to take the --stain-target from; pass one")
    return (cfg.patches_dir or art.PATCH_STORE.dir(cfg.data)) / f"{train[0]}.h5"
