"""Done-records of stage 07 (MICA feature bags): which settings and inputs a slide's features were made with.

A slide's features count as done only with the inputs and settings that made them (:mod:`pipeline.done`):

* H&E bags: records in ``OUT/features/{encdir}/done/{slide}.json``; inputs ``he`` (the H&E file as written: a link
  keeps its own name) and ``grid`` (``OUT/patches/{slide}.h5``); settings :func:`he_settings` (encoder, weights and
  their sha256, input size, resize mode, normalisation mean/std, region size, --mpp).
* CODEX parts: records in ``OUT/codex_features/{encdir}/done/{slide}.json``; inputs ``map``, ``mask``, ``record``
  (``OUT/virtual_codex/{slide}.npy``, ``_mask.png``, ``.json``); settings :func:`codex_settings`.

Batch size, workers, the device and ``--amp`` (numerical precision only) do not count. A changed input file redoes
the slide (said in the log); other settings stop the run before any work (:func:`check_before_work`): "... done with
other settings: <diff>; pass --overwrite", also for records of slides outside this run (``--slides``/``--shard``)
unless ``--overwrite`` is given (then a warning names them: the folder mixes settings until they are redone).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mica.features.codex_features import map_files, part_path, parts_dir
from mica.features.he_bags import feature_paths, features_dir, grid_file
from pipeline import artifacts as art
from pipeline import done as done_mod
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

HE_SCHEMA = art.FEATURE_BAGS.schema
CODEX_SCHEMA = art.CODEX_FEATURES.schema


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    from hex.trained_model import file_sha256

    return file_sha256(path)


def weights_identity(weights: str | None, sha256: str | None = None) -> dict[str, Any]:
    """``{"weights": ..., "weights_sha256": ...}``: a local file is known by its sha256 only (``"weights": "file"``:
    a moved or renamed copy is the same weights, a retrained file is not); an ``hf_hub:`` name or random init
    (None) by its name."""
    if weights is not None and (sha256 is not None or Path(weights).is_file()):
        if sha256 is None:
            st = Path(weights).stat()
            sha256 = _sha256(os.path.abspath(weights), st.st_size, st.st_mtime_ns)
        return {"weights": "file", "weights_sha256": sha256}
    return {"weights": None if weights is None else str(weights), "weights_sha256": None}


def he_settings(enc: Any, region_px: int, mpp: float | None) -> dict[str, Any]:
    """What an H&E bag depends on besides its input files (``enc``: a
    :class:`mica.features.image_encoders.ImageEncoder`)."""
    return {"encoder": enc.name, **weights_identity(enc.weights, enc.info.get("checkpoint_sha256") or None),
            "embed_dim": int(enc.embed_dim), "input_size": int(enc.input_size), "interpolation": enc.interpolation,
            "mean": [float(v) for v in enc.mean], "std": [float(v) for v in enc.std], "region_px": int(region_px),
            "mpp": mpp}


def codex_settings(encoder: str, high: float | None = None, epi_threshold: float | None = None,
                   enc: Any = None) -> dict[str, Any]:
    """What a CODEX part depends on: ``stats`` thresholds, or an image encoder's weights and pre-processing."""
    if enc is None:
        return {"encoder": encoder, "high": high, "epi_threshold": epi_threshold}
    return {"encoder": encoder, **weights_identity(enc.weights, enc.info.get("checkpoint_sha256") or None),
            "embed_dim": int(enc.embed_dim), "input_size": int(enc.input_size),
            "mean": [float(v) for v in enc.mean], "std": [float(v) for v in enc.std]}


def _abs(p: str | os.PathLike) -> Path:
    """Absolute, links not followed: input paths in records do not depend on the working directory."""
    return Path(os.path.normpath(os.path.abspath(p)))


# ----------------------------------------------------------------------------------------------------------------
# specs (inputs/outputs are module-level functions bound with partial: picklable for worker processes)


def _he_inputs(slide: str, he_paths: Mapping[str, Path], patches_dir: Path) -> dict[str, Path]:
    return {"he": Path(he_paths[slide]), "grid": grid_file(patches_dir, slide)}


