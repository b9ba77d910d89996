"""Precision: the optimizers' own arithmetic outside autocast, and a closure's precision.

``torch.autocast`` is thread-local and applies to every eligible op run while it is
enabled, including code the user did not write: a gradient hook of the curvature
capture (called by a ``loss.backward()`` inside the autocast block) or an
``optimizer.step()`` called inside it. Curvature is kept in float32 (float64 for
float64 models), so that code runs with autocast switched off
(:func:`outside_autocast`), and a user closure called from inside it runs in the
autocast state of the caller (:meth:`CallerAutocast.run`).

:func:`compute_epsilon` is the machine epsilon of the lowest precision among
dtypes: RENG's finite difference takes it from the parameters and from the outputs
of the modules that hold them (bfloat16 under ``torch.autocast(dtype=bfloat16)``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


def _autocast_enabled(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4: no device argument
        if device_type == "cpu":
            return bool(torch.is_autocast_cpu_enabled())
        return device_type == "cuda" and bool(torch.is_autocast_enabled())
    except RuntimeError:  # a device type autocast does not know (meta)
        return False


def _autocast_dtype(device_type: str) -> torch.dtype:
    getter = getattr(torch, "get_autocast_dtype", None)
    if getter is not None:
        return getter(device_type)
    if device_type == "cpu":  # torch < 2.4
        return torch.get_autocast_cpu_dtype()
    return torch.get_autocast_gpu_dtype()


@dataclass(frozen=True)
class CallerAutocast:
    """The autocast state that :func:`outside_autocast` switched off: ``(device type, dtype)``
    for each device type on which autocast was enabled, and whether its cast cache was."""

    enabled: tuple[tuple[str, torch.dtype], ...]
    cache_enabled: bool

    @contextmanager
    def restored(self) -> Iterator[None]:
        """Autocast re-enabled as the caller had it, for the block."""
        with ExitStack() as stack:
            for device_type, dtype in self.enabled:
                stack.enter_context(
                    torch.autocast(device_type, dtype=dtype, cache_enabled=self.cache_enabled)
                )
            yield

    def run(self, function: Callable[[], T]) -> T:
        """``function()`` in the caller's autocast state, with an empty cast cache.

        Autocast caches the low-precision copies of parameters until the outermost
        autocast block exits, and the caller's block is still open: a re-evaluation after
        the parameters changed in place (RENG's perturbed pass) would reuse the copies of
        the unperturbed weights. The cache is therefore cleared before the call, and again
        after it, so that the caller's block does not reuse copies of perturbed weights.
        """
        if not self.enabled:
            return function()
        with self.restored():
            torch.clear_autocast_cache()
            try:
                return function()
            finally:
                torch.clear_autocast_cache()


@contextmanager
def outside_autocast(tensors: Iterable[Tensor]) -> Iterator[CallerAutocast]:
    """Switch autocast off, for the device types of ``tensors`` and the CPU, in the block.

    Yields the caller's state, so that a user callback (a closure) can run in it.
    No-op, and no cost beyond a flag check per device type, when autocast is off.
    """
    device_types = {"cpu"} | {t.device.type for t in tensors}
    enabled = tuple((d, _autocast_dtype(d)) for d in sorted(device_types) if _autocast_enabled(d))
    caller = CallerAutocast(enabled, bool(torch.is_autocast_cache_enabled()))
    with ExitStack() as stack:
        for device_type, _ in enabled:
            stack.enter_context(torch.autocast(device_type, enabled=False))
        yield caller


def autocast_disabled(device_type: str) -> ExitStack | torch.autocast:
    """A context with autocast off on ``device_type`` (nothing to do when it is off)."""
    if not _autocast_enabled(device_type):
        return ExitStack()
    return torch.autocast(device_type, enabled=False)


def compute_epsilon(dtypes: Iterable[torch.dtype]) -> float:
    """The largest machine epsilon among the floating ``dtypes`` (float32's if none)."""
    eps = [torch.finfo(d).eps for d in dtypes if d.is_floating_point]
    return max(eps) if eps else torch.finfo(torch.float32).eps


__all__ = [
    "CallerAutocast",
    "autocast_disabled",
    "compute_epsilon",
    "outside_autocast",
]
