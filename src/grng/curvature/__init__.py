"""The curvature engine: which layers get Kronecker factors, and the hooks that capture them."""

from grng.curvature import adapters as adapters  # registers the built-in adapters
from grng.curvature.capture import CurvatureCapture, FactorEstimate
from grng.curvature.fisher import Likelihood, sampled_nll
from grng.curvature.layers import (
    KroneckerLayer,
    LayerAdapter,
    adapter_for,
    find_kronecker_layers,
    register_layer,
)

__all__ = [
    "CurvatureCapture",
    "FactorEstimate",
    "KroneckerLayer",
    "LayerAdapter",
    "Likelihood",
    "adapter_for",
    "find_kronecker_layers",
    "register_layer",
    "sampled_nll",
]
