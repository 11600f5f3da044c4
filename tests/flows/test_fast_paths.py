"""Fast paths (design/flows.md §2.6): the transform checks, and acceptance check 11 against the generic layer.

Check 11: with copied parameters, in both directions, gated and ungated, outputs and log-determinants of a
fast path equal those of the generic (Gated)StructuredTransform built from its ``pyro_model()`` to 1e-10,
and gradients to 1e-8.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pytest
import torch
from nflows.distributions import StandardNormal
from nflows.flows import Flow
from pyro import poutine

from pyro_ext.flows.fast_paths import (
    GaussianChainTransform,
    HierarchicalGaussianTransform,
    IndependentMixtureTransform,
)
from pyro_ext.testing import TransformTestMixin

VARIANTS: dict[str, Callable[[], torch.nn.Module]] = {
    "chain1": lambda: GaussianChainTransform(6, 2, order=1),
    "chain2": lambda: GaussianChainTransform(7, 2, order=2),
    "chain1_gated_site": lambda: GaussianChainTransform(6, 2, order=1, gated=True),
    "chain2_gated_element": lambda: GaussianChainTransform(7, 2, order=2, gated=True, gate="element"),
    "hierarchy": lambda: HierarchicalGaussianTransform(4, 3),
    "hierarchy_trainable_gated_element": lambda: HierarchicalGaussianTransform(
        4, 3, trainable_scales=True, gated=True, gate="element"
    ),
    "hierarchy_gated_site": lambda: HierarchicalGaussianTransform(3, 2, gated=True),
    "mixture": lambda: IndependentMixtureTransform(3, components=5),
    "mixture_gated_site": lambda: IndependentMixtureTransform(3, components=5, gated=True),
    "mixture_gated_element": lambda: IndependentMixtureTransform(2, components=4, gated=True, gate="element"),
}


def _randomise(layer: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every parameter off its initial value; gates to lambda in (0.2, 0.9), where both the model's
    map and the identity matter (at the initial 0.999 a wrong identity branch would hardly show)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in layer.named_parameters():
            if name.startswith("gate_logits"):
                gate = 0.2 + 0.7 * torch.rand(parameter.shape, generator=generator, dtype=parameter.dtype)
                parameter.copy_(torch.logit(gate) / layer.gate_temperature)
            else:
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return layer


# ================================================================================== transform checks


class _FastPathChecks(TransformTestMixin):
    variant: str

    def make_transform(self):
        return _randomise(VARIANTS[self.variant]())

    def make_inputs(self):
        layer = VARIANTS[self.variant]()
        return 1.5 * torch.randn(5, layer.features)


class TestChainOrder1(_FastPathChecks):
    variant = "chain1"


class TestChainOrder2(_FastPathChecks):
    variant = "chain2"


class TestChainGated(_FastPathChecks):
    variant = "chain2_gated_element"


class TestHierarchyGated(_FastPathChecks):
    variant = "hierarchy_trainable_gated_element"


class TestMixture(_FastPathChecks):
    variant = "mixture"


class TestMixtureGated(_FastPathChecks):
    variant = "mixture_gated_site"


# ================================================================================== check 11


def _loss(outputs: torch.Tensor, logabsdet: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A scalar touching every output and the log-det, with weights so that gradients do not cancel."""
    return (weights * outputs).sum() + (outputs**2).sum() - logabsdet.sum()


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_fast_path_matches_generic(variant: str, direction: str) -> None:
    fast = _randomise(VARIANTS[variant]())
    generic = fast.to_generic(compile=False)
    inputs = 1.5 * torch.randn(6, fast.features)
    weights = torch.randn(6, fast.features)

    fast_inputs = inputs.clone().requires_grad_(True)
    generic_inputs = inputs.clone().requires_grad_(True)
    fast_outputs, fast_logabsdet = getattr(fast, direction)(fast_inputs)
    generic_outputs, generic_logabsdet = getattr(generic, direction)(generic_inputs)
    # Same arithmetic up to ordering and, for the mixtures, two solves of one root to 4 ulp: 1e-10.
    torch.testing.assert_close(fast_outputs, generic_outputs, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fast_logabsdet, generic_logabsdet, rtol=1e-10, atol=1e-10)

    _loss(fast_outputs, fast_logabsdet, weights).backward()
    _loss(generic_outputs, generic_logabsdet, weights).backward()
    torch.testing.assert_close(fast_inputs.grad, generic_inputs.grad, rtol=1e-8, atol=1e-8)
    own = dict(fast.named_parameters())
    mapped = fast.generic_view(generic, gradients=True)
    assert set(mapped) == set(own)
    for name, gradient in mapped.items():
        assert own[name].grad is not None and gradient is not None, name
        torch.testing.assert_close(own[name].grad, gradient, rtol=1e-8, atol=1e-8, msg=name)
    # Not vacuous: gradients flow (a gate of an N(0, 1) site alone may legitimately get none, as
    # lambda * 1 + 1 - lambda = 1).
    assert not own or sum(float(p.grad.abs().sum()) for p in own.values()) > 0


