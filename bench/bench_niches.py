"""Scale of phenotypes + neighbourhoods on one synthetic slide: time and peak memory at 100k, 300k and 1M units.

    python -m bench.bench_niches                                  # 100k, 300k, 1M units, clustered, 100 perms
    python -m bench.bench_niches --sizes 100000 1000000 --layout uniform --perms 100

Each size runs in its own process (so its peak RSS, ``resource.getrusage``, is its own): a slide of N units at
~4,000 units/mm² (uniform positions, or ``clustered``: phenotype mixtures that change between ~150 µm Voronoi
regions), 12 phenotypes (the default gating table's 11 + other) and 40 markers (each unit its phenotype's
prototype + noise, normalised units). Timed: ``assign`` (gating), ``neighbour_composition`` (k nearest),
``fit_niches`` (fixed cost: at most 200k units), ``NicheModel.predict`` and ``nhood_enrichment`` (k nearest,
``--perms`` permutations). Prints one row per size and the time-per-unit ratio largest / smallest (linear ~ 1).
Not a test.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

DENSITY_PER_MM2 = 4000.0
N_MARKERS = 40


def synthetic_slide(n: int, layout: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """``(xy_um (N, 2), X (N, 40) float32, markers, true codes (N,))`` of one synthetic slide."""
    from scipy.spatial import cKDTree

    from spatial.phenotypes import default_gating

    rng = np.random.default_rng(seed)
    gating = default_gating()
    names = gating.phenotypes
    side = np.sqrt(n / DENSITY_PER_MM2) * 1000.0
    xy = rng.uniform(0, side, (n, 2))
    t = len(names)
    if layout == "clustered":
        n_reg = max(1, int((side / 150.0) ** 2))
        centres = rng.uniform(0, side, (n_reg, 2))
        mix = rng.dirichlet(np.full(t, 0.3), n_reg)  # each region: a few dominant phenotypes
        reg = cKDTree(centres).query(xy)[1]
        cum = mix.cumsum(1)[reg]
        codes = (rng.uniform(size=(n, 1)) > cum).sum(1).clip(0, t - 1)
    else:
        codes = rng.integers(0, t, n)
    markers = [f"m{i}" for i in range(N_MARKERS)]
    used = gating.markers
    markers[:len(used)] = used
    proto = np.zeros((t, N_MARKERS), np.float32)
    for r in gating.rules:
        for c in r.clauses[0]:
            if c.op.startswith(">"):
                proto[names.index(r.phenotype), markers.index(c.marker)] = 0.6
    X = np.empty((n, N_MARKERS), np.float32)
    for s in range(0, n, 200_000):
        e = min(n, s + 200_000)
        X[s:e] = proto[codes[s:e]] + rng.normal(0, 0.04, (e - s, N_MARKERS)).astype(np.float32)
    np.clip(X, 0, 1, out=X)
    return xy, X, markers, codes


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_one(n: int, layout: str, perms: int, k: int) -> dict:
    """Time each step on one slide of ``n`` units (this process)."""
    import sklearn.cluster  # noqa: F401  (imports outside the timings)

    from spatial.neighbourhoods import fit_niches, neighbour_composition, nhood_enrichment
    from spatial.phenotypes import assign, assign_codes, default_gating

    xy, X, markers, truth = synthetic_slide(n, layout)
    gating = default_gating()
    res = {"n": n, "rss_inputs_mb": _rss_mb()}
    t0 = time.perf_counter()
    names = assign(X, markers, gating)
    codes = assign_codes(X, markers, gating)
    res["assign_s"] = (time.perf_counter() - t0) / 2
    res["assign_agree"] = float((codes == truth).mean())
    t = len(gating.phenotypes)
    t0 = time.perf_counter()
    comp = neighbour_composition(xy, codes, t, k=k)
    res["composition_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = fit_niches(comp, n_niches=8, seed=0, max_fit=200_000, phenotypes=gating.phenotypes)
    res["fit_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    niche = model.predict(comp)
    res["predict_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    z, _ = nhood_enrichment(xy, codes, t, k=k, n_perms=perms, seed=0)
    res["enrichment_s"] = time.perf_counter() - t0
    res["steps_s"] = res["assign_s"] + res["composition_s"] + res["predict_s"] + res["enrichment_s"]
    res["peak_rss_mb"] = _rss_mb()
    res["niches_used"] = int(len(np.unique(niche[niche >= 0])))
    res["z_finite"] = float(np.isfinite(z).mean())
    del names
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_niches", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    p.add_argument("--layout", choices=["clustered", "uniform"], default="clustered")
    p.add_argument("--perms", type=int, default=100)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(run_one(a.one, a.layout, a.perms, a.k)))
        return 0
    rows = []
    for n in a.sizes:
        out = subprocess.run([sys.executable, "-m", "bench.bench_niches", "--one", str(n), "--layout", a.layout,
                              "--perms", str(a.perms), "--k", str(a.k)], check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{r['n']:>9,d} units  assign {r['assign_s']:6.2f} s  composition {r['composition_s']:6.2f} s  "
              f"fit {r['fit_s']:6.2f} s  predict {r['predict_s']:5.2f} s  enrichment({a.perms}) "
              f"{r['enrichment_s']:6.2f} s  | steps {r['steps_s']:6.2f} s  {1e6 * r['steps_s'] / r['n']:5.1f} µs/unit"
              f"  | peak RSS {r['peak_rss_mb']:7.0f} MB (inputs {r['rss_inputs_mb']:.0f} MB)", flush=True)
    if len(rows) > 1:
        lo, hi = rows[0], rows[-1]
        ratio = (hi["steps_s"] / hi["n"]) / (lo["steps_s"] / lo["n"])
        print(f"time per unit {hi['n']:,d} / {lo['n']:,d}: {ratio:.2f} (linear ~ 1; fit_niches excluded: fixed cost "
              f"on <= 200k units); peak RSS {hi['peak_rss_mb'] / lo['peak_rss_mb']:.1f}x for "
              f"{hi['n'] / lo['n']:.0f}x units")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
