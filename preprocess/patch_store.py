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
                                ``imgs_encoding`` = "jpeg", ``jpeg_quality``; read them with :class:`PatchStoreReader`.
    he_patches/{slide}/{slide}_{index}.png   only with ``--png`` (the original HEX code's layout).
    he_patches/config.json, he_patches/run.log

Patches are cut from large regions (about ``--region-px`` px a side at the patch level), not read one by one.
Each patch is ``read_size_at_level`` px at ``patch_level`` (the level whose downsample is closest to, and not
above, 0.5 µm/px over the slide's mpp); when that is not ``patch_size`` (224) it is resized with area averaging
(shrinking) or bicubic interpolation (enlarging), see :func:`resize_patch`.
"""

from __future__ import annotations

import argparse
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

from preprocess.patch import add_common_args, collect_he_slides, read_grid
from preprocess.slide_io import HESlide
from preprocess.utils import (
    PipelineError,
    atomic_path,
    default_threads,
    run_slides,
    save_config,
    setup_logging,
    shard_config_name,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


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


def _runs(idx: np.ndarray) -> list[tuple[int, int]]:
    """Consecutive runs [start, stop) of a sorted index array."""
    cuts = np.flatnonzero(np.diff(idx) != 1) + 1
    return [(int(r[0]), int(r[-1]) + 1) for r in np.split(idx, cuts)]


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
    """Everything one slide's job needs (picklable for the process pool)."""

    out: Path
    patches_dir: Path
    mpp: float | None = None
    png: bool = False
    region_px: int = 2048
    compression: str = "gzip"  # none | gzip | lzf (lossless, transparent to HDF5 readers) | jpeg (lossy)
    compression_level: int = 4  # gzip level 1-9
    jpeg_quality: int = 90
    threads: int = 1


COMPRESSIONS = ("gzip", "lzf", "none", "jpeg")


def encode_jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    """One RGB patch (h, w, 3) uint8 as JPEG bytes, (n,) uint8 (OpenCV, 4:2:0 chroma subsampling)."""
    import cv2

    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise OSError("JPEG encoding failed")
    return buf.ravel()


class PatchStoreReader:
    """Random access to the patches of one ``he_patches/{slide}.h5``, whatever its encoding.

    ``reader[i]`` is patch i as (H, W, 3) uint8 RGB; ``len(reader)`` the number of patches. Raw stores
    (``imgs``, compressed or not) are read as they are; JPEG stores (``imgs_jpeg``) are decoded.
    """

    def __init__(self, path: str | os.PathLike):
        import h5py

        self.path = Path(path)
        self._f = h5py.File(self.path, "r")
        if "imgs" in self._f:
            self._ds, self.encoding = self._f["imgs"], "raw"
            self.shape = tuple(self._ds.shape)
        elif "imgs_jpeg" in self._f:
            self._ds, self.encoding = self._f["imgs_jpeg"], "jpeg"
            self.shape = tuple(int(v) for v in self._f.attrs["imgs_shape"])
        else:
            self._f.close()
            raise PipelineError(f"patch store {self.path} has neither 'imgs' nor 'imgs_jpeg'; rerun "
                                "preprocess.patch_store for it")

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> np.ndarray:
        if self.encoding == "raw":
            return self._ds[i]
        import cv2

        return cv2.imdecode(self._ds[i], cv2.IMREAD_COLOR)[..., ::-1].copy()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> PatchStoreReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _patch_writer(f, n: int, size: int, cfg: StoreConfig):
    """Create the patch dataset of an open store; returns ``write(indices (k,), patches (k, s, s, 3))``."""
    import h5py

    if cfg.compression == "jpeg":
        ds = f.create_dataset("imgs_jpeg", shape=(n,), dtype=h5py.vlen_dtype(np.uint8), chunks=(min(n, 64),))
        f.attrs.update({"imgs_encoding": "jpeg", "jpeg_quality": int(cfg.jpeg_quality),
                        "imgs_shape": np.array([n, size, size, 3], np.int64)})

        def write(idx: np.ndarray, patches: np.ndarray) -> None:
            for i, p in zip(idx, patches):
                ds[int(i)] = encode_jpeg(p, cfg.jpeg_quality)

        return write
    comp = None if cfg.compression == "none" else cfg.compression
    opts = {"compression_opts": int(cfg.compression_level)} if comp == "gzip" else {}
    ds = f.create_dataset("imgs", shape=(n, size, size, 3), dtype=np.uint8, chunks=(1, size, size, 3),
                          compression=comp, **opts)
    f.attrs["imgs_encoding"] = "raw"

    def write(idx: np.ndarray, patches: np.ndarray) -> None:
        pos = 0
        for a, b in _runs(idx):
            ds[a:b] = patches[pos : pos + b - a]
            pos += b - a

    return write


def store_slide(slide_id: str, he_path: str | os.PathLike, cfg: StoreConfig) -> dict:
    """Write ``he_patches/{slide}.h5`` (and the PNG folder with ``cfg.png``) for the grid of one slide."""
    import cv2
    import h5py

    grid_path = Path(cfg.patches_dir) / f"{slide_id}.h5"
    coords, attrs = read_grid(grid_path)
    if len(coords) == 0:
        raise PipelineError(f"patch grid {grid_path} is empty; rerun preprocess.patch with a lower --min-tissue")
    out_dir = Path(cfg.out) / "he_patches"
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
        store_attrs |= {"read_size_at_level": read_size, "level_downsample": ds, "schema_version": SCHEMA_VERSION,
                        "slide_id": slide_id, "source_grid": str(grid_path), "channel_order": "RGB"}
        png_tmp = out_dir / f".{slide_id}.png.tmp" if cfg.png else None
        if png_tmp is not None:
            shutil.rmtree(png_tmp, ignore_errors=True)
            png_tmp.mkdir(parents=True)
        try:
            with atomic_path(out_dir / f"{slide_id}.h5") as tmp, h5py.File(tmp, "w") as f:
                write = _patch_writer(f, len(coords), size, cfg)
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
                final = out_dir / slide_id
                if final.exists():
                    shutil.rmtree(final)
                os.replace(png_tmp, final)
        finally:
            if png_tmp is not None and png_tmp.exists():
                shutil.rmtree(png_tmp, ignore_errors=True)
    log.info("%s: %d patches of %d px (read %d px at level %d)", slide_id, len(coords), size, read_size, level)
    return {"patches": int(len(coords))}


def _work(slide_id: str, he_paths: dict[str, Path], cfg: StoreConfig) -> dict:
    return store_slide(slide_id, he_paths[slide_id], cfg)


def outputs(slide_id: str, out: Path) -> list[Path]:
    """The files (and the legacy PNG folder) the store writes for one slide."""
    d = Path(out) / "he_patches"
    return [d / f"{slide_id}.h5", d / slide_id]


def _is_done(slide_id: str, out: Path, png: bool, patches_dir: Path) -> bool:
    """The store exists (and its PNG folder with ``png``) and is newer than the slide's grid file."""
    d = Path(out) / "he_patches"
    h5, grid = d / f"{slide_id}.h5", Path(patches_dir) / f"{slide_id}.h5"
    if not h5.exists() or (png and not (d / slide_id).is_dir()):
        return False
    if grid.exists() and grid.stat().st_mtime > h5.stat().st_mtime:
        log.info("%s: %s changed since %s was written; redoing it", slide_id, grid, h5)
        return False
    return True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m preprocess.patch_store", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--he", type=Path, nargs="+", help="H&E slide files or folders (instead of COHORT/he)")
    p.add_argument("--patches", type=Path, help="folder of the grid files (default OUT/patches)")
    p.add_argument("--mpp", type=float, help="level-0 µm/px of the H&E slides (overrides their metadata)")
    p.add_argument("--png", action="store_true", help="also write he_patches/{slide}/{slide}_{index}.png")
    p.add_argument("--region-px", type=int, default=2048,
                   help="side of the regions read at the patch level, px (default 2048)")
    p.add_argument("--threads", type=int, default=0,
                   help="regions read in parallel per slide (default: CPU cores / --workers, at most 4)")
    p.add_argument("--compression", choices=COMPRESSIONS, default="gzip",
                   help="patch encoding: gzip (default) / lzf are lossless HDF5 filters that every HDF5 reader "
                        "decodes; none stores raw pixels (largest, fastest); jpeg stores one JPEG per patch (lossy, "
                        "smallest; read with preprocess.patch_store.PatchStoreReader). See bench/bench_quantify.py")
    p.add_argument("--compression-level", type=int, default=4, help="gzip level 1-9 (default 4)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality 1-100 with --compression jpeg "
                   "(default 90)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out_dir = args.out / "he_patches"
    setup_logging(out_dir / "run.log")
    patches_dir = args.patches or args.out / "patches"
    try:
        he_paths, slides = collect_he_slides(args.cohort, args.he, args.slides, args.shard)
        if not 1 <= args.compression_level <= 9 or not 1 <= args.jpeg_quality <= 100:
            raise PipelineError(f"need 1 <= --compression-level <= 9 and 1 <= --jpeg-quality <= 100 (got "
                                f"{args.compression_level}, {args.jpeg_quality})")
    except PipelineError as e:
        log.error("%s", e)
        return 2
    cfg = StoreConfig(out=args.out, patches_dir=patches_dir, mpp=args.mpp, png=args.png, region_px=args.region_px,
                      compression=args.compression, compression_level=args.compression_level,
                      jpeg_quality=args.jpeg_quality, threads=args.threads or default_threads(args.workers))
    save_config(out_dir, vars(args) | {"patches_dir": patches_dir, "slides_resolved": slides,
                                       "schema_version": SCHEMA_VERSION}, name=shard_config_name(args.shard))
    try:
        report = run_slides(slides, functools.partial(_work, he_paths=he_paths, cfg=cfg),
                            functools.partial(_is_done, out=args.out, png=args.png, patches_dir=patches_dir),
                            overwrite=args.overwrite, workers=args.workers, skip_errors=not args.fail_fast,
                            desc="H&E patch store", outputs=functools.partial(outputs, out=args.out))
    except PipelineError as e:  # --fail-fast
        log.error("%s", e)
        return 1
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
