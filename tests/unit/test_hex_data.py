"""hex.data: patch store + label join (coordinates must agree), legacy PNG layout, split checks (clinical table
must list every slide), normalisation comparison, batch transforms (continuous rotation as torchvision's);
hex.evaluate.metrics; shards."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from torchvision.transforms.v2 import functional as TF

from bench.synthetic_hex_data import write_synthetic_dataset
from hex.data.datasets import build_dataset, marker_columns, normalization_differences
from hex.data.splits import load_split
from hex.data.transforms import BatchTransform, colour_jitter_matrices, rotate_batch
from hex.evaluate.metrics import marker_table, pearson, spearman
from pipeline.dist import shard_indices
from pipeline.errors import PipelineError
from pipeline.tables import read_split

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """4 slides x 6 patches of 224 px in the h5 layout, plus the same patches as PNGs under he_png/."""
    root = tmp_path_factory.mktemp("cohort")
    info = write_synthetic_dataset(root, n_slides=4, n_per_slide=6, both=True, seed=3)
    return root, info


def test_h5_dataset_joins_labels_by_index(cohort: tuple[Path, dict]) -> None:
    root, info = cohort
    ds = build_dataset(root, info["train"])
    assert len(ds) == 12 and ds.markers == info["markers"] and len(ds.markers) == 40
    img, y, i = ds[7]
    assert img.dtype == torch.uint8 and img.shape == (3, 224, 224) and i == 7
    slide, row = ds.slide_of_sample[7], int(ds.rows[7])
    with h5py.File(root / "he_patches" / f"{slide}.h5") as f:
        assert np.array_equal(img.permute(1, 2, 0).numpy(), f["imgs"][row])
    csv = pd.read_csv(root / "markers" / f"{slide}.csv")
    assert np.allclose(y.numpy(), csv.loc[csv["index"] == row, info["markers"]].to_numpy()[0])
    assert ds.normalization is not None


def test_csv_rows_in_any_order_join_by_index(cohort: tuple[Path, dict], tmp_path: Path) -> None:
    root, info = cohort
    slide = info["train"][0]
    (tmp_path / "markers").mkdir()
    df = pd.read_csv(root / "markers" / f"{slide}.csv").iloc[::-1]
    df.to_csv(tmp_path / "markers" / f"{slide}.csv", index=False)
    a = build_dataset(root, [slide])
    b = build_dataset(root, [slide], markers_dir=tmp_path / "markers")
    k = int(np.where(b.rows == a.rows[0])[0][0])
    assert torch.equal(a[0][0], b[k][0]) and torch.equal(a[0][1], b[k][1])


def test_label_coordinates_must_match_the_patch_store(cohort: tuple[Path, dict], tmp_path: Path) -> None:
    """A label row whose x,y differ from the store's coords[index] belongs to another patch: an error naming both."""
    root, info = cohort
    slide = info["train"][0]
    (tmp_path / "markers").mkdir()
    df = pd.read_csv(root / "markers" / f"{slide}.csv")
    df.loc[3, "x"] += 224
    df.to_csv(tmp_path / "markers" / f"{slide}.csv", index=False)
    with pytest.raises(PipelineError, match="1 of 6 rows have x,y different") as e:
        build_dataset(root, [slide], markers_dir=tmp_path / "markers")
    assert f"{slide}.csv" in str(e.value) and f"{slide}.h5" in str(e.value) and "index 3" in str(e.value)


def test_legacy_png_layout_loads_the_same_samples(cohort: tuple[Path, dict], tmp_path: Path) -> None:
    root, info = cohort
    legacy = write_synthetic_dataset(tmp_path, n_slides=4, n_per_slide=6, legacy=True, seed=3)
    assert (tmp_path / "he_patches" / "slide_000" / "slide_000_5.png").is_file()
    assert legacy["markers"][0] == "mean_intensity_channel1"
    h5 = build_dataset(root, info["train"])
    png = build_dataset(tmp_path, legacy["train"])
    also_png = build_dataset(root, info["train"], patches_dir=root / "he_png")
    assert len(h5) == len(png) == len(also_png)
    for i in range(len(h5)):
        assert torch.equal(h5[i][0], png[i][0]) and torch.equal(h5[i][0], also_png[i][0])
    assert np.array_equal(h5.labels, png.labels)
    assert np.array_equal(h5.coords, png.coords)


