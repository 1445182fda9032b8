"""Stage 10: spatial niches from the virtual CODEX: cells (or tiles), phenotypes, cellular neighbourhoods, outcome.

    python -m spatial.niches --cohort COHORT --out OUT                # cells detected in the H&E, virtual CODEX
    python -m spatial.niches ... --cells qupath_exports/              # cells from QuPath ({slide}.geojson) or CSV
    python -m spatial.niches ... --units tiles                        # one unit per stage-06 tile (any stride)
    python -m spatial.niches ... --phenotypes cluster --n-clusters 12 # unsupervised phenotypes (+ marker heatmap)
    python -m spatial.niches ... --shard 0/4                          # job arrays: the per-slide half only

Two halves. Per slide (skip-if-done, ``--shard``): the units (nuclei detected here: colour deconvolution + seeded
watershed, tiled with halos (:mod:`spatial.nuclei`); or the user's QuPath GeoJSON / CSV; or the tiles of
``hex_pred``) with the virtual CODEX at each (the stage-06 map sampled at the cell) and, where the slide has
CODEX, the measured CODEX (a 3 µm disk at the registered position; stage-03 labels for tiles) ->
``OUT/spatial/units/{slide}.h5``. Then the cohort (a run without ``--shard``, once every slide is done):

1. per source (virtual, and measured where present), the markers on one scale (``--scale``: the raw measured CODEX
   of cells rescaled to the cohort's P1-P99.5, normalised values as they are);
2. phenotypes: the gating table (``--gating CSV``: phenotype,rule,priority; default
   ``spatial/gating_default.csv`` for the 40-marker panel) or k-means clusters of the marker profiles;
3. neighbourhoods: the phenotype composition of each unit's window (the unit and its ``--k`` - 1 nearest
   neighbours, or every unit within ``--radius`` µm);
   one seeded k-means over the cohort -> ``--n-niches`` niches; per slide the niche fractions and the pairwise
   co-localisation of phenotypes (neighbourhood enrichment z against ``--n-perms`` label permutations, squidpy's
   definition on a symmetric kNN graph);
4. outcome (when the clinical table has it): per patient the niche fractions (cell-weighted over slides) and
   co-localisation z (mean over slides) -> univariable Cox (HR per SD, 95% CI, Wald p, Benjamini-Hochberg q) and
   logistic / Mann-Whitney for response, on the cohort and on each MICA fold's validation patients.

Outputs: per slide ``OUT/spatial/{slide}.h5ad`` (AnnData: obs x_um, y_um, x_px, y_px, area_um2, phenotype, niche
and their ``_measured`` twins; X = virtual CODEX in the HEX run's normalised units; layers ``measured`` (scaled
[0, 1]); obsm ``spatial`` in µm; scanpy/squidpy read it as it is), ``{slide}.geojson`` (QuPath detections:
classification = phenotype, measurements = markers and niche), ``{slide}_niches.png`` (the niche map over the H&E
thumbnail); cohort tables and figures in ``OUT/spatial/cohort/`` (``niches.csv``, ``colocalisation.csv``,
``composition.csv`` + ``composition.png``, ``phenotypes.csv``, ``niche_model_{source}.json``,
``scaling_{source}.json``, ``patient_features.csv``, ``association_survival.csv`` / ``association_response.csv``
(+ ``_folds``), ``forest_survival.png``, ``km_top_niche.png``, ``forest_response.png``). ``--units tiles`` writes
the same under ``OUT/spatial_tiles/``.
"""

from __future__ import annotations

import argparse
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import artifacts as art
from pipeline import done as done_mod
from pipeline.cli import Stage, config_from_args, require
from pipeline.cohort import resolve_slides, select_slides
from pipeline.errors import PipelineError
from pipeline.io import atomic_path, config_dict, ensure_writable, save_config, write_json
from pipeline.runner import parse_shard, run_slides, shard_file_name, shard_slides
from spatial.analysis import NicheSettings, SourceModel, coloc_row, fit_source, slide_phenotypes, units_frame
from spatial.units import SlideUnits, cell_units, read_units, tile_units_of, write_units

log = logging.getLogger(__name__)

