"""Demo section: a Pyro model as an nflows layer (embedded-model flows, arXiv:2110.06021)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from pyro_ext.demo._runner import DemoContext

TITLE = "Embedded-model flows: a loop-written Pyro model as a (gated) nflows layer"
ORDER = 20


def continuity_prior(steps: int) -> None:
    """A random walk written as a Python loop, with a learnable step size (a ``pyro.param``)."""
    scale = pyro.param("scale", torch.tensor(1.0), constraint=constraints.positive)
    x = pyro.sample("x_0", dist.Normal(torch.tensor(0.0), 1.0))
    for t in range(1, steps):
        x = pyro.sample(f"x_{t}", dist.Normal(x, scale))


def ornstein_uhlenbeck(rows: int, steps: int, generator: torch.Generator) -> torch.Tensor:
    """x_0 ~ N(0, 1), x_t = 0.8 x_{t-1} + 0.3 eps_t: smooth, mean-reverting series."""
    x = torch.empty(rows, steps)
    x[:, 0] = torch.randn(rows, generator=generator)
    for t in range(1, steps):
        x[:, t] = 0.8 * x[:, t - 1] + 0.3 * torch.randn(rows, generator=generator)
    return x


def _train(flow, train: torch.Tensor, steps: int, batch: int, generator: torch.Generator) -> None:
    optimiser = torch.optim.Adam(flow.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    for _ in range(steps):
        rows = torch.randint(train.shape[0], (batch,), generator=generator)
        loss = -flow.log_prob(train[rows]).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()


def run(context: DemoContext) -> None:
    import matplotlib.pyplot as plt
    from nflows.distributions.normal import StandardNormal
    from nflows.flows.base import Flow
    from pyro import poutine

    from pyro_ext.flows import GatedStructuredTransform, StructuredTransform, backbone_flow, emf_flow

    steps = 30
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)

    # 1. The layer is the model: its flow density is Pyro's log joint.
    layer = StructuredTransform(continuity_prior, steps)
    prior_flow = Flow(layer, StandardNormal([steps]))
    with torch.no_grad():
        x = prior_flow.sample(256)
        values = layer.unpack(x)
        with poutine.block():
            trace = poutine.trace(poutine.condition(continuity_prior, data=values)).get_trace(steps)
        log_joint = sum(trace.nodes[name]["fn"].log_prob(values[name]) for name in layer.site_names)
        gap = (prior_flow.log_prob(x) - log_joint).abs().max().item()
    context.report("latent sites", len(layer.sites))
    context.report("max |flow log_prob - Pyro log joint| (float32)", gap, "nats")

    # 2. GEMF-T (gated continuity layer on top of a MAF) against the same MAF, on OU series.
    train_rows, test_rows = (256, 256) if context.smoke else (2000, 1000)
    iterations = 40 if context.smoke else 1500
    hidden = 32 if context.smoke else 64
    train = ornstein_uhlenbeck(train_rows, steps, generator)
    test = ornstein_uhlenbeck(test_rows, steps, generator)
    gated = GatedStructuredTransform(continuity_prior, steps)
    flows = {
        "GEMF-T": emf_flow(gated, position="top", hidden_features=hidden),
        "MAF": backbone_flow(steps, hidden_features=hidden),
    }
    for name, flow in flows.items():
        torch.manual_seed(1)
        _train(flow, train, iterations, 100, generator)
        with torch.no_grad():
            nll = -flow.log_prob(test).mean().item()
        context.report(f"{name} test NLL", nll, "nats")
        context.report(f"{name} parameters", sum(p.numel() for p in flow.parameters()))
    context.report("learned step size", gated.model_param("scale").item())
    context.report("gate lambda (first site)", gated.gate_values()["x_1"].item())

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.2), sharey=True)
    series = {"data (OU)": test[:12]}
    with torch.no_grad():
        for name, flow in flows.items():
            series[name] = flow.sample(12)
    for axis, (name, rows) in zip(axes, series.items()):
        axis.plot(rows.T.numpy(), lw=0.8)
        axis.set(title=name, xlabel="t")
    axes[0].set(ylabel="x_t")
    context.savefig(figure, "samples")
