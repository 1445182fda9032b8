"""Rasterise the cells of a slide into an image frame and render the H&E and CODEX images from them.

A :class:`Frame` is an image grid placed in the slide's world frame (µm) by a 3x3 affine ``px_to_um`` that maps the
pixel centre (x, y) = (column, row) to world µm. The H&E frame is axis-aligned at 0.5 µm/px; the CODEX frame is
rotated and shifted at 0.377 µm/px. Both are rasterised from the same cells, so nuclei have the same geometry in
both images, and ``inv(he.px_to_um) @ codex.px_to_um`` is the exact CODEX → H&E pixel affine.

Rasterisation is vectorised: one distance transform gives the Voronoi partition of the frame around the cell
centres (which cell may own each pixel); each pixel is then tested against its owner's body ellipse and nucleus
shape (irregular contour, multi-lobed neutrophils), evaluated in the owner's µm frame. Work is done in strips of
rows so that the per-pixel temporaries stay in cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np

from .panel import MARKERS
from .tissue import NEUTRO, RBC, TUMOUR, Cells, Layout, marker_compartment

# optical densities (R, G, B) per unit stain concentration
HAEMATOXYLIN = np.array([0.80, 1.00, 0.42], np.float32)
EOSIN = np.array([0.12, 0.85, 0.42], np.float32)
RBC_STAIN = np.array([0.22, 1.35, 1.15], np.float32)
_STRIP = 96  # rows per strip


@dataclass(frozen=True)
class StainProfile:
    """A hospital's base H&E stain: OD (R, G, B) per unit of haematoxylin and eosin, the amounts that scale them,
    the scanner's white (background gain per channel, 1 = 255) and its JPEG quality."""

    h_od: tuple[float, float, float]
    e_od: tuple[float, float, float]
    h_amount: float = 1.0
    e_amount: float = 1.0
    white: tuple[float, float, float] = (1.0, 1.0, 1.0)
    jpeg_quality: int = 90


# ``default`` is the stain every cohort had before profiles existed; the others are hospital-like shifts
STAIN_PROFILES: dict[str, StainProfile] = {
    "default": StainProfile(h_od=(0.80, 1.00, 0.42), e_od=(0.12, 0.85, 0.42)),
    "pale": StainProfile(h_od=(0.80, 1.00, 0.42), e_od=(0.12, 0.85, 0.42), h_amount=0.6, e_amount=0.55,
                         white=(0.99, 0.99, 0.98)),
    "dark": StainProfile(h_od=(0.80, 1.00, 0.42), e_od=(0.15, 0.90, 0.45), h_amount=1.45, e_amount=1.35,
                         white=(0.97, 0.96, 0.94)),
    "purple": StainProfile(h_od=(0.95, 1.00, 0.28), e_od=(0.32, 0.95, 0.30), h_amount=1.1, e_amount=1.1,
                           white=(0.97, 0.96, 1.0)),
}


@dataclass(frozen=True)
class StainVariation:
    """Per-slide random variation around a profile: amount factors drawn from 1 ± ``amount`` (H) and 1 ±
    ``1.25 x amount`` (E), Gaussian noise of sd ``vector_sd`` on each OD entry, a per-channel white gain in
    [1 - ``white``, 1], and a JPEG quality drawn from ``jpeg`` (inclusive range)."""

    amount: float
    vector_sd: float
    white: float
    jpeg: tuple[int, int]


# moderate: the within-site variation of one hospital (the amount/vector jitter every cohort had, plus white balance
# and JPEG quality); strong: several sites pooled
STAIN_VARIATIONS: dict[str, StainVariation | None] = {
    "none": None,
    "moderate": StainVariation(amount=0.12, vector_sd=0.03, white=0.04, jpeg=(80, 95)),
    "strong": StainVariation(amount=0.3, vector_sd=0.08, white=0.10, jpeg=(60, 95)),
}


