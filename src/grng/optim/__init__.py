"""The GRNG optimizers and the base they share."""

from grng.optim.base import CurvatureOptimizer
from grng.optim.coverage import Coverage, CoverageEntry, CoverageWarning
from grng.optim.kfac import KFAC
from grng.optim.options import CurvatureOptions
from grng.optim.reng import RENG
from grng.optim.ring import RING
from grng.optim.rkalman import RKalman

__all__ = [
    "KFAC",
    "RENG",
    "RING",
    "Coverage",
    "CoverageEntry",
    "CoverageWarning",
    "CurvatureOptimizer",
    "CurvatureOptions",
    "RKalman",
]
