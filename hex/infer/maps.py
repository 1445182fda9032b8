"""Virtual CODEX maps from whole-slide HEX predictions (stage 06, after ``hex.infer_wsi``).

Commands (run from the repository root)::

    # every OUT/hex_pred/*.h5 -> OUT/virtual_codex/ (H&E: the cohort's slide of that id, else the file's he_path)
    python -m hex.virtual_codex --out OUT --cohort COHORT
    # two slides, only the map and the OME-TIFF, redo existing outputs
    python -m hex.virtual_codex --out OUT --slides slide_000 slide_001 --formats npy ome --overwrite

Outputs per slide, in ``OUT/virtual_codex/`` (written atomically; ``{slide}.json`` and the done-record last):

- ``{slide}.npy``: (H', W', M) float16 map, rows = y. Map pixel (r, c) covers level-0 px [c*s, (c+1)*s) x
  [r*s, (r+1)*s), s = ``stride_level0``; the canvas starts at level-0 (0, 0) and is ceil(W0/s) x ceil(H0/s) when
  the slide size is known (from the H&E, or attrs of the prediction file), else the tiles' extent.
  **Coverage rule**: a tile with top-left (x, y) and side P covers map pixel (r, c) when the pixel's centre
  ((c + 0.5)*s, (r + 0.5)*s) lies in [x, x + P) x [y, y + P) (level-0 px, pixel i spanning [i, i + 1)). On a grid
  whose x, y and P are multiples of s this is exactly the pixels the tile spans; otherwise each tile takes the
  pixels whose centres it contains. Each pixel is the **mean** of the tiles covering it; pixels no tile covers
  are 0. On a grid whose origin is not a multiple of s, the covering tiles' mean centre sits up to s/2 from the
  pixel centre, so features land within half a map pixel of their level-0 position (exactly on aligned grids).
- ``{slide}_mask.png``: (H', W') uint8, 255 where at least one tile covers the pixel (tissue), else 0.
- ``{slide}.ome.tif``: the same map as a pyramidal float32 OME-TIFF (CYX, marker-named channels,
  PhysicalSizeX/Y = s * mpp µm), see :mod:`hex.infer.map_formats`.
- ``{slide}_preview.png``: H&E thumbnail beside selected markers. ``{slide}.geojson``: tile polygons in level-0 px
  with the M predictions as QuPath detection measurements.
- ``{slide}.json``: markers, s, P, mpp, pixel size, map shape, tile count, source file and checkpoint; under ``dense``
  the description of the dense map when stage 06 made one (``--dense``, :mod:`hex.infer.dense_maps`), kept when the
  patch maps are redone.

The H&E of a slide (canvas size, preview thumbnail): with ``--cohort`` the cohort's slide of that id
(:func:`pipeline.cohort.resolve_slides`: ``pairs.csv`` when present, else ``he/``; ids are the names as written),
else the prediction file's ``he_path`` when that file exists, else none (canvas = the tiles' extent).

Done-records (:mod:`pipeline.done`): ``virtual_codex/done/{slide}.json`` holds the setting that changes the
outputs (``preview_markers``), the input files (``pred`` = the prediction file, ``he``; size and mtime) and the
files of the formats made. A rerun skips a slide whose requested formats are done with these; writes the formats
it lacks (keeping the others); redoes a slide whose prediction file or H&E changed (removing the other formats'
files, now stale); and stops before any work, when a slide was done with another preview-marker choice or another
H&E file: "done with other settings: <diff>; pass --overwrite" (exit 2). The last line of the log counts done /
skipped / failed slides with each failure's reason (exit 1 when any failed); missing inputs, an unwritable output
folder and bad flag values stop before the first slide with one line (exit 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hex.infer.dense_maps import dense_description, dense_paths
from hex.infer.map_formats import (
    DEFAULT_PREVIEW_MARKERS,
    choose_preview_markers,
    write_geojson,
    write_ome_pyramid,
    write_preview,
)
from hex.infer.predictions import read_header, read_prediction
from pipeline import artifacts as art
from pipeline import done as done_mod
from pipeline.cli import SlideJob, Stage, config_from_args, require
from pipeline.cohort import resolve_slides, select_slides
from pipeline.errors import PipelineError
from pipeline.io import atomic_path, ensure_writable, remove_outputs, write_json

log = logging.getLogger("hex.virtual_codex")

FORMATS = ("npy", "ome", "preview", "geojson")


# ----------------------------------------------------------------------------------------------------------------
# the map


def coverage_ranges(coords: np.ndarray, patch_size_level0: float,
                    stride_level0: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Map rows [r0, r1) and columns [c0, c1) each tile covers (before clipping to a canvas), int64 (N,) each.

    Pixel c is covered when x <= (c + 0.5)*s < x + P, i.e. c0 = ceil(x/s - 1/2), c1 = ceil((x + P)/s - 1/2)
    (exact for integer and half-integer inputs in float64).
    """
    xy = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    s, p = float(stride_level0), float(patch_size_level0)
    lo = np.ceil(xy / s - 0.5).astype(np.int64)
    hi = np.ceil((xy + p) / s - 0.5).astype(np.int64)
    return lo[:, 1], hi[:, 1], lo[:, 0], hi[:, 0]