SCHEMA = 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m spatial.niches", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--cohort", type=Path, required=True,
                    help="cohort folder: he/ (or pairs.csv), clinical.csv and splits/ for the outcome tables")
    io.add_argument("--out", type=Path, required=True,
                    help="OUT root: reads virtual_codex/ or hex_pred/ (stage 06), registration/ + markers/ (stages "
                         "02-03, for the measured CODEX); writes spatial/ (or spatial_tiles/)")
    io.add_argument("--slides", nargs="+", help="only these slide ids (default: every slide of the cohort)")
    io.add_argument("--clinical", type=Path, help="clinical CSV (default COHORT/clinical.csv when present)")
    io.add_argument("--splits-dir", type=Path, help="MICA folds splits_{k}.csv (default COHORT/splits when present)")
    u = p.add_argument_group("units")
    u.add_argument("--units", choices=("cells", "tiles"), default="cells",
                   help="cells (default: nuclei of the H&E) or the tiles of hex_pred (one unit per tile)")
    u.add_argument("--cells", type=Path,
                   help="folder of the user's cells, {slide}.geojson (QuPath export) or {slide}.csv (x,y); default: "
                        "detect nuclei in the H&E here")
    u.add_argument("--cells-csv-units", choices=("px", "um"), default="px",
                   help="units of x,y in the cells CSVs: level-0 px (default) or µm")
    u.add_argument("--mpp", type=float, help="level-0 µm/px of the H&E (default: the slides' metadata)")
    u.add_argument("--disk-um", type=float, default=3.0,
                   help="radius of the disk the measured CODEX is averaged over at each cell, µm (default 3)")
    u.add_argument("--no-measured", action="store_true", help="ignore the measured CODEX even where it exists")
    a = p.add_argument_group("phenotypes and niches")
    a.add_argument("--source", choices=("virtual", "measured"), default="virtual",
                   help="values the phenotypes and niches of obs 'phenotype'/'niche' come from (default virtual: "
                        "H&E only); the other source, where present, gets '_measured'/'_virtual' twins")
    a.add_argument("--scale", choices=("auto", "cohort", "none"), default="auto",
                   help="marker scaling before gating: auto (default) = raw measured CODEX of cells to the cohort's "
                        "P1-P99.5 per marker, values already normalised (virtual, tile labels) as they are; cohort = "
                        "every source to its P1-P99.5; none = as they are")
    a.add_argument("--phenotypes", dest="phenotype_method", choices=("gating", "cluster"), default="gating",
                   help="gating table (default) or k-means clusters of the scaled marker profiles")
    a.add_argument("--gating", type=Path,
                   help="gating CSV (phenotype,rule,priority; rules like 'CD3e>0.12 & CD8>0.1' on the scaled markers, "
                        "[0, 1]); default: spatial/gating_default.csv")
    a.add_argument("--n-clusters", type=int, default=12, help="clusters of --phenotypes cluster (default 12)")
    a.add_argument("--k", type=int, default=5,
                   help="units per window: the unit and its k-1 nearest neighbours (default 5: closer to the tissue "
                        "compartments than Schürch et al.'s 10 on the sample cohort, ARI 0.55 vs 0.53)")
    a.add_argument("--exclude-self", action="store_true",
                   help="windows of the k nearest OTHER units (default: the unit itself counts, as Schürch et al.)")
    a.add_argument("--radius", dest="radius_um", type=float,
                   help="window radius in µm instead of --k nearest neighbours")
    a.add_argument("--n-niches", type=int, default=8, help="niches (k-means clusters of the windows; default 8)")
    a.add_argument("--n-perms", type=int, default=200,
                   help="label permutations of the co-localisation z-scores (default 200; squidpy's 1000)")
    a.add_argument("--seed", type=int, default=0, help="seed of the subsamples, k-means and permutations")
    r = p.add_argument_group("run")
    r.add_argument("--formats", nargs="+", choices=("h5ad", "geojson", "png"), default=["h5ad", "geojson", "png"],
                   help="per-slide outputs (default all)")
    r.add_argument("--workers", type=int, default=1,
                   help="processes building the slides' units (nuclei, markers), one slide each (default 1)")
    r.add_argument("--shard", help="job arrays: i/n = every n-th slide; the per-slide half only")
    r.add_argument("--overwrite", action="store_true", help="redo every slide's units and the cohort outputs")
    return p


