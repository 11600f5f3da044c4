"""emf_flow and ModelDistribution: acceptance checks 8 (model identity) and 13 (nflows interop) of
design/flows.md §6, and the EMF stacks themselves (layouts, backbones, state, training step)."""

from __future__ import annotations

import math

import pytest
import torch
from nflows.distributions.normal import StandardNormal
from nflows.flows.base import Flow
from nflows.transforms.autoregressive import (
    MaskedAffineAutoregressiveTransform,
    MaskedPiecewiseRationalQuadraticAutoregressiveTransform,
)
from nflows.transforms.base import CompositeTransform, InverseTransform
from nflows.transforms.normalization import ActNorm
from nflows.transforms.permutations import ReversePermutation
from pyro import poutine

from pyro_ext.flows import (
    GatedStructuredTransform,
    ModelDistribution,
    StructuredTransform,
    emf_flow,
)
from pyro_ext.testing import TransformTestMixin
from tests.flows import zoo
from tests.flows.zoo import ZOO, zoo_arguments

SMALL = {"random_walk": {"steps": 10}, "smoothness": {"steps": 12}}
GAUSSIAN = ("random_walk", "smoothness", "hierarchical", "with_params", "nested_plates")


def build(name: str, layer_class: type = StructuredTransform, **options) -> StructuredTransform:
    options.setdefault("compile", False)
    return layer_class(ZOO[name], *zoo_arguments(name), **SMALL.get(name, {}), **options)


