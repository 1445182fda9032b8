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
  PhysicalSizeX/Y = s * mpp µm), see :mod:`hex.map_writers`.
- ``{slide}_preview.png``: H&E thumbnail beside selected markers. ``{slide}.geojson``: tile polygons in level-0 px
  with the M predictions as QuPath detection measurements.
- ``{slide}.json``: markers, s, P, mpp, pixel size, map shape, tile count, source file and checkpoint.

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
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from hex.map_writers import DEFAULT_PREVIEW_MARKERS, choose_preview_markers
from hex.prediction_maps import (
    SlidePrediction,
    _attr_str,
    accumulate_map,
    coverage_ranges,
    read_prediction,
)
from pipeline import done as done_mod
from pipeline.cohort import select_slides
from pipeline.errors import PipelineError
from pipeline.io import atomic_path, ensure_writable, remove_outputs, save_config, write_json
from pipeline.logs import setup_logging
from pipeline.runner import run_slides

log = logging.getLogger("hex.virtual_codex")

__all__ = ["DEFAULT_PREVIEW_MARKERS", "FORMATS", "SlidePrediction", "accumulate_map", "choose_preview_markers",
           "coverage_ranges", "is_done", "main", "map_conflicts", "read_prediction", "write_slide_maps"]

FORMATS = ("npy", "ome", "preview", "geojson")
SCHEMA_VERSION = 2  # 2: done-records in virtual_codex/done/ (1: {slide}.json alone marked done)


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
                             SCHEMA_VERSION, inputs=functools.partial(_inputs, pred=dict(pred), he=dict(he)),
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
    if not rec or rec.get("schema") != SCHEMA_VERSION or not output_paths(out_dir, slide_id)["record"][0].exists():
        return False
    for stamp in rec.get("inputs", {}).values():
        now = done_mod.file_stamp(stamp.get("path", ""))
        if (now["size"], now["mtime_ns"]) != (stamp.get("size"), stamp.get("mtime_ns")):
            return False
    return set(formats) <= _done_formats(rec, out_dir, slide_id)


def map_conflicts(slides: Sequence[str], pred_dir: Path, out_dir: Path, he: Mapping[str, Path | None],
                  preview_markers: Sequence[str] | None) -> dict[str, str]:
    """{slide: diff} of the slides whose maps were done with another preview-marker choice or other input files
    (checked before any work; :func:`pipeline.done.conflict_error` makes the one-line error)."""
    spec = map_spec(out_dir, preview_markers, {s: Path(pred_dir) / f"{s}.h5" for s in slides}, he)
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
    from hex.map_writers import write_geojson, write_ome_pyramid, write_preview

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
    rec = {"schema_version": SCHEMA_VERSION, "slide": sid, "shape": list(vmap.shape), "markers": pred.markers,
           "stride_level0": s, "patch_size_level0": pred.patch_size_level0, "mpp": mpp, "pixel_size_um": px_um,
           "n_tiles": n, "tissue_pixels": int(mask.sum()), "slide_size_level0": list(size) if size else None,
           "source": str(pred_path.resolve()), "he_path": str(he_path) if he_path else None,
           "checkpoint": pred.checkpoint, "formats": made, "paths": {f: [str(p) for p in paths[f]] for f in made}}
    write_json(paths["record"][0], rec)
    files = [p for f in made for p in paths[f]] + paths["record"]
    done_mod.write_record(dataclasses.replace(spec, outputs=lambda _s: files), sid, stamps)
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
    import h5py

    sid = pred_path.name.split(".", 1)[0]
    if sid in cohort_he:
        return Path(cohort_he[sid])
    try:
        with h5py.File(pred_path, "r") as f:
            he = _attr_str(f.attrs["he_path"]) if "he_path" in f.attrs else ""
    except OSError:
        return None  # write_slide_maps reports the unreadable file
    return Path(he) if he and Path(he).exists() else None


