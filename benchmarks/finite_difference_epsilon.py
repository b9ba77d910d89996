"""How accurate is RENG's finite-difference H∇L, in float32 and under bfloat16 autocast?

    .venv/bin/python benchmarks/finite_difference_epsilon.py [--models BERT-classifier,...]

For each model of the test kit (``tests/cases.py``, eval mode: no dropout; and two of its
tanh/LayerNorm MLPs) on one batch,
at initialisation and, for the two BERTs, after 20 and 60 K-FAC steps, it runs one
``RENG(hvp="finite_difference", rho=1)`` step through a closure, in float32 and with the
closure's forward under ``torch.autocast("cpu", dtype=torch.bfloat16)``, records the
product ``(∇L(θ + εĝ) − ∇L(θ))·‖g‖/ε`` that the step computed, and prints its relative
error ``‖product − H∇L‖ / ‖H∇L‖`` against the exact ``H∇L`` of the same parameters by
double backpropagation in float64. Three steps ε are compared:

* ``new``: the rule of ``grng.optim.reng`` (``s·sqrt(eps_c)·(1 + mean|θ_i|)``, ``eps_c``
  the epsilon of the precision the closure computed in);
* ``old``: the rule before issue #13, ``sqrt(eps(parameter dtype))·(1 + ‖θ‖)``;
* ``best``: the best of a grid of fixed ε (1e-5 … 1e-1), for reference only.

The error printed is that of H∇L itself; RENG's search direction ``∇L + ρH∇L`` carries it
times ``ρ‖H∇L‖/‖∇L + ρH∇L‖`` (at the default ρ = 1e-3, well under the bfloat16 rounding
of ∇L itself on these models).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import grng

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.cases import MODELS, batch, logits_of, mlp

GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


class OldRule(grng.RENG):
    """RENG with the step before issue #13: ``sqrt(eps(parameter dtype))·(1 + ‖θ‖)``."""

    def _finite_difference_epsilon(self, params: list[Tensor]) -> Tensor:
        theta = torch.sqrt(torch.stack([p.detach().double().pow(2).sum() for p in params]).sum())
        return math.sqrt(torch.finfo(params[0].dtype).eps) * (1.0 + theta)


def at_least_float32(t: Tensor) -> Tensor:
    """``t`` in float32 if it is in a lower precision (autocast's bfloat16 logits)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def loss_of(model: nn.Module, x: Tensor, y: Tensor, bf16: bool) -> Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = logits_of(model(x))
    return F.cross_entropy(at_least_float32(logits).reshape(-1, logits.shape[-1]), y.reshape(-1))


def exact_product(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    twin = copy.deepcopy(model).double()
    params = [p for p in twin.parameters() if p.requires_grad]
    logits = logits_of(twin(x.double() if x.is_floating_point() else x))
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    grads = torch.autograd.grad(loss, params, create_graph=True)
    product = torch.autograd.grad(0.5 * torch.stack([g.pow(2).sum() for g in grads]).sum(), params)
    return torch.cat([h.flatten() for h in product])


def reng_product(
    cls: type[grng.RENG], model: nn.Module, x: Tensor, y: Tensor, bf16: bool
) -> tuple[Tensor, float]:
    """The product one RENG step computes (model left unchanged), and its ε."""
    model = copy.deepcopy(model)
    optimizer = cls(model, rho=1.0, hvp="finite_difference")
    seen: dict[str, Any] = {}
    compute = optimizer._finite_difference_product
    choose = optimizer._finite_difference_epsilon

    def record(grads: dict[Tensor, Tensor], closure: Callable[[], Tensor]) -> dict[Tensor, Tensor]:
        seen["product"] = compute(grads, closure)
        return seen["product"]

    def epsilon(params: list[Tensor]) -> Tensor:
        seen["epsilon"] = float(choose(params))
        return choose(params)

    optimizer._finite_difference_product = record  # type: ignore[method-assign]
    optimizer._finite_difference_epsilon = epsilon  # type: ignore[method-assign]

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = loss_of(model, x, y, bf16)
        loss.backward()
        return loss

    optimizer.step(closure)
    product = torch.cat([seen["product"][p].double().flatten() for p in model.parameters()])
    return product, seen["epsilon"]


def grid_error(model: nn.Module, x: Tensor, y: Tensor, bf16: bool, exact: Tensor) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    clean = torch.autograd.grad(loss_of(model, x, y, bf16), params)
    norm = torch.cat([g.flatten() for g in clean]).double().norm()
    best = math.inf
    for eps in GRID:
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, g in zip(params, clean, strict=True):
                p.add_(g * float(eps / norm))
        perturbed = torch.autograd.grad(loss_of(model, x, y, bf16), params)
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
        product = torch.cat(
            [
                ((a - b).double() * norm / eps).flatten()
                for a, b in zip(perturbed, clean, strict=True)
            ]
        )
        best = min(best, float((product - exact).norm() / exact.norm()))
    return best


#: Smooth MLPs of the test kit (Linear, Tanh, LayerNorm), with their batches.
MLPS = {
    "tanh-MLP-5-8-3": ((5, 8, 3), lambda: batch(3, 64, features=5, classes=3, learnable=True)),
    "tanh-MLP-20-32-32-4": (
        (20, 32, 32, 4),
        lambda: batch(3, 64, features=20, classes=4, learnable=True),
    ),
}


def states(name: str) -> list[tuple[str, nn.Module, Tensor, Tensor]]:
    if name in MLPS:
        sizes, data = MLPS[name]
        return [(name, mlp(sizes, seed=0).eval(), *data())]
    case = MODELS[name]
    model = case.build(0).eval()
    x, y = case.batch(10)
    out = [(f"{name} init", copy.deepcopy(model), x, y)]
    if "BERT" in name:
        optimizer = grng.KFAC(model)
        stream = torch.Generator().manual_seed(5)
        for step in range(1, 61):
            model.train()
            xb, yb = case.batch(stream)
            optimizer.zero_grad()
            loss_of(model, xb, yb, False).backward()
            optimizer.step()
            if step in (20, 60):
                out.append((f"{name} +{step} K-FAC steps", copy.deepcopy(model).eval(), x, y))
        optimizer.capture.remove()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models",
        default="BERT-classifier,BERT,GPT-2,LSTM-LM,tanh-MLP-5-8-3,tanh-MLP-20-32-32-4,"
        "mnist1d-MLP,CNN-BatchNorm,ResNet",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    print("| state | precision | ε new | error new | ε old | error old | best grid error |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        for label, model, x, y in states(name):
            exact = exact_product(model, x, y)
            for bf16 in (False, True):
                errors, epsilons = [], []
                for cls in (grng.RENG, OldRule):
                    product, eps = reng_product(cls, model, x, y, bf16)
                    errors.append(float((product - exact).norm() / exact.norm()))
                    epsilons.append(eps)
                best = grid_error(model, x, y, bf16, exact)
                print(
                    f"| {label} | {'bf16 autocast' if bf16 else 'float32'} "
                    f"| {epsilons[0]:.2g} | {errors[0]:.2g} | {epsilons[1]:.2g} "
                    f"| {errors[1]:.2g} | {best:.2g} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
