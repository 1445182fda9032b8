"""Cell / tile phenotypes from marker profiles: a user-editable gating table, or unsupervised clusters.

    gating = default_gating()                      # spatial/gating_default.csv (the 40-marker panel)
    gating = read_gating("my_gating.csv")          # columns phenotype,rule,priority
    names = assign(X, markers, gating)             # (N,) str; "other" where no rule holds
    labels, centroids = cluster_profiles(X, k=12, seed=0)
    plot_marker_heatmap(centroids, markers, name_clusters(centroids, markers, gating), "clusters.png")

Units: ``X`` (N, M) holds markers in the pipeline's NORMALISED units (clip((raw - P_low) / (P_high - P_low), 0, 1):
~0 negative, ~1 a strong positive), the units of the virtual CODEX and of the measured CODEX labels.

Gating table (CSV, one row per rule; ``#`` at the start of a row comments it out; other columns are ignored):

    phenotype,rule,priority
    cd8_t,CD3e>0.2 & CD8>0.2,60
    macrophage,CD68>0.2 | CD163>0.2,40

``rule`` is a conjunction of conditions ``MARKER OP VALUE`` (``OP`` one of ``> >= < <=``; ``MARKER`` a panel name
as in marker_panel.csv, exact spelling) joined by ``&``; ``|`` joins conjunctions (``&`` binds tighter; no
parentheses). A unit gets the phenotype of the highest-``priority`` rule it satisfies (ties: the earlier row), else
``other``. A phenotype may have several rows. NaN marker values satisfy no condition.

The default table's thresholds were measured on the sample cohort's measured CODEX at the true cells, normalised
per marker at the cell level (P1 / P99.5 of cell means; ``bench/phenotype_truth.py``); with that normalisation it
reaches the macro-F1 given in the table's header. On coarser units (112 µm tiles, whose values are patch means)
positives are diluted and the table is a hint, not a gate: edit it, or use :func:`cluster_profiles`.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError

OTHER = "other"
"""The phenotype of a unit that satisfies no rule."""

DEFAULT_GATING = "gating_default.csv"
"""The default table's file name inside the ``spatial`` package."""

_OPS = {">": np.greater, ">=": np.greater_equal, "<": np.less, "<=": np.less_equal}
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_COND = re.compile(rf"^\s*(?P<marker>[^<>=&|]*?)\s*(?P<op>>=|<=|>|<)\s*(?P<value>{_NUMBER})\s*$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_+\-.]*$")


@dataclass(frozen=True)
class Condition:
    """``marker op value``, e.g. ``CD8 > 0.3``."""

    marker: str
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.marker}{self.op}{self.value:g}"


@dataclass(frozen=True)
class Rule:
    """One row of a gating table: ``phenotype`` when any conjunction of ``clauses`` holds."""

    phenotype: str
    clauses: tuple[tuple[Condition, ...], ...]
    priority: float
    line: int  # line of the table it came from (1 = the header)

    @property
    def text(self) -> str:
        return " | ".join(" & ".join(str(c) for c in conj) for conj in self.clauses)


@dataclass(frozen=True)
class Gating:
    """A parsed gating table: ``rules`` in file order, ``source`` the file they came from."""

    rules: tuple[Rule, ...]
    source: str = "<memory>"

    @property
    def phenotypes(self) -> list[str]:
        """The phenotypes in the order of their first row, then ``other``: the code of a phenotype is its index."""
        seen = dict.fromkeys(r.phenotype for r in self.rules)
        return [*seen, OTHER]

    @property
    def markers(self) -> list[str]:
        """The markers the rules read, in order of first use."""
        return list(dict.fromkeys(c.marker for r in self.rules for conj in r.clauses for c in conj))

    def check_markers(self, markers: Sequence[str]) -> None:
        """PipelineError naming the file and line of the first rule that reads a marker not in ``markers``."""
        known = set(markers)
        for r in self.rules:
            for conj in r.clauses:
                for c in conj:
                    if c.marker not in known:
                        near = [m for m in markers if m.lower() == c.marker.lower()]
                        hint = f" (did you mean {near[0]!r}?)" if near else " (names as in the marker panel)"
                        raise PipelineError(f"{self.source} line {r.line}: unknown marker {c.marker!r} in rule "
                                            f"{r.text!r}{hint}")


