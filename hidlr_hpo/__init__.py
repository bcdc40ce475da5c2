"""hidlr-hpo: Hessian-informed differential learning rates as online hyperparameter optimisation."""

from __future__ import annotations

from .controller import HiDLR, RefitRecord
from .curvature import QuadraticFit, Safeguards, fit_quadratic
from .freezing import FreezePolicy
from .groups import group_parameters
from .probe import Prober
from .sampler import HiDLRSampler

__all__ = [
    "FreezePolicy",
    "HiDLR",
    "HiDLRSampler",
    "Prober",
    "QuadraticFit",
    "RefitRecord",
    "Safeguards",
    "fit_quadratic",
    "group_parameters",
]
__version__ = "0.1.0"
