"""Latent tissue model of the synthetic lung-cancer cohort: layout maps, individual cells, marker expression.

Everything here lives in one µm coordinate frame per slide, the *world* frame. It coincides with the H&E level-0
image: H&E pixel (x, y) covers world [0.5·x, 0.5·(x+1)) µm, so its centre is at world ((x + 0.5)·0.5, (y + 0.5)·0.5).

- :func:`sample_patient` draws patient-level latents (immune "hotness", myeloid inflammation, tumour fraction, and
  per-programme offsets of the hidden cell-state programmes).
- :func:`make_layout` draws the tissue layout of one slide on a coarse grid (``GRID_UM`` µm per cell): an irregular
  tissue blob, tumour nests, lymphoid aggregates (B-cell core, T-cell mantle), vessels, lung air spaces, myeloid foci,
  stromal fibre orientation, and smooth hidden random fields that drive cell *states* (never rendered in H&E).
- :func:`place_cells` fills the layout with cells (position, type, nucleus and body geometry, stain densities).
- :func:`express` gives every cell its 40-marker expression (arbitrary units, ~1 = typical positive cell).

This module gathers the names of :mod:`.celltypes`, :mod:`.layout`, :mod:`.cells` and :mod:`.expression` (one job
each); the displacement between the H&E and the CODEX placement is :mod:`.warp`.
"""

from __future__ import annotations

from .cells import Cells, place_cells
from .celltypes import (
    BCELL,
    CD4T,
    CD8T,
    CELL_TYPES,
    CYTOPLASMIC,
    ENDO,
    EXTRACELLULAR,
    FIBRO,
    HIDDEN_GAIN,
    IMMUNE,
    MACRO,
    NEUTRO,
    NUCLEAR,
    PLASMA,
    PROGRAMMES,
    RBC,
    TUMOUR,
    VISIBLE_MARKERS,
    Patient,
    marker_compartment,
    sample_patient,
)
from .expression import express
from .layout import GRID_UM, Layout, make_layout, smooth_field

__all__ = [
    "BCELL", "CD4T", "CD8T", "CELL_TYPES", "CYTOPLASMIC", "ENDO", "EXTRACELLULAR", "FIBRO", "GRID_UM", "HIDDEN_GAIN",
    "IMMUNE", "MACRO", "NEUTRO", "NUCLEAR", "PLASMA", "PROGRAMMES", "RBC", "TUMOUR", "VISIBLE_MARKERS", "Cells",
    "Layout", "Patient", "express", "make_layout", "marker_compartment", "place_cells", "sample_patient",
    "smooth_field",
]
