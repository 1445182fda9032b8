"""Virtual CODEX maps from whole-slide HEX predictions (stage 06, after ``hex.infer_wsi``).

Commands (run from the repository root)::

    # every OUT/hex_pred/*.h5 -> OUT/virtual_codex/ (H&E from the file's he_path attr, else COHORT/he/{slide}.*)
    python -m hex.virtual_codex --out OUT --cohort COHORT
    # two slides, only the map and the OME-TIFF, redo existing outputs
    python -m hex.virtual_codex --out OUT --slides slide_000 slide_001 --formats npy ome --overwrite

Outputs per slide, in ``OUT/virtual_codex/`` (written atomically; ``{slide}.json`` last, so it marks "done"):

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
  PhysicalSizeX/Y = s * mpp µm), see :mod:`hex.map_writers`.
- ``{slide}_preview.png``: H&E thumbnail beside selected markers. ``{slide}.geojson``: tile polygons in level-0 px
  with the M predictions as QuPath detection measurements.
- ``{slide}.json``: markers, s, P, mpp, pixel size, map shape, tile count, source file and checkpoint.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from preprocess.utils import (
    PipelineError,
    atomic_path,
    run_slides,
    save_config,
    select_slides,
    setup_logging,
    write_json,
)

log = logging.getLogger("hex.virtual_codex")

FORMATS = ("npy", "ome", "preview", "geojson")
DEFAULT_PREVIEW_MARKERS = ("Pan-Cytokeratin", "CD8", "CD68", "CD20", "Ki67", "PD-L1", "CD31", "aSMA")
SCHEMA_VERSION = 1


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
# reading predictions


@dataclass
class SlidePrediction:
    """The content of ``hex_pred/{slide}.h5`` that the maps need (level-0 px, µm)."""

    slide_id: str
    coords: np.ndarray  # (N, 2) int64 level-0 top-left x, y
    values: np.ndarray  # (N, M) float32
    markers: list[str]
    patch_size_level0: float
    stride_level0: float
    mpp: float | None
    he_path: Path | None
    checkpoint: str | None
    slide_size: tuple[int, int] | None  # level-0 (width, height) when the file records it


def _attr_str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _slide_size_from_attrs(attrs) -> tuple[int, int] | None:
    for key in ("slide_dimensions", "level0_dimensions", "dimensions"):
        if key in attrs:
            v = np.asarray(attrs[key]).ravel()
            if v.size == 2:
                return int(v[0]), int(v[1])
    if "slide_width" in attrs and "slide_height" in attrs:
        return int(attrs["slide_width"]), int(attrs["slide_height"])
    return None


def read_prediction(path: str | Path) -> SlidePrediction:
    """Read a ``hex_pred/{slide}.h5`` file; a missing dataset or attribute is a :class:`PipelineError` naming it."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise PipelineError(f"prediction file not found: {path} (run python -m hex.infer_wsi first)")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise PipelineError(f"cannot read the prediction file {path} ({e}); rerun hex.infer_wsi for it") from e
    with f:
        for key in ("coords", "codex_prediction"):
            if key not in f:
                raise PipelineError(f"{path} has no '{key}' dataset; it is not a hex.infer_wsi file (rerun it)")
        a = f.attrs
        for key in ("markers", "patch_size_level0"):
            if key not in a:
                raise PipelineError(f"{path} lacks the attribute '{key}'; rerun hex.infer_wsi for this slide")
        coords = np.asarray(f["coords"][:], dtype=np.int64).reshape(-1, 2)
        values = np.asarray(f["codex_prediction"][:], dtype=np.float32)
        markers = [_attr_str(m) for m in np.asarray(a["markers"]).ravel()]
        if values.ndim != 2 or values.shape != (len(coords), len(markers)):
            raise PipelineError(f"{path}: codex_prediction is {values.shape}, expected ({len(coords)}, "
                                f"{len(markers)}) (tiles x markers); rerun hex.infer_wsi for this slide")
        patch = float(a["patch_size_level0"])
        stride = float(a["stride_level0"]) if "stride_level0" in a else patch
        he = _attr_str(a["he_path"]) if "he_path" in a and _attr_str(a["he_path"]) else None
        return SlidePrediction(
            slide_id=_attr_str(a["slide_id"]) if "slide_id" in a else path.name.split(".", 1)[0],
            coords=coords, values=values, markers=markers, patch_size_level0=patch, stride_level0=stride,
            mpp=float(a["mpp"]) if "mpp" in a else None, he_path=Path(he) if he else None,
            checkpoint=_attr_str(a["checkpoint"]) if "checkpoint" in a else None,
            slide_size=_slide_size_from_attrs(a))


