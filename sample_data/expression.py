"""Per-cell expression of the 40 markers: lineage markers from the cell type, hidden states from smooth fields."""

from __future__ import annotations

import numpy as np

from .cells import Cells
from .celltypes import (
    BCELL,
    CD4T,
    CD8T,
    CELL_TYPES,
    ENDO,
    FIBRO,
    HIDDEN_GAIN,
    MACRO,
    NEUTRO,
    PLASMA,
    RBC,
    TUMOUR,
    Patient,
    _sigmoid,
)
from .layout import Layout
from .panel import MARKER_INDEX, MARKERS


def express(rng: np.random.Generator, cells: Cells, layout: Layout, patient: Patient,
            slide_offsets: dict[str, float] | None = None) -> np.ndarray:
    """Per-cell expression of the 40 markers, (N, 40) float32 in arbitrary units (~1 = typical positive).

    Lineage markers follow the cell type (what H&E shows); state markers (PD-1, LAG3, TCF-1, FOXP3, Ki67, ...)
    switch on with a probability set by a hidden smooth field plus patient and slide offsets, so H&E cannot see them.
    """
    n = len(cells)
    t = cells.type
    slide_offsets = slide_offsets or {}
    e = np.zeros((n, len(MARKERS)), np.float32)

    def prog(name: str, gain: float = 2.2, bias: float = 0.0) -> np.ndarray:
        z = layout.sample(name, cells.x, cells.y)
        off = patient.offsets.get(name, 0.0) + slide_offsets.get(name, 0.0)
        return _sigmoid(gain * z + off + bias)

    def on(p: np.ndarray) -> np.ndarray:
        return (rng.uniform(size=n) < p).astype(np.float32)

    def setm(marker: str, value: np.ndarray | float) -> None:
        e[:, MARKER_INDEX[marker]] += np.asarray(value, np.float32)

    is_ = {k: (t == k).astype(np.float32) for k in range(len(CELL_TYPES))}
    tcell = is_[CD8T] + is_[CD4T]
    immune = tcell + is_[BCELL] + is_[MACRO] + is_[NEUTRO] + 0.3 * is_[PLASMA]
    nucleated = 1.0 - is_[RBC]
    agg = layout.sample("aggregate", cells.x, cells.y)
    in_core = (agg < 0.55).astype(np.float32)
    near_tum = np.exp(-np.maximum(0.0, -layout.sample("tumour", cells.x, cells.y)) / 80.0)

    # lineage markers (visible)
    setm("DAPI", nucleated * cells.dark)
    setm("Pan-Cytokeratin", 1.2 * is_[TUMOUR])
    setm("E-cadherin", is_[TUMOUR])
    setm("EpCAM", is_[TUMOUR])
    setm("CD3e", tcell)
    setm("CD8", is_[CD8T])
    setm("CD4", is_[CD4T] + 0.3 * is_[MACRO])
    setm("CD20", is_[BCELL])
    setm("CD21", is_[BCELL] * (0.4 + 0.8 * in_core))
    setm("CD45", immune)
    setm("CD68", 1.2 * is_[MACRO] + 0.1 * is_[NEUTRO])
    setm("CD163", is_[MACRO] * (0.6 + 0.5 * prog("vista", 1.0)))
    setm("CD14", 0.8 * is_[MACRO] + 0.2 * is_[NEUTRO])
    setm("CD11c", 0.8 * is_[MACRO])
    setm("Mac2/Galectin-3", 1.2 * is_[MACRO] + 0.3 * is_[TUMOUR])
    setm("CD66b", is_[NEUTRO])
    setm("MPO", 1.2 * is_[NEUTRO] + 0.08 * is_[MACRO])
    setm("MMP9", is_[NEUTRO] + 0.35 * is_[MACRO])
    fib = is_[FIBRO]
    pvf = cells.perivascular.astype(np.float32)
    setm("aSMA", fib * (0.7 + 0.9 * pvf))
    setm("FAP", fib * (1 - pvf) * (0.3 + 0.9 * near_tum))
    setm("CD31", 1.2 * is_[ENDO])
    setm("CD138", 1.5 * is_[PLASMA] + 0.2 * is_[TUMOUR])

    # hidden cell states (invisible): sparse hot spots of smooth fields (gain G, negative bias), so that the field,
    # not the (visible) density of the carrier cells, dominates the per-patch mean
    g = HIDDEN_GAIN
    setm("PD-1", is_[CD8T] * on(prog("exhaustion", g, -2.5)) + is_[CD4T] * on(prog("exhaustion", g, -3.5)))
    setm("LAG3", is_[CD8T] * on(prog("exhaustion", g, -3.5)) + 0.3 * is_[CD4T] * on(prog("exhaustion", g, -4.5)))
    treg = is_[CD4T] * on(prog("treg", g, -3.0))
    setm("FOXP3", treg)
    setm("CD39", is_[CD8T] * on(prog("cd39", g, -2.5)) + is_[MACRO] * on(prog("cd39", g, -3.0)) + 0.8 * treg)
    setm("TCF-1", is_[CD8T] * on(prog("stem", g, -2.0)) + is_[CD4T] * on(prog("stem", g, -1.5)))
    setm("ICOS", is_[CD4T] * on(prog("icos", g, -2.5)) + 0.4 * is_[CD8T] * on(prog("icos", g, -3.5)))
    setm("Granzyme B", is_[CD8T] * on(prog("cytotoxic", g, -2.0)) + 0.3 * is_[NEUTRO] * on(prog("cytotoxic", g, -3)))
    setm("CD45RO", tcell * on(prog("memory", g, -2.0)))
    setm("Bcl-2", tcell * on(prog("bcl2", g, -2.0)))
    setm("Ki67", is_[TUMOUR] * on(prog("prolif", g, -2.5)) + is_[BCELL] * in_core * on(prog("prolif", g, -2.0))
         + tcell * on(prog("prolif", g, -4.5)))
    setm("HIF1A", is_[TUMOUR] * on(prog("hypoxia", g, -2.5)) + 0.3 * is_[MACRO] * on(prog("hypoxia", g, -3.5)))
    setm("PD-L1", is_[TUMOUR] * on(prog("ifn", g, -2.5)) + is_[MACRO] * on(prog("ifn", g, -1.5)))
    setm("HLA-DR", 0.8 * is_[TUMOUR] * on(prog("ifn", g, -2.0)) + (is_[MACRO] + is_[BCELL]) * on(prog("ifn", g, -1.5)))
    setm("HLA-E", nucleated * prog("ifn", g, -2.0))
    setm("CD44", (tcell + is_[MACRO] + 0.8 * is_[TUMOUR] + 0.5 * fib) * prog("cd44", g, -2.0))
    setm("VISTA", (is_[MACRO] + is_[NEUTRO]) * on(prog("vista", g, -2.0)) + 0.3 * tcell * on(prog("vista", g, -3.5)))
    setm("CD40", is_[BCELL] * (0.05 + 0.95 * prog("cd40", g, -2.0)) + is_[MACRO] * on(prog("cd40", g, -2.0))
         + 0.3 * is_[TUMOUR] * prog("cd40", g, -3.0))

    # per-cell intensity variation
    e *= rng.lognormal(0.0, 0.25, e.shape).astype(np.float32)
    return e
