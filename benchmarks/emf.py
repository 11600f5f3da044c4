"""Embedded-model flows: P1 and P2 of design/flows.md §7.

- **P1, structured ``log_prob``**: ``Flow(layer, StandardNormal).log_prob`` of the generic layer built from
  a Pyro model against the hand-written fast path of the same prior (same parameters), B = 256, float32,
  without gradients. Random walk (T = 30, d = 3, a loop-written model: 30 sites) on the captured
  (``compile="auto"``) generic path, and hierarchical (L = 20, D = 64, plate-vectorised: 2 sites) captured
  and eager; in full mode also the inductor-compiled generic path (``compile="inductor"``, about a minute
  of compilation per shape). Bar: ratio <= 2 for the compiled paths; the eager loop-written random walk
  pays ~T Python site calls and is reported without a bar.
- **P2, EMF training step**: one forward + backward + Adam step of the gated EMF-T flow (``emf_flow``,
  MAF backbone 2 x 512) against the plain MAF of the same backbone, B = 100, D = 90 (T = 30, d = 3), with
  the fast path and with the captured (full mode: also inductor-compiled) generic layer. Bar: ratio <= 1.3.

Anchor = the hand-written layer (P1) or the plain MAF (P2); ratio = ours / anchor.
"""

from __future__ import annotations

import torch
from nflows.distributions import StandardNormal
from nflows.flows import Flow

from benchmarks.harness import Measurement, time_pair
from pyro_ext.flows.emf import backbone_flow, emf_flow
from pyro_ext.flows.fast_paths import GaussianChainTransform, HierarchicalGaussianTransform

__all__ = ["run"]


def _randomise(layer: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in layer.parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            parameter.add_(0.1 * noise / getattr(layer, "gate_temperature", 1.0))
    return layer


def _log_prob_pair(
    name: str, fast: torch.nn.Module, compile_mode: object, batch: int, repeats: int, bar: float | None
) -> Measurement:
    fast = _randomise(fast, 0).float()
    generic = fast.to_generic(compile=compile_mode).float()
    ours_flow = Flow(generic, StandardNormal([fast.features]))
    anchor_flow = Flow(fast, StandardNormal([fast.features]))
    with torch.no_grad():
        data = fast.inverse(torch.randn(batch, fast.features))[0]
        difference = (ours_flow.log_prob(data) - anchor_flow.log_prob(data)).abs().max().item()

    def ours() -> torch.Tensor:
        with torch.no_grad():
            return ours_flow.log_prob(data)

    def anchor() -> torch.Tensor:
        with torch.no_grad():
            return anchor_flow.log_prob(data)

    info = {
        "B": batch,
        "dtype": "float32",
        "generic": f"compile={compile_mode!r}",
        "max|diff|": f"{difference:.1e}",
        "bar": "none (reported)" if bar is None else f"<= {bar}",
    }
    return time_pair(name, ours, anchor, repeats=repeats, warmup=2, info=info)


def _training_step_pair(name: str, structured: torch.nn.Module, batch: int, repeats: int) -> Measurement:
    features = structured.features
    torch.manual_seed(0)
    ours_flow = emf_flow(structured, position="top", backbone="maf", num_layers=2, hidden_features=512)
    anchor_flow = backbone_flow(features, backbone="maf", num_layers=2, hidden_features=512)
    ours_optimizer = torch.optim.Adam(ours_flow.parameters(), lr=1e-4)
    anchor_optimizer = torch.optim.Adam(anchor_flow.parameters(), lr=1e-4)
    with torch.no_grad():
        data = GaussianChainTransform(30, 3).inverse(torch.randn(batch, features))[0]

    def step(flow: Flow, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad()
        loss = -flow.log_prob(data).mean()
        loss.backward()
        optimizer.step()

    extra = sum(p.numel() for p in ours_flow.parameters()) - sum(p.numel() for p in anchor_flow.parameters())
    info = {"B": batch, "D": features, "backbone": "MAF 2x512", "extra params": extra, "bar": "<= 1.3"}
    return time_pair(
        name,
        lambda: step(ours_flow, ours_optimizer),
        lambda: step(anchor_flow, anchor_optimizer),
        repeats=repeats,
        warmup=2,
        info=info,
    )


def run(quick: bool = False) -> list[Measurement]:
    """P1 and P2; ``quick`` takes fewer repeats (same sizes: they are the design's)."""
    repeats = 5 if quick else 21
    batch = 256
    measurements = [
        _log_prob_pair(
            "P1 random walk T=30 d=3, captured", GaussianChainTransform(30, 3), "auto", batch, repeats, 2.0
        ),
        _log_prob_pair(
            "P1 random walk T=30 d=3, gated, captured",
            GaussianChainTransform(30, 3, gated=True),
            "auto",
            batch,
            repeats,
            2.0,
        ),
        _log_prob_pair(
            "P1 random walk T=30 d=3, eager", GaussianChainTransform(30, 3), False, batch, repeats, None
        ),
        _log_prob_pair(
            "P1 hierarchical L=20 D=64, captured",
            HierarchicalGaussianTransform(20, 64),
            "auto",
            batch,
            repeats,
            2.0,
        ),
        _log_prob_pair(
            "P1 hierarchical L=20 D=64, eager",
            HierarchicalGaussianTransform(20, 64),
            False,
            batch,
            repeats,
            2.0,
        ),
        _log_prob_pair(
            "P1 hierarchical L=20 D=64, gated, eager",
            HierarchicalGaussianTransform(20, 64, gated=True),
            False,
            batch,
            repeats,
            2.0,
        ),
    ]
    if not quick:
        # torch.compile (inductor) of the captured graph: ~1 min of compilation per shape, then fused kernels.
        measurements += [
            _log_prob_pair(
                "P1 random walk T=30 d=3, inductor",
                GaussianChainTransform(30, 3),
                "inductor",
                batch,
                repeats,
                2.0,
            ),
            _log_prob_pair(
                "P1 random walk T=30 d=3, gated, inductor",
                GaussianChainTransform(30, 3, gated=True),
                "inductor",
                batch,
                repeats,
                2.0,
            ),
        ]
    steps = 5 if quick else 15
    fast = _randomise(GaussianChainTransform(30, 3, gated=True), 1)
    measurements.append(_training_step_pair("P2 EMF-T step, fast path (gated chain)", fast, 100, steps))
    generic = fast.to_generic(compile="auto")
    measurements.append(_training_step_pair("P2 EMF-T step, captured generic (gated)", generic, 100, steps))
    if not quick:
        generic = fast.to_generic(compile="inductor")
        measurements.append(
            _training_step_pair("P2 EMF-T step, inductor generic (gated)", generic, 100, steps)
        )
    return measurements