@pytest.mark.parametrize("variant", ["chain1_gated_site", "hierarchy"])
def test_fast_path_matches_generic_default_options(variant: str) -> None:
    # The generic layer's default compile="auto" (a captured graph) must agree as well.
    fast = _randomise(VARIANTS[variant]())
    generic = fast.to_generic()
    inputs = torch.randn(6, fast.features)
    for direction in ("forward", "inverse"):
        expected = getattr(fast, direction)(inputs)
        actual = getattr(generic, direction)(inputs)
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_parameter_map_round_trip() -> None:
    fast = _randomise(GaussianChainTransform(5, 2, gated=True, gate="element"))
    generic = fast.to_generic(compile=False)
    view = fast.generic_view(generic)
    for name, parameter in fast.named_parameters():
        torch.testing.assert_close(view[name], parameter, rtol=0, atol=0)
    assert set(fast.parameter_map["gate_logits"]) == {f"gate_logits.x_{t}" for t in range(5)}


def test_chain_density_is_the_model_joint() -> None:
    # With a standard-normal base, the layer's density is the Pyro model's joint (check 8 for the fast path).
    fast = _randomise(GaussianChainTransform(8, 3, order=2))
    flow = Flow(fast, StandardNormal([fast.features]))
    x = flow.sample(4).detach()
    model = fast.pyro_model()
    for row in range(4):
        values = {f"x_{t}": x[row].reshape(8, 3)[t] for t in range(8)}
        with pyro.get_param_store().scope():
            trace = poutine.trace(poutine.condition(model, values)).get_trace()
        torch.testing.assert_close(
            flow.log_prob(x[row : row + 1])[0], trace.log_prob_sum(), rtol=1e-10, atol=1e-10
        )


def test_random_walk_inverse_is_a_cumulative_sum() -> None:
    layer = GaussianChainTransform(4, 1, init_scale=2.0)
    noise = torch.tensor([[1.0, 1.0, -1.0, 0.5]])
    data, logabsdet = layer.inverse(noise)
    torch.testing.assert_close(data, torch.tensor([[1.0, 3.0, 1.0, 2.0]]))
    torch.testing.assert_close(logabsdet, torch.tensor([3 * torch.log(torch.tensor(2.0))]))


def test_mixture_initialisation_follows_the_design() -> None:
    layer = IndependentMixtureTransform(2)
    assert layer.locs.shape == (2, 100)
    torch.testing.assert_close(layer.locs[0, [0, -1]], torch.tensor([-4.0, 4.0]))
    torch.testing.assert_close(torch.nn.functional.softplus(layer.raw_scales), torch.full((2, 100), 3.0))
    torch.testing.assert_close(layer.logits, torch.zeros(2, 100))


def test_initial_gates_are_0999() -> None:
    layer = GaussianChainTransform(3, 2, gated=True)
    gates = torch.sigmoid(layer.gate_temperature * layer.gate_logits)
    torch.testing.assert_close(gates, torch.full((3,), 0.999), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "factory, match",
    [
        (lambda: GaussianChainTransform(0, 2), "steps"),
        (lambda: GaussianChainTransform(3, 2, order=3), "order"),
        (lambda: GaussianChainTransform(3, 2, init_scale=-1.0), "init_scale"),
        (lambda: GaussianChainTransform(3, 2, gated=True, gate="block"), "gate"),
        (lambda: GaussianChainTransform(3, 2, gated=True, gate_init=1.0), "gate_init"),
        (lambda: HierarchicalGaussianTransform(1, 2), "groups"),
        (lambda: IndependentMixtureTransform(2, components=0), "components"),
    ],
)
def test_bad_arguments(factory, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        factory()


def test_bad_inputs() -> None:
    layer = GaussianChainTransform(3, 2)
    with pytest.raises(ValueError, match=r"inputs must have shape \[batch, 6\]"):
        layer(torch.zeros(4, 5))
    with pytest.raises(ValueError, match="non-finite"):
        layer.inverse(torch.full((1, 6), float("nan")))
