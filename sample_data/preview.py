"""``preview.png`` of a generated cohort: one slide's H&E thumbnail beside its DAPI and three CODEX markers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .panel import MARKERS


def write_preview(out: Path, slide_id: str, he_mpp: float,
                   markers: tuple[str, ...] = ("Pan-Cytokeratin", "CD8", "CD68"), codex_rel: str | None = None) -> None:
    """Write ``out/preview.png``: the H&E thumbnail, DAPI and ``markers`` of ``slide_id``, read back from its files
    (``out/he/{slide}.tif``, ``out/{codex_rel}``, default ``codex/{slide}.ome.tif``; any format whose first tifffile
    series is the CODEX image: OME-TIFF, QPTIFF)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import openslide
    import tifffile

    slide = openslide.OpenSlide(str(out / "he" / f"{slide_id}.tif"))
    lvl = slide.level_count - 1 if max(slide.level_dimensions[-1]) >= 400 else slide.level_count - 2
    lvl = max(lvl, 0)
    thumb = np.asarray(slide.read_region((0, 0), lvl, slide.level_dimensions[lvl]).convert("RGB"))
    slide.close()
    with tifffile.TiffFile(out / (codex_rel or f"codex/{slide_id}.ome.tif")) as tf:
        levels = tf.series[0].levels
        lev = next((lv for lv in reversed(levels) if max(lv.shape[1:]) >= 400), levels[0])
        idx = [MARKERS.index(m) for m in ("DAPI", *markers)]
        chans = lev.asarray()[idx].astype(np.float32)
    fig, axes = plt.subplots(1, 5, figsize=(20, 4.6))
    axes[0].imshow(thumb)
    axes[0].set_title(f"{slide_id} H&E ({he_mpp:g} µm/px, level {lvl})")
    cmaps = ("Blues_r", "magma", "magma", "magma")
    for ax, name, img, cm in zip(axes[1:], ("DAPI", *markers), chans, cmaps):
        lo, hi = np.percentile(img, [1, 99.7])
        ax.imshow(np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1), cmap=cm if name != "DAPI" else "gray")
        ax.set_title(f"CODEX {name} (own frame)")
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle("Synthetic H&E / CODEX pair (same cells; CODEX placed by a known affine and smooth warp)")
    fig.tight_layout()
    fig.savefig(out / "preview.png", dpi=80, metadata={"Software": None})
    plt.close(fig)
