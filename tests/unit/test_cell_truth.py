"""The generator's per-cell truth (sample_data/cell_truth.py, truth/cells/{slide}.csv.gz): nucleus centres land on
the rendered nuclei at 20x and 40x, compartments follow their priority, and writing it changes no other file."""

from __future__ import annotations

import filecmp
import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from sample_data import cell_truth, make_cohort, render
from sample_data.cell_truth import COLUMNS, COMPARTMENTS, compartments, nucleus_centres_um
from sample_data.tissue import CD8T, ENDO, FIBRO, MACRO, NEUTRO, RBC, TUMOUR, Cells, Layout

ARGS = ["--slides", "1", "--seed", "3", "--tissue-mm", "0.3", "--workers", "1", "--no-codex", "--log-level",
        "WARNING"]


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> dict[float, Path]:
    """A one-slide H&E-only cohort at 20x (0.5 µm/px) and its 40x twin (0.25 µm/px)."""
    root = tmp_path_factory.mktemp("cell_truth")
    out = {}
    for mpp in (0.5, 0.25):
        out[mpp] = root / f"mpp{mpp}"
        assert make_cohort.main(["--out", str(out[mpp]), "--he-mpp", str(mpp), *ARGS]) == 0
    return out


def _truth(cohort: Path) -> pd.DataFrame:
    gt = json.loads((cohort / "ground_truth.json").read_text())
    assert set(gt["cell_truth"]["columns"]) == set(COLUMNS)
    return pd.read_csv(cohort / gt["slides"]["slide_000"]["cells"])


@pytest.mark.parametrize("mpp", [0.5, 0.25])
def test_truth_lands_on_rendered_nuclei(twins: dict[float, Path], mpp: float) -> None:
    """Haematoxylin (smoothed by 1.5 µm) averaged at the nucleated truth points peaks at zero shift: a wrong
    pixel convention, scale or nucleus offset moves the peak by >= 0.25 µm."""
    import tifffile
    from skimage.color import rgb2hed

    t = _truth(twins[mpp])
    assert list(t.columns) == list(COLUMNS) and len(t) > 100
    assert (t.nucleated == (t.type != "rbc")).all()
    t = t[t.nucleated == 1]
    img = tifffile.imread(twins[mpp] / "he" / "slide_000.tif")
    h = ndi.gaussian_filter(rgb2hed(img)[..., 0], 1.5 / mpp)
    shifts = np.arange(-1.5, 1.51, 0.25)
    score = np.array([[ndi.map_coordinates(h, [t.y + dy / mpp, t.x + dx / mpp], order=1).mean() for dx in shifts]
                      for dy in shifts])
    iy, ix = np.unravel_index(np.argmax(score), score.shape)
    assert abs(shifts[iy]) <= 0.25 and abs(shifts[ix]) <= 0.25, (shifts[ix], shifts[iy])
    assert score.max() > 1.2 * h[h > 0.02].mean()  # truth points sit on stain well above the tissue average


def test_twins_same_cells(twins: dict[float, Path]) -> None:
    """The 40x twin has the same cells: x40 = 2 x20 + 0.5 (pixel centres), same types, states, compartments."""
    a, b = _truth(twins[0.5]), _truth(twins[0.25])
    assert np.abs(b.x - (2 * a.x + 0.5)).max() <= 0.03 and np.abs(b.y - (2 * a.y + 0.5)).max() <= 0.03
    assert a.drop(columns=["x", "y"]).equals(b.drop(columns=["x", "y"]))
    assert set(a.compartment) <= set(COMPARTMENTS) and {"tumour_nest", "stroma"} <= set(a.compartment)


