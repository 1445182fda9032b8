"""The artifact registry (pipeline.artifacts): paths, templates, and docs/FORMATS.md's table made from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import artifacts as art

FORMATS = Path(__file__).resolve().parents[2] / "docs" / "FORMATS.md"


def test_formats_md_lists_the_registry():
    text = FORMATS.read_text()
    start, end = text.index("<!-- registry:start -->\n"), text.index("<!-- registry:end -->")
    table = text[start + len("<!-- registry:start -->\n"):end].strip()
    assert table == art.format_table(), (
        "docs/FORMATS.md's registry table differs from pipeline.artifacts; paste this between the markers:\n"
        + art.format_table())


def test_paths_under_out(tmp_path):
    assert art.PATCH_GRID.path(tmp_path, "s1") == tmp_path / "patches" / "s1.h5"
    bag = art.FEATURE_BAGS.path(tmp_path, "s1", encoder="musk")
    assert bag == tmp_path / "features" / "musk" / "h5_files" / "s1.h5"
    assert art.CODEX_FEATURE_TABLE.path(tmp_path, encoder="stats") == tmp_path / "codex_features" / "stats.h5"
    assert art.ATTRIBUTIONS.dir(tmp_path, run="r") == tmp_path / "mica_runs" / "r" / "ig"
    assert art.PATCH_GRID.files(tmp_path, "s1")[1].name == "s1_tissue.png"
    assert art.PREDICTIONS.records_dir(tmp_path) == tmp_path / "hex_pred" / "done"
    with pytest.raises(TypeError, match="encoder"):
        art.FEATURE_BAGS.path(tmp_path, "s1")


def test_instances_find_the_folders_of_templated_artifacts(tmp_path):
    (tmp_path / "features" / "musk").mkdir(parents=True)
    (tmp_path / "features" / ".hidden").mkdir()
    (tmp_path / "features" / "stats.txt").write_text("")
    assert list(art.FEATURE_BAGS.instances(tmp_path)) == [{"encoder": "musk"}]
    assert list(art.PATCH_GRID.instances(tmp_path)) == [{}]


def test_keys_unique_and_known():
    assert len(art.REGISTRY) == len({a.key for a in art.REGISTRY.values()})
    assert art.REGISTRY["predictions"] is art.PREDICTIONS
