"""Gating tables (parse, priorities, errors) and unsupervised phenotypes (spatial/phenotypes.py)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from pipeline.errors import PipelineError
from spatial.phenotypes import (
    OTHER,
    assign,
    assign_codes,
    cluster_profiles,
    default_gating,
    name_clusters,
    plot_marker_heatmap,
    read_gating,
)

ROOT = Path(__file__).resolve().parents[2]


def _panel() -> list[str]:
    with open(ROOT / "sample_data" / "marker_panel.csv", newline="") as f:
        return [r["marker"] for r in sorted(csv.DictReader(f), key=lambda r: int(r["channel"]))]


MARKERS = _panel()
COL = {m: i for i, m in enumerate(MARKERS)}


def _profile(**pos: float) -> np.ndarray:
    x = np.zeros(len(MARKERS), np.float32)
    for m, v in pos.items():
        x[COL[m.replace("_", "-")]] = v
    return x


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "gating.csv"
    p.write_text(text)
    return p


def test_default_gating_covers_the_panel_and_the_issue_phenotypes():
    g = default_gating(MARKERS)  # every marker it reads is a panel name
    assert g.phenotypes == ["treg", "stem_t", "cd8_t", "cd4_t", "neutrophil", "b_cell", "plasma", "macrophage",
                            "endothelial", "fibroblast", "tumour", OTHER]
    hex_panel = (ROOT / "hex" / "markers_original.csv").read_text()
    assert all(m in hex_panel for m in g.markers)


def test_default_gating_assigns_prototype_profiles():
    g = default_gating()
    protos = {
        "tumour": _profile(**{"Pan-Cytokeratin": 0.6}),
        "cd8_t": _profile(CD3e=0.6, CD8=0.6),
        "cd4_t": _profile(CD3e=0.6, CD4=0.6),
        "stem_t": _profile(CD3e=0.6, CD8=0.6, TCF_1=0.6),       # TCF-1 beats CD8
        "treg": _profile(CD3e=0.6, CD4=0.6, TCF_1=0.6, FOXP3=0.9),  # FOXP3 beats TCF-1 and CD4
        "b_cell": _profile(CD20=0.7),
        "macrophage": _profile(CD163=0.6),
        "neutrophil": _profile(CD66b=0.8, MPO=0.8),
        "fibroblast": _profile(FAP=0.5),
        "endothelial": _profile(CD31=0.7),
        "plasma": _profile(CD138=0.7),
        OTHER: _profile(DAPI=0.8),
    }
    got = assign(np.stack(list(protos.values())), MARKERS, g)
    assert list(got) == list(protos)
    nan = np.full((1, len(MARKERS)), np.nan, np.float32)
    assert assign(nan, MARKERS, g)[0] == OTHER  # NaN satisfies no condition


def test_priority_or_and_ties(tmp_path):
    g = read_gating(_write(tmp_path, "phenotype,rule,priority\n"
                                     "a,CD8>0.5,10\n"
                                     "b,CD4 >= 0.5 | CD20>0.5,10\n"       # same priority, later row: loses ties
                                     "c,CD8>0.5 & CD4<0.2,20\n"))
    X = np.stack([_profile(CD8=0.9), _profile(CD8=0.9, CD4=0.5), _profile(CD20=0.9), _profile(CD4=0.5),
                  _profile()])
    assert list(assign(X, MARKERS, g)) == ["c", "a", "b", "b", OTHER]
    assert assign_codes(X, MARKERS, g).tolist() == [2, 0, 1, 1, 3]


def test_comments_and_errors_name_file_and_line(tmp_path):
    p = _write(tmp_path, "# a comment\nphenotype,rule,priority,note\n# another\n\nt,CD3e>0.2,1,x\nu,CD8 => 0.3,2,y\n")
    with pytest.raises(PipelineError, match=r"gating.csv line 6: bad condition 'CD8 => 0.3'"):
        read_gating(p)
    p = _write(tmp_path, "phenotype,rule,priority\nt,CD3e>0.2,1\nu,CD3e>0.2 & CD99>0.1,2\n")
    g = read_gating(p)  # parses: markers are checked against a panel
    with pytest.raises(PipelineError, match=r"gating.csv line 3: unknown marker 'CD99'"):
        assign(np.zeros((1, len(MARKERS))), MARKERS, g)
    with pytest.raises(PipelineError, match="did you mean 'CD3e'"):
        read_gating(_write(tmp_path, "phenotype,rule,priority\nt,cd3e>0.2,1\n"), MARKERS)
    with pytest.raises(PipelineError, match=r"line 2: priority 'high'"):
        read_gating(_write(tmp_path, "phenotype,rule,priority\nt,CD3e>0.2,high\n"))
    with pytest.raises(PipelineError, match=r"missing column\(s\) \['priority'\]"):
        read_gating(_write(tmp_path, "phenotype,rule\nt,CD3e>0.2\n"))
    with pytest.raises(PipelineError, match="bad phenotype name 'other'"):
        read_gating(_write(tmp_path, "phenotype,rule,priority\nother,CD3e>0.2,1\n"))
    with pytest.raises(PipelineError, match="not found"):
        read_gating(tmp_path / "missing.csv")
    # no eval: Python is text, an unknown marker name or a bad token, never code
    with pytest.raises(PipelineError, match="unknown marker \"__import__\\('os'\\)\""):
        read_gating(_write(tmp_path, "phenotype,rule,priority\nt,__import__('os')>0,1\n"), MARKERS)
    with pytest.raises(PipelineError, match="bad condition"):
        read_gating(_write(tmp_path, "phenotype,rule,priority\nt,CD8>0.1 and CD4>0.1,1\n"))


def test_cluster_profiles_recovers_groups_and_names_them(tmp_path):
    rng = np.random.default_rng(0)
    protos = [_profile(CD3e=0.6, CD8=0.6), _profile(**{"Pan-Cytokeratin": 0.7}), _profile(CD20=0.8)]
    sizes = [300, 500, 200]
    truth = np.repeat(np.arange(3), sizes)
    X = np.concatenate([p + rng.normal(0, 0.03, (n, len(MARKERS))) for p, n in zip(protos, sizes)])
    X = np.clip(X, 0, 1).astype(np.float32)
    labels, cen = cluster_profiles(X, k=3, seed=1)
    assert adjusted_rand_score(truth, labels) == 1.0
    assert np.bincount(labels).tolist() == [500, 300, 200]  # ordered by size
    np.testing.assert_allclose(cen[0], X[truth == 1].mean(0), atol=1e-5)
    labels2, _ = cluster_profiles(X, k=3, seed=1)
    assert (labels2 == labels).all()
    names = name_clusters(cen, MARKERS, default_gating())
    assert names == ["tumour", "cd8_t", "b_cell"]
    out = plot_marker_heatmap(cen, MARKERS, names, tmp_path / "fig" / "heatmap.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["heatmap.png"]  # no temp file left
