"""Convert a CODEX image in any format the pipeline reads into a pyramidal OME-TIFF with channel names and pixel size.

    python -m preprocess.convert_codex IN OUT.ome.tif
    python -m preprocess.convert_codex sample.qptiff sample.ome.tif
    python -m preprocess.convert_codex mcmicro/S1/registration/S1.ome.tif S1.ome.tif   # names from S1/markers.csv
    python -m preprocess.convert_codex unnamed.qptiff named.ome.tif --markers-csv markers.csv --mpp 0.5

IN is read by :class:`preprocess.slide_io.CodexImage` (OME-TIFF, QPTIFF of either dialect, MCMICRO's layout: see
:mod:`preprocess.codex_formats`): only its full-resolution image and its levels. OUT is one OME Image, axes CYX,
the input's dtype, level 0 one tiled page per channel, lower levels (downsample 2, 4, ..., area mean, until the
longer side is below ``--min-side``) in SubIFDs, ``Channel/@Name`` and ``PhysicalSizeX/Y`` (µm) in the OME-XML and
the TIFF resolution tags, deflate-compressed by default (readable by QuPath, Bio-Formats, napari, palom, tifffile).
Written channel by channel and band by band (memory: one band of tiles of one channel), atomically (a crash leaves
no OUT). Each lower level is computed from the input's own level closest to it (not coarser).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.cli import Stage
from pipeline.errors import PipelineError
from pipeline.io import atomic_path
from preprocess.pyramid import nominal_downsample
from preprocess.slide_io import CodexImage

log = logging.getLogger(__name__)

COMPRESSIONS = ("zlib", "lzw", "zstd", "none")


def _area_down(img: np.ndarray, f: int) -> np.ndarray:
    """Area mean over ``f`` x ``f`` blocks (edge-replicated to a multiple of ``f``), rounded, input dtype."""
    if f == 1:
        return img
    h, w = img.shape
    hp, wp = -(-h // f) * f, -(-w // f) * f
    if (hp, wp) != (h, w):
        img = np.pad(img, ((0, hp - h), (0, wp - w)), mode="edge")
    out = img.reshape(hp // f, f, wp // f, f).mean(axis=(1, 3), dtype=np.float64)
    if np.issubdtype(img.dtype, np.integer):
        out = np.rint(out)
    return out.astype(img.dtype)


def level_shapes(shape: tuple[int, int], min_side: int) -> list[tuple[int, int]]:
    """(H, W) of the output levels: level 0, then each ceil-halved until the longer side is below ``min_side``."""
    shapes = [shape]
    while max(shapes[-1]) >= min_side and max(shapes[-1]) > 1:
        h, w = shapes[-1]
        shapes.append((-(-h // 2), -(-w // 2)))
    return shapes


def _source(codex: CodexImage, d: int) -> tuple[int, int]:
    """(input level, integer factor) that gives output downsample ``d``: the coarsest input level whose downsample
    divides ``d`` (level 0 always does)."""
    best = (0, d)
    for i, ds in enumerate(codex.level_downsamples):
        dn = nominal_downsample(ds)
        if dn <= d and float(dn).is_integer() and d % int(dn) == 0:
            best = (i, d // int(dn))
    return best


def _tiles(codex: CodexImage, shape: tuple[int, int], d: int, tile: int) -> Iterator[np.ndarray]:
    """Tiles of one output level (downsample ``d``, shape (H, W)), channel by channel, rows top to bottom."""
    level, f = _source(codex, d)
    h, w = shape
    lw = codex.level(level).shape[2]
    for c in range(codex.num_channels):
        for y in range(0, h, tile):
            band = codex.read_region(0, y * f, lw, (y + tile) * f, level=level, channels=[c])[0]
            band = _area_down(band, f)[: min(tile, h - y)]
            if band.shape[1] < w:  # a floor-halved input level: repeat its last column
                band = np.pad(band, ((0, 0), (0, w - band.shape[1])), mode="edge")
            for x in range(0, w, tile):
                yield np.ascontiguousarray(band[:, x : x + tile])


def convert_codex(src: str | os.PathLike, dst: str | os.PathLike, markers_csv: str | os.PathLike | None = None,
                  mpp: float | None = None, tile: int = 512, min_side: int = 1024,
                  compression: str = "zlib") -> dict:
    """Write ``src`` (any CODEX format) as the pyramidal OME-TIFF ``dst`` (module docstring); returns a summary
    (format, channels, names, mpp, levels).

    Args:
        markers_csv: channel names (a ``marker_name`` column, one row per channel; MCMICRO's markers.csv); needed
            when ``src`` names no channels.
        mpp: level-0 µm/px (overrides the input's).
        tile: tile side (px, a multiple of 16).
        min_side: lower levels are added until the longer side is below this (px).
        compression: one of :data:`COMPRESSIONS`.
    """
    import tifffile

    if compression not in COMPRESSIONS:
        raise PipelineError(f"--compression {compression!r}: choose one of {', '.join(COMPRESSIONS)}")
    if tile < 16 or tile % 16:
        raise PipelineError(f"--tile {tile}: give a multiple of 16 (px)")
    dst = Path(dst)
    with CodexImage(src, mpp=mpp, markers_csv=markers_csv) as codex:
        names = codex.channel_names
        if not names:
            raise PipelineError(f"{src} names no channels ({codex.format}); give --markers-csv (a CSV with a column "
                                "marker_name, one row per channel in channel order)")
        c, h, w = codex.shape
        dtype = codex.level(0).dtype
        shapes = level_shapes((h, w), min_side)
        metadata = {"axes": "CYX", "Channel": {"Name": [str(n) for n in names]},
                    "PhysicalSizeX": codex.mpp, "PhysicalSizeXUnit": "µm",
                    "PhysicalSizeY": codex.mpp, "PhysicalSizeYUnit": "µm"}
        big = h * w * c * np.dtype(dtype).itemsize > 2**31 - 2**25
        res = 1e4 / codex.mpp  # px per cm
        with atomic_path(dst, suffix=".tif") as tmp, tifffile.TiffWriter(tmp, bigtiff=big, ome=True) as tw:
            for k, (lh, lw) in enumerate(shapes):
                d = 2**k
                opts = dict(shape=(c, lh, lw), dtype=dtype, tile=(tile, tile), photometric="minisblack",
                            compression=None if compression == "none" else compression,
                            resolution=(res / d, res / d), resolutionunit="CENTIMETER")
                if k == 0:
                    tw.write(_tiles(codex, (lh, lw), d, tile), subifds=len(shapes) - 1, metadata=metadata, **opts)
                else:
                    tw.write(_tiles(codex, (lh, lw), d, tile), subfiletype=1, metadata=None, **opts)
        summary = {"input": str(src), "format": codex.format, "names_source": codex.names_source, "channels": c,
                   "names": list(names), "mpp": codex.mpp, "levels": [list(s) for s in shapes], "output": str(dst)}
    log.info("wrote %s: %d channels (%s, names from %s), %dx%d px at %.4g µm/px, %d levels", dst, c, summary["format"],
             summary["names_source"], w, h, summary["mpp"], len(shapes))
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m preprocess.convert_codex", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", type=Path, help="CODEX image: OME-TIFF, .qptiff, or MCMICRO registration/{sample}.ome.tif")
    p.add_argument("output", type=Path, help="the pyramidal OME-TIFF to write (e.g. OUT.ome.tif)")
    p.add_argument("--markers-csv", type=Path, default=None,
                   help="channel names: a CSV with a marker_name column, one row per channel in channel order "
                        "(default: the file's own names; MCMICRO: markers.csv next to the image or one folder up)")
    p.add_argument("--mpp", type=float, default=None, help="level-0 µm/px (default: the file's pixel size)")
    p.add_argument("--tile", type=int, default=512, help="tile side (px, multiple of 16)")
    p.add_argument("--min-side", type=int, default=1024,
                   help="add 2x lower levels until the longer side is below this (px)")
    p.add_argument("--compression", choices=COMPRESSIONS, default="zlib", help="tile compression")
    return p


@dataclass(frozen=True)
class ConvertConfig:
    """The flags (paths, µm/px, px)."""

    input: Path
    output: Path
    markers_csv: Path | None = None
    mpp: float | None = None
    tile: int = 512
    min_side: int = 1024
    compression: str = "zlib"


def make_config(args: argparse.Namespace) -> ConvertConfig:
    if args.mpp is not None and not (args.mpp > 0 and math.isfinite(args.mpp)):
        raise PipelineError(f"--mpp {args.mpp}: give a positive pixel size (µm/px)")
    if args.input.resolve() == args.output.resolve():
        raise PipelineError(f"{args.output} is the input; write the OME-TIFF to another path")
    return ConvertConfig(args.input, args.output, args.markers_csv, args.mpp, args.tile, args.min_side,
                         args.compression)


def run(cfg: ConvertConfig, ctx: object = None) -> int:
    convert_codex(cfg.input, cfg.output, cfg.markers_csv, cfg.mpp, cfg.tile, cfg.min_side, cfg.compression)
    return 0


STAGE = Stage("convert_codex", build_parser, make_config, run=run)


def main(argv: list[str] | None = None) -> int:
    return STAGE.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