@dataclass(frozen=True)
class Stain:
    """The stain one slide is rendered with: ``h_od``, ``e_od`` float32 (3,) OD per unit stain (amounts folded in),
    ``white`` float32 (3,) background gain per channel, ``jpeg_quality`` of its pyramid."""

    h_od: np.ndarray
    e_od: np.ndarray
    white: np.ndarray
    jpeg_quality: int

    def to_dict(self) -> dict:
        """JSON-able record (ground_truth.json ``slides[s]["stain"]``)."""
        return {"h_od": [round(float(v), 6) for v in self.h_od], "e_od": [round(float(v), 6) for v in self.e_od],
                "white": [round(float(v), 6) for v in self.white], "jpeg_quality": int(self.jpeg_quality)}


def draw_stain(rng: np.random.Generator | None, profile: str = "default", variation: str = "none") -> Stain:
    """The slide's stain: ``profile`` (a name of :data:`STAIN_PROFILES`) varied by ``variation`` (a name of
    :data:`STAIN_VARIATIONS`) with draws from ``rng`` (the slide's own stain stream; unused for "none")."""
    if profile not in STAIN_PROFILES:
        raise ValueError(f"unknown stain profile {profile!r}; one of {sorted(STAIN_PROFILES)}")
    if variation not in STAIN_VARIATIONS:
        raise ValueError(f"unknown stain variation {variation!r}; one of {sorted(STAIN_VARIATIONS)}")
    p, v = STAIN_PROFILES[profile], STAIN_VARIATIONS[variation]
    hv = np.array(p.h_od, np.float32) * p.h_amount
    ev = np.array(p.e_od, np.float32) * p.e_amount
    white = np.array(p.white, np.float32)
    quality = p.jpeg_quality
    if v is not None:
        if rng is None:
            raise ValueError(f"stain variation {variation!r} needs a random stream")
        hv = hv * rng.uniform(1 - v.amount, 1 + v.amount) + rng.normal(0, v.vector_sd, 3).astype(np.float32)
        ev = ev * rng.uniform(1 - 1.25 * v.amount, 1 + 1.25 * v.amount) \
            + rng.normal(0, 0.67 * v.vector_sd, 3).astype(np.float32)
        white = white * rng.uniform(1 - v.white, 1.0, 3).astype(np.float32)
        quality = int(rng.integers(v.jpeg[0], v.jpeg[1] + 1))
    return Stain(h_od=np.maximum(hv, 0.02).astype(np.float32), e_od=np.maximum(ev, 0.02).astype(np.float32),
                 white=np.clip(white, 0.5, 1.0).astype(np.float32), jpeg_quality=int(quality))


@dataclass
class Frame:
    """An image grid: ``shape`` (H, W) pixels, ``px_to_um`` 3x3 affine (pixel centre -> world µm), ``mpp`` µm/px."""

    shape: tuple[int, int]
    px_to_um: np.ndarray
    mpp: float

    @property
    def um_to_px(self) -> np.ndarray:
        """3x3 affine world µm -> pixel."""
        return np.linalg.inv(self.px_to_um)


def he_frame(side_um: float, mpp: float = 0.5) -> Frame:
    """Axis-aligned frame covering the world square [0, side_um)², pixel x centred at world (x + 0.5)·mpp."""
    n = int(round(side_um / mpp))
    m = np.array([[mpp, 0.0, 0.5 * mpp], [0.0, mpp, 0.5 * mpp], [0.0, 0.0, 1.0]])
    return Frame((n, n), m, mpp)


def codex_frame(centre_um: tuple[float, float], theta_rad: float, shape: tuple[int, int], mpp: float = 0.377) -> Frame:
    """Frame of ``shape`` (H, W) pixels of ``mpp`` µm, its centre at world ``centre_um``, rotated by ``theta_rad``."""
    h, w = shape
    c, s = np.cos(theta_rad), np.sin(theta_rad)
    rot = np.array([[c, -s], [s, c]]) * mpp
    t = np.asarray(centre_um, np.float64) + rot @ np.array([0.5 - w / 2.0, 0.5 - h / 2.0])
    m = np.eye(3)
    m[:2, :2], m[:2, 2] = rot, t
    return Frame((h, w), m, mpp)


