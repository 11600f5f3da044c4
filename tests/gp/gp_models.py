"""Models and data shared by the improper-GP tests (imported as a sibling module)."""

from __future__ import annotations

import gpytorch
import torch

from pyro_ext.gp import ImproperExactGP
from pyro_ext.kernels import MaternWalkKernel, SmoothWalkKernel


class WalkGP(ImproperExactGP):
    """The issue's two-name change: an ExactGP script with ImproperExactGP and a walk kernel."""

    def __init__(self, x, y, likelihood, kernel, mean=None, **options):
        super().__init__(x, y, likelihood, **options)
        self.mean_module = mean if mean is not None else gpytorch.means.ZeroMean()
        self.covar_module = kernel

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


class PlainGP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, kernel, mean=None):
        super().__init__(x, y, likelihood)
        self.mean_module = mean if mean is not None else gpytorch.means.ZeroMean()
        self.covar_module = kernel

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def scaled(kernel, outputscale=1.0, lengthscale=1.0):
    if kernel.has_lengthscale:
        kernel.lengthscale = lengthscale
    wrapped = gpytorch.kernels.ScaleKernel(kernel)
    wrapped.outputscale = outputscale
    return wrapped


KERNELS = {
    "smooth": lambda: scaled(SmoothWalkKernel(), 1.3, 0.8),
    "matern1": lambda: scaled(MaternWalkKernel(1), 0.7, 1.5),
    "matern3": lambda: scaled(MaternWalkKernel(3), 2.0, 1.1),
    "walk+periodic": lambda: (
        scaled(MaternWalkKernel(2), 1.0, 1.2)
        + scaled(gpytorch.kernels.PeriodicKernel(period_length_constraint=None), 0.5, 0.9)
    ),
}


def make_likelihood(noise: float = 0.05) -> gpytorch.likelihoods.GaussianLikelihood:
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    likelihood.noise = noise
    return likelihood


def walk_data(n: int = 60, span: float = 10.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A rough random walk with a level far from zero, so that a model which ignores the level shows."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.sort(torch.rand(n, generator=generator, dtype=torch.float64) * span).values
    y = 20.0 + torch.cumsum(torch.randn(n, generator=generator, dtype=torch.float64), 0) * 0.4
    return x, y
