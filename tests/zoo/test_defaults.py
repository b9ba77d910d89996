"""Acceptance: every GRNG optimizer at its *default* hyperparameters trains the models
users bring (GitHub issue #12).

Each model of the case library (``tests/cases.py``: the mnist1d MLP, a CNN with
BatchNorm, a small ResNet, ``nn.TransformerEncoder`` with ``nn.Embedding``, an LSTM
language model, BERT- and GPT-2-like transformers, and the 2-layer BERT classifier on
which the 0.1 defaults diverged) trains for ``STEPS`` steps on its small learnable task,
the same batches for every optimizer. A GRNG optimizer at its defaults must not diverge,
and its final training loss (mean over the last 10% of steps) must be within
``TOLERANCE`` × AdamW's at AdamW's defaults.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import grng
from tests.cases import MODELS, ModelCase

STEPS = 60
TOLERANCE = 1.5

#: name -> (constructor at the defaults, whether the loop needs create_graph=True)
OPTIMIZERS: dict[str, tuple[Callable[[nn.Module], torch.optim.Optimizer], bool]] = {
    "AdamW": (lambda model: torch.optim.AdamW(model.parameters()), False),
    "KFAC": (lambda model: grng.KFAC(model), False),
    "RING": (lambda model: grng.RING(model), False),
    "RENG-fd": (lambda model: grng.RENG(model, hvp="finite_difference"), False),
    "RENG-exact": (lambda model: grng.RENG(model), True),
    "RKalman": (lambda model: grng.RKalman(model), False),
}


def final_loss(case: ModelCase, name: str) -> tuple[float, list[float]]:
    """Mean training loss of the last 10% of ``STEPS`` steps, and every step's loss."""
    make, create_graph = OPTIMIZERS[name]
    model = case.build(0)
    optimizer = make(model)
    losses: list[float] = []
    for step in range(STEPS):
        x, y = case.batch(step)

        def closure(x: Any = x, y: Any = y) -> torch.Tensor:
            optimizer.zero_grad()
            loss = case.loss(model, x, y)
            loss.backward(create_graph=create_graph)
            return loss

        losses.append(float(optimizer.step(closure).detach()))
        if not math.isfinite(losses[-1]):
            return math.inf, losses
    tail = losses[-max(1, STEPS // 10) :]
    return sum(tail) / len(tail), losses


@functools.cache
def adamw_loss(model_name: str) -> float:
    return final_loss(MODELS[model_name], "AdamW")[0]


CASES = [
    pytest.param(model, name, id=f"{model}-{name}")
    for model, case in MODELS.items()
    for name in OPTIMIZERS
    if name != "AdamW" and (name != "RENG-exact" or case.double_backward)
]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("model_name", "optimizer"), CASES)
def test_defaults_train_within_tolerance_of_adamw(model_name: str, optimizer: str) -> None:
    case = MODELS[model_name]
    loss, losses = final_loss(case, optimizer)
    reference = adamw_loss(model_name)
    assert math.isfinite(loss), f"diverged: {losses}"
    assert loss <= TOLERANCE * reference, (
        f"{optimizer} at its defaults: final loss {loss:.4f}, AdamW {reference:.4f} "
        f"(ratio {loss / reference:.2f} > {TOLERANCE}); losses {[round(v, 3) for v in losses]}"
    )
