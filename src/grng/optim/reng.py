"""RENG: Regularized Explicit Natural Gradient.

RENG minimises the gradient-regularized objective directly: it preconditions

    ∇L_G = ∇L + ρ · H∇L,        L_G = L + (ρ/2)‖∇L‖²,

with K-FAC's Kronecker-factored Fisher and constant damping λ (per layer
``Δ = (G + (√λ/π) I)⁻¹ V_G (A + π√λ I)⁻¹``, ``V_G`` the layer's block of ∇L_G;
lazy inverses, momentum, weight decay, KL clip and the diagonal fallback as in
:class:`grng.KFAC`). The factors come from the ordinary loss's backward only:
every second-order or perturbed pass runs inside ``capture.paused()``.

The Hessian-gradient product ``H∇L = ∇(½‖∇L‖²)`` is computed one of two ways:

* ``hvp="exact"``: double backpropagation through the gradient's graph, built
  by :meth:`RENG.backward` (``optimizer.backward(loss)``) or
  ``loss.backward(create_graph=True)``. Both leave each parameter's ``.grad``
  holding a graph that references the parameter (torch's ``backward`` warns
  about that reference cycle); :meth:`RENG.step` replaces every ``.grad`` by its
  detached value, which breaks the cycle and frees the graph.
* ``hvp="finite_difference"``: ``H∇L ≈ (∇L(θ + εĝ) − ∇L(θ)) · ‖∇L‖/ε`` with
  ``ĝ = ∇L/‖∇L‖``: one more forward and backward through the closure, no
  second-order graph. The step ε follows the precision the closure computes in
  ("The step ε" below).

  The perturbed pass must see the same network as the clean one, so inside
  :meth:`RENG.step` it replays the global RNG state (CPU, and every CUDA device
  once CUDA is initialized) that the first closure call started from: dropout
  draws the same masks. Afterwards the RNG is set to where the first call left
  it, so the caller's random stream continues as if the closure had run once.
  The model's buffers (BatchNorm running statistics, ``num_batches_tracked``)
  are restored after the perturbed pass; in train mode BatchNorm normalises with
  the batch statistics, so the perturbed forward is consistent with the clean one.
  Randomness the closure draws from a ``torch.Generator`` of its own cannot be
  replayed: that closure measures noise along with curvature.

The step ε (finite differences)::

    ε = s · sqrt(eps_c) · (1 + mean_i |θ_i|),        s = 0.2 (RENG.finite_difference_scale)

the forward-difference step of Jacobian-free Newton–Krylov codes (Knoll & Keyes 2004,
eq. 14, for the unit direction ĝ): it balances the truncation error, which grows like
ε, against the rounding error of the two gradients, which grows like ``eps_c/ε``, so
the best ε scales like ``sqrt(eps_c)``. ``eps_c`` is the machine epsilon of the
precision the closure computes in: the lowest among the parameters' dtypes and the
dtypes of the outputs of every module that holds parameters during the step's first
closure call (forward hooks, registered at construction and recording only during
that call; :meth:`CurvatureCapture.remove` detaches them). Under
``torch.autocast(dtype=torch.bfloat16)`` the layers output bfloat16, so ``eps_c`` is
bfloat16's 2⁻⁷ and ε ≈ 0.018, against ≈ 7e-5 in float32 and ≈ 3e-9 in float64 (for
weights of mean magnitude ≲ 0.2). What it cannot see: precision lost after the last
such module (a loss computed in a lower precision than the model's outputs), the
outputs of TorchScript modules (they refuse hooks), and a closure that runs no hooked
module (a loss on the weights alone; a model compiled and run before the optimizer was
built, whose graph lacks the hooks), for which the step warns once and takes the
parameters' precision; called directly, outside
:meth:`RENG.step`, ``eps_c`` is the parameters'.

The earlier rule was ``sqrt(eps(parameter dtype))·(1 + ‖θ‖)``: in float32
2e-3–7e-3 on the test kit's models, long enough to cross ReLU kinks and to be
truncation-dominated, and under bfloat16 autocast below bfloat16's rounding of the
perturbed weights, so that the difference was mostly noise. ``s`` = 0.2 minimised the
error on these states among s ∈ {0.05, …, 0.5} (geometric mean over the smooth models:
float32 2.6e-3, bfloat16 0.2; s = 0.1: 3.6e-3, 0.21; s = 0.5: 2.4e-3, 0.21, but the
ResNet's float32 error 0.31). Measured by ``benchmarks/finite_difference_epsilon.py``
(2026-11-30, torch 2.13 CPU): relative error ``‖product − H∇L‖/‖H∇L‖`` of the product
one step computes, against H∇L by double backpropagation in float64, models of
``tests/cases.py`` in eval mode on one batch, new rule (old rule in parentheses), and
the best of a grid of fixed ε for reference:

=========================================  ==============================  ==============================  ================
state                                      float32                         bfloat16 autocast               bf16 best ε
=========================================  ==============================  ==============================  ================
BERT classifier, init / +20 / +60 K-FAC    1.0e-3 / 9e-4 / 6e-4            0.11 / 0.21 / 0.12              0.12 / 0.06 / 0.09
                                           (0.031 / 0.082 / 0.040)         (0.15 / 0.087 / 0.065)
masked-LM BERT, init / +20 / +60 K-FAC     0.027 / 0.011 / 0.006           0.22 / 0.12 / 0.29              0.13 / 0.08 / 0.16
                                           (0.045 / 0.012 / 0.008)         (0.15 / 0.50 / 0.90)
GPT-2, LSTM LM                             1.2e-3, 4.9e-3 (0.044, 5.8e-3)  0.31, 0.32 (0.25, 0.88)         0.18, 0.12
tanh/LayerNorm MLPs 5-8-3, 20-32-32-4      1.8e-3, 1.9e-3 (1.7e-3, 2.6e-3) 0.15, 0.19 (1.3, 0.92)          0.12, 0.08
ReLU: mnist1d MLP, CNN, ResNet             2.5e-3, 1.1e-3, 7e-4            5, 1.4, 0.68                    1.3, 0.52, 0.42
                                           (4.6e-4, 4.7, 1.3)              (9.6, 3.5, 1.3)
=========================================  ==============================  ==============================  ================

In float64 the error is 7e-8–1.1e-7 on the tiny, tanh and mnist1d MLPs (2e-8–1.5e-7
before).
Reading: in float32 at most 3% (the masked-LM BERT's 2.7% is the float32 rounding of
its gradient, the same at every ε). Under bfloat16 no fixed ε does better than 6–18%
on the smooth models and the rule lands within 0.9–3.7× of that best; ReLU networks
have no usable ε under bfloat16 (best 0.4–1.3: the perturbation switches units on and
off before it rises above the rounding), use ``hvp="exact"`` there. RENG's direction
``∇L + ρH∇L`` carries the error times ``ρ‖H∇L‖/‖∇L + ρH∇L‖``: at the default
ρ = 1e-3 on the two BERTs the direction is 0.3–1.2% off at the rule's ε under bfloat16,
against 0.2–1% at the best ε, which is the bfloat16 rounding of ∇L itself.

Under ``torch.autocast`` the first closure call runs in the caller's autocast state and
so does the perturbed one, although the rest of the step runs with autocast off
(:meth:`grng.CurvatureOptimizer.step`). Before the perturbed call the autocast cast
cache is cleared, and again after it: with ``optimizer.step(closure)`` inside an open
autocast block the cache still held the bfloat16 copies of the unperturbed weights,
which the perturbed pass reused (H∇L error 0.60 on the BERT classifier, 0.98 on the
20-32-32-4 MLP, against 0.11 and 0.19 with the cache cleared).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from grng._precision import compute_epsilon
from grng._warnings import warn
from grng.optim.base import Closure
from grng.optim.kfac import KFAC
from grng.optim.options import check_choice

HvpMethod = Literal["exact", "finite_difference"]

_NO_GRAPH = (
    "RENG(hvp='exact') needs the gradient's autograd graph: call optimizer.backward(loss) "
    "(or loss.backward(create_graph=True)) before optimizer.step(), or pass a closure that does; "
    "or use RENG(..., hvp='finite_difference') with optimizer.step(closure). In Hugging Face "
    "Trainer use grng.integrations.huggingface.GRNGTrainer, in Lightning mix "
    "grng.integrations.lightning.GRNGMixin into the LightningModule: both back-propagate "
    "with the graph. No parameter or state was changed."
)
_NO_CLOSURE = (
    "RENG(hvp='finite_difference') re-evaluates the loss at a perturbed point: call "
    "optimizer.step(closure) with a closure that zeroes the gradients, computes the loss, "
    "calls loss.backward() and returns the loss. Where the loop is not yours (Hugging Face "
    "Trainer calls optimizer.step() without a closure; Lightning with a GradScaler), use "
    "RENG(..., hvp='exact') with grng.integrations.huggingface.GRNGTrainer or "
    "grng.integrations.lightning.GRNGMixin. No parameter or state was changed."
)
_ACCUMULATED = (
    "RENG(hvp='finite_difference'): the gradient holds {passes} backward pass(es) run before "
    "optimizer.step(closure) that the closure did not zero (gradient accumulation, e.g. "
    "Lightning's accumulate_grad_batches > 1), but the perturbed pass re-evaluates only the "
    "closure, so H∇L would cover only its micro-batch. Let the closure compute every "
    "micro-batch (zero the gradients, then forward and backward each), or use "
    "RENG(..., hvp='exact'), which accumulates correctly (in Lightning, with "
    "grng.integrations.lightning.GRNGMixin; in a plain loop, optimizer.backward(loss) "
    "per micro-batch). Nothing was changed but the gradients the closure accumulated."
)
_CLOSURE_BACKWARD = {
    "exact": "call optimizer.backward(loss) (or loss.backward(create_graph=True))",
    "finite_difference": "call loss.backward()",
}
_NO_GRADIENT = (
    "RENG(hvp={hvp!r}): {when}, no parameter has a gradient: the closure passed to "
    "optimizer.step(closure) must zero the gradients (optimizer.zero_grad()), compute the "
    "loss, {backward} and return the loss. No parameter or state was changed."
)


#: The autograd node standing for "this gradient may not be differentiated again".
#: ``@once_differentiable`` backward functions return their gradients through one
#: whose inputs are fresh detached leaves, so ``torch.autograd.grad(..., inputs=params)``
#: prunes it and silently drops that part of H∇L instead of raising.
_ERROR_NODE = "torch::autograd::Error"


def _sum_of_squares(tensors: Iterable[Tensor]) -> Tensor:
    return torch.stack([t.pow(2).sum() for t in tensors]).sum()


def _double_backward_fails(params: list[Tensor], grads: dict[Tensor, Tensor]) -> bool:
    """Whether ``∇(½‖g‖²)`` over ``params``' own gradients raises or reaches an error node."""
    if _reaches_error_node(grads[p] for p in params):
        return True
    with torch.enable_grad():
        try:
            torch.autograd.grad(
                0.5 * _sum_of_squares(grads[p] for p in params),
                params,
                retain_graph=True,
                allow_unused=True,
            )
        except RuntimeError:
            return True
    return False


