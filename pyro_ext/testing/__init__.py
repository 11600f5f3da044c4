"""Importable test mixins, in the manner of :mod:`gpytorch.test`.

A part's tests (and a user's tests of their own extensions) subclass these mixins and fill in
a few factory methods; the mixins then run the checks every object of that kind must pass.

- :class:`~pyro_ext.testing.modules.ModuleTestMixin`: ``state_dict`` round trip, float32 and
  float64, reproducibility under a seed, CUDA when available.
- :class:`~pyro_ext.testing.guides.GuideTestMixin`: Pyro guides -- SVI step, ``Predictive`` shapes,
  ``state_dict`` round trip, monotone ``quantiles``, ``median`` = 0.5 quantile, float32, CUDA.
- :class:`~pyro_ext.testing.kernels.ConditionallyPositiveDefiniteKernelTestMixin`: conditional positive
  definiteness in several dimensions, zero diagonal, diag mode, pickle, gradients at coincident points.
- :class:`~pyro_ext.testing.transforms.TransformTestMixin`: any nflows-style transform: both
  round trips, log-determinants against autograd, batch rows, state, float32, CUDA.

This package imports no part of pyro_ext (parts' tests import it, not the other way round).
"""

from pyro_ext.testing.guides import GuideTestMixin
from pyro_ext.testing.kernels import ConditionallyPositiveDefiniteKernelTestMixin
from pyro_ext.testing.modules import ModuleTestMixin
from pyro_ext.testing.transforms import TransformTestMixin

__all__ = [
    "ConditionallyPositiveDefiniteKernelTestMixin",
    "GuideTestMixin",
    "ModuleTestMixin",
    "TransformTestMixin",
]
