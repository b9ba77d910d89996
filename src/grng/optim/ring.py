"""RING: Regularized Implicit Natural Gradient.

Gradient regularization ``L_G = L + (ρ/2)‖∇L‖²`` enters the local quadratic
model as damping: around θ, with ``g`` the minibatch gradient,
``L_G(θ + δ) ≈ L + gᵀδ + ½ δᵀ (F + ρ‖g‖² I) δ``, whose minimiser is::

    δ = −(F + γ_t I)⁻¹ g,    γ_t = λ + ρ‖g_t‖²

With the Kronecker-factored Fisher ``F = G ⊗ A`` per layer the solve is exact
(default ``damping_form="exact"``)::

    vec δ = −(G ⊗ A + γ_t I)⁻¹ vec V = −Q_G [(Q_Gᵀ V Q_A) ⊘ (g aᵀ + γ_t)] Q_Aᵀ

through the eigenbases refreshed every ``inverse_update_freq`` steps, so γ_t
changes every step at no extra cost: large while the gradient is large
(cautious, first-order-like steps), falling to λ near a stationary point.
``damping_form="factored"`` uses K-FAC's factored damping instead,
``(G + √γ_t/π I)⁻¹ ⊗ (A + π√γ_t I)⁻¹``, where ρ‖g‖² enters mostly through the
cross terms, at order √γ_t (see :mod:`grng.optim.kfac`). ``grad_norm="global"``
uses the norm over all parameters of the optimizer, ``"layer"`` each block's own
norm. Parameters outside Kronecker layers get ``g / (v + γ_t)`` with their
diagonal Fisher ``v``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from grng.optim.kfac import KFAC
from grng.optim.options import DampingForm, GradNormScope, InverseMethod, check_choice


class RING(KFAC):
    """K-FAC with the gradient-regularized damping ``γ_t = λ + ρ‖g_t‖²``.

    Args:
        model: the network to optimize.
        lr: learning rate η (default 0.1, damping 1: the exact form damps less than K-FAC's
            factored one at the same λ). The defaults of lr and damping were chosen across
            tasks (a BERT classifier, mnist1d, a ResNet, GPT-2, an LSTM) by the sweep in
            ``docs/tuning.md``; see there for when to change them.
        rho: gradient-regularization strength ρ ≥ 0 (ρ = 0 is K-FAC).
        damping: base damping λ > 0.
        grad_norm: ``"global"`` or ``"layer"`` gradient norm in γ_t.
        inverse: ``"eigh"`` (default) or ``"newton_schulz"``.
        damping_form: ``"exact"`` (default) or ``"factored"`` (see the module
            docstring); ``inverse="newton_schulz"`` needs ``"factored"``.
        **kwargs: as for :class:`grng.KFAC` (momentum, weight_decay,
            factor_update_freq, inverse_update_freq, kl_clip, ...).
    """

    adaptive_damping = True
    hyperparameters = (*KFAC.hyperparameters, "rho")

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.1,
        rho: float = 1e-3,
        damping: float = 1.0,
        *,
        grad_norm: GradNormScope = "global",
        inverse: InverseMethod = "eigh",
        damping_form: DampingForm = "exact",
        **kwargs: Any,
    ) -> None:
        self.grad_norm = check_choice("grad_norm", grad_norm, ("global", "layer"))
        super().__init__(
            model,
            lr=lr,
            damping=damping,
            rho=rho,
            inverse=inverse,
            damping_form=damping_form,
            **kwargs,
        )

    @property
    def uses_block_grad_norm(self) -> bool:  # type: ignore[override]
        return self.grad_norm == "layer"

    def damping(
        self, group: dict[str, Any], block_grad_sq: Tensor, total_grad_sq: Tensor
    ) -> Tensor:
        """``γ = λ + ρ‖g‖²`` with the global or the block's squared gradient norm."""
        grad_sq = total_grad_sq if self.grad_norm == "global" else block_grad_sq
        return group["damping"] + group["rho"] * grad_sq
