"""grng: gradient-regularized natural-gradient optimizers for PyTorch.

* :class:`KFAC` — Kronecker-factored natural gradient (the ρ = 0 baseline).
* :class:`RING` — GR as adaptive damping, ``δ = −(F + (λ + ρ‖g‖²) I)⁻¹ g``.
* :class:`RKalman` — inverse Fisher tracked by Kalman recursions, GR as a step length.
"""

from grng.optim import KFAC, RING, CurvatureOptimizer, CurvatureOptions, RKalman

__version__ = "0.1.0"

__all__ = ["KFAC", "RING", "CurvatureOptimizer", "CurvatureOptions", "RKalman", "__version__"]
