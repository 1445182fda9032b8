"""The cohort half of stage 10: scaling, phenotypes, neighbourhoods, niches, co-localisation and per-slide outputs.

Memory stays bounded by the largest slide: every pass reads one slide's units file at a time, and what is pooled
over the cohort is a seeded subsample (at most ``sample_per_slide`` units of each slide for the marker scaling and
the phenotype clusters, ``max_fit`` compositions for the niche model).

Marker scaling (``--scale``, stated in the outputs): ``auto`` (default) rescales the raw measured CODEX of cells to
the cohort's ``[P1, P99.5]`` of the cells' disk means per marker (the labels' percentiles come from 112 µm patch
means, far dimmer than a positive cell), and leaves values already in the pipeline's normalised units as they are
(the virtual CODEX; the stage-03 labels of tiles), clipped to [0, 1]. Rescaling the virtual CODEX per marker would
stretch the markers H&E cannot predict (their spread is noise) over the whole range; ``--scale cohort`` does it
anyway, ``none`` never.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError
from spatial.units import SlideUnits, read_units

log = logging.getLogger(__name__)

SOURCES = ("virtual", "measured")


@dataclass(frozen=True, kw_only=True)
class NicheSettings:
    """What changes the cohort analysis (one field per flag of ``python -m spatial.niches``)."""

    source: str = "virtual"
    phenotype_method: str = "gating"
    gating: str | None = None
    n_clusters: int = 12
    k: int = 5
    radius_um: float | None = None
    exclude_self: bool = False
    n_niches: int = 8
    n_perms: int = 200
    seed: int = 0
    scale: str = "auto"
    scale_percentiles: tuple[float, float] = (1.0, 99.5)
    sample_per_slide: int = 20_000
    max_fit: int = 200_000


# ----------------------------------------------------------------------------------------------------------------
# scaling


@dataclass
class Scaling:
    """Per-marker ``lo``, ``hi`` (M,) of one source over the cohort; ``apply`` -> [0, 1]."""

    markers: list[str]
    lo: np.ndarray
    hi: np.ndarray
    percentiles: tuple[float, float]

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(N, M) -> (N, M) float32 in [0, 1], NaN kept: stage 03's normalisation formula with these lo, hi."""
        from spatial.markers import normalise_measured

        return normalise_measured(np.asarray(x, np.float64), {"values": [self.lo, self.hi]})

    def to_dict(self) -> dict:
        identity = not np.isfinite(self.percentiles[0])
        return {"markers": self.markers, "percentiles": None if identity else list(self.percentiles),
                "lo": self.lo.tolist(), "hi": self.hi.tolist(),
                "formula": "clip(x, 0, 1): the values' own normalised units" if identity else
                "clip((x - lo) / (hi - lo), 0, 1) per marker; 0 where hi <= lo"}


def source_values(u: SlideUnits, source: str) -> np.ndarray | None:
    """(N, M) values of ``source`` of a slide's units, or None when the slide has none of it."""
    if source == "virtual":
        return u.virtual
    return u.measured


def _sample_rows(n: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(n, cap, replace=False)) if n > cap else np.arange(n)


def fit_scaling(files: Sequence[Path], source: str, percentiles: tuple[float, float] = (1.0, 99.5),
                sample_per_slide: int = 20_000, seed: int = 0, scale: str = "auto"
                ) -> tuple[Scaling | None, np.ndarray | None]:
    """The cohort scaling of ``source`` (``scale``: see the module docstring) from a seeded subsample of every
    slide's units, and that subsample scaled (K, M) (for clustering), or (None, None) when no slide has the
    source."""
    rng = np.random.default_rng(seed)
    parts, markers, raw = [], None, False
    for f in files:
        u = read_units(f)
        x = source_values(u, source)
        if x is None or not len(x):
            continue
        raw = raw or (source == "measured" and u.measured_units == "raw")
        markers = markers or u.markers
        if u.markers != markers:
            raise PipelineError(f"{f} has other markers than the first slide's; rerun stage 10 with one HEX run")
        parts.append(x[_sample_rows(len(x), sample_per_slide, rng)])
    if not parts:
        return None, None
    pool = np.concatenate(parts).astype(np.float64)
    if scale == "none" or (scale == "auto" and not raw):
        m = len(markers)
        sc = Scaling(markers=list(markers), lo=np.zeros(m), hi=np.ones(m), percentiles=(float("nan"), float("nan")))
        return sc, sc.apply(pool)
    lo = np.nanpercentile(pool, percentiles[0], axis=0)
    hi = np.nanpercentile(pool, percentiles[1], axis=0)
    sc = Scaling(markers=list(markers), lo=np.nan_to_num(lo), hi=np.nan_to_num(hi), percentiles=tuple(percentiles))
    return sc, sc.apply(pool)


# ----------------------------------------------------------------------------------------------------------------
# phenotypes


@dataclass
class Phenotyper:
    """Gating table or marker clusters -> a phenotype code per unit (``names[code]``)."""

    names: list[str]
    gating: object | None = None
    centroids: np.ndarray | None = None  # (k, M) cluster means, scaled units
    mu: np.ndarray | None = None
    sd: np.ndarray | None = None
    cluster_hints: list[str] = field(default_factory=list)

    def codes(self, x_scaled: np.ndarray, markers: list[str]) -> np.ndarray:
        from spatial.phenotypes import assign_codes

        if self.gating is not None:
            return assign_codes(x_scaled, markers, self.gating).astype(np.int16)
        z = np.clip(np.nan_to_num((x_scaled - self.mu) / self.sd), -5, 5)
        zc = np.clip(np.nan_to_num((self.centroids - self.mu) / self.sd), -5, 5)
        d = (zc ** 2).sum(1)[None, :] - 2.0 * z @ zc.T
        return d.argmin(1).astype(np.int16)


