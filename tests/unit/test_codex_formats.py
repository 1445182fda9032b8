"""CODEX formats behind one reader (issue 20): QPTIFF of both dialects, MCMICRO's layout, OME-TIFF; DAPI by name; the
converter to a pyramidal OME-TIFF."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tifffile

from pipeline.errors import PipelineError
from preprocess import codex_formats as cf
from preprocess.panel import find_dapi_channel, resolve_channel_map
from preprocess.slide_io import CodexImage
from sample_data.writers import write_codex, write_qptiff

NAMES = ["DAPI", "CD3", "CD8", "Pan-Cytokeratin", "CD68"]
SHAPE = (320, 352)
MPP = 0.377


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return (np.random.default_rng(0).random((len(NAMES), *SHAPE)) * 4000).astype(np.uint16)


@pytest.fixture(scope="module")
def twins(tmp_path_factory, pixels) -> dict:
    """The same pixels in every format (levels 1, 2, 4)."""
    root = tmp_path_factory.mktemp("twins")
    return {fmt: write_codex(fmt, root / fmt, "s1", list(pixels), NAMES, SHAPE, MPP, uid_seed="t", tile=128,
                             min_side=100) for fmt in ("ome", "qptiff-fusion", "qptiff-vectra", "mcmicro")}


def _levels(c: CodexImage) -> list[np.ndarray]:
    return [np.asarray(c.level(i)[:]) for i in range(c.level_count)]


def test_qptiff_dialects_names_and_bands(twins):
    with CodexImage(twins["qptiff-fusion"]) as f:  # Fusion: <Biomarker> the stain, <Name> the fluorophore
        assert f.format == "qptiff-fusion" and f.channel_names == ["DAPI-01", *NAMES[1:]]
        assert f.band_names == ["DAPI", "Cy3", "Cy5", "AF750", "Cy3"]
    with CodexImage(twins["qptiff-vectra"]) as v:  # Vectra/Polaris: <ScanBands> in the profile, <Biomarker>
        assert v.format == "qptiff-vectra" and v.channel_names == NAMES
        assert v.band_names[0] == "DAPI" and v.band_names[1].startswith("Opal")


def test_same_pixels_levels_and_mpp_in_every_format(twins):
    with CodexImage(twins["ome"]) as ref:
        want = _levels(ref)
        assert len(want) == 3
    for fmt in ("qptiff-fusion", "qptiff-vectra", "mcmicro"):
        with CodexImage(twins[fmt]) as c:
            assert c.mpp == MPP and c.shape == ref.shape and c.level_downsamples == ref.level_downsamples, fmt
            assert all(np.array_equal(a, b) for a, b in zip(_levels(c), want)), fmt


def test_qptiff_series_selection_skips_thumbnail_macro_label(twins, pixels):
    path = twins["qptiff-fusion"]
    with tifffile.TiffFile(path) as t:
        kinds = [cf.parse_qpi_description(p.description).image_type for p in t.pages]
        levels, _ = cf.qptiff_levels(t)
        assert [len(lv) for lv in levels] == [len(NAMES)] * 3
        assert {"Thumbnail", "Overview", "Label"} <= set(kinds)
        assert all(p.samplesperpixel == 1 for lv in levels for p in lv)
        assert cf.full_resolution_pages(t)[0].index == 0 and len(cf.full_resolution_pages(t)) == len(NAMES)
    from preprocess.quantify.readers import TiledRegionReader

    r = TiledRegionReader(path, [1, 3], (len(NAMES), *SHAPE))  # the direct tile reader sees the same pages
    try:
        assert np.array_equal(r.read(10, 20, 300, 250), pixels[[1, 3], 20:250, 10:300])
    finally:
        r.close()


def test_qptiff_mpp_xml_wins_and_warns_once(tmp_path, pixels, caplog):
    p = tmp_path / "v.qptiff"
    write_qptiff(p, list(pixels), NAMES, SHAPE, MPP, "vectra", tag_mpp=0.5, tile=128, min_side=100)
    with caplog.at_level(logging.WARNING, logger="preprocess.codex_formats"):
        for _ in range(2):
            with CodexImage(p) as c:
                assert c.mpp == MPP and "0.5" in c.mpp_warning
    warned = [r for r in caplog.records if "resolution tags" in r.getMessage()]
    assert len(warned) == 1 and "0.377" in warned[0].getMessage()
    caplog.clear()
    q = tmp_path / "f.qptiff"
    write_qptiff(q, list(pixels), NAMES, SHAPE, MPP, "fusion", tile=128, min_side=100)  # tags agree: no warning
    with caplog.at_level(logging.WARNING), CodexImage(q) as c:
        assert c.mpp == MPP and c.mpp_warning is None
    assert not caplog.records
    with CodexImage(p, mpp=0.4) as c:  # a given pixel size wins over both
        assert c.mpp == 0.4


def test_mcmicro_markers_csv(tmp_path, twins, pixels):
    with CodexImage(twins["mcmicro"]) as c:  # {sample}/markers.csv, one folder up from registration/
        assert c.format == "mcmicro" and c.channel_names == NAMES and c.names_source.endswith("markers.csv")
    with tifffile.TiffFile(twins["mcmicro"]) as t:
        assert 'Name="Channel 0"' in t.ome_metadata  # ASHLAR's generic names
    side = tmp_path / "side"
    write_codex("ome", side, "x", list(pixels), [None] * len(NAMES), SHAPE, MPP, tile=128, min_side=100)
    img = side / "codex" / "x.ome.tif"
    (img.parent / "markers.csv").write_text("cycle_number,marker_name\n" + "".join(f"1,{n}\n" for n in NAMES[::-1]))
    with CodexImage(img) as c:  # next to the image
        assert c.channel_names == NAMES[::-1]
    (img.parent / "markers.csv").write_text("marker_name\nDAPI\nCD3\n")
    with pytest.raises(PipelineError, match="lists 2 markers but .* has 5 channels"):
        CodexImage(img)
    other = tmp_path / "mine.csv"
    other.write_text("marker_name\n" + "\n".join(NAMES) + "\n")
    with CodexImage(img, markers_csv=other) as c:  # an explicit file wins
        assert c.channel_names == NAMES
    (img.parent / "markers.csv").write_text("name\nDAPI\n")
    with pytest.raises(PipelineError, match="no marker_name column"):
        CodexImage(img)


@pytest.mark.parametrize("name, dapi", [("DAPI", True), ("dapi-01", True), ("DAPI_2", True), ("Hoechst 33342", True),
                                        ("DNA1", True), ("CD8", False), ("Opal 520", False), ("", False)])
def test_dapi_names(name, dapi):
    assert cf.is_dapi_name(name) is dapi


def test_dapi_by_name_in_every_format(twins):
    for fmt, path in twins.items():
        with CodexImage(path) as c:
            idx, src, name = find_dapi_channel(c, None)
            assert idx == 0 and cf.is_dapi_name(name), (fmt, src)


def test_qptiff_without_names_asks_for_a_panel(tmp_path, pixels):
    p = tmp_path / "nonames.qptiff"
    write_qptiff(p, list(pixels), NAMES, SHAPE, MPP, "vectra", tile=128, min_side=100, biomarkers=False)
    with CodexImage(p) as c:
        assert c.channel_names is None and c.band_names[0] == "DAPI"
        assert find_dapi_channel(c, None)[0] == 0  # DAPI still found by its fluorophore name
        with pytest.raises(PipelineError) as e:
            resolve_channel_map(c, ["CD8"], None)
        msg = str(e.value)
        assert "\n" not in msg and "names no biomarkers" in msg and "channel = 0-based page index" in msg
        assert "Opal" in msg
        # with a panel the channels come from its indices
        assert resolve_channel_map(c, ["CD8"], [(0, "DAPI"), (2, "CD8")]) == [("CD8", 2, None)]


def test_panel_dapi_matches_dapi_01(twins):
    with CodexImage(twins["qptiff-fusion"]) as c:
        m = resolve_channel_map(c, NAMES, list(enumerate(NAMES)))
        assert [i for _, i, _ in m] == list(range(len(NAMES))) and m[0][2] == "DAPI-01"


def test_converter_writes_named_pyramidal_ome(tmp_path, twins, pixels):
    from preprocess.convert_codex import main

    out = tmp_path / "out.ome.tif"
    for fmt in ("qptiff-vectra", "mcmicro"):
        assert main([str(twins[fmt]), str(out), "--min-side", "100", "--tile", "128"]) == 0
        with tifffile.TiffFile(out) as t:
            s = t.series[0]
            assert s.axes == "CYX" and len(s.levels) == 3 and s.levels[1].shape == (5, 160, 176)
            assert all(f'Name="{n}"' in t.ome_metadata for n in NAMES)
            assert 'PhysicalSizeX="0.377"' in t.ome_metadata
            assert np.array_equal(s.asarray(), pixels)
    nonames = tmp_path / "nonames.qptiff"
    write_qptiff(nonames, list(pixels), NAMES, SHAPE, MPP, "fusion", tile=128, min_side=100, biomarkers=False)
    assert main([str(nonames), str(tmp_path / "x.ome.tif")]) == 2  # names no channels: one line, exit 2
    names = tmp_path / "m.csv"
    names.write_text("marker_name\n" + "\n".join(NAMES) + "\n")
    assert main([str(nonames), str(tmp_path / "x.ome.tif"), "--markers-csv", str(names)]) == 0
    with CodexImage(tmp_path / "x.ome.tif") as c:
        assert c.channel_names == NAMES and c.mpp == MPP


def test_check_cohort_notes_formats(twins):
    from preprocess.check_cohort import _codex_notes, _Collector

    c = _Collector()
    with CodexImage(twins["qptiff-vectra"]) as v:
        _codex_notes("s1", v, None, None, c)
    levels = {(f.column, f.level) for f in c.findings}
    assert ("mpp", "warning") in levels and ("codex", "info") in levels
    assert any("DAPI = channel 0" in f.message for f in c.findings)
