"""bench.bench_infer on a tiny synthetic slide (CPU, a few seconds): every phase runs, the stage writes one
prediction per tile, end-to-end and model-only predict the same values for the same tiles, the summary's ratios
are the medians' ratios; the model-only loop feeds exactly as many tiles as the slide has."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from bench import bench_infer as bench

MUSK_KW = '{"embed_dim": 64, "depth": 2, "num_heads": 4, "mlp_dim": 128, "img_size": 64}'


def _run(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "bench.json"
    rc = bench.main(["--device", "cpu", "--tiles", "40", "--batch-size", "16", "--repeats", "1", "--threads", "1",
                     "--json", str(out), "--keep", str(tmp_path / "work"), *extra])
    assert rc == 0
    return json.loads(out.read_text())


@pytest.mark.slow
def test_tiny_end_to_end_matches_model_only(tmp_path: Path) -> None:
    rec = _run(tmp_path, "--backbone", "tiny", "--workers", "0", "1")
    n = rec["slide"]["tiles"]
    assert n >= 30
    with h5py.File(tmp_path / "work" / "hex_pred" / "bench.h5", "r") as f:
        assert f["codex_prediction"].shape == (n, 40) and f["coords"].shape == (n, 2)
    assert {(r["phase"], r["workers"]) for r in rec["rows"]} == {
        ("read-only", 0), ("read-only", 1), ("model-only", None), ("end-to-end", 0), ("end-to-end", 1)}
    assert all(r["tiles"] == n and r["patches_per_s"] == pytest.approx(n / r["seconds"]) for r in rec["rows"])
    assert [s["workers"] for s in rec["summary"]] == [0, 1]
    for s in rec["summary"]:
        e2e = [r["patches_per_s"] for r in rec["rows"] if r["phase"] == "end-to-end" and r["workers"] == s["workers"]]
        model = [r["patches_per_s"] for r in rec["rows"] if r["phase"] == "model-only"]
        assert s["ratio"] == pytest.approx(e2e[0] / model[0], rel=1e-9)
        assert s["serial_bound"] == pytest.approx(s["read_only"] / (s["read_only"] + s["model_only"]), rel=1e-9)
    assert rec["check_max_abs_diff"]["-"] <= 1e-5


@pytest.mark.slow
def test_musk_both_attentions(tmp_path: Path, capsys) -> None:
    rec = _run(tmp_path, "--backbone", "musk", "--musk-kw", MUSK_KW, "--attention", "both", "--workers", "0")
    assert rec["musk_kw"]["embed_dim"] == 64 and rec["musk_kw"]["img_size"] == 64
    assert [s["attention"] for s in rec["summary"]] == ["eager", "sdpa"]
    assert rec["attention_used"] == ["eager", "sdpa"]  # the model really switched
    assert all(v <= 1e-5 for v in rec["check_max_abs_diff"].values())
    out = capsys.readouterr().out
    assert "KEY: sdpa / eager" in out and "ratio" in out


def test_model_only_feeds_exactly_n_tiles() -> None:
    pool = [torch.full((4, 3, 8, 8), i, dtype=torch.uint8) for i in range(2)]
    seen: list[float] = []

    def fwd(x: torch.Tensor) -> torch.Tensor:
        seen.extend(x[:, 0, 0, 0].tolist())
        return x.flatten(1)[:, :1]

    out = bench.model_only(fwd, pool, 11, lambda x: x.float(), torch.device("cpu"), None, False)
    assert out.shape == (11, 1)
    np.testing.assert_array_equal(np.asarray(seen), [0] * 4 + [1] * 4 + [0] * 3)
