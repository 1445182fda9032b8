"""Load a trained HEX for inference, with what is needed to use it: marker names, input size, mean/std, percentiles.

Checkpoints (all read with ``weights_only=True``)::

    runs/RUN/best.safetensors (+ best.json beside it)      ours, hex.train's best model
    runs/RUN/checkpoints/epoch_{k}.pt                       ours, a training checkpoint (``model_args`` inside)
    checkpoint.pth                                          the original HEX release: a state dict with
                                                            ``regression_head.*`` + ``regression_head1.0.*`` (heads
                                                            only, as released) or also ``visual.*`` (full)

An original checkpoint says nothing about its backbone or markers: the backbone comes from ``--backbone`` (default
``musk``) and ``--weights`` (required for a heads-only file), the 40 output names from
``hex/markers_original.csv`` (the release's ``biomarker_names``, output k = ``mean_intensity_channel{k+1}``), input
size and mean/std from the backbone spec, and the resize is bilinear like the release's ``transforms.Resize``.
Its label percentiles are unknown (``normalization`` None).

CLI flags shared by ``hex.test`` and ``hex.infer_wsi``: :func:`add_checkpoint_args` (checked by
:func:`check_backbone_kw`), then :func:`load_trained`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd

from hex.data.stain import check_record
from hex.model import HEX, build_from_args, load_hex_checkpoint, normalize_hex_keys, read_checkpoint_state
from hex.train.checkpoints import read_checkpoint
from pipeline.errors import PipelineError
from pipeline.tables import read_split

log = logging.getLogger(__name__)

ORIGINAL_MARKERS_CSV = Path(__file__).with_name("markers_original.csv")


def original_markers() -> list[str]:
    """The original release's 40 output names in output order (``hex/markers_original.csv``)."""
    df = pd.read_csv(ORIGINAL_MARKERS_CSV, comment="#", dtype={"marker": str})
    df = df.sort_values("output")
    if list(df["output"]) != list(range(len(df))):
        raise PipelineError(f"{ORIGINAL_MARKERS_CSV}: column 'output' must be 0..{len(df) - 1}")
    return [str(m) for m in df["marker"]]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _safetensors_meta(path: Path) -> dict[str, Any] | None:
    """The ``hex`` JSON that hex.train stores in best.safetensors' header (None when absent)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        md = f.metadata() or {}
    return json.loads(md["hex"]) if "hex" in md else None


def read_kind(path: str | os.PathLike) -> tuple[str, dict[str, Any] | None]:
    """``("safetensors", None)`` (ours), ``("hex_train", ck)`` (our epoch_k.pt) or ``("original", ck)`` (any other
    state dict); ``ck`` is the file read once (memory-mapped) so that callers need not read it again."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return "safetensors", None
    ck = read_checkpoint(path)
    return ("hex_train" if isinstance(ck, dict) and "model_args" in ck else "original"), ck


def load_trained(checkpoint: str | os.PathLike, backbone: str | None = None, weights: str | os.PathLike | None = None,
                 backbone_kw: dict[str, Any] | None = None) -> tuple[HEX, dict[str, Any]]:
    """Model (eval mode, no FDS) and its metadata from any checkpoint above.

    ``backbone``/``weights``/``backbone_kw`` describe the backbone of an original checkpoint (ignored, with a
    warning, for ours, which carry their own). Metadata keys: ``markers``, ``normalization``, ``model_args``,
    ``input_size``, ``interpolation``, ``mean``, ``std``, ``epoch``, ``checkpoint``, ``checkpoint_sha256``,
    ``checkpoint_kind``, the training split ``split``, ``train_slides``, ``val_slides`` (None when unknown: the
    original release, or runs from before they were recorded) and ``stain_norm`` (the run's fitted stain
    normalisation, :mod:`hex.data.stain`; None when it had none).
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise PipelineError(f"checkpoint {path} does not exist (train first, or pass --checkpoint)")
    try:
        kind, ck = read_kind(path)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        raise PipelineError(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e)[:200]}); is it a complete "
                            ".pt/.pth/.safetensors file?") from e
    if kind == "original":
        model, meta = _load_original(path, backbone or "musk", weights, backbone_kw or {})
    else:
        if weights is not None or backbone_kw:
            log.warning("%s is a hex.train checkpoint with its own backbone: --weights/--backbone-kw ignored", path)
        meta = _our_meta(path, kind, ck)
        model = build_from_args(meta["model_args"], weights=None, with_fds=False)
        load_hex_checkpoint(model, path)
    model.eval()
    meta |= {"checkpoint": str(path), "checkpoint_sha256": file_sha256(path), "checkpoint_kind": kind}
    return model, meta


def checkpoint_description(path: str | os.PathLike) -> tuple[dict[str, Any] | None, Path] | None:
    """A checkpoint of ours' description without building the model: (``best.json`` beside a ``.safetensors``, else
    its header; or an epoch checkpoint's top level) and the file it came from; None for the original release, a
    file that is not ours or one that cannot be read."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            side = path.with_suffix(".json")
            return (json.loads(side.read_text()), side) if side.is_file() else (_safetensors_meta(path), path)
        kind, ck = read_kind(path)
        return (ck, path) if kind == "hex_train" else None
    except (OSError, ValueError, PipelineError):
        return None


