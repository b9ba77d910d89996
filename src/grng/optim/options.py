"""Typed options shared by every curvature optimizer, and the checks on them.

Per-group hyperparameters (``lr``, ``damping``, ``momentum``, ...) live in
``param_groups`` as in ``torch.optim``, so schedulers can change them; the
options here configure the curvature machinery and are fixed for an
optimizer's life.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Literal

import torch

FisherType = Literal["empirical", "mc"]
InverseMethod = Literal["eigh", "newton_schulz"]
NonfinitePolicy = Literal["skip", "raise"]
GradNormScope = Literal["global", "layer"]
#: How the damping γ enters a Kronecker block: ``"exact"`` ``(G ⊗ A + γ I)⁻¹``, or
#: ``"factored"`` ``(G + (√γ/π) I)⁻¹ ⊗ (A + π√γ I)⁻¹`` (K-FAC's factored Tikhonov damping).
DampingForm = Literal["exact", "factored"]
#: How the training loss reduces over examples (sets the scale of the gradient factor).
LossReduction = Literal["mean", "sum"]
#: How curvature work is split across data-parallel ranks (see :mod:`grng.distributed`).
DistributedMode = Literal["auto", "shard", "replicate"]
#: Default cap on a dense factor side (see ``CurvatureOptions.max_factor_dim``).
DEFAULT_MAX_FACTOR_DIM = 4096
#: Default cap on the rows behind one call's dense factor sums (``max_statistics_rows``).
DEFAULT_MAX_STATISTICS_ROWS = 1024


def check_real(
    name: str,
    value: Any,
    *,
    low: float = 0.0,
    low_open: bool = False,
    high: float = math.inf,
    high_open: bool = True,
    tensor: bool = False,
) -> float:
    """``value`` as a float, or a ValueError/TypeError naming ``name`` and the allowed range.

    With ``tensor=True`` a one-element floating-point tensor (``torch.tensor(0.01)``, as
    ``torch.optim`` accepts for ``lr``) is accepted too and checked by its value, which
    reading synchronises once on an accelerator; a tensor of several elements raises
    ValueError, one of another dtype TypeError.
    """
    if tensor and isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{name} must be a number or a one-element tensor, got a tensor of shape "
                f"{tuple(value.shape)}"
            )
        if not value.is_floating_point():
            raise TypeError(
                f"{name} must be a real number or a one-element floating-point tensor, "
                f"got a tensor of dtype {value.dtype}"
            )
        x = float(value.detach().reshape(()))
    elif isinstance(value, bool) or not isinstance(value, Real):
        kind = "a real number or a one-element tensor" if tensor else "a real number"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__} {value!r}")
    else:
        x = float(value)
    below = x <= low if low_open else x < low
    above = x >= high if high_open else x > high
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if below or above:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"{name} must be in {lo}{low}, {high}{hi}, got {value!r}")
    return x


def check_int(name: str, value: Any, *, low: int = 1) -> int:
    """``value`` as an int (any integral type, e.g. ``numpy.int64``; not bool or float)."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool (``numpy.bool_`` too), else a TypeError naming ``name``."""
    if not isinstance(value, bool) and type(value).__name__ != "bool_":
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return str(value)