def test_legacy_marker_columns_sorted_numerically() -> None:
    cols = ["slide", "index", "x", "y"] + [f"mean_intensity_channel{i}" for i in (10, 2, 1, 11, 3)]
    assert marker_columns(cols) == [f"mean_intensity_channel{i}" for i in (1, 2, 3, 10, 11)]
    assert marker_columns(["slide", "index", "x", "y", "CD8", "DAPI"]) == ["CD8", "DAPI"]


def test_split_and_clinical(cohort: tuple[Path, dict]) -> None:
    root, info = cohort
    split = load_split(root / "splits" / "splits_0.csv", root / "clinical.csv")
    assert split == {"train": info["train"], "val": info["val"]}


def test_slide_missing_from_clinical_table_is_an_error(cohort: tuple[Path, dict], tmp_path: Path) -> None:
    """Such a slide would be its own patient and escape the leakage check: an error unless explicitly allowed."""
    root, info = cohort
    clinical = tmp_path / "clinical.csv"
    pd.read_csv(root / "clinical.csv").iloc[1:].to_csv(clinical, index=False)  # drops slide_000
    with pytest.raises(PipelineError, match="1 slides are not in the clinical table") as e:
        load_split(root / "splits" / "splits_0.csv", clinical)
    assert "slide_000" in str(e.value) and "--allow-unknown-slides" in str(e.value)
    split = load_split(root / "splits" / "splits_0.csv", clinical, allow_unknown=True)
    assert split["train"] == info["train"]


