"""Cellular neighbourhoods (niches) and phenotype co-localisation from unit positions and phenotype codes.

    comp = neighbour_composition(xy_um, codes, n_types, k=10)            # (N, T) fractions per unit
    model = fit_niches([comp_slide1, comp_slide2, ...], n_niches=8, seed=0, phenotypes=gating.phenotypes)
    niche = model.predict(comp)                                         # (N,) int16, -1 without neighbours
    niche_fractions(niche, model.n_niches)                              # (K,) per slide
    niche_composition(model)                                            # phenotypes x niches DataFrame
    z, count = nhood_enrichment(xy_um, codes, n_types, k=10, n_perms=1000, seed=0)
    model.save("niches.json"); NicheModel.load("niches.json")

Units: positions in µm (N, 2); ``codes`` (N,) int phenotype codes in [0, T) (``spatial.phenotypes.assign_codes``).

Neighbourhoods follow Schürch et al. (Cell 2020): each unit's window is its ``k`` nearest neighbours (or every unit
within ``radius_um``), its feature the phenotype fractions of that window, and one k-means model over the whole
cohort turns windows into niches. Co-localisation follows squidpy's ``gr.nhood_enrichment``: on the neighbour graph
(unit -> its k nearest other units, as squidpy's generic kNN graph; or all pairs within a radius), ``count[a, b]``
is the number of edges from a unit of type a to a unit of type b, and ``z = (count - mean_perm) / sd_perm`` over
``n_perms`` random permutations of the labels over the units (NaN where sd_perm = 0). With ``symmetric=True`` the kNN
graph is made undirected (an edge where either unit is among the other's k nearest), so ``z`` is symmetric.
Memory is O(N x T) for compositions and O(N x k) for the graph; the work is linear in N.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
"""Version of the saved niche model's JSON layout."""


def _check_inputs(xy_um: np.ndarray, codes: np.ndarray, n_types: int) -> tuple[np.ndarray, np.ndarray]:
    xy = np.asarray(xy_um, np.float64)
    c = np.asarray(codes)
    if xy.ndim != 2 or xy.shape[1] != 2 or len(c) != len(xy):
        raise ValueError(f"xy_um must be (N, 2) and codes (N,), got {xy.shape} and {c.shape}")
    if len(c) and (c.min() < 0 or c.max() >= n_types):
        raise ValueError(f"codes must lie in [0, {n_types}), got [{c.min()}, {c.max()}]")
    return xy, c.astype(np.intp, copy=False)


def neighbour_composition(xy_um: np.ndarray, codes: np.ndarray, n_types: int, k: int = 10,
                          radius_um: float | None = None, include_self: bool = False,
                          chunk: int = 131_072) -> np.ndarray:
    """Phenotype composition of each unit's neighbourhood, (N, T) float32 fractions.

    The window is the ``k`` nearest other units (``radius_um`` None) or every other unit within ``radius_um`` µm
    (then ``k`` is unused); ``include_self`` counts the unit itself too. Rows sum to 1; a unit with no neighbour
    (radius mode, or a slide of one unit) gets a row of zeros, and their count is logged. Memory: the output, a
    sorted copy of the positions (O(N)) and O(chunk x max(k, T)).
    """
    xy, c = _check_inputs(xy_um, codes, n_types)
    n = len(xy)
    out = np.zeros((n, n_types), np.float32)
    if n == 0:
        return out
    order = spatial_order(xy)  # queries in a spatial order: cache-friendly; rows are written back in input order
    xy, c = xy[order], c[order]
    if radius_um is None:
        if k < 1:
            raise ValueError("k must be >= 1")
        tree = cKDTree(xy)
        kq = min(k + (0 if include_self else 1), n)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            _, idx = tree.query(xy[s:e], k=kq)
            idx = idx.reshape(e - s, kq)
            if not include_self:
                own = np.arange(s, e)[:, None]
                # put the unit itself last (duplicates of a position may be returned before it), keep k others
                idx = np.take_along_axis(idx, np.argsort(idx == own, axis=1, kind="stable"), 1)[:, :min(k, kq)]
                valid = idx != own
            else:
                valid = np.ones(idx.shape, bool)
            rows = np.broadcast_to(np.arange(e - s)[:, None], idx.shape)
            cnt = np.bincount(rows[valid] * n_types + c[idx[valid]], minlength=(e - s) * n_types)
            out[order[s:e]] = cnt.reshape(e - s, n_types)
    else:
        if radius_um <= 0:
            raise ValueError("radius_um must be > 0")
        for t in range(n_types):
            pts = xy[c == t]
            if not len(pts):
                continue
            tree = cKDTree(pts)
            for s in range(0, n, chunk):
                out[order[s:s + chunk], t] = tree.query_ball_point(xy[s:s + chunk], r=radius_um, return_length=True)
        if not include_self:
            out[order, c] -= 1.0
    tot = out.sum(1, keepdims=True)
    empty = int((tot[:, 0] == 0).sum())
    if empty:
        log.info("%d of %d units have no neighbour within the window (composition left at zeros)", empty, n)
    np.divide(out, tot, out=out, where=tot > 0)
    return out