def _he_outputs(slide: str, out: Path, encoder: str) -> list[Path]:
    return list(feature_paths(out, encoder, slide))


def he_spec(out: str | os.PathLike, encoder: str, settings: Mapping[str, Any], he_paths: Mapping[str, Path],
            patches_dir: str | os.PathLike) -> done_mod.DoneSpec:
    """The :class:`pipeline.done.DoneSpec` of the H&E bags of ``encoder`` under ``OUT/features/{encdir}``."""
    inputs = functools.partial(_he_inputs, he_paths={k: _abs(v) for k, v in he_paths.items()},
                               patches_dir=_abs(patches_dir))
    return done_mod.DoneSpec(features_dir(out, encoder), dict(settings), HE_SCHEMA, inputs=inputs,
                             outputs=functools.partial(_he_outputs, out=Path(out), encoder=encoder))


def codex_inputs(slide: str, out: Path) -> dict[str, Path]:
    """The files of stage 06 a slide's CODEX features are made from (``map``, ``mask``, ``record``)."""
    return map_files(out, slide)


def _codex_outputs(slide: str, out: Path, encdir: str) -> list[Path]:
    return [part_path(out, encdir, slide)]


def codex_spec(out: str | os.PathLike, encdir: str, settings: Mapping[str, Any]) -> done_mod.DoneSpec:
    """The :class:`pipeline.done.DoneSpec` of the CODEX parts under ``OUT/codex_features/{encdir}``."""
    return done_mod.DoneSpec(parts_dir(out, encdir), dict(settings), CODEX_SCHEMA,
                             inputs=functools.partial(codex_inputs, out=_abs(out)),
                             outputs=functools.partial(_codex_outputs, out=Path(out), encdir=encdir))


# ----------------------------------------------------------------------------------------------------------------
# checks


def recorded(spec: done_mod.DoneSpec) -> dict[str, dict[str, Any]]:
    """{slide: done-record} of every readable record in ``spec.folder/done/`` (failure records excluded)."""
    d = Path(spec.folder) / done_mod.DONE_DIR
    out = {}
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        if p.name.endswith(".failed.json") or p.name.startswith("."):
            continue
        try:
            out[p.name[: -len(".json")]] = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
    return out




def check_outside(spec: done_mod.DoneSpec, slides: Sequence[str], overwrite: bool, desc: str) -> None:
    """Records in ``spec.folder`` of slides outside ``slides`` made with other settings: a :class:`PipelineError`
    (a warning with ``overwrite``: they are not redone by this run)."""
    mine = set(slides)
    others: dict[str, str] = {}
    for s, rec in recorded(spec).items():
        if s in mine or rec.get("schema") != spec.schema:
            continue
        diff = done_mod.diff_settings(rec.get("settings", {}), spec.settings)
        if diff:
            others[s] = ", ".join(diff)
    if not others:
        return
    names = sorted(others)
    first = others[names[0]]
    listed = f"{', '.join(names[:5])}{', ...' if len(names) > 5 else ''}"
    if overwrite:
        log.warning("%s: %d slides outside this run (%s) keep outputs made with other settings (%s) in %s; redo them "
                    "too (run them with --overwrite) so that the folder holds one kind", desc, len(names), listed,
                    first, spec.folder)
        return
    raise PipelineError(f"{desc}: {len(names)} slides outside this run ({listed}) are done with other settings: "
                        f"{first}; run them too with --overwrite (all slides made the same way), or use another --out")


def check_before_work(spec: done_mod.DoneSpec, slides: Sequence[str], overwrite: bool, desc: str) -> None:
    """Stop (one :class:`PipelineError`) when slides of this run, or recorded slides outside it, were made with
    other settings; see the module docstring. Reads records only: no work, nothing written."""
    conflicts = {} if overwrite else done_mod.conflicts(spec, slides)
    if conflicts:
        raise done_mod.conflict_error(conflicts, desc)
    check_outside(spec, slides, overwrite, desc)


def done_now(spec: done_mod.DoneSpec, slides: Sequence[str]) -> list[str]:
    """The ``slides`` whose outputs are done with exactly ``spec``'s settings and current inputs."""
    return [s for s in slides if done_mod.check(spec, s).state == "done"]
