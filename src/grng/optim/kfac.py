"""K-FAC: Kronecker-factored natural gradient with lazily refreshed inverses.

Per Kronecker layer with running factors ``A`` (activations) and ``G`` (output
gradients), gradient matrix ``V`` (``d_G × d_A``) and damping ``γ``, the direction
is one of two damped solves (option ``damping_form``)::

    "factored" (K-FAC's default)  Δ = (G + (√γ/π) I)⁻¹ V (A + π√γ I)⁻¹,
                                  π = sqrt((tr A / dim A) / (tr G / dim G))
    "exact"    (RING's default)   vec Δ = (G ⊗ A + γ I)⁻¹ vec V
                                  = Q_G [(Q_Gᵀ V Q_A) ⊘ (g aᵀ + γ)] Q_Aᵀ

(row-major ``vec``; ``G = Q_G diag(g) Q_Gᵀ``, ``A = Q_A diag(a) Q_Aᵀ``). The
factored form adds the cross terms ``(√γ/π) I ⊗ A + π√γ G ⊗ I`` to the damped
matrix (Martens & Grosse 2015, §6.3); the exact form adds ``γ I`` only.

The factors are running averages updated every ``factor_update_freq`` steps;
what is expensive (eigenbases or inverses) is recomputed every
``inverse_update_freq`` steps:

* ``inverse="eigh"`` stores the eigenbases of ``A`` and ``G``
  (:func:`grng.linalg.eigh_factor`); any damping is then applied exactly on
  every step, in either form (:func:`grng.linalg.kronecker_tikhonov_solve_eigh`,
  :func:`grng.linalg.kronecker_solve_eigh`). With constant damping (K-FAC, RENG)
  what a step can reuse is built once per refresh and damping
  (:meth:`KFAC._constant_damping_solve`): the factored form's damped inverses
  ``Q diag(1/(λ + d)) Qᵀ``, so a step is two products instead of four, and the
  exact form's ``1/(g aᵀ + γ)``.
* ``inverse="newton_schulz"`` (factored form only) stores the damped inverses
  of the two factors at the damping of the refresh step
  (:func:`grng.linalg.damped_inverse`: a float32 Cholesky inverse checked in
  float64 on CPU; Newton–Schulz warm-started from the previous inverses where an
  iteration is cheaper than a factorisation, i.e. off CPU). With constant damping
  (K-FAC, RENG) they are exact; a changed ``damping`` in ``param_groups`` is
  noticed on the next step (Python floats compared, no sync) and re-inverts.
  With adaptive damping (RING) a step whose side dampings differ by ``ε_G, ε_A``
  from those of the stored inverses uses the first-order correction
  ``(M + εI)⁻¹ ≈ X − εX²`` (:func:`grng.linalg.shifted_inverse_first_order`)
  while its relative error bound ``r_G² + r_A² + r_G² r_A²``, ``r = |ε|/c_ref``
  (:func:`grng.linalg.shift_error_bound`), is at most ``inverse_tol``, and
  re-inverts that layer otherwise (one host sync per layer and step).

Data parallel (:mod:`grng.distributed`): the factors are all-reduced on capture
steps; with ``distributed="shard"`` each refresh computes the eigenbases/inverses
of this rank's layers only and broadcasts them. A Newton–Schulz re-inversion
forced by a damping change happens on every rank alike: the damping comes from
the DDP-averaged gradient or from ``param_groups``, identical everywhere.

RING (:class:`grng.RING`) is this optimizer with the damping ``λ + ρ‖g‖²`` and
the exact form.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from grng.curvature import FactorEstimate, KroneckerLayer
from grng.linalg import (
    damped_inverse,
    eigenbasis_solve,
    eigh_damped_inverse,
    eigh_factor,
    kronecker_solve_eigh,
    kronecker_solve_inverse,
    kronecker_tikhonov_solve_eigh,
    pi_correction,
    prefers_newton_schulz,
    shift_error_bound,
    shifted_inverse_first_order,
    symmetrize,
    tikhonov_inverse_spectrum,
)
from grng.optim.base import (
    CurvatureOptimizer,
    ExcludeRule,
    running_average,
    sqrt_damping_split,
)
from grng.optim.coverage import expensive_sides_warning
from grng.optim.options import (
    DEFAULT_MAX_FACTOR_DIM,
    DEFAULT_MAX_STATISTICS_ROWS,
    CurvatureOptions,
    DampingForm,
    DistributedMode,
    FisherType,
    InverseMethod,
    LossReduction,
    NonfinitePolicy,
)

#: CPU seconds per ``d³`` of one dense side's refresh on one core of the reference VM
#: (2-core AMD EPYC, torch 2.13 CPU; ``benchmarks/factor_cost.py``, ``docs/performance.md``):
#: ``eigh_factor`` measured 0.73 s at d = 2048 and 7.9 s at 4096; ``damped_inverse``'s CPU
#: route (float32 Cholesky inverse + its float64 certificate) 0.56 s and 4.1 s.
REFRESH_SECONDS_PER_CUBE: dict[str, float] = {"eigh": 9e-11, "newton_schulz": 6.5e-11}
#: A dense side of a CPU layer estimated to refresh slower than this (seconds) is named by a
#: construction-time warning: from about d = 2230 (eigh) or 2490 (Cholesky route) up.
EXPENSIVE_REFRESH_SECONDS = 1.0


class KFAC(CurvatureOptimizer):
    """K-FAC (Martens & Grosse 2015) as a ``torch.optim.Optimizer``.

    Args:
        model: the network to optimize: every parameter, frozen ones included, which
            train with their curvature once unfrozen (built after the first forward
            pass if it has lazy modules; see :class:`grng.CurvatureOptimizer`).
        lr: learning rate η (default 0.03, damping 0.1). The defaults of lr and damping were
            chosen across tasks (a BERT classifier, mnist1d, a ResNet, GPT-2, an LSTM) by
            the sweep in ``docs/tuning.md``; see there for when to change them.
        damping: Tikhonov damping λ (> 0). A Kronecker block uses its weight's
            group's damping, also for a bias in another group.
        momentum: heavy-ball momentum μ on the preconditioned direction.
        weight_decay: decoupled weight decay (AdamW-style).
        exclude: module names, module types or predicates ``(name, module) -> bool``
            (one or a list) whose modules, with their descendants, get the diagonal
            fallback instead of Kronecker curvature; an unknown name raises ValueError.
        param_groups: ``[{"params": [names or Parameters], <hyperparameters>}, ...]``
            with any of ``lr``, ``damping``, ``momentum``, ``weight_decay`` (and
            ``rho`` for RING/RENG) per group; unlisted parameters form the default
            group, first. E.g. no weight decay on biases and norm weights::

                no_decay = [n for n, p in model.named_parameters() if p.dim() < 2]
                KFAC(model, weight_decay=0.1,
                     param_groups=[{"params": no_decay, "weight_decay": 0.0}])

        max_factor_dim: a factor side wider than this is kept diagonal, trading that
            side's cross-coordinate curvature for an ``O(d³)`` refresh (default 4096,
            ``None``: no cap; see :class:`grng.optim.CurvatureOptions`).
        max_statistics_rows: on capture steps, a layer call with more rows than this
            estimates its dense factor sums from an unbiased subset of this many rows
            (default 1024, ``None``: every row; see :class:`grng.optim.CurvatureOptions`).
        factor_update_freq, inverse_update_freq, factor_decay, fisher, inverse,
        kl_clip, nonfinite, inverse_tol, distributed, damping_form, loss_reduction:
            see :class:`grng.optim.CurvatureOptions` (``distributed="auto"`` shards
            the refreshes across ranks when a process group is initialised;
            ``damping_form="exact"`` needs ``inverse="eigh"``). KFAC's and RENG's
            ``inverse`` default is ``"newton_schulz"``, RING's ``"eigh"``.

    ``optimizer.coverage()`` lists which curvature each parameter gets. Construction warns
    (:class:`grng.CoverageWarning`) when a dense factor side of a CPU layer is estimated to take
    more than ``EXPENSIVE_REFRESH_SECONDS`` to refresh (:meth:`refresh_seconds`).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.03,
        damping: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        factor_update_freq: int = 10,
        inverse_update_freq: int = 50,
        factor_decay: float = 0.95,
        fisher: FisherType = "empirical",
        inverse: InverseMethod = "newton_schulz",
        kl_clip: float | None = 1e-3,
        nonfinite: NonfinitePolicy = "skip",
        inverse_tol: float = 1e-4,
        distributed: DistributedMode | None = "auto",
        damping_form: DampingForm = "factored",
        loss_reduction: LossReduction = "mean",
        exclude: ExcludeRule | Iterable[ExcludeRule] | None = None,
        param_groups: Sequence[Mapping[str, Any]] | None = None,
        max_factor_dim: int | None = DEFAULT_MAX_FACTOR_DIM,
        max_statistics_rows: int | None = DEFAULT_MAX_STATISTICS_ROWS,
        **extra_defaults: Any,
    ) -> None:
        options = CurvatureOptions(
            factor_update_freq=factor_update_freq,
            inverse_update_freq=inverse_update_freq,
            factor_decay=factor_decay,
            fisher=fisher,
            inverse=inverse,
            kl_clip=kl_clip,
            nonfinite=nonfinite,
            inverse_tol=inverse_tol,
            distributed=distributed,
            damping_form=damping_form,
            loss_reduction=loss_reduction,
            max_factor_dim=max_factor_dim,
            max_statistics_rows=max_statistics_rows,
        )
        defaults = dict(
            lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay, **extra_defaults
        )
        super().__init__(model, defaults, options, exclude=exclude, param_groups=param_groups)
        #: Per block, what ``inverse="eigh"`` with constant damping precomputes and the key it
        #: was built for (:meth:`_constant_damping_solve`). Derived data, rebuilt on demand,
        #: so it stays out of ``state`` and ``state_dict``.
        self._spectra: dict[str, tuple[tuple[Any, ...], tuple[Tensor, ...]]] = {}

    def _construction_warnings(self) -> list[str | None]:
        """The base's, and the warning about factor sides whose refresh would be slow."""
        route = (
            "eigh" if self.options.inverse == "eigh" else "float32 Cholesky inverse + float64 check"
        )
        expensive = expensive_sides_warning(
            self, self.refresh_seconds, EXPENSIVE_REFRESH_SECONDS, route
        )
        return [*super()._construction_warnings(), expensive]

    def refresh_seconds(self, dim: int) -> float:
        """Estimated seconds to refresh one dense factor side of width ``dim`` on one CPU core.

        ``c·dim³`` with ``c`` measured on the reference VM (``REFRESH_SECONDS_PER_CUBE``): an
        ``eigh_factor`` for ``inverse="eigh"``, else the CPU route of ``damped_inverse``.
        Another CPU scales by its speed; more threads divide it by less than their number.
        """
        return REFRESH_SECONDS_PER_CUBE[self.options.inverse] * float(dim) ** 3

    # ------------------------------------------------------------- factors
    def _update_curvature(self, estimates: dict[str, FactorEstimate], finite: Tensor) -> None:
        beta = self.options.factor_decay
        for layer in self.layers:
            estimate = estimates.get(layer.name)
            if estimate is None:
                continue
            state = self._layer_state(layer)
            running_average(
                state, "activation_factor", symmetrize(estimate.activation_factor), beta, finite
            )
            running_average(
                state, "gradient_factor", symmetrize(estimate.gradient_factor), beta, finite
            )

    # ------------------------------------------------------------- refresh
    def _refresh_due(self, step: int) -> bool:
        if self.is_refresh_step(step) or self.counters.get("refresh_pending", False):
            return True
        # A layer whose factors appeared after the last refresh (unused until now).
        return any(
            "activation_factor" in state and "pi" not in state
            for state in map(self._layer_state, self.layers)
        )

    def _refresh_curvature(
        self, grad_sq: dict[Tensor, Tensor], total_grad_sq: Tensor, finite: Tensor
    ) -> None:
        # Refreshing from a step with non-finite gradients would bake a NaN damping
        # into Newton–Schulz inverses; postpone to the next step instead (refresh
        # steps synchronise anyway).
        if not bool(finite):
            self.counters["refresh_pending"] = True
            return
        self.counters["refresh_pending"] = False
        # Layers refreshed now and the entries their owner writes (sharded mode).
        refreshed: list[tuple[KroneckerLayer, dict[str, tuple[int, ...]]]] = []
        ready = self._layers_with_statistics()
        for layer in self.layers:
            state = self._layer_state(layer)
            if layer.name not in ready:
                continue
            # π is cheap and identical everywhere (global factors): every rank computes it.
            state["pi"] = pi_correction(state["activation_factor"], state["gradient_factor"])
            sides = (("activation", layer.activation_shape), ("gradient", layer.gradient_shape))
            if self.options.inverse == "eigh":
                # A diagonal side is its own spectrum: eigenvalues only, identity basis.
                shapes: dict[str, tuple[int, ...]] = {}
                for side, shape in sides:
                    shapes[f"{side}_eigenvalues"] = shape[:1]
                    if len(shape) == 2:
                        shapes[f"{side}_eigenvectors"] = shape
                refreshed.append((layer, shapes))
                if not self.owns_curvature(layer):
                    continue
                for side, _ in sides:
                    eigenvalues, eigenvectors = eigh_factor(state[f"{side}_factor"])
                    state[f"{side}_eigenvalues"] = eigenvalues
                    if eigenvectors is not None:
                        state[f"{side}_eigenvectors"] = eigenvectors
            elif any(p in grad_sq for p in layer.params):
                refreshed.append(
                    (
                        layer,
                        {
                            "activation_inverse": layer.activation_shape,
                            "activation_damping": (),
                            "gradient_inverse": layer.gradient_shape,
                            "gradient_damping": (),
                        },
                    )
                )
                if self.owns_curvature(layer):
                    self._invert(layer, self._layer_damping(layer, grad_sq, total_grad_sq))
                else:
                    self._record_inversion_damping(layer)
                    owner = self.curvature_owner[layer.name]
                    for side in ("activation", "gradient"):
                        state[f"{side}_inverse_method"] = f"broadcast from rank {owner}"
        self._share_curvature(refreshed)

    def _layers_with_statistics(self) -> set[str]:
        """Names of the blocks whose factors hold at least one finite update.

        The update counters live on the device; they are read in one transfer per device
        instead of one host sync per block.
        """
        by_device: dict[torch.device, list[tuple[str, Tensor]]] = {}
        for layer in self.layers:
            count = self._layer_state(layer).get("activation_factor_updates")
            if count is not None:
                by_device.setdefault(count.device, []).append((layer.name, count))
        ready: set[str] = set()
        for entries in by_device.values():
            counts = torch.stack([count for _, count in entries]).tolist()
            ready.update(name for (name, _), n in zip(entries, counts, strict=True) if n > 0)
        return ready

    def _record_inversion_damping(self, layer: KroneckerLayer) -> None:
        """Remember ``group["damping"]`` (a Python number) that the inverses are computed at.

        With constant damping a step compares it with the group's current value, no sync
        needed, and re-inverts when a scheduler or the user changed it.
        """
        if not self.adaptive_damping:
            damping = self._group_of(layer.weight)["damping"]
            self._layer_state(layer)["inverted_at_damping"] = damping

    def _invert(self, layer: KroneckerLayer, gamma: Tensor) -> None:
        """Damped inverses of both factors at damping γ (:func:`grng.linalg.damped_inverse`).

        The previous inverse is offered as a Newton–Schulz warm start only where an iteration
        is cheaper than a Cholesky inverse (:func:`grng.linalg.prefers_newton_schulz`: off
        CPU); on CPU every inversion is a float32 Cholesky inverse with its float64 check.
        """
        state = self._layer_state(layer)
        self._record_inversion_damping(layer)
        gradient_damping, activation_damping = sqrt_damping_split(gamma, state["pi"])
        for side, damping in (("activation", activation_damping), ("gradient", gradient_damping)):
            factor = state[f"{side}_factor"]
            previous = state.get(f"{side}_inverse")
            warm = previous if prefers_newton_schulz(factor.device) else None
            result = damped_inverse(factor, damping, warm_start=warm, tol=self.options.inverse_tol)
            state[f"{side}_inverse"] = result.inverse
            state[f"{side}_damping"] = damping.detach().clone()
            state[f"{side}_inverse_method"] = result.method

    def _constant_damping_solve(
        self, layer: KroneckerLayer, gradient_matrix: Tensor, damping: Tensor
    ) -> Tensor:
        """``inverse="eigh"`` with constant damping γ (K-FAC, RENG; not RING).

        Between refreshes the solve then depends only on what a refresh writes (eigenbases,
        π) and on γ, so what it can precompute is built once and kept per block:

        * factored form: the damped inverses ``Q diag(1/(λ + d)) Qᵀ`` of both factors
          (:func:`grng.linalg.eigh_damped_inverse`), and each step is the two products
          ``X_G V X_A`` instead of the eigenbasis route's four;
        * exact form (not Kronecker-separable): the inverse spectrum ``1/(g aᵀ + γ)``
          (:func:`grng.linalg.tikhonov_inverse_spectrum`), multiplied in between the four
          products instead of forming the outer product and dividing each step.

        The cache is rebuilt when its key changes: the eigenbasis and π tensors by identity
        (a refresh, ``load_state_dict``, a broadcast or a device move replaces them) and γ as the group's
        Python number (a scheduler or the user may change it; compared without a sync). It is
        derived data, kept out of ``state``: ``d_G² + d_A²`` numbers per block (factored) or
        ``d_G·d_A`` (exact, the size of the weight).
        """
        state = self._layer_state(layer)
        q_g, q_a = state.get("gradient_eigenvectors"), state.get("activation_eigenvectors")
        gradient_eigenvalues, activation_eigenvalues, pi = (
            state["gradient_eigenvalues"],
            state["activation_eigenvalues"],
            state["pi"],
        )
        tensors = (gradient_eigenvalues, activation_eigenvalues, pi, q_g, q_a)
        key = (*tensors, self._group_of(layer.weight)["damping"], damping.dtype)
        cached = self._spectra.get(layer.name)
        if cached is not None:
            old = cached[0]
            fresh = all(a is b for a, b in zip(old[:5], key[:5], strict=True))
            if not (fresh and old[5:] == key[5:]):
                cached = None
        if cached is None:
            if self.options.damping_form == "exact":
                built: tuple[Tensor, ...] = (
                    tikhonov_inverse_spectrum(
                        gradient_eigenvalues, activation_eigenvalues, damping
                    ),
                )
            else:
                gradient_damping, activation_damping = sqrt_damping_split(damping, pi)
                built = (
                    eigh_damped_inverse(gradient_eigenvalues, q_g, gradient_damping),
                    eigh_damped_inverse(activation_eigenvalues, q_a, activation_damping),
                )
            cached = (key, built)
            self._spectra[layer.name] = cached
        parts = cached[1]
        if len(parts) == 1:
            return eigenbasis_solve(gradient_matrix, q_g, q_a, parts[0])
        return kronecker_solve_inverse(gradient_matrix, parts[0], parts[1])

    # -------------------------------------------------------- precondition
    def _precondition_layer(
        self, layer: KroneckerLayer, gradient_matrix: Tensor, damping: Tensor
    ) -> Tensor:
        state = self._layer_state(layer)
        if "pi" not in state:
            # No curvature yet: the damped preconditioner of zero factors.
            return gradient_matrix / damping
        if self.options.inverse == "eigh":
            if not self.adaptive_damping:
                return self._constant_damping_solve(layer, gradient_matrix, damping)
            # Eigenvectors are absent for a diagonal side (the identity).
            gradient_eig = (state["gradient_eigenvalues"], state.get("gradient_eigenvectors"))
            activation_eig = (state["activation_eigenvalues"], state.get("activation_eigenvectors"))
            if self.options.damping_form == "exact":
                return kronecker_tikhonov_solve_eigh(
                    gradient_matrix, gradient_eig, activation_eig, damping
                )
            gradient_damping, activation_damping = sqrt_damping_split(damping, state["pi"])
            return kronecker_solve_eigh(
                gradient_matrix, gradient_eig, activation_eig, gradient_damping, activation_damping
            )
        if "activation_inverse" not in state:
            if not bool(self._step_finite):
                return gradient_matrix / damping  # a skipped step writes no inverse
            self._invert(layer, damping)
        if not self.adaptive_damping:
            # Constant damping between refreshes, unless a scheduler or the user changed
            # group["damping"]: compare Python floats (no sync) and re-invert on a change.
            if state.get("inverted_at_damping") != self._group_of(layer.weight)["damping"]:
                if not bool(self._step_finite):
                    return gradient_matrix / damping
                self._invert(layer, damping)
            return kronecker_solve_inverse(
                gradient_matrix, state["gradient_inverse"], state["activation_inverse"]
            )
        # Adaptive damping (RING): serve the shifted damping by the first-order correction
        # while its error bound holds, else re-invert (warm-started off CPU). One sync per layer.
        gradient_damping, activation_damping = sqrt_damping_split(damping, state["pi"])
        gradient_bound = shift_error_bound(
            gradient_damping - state["gradient_damping"], state["gradient_damping"]
        )
        activation_bound = shift_error_bound(
            activation_damping - state["activation_damping"], state["activation_damping"]
        )
        bound = gradient_bound + activation_bound + gradient_bound * activation_bound
        if bool((bound > self.options.inverse_tol) & self._step_finite):
            # Not on a step that will be skipped (its result is discarded anyway); both
            # conditions in one read.
            self._invert(layer, damping)
        left = shifted_inverse_first_order(
            state["gradient_inverse"],
            gradient_damping - state["gradient_damping"],
            gradient_matrix,
            "left",
        )
        return shifted_inverse_first_order(
            state["activation_inverse"],
            activation_damping - state["activation_damping"],
            left,
            "right",
        )
