"""Demo section: walk kernels forecast Mauna Loa CO2 without reverting to a mean."""

from __future__ import annotations

import gpytorch
import torch

from pyro_ext import datasets
from pyro_ext.demo._runner import DemoContext
from pyro_ext.gp import ImproperExactGP, ImproperMarginalLogLikelihood
from pyro_ext.kernels import MaternWalkKernel

TITLE = "Walk kernels (improper GPs): Mauna Loa CO2 forecast from 1990"
ORDER = 10

_ORIGIN = 1958.0


def _seasonal() -> gpytorch.kernels.Kernel:
    periodic = gpytorch.kernels.PeriodicKernel()
    periodic.period_length, periodic.lengthscale = 1.0, 1.0
    evolution = gpytorch.kernels.RBFKernel()
    evolution.lengthscale = 50.0
    kernel = gpytorch.kernels.ScaleKernel(periodic * evolution)
    kernel.outputscale = 0.01
    return kernel


class _WalkCO2(ImproperExactGP):
    """Matern walk (j = 2) level plus a slowly changing seasonal cycle, flat prior on the level."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, likelihood: gpytorch.likelihoods.Likelihood) -> None:
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ZeroMean()
        walk = gpytorch.kernels.ScaleKernel(MaternWalkKernel(2))
        walk.outputscale, walk.base_kernel.lengthscale = 0.01, 1.0
        self.covar_module = walk + _seasonal()

    def forward(self, x: torch.Tensor) -> gpytorch.distributions.MultivariateNormal:
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


class _StationaryCO2(gpytorch.models.ExactGP):
    """RBF level plus the same seasonal cycle, with a learnt constant mean (the usual stationary model)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, likelihood: gpytorch.likelihoods.Likelihood) -> None:
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        trend = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())
        trend.outputscale, trend.base_kernel.lengthscale = 1.0, 10.0
        self.covar_module = trend + _seasonal()

    def forward(self, x: torch.Tensor) -> gpytorch.distributions.MultivariateNormal:
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def _fit(model: gpytorch.models.ExactGP, steps: int) -> None:
    if isinstance(model, ImproperExactGP):
        mll = ImproperMarginalLogLikelihood(model.likelihood, model)
    else:
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    x, y = model.train_inputs[0], model.train_targets
    for _ in range(steps):
        optimizer.zero_grad()
        (-mll(model(x), y)).backward()
        optimizer.step()
    model.eval()


def run(context: DemoContext) -> None:
    import matplotlib.pyplot as plt

    with torch.random.fork_rng():
        torch.manual_seed(0)
        dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)  # walk Gram matrices are large: float64, as the design advises
        try:
            co2 = datasets.co2(frequency="monthly")
            train = co2.time < 1990
            x, y = co2.time[train] - _ORIGIN, co2.ppm[train]
            if context.smoke:
                x, y = x[::2], y[::2]
            x_held, y_held = co2.time[~train] - _ORIGIN, co2.ppm[~train]
            level, spread = y.mean(), y.std()
            future = torch.linspace(0.0, 2050.0 - _ORIGIN, 600)
            steps = 25 if context.smoke else 250
            forecasts = {}
            for label, kind in (("walk", _WalkCO2), ("stationary", _StationaryCO2)):
                likelihood = gpytorch.likelihoods.GaussianLikelihood()
                likelihood.noise = 1e-3
                model = kind(x, (y - level) / spread, likelihood)
                _fit(model, steps)
                with torch.no_grad():
                    held = likelihood(model(x_held))
                    ahead = likelihood(model(future))
                rmse = ((held.mean * spread + level - y_held).square().mean().sqrt()).item()
                mean, sd = ahead.mean * spread + level, ahead.stddev * spread
                forecasts[label] = (mean, sd)
                context.report(f"{label}: RMSE 1990-2001", rmse, "ppm")
                context.report(f"{label}: 2050 forecast", float(mean[-1]), "ppm")
                context.report(f"{label}: 2050 95% half-width", float(1.96 * sd[-1]), "ppm")
        finally:
            torch.set_default_dtype(dtype)

    figure, ax = plt.subplots(figsize=(10, 3.6))
    ax.plot(co2.time, co2.ppm, "k", lw=0.6, label="observed (trained on < 1990)")
    names = {
        "walk": "MaternWalk(2) + periodic×RBF, ImproperExactGP",
        "stationary": "RBF + periodic×RBF + ConstantMean",
    }
    for color, (label, (mean, sd)) in zip(("C0", "C3"), forecasts.items()):
        years = future + _ORIGIN
        ax.plot(years, mean, color=color, lw=1, label=names[label])
        ax.fill_between(years, mean - 1.96 * sd, mean + 1.96 * sd, color=color, alpha=0.2)
    ax.axvline(1990, color="0.5", ls="--", lw=1)
    ax.set(
        xlabel="year",
        ylabel="CO2 [ppm]",
        title="Walk kernels hold the level (band ~ sqrt(horizon)); RBF reverts. Neither follows the trend.",
    )
    ax.legend(fontsize=8, loc="upper left")
    context.savefig(figure, "co2_forecast")
