"""Dense (cell-scale) evaluation of ``hex.test``: a dense HEX (``dense_grid`` G > 0) scored on the G x G cells of the
test patches against the stage-03 dense labels, beside a patch-level model's stride-56 map upsampled to the cells.

Geometry (issue 19's contract; level-0 px, pixel centres at integers): cell (i, j) of the patch with top-left (x, y)
and side P = G c is centred at ``(x + (j + 1/2) c - 1/2, y + (i + 1/2) c - 1/2)``. A stage-06 map pixel (r, q)
covers level-0 px [q s, (q + 1) s) (:mod:`hex.infer.maps`), so its centre is at ``(q + 1/2) s - 1/2``: a point X
sits at map coordinate ``u = (X + 1/2) / s - 1/2``. The baseline at a cell is the bilinear interpolation between
the four map pixel centres around it, weighted by the tissue mask (:func:`hex.infer.map_sampling.sample_map`: no value
leaks in from the zeros outside tissue); NaN where none of the four is tissue.

Scores (per marker, pooled over every valid cell of every test slide):

- ``r_dense``: the dense prediction vs the dense label, over the cells whose label is finite;
- ``r_baseline``: the upsampled baseline map vs the dense label, over the cells whose label is finite and whose
  baseline is defined (NaN for every marker without ``--dense-baseline``);
- ``r_patch``: the model's patch head vs the patch labels (the ``pearson`` of ``marker_pearson.csv``).

Outputs in the test folder: ``dense_pearson.csv`` (``marker,r_dense,r_baseline,r_patch``, one row per marker),
``dense_summary.json`` (means over all and visible markers, cell counts, label registration, baseline), and with
plots ``dense_scatter.png`` and ``dense_side_by_side.png`` (H&E crop, measured CODEX, dense prediction, upsampled
baseline for 3 markers x 2 patches).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from hex.data.datasets import PatchDataset
from hex.evaluate.metrics import pearson
from hex.infer.map_sampling import sample_map
from pipeline import artifacts as art
from pipeline.errors import PipelineError
from pipeline.io import atomic_path, write_json

log = logging.getLogger("hex.test")

CSV_NAME = "dense_pearson.csv"
SUMMARY_NAME = "dense_summary.json"
PLOT_NAMES = ("dense_scatter.png", "dense_side_by_side.png")
STAGE_03 = "run stage 03 with --dense-grid"
STAGE_06 = "run stage 06 with the patch-level run at --stride 56 (STRIDE=56 bash scripts/06_infer_wsi.sh)"


def dense_outputs(test_dir: Path, plots: bool) -> list[Path]:
    """The files dense evaluation writes into ``test_dir``."""
    return [test_dir / CSV_NAME, test_dir / SUMMARY_NAME] + ([test_dir / n for n in PLOT_NAMES] if plots else [])


# ----------------------------------------------------------------------------------------------------------------
# inputs, checked before any work


def checkpoint_dense_grid(path: str | os.PathLike) -> int:
    """G of a checkpoint's ``model_args["dense_grid"]`` without building the model (0: patch-only, the original
    release, or a file that does not say)."""
    from hex.trained_model import checkpoint_description

    found = checkpoint_description(path)
    meta = found[0] if found is not None else None
    args = (meta or {}).get("model_args") or {}
    return int(args.get("dense_grid") or 0)


def dense_label_path(label_dir: Path, slide: str) -> Path:
    """``label_dir/{slide}.h5`` (the layout of ``OUT/markers_dense/``)."""
    return Path(label_dir) / art.DENSE_LABELS.path(label_dir, slide).name


def baseline_files(out_b: Path, slide: str) -> dict[str, Path]:
    """Stage-06 files of the baseline map of ``slide`` under the OUT root ``out_b``: ``map``, ``mask``, ``record``."""
    d = art.VIRTUAL_CODEX.dir(out_b)
    return {"map": d / f"{slide}.npy", "mask": d / f"{slide}_mask.png", "record": art.VIRTUAL_CODEX.path(out_b, slide)}


def check_dense_inputs(slides: Sequence[str], label_dir: Path, grid: int, ckpt: Path,
                       baseline: Path | None) -> None:
    """Every test slide has a dense label file of the model's grid, and (``baseline``) a stage-06 map with its
    record; else one :class:`PipelineError` line naming the file and the fix."""
    for s in slides:
        p = dense_label_path(label_dir, s)
        if not p.is_file():
            raise PipelineError(f"dense labels {p} of test slide {s} not found: {STAGE_03} {grid} (the dense model "
                                f"{ckpt} is scored on them), give --dense-labels, or pass --no-dense")
        try:
            with h5py.File(p, "r") as f:
                g = int(f.attrs["grid"])
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise PipelineError(f"cannot read the grid of dense labels {p} ({type(e).__name__}: {e}); "
                                f"{STAGE_03} {grid}") from None
        if g != grid:
            raise PipelineError(f"dense labels {p} have a {g}x{g} grid but the model {ckpt} predicts {grid}x{grid}: "
                                f"{STAGE_03} {grid}, or give --dense-labels of that grid")
    if baseline is not None:
        for s in slides:
            for role, p in baseline_files(baseline, s).items():
                if role != "mask" and not p.is_file():
                    raise PipelineError(f"--dense-baseline {baseline}: {p} of test slide {s} not found; {STAGE_06} "
                                        f"and --out {baseline}")


def _attr_markers(v: Any) -> list[str]:
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, str):
        return [str(m) for m in json.loads(v)]
    return [m.decode() if isinstance(m, bytes) else str(m) for m in np.atleast_1d(v)]


def check_dense_rows(ds: PatchDataset, label_dir: Path, label_markers: Sequence[str], grid: int) -> None:
    """Every sample of ``ds`` has a row (same ``index`` and coordinates) in its slide's dense label file, which
    lists the markers ``label_markers``; reads only ``index``, ``coords`` and the attrs (cheap, every rank, before
    predicting). Else one :class:`PipelineError` line naming the file."""
    slides = ds.slide_of_sample
    for s in ds.slides:
        sel = np.flatnonzero(slides == s)
        if not len(sel):
            continue
        path = dense_label_path(label_dir, s)
        try:
            with h5py.File(path, "r") as f:
                index, coords = f["index"][:], f["coords"][:]
                have = _attr_markers(f.attrs["markers"])
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise PipelineError(f"cannot read dense labels {path} ({type(e).__name__}: {e}); {STAGE_03} "
                                f"{grid}") from None
        lacking = [m for m in label_markers if m not in set(have)]
        if lacking:
            raise PipelineError(f"dense labels {path} lack {len(lacking)} of the scored markers (e.g. "
                                f"{lacking[:3]}); {STAGE_03} {grid} with the markers of markers/{s}.csv")
        row = {int(k): j for j, k in enumerate(index)}
        want = ds.rows[sel]
        missing = [int(k) for k in want if int(k) not in row]
        if missing:
            raise PipelineError(f"dense labels {path} lack {len(missing)} labelled patches of {s} (e.g. index "
                                f"{missing[0]}): older than markers/{s}.csv? {STAGE_03} {grid}")
        j = np.array([row[int(k)] for k in want], np.int64)
        if not np.array_equal(np.asarray(coords)[j], ds.coords[sel]):
            raise PipelineError(f"dense labels {path}: patch coordinates differ from markers/{s}.csv (another "
                                f"patch grid); {STAGE_03} {grid}")


# ----------------------------------------------------------------------------------------------------------------
# the baseline map and the geometry


@dataclass
class BaselineMap:
    """A stage-06 map: ``values`` (H', W', M) float32, ``mask`` (H', W') bool (tissue), ``markers`` (M names),
    ``stride_level0`` s (level-0 px per map pixel; pixel (r, q) covers [q s, (q+1) s) x [r s, (r+1) s))."""

    values: np.ndarray
    mask: np.ndarray
    markers: list[str]
    stride_level0: float


def read_baseline_map(out_b: str | os.PathLike, slide: str) -> BaselineMap:
    """The stage-06 map of ``slide`` under the OUT root ``out_b`` (``virtual_codex/{slide}.npy``, ``_mask.png`` and
    the record ``{slide}.json``'s ``markers`` and ``stride_level0``); a missing or unreadable file is one
    :class:`PipelineError` naming it. Without a mask file the mask is 'any marker > 0' (stage 06 writes 0 outside
    tissue)."""
    files = baseline_files(Path(out_b), slide)
    try:
        rec = json.loads(files["record"].read_text())
        stride, markers = float(rec["stride_level0"]), [str(m) for m in rec["markers"]]
        values = np.load(files["map"], allow_pickle=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PipelineError(f"cannot read the baseline map of {slide} under {out_b} ({type(e).__name__}: {e}); "
                            f"{STAGE_06}") from None
    if values.ndim != 3 or values.shape[2] != len(markers):
        raise PipelineError(f"baseline map {files['map']} has shape {values.shape} but its record lists "
                            f"{len(markers)} markers; {STAGE_06}")
    if files["mask"].is_file():
        from PIL import Image

        with Image.open(files["mask"]) as im:
            mask = np.asarray(im.convert("L")) > 127
        if mask.shape != values.shape[:2]:
            raise PipelineError(f"baseline mask {files['mask']} is {mask.shape}, its map {values.shape[:2]}; "
                                f"{STAGE_06}")
    else:
        mask = (values > 0).any(axis=2)
    return BaselineMap(np.asarray(values, np.float32), mask, markers, stride)


def cell_centres(coords: np.ndarray, grid: int, cell_px: float) -> np.ndarray:
    """Level-0 (x, y) centres of the G x G cells of patches with top-left ``coords`` (N, 2) -> (N, G, G, 2)
    float64, ``[n, i, j] = (x + (j + 1/2) c - 1/2, y + (i + 1/2) c - 1/2)`` (i = row, j = column)."""
    xy = np.asarray(coords, np.float64).reshape(-1, 1, 1, 2)
    off = (np.arange(grid, dtype=np.float64) + 0.5) * float(cell_px) - 0.5
    out = np.empty((xy.shape[0], grid, grid, 2), np.float64)
    out[..., 0] = xy[..., 0] + off[None, None, :]
    out[..., 1] = xy[..., 1] + off[None, :, None]
    return out


def baseline_at_cells(bmap: BaselineMap, coords: np.ndarray, grid: int, cell_px: float,
                      markers: Sequence[str]) -> np.ndarray:
    """The baseline map upsampled to the cells of patches ``coords`` (N, 2): (N, M, G, G) float32 in the order of
    ``markers`` (NaN for a marker the map lacks, and outside tissue)."""
    n = len(coords)
    out = np.full((n, len(markers), grid, grid), np.nan, np.float32)
    pos = {m: k for k, m in enumerate(bmap.markers)}
    have = [(k, pos[m]) for k, m in enumerate(markers) if m in pos]
    if not have or not n:
        return out
    vals, _ = sample_map(bmap.values[..., [b for _, b in have]], bmap.mask, bmap.stride_level0,
                         cell_centres(coords, grid, cell_px).reshape(-1, 2))
    vals = vals.reshape(n, grid, grid, len(have)).transpose(0, 3, 1, 2)
    out[:, [k for k, _ in have]] = vals
    return out


# ----------------------------------------------------------------------------------------------------------------
# scores


def pooled_pearson(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-marker Pearson r of (N, M, G, G) labels ``y`` and predictions ``p`` over every cell of every patch where
    both are finite -> (r (M,) float64, NaN for a constant column or < 2 cells; n (M,) int64 cells used)."""
    m = y.shape[1]
    r = np.full(m, np.nan)
    n = np.zeros(m, np.int64)
    for k in range(m):
        a, b = y[:, k].ravel(), p[:, k].ravel()
        ok = np.isfinite(a) & np.isfinite(b)
        n[k] = int(ok.sum())
        if n[k] >= 2:
            r[k] = pearson(a[ok, None], b[ok, None])[0]
    return r, n


@dataclass
class DenseTargets:
    """Dense labels of a dataset's patches, in its sample order: ``values`` (N, M, G, G) float32 (NaN = no data),
    ``grid`` G, ``cell_px_level0`` c, ``cell_um``, ``registration`` (per slide), ``paths`` (per slide)."""

    values: np.ndarray
    grid: int
    cell_px_level0: float
    cell_um: float
    registration: dict[str, str]
    paths: dict[str, str]


def read_targets(ds: PatchDataset, label_dir: Path, label_markers: Sequence[str], grid: int) -> DenseTargets:
    """The dense labels of every sample of ``ds`` (matched by slide and patch ``index``; check them first with
    :func:`check_dense_rows`) for the label columns ``label_markers`` (by name, in the order of the model's
    outputs): read with :func:`preprocess.quantify.dense.read_dense_labels`."""
    from preprocess.quantify.dense import read_dense_labels

    out = np.full((len(ds), len(label_markers), grid, grid), np.nan, np.float32)
    slides = ds.slide_of_sample
    reg: dict[str, str] = {}
    paths: dict[str, str] = {}
    cell_px = cell_um = None
    for s in ds.slides:
        sel = np.flatnonzero(slides == s)
        if not len(sel):
            continue
        path = dense_label_path(label_dir, s)
        lab = read_dense_labels(path)
        if lab.grid != grid:
            raise PipelineError(f"dense labels {path} have a {lab.grid}x{lab.grid} grid, the model {grid}x{grid}; "
                                f"{STAGE_03} {grid}")
        if cell_px is not None and abs(float(lab.cell_px_level0) - cell_px) > 1e-6:
            log.warning("dense labels %s have %.4g level-0 px cells, other slides %.4g", path, lab.cell_px_level0,
                        cell_px)
        cell_px, cell_um = float(lab.cell_px_level0), float(lab.cell_um)
        row = {int(k): j for j, k in enumerate(np.asarray(lab.index))}
        col = {m: k for k, m in enumerate(lab.markers)}
        j = np.array([row[int(k)] for k in ds.rows[sel]], np.int64)
        out[sel] = lab.values[j][:, [col[m] for m in label_markers]]
        reg[s] = str(lab.registration)
        paths[s] = str(path)
    return DenseTargets(out, grid, float(cell_px or 0.0), float(cell_um or 0.0), reg, paths)


def baseline_for(ds: PatchDataset, out_b: Path, markers: Sequence[str], grid: int,
                 cell_px: float) -> tuple[np.ndarray, dict[str, float]]:
    """The baseline of every sample of ``ds``: (N, M, G, G) (model marker names ``markers``), and the map stride of
    each slide."""
    out = np.full((len(ds), len(markers), grid, grid), np.nan, np.float32)
    slides = ds.slide_of_sample
    strides: dict[str, float] = {}
    for s in ds.slides:
        sel = np.flatnonzero(slides == s)
        if not len(sel):
            continue
        bmap = read_baseline_map(out_b, s)
        lacking = [m for m in markers if m not in set(bmap.markers)]
        if lacking:
            log.warning("baseline map of %s lacks %d markers (%s...): r_baseline NaN for them", s, len(lacking),
                        lacking[:3])
        out[sel] = baseline_at_cells(bmap, ds.coords[sel], grid, cell_px, markers)
        strides[s] = bmap.stride_level0
    return out, strides


def _mean(v: np.ndarray) -> float | None:
    v = np.asarray(v, np.float64)
    return float(np.nanmean(v)) if np.isfinite(v).any() else None


def _clean(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


def write_dense_reports(test_dir: Path, ds: PatchDataset, pred: np.ndarray, dense_pred: np.ndarray,
                        targets: DenseTargets, baseline: np.ndarray | None, visible: Sequence[str] | None = None,
                        plots: bool = True, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``dense_pearson.csv``, the plots and ``dense_summary.json`` (last) for a dense model's patch
    predictions ``pred`` (N, M) and dense predictions ``dense_pred`` (N, M, G, G) of ``ds`` (markers = model names)
    against ``targets``; ``baseline`` (N, M, G, G) or None. Returns the summary (``info`` added to it)."""
    markers = list(ds.markers)
    y = targets.values
    r_dense, n_dense = pooled_pearson(y, dense_pred)
    if baseline is not None:
        r_base, n_base = pooled_pearson(y, baseline)
    else:
        r_base, n_base = np.full(len(markers), np.nan), np.zeros(len(markers), np.int64)
    r_patch = pearson(ds.labels, pred)
    table = pd.DataFrame({"marker": markers, "r_dense": r_dense, "r_baseline": r_base, "r_patch": r_patch})
    with atomic_path(test_dir / CSV_NAME) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    valid = np.isfinite(y)
    regs = sorted(set(targets.registration.values()))
    summary: dict[str, Any] = {
        "n_patches": int(len(y)), "n_cells": int(valid.any(axis=1).sum()), "n_values": int(valid.sum()),
        "grid": targets.grid, "cell_px_level0": targets.cell_px_level0, "cell_um": targets.cell_um,
        "registration": regs[0] if len(regs) == 1 else targets.registration,
        "mean_r_dense": _mean(r_dense), "mean_r_baseline": _mean(r_base), "mean_r_patch": _mean(r_patch),
        "baseline_coverage": (float(n_base.sum() / max(int(n_dense.sum()), 1)) if baseline is not None else None)}
    if visible is not None:
        vis = np.isin(markers, list(visible))
        summary |= {"visible_markers": [m for m, v in zip(markers, vis) if v],
                    "mean_r_dense_visible": _mean(r_dense[vis]), "mean_r_baseline_visible": _mean(r_base[vis]),
                    "mean_r_patch_visible": _mean(r_patch[vis])}
    summary |= {"per_marker": {m: {"r_dense": _clean(a), "r_baseline": _clean(b), "r_patch": _clean(c),
                                   "n_cells_dense": int(nd), "n_cells_baseline": int(nb)}
                               for m, a, b, c, nd, nb in zip(markers, r_dense, r_base, r_patch, n_dense, n_base)}}
    summary |= dict(info or {})
    if plots:
        _plots(test_dir, ds, dense_pred, y, baseline, table, visible)
    write_json(test_dir / SUMMARY_NAME, summary)
    return summary


# ----------------------------------------------------------------------------------------------------------------
# plots (matplotlib Agg, the style of hex.evaluate.reports)


def _shown_markers(table: pd.DataFrame, visible: Sequence[str] | None, k: int) -> list[int]:
    """Positions of up to ``k`` markers with the best r_dense (visible ones first)."""
    t = table.assign(pos=np.arange(len(table)), vis=table["marker"].isin(list(visible or [])))
    t = t.sort_values(["vis", "r_dense"], ascending=[False, False], na_position="last")
    return [int(p) for p in t["pos"][:k]]


def _shown_patches(y: np.ndarray, ks: Sequence[int], k: int) -> list[int]:
    """Up to ``k`` patches with mostly valid cells and the most label variation over cells in markers ``ks``."""
    sub = y[:, list(ks)]
    frac = np.isfinite(sub).mean(axis=(1, 2, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN patches
        spread = np.nan_to_num(np.nanstd(sub, axis=(2, 3)).mean(axis=1), nan=-1.0)
    score = np.where(frac >= 0.5, spread, spread - 10.0)
    return [int(i) for i in np.argsort(-score, kind="stable")[:k]]


def _plots(test_dir: Path, ds: PatchDataset, dense_pred: np.ndarray, y: np.ndarray, baseline: np.ndarray | None,
           table: pd.DataFrame, visible: Sequence[str] | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = list(table["marker"])
    shown = _shown_markers(table, visible, 6)
    rng = np.random.default_rng(0)
    fig, axes = plt.subplots(1, max(len(shown), 1), figsize=(2.4 * max(len(shown), 1), 2.6), squeeze=False)
    for ax, k in zip(axes.flat, shown):
        a, b = y[:, k].ravel(), dense_pred[:, k].ravel()
        ok = np.flatnonzero(np.isfinite(a) & np.isfinite(b))
        sel = rng.choice(ok, size=min(len(ok), 3000), replace=False) if len(ok) else ok
        ax.scatter(a[sel], b[sel], s=2, alpha=0.3, rasterized=True, label="dense")
        if baseline is not None:
            c = baseline[:, k].ravel()
            okb = sel[np.isfinite(c[sel])]
            ax.scatter(a[okb], c[okb], s=2, alpha=0.3, rasterized=True, color="tab:orange", label="baseline")
        ax.plot([0, 1], [0, 1], "k--", lw=0.5)
        ax.set_title(f"{markers[k]} r={table['r_dense'].iloc[k]:.2f} (base {table['r_baseline'].iloc[k]:.2f})",
                     fontsize=7)
        ax.tick_params(labelsize=5)
    axes.flat[0].legend(fontsize=5, markerscale=3, loc="upper left")
    fig.supxlabel("measured CODEX (dense label, per cell)", fontsize=8)
    fig.supylabel("predicted", fontsize=8)
    fig.tight_layout()
    with atomic_path(test_dir / PLOT_NAMES[0]) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)

    ks = shown[:3]
    patches = _shown_patches(y, ks, 2)
    rows = [(i, k) for i in patches for k in ks]
    titles = ("H&E", "measured CODEX", "dense prediction", "upsampled baseline")
    fig, axes = plt.subplots(max(len(rows), 1), 4, figsize=(8, 2.1 * max(len(rows), 1)), squeeze=False)
    cmap = matplotlib.colormaps["magma"].with_extremes(bad="0.6")
    slides = ds.slide_of_sample
    for r, (i, k) in enumerate(rows):
        img = ds.sources[ds.slide_idx[i]].read(int(ds.rows[i]))
        axes[r, 0].imshow(img)
        axes[r, 0].set_ylabel(f"{slides[i]} #{int(ds.rows[i])}\n{markers[k]}", fontsize=6)
        panels = [y[i, k], dense_pred[i, k], baseline[i, k] if baseline is not None else None]
        finite = [p[np.isfinite(p)] for p in panels if p is not None]
        lo = min([float(f.min()) for f in finite if f.size] + [0.0])  # one colour scale per row: comparable
        hi = max([float(f.max()) for f in finite if f.size] + [lo + 1e-6])
        for c, p in enumerate(panels, start=1):
            if p is None:
                axes[r, c].text(0.5, 0.5, "no --dense-baseline", ha="center", va="center", fontsize=6)
            else:
                axes[r, c].imshow(np.ma.masked_invalid(p), cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
        for c in range(4):
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(titles[c], fontsize=7)
    fig.tight_layout()
    with atomic_path(test_dir / PLOT_NAMES[1]) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