def data_points(layer, rows: int, scale: float = 0.8, seed: int = 0) -> torch.Tensor:
    noise = scale * torch.randn(rows, layer.features, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return layer.inverse(noise)[0]


def pyro_log_joint(name: str, layer: StructuredTransform, x: torch.Tensor) -> torch.Tensor:
    """Per-row log joint of the latent sites by Pyro alone: trace(condition(model, S.unpack(x)))."""
    model = poutine.condition(ZOO[name], data=layer.unpack(x))
    params = dict(layer.named_model_params())
    if params:
        model = poutine.substitute(model, data=params)
    with poutine.block():
        trace = poutine.trace(model).get_trace(*zoo_arguments(name), **SMALL.get(name, {}))
    rows = x.shape[0]
    total = torch.zeros(rows)
    for site in layer.site_names:
        node = trace.nodes[site]
        log_prob = node["fn"].log_prob(node["value"])
        total = total + log_prob.expand(rows, *log_prob.shape[1:]).reshape(rows, -1).sum(-1)
    return total


# ---------------------------------------------------------------- 8: the layer is the model


@pytest.mark.parametrize("name", list(ZOO))
def test_flow_with_structured_layer_is_the_model(name: str) -> None:
    layer = build(name)
    x = data_points(layer, 6)
    flow = Flow(layer, StandardNormal([layer.features]))
    expected = pyro_log_joint(name, layer, x)
    # Gaussian models: affine maps only, a few ulps per site. Others: icdf / log-space cdf maps and a
    # root finder with tolerance 4 eps max(1,|x|), amplified by log-densities of order 10-100: 1e-8.
    tolerance = 1e-10 if name in GAUSSIAN else 1e-8
    torch.testing.assert_close(flow.log_prob(x).detach(), expected, rtol=0, atol=tolerance)
    torch.testing.assert_close(
        ModelDistribution(layer).log_prob(x).detach(), expected, rtol=0, atol=tolerance
    )
    standalone = ModelDistribution(ZOO[name], *zoo_arguments(name), **SMALL.get(name, {}))
    if name == "with_params":
        standalone.load_state_dict(layer.state_dict())
    torch.testing.assert_close(standalone.log_prob(x).detach(), expected, rtol=0, atol=tolerance)


@pytest.mark.parametrize("name", ["mixed", "eight_schools"])
def test_unconstrained_layer_is_the_pushed_forward_model(name: str) -> None:
    layer = build(name, coordinates="unconstrained")
    u = data_points(layer, 5)
    expected = ModelDistribution(ZOO[name], *zoo_arguments(name), coordinates="unconstrained").log_prob(u)
    flow = Flow(layer, StandardNormal([layer.features]))
    torch.testing.assert_close(flow.log_prob(u).detach(), expected.detach(), rtol=0, atol=1e-8)


@pytest.mark.parametrize("backbone", ["maf", "nsf"])
def test_bottom_emf_equals_backbone_over_model_distribution(backbone: str) -> None:
    layer = build("hierarchical")
    flow = emf_flow(layer, position="bottom", backbone=backbone, hidden_features=16)
    backbone_layers = list(flow._transform._transforms)[:-1]
    assert flow._transform._transforms[-1] is layer
    reference = Flow(CompositeTransform(backbone_layers), ModelDistribution(layer))
    x = torch.randn(7, layer.features)
    torch.testing.assert_close(flow.log_prob(x), reference.log_prob(x), rtol=0, atol=1e-10)


# ---------------------------------------------------------------- 13: nflows interop


@pytest.mark.parametrize("layer_class", [StructuredTransform, GatedStructuredTransform])
def test_layers_compose_with_maf_and_nsf_in_flows(layer_class: type) -> None:
    layer = build("mixed", layer_class)
    features = layer.features
    maf = MaskedAffineAutoregressiveTransform(features, 16)
    nsf = MaskedPiecewiseRationalQuadraticAutoregressiveTransform(features, 16, num_bins=4, tails="linear")
    for transforms in ([layer, maf], [maf, layer], [nsf, ReversePermutation(features), layer]):
        flow = Flow(CompositeTransform(transforms), StandardNormal([features]))
        samples = flow.sample(9)
        assert samples.shape == (9, features)
        log_prob = flow.log_prob(samples)
        assert log_prob.shape == (9,) and torch.isfinite(log_prob).all()
        noise = flow.transform_to_noise(samples)
        assert noise.shape == (9, features)
        samples_and_log_prob = flow.sample_and_log_prob(4)
        assert samples_and_log_prob[0].shape == (4, features) and samples_and_log_prob[1].shape == (4,)
    inverted = InverseTransform(layer)
    noise = torch.randn(3, features)
    data, logabsdet = inverted(noise)
    back, back_logabsdet = inverted.inverse(data)
    torch.testing.assert_close(back, noise, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logabsdet + back_logabsdet, torch.zeros(3), rtol=0, atol=1e-10)


def _drift_layer(layer_class: type = StructuredTransform) -> StructuredTransform:
    origin = torch.tensor([0.1, -0.2])
    return layer_class(zoo.drift_walk, origin, context_to_kwargs=lambda c: {"drift": c}, compile=False)


@pytest.mark.parametrize("layer_class", [StructuredTransform, GatedStructuredTransform])
def test_conditional_layer_and_flow(layer_class: type) -> None:
    layer = _drift_layer(layer_class)
    flow = Flow(
        CompositeTransform([layer, MaskedAffineAutoregressiveTransform(12, 16, context_features=2)]),
        StandardNormal([12]),
    )
    context = torch.tensor([[0.5, 0.0], [-1.0, 2.0], [0.0, 0.0]])
    samples = flow.sample(5, context=context)
    assert samples.shape == (3, 5, 12)
    log_prob = flow.log_prob(samples.reshape(15, 12), context=context.repeat_interleave(5, dim=0))
    assert log_prob.shape == (15,) and torch.isfinite(log_prob).all()
    # The context reaches the model: the conditional model density at its own drift (gates open: the
    # gated layer at lambda = 1 is the model).
    if layer_class is GatedStructuredTransform:
        with torch.no_grad():
            for parameter in layer.gate_logits.values():
                parameter.fill_(1.0)
    plain = Flow(layer, StandardNormal([12]))
    x = plain.sample(4, context=context).reshape(12, 12)
    rows_context = context.repeat_interleave(4, dim=0)
    expected = ModelDistribution(
        zoo.drift_walk, torch.tensor([0.1, -0.2]), context_to_kwargs=lambda c: {"drift": c}
    ).log_prob(x, context=rows_context)
    torch.testing.assert_close(plain.log_prob(x, context=rows_context).detach(), expected, rtol=0, atol=1e-10)
    # A drift of +2 per step moves the walk's end: the samples follow the context.
    ends = plain.sample(2000, context=torch.tensor([[2.0, -2.0]]))[0, :, -2:].mean(0)
    torch.testing.assert_close(ends, torch.tensor([0.1 + 10.0, -0.2 - 10.0]), rtol=0, atol=0.3)


def test_conditional_row_loop_matches_batched() -> None:
    batched = _drift_layer()
    looped = StructuredTransform(
        zoo.drift_walk, torch.tensor([0.1, -0.2]), context_to_kwargs=lambda c: {"drift": c}, vectorize=False
    )
    context = torch.randn(4, 2)
    x = torch.randn(4, 12)
    for a, b in zip(batched(x, context=context), looped(x, context=context)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_model_distribution_sampling_and_context() -> None:
    base = ModelDistribution(
        zoo.drift_walk, torch.tensor([0.1, -0.2]), context_to_kwargs=lambda c: {"drift": c}
    )
    assert base.sample(6).shape == (6, 12)
    samples = base.sample(7, context=torch.zeros(3, 2))
    assert samples.shape == (3, 7, 12)
    draws = ModelDistribution(zoo.hierarchical, *zoo_arguments("hierarchical")).sample(20_000)
    # Var(mean) = 1, Var(member) = 1 + 0.25: sample variances within ~4 SE (SE ~ sqrt(2/N) var ~ 1.4%).
    torch.testing.assert_close(draws[:, :3].var(0), torch.ones(3), rtol=0.06, atol=0)
    torch.testing.assert_close(draws[:, 3:].var(0), torch.full((12,), 1.25), rtol=0.06, atol=0)
    with pytest.raises(ValueError, match="inputs"):
        base.log_prob(torch.zeros(2, 11))


def test_model_distribution_allows_sites_without_a_bijector() -> None:
    import pyro
    import pyro.distributions as dist

    def model() -> None:
        g = pyro.sample("g", dist.Gamma(2.0, 1.0))
        pyro.sample("x", dist.Normal(0.0, g))

    base = ModelDistribution(model)
    x = torch.tensor([[1.5, 0.3], [0.2, -0.1]])
    expected = dist.Gamma(2.0, 1.0).log_prob(x[:, 0]) + dist.Normal(0.0, x[:, 0]).log_prob(x[:, 1])
    torch.testing.assert_close(base.log_prob(x), expected)
    assert base.sample(5).shape == (5, 2)
    with pytest.raises(TypeError, match="discrete"):
        ModelDistribution(lambda: pyro.sample("k", dist.Bernoulli(0.5)))


# ---------------------------------------------------------------- emf_flow


def _kinds(flow: Flow) -> list[type]:
    return [type(t) for t in flow._transform._transforms]


def test_emf_positions_and_layouts() -> None:
    layer = build("hierarchical")
    maf, rev, structured = MaskedAffineAutoregressiveTransform, ReversePermutation, StructuredTransform
    assert _kinds(emf_flow(layer, "top", hidden_features=8)) == [structured, maf, rev, maf]
    assert _kinds(emf_flow(layer, "middle", hidden_features=8)) == [maf, structured, rev, maf]
    assert _kinds(emf_flow(layer, "bottom", hidden_features=8)) == [maf, rev, maf, structured]
    assert _kinds(emf_flow(layer, "middle", num_layers=4, hidden_features=8)) == [
        maf,
        rev,
        maf,
        structured,
        rev,
        maf,
        rev,
        maf,
    ]
    nsf = MaskedPiecewiseRationalQuadraticAutoregressiveTransform
    flow = emf_flow(layer, "top", backbone="nsf", actnorm=True, hidden_features=8, num_bins=4, tail_bound=4.0)
    assert _kinds(flow) == [structured, ActNorm, nsf, rev, ActNorm, nsf]
    assert isinstance(flow._distribution, StandardNormal)
    # MADE with num_blocks=1 and no residual blocks: two hidden layers of hidden_features.
    made = flow._transform._transforms[2].autoregressive_net
    assert made.initial_layer.out_features == 8 and len(made.blocks) == 1


def test_emf_parameter_count_adds_only_model_parameters_and_gates() -> None:
    features = build("with_params").features
    plain_maf = Flow(
        CompositeTransform(
            [
                MaskedAffineAutoregressiveTransform(features, 32, num_blocks=1, use_residual_blocks=False),
                ReversePermutation(features),
                MaskedAffineAutoregressiveTransform(features, 32, num_blocks=1, use_residual_blocks=False),
            ]
        ),
        StandardNormal([features]),
    )
    gated = build("with_params", GatedStructuredTransform)
    emf = emf_flow(gated, hidden_features=32)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    # pyro.params loc [2], scale [2], weight [] and one gate per site (x, y)
    assert count(emf) - count(plain_maf) == 2 + 2 + 1 + 2


def test_emf_arguments_are_checked() -> None:
    layer = build("hierarchical")
    with pytest.raises(ValueError, match="position"):
        emf_flow(layer, position="side")
    with pytest.raises(ValueError, match="backbone"):
        emf_flow(layer, backbone="realnvp")
    with pytest.raises(ValueError, match="num_layers"):
        emf_flow(layer, num_layers=0)
    with pytest.raises(TypeError, match="structured"):
        emf_flow(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("position", ["top", "middle", "bottom"])
def test_emf_training_step_and_state_dict(position: str) -> None:
    layer = build("random_walk", GatedStructuredTransform)
    flow = emf_flow(layer, position=position, hidden_features=32)
    x = data_points(layer, 32)
    optimiser = torch.optim.Adam(flow.parameters(), lr=1e-3)
    loss = -flow.log_prob(x).mean()
    optimiser.zero_grad()
    loss.backward()
    for name, parameter in flow.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    optimiser.step()
    fresh = emf_flow(build("random_walk", GatedStructuredTransform), position=position, hidden_features=32)
    fresh.load_state_dict(flow.state_dict())
    torch.testing.assert_close(fresh.log_prob(x), flow.log_prob(x), rtol=0, atol=0)


def test_emf_learns_a_random_walk_better_than_its_prior_guess() -> None:
    """A few hundred Adam steps on data from a walk with another step size: the gated EMF's NLL falls
    well below the initial one (the layer's scale is not a parameter, so the backbone must adapt)."""
    torch.manual_seed(0)
    target = StructuredTransform(zoo.random_walk, torch.zeros(3), steps=6, scale=1.0, compile=False)
    data = target.inverse(torch.randn(256, 18))[0].detach()
    # compile="auto": the closed-form gated walk is captured once, so the loop costs no Python model runs.
    layer = GatedStructuredTransform(zoo.random_walk, torch.zeros(3), steps=6)
    flow = emf_flow(layer, position="top", hidden_features=32)
    optimiser = torch.optim.Adam(flow.parameters(), lr=3e-3)
    initial = -flow.log_prob(data).mean().item()
    for _ in range(80):
        optimiser.zero_grad()
        loss = -flow.log_prob(data).mean()
        loss.backward()
        optimiser.step()
    final = -flow.log_prob(data).mean().item()
    exact = -Flow(target, StandardNormal([18])).log_prob(data).mean().item()
    assert final < initial - 0.5 * (initial - exact)
    assert math.isfinite(final)


# ---------------------------------------------------------------- mixin on the EMF stacks (nflows layers)


class _EmfStack(TransformTestMixin):
    backbone = "maf"
    position = "middle"
    # MAF/NSF inverses are D sequential MADE passes: exact to rounding, ~1e-12 in float64.
    round_trip_atol = 1e-9
    jacobian_rows = 1  # each row of the inverse's Jacobian costs D backward passes through D MADE passes

    def make_transform(self):
        torch.manual_seed(1)
        layer = build("eight_schools", GatedStructuredTransform)
        flow = emf_flow(layer, position=self.position, backbone=self.backbone, hidden_features=16, num_bins=4)
        return flow._transform

    def make_inputs(self) -> torch.Tensor:
        return data_points(build("eight_schools"), 4)


class TestEmfMafStack(_EmfStack):
    pass


class TestEmfNsfStack(_EmfStack):
    backbone = "nsf"
    position = "top"
