"""mica.dataset: clinical/split reading, per-patient bags, training-fold bins, one clear error per bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from mica.clinical import fold_bins
from mica.dataset import FeatureSource, build_fold
from mica.survival import hazard_bins, to_bins
from pipeline.errors import PipelineError
from pipeline.tables import read_clinical_table, read_fold
from tests.fixtures import write_synthetic_bags


@pytest.fixture()
def cohort(tmp_path: Path) -> Path:
    write_synthetic_bags(tmp_path, n_patients=12, n_folds=2, seed=3, two_slide_every=4)
    return tmp_path


def _source(root: Path) -> FeatureSource:
    return FeatureSource(root, encoder="synth", codex_encoder="synth_codex")


def _fold(root: Path, **kw):
    clinical = read_clinical_table(root / "clinical.csv", kw.get("task", "survival"))
    return build_fold(clinical, root / "splits" / "splits_0.csv", _source(root), **kw)


def test_patient_items_concatenate_bags_and_average_codex(cohort: Path) -> None:
    train, val, edges = _fold(cohort)
    units = {u.case_id: u for ds in (train, val) for u in ds.units}
    assert len(units) == 12 and len(units["p000"].slides) == 2          # p000, p004, p008 have two slides
    ds = train if any(u.case_id == "p000" for u in train.units) else val
    i = [u.case_id for u in ds.units].index("p000")
    item = ds[i]
    parts = [torch.load(cohort / "features/synth/pt_files" / f"{s}.pt", weights_only=True) for s in item["slides"]]
    assert torch.equal(item["path"], torch.cat(parts)) and item["path"].dtype == torch.float32
    assert item["slide_sizes"] == [len(p) for p in parts] and item["coords"].shape == (len(item["path"]), 2)
    with h5py.File(cohort / "codex_features/synth_codex.h5") as f:
        mean = np.mean([f[s][:] for s in item["slides"]], axis=0)
    assert item["codex"].shape == (40, 8) and np.allclose(item["codex"].numpy(), mean)
    assert item["codex_slides"].shape == (2, 40, 8)
    clin = pd.read_csv(cohort / "clinical.csv").set_index("slide_id")
    assert float(item["time"]) == pytest.approx(clin.loc[item["slides"][0], "survival_months"])
    assert int(item["y_bin"]) == int(to_bins([float(item["time"])], edges)[0])
    assert set(item) >= {"path", "codex", "coords", "slides", "case_id", "y_bin", "censorship", "time", "response"}


def test_unit_slide_gives_one_item_per_slide(cohort: Path) -> None:
    train, val, _ = _fold(cohort, unit="slide")
    split = pd.read_csv(cohort / "splits/splits_0.csv")
    assert len(train) == split["train"].notna().sum() and len(val) == split["val"].notna().sum()
    assert all(len(u.slides) == 1 for u in train.units)


def test_bins_come_from_the_training_fold_only(cohort: Path) -> None:
    clin = pd.read_csv(cohort / "clinical.csv", dtype={"slide_id": str})
    val = set(pd.read_csv(cohort / "splits/splits_0.csv")["val"].dropna())
    clin.loc[clin["slide_id"].isin(val), "survival_months"] *= 100   # val times far beyond the train times
    clin.to_csv(cohort / "clinical.csv", index=False)
    _, _, edges = _fold(cohort)
    pt = clin[~clin["slide_id"].isin(val)].drop_duplicates("case_id")
    assert np.allclose(edges, hazard_bins(pt["survival_months"], pt["censorship"]))
    _, _, whole = _fold(cohort, bins_from="cohort")
    allp = clin.drop_duplicates("case_id")
    assert np.allclose(whole, hazard_bins(allp["survival_months"], allp["censorship"]))
    assert not np.allclose(edges, whole)


def test_extra_split_columns_are_ignored_and_unused_slides_need_no_features(cohort: Path) -> None:
    split = pd.read_csv(cohort / "splits/splits_0.csv")
    split["patient_train"] = "x"                                        # the original's extra columns
    dropped = split["val"].dropna().iloc[-1]
    split.loc[split["val"] == dropped, "val"] = np.nan                  # a clinical slide outside the split...
    split.to_csv(cohort / "splits/splits_0.csv", index=False)
    (cohort / "features/synth/pt_files" / f"{dropped}.pt").unlink()     # ...needs no features
    (cohort / "features/synth/h5_files" / f"{dropped}.h5").unlink()
    clinical = read_clinical_table(cohort / "clinical.csv")
    if clinical.at[dropped, "case_id"] in {clinical.at[s, "case_id"] for s in split["val"].dropna()}:
        pytest.skip("dropped slide's patient has another val slide")
    train, val, _ = build_fold(clinical, cohort / "splits/splits_0.csv", _source(cohort))
    assert dropped not in [s for u in val.units for s in u.slides]


def test_response_task_drops_units_without_response(cohort: Path) -> None:
    clin = pd.read_csv(cohort / "clinical.csv")
    clin.loc[clin["case_id"] == "p001", "response"] = np.nan           # one slide: dropped
    clin.loc[clin["slide_id"] == "s000_1", "response"] = np.nan         # one of two slides: the other's value
    clin.to_csv(cohort / "clinical.csv", index=False)
    train, val, _ = _fold(cohort, task="response")
    cases = {u.case_id for ds in (train, val) for u in ds.units}
    assert "p001" not in cases and "p000" in cases and len(cases) == 11


# ------------------------------------------------------------------------------------------------ bad inputs


def _first_val_slide(root: Path) -> str:
    return str(pd.read_csv(root / "splits/splits_0.csv")["val"].dropna().iloc[0])


def test_error_slide_without_features(cohort: Path) -> None:
    s = _first_val_slide(cohort)
    (cohort / "features/synth/pt_files" / f"{s}.pt").unlink()
    (cohort / "features/synth/h5_files" / f"{s}.h5").unlink()
    with pytest.raises(PipelineError, match=rf"slides \['{s}'\].*no H&E features") as e:
        _fold(cohort)
    assert "\n" not in str(e.value)


def test_h5_only_bags_are_read(cohort: Path) -> None:
    shutil.rmtree(cohort / "features/synth/pt_files")
    train, _, _ = _fold(cohort)
    item = train[0]
    with h5py.File(cohort / "features/synth/h5_files" / f"{item['slides'][0]}.h5") as f:
        assert np.array_equal(item["path"][: item["slide_sizes"][0]].numpy(), f["features"][:])
        assert np.array_equal(item["coords"][: item["slide_sizes"][0]], f["coords"][:])


def test_error_slide_without_codex_features(cohort: Path) -> None:
    s = _first_val_slide(cohort)
    with h5py.File(cohort / "codex_features/synth_codex.h5", "a") as f:
        del f[s]
    with pytest.raises(PipelineError, match=rf"{s}.*no CODEX features"):
        _fold(cohort)


def test_error_codex_wrong_marker_count(cohort: Path) -> None:
    s = _first_val_slide(cohort)
    with h5py.File(cohort / "codex_features/synth_codex.h5", "a") as f:
        del f[s]
        f[s] = np.zeros((39, 8), np.float32)
    with pytest.raises(PipelineError, match=rf"slide {s} has shape \(39, 8\); expected \(40, D\)"):
        _fold(cohort)


def test_error_codex_markers_attr_not_40(cohort: Path) -> None:
    with h5py.File(cohort / "codex_features/synth_codex.h5", "a") as f:
        f.attrs["markers"] = [f"M{i}" for i in range(38)]
    with pytest.raises(PipelineError, match="lists 38 markers, expected 40"):
        _fold(cohort)


def test_error_patient_in_train_and_val(cohort: Path) -> None:
    split = pd.read_csv(cohort / "splits/splits_0.csv")
    clin = read_clinical_table(cohort / "clinical.csv")
    two = [s for s in clin.index if clin.at[s, "case_id"] == "p000"]       # p000 has two slides
    tr = [s for s in split["train"].dropna() if s not in two] + [two[0]]
    va = [s for s in split["val"].dropna() if s not in two] + [two[1]]
    n = max(len(tr), len(va))
    pd.DataFrame({"train": tr + [None] * (n - len(tr)), "val": va + [None] * (n - len(va))}).to_csv(
        cohort / "splits/splits_0.csv", index=False)
    with pytest.raises(PipelineError, match=rf"patient p000 is in both 'train' \(slides \['{two[0]}'\]\) and 'val' "
                                            rf"\(slides \['{two[1]}'\]\)"):
        read_fold(cohort / "splits/splits_0.csv", clin)


def test_error_split_names_unknown_slide(cohort: Path) -> None:
    split = pd.read_csv(cohort / "splits/splits_0.csv")
    split.loc[0, "val"] = "ghost_slide"
    split.to_csv(cohort / "splits/splits_0.csv", index=False)
    with pytest.raises(PipelineError, match=r"column 'val' names slides not in .*clinical.csv: \['ghost_slide'\]"):
        _fold(cohort)


def test_error_too_few_events_for_bins(cohort: Path) -> None:
    clin = pd.read_csv(cohort / "clinical.csv")
    clin["censorship"] = 1
    clin.to_csv(cohort / "clinical.csv", index=False)
    with pytest.raises(PipelineError, match="only 0 uncensored"):
        fold_bins(read_clinical_table(cohort / "clinical.csv"), list(clin["slide_id"]))


def test_fold_inputs_follow_the_bags_and_codex_values_not_the_files(cohort: Path) -> None:
    """mica.fold_inputs: a bag rewritten (stage 07 --overwrite) or a CODEX set with other values is a changed input;
    the CODEX table rewritten with the same values (stage 07 reassembles it on every run) is not."""
    import os

    from mica.fold_inputs import changed_inputs, fold_inputs

    slides = list(pd.read_csv(cohort / "clinical.csv")["slide_id"])
    src = _source(cohort)
    rec = fold_inputs(src, "coattn", slides)
    assert rec["bag_encoders"] == ["synth"] and rec["codex_encoder"] == "synth_codex" and rec["slides"] == slides
    assert changed_inputs(rec, fold_inputs(src, "coattn", slides)) == []
    s, t = slides[0], slides[1]
    with h5py.File(cohort / "codex_features/synth_codex.h5", "a") as f:
        data = f[s][:]
        del f[s]
        f[s] = data                                                        # same values, new dataset
    assert changed_inputs(rec, fold_inputs(src, "coattn", slides)) == []
    with h5py.File(cohort / "codex_features/synth_codex.h5", "a") as f:
        f[s][0, 0] += 1
    changed = changed_inputs(rec, fold_inputs(src, "coattn", slides))
    assert changed == [f"CODEX features of 1 slides changed since ({s})"]
    assert changed_inputs(fold_inputs(src, "path", slides), fold_inputs(src, "path", slides)) == []
    pt = cohort / "features/synth/pt_files" / f"{t}.pt"
    st = pt.stat()
    os.utime(pt, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    assert changed_inputs(rec, fold_inputs(src, "path", slides)) == [f"H&E bags of 1 slides changed since ({t})"]
    assert changed_inputs(rec, fold_inputs(src, "path", slides[1:]))[0].startswith(
        f"the split's slides differ (now without {s}, with -)")
    assert "no record" in changed_inputs(None, rec)[0]
