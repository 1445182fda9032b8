"""HEX training checkpoints: which one to resume, whether it belongs to this run, writing, pruning, the best model.

``OUT/runs/RUN/checkpoints/epoch_{k}.pt`` holds everything that rebuilds the run (model, optimiser, scheduler,
scaler, loss parameters, FDS statistics, RNG states of every rank, best score, the resolved flags as ``config``);
it is written to a temporary file and renamed, and read with ``torch.load(weights_only=True)``.

A checkpoint belongs to a run when the flags that define what is trained agree (:data:`RUN_KEYS`); resuming with
any of them changed is an error naming the keys (a new ``--run-name`` starts a separate run). A fresh run never
writes over another run's outputs (:func:`run_outputs`): it stops unless ``--overwrite`` removes them first
(:func:`remove_run_outputs`).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hex.model import HEX, inference_state_dict
from pipeline import artifacts as art
from pipeline.errors import PipelineError
from pipeline.io import atomic_path, write_json

log = logging.getLogger(__name__)

# flags that define what a run trains: resuming with any of them changed is an error
RUN_KEYS = ("backbone", "backbone_kw", "weights", "init", "unfreeze_last", "input_size", "split", "markers", "loss",
            "fds", "dense_grid", "dense_weight", "stain_norm", "stain_target")
# flags whose change on resume is only warned about (the optimiser/scheduler state comes from the checkpoint)
SOFT_KEYS = ("lr", "gamma", "lr_floor", "batch_size", "global_batch_size", "lds", "weight_decay", "seed", "dropout",
             "stain_aug")
_EPOCH_RE = re.compile(r"epoch_(\d+)\.pt")


def plain(obj: Any) -> Any:
    """JSON round trip: only dict/list/str/int/float/bool/None remain (safe for ``torch.load(weights_only=True)``)."""
    return json.loads(json.dumps(obj, default=str))


def epoch_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """``(epoch, path)`` of every ``epoch_{k}.pt`` in ``ckpt_dir``, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(ckpt_dir).glob("epoch_*.pt") if (m := _EPOCH_RE.fullmatch(p.name))]
    return sorted(found)


def find_resume(resume: str | None, run_dir: Path) -> Path | None:
    """Checkpoint to resume from: ``auto`` = newest ``epoch_{k}.pt`` (None when there is none), else the path."""
    if not resume:
        return None
    if resume == "auto":
        ckpts = epoch_checkpoints(run_dir / "checkpoints")
        return ckpts[-1][1] if ckpts else None
    path = Path(resume)
    if not path.is_file():
        raise PipelineError(f"--resume {path}: no such checkpoint")
    return path


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint (tensors and plain values only), memory-mapped when possible."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise PipelineError(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e)[:200]}); delete it to "
                            "resume from the one before") from e


def _norm_path(v: Any) -> Any:
    if v in (None, "") or str(v).startswith("hf_hub:"):
        return v or None
    return str(Path(str(v)).expanduser().resolve())


def run_identity(config: Mapping[str, Any], markers: Sequence[str]) -> dict[str, Any]:
    """The :data:`RUN_KEYS` of a run from its resolved flags (a :class:`hex.train.config.TrainConfig` as a dict, or a
    checkpoint's ``config``) and its markers (as a sorted list: the order comes from the checkpoint); paths are made
    absolute so that the same file compares equal."""
    ident = {k: config.get(k) for k in RUN_KEYS if k != "markers"}
    for k in ("weights", "init", "split", "stain_target"):
        ident[k] = _norm_path(ident[k])
    # runs from before stain normalisation have neither key: none
    ident["stain_norm"] = ident["stain_norm"] or "none"
    if ident["stain_norm"] == "none":
        ident["stain_target"] = None
    ident["backbone_kw"] = dict(ident["backbone_kw"] or {})
    # runs from before the dense head have neither key: a patch-level run (dense_grid 0, no dense weight)
    ident["dense_grid"] = int(ident["dense_grid"] or 0)
    ident["dense_weight"] = float(1.0 if ident["dense_weight"] is None else ident["dense_weight"]) \
        if ident["dense_grid"] else None
    ident["markers"] = sorted(markers)
    return plain(ident)