def warp_map(layout_map: np.ndarray, layout: Layout, frame: Frame, nearest: bool = False) -> np.ndarray:
    """Resample a coarse layout map (grid pixel q centred at (q + 0.5)·grid µm) into ``frame``; float32 (H, W)."""
    g = layout.grid_um
    to_grid = np.array([[1 / g, 0, -0.5], [0, 1 / g, -0.5], [0, 0, 1]]) @ frame.px_to_um
    h, w = frame.shape
    flags = (cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR) | cv2.WARP_INVERSE_MAP
    return cv2.warpAffine(layout_map.astype(np.float32), to_grid[:2], (w, h), flags=flags,
                          borderMode=cv2.BORDER_REPLICATE)


@dataclass
class Raster:
    """Per-pixel cell geometry of one frame, all (H, W).

    ``cell``: int32, index + 1 of the cell whose body covers the pixel (0 = none); ``nucleus``, ``membrane``: bool;
    ``rho``: float32 normalised nuclear radius (0 centre .. 1 edge) inside nuclei, else 0; ``tissue``, ``lumen``:
    bool; ``lumen_wall``: float32, ~1 on a ~1 µm band around lumen outlines; ``tumour_sd``: float32 signed distance
    (µm) to the nearest tumour-nest boundary, > 0 inside nests.
    """

    cell: np.ndarray
    nucleus: np.ndarray
    membrane: np.ndarray
    rho: np.ndarray
    tissue: np.ndarray
    lumen: np.ndarray
    lumen_wall: np.ndarray
    tumour_sd: np.ndarray


def _vessel_maps(layout: Layout, frame: Frame) -> tuple[np.ndarray, np.ndarray]:
    """Exact lumen mask (bool) and a soft band on the lumen outline (float32) in ``frame``."""
    h, w = frame.shape
    lumen = np.zeros((h, w), bool)
    wall = np.zeros((h, w), np.float32)
    inv, m = frame.um_to_px, frame.px_to_um
    for vx, vy, a, b, th in layout.vessels:
        r = (a + 4.0) / frame.mpp
        cx, cy = (inv @ np.array([vx, vy, 1.0]))[:2]
        x0, x1 = max(int(cx - r), 0), min(int(cx + r) + 2, w)
        y0, y1 = max(int(cy - r), 0), min(int(cy + r) + 2, h)
        if x0 >= x1 or y0 >= y1:
            continue
        xx = np.arange(x0, x1, dtype=np.float32)[None, :]
        yy = np.arange(y0, y1, dtype=np.float32)[:, None]
        u = m[0, 0] * xx + m[0, 1] * yy + (m[0, 2] - vx)
        v = m[1, 0] * xx + m[1, 1] * yy + (m[1, 2] - vy)
        q = np.sqrt(((u * np.cos(th) + v * np.sin(th)) / a) ** 2 + ((v * np.cos(th) - u * np.sin(th)) / b) ** 2)
        lumen[y0:y1, x0:x1] |= q < 1.0
        d = (q - 1.0) * min(a, b)  # ~ distance to the outline (µm)
        np.maximum(wall[y0:y1, x0:x1], np.exp(-((d - 0.8) / 1.0) ** 2), out=wall[y0:y1, x0:x1])
    return lumen, wall


def _pixel_affines(cells: Cells, idx: np.ndarray, frame: Frame) -> np.ndarray:
    """Per-cell rows mapping frame pixel (x, y, 1) to normalised body (u, v) and nucleus (u, v) coordinates.

    Returns float64 (len(idx), 12): body-u, body-v, nucleus-u, nucleus-v rows of 3 coefficients each.
    """
    m = frame.px_to_um
    th = cells.theta[idx].astype(np.float64)
    ct, st = np.cos(th), np.sin(th)
    # cell frame (lu, lv) = R(-theta) · (world - centre); world = m · p
    rows_u = ct[:, None] * m[0, :3] + st[:, None] * m[1, :3]
    rows_v = ct[:, None] * m[1, :3] - st[:, None] * m[0, :3]
    cx, cy = cells.x[idx].astype(np.float64), cells.y[idx].astype(np.float64)
    rows_u[:, 2] -= ct * cx + st * cy
    rows_v[:, 2] -= ct * cy - st * cx
    out = np.zeros((idx.size, 12))
    out[:, 0:3] = rows_u / cells.ba[idx, None]
    out[:, 3:6] = rows_v / cells.bb[idx, None]
    na = np.maximum(cells.na[idx], 1e-3)[:, None]
    nb = np.maximum(cells.nb[idx], 1e-3)[:, None]
    nu, nv = rows_u.copy(), rows_v.copy()
    nu[:, 2] -= cells.nox[idx]
    nv[:, 2] -= cells.noy[idx]
    out[:, 6:9] = nu / na
    out[:, 9:12] = nv / nb
    return out