# ----------------------------------------------------------------------------------------------------------------
# one slide


def output_paths(out_dir: str | Path, slide_id: str) -> dict[str, list[Path]]:
    """Files each format writes for one slide (``npy`` includes the mask), plus ``record`` (the done marker)."""
    d = Path(out_dir)
    return {"npy": [d / f"{slide_id}.npy", d / f"{slide_id}_mask.png"], "ome": [d / f"{slide_id}.ome.tif"],
            "preview": [d / f"{slide_id}_preview.png"], "geojson": [d / f"{slide_id}.geojson"],
            "record": [d / f"{slide_id}.json"]}


def _source_stamp(path: Path) -> list[int] | None:
    """(size, mtime_ns) of a prediction file: a record made from another version of it is stale."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _read_record(out_dir: str | Path, slide_id: str) -> dict | None:
    rec = output_paths(out_dir, slide_id)["record"][0]
    try:
        return json.loads(rec.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _valid_formats(rec: dict | None, out_dir: str | Path, slide_id: str) -> set[str]:
    """Formats of a record whose files exist, when the record was made from the current prediction file."""
    if not rec or rec.get("source_stamp") != _source_stamp(Path(rec.get("source", ""))):
        return set()
    paths = output_paths(out_dir, slide_id)
    return {f for f in rec.get("formats", []) if f in FORMATS and all(p.exists() for p in paths[f])}


def is_done(out_dir: str | Path, slide_id: str, formats: Sequence[str] = FORMATS) -> bool:
    """True when the slide's record (``{slide}.json``) lists every format of ``formats``, their files exist and
    the prediction file it was made from is unchanged (same size and mtime)."""
    return set(formats) <= _valid_formats(_read_record(out_dir, slide_id), out_dir, slide_id)


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def choose_preview_markers(markers: Sequence[str], wanted: Sequence[str] | None) -> list[str]:
    """``wanted`` matched to ``markers`` (case/punctuation ignored; an unknown name is a :class:`PipelineError`),
    else the informative defaults present, else the first 8."""
    by = {_norm(m): m for m in markers}
    if wanted:
        unknown = [w for w in wanted if _norm(w) not in by]
        if unknown:
            raise PipelineError(f"--preview-markers {unknown} are not among the predicted markers {list(markers)}")
        return [by[_norm(w)] for w in wanted]
    chosen = [by[_norm(w)] for w in DEFAULT_PREVIEW_MARKERS if _norm(w) in by]
    return chosen or list(markers[:8])


def write_slide_maps(pred_path: Path, out_dir: Path, he_path: Path | None = None,
                     preview_markers: Sequence[str] | None = None, overwrite: bool = False,
                     formats: Sequence[str] = FORMATS) -> dict:
    """Build the virtual CODEX outputs of one ``hex_pred/{slide}.h5`` into ``out_dir`` (the ``virtual_codex/``
    folder).

    Args:
        pred_path: the prediction file. he_path: the H&E slide (default: the file's ``he_path`` attr when that file
            exists); it gives the canvas size and the preview thumbnail, and without it the canvas is the tiles'
            extent. preview_markers: marker names for the preview (default :data:`DEFAULT_PREVIEW_MARKERS`).
        overwrite: redo a slide whose outputs exist (else it is skipped). formats: subset of :data:`FORMATS`.

    Returns ``{"slide", "shape" (H', W', M), "pixel_size_um", "stride_level0", "n_tiles", "paths" {fmt: [str]},
    "skipped"}``. A slide with no tiles writes an all-zero map and an empty FeatureCollection, with a warning.
    """
    from hex.map_writers import write_geojson, write_ome_pyramid, write_preview

    pred_path, out_dir = Path(pred_path), Path(out_dir)
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise PipelineError(f"unknown formats {bad}; choose from {list(FORMATS)}")
    pred = read_prediction(pred_path)
    sid = pred.slide_id
    paths = output_paths(out_dir, sid)
    previous = _read_record(out_dir, sid)
    valid = _valid_formats(previous, out_dir, sid)
    if not overwrite and set(formats) <= valid:
        return {**previous, "skipped": True}
    kept = valid - set(formats)  # other formats, still from this same file
    shown = choose_preview_markers(pred.markers, preview_markers) if "preview" in formats else []
    if he_path is None and pred.he_path is not None:
        if pred.he_path.exists():
            he_path = pred.he_path
        else:
            log.warning("%s: the H&E %s named in %s does not exist; canvas = tiles' extent, no thumbnail",
                        sid, pred.he_path, pred_path)
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
    rec = {"schema_version": SCHEMA_VERSION, "slide": sid, "shape": list(vmap.shape), "markers": pred.markers,
           "stride_level0": s, "patch_size_level0": pred.patch_size_level0, "mpp": mpp, "pixel_size_um": px_um,
           "n_tiles": n, "tissue_pixels": int(mask.sum()), "slide_size_level0": list(size) if size else None,
           "source": str(pred_path.resolve()), "source_stamp": _source_stamp(pred_path),
           "he_path": str(he_path) if he_path else None, "checkpoint": pred.checkpoint,
           "formats": [f for f in FORMATS if f in kept or f in formats],
           "paths": {f: [str(p) for p in paths[f]] for f in FORMATS if f in kept or f in formats}}
    write_json(paths["record"][0], rec)
    log.info("%s: map %dx%dx%d (pixel %.3g µm), %d tiles", sid, *vmap.shape, px_um, n)
    return {**rec, "skipped": False}


# ----------------------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hex.virtual_codex", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True,
                   help="output root: reads OUT/hex_pred/*.h5, writes OUT/virtual_codex/")
    p.add_argument("--cohort", type=Path,
                   help="cohort folder; COHORT/he/{slide}.* is the H&E when the prediction's he_path is missing")
    p.add_argument("--slides", nargs="+", help="only these slide ids (default: every OUT/hex_pred/*.h5)")
    p.add_argument("--overwrite", action="store_true", help="redo slides whose outputs exist (default: skip them)")
    p.add_argument("--preview-markers", nargs="+",
                   help=f"markers drawn in the preview (default: those of {' '.join(DEFAULT_PREVIEW_MARKERS)} "
                        "present, else the first 8)")
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS),
                   help="outputs to write (default: all): npy = map + mask, ome = pyramidal OME-TIFF, "
                        "preview = PNG, geojson = QuPath detections")
    p.add_argument("--workers", type=int, default=1, help="slides processed in parallel (processes)")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failing slide")
    return p


def _resolve_he(pred_path: Path, cohort_he: dict[str, Path]) -> Path | None:
    """The H&E of a prediction file: its ``he_path`` attr when that file exists, else the cohort's slide."""
    import h5py

    sid = pred_path.name.split(".", 1)[0]
    try:
        with h5py.File(pred_path, "r") as f:
            he = _attr_str(f.attrs["he_path"]) if "he_path" in f.attrs else ""
    except OSError:
        return cohort_he.get(sid)  # write_slide_maps reports the unreadable file
    if he and Path(he).exists():
        return Path(he)
    return cohort_he.get(sid)


