"""Slide readers: OME-TIFF channels / pixel size / region reads, H&E mpp handling, panel and pairs errors."""

import numpy as np
import pytest
import tifffile

from preprocess.slide_io import CodexImage, HESlide, read_marker_panel, read_pairs, resolve_channels
from preprocess.utils import PipelineError
from sample_data.writers import write_ome_pyramid


@pytest.fixture()
def codex_file(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 60000, (3, 150, 170), dtype=np.uint16)
    path = tmp_path / "c.ome.tif"
    write_ome_pyramid(path, data, ["DAPI", "CD8", "Pan-Cytokeratin"], mpp=0.377, tile=64)
    return path, data


def test_codex_reader(codex_file):
    path, data = codex_file
    with CodexImage(path) as c:
        assert c.shape == (3, 150, 170) and c.channel_names == ["DAPI", "CD8", "Pan-Cytokeratin"]
        assert c.mpp == pytest.approx(0.377) and c.level_count == 2 and c.level_downsamples[1] == 2.0
        np.testing.assert_array_equal(c.read_region(5, 7, 100, 90), data[:, 7:90, 5:100])
        np.testing.assert_array_equal(c.read_region(5, 7, 100, 90, channels=[2, 0]), data[[2, 0], 7:90, 5:100])
        np.testing.assert_array_equal(c.read_region(-10, 140, 20, 999), data[:, 140:, :20])  # clipped
        assert resolve_channels(c, ["pan cytokeratin", "dapi"], None) == [2, 0]
        with pytest.raises(PipelineError, match="lacks the markers"):
            resolve_channels(c, ["DAPI", "FOXP3"], None)
        with pytest.raises(PipelineError, match="3 channels"):
            resolve_channels(c, ["DAPI", "FOXP3"], [(0, "DAPI"), (7, "FOXP3")], "panel.csv")
        assert resolve_channels(c, ["DAPI", "FOXP3"], [(0, "DAPI"), (1, "FOXP3")], "panel.csv") == [0, 1]


def test_codex_without_pixel_size_needs_override(tmp_path):
    path = tmp_path / "nompp.ome.tif"
    write_ome_pyramid(path, np.zeros((2, 64, 64), np.uint16), ["DAPI", "CD8"], mpp=None, tile=64)
    with pytest.raises(PipelineError, match="nompp.ome.tif.*--codex-mpp"):
        CodexImage(path)
    assert CodexImage(path, mpp=0.5).mpp == 0.5


def test_unreadable_files_name_the_file(tmp_path):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"not a slide")
    with pytest.raises(PipelineError, match="broken.svs"):
        HESlide(bad)
    with pytest.raises(PipelineError, match="missing.svs"):
        HESlide(tmp_path / "missing.svs")
    with pytest.raises(PipelineError, match="broken.ome.tif"):
        (tmp_path / "broken.ome.tif").write_bytes(b"II*\x00garbage")
        CodexImage(tmp_path / "broken.ome.tif")


def test_he_without_mpp_needs_override(tmp_path):
    path = tmp_path / "plain.tif"
    img = np.full((512, 512, 3), 230, np.uint8)
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb")
    with pytest.raises(PipelineError, match="plain.tif.*--mpp"):
        HESlide(path)
    with HESlide(path, mpp=0.25) as s:
        assert s.mpp == 0.25 and s.dimensions == (512, 512)
        region = s.read_region(10, 20, 0, (30, 40))
        assert region.shape == (40, 30, 3) and region.dtype == np.uint8
        thumb, ds = s.thumbnail(128)
        assert max(thumb.shape[:2]) == 128 and ds == pytest.approx(4.0)


def test_panel_and_pairs_errors(tmp_path):
    (tmp_path / "panel.csv").write_text("channel,marker\n0,DAPI\n1,CD8\n")
    assert read_marker_panel(tmp_path / "panel.csv") == [(0, "DAPI"), (1, "CD8")]
    (tmp_path / "bad.csv").write_text("idx,name\n0,DAPI\n")
    with pytest.raises(PipelineError, match="bad.csv"):
        read_marker_panel(tmp_path / "bad.csv")
    with pytest.raises(PipelineError, match="nope.csv"):
        read_pairs(tmp_path / "nope.csv")
    (tmp_path / "pairs.csv").write_text("he_slide,codex_image\nhe/s1.svs,codex/s1.ome.tif\n")
    pairs = read_pairs(tmp_path / "pairs.csv")
    assert list(pairs) == ["s1"] and pairs["s1"][1] == (tmp_path / "codex/s1.ome.tif").resolve()


def test_single_channel_ome_reads_as_cyx(tmp_path):
    data = np.arange(64 * 80, dtype=np.uint16).reshape(64, 80)
    path = tmp_path / "one.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(data, subifds=1, tile=(32, 32), metadata={"axes": "YX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
        tw.write(data[::2, ::2], subfiletype=1, tile=(32, 32))
    with CodexImage(path) as c:
        assert c.shape == (1, 64, 80) and c.level_count == 2
        np.testing.assert_array_equal(c.read_region(3, 4, 50, 60)[0], data[4:60, 3:50])
        np.testing.assert_array_equal(c.read_region(3, 4, 50, 60, channels=[0])[0], data[4:60, 3:50])


def test_pairs_with_empty_codex_cell(tmp_path):
    (tmp_path / "pairs.csv").write_text("he_slide,codex_image\nhe/s1.svs,\n")
    assert read_pairs(tmp_path / "pairs.csv")["s1"][1] is None  # the stages fail this slide, naming the table
