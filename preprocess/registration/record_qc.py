"""QC of a registration (NCC through the final transform, the overlay figure) and the registration record.

A transform is a CODEX level-0 -> H&E level-0 affine, optionally with a :class:`DisplacementField` on top
(``x_codex = A^-1 (x_he - D(x_he))``). Images are warped into the H&E working grid by that inverse map
(``cv2.remap``), so the field costs nothing extra.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from preprocess.registration.field import DisplacementField
from preprocess.registration.work_images import WorkImage
from preprocess.registration_qc import (
    apply_affine,
    haematoxylin,
    ncc_in_footprint,
    robust_normalize,
    save_overlay_png,
    two_colour,
    warp,
)
from preprocess.slide_io import CodexImage, HESlide

SCHEMA_VERSION = 2


def he_to_codex_points(affine: np.ndarray, field: DisplacementField | None, pts: np.ndarray) -> np.ndarray:
    """CODEX level-0 points (N, 2) shown at H&E level-0 points (N, 2) by the transform."""
    if field is not None:
        return field.he_to_codex(affine, pts)
    return apply_affine(np.linalg.inv(affine), pts)


def warp_into(img: np.ndarray, img_to_level0: np.ndarray, out_shape: tuple[int, int], out_to_level0: np.ndarray,
              affine: np.ndarray, field: DisplacementField | None = None,
              nearest: bool = False) -> np.ndarray:
    """Resample a CODEX image (its px -> CODEX level-0 by ``img_to_level0``) into an H&E grid of ``out_shape``
    (its px -> H&E level-0 by ``out_to_level0``) through ``affine`` (+ ``field``); zero outside."""
    if field is None:
        m = np.linalg.inv(out_to_level0) @ affine @ img_to_level0
        return warp(img, m, out_shape, nearest=nearest)
    h, w = out_shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    pts = apply_affine(out_to_level0, np.c_[xx.ravel(), yy.ravel()])
    src = apply_affine(np.linalg.inv(img_to_level0), he_to_codex_points(affine, field, pts))
    mx = src[:, 0].reshape(h, w).astype(np.float32)
    my = src[:, 1].reshape(h, w).astype(np.float32)
    flags = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    srcimg = img.astype(np.uint8) if img.dtype == np.bool_ else img
    out = cv2.remap(srcimg, mx, my, flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out.astype(bool) if img.dtype == np.bool_ else out


def transform_ncc(he_h: np.ndarray, tissue: np.ndarray, he_to0: np.ndarray, dapi: WorkImage, affine: np.ndarray,
                  field: DisplacementField | None = None) -> tuple[float, float]:
    """(NCC of haematoxylin and the warped DAPI inside the covered tissue, covered fraction of the tissue)."""
    warped = warp_into(dapi.img.astype(np.float32), dapi.to_level0, he_h.shape, he_to0, affine, field)
    foot = warp_into(np.ones(dapi.img.shape, np.uint8), dapi.to_level0, he_h.shape, he_to0, affine, field,
                     nearest=True)
    return ncc_in_footprint(he_h, tissue, warped, foot)


def zoom_panel(he: HESlide, codex: CodexImage, dapi_channel: int, affine: np.ndarray,
               field: DisplacementField | None, centre: np.ndarray, size_um: float = 150.0) -> np.ndarray:
    """Two-colour crop (H&E level 0) around ``centre`` (H&E level-0 px) with the DAPI warped by the transform."""
    n = max(16, int(round(size_um / he.mpp)))
    w0, h0 = he.dimensions
    x0 = int(np.clip(centre[0] - n / 2, 0, max(0, w0 - n)))
    y0 = int(np.clip(centre[1] - n / 2, 0, max(0, h0 - n)))
    rgb = he.read_region(x0, y0, 0, (min(n, w0), min(n, h0)))
    hh, ww = rgb.shape[:2]
    corners = np.array([[x0, y0], [x0 + ww, y0], [x0, y0 + hh], [x0 + ww, y0 + hh]], float)
    cc = he_to_codex_points(affine, field, corners)
    cx0, cy0 = np.floor(cc.min(0)).astype(int) - 4
    cx1, cy1 = np.ceil(cc.max(0)).astype(int) + 5
    region = codex.read_region(cx0, cy0, cx1, cy1, level=0, channels=[dapi_channel])[0].astype(np.float32)
    sx0, sy0 = max(0, cx0), max(0, cy0)
    shift = np.array([[1, 0, x0], [0, 1, y0], [0, 0, 1.0]])
    offset = np.array([[1, 0, sx0], [0, 1, sy0], [0, 0, 1.0]])
    dapi = warp_into(region, offset, (hh, ww), shift, affine, field) if region.size else np.zeros((hh, ww), np.float32)
    return two_colour(haematoxylin(rgb), dapi)


def arrow_gain(he_to0: np.ndarray, blocks: tuple[np.ndarray, np.ndarray] | None, h: int) -> float:
    """Arrow magnification so that the longest block arrow is ~4% of the panel height."""
    if blocks is None or not len(blocks[1]):
        return 1.0
    top = float(np.linalg.norm(blocks[1], axis=1).max()) / abs(he_to0[0, 0])  # working px
    return max(1.0, round(0.04 * h / max(top, 1e-6)))


def field_panel(he_h: np.ndarray, he_to0: np.ndarray, field: DisplacementField, mpp: float,
                blocks: tuple[np.ndarray, np.ndarray] | None = None, gain: float = 10.0) -> np.ndarray:
    """RGB (h, w, 3) float: |D| in µm (colour) over the haematoxylin (grey), arrows (x ``gain``) at blocks."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import colormaps

    h, w = he_h.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    pts = apply_affine(he_to0, np.c_[xx.ravel(), yy.ravel()])
    dx, dy = field.sample(pts[:, 0], pts[:, 1])
    mag = (np.hypot(dx, dy) * mpp).reshape(h, w)
    top = max(float(mag.max()), 1e-6)
    col = colormaps["viridis"](mag / top)[..., :3]
    grey = robust_normalize(he_h)[..., None]
    img = np.ascontiguousarray(0.55 * col + 0.45 * (1 - grey) * np.ones(3))
    if blocks is not None:
        cen, d = blocks
        to_work = np.linalg.inv(he_to0)
        a = apply_affine(to_work, cen)
        b = apply_affine(to_work, cen + gain * d)
        thick = max(1, h // 400)
        for p, q in zip(a, b):
            cv2.arrowedLine(img, tuple(int(round(v)) for v in p), tuple(int(round(v)) for v in q), (1.0, 0.15, 0.1),
                            thick, tipLength=0.3)
    return np.clip(img, 0, 1)


def save_qc_figure(path, he: HESlide, codex: CodexImage, dapi_ch: int, he_qc_h: np.ndarray, he_to0: np.ndarray,
                   tissue: np.ndarray, dapi_qc: WorkImage, transforms: list[tuple[str, np.ndarray, float]],
                   affine: np.ndarray, field: DisplacementField | None, zoom_centre: np.ndarray | None,
                   field_blocks: tuple[np.ndarray, np.ndarray] | None, title: str) -> None:
    """The QC PNG: one two-colour panel per (name, affine, NCC) of ``transforms`` (the last one with ``field``),
    the displacement field when there is one, and a zoom at level 0 through the final transform."""
    foot = warp_into(np.ones(dapi_qc.img.shape, np.uint8), dapi_qc.to_level0, he_qc_h.shape, he_to0, affine,
                     field, nearest=True).astype(bool)
    panels = []
    for i, (name, m, score) in enumerate(transforms):
        f = field if i == len(transforms) - 1 else None
        warped = warp_into(dapi_qc.img, dapi_qc.to_level0, he_qc_h.shape, he_to0, m, f)
        panels.append((f"{name}: NCC {score:.3f}", two_colour(he_qc_h, warped, tissue & foot)))
    if field is not None:
        top = float(field.magnitude_um(he.mpp).max())
        gain = arrow_gain(he_to0, field_blocks, he_qc_h.shape[0])
        panels.append((f"displacement field |D| (dark 0 .. yellow {top:.1f} µm), block residuals x{gain:g}",
                       field_panel(he_qc_h, he_to0, field, he.mpp, field_blocks, gain)))
    if zoom_centre is not None:
        panels.append(("final, zoom 150 µm at H&E level 0",
                       zoom_panel(he, codex, dapi_ch, affine, field, zoom_centre)))
    save_overlay_png(path, panels, title[:400])


def finite_or_none(obj: Any) -> Any:
    """NaN / inf floats -> None, recursively (so the JSON stays standard)."""
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    return obj


def median_displacement_um(a: np.ndarray, b: np.ndarray, he_pts: np.ndarray, he_mpp: float) -> float | None:
    """Median distance (µm) between where ``a`` and ``b`` send the CODEX points that ``b`` maps to ``he_pts``."""
    if len(he_pts) == 0:
        return None
    src = apply_affine(np.linalg.inv(b), he_pts)
    return float(np.median(np.linalg.norm(apply_affine(a, src) - he_pts, axis=1)) * he_mpp)


def block_list(centres: np.ndarray, shifts: np.ndarray, used: np.ndarray, residual_um: np.ndarray,
               field_used: np.ndarray | None, outliers: np.ndarray | None) -> list[dict[str, Any]]:
    """The record's ``block_shifts``: measured blocks only, H&E level-0 px."""
    rows = []
    for i, (c, s) in enumerate(zip(centres, shifts)):
        if not np.all(np.isfinite(s)):
            continue
        row = {"x": round(float(c[0]), 2), "y": round(float(c[1]), 2), "dx": round(float(s[0]), 4),
               "dy": round(float(s[1]), 4), "used": bool(used[i]), "residual_um": round(float(residual_um[i]), 4)}
        if field_used is not None:
            row["field_used"] = bool(field_used[i])
            row["field_outlier"] = bool(outliers[i])
        rows.append(row)
    return rows


def displacement_entry(npy_path: str | Path, field: DisplacementField, mpp: float) -> dict[str, Any]:
    """The record's ``displacement``: file (relative to the record's folder) and node spacing, plus sizes."""
    mag = field.magnitude_um(mpp)
    return {"file": Path(npy_path).name, "step_px": float(field.step), "shape": list(field.d.shape),
            "units": "(dx, dy) in H&E level-0 px at nodes (x, y) = (j, i) * step_px; x_codex = "
                     "inv(affine_codex_to_he) @ (x_he - D(x_he)), D bilinear between nodes",
            "max_um": float(mag.max()), "median_um": float(np.median(mag))}
