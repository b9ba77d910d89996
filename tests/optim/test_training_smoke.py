"""RING and KFAC train an mnist1d MLP well above chance (10 classes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import grng

mnist1d_data = pytest.importorskip("mnist1d.data")


@pytest.fixture(scope="module")
def mnist1d():
    args = mnist1d_data.get_dataset_args()
    args.num_samples = 2000
    data = mnist1d_data.make_dataset(args)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return as_x(data["x"]), torch.tensor(data["y"]), as_x(data["x_test"]), torch.tensor(data["y_test"])


@pytest.mark.parametrize("cls", [grng.RING, grng.KFAC])
def test_trains_mnist1d_mlp_above_chance(cls, mnist1d):
    x, y, x_test, y_test = mnist1d
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = cls(model)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        index = torch.randint(0, len(x), (128,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(model(x[index]), y[index]).backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracy > 0.4, accuracy  # chance is 0.1
