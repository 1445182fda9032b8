"""Stage 01: tissue mask and a non-overlapping grid of 224 px patches at 0.5 µm/px for every H&E slide.

    python -m preprocess.patch --cohort sample_cohort --out outputs --workers 2
    python -m preprocess.patch --he /data/slides --out outputs --mpp 0.25 --min-tissue 0.6 --slides s1 s2

Writes, per slide (paths relative to ``--out``):
    patches/{slide}.h5          dataset ``coords`` (N, 2) int64 = level-0 top-left (x, y) of every kept patch, in
                                row-major grid order; ``tissue_fraction`` (N,) float32. Attributes (on the file and
                                on ``coords``, CLAM/TRIDENT style): ``patch_size`` (output px, 224), ``patch_level``
                                (pyramid level to read), ``patch_size_level0`` (level-0 px), ``read_size_at_level``
                                (px read at ``patch_level`` before resizing to ``patch_size``), ``level_downsample``,
                                ``mpp`` (target µm/px, 0.5), ``level0_mpp``, ``schema_version``.
    patches/{slide}_tissue.png  QC thumbnail: tissue contour (green) and kept patches (blue).
    patches/{slide}_qc.png      artefact QC: the thumbnail with each excluded cause coloured (ink magenta, fold orange,
                                bubble cyan, blur yellow), kept patches (blue).
    patches/{slide}_qc.csv      cause,fraction_of_tissue: the share of the tissue mask each cause excluded (+ total).
    patches/qc_summary.csv      slide,ink,fold,bubble,blur,total,patches: the slides' QC tables in one (end of run).
    patches/done/{slide}.json   done-record: the settings, the H&E file (size, mtime) and the schema that made the
                                slide (``{slide}.failed.json``: why it failed); see :mod:`pipeline.done`.
    patches/config.json, patches/run.log

Slides: ``--he`` files or folders, else ``COHORT/pairs.csv``, else ``COHORT/he/`` (:func:`pipeline.cohort.
resolve_slides`: the id is the file name as written, up to its first dot; a link keeps its own name). A slide done
with these settings and this H&E file is skipped; a changed H&E file is redone; a slide done with other settings
stops the run before any work ("done with other settings: min_tissue 0.5 -> 0.3 ...; pass --overwrite").
Level-0 µm/px: the slide's metadata, or ``--mpp`` for every slide; a slide's row of ``--pixel-sizes`` (default
``COHORT/pixel_sizes.csv`` when it exists; :mod:`preprocess.pixel_sizes`) wins over both, and is recorded as that
slide's ``mpp`` setting in its done-record.

Geometry: patch_size_level0 = round(patch_size * target_mpp / level0_mpp) (0.25 µm/px -> 448); the grid starts at
level-0 pixel (0, 0) with step patch_size_level0 and holds only patches fully inside the slide; a patch is kept
when the fraction of its area covered by the tissue mask, less the excluded artefacts, is >= ``--min-tissue`` and
at most ``--max-artefact`` of it is excluded artefact. The level to read is the coarsest whose downsample does not
exceed patch_size_level0 / patch_size.

Artefacts (:func:`preprocess.tissue.slide_artefacts`, measures relative to the slide's own tissue on a QC image at
``--qc-mpp``): pen ink (OD colour outside the H&E cone), folds and dark debris (OD above 2x the tissue median), air
bubbles (thin dark grey rings, filled, and grey tissue), out-of-focus regions (high-frequency share of the detail
energy under 0.6 x the tissue median). ``--no-ink``, ``--no-folds``, ``--no-bubbles``, ``--no-blur`` switch each off.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import artifacts as art
from pipeline.cli import SlideJob, Stage, config_from_args, require
from pipeline.cohort import resolve_slides, select_slides
from pipeline.done import DoneSpec
from pipeline.errors import PipelineError
from pipeline.io import atomic_path
from pipeline.runner import StageReport, shard_file_name, shard_slides
from preprocess.pixel_sizes import PixelSizes, add_pixel_sizes_arg, resolve_pixel_sizes
from preprocess.pyramid import MPP_TOLERANCE, choose_level, same_mpp
from preprocess.slide_io import HESlide
from preprocess.tissue import (
    ARTEFACT_CAUSES,
    QC_COLOURS,
    ArtefactParams,
    TissueParams,
    grid_tissue_mask,
    patch_tissue_fraction,
    slide_artefacts,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = art.PATCH_GRID.schema


@dataclass(frozen=True)
class GridGeometry:
    """Patch geometry of one slide.

    Attributes:
        patch_size: output patch side in px at ``target_mpp`` (224).
        target_mpp: µm per output pixel (0.5 = 20x).
        level0_mpp: µm per level-0 pixel of the slide.
        patch_size_level0: patch side in level-0 px, round(patch_size * target_mpp / level0_mpp).
        patch_level: pyramid level to read from.
        level_downsample: downsample of ``patch_level`` (level-0 px per level px).
        read_size_at_level: px read at ``patch_level``, round(patch_size_level0 / level_downsample); resized to
            ``patch_size`` when different.
    """

    patch_size: int
    target_mpp: float
    level0_mpp: float
    patch_size_level0: int
    patch_level: int
    level_downsample: float
    read_size_at_level: int

    @property
    def patch_mpp(self) -> float:
        """µm per output pixel as read (``target_mpp`` up to the 1% tolerance, e.g. 0.502 for an Aperio slide)."""
        return self.patch_size_level0 * self.level0_mpp / self.patch_size

    def attrs(self) -> dict:
        """HDF5 attributes of a grid / patch-store file."""
        return {
            "patch_size": self.patch_size,
            "patch_level": self.patch_level,
            "patch_size_level0": self.patch_size_level0,
            "read_size_at_level": self.read_size_at_level,
            "level_downsample": self.level_downsample,
            "mpp": self.target_mpp,
            "patch_mpp": self.patch_mpp,
            "level0_mpp": self.level0_mpp,
            "schema_version": SCHEMA_VERSION,
            "coords_units": "level-0 pixels, top-left (x, y)",
        }


def grid_geometry(slide: HESlide, patch_size: int = 224, target_mpp: float = 0.5,
                  tol: float = MPP_TOLERANCE) -> GridGeometry:
    """Patch geometry of ``slide`` from its own level-0 mpp (see :class:`GridGeometry`).

    The read level is :func:`preprocess.pyramid.choose_level`'s (the coarsest level not coarser than
    ``target_mpp``). When that level's pixel size is within ``tol`` of ``target_mpp`` (an Aperio 0.502 µm/px
    slide for 0.5 µm/px), ``patch_size`` px are read there as they are (no resampling) and the level-0 side is
    ``patch_size`` x the level downsample; otherwise the level-0 side is round(patch_size * target_mpp / mpp).
    """
    level, _ = choose_level(slide.level_downsamples, slide.mpp, target_mpp, tol)
    ds = slide.level_downsamples[level]
    if same_mpp(slide.mpp * ds, target_mpp, tol):
        ps0, read = int(round(patch_size * ds)), int(patch_size)
    else:
        ps0 = int(round(patch_size * target_mpp / slide.mpp))
        read = max(1, int(round(ps0 / ds)))
    if ps0 < 1:
        raise PipelineError(f"{slide.path}: patch of {patch_size} px at {target_mpp} µm/px is < 1 level-0 px "
                            f"at {slide.mpp} µm/px; check --mpp")
    return GridGeometry(patch_size=int(patch_size), target_mpp=float(target_mpp), level0_mpp=float(slide.mpp),
                        patch_size_level0=ps0, patch_level=int(level), level_downsample=float(ds),
                        read_size_at_level=read)


def full_grid(width: int, height: int, size_level0: int, step_level0: int | None = None) -> np.ndarray:
    """Top-left (x, y) of all patches of side ``size_level0`` fully inside a (width, height) level-0 image at
    x, y = 0, step, 2 step, ... (step = ``step_level0``, default the patch side: non-overlapping), row-major:
    (N, 2) int64."""
    step = int(step_level0 or size_level0)
    xs = np.arange(0, width - size_level0 + 1, step, dtype=np.int64)
    ys = np.arange(0, height - size_level0 + 1, step, dtype=np.int64)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


def read_grid(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Read a grid file ``patches/{slide}.h5`` -> (coords (N, 2) int64, attrs dict)."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise PipelineError(f"patch grid not found: {path}; run `python -m preprocess.patch` first")
    with h5py.File(path, "r") as f:
        if "coords" not in f:
            raise PipelineError(f"patch grid {path} has no 'coords' dataset")
        coords = f["coords"][:].astype(np.int64)
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
    for key in ("patch_size", "patch_level", "patch_size_level0"):
        if key not in attrs:
            raise PipelineError(f"patch grid {path} lacks the attribute {key!r}")
    return coords, attrs


def read_tissue_fraction(path: str | os.PathLike, n: int) -> np.ndarray:
    """Per-patch H&E tissue fraction of a grid file, (n,) float64 in [0, 1] (ones for a grid written without it)."""
    import h5py

    with h5py.File(path, "r") as f:
        return f["tissue_fraction"][:].astype(np.float64) if "tissue_fraction" in f else np.ones(n)


def _qc_image(thumb: np.ndarray, mask: np.ndarray, coords: np.ndarray, ds: float, ps0: int) -> np.ndarray:
    import cv2

    img = np.ascontiguousarray(thumb[..., :3][..., ::-1])  # BGR for OpenCV
    overlay = img.copy()
    for x, y in coords:
        p0 = (int(round(x / ds)), int(round(y / ds)))
        p1 = (int(round((x + ps0) / ds)) - 1, int(round((y + ps0) / ds)) - 1)
        cv2.rectangle(overlay, p0, p1, (200, 80, 0), 1)
    img = cv2.addWeighted(overlay, 0.6, img, 0.4, 0)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(img, contours, -1, (0, 200, 0), 2)
    return img


@dataclass(frozen=True)
class PatchConfig:
    """Stage 01's settings: the flags of ``python -m preprocess.patch`` (same names). A slide's job reads the grid
    and tissue ones; ``mpp`` is the slide's level-0 µm/px override (``--mpp``, or its row of ``--pixel-sizes``)."""

    out: Path
    patch_size: int = 224
    target_mpp: float = 0.5
    min_tissue: float = 0.5
    mpp: float | None = None
    thumb_size: int = 2048
    sat_threshold: float | None = TissueParams.sat_threshold
    min_saturation: float = TissueParams.min_saturation
    median_um: float = TissueParams.median_um
    close_um: float = TissueParams.close_um
    min_area_um2: float = TissueParams.min_area_um2
    max_hole_um2: float = TissueParams.max_hole_um2
    no_ink: bool = False
    no_folds: bool = False
    no_bubbles: bool = False
    no_blur: bool = False
    qc_mpp: float = ArtefactParams.qc_mpp
    max_artefact: float = ArtefactParams.max_artefact
    cohort: Path | None = None
    he: list[Path] | None = None
    slides: list[str] | None = None
    pixel_sizes: Path | None = None
    overwrite: bool = False
    workers: int = 1
    fail_fast: bool = False
    shard: str | None = None

    @property
    def tissue(self) -> TissueParams:
        """The tissue-mask thresholds (:class:`preprocess.tissue.TissueParams`)."""
        return TissueParams(sat_threshold=self.sat_threshold, min_saturation=self.min_saturation,
                            median_um=self.median_um, close_um=self.close_um, min_area_um2=self.min_area_um2,
                            max_hole_um2=self.max_hole_um2)

    @property
    def artefacts(self) -> ArtefactParams:
        """The artefact exclusion (:class:`preprocess.tissue.ArtefactParams`)."""
        return ArtefactParams(ink=not self.no_ink, folds=not self.no_folds, bubbles=not self.no_bubbles,
                              blur=not self.no_blur, qc_mpp=self.qc_mpp, max_artefact=self.max_artefact)