def _work(slide_id: str, pred_dir: Path, out_dir: Path, cohort_he: dict[str, Path],
          preview_markers: list[str] | None, formats: list[str]) -> dict:
    pred = pred_dir / f"{slide_id}.h5"
    return write_slide_maps(pred, out_dir, he_path=_resolve_he(pred, cohort_he), preview_markers=preview_markers,
                            overwrite=True, formats=formats)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    pred_dir, out_dir = args.out / "hex_pred", args.out / "virtual_codex"
    setup_logging(out_dir / "run.log")
    try:
        if not pred_dir.is_dir():
            raise PipelineError(f"no predictions folder {pred_dir}; run python -m hex.infer_wsi --out {args.out}")
        available = sorted(p.name.split(".", 1)[0] for p in pred_dir.glob("*.h5") if not p.name.startswith("."))
        if not available:
            raise PipelineError(f"no prediction files in {pred_dir}; run python -m hex.infer_wsi --out {args.out}")
        slides = select_slides(available, args.slides, str(pred_dir))
        cohort_he: dict[str, Path] = {}
        if args.cohort is not None:
            from preprocess.slide_io import list_he_slides

            cohort_he = list_he_slides(args.cohort / "he")
    except PipelineError as e:
        log.error("%s", e)
        return 2
    save_config(out_dir, vars(args) | {"slides_resolved": slides, "schema_version": SCHEMA_VERSION})
    work = functools.partial(_work, pred_dir=pred_dir, out_dir=out_dir, cohort_he=cohort_he,
                             preview_markers=args.preview_markers, formats=list(args.formats))
    try:
        report = run_slides(slides, work, functools.partial(is_done, out_dir, formats=list(args.formats)),
                            overwrite=args.overwrite, workers=args.workers, skip_errors=not args.fail_fast,
                            desc="virtual codex")
    except PipelineError as e:  # --fail-fast
        log.error("%s", e)
        return 1
    for sid in report.done:
        r = report.results[sid]
        log.info("%s: %s", sid, " ".join(p for ps in r["paths"].values() for p in ps[:1]))
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
