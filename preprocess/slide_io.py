"""Slide readers: H&E whole-slide images (OpenSlide) and CODEX pyramidal OME-TIFFs (tifffile + zarr).

Conventions (docs/FORMATS.md): pixel (x, y) = (column, row); level-0 coordinates; a level with downsample d
has its pixel c centred on level-0 coordinate (c + 0.5) * d - 0.5. Readers open lazily, work as context
managers, and never load a whole level-0 image unless asked to.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from preprocess.utils import PipelineError

log = logging.getLogger(__name__)

_UNIT_TO_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "Å": 1e-4}


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
        props = self._osr.properties
        for key in ("openslide.mpp-x", "aperio.MPP"):
            if key in props:
                try:
                    v = float(props[key])
                except ValueError:
                    continue
                if v > 0:
                    return v
        raise PipelineError(
            f"the H&E slide {self.path} has no microns-per-pixel in its metadata; pass --mpp (level-0 µm/px, "
            "e.g. 0.25 for 40x, 0.5 for 20x)"
        )

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
        """The level whose downsample is closest to, and not above, ``downsample`` (small tolerance)."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * 1.01:
                best = i
        return best

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


def _ome_channels_and_mpp(ome_xml: str | None) -> tuple[list[str] | None, float | None]:
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
    mpp = None
    if pixels.get("PhysicalSizeX"):
        unit = pixels.get("PhysicalSizeXUnit", "µm")
        mpp = float(pixels.get("PhysicalSizeX")) * _UNIT_TO_UM.get(unit, 1.0)
    return (names or None), mpp


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
        names, ome_mpp = _ome_channels_and_mpp(self._tif.ome_metadata)
        self.channel_names = names
        self.mpp = float(mpp) if mpp else ome_mpp
        if not self.mpp:
            raise PipelineError(
                f"the CODEX image {self.path} has no PhysicalSizeX in its OME-XML; pass --codex-mpp (µm/px)"
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


# ----------------------------------------------------------------------------------------------------------------
# marker panel, pairs


def _norm_name(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def read_marker_panel(path: str | os.PathLike) -> list[tuple[int, str]]:
    """Read a marker panel CSV (``channel,marker``; channel = 0-based index in the CODEX file)."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"marker panel not found: {path} (a CSV with columns channel,marker)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"channel", "marker"} <= set(rows[0]):
        raise PipelineError(f"marker panel {path} must have the columns channel,marker")
    try:
        panel = [(int(r["channel"]), r["marker"].strip()) for r in rows]
    except ValueError as e:
        raise PipelineError(f"marker panel {path}: channel must be a 0-based integer ({e})") from e
    names = [m for _, m in panel]
    if len(set(names)) != len(names):
        raise PipelineError(f"marker panel {path} lists a marker twice")
    return panel


def resolve_channels(codex: CodexImage, markers: list[str], panel: list[tuple[int, str]] | None,
                     panel_path: str | os.PathLike | None = None) -> list[int]:
    """Channel index in ``codex`` of each of ``markers``.

    With a panel, indices come from it (and must exist in the image); a name that differs from the OME channel
    name is only a warning, since the panel is the user's mapping. Without a panel, the OME channel names must
    contain every marker (case and punctuation ignored).
    """
    if panel is not None:
        by_name = {_norm_name(m): c for c, m in panel}
        missing = [m for m in markers if _norm_name(m) not in by_name]
        if missing:
            raise PipelineError(f"marker panel {panel_path} does not map the markers {missing}; add rows for them")
        idx = [by_name[_norm_name(m)] for m in markers]
        bad = [(m, i) for m, i in zip(markers, idx) if i >= codex.num_channels or i < 0]
        if bad:
            raise PipelineError(
                f"CODEX image {codex.path} has {codex.num_channels} channels but the panel {panel_path} maps "
                f"{bad[:5]} beyond them; check the panel matches this image"
            )
        if codex.channel_names:
            differ = [(m, codex.channel_names[i]) for m, i in zip(markers, idx)
                      if _norm_name(codex.channel_names[i]) != _norm_name(m)]
            if differ:
                log.warning("%s: panel names differ from OME channel names (panel wins): %s", codex.path, differ[:5])
        return idx
    if not codex.channel_names:
        raise PipelineError(
            f"CODEX image {codex.path} has no channel names in its OME-XML; give a marker panel CSV (channel,marker)"
        )
    by_name = {_norm_name(n): i for i, n in enumerate(codex.channel_names)}
    unknown = [m for m in markers if _norm_name(m) not in by_name]
    if unknown:
        raise PipelineError(
            f"CODEX image {codex.path} ({codex.num_channels} channels) lacks the markers {unknown}; "
            "give a marker panel CSV (channel,marker) that maps them"
        )
    return [by_name[_norm_name(m)] for m in markers]


def read_pairs(path: str | os.PathLike) -> dict[str, tuple[Path, Path | None]]:
    """Read ``pairs.csv`` (``he_slide,codex_image``, paths relative to the CSV's folder) -> {slide: (he, codex)}.

    An empty ``codex_image`` cell gives ``None``: that slide fails in the stages that need its CODEX (with a
    message naming the table), the others go on.
    """
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"pairing table not found: {path} (a CSV with columns he_slide,codex_image)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"he_slide", "codex_image"} <= set(rows[0]):
        raise PipelineError(f"pairing table {path} must have the columns he_slide,codex_image")
    from preprocess.utils import slide_id_from_path

    out: dict[str, tuple[Path, Path | None]] = {}
    for r in rows:
        he = (path.parent / r["he_slide"]).resolve() if not os.path.isabs(r["he_slide"]) else Path(r["he_slide"])
        cx = (r["codex_image"] or "").strip()
        sid = slide_id_from_path(he)
        codex = None if not cx else (path.parent / cx).resolve() if not os.path.isabs(cx) else Path(cx)
        if sid in out:
            raise PipelineError(f"pairing table {path} lists slide {sid} twice")
        out[sid] = (he, codex)
    return out


HE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")


def list_he_slides(folder: str | os.PathLike) -> dict[str, Path]:
    """H&E slides in a folder by slide id (file name up to the first dot)."""
    from preprocess.utils import slide_id_from_path

    folder = Path(folder)
    if not folder.is_dir():
        raise PipelineError(f"H&E folder not found: {folder}")
    return {slide_id_from_path(p): p for p in sorted(folder.iterdir()) if p.suffix.lower() in HE_EXTENSIONS}
