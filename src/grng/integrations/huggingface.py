"""grng optimizers in Hugging Face ``transformers.Trainer``: :class:`GRNGTrainer`.

Pass a grng optimizer built on the model through ``optimizers=``::

    from grng.integrations.huggingface import GRNGTrainer

    optimizer = grng.RENG(model)                    # or KFAC, RING, RKalman
    trainer = GRNGTrainer(
        model=model, args=args, train_dataset=train, optimizers=(optimizer, None)
    )
    trainer.train()

What Trainer does with any optimizer passed this way, and what follows for grng:

* Trainer builds its learning-rate scheduler (``args.lr_scheduler_type``, by default
  linear decay to 0 over the run, after ``args.warmup_steps``) on the optimizer's
  groups, starting from the ``lr`` the optimizer was built with;
  ``args.learning_rate`` is not used. grng's groups take a scheduler like any
  ``torch.optim`` optimizer.
* Gradient clipping (``args.max_grad_norm``, default 1.0) multiplies every ``.grad``
  in place by ``c = min(1, max_grad_norm / (‖g‖ + 1e-6))`` before the step, so the
  optimizer works on the clipped gradient ``c·g`` (RING's damping ``λ + ρ‖c·g‖²``,
  the diagonal fallback's Fisher ``n·(c·g)²``); the curvature factors come from the
  backward hooks and are not clipped. For ``RENG(hvp="exact")`` the in-place product
  changes ``.grad``'s values but not its graph, so RENG's double backward gives
  ``c·H∇L`` and the search gradient is ``c·(∇L + ρH∇L)``: clipping scales RENG's
  whole direction by ``c`` and keeps its balance between ``∇L`` and ``ρH∇L``
  (``tests/integrations/test_huggingface.py`` measures the step: ``c`` times the
  unclipped one, to 1e-10 relative in float64).
  ``max_grad_norm=0`` turns clipping off.
* Trainer calls ``optimizer.step()`` without a closure and zeroes the gradients with
  ``model.zero_grad()``. KFAC, RING and RKalman need neither a closure nor their own
  ``zero_grad`` (the step clears the captured statistics): they train in a plain
  ``Trainer``. RENG needs what follows.

What :class:`GRNGTrainer` adds to ``Trainer``:

* ``RENG(hvp="exact")`` differentiates the gradient, so it needs ``.grad`` with its
  autograd graph. Each training step's backward is accelerate's own
  ``accelerator.backward(loss, create_graph=True)`` (its loss division and fp16
  loss scaling unchanged), with torch's reference-cycle warning hidden: RENG's step
  detaches ``.grad``, which ends the cycle. Gradient accumulation
  (``gradient_accumulation_steps``) sums the graph-carrying gradients. In a plain
  ``Trainer`` exact RENG raises at the first step, naming this class.
* Under fp16 (a ``GradScaler``) every grng optimizer gets ``optimizer.grad_scaler``,
  so that its gradient factors are divided by the loss scale². For exact RENG each
  new gradient keeps the scaled values but carries the graph of the unscaled one
  (:func:`grng.integrations._graph.backward_with_graph`): otherwise the scaler's
  in-place ``unscale_`` would leave ``H∇L`` ``S`` times too large.
* ``RENG(hvp="finite_difference")`` re-evaluates the loss through a closure, which
  Trainer never passes: it raises ValueError when given to the constructor, or at the
  first training step when the optimizer was created otherwise (an overridden
  ``create_optimizer``). Exact RENG with more than one process or under DeepSpeed,
  FSDP or Megatron-LM raises ValueError at the same points (second-order gradients
  are not synchronised there).

For KFAC, RING and RKalman without fp16, ``GRNGTrainer`` behaves exactly as
``Trainer``.
"""

from __future__ import annotations

from typing import Any

try:
    import transformers
    from accelerate.utils import DistributedType
except ImportError as error:
    raise ImportError(
        "grng.integrations.huggingface needs Hugging Face transformers and accelerate: "
        "pip install 'transformers>=4.40' 'accelerate>=0.26'"
    ) from error

from torch import Tensor

