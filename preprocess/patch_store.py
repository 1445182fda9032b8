"""H&E patch store: the grid's patches read from the slide, in grid order, into one HDF5 file per slide.

    python -m preprocess.patch_store --cohort sample_cohort --out outputs --workers 2
    python -m preprocess.patch_store --he /data/slides --out outputs --slides s1 --png   # + legacy PNG folders

Reads ``patches/{slide}.h5`` (stage 01) and writes, relative to ``--out``:
    he_patches/{slide}.h5       ``imgs`` (N, 224, 224, 3) uint8 RGB, chunked one patch per chunk
                                (chunks = (1, 224, 224, 3)), compressed losslessly by default (``--compression
                                gzip``, read transparently by any HDF5 reader); ``coords`` (N, 2) int64 level-0
                                top-left (x, y); row i is row i of the grid file (and ``index`` i of
                                ``markers/{slide}.csv``); attributes as in the grid file (patch_size, patch_level,
                                patch_size_level0, mpp, ...) and ``imgs_encoding`` ("raw"). With ``--compression
                                jpeg`` the patches are JPEG files instead: ``imgs_jpeg`` (N,) variable-length uint8
                                (one encoded RGB JPEG per patch), ``imgs_shape`` attr (N, 224, 224, 3),
                                ``imgs_encoding`` = "jpeg", ``jpeg_quality``; read them with :class:`PatchStoreReader`
                                (the format: :mod:`preprocess.patch_store_format`).
    he_patches/{slide}/{slide}_{index}.png   only with ``--png`` (the original HEX code's layout).
    he_patches/done/{slide}.json   done-record: the settings that change the bytes, the H&E file and the grid (size,
                                mtime) and the schema; a redone grid redoes the slide's store.
    he_patches/config.json, he_patches/run.log

Slides and pixel sizes as in :mod:`preprocess.patch` (``--he``, else ``COHORT/pairs.csv``, else ``COHORT/he/``;
``--mpp`` and ``--pixel-sizes``). With
``--labelled-only`` (stage 03 after quantify) only the slides with labels ``markers/{slide}.csv`` are stored; a
slide whose quantification failed (``markers/done/{slide}.failed.json``) is named in the last line with its reason
and the exit status is 1.

Patches are cut from large regions (about ``--region-px`` px a side at the patch level), not read one by one.
Each patch is ``read_size_at_level`` px at ``patch_level`` (the level whose downsample is closest to, and not
above, 0.5 µm/px over the slide's mpp); when that is not ``patch_size`` (224) it is resized with area averaging
(shrinking) or bicubic interpolation (enlarging), see :func:`resize_patch`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import shutil
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pipeline import artifacts as art
from pipeline.cli import SlideJob, Stage, config_from_args, require
from pipeline.done import DoneSpec, read_failure
from pipeline.errors import PipelineError
from pipeline.io import atomic_path
from pipeline.runner import StageReport, default_threads
from preprocess.patch import add_common_args, collect_he_slides, he_mpp_setting, read_grid
from preprocess.patch_store_format import COMPRESSIONS, patch_writer
from preprocess.pixel_sizes import PixelSizes, add_pixel_sizes_arg, resolve_pixel_sizes
from preprocess.slide_io import HESlide

log = logging.getLogger(__name__)

DESC = "H&E patch store"


def resize_patch(img: np.ndarray, size: int) -> np.ndarray:
    """Resize an RGB patch (s, s, 3) uint8 to (size, size, 3): area averaging when shrinking, bicubic otherwise."""
    import cv2

    if img.shape[0] == size and img.shape[1] == size:
        return img
    interp = cv2.INTER_AREA if img.shape[0] > size else cv2.INTER_CUBIC
    return cv2.resize(img, (size, size), interpolation=interp)


def group_into_blocks(coords: np.ndarray, block_level0: int) -> list[np.ndarray]:
    """Split patch indices into square blocks of ``block_level0`` level-0 px (row-major order of blocks).

    Returns a list of index arrays, sorted within each block; every index appears exactly once.
    """
    if len(coords) == 0:
        return []
    key = coords // max(1, int(block_level0))
    order = np.lexsort((np.arange(len(coords)), key[:, 0], key[:, 1]))
    k = key[order]
    cuts = np.flatnonzero(np.any(k[1:] != k[:-1], axis=1)) + 1
    return [np.sort(b) for b in np.split(order, cuts)]


def iter_patches(slide: HESlide, coords: np.ndarray, level: int, read_size: int, out_size: int,
                 region_px: int = 2048, threads: int = 1, desc: str | None = None):
    """Yield (indices (k,), patches (k, out_size, out_size, 3) uint8) block by block; one read_region per block.

    A patch at level-0 (x, y) is cut at level offset round((x - bx) / ds) from the block read at the block's
    top-left (bx, by), which equals a direct ``read_region((x, y), level, ...)`` whenever x/ds is an integer
    (always at level 0). Blocks hold about ``region_px`` level px a side; ``threads`` blocks are read at once
    (OpenSlide is thread-safe and decodes without the GIL), at most 2 x ``threads`` blocks are held in memory.
    """
    ds = slide.level_downsamples[level]
    per_side = max(1, region_px // max(1, read_size))
    block_level0 = int(round(per_side * read_size * ds))
    blocks = group_into_blocks(coords, block_level0)

    def cut(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c = coords[idx]
        bx, by = (int(v) for v in c.min(axis=0))
        off = np.rint((c - np.array([bx, by])) / ds).astype(np.int64)
        w, h = (int(v) for v in off.max(axis=0) + read_size)
        region = slide.read_region(bx, by, level, (w, h))
        patches = np.empty((len(idx), out_size, out_size, 3), np.uint8)
        for j, (ox, oy) in enumerate(off):
            patches[j] = resize_patch(region[oy : oy + read_size, ox : ox + read_size], out_size)
        return idx, patches

    bar = tqdm(total=len(blocks), desc=desc, unit="block", leave=False,
               **({} if desc else {"disable": True}))
    if threads <= 1:
        for idx in blocks:
            yield cut(idx)
            bar.update()
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            pending: deque = deque()
            for idx in blocks:
                pending.append(pool.submit(cut, idx))
                if len(pending) >= 2 * threads:
                    yield pending.popleft().result()
                    bar.update()
            while pending:
                yield pending.popleft().result()
                bar.update()
    bar.close()


@dataclass(frozen=True)
class StoreConfig:
    """The patch store's settings: the flags of ``python -m preprocess.patch_store`` (same names; ``patches_dir`` is
    ``--patches``, resolved). A slide's job reads the first ones; ``mpp`` is the slide's level-0 µm/px override."""

    out: Path
    patches_dir: Path
    mpp: float | None = None
    png: bool = False
    region_px: int = 2048
    compression: str = "gzip"  # none | gzip | lzf (lossless, transparent to HDF5 readers) | jpeg (lossy)
    compression_level: int = 4  # gzip level 1-9
    jpeg_quality: int = 90
    threads: int = 1
    cohort: Path | None = None
    he: list[Path] | None = None
    slides: list[str] | None = None
    pixel_sizes: Path | None = None
    labelled_only: bool = False
    overwrite: bool = False
    workers: int = 1
    fail_fast: bool = False
    shard: str | None = None


def store_slide(slide_id: str, he_path: str | os.PathLike, cfg: StoreConfig) -> dict:
    """Write ``he_patches/{slide}.h5`` (and the PNG folder with ``cfg.png``) for the grid of one slide."""
    import cv2
    import h5py

    grid_path = Path(cfg.patches_dir) / f"{slide_id}.h5"
    coords, attrs = read_grid(grid_path)
    if len(coords) == 0:
        raise PipelineError(f"patch grid {grid_path} is empty; rerun preprocess.patch with a lower --min-tissue")
    store_file, png_dir = outputs(slide_id, cfg.out)
    level, ps0, size = int(attrs["patch_level"]), int(attrs["patch_size_level0"]), int(attrs["patch_size"])
    with HESlide(he_path, mpp=cfg.mpp) as slide:
        if level >= slide.level_count:
            raise PipelineError(f"patch grid {grid_path} asks for level {level} but {slide.path} has "
                                f"{slide.level_count} levels; rerun preprocess.patch for this slide")
        if "level0_mpp" in attrs and abs(float(attrs["level0_mpp"]) - slide.mpp) > 0.01 * slide.mpp:
            log.warning("%s: the grid was made at %.4f µm/px, the slide reads %.4f µm/px (--mpp?)", slide_id,
                        float(attrs["level0_mpp"]), slide.mpp)
        ds = slide.level_downsamples[level]
        read_size = max(1, int(round(ps0 / ds)))
        w0, h0 = slide.dimensions
        if coords.min() < 0 or (coords[:, 0] + ps0).max() > w0 or (coords[:, 1] + ps0).max() > h0:
            raise PipelineError(f"patch grid {grid_path} has patches outside {slide.path} ({w0}x{h0} px); "
                                "was it made for another slide?")
        store_attrs = {k: v for k, v in attrs.items() if k not in ("level_dimensions",)}
        store_attrs |= {"read_size_at_level": read_size, "level_downsample": ds,
                        "schema_version": art.PATCH_STORE.schema,
                        "slide_id": slide_id, "source_grid": str(grid_path), "channel_order": "RGB"}
        png_tmp = png_dir.with_name(f".{slide_id}.png.tmp") if cfg.png else None
        if png_tmp is not None:
            shutil.rmtree(png_tmp, ignore_errors=True)
            png_tmp.mkdir(parents=True)
        try:
            with atomic_path(store_file) as tmp, h5py.File(tmp, "w") as f:
                write = patch_writer(f, len(coords), size, cfg.compression, cfg.compression_level,
                                     cfg.jpeg_quality)
                dset = f.create_dataset("coords", data=coords.astype(np.int64))
                for k, v in store_attrs.items():
                    f.attrs[k] = v
                    dset.attrs[k] = v
                for idx, patches in iter_patches(slide, coords, level, read_size, size, cfg.region_px,
                                                 cfg.threads, desc=f"{slide_id} patches"):
                    write(idx, patches)
                    if png_tmp is not None:
                        for i, p in zip(idx, patches):
                            if not cv2.imwrite(str(png_tmp / f"{slide_id}_{int(i)}.png"), p[..., ::-1]):
                                raise OSError(f"could not write {png_tmp / f'{slide_id}_{int(i)}.png'}")
            if png_tmp is not None:
                if png_dir.exists():
                    shutil.rmtree(png_dir)
                os.replace(png_tmp, png_dir)
        finally:
            if png_tmp is not None and png_tmp.exists():
                shutil.rmtree(png_tmp, ignore_errors=True)
    log.info("%s: %d patches of %d px (read %d px at level %d)", slide_id, len(coords), size, read_size, level)
    return {"patches": int(len(coords))}


def _work(slide_id: str, he_paths: dict[str, Path], cfg: StoreConfig, sizes: PixelSizes) -> dict:
    return store_slide(slide_id, he_paths[slide_id], dataclasses.replace(cfg, mpp=sizes.he_mpp(slide_id)))


def outputs(slide_id: str, out: Path) -> list[Path]:
    """The file and the legacy PNG folder the store writes for one slide: removed before a slide is redone."""
    store = art.PATCH_STORE.path(out, slide_id)
    return [store, store.parent / slide_id]


def done_outputs(slide_id: str, out: Path, png: bool) -> list[Path]:
    """What must exist for a slide to count as stored: the HDF5 file (and the PNG folder with ``--png``)."""
    store, png_dir = outputs(slide_id, out)
    return [store, *([png_dir] if png else [])]


def store_inputs(slide_id: str, he_paths: dict[str, Path], patches_dir: Path) -> dict[str, Path]:
    """The done-record inputs of a slide: its H&E file and its grid (a redone grid redoes the store)."""
    return {"he": he_paths[slide_id], "grid": Path(patches_dir) / f"{slide_id}.h5"}


def done_spec(cfg: StoreConfig, he_paths: dict[str, Path], sizes: PixelSizes | None = None) -> DoneSpec:
    """What makes a slide's store (:class:`pipeline.done.DoneSpec`): the settings that change its bytes (the
    gzip level only for gzip, the JPEG quality only for JPEG; not ``--region-px`` or the threads), with the slide's
    own ``mpp`` (``--mpp`` or its row of the pixel-size table)."""
    sizes = sizes if sizes is not None else PixelSizes(he_default=cfg.mpp)
    settings = {"compression": cfg.compression,
                "compression_level": cfg.compression_level if cfg.compression == "gzip" else None,
                "jpeg_quality": cfg.jpeg_quality if cfg.compression == "jpeg" else None,
                "png": cfg.png, "mpp": cfg.mpp}
    return DoneSpec(folder=art.PATCH_STORE.dir(cfg.out), settings=settings, schema=art.PATCH_STORE.schema,
                    inputs=functools.partial(store_inputs, he_paths=he_paths, patches_dir=Path(cfg.patches_dir)),
                    outputs=functools.partial(done_outputs, out=Path(cfg.out), png=cfg.png),
                    slide_settings=functools.partial(he_mpp_setting, sizes=sizes))


def labelled_slides(slides: list[str], out: Path) -> tuple[list[str], dict[str, str], list[str]]:
    """Split ``slides`` by their labels ``OUT/markers/{slide}.csv``: (labelled, {slide: why quantify failed} from
    its failure record ``OUT/markers/done/{slide}.failed.json``, unlabelled slides without a failure record)."""
    keep, failed, unlabelled = [], {}, []
    for s in slides:
        if art.LABELS.path(out, s).is_file():
            keep.append(s)
        elif (why := read_failure(art.LABELS.dir(out), s)) is not None:
            failed[s] = why
        else:
            unlabelled.append(s)
    return keep, failed, unlabelled


def make_config(args: argparse.Namespace) -> StoreConfig:
    """The flags as a :class:`StoreConfig`; a value outside its range stops with one line (before any work)."""
    require(1 <= args.compression_level <= 9, f"--compression-level {args.compression_level}: must be in 1-9")
    require(1 <= args.jpeg_quality <= 100, f"--jpeg-quality {args.jpeg_quality}: must be in 1-100")
    require(args.region_px >= 1, f"--region-px {args.region_px}: must be >= 1 px")
    require(args.mpp is None or args.mpp > 0, f"--mpp {args.mpp}: must be > 0 µm/px")
    require(args.threads >= 0, f"--threads {args.threads}: must be >= 0 (0 = automatic)")
    require(args.workers >= 1, f"--workers {args.workers}: must be >= 1")
    return config_from_args(StoreConfig, args, patches_dir=args.patches or art.PATCH_GRID.dir(args.out),
                            threads=args.threads or default_threads(args.workers))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m preprocess.patch_store", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--he", type=Path, nargs="+",
                   help="H&E slide files or folders (instead of the cohort's pairs.csv or he/)")
    p.add_argument("--patches", type=Path, help="folder of the grid files (default OUT/patches)")
    p.add_argument("--mpp", type=float, help="level-0 µm/px of the H&E slides (overrides their metadata)")
    add_pixel_sizes_arg(p)
    p.add_argument("--png", action="store_true", help="also write he_patches/{slide}/{slide}_{index}.png")
    p.add_argument("--region-px", type=int, default=2048,
                   help="side of the regions read at the patch level, px (default 2048)")
    p.add_argument("--threads", type=int, default=0,
                   help="regions read in parallel per slide (default: CPU cores / --workers, at most 4)")
    p.add_argument("--compression", choices=COMPRESSIONS, default="gzip",
                   help="patch encoding: gzip (default) / lzf are lossless HDF5 filters that every HDF5 reader "
                        "decodes; none stores raw pixels (largest, fastest); jpeg stores one JPEG per patch (lossy, "
                        "smallest; read with preprocess.patch_store_format.PatchStoreReader). See "
                        "bench/bench_quantify.py")
    p.add_argument("--compression-level", type=int, default=4, help="gzip level 1-9 (default 4)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality 1-100 with --compression jpeg "
                   "(default 90)")
    p.add_argument("--labelled-only", action="store_true",
                   help="store only the slides with labels (OUT/markers/{slide}.csv, from preprocess.quantify); "
                        "the slides whose quantification failed are named with the reason and the exit status is 1")
    return p


def _finish(report: StageReport, left_out: dict[str, str], unlabelled: list[str], out: Path) -> int:
    """The last line: the slides left out for want of labels count as failed when quantify failed for them."""
    for s, why in left_out.items():  # not stored: their labels are missing because quantify failed
        report.failed[s] = f"not stored, no labels: quantify failed: {why}"
    extra = (f"{len(unlabelled)} slides without labels left out (no {art.LABELS.dir(out)}/{{slide}}.csv and no "
             f"failure record): {', '.join(unlabelled[:10])}{' ...' if len(unlabelled) > 10 else ''}"
             if unlabelled else "")
    return report.finish(DESC, extra)


def plan(cfg: StoreConfig) -> SlideJob:
    """The slides of this run (with ``--labelled-only``, those quantify labelled) and what makes each one done."""
    he_paths, slides = collect_he_slides(cfg.cohort, cfg.he, cfg.slides, cfg.shard)
    left_out: dict[str, str] = {}
    unlabelled: list[str] = []
    if cfg.labelled_only:
        slides, left_out, unlabelled = labelled_slides(slides, cfg.out)
        if not slides and not left_out:
            raise PipelineError(f"{DESC}: none of the {len(unlabelled)} slides has labels in "
                                f"{art.LABELS.dir(cfg.out)}; run preprocess.quantify first (or drop --labelled-only)")
    sizes = resolve_pixel_sizes(cfg.pixel_sizes, cfg.cohort, he_paths, he_mpp=cfg.mpp)
    return SlideJob(art.PATCH_STORE.dir(cfg.out), slides,
                    functools.partial(_work, he_paths=he_paths, cfg=cfg, sizes=sizes), done=done_spec(cfg, he_paths,
                                                                                                  sizes),
                    config=cfg, overwrite=cfg.overwrite, workers=cfg.workers, fail_fast=cfg.fail_fast,
                    shard=cfg.shard, outputs=functools.partial(outputs, out=Path(cfg.out)),
                    finish=functools.partial(_finish, left_out=left_out, unlabelled=unlabelled, out=Path(cfg.out)),
                    extra_config={"pixel_sizes_resolved": sizes.path})


STAGE = Stage(DESC, build_parser, make_config, plan=plan)


def main(argv: list[str] | None = None) -> int:
    return STAGE.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
