"""Cells of one slide: placement on the layout (candidate intensities per type, non-overlap thinning, vessel
linings) and per-type nucleus / body geometry and stain densities."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from .celltypes import BCELL, CD4T, CD8T, CELL_TYPES, ENDO, FIBRO, MACRO, NEUTRO, PLASMA, RBC, TUMOUR, Patient, _sigmoid
from .layout import Layout

log = logging.getLogger("sample_data.tissue")

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
