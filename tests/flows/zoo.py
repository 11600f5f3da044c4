"""The test "zoo" of design/flows.md §6: small Pyro models written the way a user writes them.

Module-level functions (so that a layer built from them pickles); tensors a model needs come in as
arguments, so that they move with the layer's ``.to()`` (they become buffers of the layer).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam
from torch import nn
from torch.distributions import constraints

RANDOM_WALK_SCALE = 0.5


def random_walk(origin: torch.Tensor, steps: int = 30, scale: float = RANDOM_WALK_SCALE) -> None:
    """Continuity prior written as a Python loop: x_0 ~ N(origin, I), x_t ~ N(x_{t-1}, scale^2 I)."""
    x = pyro.sample("x_0", dist.Normal(origin, 1.0).to_event(1))
    for t in range(1, steps):
        x = pyro.sample(f"x_{t}", dist.Normal(x, scale).to_event(1))


def drift_walk(origin: torch.Tensor, steps: int = 6, drift: torch.Tensor | None = None) -> None:
    """A random walk with a drift that a flow's context supplies (``context_to_kwargs``)."""
    drift = torch.zeros_like(origin) if drift is None else drift
    x = pyro.sample("x_0", dist.Normal(origin, 1.0).to_event(1))
    for t in range(1, steps):
        x = pyro.sample(f"x_{t}", dist.Normal(x + drift, 0.5).to_event(1))


def smoothness(origin: torch.Tensor, steps: int = 12, scale: float = 0.3) -> None:
    """Second-order (smoothness) prior: x_t ~ N(2 x_{t-1} - x_{t-2}, scale^2 I)."""
    previous = pyro.sample("x_0", dist.Normal(origin, 1.0).to_event(1))
    current = pyro.sample("x_1", dist.Normal(origin, 1.0).to_event(1))
    for t in range(2, steps):
        previous, current = (
            current,
            pyro.sample(f"x_{t}", dist.Normal(2 * current - previous, scale).to_event(1)),
        )


def hierarchical(origin: torch.Tensor, groups: int = 4) -> None:
    """A group mean and members drawn around it inside a plate."""
    mean = pyro.sample("mean", dist.Normal(origin, 1.0).to_event(1))
    with pyro.plate("groups", groups):
        pyro.sample("members", dist.Normal(mean, 0.5).to_event(1))


def eight_schools(sigma: torch.Tensor, y: torch.Tensor | None = None) -> None:
    """Eight-schools style: HalfCauchy and LogNormal scales, a plate of school effects, observations."""
    mu = pyro.sample("mu", dist.Normal(sigma.new_zeros(()), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(sigma.new_tensor(5.0)))
    kappa = pyro.sample("kappa", dist.LogNormal(sigma.new_zeros(()), 0.5))
    with pyro.plate("schools", sigma.shape[0]):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma * kappa), obs=y)


def mixed(scale_tril: torch.Tensor, mixture_locs: torch.Tensor, mixture_logits: torch.Tensor) -> None:
    """Uniform, MVN, a 5-component mixture, HalfCauchy and LogNormal sites, each depending on a parent."""
    a = pyro.sample("a", dist.Uniform(scale_tril.new_tensor(-1.0), scale_tril.new_tensor(2.0)))
    z = pyro.sample(
        "z", dist.MultivariateNormal(a.unsqueeze(-1) * scale_tril.new_ones(3), scale_tril=scale_tril)
    )
    components = dist.Normal(mixture_locs + 0.5 * z[..., :1], 0.3 + 0.1 * torch.arange(5.0).to(z))
    m = pyro.sample("m", dist.MixtureSameFamily(dist.Categorical(logits=mixture_logits), components))
    pyro.sample("c", dist.HalfCauchy(torch.exp(0.3 * a)))
    pyro.sample("l", dist.LogNormal(0.5 * m, 0.5))


def with_params(origin: torch.Tensor) -> None:
    """pyro.param statements with real, positive and interval constraints."""
    loc = pyro.param("loc", origin + 0.3)
    scale = pyro.param("scale", torch.full_like(origin, 0.7), constraint=constraints.positive)
    weight = pyro.param("weight", origin.new_tensor(0.4), constraint=constraints.interval(0.0, 1.0))
    x = pyro.sample("x", dist.Normal(loc, scale).to_event(1))
    pyro.sample("y", dist.Normal(weight * x.sum(-1), 1.0))


def nested_plates(origin: torch.Tensor, outer: int = 3, inner: int = 2) -> None:
    """Two nested plates (dims -2 and -1) under a global site."""
    g = pyro.sample("g", dist.Normal(origin.sum(), 1.0))
    with pyro.plate("outer", outer, dim=-2):
        a = pyro.sample("a", dist.Normal(g, 1.0))
        with pyro.plate("inner", inner, dim=-1):
            pyro.sample("b", dist.Normal(a, 0.5))


class RegressionPrior(PyroModule):
    """A PyroModule model: a PyroParam scale and an nn.Linear mean function."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = PyroParam(torch.tensor(0.8), constraint=constraints.positive)
        self.net = nn.Linear(2, 2)

    def forward(self) -> None:
        z = pyro.sample("z", dist.Normal(self.scale.new_zeros(2), 1.0).to_event(1))
        pyro.sample("w", dist.Normal(self.net(z), self.scale).to_event(1))


def zoo_arguments(name: str) -> tuple:
    """Positional arguments of each zoo model (fixed seeds, so layers built twice agree)."""
    generator = torch.Generator().manual_seed(7)
    if name == "eight_schools":
        sigma = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
        y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
        return (sigma, y)
    if name == "mixed":
        raw = torch.randn(3, 3, generator=generator)
        scale_tril = torch.tril(0.4 * raw, -1) + torch.diag(torch.tensor([0.9, 1.3, 0.6]))
        locs = torch.tensor([-3.0, -1.0, 0.0, 1.5, 4.0])
        logits = torch.tensor([0.2, -0.5, 0.0, 0.7, -0.1])
        return (scale_tril, locs, logits)
    return (torch.tensor([0.2, -0.1, 0.3]) if name != "with_params" else torch.tensor([0.1, -0.2]),)


ZOO = {
    "random_walk": random_walk,
    "smoothness": smoothness,
    "hierarchical": hierarchical,
    "eight_schools": eight_schools,
    "mixed": mixed,
    "with_params": with_params,
    "nested_plates": nested_plates,
}