@dataclass(frozen=True)
class CurvatureOptions:
    """How curvature is captured, refreshed and applied.

    Attributes:
        factor_update_freq: capture statistics and update the factors every this
            many steps; the hooks do no work on the other steps.
        inverse_update_freq: recompute eigenbases / inverses every this many steps
            (the "lazy Fisher"); also the period of the health checks that need
            a host synchronisation.
        factor_decay: β of the running averages ``F ← β F + (1 − β) F_batch``.
        fisher: ``"empirical"`` (output gradients of the training loss) or
            ``"mc"`` (of labels sampled from the model, see
            :meth:`CurvatureOptimizer.backward_fisher`).
        inverse: ``"eigh"`` (eigenbases; any damping applied exactly) or
            ``"newton_schulz"`` (damped inverses, :func:`grng.linalg.damped_inverse`: a
            float32 Cholesky inverse on CPU, Newton–Schulz warm-started from the previous
            inverse elsewhere, each checked in float64 against ``inverse_tol``).
        kl_clip: the KL-clip bound κ (Ba et al. 2017); ``None`` disables it.
        nonfinite: ``"skip"`` a step with non-finite gradients or statistics
            (nothing changes, a counter increments), or ``"raise"``.
        inverse_tol: residual tolerance ``‖MX − I‖_F/√d`` of Newton–Schulz inverses,
            and the bound on the relative error of their first-order damping shift.
        damping_form: ``"exact"`` solves ``(G ⊗ A + γ I) Δ = V`` through the
            factors' eigenbases (needs ``inverse="eigh"``); ``"factored"`` uses
            K-FAC's ``(G + (√γ/π) I)⁻¹ V (A + π√γ I)⁻¹``.
        loss_reduction: ``"mean"`` if the training loss averages over examples
            (``F.cross_entropy``'s default), ``"sum"`` if it sums over them; the
            factors estimate the per-example Fisher either way.
        distributed: data-parallel mode under ``torch.distributed`` (see
            :mod:`grng.distributed`). ``"shard"``: factors are all-reduced on
            capture steps and each rank computes only its share of the
            inverses/eigenbases, then broadcasts them; ``"replicate"``: factors
            are all-reduced and every rank computes every inverse (no broadcast,
            ``world_size`` times the inverse work); ``"auto"`` (default) is
            ``"shard"`` when a process group with more than one rank is
            initialised and single-process otherwise; ``None`` ignores
            ``torch.distributed`` (each rank on its own: only correct without DDP).
        max_factor_dim: the widest factor side kept as a dense matrix; a wider side
            (``d_A``, which includes the bias column, or ``d_G``) is kept as its
            diagonal ``E[a²]`` / ``E[g²]`` instead. It trades that side's
            cross-coordinate curvature (the other side stays dense) for cost: a dense
            side of width ``d`` costs ``d²`` memory and an ``O(d³)`` eigh or inverse at
            every refresh. Measured per factor on one CPU thread (torch 2.13,
            ``benchmarks/factor_cost.py``, ``results/factor_cost.md``,
            ``docs/performance.md``): eigh 0.73 s at d = 2048, 7.9 s at 4096, 9.7 s at
            4608; K-FAC's damped inverse (float32 Cholesky + float64 check) 0.56 s,
            4.1 s, 5.2 s. K-FAC, RING and RENG warn at construction when a kept dense
            side of a CPU layer is estimated above 1 s per refresh, with the estimate.
            The default 4096 keeps every side
            of width ≤ 4096 dense and makes the 4608-wide input side of a
            ``Conv2d(512, 512, 3)`` (ResNet-18's last stage, three such layers)
            diagonal, so no ResNet-18 refresh spends tens of seconds per factor.
            ``None``: no cap. Structural: fixed for the optimizer's life; see
            ``optimizer.coverage()`` for which sides are diagonal.
        max_statistics_rows: the most rows of one layer call behind a dense factor
            sum on capture steps: a call with more rows (a Linear's input
            ``(B, T, d)`` has ``B·T``, a convolution's ``N × positions``) estimates
            ``Σ a aᵀ`` and ``Σ g gᵀ`` from at most this many rows, drawn with
            probability ``π ∝ ‖row‖²`` (capped at 1) and weighted by ``1/π``: unbiased
            (the expected estimate is the full one), and exact for a call within the
            cap, with at most that many nonzero rows, or on a side narrower than 128;
            counts and normalisation are unchanged (``grng.curvature.capture``, "Row
            subsets"). Measured in ``docs/algorithms.md`` ("Capture cost"): at the
            default 1024, one capture's K-FAC step is 1.6–3.9% (damping 0.1) and
            4.3–9.3% (1e-3) off the step from every row on a character transformer,
            a BERT classifier, an MLP and a Conv1d net, less than the difference
            between two batches' full estimates on each, and the character
            transformer's capture (4096 rows per call) took 138 ms instead of 322.
            ``None``: every row.
    """

    factor_update_freq: int = 10
    inverse_update_freq: int = 50
    factor_decay: float = 0.95
    fisher: FisherType = "empirical"
    inverse: InverseMethod = "eigh"
    kl_clip: float | None = 1e-3
    nonfinite: NonfinitePolicy = "skip"
    inverse_tol: float = 1e-4
    distributed: DistributedMode | None = "auto"
    damping_form: DampingForm = "factored"
    loss_reduction: LossReduction = "mean"
    max_factor_dim: int | None = DEFAULT_MAX_FACTOR_DIM
    max_statistics_rows: int | None = DEFAULT_MAX_STATISTICS_ROWS

    def __post_init__(self) -> None:
        # Stored as plain ints (a numpy integer would otherwise leak into step arithmetic).
        object.__setattr__(
            self, "factor_update_freq", check_int("factor_update_freq", self.factor_update_freq)
        )
        object.__setattr__(
            self, "inverse_update_freq", check_int("inverse_update_freq", self.inverse_update_freq)
        )
        check_real("factor_decay", self.factor_decay, low=0.0, high=1.0)
        check_choice("fisher", self.fisher, ("empirical", "mc"))
        check_choice("inverse", self.inverse, ("eigh", "newton_schulz"))
        if self.kl_clip is not None:
            check_real("kl_clip", self.kl_clip, low=0.0, low_open=True)
        check_choice("nonfinite", self.nonfinite, ("skip", "raise"))
        check_real("inverse_tol", self.inverse_tol, low=0.0, low_open=True)
        if self.distributed is not None:
            check_choice("distributed", self.distributed, ("auto", "shard", "replicate"))
        check_choice("damping_form", self.damping_form, ("exact", "factored"))
        check_choice("loss_reduction", self.loss_reduction, ("mean", "sum"))
        if self.max_factor_dim is not None:
            object.__setattr__(
                self, "max_factor_dim", check_int("max_factor_dim", self.max_factor_dim)
            )
        if self.max_statistics_rows is not None:
            object.__setattr__(
                self,
                "max_statistics_rows",
                check_int("max_statistics_rows", self.max_statistics_rows),
            )
        if self.damping_form == "exact" and self.inverse != "eigh":
            raise ValueError(
                "damping_form='exact' needs inverse='eigh': Newton–Schulz stores damped "
                "inverses of each factor, which can only serve the factored form; pass "
                "inverse='eigh' or damping_form='factored'"
            )


def check_group_hyperparameters(group: dict[str, Any]) -> None:
    """Validate the per-group hyperparameters every curvature optimizer shares."""
    # A tensor lr works as in torch.optim (e.g. for a scheduler updating it in place).
    check_real("lr", group["lr"], tensor=True)
    check_real("damping", group["damping"], low=0.0, low_open=True)
    check_real("momentum", group["momentum"], low=0.0, high=1.0)
    check_real("weight_decay", group["weight_decay"])
    if "rho" in group:
        check_real("rho", group["rho"])
