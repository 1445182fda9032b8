"""One slide's units (cells or tiles) with their marker values: the first, per-slide half of stage 10.

``OUT/spatial[_tiles]/units/{slide}.h5`` (:data:`pipeline.artifacts.SPATIAL_UNITS`):

- ``xy_px`` (N, 2) float64: level-0 H&E px (pixel-centre convention); ``xy_um`` (N, 2) = xy_px x mpp;
- ``area_um2`` (N,) float32: nucleus area (cells detected here or imported with polygons; NaN otherwise);
- ``virtual`` (N, M) float32: the virtual CODEX at each unit, normalised units of the HEX run (cells: the stage-06
  map sampled at the unit (:func:`spatial.markers.sample_map`); tiles: the tile's own prediction);
- ``measured`` (N, M) float32, only where the slide has CODEX: cells: the raw mean of each channel in a disk
  of ``radius_um`` at the registered position (normalised later, over the cohort); tiles: the stage-03 labels
  (already normalised); NaN where the CODEX has no data;
- attrs: ``slide``, ``units`` (cells | tiles), ``markers``, ``mpp``, ``cell_source`` (detect | the imported file),
  ``measured_units`` (raw | normalised | none), ``schema_version``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError
from pipeline.io import atomic_path

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


@dataclass
class SlideUnits:
    """What :func:`read_units` returns; see the module docstring for the fields."""

    slide: str
    units: str
    xy_px: np.ndarray
    xy_um: np.ndarray
    area_um2: np.ndarray
    virtual: np.ndarray
    measured: np.ndarray | None
    markers: list[str]
    mpp: float
    measured_units: str
    cell_source: str

    def __len__(self) -> int:
        return int(len(self.xy_px))


def write_units(path: str | os.PathLike, u: SlideUnits) -> None:
    """Write ``u`` to ``path`` (h5, atomically)."""
    import h5py

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("xy_px", data=np.asarray(u.xy_px, np.float64).reshape(-1, 2))
        f.create_dataset("xy_um", data=np.asarray(u.xy_um, np.float64).reshape(-1, 2))
        f.create_dataset("area_um2", data=np.asarray(u.area_um2, np.float32))
        f.create_dataset("virtual", data=np.asarray(u.virtual, np.float32), compression="gzip", compression_opts=4)
        if u.measured is not None:
            f.create_dataset("measured", data=np.asarray(u.measured, np.float32), compression="gzip",
                             compression_opts=4)
        f.attrs.update({"slide": u.slide, "units": u.units, "markers": json.dumps(u.markers), "mpp": float(u.mpp),
                        "measured_units": u.measured_units, "cell_source": u.cell_source,
                        "schema_version": SCHEMA_VERSION})


def read_units(path: str | os.PathLike) -> SlideUnits:
    """Read a units file written by :func:`write_units`; an unreadable one is a :class:`PipelineError`."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            a = f.attrs
            return SlideUnits(slide=str(a["slide"]), units=str(a["units"]), xy_px=f["xy_px"][:], xy_um=f["xy_um"][:],
                              area_um2=f["area_um2"][:], virtual=f["virtual"][:],
                              measured=f["measured"][:] if "measured" in f else None,
                              markers=list(json.loads(a["markers"])), mpp=float(a["mpp"]),
                              measured_units=str(a["measured_units"]), cell_source=str(a["cell_source"]))
    except (OSError, KeyError, ValueError) as e:
        raise PipelineError(f"cannot read the units file {path} ({e}); rerun stage 10 with --overwrite") from None


# ----------------------------------------------------------------------------------------------------------------
# cells


def imported_cells_path(folder: str | os.PathLike, slide: str) -> Path:
    """The user's cells of ``slide`` in ``folder``: ``{slide}.geojson``, ``{slide}.json`` or ``{slide}.csv``."""
    for ext in (".geojson", ".json", ".csv", ".tsv"):
        p = Path(folder) / f"{slide}{ext}"
        if p.is_file():
            return p
    raise PipelineError(f"no cells for {slide} in {folder} (expected {slide}.geojson from QuPath or {slide}.csv with "
                        "x,y columns); export them, or drop --cells to detect nuclei here")