def check_fits_one_patch(slide: HESlide, geom: GridGeometry) -> None:
    """Raise :class:`PipelineError` (one line naming the file) when the slide is smaller than one patch."""
    w0, h0 = slide.dimensions
    if min(w0, h0) < geom.patch_size_level0:
        raise PipelineError(
            f"slide {slide.path} is {w0} x {h0} px at level 0 ({slide.mpp:g} µm/px), smaller than one "
            f"{geom.patch_size} px patch at {geom.target_mpp:g} µm/px ({geom.patch_size_level0} level-0 px); check "
            "its µm/px (--mpp, --pixel-sizes) or leave it out"
        )


def patch_slide(slide_id: str, he_path: str | os.PathLike, cfg: PatchConfig) -> dict:
    """Segment tissue, build the grid and write ``patches/{slide}.h5`` + ``patches/{slide}_tissue.png``.

    Returns a summary dict (number of patches, tissue threshold, geometry). Raises :class:`PipelineError` when
    the slide has no tissue or no patch reaches ``min_tissue``.
    """
    import cv2
    import h5py

    with HESlide(he_path, mpp=cfg.mpp) as slide:
        geom = grid_geometry(slide, cfg.patch_size, cfg.target_mpp)
        check_fits_one_patch(slide, geom)
        thumb, ds = slide.thumbnail(cfg.thumb_size)
        mask, thr = grid_tissue_mask(thumb, slide.mpp * ds, cfg.tissue)
        if not mask.any():
            raise PipelineError(
                f"no tissue found in {slide.path} (saturation threshold {thr:.3f}); lower --min-saturation / "
                "--sat-threshold or --min-area-um2 if the stain is faint, or check the slide is not blank"
            )
        w0, h0 = slide.dimensions
        grid = full_grid(w0, h0, geom.patch_size_level0)
        causes = slide_artefacts(slide, thumb, ds, mask, cfg.artefacts)
        excluded = np.zeros_like(mask)
        for m in causes.values():
            excluded |= m
        frac = patch_tissue_fraction(mask & ~excluded, ds, grid, geom.patch_size_level0)
        keep = (frac >= cfg.min_tissue) & (
            patch_tissue_fraction(excluded, ds, grid, geom.patch_size_level0) <= cfg.max_artefact)
        coords, frac = grid[keep], frac[keep].astype(np.float32)
        if len(coords) == 0:
            raise PipelineError(
                f"{slide.path}: tissue found ({mask.mean():.1%} of the thumbnail) but no {geom.patch_size_level0} "
                f"px patch has a tissue fraction >= --min-tissue {cfg.min_tissue}"
                + (f" once artefacts ({excluded.mean():.1%}) are excluded; lower --min-tissue, raise --max-artefact "
                   "or switch a cause off (--no-ink, --no-folds, --no-bubbles, --no-blur; see the QC figure)"
                   if excluded.any() else "; lower --min-tissue")
            )
        attrs = geom.attrs() | {"min_tissue": cfg.min_tissue, "tissue_threshold": thr, "slide_id": slide_id,
                                "he_path": str(slide.path), "level_dimensions": np.asarray(slide.level_dimensions)}
        grid_file, qc_file, art_png, art_csv = art.PATCH_GRID.files(cfg.out, slide_id)
        with atomic_path(grid_file) as tmp, h5py.File(tmp, "w") as f:
            dset = f.create_dataset("coords", data=coords.astype(np.int64))
            f.create_dataset("tissue_fraction", data=frac)
            for k, v in attrs.items():
                f.attrs[k] = v
                dset.attrs[k] = v
        qc = _qc_image(thumb, mask, coords, ds, geom.patch_size_level0)
        with atomic_path(qc_file) as tmp:
            if not cv2.imwrite(str(tmp), qc):
                raise OSError(f"could not write {tmp}")
        fractions = write_qc(art_png, art_csv, thumb, mask, causes, coords, ds, geom.patch_size_level0)
    log.info("%s: %d patches (%d px at level %d, level-0 %d px), tissue threshold %.3f", slide_id, len(coords),
             geom.read_size_at_level, geom.patch_level, geom.patch_size_level0, thr)
    return {"patches": int(len(coords)), "tissue_threshold": thr, "patch_size_level0": geom.patch_size_level0,
            "patch_level": geom.patch_level, "excluded": fractions}


