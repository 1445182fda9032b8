"""Slide readers: OME-TIFF channels / pixel size / region reads, H&E mpp handling, panel and pairs errors."""

import numpy as np
import pytest
import tifffile

from pipeline.cohort import resolve_slides
from pipeline.errors import PipelineError
from preprocess.panel import read_marker_panel, resolve_channel_map, resolve_channels
from preprocess.slide_io import CodexImage, HESlide
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
        # a panel whose names disagree with the OME names stops, naming both files and both names
        with pytest.raises(PipelineError, match=r"panel.csv.*c.ome.tif.*'FOXP3' -> channel 1 named 'CD8'"):
            resolve_channels(c, ["DAPI", "FOXP3"], [(0, "DAPI"), (1, "FOXP3")], "panel.csv")
        assert resolve_channels(c, ["DAPI", "FOXP3"], [(0, "DAPI"), (1, "FOXP3")], "panel.csv",
                                panel_wins=True) == [0, 1]
        assert resolve_channel_map(c, ["CD8", "DAPI"], [(0, "dapi"), (1, "cd-8")], "panel.csv") == [
            ("CD8", 1, "CD8"), ("DAPI", 0, "DAPI")]


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


def read_pairs(path):
    """{slide: (H&E path, CODEX path or None)} of a pairing table, as the stages read it."""
    return resolve_slides(pairs=path).pairs()


def test_panel_and_pairs_errors(tmp_path):
    (tmp_path / "panel.csv").write_text("channel,marker\n0,DAPI\n1,CD8\n")
    assert read_marker_panel(tmp_path / "panel.csv") == [(0, "DAPI"), (1, "CD8")]
    (tmp_path / "bad.csv").write_text("idx,name\n0,DAPI\n")
    with pytest.raises(PipelineError, match="bad.csv"):
        read_marker_panel(tmp_path / "bad.csv")
    with pytest.raises(PipelineError, match="nope.csv"):
        read_pairs(tmp_path / "nope.csv")
    (tmp_path / "pairs.csv").write_text("he_slide,codex_image\nhe/s1.svs,codex/s1.ome.tif\n")
    with pytest.raises(PipelineError, match="H&E file not found for 1 slides: s1"):
        read_pairs(tmp_path / "pairs.csv")
    (tmp_path / "he").mkdir()
    (tmp_path / "he" / "s1.svs").write_bytes(b"")
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
    (tmp_path / "he").mkdir()
    (tmp_path / "he" / "s1.svs").write_bytes(b"")
    assert read_pairs(tmp_path / "pairs.csv")["s1"][1] is None  # the stages fail this slide, naming the table


def _ome_with_sizes(path, sx, sy, ux="µm", uy="µm"):
    import tifffile

    xml = ('<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">'
           '<Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint16" SizeX="64" SizeY="48" '
           f'SizeC="1" SizeZ="1" SizeT="1" PhysicalSizeX="{sx}" PhysicalSizeXUnit="{ux}" PhysicalSizeY="{sy}" '
           f'PhysicalSizeYUnit="{uy}"><Channel ID="Channel:0:0" Name="DAPI" SamplesPerPixel="1"/>'
           '<TiffData IFD="0" PlaneCount="1"/></Pixels></Image></OME>')
    tifffile.imwrite(path, np.zeros((1, 48, 64), np.uint16), description=xml.encode(), metadata=None)
    return path


def test_codex_pixel_size_axes_and_units(tmp_path):
    assert CodexImage(_ome_with_sizes(tmp_path / "nm.ome.tif", 377, 377, "nm", "nm")).mpp == pytest.approx(0.377)
    assert CodexImage(_ome_with_sizes(tmp_path / "mu.ome.tif", 0.5, 0.502)).mpp == pytest.approx(0.5)  # within 1%
    with pytest.raises(PipelineError, match=r"aniso.ome.tif.*non-square.*0.5 x 0.6"):
        CodexImage(_ome_with_sizes(tmp_path / "aniso.ome.tif", 0.5, 0.6))
    with pytest.raises(PipelineError, match=r"unit.ome.tif.*'parsec'.*--codex-mpp"):
        CodexImage(_ome_with_sizes(tmp_path / "unit.ome.tif", 0.5, 0.5, "parsec", "parsec"))
    with CodexImage(tmp_path / "unit.ome.tif", mpp=0.4) as c:  # an override skips the unreadable size
        assert c.mpp == 0.4 and c.channel_names == ["DAPI"]


def test_he_aperio_0502_reads_as_05(tmp_path):
    """An Aperio 0.502 µm/px slide: level 0 is the level for 0.5 µm/px (within the 1% tolerance)."""
    from sample_data.writers import write_aperio_tiff

    write_aperio_tiff(tmp_path / "a.svs", np.full((600, 600, 3), 230, np.uint8), 0.502, min_side=128)
    with HESlide(tmp_path / "a.svs") as s:
        assert s.mpp == pytest.approx(0.502)
        assert s.level_for_mpp(0.5) == (0, 1.0) and s.level_for_mpp(2.0) == (1, 4.0)


def test_he_anisotropic_pixels_stop(tmp_path, monkeypatch):
    import openslide

    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, np.full((256, 256, 3), 230, np.uint8), tile=(256, 256), photometric="rgb")
    real = openslide.OpenSlide

    class Fake(real):
        @property
        def properties(self):
            return {"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.5"}

    monkeypatch.setattr(openslide, "OpenSlide", Fake)
    with pytest.raises(PipelineError, match=r"plain.tif.*non-square.*0.25 x 0.5"):
        HESlide(path)
    monkeypatch.setattr(Fake, "properties", property(lambda self: {"openslide.mpp-x": "0.25",
                                                                   "openslide.mpp-y": "0.2510"}))
    assert HESlide(path).mpp == 0.25
