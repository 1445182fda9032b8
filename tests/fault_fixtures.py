"""Broken slides for fault tests: a copy of an Aperio-style JPEG TIFF with one corrupt tile.

    corrupt_tile("good.tif", "bad.tif", level=0, xy=(300, 300))   # the tile holding level px (300, 300)

The copy is byte-identical apart from two bytes of one tile's JPEG stream: the length of its first marker segment
(DQT, or SOF / SOS for abbreviated streams) becomes 1, which libjpeg rejects with "Bogus marker length" (OpenSlide
then raises ``openslide.OpenSlideError`` and keeps the handle in its error state). The file still opens: its TIFF
structure, the other tiles and every other level are untouched.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import tifffile

_SEGMENTS = (b"\xff\xdb", b"\xff\xc0", b"\xff\xc4", b"\xff\xda")  # DQT, SOF0, DHT, SOS: each has a 2-byte length


@dataclass(frozen=True)
class CorruptTile:
    """Where :func:`corrupt_tile` broke the file: the pyramid level (tiled pages in file order), the tile's index in
    that page, its box (x, y, w, h) in px at that level, and the byte offset of the overwritten length field."""

    level: int
    tile: int
    box: tuple[int, int, int, int]
    offset: int


def corrupt_tile(src: str | os.PathLike, dst: str | os.PathLike, level: int = 0,
                 xy: tuple[int, int] = (0, 0)) -> CorruptTile:
    """Copy ``src`` (a tiled JPEG TIFF, e.g. :func:`sample_data.writers.write_aperio_tiff`) to ``dst`` with the tile
    of ``level`` that holds level pixel ``xy`` = (x, y) corrupted (its first marker segment's length set to 1)."""
    src, dst = Path(src), Path(dst)
    with tifffile.TiffFile(src) as tif:
        pages = [p for p in tif.pages if p.is_tiled]
        if not 0 <= level < len(pages):
            raise ValueError(f"{src} has {len(pages)} tiled levels, asked for level {level}")
        page = pages[level]
        if page.compression != tifffile.COMPRESSION.JPEG:
            raise ValueError(f"{src} level {level} is {page.compression.name}, not JPEG")
        h, w = page.shape[:2]
        tw, th = page.tilewidth, page.tilelength
        x, y = int(xy[0]), int(xy[1])
        if not (0 <= x < w and 0 <= y < h):
            raise ValueError(f"pixel {xy} lies outside level {level} ({w} x {h} px)")
        index = (y // th) * math.ceil(w / tw) + x // tw
        start, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
    with open(src, "rb") as f:
        f.seek(start)
        data = f.read(count)
    found = [i for i in (data.find(m) for m in _SEGMENTS) if i >= 0]
    if not found:
        raise ValueError(f"no JPEG marker segment in tile {index} of {src} level {level}")
    at = start + min(found) + 2  # the segment's big-endian length field
    shutil.copyfile(src, dst)
    with open(dst, "r+b") as f:
        f.seek(at)
        f.write(b"\x00\x01")
    x0, y0 = (x // tw) * tw, (y // th) * th
    return CorruptTile(level, index, (x0, y0, min(tw, w - x0), min(th, h - y0)), at)
