"""Region readers of CODEX level 0 for the marker quantification: direct tile decoding (threads read regions at
once), and a zarr fallback for layouts the direct reader does not handle."""

from __future__ import annotations

import os
import threading

import numpy as np

from preprocess.codex_formats import full_resolution_pages
from preprocess.slide_io import CodexImage, SlideReadError


def codex_read_error(path: str | os.PathLike, x0: int, y0: int, x1: int, y1: int, e: Exception) -> SlideReadError:
    """One line naming the CODEX file, level 0 and the region whose tiles could not be decoded."""
    return SlideReadError(f"cannot read the CODEX image {path} at level 0, region x={x0} y={y0} w={x1 - x0} "
                          f"h={y1 - y0} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); the file "
                          "is truncated or corrupt: copy it again or re-export it, or leave the slide out")


class TiledRegionReader:
    """Reads (C, h, w) regions of level 0 of a tiled multi-page TIFF by decoding its tiles directly.

    One page per channel (OME-TIFF CYX; a QPTIFF's full-resolution pages); each tile is read with ``os.pread`` and
    decoded by tifffile's own decoder (imagecodecs releases the GIL), so several threads can read regions at once.
    ``read`` returns a view into a tile-aligned buffer. Raises ValueError at construction when the file does not
    have that layout (callers fall back to :meth:`CodexImage.read_region`).
    """

    def __init__(self, path: str | os.PathLike, channels: list[int], shape: tuple[int, int, int]):
        import tifffile

        self.path = str(path)
        self._tif = tifffile.TiffFile(self.path)
        try:
            pages = full_resolution_pages(self._tif)  # QPTIFF: its full-resolution pages, not the thumbnail
            c, h, w = shape
            if len(pages) != c:
                raise ValueError(f"{len(pages)} pages for {c} channels")
            key = pages[0].keyframe
            if not key.is_tiled or key.tiledepth != 1 or key.samplesperpixel != 1 or key.shape[-2:] != (h, w):
                raise ValueError("level 0 is not tiled one channel per page")
            self._pages = [pages[i] for i in channels]
            for p in self._pages:
                if p.keyframe.hash != key.hash:
                    raise ValueError("channels have different tiling or encoding")
            self._decode = key.decode  # built once here; thread-safe afterwards
            self._jpegtables = getattr(key, "jpegtables", None)
            self.tile = (int(key.tilelength), int(key.tilewidth))
            self._ntx = (w + self.tile[1] - 1) // self.tile[1]
            self._offsets = [np.asarray(p.dataoffsets) for p in self._pages]
            self._counts = [np.asarray(p.databytecounts) for p in self._pages]
            self.dtype = key.dtype
            self.shape = (len(channels), h, w)
        except Exception:
            self._tif.close()
            raise
        self._fd = os.open(self.path, os.O_RDONLY)

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Level-0 pixels [y0:y1, x0:x1] of the selected channels, (C, y1 - y0, x1 - x0)."""
        tl, tw = self.tile
        tx0, tx1 = x0 // tw, (x1 - 1) // tw + 1
        ty0, ty1 = y0 // tl, (y1 - 1) // tl + 1
        buf = np.zeros((len(self._pages), (ty1 - ty0) * tl, (tx1 - tx0) * tw), self.dtype)
        kw = {"jpegtables": self._jpegtables} if self._jpegtables is not None else {}
        for c in range(len(self._pages)):
            offs, cnts = self._offsets[c], self._counts[c]
            for ty in range(ty0, ty1):
                for tx in range(tx0, tx1):
                    i = ty * self._ntx + tx
                    if cnts[i] == 0:
                        continue
                    try:
                        seg, _, _ = self._decode(os.pread(self._fd, int(cnts[i]), int(offs[i])), i, **kw)
                    except Exception as e:  # noqa: BLE001 - any codec error of a damaged tile: one line
                        raise codex_read_error(self.path, x0, y0, x1, y1, e) from e
                    seg = seg.reshape(seg.shape[-3], seg.shape[-2])
                    yy, xx = (ty - ty0) * tl, (tx - tx0) * tw
                    buf[c, yy : yy + seg.shape[0], xx : xx + seg.shape[1]] = seg[:tl, :tw]
        return buf[:, y0 - ty0 * tl : y1 - ty0 * tl, x0 - tx0 * tw : x1 - tx0 * tw]

    def close(self) -> None:
        os.close(self._fd)
        self._tif.close()


class ZarrRegionReader:
    """Fallback: CodexImage.read_region (zarr), serialised with a lock."""

    def __init__(self, codex: CodexImage, channels: list[int]):
        self._codex, self._channels = codex, channels
        self._lock = threading.Lock()
        self.tile = tuple(int(v) for v in codex.level(0).chunks[-2:])

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        with self._lock:
            try:
                return self._codex.read_region(x0, y0, x1, y1, 0, channels=self._channels)
            except SlideReadError:
                raise
            except Exception as e:  # noqa: BLE001 - any codec error of a damaged tile: one line
                raise codex_read_error(self._codex.path, x0, y0, x1, y1, e) from e

    def close(self) -> None:
        pass


_ZarrRegionReader = ZarrRegionReader