def check_same_run(ck: Mapping[str, Any], config: Mapping[str, Any], markers: Sequence[str], path: Path) -> None:
    """Stop when checkpoint ``ck`` was trained with other :data:`RUN_KEYS` than ``config`` + ``markers``; warn about
    changed :data:`SOFT_KEYS`."""
    old_cfg = dict(ck.get("config") or {})
    old = run_identity({**old_cfg, "input_size": ck.get("input_size", old_cfg.get("input_size"))}, ck["markers"])
    new = run_identity(config, markers)
    diff = [k for k in RUN_KEYS if old[k] != new[k]]
    if diff:
        shown = "; ".join(f"{k}: checkpoint {_short(old[k], k)} vs now {_short(new[k], k)}" for k in diff)
        raise PipelineError(f"--resume {path}: this run was trained with other settings ({shown}); use a new "
                            "--run-name (RUN=...) for a new run, or the checkpoint's settings to continue it")
    soft = [k for k in SOFT_KEYS if k in old_cfg and old_cfg[k] != config.get(k)]
    if soft:
        log.warning("resuming %s with changed %s: the optimiser and lr schedule state come from the checkpoint",
                    path, ", ".join(f"{k} ({old_cfg[k]} -> {config.get(k)})" for k in soft))


BEST_MODEL = art.HEX_RUN.name  # best.safetensors, with best.json beside it
RUN_OUTPUTS = ("checkpoints", BEST_MODEL, "best.json", "tb", "test")
"""What a run folder holds besides its log: removed by ``hex.train --overwrite`` (``config*.json`` too)."""


def run_outputs(run_dir: Path) -> list[Path]:
    """The outputs of an earlier run in ``run_dir`` (epoch checkpoints, best model, TensorBoard events, configs,
    test results); empty folders do not count."""
    run_dir = Path(run_dir)
    found = []
    for name in RUN_OUTPUTS:
        p = run_dir / name
        if p.is_file() or (p.is_dir() and any(q.is_file() for q in p.rglob("*"))):
            found.append(p)
    return found + sorted(run_dir.glob("config*.json"))


def remove_run_outputs(run_dir: Path) -> list[Path]:
    """Delete :func:`run_outputs` (``hex.train --overwrite``: the run starts afresh); returns what was removed."""
    gone = run_outputs(run_dir)
    for p in gone:
        try:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
        except OSError as e:
            raise PipelineError(f"--overwrite: cannot remove {p} ({e.strerror or e}); remove it by hand or fix its "
                                "permissions") from None
    return gone


def _short(v: Any, key: str = "") -> str:
    """A value for a one-line message: JSON, cut at 80 characters, except file paths (shown whole: which split)."""
    text = json.dumps(v)
    return text if len(text) <= 80 or key in ("split", "weights", "init") else text[:77] + "..."


def save_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """Write a training checkpoint atomically (temp file, then rename)."""
    with atomic_path(path) as tmp:
        torch.save(dict(state), tmp)
    log.info("saved %s", path)


def prune_checkpoints(ckpt_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` ``epoch_{k}.pt`` (``keep_last <= 0``: keep all); returns the deleted
    paths."""
    if keep_last <= 0:
        return []
    old = [p for _, p in epoch_checkpoints(ckpt_dir)[:-keep_last]]
    for p in old:
        p.unlink(missing_ok=True)
    if old:
        log.info("--keep-last %d: deleted %s", keep_last, ", ".join(p.name for p in old))
    return old


def training_state(model: HEX, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler,
                   criterion: nn.Module, epoch: int, rngs: list[Any], best: dict[str, Any], world_size: int,
                   config: Mapping[str, Any], meta: Mapping[str, Any],
                   dense_criterion: nn.Module | None = None) -> dict[str, Any]:
    """The dict :func:`save_checkpoint` writes after ``epoch`` epochs (everything that rebuilds the run); a dense
    run also stores its dense loss's parameters under ``dense_loss``."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "loss": criterion.state_dict(), "epoch": epoch, "rng": rngs,
             "best": dict(best), "backbone_frozen": model.backbone_frozen, "world_size": world_size,
             "config": plain(dict(config)), **plain(dict(meta))}
    if dense_criterion is not None:
        state["dense_loss"] = dense_criterion.state_dict()
    return state


def save_best(run_dir: Path, model: HEX, meta: dict[str, Any]) -> None:
    """Write ``best.safetensors`` (backbone + heads) and ``best.json`` (how to rebuild and use it), atomically."""
    from safetensors.torch import save_file

    meta = {**plain(meta), "backbone": model.model_args["backbone_name"],
            "backbone_kw": model.model_args["backbone_kw"], "num_markers": model.num_markers,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    with atomic_path(run_dir / BEST_MODEL) as tmp:
        save_file(inference_state_dict(model), str(tmp), metadata={"format": "pt", "hex": json.dumps(meta)})
    write_json(run_dir / "best.json", meta)
    log.info("new best: epoch %d, val mean Pearson r %.4f -> %s", meta["epoch"], meta["val_mean_pearson"],
             run_dir / BEST_MODEL)
