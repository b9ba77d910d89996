"""The curvature engine: which layers get Kronecker factors, and the hooks that capture them."""

from grng.curvature.capture import CurvatureCapture, FactorEstimate
from grng.curvature.fisher import Likelihood, sampled_nll
from grng.curvature.layers import SUPPORTED_MODULES, KroneckerLayer, find_kronecker_layers

__all__ = [
    "SUPPORTED_MODULES",
    "CurvatureCapture",
    "FactorEstimate",
    "KroneckerLayer",
    "Likelihood",
    "find_kronecker_layers",
    "sampled_nll",
]