@dataclass(frozen=True, kw_only=True)
class NichesConfig(NicheSettings):
    """One field per flag (see ``--help``) and the resolved slides."""

    cohort: Path
    out: Path
    slides: list[str] | None = None
    clinical: Path | None = None
    splits_dir: Path | None = None
    units: str = "cells"
    cells: Path | None = None
    cells_csv_units: str = "px"
    mpp: float | None = None
    disk_um: float = 3.0
    no_measured: bool = False
    formats: list[str] = field(default_factory=lambda: ["h5ad", "geojson", "png"])
    workers: int = 1
    shard: str | None = None
    overwrite: bool = False
    he_resolved: dict[str, str] = field(default_factory=dict)
    slides_resolved: list[str] = field(default_factory=list)

    @property
    def arts(self) -> tuple[art.Artifact, art.Artifact, art.Artifact]:
        """(units, per-slide outputs, cohort) artifacts of ``--units``."""
        if self.units == "tiles":
            return art.SPATIAL_TILES_UNITS, art.SPATIAL_TILES, art.SPATIAL_TILES_COHORT
        return art.SPATIAL_UNITS, art.SPATIAL, art.SPATIAL_COHORT

    def settings(self) -> NicheSettings:
        names = {f for f in NicheSettings.__dataclass_fields__}
        return NicheSettings(**{k: getattr(self, k) for k in names})


def make_config(args: argparse.Namespace) -> NichesConfig:
    """Flag checks and the slides (one line naming the flag or file)."""
    for flag, v, lo in (("--k", args.k, 1), ("--n-niches", args.n_niches, 2), ("--n-perms", args.n_perms, 0),
                        ("--n-clusters", args.n_clusters, 2), ("--workers", args.workers, 1)):
        require(v >= lo, f"{flag} {v}: must be >= {lo}")
    require(args.radius_um is None or args.radius_um > 0, f"--radius {args.radius_um}: µm, must be > 0")
    require(args.disk_um > 0, f"--disk-um {args.disk_um}: µm, must be > 0")
    require(args.mpp is None or args.mpp > 0, f"--mpp {args.mpp}: µm per pixel, must be > 0")
    require(args.cohort.is_dir(), f"--cohort {args.cohort}: folder not found")
    require(args.cells is None or args.cells.is_dir(), f"--cells {args.cells}: folder not found")
    require(args.gating is None or args.gating.is_file(), f"--gating {args.gating}: file not found")
    require(args.clinical is None or args.clinical.is_file(), f"--clinical {args.clinical}: file not found")
    parse_shard(args.shard)
    if args.gating is not None:
        from spatial.phenotypes import read_gating

        read_gating(args.gating)  # syntax errors before any work
    cohort = resolve_slides(args.cohort, require_he=args.units == "cells")
    mine = shard_slides(select_slides(cohort.ids, args.slides, cohort.source), args.shard)
    require(bool(mine), f"--shard {args.shard}: no slide of the {len(cohort)} in {cohort.source} falls in it")
    clinical = args.clinical or (args.cohort / "clinical.csv" if (args.cohort / "clinical.csv").is_file() else None)
    splits = args.splits_dir or (args.cohort / "splits" if (args.cohort / "splits").is_dir() else None)
    return config_from_args(NichesConfig, args, clinical=clinical, splits_dir=splits,
                            he_resolved={s: str(p) for s, p in cohort.he_paths().items()}, slides_resolved=mine)


# ----------------------------------------------------------------------------------------------------------------
# the per-slide half


def _inputs(slide: str, cfg: NichesConfig) -> dict[str, Path]:
    ins: dict[str, Path] = {}
    if cfg.units == "cells":
        ins["he"] = Path(cfg.he_resolved[slide])
        ins["map"] = art.VIRTUAL_CODEX.path(cfg.out, slide)
        if cfg.cells is not None:
            from spatial.units import imported_cells_path

            try:
                ins["cells"] = imported_cells_path(cfg.cells, slide)
            except PipelineError:
                ins["cells"] = Path(cfg.cells) / f"{slide}.geojson"
    else:
        ins["pred"] = art.PREDICTIONS.path(cfg.out, slide)
    if not cfg.no_measured:
        from preprocess.quantify.raw import raw_meta_path

        ins["codex_quant"] = raw_meta_path(cfg.out, slide) if cfg.units == "cells" else art.LABELS.path(cfg.out, slide)
    return ins


def units_spec(cfg: NichesConfig) -> done_mod.DoneSpec:
    """What makes a slide's units file: the unit kind, cell source, pixel size, disk radius, measured or not."""
    units_art = cfg.arts[0]
    settings = {"units": cfg.units, "cells": str(cfg.cells) if cfg.cells else "detect",
                "cells_csv_units": cfg.cells_csv_units, "mpp": cfg.mpp, "disk_um": cfg.disk_um,
                "measured": not cfg.no_measured}
    return done_mod.DoneSpec(units_art.dir(cfg.out), settings, SCHEMA, functools.partial(_inputs, cfg=cfg),
                             lambda s: [units_art.path(cfg.out, s)])


