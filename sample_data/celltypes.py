"""Cell types, hidden cell-state programmes, marker compartments and patient latents of the synthetic cohort."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TUMOUR, CD8T, CD4T, BCELL, MACRO, NEUTRO, FIBRO, ENDO, PLASMA, RBC = range(10)
CELL_TYPES = ("tumour", "cd8_t", "cd4_t", "b_cell", "macrophage", "neutrophil", "fibroblast", "endothelial",
              "plasma", "rbc")
IMMUNE = (CD8T, CD4T, BCELL, MACRO, NEUTRO, PLASMA)

# hidden cell-state programmes: name -> correlation length of its smooth field (µm)
PROGRAMMES = {
    "cd8": 130.0, "exhaustion": 110.0, "stem": 120.0, "treg": 100.0, "cytotoxic": 110.0, "prolif": 100.0,
    "hypoxia": 150.0, "ifn": 130.0, "memory": 120.0, "cd44": 120.0, "bcl2": 120.0, "icos": 110.0, "vista": 120.0,
    "cd40": 120.0, "cd39": 110.0,
}
HIDDEN_GAIN = 4.0
"""Logit gain of the hidden fields (standard normal) in the cell-state probabilities."""

# marker compartments: N nuclear, M membrane, C cytoplasmic, E extracellular (not carried by cells)
NUCLEAR = ("DAPI", "Ki67", "FOXP3", "TCF-1", "HIF1A")
CYTOPLASMIC = ("Pan-Cytokeratin", "aSMA", "CD68", "Granzyme B", "MMP9", "Mac2/Galectin-3", "MPO", "Bcl-2")
EXTRACELLULAR = ("Collagen IV",)

VISIBLE_MARKERS = (
    "DAPI", "Pan-Cytokeratin", "E-cadherin", "EpCAM", "CD3e", "CD45", "CD20", "CD21", "CD163", "CD68", "CD14",
    "CD11c", "Mac2/Galectin-3", "CD66b", "MPO", "MMP9", "aSMA", "FAP", "Collagen IV", "CD31", "CD138",
)
"""Markers whose per-patch mean H&E reveals: they follow cell types that look distinct in H&E or tissue
compartments. CD4/CD8 (identical-looking T cells) and all state markers driven by hidden fields are excluded."""


def _sigmoid(x: np.ndarray | float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def marker_compartment(marker: str) -> str:
    """Return ``"N"``, ``"M"``, ``"C"`` or ``"E"`` (nuclear, membrane, cytoplasmic, extracellular) for a marker."""
    if marker in NUCLEAR:
        return "N"
    if marker in CYTOPLASMIC:
        return "C"
    if marker in EXTRACELLULAR:
        return "E"
    return "M"


# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Patient:
    """Patient-level latents shared by all slides of one case."""

    case_id: str
    age: float
    stage: int  # 1..4
    hot: float  # immune infiltration, standard normal
    myeloid: float  # myeloid inflammation, standard normal
    tumour_frac: float  # fraction of tissue area in tumour nests
    offsets: dict[str, float] = field(default_factory=dict)  # logit offsets of the hidden programmes


def sample_patient(rng: np.random.Generator, case_id: str) -> Patient:
    """Draw one patient's latents."""
    age = float(np.clip(rng.normal(66.0, 9.0), 38.0, 89.0))
    stage = int(rng.choice([1, 2, 3, 4], p=[0.35, 0.25, 0.28, 0.12]))
    offsets = {k: float(rng.normal(0.0, 0.9)) for k in PROGRAMMES}
    return Patient(case_id=case_id, age=round(age, 1), stage=stage, hot=float(rng.normal()),
                   myeloid=float(rng.normal()), tumour_frac=float(rng.uniform(0.22, 0.5)), offsets=offsets)