def _reaches_error_node(roots: Iterable[Tensor]) -> bool:
    """Whether the autograd graph of ``roots`` contains an error node (see ``_ERROR_NODE``).

    A walk over the gradient's graph: about 30 µs for a 3-layer MLP, under 1% of
    an exact RENG step, paid every step because the graph may change between steps.
    """
    stack: list[torch.autograd.graph.Node | None] = [t.grad_fn for t in roots]
    seen: set[torch.autograd.graph.Node] = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if node.name() == _ERROR_NODE:
            return True
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


@dataclass(frozen=True)
class _RngState:
    """The global RNG: the CPU generator and, once CUDA is initialized, every device's."""

    cpu: Tensor
    cuda: list[Tensor] | None

    @classmethod
    def now(cls) -> _RngState:
        # Querying CUDA before it is initialized would initialize it; a closure that
        # has not touched CUDA has not drawn from its generators either.
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        return cls(torch.get_rng_state(), cuda)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


class _BackwardPasses:
    """Counts the backward passes that accumulated into ``.grad`` since :meth:`reset`.

    A post-accumulate-grad hook on every trainable parameter notes the autograd
    graph task it runs in; each new task is one more pass. RENG's finite
    difference uses it to tell a gradient accumulated over micro-batches outside
    ``step(closure)`` (which the closure cannot re-evaluate) from one the closure
    computed itself.
    """

    def __init__(self, params: Iterable[Tensor]) -> None:
        self.count = 0
        self._last_task = -1
        self._handles = [
            p.register_post_accumulate_grad_hook(self._on_accumulate)
            for p in params
            if p.requires_grad
        ]

    def _on_accumulate(self, _: Tensor) -> None:
        task = torch._C._current_graph_task_id()
        if task != self._last_task:
            self.count += 1
            self._last_task = task

    def reset(self) -> None:
        self.count = 0
        self._last_task = -1

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class _OutputDtypes:
    """The floating dtypes of the outputs of hooked modules, inside :meth:`observing`.

    The forward hooks are plain functions over this object (not bound methods of
    the optimizer), so ``copy.deepcopy(model)`` copies no optimizer along.
    """

    def __init__(self) -> None:
        self._seen: set[torch.dtype] | None = None

    def attach(self, module: nn.Module) -> RemovableHandle:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.note(output)

        return module.register_forward_hook(hook)

    def note(self, output: Any) -> None:
        seen = self._seen
        if seen is None:
            return
        # A tensor, or one level of a tuple/list/dict (an LSTM's, a transformers ModelOutput).
        candidates: Iterable[Any]
        if isinstance(output, Tensor):
            candidates = (output,)
        elif isinstance(output, dict):
            candidates = output.values()
        elif isinstance(output, (tuple, list)):
            candidates = output
        else:
            return
        for t in candidates:
            if isinstance(t, Tensor) and t.is_floating_point():
                seen.add(t.dtype)

    @contextmanager
    def observing(self) -> Iterator[set[torch.dtype]]:
        """Collect the dtypes in the block into the yielded set."""
        seen: set[torch.dtype] = set()
        self._seen = seen
        try:
            yield seen
        finally:
            self._seen = None