def build_units(slide: str, cfg: NichesConfig) -> dict[str, Any]:
    """The per-slide job: units + markers -> ``spatial/units/{slide}.h5``."""
    if cfg.units == "cells":
        u = cell_units(cfg.out, slide, cfg.he_resolved[slide], cfg.mpp, str(cfg.cells) if cfg.cells else None,
                       cfg.cells_csv_units, cfg.disk_um, not cfg.no_measured)
    else:
        u = tile_units_of(cfg.out, slide, cfg.mpp, not cfg.no_measured)
    path = cfg.arts[0].path(cfg.out, slide)
    write_units(path, u)
    source = "tiles"
    if cfg.units == "cells":  # which stage-06 map the cells read: the dense (cell-scale) one or the stride map
        import h5py

        from spatial.markers import virtual_source

        source = virtual_source(cfg.out, slide)
        with h5py.File(path, "a") as f:
            f.attrs["virtual_source"] = source
    log.info("%s: %d %s (%s), virtual CODEX from the %s map, measured CODEX: %s", slide, len(u), cfg.units,
             u.cell_source, source, u.measured_units)
    return {"n_units": len(u), "measured": u.measured_units, "virtual_source": source}


# ----------------------------------------------------------------------------------------------------------------
# the cohort half


def _scaled_layer(u: SlideUnits, model: SourceModel | None) -> np.ndarray | None:
    if model is None or u.measured is None:
        return None
    return model.scaling.apply(u.measured)


def slide_outputs(u: SlideUnits, models: dict[str, SourceModel], cfg: NichesConfig, thumb_he: str | None
                  ) -> tuple[dict[str, float], dict[str, float], dict[str, int]]:
    """One slide's phenotypes and niches from every source -> its h5ad / GeoJSON / PNG; returns its niche
    fractions, co-localisation z row and phenotype counts (main source)."""
    from spatial.export import write_h5ad, write_qupath_detections
    from spatial.neighbourhoods import niche_fractions

    obs = units_frame(u)
    main = cfg.source
    fr: dict[str, float] = {}
    zrow: dict[str, float] = {}
    counts: dict[str, int] = {}
    s = cfg.settings()
    for source, m in models.items():
        sp = slide_phenotypes(u, source, m.scaling, m.phenotyper, s, enrichment=source == main)
        if sp is None:
            continue
        names = np.asarray(m.phenotyper.names)
        niche = m.niches.predict(sp.composition) if len(sp.composition) else np.zeros(0, np.int16)
        col = "" if source == main else f"_{source}"
        obs[f"phenotype{col}"] = pd.Categorical(names[sp.codes], categories=list(names))
        obs[f"niche{col}"] = niche
        if source == main:
            f = niche_fractions(niche[niche >= 0], m.niches.n_niches) if (niche >= 0).any() else \
                np.zeros(m.niches.n_niches)
            fr = {f"niche_{k}": float(v) for k, v in enumerate(f)}
            zrow = coloc_row(sp.coloc_z, m.phenotyper.names)
            counts = {n: int((sp.codes == i).sum()) for i, n in enumerate(m.phenotyper.names)}
    _, slide_art, _ = cfg.arts
    main_model = models[main]
    if "h5ad" in cfg.formats:
        layers = {}
        meas = _scaled_layer(u, models.get("measured"))
        if meas is not None:
            layers["measured"] = meas
        uns = {"slide": u.slide, "units": u.units, "cell_source": u.cell_source, "mpp": u.mpp, "source": main,
               "X": "virtual CODEX, the HEX run's normalised units",
               "scaling": {src: m.scaling.to_dict()["formula"] for src, m in models.items()},
               "scale_percentiles": list(cfg.scale_percentiles),
               "k": cfg.k, "radius_um": cfg.radius_um, "n_niches": cfg.n_niches, "seed": cfg.seed}
        write_h5ad(slide_art.path(cfg.out, u.slide), obs, u.virtual, u.markers, uns=uns, layers=layers,
                   phenotype_order=main_model.phenotyper.names)
    if "geojson" in cfg.formats:
        write_qupath_detections(slide_art.dir(cfg.out) / f"{u.slide}.geojson", obs, u.virtual, u.markers, u.slide,
                                u.mpp, shape="circle" if u.units == "cells" else "point",
                                radius_um=4.0 if u.units == "cells" else 0.5 * u.mpp)
    if "png" in cfg.formats:
        from spatial.figures import niche_map

        thumb, ds = None, 1.0
        if thumb_he is not None and Path(thumb_he).is_file():
            from preprocess.slide_io import HESlide

            try:
                with HESlide(thumb_he, mpp=cfg.mpp) as sl:
                    thumb, ds = sl.thumbnail(1024)
            except PipelineError as e:
                log.warning("%s: niche map without the H&E thumbnail (%s)", u.slide, e)
        niche_map(slide_art.dir(cfg.out) / f"{u.slide}_niches.png", obs["x_px"].to_numpy(), obs["y_px"].to_numpy(),
                  obs["niche"].to_numpy(), thumbnail=thumb, downsample=ds, n_niches=cfg.n_niches,
                  title=f"{u.slide}: niches ({main} CODEX, {u.units})")
    return fr, zrow, counts


