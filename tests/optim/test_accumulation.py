"""Gradient accumulation does not depend on the caller's call order.

Frameworks differ in where they zero the gradients and which module they call:
Lightning runs ``training_step`` (which calls a submodule, not the module the
optimizer was built on) and zeroes the gradients *after* the first micro-batch's
forward. Four micro-batches must give the full batch's step in every order.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import grng
from tests.cases import ALL, VARIANTS, batch, make, mlp

ORDERS = ["zero_grad_first", "zero_grad_after_forward", "submodule"]
MICRO_BATCHES = 4


class Wrapper(nn.Module):
    """Stands for a LightningModule: the optimizer is built on it, ``net`` is called."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _backward(optimizer: grng.CurvatureOptimizer, variant: str, loss: Tensor) -> None:
    if VARIANTS[variant].create_graph:
        optimizer.backward(loss)  # type: ignore[attr-defined]
    else:
        loss.backward()


def _full_batch_step(
    variant: str, model: nn.Module, optimizer: grng.CurvatureOptimizer, x: Tensor, y: Tensor
) -> None:
    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        _backward(optimizer, variant, loss)
        return loss

    optimizer.step(closure)


def _accumulated_step(
    variant: str,
    wrapper: Wrapper,
    optimizer: grng.CurvatureOptimizer,
    x: Tensor,
    y: Tensor,
    order: str,
) -> None:
    call = wrapper.net if order == "submodule" else wrapper
    if order != "zero_grad_after_forward":
        optimizer.zero_grad()
    for i, (xs, ys) in enumerate(zip(x.chunk(MICRO_BATCHES), y.chunk(MICRO_BATCHES), strict=True)):
        loss = F.cross_entropy(call(xs), ys) / MICRO_BATCHES
        if i == 0 and order == "zero_grad_after_forward":
            optimizer.zero_grad()  # Lightning: after training_step, before backward
        _backward(optimizer, variant, loss)
    optimizer.step()


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("variant", [v for v in ALL if not VARIANTS[v].needs_closure])
@pytest.mark.usefixtures("float64")
def test_four_micro_batches_give_the_full_batch_step_in_any_call_order(
    variant: str, order: str
) -> None:
    """Regression: the forwards were counted on the optimizer's model and reset by
    ``zero_grad``, so Lightning's order gave a step 25% (submodule) or 4.9%
    (zero_grad after forward) away from the full batch."""
    whole_model, split_model = mlp(dtype=torch.float64), mlp(dtype=torch.float64)
    wrapper = Wrapper(split_model)
    whole, split = make(variant, whole_model), make(variant, wrapper)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using backward.. with create_graph")
        for step in range(3):
            x, y = batch(step, dtype=torch.float64)
            _full_batch_step(variant, whole_model, whole, x, y)
            _accumulated_step(variant, wrapper, split, x, y, order)
    for p, q in zip(whole_model.parameters(), split_model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-8, atol=1e-10)


@pytest.mark.usefixtures("float64")
def test_finite_differences_refuse_micro_batches_the_closure_cannot_re_evaluate() -> None:
    """Regression: under Lightning's accumulation the perturbed pass re-evaluated only
    the last micro-batch, so H∇L was silently 194% off."""
    model = mlp(dtype=torch.float64)
    optimizer = make("RENG-fd", model)
    x, y = batch(0, dtype=torch.float64)
    before = [p.detach().clone() for p in model.parameters()]
    xs, ys = x.chunk(2), y.chunk(2)
    optimizer.zero_grad()
    (F.cross_entropy(model(xs[0]), ys[0]) / 2).backward()

    def last_micro_batch() -> Tensor:  # Lightning's closure: no zero_grad after the first
        loss = F.cross_entropy(model(xs[1]), ys[1]) / 2
        loss.backward()
        return loss

    with pytest.raises(
        RuntimeError, match=r"1 backward pass.*accumulate_grad_batches.*hvp='exact'"
    ):
        optimizer.step(last_micro_batch)
    for p, q in zip(before, model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert optimizer.steps_taken == 0


@pytest.mark.usefixtures("float64")
def test_finite_differences_accept_a_closure_that_computes_every_micro_batch() -> None:
    """The closure zeroes and re-evaluates all micro-batches: the full batch's step."""
    models = [mlp(dtype=torch.float64), mlp(dtype=torch.float64)]
    whole, split = make("RENG-fd", models[0]), make("RENG-fd", models[1])
    for step in range(3):
        x, y = batch(step, dtype=torch.float64)
        _full_batch_step("RENG-fd", models[0], whole, x, y)

        def every_micro_batch(x: Tensor = x, y: Tensor = y) -> Tensor:
            split.zero_grad()
            for xs, ys in zip(x.chunk(MICRO_BATCHES), y.chunk(MICRO_BATCHES), strict=True):
                (F.cross_entropy(models[1](xs), ys) / MICRO_BATCHES).backward()
            return torch.zeros(())

        split.step(every_micro_batch)
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-8)