def _parse_rule(text: str, where: str) -> tuple[tuple[Condition, ...], ...]:
    if not text.strip():
        raise PipelineError(f"{where}: empty rule (write conditions such as 'CD3e>0.2 & CD8>0.2')")
    clauses = []
    for part in text.split("|"):
        conj = []
        for tok in part.split("&"):
            m = _COND.match(tok)
            if not m or not m["marker"]:
                raise PipelineError(f"{where}: bad condition {tok.strip()!r} in rule {text.strip()!r} (write MARKER "
                                    "OP VALUE with OP one of > >= < <=, joined by & or |)")
            conj.append(Condition(m["marker"], m["op"], float(m["value"])))
        clauses.append(tuple(conj))
    return tuple(clauses)


def parse_gating(rows: Sequence[dict[str, str]], source: str, lines: Sequence[int] | None = None) -> Gating:
    """A :class:`Gating` from table rows (dicts with ``phenotype``, ``rule``, ``priority``)."""
    rules = []
    for i, row in enumerate(rows):
        line = lines[i] if lines is not None else i + 2
        where = f"{source} line {line}"
        name = (row.get("phenotype") or "").strip()
        if not _NAME.match(name) or name == OTHER:
            raise PipelineError(f"{where}: bad phenotype name {name!r} (letters, digits, _ + - .; not {OTHER!r}, "
                                "which is what a unit without a rule gets)")
        try:
            prio = float((row.get("priority") or "").strip())
        except ValueError:
            raise PipelineError(f"{where}: priority {row.get('priority')!r} is not a number") from None
        rules.append(Rule(name, _parse_rule(row.get("rule") or "", where), prio, line))
    if not rules:
        raise PipelineError(f"{source}: no gating rule (columns phenotype,rule,priority; one row per rule)")
    return Gating(tuple(rules), source)