def rasterise(cells: Cells, layout: Layout, frame: Frame) -> Raster:
    """Rasterise the cells into ``frame`` (see the module docstring).

    Tumour-cell bodies are clipped to their nest (so nests stay cohesive without bulging into the stroma).
    """
    h, w = frame.shape
    mpp = frame.mpp
    pad = int(np.ceil(12.0 / mpp))
    inv = frame.um_to_px
    sx = np.rint(inv[0, 0] * cells.x + inv[0, 1] * cells.y + inv[0, 2]).astype(np.int64) + pad
    sy = np.rint(inv[1, 0] * cells.x + inv[1, 1] * cells.y + inv[1, 2]).astype(np.int64) + pad
    idx = np.flatnonzero((sx >= 0) & (sy >= 0) & (sx < w + 2 * pad) & (sy < h + 2 * pad))
    tissue = warp_map(layout.tissue, layout, frame) > 0
    tumour_sd = warp_map(layout.tumour, layout, frame)
    lumen, wall = _vessel_maps(layout, frame)
    cell = np.zeros((h, w), np.int32)
    nucleus = np.zeros((h, w), bool)
    rho_map = np.zeros((h, w), np.float32)
    membrane = np.zeros((h, w), bool)
    if idx.size == 0:
        return Raster(cell, nucleus, membrane, rho_map, tissue, lumen, wall, tumour_sd)
    seeds = np.ones((h + 2 * pad, w + 2 * pad), np.uint8)
    seeds[sy[idx], sx[idx]] = 0
    _, vlab = cv2.distanceTransformWithLabels(seeds, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL)
    seed_label = vlab[sy[idx], sx[idx]]
    vlab = vlab[pad:pad + h, pad:pad + w]
    # per-label table: 12 affine coefficients, cell index + 1, nucleus kind (0 none, 1 ellipse, 2 lobes), tumour
    table = np.zeros((int(seed_label.max()) + 1, 15), np.float32)
    table[:, 0:3] = (0.0, 0.0, 9.0)  # labels without a cell: never inside a body
    table[seed_label, :12] = _pixel_affines(cells, idx, frame)
    table[seed_label, 12] = idx + 1
    typ = cells.type[idx]
    table[seed_label, 13] = np.where(cells.na[idx] <= 0, 0, np.where(typ == NEUTRO, 2, 1))
    table[seed_label, 14] = typ == TUMOUR
    xs = np.arange(w, dtype=np.float32)
    amp, ph, lobes = cells.amp, cells.ph, cells.lobes
    for r0 in range(0, h, _STRIP):
        r1 = min(h, r0 + _STRIP)
        ys = np.arange(r0, r1, dtype=np.float32)[:, None]
        t = table[vlab[r0:r1]]  # (rows, w, 15)
        bu = t[..., 0] * xs + t[..., 1] * ys + t[..., 2]
        bv = t[..., 3] * xs + t[..., 4] * ys + t[..., 5]
        inb = bu * bu + bv * bv <= 1.0
        inb &= (t[..., 14] == 0) | (tumour_sd[r0:r1] > -1.0)
        cid = np.where(inb, t[..., 12], 0).astype(np.int32)
        cell[r0:r1] = cid
        nu = t[..., 6] * xs + t[..., 7] * ys + t[..., 8]
        nv = t[..., 9] * xs + t[..., 10] * ys + t[..., 11]
        kind = np.where(inb, t[..., 13], 0)
        q = np.sqrt(nu * nu + nv * nv)
        rho = np.full(q.shape, 9.0, np.float32)
        sel = np.flatnonzero((kind == 1) & (q < 1.4))
        if sel.size:
            c = cid.ravel()[sel] - 1
            phi = np.arctan2(nv.ravel()[sel], nu.ravel()[sel])
            a, p = amp[c], ph[c]
            thr = 1.0 + a[:, 0] * np.cos(2 * phi + p[:, 0]) + a[:, 1] * np.cos(3 * phi + p[:, 1]) \
                + a[:, 2] * np.cos(5 * phi + p[:, 2])
            rho.ravel()[sel] = q.ravel()[sel] / thr
        sel = np.flatnonzero(kind == 2)
        if sel.size:  # neutrophil lobes, in the cell frame (µm)
            c = cid.ravel()[sel] - 1
            lu = bu.ravel()[sel] * cells.ba[c]
            lv = bv.ravel()[sel] * cells.bb[c]
            best = np.full(sel.size, 9.0, np.float32)
            for j in range(lobes.shape[1]):
                lr = lobes[c, j, 2]
                d = np.hypot(lu - lobes[c, j, 0], lv - lobes[c, j, 1]) / np.maximum(lr, 1e-3)
                np.minimum(best, np.where(lr > 0, d, 9.0), out=best)
            rho.ravel()[sel] = best
        nuc = rho < 1.0
        nucleus[r0:r1] = nuc
        rho_map[r0:r1] = np.where(nuc, rho, 0.0)
    # membranes: body pixels next to a pixel with another owner
    dx = cell[:, 1:] != cell[:, :-1]
    membrane[:, 1:] |= dx
    membrane[:, :-1] |= dx
    dy = cell[1:, :] != cell[:-1, :]
    membrane[1:, :] |= dy
    membrane[:-1, :] |= dy
    membrane &= cell > 0
    return Raster(cell, nucleus, membrane, rho_map, tissue, lumen, wall, tumour_sd)


