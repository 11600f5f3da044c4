"""Improper GP inference in GPyTorch: :class:`ImproperExactGP` and :class:`ImproperMarginalLogLikelihood`.

Change two names in an ExactGP script (``ExactGP`` -> ``ImproperExactGP``,
``ExactMarginalLogLikelihood`` -> ``ImproperMarginalLogLikelihood``) to use the walk kernels of
:mod:`pyro_ext.kernels`.

References: Ambrogioni, *Stationarity without mean reversion in improper Gaussian processes*,
ICML 2024, arXiv:2310.02877.
"""

from pyro_ext.gp.exact import (
    ImproperExactGP,
    ImproperMultivariateNormal,
    ImproperPredictionStrategy,
    RedundantMeanWarning,
    restricted_log_likelihood,
)
from pyro_ext.gp.mll import ImproperMarginalLogLikelihood

__all__ = [
    "ImproperExactGP",
    "ImproperMarginalLogLikelihood",
    "ImproperMultivariateNormal",
    "ImproperPredictionStrategy",
    "RedundantMeanWarning",
    "restricted_log_likelihood",
]
