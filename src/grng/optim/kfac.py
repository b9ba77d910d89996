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
  :func:`grng.linalg.kronecker_solve_eigh`).
* ``inverse="newton_schulz"`` (factored form only) stores the damped inverses
  of the two factors at the damping of the refresh step, warm-started from the
  previous ones (:func:`grng.linalg.damped_inverse`). With constant damping
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

from torch import Tensor, nn

from grng.curvature import FactorEstimate, KroneckerLayer
from grng.linalg import (
    damped_inverse,
    eigh_factor,
    kronecker_solve_eigh,
    kronecker_solve_inverse,
    kronecker_tikhonov_solve_eigh,
    pi_correction,
    shift_error_bound,
    shifted_inverse_first_order,
    symmetrize,
)
from grng.optim.base import (
    CurvatureOptimizer,
    ExcludeRule,
    running_average,
    sqrt_damping_split,
)
from grng.optim.options import (
    DEFAULT_MAX_FACTOR_DIM,
    CurvatureOptions,
    DampingForm,
    DistributedMode,
    FisherType,
    InverseMethod,
    LossReduction,
    NonfinitePolicy,
)


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
        factor_update_freq, inverse_update_freq, factor_decay, fisher, inverse,
        kl_clip, nonfinite, inverse_tol, distributed, damping_form, loss_reduction:
            see :class:`grng.optim.CurvatureOptions` (``distributed="auto"`` shards
            the refreshes across ranks when a process group is initialised;
            ``damping_form="exact"`` needs ``inverse="eigh"``). KFAC's and RENG's
            ``inverse`` default is ``"newton_schulz"``, RING's ``"eigh"``.

    ``optimizer.coverage()`` lists which curvature each parameter gets.
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
        )
        defaults = dict(
            lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay, **extra_defaults
        )
        super().__init__(model, defaults, options, exclude=exclude, param_groups=param_groups)

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
        for layer in self.layers:
            state = self._layer_state(layer)
            if "activation_factor" not in state or not bool(state["activation_factor_updates"] > 0):
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

    def _record_inversion_damping(self, layer: KroneckerLayer) -> None:
        """Remember ``group["damping"]`` (a Python number) that the inverses are computed at.

        With constant damping a step compares it with the group's current value, no sync
        needed, and re-inverts when a scheduler or the user changed it.
        """
        if not self.adaptive_damping:
            damping = self._group_of(layer.weight)["damping"]
            self._layer_state(layer)["inverted_at_damping"] = damping

    def _invert(self, layer: KroneckerLayer, gamma: Tensor) -> None:
        """Newton–Schulz inverses of both damped factors at damping γ, warm-started."""
        state = self._layer_state(layer)
        self._record_inversion_damping(layer)
        gradient_damping, activation_damping = sqrt_damping_split(gamma, state["pi"])
        for side, damping in (("activation", activation_damping), ("gradient", gradient_damping)):
            result = damped_inverse(
                state[f"{side}_factor"],
                damping,
                warm_start=state.get(f"{side}_inverse"),
                tol=self.options.inverse_tol,
            )
            state[f"{side}_inverse"] = result.inverse
            state[f"{side}_damping"] = damping.detach().clone()
            state[f"{side}_inverse_method"] = result.method

    # -------------------------------------------------------- precondition
    def _precondition_layer(
        self, layer: KroneckerLayer, gradient_matrix: Tensor, damping: Tensor
    ) -> Tensor:
        state = self._layer_state(layer)
        if "pi" not in state:
            # No curvature yet: the damped preconditioner of zero factors.
            return gradient_matrix / damping
        if self.options.inverse == "eigh":
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
        gradient_damping, activation_damping = sqrt_damping_split(damping, state["pi"])
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
        # while its error bound holds, else re-invert (warm-started). One sync per layer.
        gradient_bound = shift_error_bound(
            gradient_damping - state["gradient_damping"], state["gradient_damping"]
        )
        activation_bound = shift_error_bound(
            activation_damping - state["activation_damping"], state["activation_damping"]
        )
        bound = gradient_bound + activation_bound + gradient_bound * activation_bound
        if bool(bound > self.options.inverse_tol) and bool(self._step_finite):
            # Not on a step that will be skipped (its result is discarded anyway).
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