def accumulate_map(coords: np.ndarray, values: np.ndarray, patch_size_level0: float, stride_level0: float,
                   shape_level0: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Average tile predictions onto a map with one pixel per stride step.

    Args:
        coords: (N, 2) level-0 top-left (x, y) of each tile (px).
        values: (N, M) predictions of each tile.
        patch_size_level0: tile side P in level-0 px. stride_level0: map pixel side s in level-0 px.
        shape_level0: (height, width) of the slide's level 0 in px (numpy order) -> canvas
            (ceil(height/s), ceil(width/s)); None -> the tiles' extent (at least 1 x 1). Tiles are clipped to it.

    Returns:
        map (H', W', M) float32 (mean of the covering tiles, 0 where none) and mask (H', W') bool (covered).
        The coverage rule is :func:`coverage_ranges`' (pixel centre inside the tile).
    """
    coords = np.asarray(coords).reshape(-1, 2)
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2 or len(values) != len(coords):
        raise ValueError(f"values must be (N, M) with N = {len(coords)} tiles, got {values.shape}")
    if not (stride_level0 > 0 and patch_size_level0 > 0):
        raise ValueError(f"patch size and stride must be > 0 (got {patch_size_level0}, {stride_level0})")
    r0, r1, c0, c1 = coverage_ranges(coords, patch_size_level0, stride_level0)
    if shape_level0 is not None:
        hh, ww = (max(1, int(np.ceil(v / float(stride_level0)))) for v in shape_level0)
    else:
        hh = max(1, int(r1.max(initial=0)))
        ww = max(1, int(c1.max(initial=0)))
    m = values.shape[1]
    r0, c0 = np.maximum(r0, 0), np.maximum(c0, 0)
    r1, c1 = np.minimum(r1, hh), np.minimum(c1, ww)
    nrow, ncol = np.maximum(r1 - r0, 0), np.maximum(c1 - c0, 0)
    empty = (nrow == 0) | (ncol == 0)
    if empty.any():
        log.warning("%d of %d tiles cover no map pixel (outside the canvas, or smaller than the stride)",
                    int(empty.sum()), len(coords))
    total = np.zeros((hh * ww, m), np.float32)
    count = np.zeros(hh * ww, np.int32)
    keep = ~empty
    r0, c0, nrow, ncol, vals = r0[keep], c0[keep], nrow[keep], ncol[keep], values[keep]
    start = r0 * ww + c0
    # one tile per start pixel -> each offset pass touches distinct pixels, so fancy-index += is exact and fast
    unique = np.unique(start).size == start.size
    for dr in range(int(nrow.max(initial=0))):
        for dc in range(int(ncol.max(initial=0))):
            sel = (nrow > dr) & (ncol > dc)
            if not sel.any():
                continue
            flat = start[sel] + dr * ww + dc
            if unique:
                total[flat] += vals[sel]
                count[flat] += 1
            else:
                np.add.at(total, flat, vals[sel])
                np.add.at(count, flat, 1)
    mask = count > 0
    total[mask] /= count[mask, None]
    return total.reshape(hh, ww, m), mask.reshape(hh, ww)


# ----------------------------------------------------------------------------------------------------------------
# done-records


def output_paths(out_dir: str | Path, slide_id: str) -> dict[str, list[Path]]:
    """Files each format writes for one slide (``npy`` includes the mask), plus ``record`` (the map description)."""
    d = Path(out_dir)
    return {"npy": [d / f"{slide_id}.npy", d / f"{slide_id}_mask.png"], "ome": [d / f"{slide_id}.ome.tif"],
            "preview": [d / f"{slide_id}_preview.png"], "geojson": [d / f"{slide_id}.geojson"],
            "record": [d / f"{slide_id}.json"]}


def _abs(p: str | os.PathLike) -> str:
    """Absolute path as written (links not followed: a link is its own input)."""
    return os.path.normpath(os.path.abspath(p))


def _inputs(slide: str, pred: Mapping[str, Path], he: Mapping[str, Path | None]) -> dict[str, str]:
    out = {"pred": _abs(pred[slide])}
    if he.get(slide) is not None:
        out["he"] = _abs(he[slide])  # type: ignore[arg-type]
    return out


def _record_outputs(slide: str, out_dir: Path) -> list[Path]:
    return output_paths(out_dir, slide)["record"]


def map_spec(out_dir: Path, preview_markers: Sequence[str] | None, pred: Mapping[str, Path],
             he: Mapping[str, Path | None]) -> done_mod.DoneSpec:
    """The done-record spec of ``virtual_codex/`` (see the module docstring); ``pred``/``he``: slide -> file."""
    return done_mod.DoneSpec(Path(out_dir), {"preview_markers": list(preview_markers) if preview_markers else None},
                             art.VIRTUAL_CODEX.schema,
                             inputs=functools.partial(_inputs, pred=dict(pred), he=dict(he)),
                             outputs=functools.partial(_record_outputs, out_dir=Path(out_dir)))


def _read_record(out_dir: str | Path, slide_id: str) -> dict | None:
    try:
        return json.loads((Path(out_dir) / done_mod.DONE_DIR / f"{slide_id}.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _done_formats(rec: dict | None, out_dir: str | Path, slide_id: str) -> set[str]:
    """Formats a done-record lists whose files exist (the record's inputs are not compared here)."""
    if not rec:
        return set()
    made = set(rec.get("outputs", []))
    paths = output_paths(out_dir, slide_id)
    return {f for f in FORMATS if all(p.name in made and p.exists() for p in paths[f])}


def is_done(out_dir: str | Path, slide_id: str, formats: Sequence[str] = FORMATS) -> bool:
    """True when the slide's done-record lists every format of ``formats``, their files exist, and the input files
    it was made from (prediction file, H&E) are unchanged (same size and mtime)."""
    rec = _read_record(out_dir, slide_id)
    if (not rec or rec.get("schema") != art.VIRTUAL_CODEX.schema
            or not output_paths(out_dir, slide_id)["record"][0].exists()):
        return False
    for stamp in rec.get("inputs", {}).values():
        now = done_mod.file_stamp(stamp.get("path", ""))
        if (now["size"], now["mtime_ns"]) != (stamp.get("size"), stamp.get("mtime_ns")):
            return False
    return set(formats) <= _done_formats(rec, out_dir, slide_id)


def map_conflicts(slides: Sequence[str], out: Path, he: Mapping[str, Path | None],
                  preview_markers: Sequence[str] | None) -> dict[str, str]:
    """{slide: diff} of the slides of ``out`` (the OUT root) whose maps were done with another preview-marker choice
    or other input files (checked before any work; :func:`pipeline.done.conflict_error` makes the one-line error)."""
    spec = map_spec(art.VIRTUAL_CODEX.dir(out), preview_markers, {s: art.PREDICTIONS.path(out, s) for s in slides},
                    he)
    return done_mod.conflicts(spec, slides)


# ----------------------------------------------------------------------------------------------------------------
# one slide


def write_slide_maps(pred_path: Path, out_dir: Path, he_path: Path | None = None,
                     preview_markers: Sequence[str] | None = None, overwrite: bool = False,
                     formats: Sequence[str] = FORMATS) -> dict:
    """Build the virtual CODEX outputs of one ``hex_pred/{slide}.h5`` into ``out_dir`` (the ``virtual_codex/``
    folder).

    Args:
        pred_path: the prediction file. he_path: the H&E slide (default: the file's ``he_path`` attr when that file
            exists); it gives the canvas size and the preview thumbnail, and without it the canvas is the tiles'
            extent. preview_markers: marker names for the preview (default :data:`DEFAULT_PREVIEW_MARKERS`).
        overwrite: redo a slide whose outputs are done (else it is skipped), also one done with other settings
            (else a :class:`PipelineError`). formats: subset of :data:`FORMATS`.

    Returns ``{"slide", "shape" (H', W', M), "pixel_size_um", "stride_level0", "n_tiles", "paths" {fmt: [str]},
    "skipped"}``. A slide with no tiles writes an all-zero map and an empty FeatureCollection, with a warning.
    """
    pred_path, out_dir = Path(pred_path), Path(out_dir)
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise PipelineError(f"unknown formats {bad}; choose from {list(FORMATS)}")
    pred = read_prediction(pred_path)
    sid = pred.slide_id
    paths = output_paths(out_dir, sid)
    if he_path is None and pred.he_path is not None:
        if pred.he_path.exists():
            he_path = pred.he_path
        else:
            log.warning("%s: the H&E %s named in %s does not exist; canvas = tiles' extent, no thumbnail",
                        sid, pred.he_path, pred_path)
    spec = map_spec(out_dir, preview_markers, {sid: pred_path}, {sid: he_path})
    state = done_mod.check(spec, sid)
    if state.state == "conflict" and not overwrite:
        raise PipelineError(f"virtual_codex: {sid} is done with other settings: {state.reason}; pass --overwrite to "
                            "redo it with these settings, or use another --out")
    valid = _done_formats(_read_record(out_dir, sid), out_dir, sid) if state.state == "done" else set()
    if not overwrite and set(formats) <= valid:
        return {**json.loads(paths["record"][0].read_text()), "skipped": True}
    if state.reason not in ("", "not done"):
        log.info("%s: %s", sid, state.reason)
    kept = valid - set(formats)  # other formats, still from these same inputs
    stamps = {k: done_mod.file_stamp(v) for k, v in spec.inputs(sid).items()}
    done_mod.clear(spec, sid)
    remove_outputs([p for f in FORMATS if f not in kept for p in paths[f]])  # stale files of other formats too
    shown = choose_preview_markers(pred.markers, preview_markers) if "preview" in formats else []
    thumb, size, mpp = None, pred.slide_size, pred.mpp
    if he_path is not None:
        from preprocess.slide_io import HESlide

        with HESlide(he_path, mpp=pred.mpp) as slide:
            size, mpp = slide.dimensions, slide.mpp
            if "preview" in formats:
                thumb = slide.thumbnail(1024)
    if not mpp:
        raise PipelineError(f"{pred_path} has no 'mpp' attribute and no readable H&E slide; rerun hex.infer_wsi "
                            "(it records the level-0 µm/px) or give the H&E slide")
    s = pred.stride_level0
    n = len(pred.coords)
    if n == 0:
        log.warning("%s: no tiles in %s (no tissue?); writing an all-zero map and an empty FeatureCollection",
                    sid, pred_path)
    shape0 = (size[1], size[0]) if size is not None else None
    vmap, mask = accumulate_map(pred.coords, pred.values, pred.patch_size_level0, s, shape0)
    px_um = s * mpp
    out_dir.mkdir(parents=True, exist_ok=True)
    if "npy" in formats:
        from PIL import Image

        with atomic_path(paths["npy"][0]) as tmp, open(tmp, "wb") as fh:
            np.save(fh, vmap.astype(np.float16))
        with atomic_path(paths["npy"][1]) as tmp:
            Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")
    if "ome" in formats:
        write_ome_pyramid(paths["ome"][0], vmap, pred.markers, px_um, name=sid,
                          description=f"HEX virtual CODEX of {sid}: predictions in normalised units (~[0, 1]); "
                                      f"one pixel per {s:g} level-0 px of the H&E ({mpp:g} µm/px); "
                                      "0 outside tissue")
    if "preview" in formats:
        write_preview(paths["preview"][0], vmap, mask, pred.markers, shown, s, mpp, thumb, title=sid)
    if "geojson" in formats:
        write_geojson(paths["geojson"][0], pred.coords, pred.values, pred.patch_size_level0, pred.markers, sid)
    made = [f for f in FORMATS if f in kept or f in formats]
    rec = {"schema_version": art.VIRTUAL_CODEX.schema, "slide": sid, "shape": list(vmap.shape),
           "markers": pred.markers, "stride_level0": s, "patch_size_level0": pred.patch_size_level0, "mpp": mpp,
           "pixel_size_um": px_um,
           "n_tiles": n, "tissue_pixels": int(mask.sum()), "slide_size_level0": list(size) if size else None,
           "source": str(pred_path.resolve()), "he_path": str(he_path) if he_path else None,
           "checkpoint": pred.checkpoint, "formats": made, "paths": {f: [str(p) for p in paths[f]] for f in made}}
    dense = dense_description(dense_paths(out_dir, sid)["ome"])  # a dense map of stage 06 --dense stays described
    if dense is not None:
        rec["dense"] = dense
    write_json(paths["record"][0], rec)
    files = [p for f in made for p in paths[f]] + paths["record"]
    done_mod.write_record(dataclasses.replace(spec, outputs=lambda _s: files), sid, stamps)
    log.info("%s: map %dx%dx%d (pixel %.3g µm), %d tiles", sid, *vmap.shape, px_um, n)
    return {**rec, "skipped": False}


# ----------------------------------------------------------------------------------------------------------------
# the stage: python -m hex.virtual_codex


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hex.virtual_codex", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True,
                   help="output root: reads OUT/hex_pred/*.h5, writes OUT/virtual_codex/")
    p.add_argument("--cohort", type=Path,
                   help="cohort folder: the H&E of each slide id (pairs.csv when present, else he/)")
    p.add_argument("--slides", nargs="+", help="only these slide ids (default: every OUT/hex_pred/*.h5)")
    p.add_argument("--overwrite", action="store_true",
                   help="redo slides whose outputs are done, also with other settings (default: skip them, and stop "
                        "on other settings)")
    p.add_argument("--preview-markers", nargs="+",
                   help=f"markers drawn in the preview (default: those of {' '.join(DEFAULT_PREVIEW_MARKERS)} "
                        "present, else the first 8)")
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS),
                   help="outputs to write (default: all): npy = map + mask, ome = pyramidal OME-TIFF, "
                        "preview = PNG, geojson = QuPath detections")
    p.add_argument("--workers", type=int, default=1, help="slides processed in parallel (processes)")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failing slide")
    return p