def loss_scale(scaler: Any) -> Tensor | None:
    """The current scale of an enabled ``torch.amp.GradScaler`` (a device tensor, no
    sync), or None without a scaler (or with a disabled one)."""
    if scaler is None or not scaler.is_enabled():
        return None
    scale = getattr(scaler, "_scale", None)
    if isinstance(scale, Tensor):
        return scale.reshape(())
    return torch.as_tensor(float(scaler.get_scale()))


def graph_of_unscaled(gradient: Tensor, scale: Tensor) -> Tensor:
    """``S·g`` by value, with the autograd graph of ``g`` (call with grad enabled).

    A GradScaler multiplies the loss by ``S`` and later divides ``.grad`` by ``S``
    in place (``unscale_``), which changes the values but not the graph: RENG
    would differentiate ``½‖·‖²`` through the graph of ``S·g`` and get H∇L ``S``
    times too large. ``S·g + (g − g.detach())`` has the scaled values the scaler
    expects (its inf/NaN check included) and the graph of the unscaled gradient.
    """
    if gradient.grad_fn is None:
        return gradient
    unscaled = gradient / scale.to(device=gradient.device, dtype=gradient.dtype)
    return gradient.detach() + (unscaled - unscaled.detach())


def accumulate_with_graph(
    params: Sequence[Tensor], gradients: Sequence[Tensor | None], scale: Tensor | None
) -> None:
    """``p.grad ← p.grad + g`` for each new gradient ``g`` with its autograd graph, as
    ``backward(create_graph=True)`` accumulates; with a loss scale ``S`` each ``g`` (the
    gradient of ``S·L``) keeps its values and takes the graph of the unscaled gradient
    (:func:`graph_of_unscaled`)."""
    with torch.enable_grad():
        for p, g in zip(params, gradients, strict=True):
            if g is not None:
                g = g if scale is None else graph_of_unscaled(g, scale)
                p.grad = g if p.grad is None else p.grad + g


