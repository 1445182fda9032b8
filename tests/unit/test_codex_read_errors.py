"""A CODEX image whose file opens but holds an undecodable tile: one line naming the file, level and region."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from preprocess.quantify.readers import TiledRegionReader, ZarrRegionReader
from preprocess.slide_io import CodexImage, SlideReadError
from sample_data.writers import write_ome_pyramid


def _corrupt_codex(tmp_path):
    path = tmp_path / "c.ome.tif"
    rng = np.random.default_rng(0)
    chans = rng.integers(0, 4000, (2, 256, 256), dtype=np.uint16)
    write_ome_pyramid(path, chans, ["DAPI", "CD8"], shape=(256, 256), mpp=0.5, tile=128, min_side=300)
    with tifffile.TiffFile(path) as t:
        page = t.pages[1]  # CD8, level 0
        off, n = int(page.dataoffsets[3]), int(page.databytecounts[3])  # its bottom-right tile
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(b"\xff" * n)
    return path


def test_corrupt_codex_tile_is_one_line(tmp_path):
    path = _corrupt_codex(tmp_path)
    reader = TiledRegionReader(path, [0, 1], (2, 256, 256))
    try:
        assert reader.read(0, 0, 128, 128).shape == (2, 128, 128)  # good tiles still read
        with pytest.raises(SlideReadError) as e:
            reader.read(100, 100, 256, 256)
    finally:
        reader.close()
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "level 0, region x=100 y=100 w=156 h=156" in msg
    with CodexImage(path) as codex:
        z = ZarrRegionReader(codex, [1])
        with pytest.raises(SlideReadError, match="region x=128 y=128 w=128 h=128"):
            z.read(128, 128, 256, 256)
