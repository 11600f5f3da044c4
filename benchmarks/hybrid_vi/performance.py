"""P2 (amortized stage-1 query) and P3 (stage-2 step vs AutoNormal) of the hybrid-VI design note §6.

Each row is ours / anchor in one process (``benchmarks.harness.time_pair``):

- **P3 amortized** (conjugate toy, d ~ N(0,1), a ~ N(0,1), y ~ N(a + d, 0.5^2) x 2): one SVI step of
  ``HybridGuide`` (amortized Gaussian q(a | d), d ~ q_phi fresh per particle) with ``HybridELBO`` against
  one step of ``AutoNormal`` with ``Trace_ELBO`` on the same model conditioned on a fixed d, equal
  particles (1 and 8, vectorised). The bar: ratio <= 2.
- **P3 per component** (discrete toy, d uniform on {0..3}; and the delayed network, N = 2, T = 60): one
  ``HybridELBO`` step over all S kept components batched in one vectorised trace, against S ``AutoNormal``
  steps on the model conditioned on one delay value -- the ratio is the cost per component relative to
  ``AutoNormal`` (bar <= 2).
- **P2 amortized query**: ``forward_posterior(y_new)`` plus 1000 draws for a data set the guide has not
  seen (one summary pass), against one ``AutoNormal`` SVI step on that data set (the least a per-data-set
  fit costs); ``info["query_ms"]`` is the absolute time the design note asks for ("milliseconds").
"""

from __future__ import annotations

import itertools

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from benchmarks.harness import Measurement, time_pair
from pyro_ext.infer import HybridELBO, HybridGuide, NormalFamily
from pyro_ext.testing.hybrid_toys import conjugate_model, discrete_model

__all__ = ["run"]


def _stepper(model, guide, elbo, *args):
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
    svi.step(*args)  # lazy set-up outside the timing
    return lambda: svi.step(*args)


def _fitted(model, quick: bool, **options) -> HybridGuide:
    guide = HybridGuide(model, ["d"], summary_net="identity", **options)
    guide.fit_forward(
        2000 if quick else 20_000,
        torch.zeros(2),
        batch_size=512,
        max_epochs=3 if quick else 30,
        progress_bar=False,
        generator=torch.Generator().manual_seed(0),
    )
    return guide


def _p3_amortized(quick: bool, repeats: int) -> list[Measurement]:
    out = []
    y = torch.tensor([1.8, 2.2])
    for particles in (1, 8):
        pyro.clear_param_store()
        guide = _fitted(conjugate_model, quick, forward_family=NormalFamily(), name=f"hybrid{particles}")
        ours = _stepper(
            conjugate_model, guide, HybridELBO(num_particles=particles, vectorize_particles=True), y
        )
        conditioned = poutine.condition(conjugate_model, data={"d": torch.tensor(0.9)})
        anchor_elbo = Trace_ELBO(
            num_particles=particles, vectorize_particles=particles > 1, max_plate_nesting=1
        )
        anchor = _stepper(conditioned, AutoNormal(conditioned), anchor_elbo, y)
        out.append(
            time_pair(
                f"P3 stage-2 step, amortized, conjugate toy, {particles} particle(s)",
                ours,
                anchor,
                repeats=repeats,
                info={"anchor": "AutoNormal + Trace_ELBO on the model conditioned on d", "bar": "<= 2"},
            )
        )
    return out


def _per_component_pair(name: str, model, guide, args, conditioned, components: int, repeats: int):
    ours = _stepper(model, guide, HybridELBO(num_particles=1, vectorize_particles=True), *args)
    anchor_step = _stepper(conditioned, AutoNormal(conditioned), Trace_ELBO(), *args)

    def anchor() -> None:
        for _ in range(components):
            anchor_step()

    return time_pair(
        name,
        ours,
        anchor,
        repeats=repeats,
        info={
            "components": components,
            "anchor": f"{components} AutoNormal steps, one per component",
            "bar": "<= 2",
        },
    )


def _p3_per_support(quick: bool, repeats: int) -> list[Measurement]:
    pyro.clear_param_store()
    y = torch.tensor([1.4, 1.6])
    guide = _fitted(discrete_model, quick, name="hybrid_discrete")
    guide.setup(y)
    components = guide.components(y).weights.shape[0]
    conditioned = poutine.condition(discrete_model, data={"d": torch.tensor(1)})
    out = [
        _per_component_pair(
            "P3 stage-2 step per component, per_support, discrete toy",
            discrete_model,
            guide,
            (y,),
            conditioned,
            components,
            repeats,
        )
    ]
    try:
        from pyro_ext.infer.network_fits import build_hybrid_guide
        from pyro_ext.infer.networks import DelayedLinearNetwork
    except ImportError:  # the network part is optional for this file
        return out
    pyro.clear_param_store()
    net = DelayedLinearNetwork(2, 60, max_delay=2)
    data = net.simulate(1, generator=torch.Generator().manual_seed(3))
    y_net = data.y[0]
    guide = build_hybrid_guide(net, 2000 if quick else 10_000, max_epochs=2 if quick else 20)
    components = guide.components(y_net).weights.shape[0]
    delay = guide.components(y_net).values["delay"][0]
    conditioned = poutine.condition(net, data={"delay": delay})
    out.append(
        _per_component_pair(
            "P3 stage-2 step per component, per_support, network N=2 T=60",
            net,
            guide,
            (y_net,),
            conditioned,
            components,
            max(1, repeats // 2),
        )
    )
    return out


def _p2_query(quick: bool, repeats: int) -> list[Measurement]:
    pyro.clear_param_store()
    guide = _fitted(conjugate_model, quick, forward_family=NormalFamily(), name="query")
    datasets = itertools.cycle(torch.randn(64, 2, generator=torch.Generator().manual_seed(1)) * 1.5)
    conditioned = poutine.condition(conjugate_model, data={"d": torch.tensor(0.0)})
    anchor = _stepper(conditioned, AutoNormal(conditioned), Trace_ELBO(), torch.zeros(2))

    def ours() -> None:
        guide.forward_posterior(next(datasets).clone()).sample((1000,))

    measurement = time_pair(
        "P2 amortized query: forward_posterior(new y) + 1000 draws",
        ours,
        anchor,
        repeats=repeats,
        info={"anchor": "one AutoNormal SVI step on the new data set"},
    )
    measurement.info["query_ms"] = round(1e3 * measurement.ours_s, 3)
    return [measurement]


def run(quick: bool = False) -> list[Measurement]:
    """P2 and P3 (module docstring); ``quick`` shrinks the stage-1 fits and the repeats."""
    repeats = 5 if quick else 21
    with pyro.validation_enabled(False):  # as in a production run; both sides alike
        return _p3_amortized(quick, repeats) + _p3_per_support(quick, repeats) + _p2_query(quick, repeats)
