"""Hybrid forward-KL / reverse-KL VI on delayed linear networks (design note hybrid_vi.md §4, §6).

``python -m benchmarks hybrid_vi [--quick]`` times the performance figures, each as ours / anchor in one
process:

- **P1 simulation**: ``DelayedLinearNetwork.simulate`` (vectorised over data sets, a loop over time only)
  against Pyro's ``Predictive(poutine.uncondition(net), parallel=True)`` through the model's
  ``GaussianHMM`` (in chunks of 1024), at N = 10, T = 200, float32; the design asks for 10^5 simulations in
  <= 60 s (``info["seconds_per_1e5"]``);
- **P2 amortized query** and **P3 stage-2 step vs AutoNormal**: :mod:`benchmarks.hybrid_vi.performance`;
- **P4 layouts**: one log-density + gradient of a batch of delay configurations with the time-shifted
  Kalman layout against the design's lagged layout (same law), at N = 5 and N = 50, T = 300.

The §4.2 experiments and acceptance check 13 are not timings; they run as scripts:
``python -m benchmarks.hybrid_vi.experiments`` and ``python -m benchmarks.hybrid_vi.baseline_table``.
"""

from __future__ import annotations

import importlib

import pyro.poutine as poutine
import torch
from pyro.infer import Predictive

from benchmarks.harness import Measurement, time_pair
from pyro_ext.infer.networks import DelayedLinearNetwork

__all__ = ["run"]


def _simulation(quick: bool) -> Measurement:
    count = 4096 if quick else 100_000
    chunk = 1024
    net = DelayedLinearNetwork(10, 200, max_delay=3).float()
    generator = torch.Generator().manual_seed(0)

    def ours() -> None:
        net.simulate(count, generator=generator)

    predictive = Predictive(poutine.uncondition(net), num_samples=chunk, parallel=True, return_sites=["y"])

    def anchor() -> None:
        with torch.no_grad():
            for _ in range(count // chunk):
                predictive()

    repeats = 3 if quick else 1
    measurement = time_pair(
        "P1 simulate N=10 T=200 float32",
        ours,
        anchor,
        repeats=repeats,
        warmup=0 if not quick else 1,
        info={"simulations": count, "anchor": "Predictive(GaussianHMM), chunks of 1024"},
    )
    measurement.info["seconds_per_1e5"] = round(measurement.ours_s * 100_000 / count, 2)
    return measurement


def _layout_pair(num_nodes: int, batch: int, repeats: int) -> Measurement:
    shifted = DelayedLinearNetwork(num_nodes, 300, max_delay=3)
    lagged = DelayedLinearNetwork(num_nodes, 300, max_delay=3, state_layout="lagged")
    data = shifted.simulate(1, generator=torch.Generator().manual_seed(1))
    y = data.y[0]
    delays = torch.randint(0, shifted.delay_max_value + 1, (batch, shifted.num_free_delays))
    coupling = data.coupling[0].clone().requires_grad_()

    def evaluate(net: DelayedLinearNetwork) -> None:
        net.likelihood(coupling, delays).log_prob(y).sum().backward()

    return time_pair(
        f"P4 Kalman log p + grad, N={num_nodes} T=300 K={batch}",
        lambda: evaluate(shifted),
        lambda: evaluate(lagged),
        repeats=repeats,
        warmup=1 if repeats > 1 else 0,
        info={
            "anchor": "lagged layout (design §3.1)",
            "state_dim": f"{shifted.hidden_dim} vs {lagged.hidden_dim}",
        },
    )


def _layouts(quick: bool) -> list[Measurement]:
    out = [_layout_pair(5, 16, 3)]
    if not quick:
        out.append(_layout_pair(50, 1, 1))
    return out


def run(quick: bool = False) -> list[Measurement]:
    """P1-P4 (see the module docstring); ``quick`` shrinks every size for a smoke run."""
    measurements = [_simulation(quick)]
    try:
        performance = importlib.import_module("benchmarks.hybrid_vi.performance")
    except ModuleNotFoundError as error:
        if error.name != "benchmarks.hybrid_vi.performance":
            raise
    else:
        measurements.extend(performance.run(quick=quick))
    measurements.extend(_layouts(quick))
    return measurements