def training_split(path: str | os.PathLike) -> dict[str, Any] | None:
    """What a checkpoint of ours was trained on, without building the model: ``{"split", "train_slides",
    "val_slides", "source"}`` from ``best.json`` (or the safetensors header) / the epoch checkpoint, else from the
    split file named in its run folder's ``config.json`` (runs from before the slides were recorded); None when
    unknown (the original release, a file without a description)."""
    path = Path(path)
    found = checkpoint_description(path)
    if found is None:
        return None
    meta, src = found
    if isinstance(meta, dict) and meta.get("train_slides") is not None:
        return {"split": meta.get("split"), "train_slides": [str(s) for s in meta["train_slides"]],
                "val_slides": [str(s) for s in meta.get("val_slides") or []], "source": str(src)}
    cfg_path = (path.parent.parent if path.parent.name == "checkpoints" else path.parent) / "config.json"
    try:
        split = json.loads(cfg_path.read_text()).get("split") if cfg_path.is_file() else None
        if split and Path(split).is_file():
            return {"split": str(split), "train_slides": read_split(split, "train"),
                    "val_slides": read_split(split, "val"), "source": str(cfg_path)}
    except (OSError, ValueError, PipelineError):
        pass
    return None


def _our_meta(path: Path, kind: str, ck: dict[str, Any] | None) -> dict[str, Any]:
    keys = ("markers", "normalization", "model_args", "input_size", "interpolation", "mean", "std", "epoch",
            "split", "train_slides", "val_slides", "stain_norm")
    if kind == "safetensors":
        meta_path = path.with_suffix(".json")
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
        else:
            meta = _safetensors_meta(path)
            if meta is None:
                raise PipelineError(f"{meta_path} (model description next to {path.name}) does not exist and "
                                    f"{path.name} carries no HEX metadata; copy best.json beside it")
    else:
        meta = {k: ck.get(k) for k in keys}  # hex.train stores its meta at the checkpoint's top level
    missing = [k for k in ("markers", "model_args", "input_size", "mean", "std") if meta.get(k) is None]
    if missing:
        raise PipelineError(f"{path}: model description lacks {missing}; not a hex.train checkpoint?")
    check_record(meta.get("stain_norm"), f"{path}: stain_norm")
    return {k: meta.get(k) for k in keys}


def _load_original(path: Path, backbone: str, weights: str | os.PathLike | None,
                   backbone_kw: dict[str, Any]) -> tuple[HEX, dict[str, Any]]:
    sd = normalize_hex_keys(read_checkpoint_state(path))
    if "regression_head1.weight" not in sd:
        raise PipelineError(f"{path} has no regression_head1 weights: not a HEX checkpoint (backbone-only weights "
                            "go to --weights)")
    has_visual = any(k.startswith("visual.") for k in sd)
    if not has_visual and weights is None:
        raise PipelineError(f"{path} holds the HEX heads only (the original release's layout): pass the backbone "
                            f"weights with --weights (for --backbone musk: MUSK's model.safetensors, or "
                            f"hf_hub:xiangjx/musk)")
    m = int(sd["regression_head1.weight"].shape[0])
    names = original_markers()
    if m != len(names):
        raise PipelineError(f"{path} predicts {m} outputs, but the original release's marker list "
                            f"{ORIGINAL_MARKERS_CSV} has {len(names)}; this is not the released HEX layout")
    try:
        model = HEX(backbone, num_markers=m, weights=weights, unfreeze_last=0, fds=None, **backbone_kw)
    except (ValueError, TypeError, FileNotFoundError, KeyError) as e:
        raise PipelineError(f"cannot build backbone {backbone!r} with {backbone_kw} / weights {weights}: {e}") from e
    report = load_hex_checkpoint(model, path, load_fds=False)
    log.info("original HEX checkpoint %s: heads loaded, backbone %s (%s)", path,
             "from the checkpoint" if report["backbone"] == "loaded" else "from --weights", backbone)
    meta = {"markers": names, "normalization": None, "model_args": model.model_args,
            "input_size": model.input_size, "interpolation": "bilinear", "mean": list(model.mean),
            "std": list(model.std), "epoch": None, "split": None, "train_slides": None, "val_slides": None,
            "stain_norm": None}
    return model, meta


# ----------------------------------------------------------------------------------------------------------------
# CLI


def add_checkpoint_args(p: argparse.ArgumentParser, default_help: str) -> None:
    """``--checkpoint``, ``--backbone``, ``--weights``, ``--backbone-kw`` (shared by hex.test and hex.infer_wsi)."""
    g = p.add_argument_group("checkpoint")
    g.add_argument("--checkpoint", type=Path,
                   help=f"{default_help}; or checkpoints/epoch_{{k}}.pt, or the original release's checkpoint.pth "
                        "(full or heads-only; then give --backbone/--weights)")
    g.add_argument("--backbone", default=None,
                   help="backbone of an original checkpoint.pth (default musk); ours record their own")
    g.add_argument("--weights", default=None,
                   help="backbone weights for an original heads-only checkpoint.pth: a local file (e.g. MUSK "
                        "model.safetensors) or hf_hub:<repo>")
    g.add_argument("--backbone-kw", type=json.loads, default=None, metavar="JSON",
                   help='backbone builder options for an original checkpoint, e.g. \'{"embed_dim": 64, "depth": 2, '
                        '"num_heads": 2, "img_size": 64}\' (a tiny MUSK in tests)')


def check_backbone_kw(kw: Any) -> None:
    """``--backbone-kw`` must be a JSON object (checked before any work)."""
    if kw is not None and not isinstance(kw, dict):
        raise PipelineError(f"--backbone-kw must be a JSON object, got {kw!r}")
