"""Per-cell ground truth of one slide: where each nucleus is in the H&E, its type, hidden states and compartment.

The generator writes it as ``truth/cells/{slide}.csv.gz`` (one row per cell, the generator's cell order), so that
nucleus detection, phenotyping and niche finding can be scored against the cells the images were drawn from:

    x, y          H&E level-0 px (float, 2 decimals) of the nucleus centre; integer coordinates are pixel centres
                  (docs/FORMATS.md), so x_px = x_um / he_mpp - 0.5. RBCs (no nucleus) get their disc centre.
    type          generator cell type (sample_data.celltypes.CELL_TYPES names)
    nucleated     1, or 0 for red blood cells (what a nucleus detector can find)
    stem, treg, exhausted, cytotoxic, prolif, pdl1
                  hidden states, 1 where the cell's TCF-1, FOXP3, PD-1, Granzyme B, Ki67, PD-L1 expression is
                  > 0.3 (the threshold of outcomes.cells_counted); invisible in H&E
    compartment   tissue compartment at the cell centre, the first that applies in COMPARTMENTS order:
                  vessel (endothelial / perivascular cells, or the centre within VESSEL_NEAR_UM of a lumen
                  ellipse: lumen RBCs, pericytes), lymphoid_aggregate (aggregate radius < 1: B-cell core and T-cell
                  mantle), myeloid_focus (myeloid intensity > 0.5, as outcomes.cells_counted), tumour_nest (inside
                  a nest), nest_margin (within outcomes.NEST_MARGIN_UM outside a nest), stroma (the rest, alveolar
                  macrophages in air spaces included)

Nucleus centre: the ellipse nucleus sits at the cell centre + R(theta) (nox, noy) (Cells docstring); a
neutrophil's is the area-weighted centroid of its lobes (cell frame, rotated the same way). Nothing here draws a
random number: writing the table leaves every other file of a cohort byte-identical.
"""

from __future__ import annotations

import gzip
import io
import os
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from .outcomes import NEST_MARGIN_UM
from .panel import MARKER_INDEX
from .render import Frame
from .tissue import CELL_TYPES, ENDO, NEUTRO, RBC, Cells, Layout

COMPARTMENTS = ("vessel", "lymphoid_aggregate", "myeloid_focus", "tumour_nest", "nest_margin", "stroma")
"""Compartment names in priority order (a cell gets the first that applies)."""

STATES = {"stem": "TCF-1", "treg": "FOXP3", "exhausted": "PD-1", "cytotoxic": "Granzyme B", "prolif": "Ki67",
          "pdl1": "PD-L1"}
"""Hidden-state column -> the marker whose expression switches it on."""

STATE_THRESHOLD = 0.3
"""A state is on where its marker's expression exceeds this (arbitrary units, as outcomes.cells_counted)."""

VESSEL_NEAR_UM = 10.0
"""Cells whose centre lies inside a lumen ellipse grown by this on both semi-axes are in the vessel compartment."""

COLUMNS = ("x", "y", "type", "nucleated", *STATES, "compartment")

COLUMN_NOTES = {
    "x": "H&E level-0 px of the nucleus centre (integer = pixel centre; x_px = x_um / he_mpp - 0.5)",
    "y": "H&E level-0 px of the nucleus centre",
    "type": "generator cell type: " + ", ".join(CELL_TYPES),
    "nucleated": "1, or 0 for red blood cells (no nucleus; x, y = disc centre)",
    **{k: f"1 where {m} expression > {STATE_THRESHOLD} (hidden state, invisible in H&E)" for k, m in STATES.items()},
    "compartment": "first that applies of " + " > ".join(COMPARTMENTS) + f" (vessel: endothelial / perivascular "
                   f"cells or centre within {VESSEL_NEAR_UM:g} µm of a lumen; nest_margin: within "
                   f"{NEST_MARGIN_UM:g} µm outside a nest), at the cell centre",
}
"""One line per column, for ground_truth.json."""


