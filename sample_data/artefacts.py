"""Slide artefacts of the synthetic H&E: pen/ink strokes, tissue folds, air bubbles, out-of-focus regions, debris.

:func:`add_artefacts` paints them onto a rendered H&E image (level 0, RGB uint8) and returns their label mask
(:data:`CODES`: 0 none, 1 ink, 2 fold, 3 bubble, 4 blur, 5 debris; a later artefact overwrites an earlier one where
they overlap) at an integer downsample of level 0. Every draw comes from the ``rng`` it is given (the slide's own
artefact stream), so the same slide rendered without artefacts is the clean twin of this one, pixel for pixel
outside the artefacts. Sizes are in µm (scaled with the tissue size) and converted with the frame's µm/px.

What each looks like (Beer-Lambert: optical densities add):
- ink: a smooth curved stroke of green, blue or black marker (OD of the ink added, soft edges, streaky);
- fold: a curved band where the tissue lies on itself: its OD plus a shifted copy of it, a little darker still;
- bubble: a disc whose tissue is paler and greyer (no mounting medium), inside a dark grey refraction ring;
- blur: an out-of-focus blob (Gaussian blur of 2.5-5 µm, blended in with a soft edge);
- debris: small dark grey-brown particles and fibres on top of everything.
"""

from __future__ import annotations

import cv2
import numpy as np

from .render import Frame, warp_map
from .tissue import Layout

CODES: dict[str, int] = {"ink": 1, "fold": 2, "bubble": 3, "blur": 4, "debris": 5}
INK_OD: dict[str, tuple[float, float, float]] = {
    "green": (0.95, 0.25, 0.75),
    "blue": (0.95, 0.55, 0.10),
    "black": (1.6, 1.6, 1.5),
}
MASK_UM = 2.0  # µm per mask pixel (downsample = round(MASK_UM / mpp))
# draw order (what lies on top of what): the fold is tissue, debris and ink sit on it, the bubble is in the
# mounting medium above them, and the focus affects everything
ORDER = ("fold", "debris", "ink", "bubble", "blur")


def _points(rng: np.random.Generator, tissue_um: np.ndarray, grid_um: float, n: int) -> np.ndarray:
    """``n`` random world positions (µm, (n, 2) x, y) inside the tissue (coarse layout grid cells)."""
    ys, xs = np.nonzero(tissue_um > 0)
    if xs.size == 0:
        ys, xs = np.nonzero(np.ones_like(tissue_um, bool))
    i = rng.integers(0, xs.size, n)
    jitter = rng.uniform(0, 1, (n, 2))
    return np.stack([(xs[i] + jitter[:, 0]) * grid_um, (ys[i] + jitter[:, 1]) * grid_um], axis=1)


def _curve(rng: np.random.Generator, centre: np.ndarray, length: float, bend: float = 0.6, n: int = 24
           ) -> np.ndarray:
    """A smooth random curve (n, 2) of ``length`` through ``centre`` (same units), direction drifting by ±``bend``
    rad over its length."""
    theta = rng.uniform(0, np.pi) + np.cumsum(rng.normal(0, bend / np.sqrt(n), n))
    steps = np.stack([np.cos(theta), np.sin(theta)], axis=1) * (length / n)
    pts = np.cumsum(steps, axis=0)
    return pts - pts.mean(axis=0) + centre


