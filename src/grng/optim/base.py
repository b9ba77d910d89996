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
when the bias is in another group.

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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

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
    #: ``grad_norm="layer"``); only then is it computed for blocks that hold some rows
    #: of their parameters (attention's q, k, v; conv groups).
    uses_block_grad_norm: bool = False

    #: Whether the damping depends on the step's gradient (RING); used to know when
    #: a Newton–Schulz inverse at a reference damping can be shifted.
    adaptive_damping: bool = False

    #: The per-group hyperparameters a constructor may put in ``defaults``; any other
    #: keyword (a typo such as ``dampin=``) is refused with a TypeError naming it.
    hyperparameters: tuple[str, ...] = ("lr", "damping", "momentum", "weight_decay")

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
            model, self.layers, options.fisher, loss_reduction=options.loss_reduction
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
            for message in (diagonal_warning(self, self.coverage()), capped_sides_warning(self)):
                if message is not None:
                    warn(message, CoverageWarning)
        except BaseException:
            self.capture.remove()  # a failed constructor leaves no hook on the model
            raise

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
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        placement = self._parameter_placement()
        if placement != self._placement:
            self._follow_parameters()
            self._placement = placement
        grads = {p: p.grad for g in self.param_groups for p in g["params"] if p.grad is not None}
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

        grad_sq = {p: g.detach().to(statistics_dtype(g)).pow(2).sum() for p, g in grads.items()}
        finite = self._all_finite(grad_sq, search, estimates)
        if self.options.nonfinite == "raise" and not bool(finite):
            raise FloatingPointError(
                f"non-finite gradient or curvature statistic at step {step}; nothing was changed"
            )
        self._step_finite = finite
        # A skipped step still runs (masked); keep its dampings finite so that no solve
        # raises on an inf damping (RING's λ + ρ‖g‖² with an inf gradient).
        zero = torch.zeros((), dtype=finite.dtype, device=finite.device)
        grad_sq = {p: torch.where(finite, v, zero.to(v.dtype)) for p, v in grad_sq.items()}
        total_grad_sq = torch.stack(list(grad_sq.values())).sum()

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
        self._warn_if_skipped(finite)
        self.capture.armed = self.is_capture_step(step + 1)
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

    def _all_finite(
        self,
        grad_sq: dict[Tensor, Tensor],
        search: dict[Tensor, Tensor],
        estimates: dict[str, FactorEstimate],
    ) -> Tensor:
        checks = list(grad_sq.values())
        checks += [
            d.detach().to(statistics_dtype(d)).pow(2).sum()
            for p, d in search.items()
            if d is not p.grad
        ]
        for e in estimates.values():
            checks += [factor_diagonal(f).sum() for f in (e.activation_factor, e.gradient_factor)]
        return torch.isfinite(torch.stack(checks).sum())

    def _warn_if_skipped(self, finite: Tensor) -> None:
        # Reading the counter synchronises; on CPU that is free, elsewhere wait for
        # a refresh step, which synchronises anyway.
        if finite.device.type != "cpu" and not self.is_refresh_step():
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

        The base damping ``λ = group["damping"]``; RING adds ``ρ‖g‖²``.
        """
        return torch.as_tensor(
            group["damping"], dtype=total_grad_sq.dtype, device=total_grad_sq.device
        )

    # ------------------------------------------------------------- machinery
    def _group_of(self, p: Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise KeyError(self._name(p))

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
        holds only some rows of its parameters (attention's q, k, v; conv groups)."""
        if block_sq is None:
            block_sq = torch.stack([grad_sq[p] for p in layer.params if p in grad_sq]).sum()
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
        for p in self._fallback_params(grads):
            estimate = grads[p].detach().to(statistics_dtype(p)).pow(2).mul_(scale)
            running_average(self._diagonal_state(p), "fisher_diagonal", estimate, beta, finite)

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
        """ν = min(1, sqrt(κ / Σ lr² ⟨Δ, d⟩)) (Ba et al. 2017), a device scalar."""
        kappa = self.options.kl_clip
        if kappa is None:
            return None
        terms = []
        for group in self.param_groups:
            lr_sq = group["lr"] ** 2
            for p in group["params"]:
                if p in directions:
                    dtype = statistics_dtype(p)
                    terms.append((directions[p].to(dtype) * search[p].to(dtype)).sum() * lr_sq)
        quadratic = torch.stack(terms).sum().clamp_min(1e-30)
        return torch.clamp(torch.sqrt(kappa / quadratic), max=1.0)

    def _apply(
        self, directions: dict[Tensor, Tensor], scale: Tensor | None, finite: Tensor
    ) -> None:
        for group in self.param_groups:
            lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p not in directions:
                    continue
                update = directions[p] if scale is None else directions[p] * scale.to(p.dtype)
                if momentum > 0:
                    state = self.state[p]
                    buffer = state.get("momentum_buffer")
                    if buffer is None:
                        buffer = torch.zeros_like(p)
                    update = buffer * momentum + update
                    state["momentum_buffer"] = torch.where(finite, update, buffer)
                update = torch.where(
                    finite, update, torch.zeros((), dtype=p.dtype, device=p.device)
                )
                if weight_decay != 0:
                    p.mul_(1 - lr * weight_decay * finite.to(p.dtype))
                p.add_(update, alpha=-lr)

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
    count_key = f"{key}_updates"
    old = state.get(key)
    count = state.get(count_key)
    if old is None or count is None:
        old = torch.zeros_like(estimate)
        count = torch.zeros((), dtype=torch.int64, device=estimate.device)
    blended = torch.where(count > 0, old * beta + estimate * (1 - beta), estimate)
    state[key] = torch.where(finite, blended, old)
    state[count_key] = count + finite.to(torch.int64)


__all__ = ["Closure", "CurvatureOptimizer", "running_average", "sqrt_damping_split"]
