"""Deterministic writers of synthetic slides: the sample-cohort images, the tests' slides and the benchmark's data.

- :func:`write_aperio_tiff`: an RGB H&E pyramid as an Aperio-style tiled JPEG TIFF (every level a tiled page of the
  main IFD chain, area averaged, downsample 4 per level unless given, ``MPP``/``AppMag`` in the first
  ImageDescription) so that OpenSlide reports all levels and ``openslide.mpp-x``.
- :func:`write_ome_pyramid`: a multi-channel uint16 OME-TIFF, one OME Image with axes CYX, pyramid levels in
  SubIFDs (downsample 2 per level, area averaged), tiled and compressed (zstd unless given), with its own OME-XML
  (deterministic UUID, no timestamps), streamed channel by channel from an iterable or a (C, H, W) array.
- :func:`write_ome_tiles`: the OME-TIFF container of :func:`write_ome_pyramid` filled from tiles the caller yields
  per level (arrays, or bytes already encoded with ``compression``: fast synthetic data for benchmarks).
- :func:`write_qptiff` / :func:`write_mcmicro` / :func:`write_codex`: the same CODEX pixels as Akoya QPTIFF (Fusion
  or Vectra/Polaris dialect) or in MCMICRO's layout (``registration/{sample}.ome.tif`` + ``markers.csv``).

All write to ``path + ".tmp"`` and ``os.replace`` it, so a crash never leaves a half-written file at ``path``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import cv2
import numpy as np
import tifffile

APERIO_HEADER = "Aperio Image Library v12.0.15"


def downsample_mean(img: np.ndarray, factor: int) -> np.ndarray:
    """Area-average downsample by an integer ``factor`` (edge-replicate padding to a multiple); keeps dtype.

    (H, W[, C]) -> (ceil(H/factor), ceil(W/factor)[, C]). Output pixel c is centred on input coordinate
    (c + 0.5)·factor − 0.5 (the repository's pyramid convention).
    """
    h, w = img.shape[:2]
    hp, wp = -(-h // factor) * factor, -(-w // factor) * factor
    if (hp, wp) != (h, w):
        pads = ((0, hp - h), (0, wp - w)) + ((0, 0),) * (img.ndim - 2)
        img = np.pad(img, pads, mode="edge")
    return cv2.resize(img, (wp // factor, hp // factor), interpolation=cv2.INTER_AREA)


def _level_shapes(shape: tuple[int, int], factor: int, min_side: int, min_levels: int,
                  n_levels: int | None = None) -> list[tuple[int, int]]:
    """Shapes of pyramid levels: level 0 = shape, each next ceil-divided by factor, until max side < min_side
    (at least ``min_levels``), or exactly ``n_levels`` levels when given."""
    shapes = [shape]
    while len(shapes) < n_levels if n_levels else (max(shapes[-1]) >= min_side or len(shapes) < min_levels):
        h, w = shapes[-1]
        if h == 1 and w == 1:
            break
        shapes.append((-(-h // factor), -(-w // factor)))
    return shapes


def _tmp_path(path: str | os.PathLike) -> tuple[Path, Path]:
    path = Path(path)
    return path, path.with_name(path.name + ".tmp")


def write_aperio_tiff(path: str | os.PathLike, rgb: np.ndarray, mpp: float | None, app_mag: int = 20,
                      quality: int = 90, tile: int = 256, min_side: int = 512,
                      downsamples: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """Write ``rgb`` (H, W, 3) uint8 as an Aperio-style pyramidal JPEG TIFF; returns the (H, W) of every level.

    Levels are area-averaged by 4 until the longest side is < ``min_side`` (at least 2 levels), or, when given,
    at the ``downsamples`` of level 0 (increasing, each a multiple of the one before, e.g. ``(4, 16)``). Level 0
    carries ``MPP = mpp|AppMag = app_mag`` in its ImageDescription (no ``MPP`` when ``mpp`` is None); ``mpp`` is
    µm per level-0 pixel.
    """
    path, tmp = _tmp_path(path)
    h, w = rgb.shape[:2]
    if downsamples is None:
        downsamples = [4**i for i in range(1, len(_level_shapes((h, w), 4, min_side, 2)))]
    levels, prev = [rgb], 1
    for d in downsamples:
        if d % prev:
            raise ValueError(f"downsample {d} is not a multiple of {prev}")
        levels.append(downsample_mean(levels[-1], d // prev))
        prev = d
    tail = f"|AppMag = {app_mag}" + (f"|MPP = {mpp:g}" if mpp else "")
    opts = dict(photometric="rgb", tile=(tile, tile), compression="jpeg", compressionargs={"level": quality},
                metadata=None, software=False)
    with tifffile.TiffWriter(tmp, bigtiff=rgb.nbytes > 2**31) as tif:
        for i, lev in enumerate(levels):
            lh, lw = lev.shape[:2]
            if i == 0:
                desc = f"{APERIO_HEADER}\r\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) JPEG/RGB Q={quality}{tail}"
            else:
                desc = f"{APERIO_HEADER}\r\n{w}x{h} -> {lw}x{lh} - {tail}"
            tif.write(lev, description=desc, subfiletype=0 if i == 0 else 1, **opts)
    os.replace(tmp, path)
    return [lev.shape[:2] for lev in levels]


def ome_xml(name: str, channels: Sequence[str | None], shape: tuple[int, int], mpp: float | None, uid: str) -> str:
    """OME-XML of one uint16 Image with ``len(channels)`` channels (axes CYX, one IFD per channel), pixel size µm.

    A channel name of None leaves that channel's ``Name`` out; ``mpp`` None leaves ``PhysicalSizeX/Y`` out.
    """
    h, w = shape
    ch = "".join(f'<Channel ID="Channel:0:{i}"{"" if c is None else " Name=" + quoteattr(c)} SamplesPerPixel="1"/>'
                 for i, c in enumerate(channels))
    td = "".join(f'<TiffData FirstC="{i}" FirstT="0" FirstZ="0" IFD="{i}" PlaneCount="1"/>'
                 for i in range(len(channels)))
    px = (f'PhysicalSizeX="{mpp:g}" PhysicalSizeXUnit="µm" PhysicalSizeY="{mpp:g}" PhysicalSizeYUnit="µm" '
          if mpp else "")
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
        'xsi:schemaLocation="http://www.openmicroscopy.org/Schemas/OME/2016-06 '
        'http://www.openmicroscopy.org/Schemas/OME/2016-06/ome.xsd" '
        f'UUID="urn:uuid:{uid}" Creator="hex-pipeline sample_data">'
        f'<Image ID="Image:0" Name={quoteattr(name)}>'
        f'<Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint16" SizeX="{w}" SizeY="{h}" '
        f'SizeC="{len(channels)}" SizeZ="1" SizeT="1" {px}BigEndian="false" Interleaved="false">'
        f"{ch}{td}</Pixels></Image></OME>"
    )


def write_ome_tiles(path: str | os.PathLike, level_tiles: Callable[[int], Iterable[np.ndarray | bytes]],
                    shapes: Sequence[tuple[int, int]], names: Sequence[str | None], mpp: float | None,
                    uid_seed: str | None = None, tile: int = 512, compression: str = "zstd",
                    compression_level: int | None = 1) -> None:
    """Write a pyramidal uint16 OME-TIFF (axes CYX) of ``len(names)`` channels, levels of ``shapes`` (H, W).

    ``level_tiles(lev)`` is called once per level, in order, after the level before is written, and yields the
    level's tiles channel by channel, rows of tiles top to bottom: (tile, tile) arrays (edge ones may be smaller)
    or bytes already encoded with ``compression``. Level 0 is one IFD per channel; each has SubIFDs with the
    lower levels. ``uid_seed`` (default: the file name) makes the OME UUID deterministic; ``mpp`` None writes no
    pixel size.
    """
    path, tmp = _tmp_path(path)
    uid = str(uuid.uuid5(uuid.NAMESPACE_URL, "hex-sample-data/" + (uid_seed or path.name)))
    n_sub, nc = len(shapes) - 1, len(names)
    res = 1e4 / mpp if mpp else 1.0  # pixels per cm
    opts = dict(photometric="minisblack", tile=(tile, tile), compression=compression, metadata=None, software=False,
                compressionargs=None if compression_level is None else {"level": compression_level},
                resolutionunit="CENTIMETER" if mpp else "NONE")
    with tifffile.TiffWriter(tmp, bigtiff=True, byteorder="<") as tif:
        tif.write(level_tiles(0), shape=(nc, *shapes[0]), dtype=np.uint16, subifds=n_sub, resolution=(res, res),
                  description=ome_xml(path.name.split(".")[0], names, shapes[0], mpp, uid).encode(), **opts)
        for lev in range(n_sub):
            f = 2 ** (lev + 1)
            tif.write(level_tiles(lev + 1), shape=(nc, *shapes[lev + 1]), dtype=np.uint16, subfiletype=1,
                      resolution=(res / f, res / f), **opts)
    os.replace(tmp, path)


def write_ome_pyramid(path: str | os.PathLike, channels: np.ndarray | Iterable[np.ndarray],
                      names: Sequence[str] | None = None, shape: tuple[int, int] | None = None,
                      mpp: float | None = None, uid_seed: str | None = None, tile: int = 512, min_side: int = 1000,
                      levels: int | None = None, compression: str = "zstd",
                      compression_level: int | None = 1) -> list[tuple[int, int]]:
    """Stream uint16 channel images (each ``shape`` (H, W), in ``names`` order) into a pyramidal OME-TIFF.

    ``channels`` may also be a (C, H, W) uint16 array; then ``shape`` defaults to its (H, W) and ``names`` may be
    None (channels without names). Level 0 holds one IFD per channel; each IFD has SubIFDs with the channel
    downsampled by 2, 4, ... (area mean) until the longest side is < ``min_side`` (at least one SubIFD level), or
    ``levels`` levels in all when given. ``mpp`` (µm/px) None writes no pixel size. Returns the (H, W) of every
    level.
    """
    if isinstance(channels, np.ndarray):
        shape = shape or channels.shape[1:]
        names = [None] * len(channels) if names is None else names
    if shape is None or names is None:
        raise ValueError("give names and shape with an iterable of channels")
    h, w = shape
    shapes = _level_shapes((h, w), 2, min_side, 2, levels)
    n_sub = len(shapes) - 1
    lower: list[list[np.ndarray]] = [[] for _ in range(n_sub)]

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

    write_ome_tiles(path, lambda lev: tiles(channels if lev == 0 else drain(lev - 1), lev), shapes, names, mpp,
                    uid_seed, tile, compression, compression_level)
    return shapes


# ----------------------------------------------------------------------------------------------------------------
# CODEX in the formats users bring: QPTIFF (Akoya PhenoCycler-Fusion, Vectra/Polaris) and MCMICRO


CODEX_FORMATS = ("ome", "qptiff-fusion", "qptiff-vectra", "mcmicro")
"""``make_cohort --codex-format`` choices: where :func:`write_codex` puts the CODEX of one slide."""

QPI_SOFTWARE = "PerkinElmer-QPI"
_FUSION_FLUORS = ("Cy3", "Cy5", "AF750")
_OPALS = ("Opal 480", "Opal 520", "Opal 570", "Opal 620", "Opal 690", "Opal 780")


def codex_rel_path(fmt: str, slide_id: str) -> str:
    """Path of a slide's CODEX image, relative to the cohort folder, in format ``fmt`` (:data:`CODEX_FORMATS`)."""
    if fmt == "ome":
        return f"codex/{slide_id}.ome.tif"
    if fmt.startswith("qptiff"):
        return f"codex/{slide_id}.qptiff"
    if fmt == "mcmicro":
        return f"codex/{slide_id}/registration/{slide_id}.ome.tif"
    raise ValueError(f"unknown CODEX format {fmt!r}; one of {CODEX_FORMATS}")


def qpi_description(image_type: str, dialect: str, slide_id: str, name: str | None = None,
                    biomarker: str | None = None, mpp: float | None = None,
                    bands: Sequence[str] | None = None) -> str:
    """A page's ``PerkinElmer-QPI-ImageDescription`` XML (``ImageType`` FullResolution, ReducedResolution,
    Thumbnail, Overview or Label). ``dialect`` "fusion": ``<Biomarker>`` = the stain, ``<Name>`` = its
    fluorophore, the pixel size in the ScanProfile's ``ScanResolution``; "vectra": ``<Name>`` = the band,
    ``<Biomarker>`` = the stain, and the ScanProfile lists the ``<ScanBands>`` (``bands``). ``mpp`` µm/px;
    None leaves ``PixelSizeMicrons`` out; a ``name`` / ``biomarker`` of None leaves that element out. Like real
    files, the declaration says utf-16 while the text is UTF-8."""
    def el(tag: str, text: object | None) -> str:
        return "" if text is None else f"<{tag}>{escape(str(text))}</{tag}>"

    res = f"<ScanResolution>{el('PixelSizeMicrons', f'{mpp:g}' if mpp else None)}</ScanResolution>"
    if dialect == "vectra":
        scan_bands = "".join(f"<ScanBands-i><Bands><Bands-i>{el('Name', b)}</Bands-i></Bands></ScanBands-i>"
                             for b in (bands or ()))
        profile = f"<ScanProfile><root>{res}<ScanBands>{scan_bands}</ScanBands></root></ScanProfile>"
        software = "Vectra Polaris 1.0.13"
    elif dialect == "fusion":
        profile = f"<ScanProfile><ExperimentV4>{res}<CycleCount>14</CycleCount></ExperimentV4></ScanProfile>"
        software = "PhenoImager Fusion 1.0.8"
    else:
        raise ValueError(f"unknown QPTIFF dialect {dialect!r}")
    return ('<?xml version="1.0" encoding="utf-16"?>\r\n<PerkinElmer-QPI-ImageDescription>'
            f"<DescriptionVersion>4</DescriptionVersion>{el('AcquisitionSoftware', software)}"
            f"{el('ImageType', image_type)}{el('SlideID', slide_id)}<Barcode></Barcode>"
            f"<ComputerName>synthetic</ComputerName><IsUnmixedComponent>False</IsUnmixedComponent>"
            f"{el('Name', name)}{el('Biomarker', biomarker)}<Objective>20x</Objective>{profile}"
            "</PerkinElmer-QPI-ImageDescription>")


def _qpi_names(dialect: str, names: Sequence[str], biomarkers: bool = True) -> list[tuple[str, str | None]]:
    """(page ``<Name>``, ``<Biomarker>``) per channel of a QPTIFF of ``names`` (``biomarkers`` False: no
    ``<Biomarker>`` at all, only the fluorophores)."""
    out = []
    for i, n in enumerate(names):
        dapi = n.lower().startswith("dapi")
        if dialect == "fusion":  # PhenoCycler cycles: the nuclear stain of cycle 1, then 3 reporters per cycle
            name, bm = ("DAPI", "DAPI-01") if dapi else (_FUSION_FLUORS[(i - 1) % 3], n)
        else:
            name, bm = ("DAPI", n) if dapi else (_OPALS[(i - 1) % len(_OPALS)], n)
        out.append((name, bm if biomarkers else None))
    return out


def _rgb_thumb(img: np.ndarray, max_side: int) -> np.ndarray:
    """A uint8 RGB (h, w, 3) thumbnail of a uint16 channel (percentile-stretched, blue-white)."""
    f = max(1, int(np.ceil(max(img.shape) / max_side)))
    small = downsample_mean(img, f).astype(np.float32)
    hi = float(np.percentile(small, 99.5)) or 1.0
    g = np.clip(small / hi * 255, 0, 255).astype(np.uint8)
    return np.stack([g // 2, g // 2, g], axis=-1)


def write_qptiff(path: str | os.PathLike, channels: Iterable[np.ndarray], names: Sequence[str],
                 shape: tuple[int, int], mpp: float | None, dialect: str = "fusion", slide_id: str = "",
                 tag_mpp: float | None = None, tile: int = 512, min_side: int = 1000, levels: int | None = None,
                 compression: str = "zstd", biomarkers: bool = True) -> list[tuple[int, int]]:
    """Stream uint16 channel images (each ``shape`` (H, W), in ``names`` order) into a QPTIFF of the Akoya layout.

    Pages, in order (as Bio-Formats' VectraReader and tifffile's QPI series expect): one tiled page per channel at
    full resolution (ImageType FullResolution, NewSubfileType 0), an RGB thumbnail, then each reduced level
    (downsample 2, 4, ... area mean, as :func:`write_ome_pyramid`, NewSubfileType 1) as one page per channel, then
    an RGB overview (macro) and a label image. Every page carries its ``PerkinElmer-QPI-ImageDescription``
    (:func:`qpi_description`; ``biomarkers`` False leaves every ``<Biomarker>`` out: a file that names only its
    fluorophores) and Software
    ``PerkinElmer-QPI``. The TIFF resolution tags say ``tag_mpp`` µm/px (default ``mpp``; a different value makes a
    file whose tags disagree with its XML). Returns the (H, W) of every level.
    """
    path, tmp = _tmp_path(path)
    h, w = shape
    shapes = _level_shapes((h, w), 2, min_side, 2, levels)
    pages = _qpi_names(dialect, names, biomarkers)
    bands = [p[0] for p in pages]
    tag = tag_mpp or mpp
    res = (1e4 / tag, 1e4 / tag) if tag else (1.0, 1.0)
    opts = dict(photometric="minisblack", tile=(tile, tile), compression=compression, metadata=None,
                software=QPI_SOFTWARE, resolutionunit="CENTIMETER" if tag else "NONE")
    rgb_opts = dict(photometric="rgb", compression=compression, metadata=None, software=QPI_SOFTWARE,
                    resolutionunit=opts["resolutionunit"])
    lower: list[list[np.ndarray]] = [[] for _ in range(len(shapes) - 1)]

    def desc(kind: str, c: int | None = None) -> str:
        name, bm = pages[c] if c is not None else (None, None)
        return qpi_description(kind, dialect, slide_id, name, bm, mpp, bands)

    with tifffile.TiffWriter(tmp, bigtiff=True, byteorder="<") as tif:
        n = 0
        for c, img in enumerate(channels):
            if img.shape != (h, w) or img.dtype != np.uint16:
                raise ValueError(f"channel {c}: expected uint16 {shape}, got {img.dtype} {img.shape}")
            if len(shapes) > 1:
                lower[0].append(downsample_mean(img, 2))
            tif.write(img, description=desc("FullResolution", c), subfiletype=0, resolution=res, **opts)
            n += 1
        if n != len(names):
            raise ValueError(f"got {n} channels for {len(names)} names")
        if len(shapes) == 1:
            raise ValueError("a QPTIFF needs at least one reduced level (levels >= 2)")
        for lev in range(1, len(shapes)):
            f = 2**lev
            for c in range(n):
                img = lower[lev - 1].pop(0)
                if lev < len(shapes) - 1:
                    lower[lev].append(downsample_mean(img, 2))
                if lev == 1 and c == 0:  # the thumbnail sits between the full resolution and the reduced levels
                    tif.write(_rgb_thumb(img, 256), description=desc("Thumbnail"), subfiletype=1, **rgb_opts)
                if c == 0:
                    smallest = img
                tif.write(img, description=desc("ReducedResolution", c), subfiletype=1,
                          resolution=(res[0] / f, res[1] / f), **opts)
        overview = np.full((160, 480, 3), 235, np.uint8)
        small = _rgb_thumb(smallest, 80)[:80, :120]
        overview[40:40 + small.shape[0], 180:180 + small.shape[1]] = small
        tif.write(overview, description=desc("Overview"), subfiletype=0, **rgb_opts)
        label = np.full((120, 120, 3), 250, np.uint8)
        label[50:70, 10:110] = 20
        tif.write(label, description=desc("Label"), subfiletype=0, **rgb_opts)
    os.replace(tmp, path)
    return shapes


def write_mcmicro(sample_dir: str | os.PathLike, slide_id: str, channels: Iterable[np.ndarray],
                  names: Sequence[str], shape: tuple[int, int], mpp: float | None, uid_seed: str | None = None,
                  **kw) -> list[tuple[int, int]]:
    """MCMICRO's layout of one sample: ``sample_dir/registration/{slide_id}.ome.tif`` (as ASHLAR writes it: channel
    names ``Channel 0``, ``Channel 1``, ...) and ``sample_dir/markers.csv`` (``channel_number,cycle_number,
    marker_name``, one row per channel in channel order). ``kw`` go to :func:`write_ome_pyramid`."""
    sample_dir = Path(sample_dir)
    (sample_dir / "registration").mkdir(parents=True, exist_ok=True)
    generic = [f"Channel {i}" for i in range(len(names))]
    shapes = write_ome_pyramid(sample_dir / "registration" / f"{slide_id}.ome.tif", channels, generic, shape, mpp,
                               uid_seed=uid_seed, **kw)
    rows = ["channel_number,cycle_number,marker_name"]
    rows += [f"{i + 1},{i // 4 + 1},{n}" for i, n in enumerate(names)]
    path, tmp = _tmp_path(sample_dir / "markers.csv")
    tmp.write_text("\n".join(rows) + "\n")
    os.replace(tmp, path)
    return shapes


def write_codex(fmt: str, cohort: str | os.PathLike, slide_id: str, channels: Iterable[np.ndarray],
                names: Sequence[str], shape: tuple[int, int], mpp: float, uid_seed: str | None = None,
                **kw) -> Path:
    """Write one slide's CODEX into ``cohort`` at :func:`codex_rel_path` in format ``fmt`` (:data:`CODEX_FORMATS`):
    the same pixels at every level whatever the format. "qptiff-vectra" files carry resolution tags 5% off their
    XML pixel size (readers must take the XML and warn). Returns the image path."""
    path = Path(cohort) / codex_rel_path(fmt, slide_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "ome":
        write_ome_pyramid(path, channels, names, shape, mpp, uid_seed=uid_seed, **kw)
    elif fmt == "mcmicro":
        write_mcmicro(path.parent.parent, slide_id, channels, names, shape, mpp, uid_seed=uid_seed, **kw)
    else:
        dialect = fmt.split("-", 1)[1]
        write_qptiff(path, channels, names, shape, mpp, dialect, slide_id,
                     tag_mpp=mpp * 1.05 if dialect == "vectra" and mpp else None, **kw)
    return path
