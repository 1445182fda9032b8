"""Every artifact the stages exchange: its place under OUT, the stage that makes it, and its schema version.

The one place a folder name of OUT is written. Stages, ``preprocess.status``, ``preprocess.check_cohort``, the
demo summary and bench ask the registry for paths::

    from pipeline import artifacts as art
    art.PATCH_GRID.path(out, "slide_000")            # OUT/patches/slide_000.h5
    art.PREDICTIONS.dir(out)                         # OUT/hex_pred
    art.FEATURE_BAGS.path(out, "slide_000", encoder="musk")   # OUT/features/musk/h5_files/slide_000.h5
    art.MICA_RUN.dir(out, run="demo_coattn")         # OUT/mica_runs/demo_coattn

``docs/FORMATS.md`` lists the same table (``tests`` compare them: :func:`format_table` makes it). Readers of the
HDF5 layouts shared by several packages live here too (:func:`h5_attrs`); a layout read by one
package only keeps its reader in that package, next to its writer (e.g. ``preprocess.patch_store_format``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.done import DONE_DIR
from pipeline.errors import PipelineError


@dataclass(frozen=True)
class Artifact:
    """One artifact: ``folder`` and ``name`` are templates under OUT (``{slide}``, ``{encoder}``, ``{run}``).

    Attributes:
        key: registry key (``patch_grid``).
        folder: the folder under OUT (``features/{encoder}``); holds ``done/`` when the stage keeps done-records.
        name: the per-slide main file in ``folder`` (``{slide}.h5``), or a fixed file for cohort-wide artifacts.
        stage: the numbered stage that writes it (``01 patch``).
        schema: schema version of the main file (bumped when the layout changes).
        content: what it holds (one line; docs/FORMATS.md has the full layout).
        extra: other files of one slide beside the main one, as templates (``{slide}_tissue.png``).
        records: the stage keeps done-records in ``folder/done/`` (``preprocess.status`` reads them).
        column: its column in ``preprocess.status`` (``{encoder}``/``{run}`` filled per folder or file found):
            None = the folder, "" = no column. Per-slide artifacts (``{slide}`` in the name, or done-records) get a
            column; a cohort-wide file gets one only when ``column`` names it (its slides are datasets in it).
    """

    key: str
    folder: str
    name: str
    stage: str
    schema: int
    content: str
    extra: tuple[str, ...] = ()
    records: bool = True
    column: str | None = None

    def dir(self, out: str | os.PathLike, **kw: str) -> Path:
        """The artifact's folder under ``out`` (``OUT/features/musk`` for ``encoder="musk"``)."""
        return Path(out) / _fill(self.folder, kw, self.key)

    def path(self, out: str | os.PathLike, slide: str | None = None, **kw: str) -> Path:
        """The main file of ``slide`` (or of the run, for artifacts without ``{slide}``)."""
        vals = dict(kw, **({"slide": slide} if slide is not None else {}))
        return self.dir(out, **kw) / _fill(self.name, vals, self.key)

    def files(self, out: str | os.PathLike, slide: str, **kw: str) -> list[Path]:
        """Every file one slide owns: the main file and the ``extra`` ones."""
        d = self.dir(out, **kw)
        vals = dict(kw, slide=slide)
        return [self.path(out, slide, **kw)] + [d / _fill(t, vals, self.key) for t in self.extra]

    def records_dir(self, out: str | os.PathLike, **kw: str) -> Path:
        return self.dir(out, **kw) / DONE_DIR

    def template(self) -> str:
        """``patches/{slide}.h5``: folder and name, as FORMATS.md and ``preprocess.status`` show them."""
        return f"{self.folder}/{self.name}"

    def instances(self, out: str | os.PathLike) -> Iterator[dict[str, str]]:
        """The values of the folder's variables found under ``out`` (``[{"encoder": "musk"}, ...]``); one empty dict
        when the folder has none."""
        names = re.findall(r"\{(\w+)\}", self.folder)
        if not names:
            yield {}
            return
        rx = re.compile("^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(self.folder)) + "$")
        for p in sorted(Path(out).glob(re.sub(r"\{\w+\}", "*", self.folder))):
            m = rx.match(p.relative_to(out).as_posix())
            if m and p.is_dir() and not any(v.startswith(".") for v in m.groupdict().values()):
                yield m.groupdict()


def _fill(template: str, values: dict[str, Any], key: str) -> str:
    try:
        return template.format(**values)
    except KeyError as e:
        raise TypeError(f"artifact {key}: {template!r} needs {e.args[0]}=") from None


PATCH_GRID = Artifact("patch_grid", "patches", "{slide}.h5", "01 patch", 1,
                      "coords (N,2) level-0 top-left; attrs patch_size, patch_level, patch_size_level0, mpp",
                      extra=("{slide}_tissue.png", "{slide}_qc.png", "{slide}_qc.csv"), column="patch")
REGISTRATION = Artifact("registration", "registration", "{slide}.json", "02 register", 1,
                        "affine CODEX->H&E (level-0 px), block shifts, QC before/after, status ok or flagged",
                        extra=("{slide}_qc.png", "{slide}_displacement.npy"))
LABELS = Artifact("labels", "markers", "{slide}.csv", "03 quantify", 2,
                  "slide,index,x,y,<40 markers> normalised to [0,1]; normalization.json beside them")
NORMALIZATION = Artifact("normalization", "markers", "normalization.json", "03 quantify", 2,
                         "per-marker raw percentiles of the normalisation and the slides it was fitted on",
                         records=False)
DENSE_LABELS = Artifact("dense_labels", "markers_dense", "{slide}.h5", "03 quantify", 1,
                        "values (N,40,G,G) float16 normalised like the labels (NaN = no CODEX), index (N,), coords "
                        "(N,2); attrs markers, grid, cell_px_level0, cell_um, registration (--dense-grid)",
                        records=False, column="")  # optional output of stage 03, done-records in markers/done/
PATCH_STORE = Artifact("patch_store", "he_patches", "{slide}.h5", "03 quantify", 1,
                       "imgs (N,H,W,3) uint8 one patch per chunk, coords (N,2)")
HEX_RUN = Artifact("hex_run", "runs/{run}", "best.safetensors", "04 train HEX", 1,
                   "config.json, checkpoints/epoch_{k}.pt, best.safetensors + best.json, TensorBoard events",
                   records=False)
HEX_TEST = Artifact("hex_test", "runs/{run}/test", "marker_pearson.csv", "05 test HEX", 1,
                    "patch_predictions.csv, marker_pearson.csv, slide_pearson.csv, summary.json, scatter/bar PNGs; "
                    "done/evaluation.json", records=False)
HEX_EXTERNAL = Artifact("hex_external", "runs/{run}/external/{cohort}", "marker_pearson.csv", "05 test HEX", 1,
                        "the HEX_TEST files for the labelled slides of an independent cohort (EXTERNAL_OUT), no split",
                        records=False, column="")
PREDICTIONS = Artifact("predictions", "hex_pred", "{slide}.h5", "06 infer WSI", 1,
                       "coords (N,2), codex_prediction (N,40) float32; attrs markers, stride_level0, checkpoint")
VIRTUAL_CODEX = Artifact("virtual_codex", "virtual_codex", "{slide}.json", "06 infer WSI", 2,
                         "{slide}.npy (H',W',40) float16 map + mask, .ome.tif (40 named channels), _preview.png, "
                         ".geojson; {slide}.json describes them",
                         extra=("{slide}.npy", "{slide}_mask.png", "{slide}.ome.tif", "{slide}_preview.png",
                                "{slide}.geojson", "{slide}_dense.ome.tif", "{slide}_dense_preview.png"))
FEATURE_BAGS = Artifact("feature_bags", "features/{encoder}", "h5_files/{slide}.h5", "07 features", 1,
                        "features (N,D) float32, coords (N,2); pt_files/{slide}.pt (N,D) tensor (CLAM/MCAT)",
                        extra=("pt_files/{slide}.pt",))
CODEX_FEATURES = Artifact("codex_features", "codex_features/{encoder}", "{slide}.h5", "07 features", 1,
                          "per-slide part: CODEX channel tokens (40, D') float32 (the resumable unit)", column="")
CODEX_FEATURE_TABLE = Artifact("codex_feature_table", "codex_features", "{encoder}.h5", "07 features", 1,
                               "one (40, D') dataset per slide, gathered from the parts done with one setting",
                               records=False, column="codex_features/{encoder}")
MICA_RUN = Artifact("mica_run", "mica_runs/{run}", "summary.csv", "08 train MICA", 1,
                    "config.json, fold_{k}/checkpoint.safetensors + checkpoint.json (with the inputs it was trained "
                    "on), fold_{k}/val_predictions.csv, summary.csv; test/ (stage 09)",
                    records=False)
MICA_REPORT = Artifact("mica_report", "mica_runs/{run}/test", "report.csv", "09 test MICA", 1,
                       "report.csv (row,metric,value,lo,hi), report_folds.csv, comparisons.csv "
                       "(row_a,row_b,metric,delta,lo,hi,p,rel_improvement), cox_multivariable.csv, report.md, "
                       "predictions.csv, figures", records=False, column="")
MICA_EXTERNAL = Artifact("mica_external", "mica_runs/{run}/external/{cohort}", "predictions.csv", "09 test MICA", 1,
                         "predictions.csv (case_id, risk|prob ensemble, risk_fold{k}|prob_fold{k}, risk_group) and, "
                         "with outcomes, the MICA_REPORT files", records=False, column="")
ATTRIBUTIONS = Artifact("attributions", "mica_runs/{run}/ig", "{slide}.h5", "09 test MICA", 1,
                        "coords, path_attr (N,), codex_attr (40,); attrs baseline, steps, delta; heatmap PNG",
                        extra=("{slide}_heatmap.png",), column="ig/{run}")

SPATIAL_UNITS = Artifact("spatial_units", "spatial/units", "{slide}.h5", "10 niches", 1,
                         "cells: xy_px, xy_um (N,2), area_um2, virtual (N,40) (the map at each cell), measured (N,40) "
                         "raw CODEX disk means; attrs units, markers, mpp, cell_source")
SPATIAL = Artifact("spatial", "spatial", "{slide}.h5ad", "10 niches", 1,
                   "AnnData of the cells: obs x_um, y_um, x_px, y_px, area_um2, phenotype, niche (+ _measured); "
                   "X virtual CODEX; layers measured; obsm spatial (µm); {slide}.geojson (QuPath detections), "
                   "{slide}_niches.png", extra=("{slide}.geojson", "{slide}_niches.png"), records=False)
SPATIAL_COHORT = Artifact("spatial_cohort", "spatial/cohort", "niches.csv", "10 niches", 1,
                          "niches.csv (slide x niche fractions), colocalisation.csv, composition.csv, phenotypes.csv, "
                          "niche_model_{source}.json, scaling_{source}.json, patient_features.csv, "
                          "association_{survival,response}.csv, figures", records=False, column="")
SPATIAL_TILES_UNITS = Artifact("spatial_tiles_units", "spatial_tiles/units", "{slide}.h5", "10 niches", 1,
                               "as spatial_units, for the tiles of hex_pred (--units tiles); measured = stage-03 "
                               "labels")
SPATIAL_TILES = Artifact("spatial_tiles", "spatial_tiles", "{slide}.h5ad", "10 niches", 1,
                         "as spatial, one unit per tile (--units tiles)",
                         extra=("{slide}.geojson", "{slide}_niches.png"), records=False)
SPATIAL_TILES_COHORT = Artifact("spatial_tiles_cohort", "spatial_tiles/cohort", "niches.csv", "10 niches", 1,
                                "as spatial_cohort, for the tiles", records=False, column="")

REGISTRY: dict[str, Artifact] = {a.key: a for a in (
    PATCH_GRID, REGISTRATION, LABELS, NORMALIZATION, DENSE_LABELS, PATCH_STORE, HEX_RUN, HEX_TEST, HEX_EXTERNAL,
    PREDICTIONS, VIRTUAL_CODEX, FEATURE_BAGS, CODEX_FEATURES, CODEX_FEATURE_TABLE, MICA_RUN, MICA_REPORT, MICA_EXTERNAL,
    ATTRIBUTIONS, SPATIAL_UNITS, SPATIAL, SPATIAL_COHORT, SPATIAL_TILES_UNITS, SPATIAL_TILES, SPATIAL_TILES_COHORT)}


def format_table() -> str:
    """The registry as the Markdown table of docs/FORMATS.md ("Artifact registry")."""
    rows = ["| key | path under OUT | stage | schema | content |", "|---|---|---|---|---|"]
    for a in REGISTRY.values():
        rows.append(f"| `{a.key}` | `{a.template()}` | {a.stage} | {a.schema} | {a.content} |")
    return "\n".join(rows)


def h5_attrs(path: str | os.PathLike, stage: str) -> dict[str, Any]:
    """The root attributes of an HDF5 artifact, or one :class:`PipelineError` naming the file and the stage to rerun."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return dict(f.attrs)
    except FileNotFoundError:
        raise PipelineError(f"{path} not found; run stage {stage} first") from None
    except OSError as e:
        raise PipelineError(f"{path} is not a readable HDF5 file ({e}); rerun stage {stage} for it") from None