def _pred_markers(pred_path: Path) -> list[str] | None:
    import h5py

    try:
        with h5py.File(pred_path, "r") as f:
            return [_attr_str(m) for m in np.asarray(f.attrs["markers"]).ravel()]
    except (OSError, KeyError):
        return None  # the slide fails with the reason when it is processed


def _work(slide_id: str, pred_dir: Path, out_dir: Path, he: dict[str, Path | None],
          preview_markers: list[str] | None, formats: list[str]) -> dict:
    return write_slide_maps(pred_dir / f"{slide_id}.h5", out_dir, he_path=he[slide_id],
                            preview_markers=preview_markers, overwrite=True, formats=formats)


def _check_inputs(args: argparse.Namespace) -> tuple[list[str], dict[str, Path | None]]:
    """The slides to map and their H&E (before any output folder exists); one line naming the problem."""
    pred_dir = args.out / "hex_pred"
    if args.workers < 1:
        raise PipelineError(f"--workers {args.workers}: must be >= 1")
    if not pred_dir.is_dir():
        raise PipelineError(f"no predictions folder {pred_dir}; run python -m hex.infer_wsi --out {args.out}")
    available = sorted(p.name.split(".", 1)[0] for p in pred_dir.glob("*.h5") if not p.name.startswith("."))
    if not available:
        raise PipelineError(f"no prediction files in {pred_dir}; run python -m hex.infer_wsi --out {args.out}")
    slides = select_slides(available, args.slides, str(pred_dir))
    cohort_he: dict[str, Path] = {}
    if args.cohort is not None:
        from pipeline.cohort import resolve_slides

        if not args.cohort.is_dir():
            raise PipelineError(f"--cohort {args.cohort}: folder not found")
        cohort_he = resolve_slides(args.cohort).he_paths()
    he = {s: _resolve_he(pred_dir / f"{s}.h5", cohort_he) for s in slides}
    if args.preview_markers and "preview" in args.formats:
        for s in slides:
            markers = _pred_markers(pred_dir / f"{s}.h5")
            if markers is not None:
                choose_preview_markers(markers, args.preview_markers)
    return slides, he


def main(argv: list[str] | None = None) -> int:
    from pipeline.logs import close_log_file

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0), a bad flag (2: argparse printed the usage)
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    pred_dir, out_dir = args.out / "hex_pred", args.out / "virtual_codex"
    try:
        slides, he = _check_inputs(args)
        ensure_writable(out_dir, "output folder", "choose another --out")
    except PipelineError as e:
        setup_logging(None)
        log.error("%s", e)
        return 2
    setup_logging(out_dir / "run.log")
    try:
        conflicts = {} if args.overwrite else map_conflicts(slides, pred_dir, out_dir, he, args.preview_markers)
        if conflicts:
            raise done_mod.conflict_error(conflicts, "virtual codex")
        save_config(out_dir, vars(args) | {"slides_resolved": slides, "schema_version": SCHEMA_VERSION,
                                           "he_resolved": {s: str(p) if p else None for s, p in he.items()}})
        work = functools.partial(_work, pred_dir=pred_dir, out_dir=out_dir, he=he,
                                 preview_markers=args.preview_markers, formats=list(args.formats))
        try:
            report = run_slides(slides, work, functools.partial(is_done, out_dir, formats=list(args.formats)),
                                overwrite=args.overwrite, workers=args.workers, skip_errors=not args.fail_fast,
                                desc="virtual codex")
        except PipelineError as e:  # --fail-fast
            log.error("virtual codex: stopped at the first failure (--fail-fast): %s", e)
            return 1
        for sid in report.done:
            r = report.results[sid]
            log.info("%s: %s", sid, " ".join(p for ps in r["paths"].values() for p in ps[:1]))
        return report.finish("virtual codex", f"maps in {out_dir}")
    except PipelineError as e:
        log.error("%s", e)
        return 2
    finally:
        close_log_file(out_dir / "run.log")


if __name__ == "__main__":
    sys.exit(main())
