"""The CODEX formats users bring, read behind one reader (:class:`preprocess.slide_io.CodexImage`).

- **OME-TIFF**: channel names and pixel size in the OME-XML (``Channel/@Name``, ``PhysicalSizeX/Y``), the first
  OME Image (its SubIFD / multi-series levels) as the image.
- **QPTIFF** (Akoya, Software ``PerkinElmer-QPI``): every page's ImageDescription is a
  ``<PerkinElmer-QPI-ImageDescription>`` XML with its ``<ImageType>`` (FullResolution, ReducedResolution,
  Thumbnail, Overview/Macro, Label), ``<Name>`` (the band or fluorophore: ``Opal 520``, ``Cy5``, ``DAPI``) and,
  when the panel was entered, ``<Biomarker>`` (the stain: ``CD8``). Two dialects: Vectra/Polaris (the ScanProfile
  lists ``<ScanBands>`` with their ``<Name>``; the biomarker, when present, in ``<Biomarker>``) and PhenoCycler-
  Fusion (``<Biomarker>`` = the stain, ``<Name>`` = its reporter fluorophore). A channel's name is its
  ``<Biomarker>``; a file with no ``<Biomarker>`` at all has no channel names (only its fluorophores, kept as
  ``band_names``): the marker panel (``channel,marker``, channel = 0-based page index) must map them. The pixel size
  is the XML's ``ScanResolution/PixelSizeMicrons``; when the TIFF resolution tags say otherwise by more than 1% a
  warning is logged once per file and the XML wins. Only the full-resolution pages and the reduced levels are the
  image; the thumbnail, overview (macro) and label pages are skipped.
- **MCMICRO**: ``{sample}/registration/{sample}.ome.tif`` whose OME names are generic (ASHLAR's ``Channel 0``...),
  with the names in ``markers.csv`` (column ``marker_name``, row order = channel order) next to the image or one
  folder up; an explicit ``markers_csv`` wins.

``CodexImage(path, mpp=None, markers_csv=None)`` dispatches on the file itself (no format flag). DAPI is found by
name in every format (:func:`find_dapi`). ``python -m preprocess.convert_codex IN OUT.ome.tif``
writes any of them as a pyramidal OME-TIFF with names and pixel size.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError
from preprocess.pyramid import MPP_TOLERANCE, same_mpp

log = logging.getLogger(__name__)

UNIT_TO_UM = {"µm": 1.0, "um": 1.0, "μm": 1.0, "micron": 1.0, "nm": 1e-3, "pm": 1e-6, "Å": 1e-4, "mm": 1e3,
              "cm": 1e4, "m": 1e6}
DAPI_NAMES = ("dapi", "hoechst", "nuclei", "dna", "draq", "sytox", "nuclear")
QPI_ROOT = "PerkinElmer-QPI-ImageDescription"
MARKERS_CSV = "markers.csv"
_GENERIC_NAME = re.compile(r"^(channel|ch|c)[\s:_-]*\d+(:\d+)*$", re.IGNORECASE)
_TIFF_UNIT_UM = {2: 25400.0, 3: 10000.0}  # ResolutionUnit INCH, CENTIMETER -> µm per unit
_warned: set[tuple[str, str]] = set()


# ----------------------------------------------------------------------------------------------------------------
# names


def is_dapi_name(name: str | None) -> bool:
    """Whether a channel name denotes a nuclear stain: DAPI, DAPI-01, DAPI_2, Hoechst 33342, DNA1, ... (case,
    spaces, a cycle suffix and digits ignored)."""
    if not name:
        return False
    first = re.split(r"[-_.:/(]", re.sub(r"\s+", "", name.lower()))[0]
    return first.rstrip("0123456789") in DAPI_NAMES


def find_dapi(names: Sequence[str | None] | None) -> int | None:
    """Index of the first name that is a nuclear stain (:func:`is_dapi_name`), or None."""
    for i, n in enumerate(names or ()):
        if is_dapi_name(n):
            return i
    return None


def warn_once(path: str | os.PathLike, key: str, msg: str, *args) -> None:
    """Log a warning once per (file, kind) in this process (a file is opened by several stages and workers)."""
    k = (os.path.abspath(os.fspath(path)), key)
    if k not in _warned:
        _warned.add(k)
        log.warning(msg, *args)


# ----------------------------------------------------------------------------------------------------------------
# OME-TIFF


def ome_channels_and_mpp(ome_xml: str | None, path: Path,
                         need_size: bool = True) -> tuple[list[str] | None, float | None]:
    """Channel names and level-0 µm/px of an OME-XML (its first Image); both pixel axes are read, their units must be
    known, and they must agree within 1% (else :class:`PipelineError` naming ``path``; with ``need_size`` False the
    size is not checked and None is returned for it)."""
    if not ome_xml:
        return None, None
    try:
        root = ET.fromstring(ome_xml)
    except ET.ParseError:
        return None, None
    ns = {"ome": root.tag.split("}")[0].strip("{")} if root.tag.startswith("{") else {}
    q = (lambda t: f"ome:{t}") if ns else (lambda t: t)
    image = root.find(q("Image"), ns)
    pixels = image.find(q("Pixels"), ns) if image is not None else None
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
        if unit not in UNIT_TO_UM:
            raise PipelineError(f"CODEX image {path}: PhysicalSize{ax}Unit {unit!r} is not a length unit this "
                                f"pipeline knows ({', '.join(UNIT_TO_UM)}); pass --codex-mpp (µm/px)")
        sizes.append(float(v) * UNIT_TO_UM[unit])
    mx, my = sizes
    if mx and my and not same_mpp(mx, my, MPP_TOLERANCE):
        raise PipelineError(f"CODEX image {path} has non-square pixels ({mx:g} x {my:g} µm); resample it, or pass "
                            "--codex-mpp if the metadata is wrong")
    return (names or None), (mx or my)


def is_generic_name(name: str | None) -> bool:
    """Whether an OME channel name says nothing about the marker (empty, ``Channel 0``, ``Channel:0:3``)."""
    return not name or bool(_GENERIC_NAME.match(name.strip()))


# ----------------------------------------------------------------------------------------------------------------
# MCMICRO


def find_markers_csv(image: str | os.PathLike) -> Path | None:
    """MCMICRO's ``markers.csv`` of an image: next to it, else one folder up (``{sample}/registration/x.ome.tif``
    -> ``{sample}/markers.csv``); None when neither exists."""
    image = Path(image)
    for folder in (image.parent, image.parent.parent):
        p = folder / MARKERS_CSV
        if p.is_file():
            return p
    return None


def read_markers_csv(path: str | os.PathLike) -> list[str]:
    """Marker names of an MCMICRO ``markers.csv`` (column ``marker_name``), in row order = channel order."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"markers file not found: {path} (MCMICRO's markers.csv, column marker_name)")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    if not rows or "marker_name" not in rows[0]:
        raise PipelineError(f"{path} has no marker_name column; MCMICRO's markers.csv lists one marker per channel, "
                            "in channel order, in a column marker_name")
    names = [(r["marker_name"] or "").strip() for r in rows]
    empty = [i + 2 for i, n in enumerate(names) if not n]
    if empty:
        raise PipelineError(f"{path}: rows {empty[:5]} have an empty marker_name; name every channel")
    return names


# ----------------------------------------------------------------------------------------------------------------
# QPTIFF


@dataclass(frozen=True)
class QpiPage:
    """What one QPTIFF page's ``PerkinElmer-QPI-ImageDescription`` says (None: the element is absent)."""

    image_type: str | None
    name: str | None
    biomarker: str | None
    mpp: float | None
    bands: tuple[str, ...]


def _text(root: ET.Element, path: str) -> str | None:
    e = root.find(path)
    return e.text.strip() if e is not None and e.text and e.text.strip() else None


def parse_qpi_description(description: str | None) -> QpiPage | None:
    """A page's QPI XML, or None when the description is not one. The declaration's utf-16 (written by the
    scanners while the text is UTF-8) is ignored."""
    if not description or QPI_ROOT not in description[:400]:
        return None
    text = re.sub(r"^\s*<\?xml[^>]*\?>", "", description.strip("\x00 \r\n"))
    try:
        root = ET.fromstring(text)
    except ET.ParseError:
        return None
    if root.tag != QPI_ROOT:
        return None
    mpp = _text(root, ".//ScanResolution/PixelSizeMicrons")
    try:
        mpp_v = float(mpp) if mpp else None
    except ValueError:
        mpp_v = None
    bands = tuple(n.text.strip() for n in root.iterfind(".//ScanBands//Name") if n.text and n.text.strip())
    return QpiPage(_text(root, "ImageType"), _text(root, "Name"), _text(root, "Biomarker"),
                   mpp_v if mpp_v and mpp_v > 0 else None, bands)


def is_qptiff(tif) -> bool:
    """Whether a tifffile.TiffFile is a QPTIFF (Software ``PerkinElmer-QPI`` or the QPI XML on page 0)."""
    page = tif.pages.first
    return bool(page.software[:15] == "PerkinElmer-QPI" or parse_qpi_description(page.description))


def tag_mpp(page) -> float | None:
    """µm/px from a page's TIFF XResolution/YResolution tags (inch or centimetre units); None when absent/unitless."""
    try:
        unit = int(page.tags["ResolutionUnit"].value)
        xr = page.tags["XResolution"].value
        yr = page.tags["YResolution"].value
    except (KeyError, TypeError, ValueError):
        return None
    if unit not in _TIFF_UNIT_UM:
        return None
    vals = [r[0] / r[1] if isinstance(r, tuple) and r[1] else float(r) for r in (xr, yr)]
    if min(vals) <= 0:
        return None
    return _TIFF_UNIT_UM[unit] / vals[0]


def qptiff_levels(tif) -> tuple[list[list], list[QpiPage]]:
    """The pages of the full-resolution image of a QPTIFF and of each reduced level (one page per channel each,
    in file order), and the parsed XML of the full-resolution pages. Thumbnail, overview/macro and label pages are
    skipped. Pages are classified by their ``ImageType``; a file without it falls back to shapes (the leading run of
    equal-shaped single-sample pages, then runs of as many pages at each smaller shape)."""
    pages = list(tif.pages)
    info = [parse_qpi_description(p.description) for p in pages]
    typed = any(q is not None and q.image_type for q in info)

    def full(i: int) -> bool:
        if typed:
            return info[i] is not None and (info[i].image_type or "").lower() == "fullresolution"
        p0 = pages[0]
        return pages[i].shape == p0.shape and pages[i].samplesperpixel == 1

    i = 0
    while i < len(pages) and full(i):
        i += 1
    n = i
    if n == 0:
        raise PipelineError(f"QPTIFF {tif.filehandle.path}: no full-resolution page (ImageType FullResolution); "
                            "convert it with the scanner's software or to OME-TIFF")
    levels = [pages[:n]]
    run: list = []
    for p, q in zip(pages[n:], info[n:]):
        reduced = ((q.image_type or "").lower() == "reducedresolution") if typed and q is not None else (
            not typed and p.samplesperpixel == 1 and p.ndim == 2)
        if not reduced or p.samplesperpixel != 1:
            continue
        if run and p.shape != run[0].shape:
            run = []
        run.append(p)
        if len(run) == n:
            if run[0].shape[0] < levels[-1][0].shape[0]:
                levels.append(run)
            run = []
    return levels, [q for q in info[:n]]


def qptiff_names(path: Path, xml: list[QpiPage | None]) -> tuple[list[str] | None, list[str] | None, str]:
    """(channel names, band/fluorophore names, dialect) of a QPTIFF's full-resolution pages: names are the
    ``<Biomarker>`` of each page (a page without one: its ``<Name>``); None when no page has a ``<Biomarker>``. The
    dialect is "qptiff-vectra" when the ScanProfile lists ``<ScanBands>``, else "qptiff-fusion"."""
    n = len(xml)
    bands = [q.name if q is not None else None for q in xml]
    listed = next((q.bands for q in xml if q is not None and q.bands), ())
    if any(b is None for b in bands) and len(listed) == n:  # Vectra: the band names of the ScanProfile
        bands = [b or listed[i] for i, b in enumerate(bands)]
    dialect = "qptiff-vectra" if listed else "qptiff-fusion"
    markers = [q.biomarker if q is not None else None for q in xml]
    if not any(markers):
        return None, (bands if any(bands) else None), dialect
    names = [m or b or "" for m, b in zip(markers, bands)]
    return names, (bands if any(bands) else None), dialect


def qptiff_mpp(path: Path, xml: list[QpiPage | None], page0) -> tuple[float | None, str | None]:
    """Level-0 µm/px of a QPTIFF: the XML's ``PixelSizeMicrons``, else the TIFF resolution tags, else None; and the
    disagreement (tags vs XML by more than 1%) as one line, also logged once per file, else None."""
    x = next((q.mpp for q in xml if q is not None and q.mpp), None)
    t = tag_mpp(page0)
    if x and t and not same_mpp(x, t, MPP_TOLERANCE):
        msg = (f"{path}: the QPTIFF XML says {x:.4g} µm/px (ScanResolution/PixelSizeMicrons) but its TIFF resolution "
               f"tags say {t:.4g} µm/px; using the XML (pass --codex-mpp to override)")
        warn_once(path, "qptiff-mpp", "%s", msg)
        return x, msg
    return x or t, None


# ----------------------------------------------------------------------------------------------------------------
# one description of any CODEX file


@dataclass
class CodexMeta:
    """What :func:`describe_codex` found: the full-resolution image's levels (tifffile series; level 0 first),
    channel names (None: the file names none), band/fluorophore names (QPTIFF only), level-0 µm/px (None: the file
    says none), the format ("ome-tiff", "qptiff-fusion", "qptiff-vectra", "mcmicro", "tiff") and where the names
    came from."""

    series: object
    channel_names: list[str] | None
    band_names: list[str] | None
    mpp: float | None
    format: str
    names_source: str
    mpp_warning: str | None = None


def _qpi_series(levels: list[list]):
    """A tifffile series (C, Y, X) of the full-resolution pages whose ``levels`` are the reduced ones."""
    import tifffile

    out = []
    for pages in levels:
        key = pages[0]
        out.append(tifffile.TiffPageSeries(pages, (len(pages), *key.shape), key.dtype, "CYX", name="Baseline",
                                           kind="qpi"))
    base = out[0]
    base.levels.extend(out[1:])
    return base


def describe_codex(tif, path: str | os.PathLike, mpp: float | None = None,
                   markers_csv: str | os.PathLike | None = None) -> CodexMeta:
    """Describe an open tifffile.TiffFile of a CODEX image in any supported format (module docstring).

    Args:
        tif: the open file.
        path: its path (messages, MCMICRO's markers.csv next to it or one folder up).
        mpp: level-0 µm/px given by the user: the file's is then not read (nor checked).
        markers_csv: channel names (``marker_name`` column; MCMICRO's markers.csv): used for any format when given;
            default for non-QPTIFF files: ``markers.csv`` found by :func:`find_markers_csv`.
    """
    path = Path(path)
    if is_qptiff(tif):
        levels, xml = qptiff_levels(tif)
        names, bands, fmt = qptiff_names(path, xml)
        px, warning = (None, None) if mpp else qptiff_mpp(path, xml, levels[0][0])
        src = f"QPTIFF <Biomarker> of {path.name}" if names else "none (QPTIFF pages name only fluorophores)"
        series = _qpi_series(levels)
        if markers_csv:  # the user's names win
            names, src = read_markers_csv(markers_csv), str(markers_csv)
    else:
        series, warning = tif.series[0], None
        names, px = ome_channels_and_mpp(tif.ome_metadata, path, need_size=not mpp)
        bands, fmt = None, "ome-tiff" if tif.ome_metadata else "tiff"
        src = "OME-XML" if names else "none"
        mc = Path(markers_csv) if markers_csv else find_markers_csv(path)
        if mc is not None:
            listed = read_markers_csv(mc)
            real = [n for n in (names or []) if not is_generic_name(n)]
            if real and len(listed) == len(names or []) and [n.lower() for n in listed] != [
                    n.lower() for n in names]:
                warn_once(path, "markers-csv", "%s: its OME channel names (%s, ...) differ from %s (%s, ...); using "
                          "%s", path, ", ".join(names[:3]), mc, ", ".join(listed[:3]), mc.name)
            names, src, fmt = listed, str(mc), "mcmicro"
    return CodexMeta(series, names, bands, px if not mpp else None, fmt, src, warning)


def full_resolution_pages(tif) -> list:
    """The level-0 pages of the image :func:`describe_codex` reads (one per channel), for direct tile readers."""
    if is_qptiff(tif):
        return list(qptiff_levels(tif)[0][0])
    return list(tif.series[0].levels[0].pages)


def no_names_message(codex) -> str:
    """The one line for a CODEX image without channel names: a QPTIFF names its fluorophores only, so a marker
    panel with 0-based channel (page) indices must say which stain each channel holds."""
    fmt = getattr(codex, "format", "")
    if fmt.startswith("qptiff"):
        bands = getattr(codex, "band_names", None) or []
        seen = ", ".join(f"{i}: {b}" for i, b in enumerate(bands[:6])) + (" ..." if len(bands) > 6 else "")
        seen = f": {seen}" if seen else ""
        return (f"QPTIFF {codex.path} names no biomarkers (its pages name only the fluorophores{seen}); give a "
                "marker panel CSV (--panel, columns channel,marker; channel = 0-based page index of the "
                "full-resolution image)")
    return (f"CODEX image {codex.path} has no channel names (OME-XML, markers.csv); give a marker panel CSV "
            "(--panel, columns channel,marker; channel = 0-based index in the CODEX file)")
