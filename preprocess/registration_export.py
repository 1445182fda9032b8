"""Write a CODEX image resampled into its H&E slide's pixel grid (``registration/{slide}_registered.ome.tif``).

The output is a pyramidal OME-TIFF (one Image, axes CYX, SubIFD pyramid, the CODEX dtype and channel names,
PhysicalSizeX/Y = the H&E pixel size), so it overlays the H&E in QuPath or napari. It is streamed: every output
tile of every channel is warped on its own from the CODEX region it needs, so memory stays at one tile, whatever
the image size. Pyramid level k (downsample 2^k) is resampled directly from the finest CODEX level whose pixel
size does not exceed the output pixel size (bilinear), not from the written level 0.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator

import cv2
import numpy as np
from tqdm.auto import tqdm

from preprocess.registration_qc import apply_affine, scale_to_level0
from preprocess.slide_io import CodexImage
from preprocess.utils import atomic_path

log = logging.getLogger(__name__)


def _codex_level_at_most(codex: CodexImage, mpp: float) -> tuple[int, float]:
    from preprocess.register import codex_level_for

    return codex_level_for(codex, mpp)


def _tiles(codex: CodexImage, level: int, to_out: np.ndarray, out_hw: tuple[int, int], tile: int,
           channels: list[int], bar: tqdm) -> Iterator[np.ndarray]:
    """Tiles (tile, tile) of every channel (channel-major, then row-major) of the warped CODEX level.

    ``to_out`` maps CODEX level px -> output px. Edge tiles are zero-padded to the full tile size.
    """
    arr = codex.level(level)
    _, sh, sw = arr.shape
    inv = np.linalg.inv(to_out)
    oh, ow = out_hw
    dtype = arr.dtype
    for c in channels:
        for y0 in range(0, oh, tile):
            for x0 in range(0, ow, tile):
                out = np.zeros((tile, tile), dtype)
                h, w = min(tile, oh - y0), min(tile, ow - x0)
                corners = np.array([[x0, y0], [x0 + w - 1, y0], [x0, y0 + h - 1], [x0 + w - 1, y0 + h - 1]], float)
                src = apply_affine(inv, corners)
                sx0, sy0 = (np.floor(src.min(0)).astype(int) - 2).clip(0)
                sx1 = min(sw, int(math.ceil(src[:, 0].max())) + 3)
                sy1 = min(sh, int(math.ceil(src[:, 1].max())) + 3)
                if sx1 > sx0 and sy1 > sy0:
                    region = np.asarray(arr[c, sy0:sy1, sx0:sx1])
                    m = (np.array([[1, 0, -x0], [0, 1, -y0], [0, 0, 1]]) @ to_out
                         @ np.array([[1, 0, sx0], [0, 1, sy0], [0, 0, 1]]))
                    src_img = region.astype(np.float32) if region.dtype not in (np.uint8, np.uint16, np.float32) \
                        else region
                    warped = cv2.warpAffine(src_img, m[:2], (w, h), flags=cv2.INTER_LINEAR,
                                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
                    out[:h, :w] = warped.astype(dtype, copy=False)
                bar.update(1)
                yield out


def write_registered_ome(codex: CodexImage, affine: np.ndarray, he_dims: tuple[int, int], he_mpp: float,
                         path: str | os.PathLike, tile: int = 512, min_level_px: int = 512,
                         compression: str = "zlib") -> None:
    """Write ``codex`` warped by ``affine`` (CODEX level-0 px -> H&E level-0 px) into the H&E grid.

    Args:
        codex: the CODEX image (all channels are written, in file order).
        affine: 3x3 CODEX level-0 -> H&E level-0 pixel affine.
        he_dims: H&E level-0 (width, height) in px = the output level-0 size.
        he_mpp: H&E level-0 µm/px = the output PhysicalSizeX/Y.
        path: output ``.ome.tif`` (written atomically).
        tile: tile side in px (a multiple of 16).
        min_level_px: pyramid levels are added (2x each) until the longer side is below this.
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
        level, dm = _codex_level_at_most(codex, he_mpp * d)
        to_out = np.linalg.inv(scale_to_level0(d)) @ affine @ scale_to_level0(dm)
        plans.append((ow, oh, level, to_out))
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
        for k, (ow, oh, level, to_out) in enumerate(plans):
            opts = dict(shape=(len(channels), oh, ow), dtype=dtype, tile=(tile, tile), compression=compression,
                        photometric="minisblack")
            gen = _tiles(codex, level, to_out, (oh, ow), tile, channels, bar)
            if k == 0:
                tw.write(gen, subifds=n_levels - 1, metadata=metadata, **opts)
            else:
                tw.write(gen, subfiletype=1, metadata=None, **opts)
    log.info("wrote %s (%d channels, %dx%d px at %.4f µm, %d levels)", path, len(channels), w0, h0, he_mpp, n_levels)