def nucleus_centres_um(cells: Cells) -> tuple[np.ndarray, np.ndarray]:
    """World µm (x, y), float64 (N,) each, of every cell's nucleus centre (RBCs: the cell centre)."""
    th = cells.theta.astype(np.float64)
    c, s = np.cos(th), np.sin(th)
    ox, oy = cells.nox.astype(np.float64), cells.noy.astype(np.float64)
    neu = cells.type == NEUTRO
    if neu.any():  # lobes (x, y, r) in the cell frame; r = 0 unused
        lob = cells.lobes[neu].astype(np.float64)
        w = lob[..., 2] ** 2
        tot = np.maximum(w.sum(1), 1e-12)
        ox[neu] = (w * lob[..., 0]).sum(1) / tot
        oy[neu] = (w * lob[..., 1]).sum(1) / tot
    return cells.x + c * ox - s * oy, cells.y + s * ox + c * oy


def _near_vessel(layout: Layout, x: np.ndarray, y: np.ndarray, near_um: float) -> np.ndarray:
    """Bool (N,): centre inside some lumen ellipse grown by ``near_um`` on both semi-axes."""
    out = np.zeros(x.shape[0], bool)
    if not len(layout.vessels) or not x.size:
        return out
    ves = layout.vessels.astype(np.float64)
    tree = cKDTree(np.stack([x, y], 1))
    for vx, vy, a, b, th in ves:
        idx = np.asarray(tree.query_ball_point([vx, vy], r=max(a, b) + near_um), dtype=np.int64)
        if not idx.size:
            continue
        dx, dy = x[idx] - vx, y[idx] - vy
        u = dx * np.cos(th) + dy * np.sin(th)
        v = -dx * np.sin(th) + dy * np.cos(th)
        out[idx[(u / (a + near_um)) ** 2 + (v / (b + near_um)) ** 2 < 1.0]] = True
    return out


def compartments(cells: Cells, layout: Layout) -> np.ndarray:
    """Compartment index into :data:`COMPARTMENTS` of every cell, int8 (N,) (see the module docstring)."""
    x, y = cells.x.astype(np.float64), cells.y.astype(np.float64)
    tum = layout.sample("tumour", x, y)
    rules = [
        (cells.type == ENDO) | cells.perivascular | _near_vessel(layout, x, y, VESSEL_NEAR_UM),
        layout.sample("aggregate", x, y) < 1.0,
        layout.sample("myeloid", x, y) > 0.5,
        tum > 0,
        tum > -NEST_MARGIN_UM,
    ]
    out = np.full(len(cells), len(COMPARTMENTS) - 1, np.int8)
    for k in range(len(rules) - 1, -1, -1):  # lowest priority first, so the first rule that applies wins
        out[rules[k]] = k
    return out


def cell_table(cells: Cells, layout: Layout, he: Frame) -> dict[str, np.ndarray]:
    """The truth columns (:data:`COLUMNS`) of every cell, arrays of length N; ``he`` is the slide's H&E frame."""
    if cells.expr is None:
        raise ValueError("cells have no expression")
    xu, yu = nucleus_centres_um(cells)
    inv = he.um_to_px
    cols: dict[str, np.ndarray] = {
        "x": inv[0, 0] * xu + inv[0, 1] * yu + inv[0, 2],
        "y": inv[1, 0] * xu + inv[1, 1] * yu + inv[1, 2],
        "type": np.asarray(CELL_TYPES)[cells.type],
        "nucleated": (cells.type != RBC).astype(np.int8),
    }
    for k, m in STATES.items():
        cols[k] = (cells.expr[:, MARKER_INDEX[m]] > STATE_THRESHOLD).astype(np.int8)
    cols["compartment"] = np.asarray(COMPARTMENTS)[compartments(cells, layout)]
    return cols


def write_cell_truth(path: str | os.PathLike, cells: Cells, layout: Layout, he: Frame) -> None:
    """Write :func:`cell_table` as a gzip CSV at ``path`` (byte-identical for the same cells: gzip mtime 0, no
    file name in the header), through a temporary file and a rename."""
    cols = cell_table(cells, layout, he)
    buf = io.StringIO()
    buf.write(",".join(COLUMNS) + "\n")
    rows = zip(*(cols[c].tolist() for c in COLUMNS))
    buf.writelines(f"{x:.2f},{y:.2f}," + ",".join(map(str, rest)) + "\n" for x, y, *rest in rows)
    path = Path(path)
    tmp = path.with_name("." + path.name + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz:
        gz.write(buf.getvalue().encode())
    os.replace(tmp, path)