def read_gating(path: str | os.PathLike, markers: Sequence[str] | None = None) -> Gating:
    """Read a gating table CSV (see the module docstring); with ``markers``, check that every rule's markers exist.

    Raises PipelineError (one line naming the file and line) on a missing file or column, a bad token, a bad
    priority or an unknown marker.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"gating table {path} not found (columns phenotype,rule,priority; the default is "
                            f"spatial/{DEFAULT_GATING})")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rd = csv.DictReader(row for row in f if not row.lstrip().startswith("#"))
        missing = {"phenotype", "rule", "priority"} - set(rd.fieldnames or [])
        if missing:
            raise PipelineError(f"{path}: missing column(s) {sorted(missing)} (need phenotype,rule,priority)")
        rows = [r for r in rd if any((v or "").strip() for v in r.values() if isinstance(v, str))]
    # line numbers of the kept rows in the file (comments and blank lines skipped)
    with open(path, encoding="utf-8-sig") as f:
        data_lines = [i for i, ln in enumerate(f, 1) if ln.strip() and not ln.lstrip().startswith("#")][1:]
    gating = parse_gating(rows, str(path), data_lines if len(data_lines) == len(rows) else None)
    if markers is not None:
        gating.check_markers(markers)
    return gating


def default_gating(markers: Sequence[str] | None = None) -> Gating:
    """The shipped table for the 40-marker panel (``spatial/gating_default.csv``)."""
    ref = resources.files("spatial").joinpath(DEFAULT_GATING)
    with resources.as_file(ref) as p:
        return read_gating(p, markers)


def assign_codes(X: np.ndarray, markers: Sequence[str], gating: Gating, chunk: int = 262_144) -> np.ndarray:
    """Phenotype code of each unit, (N,) int16 indices into ``gating.phenotypes`` (``other`` = the last).

    X (N, M) in normalised units, columns named by ``markers``. Memory: O(chunk x rules) besides the output.
    """
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[1] != len(markers):
        raise ValueError(f"X must be (N, {len(markers)}) for {len(markers)} markers, got {X.shape}")
    gating.check_markers(markers)
    col = {m: i for i, m in enumerate(markers)}
    names = gating.phenotypes
    code_of = {p: i for i, p in enumerate(names)}
    # highest priority first; ties: the earlier row first
    order = sorted(range(len(gating.rules)), key=lambda i: (-gating.rules[i].priority, i))
    out = np.full(len(X), len(names) - 1, np.int16)
    for s in range(0, len(X), chunk):
        xb = X[s:s + chunk]
        res = out[s:s + chunk]
        free = np.ones(len(xb), bool)
        for i in order:
            r = gating.rules[i]
            hit = np.zeros(len(xb), bool)
            for conj in r.clauses:
                m = free.copy()
                for c in conj:
                    m &= _OPS[c.op](xb[:, col[c.marker]], c.value)
                hit |= m
            res[hit] = code_of[r.phenotype]
            free &= ~hit
            if not free.any():
                break
    return out


def assign(X: np.ndarray, markers: Sequence[str], gating: Gating) -> np.ndarray:
    """Phenotype name of each unit, (N,) str: the highest-priority rule that holds, else ``other``."""
    return np.asarray(gating.phenotypes)[assign_codes(X, markers, gating)]


# --------------------------------------------------------------------------------------------------------------
# unsupervised
def cluster_profiles(X: np.ndarray, k: int, seed: int = 0, method: str = "kmeans", clip: float = 5.0,
                     min_sd: float = 0.1, max_fit: int = 200_000) -> tuple[np.ndarray, np.ndarray]:
    """Cluster marker profiles: each marker standardised over the units, ``(x - mean) / max(sd, min_sd)``, and
    clipped to ±``clip``, then seeded MiniBatchKMeans (fitted on at most ``max_fit`` units drawn with ``seed``,
    applied to all). The floor ``min_sd`` (normalised units) keeps markers that are only background from being
    blown up to the weight of the informative ones.

    Returns ``labels`` (N,) int32 in [0, k), ordered by cluster size (0 the largest), and ``centroids`` (k, M)
    float32: the mean profile of each cluster in the input (normalised) units (NaN for an empty cluster).
    """
    from sklearn.cluster import MiniBatchKMeans

    if method != "kmeans":
        raise PipelineError(f"unknown clustering method {method!r} (only 'kmeans')")
    X = np.asarray(X, np.float32)
    if len(X) < k:
        raise PipelineError(f"{len(X)} units cannot make {k} clusters (lower k)")
    mu = np.nanmean(X, 0)
    sd = np.nanstd(X, 0)
    sd = np.where(sd > min_sd, sd, min_sd)

    def z(a: np.ndarray) -> np.ndarray:
        return np.clip(np.nan_to_num((a - mu) / sd), -clip, clip)

    rng = np.random.default_rng(seed)
    fit_idx = rng.choice(len(X), max_fit, replace=False) if len(X) > max_fit else slice(None)
    km = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3, batch_size=4096)
    km.fit(z(X[fit_idx]))
    raw = np.concatenate([km.predict(z(X[s:s + 262_144])) for s in range(0, len(X), 262_144)])
    size = np.bincount(raw, minlength=k)
    rank = np.empty(k, np.int32)
    rank[np.argsort(-size, kind="stable")] = np.arange(k)
    labels = rank[raw]
    sums = np.zeros((k, X.shape[1]), np.float64)
    np.add.at(sums, labels, np.nan_to_num(X))
    n = np.bincount(labels, minlength=k)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        centroids = (sums / n).astype(np.float32)
    return labels, centroids


def name_clusters(centroids: np.ndarray, markers: Sequence[str], gating: Gating) -> list[str]:
    """The phenotype the gating table gives each cluster's mean profile (k,): a hint for naming clusters."""
    return list(assign(np.asarray(centroids, np.float32), markers, gating))


def plot_marker_heatmap(centroids: np.ndarray, markers: Sequence[str], names: Sequence[str],
                        path: str | os.PathLike) -> Path:
    """Markers x clusters heatmap of the cluster means, z-scored per marker across clusters (PNG, atomic).

    Columns are labelled ``{index}: {name}``; a marker constant over the clusters is drawn as 0.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.io import atomic_path

    c = np.asarray(centroids, np.float64).T  # (M, k)
    mu, sd = np.nanmean(c, 1, keepdims=True), np.nanstd(c, 1, keepdims=True)
    zc = np.where(sd > 0, (c - mu) / np.where(sd > 0, sd, 1.0), 0.0)
    m, k = zc.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * k, 1.0 + 0.22 * m))
    im = ax.imshow(zc, aspect="auto", cmap="RdBu_r", vmin=-3, vmax=3, interpolation="nearest")
    ax.set_yticks(range(m), list(markers), fontsize=7)
    ax.set_xticks(range(k), [f"{i}: {n}" for i, n in enumerate(names)], rotation=60, ha="right", fontsize=7)
    ax.set_xlabel("cluster")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="z-score across clusters")
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)
    return path
