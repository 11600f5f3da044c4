r"""The toy models of the hybrid-VI design note (§5), whose posteriors are known exactly.

Tests and benchmarks of guides share them, so a check and a timing always run on the same model.

- :func:`conjugate_model`: :math:`d, a \sim \mathcal N(0, 1)`,
  :math:`y_{1,2} \sim \mathcal N(a + d, 0.5^2)`;
  :math:`p(d \mid y) = p(a \mid y) = \mathcal N(\bar y / 2.125, 0.7276^2)` and
  :math:`p(a \mid d, y) = \mathcal N(\tfrac49 \textstyle\sum y - \tfrac89 d, (1/3)^2)`.
- :func:`discrete_model`: the same with :math:`d` uniform on :math:`\{0, 1, 2, 3\}`;
  :math:`p(d \mid y) \propto \mathcal N(\bar y; d, 1.125)`.

References: arXiv:2406.02545.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

__all__ = ["conjugate_model", "discrete_model"]


def conjugate_model(y: Tensor | None = None) -> Tensor:
    """Continuous forward site ``d``, coupling ``a``, two observations ``y``."""
    d = pyro.sample("d", dist.Normal(torch.tensor(0.0), 1.0))
    a = pyro.sample("a", dist.Normal(torch.tensor(0.0), 1.0))
    with pyro.plate("obs", 2):
        return pyro.sample("y", dist.Normal(a + d, 0.5), obs=y)


def discrete_model(y: Tensor | None = None) -> Tensor:
    """Discrete forward site ``d`` (uniform on four values), coupling ``a``, two observations ``y``."""
    d = pyro.sample("d", dist.Categorical(logits=torch.zeros(4)))
    a = pyro.sample("a", dist.Normal(torch.tensor(0.0), 1.0))
    with pyro.plate("obs", 2):
        return pyro.sample("y", dist.Normal(a + d, 0.5), obs=y)