def _write_csv(df: pd.DataFrame, path: Path, index: bool = True) -> None:
    with atomic_path(path, suffix=".csv") as tmp:
        df.to_csv(tmp, index=index)


def outcome_tables(cfg: NichesConfig, niches: pd.DataFrame, coloc: pd.DataFrame, cohort_dir: Path) -> list[str]:
    """Patient features and their association with survival / response (when the clinical table has them);
    returns summary lines."""
    from pipeline import tables
    from spatial import figures, outcome

    if cfg.clinical is None:
        return ["no clinical table: no outcome association"]
    clin = tables.read_clinical_table(cfg.clinical, task=None)
    slide_case = {str(s): str(c) for s, c in zip(clin["slide_id"], clin["case_id"])}
    weights = niches["n_units"]
    feats = outcome.patient_features(niches.drop(columns=["n_units"]), coloc, slide_case, weights=weights)
    pts = outcome.patient_outcomes(clin)
    df = feats.join(pts, how="inner")
    _write_csv(df, cohort_dir / "patient_features.csv")
    features = outcome.feature_columns(df)
    folds = {}
    if cfg.splits_dir is not None:
        paths = sorted(str(p) for p in Path(cfg.splits_dir).glob("splits_*.csv"))
        if paths:
            folds = outcome.fold_cases(paths, slide_case)
    lines = []
    tests = (("survival", "survival_months", outcome.univariable_cox, "hr_per_sd", "univariable Cox, HR per SD"),
             ("response", "response", outcome.response_association, "or_per_sd", "logistic, OR per SD"))
    for kind, col, test, eff, label in tests:
        if col not in df.columns or df[col].notna().sum() < 10 or (kind == "survival" and "censorship" not in df):
            continue
        sub = df[df[col].notna()]
        tab = test(sub, features)
        _write_csv(tab, cohort_dir / f"association_{kind}.csv", index=False)
        if folds:
            _write_csv(outcome.by_fold(sub, features, folds, test), cohort_dir / f"association_{kind}_folds.csv",
                       index=False)
        figures.forest_plot(tab, cohort_dir / f"forest_{kind}.png", title=f"niches and co-localisation: {kind}")
        top = figures.top_feature(tab) if kind == "survival" else None
        if top:
            figures.km_top_feature(sub, top, cohort_dir / "km_top_niche.png", title=f"{top}: above vs below median")
        lines += [f"{kind} ({label}):"] + _top_lines(tab, eff)
    return lines


def _top_lines(tab: pd.DataFrame, eff: str, n: int = 6) -> list[str]:
    t = tab[tab["feature"].str.startswith("niche_")].sort_values("p").head(n)
    return [f"  {r.feature:<10} {eff} {getattr(r, eff):.2f} ({r.lo:.2f}-{r.hi:.2f}) p {r.p:.2g} q {r.q:.2g}"
            for r in t.itertuples()]


