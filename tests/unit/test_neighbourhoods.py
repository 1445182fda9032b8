"""Neighbourhood compositions, niches and neighbourhood enrichment (spatial/neighbourhoods.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from pipeline.errors import PipelineError
from spatial.neighbourhoods import (
    NicheModel,
    fit_niches,
    neighbour_composition,
    neighbour_edges,
    nhood_enrichment,
    niche_composition,
    niche_fractions,
)


def _brute_comp(xy, codes, t, k=None, r=None, include_self=False):
    d = np.linalg.norm(xy[:, None] - xy[None], axis=2)
    if not include_self:
        np.fill_diagonal(d, np.inf)
    out = np.zeros((len(xy), t))
    for i in range(len(xy)):
        nb = np.argsort(d[i], kind="stable")[:k] if r is None else np.flatnonzero(d[i] <= r)
        out[i] = np.bincount(codes[nb], minlength=t)
    s = out.sum(1, keepdims=True)
    return np.divide(out, s, out=np.zeros_like(out), where=s > 0)


def test_composition_matches_brute_force_and_chunks():
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 100, (300, 2))
    codes = rng.integers(0, 4, 300)
    for kw in ({"k": 5}, {"k": 5, "include_self": True}, {"radius_um": 9.0}, {"radius_um": 9.0, "include_self": True}):
        got = neighbour_composition(xy, codes, 4, chunk=37, **kw)
        ref = _brute_comp(xy, codes, 4, k=kw.get("k"), r=kw.get("radius_um"), include_self=kw.get("include_self"))
        np.testing.assert_allclose(got, ref, atol=1e-6)
        assert got.dtype == np.float32 and got.shape == (300, 4)


def test_composition_hand_case_and_empty_rows():
    xy = np.array([[0.0, 0], [1, 0], [3, 0], [100, 0]])
    codes = np.array([0, 1, 1, 2])
    comp = neighbour_composition(xy, codes, 3, k=2)
    np.testing.assert_allclose(comp[0], [0, 1, 0])          # neighbours 1 (type 1) and 3 (type 1)
    np.testing.assert_allclose(comp[1], [0.5, 0.5, 0])
    comp = neighbour_composition(xy, codes, 3, radius_um=2.5)
    np.testing.assert_allclose(comp.sum(1), [1, 1, 1, 0])   # the far unit has no neighbour: zeros
    np.testing.assert_allclose(comp[2], [0, 1, 0])
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 3\)"):
        neighbour_composition(xy, codes + 1, 3)


def _two_regions(n=2000, seed=0):
    """Left half: types 0/1 mixed; right half: types 2/3 mixed."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 400, (n, 2))
    right = xy[:, 0] > 200
    codes = rng.integers(0, 2, n) + 2 * right
    return xy, codes, right


def test_niches_recover_regions_and_round_trip(tmp_path):
    xy, codes, right = _two_regions()
    comp = neighbour_composition(xy, codes, 4, k=10)
    model = fit_niches([comp[:700], comp[700:]], n_niches=2, seed=0, max_fit=1500, phenotypes=list("abcd"), k=10)
    niche = model.predict(comp)
    inner = np.abs(xy[:, 0] - 200) > 15  # away from the border
    assert adjusted_rand_score(right[inner], niche[inner]) > 0.95
    assert model.settings["n_fit"] == 1500 and model.settings["k"] == 10
    assert model.fit_fraction[0] >= model.fit_fraction[1]
    df = niche_composition(model)
    assert df.shape == (4, 2) and list(df.index) == list("abcd")
    np.testing.assert_allclose(df.sum(0), 1, atol=1e-5)
    fr = niche_fractions(np.r_[niche, -1], 2)
    assert fr.sum() == pytest.approx(1) and fr.min() > 0.3
    # same seed, same model; stacked input == list input when everything is fitted
    a = fit_niches(comp, n_niches=2, seed=4)
    b = fit_niches([comp[:1000], comp[1000:]], n_niches=2, seed=4)
    np.testing.assert_allclose(a.centers, b.centers)
    # zero rows get -1; JSON round trip predicts the same
    comp0 = np.vstack([comp[:5], np.zeros((1, 4), np.float32)])
    assert model.predict(comp0)[-1] == -1
    p = model.save(tmp_path / "niches.json")
    again = NicheModel.load(p)
    assert (again.predict(comp) == niche).all() and again.phenotypes == list("abcd")
    (tmp_path / "bad.json").write_text('{"kind": "something else"}')
    with pytest.raises(PipelineError, match="bad.json: not a readable niche model"):
        NicheModel.load(tmp_path / "bad.json")


def test_enrichment_clustered_vs_separated():
    xy, codes, _ = _two_regions(1500, seed=1)
    z, count = nhood_enrichment(xy, codes, 4, k=6, n_perms=200, seed=0)
    assert count.sum() == 1500 * 6
    assert z[0, 1] > 5 and z[2, 3] > 5          # mixed in the same region: co-localised
    assert z[0, 2] < -5 and z[1, 3] < -5        # in different regions: avoid each other
    for kw in ({"radius_um": 25.0}, {"k": 6, "symmetric": True}):
        z, count = nhood_enrichment(xy, codes, 4, n_perms=100, seed=0, **kw)
        assert (count == count.T).all()
        np.testing.assert_allclose(z, z.T, atol=1e-9)
    z1, _ = nhood_enrichment(xy, codes, 4, k=6, n_perms=50, seed=7)
    z2, _ = nhood_enrichment(xy, codes, 4, k=6, n_perms=50, seed=7)
    np.testing.assert_array_equal(z1, z2)


def test_enrichment_hand_case_matches_exact_permutation_distribution():
    # points on a line at 0, 1, 3, 6; nearest neighbour (k=1, squidpy's directed kNN graph): 0->1, 1->0, 3->1, 6->3
    xy = np.array([[0.0, 0], [1, 0], [3, 0], [6, 0]])
    codes = np.array([0, 0, 1, 1])
    src, dst = neighbour_edges(xy, k=1)
    assert sorted(zip(src.tolist(), dst.tolist())) == [(0, 1), (1, 0), (2, 1), (3, 2)]
    z, count = nhood_enrichment(xy, codes, 2, k=1, n_perms=4000, seed=0)
    np.testing.assert_array_equal(count, [[2, 0], [1, 1]])
    # z by hand: the exact mean and sd of count over all 4! relabellings
    perms = []
    for p in itertools.permutations(range(4)):
        lab = codes[list(p)]
        m = np.zeros((2, 2))
        np.add.at(m, (lab[src], lab[dst]), 1)
        perms.append(m)
    perms = np.array(perms)
    z_exact = (count - perms.mean(0)) / perms.std(0)
    np.testing.assert_allclose(z, z_exact, atol=0.08)
    # a type with no unit: its row and column are NaN (sd 0), as squidpy
    z3, _ = nhood_enrichment(xy, codes, 3, k=1, n_perms=20)
    assert np.isnan(z3[2]).all() and np.isfinite(z3[:2, :2]).all()
