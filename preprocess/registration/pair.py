"""Register one CODEX image to its H&E slide: working images, coarse affine, block refinement, displacement field,
QC and the record (the method is described in :mod:`preprocess.register`)."""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from preprocess.panel import find_dapi_channel
from preprocess.registration.blocks import BlockResult, block_refine
from preprocess.registration.coarse import coarse_affine, placement_by_pixel_size
from preprocess.registration.field import DisplacementField, FieldFit, field_from_blocks
from preprocess.registration.params import RegParams
from preprocess.registration.record_qc import (
    SCHEMA_VERSION,
    block_list,
    displacement_entry,
    finite_or_none,
    he_to_codex_points,
    median_displacement_um,
    save_qc_figure,
    transform_ncc,
)
from preprocess.registration.work_images import WorkImage, read_codex_work, read_he_work, work_mpp
from preprocess.registration_qc import haematoxylin, plausibility, registration_tissue_mask
from preprocess.slide_io import CodexImage, HESlide

log = logging.getLogger(__name__)


def fit_field(blocks: BlockResult, he_dims: tuple[int, int], he_mpp: float, p: RegParams) -> FieldFit | None:
    """The displacement field of the block residuals after the refined affine (None: disabled / too few blocks)."""
    meas = blocks.measured
    if not p.displacement or not blocks.refined or meas.sum() < p.min_field_blocks:
        return None
    res = blocks.residuals_px(blocks.affine)
    step = blocks.block_px * blocks.block_ds
    return field_from_blocks(blocks.centres, np.where(meas[:, None], res, 0.0), meas, blocks.grid_shape, he_dims,
                             step, p.field_outlier_um / he_mpp)


def _working_images(he: HESlide, codex: CodexImage, dapi_ch: int, p: RegParams):
    thumb_mpp = max(work_mpp(he.mpp, he.dimensions, p.thumbnail_mpp, p.thumbnail_max_px),
                    work_mpp(codex.mpp, codex.dimensions, p.thumbnail_mpp, p.thumbnail_max_px))
    he_thumb = read_he_work(he, thumb_mpp)
    he_h = WorkImage(haematoxylin(he_thumb.img), he_thumb.to_level0, thumb_mpp)
    dapi_thumb = read_codex_work(codex, dapi_ch, thumb_mpp)
    qc_mpp = max(work_mpp(he.mpp, he.dimensions, p.qc_mpp, p.qc_max_px),
                 work_mpp(codex.mpp, codex.dimensions, p.qc_mpp, p.qc_max_px))
    same = math.isclose(qc_mpp, thumb_mpp)
    he_qc = he_thumb if same else read_he_work(he, qc_mpp)
    he_qc_h = he_h.img if same else haematoxylin(he_qc.img)
    dapi_qc = dapi_thumb if same else read_codex_work(codex, dapi_ch, qc_mpp)
    tissue = registration_tissue_mask(he_qc.img, qc_mpp)
    return he_h, dapi_thumb, he_qc, he_qc_h, dapi_qc, tissue, thumb_mpp, qc_mpp