def write_qc(png: Path, csv_path: Path, thumb: np.ndarray, mask: np.ndarray, causes: dict[str, np.ndarray],
             coords: np.ndarray, ds: float, ps0: int) -> dict[str, float]:
    """Write the artefact QC figure and table of one slide; returns ``{cause: fraction_of_tissue, "total": ...}``.

    ``causes``: thumbnail-grid bool masks (:func:`preprocess.tissue.slide_artefacts`); a fraction is the cause's
    area inside the tissue mask over the tissue mask's area.
    """
    import cv2

    n = max(int(mask.sum()), 1)
    fr = {c: float((causes[c] & mask).sum()) / n for c in ARTEFACT_CAUSES}
    total = np.zeros_like(mask)
    for c in ARTEFACT_CAUSES:
        total |= causes[c]
    fr["total"] = float((total & mask).sum()) / n
    img = thumb[..., :3].astype(np.float32).copy()
    for c in ARTEFACT_CAUSES:
        m = causes[c]
        img[m] = 0.45 * img[m] + 0.55 * np.asarray(QC_COLOURS[c], np.float32)
    bgr = np.ascontiguousarray(img.round().astype(np.uint8)[..., ::-1])
    for x, y in coords:
        p0 = (int(round(x / ds)), int(round(y / ds)))
        p1 = (int(round((x + ps0) / ds)) - 1, int(round((y + ps0) / ds)) - 1)
        cv2.rectangle(bgr, p0, p1, (200, 80, 0), 1)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(bgr, contours, -1, (0, 200, 0), 1)
    with atomic_path(png) as tmp:
        if not cv2.imwrite(str(tmp), bgr):
            raise OSError(f"could not write {tmp}")
    with atomic_path(csv_path) as tmp:
        Path(tmp).write_text("cause,fraction_of_tissue\n" + "".join(f"{c},{v:.6f}\n" for c, v in fr.items()))
    return fr


