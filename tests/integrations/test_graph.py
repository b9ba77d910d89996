"""The framework helpers' shared graph backward (grng.integrations._graph), in a plain loop.

What a framework does around it: a GradScaler scales the loss, its ``unscale_``
divides ``.grad`` in place, clipping multiplies it in place; exact RENG must then
take the step of the unscaled, clipped gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import grng
from grng.integrations._graph import backward_with_graph, curvature_optimizers
from tests.cases import batch, tiny_mlp

MICRO_BATCHES = 4


def _reng(model: nn.Module) -> grng.RENG:
    return grng.RENG(model, rho=0.5, factor_update_freq=1, inverse_update_freq=1)


def _train(
    scaler: torch.amp.GradScaler | None, clip: float | None, *, fixed: bool = True
) -> list[Tensor]:
    """Two RENG steps of 4 accumulated micro-batches each; the parameters after."""
    model = tiny_mlp().double()
    optimizer = _reng(model)
    if scaler is not None:
        optimizer.grad_scaler = scaler
    for step in range(2):
        x, y = batch(step, 16, features=4, dtype=torch.float64)
        optimizer.zero_grad()
        for xs, ys in zip(x.chunk(MICRO_BATCHES), y.chunk(MICRO_BATCHES), strict=True):
            loss = F.cross_entropy(model(xs), ys) / MICRO_BATCHES
            if scaler is not None:
                loss = scaler.scale(loss)
            backward_with_graph(
                lambda loss=loss: loss.backward(create_graph=True),
                model.parameters(),
                scaler if fixed else None,
            )
        if scaler is not None:
            scaler.unscale_(optimizer)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def _scaler() -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)


def test_loss_scaling_and_clipping_leave_the_reng_step_unchanged() -> None:
    plain = _train(None, clip=0.05)
    for p, q in zip(_train(_scaler(), clip=0.05), plain, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-13)


def test_without_the_rebuilt_graph_loss_scaling_would_distort_the_reng_step() -> None:
    """The reason for the rebuild: unscale_ changes .grad's values, not its graph."""
    plain = _train(None, clip=None)
    distorted = _train(_scaler(), clip=None, fixed=False)
    gap = max(float((p - q).abs().max()) for p, q in zip(distorted, plain, strict=True))
    assert gap > 1e-3


def test_graph_backward_accumulates_the_gradient_with_its_graph() -> None:
    """Without a scaler: ``.grad`` sums the micro-batches and keeps their graph."""
    model = tiny_mlp().double()
    x, y = batch(0, 16, features=4, dtype=torch.float64)
    whole = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    for xs, ys in zip(x.chunk(2), y.chunk(2), strict=True):
        loss = F.cross_entropy(model(xs), ys) / 2
        backward_with_graph(lambda loss=loss: loss.backward(create_graph=True), model.parameters())
    for p, g in zip(model.parameters(), whole, strict=True):
        assert p.grad is not None and p.grad.grad_fn is not None
        torch.testing.assert_close(p.grad.detach(), g)


def test_curvature_optimizers_are_found_inside_wrappers() -> None:
    model = tiny_mlp()
    ring, sgd = grng.RING(model), torch.optim.SGD(model.parameters(), lr=0.1)

    class Lightning:  # LightningOptimizer keeps the optimizer in ._optimizer
        def __init__(self, inner: object) -> None:
            self._optimizer = inner

    class Accelerate:  # accelerate's AcceleratedOptimizer in .optimizer
        def __init__(self, inner: object) -> None:
            self.optimizer = inner

    assert curvature_optimizers([Accelerate(Lightning(ring)), sgd]) == [ring]
