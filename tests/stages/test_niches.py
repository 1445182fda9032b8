"""Stage 10 (spatial.niches) on tiles of synthetic hex_pred files: two tissue types whose share drives the hazard."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import artifacts as art
from spatial import niches
from tests.fixtures import PANEL_MARKERS, write_pred

N_SLIDES = 60
GRID = 10  # tiles per side
PS = 224


def _profile(kind: str) -> np.ndarray:
    v = np.full(len(PANEL_MARKERS), 0.02, np.float32)
    on = {"macrophage": ("CD68", "CD163", "CD45", "CD14"), "tumour": ("Pan-Cytokeratin", "E-cadherin", "EpCAM")}[kind]
    for m in on:
        v[PANEL_MARKERS.index(m)] = 0.8
    return v


@pytest.fixture(scope="module")
def tiles_cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray]:
    """N_SLIDES slides (one patient each): a GRID x GRID tile grid whose left ``f`` share is macrophage-rich, the
    rest tumour; hazard exp(4 f) so the macrophage niche carries risk."""
    rng = np.random.default_rng(3)
    d = tmp_path_factory.mktemp("niches")
    (d / "he").mkdir()
    out = d / "out"
    art.PREDICTIONS.dir(out).mkdir(parents=True)
    frac = rng.uniform(0.1, 0.9, N_SLIDES)
    rows = []
    for i, f in enumerate(frac):
        sid = f"s{i:02d}"
        (d / "he" / f"{sid}.svs").write_bytes(b"")  # ids only: --units tiles never reads the H&E
        xs, ys = np.meshgrid(np.arange(GRID), np.arange(GRID))
        coords = np.stack([xs.ravel(), ys.ravel()], 1) * PS
        mac = xs.ravel() < f * GRID
        vals = np.where(mac[:, None], _profile("macrophage"), _profile("tumour"))
        vals = vals + rng.normal(0, 0.03, vals.shape).astype(np.float32)
        write_pred(art.PREDICTIONS.path(out, sid), coords, vals, PS, PS, mpp=0.5)
        t = rng.exponential(40 * np.exp(-4.0 * (f - 0.5)))
        rows.append({"case_id": f"p{i:02d}", "slide_id": sid, "survival_months": round(min(t, 90.0), 2),
                     "censorship": int(t > 90.0)})
    pd.DataFrame(rows).to_csv(d / "clinical.csv", index=False)
    return d, out, frac


def _args(d: Path, out: Path, *extra: str) -> list[str]:
    return ["--cohort", str(d), "--out", str(out), "--units", "tiles", "--k", "6", "--n-niches", "3",
            "--n-perms", "20", *extra]


def test_tiles_give_niches_whose_macrophage_share_carries_the_hazard(tiles_cohort, caplog) -> None:
    d, out, frac = tiles_cohort
    assert niches.main(_args(d, out)) == 0
    cohort = art.SPATIAL_TILES_COHORT.dir(out)
    comp = pd.read_csv(cohort / "composition.csv", index_col=0)
    mac_niche = comp.loc["macrophage"].idxmax()
    tab = pd.read_csv(cohort / "association_survival.csv").set_index("feature")
    assert tab.loc[mac_niche, "hr_per_sd"] > 1 and tab.loc[mac_niche, "q"] < 0.05
    fr = pd.read_csv(cohort / "niches.csv", index_col=0)
    assert len(fr) == N_SLIDES and np.allclose(fr.filter(like="niche_").sum(1), 1.0)
    # the macrophage niche's share follows the slide's macrophage share
    assert np.corrcoef(fr[mac_niche].to_numpy(), frac)[0, 1] > 0.9
    last = [r.getMessage() for r in caplog.records if r.getMessage().startswith("spatial.niches: ")][-1]
    assert last.startswith(f"spatial.niches: {N_SLIDES} done, 0 skipped")


def test_outputs_open_in_anndata_and_qupath_schema(tiles_cohort) -> None:
    anndata = pytest.importorskip("anndata")
    d, out, _ = tiles_cohort
    if not art.SPATIAL_TILES.path(out, "s00").is_file():
        assert niches.main(_args(d, out)) == 0
    ad = anndata.read_h5ad(art.SPATIAL_TILES.path(out, "s00"))
    assert ad.n_obs == GRID * GRID and list(ad.var_names) == PANEL_MARKERS
    assert ad.obsm["spatial"].shape == (GRID * GRID, 2) and ad.uns["spatial_units"] == "um"
    assert {"macrophage", "tumour"} <= set(ad.obs["phenotype"].astype(str))
    assert str(ad.obs["niche"].dtype) == "category"
    gj = json.loads((art.SPATIAL_TILES.dir(out) / "s00.geojson").read_text())
    feat = gj["features"][0]
    assert gj["type"] == "FeatureCollection" and feat["properties"]["objectType"] == "detection"
    assert "name" in feat["properties"]["classification"] and "niche" in feat["properties"]["measurements"]
    assert (art.SPATIAL_TILES.dir(out) / "s00_niches.png").is_file()


def test_rerun_skips_done_slides_and_shards_do_the_per_slide_half(tiles_cohort, tmp_path, caplog) -> None:
    d, out, _ = tiles_cohort
    if not art.SPATIAL_TILES_UNITS.path(out, "s00").is_file():
        assert niches.main(_args(d, out)) == 0
    caplog.clear()
    assert niches.main(_args(d, out)) == 0
    last = [r.getMessage() for r in caplog.records if r.getMessage().startswith("spatial.niches: ")][-1]
    assert last.startswith(f"spatial.niches: 0 done, {N_SLIDES} skipped")
    # a shard writes units only
    out2 = tmp_path / "out2"
    (out2 / "hex_pred").mkdir(parents=True)
    for p in art.PREDICTIONS.dir(out).glob("*.h5"):
        (out2 / "hex_pred" / p.name).write_bytes(p.read_bytes())
    assert niches.main(_args(d, out2, "--shard", "0/2")) == 0
    assert len(list(art.SPATIAL_TILES_UNITS.dir(out2).glob("*.h5"))) == N_SLIDES // 2
    assert not art.SPATIAL_TILES_COHORT.path(out2).exists()


def test_bad_gating_table_is_one_line(tiles_cohort, tmp_path, capfd, caplog) -> None:
    d, out, _ = tiles_cohort
    bad = tmp_path / "gating.csv"
    bad.write_text("phenotype,rule,priority\nmac,CD999>0.2,10\n")
    assert niches.main(_args(d, out, "--gating", str(bad))) == 2
    assert "Traceback" not in capfd.readouterr().err + caplog.text
    err = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(err) == 1 and str(bad) in err[0] and "CD999" in err[0]