def make_phenotyper(s: NicheSettings, markers: list[str], sample_scaled: np.ndarray | None) -> Phenotyper:
    """The gating table (``s.gating`` or the default) checked against ``markers``, or clusters fitted on the
    cohort's scaled subsample."""
    from spatial.phenotypes import cluster_profiles, default_gating, name_clusters, read_gating

    gating = read_gating(s.gating, markers) if s.gating else default_gating(markers)
    if s.phenotype_method == "gating":
        return Phenotyper(names=list(gating.phenotypes), gating=gating)
    if sample_scaled is None:
        raise PipelineError("no units to cluster")
    labels, cen = cluster_profiles(sample_scaled, s.n_clusters, seed=s.seed)
    mu = np.nanmean(sample_scaled, 0)
    sd = np.maximum(np.nanstd(sample_scaled, 0), 0.1)
    hints = name_clusters(np.nan_to_num(cen), markers, gating)
    names = [f"c{i}_{h}" for i, h in enumerate(hints)]
    return Phenotyper(names=names, centroids=np.nan_to_num(cen), mu=mu, sd=sd, cluster_hints=hints)


# ----------------------------------------------------------------------------------------------------------------
# one slide


@dataclass
class SlidePhenotypes:
    """Codes (N,) int16, neighbour compositions (N, T) float32, co-localisation z (T, T) of one slide and source."""

    codes: np.ndarray
    composition: np.ndarray
    coloc_z: np.ndarray


def slide_phenotypes(u: SlideUnits, source: str, scaling: Scaling, ph: Phenotyper, s: NicheSettings,
                     enrichment: bool = True) -> SlidePhenotypes | None:
    """Phenotypes, compositions and (``enrichment``) co-localisation of one slide from one source (None: the slide
    has no such values; the z matrix is NaN without ``enrichment``)."""
    from spatial.neighbourhoods import neighbour_composition, nhood_enrichment

    x = source_values(u, source)
    if x is None:
        return None
    t = len(ph.names)
    codes = ph.codes(scaling.apply(x), u.markers)
    if len(codes) < 2:
        return SlidePhenotypes(codes, np.zeros((len(codes), t), np.float32), np.full((t, t), np.nan))
    k = min(s.k, len(codes) - 1)
    comp = neighbour_composition(u.xy_um, codes, t, k=k, radius_um=s.radius_um, include_self=not s.exclude_self)
    if not enrichment:
        return SlidePhenotypes(codes, comp, np.full((t, t), np.nan))
    z, _ = nhood_enrichment(u.xy_um, codes, t, k=k, radius_um=s.radius_um, n_perms=s.n_perms, seed=s.seed,
                            symmetric=True)
    return SlidePhenotypes(codes, comp, z)


def coloc_row(z: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """The upper triangle (a <= b) of a (T, T) z matrix as ``coloc_{a}__{b}`` columns."""
    out = {}
    for i, a in enumerate(names):
        for j in range(i, len(names)):
            out[f"coloc_{a}__{names[j]}"] = float(z[i, j])
    return out


# ----------------------------------------------------------------------------------------------------------------
# the scaling, phenotypes and niches of one source over the cohort


@dataclass
class SourceModel:
    """Everything fitted on the cohort for one source: scaling, phenotyper, niche model."""

    source: str
    scaling: Scaling
    phenotyper: Phenotyper
    niches: object  # spatial.neighbourhoods.NicheModel


def fit_source(files: Sequence[Path], source: str, s: NicheSettings) -> SourceModel | None:
    """Fit the scaling, the phenotyper and the niche model of ``source`` (None: no slide has it). Compositions are
    computed slide by slide; at most ``max_fit`` of them (spread over the slides) are kept for the k-means."""
    from spatial.neighbourhoods import fit_niches

    scaling, sample = fit_scaling(files, source, s.scale_percentiles, s.sample_per_slide, s.seed, s.scale)
    if scaling is None:
        return None
    ph = make_phenotyper(s, scaling.markers, sample)
    per_slide = max(1, s.max_fit // max(1, len(files)))
    rng = np.random.default_rng(s.seed + 1)
    parts = []
    for f in files:
        u = read_units(f)
        sp = slide_phenotypes(u, source, scaling, ph, s, enrichment=False)
        if sp is not None and len(sp.composition):
            parts.append(sp.composition[_sample_rows(len(sp.composition), per_slide, rng)])
    if not parts:
        return None
    model = fit_niches(parts, n_niches=s.n_niches, seed=s.seed, max_fit=s.max_fit, phenotypes=ph.names, k=s.k,
                       radius_um=s.radius_um, source=source)
    return SourceModel(source, scaling, ph, model)


def units_frame(u: SlideUnits) -> pd.DataFrame:
    """obs of a slide's units: x_um, y_um, x_px, y_px, area_um2."""
    return pd.DataFrame({"x_um": u.xy_um[:, 0], "y_um": u.xy_um[:, 1], "x_px": u.xy_px[:, 0], "y_px": u.xy_px[:, 1],
                         "area_um2": u.area_um2})