def cohort_analysis(cfg: NichesConfig, slides: Sequence[str]) -> list[str]:
    """The cohort half over ``slides`` (all done): models, per-slide outputs, cohort tables; returns the summary
    lines."""
    from tqdm import tqdm

    from spatial.figures import composition_heatmap
    from spatial.neighbourhoods import niche_composition

    units_art, _, cohort_art = cfg.arts
    files = [units_art.path(cfg.out, s) for s in slides]
    s = cfg.settings()
    cohort_dir = cohort_art.dir(cfg.out)
    cohort_dir.mkdir(parents=True, exist_ok=True)
    models: dict[str, SourceModel] = {}
    for source in (cfg.source, *(x for x in ("virtual", "measured") if x != cfg.source)):
        m = fit_source(files, source, s)
        if m is None:
            if source == cfg.source:
                raise PipelineError(f"no slide has {source} CODEX values; use --source virtual")
            continue
        models[source] = m
        m.niches.save(cohort_dir / f"niche_model_{source}.json")
        write_json(cohort_dir / f"scaling_{source}.json", m.scaling.to_dict())
    main = models[cfg.source]
    rows, zrows, counts = {}, {}, {}
    for slide, f in zip(slides, tqdm(files, desc="niches", unit="slide", leave=False)):
        u = read_units(f)
        fr, z, c = slide_outputs(u, models, cfg, cfg.he_resolved.get(slide))
        rows[slide] = {"n_units": len(u), **fr}
        zrows[slide], counts[slide] = z, c
    niches = pd.DataFrame.from_dict(rows, orient="index")
    niches.index.name = "slide_id"
    coloc = pd.DataFrame.from_dict(zrows, orient="index")
    coloc.index.name = "slide_id"
    _write_csv(niches, cohort_dir / "niches.csv")
    _write_csv(coloc, cohort_dir / "colocalisation.csv")
    _write_csv(pd.DataFrame.from_dict(counts, orient="index").rename_axis("slide_id"), cohort_dir / "phenotypes.csv")
    comp = niche_composition(main.niches)
    comp.columns = [f"niche_{c}" for c in comp.columns]
    _write_csv(comp, cohort_dir / "composition.csv")
    composition_heatmap(comp, cohort_dir / "composition.png", title=f"niche composition ({cfg.source} CODEX)")
    if main.phenotyper.centroids is not None:
        from spatial.phenotypes import plot_marker_heatmap

        plot_marker_heatmap(main.phenotyper.centroids, main.scaling.markers, main.phenotyper.cluster_hints,
                            cohort_dir / "cluster_markers.png")
    lines = [f"{len(slides)} slides, {int(niches['n_units'].sum())} {cfg.units}, {main.niches.n_niches} niches "
             f"({cfg.source} CODEX; sources: {', '.join(models)})"]
    top = comp.idxmax(axis=0) if len(comp) else pd.Series(dtype=str)
    lines += [f"  {k}: {100 * main.niches.fit_fraction[i]:.0f}% of the units, richest in {top.get(k, '?')}"
              for i, k in enumerate(comp.columns)]
    lines += outcome_tables(cfg, niches, coloc, cohort_dir)
    return lines


# ----------------------------------------------------------------------------------------------------------------
# the stage


def prepare(cfg: NichesConfig, ctx: Any) -> None:
    for a in cfg.arts:
        ensure_writable(a.dir(cfg.out), "output folder", "choose another --out")


def run(cfg: NichesConfig, ctx: Any) -> int:
    """Per-slide units (skip-if-done), then (without ``--shard``) the cohort analysis; one last line."""
    units_art, slide_art, cohort_art = cfg.arts
    save_config(units_art.dir(cfg.out), config_dict(cfg), name=shard_file_name(cfg.shard))
    report = run_slides(cfg.slides_resolved, functools.partial(build_units, cfg=cfg), done=units_spec(cfg),
                        overwrite=cfg.overwrite, desc=units_art.folder, workers=cfg.workers)
    extra = f"units in {units_art.dir(cfg.out)}"
    if cfg.shard or not report.ok:
        if not report.ok:
            extra += "; no cohort analysis while a slide failed"
        return report.finish("spatial.niches", extra)
    lines = cohort_analysis(cfg, cfg.slides_resolved)
    save_config(cohort_art.dir(cfg.out), config_dict(cfg))
    with atomic_path(cohort_art.dir(cfg.out) / "summary.txt") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    for line in lines:
        log.info("%s", line)
    return report.finish("spatial.niches", f"{extra}; AnnData, GeoJSON and maps in {slide_art.dir(cfg.out)}, "
                                           f"cohort tables in {cohort_art.dir(cfg.out)}")


STAGE = Stage("spatial.niches", build_parser, make_config, run=run, prepare=prepare,
              log_file=lambda cfg: cfg.arts[0].dir(cfg.out) / "run.log")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m spatial.niches``; the exit code (0, 1 a slide failed, 2 bad input, 130 Ctrl-C)."""
    return STAGE.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