def test_patient_overlap_is_an_error_naming_the_file(cohort: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = cohort
    bad = tmp_path / "splits_bad.csv"
    # slide_000 and slide_001 belong to the same patient (case_000)
    pd.DataFrame({"train": ["slide_000", "slide_002"], "val": ["slide_001", None]}).to_csv(bad, index=False)
    with pytest.raises(PipelineError, match="patients in both") as e:
        load_split(bad, root / "clinical.csv")
    assert str(bad) in str(e.value) and "case_000" in str(e.value)
    load_split(bad)  # without the clinical table only slide overlap can be checked
    same = tmp_path / "splits_same.csv"
    pd.DataFrame({"train": ["slide_000"], "val": ["slide_000"]}).to_csv(same, index=False)
    with pytest.raises(PipelineError, match="slides in both"):
        load_split(same)


def test_empty_split_and_missing_inputs_are_clear_errors(cohort: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = cohort
    empty = tmp_path / "splits_empty.csv"
    pd.DataFrame({"train": ["slide_000", "slide_001"], "val": [None, None]}).to_csv(empty, index=False)
    with pytest.raises(PipelineError, match="'val' lists no slides") as e:
        load_split(empty)
    assert str(empty) in str(e.value)
    with pytest.raises(PipelineError, match="no column 'test'"):
        read_split(empty, "test")
    with pytest.raises(PipelineError, match="does not exist"):
        read_split(tmp_path / "nope.csv", "train")
    with pytest.raises(PipelineError, match="slide_999.csv does not exist"):
        build_dataset(root, ["slide_999"])
    with pytest.raises(PipelineError, match="empty split"):
        build_dataset(root, [])


def test_numeric_slide_ids_read_as_strings(tmp_path: Path) -> None:
    p = tmp_path / "s.csv"
    pd.DataFrame({"train": [0, 1, 2], "val": [4.0, None, None]}).to_csv(p, index=False)
    assert read_split(p, "train") == ["0", "1", "2"] and read_split(p, "val") == ["4"]


# ------------------------------------------------------------------------------------------------------ transforms
def test_eval_transform_resizes_and_normalises() -> None:
    x = torch.randint(0, 256, (3, 3, 224, 224), dtype=torch.uint8)
    same = BatchTransform(224, MEAN, STD)(x)
    assert same.dtype == torch.float32 and same.shape == (3, 3, 224, 224)
    assert torch.allclose(same, TF.normalize(x.float() / 255, MEAN, STD), atol=1e-5)
    up = BatchTransform(384, (0.5,) * 3, (0.5,) * 3)(x)
    assert up.shape == (3, 3, 384, 384)
    ref = TF.normalize(TF.resize(x.float() / 255, [384, 384], antialias=True), [0.5] * 3, [0.5] * 3)
    assert torch.allclose(up, ref, atol=1e-4)


def test_train_transform_geometry_is_dihedral_and_seeded() -> None:
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    tf = BatchTransform(32, (0.0,) * 3, (1 / 255,) * 3, train=True, jitter=(0, 0, 0, 0))
    torch.manual_seed(0)
    a = tf(x)
    torch.manual_seed(0)
    assert torch.equal(a, tf(x))
    for i in range(8):
        cands = [x[i]]
        for k in range(1, 4):
            cands.append(torch.rot90(x[i], k, (1, 2)))
        cands += [c.flip(-1) for c in cands]
        assert any(torch.equal(a[i].round().to(torch.uint8), c) for c in cands)


def test_train_transform_jitter_stays_in_range_and_matches_torchvision_saturation() -> None:
    x = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8)
    tf = BatchTransform(96, MEAN, STD, train=True)
    y = tf(x)
    assert y.shape == (16, 3, 96, 96) and torch.isfinite(y).all()
    lo = (-torch.tensor(MEAN) / torch.tensor(STD)).view(1, 3, 1, 1)
    hi = ((1 - torch.tensor(MEAN)) / torch.tensor(STD)).view(1, 3, 1, 1)
    assert (y >= lo - 1e-4).all() and (y <= hi + 1e-4).all()
    img = torch.rand(4, 3, 8, 8)
    torch.manual_seed(1)
    a, k = colour_jitter_matrices(4, (0.0, 0.0, 0.3, 0.0))
    assert torch.equal(k, torch.zeros(4))  # no contrast change -> no offset
    torch.manual_seed(1)
    s = [1 - 0.3 + 0.6 * torch.rand(4) for _ in range(3)][2]
    ours = torch.einsum("bij,bjhw->bihw", a, img).clamp(0, 1)
    ref = torch.stack([TF.adjust_saturation(img[i], float(s[i])) for i in range(4)])
    assert torch.allclose(ours, ref, atol=1e-5)
    # brightness + contrast: x -> c (b x) + (1 - c) mean_gray(b x), as torchvision (no clamping reached here)
    img = 0.25 + 0.5 * torch.rand(4, 3, 8, 8)
    torch.manual_seed(2)
    a, k = colour_jitter_matrices(4, (0.2, 0.2, 0.0, 0.0))
    torch.manual_seed(2)
    b, c = 0.8 + 0.4 * torch.rand(4), 0.8 + 0.4 * torch.rand(4)
    gray = TF.rgb_to_grayscale(img).mean(dim=(1, 2, 3))
    ours = torch.einsum("bij,bjhw->bihw", a, img) + (k * gray).view(4, 1, 1, 1)
    ref = torch.stack([TF.adjust_contrast(TF.adjust_brightness(img[i], float(b[i])), float(c[i])) for i in range(4)])
    assert torch.allclose(ours, ref, atol=1e-5)


def test_continuous_rotation_matches_torchvision() -> None:
    """rotate_batch = torchvision's rotate (bilinear, zero fill) per sample; --rotation draws angles in [-D, D]."""
    from torchvision.transforms import InterpolationMode

    x = torch.rand(3, 3, 40, 40) * 255
    angles = torch.tensor([30.0, -75.0, 90.0])
    ours = rotate_batch(x, angles)
    for i in range(3):
        ref = TF.rotate(x[i], float(angles[i]), interpolation=InterpolationMode.BILINEAR)
        torch.testing.assert_close(ours[i], ref, atol=1e-3, rtol=1e-5)
    img = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    flat = BatchTransform(32, (0.0,) * 3, (1 / 255,) * 3, train=True, jitter=(0, 0, 0, 0), flips=False,
                          rotation=90.0)
    torch.manual_seed(0)
    out = flat(img)
    torch.manual_seed(0)
    drawn = (torch.rand(16) * 2 - 1) * 90.0
    torch.testing.assert_close(out, rotate_batch(img.float(), drawn), atol=1e-3, rtol=1e-5)
    assert (out[:, :, 0, 0] == 0).sum() > 0  # corners rotated in from outside are black


def test_normalization_differences() -> None:
    a = {"markers": ["A", "B"], "percentiles": [1.0, 99.0], "values": [[0.0, 1.0], [10.0, 20.0]]}
    assert normalization_differences(a, json_copy(a)) == []
    b = json_copy(a)
    b["values"][1][1] = 21.0
    assert normalization_differences(a, b) == ["B: [1.0, 20.0] vs [1.0, 21.0]"]
    assert normalization_differences(a, b, markers=["A"]) == []
    c = {**json_copy(a), "percentiles": [2.0, 98.0]}
    assert normalization_differences(a, c)[0].startswith("percentiles")
    assert normalization_differences(a, None) == [] and normalization_differences(None, a) == []


def json_copy(obj: dict) -> dict:
    import json

    return json.loads(json.dumps(obj))


def test_transform_rejects_float_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        BatchTransform(32, MEAN, STD)(torch.rand(1, 3, 32, 32))


# ------------------------------------------------------------------------------------------------ metrics, shards
def test_metrics_match_scipy() -> None:
    rng = np.random.default_rng(0)
    y = rng.random((50, 3))
    p = y + rng.normal(0, 0.3, (50, 3))
    p[:, 2] = 0.5  # constant prediction -> NaN, not an error
    r, s = pearson(y, p), spearman(y, p)
    for k in range(2):
        assert r[k] == pytest.approx(pearsonr(y[:, k], p[:, k])[0], abs=1e-10)
        assert s[k] == pytest.approx(spearmanr(y[:, k], p[:, k])[0], abs=1e-10)
    assert np.isnan(r[2])
    t = marker_table(y, p, ["a", "b", "c"], visible=["a"])
    assert list(t["marker"]) == ["a", "b", "c", "mean", "median", "mean_visible", "mean_invisible"]
    assert t.set_index("marker").loc["mean", "pearson"] == pytest.approx(np.nanmean(r))
    assert t.set_index("marker").loc["mean_visible", "pearson"] == pytest.approx(r[0])


@pytest.mark.parametrize("n,world", [(10, 3), (2, 4), (0, 2), (7, 1)])
def test_shards_cover_every_index_once(n: int, world: int) -> None:
    got = [i for r in range(world) for i in shard_indices(n, r, world)]
    assert got == list(range(n))


def test_pearson_constant_prediction_is_nan() -> None:
    """A collapsed (constant) prediction column has no correlation, even when float rounding leaves its centred
    values a tiny nonzero spread."""
    from hex.evaluate.metrics import pearson

    rng = np.random.default_rng(0)
    y = rng.random((1000, 3))
    p = np.c_[np.full(1000, 0.7), y[:, 1], 1e-6 * y[:, 2] + 0.3]  # mean of 1000 x 0.7 is not exactly 0.7
    r = pearson(y, p)
    assert np.isnan(r[0]) and r[1] == pytest.approx(1.0) and r[2] == pytest.approx(1.0)


def test_jpeg_patch_store_loads(tmp_path: Path) -> None:
    """A JPEG-encoded patch store (``preprocess.patch_store --compression jpeg``) trains like a raw one."""
    from preprocess.patch_store_format import encode_jpeg

    info = write_synthetic_dataset(tmp_path, n_slides=2, n_per_slide=6, size=64)
    slide = info["slides"][0]
    store = tmp_path / "he_patches" / f"{slide}.h5"
    with h5py.File(store, "r") as f:
        imgs, coords = f["imgs"][:], f["coords"][:]
    with h5py.File(store, "w") as f:
        ds = f.create_dataset("imgs_jpeg", shape=(len(imgs),), dtype=h5py.vlen_dtype(np.uint8))
        for i, im in enumerate(imgs):
            ds[i] = encode_jpeg(im, 95)
        f.attrs["imgs_shape"] = np.array(imgs.shape, np.int64)
        f.create_dataset("coords", data=coords)
    ds = build_dataset(tmp_path, [slide])
    got = np.stack([ds[i][0].permute(1, 2, 0).numpy() for i in range(len(ds))])
    want = imgs[ds.rows]
    assert got.shape == want.shape and np.abs(got.astype(int) - want.astype(int)).mean() < 4


def test_normalization_fit_leakage_warns_or_stops(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """hex.train warns when validation slides were in the normalisation fit set; --strict-normalization stops."""
    from hex.train.start import check_normalization_fit
    from pipeline.errors import PipelineError

    (tmp_path / "normalization.json").write_text(json.dumps({"fit_slides": ["s1", "s2"], "p1": {}, "p99": {}}))
    assert check_normalization_fit(tmp_path, ["s3"]) == []
    with caplog.at_level("WARNING"):
        assert check_normalization_fit(tmp_path, ["s2", "s3"]) == ["s2"]
    assert "normalisation fit set" in caplog.text
    with pytest.raises(PipelineError, match="s2"):
        check_normalization_fit(tmp_path, ["s2"], strict=True)
