"""grng: gradient-regularized natural-gradient optimizers for PyTorch.

* :class:`KFAC` — Kronecker-factored natural gradient (the ρ = 0 baseline).
* :class:`RING` — GR as adaptive damping, ``δ = −(F + (λ + ρ‖g‖²) I)⁻¹ g``.
* :class:`RENG` — preconditions ``∇L_G = ∇L + ρ H∇L`` (double backprop or finite differences).
* :class:`RKalman` — inverse Fisher tracked by Kalman recursions, GR as a step length.
"""

from grng.curvature import LayerAdapter, register_layer
from grng.optim import (
    KFAC,
    RENG,
    RING,
    Coverage,
    CoverageEntry,
    CoverageWarning,
    CurvatureOptimizer,
    CurvatureOptions,
    RKalman,
)

__version__ = "0.1.0"

__all__ = [
    "KFAC",
    "RENG",
    "RING",
    "Coverage",
    "CoverageEntry",
    "CoverageWarning",
    "CurvatureOptimizer",
    "CurvatureOptions",
    "LayerAdapter",
    "RKalman",
    "__version__",
    "register_layer",
]