# --------------------------------------------------------------------------------------------------------------
# niches
@dataclass
class NicheModel:
    """One k-means model of neighbourhood compositions for a whole cohort.

    ``centers`` (K, T) the cluster centres used by :meth:`predict`; ``composition`` (K, T) the mean composition of
    the fit units of each niche; ``fit_fraction`` (K,) the share of fit units per niche (niche 0 the largest);
    ``phenotypes`` the T column names; ``settings`` what made it (seed, n_fit, window, ...).
    """

    centers: np.ndarray
    composition: np.ndarray
    fit_fraction: np.ndarray
    phenotypes: list[str]
    settings: dict = field(default_factory=dict)

    @property
    def n_niches(self) -> int:
        return int(self.centers.shape[0])

    def predict(self, comp: np.ndarray, chunk: int = 262_144) -> np.ndarray:
        """Niche of each composition row (N, T) -> (N,) int16: the nearest centre; -1 for an all-zero row."""
        comp = np.asarray(comp, np.float32)
        if comp.ndim != 2 or comp.shape[1] != self.centers.shape[1]:
            raise ValueError(f"compositions must be (N, {self.centers.shape[1]}), got {comp.shape}")
        cen = self.centers.astype(np.float32)
        c2 = (cen ** 2).sum(1)
        out = np.empty(len(comp), np.int16)
        for s in range(0, len(comp), chunk):
            b = comp[s:s + chunk]
            d = c2[None, :] - 2.0 * (b @ cen.T)  # ||b||² is the same for every centre
            lab = d.argmin(1).astype(np.int16)
            lab[~(b.sum(1) > 0)] = -1
            out[s:s + chunk] = lab
        return out

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "kind": "niche_kmeans", "phenotypes": list(self.phenotypes),
                "centers": self.centers.tolist(), "composition": self.composition.tolist(),
                "fit_fraction": self.fit_fraction.tolist(), "settings": self.settings}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model as JSON (atomic; no pickle)."""
        from pipeline.io import write_json

        write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> NicheModel:
        """Read a model written by :meth:`save`; PipelineError naming the file when it is not one."""
        import json

        path = Path(path)
        try:
            d = json.loads(path.read_text())
            if d.get("kind") != "niche_kmeans" or d.get("schema_version") != SCHEMA_VERSION:
                raise ValueError("not a niche model of this version")
            centers = np.asarray(d["centers"], np.float32)
            model = cls(centers=centers, composition=np.asarray(d["composition"], np.float32),
                        fit_fraction=np.asarray(d["fit_fraction"], np.float64), phenotypes=list(d["phenotypes"]),
                        settings=dict(d.get("settings", {})))
            if centers.ndim != 2 or centers.shape[1] != len(model.phenotypes):
                raise ValueError("centers do not match the phenotypes")
        except FileNotFoundError:
            raise PipelineError(f"niche model {path} not found (fit one first)") from None
        except (ValueError, KeyError, TypeError) as e:
            raise PipelineError(f"{path}: not a readable niche model ({e}); refit it") from None
        return model


def fit_niches(compositions: np.ndarray | Sequence[np.ndarray], n_niches: int = 8, seed: int = 0,
               max_fit: int = 200_000, phenotypes: Sequence[str] | None = None, **settings) -> NicheModel:
    """Fit one seeded MiniBatchKMeans on neighbourhood compositions pooled over the cohort.

    ``compositions``: one (N, T) array or a list of per-slide (N_i, T) arrays (not stacked here: at most
    ``max_fit`` rows, drawn uniformly over all slides' units with ``seed``, are gathered). Rows of zeros (no
    neighbour) are left out. Niches are numbered by their share of the fit units (0 the largest). Extra keyword
    ``settings`` (e.g. ``k=10``) are stored in the model.
    """
    from sklearn.cluster import MiniBatchKMeans

    parts = [compositions] if isinstance(compositions, np.ndarray) else list(compositions)
    if not parts:
        raise PipelineError("no neighbourhood compositions to fit niches on")
    t = parts[0].shape[1]
    if any(p.ndim != 2 or p.shape[1] != t for p in parts):
        raise ValueError("every composition array must be (N_i, T) with the same T")
    names = list(phenotypes) if phenotypes is not None else [f"type_{i}" for i in range(t)]
    if len(names) != t:
        raise ValueError(f"{len(names)} phenotype names for {t} composition columns")
    ok = [np.flatnonzero(np.asarray(p).sum(1) > 0) for p in parts]
    sizes = np.array([len(o) for o in ok])
    total = int(sizes.sum())
    if total < n_niches:
        raise PipelineError(f"{total} units with neighbours cannot make {n_niches} niches (lower --n-niches)")
    rng = np.random.default_rng(seed)
    take = np.sort(rng.choice(total, max_fit, replace=False)) if total > max_fit else np.arange(total)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    which = np.searchsorted(bounds, take, side="right") - 1
    fit = np.concatenate([np.asarray(parts[i], np.float32)[ok[i][take[which == i] - bounds[i]]]
                          for i in range(len(parts)) if (which == i).any()])
    km = MiniBatchKMeans(n_clusters=n_niches, random_state=seed, n_init=3, batch_size=4096)
    km.fit(fit)
    raw = km.predict(fit)
    size = np.bincount(raw, minlength=n_niches)
    order = np.argsort(-size, kind="stable")
    rank = np.empty(n_niches, np.intp)
    rank[order] = np.arange(n_niches)
    lab = rank[raw]
    centers = km.cluster_centers_[order].astype(np.float32)
    comp = np.zeros((n_niches, t), np.float64)
    np.add.at(comp, lab, fit)
    cnt = np.bincount(lab, minlength=n_niches)
    comp = np.where(cnt[:, None] > 0, comp / np.maximum(cnt, 1)[:, None], centers)
    return NicheModel(centers=centers, composition=comp.astype(np.float32), fit_fraction=cnt / cnt.sum(),
                      phenotypes=names, settings={"n_niches": n_niches, "seed": seed, "max_fit": max_fit,
                                                  "n_fit": int(len(fit)), "n_units": total, **settings})


def niche_fractions(niche: np.ndarray, n_niches: int) -> np.ndarray:
    """Share of the units in each niche, (K,) float64 (units with niche -1 left out; zeros if none is left)."""
    n = np.asarray(niche)
    n = n[n >= 0]
    cnt = np.bincount(n, minlength=n_niches)[:n_niches].astype(np.float64)
    return cnt / cnt.sum() if cnt.sum() else cnt


def niche_composition(model: NicheModel) -> pd.DataFrame:
    """Mean phenotype composition of each niche: phenotypes x niches DataFrame (columns 0..K-1, name ``niche``)."""
    df = pd.DataFrame(model.composition.T, index=pd.Index(model.phenotypes, name="phenotype"),
                      columns=pd.RangeIndex(model.n_niches, name="niche"))
    return df


# --------------------------------------------------------------------------------------------------------------
# co-localisation
def spatial_order(xy_um: np.ndarray) -> np.ndarray:
    """A permutation (N,) that puts nearby units next to each other in memory (Z-order of a 2^16 grid), so that
    neighbour look-ups touch nearby memory: results do not depend on it, speed does (several-fold at 1M units)."""
    xy = np.asarray(xy_um, np.float64)
    if len(xy) < 2:
        return np.arange(len(xy))
    lo, span = xy.min(0), np.ptp(xy, 0).max() or 1.0
    q = ((xy - lo) / span * 65535).astype(np.uint64)

    def spread(v: np.ndarray) -> np.ndarray:  # bits b -> 2b
        v = (v | (v << np.uint64(8))) & np.uint64(0x00FF00FF)
        v = (v | (v << np.uint64(4))) & np.uint64(0x0F0F0F0F)
        v = (v | (v << np.uint64(2))) & np.uint64(0x33333333)
        return (v | (v << np.uint64(1))) & np.uint64(0x55555555)

    return np.argsort(spread(q[:, 0]) | (spread(q[:, 1]) << np.uint64(1)), kind="stable")


def neighbour_edges(xy_um: np.ndarray, k: int = 10, radius_um: float | None = None, symmetric: bool = False,
                    chunk: int = 262_144) -> tuple[np.ndarray, np.ndarray]:
    """Edges of the neighbour graph, ``(src, dst)`` int32 arrays sorted by ``src`` (no self edges).

    kNN (``radius_um`` None): each unit -> its ``k`` nearest other units (directed, as squidpy's generic kNN graph);
    ``symmetric`` adds the reverse edges (each undirected pair once per direction). Radius: every ordered pair
    within ``radius_um`` µm (symmetric by construction).
    """
    xy = np.asarray(xy_um, np.float64)
    n = len(xy)
    if n < 2:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    tree = cKDTree(xy)
    if radius_um is not None:
        pairs = tree.query_pairs(radius_um, output_type="ndarray").astype(np.int32)
        src = np.concatenate([pairs[:, 0], pairs[:, 1]])
        dst = np.concatenate([pairs[:, 1], pairs[:, 0]])
        del pairs
        order = np.argsort(src, kind="stable")
        return src[order], dst[order]
    kq = min(k + 1, n)
    kk = kq - 1
    src = np.empty(n * kk, np.int32)
    dst = np.empty(n * kk, np.int32)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        _, idx = tree.query(xy[s:e], k=kq)
        own = np.arange(s, e)[:, None]
        order = np.argsort(idx == own, axis=1, kind="stable")
        idx = np.take_along_axis(idx, order, 1)[:, :kk]
        src[s * kk:e * kk] = np.repeat(np.arange(s, e, dtype=np.int32), kk)
        dst[s * kk:e * kk] = idx.ravel()
    if symmetric:
        key = np.concatenate([src.astype(np.int64) * n + dst, dst.astype(np.int64) * n + src])
        key = np.unique(key)
        src, dst = (key // n).astype(np.int32), (key % n).astype(np.int32)
    return src, dst


def nhood_enrichment(xy_um: np.ndarray, codes: np.ndarray, n_types: int, k: int = 10, radius_um: float | None = None,
                     n_perms: int = 1000, seed: int = 0, symmetric: bool = False,
                     batch_elems: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """Neighbourhood enrichment of phenotype pairs against label permutations (squidpy's definition).

    Returns ``z`` (T, T) float64, ``(count - mean_perm) / sd_perm`` (NaN where sd_perm = 0, e.g. a type absent), and
    ``count`` (T, T) int64, the edges from type-a units to type-b units on the neighbour graph
    (:func:`neighbour_edges`). Permutations shuffle the codes over the units with ``seed``; several are counted in
    one ``np.bincount`` when the graph is small (``batch_elems`` edge entries per batch). Work O(n_perms x edges).
    """
    xy, c = _check_inputs(xy_um, codes, n_types)
    if n_perms < 2:
        raise ValueError("n_perms must be >= 2")
    order = spatial_order(xy)  # counts do not depend on the order of the units; memory locality does
    xy, c = xy[order], c[order]
    src, dst = neighbour_edges(xy, k, radius_um, symmetric)
    deg = np.bincount(src, minlength=len(c))  # src is sorted: lab[src] == np.repeat(lab, deg)
    del src
    tt = n_types * n_types
    small = np.int16 if n_types <= 181 else np.int32  # codes * T + code fits

    def counts(lab: np.ndarray) -> np.ndarray:  # lab (B, N) -> (B, T, T)
        b = lab.shape[0]
        pair = np.repeat((lab * n_types).astype(np.intp), deg, axis=1)
        pair += lab[:, dst]
        pair += (np.arange(b, dtype=np.intp) * tt)[:, None]
        return np.bincount(pair.ravel(), minlength=b * tt).reshape(b, n_types, n_types)

    c_small = c.astype(small)
    count = counts(c_small[None])[0].astype(np.int64)
    rng = np.random.default_rng(seed)
    per = max(1, min(n_perms, batch_elems // max(1, len(dst))))
    perms = np.empty((n_perms, n_types, n_types), np.float64)  # n_perms x T² numbers: small
    for s in range(0, n_perms, per):
        b = min(per, n_perms - s)
        perms[s:s + b] = counts(rng.permuted(np.broadcast_to(c_small, (b, len(c_small))), axis=1))
    mean, sd = perms.mean(0), perms.std(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(sd > 0, (count - mean) / np.where(sd > 0, sd, 1.0), np.nan)
    return z, count
