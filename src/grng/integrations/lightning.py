"""grng optimizers in PyTorch Lightning: :class:`GRNGMixin`.

Mix it into the LightningModule, before ``LightningModule``, and return a grng optimizer
built on the module from ``configure_optimizers``::

    import lightning as L
    from grng.integrations.lightning import GRNGMixin

    class Classifier(GRNGMixin, L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return grng.RENG(self)                  # or KFAC, RING, RKalman

KFAC, RING and RKalman train in a plain LightningModule too (Lightning passes its
closure to ``optimizer.step``; gradient accumulation with ``accumulate_grad_batches``
gives the full batch's step). What the mixin adds, in its ``backward``:

* ``RENG(hvp="exact")`` needs ``.grad`` with its autograd graph: the mixin's
  ``backward(loss)`` is ``LightningModule.backward(loss, create_graph=True)``, with
  torch's reference-cycle warning hidden (RENG's step detaches ``.grad``, which ends
  the cycle). ``accumulate_grad_batches`` sums the graph-carrying gradients and gives
  the full batch's step. Without the mixin exact RENG raises at the first step.
* Under a precision plugin with a ``GradScaler`` (``precision="16-mixed"``) every grng
  optimizer gets ``optimizer.grad_scaler``, so its gradient factors are divided by the
  loss scale², and exact RENG's new gradients keep the scaled values but carry the
  graph of the unscaled gradient (:func:`grng.integrations._graph.backward_with_graph`);
  without that the scaler's in-place ``unscale_`` would leave ``H∇L`` ``S`` times
  too large.

``RENG(hvp="finite_difference")`` works without the mixin, with these consequences:

* **``training_step`` runs twice per optimizer step.** RENG re-runs Lightning's
  closure at the perturbed point ``θ + εĝ``, so ``on_before_zero_grad``,
  ``optimizer_zero_grad``, ``on_before_backward``, ``on_after_backward``,
  ``on_before_optimizer_step`` and the gradient clipping hook run twice too, and so
  does every ``self.log`` in ``training_step`` (its epoch means then weigh the
  perturbed loss, a loss at a point ``ε`` away, like the clean one). The step's
  training outputs that Lightning keeps (``on_train_batch_end``'s ``outputs``, the
  progress bar's loss) are the perturbed call's. With the mixin,
  ``self.grng_perturbed_pass`` is True during that second call: guard logging with
  it. The perturbed call replays the clean call's RNG state (the same dropout
  masks), as RENG does for any closure.
* ``accumulate_grad_batches > 1`` raises RuntimeError at the first step: the closure
  covers only the last micro-batch, so RENG could not re-evaluate the others (use
  exact RENG with the mixin, which accumulates).
* A ``GradScaler`` (``precision="16-mixed"``) calls ``optimizer.step()`` without the
  closure, and gradient clipping (``gradient_clip_val``) runs inside the closure, where
  it would clip the clean and the perturbed gradient each by its own factor and
  corrupt their difference: with the mixin both raise RuntimeError at the first
  backward (resp. clipping), naming the fix.

Only Lightning's ``Trainer`` is handled: a module used under Fabric, or outside any
trainer, gets ``LightningModule.backward`` unchanged (call ``optimizer.backward(loss)``
yourself there).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

try:
    import lightning.pytorch as pl
except ImportError:
    try:  # the standalone package of the same code
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as error:
        raise ImportError(
            "grng.integrations.lightning needs PyTorch Lightning: pip install 'lightning>=2.2'"
        ) from error

from torch import Tensor

from grng.integrations._graph import (
    backward_with_graph,
    curvature_optimizers,
    is_exact_reng,
    is_finite_difference_reng,
    unwrap_optimizer,
)
from grng.optim.base import CurvatureOptimizer

_FD_WITH_SCALER = (
    "RENG(hvp='finite_difference') cannot train under Lightning's {precision!r} precision: "
    "its GradScaler calls optimizer.step() without the closure that finite differences "
    "re-evaluate. Use RENG(..., hvp='exact') (with grng.integrations.lightning.GRNGMixin, "
    "which handles the loss scale), or precision='bf16-mixed' or '32-true'."
)
_FD_WITH_CLIPPING = (
    "RENG(hvp='finite_difference') with gradient clipping (gradient_clip_val={value!r}): "
    "Lightning clips inside the closure that RENG re-runs at the perturbed point, so the clean "
    "and the perturbed gradient would each be clipped by its own factor and their difference "
    "would no longer measure H∇L. Use RENG(..., hvp='exact') with "
    "grng.integrations.lightning.GRNGMixin (clipping then scales RENG's whole direction), or "
    "drop gradient_clip_val."
)

if TYPE_CHECKING:
    _Base = pl.LightningModule
else:
    _Base = object


class GRNGMixin(_Base):
    """Makes a LightningModule train every grng optimizer (module docstring).

    Use it as the first base: ``class MyModule(GRNGMixin, L.LightningModule)``. It
    overrides ``backward`` (and ``configure_gradient_clipping`` only to refuse
    clipping with finite-difference RENG); override them further by calling
    ``super()``.
    """

    def _grng_optimizers(self) -> list[CurvatureOptimizer]:
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return []
        return curvature_optimizers(trainer.optimizers)

    def _grng_scaler(self) -> Any:
        trainer = getattr(self, "_trainer", None)
        plugin = None if trainer is None else trainer.precision_plugin
        scaler = getattr(plugin, "scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    @property
    def grng_perturbed_pass(self) -> bool:
        """Whether ``RENG(hvp="finite_difference")`` is re-running the closure at the
        perturbed point now (the second ``training_step`` of the optimizer step)."""
        return any(
            is_finite_difference_reng(o) and o.capture.is_paused for o in self._grng_optimizers()
        )

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """``LightningModule.backward``; with exact RENG, ``create_graph=True`` (module docstring).

        ``loss`` is what Lightning passes: divided by ``accumulate_grad_batches`` and,
        under a GradScaler, multiplied by its scale.
        """
        optimizers = self._grng_optimizers()
        scaler = self._grng_scaler()
        if scaler is not None:
            for optimizer in optimizers:
                optimizer.grad_scaler = scaler
                if is_finite_difference_reng(optimizer):
                    precision = getattr(self.trainer.precision_plugin, "precision", "16-mixed")
                    raise RuntimeError(_FD_WITH_SCALER.format(precision=precision))
        exact = [o for o in optimizers if is_exact_reng(o)]
        if not exact:
            super().backward(loss, *args, **kwargs)
            return
        kwargs["create_graph"] = True
        params = [p for p in self.parameters() if p.requires_grad]
        params += [p for o in exact for g in o.param_groups for p in g["params"]]
        backward_with_graph(
            lambda: super(GRNGMixin, self).backward(loss, *args, **kwargs), params, scaler
        )

    def configure_gradient_clipping(
        self,
        optimizer: Any,
        gradient_clip_val: int | float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """``LightningModule.configure_gradient_clipping``; refuses clipping with
        finite-difference RENG (module docstring)."""
        if gradient_clip_val and is_finite_difference_reng(unwrap_optimizer(optimizer)):
            raise RuntimeError(_FD_WITH_CLIPPING.format(value=gradient_clip_val))
        super().configure_gradient_clipping(
            optimizer,
            gradient_clip_val=gradient_clip_val,
            gradient_clip_algorithm=gradient_clip_algorithm,
        )


__all__ = ["GRNGMixin"]
