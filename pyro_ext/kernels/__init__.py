"""GPyTorch kernels: the improper ("walk") kernels :class:`SmoothWalkKernel` and :class:`MaternWalkKernel`.

References: Ambrogioni, *Stationarity without mean reversion in improper Gaussian processes*,
ICML 2024, arXiv:2310.02877.
"""

from pyro_ext.kernels.walk import MaternWalkKernel, SmoothWalkKernel

__all__ = ["MaternWalkKernel", "SmoothWalkKernel"]