def test_truth_changes_no_other_file(twins: dict[float, Path], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the truth writer the cohort's other files are byte-identical (it draws no random number), and
    ground_truth.json is the same; the csv.gz is reproducible (gzip mtime 0)."""
    monkeypatch.setattr(make_cohort, "write_cell_truth", lambda *a, **k: None)
    assert make_cohort.main(["--out", str(tmp_path), "--he-mpp", "0.5", *ARGS]) == 0
    a = twins[0.5]
    files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert Path("he/slide_000.tif") in files
    for rel in files:
        if rel.name != "ground_truth.json":
            assert filecmp.cmp(a / rel, tmp_path / rel, shallow=False), rel
    ga, gb = json.loads((a / "ground_truth.json").read_text()), json.loads((tmp_path / "ground_truth.json").read_text())
    assert ga == gb  # same keys: only the csv.gz is missing
    assert not (tmp_path / "truth/cells/slide_000.csv.gz").exists()
    raw = (a / "truth/cells/slide_000.csv.gz").read_bytes()
    assert raw[4:8] == b"\0\0\0\0"  # gzip mtime
    assert gzip.decompress(raw).startswith(b"x,y,type,nucleated,")


def _cells(x, y, typ, theta=None, nox=None, noy=None, pv=None) -> Cells:
    n = len(x)
    z = np.zeros(n, np.float32)
    f = np.asarray
    return Cells(x=f(x, np.float32), y=f(y, np.float32), type=f(typ, np.int8),
                 theta=z if theta is None else f(theta, np.float32), na=z + 3, nb=z + 3,
                 nox=z if nox is None else f(nox, np.float32), noy=z if noy is None else f(noy, np.float32),
                 amp=np.zeros((n, 3), np.float32), ph=np.zeros((n, 3), np.float32),
                 lobes=np.zeros((n, 4, 3), np.float32), ba=z + 6, bb=z + 6, dark=z + 1, vesicular=z, h_cyto=z,
                 e_cyto=z, perivascular=np.zeros(n, bool) if pv is None else f(pv, bool))


def test_nucleus_centre_rotates_offset() -> None:
    """Centre + R(theta)(nox, noy); a neutrophil's is the r²-weighted centroid of its lobes; RBC: the centre."""
    c = _cells([10, 10, 10, 10], [20, 20, 20, 20], [MACRO, MACRO, NEUTRO, RBC], theta=[0, np.pi / 2, np.pi / 2, 1],
               nox=[2, 2, 0, 0], noy=[0, 1, 0, 0])
    c.lobes[2] = [[1, 0, 1], [3, 0, 1], [0, 0, 0], [0, 0, 0]]  # centroid (2, 0) in the cell frame
    x, y = nucleus_centres_um(c)
    np.testing.assert_allclose(x, [12, 9, 10, 10], atol=1e-5)
    np.testing.assert_allclose(y, [20, 22, 22, 20], atol=1e-5)


def _layout(n: int = 50, g: float = 4.0) -> Layout:
    """200 µm square: a tumour nest for x > 100 µm, an aggregate around (40, 40), a myeloid focus y > 150 µm, a
    vessel lumen at (40, 160) of radius 8 µm."""
    cc = (np.arange(n) + 0.5) * g
    xx, yy = np.meshgrid(cc, cc)
    f = np.float32
    zero = np.zeros((n, n), f)
    return Layout(grid_um=g, side_um=n * g, tissue=zero + 100, tumour=(xx - 100).astype(f), airspace=zero - 100,
                  aggregate=(np.hypot(xx - 40, yy - 40) / 30).astype(f), myeloid=(yy > 150).astype(f),
                  plasma=zero, infil=zero, ecm=zero + 1, fibre_angle=zero, hidden={},
                  vessels=np.array([[40, 160, 8, 8, 0]], f))


def test_compartment_priority() -> None:
    """vessel > lymphoid_aggregate > myeloid_focus > tumour_nest > nest_margin > stroma."""
    pts = [  # (x, y, type, perivascular, expected)
        (40, 40, CD8T, False, "lymphoid_aggregate"),
        (150, 50, TUMOUR, False, "tumour_nest"),
        (150, 180, TUMOUR, False, "myeloid_focus"),  # myeloid focus over a nest
        (95, 60, CD8T, False, "nest_margin"),  # 5 µm outside the nest
        (85, 60, FIBRO, False, "stroma"),  # 15 µm outside
        (40, 160 + 8 + 6, CD8T, False, "vessel"),  # 6 µm outside the lumen, inside the myeloid focus
        (40, 160 + 8 + 14, CD8T, False, "myeloid_focus"),  # 14 µm outside
        (75, 120, ENDO, False, "vessel"),  # endothelial anywhere
        (75, 120, FIBRO, True, "vessel"),  # perivascular
        (75, 120, FIBRO, False, "stroma"),
    ]
    c = _cells([p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts], pv=[p[3] for p in pts])
    got = [COMPARTMENTS[k] for k in compartments(c, _layout())]
    assert got == [p[4] for p in pts]


def test_cell_table_states_and_pixels() -> None:
    """States are expression > 0.3 of their marker; x, y are H&E px (x_um / mpp - 0.5)."""
    from sample_data.panel import MARKER_INDEX

    c = _cells([10.0, 30.0], [20.0, 40.0], [CD8T, RBC])
    c.expr = np.zeros((2, 40), np.float32)
    c.expr[0, MARKER_INDEX["TCF-1"]] = 0.31
    c.expr[1, MARKER_INDEX["TCF-1"]] = 0.29
    c.expr[1, MARKER_INDEX["PD-L1"]] = 1.0
    tab = cell_truth.cell_table(c, _layout(), render.he_frame(200.0, 0.25))
    np.testing.assert_allclose(tab["x"], [39.5, 119.5])
    np.testing.assert_allclose(tab["y"], [79.5, 159.5])
    assert tab["stem"].tolist() == [1, 0] and tab["pdl1"].tolist() == [0, 1] and tab["nucleated"].tolist() == [1, 0]
    assert tab["type"].tolist() == ["cd8_t", "rbc"]


def test_match_cells_one_to_one() -> None:
    """The matching maximises matches (greedy nearest would pair p0-t0 and leave p1 out), within max_um only."""
    from bench.cell_truth import detection_f1, match_cells

    true = np.array([[0.0, 0.0], [4.0, 0.0], [50.0, 50.0]])
    pred = np.array([[1.0, 0.0], [-3.0, 0.0], [20.0, 20.0]])
    tp, fp, fn, m = match_cells(pred, true, max_um=4.0)
    assert (tp, fp, fn) == (2, 1, 1)
    assert sorted(map(tuple, m.tolist())) == [(0, 1), (1, 0)]
    assert detection_f1(pred, true)["f1"] == pytest.approx(2 / 3)
    assert match_cells(pred[:0], true)[:3] == (0, 0, 3)
