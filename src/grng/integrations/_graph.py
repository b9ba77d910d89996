"""What the framework helpers share: finding grng optimizers inside the frameworks'
wrappers, and back-propagating with the gradient's graph for ``RENG(hvp="exact")``.

No framework is imported here.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor

from grng.optim.base import CurvatureOptimizer
from grng.optim.reng import RENG, accumulate_with_graph, loss_scale

#: The start of torch's warning about ``backward(create_graph=True)``'s reference cycle
#: between a parameter and its gradient. RENG's step replaces every ``.grad`` by its
#: detached value, which ends the cycle, so inside the helpers the warning is noise.
_CREATE_GRAPH_WARNING = r"Using backward\(\) with create_graph=True"


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside Lightning's ``LightningOptimizer`` (``._optimizer``) and
    accelerate's ``AcceleratedOptimizer`` (``.optimizer``), however nested."""
    for _ in range(8):  # a bound against a wrapper that contains itself
        if isinstance(optimizer, CurvatureOptimizer):
            break
        inner = getattr(optimizer, "_optimizer", None)
        if inner is None:
            inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    return optimizer


def curvature_optimizers(optimizers: Iterable[Any]) -> list[CurvatureOptimizer]:
    """The grng optimizers among ``optimizers`` (unwrapped)."""
    found = (unwrap_optimizer(o) for o in optimizers)
    return [o for o in found if isinstance(o, CurvatureOptimizer)]


def is_exact_reng(optimizer: Any) -> bool:
    return isinstance(optimizer, RENG) and optimizer.hvp == "exact"


def is_finite_difference_reng(optimizer: Any) -> bool:
    return isinstance(optimizer, RENG) and optimizer.hvp == "finite_difference"


@contextmanager
def create_graph_warning_silenced() -> Iterator[None]:
    """Hide torch's reference-cycle warning of ``backward(create_graph=True)`` (only it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_CREATE_GRAPH_WARNING, category=UserWarning)
        yield


def backward_with_graph(
    run_backward: Callable[[], None], params: Iterable[Tensor], scaler: Any = None
) -> None:
    """Run ``run_backward``, a framework's backward pass with ``create_graph=True``.

    It adds the gradients with their autograd graph to ``.grad`` (as
    ``optimizer.backward(loss)`` does; accumulation over micro-batches sums them),
    without torch's reference-cycle warning.

    With an enabled GradScaler the loss was multiplied by its scale ``S``, so the
    new gradients are ``S·g`` *with the graph of* ``S·g``. The scaler later divides
    ``.grad`` by ``S`` in place (``unscale_``), which changes the values but not the
    graph, and RENG would then differentiate ``½‖·‖²`` through the graph of ``S·g``:
    ``H∇L`` ``S`` times too large. So each new gradient is rebuilt by
    :func:`grng.optim.reng.graph_of_unscaled` and added to the earlier micro-batches'
    gradients, which are set aside meanwhile (so that only the new part is rebuilt):
    :func:`grng.optim.reng.accumulate_with_graph`, which :meth:`grng.RENG.backward` uses
    in a plain loop.
    """
    params = [p for p in dict.fromkeys(params) if p.requires_grad]
    if scaler is None or not scaler.is_enabled():
        with create_graph_warning_silenced():
            run_backward()
        return
    earlier = {p: p.grad for p in params}
    for p in params:
        p.grad = None
    try:
        with create_graph_warning_silenced():
            run_backward()
    except BaseException:
        for p, g in earlier.items():
            p.grad = g
        raise
    new = [p.grad for p in params]
    for p in params:
        p.grad = earlier[p]
    accumulate_with_graph(params, new, loss_scale(scaler))


__all__ = [
    "backward_with_graph",
    "create_graph_warning_silenced",
    "curvature_optimizers",
    "is_exact_reng",
    "is_finite_difference_reng",
    "loss_scale",
    "unwrap_optimizer",
]
