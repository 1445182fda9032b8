"""Shared pytest fixtures.

``small_cohort``: a 3-slide synthetic cohort (0.6 mm tissue, seed 0) generated once per test session with
``python -m sample_data.make_cohort``; other tests read it, never write into it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SMALL_COHORT_ARGS = ["--slides", "3", "--seed", "0", "--tissue-mm", "0.6", "--workers", "1", "--log-level", "WARNING"]


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a small sample cohort in the layout of docs/FORMATS.md (he/, codex/, clinical.csv, ...)."""
    from sample_data.make_cohort import main

    out = tmp_path_factory.mktemp("small_cohort")
    assert main(["--out", str(out), *SMALL_COHORT_ARGS]) == 0
    return out
