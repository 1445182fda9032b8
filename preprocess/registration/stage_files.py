"""Stage 02's files per slide: what it writes, its done-record (settings, inputs, outputs) and its summary table.

:mod:`preprocess.register` (the command line) uses these; the rules are in its docstring.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline import artifacts as art
from pipeline import done as done_mod
from pipeline.io import atomic_write_text
from preprocess.pixel_sizes import PixelSizes
from preprocess.registration.params import RegParams


def outputs(slide: str, out_dir: str | os.PathLike) -> list[Path]:
    """The files stage 02 writes for one slide: record, QC PNG, displacement field, registered OME-TIFF."""
    files = art.REGISTRATION.files(out_dir, slide)
    return [*files, files[0].with_name(f"{slide}_registered.ome.tif")]


_NOT_SETTINGS = ("threads", "marker_panel", "panel_wins", "write_registered", "tile_size")


def done_settings(params: RegParams) -> dict[str, Any]:
    """The parameters that change a slide's outputs (see the module docstring), as recorded in its done-record."""
    return {k: v for k, v in asdict(params).items() if k not in _NOT_SETTINGS}


def done_inputs(slide: str, pairs: Mapping[str, tuple[Path, Path | None]],
                panel: str | None) -> dict[str, Path | str]:
    """{role: file} a slide's registration is made from: ``he``, ``codex`` (when paired), ``panel`` (when used)."""
    he, codex = pairs[slide]
    roles: dict[str, Path | str] = {"he": he}
    if codex is not None:
        roles["codex"] = codex
    if panel:
        roles["panel"] = panel
    return roles


def done_outputs(slide: str, out_dir: str | os.PathLike, write_registered: bool) -> list[Path]:
    """The outputs that must exist for a slide to count as done (record, QC figure, the export when asked for)."""
    js, png, _, ome = outputs(slide, out_dir)
    return [js, png, ome] if write_registered else [js, png]


def slide_pixel_sizes(slide: str, sizes: PixelSizes) -> dict[str, float | None]:
    """A slide's own pixel-size settings (``--mpp`` / ``--codex-mpp`` or its row of the pixel-size table)."""
    return {"he_mpp": sizes.he_mpp(slide), "codex_mpp": sizes.codex_mpp(slide)}


def done_spec(out: str | os.PathLike, pairs: Mapping[str, tuple[Path, Path | None]], params: RegParams,
              sizes: PixelSizes | None = None) -> done_mod.DoneSpec:
    """The :class:`pipeline.done.DoneSpec` of a run: ``OUT/registration/done/{slide}.json``; ``sizes`` gives each
    slide its ``he_mpp`` / ``codex_mpp`` (default: ``params``' for every slide)."""
    panel = params.marker_panel if params.dapi_channel is None else None
    sizes = sizes if sizes is not None else PixelSizes(he_default=params.he_mpp, codex_default=params.codex_mpp)
    return done_mod.DoneSpec(
        folder=art.REGISTRATION.dir(out), settings=done_settings(params), schema=art.REGISTRATION.schema,
        inputs=functools.partial(done_inputs, pairs=dict(pairs), panel=panel),
        outputs=functools.partial(done_outputs, out_dir=out, write_registered=params.write_registered),
        slide_settings=functools.partial(slide_pixel_sizes, sizes=sizes))


def write_summary(path: Path, slides: list[str], out_dir: Path, failed: dict[str, str]) -> list[dict[str, Any]]:
    """One row per slide (failed ones with their reason) -> ``path`` (CSV); returns the rows."""
    rows = []
    for s in slides:
        js = outputs(s, out_dir)[0]
        if s in failed:
            rows.append({"slide": s, "status": "failed", "reason": failed[s]})
            continue
        if not js.exists():
            continue
        rec = json.loads(js.read_text())
        q = rec.get("qc", {})
        rows.append({"slide": s, "status": rec.get("status"), "reason": rec.get("reason") or "",
                     "ncc_before": q.get("ncc_before"), "ncc_coarse": q.get("ncc_coarse"),
                     "ncc_affine": q.get("ncc_affine"), "ncc_after": q.get("ncc_after"),
                     "n_blocks_used": q.get("n_blocks_used"),
                     "field_max_um": (rec.get("displacement") or {}).get("max_um"),
                     "seconds": (q.get("seconds") or {}).get("total")})
    cols = ["slide", "status", "reason", "ncc_before", "ncc_coarse", "ncc_affine", "ncc_after", "n_blocks_used",
            "field_max_um", "seconds"]
    buf = io.StringIO()
    wr = csv.DictWriter(buf, fieldnames=cols)
    wr.writeheader()
    for r in rows:
        wr.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())
    return rows
