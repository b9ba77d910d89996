"""RING: Regularized Implicit Natural Gradient.

Gradient regularization ``L_G = L + (ρ/2)‖∇L‖²`` enters the local quadratic
model as damping: around θ, with ``g`` the minibatch gradient,
``L_G(θ + δ) ≈ L + gᵀδ + ½ δᵀ (F + ρ‖g‖² I) δ``, whose minimiser is::

    δ = −(F + γ_t I)⁻¹ g,    γ_t = λ + ρ‖g_t‖²

With the Kronecker-factored Fisher this is K-FAC whose damping follows the
gradient norm: large while the gradient is large (cautious, first-order-like
steps), falling to λ near a stationary point. ``grad_norm="global"`` uses the
norm over all parameters of the optimizer, ``"layer"`` each block's own norm.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from grng.optim.kfac import KFAC
from grng.optim.options import GradNormScope, InverseMethod, check_choice


class RING(KFAC):
    """K-FAC with the gradient-regularized damping ``γ_t = λ + ρ‖g_t‖²``.

    Args:
        model: the network to optimize.
        lr: learning rate η.
        rho: gradient-regularization strength ρ ≥ 0 (ρ = 0 is K-FAC).
        damping: base damping λ > 0.
        grad_norm: ``"global"`` or ``"layer"`` gradient norm in γ_t.
        **kwargs: as for :class:`grng.KFAC` (momentum, weight_decay,
            factor_update_freq, inverse_update_freq, inverse, kl_clip, ...).
    """

    adaptive_damping = True

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.05,
        rho: float = 1e-3,
        damping: float = 1e-3,
        *,
        grad_norm: GradNormScope = "global",
        inverse: InverseMethod = "eigh",
        **kwargs: Any,
    ) -> None:
        self.grad_norm = check_choice("grad_norm", grad_norm, ("global", "layer"))
        super().__init__(model, lr=lr, damping=damping, rho=rho, inverse=inverse, **kwargs)

    def damping(
        self, group: dict[str, Any], block_grad_sq: Tensor, total_grad_sq: Tensor
    ) -> Tensor:
        """``γ = λ + ρ‖g‖²`` with the global or the block's squared gradient norm."""
        grad_sq = total_grad_sq if self.grad_norm == "global" else block_grad_sq
        return group["damping"] + group["rho"] * grad_sq