class _Canvas:
    """The image being painted, its label mask at level 0 and what a painter needs (mpp, tissue, bounding boxes)."""

    def __init__(self, rgb: np.ndarray, layout: Layout, frame: Frame):
        self.rgb = rgb
        self.h, self.w = rgb.shape[:2]
        self.mpp = frame.mpp
        self.label = np.zeros((self.h, self.w), np.uint8)
        self.layout = layout
        self.frame = frame
        d = max(1, int(round(4.0 / frame.mpp)))
        small = Frame((-(-self.h // d), -(-self.w // d)),
                      frame.px_to_um @ np.array([[d, 0, 0.5 * (d - 1)], [0, d, 0.5 * (d - 1)], [0, 0, 1]]),
                      frame.mpp * d)
        self._tissue_small = (warp_map(layout.tissue, layout, small) > 0).astype(np.float32)
        self._d = d

    def px(self, um: np.ndarray | float) -> np.ndarray | float:
        """µm -> level-0 px (world positions: pixel centres)."""
        return np.asarray(um) / self.mpp - 0.5

    def box(self, pts_px: np.ndarray, pad: float) -> tuple[int, int, int, int] | None:
        """Integer bounding box (x0, y0, x1, y1) of ``pts_px`` padded by ``pad`` px, clipped; None when empty."""
        x0 = max(0, int(np.floor(pts_px[:, 0].min() - pad)))
        y0 = max(0, int(np.floor(pts_px[:, 1].min() - pad)))
        x1 = min(self.w, int(np.ceil(pts_px[:, 0].max() + pad)) + 1)
        y1 = min(self.h, int(np.ceil(pts_px[:, 1].max() + pad)) + 1)
        return (x0, y0, x1, y1) if x1 > x0 + 1 and y1 > y0 + 1 else None

    def tissue(self, box: tuple[int, int, int, int]) -> np.ndarray:
        """Soft tissue mask (float32 in [0, 1]) of ``box``."""
        x0, y0, x1, y1 = box
        d = self._d
        sx0, sy0 = x0 // d, y0 // d
        sx1, sy1 = min(self._tissue_small.shape[1], -(-x1 // d) + 1), min(self._tissue_small.shape[0], -(-y1 // d) + 1)
        sub = self._tissue_small[sy0:sy1, sx0:sx1]
        m = np.array([[1 / d, 0, (x0 + 0.5) / d - 0.5 - sx0], [0, 1 / d, (y0 + 0.5) / d - 0.5 - sy0]], np.float64)
        return cv2.warpAffine(sub, m, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                              borderMode=cv2.BORDER_REPLICATE)

    def stroke(self, pts_px: np.ndarray, width_px: float, soft_px: float
               ) -> tuple[tuple[int, int, int, int], np.ndarray] | None:
        """Soft alpha (float32 in [0, 1]) of a thick polyline through ``pts_px`` and its box; None if off-image."""
        box = self.box(pts_px, width_px + 3 * soft_px + 2)
        if box is None:
            return None
        x0, y0, x1, y1 = box
        canvas = np.zeros((y1 - y0, x1 - x0), np.uint8)
        shift = 4
        p = np.rint((pts_px - [x0, y0]) * (1 << shift)).astype(np.int32)
        cv2.polylines(canvas, [p], False, 255, thickness=max(1, int(round(width_px))), lineType=cv2.LINE_AA,
                      shift=shift)
        alpha = canvas.astype(np.float32) / 255.0
        if soft_px > 0:
            alpha = cv2.GaussianBlur(alpha, (0, 0), soft_px)
        return box, alpha

    def mark(self, box: tuple[int, int, int, int], where: np.ndarray, code: int) -> None:
        x0, y0, x1, y1 = box
        self.label[y0:y1, x0:x1][where] = code


def _od(rgb: np.ndarray) -> np.ndarray:
    return -np.log(np.maximum(rgb.astype(np.float32), 1.0) / 255.0)


def _from_od(od: np.ndarray) -> np.ndarray:
    return np.clip(255.0 * np.exp(-od), 0, 255).round().astype(np.uint8)


def _ink(rng: np.random.Generator, c: _Canvas, scale: float) -> dict:
    colour = str(rng.choice(list(INK_OD)))
    n = int(rng.integers(1, 3))
    area = 0
    for centre in _points(rng, c.layout.tissue, c.layout.grid_um, n):
        pts = c.px(_curve(rng, centre, rng.uniform(400, 900) * scale, bend=1.0))
        width = rng.uniform(40, 90) * scale / c.mpp
        got = c.stroke(pts, width, soft_px=2.0 / c.mpp)
        strength = rng.uniform(0.7, 1.2)
        if got is None:
            continue
        box, alpha = got
        x0, y0, x1, y1 = box
        streak = cv2.GaussianBlur(rng.standard_normal(alpha.shape).astype(np.float32), (0, 0), 6.0 / c.mpp)
        streak /= float(streak.std()) + 1e-6
        a = alpha * np.clip(1.0 + 0.12 * streak, 0.6, 1.4) * strength
        sub = c.rgb[y0:y1, x0:x1]
        sub[:] = _from_od(_od(sub) + a[..., None] * np.asarray(INK_OD[colour], np.float32))
        where = alpha > 0.25
        c.mark(box, where, CODES["ink"])
        area += int(where.sum())
    return {"count": n, "colour": colour}


def _fold(rng: np.random.Generator, c: _Canvas, scale: float) -> dict:
    centre = _points(rng, c.layout.tissue, c.layout.grid_um, 1)[0]
    pts = c.px(_curve(rng, centre, rng.uniform(350, 750) * scale, bend=0.5))
    width = rng.uniform(35, 80) * scale / c.mpp
    got = c.stroke(pts, width, soft_px=3.0 / c.mpp)
    if got is None:
        return {"count": 0}
    box, alpha = got
    x0, y0, x1, y1 = box
    alpha *= c.tissue(box)
    d = pts[-1] - pts[0]
    normal = np.array([-d[1], d[0]]) / (np.hypot(*d) + 1e-9)
    shift = normal * 0.6 * width
    sub = c.rgb[y0:y1, x0:x1]
    od = _od(sub)
    m = np.array([[1, 0, shift[0]], [0, 1, shift[1]]], np.float64)
    copy = cv2.warpAffine(od, m, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    extra = np.asarray((0.10, 0.14, 0.06), np.float32)  # folded tissue also takes up more haematoxylin
    sub[:] = _from_od(od + alpha[..., None] * (1.1 * copy + extra))
    c.mark(box, alpha > 0.5, CODES["fold"])
    return {"count": 1}


def _bubble(rng: np.random.Generator, c: _Canvas, scale: float) -> dict:
    n = int(rng.integers(1, 3))
    for centre in _points(rng, c.layout.tissue, c.layout.grid_um, n):
        r = rng.uniform(70, 160) * scale / c.mpp
        ring = rng.uniform(6, 12) / c.mpp
        cx, cy = c.px(centre)
        box = c.box(np.array([[cx, cy]]), r + 2 * ring + 2)
        if box is None:
            continue
        x0, y0, x1, y1 = box
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        # slightly elliptical
        e = rng.uniform(0.85, 1.0)
        th = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)
        v = -(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)
        dist = np.sqrt(u ** 2 + (v / e) ** 2) - r  # ~ px from the outline, < 0 inside
        inside = np.clip(0.5 - dist / 2.0, 0, 1)
        sub = c.rgb[y0:y1, x0:x1]
        od = _od(sub)
        # inside: tissue seen through air, paler, greyer and a little soft
        grey = od.mean(axis=2, keepdims=True)
        soft = cv2.GaussianBlur(0.5 * od + 0.25 * grey, (0, 0), 0.8 / c.mpp)
        tint = np.asarray((0.06, 0.06, 0.08), np.float32)
        od_in = soft + tint
        ring_a = np.exp(-(dist / (0.5 * ring)) ** 2)
        ring_od = np.asarray((0.95, 0.92, 0.88), np.float32) * rng.uniform(0.8, 1.1)
        out = od * (1 - inside[..., None]) + od_in * inside[..., None] + ring_a[..., None] * ring_od
        sub[:] = _from_od(out)
        c.mark(box, (dist < 0.5 * ring), CODES["bubble"])
    return {"count": n}


def _blur(rng: np.random.Generator, c: _Canvas, scale: float) -> dict:
    centre = _points(rng, c.layout.tissue, c.layout.grid_um, 1)[0]
    r = rng.uniform(120, 250) * scale / c.mpp
    sigma = rng.uniform(2.5, 5.0) / c.mpp
    cx, cy = c.px(centre)
    box = c.box(np.array([[cx, cy]]), 1.3 * r + 4 * sigma + 2)
    if box is None:
        return {"count": 0}
    x0, y0, x1, y1 = box
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    ang = np.arctan2(yy - cy, xx - cx)
    k, ph = rng.uniform(0.08, 0.18, 2), rng.uniform(0, 2 * np.pi, 2)
    rr = r * (1 + k[0] * np.cos(2 * ang + ph[0]) + k[1] * np.cos(3 * ang + ph[1]))  # an irregular blob
    dist = np.hypot(xx - cx, yy - cy) - rr
    alpha = np.clip(0.5 - dist / (8.0 / c.mpp), 0, 1)
    sub = c.rgb[y0:y1, x0:x1]
    blurred = cv2.GaussianBlur(sub, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    sub[:] = np.clip(sub * (1 - alpha[..., None]) + blurred * alpha[..., None], 0, 255).round().astype(np.uint8)
    c.mark(box, alpha > 0.5, CODES["blur"])
    return {"count": 1, "sigma_um": round(float(sigma * c.mpp), 3)}


def _debris(rng: np.random.Generator, c: _Canvas, scale: float) -> dict:
    n = int(rng.integers(3, 9))
    for centre in _points(rng, c.layout.tissue, c.layout.grid_um, n):
        p = c.px(centre + rng.normal(0, 120 * scale, 2))
        if rng.uniform() < 0.35:  # a fibre
            pts = c.px(_curve(rng, centre, rng.uniform(40, 120), bend=1.5, n=12))
            got = c.stroke(pts, rng.uniform(2.5, 5) / c.mpp, soft_px=0.7 / c.mpp)
        else:  # a particle: an irregular blob
            pts = p + rng.normal(0, rng.uniform(4, 10) / c.mpp, (5, 2))
            got = c.stroke(pts, rng.uniform(8, 18) / c.mpp, soft_px=1.0 / c.mpp)
        if got is None:
            continue
        box, alpha = got
        x0, y0, x1, y1 = box
        sub = c.rgb[y0:y1, x0:x1]
        od = np.asarray((1.5, 1.6, 1.8), np.float32) * rng.uniform(0.8, 1.4)
        sub[:] = _from_od(_od(sub) + alpha[..., None] * od)
        c.mark(box, alpha > 0.25, CODES["debris"])
    return {"count": n}


PAINTERS = {"ink": _ink, "fold": _fold, "bubble": _bubble, "blur": _blur, "debris": _debris}


def choose_causes(rng: np.random.Generator, p: float = 0.6) -> list[str]:
    """The artefacts one slide gets: each cause with probability ``p``, at least one (in :data:`ORDER`)."""
    keep = [c for c in ORDER if rng.uniform() < p]
    if not keep:
        keep = [ORDER[int(rng.integers(len(ORDER)))]]
    return keep


def add_artefacts(rng: np.random.Generator, rgb: np.ndarray, layout: Layout, frame: Frame,
                  causes: list[str] | None = None) -> tuple[np.ndarray, int, dict]:
    """Paint artefacts onto ``rgb`` (H, W, 3) uint8 of ``frame`` in place.

    Args:
        rng: the slide's artefact stream (nothing else draws from it).
        rgb: the rendered H&E, level 0.
        layout: the slide's layout (artefacts are placed on its tissue).
        frame: the H&E frame (its mpp converts the µm sizes).
        causes: which artefacts (default: :func:`choose_causes`).

    Returns:
        (label mask uint8 (ceil(H/d), ceil(W/d)) with :data:`CODES`, downsample d of level 0 per mask px,
        ``{cause: {"count": n, "fraction_of_tissue": area of the cause / tissue area, ...}}``).
    """
    causes = choose_causes(rng) if causes is None else list(causes)
    unknown = set(causes) - set(PAINTERS)
    if unknown:
        raise ValueError(f"unknown artefacts {sorted(unknown)}; known: {sorted(PAINTERS)}")
    c = _Canvas(rgb, layout, frame)
    scale = float(np.clip(layout.side_um / 1100.0, 0.5, 3.0))
    info = {}
    for cause in ORDER:
        if cause in causes:
            info[cause] = PAINTERS[cause](rng, c, scale)
    d = max(1, int(round(MASK_UM / frame.mpp)))
    hs, ws = -(-c.h // d), -(-c.w // d)
    pad = np.zeros((hs * d, ws * d), np.uint8)
    pad[:c.h, :c.w] = c.label
    small = pad.reshape(hs, d, ws, d).max(axis=(1, 3))  # a mask pixel with any artefact pixel gets a label
    tissue = c._tissue_small
    tissue_px = float(tissue.sum()) * c._d ** 2
    for cause, rec in info.items():
        on = c.label == CODES[cause]
        rec["fraction_of_tissue"] = round(float(on.sum()) / max(tissue_px, 1.0), 5)
    return small, d, info
