"""Deterministic writers for the sample-cohort images.

- :func:`write_aperio_tiff`: an RGB H&E pyramid as an Aperio-style tiled JPEG TIFF (every level a tiled page of the
  main IFD chain, downsample 4 per level, ``MPP``/``AppMag`` in the first ImageDescription) so that OpenSlide reports
  all levels and ``openslide.mpp-x``.
- :func:`write_ome_pyramid`: a multi-channel uint16 OME-TIFF, one OME Image with axes CYX, pyramid levels in
  SubIFDs (downsample 2 per level, area averaged), tiled and zstd-compressed, with its own OME-XML (fixed UUID, no
  timestamps), streamed channel by channel.

Both write to ``path + ".tmp"`` and ``os.replace`` it, so a crash never leaves a half-written file at ``path``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from xml.sax.saxutils import quoteattr

import numpy as np
import tifffile

from .render import downsample_mean

APERIO_HEADER = "Aperio Image Library v12.0.15"


def _level_shapes(shape: tuple[int, int], factor: int, min_side: int, min_levels: int) -> list[tuple[int, int]]:
    """Shapes of pyramid levels: level 0 = shape, each next ceil-divided by factor, until max side < min_side."""
    shapes = [shape]
    while max(shapes[-1]) >= min_side or len(shapes) < min_levels:
        h, w = shapes[-1]
        if h == 1 and w == 1:
            break
        shapes.append((-(-h // factor), -(-w // factor)))
    return shapes


def write_aperio_tiff(path: str | Path, rgb: np.ndarray, mpp: float, app_mag: int = 20, quality: int = 90,
                      tile: int = 256, min_side: int = 512) -> list[tuple[int, int]]:
    """Write ``rgb`` (H, W, 3) uint8 as an Aperio-style pyramidal JPEG TIFF; returns the (H, W) of every level.

    Levels are area-averaged by 4 until the longest side is < ``min_side`` (at least 2 levels). Level 0 carries
    ``MPP = mpp|AppMag = app_mag`` in its ImageDescription; ``mpp`` is µm per level-0 pixel.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    h, w = rgb.shape[:2]
    shapes = _level_shapes((h, w), 4, min_side, 2)
    levels = [rgb]
    for _ in shapes[1:]:
        levels.append(downsample_mean(levels[-1], 4))
    opts = dict(photometric="rgb", tile=(tile, tile), compression="jpeg", compressionargs={"level": quality},
                metadata=None, software=False)
    with tifffile.TiffWriter(tmp, bigtiff=rgb.nbytes > 2**31) as tif:
        for i, lev in enumerate(levels):
            lh, lw = lev.shape[:2]
            if i == 0:
                desc = (f"{APERIO_HEADER}\r\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) JPEG/RGB Q={quality}"
                        f"|AppMag = {app_mag}|MPP = {mpp:g}")
            else:
                desc = f"{APERIO_HEADER}\r\n{w}x{h} -> {lw}x{lh} - |AppMag = {app_mag}|MPP = {mpp:g}"
            tif.write(lev, description=desc, subfiletype=0 if i == 0 else 1, **opts)
    os.replace(tmp, path)
    return [lev.shape[:2] for lev in levels]


def ome_xml(name: str, channels: Sequence[str], shape: tuple[int, int], mpp: float, uid: str) -> str:
    """OME-XML of one uint16 Image with ``len(channels)`` channels (axes CYX, one IFD per channel), pixel size µm."""
    h, w = shape
    ch = "".join(f'<Channel ID="Channel:0:{i}" Name={quoteattr(c)} SamplesPerPixel="1"/>'
                 for i, c in enumerate(channels))
    td = "".join(f'<TiffData FirstC="{i}" FirstT="0" FirstZ="0" IFD="{i}" PlaneCount="1"/>'
                 for i in range(len(channels)))
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
        'xsi:schemaLocation="http://www.openmicroscopy.org/Schemas/OME/2016-06 '
        'http://www.openmicroscopy.org/Schemas/OME/2016-06/ome.xsd" '
        f'UUID="urn:uuid:{uid}" Creator="hex-pipeline sample_data">'
        f'<Image ID="Image:0" Name={quoteattr(name)}>'
        f'<Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint16" SizeX="{w}" SizeY="{h}" '
        f'SizeC="{len(channels)}" SizeZ="1" SizeT="1" PhysicalSizeX="{mpp:g}" PhysicalSizeXUnit="µm" '
        f'PhysicalSizeY="{mpp:g}" PhysicalSizeYUnit="µm" BigEndian="false" Interleaved="false">'
        f"{ch}{td}</Pixels></Image></OME>"
    )


def write_ome_pyramid(path: str | Path, channels: Iterable[np.ndarray], names: Sequence[str], shape: tuple[int, int],
                      mpp: float, uid_seed: str, tile: int = 512, min_side: int = 1000,
                      zstd_level: int = 1) -> list[tuple[int, int]]:
    """Stream uint16 channel images (each ``shape`` (H, W), in ``names`` order) into a pyramidal OME-TIFF.

    Level 0 holds one IFD per channel; each IFD has SubIFDs with the channel downsampled by 2, 4, ... (area mean)
    until the longest side is < ``min_side`` (at least one SubIFD level). ``uid_seed`` makes the OME UUID
    deterministic. Returns the (H, W) of every level.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    h, w = shape
    shapes = _level_shapes((h, w), 2, min_side, 2)
    n_sub = len(shapes) - 1
    lower: list[list[np.ndarray]] = [[] for _ in range(n_sub)]
    uid = str(uuid.uuid5(uuid.NAMESPACE_URL, "hex-sample-data/" + uid_seed))
    res = 1e4 / mpp  # pixels per cm

    def tiles(images: Iterable[np.ndarray], lev: int) -> Iterable[np.ndarray]:
        n = 0
        for img in images:
            if lev == 0 and (img.shape != (h, w) or img.dtype != np.uint16):
                raise ValueError(f"channel {n}: expected uint16 {shape}, got {img.dtype} {img.shape}")
            if lev < n_sub:
                lower[lev].append(downsample_mean(img, 2))
            for y in range(0, img.shape[0], tile):
                for x in range(0, img.shape[1], tile):
                    yield img[y:y + tile, x:x + tile]
            n += 1
        if n != len(names):
            raise ValueError(f"got {n} channels for {len(names)} names")

    def drain(lev: int) -> Iterable[np.ndarray]:
        while lower[lev]:
            yield lower[lev].pop(0)

    opts = dict(photometric="minisblack", tile=(tile, tile), compression="zstd",
                compressionargs={"level": zstd_level}, metadata=None, software=False,
                resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        tif.write(tiles(channels, 0), shape=(len(names), h, w), dtype=np.uint16, subifds=n_sub,
                  resolution=(res, res), description=ome_xml(path.name.split(".")[0], names, shape, mpp, uid).encode(),
                  **opts)
        for lev in range(n_sub):
            f = 2 ** (lev + 1)
            tif.write(tiles(drain(lev), lev + 1), shape=(len(names), *shapes[lev + 1]), dtype=np.uint16,
                      subfiletype=1, resolution=(res / f, res / f), **opts)
    os.replace(tmp, path)
    return shapes