def _resolve_he(pred_path: Path, cohort_he: Mapping[str, Path]) -> Path | None:
    """The H&E of a prediction file: the cohort's slide of its id, else its ``he_path`` attr when that file
    exists, else None."""
    sid = pred_path.name.split(".", 1)[0]
    if sid in cohort_he:
        return Path(cohort_he[sid])
    he = read_header(pred_path).get("he_path", "")
    return Path(he) if he and Path(he).exists() else None


def _work(slide_id: str, out: Path, he: dict[str, Path | None], preview_markers: list[str] | None,
          formats: list[str]) -> dict:
    res = write_slide_maps(art.PREDICTIONS.path(out, slide_id), art.VIRTUAL_CODEX.dir(out), he_path=he[slide_id],
                           preview_markers=preview_markers, overwrite=True, formats=formats)
    log.info("%s: %s", slide_id, " ".join(p for ps in res["paths"].values() for p in ps[:1]))
    return res


@dataclass(frozen=True, kw_only=True)
class MapsConfig:
    """One field per flag of ``python -m hex.virtual_codex`` (same names; see its ``--help``)."""

    out: Path
    cohort: Path | None = None
    slides: list[str] | None = None
    overwrite: bool = False
    preview_markers: list[str] | None = None
    formats: list[str] = dataclasses.field(default_factory=lambda: list(FORMATS))
    workers: int = 1
    fail_fast: bool = False


