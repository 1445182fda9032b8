"""Write a CODEX image resampled into its H&E slide's pixel grid (``registration/{slide}_registered.ome.tif``).

The output is a pyramidal OME-TIFF (one Image, axes CYX, SubIFD pyramid, the CODEX dtype and channel names,
PhysicalSizeX/Y = the H&E pixel size), so it overlays the H&E in QuPath or napari. It is streamed: every output
tile of every channel is warped on its own from the CODEX region it needs, so memory stays at one tile, whatever
the image size. Pyramid level k (downsample 2^k) is resampled directly from the finest CODEX level whose pixel
size does not exceed the output pixel size (bilinear), not from the written level 0. The map is the registration's
affine, through its displacement field when it has one (``x_codex = A^-1 (x_he - D(x_he))``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator

import cv2
import numpy as np
from tqdm.auto import tqdm

from pipeline.io import atomic_path
from preprocess.registration.field import DisplacementField
from preprocess.registration.record_qc import he_to_codex_points
from preprocess.registration_qc import apply_affine, scale_to_level0
from preprocess.slide_io import CodexImage

log = logging.getLogger(__name__)


def _source_coords(x0: int, y0: int, w: int, h: int, out_to0: np.ndarray, src_to0: np.ndarray, affine: np.ndarray,
                   field: DisplacementField | None) -> np.ndarray:
    """(h, w, 2) source-level coordinates of the output pixels [y0:y0+h, x0:x0+w] (output level px)."""
    yy, xx = np.mgrid[y0 : y0 + h, x0 : x0 + w].astype(np.float64)
    pts = apply_affine(out_to0, np.c_[xx.ravel(), yy.ravel()])
    src = apply_affine(np.linalg.inv(src_to0), he_to_codex_points(affine, field, pts))
    return src.reshape(h, w, 2)


def _tiles(codex: CodexImage, level: int, out_to0: np.ndarray, src_to0: np.ndarray, affine: np.ndarray,
           field: DisplacementField | None, out_hw: tuple[int, int], tile: int, channels: list[int],
           bar: tqdm) -> Iterator[np.ndarray]:
    """Tiles (tile, tile) of every channel (channel-major, then row-major) of the warped CODEX level.

    ``out_to0`` maps output px -> H&E level-0 px, ``src_to0`` CODEX level px -> CODEX level-0 px. Edge tiles are
    zero-padded to the full tile size.
    """
    arr = codex.level(level)
    _, sh, sw = arr.shape
    oh, ow = out_hw
    dtype = arr.dtype
    cache: dict | None = {} if oh * ow <= 2**24 else None  # coordinate maps of small levels are kept per tile

    def plan(y0: int, x0: int):
        if cache is not None and (y0, x0) in cache:
            return cache[(y0, x0)]
        h, w = min(tile, oh - y0), min(tile, ow - x0)
        src = _source_coords(x0, y0, w, h, out_to0, src_to0, affine, field)
        sx0, sy0 = (np.floor(src.reshape(-1, 2).min(0)).astype(int) - 2).clip(0)
        sx1 = min(sw, int(math.ceil(src[..., 0].max())) + 3)
        sy1 = min(sh, int(math.ceil(src[..., 1].max())) + 3)
        out = (h, w, sx0, sy0, sx1, sy1, (src[..., 0] - sx0).astype(np.float32), (src[..., 1] - sy0).astype(np.float32))
        if cache is not None:
            cache[(y0, x0)] = out
        return out

    for c in channels:
        for y0 in range(0, oh, tile):
            for x0 in range(0, ow, tile):
                h, w, sx0, sy0, sx1, sy1, mx, my = plan(y0, x0)
                out = np.zeros((tile, tile), dtype)
                if sx1 > sx0 and sy1 > sy0:
                    region = np.asarray(arr[c, sy0:sy1, sx0:sx1])
                    src_img = region.astype(np.float32) if region.dtype not in (np.uint8, np.uint16, np.float32) \
                        else region
                    warped = cv2.remap(src_img, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                                       borderValue=0)
                    out[:h, :w] = warped.astype(dtype, copy=False)
                bar.update(1)
                yield out


def write_registered_ome(codex: CodexImage, affine: np.ndarray, he_dims: tuple[int, int], he_mpp: float,
                         path: str | os.PathLike, tile: int = 512, min_level_px: int = 512,
                         compression: str = "zlib", field: DisplacementField | None = None) -> None:
    """Write ``codex`` warped by ``affine`` (CODEX level-0 px -> H&E level-0 px; + ``field``) into the H&E grid.

    Args:
        codex: the CODEX image (all channels are written, in file order).
        affine: 3x3 CODEX level-0 -> H&E level-0 pixel affine.
        he_dims: H&E level-0 (width, height) in px = the output level-0 size.
        he_mpp: H&E level-0 µm/px = the output PhysicalSizeX/Y.
        path: output ``.ome.tif`` (written atomically).
        tile: tile side in px (a multiple of 16).
        min_level_px: pyramid levels are added (2x each) until the longer side is below this.
        field: the registration's displacement field (None: affine only).
    """
    import tifffile

    tile = max(16, int(tile) // 16 * 16)
    w0, h0 = he_dims
    n_levels = 1
    while max(w0, h0) / 2**n_levels >= min_level_px:
        n_levels += 1
    channels = list(range(codex.num_channels))
    names = codex.channel_names or [f"Channel {i}" for i in channels]
    dtype = codex.level(0).dtype
    total = 0
    plans = []
    for k in range(n_levels):
        d = 2**k
        ow, oh = math.ceil(w0 / d), math.ceil(h0 / d)
        level, dm = codex.level_for_mpp(he_mpp * d)
        plans.append((ow, oh, level, scale_to_level0(d), scale_to_level0(dm)))
        total += len(channels) * math.ceil(ow / tile) * math.ceil(oh / tile)
    metadata = {
        "axes": "CYX",
        "Channel": {"Name": list(names)},
        "PhysicalSizeX": he_mpp, "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": he_mpp, "PhysicalSizeYUnit": "µm",
    }
    big = w0 * h0 * len(channels) * np.dtype(dtype).itemsize > 2**31
    with atomic_path(path, suffix=".tif") as tmp, tifffile.TiffWriter(tmp, bigtiff=big, ome=True) as tw, \
            tqdm(total=total, desc=f"registered {os.path.basename(os.fspath(path))}", unit="tile",
                 leave=False) as bar:
        for k, (ow, oh, level, out_to0, src_to0) in enumerate(plans):
            opts = dict(shape=(len(channels), oh, ow), dtype=dtype, tile=(tile, tile), compression=compression,
                        photometric="minisblack")
            gen = _tiles(codex, level, out_to0, src_to0, affine, field, (oh, ow), tile, channels, bar)
            if k == 0:
                tw.write(gen, subifds=n_levels - 1, metadata=metadata, **opts)
            else:
                tw.write(gen, subfiletype=1, metadata=None, **opts)
    log.info("wrote %s (%d channels, %dx%d px at %.4f µm, %d levels%s)", path, len(channels), w0, h0, he_mpp,
             n_levels, ", through the displacement field" if field is not None else "")