def write_qc_summary(out_dir: Path, slides: list[str], path: Path) -> int:
    """``patches/qc_summary.csv``: one row per slide with a QC table (slide,ink,fold,bubble,blur,total,patches);
    returns the number of rows."""
    import csv

    import h5py

    rows: list[list[str]] = []
    for s in sorted(slides):
        table = out_dir / f"{s}_qc.csv"
        if not table.exists():
            continue
        with open(table, newline="") as f:
            fr = {r["cause"]: r["fraction_of_tissue"] for r in csv.DictReader(f)}
        n = ""
        grid = art.PATCH_GRID.path(out_dir.parent, s)
        if grid.exists():
            with h5py.File(grid, "r") as h:
                n = str(len(h["coords"]))
        rows.append([s, *(fr.get(c, "") for c in (*ARTEFACT_CAUSES, "total")), n])
    text = ",".join(["slide", *ARTEFACT_CAUSES, "total", "patches"]) + "\n" + "".join(
        ",".join(r) + "\n" for r in rows)
    if not (path.exists() and path.read_text() == text):  # a rerun that changes nothing leaves the file alone
        with atomic_path(path) as tmp:
            Path(tmp).write_text(text)
    return len(rows)


def _work(slide_id: str, he_paths: dict[str, Path], cfg: PatchConfig, sizes: PixelSizes) -> dict:
    return patch_slide(slide_id, he_paths[slide_id], dataclasses.replace(cfg, mpp=sizes.he_mpp(slide_id)))