from grng.integrations._graph import (
    backward_with_graph,
    curvature_optimizers,
    is_exact_reng,
    is_finite_difference_reng,
)

_FINITE_DIFFERENCE = (
    "RENG(hvp='finite_difference') cannot train in transformers' Trainer: Trainer calls "
    "optimizer.step() without a closure, and finite differences re-evaluate the loss through "
    "one. Use RENG(model, hvp='exact') with grng.integrations.huggingface.GRNGTrainer, which "
    "back-propagates with the gradient's graph."
)
_DISTRIBUTED = (
    "RENG(hvp='exact') cannot train in transformers' Trainer under {setting}: second-order "
    "gradients are not synchronised across processes there, and RENG's finite differences "
    "need a closure that Trainer does not pass. Use KFAC, RING or RKalman in a distributed "
    "Trainer, or RENG(hvp='finite_difference') with DDP in a training loop of your own."
)
#: accelerate's set-ups under which exact RENG's graph backward is not what runs.
_UNSUPPORTED = {
    DistributedType.DEEPSPEED: "DeepSpeed",
    DistributedType.FSDP: "FSDP",
    DistributedType.MEGATRON_LM: "Megatron-LM",
}


class GRNGTrainer(transformers.Trainer):
    """``transformers.Trainer`` that trains every grng optimizer, RENG's exact mode included.

    Takes exactly ``Trainer``'s arguments; pass the optimizer as
    ``optimizers=(grng.RENG(model), None)`` (see the module docstring for what it
    changes: the graph backward for ``RENG(hvp="exact")``, the loss scale handed to
    grng optimizers under fp16, and the errors for RENG set-ups Trainer cannot run).

    Raises:
        ValueError: ``RENG(hvp="finite_difference")``, or exact RENG under more than one
            process, DeepSpeed, FSDP or Megatron-LM; at construction when the optimizer
            is passed in, else at the first training step.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.optimizer is not None:
            self._check_optimizer()

    def _check_optimizer(self) -> None:
        for optimizer in curvature_optimizers([self.optimizer]):
            if is_finite_difference_reng(optimizer):
                raise ValueError(_FINITE_DIFFERENCE)
            if is_exact_reng(optimizer):
                setting = _UNSUPPORTED.get(self.accelerator.distributed_type)
                if setting is None and self.accelerator.num_processes > 1:
                    setting = f"{self.accelerator.num_processes} processes"
                if setting is not None:
                    raise ValueError(_DISTRIBUTED.format(setting=setting))

    def training_step(self, *args: Any, **kwargs: Any) -> Tensor:
        """``Trainer.training_step``, with exact RENG's backward keeping the graph.

        Arguments as ``Trainer.training_step`` (``model, inputs[, num_items_in_batch]``).
        """
        self._check_optimizer()
        accelerator = self.accelerator
        scaler = accelerator.scaler
        optimizers = curvature_optimizers([self.optimizer])
        for optimizer in optimizers:
            if scaler is not None:
                optimizer.grad_scaler = scaler
        exact = [o for o in optimizers if is_exact_reng(o)]
        if not exact:
            return super().training_step(*args, **kwargs)

        # Trainer calls self.accelerator.backward(loss, **kwargs) inside training_step; an
        # instance attribute shadows the method for this one call, so everything else
        # Trainer and accelerate do (loss division, loss scaling) stays theirs.
        backward = accelerator.backward
        shadowed = "backward" in vars(accelerator)
        # Every parameter the backward may reach: a GradScaler's rebuild sets them aside.
        params = [p for o in exact for g in o.param_groups for p in g["params"]]
        if self.model is not None:
            params += list(self.model.parameters())

        def backward_with_the_graph(loss: Tensor, **backward_kwargs: Any) -> None:
            backward_kwargs["create_graph"] = True
            backward_with_graph(lambda: backward(loss, **backward_kwargs), params, scaler)

        accelerator.backward = backward_with_the_graph
        try:
            return super().training_step(*args, **kwargs)
        finally:
            if shadowed:
                accelerator.backward = backward
            else:
                del accelerator.backward


__all__ = ["GRNGTrainer"]
