"""Latent tissue layout of one slide on a coarse grid (world frame, µm): tissue blob, tumour nests, lymphoid
aggregates, vessels, air spaces, myeloid foci, fibre orientation and the smooth hidden programme fields."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage as ndi

from .celltypes import PROGRAMMES, Patient, _sigmoid

GRID_UM = 4.0
"""Pixel size of the coarse latent maps (µm)."""

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