def register_pair(he_path: str | os.PathLike, codex_path: str | os.PathLike, p: RegParams,
                  qc_png: str | os.PathLike | None = None,
                  field_npy: str | os.PathLike | None = None) -> dict[str, Any]:
    """Register one CODEX image to its H&E slide; returns the registration record.

    The displacement field (when there is one) is written to ``field_npy`` and referenced by the record's
    ``displacement`` entry; without ``field_npy`` the record is affine-only (``displacement`` None).

    Raises:
        PipelineError: unreadable / missing files, missing pixel size, panel / OME name mismatch.
    """
    import dask

    t_start = time.perf_counter()
    threads = p.threads or max(1, os.cpu_count() or 1)
    with HESlide(he_path, mpp=p.he_mpp) as he, CodexImage(codex_path, mpp=p.codex_mpp) as codex, \
            dask.config.set(scheduler="threads", num_workers=threads):
        if p.dapi_channel is not None:
            dapi_ch, dapi_src = p.dapi_channel, "--dapi-channel"
            dapi_name = codex.channel_names[dapi_ch] if codex.channel_names and dapi_ch < codex.num_channels else None
        else:
            dapi_ch, dapi_src, dapi_name = find_dapi_channel(codex, p.marker_panel, p.panel_wins)
        if not 0 <= dapi_ch < codex.num_channels:
            raise PipelineError(f"DAPI channel {dapi_ch} is out of range for {codex.path} ({codex.num_channels} "
                                "channels); pass --dapi-channel")
        expected_scale = codex.mpp / he.mpp
        log.info("%s: H&E %dx%d px at %.4f µm, CODEX %dx%d px at %.4f µm, DAPI = channel %d (%s)",
                 Path(he_path).name, *he.dimensions, he.mpp, *codex.dimensions, codex.mpp, dapi_ch, dapi_src)

        t0 = time.perf_counter()
        he_h, dapi_thumb, he_qc, he_qc_h, dapi_qc, tissue, thumb_mpp, qc_mpp = _working_images(he, codex, dapi_ch, p)
        coarse, matched = coarse_affine(he_h, dapi_thumb, p.n_keypoints)
        t_coarse = time.perf_counter() - t0

        t0 = time.perf_counter()
        blocks = block_refine(he, codex, dapi_ch, coarse, WorkImage(tissue, he_qc.to_level0, qc_mpp), p)
        final = blocks.affine
        fit = fit_field(blocks, he.dimensions, he.mpp, p)
        field: DisplacementField | None = fit.field if fit is not None and field_npy is not None else None
        t_blocks = time.perf_counter() - t0

        before = placement_by_pixel_size(he.dimensions, codex.dimensions, expected_scale)
        to0 = he_qc.to_level0
        scores = {name: transform_ncc(he_qc_h, tissue, to0, dapi_qc, m)
                  for name, m in (("before", before), ("coarse", coarse), ("affine", final))}
        scores["after"] = transform_ncc(he_qc_h, tissue, to0, dapi_qc, final, field) if field else scores["affine"]
        ok_shape, why_shape, parts = plausibility(final, expected_scale, p.max_scale_dev, p.max_shear)
        reasons = []
        if not matched:
            reasons.append("palom feature matching found no consensus (identity placeholder returned)")
        if not ok_shape:
            reasons.append(f"implausible affine: {why_shape}")
        ncc_after = scores["after"][0]
        if not np.isfinite(ncc_after):
            reasons.append("NCC after is undefined (the CODEX does not overlap the H&E tissue)")
        elif ncc_after < p.ncc_threshold:
            reasons.append(f"NCC after {ncc_after:.3f} < threshold {p.ncc_threshold}")
        if not blocks.refined:
            reasons.append("block-shift refinement unavailable: " + "; ".join(blocks.notes[-1:]))
        status = "flagged" if reasons else "ok"

        notes = list(blocks.notes)
        if fit is not None:
            notes += fit.notes
        elif p.displacement and blocks.refined:
            notes.append(f"{int(blocks.measured.sum())} blocks measured (< {p.min_field_blocks}): affine only")
        used, meas = blocks.used, blocks.measured
        resid_used = blocks.residual_um[used]
        final_res = np.full(len(meas), np.nan)
        if field is not None and meas.any():
            dst = blocks.centres[meas] + blocks.shifts[meas]
            back = he_to_codex_points(final, field, dst)
            final_res[meas] = np.linalg.norm(back - blocks.codex_points[meas], axis=1) * codex.mpp
        qc = {
            "ncc_before": scores["before"][0],
            "ncc_coarse": scores["coarse"][0],
            "ncc_affine": scores["affine"][0],
            "ncc_after": ncc_after,
            "ncc_threshold": p.ncc_threshold,
            "qc_mpp": qc_mpp,
            "tissue_covered_fraction": scores["after"][1],
            "expected_scale": expected_scale,
            "affine_parts": parts.as_dict(),
            "coarse_matched": matched,
            "thumbnail_mpp": thumb_mpp,
            "n_blocks": int(blocks.valid.size),
            "n_blocks_measured": int(meas.sum()),
            "n_blocks_used": int(used.sum()),
            "n_field_outliers": int(fit.outliers.sum()) if fit is not None else None,
            "palom_constrain_outliers": blocks.palom_outliers,
            "block_residual_um_median": float(np.median(resid_used)) if used.any() else None,
            "block_residual_um_p95": float(np.percentile(resid_used, 95)) if used.any() else None,
            "field_residual_um_median": float(np.nanmedian(final_res)) if field is not None else None,
            "coarse_to_final_um_median": median_displacement_um(coarse, final, blocks.centres[blocks.valid], he.mpp),
            "notes": notes,
            "seconds": {"coarse": t_coarse, "blocks": t_blocks},
        }
        record: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "he": str(Path(he_path)),
            "codex": str(Path(codex_path)),
            "he_mpp": he.mpp,
            "codex_mpp": codex.mpp,
            "dapi_channel": dapi_ch,
            "dapi_channel_name": dapi_name,
            "affine_codex_to_he": final.tolist(),
            "affine_coarse": coarse.tolist(),
            "displacement": None,
            "block_shifts": block_list(blocks.centres, blocks.shifts, used, blocks.residual_um,
                                       fit.used if fit else None, fit.outliers if fit else None),
            "block_grid": {
                "units": "block_shifts: H&E level-0 px; (x, y) block centre, (dx, dy) its measured shift after "
                         "affine_coarse; used = kept by the robust affine fit; residual_um = distance to the fit; "
                         "field_used / field_outlier: kept by / replaced in the displacement field",
                "level": blocks.level,
                "block_size_px": blocks.block_px,
                "block_size_um": blocks.block_px * he.mpp * blocks.block_ds,
                "block_mpp": he.mpp * blocks.block_ds,
                "upsample": p.upsample,
                "grid_shape": list(blocks.grid_shape),
            },
            "qc": qc,
            "status": status,
            "reason": "; ".join(reasons) if reasons else None,
        }
        if field is not None:
            field.save(field_npy)
            record["displacement"] = displacement_entry(field_npy, field, he.mpp)

        if qc_png is not None:
            t0 = time.perf_counter()
            pick = used if used.any() else blocks.valid
            centre = None
            if pick.any():
                cands = blocks.centres[pick]
                centre = cands[np.argmin(np.linalg.norm(cands - np.median(cands, axis=0), axis=1))]
            title = (f"{Path(he_path).name} <- {Path(codex_path).name}: {status}"
                     + (f" ({record['reason']})" if reasons else "")
                     + "\nmagenta: H&E haematoxylin, green: CODEX DAPI warped to H&E")
            fb = (blocks.centres[meas], (blocks.residuals_px(final))[meas]) if field is not None else None
            save_qc_figure(qc_png, he, codex, dapi_ch, he_qc_h, to0, tissue, dapi_qc,
                           [("before (pixel size only)", before, scores["before"][0]),
                            ("coarse (keypoints)", coarse, scores["coarse"][0]),
                            ("after (block affine" + (" + field)" if field else ")"), final, ncc_after)],
                           final, field, centre, fb, title)
            qc["seconds"]["qc_png"] = time.perf_counter() - t0
    qc["seconds"]["total"] = time.perf_counter() - t_start
    return finite_or_none(record)