def outputs(slide_id: str, out: Path) -> list[Path]:
    """The files stage 01 writes for one slide (``patches/{slide}.h5`` and its tissue QC figure)."""
    return art.PATCH_GRID.files(out, slide_id)


def he_input(slide_id: str, he_paths: dict[str, Path]) -> dict[str, Path]:
    """The done-record inputs of a slide for the H&E stages: ``{"he": the H&E file as written}``."""
    return {"he": he_paths[slide_id]}


def he_mpp_setting(slide_id: str, sizes: PixelSizes) -> dict[str, float | None]:
    """The per-slide done-record setting of the H&E stages: ``{"mpp": the slide's level-0 µm/px override}``."""
    return {"mpp": sizes.he_mpp(slide_id)}


def done_spec(cfg: PatchConfig, he_paths: dict[str, Path], sizes: PixelSizes | None = None) -> DoneSpec:
    """What makes a slide's grid (:class:`pipeline.done.DoneSpec`): every setting of ``cfg`` that changes it, with
    the slide's own ``mpp`` (``--mpp`` or its row of the pixel-size table)."""
    sizes = sizes if sizes is not None else PixelSizes(he_default=cfg.mpp)
    settings = {"patch_size": cfg.patch_size, "target_mpp": cfg.target_mpp, "min_tissue": cfg.min_tissue,
                "mpp": cfg.mpp, "thumb_size": cfg.thumb_size, **cfg.tissue.to_dict(),
                "artefacts": cfg.artefacts.to_dict()}
    return DoneSpec(folder=art.PATCH_GRID.dir(cfg.out), settings=settings, schema=art.PATCH_GRID.schema,
                    inputs=functools.partial(he_input, he_paths=he_paths),
                    outputs=functools.partial(outputs, out=Path(cfg.out)),
                    slide_settings=functools.partial(he_mpp_setting, sizes=sizes))