def _buffer_snapshot(model: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """(buffer, copy of its value) for every buffer of ``model``, to undo a forward's updates."""
    return [(b, b.detach().clone()) for b in model.buffers()]


class RENG(KFAC):
    """Preconditions ``∇L + ρ H∇L`` with the Kronecker-factored Fisher.

    Training loops::

        # exact (default): the gradients with their graph, then an ordinary step
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        optimizer.backward(loss)
        optimizer.step()

        # finite differences (or exact, with optimizer.backward(loss) inside): a closure
        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        optimizer.step(closure)

    ``optimizer.backward(loss)`` is ``loss.backward(create_graph=True)`` without
    torch's warning about a reference cycle between a parameter and its gradient:
    that cycle is real while ``.grad`` holds the graph, and :meth:`step` breaks it.
    ``loss.backward(create_graph=True)`` still works (and warns). A closure that
    leaves no gradient raises a RuntimeError naming the fix.

    Under DistributedDataParallel use ``hvp="finite_difference"``: DDP averages
    both of its backward passes, whereas it does not synchronise second-order
    gradients (``hvp="exact"`` raises there).

    With ``hvp="finite_difference"`` the closure runs once more at ``θ + εĝ``,
    replaying the global RNG of its first call (the same dropout masks), with the
    model's buffers (BatchNorm running statistics) restored afterwards; the
    random stream continues as after one call. Randomness drawn from the
    closure's own ``torch.Generator`` is not replayed (see the module docstring).

    Args:
        model: the network to optimize.
        lr: learning rate η (default 0.1, damping 1). The defaults of lr and damping were
            chosen across tasks (a BERT classifier, mnist1d, a ResNet, GPT-2, an LSTM) by
            the sweep in ``docs/tuning.md``; see there for when to change them.
        rho: gradient-regularization strength ρ ≥ 0 (ρ = 0 is K-FAC; no
            second-order work is done then). Since ``∇L + ρH∇L = ∇L(θ + ρ∇L) + O(ρ²)``,
            ρ is the length of a SAM-like ascent step ``θ + ρ∇L`` whose gradient is
            preconditioned. The default 1e-3 keeps that step far smaller than the
            descent step so the first-order expansion holds, and equals RING's
            default: both then regularize towards the same ``L_G``.
        damping: damping λ > 0.
        hvp: ``"exact"`` or ``"finite_difference"`` (see the module docstring).
        **kwargs: as for :class:`grng.KFAC`.
    """

    hyperparameters = (*KFAC.hyperparameters, "rho")

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.1,
        rho: float = 1e-3,
        damping: float = 1.0,
        *,
        hvp: HvpMethod = "exact",
        **kwargs: Any,
    ) -> None:
        self.hvp = check_choice("hvp", hvp, ("exact", "finite_difference"))
        super().__init__(model, lr=lr, damping=damping, rho=rho, **kwargs)
        if self.hvp == "exact" and self.distributor.world_size > 1:
            self.capture.remove()
            raise ValueError(
                "hvp='exact' is not supported under torch.distributed: DistributedDataParallel "
                "does not synchronise second-order gradients, so each rank would precondition "
                "its own H∇L. Use RENG(..., hvp='finite_difference') with optimizer.step(closure): "
                "both of its backward passes are averaged by DDP."
            )
        #: The global RNG state right before this step's first closure call, replayed
        #: by the finite-difference pass; None outside :meth:`step`.
        self._closure_rng: _RngState | None = None
        #: Finite differences: backward passes into ``.grad`` since the last step or
        #: ``zero_grad`` (gradient accumulation outside the closure is refused).
        self._passes = (
            _BackwardPasses(p for g in self.param_groups for p in g["params"])
            if self.hvp == "finite_difference"
            else None
        )
        self._zero_grad_calls = 0
        #: Finite differences: the dtypes the step's first closure call computed in
        #: (see ``_finite_difference_epsilon``); None outside that call and the step.
        self._compute_dtypes: frozenset[torch.dtype] | None = None
        self._output_dtypes = _OutputDtypes()
        self._warned_unobserved = False
        if self.hvp == "finite_difference":
            # Registered once (a compiled model traces them into its graph); part of the
            # capture's handles, so that ``capture.remove()`` detaches them too.
            # A ScriptModule refuses forward hooks; it goes unobserved (module docstring).
            for module in self.model.modules():
                if isinstance(module, torch.jit.ScriptModule):
                    continue
                if next(module.parameters(recurse=False), None) is not None:
                    self.capture._handles.append(self._output_dtypes.attach(module))

    def backward(self, loss: Tensor) -> None:
        """The gradients for :meth:`step`: ``loss.backward(create_graph=True)``, without the warning.

        With ``hvp="exact"`` it computes the trainable parameters' gradients with
        ``torch.autograd.grad(loss, params, create_graph=True)`` and adds them to
        ``.grad`` as ``backward`` does (gradient accumulation works). torch's
        ``loss.backward(create_graph=True)`` warns that each parameter and its
        gradient then keep each other alive; :meth:`step` ends that by replacing
        ``.grad`` with its detached value, so in this loop the warning is noise.
        The statistics are captured as with ``loss.backward()``. With
        ``hvp="finite_difference"`` (no graph needed) it is ``loss.backward()``.
        Unlike ``loss.backward()``, it runs no post-accumulate-grad hooks.

        With a GradScaler (``optimizer.grad_scaler = scaler``, then
        ``optimizer.backward(scaler.scale(loss))`` and ``scaler.step(optimizer)``)
        each gradient keeps the scaled values the scaler unscales and checks, with
        the graph of the unscaled gradient (:func:`graph_of_unscaled`), so H∇L is
        that of the unscaled loss.
        """
        if self.hvp != "exact":
            loss.backward()
            return
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        with torch.enable_grad():
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        accumulate_with_graph(params, grads, loss_scale(self.grad_scaler))

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        if self._passes is not None and not self.capture.is_paused:
            self._passes.reset()
            self._zero_grad_calls += 1

    def step(self, closure: Closure | None = None) -> Tensor | None:  # type: ignore[override]
        """One optimization step; with finite differences the closure's randomness is replayed.

        The base step calls the closure first: the RNG state taken here is the one
        that call starts from, so the perturbed pass can draw the same dropout masks.
        A closure after whose first call no parameter has a gradient raises a
        RuntimeError before anything changes (the base step would silently do nothing).
        With finite differences, so does a gradient accumulated over backward passes
        run before ``step(closure)`` that the closure did not zero (Lightning's
        ``accumulate_grad_batches > 1``): the perturbed pass would re-evaluate only
        the closure's micro-batch.
        """
        if closure is None:
            loss = super().step()
            if self._passes is not None:
                self._passes.reset()
            return loss
        first_call = True
        earlier_passes = self._passes.count if self._passes is not None else 0
        zero_grad_calls = self._zero_grad_calls

        def checked_closure() -> Tensor:
            nonlocal first_call
            if first_call and self.hvp == "finite_difference":
                # Which precision the clean pass computes in (the step ε depends on it).
                with self._output_dtypes.observing() as seen:
                    loss = closure()
                self._compute_dtypes = frozenset(seen)
            else:
                loss = closure()
            if first_call and not self._any_gradient():
                raise RuntimeError(self._no_gradient_message("after the closure ran"))
            if (
                first_call
                and earlier_passes
                and self._zero_grad_calls == zero_grad_calls
                and self._passes is not None
                and self._passes.count > earlier_passes  # the closure back-propagated too
            ):
                raise RuntimeError(_ACCUMULATED.format(passes=earlier_passes))
            first_call = False
            return loss

        if self.hvp != "finite_difference":
            return super().step(checked_closure)
        self._closure_rng = _RngState.now()
        try:
            loss = super().step(checked_closure)
        finally:
            self._closure_rng = None
            self._compute_dtypes = None
        assert self._passes is not None
        self._passes.reset()
        return loss

    def _any_gradient(self, params: Iterable[Tensor] | None = None) -> bool:
        if params is None:
            params = (p for group in self.param_groups for p in group["params"])
        return any(p.grad is not None for p in params)

    def _no_gradient_message(self, when: str) -> str:
        return _NO_GRADIENT.format(hvp=self.hvp, when=when, backward=_CLOSURE_BACKWARD[self.hvp])

    def _search_gradients(
        self, grads: dict[Tensor, Tensor], closure: Closure | None
    ) -> dict[Tensor, Tensor]:
        rho = {p: group["rho"] for group in self.param_groups for p in group["params"]}
        if all(rho[p] == 0 for p in grads):
            self._release_graph(grads)
            return grads
        if self.hvp == "exact":
            product = self._exact_product(grads)
        else:
            if closure is None:
                raise RuntimeError(_NO_CLOSURE)
            product = self._finite_difference_product(grads, closure)
        return {p: g.detach() + rho[p] * product[p] for p, g in grads.items()}

    def _release_graph(self, grads: dict[Tensor, Tensor]) -> None:
        for p, g in grads.items():
            if g.grad_fn is not None:
                p.grad = g.detach()

    def _exact_product(self, grads: dict[Tensor, Tensor]) -> dict[Tensor, Tensor]:
        """``H∇L = ∇(½‖∇L‖²)`` by double backpropagation (no statistics captured)."""
        params = [p for p, g in grads.items() if g.requires_grad]
        if not params:
            raise RuntimeError(_NO_GRAPH)
        if _reaches_error_node(grads[p] for p in params):
            raise RuntimeError(
                self._explain_double_backward_failure(
                    params,
                    grads,
                    "its gradient passes through a torch.autograd.Function whose backward "
                    "is marked @once_differentiable (autograd would silently drop that part "
                    "of H∇L)",
                )
            )
        with torch.enable_grad(), self.capture.paused():
            half_sq_norm = 0.5 * _sum_of_squares(grads[p] for p in params)
            try:
                product = torch.autograd.grad(
                    half_sq_norm, params, retain_graph=True, allow_unused=True
                )
            except RuntimeError as error:
                raise RuntimeError(
                    self._explain_double_backward_failure(params, grads, error)
                ) from error
        self._release_graph(grads)
        out = {p: torch.zeros_like(p) for p in grads}
        out.update({p: h.detach() for p, h in zip(params, product, strict=True) if h is not None})
        return out

    def _explain_double_backward_failure(
        self, params: list[Tensor], grads: dict[Tensor, Tensor], error: RuntimeError | str
    ) -> str:
        """Name the module whose backward cannot be differentiated.

        The gradient of a module's parameters flows through the backward of every
        module after it, so double backward fails (raises, or reaches an error
        node) for the parameters of the culprit and of everything before it: the
        culprit is the last module that fails, or one of the parameter-free
        modules registered right after it, which are listed as candidates.
        """
        differentiated = {id(p) for p in params}
        # In registration order (a Sequential's forward order): (name, whether double
        # backward fails) for modules with parameters, (name, None) for parameter-free leaves.
        verdicts: list[tuple[str, bool | None]] = []
        for name, module in self.model.named_modules():
            own = [p for p in module.parameters(recurse=False) if id(p) in differentiated]
            if own:
                verdicts.append((name or type(module).__name__, _double_backward_fails(own, grads)))
            elif next(module.children(), None) is None:
                verdicts.append((name, None))
        failing = [i for i, (_, fails) in enumerate(verdicts) if fails]
        if failing:
            after = itertools.takewhile(lambda v: v[1] is None, verdicts[failing[-1] + 1 :])
            candidates = ", ".join(repr(name) for name, _ in after)
            where = (
                f"module {verdicts[failing[-1]][0]!r} (or a parameter-free operation right "
                f"after it{', e.g. in module ' + candidates if candidates else ''})"
            )
        else:
            where = "an operation of the model"
        return (
            f"RENG(hvp='exact'): double backward is not implemented for {where}: {error}. "
            "Use RENG(..., hvp='finite_difference'), which needs no double backward."
        )

    #: ``s`` in the finite-difference step ``ε = s·sqrt(eps_c)·(1 + mean|θ_i|)``
    #: (module docstring, "The step ε").
    finite_difference_scale: float = 0.2

    def _finite_difference_epsilon(self, params: list[Tensor]) -> Tensor:
        """``ε = s·sqrt(eps_c)·(1 + mean_i |θ_i|)``, a float64 device scalar (no sync).

        ``eps_c`` is the machine epsilon of the lowest precision among the parameters'
        dtypes and the dtypes the first closure call of this step computed in (see the
        module docstring, "The step ε").
        """
        dtypes = {p.dtype for p in params}
        observed = self._compute_dtypes
        if observed is not None:
            if not observed and not self._warned_unobserved:
                self._warned_unobserved = True
                warn(
                    "RENG(hvp='finite_difference'): no module holding parameters ran during "
                    "the closure's first call as far as its forward hooks saw (a model "
                    "compiled and run before the optimizer was built?), so the step ε "
                    "assumes the closure computes in the parameters' precision: under "
                    "torch.autocast it is then too small and H∇L mostly rounding noise. "
                    "Build the optimizer before the first call of the compiled model. "
                    "Warning once.",
                    RuntimeWarning,
                )
            dtypes |= observed
        eps = compute_epsilon(dtypes)
        abs_sum = torch.stack([p.detach().abs().sum(dtype=torch.float64) for p in params]).sum()
        count = sum(p.numel() for p in params)
        return self.finite_difference_scale * math.sqrt(eps) * (1.0 + abs_sum / max(count, 1))

    def _finite_difference_product(
        self, grads: dict[Tensor, Tensor], closure: Closure
    ) -> dict[Tensor, Tensor]:
        """``(∇L(θ + εĝ) − ∇L(θ))·‖g‖/ε``; θ, ``.grad`` and the buffers are restored exactly.

        Inside :meth:`step` the closure replays the RNG state of the first call (the
        same dropout masks), and the RNG is then set to where that call left it.
        Called directly, outside a step, there is no first call's state to replay: the
        closure draws from the current state, which is restored afterwards all the same.
        """
        params = list(grads)
        clean = [grads[p].detach() for p in params]
        dtype = params[0].dtype
        norm = torch.sqrt(_sum_of_squares(g.double() for g in clean))
        epsilon = self._finite_difference_epsilon(params)
        # A zero gradient has a zero product; the clamp only avoids 0/0.
        shift = (epsilon / norm.clamp_min(torch.finfo(torch.float64).tiny)).to(dtype)
        saved = [p.detach().clone() for p in params]
        # A second forward would move BatchNorm's running statistics (and count it).
        buffers = _buffer_snapshot(self.model)
        # Where the first closure call left the RNG: the caller's stream resumes there.
        rng_after_first_call = _RngState.now()
        try:
            with torch.no_grad():
                for p, g in zip(params, clean, strict=True):
                    p.add_(g * shift.to(p.dtype))
                    # The clean gradient is kept in ``clean``; starting from None makes the
                    # product right even for a closure that does not zero the gradients.
                    p.grad = None
            if self._closure_rng is not None:
                # Draw the very masks of the clean pass, or the difference measures the
                # gap between two random sub-networks instead of the curvature.
                self._closure_rng.restore()
            with torch.enable_grad(), self.capture.paused():
                closure()
            if not self._any_gradient(params):
                # Zeros would turn H∇L into −∇L·‖∇L‖/ε, a huge step the wrong way.
                raise RuntimeError(
                    self._no_gradient_message(
                        "after the closure's second (perturbed) call, which must "
                        "back-propagate as the first did"
                    )
                )
            perturbed = [
                p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                for p in params
            ]
        finally:
            rng_after_first_call.restore()
            with torch.no_grad():
                for p, original, g in zip(params, saved, clean, strict=True):
                    p.copy_(original)
                    p.grad = g
                for buffer, value in buffers:
                    buffer.copy_(value)
        scale = (norm / epsilon).to(dtype)
        return {
            p: (g_plus - g) * scale.to(p.dtype)
            for p, g_plus, g in zip(params, perturbed, clean, strict=True)
        }