def find_cells(he_path: str | os.PathLike, slide: str, mpp: float, cells_from: str | None, csv_units: str = "px",
               workers: int = 1, progress: bool = False) -> tuple[pd.DataFrame, str]:
    """The cells of one slide: detected in the H&E (``cells_from`` None) or read from the user's folder. Returns
    (table with x, y (level-0 px), x_um, y_um, area_um2, ...; the source: ``detect`` or the file)."""
    if cells_from is None:
        from spatial.nuclei import detect_slide

        return detect_slide(he_path, mpp=mpp, workers=workers, progress=progress), "detect"
    from spatial.cell_import import read_centroids_csv, read_qupath_geojson

    p = imported_cells_path(cells_from, slide)
    if p.suffix in (".geojson", ".json"):
        return read_qupath_geojson(p, mpp), str(p)
    return read_centroids_csv(p, mpp, units=csv_units), str(p)


def measured_at_cells(out: str | os.PathLike, slide: str, xy_px: np.ndarray, markers: list[str],
                      radius_um: float, progress: bool = False) -> np.ndarray | None:
    """Raw CODEX means (N, M) at the cells through the slide's stage-02 registration and stage-03 channel map, or
    None when stage 03 did not quantify the slide (no CODEX)."""
    from preprocess.quantify.geometry import load_registration
    from preprocess.quantify.raw import raw_meta_path
    from spatial.markers import measure_codex_at

    meta_path = raw_meta_path(out, slide)
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    by_marker = {m: int(i) for m, i, _ in meta["channels"]}
    missing = [m for m in markers if m not in by_marker]
    if missing:
        raise PipelineError(f"{meta_path} maps no CODEX channel to {missing[:5]} (the HEX run's markers); rerun "
                            "stage 03 with the run's panel")
    mapping, _ = load_registration(meta["inputs"]["registration"]["path"], allow_flagged=True)
    raw, _ = measure_codex_at(meta["inputs"]["codex"]["path"], mapping, [by_marker[m] for m in markers], xy_px,
                              radius_um=radius_um, progress=progress)
    return raw


def cell_units(out: str | os.PathLike, slide: str, he_path: str | os.PathLike, mpp: float | None,
               cells_from: str | None, csv_units: str, radius_um: float, measured: bool, workers: int = 1,
               progress: bool = False) -> SlideUnits:
    """Cells of one slide with the virtual map sampled at them and, where the slide has CODEX, the raw measured
    means."""
    from preprocess.slide_io import HESlide
    from spatial.markers import read_virtual_map, sample_map

    vmap = read_virtual_map(out, slide)
    with HESlide(he_path, mpp=mpp) as s:
        mpp = float(s.mpp)
    if abs(mpp - vmap.mpp) > 1e-3 * mpp:
        log.warning("%s: the H&E is at %.4f µm/px but stage 06 recorded %.4f µm/px; positions use the H&E's", slide,
                    mpp, vmap.mpp)
    cells, source = find_cells(he_path, slide, mpp, cells_from, csv_units, workers, progress)
    xy = cells[["x", "y"]].to_numpy(np.float64)
    virtual, inside = sample_map(vmap, xy)
    if not inside.all():
        log.info("%s: %d of %d cells lie outside the virtual map's tissue; dropped", slide, int((~inside).sum()),
                 len(xy))
        cells, xy, virtual = cells[inside], xy[inside], virtual[inside]
    area = cells["area_um2"].to_numpy(np.float32) if "area_um2" in cells else np.full(len(xy), np.nan, np.float32)
    raw = measured_at_cells(out, slide, xy, vmap.markers, radius_um, progress) if measured else None
    return SlideUnits(slide=slide, units="cells", xy_px=xy, xy_um=xy * mpp, area_um2=area, virtual=virtual,
                      measured=raw, markers=vmap.markers, mpp=mpp, measured_units="raw" if raw is not None else "none",
                      cell_source=source)


def tile_units_of(out: str | os.PathLike, slide: str, mpp: float | None, measured: bool) -> SlideUnits:
    """Every tile of ``OUT/hex_pred/{slide}.h5`` with its prediction and, where stage 03 labelled the slide, its
    measured label (tiles of the stage-01 grid only)."""
    from spatial.markers import measured_tile_labels, tile_units

    t = tile_units(out, slide)
    mpp = mpp or t.mpp
    if not mpp:
        raise PipelineError(f"{slide}: the prediction file has no mpp; give --mpp")
    lab = measured_tile_labels(out, slide, t.xy_px, t.patch_size_level0, t.markers) if measured else None
    if lab is not None and np.isnan(lab).all():
        lab = None
    return SlideUnits(slide=slide, units="tiles", xy_px=t.xy_px, xy_um=t.xy_px * mpp,
                      area_um2=np.full(len(t.xy_px), np.nan, np.float32), virtual=t.values, measured=lab,
                      markers=t.markers, mpp=float(mpp), measured_units="normalised" if lab is not None else "none",
                      cell_source="tiles")
