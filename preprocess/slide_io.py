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
import threading
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from preprocess.codex_formats import describe_codex, ome_channels_and_mpp
from preprocess.pyramid import MPP_TOLERANCE, choose_level, same_mpp

log = logging.getLogger(__name__)

_UNIT_TO_UM = {"µm": 1.0, "um": 1.0, "μm": 1.0, "micron": 1.0, "nm": 1e-3, "pm": 1e-6, "Å": 1e-4, "mm": 1e3,
               "cm": 1e4, "m": 1e6}


# ----------------------------------------------------------------------------------------------------------------
# H&E


class SlideReadError(PipelineError):
    """A slide that opens but whose pixels cannot be decoded (a corrupt or truncated tile): one line naming the file,
    the pyramid level and the region; the stage fails that slide and goes on with the others."""


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
        # the geometry is kept here: after a read error OpenSlide refuses every further call on the handle
        self._dimensions = tuple(int(v) for v in self._osr.dimensions)
        self._level_dimensions = tuple(tuple(int(v) for v in d) for d in self._osr.level_dimensions)
        self._level_downsamples = tuple(float(d) for d in self._osr.level_downsamples)
        self._retired: list = []  # handles left in OpenSlide's error state, closed by close()
        self._swap = threading.Lock()

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
        return self._dimensions

    @property
    def level_count(self) -> int:
        return len(self._level_dimensions)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._level_downsamples

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._level_dimensions

    def best_level_for_downsample(self, downsample: float) -> int:
        """The level whose downsample is closest to, and not above, ``downsample`` (1% tolerance)."""
        return choose_level(self.level_downsamples, 1.0, downsample)[0]

    def level_for_mpp(self, mpp: float) -> tuple[int, float]:
        """The coarsest level whose pixels are at most ``mpp`` µm (1% tolerance): (level, nominal downsample)."""
        return choose_level(self.level_downsamples, self.mpp, mpp)

    # -- reads -------------------------------------------------------------------------------------------------
    def read_region(self, x: int, y: int, level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB region (h, w, 3) uint8 at ``level`` whose top-left is level-0 pixel (x, y); size = (w, h) at level.

        Transparent (outside-slide) pixels become white. A tile that cannot be decoded raises
        :class:`SlideReadError`, one line naming the file, the level and this region (x, y, w, h). OpenSlide leaves a
        handle unusable after an error (and a read in another thread fails with it), so a failed read is tried again
        on a handle of its own: the region is named only when that fails too, and when it succeeds that handle
        replaces the spoilt one (later reads of other regions go on).
        """
        import openslide

        x, y, level, w, h = int(x), int(y), int(level), int(size[0]), int(size[1])
        osr = self._osr
        try:
            img = osr.read_region((x, y), level, (w, h))
        except openslide.OpenSlideError:
            try:
                own = openslide.OpenSlide(str(self.path))
            except Exception as e:  # noqa: BLE001 - the file changed or vanished under us: name it with this region
                raise self._read_error(x, y, level, w, h, e) from None
            try:
                img = own.read_region((x, y), level, (w, h))
            except openslide.OpenSlideError as e:
                own.close()
                raise self._read_error(x, y, level, w, h, e) from None
            with self._swap:  # another thread may have replaced the spoilt handle already: then keep ours aside
                if self._osr is osr:
                    self._retired.append(osr)
                    self._osr = own
                else:
                    self._retired.append(own)
        arr = np.asarray(img)
        rgb, alpha = arr[..., :3], arr[..., 3:4]
        if alpha.min() < 255:
            a = alpha.astype(np.float32) / 255.0
            rgb = (rgb.astype(np.float32) * a + 255.0 * (1 - a)).round().astype(np.uint8)
        return np.ascontiguousarray(rgb)

    def _read_error(self, x: int, y: int, level: int, w: int, h: int, e: BaseException) -> SlideReadError:
        why = " ".join(str(e).split()) or "unknown error"
        return SlideReadError(
            f"cannot read {self.path} at level {level}, region x={x} y={y} w={w} h={h} (x, y level-0 px; w, h px at "
            f"level {level}): {type(e).__name__}: {why}; the file is truncated or corrupt (a tile that cannot be "
            "decoded): copy it again or re-export it from the scanner, or leave the slide out")

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
        for osr in (*self._retired, self._osr):
            osr.close()
        self._retired = []

    def __enter__(self) -> HESlide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------------------
# CODEX


_ome_channels_and_mpp = ome_channels_and_mpp  # moved to preprocess.codex_formats (kept for old imports)


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
    """A multi-channel CODEX image, axes (C, Y, X): OME-TIFF, QPTIFF (Fusion or Vectra/Polaris) or MCMICRO's
    ``registration/{sample}.ome.tif`` + ``markers.csv`` (:mod:`preprocess.codex_formats`). Only the full-resolution
    image and its reduced levels are read (no thumbnail, macro or label).

    Args:
        path: the image file.
        mpp: level-0 µm/px; overrides the file's pixel size (required when the file has none).
        markers_csv: MCMICRO marker names (default: ``markers.csv`` next to the image or one folder up).

    Attributes: ``channel_names`` (None: the file names none), ``band_names`` (a QPTIFF's fluorophores, else None),
    ``mpp``, ``format`` ("ome-tiff", "qptiff-fusion", "qptiff-vectra", "mcmicro", "tiff"), ``names_source``,
    ``mpp_warning`` (a QPTIFF whose TIFF tags and XML disagree, else None), ``shape`` (C, H, W) of level 0.
    """

    def __init__(self, path: str | os.PathLike, mpp: float | None = None,
                 markers_csv: str | os.PathLike | None = None):
        import tifffile
        import zarr

        self.path = Path(path)
        if not self.path.exists():
            raise PipelineError(f"CODEX image not found: {self.path}")
        try:
            self._tif = tifffile.TiffFile(str(self.path))
            self._tif.series  # noqa: B018 (parses the file: a broken one fails here)
        except Exception as e:
            raise PipelineError(f"tifffile cannot read the CODEX image {self.path} ({type(e).__name__}: {e})") from e
        try:
            meta = describe_codex(self._tif, self.path, mpp, markers_csv)
        except PipelineError:
            self._tif.close()
            raise
        except Exception as e:
            self._tif.close()
            raise PipelineError(f"cannot read the layout of the CODEX image {self.path} ({type(e).__name__}: "
                                f"{e}); convert it to OME-TIFF (python -m preprocess.convert_codex)") from e
        series = self._series = meta.series
        axes = series.axes.upper()
        if axes not in ("CYX", "YX", "QYX", "IYX"):
            self._tif.close()
            raise PipelineError(f"CODEX image {self.path} has axes {series.axes}; expected CYX (channels first)")
        self.channel_names, self.band_names = meta.channel_names, meta.band_names
        self.format, self.names_source, self.mpp_warning = meta.format, meta.names_source, meta.mpp_warning
        self.mpp = float(mpp) if mpp else meta.mpp
        if not self.mpp:
            self._tif.close()
            where = ("<ScanResolution><PixelSizeMicrons> in its XML nor TIFF resolution tags"
                     if self.format.startswith("qptiff") else "PhysicalSizeX in its OME-XML")
            raise PipelineError(
                f"the CODEX image {self.path} has no {where}; pass --codex-mpp (µm/px), or "
                "give this slide's codex_mpp in a pixel-size table (--pixel-sizes)"
            )
        store = series.aszarr()
        grp = zarr.open(store, mode="r")
        self._levels = [grp[str(i)] for i in range(len(series.levels))] if hasattr(grp, "keys") else [grp]
        if self._levels[0].ndim == 2:  # one channel (YX): read every level into (1, H, W) lazily
            self._levels = [_AddChannelAxis(lv) for lv in self._levels]
        c, h, w = self._levels[0].shape
        self.shape = (int(c), int(h), int(w))
        names = self.channel_names
        if names is not None and len(names) != c:
            if self.format == "mcmicro":
                self._tif.close()
                raise PipelineError(f"{self.names_source} lists {len(names)} markers but the CODEX image {self.path} "
                                    f"has {c} channels; one marker_name row per channel, in channel order")
            log.warning("%s: OME-XML names %d channels, the image has %d", self.path, len(names), c)
            self.channel_names = None

    def level0_pages(self) -> list:
        """The tifffile pages of level 0, one per channel (for readers that decode tiles directly)."""
        return list(self._series.levels[0].pages)

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