def _noise(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Cheap smooth noise: uniform bytes blurred by a Gaussian of ``sigma_px``, ~unit sd; float32 (H, W)."""
    a = np.frombuffer(rng.bytes(shape[0] * shape[1]), np.uint8).reshape(shape).astype(np.float32)
    if sigma_px > 0:
        a = cv2.GaussianBlur(a, (0, 0), sigma_px)
    sub = a[::7, ::7]
    a -= float(sub.mean())
    a *= 1.0 / (float(sub.std()) + 1e-6)
    return a


def _fibres(rng: np.random.Generator, layout: Layout, frame: Frame) -> np.ndarray:
    """Oriented fibrous stroma texture in [0, 1], float32 (H, W), following the layout's fibre orientation.

    Built on a ~1 µm grid from noise filtered by elongated kernels in 6 orientations, blended by orientation.
    """
    h, w = frame.shape
    f = max(1, int(round(1.0 / frame.mpp)))
    hs, ws = (h + f - 1) // f, (w + f - 1) // f
    small = Frame((hs, ws), frame.px_to_um @ np.array([[f, 0, 0.5 * (f - 1)], [0, f, 0.5 * (f - 1)], [0, 0, 1]]),
                  frame.mpp * f)
    ang = warp_map(layout.fibre_angle, layout, small, nearest=True)
    base = _noise(rng, (hs, ws), 0.0)
    out = np.zeros((hs, ws), np.float32)
    wsum = np.full((hs, ws), 1e-6, np.float32)
    yy, xx = np.mgrid[-7:8, -7:8].astype(np.float32)
    k = 6
    for i in range(k):
        a = np.pi * i / k
        along = xx * np.cos(a) + yy * np.sin(a)
        across = -xx * np.sin(a) + yy * np.cos(a)
        kern = np.exp(-(along / 4.5) ** 2 - (across / 0.8) ** 2).astype(np.float32)
        kern /= np.sqrt((kern ** 2).sum())
        resp = cv2.filter2D(base, -1, kern, borderType=cv2.BORDER_REFLECT)
        wt = np.maximum(np.cos(2 * (ang - a)), 0.0) ** 3
        out += wt * resp
        wsum += wt
    out /= wsum
    out = cv2.resize(out, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.clip(0.5 + 0.3 * out, 0.0, 1.0)


def render_he(rng: np.random.Generator, cells: Cells, layout: Layout, frame: Frame, raster: Raster,
              stain: Stain | None = None) -> np.ndarray:
    """Render the H&E image of ``frame``: uint8 (H, W, 3) RGB, white background.

    Beer-Lambert mix of haematoxylin (nuclei, basophilic cytoplasm), eosin (stroma fibres, cytoplasm) and an RBC
    stain, with the slide's ``stain`` (:func:`draw_stain`; default: the ``default`` profile without variation),
    chromatin / cytoplasm / fibre texture, optical blur and sensor noise. ``rng`` draws the textures only, so the
    same ``rng`` with another stain gives the same tissue in other colours.
    """
    h, w = frame.shape
    n = len(cells)
    fib = _fibres(rng, layout, frame)
    agg = warp_map(layout.aggregate, layout, frame)
    ecm_map = warp_map(layout.ecm, layout, frame)
    grain = _noise(rng, (h, w), 0.35 / frame.mpp)  # sizes in µm: the same texture at 20x and 40x
    sensor = np.frombuffer(rng.bytes(h * w), np.uint8).reshape(h, w)
    # per-cell table: e_cyto, h_cyto, dark, vesicular, is_tumour, is_rbc (row 0 = no cell)
    tab = np.zeros((n + 1, 6), np.float32)
    tab[1:, 0], tab[1:, 1], tab[1:, 2], tab[1:, 3] = cells.e_cyto, cells.h_cyto, cells.dark, cells.vesicular
    tab[1:, 4], tab[1:, 5] = cells.type == TUMOUR, cells.type == RBC
    # RBC discs are paler in the centre (biconcave)
    rbc_centre = np.zeros((h, w), np.float32)
    if (cells.type == RBC).any():
        is_rbc = tab[:, 5][raster.cell] > 0
        rbc_centre = cv2.GaussianBlur(is_rbc.astype(np.float32), (0, 0), 1.2 / frame.mpp)
    stain = stain if stain is not None else draw_stain(None)
    hv, ev, white = stain.h_od, stain.e_od, 255.0 * stain.white
    out = np.empty((h, w, 3), np.uint8)
    for r0 in range(0, h, _STRIP):
        s = slice(r0, min(h, r0 + _STRIP))
        cid = raster.cell[s]
        t = tab[cid]
        body = cid > 0
        nuc = raster.nucleus[s]
        cyto = body & ~nuc
        free = raster.tissue[s] & ~raster.lumen[s] & ~body
        nest = raster.tumour_sd[s] > 0
        ecm = free & ~nest
        # eosin: stroma fibres (sparser in aggregates), cytoplasm, thin tumour-cell borders; gaps inside nests
        # (around intra-tumoural lymphocytes) look like tumour cytoplasm
        dens = ecm_map[s] * (0.55 - 0.25 * (agg[s] < 1.0))
        c_e = np.where(ecm, dens * (0.35 + 0.9 * fib[s]), 0.0)
        c_e += np.where(cyto, t[..., 0] * (1.0 + 0.12 * grain[s]), 0.0)
        c_e += np.where(raster.membrane[s] & cyto & (t[..., 4] > 0), 0.18, 0.0)
        c_e += np.where(nuc, 0.08, 0.0)
        c_e += np.where(free & nest, 0.42 * (1.0 + 0.12 * grain[s]), 0.0)
        c_h = np.where(cyto, t[..., 1], 0.0) + np.where(free & nest, 0.13, 0.0)
        # haematoxylin: nuclei, vesicular (pale centre, dark rim, coarse clumps) or dense
        rho = raster.rho[s]
        ves = t[..., 3]
        prof = 1.0 - 0.55 * ves * np.clip(1.0 - rho * rho, 0.0, 1.0) ** 1.5
        c_h += np.where(nuc, t[..., 2] * prof * (1.0 + (0.12 + 0.25 * ves) * grain[s]), 0.0)
        c_r = np.where(t[..., 5] > 0, 0.95 - 0.45 * np.clip(rbc_centre[s] - 0.55, 0, 1), 0.0)
        haze = 0.03 + 0.02 * raster.tissue[s]
        noise = (sensor[s].astype(np.float32) - 127.5) * (3.0 / 73.9)
        for ch in range(3):
            od = c_h * hv[ch] + c_e * ev[ch] + c_r * RBC_STAIN[ch] + haze
            out[s, :, ch] = np.clip(white[ch] * np.exp(-od) + noise, 0, 255).astype(np.uint8)
    return cv2.GaussianBlur(out, (0, 0), 0.3 / frame.mpp)  # optical blur, sigma 0.3 µm


# ---------------------------------------------------------------------------------------------------------------
# CODEX: compartment weights (nucleus, cytoplasm, membrane) per marker compartment
_COMP_WEIGHTS = {"N": (1.0, 0.06, 0.06), "M": (0.08, 0.3, 1.0), "C": (0.12, 1.0, 0.75), "E": (0.0, 0.0, 0.0)}


def codex_channels(rng: np.random.Generator, cells: Cells, layout: Layout, frame: Frame,
                   raster: Raster) -> Iterator[np.ndarray]:
    """Yield the 40 CODEX channels of ``frame`` in panel order, each uint16 (H, W) in camera counts.

    Channel = Σ over cells of expression × compartment pattern (nucleus / cytoplasm / membrane ring), times a
    channel gain, blurred by an optical PSF (σ 0.45 µm), plus tissue autofluorescence (stroma, RBCs) and read
    noise, background-subtracted (2.5 σ of the read noise + the plain-tissue autofluorescence) and clipped at 0
    as in processed CODEX data: what remains of the autofluorescence is in dense stroma and red blood cells.
    Collagen IV is extracellular (nest and vessel basement membranes, stroma).
    """
    if cells.expr is None:
        raise ValueError("cells have no expression; call tissue.express first")
    h, w = frame.shape
    n = len(cells)
    body = raster.cell > 0
    # compartment label: 0 none, 3c+1 cytoplasm, 3c+2 membrane, 3c+3 nucleus of cell index c
    comp = 3 * raster.cell.astype(np.intp) - 2
    comp[~body] = 0
    comp += raster.membrane
    comp[raster.nucleus] = 3 * raster.cell[raster.nucleus]
    psf = 0.45 / frame.mpp
    ecm = (raster.tissue & ~raster.lumen & ~body).astype(np.float32)
    is_rbc = np.concatenate([[False], cells.type == RBC])[raster.cell]
    af = 0.25 * raster.tissue.astype(np.float32) + 0.5 * ecm + 2.5 * is_rbc.astype(np.float32)
    af = cv2.GaussianBlur(af, (0, 0), 1.5)
    collagen = np.exp(-((np.abs(raster.tumour_sd) - 0.5) / 1.6) ** 2) * raster.tissue + 1.2 * raster.lumen_wall
    collagen = (collagen + 0.25 * ecm).astype(np.float32)
    ves = np.concatenate([[0.0], cells.vesicular]).astype(np.float32)[raster.cell]
    dapi_prof = np.where(raster.nucleus, 1.0 - 0.45 * ves * np.clip(1.0 - raster.rho ** 2, 0, 1) ** 1.5, 1.0)
    dapi_prof = dapi_prof.astype(np.float32)
    del ves, ecm, is_rbc
    pad = 32
    bank = rng.standard_normal((h + pad, w + pad), dtype=np.float32)
    ksize = 2 * int(np.ceil(2.5 * psf)) + 1
    sig = np.empty((h, w), np.float32)
    blur = np.empty((h, w), np.float32)
    for k, marker in enumerate(MARKERS):
        gain = rng.uniform(1500.0, 3500.0)
        af_gain = rng.uniform(15.0, 45.0)
        read = rng.uniform(3.0, 7.0)
        oy, ox = rng.integers(0, pad, 2)
        cmp = marker_compartment(marker)
        if cmp == "E":
            np.multiply(collagen, np.float32(gain), out=sig)
        else:
            wn, wc, wm = _COMP_WEIGHTS[cmp]
            table = np.zeros(3 * n + 1, np.float32)
            e = cells.expr[:, k] * np.float32(gain)
            table[1::3], table[2::3], table[3::3] = wc * e, wm * e, wn * e
            np.take(table, comp, out=sig, mode="wrap")  # comp is always in range; "wrap" is the fast path
            if k == 0:
                sig *= dapi_prof
        cv2.GaussianBlur(sig, (ksize, ksize), psf, dst=blur)
        cv2.addWeighted(blur, 1.0, af, af_gain, -2.5 * read - 0.45 * af_gain, dst=sig)  # background-subtracted
        yield cv2.addWeighted(sig, 1.0, bank[oy:oy + h, ox:ox + w], read, 0.0, dtype=cv2.CV_16U)
