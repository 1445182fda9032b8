"""The files of a trained MICA fold: ``fold_{k}/checkpoint.safetensors`` + ``checkpoint.json``, written by
``mica.train`` and read by ``mica.test`` (strict load, no pickle), and the atomic CSV writer both use.

``checkpoint.json`` holds ``model_args`` (how to rebuild the model), ``epoch`` (0-based kept epoch), ``bin_edges``,
``metric_name`` and ``metrics``, the data settings (``task``, ``mode``, ``unit``, encoders, ``split``, ``markers``)
and ``complete`` (True once the fold's training finished; a fold without it is resumed from ``state.pt``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from pipeline.errors import PipelineError
from pipeline.io import atomic_path, write_json

log = logging.getLogger(__name__)


def write_csv(df: pd.DataFrame, path: Path) -> None:
    """``df`` as CSV (no index), atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def fold_done(fold_dir: Path) -> dict[str, Any] | None:
    """The fold's ``checkpoint.json`` when it says ``complete`` (and its weights exist), else None."""
    p = fold_dir / "checkpoint.json"
    if not p.is_file() or not (fold_dir / "checkpoint.safetensors").is_file():
        return None
    try:
        meta = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return meta if meta.get("complete") else None


def save_checkpoint(fold_dir: Path, model: torch.nn.Module, meta: dict[str, Any]) -> None:
    """``checkpoint.safetensors`` (weights) then ``checkpoint.json`` (how to rebuild and use them), atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(fold_dir / "checkpoint.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "mica": json.dumps(meta, default=str)})
    write_json(fold_dir / "checkpoint.json", meta)


def check_fold_files(fold_dir: Path) -> None:
    """The fold has a ``checkpoint.json`` and ``checkpoint.safetensors``; else one line naming the missing file."""
    for name in ("checkpoint.json", "checkpoint.safetensors"):
        if not (fold_dir / name).is_file():
            raise PipelineError(f"{fold_dir / name} does not exist: train this fold first (python -m mica.train ... "
                                f"--folds {fold_dir.name.removeprefix('fold_')}) or leave it out of --folds")


def load_fold_model(fold_dir: Path, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The kept model of a fold (strict load of ``checkpoint.safetensors``) and its ``checkpoint.json``."""
    from safetensors.torch import load_file

    from mica.model import build_model

    check_fold_files(fold_dir)
    meta_p = fold_dir / "checkpoint.json"
    try:
        meta = json.loads(meta_p.read_text())
    except ValueError as e:
        raise PipelineError(f"{meta_p} is not valid JSON ({e}); retrain the fold (--overwrite)") from None
    if not meta.get("complete"):
        log.warning("%s: the fold's training did not finish; evaluating the checkpoint of epoch %d", fold_dir,
                    meta["epoch"] + 1)
    model = build_model(meta["model_args"])
    state = load_file(str(fold_dir / "checkpoint.safetensors"))
    want, have = set(model.state_dict()), set(state)
    if want != have:
        raise PipelineError(f"{fold_dir / 'checkpoint.safetensors'} does not fit the model its checkpoint.json "
                            f"describes (missing {sorted(want - have)[:5]}, unexpected {sorted(have - want)[:5]}); "
                            "was it written by another version of mica.model? retrain the fold")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), meta
