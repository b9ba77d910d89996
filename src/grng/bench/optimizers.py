"""The benchmark's optimizers: one table mapping a name to how to build and step it.

Every entry is an :class:`OptimizerSpec`: a factory ``(model, lr) -> Optimizer``, the
default learning rate the tuning grid is centred on, and a ``train_step`` strategy
``(model, optimizer, task, x, y) -> loss`` for the optimizers whose loop is not the plain
``zero_grad; loss.backward(); step()`` (SAM's two passes, Sophia's Hessian refresh,
RENG's second-order backward). The runner knows nothing optimizer-specific beyond this.

Default learning rates (the centre of the log-spaced grid, see ``docs/benchmark.md``):

=============  =======  ==============================================================
name           lr       where it comes from
=============  =======  ==============================================================
sgd            0.1      momentum 0.9; the usual CIFAR/ResNet rate (torch has no default)
adamw          1e-3     ``torch.optim.AdamW`` default (weight decay 0.01, its default)
kfac           0.03     ``grng.KFAC`` default
ring           0.1      ``grng.RING`` default, with its default ``damping_form`` ("exact")
ring-factored  0.1      ``grng.RING`` default, ``damping_form="factored"``: K-FAC's split
                        damping (G + √γ/π I)⁻¹ ⊗ (A + π√γ I)⁻¹, RING's old behaviour
reng           0.1      ``grng.RENG`` default (read from its signature when present)
rkalman        0.3      ``grng.RKalman`` default
sophia         3e-4     SophiaG's signature default is 1e-4 (GPT-2 scale); its update is
                        clipped to ``lr`` per coordinate (an Adam-like scale), so we centre
                        on AdamW's 1e-3 / 3. Hessian refresh every 10 steps as documented.
sam            0.1      SGD momentum 0.9 as base (as ``sgd``), SAM radius ρ = 0.05 (paper)
soap           3e-3     ``pytorch_optimizer.SOAP`` default
=============  =======  ==============================================================

The GRNG optimizers are listed only when ``grng`` has them (``hasattr``), and a variant
only when its class takes the keyword that selects it (``ring-factored`` needs RING's
``damping_form``): a method that has not landed is absent, never stubbed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

import grng
from grng.bench.tasks import Task

__all__ = [
    "OPTIMIZERS",
    "OptimizerSpec",
    "TrainStep",
    "get_optimizer",
    "math_attention",
    "sam_step",
    "sophia_step",
    "standard_step",
]


@contextmanager
def math_attention() -> Iterator[None]:
    """Select the math attention kernel: the fused CPU/CUDA kernels lack the double
    backward that RENG's graph and the Hessian-vector products need."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch: nothing to select
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


Factory = Callable[[nn.Module, float], Optimizer]
TrainStep = Callable[[nn.Module, Optimizer, Task, Tensor, Tensor], Tensor]


