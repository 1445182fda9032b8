"""Stage 03 with --dense-grid: the dense label files (rows, attrs, NaN, normalisation = the patch labels'), their
done-records, --registration-model, and a grid that does not divide the patch."""

import json

import h5py
import numpy as np
import pandas as pd

from preprocess.quantify import stage as q
from preprocess.quantify.dense import dense_label_path, read_dense_labels
from preprocess.quantify.normalize import apply_normalization
from preprocess.quantify.raw import raw_dense_path
from tests.stages import test_quantify as tq

MARKERS, brute_force = tq.MARKERS, tq.brute_force
stage = tq.stage  # the two-slide cohort fixture of the quantify tests

G, P = 5, 30  # the fixture's grids have 30 px patches: 6 px cells


def _cells_brute(data, coords, affine):
    c = P // G
    cells = np.array([[x + j * c, y + i * c] for x, y in coords for i in range(G) for j in range(G)])
    means, counts = brute_force(data, cells, c, affine)
    return np.moveaxis(means.reshape(len(coords), G, G, -1), 3, 1), counts.reshape(len(coords), G, G)


def test_dense_labels_rows_attrs_nan_and_normalisation(stage, tmp_path):
    cohort, out, data, affines = stage
    args = ["--cohort", str(cohort), "--region-px", "64", "--min-coverage", "0.5"]  # edge patches: NaN cells
    assert q.main([*args, "--out", str(out), "--dense-grid", str(G)]) == 0
    norm = json.loads((out / "markers" / "normalization.json").read_text())
    for s in ("s1", "s2"):
        df = pd.read_csv(out / "markers" / f"{s}.csv")
        with h5py.File(dense_label_path(out, s)) as f:
            assert f["values"].dtype == np.float16 and f["values"].shape == (len(df), 40, G, G)
            assert f["values"].chunks == (1, 40, G, G) and f["values"].compression == "gzip"
            attrs = dict(f.attrs)
        assert json.loads(attrs["markers"]) == MARKERS and attrs["schema_version"] == 1
        assert (attrs["grid"], attrs["cell_px_level0"], attrs["cell_um"], attrs["patch_size_level0"],
                attrs["mpp"], attrs["registration"]) == (G, 6.0, 3.0, P, 0.5, "affine")
        lab = read_dense_labels(dense_label_path(out, s), MARKERS)
        np.testing.assert_array_equal(lab.index, df["index"])  # exactly the label rows, in their order
        np.testing.assert_array_equal(lab.coords, df[["x", "y"]].to_numpy())
        # raw cell means = brute force; labels = the patch labels' normalisation of them, NaN kept
        with h5py.File(raw_dense_path(out, s)) as f:
            pos = {int(i): k for k, i in enumerate(f["index"][:])}
            raw = f["values"][:][[pos[i] for i in df["index"]]]
        ref, counts = _cells_brute(data[s], df[["x", "y"]].to_numpy(), affines[s])
        nan = np.isnan(raw[:, 0])
        assert nan.any() and (~nan).sum() > 100 and np.isnan(raw).sum() == 40 * nan.sum()
        assert nan[counts == 0].all()  # a cell without CODEX pixels is NaN
        np.testing.assert_allclose(np.moveaxis(raw, 1, 3)[~nan], np.moveaxis(ref, 1, 3)[~nan], rtol=1e-5)
        expect = apply_normalization(np.moveaxis(raw, 1, 3).reshape(-1, 40), norm)
        expect = np.moveaxis(expect.reshape(len(df), G, G, 40), 3, 1).astype(np.float16)
        expect[np.isnan(raw)] = np.nan
        np.testing.assert_array_equal(lab.values, expect.astype(np.float32))
        assert np.nanmin(lab.values) >= 0 and np.nanmax(lab.values) <= 1
    # dense off: the same patch labels, byte for byte, and done-records with today's settings only
    assert q.main([*args, "--out", str(tmp_path / "off"), "--patches", str(out / "patches"), "--registration",
                   str(out / "registration")]) == 0
    for s in ("s1", "s2"):
        assert (tmp_path / "off" / "markers" / f"{s}.csv").read_bytes() == (out / "markers" / f"{s}.csv").read_bytes()
        rec = json.loads((tmp_path / "off" / "markers" / "done" / f"{s}.json").read_text())
        assert sorted(rec["settings"]) == ["channels_by", "codex_mpp", "nodata_um"]
        assert rec["outputs"] == [f"{s}.csv", f"{s}.json"]
    assert not (tmp_path / "off" / "markers_dense").exists()


