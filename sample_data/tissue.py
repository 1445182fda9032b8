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
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from .panel import MARKER_INDEX, MARKERS

log = logging.getLogger(__name__)

GRID_UM = 4.0
"""Pixel size of the coarse latent maps (µm)."""

# ---------------------------------------------------------------------------------------------------------------
# cell types
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
def _sigmoid(x: np.ndarray | float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], scale_px: float) -> np.ndarray:
    """Standardised smooth Gaussian random field.

    Args:
        shape: (h, w) of the output grid.
        scale_px: correlation length in output pixels.
    Returns:
        float32 (h, w), mean 0 and sd 1 over the grid.
    """
    h, w = shape
    f = max(1.0, scale_px / 3.0)  # low-res pixels per output pixel
    lh, lw = int(np.ceil(h / f)) + 6, int(np.ceil(w / f)) + 6
    low = rng.standard_normal((lh, lw)).astype(np.float32)
    low = cv2.GaussianBlur(low, (0, 0), 1.2, borderType=cv2.BORDER_REFLECT)
    up = cv2.resize(low, (int(round(lw * f)), int(round(lh * f))), interpolation=cv2.INTER_CUBIC)
    o = int(round(3 * f))
    out = up[o:o + h, o:o + w]
    if out.shape != (h, w):  # rounding guard
        out = cv2.resize(up, (w, h), interpolation=cv2.INTER_LINEAR)
    out = out - out.mean()
    return (out / (out.std() + 1e-6)).astype(np.float32)


def _signed_distance(mask: np.ndarray, px_um: float) -> np.ndarray:
    """Signed Euclidean distance (µm) to the mask boundary, > 0 inside. float32, same shape as ``mask``."""
    if mask.all():
        return np.full(mask.shape, 1e4, np.float32)
    if not mask.any():
        return np.full(mask.shape, -1e4, np.float32)
    inside = ndi.distance_transform_edt(mask)
    outside = ndi.distance_transform_edt(~mask)
    return ((inside - outside) * px_um).astype(np.float32)


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


