"""hex.evaluate.predict (the one prediction loop) and hex.test's marker matching: fast CPU unit tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from hex.evaluate.predict import predict, run_loop
from hex.evaluate.stage import match_label_markers
from pipeline.errors import PipelineError


class _Images(Dataset):
    """Item i: (uint8 (3,4,4) image filled with i, i) - a stand-in for tile / patch datasets."""

    def __init__(self, n: int):
        self.n = n
        self.markers = ["m0", "m1"]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return torch.full((3, 4, 4), i, dtype=torch.uint8), torch.zeros(2), i


def _forward(x: torch.Tensor) -> torch.Tensor:
    """(B,3,4,4) float -> (B,2): [mean, 2 * mean] (identifies the input image)."""
    m = x.mean(dim=(1, 2, 3))
    return torch.stack([m, 2 * m], dim=1)


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.float()


def test_rows_placed_by_index_whatever_the_order() -> None:
    order = np.random.default_rng(0).permutation(23)
    batches = [(torch.full((len(b), 3, 4, 4), 0, dtype=torch.uint8) + torch.as_tensor(b, dtype=torch.uint8)
                .view(-1, 1, 1, 1), torch.as_tensor(b)) for b in np.array_split(order, 5)]
    out = run_loop(batches, _forward, _float, torch.device("cpu"), n=23)
    np.testing.assert_allclose(out, np.stack([np.arange(23), 2 * np.arange(23)], 1))
    in_order = run_loop(batches, _forward, _float, torch.device("cpu"))  # no n: loader order
    np.testing.assert_allclose(in_order[:, 0], order)


def test_every_row_exactly_once() -> None:
    b = (torch.zeros(3, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1, 1]))
    with pytest.raises(RuntimeError, match="exactly once"):
        run_loop([b], _forward, _float, torch.device("cpu"), n=3)
    empty = run_loop([], _forward, _float, torch.device("cpu"), n=0, dim=40)
    assert empty.shape == (0, 40) and empty.dtype == np.float32


def test_predict_keeps_index_order_and_the_global_rng() -> None:
    model = torch.nn.Identity()
    ds = _Images(10)
    state = torch.get_rng_state()

    class Net(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return _forward(x), x

    pred = predict(Net(), ds, [7, 2, 5], _float, torch.device("cpu"), batch_size=2)
    np.testing.assert_allclose(pred[:, 0], [7, 2, 5])
    assert torch.equal(state, torch.get_rng_state())  # validation must not shift training randomness
    assert predict(Net(), ds, [], _float, torch.device("cpu")).shape == (0, 2)
    loader = DataLoader(ds, batch_size=4)
    assert run_loop(loader, model, _float, torch.device("cpu"), n=10).shape == (10, 48)


def test_label_markers_matched_by_name() -> None:
    model = ["DAPI", "CD8", "CD4"]
    assert match_label_markers(model, ["CD4", "x", "DAPI", "CD8"]) == (["DAPI", "CD8", "CD4"], [0, 1, 2])
    assert match_label_markers(model, ["CD4", "DAPI"]) == (["DAPI", "CD4"], [0, 2])  # subset, warned
    legacy = [f"mean_intensity_channel{i}" for i in (1, 2, 3)]
    assert match_label_markers(model, legacy, original=True) == (legacy, [0, 1, 2])
    with pytest.raises(PipelineError, match="share no marker"):
        match_label_markers(model, legacy)