def test_dense_done_records_redo_skip_and_conflict(stage, caplog):
    cohort, out, _, _ = stage
    args = ["--cohort", str(cohort), "--out", str(out), "--region-px", "64", "--slides", "s1"]
    assert q.main(args) == 0 and not dense_label_path(out, "s1").exists()
    assert q.main([*args, "--dense-grid", str(G)]) == 0  # done without cell means: redone with them
    rec = json.loads((out / "markers" / "done" / "s1.json").read_text())
    assert rec["settings"]["dense_grid"] == G and "s1_dense.h5" in rec["outputs"]
    t_raw, t_lab = raw_dense_path(out, "s1").stat().st_mtime_ns, dense_label_path(out, "s1").stat().st_mtime_ns
    assert q.main([*args, "--dense-grid", str(G)]) == 0  # done: skipped, the unchanged labels left alone
    assert raw_dense_path(out, "s1").stat().st_mtime_ns == t_raw
    assert dense_label_path(out, "s1").stat().st_mtime_ns == t_lab
    assert q.main(args) == 2 and "dense_grid 5 -> \"unset\"" in caplog.text  # made another way: stop
    assert q.main([*args, "--overwrite"]) == 0
    assert not dense_label_path(out, "s1").exists() and not raw_dense_path(out, "s1").exists()


def test_registration_model_affine_ignores_the_field(stage, tmp_path):
    """s1 gets a displacement field of +6 px in x (one cell): with it the cell means move one column right of those
    through the affine only (--registration-model affine), which is recorded."""
    cohort, out, _, _ = stage
    reg = out / "registration" / "s1.json"
    rec = json.loads(reg.read_text())
    field = np.zeros((2, 4, 4), np.float32)
    field[0] = 6.0
    np.save(out / "registration" / "s1_displacement.npy", field)
    rec["displacement"] = {"file": "s1_displacement.npy", "step_px": 60.0}
    reg.write_text(json.dumps(rec))
    args = ["--cohort", str(cohort), "--region-px", "64", "--slides", "s1", "--dense-grid", str(G), "--patches",
            str(out / "patches"), "--registration", str(out / "registration")]
    a, b = tmp_path / "field", tmp_path / "affine"
    assert q.main([*args, "--out", str(a)]) == 0
    assert q.main([*args, "--out", str(b), "--registration-model", "affine"]) == 0
    for d, name, through in ((a, "affine+field", True), (b, "affine", False)):
        assert read_dense_labels(dense_label_path(d, "s1")).registration == name
        assert json.loads((d / "markers" / "raw" / "s1.json").read_text())["through_displacement_field"] is through
    assert json.loads((b / "markers" / "done" / "s1.json").read_text())["settings"]["registration_model"] == "affine"
    assert "registration_model" not in json.loads((a / "markers" / "done" / "s1.json").read_text())["settings"]
    with h5py.File(raw_dense_path(a, "s1")) as fa, h5py.File(raw_dense_path(b, "s1")) as fb:
        ia, ib = fa["index"][:], fb["index"][:]
        both = np.intersect1d(ia, ib)
        va = fa["values"][:][np.searchsorted(ia, both)]
        vb = fb["values"][:][np.searchsorted(ib, both)]
    ok = ~np.isnan(va[..., 1:]) & ~np.isnan(vb[..., :-1])
    assert ok.sum() > 1000
    np.testing.assert_allclose(va[..., 1:][ok], vb[..., :-1][ok], rtol=1e-6)
    assert not np.allclose(va[..., 1:][ok], vb[..., 1:][ok])
    assert q.main([*args, "--out", str(a)]) == 0  # same settings: done
    assert q.main([*args, "--out", str(a), "--registration-model", "affine"]) == 2  # another map: stop


def test_a_grid_that_does_not_divide_the_patch_stops_before_any_work(stage, caplog):
    cohort, out, _, _ = stage
    assert q.main(["--cohort", str(cohort), "--out", str(out), "--dense-grid", "7"]) == 2
    assert "--dense-grid 7 does not divide the patch side 30 px of" in caplog.text and "s1.h5" in caplog.text
    assert not (out / "markers" / "raw").exists()
    assert q.main(["--cohort", str(cohort), "--out", str(out), "--dense-grid", "-1"]) == 2