@dataclass
class Layout:
    """Latent layout of one slide on a coarse grid (``grid_um`` µm per pixel, pixel q centred at (q+0.5)·grid_um).

    Maps are float32 (h, w). Signed distances are in µm and positive inside the region.
    """

    grid_um: float
    side_um: float  # the world frame is [0, side_um)²
    tissue: np.ndarray  # signed distance to the tissue-blob boundary (air spaces excluded)
    tumour: np.ndarray  # signed distance to tumour-nest boundaries
    airspace: np.ndarray  # signed distance to lung air spaces
    aggregate: np.ndarray  # normalised radius of the nearest lymphoid aggregate (< 1 inside, < 0.55 B-cell core)
    myeloid: np.ndarray  # myeloid focus intensity in [0, 1]
    plasma: np.ndarray  # plasma-cell-rich areas in [0, 1]
    infil: np.ndarray  # lymphocyte infiltration in [0, 1] (visible: it sets lymphocyte density)
    ecm: np.ndarray  # stromal matrix density, ~0.5..1.2 (dense collagen vs loose oedematous stroma)
    fibre_angle: np.ndarray  # stromal fibre orientation (rad)
    hidden: dict[str, np.ndarray]  # smooth standard-normal fields of the hidden programmes
    vessels: np.ndarray  # (n, 5) lumen ellipses: cx, cy, a, b, theta (µm, rad)

    def sample(self, name: str, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Bilinear sample of map ``name`` (attribute or hidden programme) at world positions (µm) -> float32."""
        m = self.hidden[name] if name in self.hidden else getattr(self, name)
        coords = np.stack([np.asarray(y_um) / self.grid_um - 0.5, np.asarray(x_um) / self.grid_um - 0.5])
        return ndi.map_coordinates(m, coords, order=1, mode="nearest").astype(np.float32)


def make_layout(rng: np.random.Generator, patient: Patient, tissue_um: float, margin_um: float) -> Layout:
    """Draw the latent layout of one slide.

    Args:
        tissue_um: nominal diameter of the tissue blob (µm); its bounding box is ~0.85-1.1 x this.
        margin_um: glass around it (µm); the world frame side is ``1.12·tissue_um + 2·margin_um``.
    """
    g = GRID_UM
    side = 1.12 * tissue_um + 2.0 * margin_um
    n = int(np.ceil(side / g))
    cc = (np.arange(n, dtype=np.float32) + 0.5) * g
    xx, yy = np.meshgrid(cc, cc)
    c0 = side / 2.0
    um = 1.0 / g  # grid pixels per µm

    # tissue blob: a bumpy disc with a noisy edge, one connected piece
    dx, dy = xx - c0, yy - c0
    r, phi = np.hypot(dx, dy), np.arctan2(dy, dx)
    amps = rng.uniform(0.0, 0.07, 4)
    bumps = sum(a * np.cos(k * phi + rng.uniform(0, 2 * np.pi)) for k, a in zip(range(2, 6), amps))
    # boundary radius = R(phi) * (1 + 0.08 tanh(noise)) <= 0.56 tissue_um: it never touches the frame edge
    radius = 0.5 * tissue_um * (1.0 + bumps) / (1.0 + 0.5 * amps.sum()) / 1.08
    blob = radius * (1.0 + 0.08 * np.tanh(smooth_field(rng, (n, n), 140 * um))) - r
    blob_mask = blob > 0
    lab, nlab = ndi.label(blob_mask)
    if nlab > 1:
        sizes = ndi.sum(blob_mask, lab, index=np.arange(1, nlab + 1))
        blob_mask = lab == (1 + int(np.argmax(sizes)))
    blob_mask = ndi.binary_fill_holes(blob_mask)
    inside_d = _signed_distance(blob_mask, g)

    # tumour nests: thresholded multi-scale field, tumour_frac of the tissue
    tf = smooth_field(rng, (n, n), 110 * um) + 0.7 * smooth_field(rng, (n, n), 320 * um)
    thr = np.quantile(tf[blob_mask], 1.0 - patient.tumour_frac)
    nests = (tf > thr) & (inside_d > 12.0)
    nests = ndi.binary_opening(nests, iterations=2)
    tumour = cv2.GaussianBlur(_signed_distance(nests, g), (0, 0), 1.0)

    # lymphoid aggregates in the stroma, more in immune-hot tumours
    area_mm2 = float(blob_mask.sum()) * g * g / 1e6
    n_agg = int(rng.poisson(area_mm2 * 3.0 * np.exp(0.5 * patient.hot)))
    agg = np.full((n, n), 9.0, np.float32)
    wobble = 1.0 + 0.12 * smooth_field(rng, (n, n), 30 * um)
    placed: list[tuple[float, float, float]] = []
    for _ in range(n_agg):
        for _try in range(30):
            ra = float(rng.uniform(55.0, 130.0))
            x0, y0 = rng.uniform(0, side, 2)
            q = (min(int(y0 / g), n - 1), min(int(x0 / g), n - 1))
            if inside_d[q] < ra + 20 or tumour[q] > -(ra + 25):
                continue
            if any(np.hypot(x0 - px, y0 - py) < ra + pr + 30 for px, py, pr in placed):
                continue
            placed.append((x0, y0, ra))
            e, th = rng.uniform(0.7, 1.0), rng.uniform(0, np.pi)
            u = (xx - x0) * np.cos(th) + (yy - y0) * np.sin(th)
            v = -(xx - x0) * np.sin(th) + (yy - y0) * np.cos(th)
            rho = np.sqrt((u / ra) ** 2 + (v / (ra * e)) ** 2) * wobble
            np.minimum(agg, rho.astype(np.float32), out=agg)
            break

    # lung air spaces: holes in stroma away from nests and aggregates
    air_f = smooth_field(rng, (n, n), 38 * um)
    allowed = (tumour < -25) & (agg > 1.3) & (inside_d > 25)
    if allowed.sum() > 50:
        athr = np.quantile(air_f[allowed], 1.0 - rng.uniform(0.05, 0.12))
        air = (air_f > athr) & allowed
    else:
        air = np.zeros((n, n), bool)
    airspace = cv2.GaussianBlur(_signed_distance(air, g), (0, 0), 1.0)

    # vessels: lumen ellipses in stroma
    n_ves = int(rng.poisson(area_mm2 * 30.0))
    vessels: list[tuple[float, float, float, float, float]] = []
    for _ in range(n_ves):
        for _try in range(20):
            a = float(np.exp(rng.uniform(np.log(5.0), np.log(28.0))))
            b = a * float(rng.uniform(0.45, 1.0))
            x0, y0 = rng.uniform(0, side, 2)
            q = (min(int(y0 / g), n - 1), min(int(x0 / g), n - 1))
            if inside_d[q] < a + 25 or tumour[q] > -(a + 12) or agg[q] < 1.25 or airspace[q] > -(a + 8):
                continue
            if any(np.hypot(x0 - v[0], y0 - v[1]) < a + v[2] + 18 for v in vessels):
                continue
            vessels.append((float(x0), float(y0), a, b, float(rng.uniform(0, np.pi))))
            break
    ves = np.array(vessels, np.float32).reshape(-1, 5)

    # myeloid foci (macrophage / neutrophil aggregates) and plasma-rich areas
    mf = smooth_field(rng, (n, n), 70 * um)
    myeloid = _sigmoid((mf - (1.55 - 0.45 * patient.myeloid)) / 0.2).astype(np.float32)
    plasma = _sigmoid((smooth_field(rng, (n, n), 150 * um) - 0.8) / 0.3).astype(np.float32)
    infil = _sigmoid(1.5 * smooth_field(rng, (n, n), 180 * um)).astype(np.float32)
    ecm = np.clip(0.85 + 0.22 * smooth_field(rng, (n, n), 120 * um), 0.45, 1.25).astype(np.float32)

    # fibre orientation: random smooth, tangential to nest boundaries near them
    ang = (np.pi * smooth_field(rng, (n, n), 220 * um)).astype(np.float32)
    gy, gx = np.gradient(tumour)
    tang = np.arctan2(gy, gx) + np.pi / 2
    wt = np.exp(-(np.abs(tumour) / 60.0) ** 2)
    fibre = np.arctan2(wt * np.sin(2 * tang) + (1 - wt) * np.sin(2 * ang),
                       wt * np.cos(2 * tang) + (1 - wt) * np.cos(2 * ang)) / 2

    hidden = {k: smooth_field(rng, (n, n), s * um) for k, s in PROGRAMMES.items()}
    # smooth boundary (the continuous blob function; the EDT of the mask would show the 4 µm grid as steps)
    edge = np.where(blob_mask, np.maximum(blob, 0.05), np.minimum(blob, -0.05))
    tissue = np.minimum(edge, -airspace).astype(np.float32)
    return Layout(grid_um=g, side_um=float(n * g), tissue=tissue, tumour=tumour.astype(np.float32),
                  airspace=airspace.astype(np.float32), aggregate=agg, myeloid=myeloid, plasma=plasma, infil=infil,
                  ecm=ecm, fibre_angle=fibre.astype(np.float32), hidden=hidden, vessels=ves)


# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Cells:
    """All cells of one slide, world frame. Lengths in µm, angles in rad; arrays of length N unless noted.

    Nucleus: ellipse with semi-axes (na, nb) centred at the cell centre + (nox, noy) in the cell's own frame
    (rotated by ``theta``), its radius modulated by ``1 + Σ amp_k cos(k φ + ph_k)`` for k = 2, 3, 5; neutrophils
    instead have up to 4 round lobes ``lobes`` (N, 4, 3: x, y, r in the cell frame; r = 0 unused). RBCs have no
    nucleus (na = 0). Body: ellipse (ba, bb), clipped by the Voronoi partition between neighbouring cells.
    """

    x: np.ndarray
    y: np.ndarray
    type: np.ndarray  # int8 cell type
    theta: np.ndarray
    na: np.ndarray
    nb: np.ndarray
    nox: np.ndarray
    noy: np.ndarray
    amp: np.ndarray  # (N, 3)
    ph: np.ndarray  # (N, 3)
    lobes: np.ndarray  # (N, 4, 3)
    ba: np.ndarray
    bb: np.ndarray
    dark: np.ndarray  # haematoxylin density of the nucleus (also drives DAPI)
    vesicular: np.ndarray  # 0..1, dark rim + pale centre + nucleolus
    h_cyto: np.ndarray  # haematoxylin density of the cytoplasm (basophilia)
    e_cyto: np.ndarray  # eosin density of the cytoplasm
    perivascular: np.ndarray  # bool: smooth-muscle cell around a vessel
    expr: np.ndarray | None = None  # (N, 40) float32, set by express()

    def __len__(self) -> int:
        return int(self.x.shape[0])


# candidate intensities (cells / mm² before the non-overlap thinning) per compartment
_LAMBDA_MAX = 40000.0
_EXCLUSION = {TUMOUR: 5.5, CD8T: 3.6, CD4T: 3.6, BCELL: 3.9, MACRO: 6.0, NEUTRO: 4.4, FIBRO: 5.5, ENDO: 5.0,
              PLASMA: 4.6, RBC: 3.6}


def _type_weights(comp: dict[str, np.ndarray], patient: Patient, density: float) -> np.ndarray:
    """Per-candidate intensities (cells/mm²) of each cell type, (n, 10) float64."""
    n = comp["tumour"].shape[0]
    lam = np.zeros((n, len(CELL_TYPES)))
    hot = np.exp(0.75 * patient.hot)
    tum, strm, core, mantle, air = comp["tumour"], comp["stroma"], comp["core"], comp["mantle"], comp["air"]
    my, pl, cd8p = comp["myeloid"], comp["plasma"], comp["p_cd8"]
    lymph_tum = 260.0 * hot * (0.4 + 1.2 * comp["infil"])
    lymph_str = 900.0 * hot * (0.5 + comp["infil"])
    t_total = tum * lymph_tum + strm * lymph_str + core * 4000.0 + mantle * 24000.0
    lam[:, CD8T] = t_total * cd8p
    lam[:, CD4T] = t_total * (1 - cd8p)
    lam[:, TUMOUR] = tum * 20000.0 * (1 - 0.5 * my)
    lam[:, BCELL] = strm * 60.0 + core * 26000.0 + mantle * 5000.0
    lam[:, MACRO] = tum * (60.0 + 900.0 * my) + strm * (200.0 + 3500.0 * my) + core * 150.0 + air * 700.0
    lam[:, NEUTRO] = tum * 3500.0 * my + strm * (20.0 + 3500.0 * my)
    lam[:, FIBRO] = strm * 2000.0 * (1 - 0.6 * my)
    lam[:, PLASMA] = strm * (50.0 + 1500.0 * pl * np.exp(0.3 * patient.hot))
    return lam * density


def _resolve_overlaps(x: np.ndarray, y: np.ndarray, rex: np.ndarray, prio: np.ndarray, rounds: int = 4) -> np.ndarray:
    """Greedy non-overlap thinning: keep a maximal-ish set with |p_i - p_j| >= rex_i + rex_j, higher prio first.

    Returns a bool keep-mask of length n.
    """
    n = x.shape[0]
    keep = np.zeros(n, bool)
    if n == 0:
        return keep
    pts = np.stack([x, y], 1)
    tree = cKDTree(pts)
    pairs = tree.query_pairs(2.0 * float(rex.max()), output_type="ndarray")
    if len(pairs):
        d = np.hypot(*(pts[pairs[:, 0]] - pts[pairs[:, 1]]).T)
        pairs = pairs[d < rex[pairs[:, 0]] + rex[pairs[:, 1]]]
    # orient each conflict pair as (winner, loser)
    swap = prio[pairs[:, 0]] < prio[pairs[:, 1]]
    win = np.where(swap, pairs[:, 1], pairs[:, 0])
    lose = np.where(swap, pairs[:, 0], pairs[:, 1])
    pending = np.ones(n, bool)
    for _ in range(rounds):
        # drop pending candidates that conflict with a kept one
        bad = np.zeros(n, bool)
        bad[lose[keep[win]]] = True
        bad[win[keep[lose]]] = True
        pending &= ~bad
        # among pending, those that lose to no pending candidate are kept
        active = pending[win] & pending[lose]
        beaten = np.zeros(n, bool)
        beaten[lose[active]] = True
        new = pending & ~beaten
        keep |= new
        pending &= ~new
        if not pending.any():
            break
    return keep


def place_cells(rng: np.random.Generator, layout: Layout, patient: Patient, density: float = 1.0) -> Cells:
    """Fill the layout with non-overlapping cells and give each its geometry and stain densities."""
    s = layout.side_um
    tissue_px = layout.tissue > 0
    ys, xs = np.nonzero(tissue_px)
    g = layout.grid_um
    x0, x1 = xs.min() * g, (xs.max() + 1) * g
    y0, y1 = ys.min() * g, (ys.max() + 1) * g
    lam_max = _LAMBDA_MAX * density
    n_cand = int(rng.poisson(lam_max * (x1 - x0) * (y1 - y0) / 1e6))
    cx = rng.uniform(x0, x1, n_cand)
    cy = rng.uniform(y0, y1, n_cand)
    ins = layout.sample("tissue", cx, cy) > 0
    air = layout.sample("airspace", cx, cy) > 2.0
    inblob = ins | air
    cx, cy, air = cx[inblob], cy[inblob], air[inblob]
    if len(layout.vessels):  # keep candidates off lumens and vessel walls
        vt = cKDTree(layout.vessels[:, :2])
        lists = vt.query_ball_point(np.stack([cx, cy], 1), r=float(layout.vessels[:, 2].max()) + 9.0)
        off = np.ones(cx.shape[0], bool)
        for i, lst in enumerate(lists):
            for j in lst:
                vx, vy, a, b, th = layout.vessels[j]
                u = (cx[i] - vx) * np.cos(th) + (cy[i] - vy) * np.sin(th)
                v = -(cx[i] - vx) * np.sin(th) + (cy[i] - vy) * np.cos(th)
                if (u / (a + 7.0)) ** 2 + (v / (b + 7.0)) ** 2 < 1.0:
                    off[i] = False
        cx, cy, air = cx[off], cy[off], air[off]
    tum = layout.sample("tumour", cx, cy) > 0
    agg = layout.sample("aggregate", cx, cy)
    core = (agg < 0.55) & ~tum & ~air
    mantle = (agg >= 0.55) & (agg < 1.0) & ~tum & ~air
    strm = ~tum & ~core & ~mantle & ~air
    comp = {
        "tumour": tum.astype(float), "stroma": strm.astype(float), "core": core.astype(float),
        "mantle": mantle.astype(float), "air": air.astype(float),
        "myeloid": layout.sample("myeloid", cx, cy).astype(float),
        "plasma": layout.sample("plasma", cx, cy).astype(float),
        "infil": layout.sample("infil", cx, cy).astype(float),
        "p_cd8": _sigmoid(3.0 * layout.sample("cd8", cx, cy) + patient.offsets["cd8"] * 0.8),
    }
    lam = _type_weights(comp, patient, density)
    cum = np.cumsum(lam, 1) / lam_max
    u = rng.uniform(size=cx.shape[0])[:, None]
    typ = (u >= cum).sum(1)  # == n_types where no cell
    sel = typ < len(CELL_TYPES)
    cx, cy, typ = cx[sel], cy[sel], typ[sel]

    # explicit vessel cells: endothelium lining each lumen, smooth muscle around large ones, RBCs inside
    ex, ey, et, eth, epv = [], [], [], [], []
    for vx, vy, a, b, th in layout.vessels:
        per = np.pi * (3 * (a + b) - np.sqrt((3 * a + b) * (a + 3 * b)))
        rings = [(1.3, 13.0, ENDO, False)] + ([(5.5, 15.0, FIBRO, True)] if a > 12 else [])
        for off_um, spacing, t, pv in rings:
            k = max(3, int(round(per / spacing)))
            ang = (np.arange(k) + rng.uniform()) * 2 * np.pi / k
            lu, lv = (a + off_um) * np.cos(ang), (b + off_um) * np.sin(ang)
            ex.append(vx + lu * np.cos(th) - lv * np.sin(th))
            ey.append(vy + lu * np.sin(th) + lv * np.cos(th))
            tan = np.arctan2((b + off_um) * np.cos(ang), -(a + off_um) * np.sin(ang)) + th
            eth.append(tan)
            et.append(np.full(k, t))
            epv.append(np.full(k, pv))
        fill = rng.uniform(0.0, 0.55)
        if a > 4 and b > 4:
            k = int(rng.poisson(fill * (a - 2.5) * (b - 2.5) / 13.0))
            rr = np.sqrt(rng.uniform(size=k))
            aa = rng.uniform(0, 2 * np.pi, k)
            lu, lv = rr * (a - 3.0) * np.cos(aa), rr * (b - 3.0) * np.sin(aa)
            ex.append(vx + lu * np.cos(th) - lv * np.sin(th))
            ey.append(vy + lu * np.sin(th) + lv * np.cos(th))
            eth.append(rng.uniform(0, np.pi, k))
            et.append(np.full(k, RBC))
            epv.append(np.zeros(k, bool))
    n_rand = cx.shape[0]
    if ex:
        cx = np.concatenate([cx, *ex])
        cy = np.concatenate([cy, *ey])
        typ = np.concatenate([typ, *et])
    pv = np.zeros(cx.shape[0], bool)
    theta = rng.uniform(0, np.pi, cx.shape[0])
    if ex:
        pv[n_rand:] = np.concatenate(epv)
        theta[n_rand:] = np.concatenate(eth)

    rex = np.array([_EXCLUSION[t] for t in range(len(CELL_TYPES))])[typ]
    prio = rng.uniform(size=cx.shape[0])
    prio[typ == TUMOUR] += 1.0
    prio[n_rand:] += 2.0
    prio[(typ == ENDO)] += 1.0
    keep = _resolve_overlaps(cx, cy, rex, prio)
    keep &= (cx > 0) & (cy > 0) & (cx < s) & (cy < s)
    cx, cy, typ, theta, pv = cx[keep], cy[keep], typ[keep], theta[keep], pv[keep]
    n = cx.shape[0]
    log.debug("placed %d cells (%s)", n, {CELL_TYPES[t]: int((typ == t).sum()) for t in range(len(CELL_TYPES))})
    return _geometry(rng, layout, cx, cy, typ.astype(np.int8), theta, pv)


def _geometry(rng: np.random.Generator, layout: Layout, x: np.ndarray, y: np.ndarray, typ: np.ndarray,
              theta: np.ndarray, pv: np.ndarray) -> Cells:
    """Nucleus/body shape and stain densities per cell type (µm)."""
    n = x.shape[0]
    f32 = np.float32
    na, nb = np.zeros(n, f32), np.zeros(n, f32)
    nox, noy = np.zeros(n, f32), np.zeros(n, f32)
    amp, ph = np.zeros((n, 3), f32), rng.uniform(0, 2 * np.pi, (n, 3)).astype(f32)
    lobes = np.zeros((n, 4, 3), f32)
    ba, bb = np.zeros(n, f32), np.zeros(n, f32)
    dark, ves = np.zeros(n, f32), np.zeros(n, f32)
    hc, ec = np.zeros(n, f32), np.zeros(n, f32)

    def u(lo: float, hi: float, m: np.ndarray) -> np.ndarray:
        return rng.uniform(lo, hi, int(m.sum())).astype(f32)

    m = typ == TUMOUR  # large, pleomorphic, irregular, vesicular or hyperchromatic
    na[m] = u(4.3, 6.4, m)
    nb[m] = na[m] * u(0.68, 0.95, m)
    amp[m] = rng.uniform(0.02, 0.11, (int(m.sum()), 3))
    ba[m], bb[m] = u(10.5, 12.5, m), u(10.0, 12.0, m)
    dark[m] = u(0.85, 1.35, m)
    ves[m] = u(0.3, 1.0, m)
    hc[m], ec[m] = u(0.10, 0.2, m), u(0.38, 0.52, m)

    for t, r0, r1, dk in ((CD8T, 2.7, 3.2, 1.85), (CD4T, 2.7, 3.2, 1.85), (BCELL, 3.0, 3.6, 1.55)):
        m = typ == t  # small round dark
        na[m] = u(r0, r1, m)
        nb[m] = na[m] * u(0.86, 1.0, m)
        amp[m, 0] = u(0.0, 0.03, m)
        ba[m] = bb[m] = na[m] + u(0.8, 1.3, m)
        dark[m] = dk * u(0.9, 1.1, m)
        ves[m] = 0.0 if t != BCELL else u(0.0, 0.3, m)
        hc[m], ec[m] = 0.12, 0.25

    m = typ == MACRO  # larger pale oval/kidney nucleus, eccentric, abundant pink cytoplasm
    na[m], nb[m] = u(4.0, 5.2, m), u(2.8, 3.6, m)
    amp[m, 0] = u(0.08, 0.15, m)
    nox[m] = u(1.0, 2.5, m)
    ba[m], bb[m] = u(9.5, 11.5, m), u(8.5, 10.5, m)
    dark[m] = u(0.65, 0.85, m)
    ves[m] = u(0.3, 0.6, m)
    hc[m], ec[m] = 0.05, u(0.62, 0.78, m)

    m = typ == NEUTRO  # 3-4 lobes on an arc, pale cytoplasm
    k = int(m.sum())
    nl = rng.integers(3, 5, k)
    arc = rng.uniform(1.6, 2.0, k)
    start = rng.uniform(0, 2 * np.pi, k)
    for j in range(4):
        a_j = start + j * 2 * np.pi / (nl + 0.6)
        lob = np.stack([arc * np.cos(a_j), arc * np.sin(a_j), np.where(j < nl, rng.uniform(1.45, 1.75, k), 0)], 1)
        lobes[m, j] = lob
    na[m] = nb[m] = 4.2  # bounding radius, for bookkeeping
    ba[m] = bb[m] = u(5.6, 6.4, m)
    dark[m] = u(1.7, 1.9, m)
    hc[m], ec[m] = 0.03, u(0.28, 0.36, m)

    m = typ == FIBRO  # spindle nuclei along the fibres
    ang = layout.sample("fibre_angle", x[m], y[m])
    theta[m & ~pv] = ang[~pv[m]]
    na[m], nb[m] = u(5.5, 8.0, m), u(1.3, 1.9, m)
    amp[m, 0] = u(0.0, 0.05, m)
    ba[m], bb[m] = na[m] + u(3.0, 5.0, m), u(2.6, 3.2, m)
    dark[m] = u(1.15, 1.4, m)
    hc[m], ec[m] = 0.02, u(0.5, 0.6, m)

    m = typ == ENDO  # flat nuclei lining the lumen
    na[m], nb[m] = u(4.5, 6.0, m), u(1.1, 1.5, m)
    ba[m], bb[m] = na[m] + u(1.5, 2.5, m), u(2.0, 2.6, m)
    dark[m] = u(1.2, 1.45, m)
    hc[m], ec[m] = 0.03, u(0.45, 0.55, m)

    m = typ == PLASMA  # eccentric round nucleus, clock-face chromatin, purple-pink cytoplasm
    na[m] = u(2.8, 3.3, m)
    nb[m] = na[m] * u(0.9, 1.0, m)
    nox[m] = u(2.2, 3.0, m)
    ba[m], bb[m] = u(6.3, 7.2, m), u(4.8, 5.6, m)
    dark[m] = u(1.45, 1.65, m)
    ves[m] = 0.8
    hc[m], ec[m] = u(0.32, 0.42, m), u(0.38, 0.46, m)

    m = typ == RBC
    ba[m] = bb[m] = u(3.3, 3.8, m)

    return Cells(x=x.astype(f32), y=y.astype(f32), type=typ, theta=theta.astype(f32), na=na, nb=nb, nox=nox,
                 noy=noy, amp=amp, ph=ph, lobes=lobes, ba=ba, bb=bb, dark=dark, vesicular=ves, h_cyto=hc, e_cyto=ec,
                 perivascular=pv)


# ---------------------------------------------------------------------------------------------------------------
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
