"""RING and KFAC train an mnist1d MLP well above chance (10 classes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import grng
from tests.cases import mnist1d, mnist1d_mlp


@pytest.mark.parametrize("cls", [grng.RING, grng.KFAC])
def test_trains_mnist1d_mlp_above_chance(cls):
    x, y, x_test, y_test = mnist1d()
    model = mnist1d_mlp(128)
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


@pytest.mark.parametrize("cls", [grng.RING, grng.KFAC])
def test_trains_a_conv2d_net_with_batchnorm(cls):
    torch.manual_seed(0)
    x = torch.randn(64, 2, 8, 8)
    y = (x[:, 0, :4].mean((1, 2)) > x[:, 1, 4:].mean((1, 2))).long()
    model = nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 2),
    )  # fmt: skip
    optimizer = cls(model, factor_update_freq=2, inverse_update_freq=4)
    assert len(optimizer.layers) == 3  # two convs and the head; BatchNorm on the fallback
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_ring_trains_a_small_transformer_language_model():
    """Embeddings and LayerNorm on the fallback, Linear layers on (B, T, d) inputs."""
    from grng.bench.models import CharTransformer

    torch.manual_seed(0)
    text = torch.randint(0, 12, (4000,))
    text = (text // 3) * 3 + torch.arange(4000) % 3  # a learnable pattern: residue follows position
    model = CharTransformer(vocab_size=12, block_size=16, d_model=32, n_layers=1, n_heads=2)
    optimizer = grng.RING(model, factor_update_freq=2, inverse_update_freq=10)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        start = torch.randint(0, 4000 - 17, (16,), generator=generator)
        window = torch.stack([text[s : s + 17] for s in start.tolist()])
        optimizer.zero_grad()
        logits = model(window[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 12), window[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.85 * sum(losses[:5]) / 5, losses[::10]