def standard_step(
    model: nn.Module, optimizer: Optimizer, task: Task, x: Tensor, y: Tensor
) -> Tensor:
    """``zero_grad; loss.backward(); step()``; returns the (detached) mini-batch loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = task.loss(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.detach()


def sam_step(model: nn.Module, optimizer: Optimizer, task: Task, x: Tensor, y: Tensor) -> Tensor:
    """SAM's two passes: gradient at θ, ascend to θ + ρ g/‖g‖, gradient there, then the base
    optimizer steps from θ with that gradient. Reports the loss at θ (the first pass), the
    same quantity every other optimizer reports."""
    optimizer.zero_grad(set_to_none=True)
    loss = task.loss(model(x), y)
    loss.backward()

    def closure() -> Tensor:
        # pytorch_optimizer's SAM has zeroed the gradients before calling this.
        perturbed = task.loss(model(x), y)
        perturbed.backward()
        return perturbed

    optimizer.step(closure)  # type: ignore[arg-type]
    return loss.detach()


#: SophiaG refreshes its diagonal Hessian estimate every this many steps (the paper's k).
SOPHIA_HESSIAN_INTERVAL = 10


def sophia_step(model: nn.Module, optimizer: Optimizer, task: Task, x: Tensor, y: Tensor) -> Tensor:
    """SophiaG's documented loop: a normal step with ``bs`` = tokens in the batch, and every
    k steps the Gauss–Newton–Bartlett estimate: sample labels from the model's own
    predictive distribution, backward that loss, ``update_hessian()``."""
    optimizer.zero_grad(set_to_none=True)
    logits = model(x)
    loss = task.loss(logits, y)
    loss.backward()
    # bs is the number of predictions in the batch (tokens for the LM), as in the reference.
    cast(Any, optimizer).step(bs=y.numel())
    calls = getattr(optimizer, "bench_calls", 0)
    cast(Any, optimizer).bench_calls = calls + 1
    if calls % SOPHIA_HESSIAN_INTERVAL == SOPHIA_HESSIAN_INTERVAL - 1:
        optimizer.zero_grad(set_to_none=True)
        flat = model(x).reshape(-1, logits.shape[-1])
        with torch.no_grad():
            sampled = torch.distributions.Categorical(logits=flat.float()).sample()
        # Mean over the predictions, like the reference's GNB estimator.
        sampled_loss = torch.nn.functional.cross_entropy(flat, sampled)
        sampled_loss.backward()
        cast(Any, optimizer).update_hessian()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def reng_step(model: nn.Module, optimizer: Optimizer, task: Task, x: Tensor, y: Tensor) -> Tensor:
    """RENG needs the gradient's graph (its search direction is ∇L_G of the regularised
    loss): ``optimizer.backward(loss)`` builds it, the step frees it. In its
    finite-difference mode (used under DistributedDataParallel, which does not synchronise
    second-order gradients) it steps with a closure instead."""
    if getattr(optimizer, "hvp", "exact") == "finite_difference":

        def closure() -> Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss = task.loss(model(x), y)
            loss.backward()
            return loss

        with math_attention():
            loss = cast(Tensor, optimizer.step(closure))  # type: ignore[arg-type]
        return loss.detach()
    optimizer.zero_grad(set_to_none=True)
    with math_attention():
        loss = task.loss(model(x), y)
        cast(Any, optimizer).backward(loss)
        optimizer.step()
    return loss.detach()


@dataclass(frozen=True)
class OptimizerSpec:
    """How the benchmark builds and steps one optimizer."""

    name: str
    factory: Factory
    default_lr: float
    train_step: TrainStep = standard_step
    description: str = ""


def _sgd(model: nn.Module, lr: float) -> Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def _adamw(model: nn.Module, lr: float) -> Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr)


def _sophia(model: nn.Module, lr: float) -> Optimizer:
    from sophia_opt import SophiaG

    # Reference hyperparameters (betas, rho, weight decay) from SophiaG's signature.
    return SophiaG(model.parameters(), lr=lr)


def _sam(model: nn.Module, lr: float) -> Optimizer:
    from pytorch_optimizer import SAM

    return SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=lr, momentum=0.9)


def _soap(model: nn.Module, lr: float) -> Optimizer:
    from pytorch_optimizer import SOAP

    return SOAP(model.parameters(), lr=lr)


def _data_parallel() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _grng_available(cls_name: str, options: dict[str, Any]) -> bool:
    """``grng`` has the class and its signature names every keyword in ``options`` (the
    classes refuse unknown hyperparameters, so a variant must wait for its keyword)."""
    cls = getattr(grng, cls_name, None)
    return cls is not None and set(options) <= set(inspect.signature(cls).parameters)


def _grng(cls_name: str, options: dict[str, Any]) -> tuple[Factory, float]:
    cls = getattr(grng, cls_name)

    def factory(model: nn.Module, lr: float) -> Optimizer:
        if cls_name == "RENG" and _data_parallel():
            # DDP averages both backward passes of a finite difference, but does not
            # synchronise second-order gradients.
            return cls(model, lr=lr, hvp="finite_difference", **options)
        return cls(model, lr=lr, **options)

    default = inspect.signature(cls).parameters["lr"].default
    return factory, float(default)


def _build_registry() -> dict[str, OptimizerSpec]:
    specs = [
        OptimizerSpec("sgd", _sgd, 0.1, description="SGD, momentum 0.9"),
        OptimizerSpec("adamw", _adamw, 1e-3, description="torch AdamW"),
    ]
    # (name, class, train step, description, keywords passed besides lr)
    grng_methods: list[tuple[str, str, TrainStep, str, dict[str, Any]]] = [
        ("kfac", "KFAC", standard_step, "K-FAC (grng, empirical Fisher)", {}),
        ("ring", "RING", standard_step, "RING: GR as adaptive damping (grng)", {}),
        ("ring-factored", "RING", standard_step,
         "RING with K-FAC's factored damping (grng)", {"damping_form": "factored"}),
        ("reng", "RENG", reng_step, "RENG: GR in the search gradient (grng)", {}),
        ("rkalman", "RKalman", standard_step, "R-Kalman: Kalman inverse Fisher (grng)", {}),
    ]  # fmt: skip
    for name, cls_name, step, desc, options in grng_methods:
        if _grng_available(cls_name, options):
            factory, lr = _grng(cls_name, options)
            specs.append(OptimizerSpec(name, factory, lr, step, desc))
    specs += [
        OptimizerSpec("sophia", _sophia, 3e-4, sophia_step, "SophiaG (sophia-opt), k = 10"),
        OptimizerSpec("sam", _sam, 0.1, sam_step, "SAM (pytorch_optimizer) over SGD 0.9"),
        OptimizerSpec("soap", _soap, 3e-3, description="SOAP (pytorch_optimizer)"),
    ]
    return {s.name: s for s in specs}


OPTIMIZERS: dict[str, OptimizerSpec] = _build_registry()


def get_optimizer(name: str) -> OptimizerSpec:
    """The spec called ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise ValueError(
            f"unknown optimizer {name!r}; valid optimizers: {', '.join(OPTIMIZERS)}"
        ) from None
