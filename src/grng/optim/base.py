"""The optimizer base every GRNG method shares.

:class:`CurvatureOptimizer` is a ``torch.optim.Optimizer`` built from a model. It
owns the curvature capture (:mod:`grng.curvature`), decides on which steps the
hooks record, and runs one step as::

    g      = gradients of the trainable parameters            (p.grad)
    d      = search gradient (g, or ∇L_G for RENG)            _search_gradients
    ok     = every gradient and captured statistic is finite  (device tensor, no sync)
    curvature ← update from this step's statistics, if any    _update_curvature
    Δ      = preconditioned d per Kronecker layer             _precondition_layer
             and d / (v + γ) for every other parameter        (diagonal fallback)
    ν      = min(1, sqrt(κ / Σ lr² ⟨Δ, d⟩))                   KL clip
    b      ← μ b + ν Δ                                        momentum
    θ      ← θ (1 − lr·wd) − lr b                             decoupled weight decay

with every state change masked by ``ok``, so a non-finite step changes nothing
without a host synchronisation. Subclasses supply the curvature: how it is
updated from statistics, refreshed, and applied to one layer's gradient matrix.

Cost of a step. The per-parameter bookkeeping (the squared gradient norms, the
finiteness check, the KL clip's sum, momentum, weight decay, the masked update, the
diagonal Fisher) runs as ``torch._foreach_*`` ops over *buckets*: the parameters of
one group with one device and dtype, precomputed and rebuilt when ``param_groups``
or a parameter's dtype or device changes. Parameters are updated in place; each
step's directions become the new momentum buffers. An ordinary step (neither a
capture nor a refresh step) reads nothing back to the host (except Newton–Schulz
inverses with adaptive damping, RING's ``inverse="newton_schulz"``, which check
their damping shift on the host: :mod:`grng.optim.kfac`): the flag ``ok`` stays on
the device, the skipped-step counter too, and a skipped step is warned about at the
end of the next refresh step (every ``inverse_update_freq`` steps), on CPU as
elsewhere; ``nonfinite="raise"`` reads the flag on every step (one synchronisation).
Denormal floats, which gradients become as the loss approaches 0 and which many CPUs
process far more slowly than normal ones (RING's step was seen to slow down on
them, AdamW's not), are flushed to zero while :meth:`CurvatureOptimizer.step` runs
after the closure's first call (RENG's finite-difference re-evaluation runs inside):
``torch.set_flush_denormal(True)``, switched off again on exit unless it was on
before (:func:`flushing_denormals`; torch has no getter, so
:func:`flushes_denormals` probes the mode). The mode is per CPU thread: it covers
the calling thread, so every op of a single-threaded run
(``torch.set_num_threads(1)``) and every op too small to be split across threads
(ATen's grain is 32768 elements); intra-op worker threads (ATen's, MKL's) keep the
mode they were created with, so work split across them may still meet denormals;
accelerators are not affected. Setting ``flush_denormal = False`` on an optimizer
keeps denormals.

Parameters and blocks. Every parameter of the model is in ``param_groups``, frozen
ones included (as in ``torch.optim``, a parameter without ``.grad`` is not
touched), and the Kronecker blocks are built once, over all of them: a parameter
frozen at construction and unfrozen later (gradual unfreezing) trains from then
on with curvature, exactly as one frozen after construction would. A block is
*active* while its weight requires a gradient: only then does the capture record
it (no work for frozen layers) and does it precondition its parameters; a
trainable bias of an inactive block gets the diagonal fallback. A bias frozen at
construction while its weight trains is left out of the block (it has no bias
column; if unfrozen later it gets the diagonal fallback). Blocks come from the
registered layer adapters (:func:`grng.register_layer`), minus modules in
``exclude=``; a factor side wider than ``max_factor_dim`` is kept diagonal.
:meth:`CurvatureOptimizer.coverage` lists which curvature each parameter gets.

Groups. ``param_groups=`` puts named parameters in groups of their own
hyperparameters; the unlisted ones form the first (default) group. ``lr`` (also
its ``lr²`` in the KL clip's sum), ``momentum``, ``weight_decay`` and RENG's /
R-Kalman's ``rho`` apply per parameter from its own group; a block's damping γ (``damping``, and RING's
``rho`` inside ``λ + ρ‖g‖²``) is that of its *weight*'s group, also for its bias
when the bias is in another group. As in torch.optim, ``lr`` may be a number or a
one-element floating-point tensor (``lr=torch.tensor(0.01)``), which a scheduler
updates in place; a CPU tensor enters the step's kernels as a number, on any
device, without a copy.

State layout (all of it travels in ``state_dict``):

* ``state[param]`` holds per-parameter buffers (``momentum_buffer``);
* ``state["layer:<block name>"]`` holds a Kronecker block's curvature (the module's
  name, or with a suffix for modules of several blocks: ``attn.in_proj.q``,
  ``conv.group1``; a model that is itself one block is named by its type); it is
  empty until the block's first capture (a frozen block's stays empty);
* ``state["diagonal:<param name>"]`` holds a fallback parameter's ``fisher_diagonal``;
* ``state["counters"]`` holds ``step`` and ``nonfinite_steps``.

``param_groups`` lists every parameter of the model (frozen ones too), in
``model.parameters()`` order within each group. Names are those of the model,
without the ``module.`` that a (Distributed)DataParallel wrapper adds or the
``_orig_mod.`` of ``torch.compile`` (:func:`grng.distributed.strip_wrapper_prefix`),
so the state does not depend on whether the optimizer was built on the wrapper
or on the model inside. Under ``torch.distributed`` the statistics are made
global on capture steps and the refresh work may be sharded across ranks
(:mod:`grng.distributed`, option ``distributed``).

Curvature entries are keyed by name rather than by parameter because
``torch.optim`` casts parameter-keyed state to the parameter's dtype on load,
and curvature is kept in float32 even for half-precision models.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from grng._precision import outside_autocast
from grng._warnings import warn
from grng.curvature import CurvatureCapture, FactorEstimate, KroneckerLayer, find_kronecker_layers
from grng.curvature.fisher import Likelihood, loss_terms, sampled_nll
from grng.curvature.layers import parameters_of
from grng.distributed import (
    CurvatureShard,
    Distributor,
    make_distributor,
    strip_wrapper_prefix,
    unwrap_model,
)
from grng.linalg import factor_diagonal
from grng.optim.coverage import (
    Coverage,
    CoverageWarning,
    capped_sides_warning,
    coverage_of,
    diagonal_warning,
)
from grng.optim.options import CurvatureOptions, check_group_hyperparameters
from grng.optim.selection import (
    ExcludeRule,
    excluded_modules,
    model_parameters,
    resolve_param_groups,
)

Closure = Callable[[], Tensor]


def statistics_dtype(t: Tensor) -> torch.dtype:
    """Curvature and norms are computed in float32, or float64 for float64 tensors."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class CurvatureOptimizer(Optimizer):
    """Shared machinery of KFAC, RING, RENG and R-Kalman (see the module docstring).

    Args:
        model: the network, after its first forward pass if it has lazy modules. All
            its parameters (frozen ones too, see the module docstring) are optimized;
            the modules with a registered layer adapter (Linear, Conv1d/2d,
            MultiheadAttention, Embedding, :func:`grng.register_layer`) get Kronecker
            curvature and every other parameter the diagonal fallback
            (:meth:`coverage`). At least one parameter must require a gradient.
        defaults: per-group hyperparameters (``lr``, ``damping``, ``momentum``,
            ``weight_decay`` and any the subclass adds).
        options: the curvature options (``max_factor_dim`` caps the dense factor sides).
        exclude: modules whose parameters get the diagonal fallback instead of
            Kronecker curvature: module names (as in ``model.named_modules()``,
            without wrapper prefixes; a name excludes the module and its
            descendants), module types (every instance, with its descendants), or
            predicates ``(name, module) -> bool``; one of them or a list. An unknown
            name raises ValueError naming it.
        param_groups: ``torch.optim``-style groups, ``[{"params": [...], "weight_decay":
            0.0}, ...]``, whose ``"params"`` name parameters of the model (names as in
            ``model.named_parameters()`` without wrapper prefixes, or the Parameter
            objects) and whose other keys are per-group hyperparameters of the class
            (``hyperparameters``). The parameters no group lists form the default group,
            first; a parameter listed twice or unknown raises ValueError naming it, an
            unknown key TypeError. See the module docstring ("Groups") for which group
            a block's damping comes from.

    Construction warns (:class:`grng.CoverageWarning`) once when ``max_factor_dim``
    keeps a factor side diagonal, naming the sides, and once when more than 10% of the
    trainable scalars, outside ``exclude``, get only the diagonal fallback.
    """

    #: Whether :meth:`damping` reads the block's own gradient norm (RING with
    #: ``grad_norm="layer"``); only then is it computed (from the rows themselves for
    #: blocks that hold some rows of their parameters: attention's q, k, v; conv groups).
    uses_block_grad_norm: bool = False

    #: Whether the damping depends on the step's gradient (RING); used to know when
    #: a Newton–Schulz inverse at a reference damping can be shifted.
    adaptive_damping: bool = False

    #: The per-group hyperparameters a constructor may put in ``defaults``; any other
    #: keyword (a typo such as ``dampin=``) is refused with a TypeError naming it.
    hyperparameters: tuple[str, ...] = ("lr", "damping", "momentum", "weight_decay")

    #: Whether :meth:`step` flushes denormal floats to zero on the calling thread while
    #: it runs (module docstring, "Cost of a step"); set it to False on an instance to
    #: keep denormals.
    flush_denormal: bool = True

    def __init__(
        self,
        model: nn.Module,
        defaults: dict[str, Any],
        options: CurvatureOptions,
        *,
        exclude: ExcludeRule | Iterable[ExcludeRule] | None = None,
        param_groups: Sequence[Mapping[str, Any]] | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self._refuse_unknown_hyperparameters(defaults)
        check_group_hyperparameters(defaults)
        params = model_parameters(model)
        if not any(p.requires_grad for p in params):
            raise ValueError("model has no trainable parameters (none with requires_grad=True)")
        self._param_names = {p: strip_wrapper_prefix(n, model) for n, p in model.named_parameters()}
        groups = resolve_param_groups(
            param_groups, params, model, defaults, self._refuse_unknown_hyperparameters
        )
        #: The modules ``exclude`` names, with their descendants (diagonal fallback).
        self.excluded_modules: set[nn.Module] = excluded_modules(exclude, model)
        super().__init__(groups, defaults)
        #: Buckets of parameters for the foreach ops, rebuilt when ``param_groups`` or a
        #: parameter's placement changes (:meth:`_current_layout`).
        self._layout: _Layout | None = None
        self.model = model
        self.options = options
        self.layers: list[KroneckerLayer] = find_kronecker_layers(
            model,
            set(params),
            excluded=lambda name, module: module in self.excluded_modules,
            max_factor_dim=options.max_factor_dim,
        )
        inner, path = unwrap_model(model)
        for layer in self.layers:
            if layer.module is inner and inner is not model:
                # The wrapped model is itself a block: named by its type, as when unwrapped.
                layer.name = type(inner).__name__ + layer.name[len(path) :]
            else:
                layer.name = strip_wrapper_prefix(layer.name, model)
        #: Every parameter a Kronecker block reads, active or not (module docstring).
        self._blocks_of: dict[Tensor, list[KroneckerLayer]] = parameters_of(self.layers)
        self.capture = CurvatureCapture(
            model,
            self.layers,
            options.fisher,
            loss_reduction=options.loss_reduction,
            max_statistics_rows=options.max_statistics_rows,
        )
        self.capture.armed = True
        self.distributor: Distributor = make_distributor(options.distributed)
        #: Layer name -> the rank that computes its refreshed curvature when sharding.
        self.curvature_owner: dict[str, int] = self.distributor.assign(self.layers)
        self._fisher_generator: torch.Generator | None = None
        #: A ``torch.amp.GradScaler`` whose loss scale the captured output gradients carry:
        #: set it (``optimizer.grad_scaler = scaler``) when training with one, so that the
        #: gradient factors are divided by the scale² on the device, without a sync.
        self.grad_scaler: Any = None
        self._warned_nonfinite = 0
        #: The current step's finiteness flag (a device bool), for subclass code that
        #: would otherwise write state (e.g. re-invert) during a step that will be skipped.
        self._step_finite: Tensor = torch.ones((), dtype=torch.bool)
        #: (dtype, device) of every parameter when the state was last placed.
        self._placement = self._parameter_placement()
        self.named_state("counters").update(
            {
                "step": 0,
                "nonfinite_steps": torch.zeros((), dtype=torch.int64, device=params[0].device),
            }
        )
        try:
            # Collective: every rank raises (naming the difference) rather than hanging later.
            self.distributor.check_consistent(self._fingerprint())
            for message in self._construction_warnings():
                if message is not None:
                    warn(message, CoverageWarning)
        except BaseException:
            self.capture.remove()  # a failed constructor leaves no hook on the model
            raise

    def _construction_warnings(self) -> list[str | None]:
        """The coverage messages the constructor warns with (None: nothing to say); a
        subclass extends the list."""
        return [diagonal_warning(self, self.coverage()), capped_sides_warning(self)]

    def coverage(self) -> Coverage:
        """Which curvature each parameter of the model gets now (printable table).

        One :class:`grng.optim.coverage.CoverageEntry` per parameter of
        ``model.named_parameters()`` (a tied parameter once, wrapper prefixes
        removed) with its ``kind`` (``"kronecker"``, ``"diagonal"``, ``"frozen"``:
        not requiring a gradient now), owning ``module_type``, ``numel`` and the
        Kronecker ``blocks`` that read it. ``print(optimizer.coverage())`` shows a
        table with the total per kind.
        """
        return coverage_of(self)

    # ------------------------------------------------------------------ groups
    def _refuse_unknown_hyperparameters(self, group: dict[str, Any], where: str = "") -> None:
        unknown = sorted(set(group) - set(self.hyperparameters) - {"params"})
        if unknown:
            raise TypeError(
                f"{where + ': ' if where else ''}{type(self).__name__} got unexpected "
                "keyword argument(s) "
                f"{', '.join(map(repr, unknown))}; its hyperparameters are "
                f"{', '.join(self.hyperparameters)}"
            )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As in torch.optim; parameters added here get the diagonal fallback."""
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        if self.defaults:  # during Optimizer.__init__ the defaults were checked already
            self._refuse_unknown_hyperparameters(param_group)
            check_group_hyperparameters(merged)
        super().add_param_group(param_group)

    # -------------------------------------------------------------- properties
    def named_state(self, key: str) -> dict[str, Any]:
        """A name-keyed state entry (curvature, counters), created empty if missing."""
        state = cast(dict[Any, Any], self.state)
        if key not in state:
            state[key] = {}
        return cast(dict[str, Any], state[key])

    @property
    def counters(self) -> dict[str, Any]:
        return self.named_state("counters")

    @property
    def steps_taken(self) -> int:
        """Completed calls of :meth:`step` (skipped non-finite steps included)."""
        return int(self.counters["step"])

    @property
    def nonfinite_steps(self) -> int:
        """Steps skipped because of non-finite values (reading it synchronises)."""
        return int(self.counters["nonfinite_steps"])

    def is_capture_step(self, step: int | None = None) -> bool:
        """Whether the statistics of ``step`` (default: the coming one) are captured."""
        step = self.steps_taken if step is None else step
        return step % self.options.factor_update_freq == 0

    def is_refresh_step(self, step: int | None = None) -> bool:
        step = self.steps_taken if step is None else step
        return step % self.options.inverse_update_freq == 0

    # ---------------------------------------------------------------- MC Fisher
    def backward_fisher(self, outputs: Tensor, likelihood: Likelihood = "categorical") -> None:
        """Feed the gradient factors from labels sampled from the model (``fisher="mc"``).

        Call it after the forward pass and before ``loss.backward()``::

            logits = model(x)
            optimizer.backward_fisher(logits)
            F.cross_entropy(logits, y).backward()
            optimizer.step()

        It samples ``y ~ p(y|x)`` (see :func:`grng.curvature.sampled_nll`) and
        back-propagates that loss to the Kronecker layers only (``.grad`` is not
        touched). It is free on steps that do not capture statistics.

        Each call is the mean of its own ``M`` terms (:func:`grng.curvature.fisher.loss_terms`:
        every leading index of categorical logits, the batch for the Gaussian),
        whatever ``loss_reduction`` says; over the calls since the last step
        (micro-batches) ``G = Σ_p Σ_rows g gᵀ / Σ_p M_p`` for the per-term output
        gradients ``g`` (see :mod:`grng.curvature.capture`, "Normalisation").
        """
        if self.options.fisher != "mc":
            raise RuntimeError(
                "backward_fisher needs fisher='mc'; this optimizer uses the empirical Fisher"
            )
        if not self.is_capture_step() or not self.layers:
            return
        if self._fisher_generator is None or self._fisher_generator.device != outputs.device:
            self._fisher_generator = self._new_fisher_generator(outputs.device)

        terms = loss_terms(outputs, likelihood)
        with torch.enable_grad(), self.capture.fisher_pass(terms):
            loss = sampled_nll(outputs, likelihood, self._fisher_generator)
            weights = list(dict.fromkeys(layer.weight for layer in self._active_layers()))
            if weights:
                torch.autograd.grad(loss, weights, retain_graph=True, allow_unused=True)

    #: Whether :meth:`_warn_if_fisher_missing` has warned (once per optimizer).
    _warned_missing_fisher: bool = False

    def _warn_if_fisher_missing(
        self, grads: dict[Tensor, Tensor], estimates: dict[str, FactorEstimate]
    ) -> None:
        """Warn once when a ``fisher="mc"`` capture step found no Monte-Carlo statistics.

        Only ``backward_fisher`` feeds the factors in that mode; without it the step
        runs on the damping and the diagonal fallback alone. Python-side checks only
        (no host synchronisation).
        """
        if self.options.fisher != "mc" or estimates or self._warned_missing_fisher:
            return
        if not any(layer.weight in grads for layer in self._active_layers()):
            return  # no Kronecker block had a gradient: nothing was missed
        self._warned_missing_fisher = True
        warn(
            f"{type(self).__name__}(fisher='mc'): this capture step found no Monte-Carlo "
            "Fisher statistics, so no Kronecker factor was updated (the step used only the "
            "damping and the diagonal fallback). Call optimizer.backward_fisher(logits) "
            "after the forward pass and before loss.backward() (and after "
            "optimizer.zero_grad(), which discards captured statistics), or use "
            "fisher='empirical'. Warning once.",
            RuntimeWarning,
        )

    def _new_fisher_generator(self, device: torch.device) -> torch.Generator:
        generator = torch.Generator(device=device)
        saved = self.counters.get("fisher_rng_state")
        if saved is not None and saved.numel() == generator.get_state().numel():
            # Resumed from a state_dict: continue the very same stream of labels.
            generator.set_state(saved)
        else:
            # Offset by the rank: data-parallel ranks draw independent labels.
            generator.manual_seed(int(self.counters.get("fisher_seed", 0)) + self.distributor.rank)
        return generator

    # --------------------------------------------------------------- the step
    def zero_grad(self, set_to_none: bool = True) -> None:
        """As in torch.optim; also forgets statistics captured for the discarded gradients.

        Inside ``capture.paused()`` (a perturbed re-evaluation that calls the user's
        closure, which zeroes the gradients) the clean pass's statistics are kept.
        """
        super().zero_grad(set_to_none)
        if not self.capture.is_paused:
            self.capture.clear()

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor | None:  # type: ignore[override]
        """One optimization step (see the module docstring).

        Args:
            closure: optional, re-evaluates the model and returns the loss, as in
                torch.optim; it runs with gradients enabled.

        Everything after the closure's first call runs with denormals flushed to
        zero on this thread (``flush_denormal``; module docstring, "Cost of a step"),
        and with ``torch.autocast`` switched off, so that a step called inside an
        autocast block still computes its curvature in float32 (there, bfloat16
        matmuls made Newton–Schulz fail over to Cholesky, the K-FAC step 2.5× slower,
        and the steps 0.2–0.4% off on a BERT classifier); a closure called again inside
        the step (RENG's finite difference) runs in the caller's autocast state.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for group in self.param_groups for p in group["params"]]
        with flushing_denormals(self.flush_denormal), outside_autocast(params) as caller:
            # A closure called again (RENG's finite difference) runs in the caller's autocast.
            again = None if closure is None else functools.partial(caller.run, closure)
            return self._step(loss, again)

    def _step(self, loss: Tensor | None, closure: Closure | None) -> Tensor | None:
        """:meth:`step` after the closure's first call; returns ``loss``."""
        placement = self._parameter_placement()
        if placement != self._placement:
            self._follow_parameters()
            self._placement = placement
            self._layout = None  # its buckets are by device and dtype
        layout = self._current_layout()
        grads = {p: p.grad for p in layout.params if p.grad is not None}
        if not grads:
            self.capture.clear()
            return loss
        for p, g in grads.items():
            if g.is_sparse:
                raise RuntimeError(f"{self._name(p)} has a sparse gradient, which is not supported")
        search = self._search_gradients(grads, closure)
        step = self.steps_taken
        capturing = self.is_capture_step(step)
        estimates = self.capture.estimates() if capturing else {}
        examples = self.capture.examples if capturing else 0
        empty_batch = self.capture.only_empty_batches  # an empty batch has no statistics
        if capturing and not empty_batch:
            self._warn_if_fisher_missing(grads, estimates)
        self.capture.clear()
        if estimates and self.grad_scaler is not None and self.options.fisher == "empirical":
            # Only the training loss is scaled; backward_fisher's sampled loss is not.
            estimates = _unscale(estimates, self.grad_scaler)
        if capturing:
            # Global statistics (and example count) before anything reads them, the
            # finiteness check included, so every rank updates and skips alike.
            estimates, examples = self.distributor.all_reduce_estimates(
                estimates, self.layers, examples
            )

        grad_sq, total_grad_sq, finite = self._gradient_norms(grads, search, estimates)
        if self.options.nonfinite == "raise" and not bool(finite):  # the policy's one sync
            raise FloatingPointError(
                f"non-finite gradient or curvature statistic at step {step}; nothing was changed"
            )
        self._step_finite = finite

        if capturing:
            if not empty_batch:
                self._update_diagonal(grads, examples, finite)
            self._update_curvature(estimates, finite)
        if self._refresh_due(step):
            self._refresh_curvature(grad_sq, total_grad_sq, finite)

        directions = self._precondition(search, grad_sq, total_grad_sq, grads)
        scale = self._kl_clip_scale(directions, search)
        self._apply(directions, scale, finite)

        self.counters["step"] = step + 1
        self.counters["nonfinite_steps"] += (~finite).to(torch.int64)
        self._warn_if_skipped(step)
        self.capture.armed = self.is_capture_step(step + 1)
        self.capture.row_seed = self._row_seed(step + 1)
        return loss

    # ------------------------------------------------------------ distributed
    def owns_curvature(self, layer: KroneckerLayer) -> bool:
        """Whether this rank computes ``layer``'s refreshed curvature (always unless sharding)."""
        if not self.distributor.shards:
            return True
        return self.curvature_owner[layer.name] == self.distributor.rank

    def _share_curvature(
        self, refreshed: list[tuple[KroneckerLayer, dict[str, tuple[int, ...]]]]
    ) -> None:
        """After a sharded refresh, send each owner's results to every rank.

        ``refreshed`` lists, in the same order on every rank, each layer whose
        curvature this refresh recomputed and the keys (with shapes) of the state
        entries its owner wrote. A no-op unless sharding.
        """
        if not self.distributor.shards:
            return
        shards = []
        for layer, shapes in refreshed:
            dtype = statistics_dtype(layer.weight)
            shards.append(
                CurvatureShard(
                    layer.name,
                    self._layer_state(layer),
                    shapes,
                    self.curvature_owner[layer.name],
                    dtype,
                    layer.weight.device,
                )
            )
        self.distributor.broadcast_curvature(shards)

    def _fingerprint(self) -> dict[str, str]:
        """What must agree across data-parallel ranks, one line per item."""
        params = [p for g in self.param_groups for p in g["params"]]
        settings = {
            k: v
            for k, v in vars(self).items()
            if not k.startswith("_") and isinstance(v, (bool, int, float, str))
        }
        return {
            "optimizer": type(self).__qualname__,
            "parameters": "\n".join(f"{self._name(p)} {tuple(p.shape)} {p.dtype}" for p in params),
            "kronecker layers": "\n".join(
                f"{layer.name} A{layer.activation_dim} G{layer.gradient_dim}"
                for layer in self.layers
            ),
            "hyperparameters": "\n".join(
                f"{k}={g[k]!r}" for g in self.param_groups for k in sorted(g) if k != "params"
            ),
            "options": "\n".join(f"{k}={v!r}" for k, v in sorted(vars(self.options).items())),
            "settings": "\n".join(f"{k}={v!r}" for k, v in sorted(settings.items())),
        }

    def _parameter_placement(self) -> list[tuple[torch.dtype, torch.device]]:
        return [(p.dtype, p.device) for g in self.param_groups for p in g["params"]]

    def _follow_parameters(self) -> None:
        """After ``model.double()``, ``.float()`` or ``.to(device)``: move the state along.

        Curvature goes to its layer's statistics dtype (float32, or float64 for float64
        weights) and device, momentum to its parameter's dtype and device, counters to
        the first parameter's device. Run at the first step after such a change.
        """
        for layer in self.layers:
            dtype, device = statistics_dtype(layer.weight), layer.weight.device
            state = self._layer_state(layer)
            for key, value in state.items():
                if isinstance(value, Tensor):
                    floating = value.is_floating_point()
                    state[key] = value.to(device=device, dtype=dtype if floating else None)
        for p in [q for g in self.param_groups for q in g["params"]]:
            # Every diagonal state, also of a bias whose block became active since.
            diagonal = cast(dict[Any, Any], self.state).get(f"diagonal:{self._name(p)}", {})
            for key, value in diagonal.items():
                if isinstance(value, Tensor):
                    floating = value.is_floating_point()
                    diagonal[key] = value.to(
                        device=p.device, dtype=statistics_dtype(p) if floating else None
                    )
        for group in self.param_groups:
            for p in group["params"]:
                buffer = self.state[p].get("momentum_buffer") if p in self.state else None
                if buffer is not None:
                    self.state[p]["momentum_buffer"] = buffer.to(device=p.device, dtype=p.dtype)
        first = self.param_groups[0]["params"][0]
        counters = self.counters
        for key, value in counters.items():
            if isinstance(value, Tensor) and key != "fisher_rng_state":
                counters[key] = value.to(first.device)

    def _name(self, p: Tensor) -> str:
        name = self._param_names.get(p)  # type: ignore[call-overload]
        return str(name) if name is not None else f"parameter of shape {tuple(p.shape)}"

    def _gradient_norms(
        self,
        grads: dict[Tensor, Tensor],
        search: dict[Tensor, Tensor],
        estimates: dict[str, FactorEstimate],
    ) -> tuple[dict[Tensor, Tensor], Tensor, Tensor]:
        """``‖g_p‖²`` per parameter, their sum ``‖g‖²`` and the step's finiteness flag.

        The squared norms are float32 (float64 for float64 parameters), one foreach
        reduction per bucket of the layout. The flag, a device bool read by no host
        code, says that every gradient, search gradient (RENG's ∇L_G) and captured
        statistic is finite; on a step where it is false the norms are zeroed, so that
        the masked step's dampings stay finite and no solve raises on an inf damping
        (RING's λ + ρ‖g‖² with an inf gradient).
        """
        layout = self._current_layout()
        checks: list[Tensor] = []
        squares: list[tuple[list[Tensor], Tensor]] = []
        for bucket in layout.buckets:
            params, gradients = _present(bucket.params, grads)
            if not params:
                continue
            dtype = bucket.statistics_dtype
            sq = torch.stack(squared_norms(gradients, dtype))
            squares.append((params, sq))
            checks.append(sq.sum())
            if search is not grads:  # RENG's ∇L_G; a subclass's own search gradients
                others = [search[p] for p in params if search[p] is not grads[p]]
                if others:
                    checks.append(torch.stack(squared_norms(others, dtype)).sum())
        for e in estimates.values():
            checks += [factor_diagonal(f).sum() for f in (e.activation_factor, e.gradient_factor)]
        # A sum is finite only if every term is (an overflowing sum counts as non-finite).
        finite = torch.isfinite(_sum_on(checks, layout.device))
        grad_sq: dict[Tensor, Tensor] = {}
        totals = []
        for params, sq in squares:
            masked = torch.where(_on(finite, sq.device), sq, 0.0)
            grad_sq.update(zip(params, masked.unbind(0), strict=True))
            totals.append(masked.sum())
        return grad_sq, _sum_on(totals, layout.device), finite

    def _warn_if_skipped(self, step: int) -> None:
        """Warn once when steps were skipped, noticed at the end of a refresh step.

        Reading the counter is a host synchronisation (``nonfinite_steps``), so it is
        read only at the end of refresh steps (every ``inverse_update_freq`` steps,
        whose refresh synchronises anyway), on every device: a skipped step is
        reported at the next refresh step, not at once.
        """
        if not self.is_refresh_step(step):
            return
        skipped = self.nonfinite_steps
        if skipped > self._warned_nonfinite:
            if self._warned_nonfinite == 0:
                warn(
                    f"{type(self).__name__}: skipped a step with non-finite gradients or curvature "
                    "statistics (parameters, curvature and momentum left unchanged); "
                    "see optimizer.nonfinite_steps. Warning once.",
                    RuntimeWarning,
                )
            self._warned_nonfinite = skipped

    # ----------------------------------------------------- hooks for subclasses
    def _search_gradients(
        self, grads: dict[Tensor, Tensor], closure: Closure | None
    ) -> dict[Tensor, Tensor]:
        """The gradient to precondition; the plain gradient by default."""
        return grads

    def _update_curvature(self, estimates: dict[str, FactorEstimate], finite: Tensor) -> None:
        """Fold this step's factor estimates into the curvature state."""
        raise NotImplementedError

    def _row_seed(self, step: int) -> int:
        """The seed of the capture's row subsets on ``step``: a function of the step only,
        so a resumed run draws the rows it would have drawn; a subclass may mix in its own."""
        return step

    def _refresh_due(self, step: int) -> bool:
        """Whether the lazily refreshed part of the curvature is recomputed now."""
        return False

    def _refresh_curvature(
        self, grad_sq: dict[Tensor, Tensor], total_grad_sq: Tensor, finite: Tensor
    ) -> None:
        """Recompute the lazily refreshed part of the curvature (inverses, eigenbases)."""

    def _precondition_layer(
        self, layer: KroneckerLayer, gradient_matrix: Tensor, damping: Tensor
    ) -> Tensor:
        """Apply the layer's curvature to its gradient matrix ``V`` (float32 or float64)."""
        raise NotImplementedError

    def damping(
        self, group: dict[str, Any], block_grad_sq: Tensor, total_grad_sq: Tensor
    ) -> Tensor:
        """The damping γ of one block (a Kronecker layer or a fallback parameter).

        The base damping ``λ = group["damping"]``; RING adds ``ρ‖g‖²``. ``block_grad_sq``
        is the block's own squared gradient norm only where :attr:`uses_block_grad_norm`
        is true (an override that reads it must set that); elsewhere it is the total.
        """
        return torch.as_tensor(
            group["damping"], dtype=total_grad_sq.dtype, device=total_grad_sq.device
        )

    # ------------------------------------------------------------- machinery
    def _group_of(self, p: Tensor) -> dict[str, Any]:
        group = self._current_layout().group_of.get(p)
        if group is None:
            raise KeyError(self._name(p))
        return group

    def _current_layout(self) -> _Layout:
        """The buckets of ``param_groups``, rebuilt when the groups have changed.

        :meth:`step` also drops it when a parameter's dtype or device changed.
        """
        layout = self._layout
        if layout is None or not layout.describes(self.param_groups):
            layout = self._layout = _Layout(self.param_groups)
        return layout

    def _layer_state(self, layer: KroneckerLayer) -> dict[str, Any]:
        return self.named_state(f"layer:{layer.name}")

    def _diagonal_state(self, p: Tensor) -> dict[str, Any]:
        return self.named_state(f"diagonal:{self._name(p)}")

    def _layer_damping(
        self,
        layer: KroneckerLayer,
        grad_sq: dict[Tensor, Tensor],
        total_grad_sq: Tensor,
        block_sq: Tensor | None = None,
    ) -> Tensor:
        """The block's damping; ``block_sq`` is its squared gradient norm when the block
        holds only some rows of its parameters (attention's q, k, v; conv groups). The
        block's norm is summed only for a damping that reads it (``uses_block_grad_norm``);
        the others get the total in its place, unread."""
        if block_sq is None:
            block_sq = (
                torch.stack([grad_sq[p] for p in layer.params if p in grad_sq]).sum()
                if self.uses_block_grad_norm
                else total_grad_sq
            )
        return self.damping(self._group_of(layer.weight), block_sq, total_grad_sq)

    def _active_layers(self) -> list[KroneckerLayer]:
        """The blocks whose weight requires a gradient now (module docstring)."""
        return [layer for layer in self.layers if layer.active]

    def _fallback_params(self, grads: Iterable[Tensor]) -> list[Tensor]:
        """The parameters of ``grads`` that no active block reads (diagonal fallback)."""
        return [p for p in grads if not any(b.active for b in self._blocks_of.get(p, ()))]

    def _update_diagonal(self, grads: dict[Tensor, Tensor], examples: int, finite: Tensor) -> None:
        """Diagonal Fisher of fallback parameters: ``v ← β v + (1 − β) n ḡ²``.

        ``ḡ`` is the minibatch-mean gradient and ``n`` the examples behind it, so
        ``n ḡ²`` estimates the per-example second moment that the Kronecker
        factors also estimate (exactly so when the mean gradient is small
        against its noise). With ``loss_reduction="sum"`` the gradient ``g`` is
        the sum ``n ḡ``, and the estimate ``g² / n`` is the same number.
        """
        beta = self.options.factor_decay
        n = max(1, examples)
        scale = 1.0 / n if self.options.loss_reduction == "sum" else float(n)
        fallback = {p: grads[p] for p in self._fallback_params(grads)}
        if not fallback:
            return
        for bucket in self._current_layout().buckets:
            params, gradients = _present(bucket.params, fallback)
            if not params:
                continue
            gradients = [g.to(bucket.statistics_dtype) for g in gradients]
            estimates = torch._foreach_mul(gradients, gradients)
            torch._foreach_mul_(estimates, scale)
            states = [self._diagonal_state(p) for p in params]
            running_averages(states, "fisher_diagonal", estimates, beta, _on(finite, bucket.device))

    def _precondition(
        self,
        search: dict[Tensor, Tensor],
        grad_sq: dict[Tensor, Tensor],
        total_grad_sq: Tensor,
        grads: dict[Tensor, Tensor] | None = None,
    ) -> dict[Tensor, Tensor]:
        directions: dict[Tensor, Tensor] = {}
        for layer in self._active_layers():
            if not any(p in search for p in layer.params):
                continue
            dtype = statistics_dtype(layer.weight)
            block_sq = None
            sliced = layer.weight_rows is not None or layer.bias_rows is not None
            if self.uses_block_grad_norm and grads is not None and sliced:
                rows = layer.gradient_matrix(
                    {p: grads[p].to(dtype) for p in layer.params if p in grads}
                )
                zero = torch.zeros((), dtype=dtype, device=rows.device)
                block_sq = torch.where(self._step_finite, rows.pow(2).sum(), zero)
            gamma = self._layer_damping(layer, grad_sq, total_grad_sq, block_sq)
            matrix = layer.gradient_matrix(
                {p: search[p].to(dtype) for p in layer.params if p in search}
            )
            layer.scatter(self._precondition_layer(layer, matrix, gamma.to(dtype)), directions)
        # Only parameters with a (search) gradient move, in their own dtype.
        directions = {p: d.to(p.dtype) for p, d in directions.items() if p in search}
        for p in self._fallback_params(search):
            group = self._group_of(p)
            gamma = self.damping(group, grad_sq[p], total_grad_sq)
            fisher = self._diagonal_state(p).get("fisher_diagonal")
            d = search[p].to(statistics_dtype(p))
            denominator = gamma if fisher is None else fisher + gamma
            directions[p] = (d / denominator).to(p.dtype)
        return directions

    def _kl_clip_scale(
        self, directions: dict[Tensor, Tensor], search: dict[Tensor, Tensor]
    ) -> Tensor | None:
        """ν = min(1, sqrt(κ / Σ lr² ⟨Δ, d⟩)) (Ba et al. 2017), a device scalar.

        ``⟨Δ, d⟩`` in float32 (float64 for float64 parameters), one ``dot`` per
        parameter (no temporaries), ``lr²`` per group (a tensor ``lr`` too).
        """
        kappa = self.options.kl_clip
        if kappa is None:
            return None
        layout = self._current_layout()
        terms = []
        for bucket in layout.buckets:
            params, deltas = _present(bucket.params, directions)
            if not params:
                continue
            dtype = bucket.statistics_dtype
            pairs = zip(deltas, [search[p] for p in params], strict=True)
            if dtype == bucket.dtype:
                dots = [torch.dot(delta.reshape(-1), d.reshape(-1)) for delta, d in pairs]
            else:  # half precision: the products and their sum in float32
                dots = [torch.dot(_flat(delta, dtype), _flat(d, dtype)) for delta, d in pairs]
            lr = _scalar_on(bucket.group["lr"], bucket.device)
            terms.append(torch.stack(dots).sum() * lr**2)
        if not terms:
            return None
        quadratic = _sum_on(terms, layout.device).clamp_min(1e-30)
        # κ / q as torch's own __rdiv__ computes it, without its Python wrapper.
        return torch.clamp(torch.sqrt(quadratic.reciprocal().mul_(kappa)), max=1.0)

    def _apply(
        self, directions: dict[Tensor, Tensor], scale: Tensor | None, finite: Tensor
    ) -> None:
        """``b ← μ b + ν Δ``, ``θ ← θ (1 − lr·wd) − lr b`` (``− lr ν Δ`` without momentum).

        Foreach ops per bucket (group, device, dtype) in the parameters' dtype, masked
        by ``finite`` with no host read: on a skipped step the directions are zeroed
        (they may hold NaN or inf, which a product with zero would keep), ν is zeroed,
        the momentum factor is 1 and the effective rate 0, so momentum buffers and
        parameters keep their values. The directions are worked on in place and become
        the new momentum buffers (the old ones are read, never written, so a saved
        ``state_dict`` keeps its values): :meth:`_precondition` returns new tensors,
        the step's own (a direction that is the parameter's ``.grad`` itself is copied
        first; one that is a view of it would be overwritten).
        """
        for bucket in self._current_layout().buckets:
            params, deltas = _present(bucket.params, directions)
            if not params:
                continue
            group, device, dtype = bucket.group, bucket.device, bucket.dtype
            momentum, weight_decay = group["momentum"], group["weight_decay"]
            lr = _scalar_on(group["lr"], device)
            ok = _on(finite, device)
            deltas = [d.clone() if d is p.grad else d for p, d in zip(params, deltas, strict=True)]
            _zero_unless_(deltas, ok)
            ok_number = ok.to(dtype)
            nu = None if scale is None else torch.where(ok, scale.to(device, dtype), 0.0)
            if momentum > 0:
                states = [self.state[p] for p in params]
                buffers = [s.get("momentum_buffer") for s in states]
                buffers = [
                    torch.zeros_like(p) if b is None else b
                    for p, b in zip(params, buffers, strict=True)
                ]
                factor = torch.where(ok, torch.full((), momentum, dtype=dtype, device=device), 1.0)
                if nu is not None:
                    torch._foreach_mul_(deltas, nu)
                _add_scaled_(deltas, buffers, factor)  # ν Δ + μ b, or b on a skipped step
                for state, buffer in zip(states, deltas, strict=True):
                    state["momentum_buffer"] = buffer
                sources, coefficient = deltas, ok_number * -lr
            else:
                sources, coefficient = deltas, (ok_number if nu is None else nu) * -lr
            if weight_decay != 0:
                torch._foreach_mul_(params, (ok_number * -(lr * weight_decay)).add_(1))
            _add_scaled_(params, sources, coefficient)

    # ------------------------------------------------------------ state dicts
    def state_dict(self) -> dict[str, Any]:
        """As in torch.optim; also carries the MC-Fisher sampler's RNG state."""
        if self._fisher_generator is not None:
            self.counters["fisher_rng_state"] = self._fisher_generator.get_state()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As in torch.optim, after checking that the state fits this model.

        A state from a model of another shape raises ValueError naming the
        mismatched layer or parameter, and this optimizer is left untouched.
        """
        self._check_state_dict(state_dict)
        super().load_state_dict(state_dict)
        # Name-keyed entries are loaded by reference in torch.optim; copy them so
        # training does not write into the caller's dictionary, and move them to
        # the parameters' device.
        device = next(iter(self.param_groups[0]["params"])).device
        for key in list(self.state):
            if isinstance(key, str):
                self.state[key] = _to_device(copy.deepcopy(self.state[key]), device)
        self.capture.clear()
        self.capture.armed = self.is_capture_step()
        self.capture.row_seed = self._row_seed(self.steps_taken)
        self._fisher_generator = None  # recreated from the loaded RNG state on first use

    def _check_state_dict(self, state_dict: dict[str, Any]) -> None:
        if (
            not isinstance(state_dict, dict)
            or "state" not in state_dict
            or "param_groups" not in state_dict
        ):
            raise ValueError("state_dict must be a dict with 'state' and 'param_groups'")
        saved_state = state_dict["state"]
        if "counters" not in saved_state:
            raise ValueError(f"state_dict is not from a {type(self).__name__}: it has no counters")
        params = [p for g in self.param_groups for p in g["params"]]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        if len(saved_ids) != len(params):
            raise ValueError(
                f"state_dict holds {len(saved_ids)} parameters, this optimizer {len(params)}"
            )
        by_id = dict(zip(saved_ids, params, strict=True))
        for key, entry in saved_state.items():
            if key in by_id:
                p = by_id[key]
                for name, value in entry.items():
                    if (
                        isinstance(value, Tensor)
                        and name == "momentum_buffer"
                        and value.shape != p.shape
                    ):
                        raise ValueError(
                            f"state_dict does not fit {self._name(p)}: {name} has shape "
                            f"{tuple(value.shape)}, the parameter {tuple(p.shape)}"
                        )
        layers = {f"layer:{layer.name}": layer for layer in self.layers}
        for key, entry in saved_state.items():
            if not isinstance(key, str) or not key.startswith("layer:"):
                continue
            layer = layers.get(key)
            if layer is None:
                raise ValueError(
                    f"state_dict has curvature for layer {key[6:]!r}, which this model lacks"
                )
            expected = {"activation": layer.activation_dim, "gradient": layer.gradient_dim}
            for name, value in entry.items():
                side = name.split("_")[0]
                if (
                    isinstance(value, Tensor)
                    and side in expected
                    and value.dim() >= 1
                    and value.shape[-1] != expected[side]
                ):
                    raise ValueError(
                        f"state_dict does not fit layer {layer.name!r}: {name} has shape "
                        f"{tuple(value.shape)}, expected size {expected[side]}"
                    )


def _unscale(estimates: dict[str, FactorEstimate], scaler: Any) -> dict[str, FactorEstimate]:
    """Remove a GradScaler's loss scale S from the gradient side: G / S², rows / S."""
    scale = getattr(scaler, "_scale", None)
    if scale is None or not scaler.is_enabled():
        return estimates
    out = {}
    for name, e in estimates.items():
        s = scale.to(e.gradient_factor)
        rows = None if e.gradient_rows is None else e.gradient_rows / s
        out[name] = replace(e, gradient_factor=e.gradient_factor / (s * s), gradient_rows=rows)
    return out


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def sqrt_damping_split(gamma: Tensor, pi: Tensor) -> tuple[Tensor, Tensor]:
    """Factored Tikhonov damping (Martens & Grosse 2015, §6.3).

    ``(G ⊗ A + γ I)⁻¹`` is approximated by ``(G + (√γ/π) I)⁻¹ ⊗ (A + π√γ I)⁻¹``;
    returns ``(√γ/π, π√γ)``, the gradient-side and activation-side dampings.
    """
    root = torch.sqrt(gamma)
    return root / pi, root * pi


def running_average(
    state: dict[str, Any], key: str, estimate: Tensor, beta: float, finite: Tensor
) -> None:
    """``state[key] ← β state[key] + (1 − β) estimate``, masked by ``finite``, no sync.

    The first finite estimate replaces the empty average instead of being shrunk
    towards zero by (1 − β); ``state[key + "_updates"]`` counts the finite
    updates folded in.
    """
    running_averages([state], key, [estimate], beta, finite)


def running_averages(
    states: Sequence[dict[str, Any]],
    key: str,
    estimates: Sequence[Tensor],
    beta: float,
    finite: Tensor,
) -> None:
    """:func:`running_average` of several states at once.

    The blend ``β old + (1 − β) estimate`` is two foreach products and a foreach sum;
    only the masking (no foreach ``where`` exists) is per tensor.
    """
    count_key = f"{key}_updates"
    olds, counts = [], []
    for state, estimate in zip(states, estimates, strict=True):
        old, count = state.get(key), state.get(count_key)
        if old is None or count is None:
            old = torch.zeros_like(estimate)
            count = torch.zeros((), dtype=torch.int64, device=estimate.device)
        olds.append(old)
        counts.append(count)
    blended = torch._foreach_mul(olds, beta)
    torch._foreach_add_(blended, torch._foreach_mul(list(estimates), 1 - beta))
    increment = finite.to(torch.int64)
    for state, old, count, estimate, mixed in zip(
        states, olds, counts, estimates, blended, strict=True
    ):
        state[key] = torch.where(finite, torch.where(count > 0, mixed, estimate), old)
        state[count_key] = count + increment


#: ``torch._foreach_powsum`` (``Σ |t|^p`` of each tensor) where this torch has it.
_FOREACH_POWSUM: Callable[..., Sequence[Tensor]] | None = getattr(torch, "_foreach_powsum", None)


def squared_norms(tensors: Sequence[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """``Σ t²`` of each tensor, accumulated and returned in ``dtype`` (0-dim tensors).

    One foreach reduction where torch has ``_foreach_powsum`` (it casts to ``dtype``
    before squaring, so half-precision values do not overflow), else one
    ``pow(2).sum()`` per tensor. A non-finite value gives a non-finite sum.
    """
    if _FOREACH_POWSUM is not None:
        return list(_FOREACH_POWSUM(list(tensors), 2, dtype=dtype))
    return [t.to(dtype).pow(2).sum() for t in tensors]


def _present(
    params: Sequence[Tensor], values: Mapping[Tensor, Tensor]
) -> tuple[list[Tensor], list[Tensor]]:
    """The parameters of ``params`` (in order) that have an entry in ``values``, and the
    entries, with one lookup each (a tensor's hash is a Python call)."""
    found, entries = [], []
    for p in params:
        entry = values.get(p)
        if entry is not None:
            found.append(p)
            entries.append(entry)
    return found, entries


def _flat(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` as a vector in ``dtype`` (a view when it is contiguous and in ``dtype``)."""
    return (t if t.dtype == dtype else t.to(dtype)).reshape(-1)


def _on(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device``, without a copy when it is there already."""
    return t if t.device == device else t.to(device)


def _scalar_on(value: float | Tensor, device: torch.device) -> float | Tensor:
    """A hyperparameter (a number or a one-element tensor, e.g. a tensor ``lr``) for a
    kernel on ``device``: a CPU tensor enters kernels of any device as a number, so it is
    not copied (a copy to an accelerator would synchronise); any other is moved."""
    if isinstance(value, Tensor):
        value = value.reshape(())
        if value.device.type != "cpu":
            return _on(value, device)
    return value


def _sum_on(values: Sequence[Tensor], device: torch.device) -> Tensor:
    """The sum of 0-dim tensors, on ``device``, in their promoted dtype."""
    if len(values) == 1 and values[0].device == device:
        return values[0]
    dtype = functools.reduce(torch.promote_types, (v.dtype for v in values))
    return torch.stack([v.to(device=device, dtype=dtype) for v in values]).sum()


#: The integer dtype as wide as each float dtype, to mask floats bit by bit.
_SAME_WIDTH_INT = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def _zero_unless_(tensors: list[Tensor], keep: Tensor) -> None:
    """Set every tensor (one bucket's: one dtype) to +0.0 in place unless ``keep`` (a
    0-dim device bool), NaN and inf included, without a host read.

    A float product with 0 keeps NaN and inf. The integer product of the same bits
    with 0 or 1 does not (all-zero bits are +0.0) and leaves them exactly as they were
    with 1, in one vectorised foreach pass, where a ``where`` or ``masked_fill_`` per
    tensor runs a scalar (not vectorised) loop on CPU.
    """
    integer = _SAME_WIDTH_INT.get(tensors[0].dtype)
    if integer is None:  # no integer of its width (a complex dtype): one fill per tensor
        for t in tensors:
            t.masked_fill_(~keep, 0)
        return
    torch._foreach_mul_([t.view(integer) for t in tensors], keep.to(integer))


def _add_scaled_(targets: list[Tensor], sources: list[Tensor], coefficient: Tensor) -> None:
    """``t ← t + c·s`` for each pair, with ``c`` a 0-dim tensor that no host code reads."""
    if targets[0].device.type == "cpu":
        # One addcmul_ per tensor, with no temporary: fresh CPU memory for a product
        # would cost more than the arithmetic (page faults).
        torch._foreach_addcmul_(targets, sources, [coefficient] * len(targets))
    else:
        # The multi-tensor kernels (a list of 0-dim tensors would take a per-tensor path).
        torch._foreach_add_(targets, torch._foreach_mul(sources, coefficient))


class _Bucket:
    """Parameters of one group with one device and dtype: the unit of a foreach op."""

    __slots__ = ("device", "dtype", "group", "params", "statistics_dtype")

    def __init__(
        self, group: dict[str, Any], params: list[Tensor], device: torch.device, dtype: torch.dtype
    ) -> None:
        self.group = group
        self.params = params
        self.device = device
        self.dtype = dtype
        self.statistics_dtype = statistics_dtype(params[0])


class _Layout:
    """``param_groups`` arranged for a step's foreach ops.

    ``buckets``: each group's parameters split by device and dtype, in group order;
    ``params``: every parameter in ``param_groups`` order; ``group_of``: a parameter's
    group (a dict instead of a scan of the groups); ``device``: the first parameter's,
    where the counters and the finiteness flag live.
    """

    def __init__(self, param_groups: list[dict[str, Any]]) -> None:
        # The group dicts and parameter lists themselves (not ids, which may be reused).
        self._built_from = [(g, g["params"], len(g["params"])) for g in param_groups]
        self.params: list[Tensor] = [p for g in param_groups for p in g["params"]]
        self.group_of: dict[Tensor, dict[str, Any]] = {
            p: g for g in param_groups for p in g["params"]
        }
        self.device = self.params[0].device
        self.buckets: list[_Bucket] = []
        for g in param_groups:
            kinds: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
            for p in g["params"]:
                kinds.setdefault((p.device, p.dtype), []).append(p)
            self.buckets += [_Bucket(g, ps, device, dtype) for (device, dtype), ps in kinds.items()]

    def describes(self, param_groups: list[dict[str, Any]]) -> bool:
        """Whether ``param_groups`` still holds the groups and parameter lists it was
        built from (``add_param_group`` and ``load_state_dict`` change them)."""
        return len(param_groups) == len(self._built_from) and all(
            g is group and g["params"] is params and len(params) == n
            for g, (group, params, n) in zip(param_groups, self._built_from, strict=True)
        )


#: The smallest positive double, a denormal: ``_DENORMAL * _ONE`` is 0.0 exactly when
#: this thread flushes denormals (module-level names, so Python does not fold it).
_DENORMAL = 5e-324
_ONE = 1.0


def flushes_denormals() -> bool:
    """Whether the calling thread's CPU flushes denormal floats to zero now.

    ``torch.set_flush_denormal`` has no getter; the mode it sets (x86 MXCSR's FTZ and
    DAZ, ARM's FPCR.FZ) also governs Python's own float arithmetic on the thread, so a
    product whose result is a denormal tells.
    """
    return _DENORMAL * _ONE == 0.0


@contextmanager
def flushing_denormals(enabled: bool = True) -> Iterator[None]:
    """Flush denormal floats to zero on the calling thread for the block, then restore.

    A no-op when ``enabled`` is false, when the thread flushes already, or where torch
    cannot set the mode (``torch.set_flush_denormal`` returns False); otherwise the
    mode is switched off again on exit, also on an exception.
    """
    if not enabled or flushes_denormals() or not torch.set_flush_denormal(True):
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


__all__ = [
    "Closure",
    "CurvatureOptimizer",
    "flushes_denormals",
    "flushing_denormals",
    "running_average",
    "running_averages",
    "sqrt_damping_split",
    "squared_norms",
]
