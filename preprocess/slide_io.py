"""Slide readers: H&E whole-slide images (OpenSlide) and CODEX pyramidal OME-TIFFs (tifffile + zarr).

Which slides a run has is :func:`pipeline.cohort.resolve_slides`; which channel holds a marker is
:mod:`preprocess.panel`; a pixel size the metadata lacks or gets wrong comes from ``--mpp`` / ``--codex-mpp`` or a
per-slide table (:mod:`preprocess.pixel_sizes`).

Conventions (docs/FORMATS.md): pixel (x, y) = (column, row); level-0 coordinates; a level with downsample d
has its pixel c centred on level-0 coordinate (c + 0.5) * d - 0.5. Readers open lazily, work as context
managers, and never load a whole level-0 image unless asked to.
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from preprocess.pyramid import MPP_TOLERANCE, choose_level, same_mpp

log = logging.getLogger(__name__)

_UNIT_TO_UM = {"µm": 1.0, "um": 1.0, "μm": 1.0, "micron": 1.0, "nm": 1e-3, "pm": 1e-6, "Å": 1e-4, "mm": 1e3,
               "cm": 1e4, "m": 1e6}


# ----------------------------------------------------------------------------------------------------------------
# H&E


class HESlide:
    """An H&E whole-slide image read through OpenSlide.

    Args:
        path: any OpenSlide format (.svs, .tif, .ndpi, .mrxs, ...).
        mpp: level-0 microns per pixel; overrides the slide's metadata (needed when the file has none).
    """

    def __init__(self, path: str | os.PathLike, mpp: float | None = None):
        import openslide

        self.path = Path(path)
        if not self.path.exists():
            raise PipelineError(f"H&E slide not found: {self.path}")
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except Exception as e:  # openslide raises several types for unreadable files
            raise PipelineError(
                f"OpenSlide cannot read the H&E slide {self.path} ({type(e).__name__}: {e}); "
                "convert it to a pyramidal TIFF/SVS or check the file is complete"
            ) from e
        self.mpp = float(mpp) if mpp else self._mpp_from_properties()

    def _mpp_from_properties(self) -> float:
        """Level-0 µm/px from the slide properties; both axes are read and must agree within 1%."""
        props = self._osr.properties

        def read(keys: tuple[str, ...]) -> float | None:
            for key in keys:
                try:
                    v = float(props[key])
                except (KeyError, ValueError):
                    continue
                if v > 0:
                    return v
            return None

        mx, my = read(("openslide.mpp-x", "aperio.MPP")), read(("openslide.mpp-y", "aperio.MPP"))
        if mx is None and my is None:
            raise PipelineError(
                f"the H&E slide {self.path} has no microns-per-pixel in its metadata; pass --mpp (level-0 µm/px, "
                "e.g. 0.25 for 40x, 0.5 for 20x), or give this slide's he_mpp in a pixel-size table (--pixel-sizes)"
            )
        mx, my = mx or my, my or mx
        if not same_mpp(mx, my, MPP_TOLERANCE):
            raise PipelineError(
                f"the H&E slide {self.path} has non-square pixels ({mx:g} x {my:g} µm); the pipeline needs square "
                "pixels: resample the slide, or pass --mpp if the metadata is wrong"
            )
        return mx

    # -- properties --------------------------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in pixels."""
        return self._osr.dimensions

    @property
    def level_count(self) -> int:
        return self._osr.level_count

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(float(d) for d in self._osr.level_downsamples)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._osr.level_dimensions

    def best_level_for_downsample(self, downsample: float) -> int:
        """The level whose downsample is closest to, and not above, ``downsample`` (1% tolerance)."""
        return choose_level(self.level_downsamples, 1.0, downsample)[0]

    def level_for_mpp(self, mpp: float) -> tuple[int, float]:
        """The coarsest level whose pixels are at most ``mpp`` µm (1% tolerance): (level, nominal downsample)."""
        return choose_level(self.level_downsamples, self.mpp, mpp)

    # -- reads -------------------------------------------------------------------------------------------------
    def read_region(self, x: int, y: int, level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB region (h, w, 3) uint8 at ``level`` whose top-left is level-0 pixel (x, y); size = (w, h) at level.

        Transparent (outside-slide) pixels become white.
        """
        img = self._osr.read_region((int(x), int(y)), int(level), (int(size[0]), int(size[1])))
        arr = np.asarray(img)
        rgb, alpha = arr[..., :3], arr[..., 3:4]
        if alpha.min() < 255:
            a = alpha.astype(np.float32) / 255.0
            rgb = (rgb.astype(np.float32) * a + 255.0 * (1 - a)).round().astype(np.uint8)
        return np.ascontiguousarray(rgb)

    def thumbnail(self, max_size: int = 2048) -> tuple[np.ndarray, float]:
        """A whole-slide RGB thumbnail (h, w, 3) uint8 read from the smallest sufficient level.

        Returns the image and its downsample factor relative to level 0 (level-0 px per thumbnail px).
        """
        w0, h0 = self.dimensions
        target = max(w0, h0) / max_size
        level = self.best_level_for_downsample(max(target, 1.0))
        lw, lh = self.level_dimensions[level]
        img = self.read_region(0, 0, level, (lw, lh))
        ds = self.level_downsamples[level]
        if max(lw, lh) > max_size:
            from PIL import Image

            scale = max_size / max(lw, lh)
            nw, nh = max(1, round(lw * scale)), max(1, round(lh * scale))
            img = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
            ds = w0 / nw
        return img, float(ds)

    def close(self) -> None:
        self._osr.close()

    def __enter__(self) -> HESlide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------------------
# CODEX


def _ome_channels_and_mpp(ome_xml: str | None, path: Path,
                          need_size: bool = True) -> tuple[list[str] | None, float | None]:
    """Channel names and level-0 µm/px of an OME-XML; both pixel axes are read, their units must be known, and
    they must agree within 1% (else :class:`PipelineError` naming ``path``; with ``need_size`` False the size is
    not checked and None is returned for it)."""
    if not ome_xml:
        return None, None
    try:
        root = ET.fromstring(ome_xml)
    except ET.ParseError:
        return None, None
    ns = {"ome": root.tag.split("}")[0].strip("{")} if root.tag.startswith("{") else {}
    q = (lambda t: f"ome:{t}") if ns else (lambda t: t)
    image = root.find(q("Image"), ns)
    if image is None:
        return None, None
    pixels = image.find(q("Pixels"), ns)
    if pixels is None:
        return None, None
    names = [c.get("Name") or c.get("ID") or "" for c in pixels.findall(q("Channel"), ns)]
    if not need_size:
        return (names or None), None
    sizes = []
    for ax in ("X", "Y"):
        v = pixels.get(f"PhysicalSize{ax}")
        if not v:
            sizes.append(None)
            continue
        unit = pixels.get(f"PhysicalSize{ax}Unit", "µm")  # the OME schema's default unit
        if unit not in _UNIT_TO_UM:
            raise PipelineError(f"CODEX image {path}: PhysicalSize{ax}Unit {unit!r} is not a length unit this "
                                f"pipeline knows ({', '.join(_UNIT_TO_UM)}); pass --codex-mpp (µm/px)")
        sizes.append(float(v) * _UNIT_TO_UM[unit])
    mx, my = sizes
    if mx and my and not same_mpp(mx, my, MPP_TOLERANCE):
        raise PipelineError(f"CODEX image {path} has non-square pixels ({mx:g} x {my:g} µm); resample it, or pass "
                            "--codex-mpp if the metadata is wrong")
    return (names or None), (mx or my)


class _AddChannelAxis:
    """A (H, W) zarr array seen as (1, H, W), slicing lazily."""

    def __init__(self, arr):
        self._arr = arr
        self.shape = (1, *arr.shape)
        self.dtype = arr.dtype
        self.ndim = 3

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        out = np.asarray(self._arr[key[1:]])[None]
        return out[key[0] : key[0] + 1] if isinstance(key[0], int) else out[key[0]]


class CodexImage:
    """A multi-channel CODEX image (pyramidal OME-TIFF; also .qptiff where tifffile reads it), axes (C, Y, X).

    Args:
        path: the image file.
        mpp: level-0 µm/px; overrides the OME ``PhysicalSizeX`` (required when the file has none).
    """

    def __init__(self, path: str | os.PathLike, mpp: float | None = None):
        import tifffile
        import zarr

        self.path = Path(path)
        if not self.path.exists():
            raise PipelineError(f"CODEX image not found: {self.path}")
        try:
            self._tif = tifffile.TiffFile(str(self.path))
            series = self._tif.series[0]
        except Exception as e:
            raise PipelineError(f"tifffile cannot read the CODEX image {self.path} ({type(e).__name__}: {e})") from e
        self._series = series
        axes = series.axes.upper()
        if axes not in ("CYX", "YX", "QYX", "IYX"):
            raise PipelineError(f"CODEX image {self.path} has axes {series.axes}; expected CYX (channels first)")
        try:
            names, ome_mpp = _ome_channels_and_mpp(self._tif.ome_metadata, self.path, need_size=not mpp)
        except PipelineError:
            self._tif.close()
            raise
        self.channel_names = names
        self.mpp = float(mpp) if mpp else ome_mpp
        if not self.mpp:
            raise PipelineError(
                f"the CODEX image {self.path} has no PhysicalSizeX in its OME-XML; pass --codex-mpp (µm/px), or "
                "give this slide's codex_mpp in a pixel-size table (--pixel-sizes)"
            )
        store = series.aszarr()
        grp = zarr.open(store, mode="r")
        self._levels = [grp[str(i)] for i in range(len(series.levels))] if hasattr(grp, "keys") else [grp]
        if self._levels[0].ndim == 2:  # one channel (YX): read every level into (1, H, W) lazily
            self._levels = [_AddChannelAxis(lv) for lv in self._levels]
        c, h, w = self._levels[0].shape
        self.shape = (int(c), int(h), int(w))
        if names is not None and len(names) != c:
            log.warning("%s: OME-XML names %d channels, the image has %d", self.path, len(names), c)
            self.channel_names = None

    @property
    def num_channels(self) -> int:
        return self.shape[0]

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        return self.shape[2], self.shape[1]

    @property
    def level_count(self) -> int:
        return len(self._levels)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        w0 = self.shape[2]
        return tuple(w0 / lv.shape[2] for lv in self._levels)

    def level_for_mpp(self, mpp: float) -> tuple[int, float]:
        """The coarsest level whose pixels are at most ``mpp`` µm (1% tolerance): (level, nominal downsample)."""
        return choose_level(self.level_downsamples, self.mpp, mpp)

    def level(self, i: int):
        """The zarr array (C, H, W) of level ``i`` (lazy; slicing decodes only the tiles touched)."""
        return self._levels[i]

    def read_region(self, x0: int, y0: int, x1: int, y1: int, level: int = 0,
                    channels: list[int] | np.ndarray | None = None) -> np.ndarray:
        """Pixels [y0:y1, x0:x1] of ``level`` (level coordinates, clipped to the image) as (C, h, w)."""
        arr = self._levels[level]
        _, h, w = arr.shape
        x0, y0 = max(0, int(x0)), max(0, int(y0))
        x1, y1 = min(w, int(x1)), min(h, int(y1))
        if x1 <= x0 or y1 <= y0:
            nc = arr.shape[0] if channels is None else len(channels)
            return np.zeros((nc, 0, 0), dtype=arr.dtype)
        if channels is None:
            return np.asarray(arr[:, y0:y1, x0:x1])
        ch = np.asarray(channels)
        if len(ch) and np.all(np.diff(ch) == 1):
            return np.asarray(arr[int(ch[0]) : int(ch[-1]) + 1, y0:y1, x0:x1])
        return np.stack([np.asarray(arr[int(c), y0:y1, x0:x1]) for c in ch])

    def close(self) -> None:
        self._tif.close()

    def __enter__(self) -> CodexImage:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