def make_config(args: argparse.Namespace) -> MapsConfig:
    """The flags as a :class:`MapsConfig`; a value out of range is one line naming the flag."""
    cfg = config_from_args(MapsConfig, args, formats=list(args.formats))
    require(cfg.workers >= 1, f"--workers {cfg.workers}: must be >= 1")
    return cfg


def plan(cfg: MapsConfig) -> SlideJob:
    """The slides to map and their H&E, checked before any output folder exists (one line naming the problem);
    then slides done with other settings stop the run before any work."""
    pred_dir, out_dir = art.PREDICTIONS.dir(cfg.out), art.VIRTUAL_CODEX.dir(cfg.out)
    if not pred_dir.is_dir():
        raise PipelineError(f"no predictions folder {pred_dir}; run python -m hex.infer_wsi --out {cfg.out}")
    available = sorted(p.name.split(".", 1)[0] for p in pred_dir.glob("*.h5") if not p.name.startswith("."))
    if not available:
        raise PipelineError(f"no prediction files in {pred_dir}; run python -m hex.infer_wsi --out {cfg.out}")
    slides = select_slides(available, cfg.slides, str(pred_dir))
    cohort_he: dict[str, Path] = {}
    if cfg.cohort is not None:
        require(cfg.cohort.is_dir(), f"--cohort {cfg.cohort}: folder not found")
        cohort_he = resolve_slides(cfg.cohort).he_paths()
    he = {s: _resolve_he(art.PREDICTIONS.path(cfg.out, s), cohort_he) for s in slides}
    if cfg.preview_markers and "preview" in cfg.formats:
        for s in slides:
            markers = read_header(art.PREDICTIONS.path(cfg.out, s)).get("markers")
            if markers is not None:  # else the slide fails with the reason when it is processed
                choose_preview_markers(markers, cfg.preview_markers)
    ensure_writable(out_dir, "output folder", "choose another --out")
    conflicts = {} if cfg.overwrite else map_conflicts(slides, cfg.out, he, cfg.preview_markers)
    if conflicts:
        raise done_mod.conflict_error(conflicts, "virtual codex")
    work = functools.partial(_work, out=cfg.out, he=he, preview_markers=cfg.preview_markers, formats=list(cfg.formats))
    return SlideJob(out_dir, slides, work, config=cfg, overwrite=cfg.overwrite, workers=cfg.workers,
                    fail_fast=cfg.fail_fast, summary=lambda _r: f"maps in {out_dir}",
                    is_done=functools.partial(is_done, out_dir, formats=list(cfg.formats)),
                    extra_config={"schema_version": art.VIRTUAL_CODEX.schema,
                                  "he_resolved": {s: str(p) if p else None for s, p in he.items()}})


STAGE = Stage("virtual codex", build_parser, make_config, plan=plan)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hex.virtual_codex``; returns the exit code (0, 1 some slides failed, 2 bad input, 130 Ctrl-C)."""
    return STAGE.main(argv)
