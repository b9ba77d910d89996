"""R-Kalman: the inverse Fisher tracked by Kalman recursions, GR as a step length.

The parameters are the hidden state of a filter whose belief ``N(θ_t, P_t)`` is
updated batch by batch; ``P`` plays the inverse Fisher. Per Kronecker layer
``P = P_G ⊗ P_A``, and each factor ``P = Λ⁻¹`` follows its information ``Λ``::

    forgetting (default)   Λ_t = β Λ_{t−1} + (1 − β) U Uᵀ + c E_t
    accumulate             Λ_t = Λ_{t−1} + U Uᵀ

with ``U`` (``d × k``) the captured rows (``U Uᵀ`` estimates the factor ``A`` or
``G``, see :mod:`grng.curvature.capture`) and ``c E_t`` the floor (below). ``P``
is never obtained by inverting ``Λ``: with decay ``b`` and weight ``w``
(``b = β, w = 1 − β``, or ``b = w = 1``), Woodbury gives the Kalman form::

    predict   P⁻ = P / b                           (exponential forgetting)
    update    S  = Uᵀ P⁻ U + I/w  = (Uᵀ P U + (b/w) I) / b       (k × k)
              K  = P⁻ U S⁻¹
              P  ← P⁻ − K Uᵀ P⁻ = (P − W Wᵀ) / b,   W = P U L⁻ᵀ,  L Lᵀ = Uᵀ P U + (b/w) I

(:func:`kalman_absorb`): one ``k × k`` Cholesky and triangular solve, ``O(d² k)``
flops. ``P − W Wᵀ`` is symmetric in exact arithmetic, not in rounding, and a
float32 asymmetry would grow by ``1/b`` per update; so each update's result (with
forgetting: after the floor's absorption, which follows the data's) is made exactly
symmetric as ``H + Hᵀ``, ``H = (P − W Wᵀ)/2``, with ``Hᵀ`` a blocked transposing copy
(``benchmarks/rkalman_update.py``: the unsymmetrised intermediate's asymmetry stayed
at rounding, ≤ 3.3e-8 relative over 300 float32 updates at d = 257).

Capture. The filter reads the captured rows ``U`` and, of the factor estimates, only
their traces (π at a layer's first update, the finiteness check) and the diagonal of a
diagonal side; the capture therefore estimates diagonals only
(``CurvatureCapture(statistics="diagonals")``), never a dense ``Σ a aᵀ``.

Prior and floor. The prior is K-FAC's factored damping: ``Λ_A ⪰ λ_A I``,
``Λ_G ⪰ λ_G I`` with ``λ_A = π√λ``, ``λ_G = √λ/π`` (``λ_A λ_G = λ``; π from the
first statistics, :func:`grng.linalg.pi_correction`). Forgetting would decay the
prior away, so every update also absorbs ``c e_i e_iᵀ`` for ``m`` coordinates
``i`` in rotation (:func:`absorb_coordinates`), every coordinate at least once in
any ``L = ⌈d/m⌉`` consecutive updates. With ``c = λ_f (1 − β^L)/β^{L−1}`` and the
prior ``Λ_0 = (λ_f/β^{L−1}) I`` the floor part of ``Λ`` is a diagonal ``D`` with
``D ⪰ λ_f I`` after every update, so ``Λ ⪰ λ_f I`` and ``‖P‖₂ ≤ 1/λ_f``; its entries
settle in the band ``[λ_f, λ_f/β^{L−1}]`` (the fixed point of ``x ← β^L x + c`` is
``λ_f/β^{L−1}``, and ``L − 1`` decays take it to ``λ_f``). The price: a coordinate
just absorbed is damped up to ``β^{−(L−1)}`` times more than the floor. The upper
end has two qualifications: the uniform prior sits above the band for the
coordinates first absorbed early in the first cycle, so after ``t`` updates
``D ≤ (1 + β^t (1 − β^{L−1})) λ_f/β^{L−1}``, the excess fading like the data; and
when ``m`` does not divide ``d`` the rotation absorbs some coordinates twice in a
cycle, which holds them higher, up to about ``2λ_f/β^{L−1}`` (≈ 2.03 λ_f for
``d = 33, m = 32``).

The floor follows ``damping``. Every update recomputes ``λ_A, λ_G`` from the group's
current ``damping`` and the π of the first statistics (kept in the state as
``pi``), so a changed damping (a scheduler, a user) is what the next absorbed
coordinates receive, and every coordinate has received it within one cycle of
``L`` updates. What was absorbed before forgets like the data: ``n`` updates after
the change ``D = D' + β^n (D_0 − D'_0)``, with ``D'`` the floor part had the new
damping always been in force, so the old floor's weight is ``β^n`` (0.36 after 20
updates, 0.1 after 45, for β = 0.95): the new band ``[λ_f', λ_f'/β^{L−1}]`` (and
``‖P‖₂ ≤ 1/λ_f'``) is reached at that rate, not at once. Accumulation
(``forgetting=False``) has no floor: its prior ``λ_f I`` is set at the first update
and never forgotten, so a later change of ``damping`` cannot act; the optimizer
warns once when it sees one.

Step. ``Δ = c_t² P_G V P_A`` per layer (two matmuls), ``c_t = 1 − β^t`` after ``t``
updates with forgetting (the data's total weight in ``Λ_t``: ``Λ_t / c_t`` is the
bias-corrected average, whose inverse is ``c_t P``), ``c_t = 1`` when accumulating;
parameters outside Kronecker layers use the base's diagonal fallback.

Effective damping: a warm-up, on purpose. Write ``Λ_t = M_t + D_t``, with
``M_t = Σ_s (1 − β) β^{t−s} U_s U_sᵀ`` the data and ``D_t`` the floor part. The
step's ``c_t P = (M_t/c_t + D_t/c_t)⁻¹`` bias-corrects both, so the damping a
factor applies after ``t`` updates is ``D_t/c_t``: entries from ``λ_A/c_t`` to
``λ_A/(c_t β^{L−1})`` for ``A`` (``λ_G`` for ``G``; the band above, with its
qualifications), and the factored damping of the product is
``λ_A λ_G / c_t² = λ/c_t²``. For β = 0.95: 400 λ at the first update
(``c_1 = 0.05``), 105 λ at the 2nd, 19.5 λ at the 5th, 6.2 λ at the 10th, 2.43 λ at
the 20th; within 10% of the floor after 47 updates per factor (``1/c_t ≤ 1.1``) and
60 for the product (``1/c_t² ≤ 1.1``). ``t`` counts filter updates, i.e. capture
steps: the default ``factor_update_freq = 1`` makes it 60 optimizer steps (600 at
``factor_update_freq = 10``, with which R-Kalman stalled on a BERT classifier). It
is kept on purpose: (1) bias-correcting ``M_t`` alone would need the inverse of
``M_t + c_t D_t``, which differs from one forgetting update of its predecessor by
the full-rank diagonal ``(c_t − c_{t−1}) β D_{t−1}``: no low-rank Kalman update
makes it, so ``P`` would need the inversion this method exists to avoid; (2) while
``M_t`` holds few batches (rank ``≤ k`` each, noisy) the larger damping keeps the
first steps short, like a learning-rate warm-up, erring on the safe side: without
the correction the first steps were up to ``1/c_t²`` too long and diverged a CNN
(``test_regression_forgetting_bias_inflated_early_steps_and_diverged_a_cnn``).

Gradient regularisation
``L_G = L + (ρ/2)‖∇L‖²`` enters as a scalar along Δ: its quadratic model
``L_G(θ − tΔ) ≈ L_G − t gᵀΔ + ½ t² (ΔᵀFΔ + ρ‖g‖²‖Δ‖²)``, with ``ΔᵀFΔ = gᵀΔ`` when
``F = P⁻¹``, is minimised by::

    α = gᵀΔ / (gᵀΔ + γ_t ‖Δ‖²) = 1 / (1 + γ_t ‖Δ‖² / gᵀΔ),   γ_t = ρ ‖g_t‖²

(global over all parameters; α = 1 for ρ = 0, 0 if ``gᵀΔ ≤ 0``), so GR never
lengthens the step. Then KL clip, momentum and weight decay as in the base.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from grng._warnings import warn
from grng.curvature import FactorEstimate, KroneckerLayer
from grng.linalg import kronecker_solve_inverse, pi_correction
from grng.optim.base import CurvatureOptimizer, ExcludeRule, sqrt_damping_split
from grng.optim.options import (
    DEFAULT_MAX_FACTOR_DIM,
    CurvatureOptions,
    FisherType,
    LossReduction,
    NonfinitePolicy,
    check_bool,
    check_int,
)


def _downdate(
    covariance: Tensor,
    pu: Tensor,
    utpu: Tensor,
    noise: float | Tensor,
    decay: float,
    symmetric: bool = True,
) -> Tensor:
    """``(P − PU (UᵀPU + noise·I)⁻¹ UᵀP) / decay`` from ``PU`` and ``UᵀPU``. No sync.

    ``symmetric``: make the result exactly (bitwise) symmetric; ``False`` leaves the
    rounding asymmetry of ``P − W Wᵀ`` (relative ~1e-8 in float32) for a caller that
    symmetrises after a further update.
    """
    eye = torch.eye(utpu.shape[0], dtype=utpu.dtype, device=utpu.device)
    s = utpu + noise * eye
    # cholesky_ex: a non-finite S (a step that will be masked) must not raise.
    lower, _ = torch.linalg.cholesky_ex(0.5 * (s + s.mT))
    w = torch.linalg.solve_triangular(lower, pu.mT, upper=False).mT  # W = P U L⁻ᵀ
    if not symmetric:
        return torch.addmm(covariance, w, w.mT, beta=1 / decay, alpha=-1 / decay)
    # Symmetrised: in float32 the rounding of P − W Wᵀ is not symmetric, and the
    # antisymmetric part grows by 1/decay per update until P is indefinite (|λ| ~ 1e21
    # after ~600 updates of a small MLP; tests/test_reliability.py). As H + Hᵀ with
    # H = (P − W Wᵀ)/2: bitwise symmetric (a + b = b + a), and Hᵀ is made by a blocked
    # transposing copy, where (M + Mᵀ)/2 read Mᵀ with a stride of d, which took three
    # times the d²k matmul at d = 2049 (benchmarks/rkalman_update.py).
    half = torch.addmm(covariance, w, w.mT, beta=0.5 / decay, alpha=-0.5 / decay)
    return half.add_(half.mT.contiguous())


def kalman_absorb(
    covariance: Tensor,
    columns: Tensor,
    decay: float = 1.0,
    weight: float = 1.0,
    *,
    symmetric: bool = True,
) -> Tensor:
    """``(decay·P⁻¹ + weight·U Uᵀ)⁻¹`` from ``P`` and ``U`` (``d × k``), a k×k solve only.

    ``decay = β, weight = 1 − β`` is one step of the running average
    ``Λ ← βΛ + (1 − β) U Uᵀ``; ``decay = weight = 1`` accumulates ``Λ ← Λ + U Uᵀ``.
    ``symmetric=False`` skips the final symmetrisation (see :func:`_downdate`).
    """
    pu = covariance @ columns
    return _downdate(covariance, pu, columns.mT @ pu, decay / weight, decay, symmetric)


def absorb_coordinates(
    covariance: Tensor, index: Tensor, information: Tensor, *, symmetric: bool = True
) -> Tensor:
    """``(P⁻¹ + c Σ_{i ∈ index} e_i e_iᵀ)⁻¹`` (the floor's rank-m update) by gathers.

    With ``U = √c E``: ``PU = √c P[:, i]``, ``UᵀPU = c P[i, i]``, and the update is
    ``P − P[:, i] (P[i, i] + I/c)⁻¹ P[i, :]``; no matmul with ``E``.
    """
    pu = covariance.index_select(1, index)
    return _downdate(covariance, pu, pu.index_select(0, index), 1 / information, 1.0, symmetric)


def floor_schedule(dim: int, columns: int, decay: float) -> tuple[int, float, float]:
    """``(L, c/λ_f, Λ_0/λ_f)`` of the rotating floor: ``L = ⌈d/m⌉`` updates per cycle,
    information ``c = λ_f (1 − β^L)/β^{L−1}`` per coordinate absorbed, prior
    ``λ_f/β^{L−1}`` (see the module docstring for why ``Λ ⪰ λ_f I`` then holds)."""
    cycle = math.ceil(dim / min(columns, dim))
    return cycle, (1 - decay**cycle) / decay ** (cycle - 1), decay ** -(cycle - 1)


class RKalman(CurvatureOptimizer):
    """R-Kalman: Kronecker-factored inverse Fisher tracked by Kalman recursions.

    Args:
        model: the network to optimize.
        lr: learning rate η (default 0.3, damping 0.1, factor_update_freq 1: one Kalman
            update per step). The defaults of lr and damping were chosen across tasks (a
            BERT classifier, mnist1d, a ResNet, GPT-2, an LSTM) by the sweep in
            ``docs/tuning.md``; see there for when to change them.
        rho: gradient-regularization strength ρ ≥ 0 (ρ = 0: α = 1).
        damping: the floor λ of the factored information (``λ_A λ_G = λ``,
            split by π). The step's effective damping starts above it on
            purpose (a warm-up, see the module docstring): after ``t`` updates
            each factor is damped by its floor part over ``c_t = 1 − β^t``
            (``λ_A/c_t … λ_A/(c_t β^{L−1})``), the product by ``λ/c_t²``:
            400 λ at the first update for β = 0.95, 2.43 λ at the 20th,
            within 10% of λ after 60. Read at every update: with forgetting a
            change is what the next absorbed coordinates receive, reaches every coordinate
            within one cycle of ``L`` updates and replaces the old floor at the
            forgetting rate ``β^n``; with ``forgetting=False`` it has no effect
            (warned once).
        momentum, weight_decay: as for :class:`grng.KFAC`.
        forgetting: ``True``: ``Λ ← βΛ + (1 − β)UUᵀ`` with ``β = factor_decay``
            and the rotating floor; ``False``: ``Λ ← Λ + UUᵀ`` from the prior
            ``λ_f I`` (exact Bayesian accumulation; steps shrink like 1/updates).
        rows_per_update: k, rows absorbed per factor and update (the largest
            innovation solved, k × k); the capture keeps a random k of them.
        floor_columns: m, coordinates of the floor absorbed per update (≤ k
            keeps every solve innovation-sized); default k.
        seed: seeds which rows are kept.
        exclude, param_groups, max_factor_dim: as for :class:`grng.KFAC` (groups may
            set ``rho`` too; a diagonal side keeps the diagonal of its covariance).
        factor_update_freq, factor_decay, fisher, kl_clip, nonfinite,
        loss_reduction: see :class:`grng.optim.CurvatureOptions` (no inverses
            are refreshed).
    """

    hyperparameters = (*CurvatureOptimizer.hyperparameters, "rho")

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.3,
        rho: float = 1e-3,
        damping: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        forgetting: bool = True,
        rows_per_update: int = 32,
        floor_columns: int | None = None,
        seed: int = 0,
        factor_update_freq: int = 1,
        factor_decay: float = 0.95,
        fisher: FisherType = "empirical",
        kl_clip: float | None = 1e-3,
        nonfinite: NonfinitePolicy = "skip",
        loss_reduction: LossReduction = "mean",
        exclude: ExcludeRule | Iterable[ExcludeRule] | None = None,
        param_groups: Sequence[Mapping[str, Any]] | None = None,
        max_factor_dim: int | None = DEFAULT_MAX_FACTOR_DIM,
    ) -> None:
        options = CurvatureOptions(
            factor_update_freq=factor_update_freq,
            factor_decay=factor_decay,
            fisher=fisher,
            kl_clip=kl_clip,
            nonfinite=nonfinite,
            loss_reduction=loss_reduction,
            max_factor_dim=max_factor_dim,
        )
        if forgetting and factor_decay == 0.0:
            raise ValueError("factor_decay must be in (0, 1) with forgetting=True, got 0.0")
        self.forgetting = check_bool("forgetting", forgetting)
        self.rows_per_update = check_int("rows_per_update", rows_per_update)
        self.floor_columns = check_int(
            "floor_columns", rows_per_update if floor_columns is None else floor_columns
        )
        self.seed = check_int("seed", seed, low=0)
        defaults = dict(
            lr=lr, rho=rho, damping=damping, momentum=momentum, weight_decay=weight_decay
        )
        super().__init__(model, defaults, options, exclude=exclude, param_groups=param_groups)
        self.capture.keep_rows = self.rows_per_update
        # R-Kalman reads the factors' traces (π, the finiteness check), the diagonal of
        # a diagonal side and the kept rows, never a dense factor: estimate diagonals only.
        self.capture.set_statistics("diagonals")
        self._warned_damping = False
        self.capture.row_seed = self._row_seed(0)

    def _row_seed(self, step: int) -> int:
        return self.seed * 1_000_003 + step

    # ------------------------------------------------------------- filter
    def _update_curvature(self, estimates: dict[str, FactorEstimate], finite: Tensor) -> None:
        beta = self.options.factor_decay if self.forgetting else 1.0
        weight = 1 - beta if self.forgetting else 1.0
        for layer in self.layers:
            estimate = estimates.get(layer.name)
            if estimate is None:
                continue
            state = self._layer_state(layer)
            if "activation_covariance" not in state:
                self._initialise(layer, state, estimate, finite)
            self._follow_damping(layer, state)
            for side, rows, factor in (
                ("activation", estimate.activation_rows, estimate.activation_factor),
                ("gradient", estimate.gradient_rows, estimate.gradient_factor),
            ):
                old = state[f"{side}_covariance"]
                if old.dim() == 1:
                    # A diagonal side: its information is the diagonal, updated exactly.
                    new = 1 / (beta / old + weight * factor.to(old.dtype))
                else:
                    if rows is None:
                        raise ValueError(
                            f"RKalman: block {layer.name!r} has a dense {side} side but its "
                            "adapter returned no rows (activation_statistic's third value); "
                            "R-Kalman absorbs rows, so return them or make the side diagonal"
                        )
                    # With forgetting the floor's update follows and symmetrises.
                    new = kalman_absorb(
                        old, rows.mT.to(old.dtype), beta, weight, symmetric=not self.forgetting
                    )
                if self.forgetting:
                    new = self._absorb_floor(state, side, new, finite)
                state[f"{side}_covariance"] = torch.where(finite, new, old)
            state["updates"] = state.get("updates", torch.zeros_like(finite, dtype=torch.int64))
            state["updates"] = state["updates"] + finite.to(torch.int64)

    def _initialise(
        self, layer: KroneckerLayer, state: dict[str, Any], estimate: FactorEstimate, ok: Tensor
    ) -> None:
        """Prior ``P = I/Λ_0`` per factor, with the factored-damping split of λ by π."""
        pi = pi_correction(estimate.activation_factor, estimate.gradient_factor)
        pi = torch.where(ok & torch.isfinite(pi), pi, torch.ones_like(pi))
        damping = torch.as_tensor(self._group_of(layer.weight)["damping"], dtype=pi.dtype)
        gradient_floor, activation_floor = sqrt_damping_split(damping.to(pi.device), pi)
        beta = self.options.factor_decay
        state["pi"] = pi  # the split of every later damping (_follow_damping)
        if not self.forgetting:
            state["prior_damping"] = float(self._group_of(layer.weight)["damping"])
        for side, floor, shape in (
            ("activation", activation_floor, layer.activation_shape),
            ("gradient", gradient_floor, layer.gradient_shape),
        ):
            dim = shape[0]
            prior = floor_schedule(dim, self.floor_columns, beta)[2] if self.forgetting else 1.0
            # A diagonal side keeps the diagonal of its covariance only.
            eye = torch.ones(dim, dtype=pi.dtype, device=pi.device)
            if len(shape) == 2:
                eye = torch.diag(eye)
            state[f"{side}_covariance"] = eye / (floor * prior)
            state[f"{side}_floor"] = floor
            state[f"{side}_floor_cursor"] = torch.zeros((), dtype=torch.int64, device=pi.device)

    def _follow_damping(self, layer: KroneckerLayer, state: dict[str, Any]) -> None:
        """The floor ``λ_A, λ_G`` from the group's current damping, split by the stored π.

        With forgetting the next absorbed coordinates get it (module docstring);
        accumulating has a fixed prior, so a change there can only be warned about.
        """
        damping = float(self._group_of(layer.weight)["damping"])
        if "pi" not in state:  # a state saved before π was stored: λ_A/λ_G = π²
            state["pi"] = torch.sqrt(state["activation_floor"] / state["gradient_floor"])
        if not self.forgetting:
            prior = state.setdefault("prior_damping", damping)
            if damping != prior and not self._warned_damping:
                self._warned_damping = True
                warn(
                    f"RKalman(forgetting=False): damping of layer {layer.name!r} changed from "
                    f"{prior:g} to {damping:g}, which has no effect: accumulation keeps the "
                    "prior λ_f I of its first update and never forgets it. Use "
                    "forgetting=True (its floor follows the damping) or a new optimizer. "
                    "Warning once.",
                    RuntimeWarning,
                )
            return
        pi = state["pi"]
        gamma = torch.as_tensor(damping, dtype=pi.dtype, device=pi.device)
        state["gradient_floor"], state["activation_floor"] = sqrt_damping_split(gamma, pi)

    def _absorb_floor(
        self, state: dict[str, Any], side: str, covariance: Tensor, finite: Tensor
    ) -> Tensor:
        """Absorb ``c e_i e_iᵀ`` for the next ``m`` coordinates (cyclically), no sync."""
        dim = covariance.shape[0]
        columns = min(self.floor_columns, dim)
        _, information, _ = floor_schedule(dim, columns, self.options.factor_decay)
        cursor = state[f"{side}_floor_cursor"]
        index = (cursor + torch.arange(columns, device=cursor.device)) % dim
        state[f"{side}_floor_cursor"] = torch.where(finite, (cursor + columns) % dim, cursor)
        floor = state[f"{side}_floor"].to(covariance.dtype)
        if covariance.dim() == 1:
            added = torch.zeros_like(covariance).index_fill_(0, index, 1.0) * floor * information
            return 1 / (1 / covariance + added)
        return absorb_coordinates(covariance, index, floor * information)

    # --------------------------------------------------------------- step
    def _precondition_layer(
        self, layer: KroneckerLayer, gradient_matrix: Tensor, damping: Tensor
    ) -> Tensor:
        """``Δ = c_t² P_G V P_A`` (``V / λ`` before the layer has statistics)."""
        state = self._layer_state(layer)
        if "activation_covariance" not in state:
            return gradient_matrix / damping
        delta = kronecker_solve_inverse(
            gradient_matrix, state["gradient_covariance"], state["activation_covariance"]
        )
        if self.forgetting:
            # Bias correction: after t updates the data carry a total weight 1 − β^t in
            # Λ_t, so Λ_t / (1 − β^t) is the running average's estimate, and its inverse
            # is (1 − β^t)·P — per factor, a scalar, no inversion.
            t = state["updates"].to(delta.dtype)
            delta = delta * (1 - self.options.factor_decay**t) ** 2
        return delta

    def _precondition(
        self,
        search: dict[Tensor, Tensor],
        grad_sq: dict[Tensor, Tensor],
        total_grad_sq: Tensor,
        grads: dict[Tensor, Tensor] | None = None,
    ) -> dict[Tensor, Tensor]:
        """The preconditioned directions scaled by the GR step length α (module docstring)."""
        directions = super()._precondition(search, grad_sq, total_grad_sq, grads)
        if all(group["rho"] == 0 for group in self.param_groups):
            return directions
        along, length = [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p in directions:
                    delta = directions[p].to(total_grad_sq.dtype)
                    along.append((delta * search[p].to(delta.dtype)).sum())
                    length.append(delta.pow(2).sum() * group["rho"])
        slope = torch.stack(along).sum().clamp_min(0)
        penalty = total_grad_sq * torch.stack(length).sum()
        alpha = slope / (slope + penalty).clamp_min(torch.finfo(slope.dtype).tiny)
        return {p: d * alpha.to(d.dtype) for p, d in directions.items()}