def collect_he_slides(cohort: Path | None, he: list[Path] | None, wanted: list[str] | None = None,
                      shard: str | None = None) -> tuple[dict[str, Path], list[str]]:
    """H&E slides by id (:func:`pipeline.cohort.resolve_slides`: ``--he`` files or folders, else
    ``COHORT/pairs.csv``, else ``COHORT/he``) and the sorted ids to run (``wanted`` as in ``--slides``, else all;
    then this job's ``shard`` ``i/n`` of them); raises :class:`PipelineError` (one line) when there is none, a
    wanted id is missing, or the slides' identity is ambiguous (duplicate ids, one file under two ids)."""
    if not he and cohort is not None and not Path(cohort).is_dir():
        raise PipelineError(f"cohort folder not found: {cohort} (a folder with he/, codex/, pairs.csv); check "
                            "--cohort")
    slides = resolve_slides(cohort, he=he)
    return slides.he_paths(), shard_slides(select_slides(slides.ids, wanted, slides.source), shard)


def make_config(args: argparse.Namespace) -> PatchConfig:
    """The flags as a :class:`PatchConfig`; a value outside its range stops with one line (before any work)."""
    require(args.patch_size >= 1, f"--patch-size {args.patch_size}: must be >= 1 px")
    require(args.target_mpp > 0, f"--target-mpp {args.target_mpp}: must be > 0 µm/px")
    require(0 <= args.min_tissue <= 1, f"--min-tissue {args.min_tissue}: must be in [0, 1] (a fraction of the "
                                       "patch area)")
    require(args.mpp is None or args.mpp > 0, f"--mpp {args.mpp}: must be > 0 µm/px")
    require(args.thumb_size >= 16, f"--thumb-size {args.thumb_size}: must be >= 16 px")
    require(args.sat_threshold is None or 0 <= args.sat_threshold <= 1,
            f"--sat-threshold {args.sat_threshold}: must be in [0, 1]")
    require(0 <= args.min_saturation <= 1, f"--min-saturation {args.min_saturation}: must be in [0, 1]")
    for flag in ("median_um", "close_um", "min_area_um2", "max_hole_um2"):
        v = getattr(args, flag)
        require(v >= 0, f"--{flag.replace('_', '-')} {v}: must be >= 0")
    require(args.workers >= 1, f"--workers {args.workers}: must be >= 1")
    require(args.qc_mpp > 0, f"--qc-mpp {args.qc_mpp}: must be > 0 µm/px")
    require(0 <= args.max_artefact <= 1, f"--max-artefact {args.max_artefact}: must be in [0, 1] (a fraction of the "
                                         "patch area)")
    return config_from_args(PatchConfig, args)


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by the per-slide preprocessing stages."""
    p.add_argument("--cohort", type=Path, help="cohort folder (he/, codex/, pairs.csv, marker_panel.csv)")
    p.add_argument("--out", type=Path, required=True, help="output root; artifact paths are relative to it")
    p.add_argument("--slides", nargs="+", help="only these slide ids (default: all)")
    p.add_argument("--overwrite", action="store_true", help="redo slides whose outputs exist (default: skip them)")
    p.add_argument("--workers", type=int, default=1, help="slides processed in parallel (processes)")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failing slide")
    p.add_argument("--shard", metavar="I/N",
                   help="job arrays: only every N-th slide of the sorted list, from I (0-based); the N shards of "
                        "one run together do every slide")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m preprocess.patch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--he", type=Path, nargs="+",
                   help="H&E slide files or folders (instead of the cohort's pairs.csv or he/)")
    p.add_argument("--mpp", type=float, help="level-0 µm/px of the H&E slides (overrides their metadata)")
    add_pixel_sizes_arg(p)
    g = p.add_argument_group("patch grid")
    g.add_argument("--patch-size", type=int, default=224, help="output patch side in px (default 224)")
    g.add_argument("--target-mpp", type=float, default=0.5, help="µm per output pixel (default 0.5 = 20x)")
    g.add_argument("--min-tissue", type=float, default=0.5,
                   help="keep a patch when this fraction of its area is tissue, in [0, 1] (default 0.5)")
    t = p.add_argument_group("tissue mask (on a thumbnail; sizes in µm so they do not depend on its scale)")
    d = TissueParams()
    t.add_argument("--thumb-size", type=int, default=2048, help="longest thumbnail side in px (default 2048)")
    t.add_argument("--sat-threshold", type=float, default=None,
                   help="fixed HSV-saturation threshold in [0, 1] (default: Otsu's threshold per slide)")
    t.add_argument("--min-saturation", type=float, default=d.min_saturation,
                   help=f"floor of the saturation threshold in [0, 1] (default {d.min_saturation})")
    t.add_argument("--median-um", type=float, default=d.median_um,
                   help=f"median blur before thresholding, µm (default {d.median_um})")
    t.add_argument("--close-um", type=float, default=d.close_um,
                   help=f"radius of the morphological closing, µm (default {d.close_um})")
    t.add_argument("--min-area-um2", type=float, default=d.min_area_um2,
                   help=f"remove tissue fragments smaller than this, µm² (default {d.min_area_um2:g})")
    t.add_argument("--max-hole-um2", type=float, default=d.max_hole_um2,
                   help=f"fill holes smaller than this, µm² (default {d.max_hole_um2:g})")
    a = p.add_argument_group("artefacts (excluded from the tissue; measured relative to the slide's own tissue)")
    da = ArtefactParams()
    a.add_argument("--no-ink", action="store_true", help="keep pen/ink marks (default: excluded by colour)")
    a.add_argument("--no-folds", action="store_true",
                   help="keep tissue folds and dark debris (default: excluded by darkness, OD > 2x the tissue median)")
    a.add_argument("--no-bubbles", action="store_true",
                   help="keep air bubbles (default: excluded by their thin dark rings and grey inside)")
    a.add_argument("--no-blur", action="store_true",
                   help="keep out-of-focus regions (default: excluded by a focus measure)")
    a.add_argument("--qc-mpp", type=float, default=da.qc_mpp,
                   help=f"µm/px of the image the artefact measures use (default {da.qc_mpp:g}; read from the "
                        "nearest pyramid level in tiles; never finer than the thumbnail)")
    a.add_argument("--max-artefact", type=float, default=da.max_artefact,
                   help=f"drop a patch when more than this fraction of its area is an excluded artefact, in [0, 1] "
                        f"(default {da.max_artefact:g})")
    return p


def _summary(report: StageReport, out_dir: Path) -> str:
    n = sum(r["patches"] for r in report.results.values())
    return f"{n} patches written for {len(report.done)} slides into {out_dir}"


def _finish(report: StageReport, out_dir: Path, slides: list[str], shard: str | None) -> int:
    """The cohort QC table (``qc_summary.csv``, this run's slides), then the last line."""
    path = out_dir / shard_file_name(shard, "qc_summary", ".csv")
    write_qc_summary(out_dir, slides, path)
    return report.finish("patch grid", f"{_summary(report, out_dir)}; artefact QC in {path}")


def plan(cfg: PatchConfig) -> SlideJob:
    """The slides of this run and what makes each one done (:class:`pipeline.cli.SlideJob`)."""
    he_paths, slides = collect_he_slides(cfg.cohort, cfg.he, cfg.slides, cfg.shard)
    sizes = resolve_pixel_sizes(cfg.pixel_sizes, cfg.cohort, he_paths, he_mpp=cfg.mpp)
    out_dir = art.PATCH_GRID.dir(cfg.out)
    return SlideJob(out_dir, slides, functools.partial(_work, he_paths=he_paths, cfg=cfg, sizes=sizes),
                    done=done_spec(cfg, he_paths, sizes), config=cfg, overwrite=cfg.overwrite, workers=cfg.workers,
                    fail_fast=cfg.fail_fast, shard=cfg.shard,
                    finish=functools.partial(_finish, out_dir=out_dir, slides=slides, shard=cfg.shard),
                    extra_config={"pixel_sizes_resolved": sizes.path})


STAGE = Stage("patch grid", build_parser, make_config, plan=plan)


def main(argv: list[str] | None = None) -> int:
    return STAGE.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
