"""StructuredTransform / GatedStructuredTransform: acceptance checks 3 (gated), 4 (gated roots), 6, 7, 9, 10,
12, 14 and 15 of design/flows.md §6 on the test zoo (checks 8 and 13 are in test_emf.py)."""

from __future__ import annotations

import io
import math

import pyro
import pyro.distributions as dist
import pytest
import scipy.stats
import torch
from nflows.transforms.base import CompositeTransform, InverseTransform
from pyro import poutine

from pyro_ext.flows import (
    GatedStructuredTransform,
    StructuredTransform,
    UnsupportedSiteError,
    to_torch_transform,
)
from pyro_ext.testing import TransformTestMixin
from tests.flows import zoo
from tests.flows.zoo import ZOO, zoo_arguments

# Model keyword arguments that keep D <= 40 for the Jacobian checks (check 7).
SMALL = {"random_walk": {"steps": 10}, "smoothness": {"steps": 12}}


def build(
    name: str, layer_class: type = StructuredTransform, *, small: bool = True, **options
) -> StructuredTransform:
    options.setdefault("compile", False)
    kwargs = dict(SMALL.get(name, {})) if small else {}
    return layer_class(ZOO[name], *zoo_arguments(name), **kwargs, **options)


def set_gates(layer: GatedStructuredTransform, gate: float) -> None:
    """Set every gate to lambda = ``gate`` (w = logit(gate) / tau)."""
    with torch.no_grad():
        for parameter in layer.gate_logits.values():
            parameter.fill_(math.log(gate / (1 - gate)) / layer.gate_temperature)


def data_points(layer: StructuredTransform, rows: int, scale: float = 0.8, seed: int = 0) -> torch.Tensor:
    """Points in the layer's data domain (images of moderate noise), so every site is in its support."""
    noise = scale * torch.randn(rows, layer.features, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return layer.inverse(noise)[0]


def reference_log_joint(model, args, values: dict, params: dict | None = None) -> torch.Tensor:
    """Per-row log joint of the latent sites by Pyro alone: trace(condition(model, values))."""
    conditioned = poutine.condition(model, data=values)
    if params:
        conditioned = poutine.substitute(conditioned, data=params)
    with poutine.block():
        trace = poutine.trace(conditioned).get_trace(*args)
    rows = next(iter(values.values())).shape[0]
    total = torch.zeros(rows)
    for name in values:
        site = trace.nodes[name]
        log_prob = site["fn"].log_prob(site["value"])
        total = total + log_prob.expand(rows, *log_prob.shape[1:]).reshape(rows, -1).sum(-1)
    return total


# ---------------------------------------------------------------- mixin (6, 7, 14, 15)


class _ZooLayer(TransformTestMixin):
    """TransformTestMixin on one zoo model: round trips (6), log-det vs autograd (7), batch rows (14),
    state_dict / deepcopy / float32 / CUDA (15)."""

    model_name = "random_walk"
    layer_class: type = StructuredTransform
    options: dict = {}
    gate: float | None = None
    # Root-solved sites (mixtures, gated icdf maps) are exact to the root tolerance 4 eps max(1, |x|),
    # so the float64 round trips keep the mixin's 1e-10; float32 runs a few hundred roundings of 1.2e-7
    # through the icdf/ndtri maps, where the heavy HalfCauchy tail amplifies them: 1e-4 relative.
    float32_rtol = 1e-4

    def make_transform(self) -> StructuredTransform:
        layer = build(self.model_name, self.layer_class, **self.options)
        if self.gate is not None:
            set_gates(layer, self.gate)
        return layer

    def make_inputs(self) -> torch.Tensor:
        return data_points(self.make_transform(), 5)


class TestRandomWalk(_ZooLayer):
    model_name = "random_walk"


class TestSmoothness(_ZooLayer):
    model_name = "smoothness"


class TestHierarchical(_ZooLayer):
    model_name = "hierarchical"


class TestEightSchools(_ZooLayer):
    model_name = "eight_schools"


class TestMixed(_ZooLayer):
    model_name = "mixed"


class TestWithParams(_ZooLayer):
    model_name = "with_params"


class TestNestedPlates(_ZooLayer):
    model_name = "nested_plates"


class TestMixedUnconstrained(_ZooLayer):
    model_name = "mixed"
    options = {"coordinates": "unconstrained"}


class TestMixedGatedElement(_ZooLayer):
    model_name = "mixed"
    layer_class = GatedStructuredTransform
    options = {"gate": "element"}
    gate = 0.7


class TestEightSchoolsGatedSite(_ZooLayer):
    model_name = "eight_schools"
    layer_class = GatedStructuredTransform
    gate = 0.3


class TestRandomWalkGatedElement(_ZooLayer):
    model_name = "random_walk"
    layer_class = GatedStructuredTransform
    options = {"gate": "element"}
    gate = 0.2


class TestPyroModuleModel(TransformTestMixin):
    def make_transform(self) -> StructuredTransform:
        torch.manual_seed(3)  # the Linear layer's initial weights
        return StructuredTransform(zoo.RegressionPrior(), compile=False)

    def make_inputs(self) -> torch.Tensor:
        return data_points(self.make_transform(), 4)


class TestCompiledEightSchools(_ZooLayer):
    """The captured (torch.jit.trace) passes pass the same checks as the eager ones."""

    model_name = "eight_schools"
    options = {"compile": "auto"}


# ---------------------------------------------------------------- 6: round trips


@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.parametrize("gate_kind", ["site", "element"])
@pytest.mark.parametrize("gate", [0.2, 0.7, 0.999])
def test_gated_round_trip_is_identity(name: str, gate_kind: str, gate: float) -> None:
    layer = build(name, GatedStructuredTransform, gate=gate_kind)
    set_gates(layer, gate)
    x, noise = data_points(layer, 6), torch.randn(6, layer.features)
    with torch.no_grad():
        for composite, start in (
            (CompositeTransform([layer, InverseTransform(layer)]), x),
            (CompositeTransform([InverseTransform(layer), layer]), noise),
        ):
            outputs, logabsdet = composite(start)
            torch.testing.assert_close(outputs, start, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(logabsdet, torch.zeros(6), rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", list(ZOO))
def test_round_trip_is_identity(name: str) -> None:
    layer = build(name)
    x, noise = data_points(layer, 6), torch.randn(6, layer.features)
    with torch.no_grad():
        for composite, start in (
            (CompositeTransform([layer, InverseTransform(layer)]), x),
            (CompositeTransform([InverseTransform(layer), layer]), noise),
        ):
            outputs, logabsdet = composite(start)
            torch.testing.assert_close(outputs, start, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(logabsdet, torch.zeros(6), rtol=0, atol=1e-10)


# ---------------------------------------------------------------- 3 (gated): log-dets


@pytest.mark.parametrize("gate", [0.3, 0.9, 0.999])
@pytest.mark.parametrize("gate_kind", ["site", "element"])
def test_gated_logabsdet_matches_autograd(gate: float, gate_kind: str) -> None:
    # `mixed` has every gated scheme: Uniform/HalfCauchy (explicit f~ root), mixture (explicit f~^{-1}
    # root), MVN (triangular closed form), LogNormal (diagonal closed form); D = 7 <= 6 per site.
    layer = build("mixed", GatedStructuredTransform, gate=gate_kind)
    set_gates(layer, gate)
    x, noise = data_points(layer, 3), torch.randn(3, layer.features)
    for direction, points in (("forward", x), ("inverse", noise)):
        function = layer if direction == "forward" else layer.inverse
        _, logabsdet = function(points)
        for row in range(3):
            jacobian = torch.autograd.functional.jacobian(
                lambda r, function=function: function(r.unsqueeze(0))[0][0], points[row]
            )
            expected = torch.linalg.slogdet(jacobian)[1]
            torch.testing.assert_close(logabsdet[row].detach(), expected, rtol=0, atol=1e-8)


# ---------------------------------------------------------------- 4 (gated): gradients


def _mixture_with_params() -> None:
    logits = pyro.param("logits", torch.tensor([0.3, -0.2, 0.1]))
    locs = pyro.param("locs", torch.tensor([-2.0, 0.5, 2.5]))
    scales = pyro.param(
        "scales", torch.tensor([0.6, 0.9, 0.5]), constraint=torch.distributions.constraints.positive
    )
    mixture = dist.MixtureSameFamily(dist.Categorical(logits=logits), dist.Normal(locs, scales))
    m = pyro.sample("m", mixture)
    pyro.sample("c", dist.HalfCauchy(scales.sum() + 0.1 * m.abs()))
    pyro.sample("u", dist.Uniform(locs[0] - 1.0, locs[0] + scales[1] + m.exp()))


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_gated_root_gradients_gradcheck(direction: str) -> None:
    """Check 4 for the gated root schemes: d/d(inputs, gate, logits, locs, scales) by finite differences."""
    layer = GatedStructuredTransform(_mixture_with_params, gate="element", compile=False)
    set_gates(layer, 0.6)
    points = data_points(layer, 2) if direction == "forward" else torch.randn(2, layer.features)
    names = [name for name, _ in layer.named_parameters()]

    def function(inputs: torch.Tensor, *parameters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with layer._swapped_state(names, parameters):
            return layer(inputs) if direction == "forward" else layer.inverse(inputs)

    tensors = [points.clone().requires_grad_()] + [
        p.detach().clone().requires_grad_() for p in layer.parameters()
    ]
    # The roots are exact to 4 eps max(1,|x|) ~ 1e-15, far below the central-difference error of
    # gradcheck's eps = 1e-6 (~1e-12 relative), so atol 1e-6 (the design's figure) has wide margin.
    assert torch.autograd.gradcheck(function, tuple(tensors), eps=1e-6, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- 9: joint reproduced


def test_random_walk_joint_reproduced() -> None:
    steps, dim, scale, draws = 30, 3, zoo.RANDOM_WALK_SCALE, 100_000
    origin = torch.tensor([0.2, -0.1, 0.3])
    layer = StructuredTransform(zoo.random_walk, origin, steps=steps, compile=False)
    noise = torch.randn(draws, layer.features, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        x = layer.inverse(noise)[0]
    time = torch.arange(steps).repeat_interleave(dim)
    same_coordinate = torch.arange(dim).repeat(steps)
    # Cov(x_a, x_b) = 1 + min(a, b) s^2 within one coordinate, 0 across coordinates.
    exact = (1 + torch.minimum(time[:, None], time[None, :]) * scale**2) * (
        same_coordinate[:, None] == same_coordinate[None, :]
    )
    mean_error = (x.mean(0) - origin.repeat(steps)) / (exact.diagonal() / draws).sqrt()
    assert mean_error.abs().max() < 5.0  # 5 standard errors over 90 coordinates
    covariance = torch.cov(x.T)
    relative = torch.linalg.matrix_norm(covariance - exact) / torch.linalg.matrix_norm(exact)
    # Sampling error of a covariance is O(sqrt(2/N)) ~ 0.45% relative at N = 1e5; 2% is the design's bar.
    assert relative < 0.02


@pytest.mark.parametrize("name", ["smoothness", "hierarchical", "eight_schools", "mixed", "nested_plates"])
def test_zoo_joint_reproduced(name: str) -> None:
    """Per-coordinate two-sample KS tests of S.inverse(eps) against Pyro's ancestral samples."""
    draws = 100_000
    pyro.set_rng_seed(5)
    layer = build(name)
    with torch.no_grad():
        x = layer.inverse(torch.randn(draws, layer.features))[0]
    # Pyro's own ancestral sampler, vectorised by a plate left of the model's plates.
    with torch.no_grad(), poutine.block(), pyro.plate("draws", draws, dim=-layer.max_plate_nesting - 1):
        trace = poutine.trace(ZOO[name]).get_trace(*zoo_arguments(name), **SMALL.get(name, {}))
    reference = torch.cat([trace.nodes[n]["value"].reshape(draws, -1) for n in layer.site_names], dim=-1)
    tests = layer.features
    p_values = [scipy.stats.ks_2samp(x[:, j].numpy(), reference[:, j].numpy()).pvalue for j in range(tests)]
    # Bonferroni: the family-wise false-alarm rate is 1e-3 per model.
    assert min(p_values) > 1e-3 / tests, f"min p = {min(p_values):.2e} over {tests} coordinates"


# ---------------------------------------------------------------- 10: gates


def test_gates_start_at_gate_init() -> None:
    for gate_kind in ("site", "element"):
        layer = build("mixed", GatedStructuredTransform, gate=gate_kind)
        for name, value in layer.gate_values().items():
            torch.testing.assert_close(value, torch.full_like(value, 0.999), rtol=0, atol=1e-12)
            expected_shape = () if gate_kind == "site" else layer.sites[layer.site_names.index(name)].shape
            assert value.shape == expected_shape


@pytest.mark.parametrize("name", ["mixed", "eight_schools", "random_walk"])
@pytest.mark.parametrize("coordinates", ["value", "unconstrained"])
def test_open_gates_equal_ungated_layer(name: str, coordinates: str) -> None:
    gated = build(name, GatedStructuredTransform, gate="element", coordinates=coordinates)
    plain = build(name, coordinates=coordinates)
    with torch.no_grad():
        for parameter in gated.gate_logits.values():
            parameter.fill_(1.0)  # lambda = sigmoid(100) = 1 in float64
    x, noise = data_points(plain, 5), torch.randn(5, plain.features)
    with torch.no_grad():
        for a, b in zip(gated(x) + gated.inverse(noise), plain(x) + plain.inverse(noise)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_closed_gates_give_support_bijection() -> None:
    layer = build("mixed", GatedStructuredTransform)
    with torch.no_grad():
        for parameter in layer.gate_logits.values():
            parameter.fill_(-1.0)  # lambda = sigmoid(-100) ~ 4e-44
        noise = torch.randn(5, layer.features)
        x, logabsdet = layer.inverse(noise)
    values, noises = layer.unpack(x), layer.unpack(noise)
    expected_logabsdet = torch.zeros(5)
    for site in ("z", "m"):  # real sites: the identity
        torch.testing.assert_close(values[site], noises[site], rtol=1e-12, atol=1e-12)
    # constrained sites: T(eps) with T = biject_to(support): a ~ Uniform(-1, 2), c ~ HalfCauchy, l ~ LogNormal
    torch.testing.assert_close(values["a"], -1 + 3 * torch.sigmoid(noises["a"]), rtol=1e-12, atol=1e-12)
    for site in ("c", "l"):
        torch.testing.assert_close(values[site], noises[site].exp(), rtol=1e-12, atol=1e-12)
        expected_logabsdet = expected_logabsdet + noises[site]
    a = noises["a"]
    expected_logabsdet = (
        expected_logabsdet
        + math.log(3)
        + torch.nn.functional.logsigmoid(a)
        + torch.nn.functional.logsigmoid(-a)
    )
    torch.testing.assert_close(logabsdet, expected_logabsdet, rtol=1e-12, atol=1e-12)
    # and on purely real models the closed-gate layer is the identity with logabsdet 0
    walk = build("random_walk", GatedStructuredTransform)
    with torch.no_grad():
        for parameter in walk.gate_logits.values():
            parameter.fill_(-1.0)
        noise = torch.randn(5, walk.features)
        x, logabsdet = walk.inverse(noise)
    torch.testing.assert_close(x, noise, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logabsdet, torch.zeros(5), rtol=0, atol=1e-12)


def test_ungated_sites_use_the_plain_map() -> None:
    gated = build("mixed", GatedStructuredTransform, ungated_sites=["m", "z"])
    set_gates(gated, 0.3)
    plain = build("mixed")
    assert set(gated.gate_values()) == {"a", "c", "l"}
    x = data_points(plain, 4)
    with torch.no_grad():
        gated_noise, plain_noise = gated.unpack(gated(x)[0]), plain.unpack(plain(x)[0])
    # Given the same data, an ungated site's noise is its plain conditional map's; a gated site's is not.
    for site in ("m", "z"):
        torch.testing.assert_close(gated_noise[site], plain_noise[site], rtol=1e-12, atol=1e-12)
    for site in ("a", "c", "l"):
        assert not torch.allclose(gated_noise[site], plain_noise[site])
    with pytest.raises(ValueError, match="ungated_sites"):
        build("mixed", GatedStructuredTransform, ungated_sites=["nope"])


def test_gate_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="gate"):
        build("mixed", GatedStructuredTransform, gate="global")
    with pytest.raises(ValueError, match="gate_init"):
        build("mixed", GatedStructuredTransform, gate_init=1.0)
    with pytest.raises(ValueError, match="gate_temperature"):
        build("mixed", GatedStructuredTransform, gate_temperature=0.0)


# ---------------------------------------------------------------- 12: parameters


def test_pyro_params_are_lifted_constrained_and_trained() -> None:
    store = pyro.get_param_store()
    assert len(store) == 0
    layer = build("with_params", GatedStructuredTransform)
    names = dict(layer.named_parameters())
    assert {"unconstrained_params.loc", "unconstrained_params.scale", "unconstrained_params.weight"} <= set(
        names
    )
    assert (layer.model_param("scale") > 0).all()
    assert 0 < layer.model_param("weight") < 1
    x = data_points(layer, 8)
    loss = -(layer(x)[1] - 0.5 * layer(x)[0].pow(2).sum(-1)).sum()
    loss.backward()
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name
    optimiser = torch.optim.SGD(layer.parameters(), lr=0.5)
    optimiser.step()
    assert (layer.model_param("scale") > 0).all() and 0 < layer.model_param("weight") < 1
    assert len(store) == 0  # the global param store was never touched


def test_param_store_value_is_initial_value_and_is_left_alone() -> None:
    pyro.param("loc", torch.tensor([1.5, -2.5]))
    before = pyro.param("loc").detach().clone()
    layer = build("with_params")
    torch.testing.assert_close(layer.model_param("loc"), before)
    with torch.no_grad():
        layer.unconstrained_params["loc"].add_(1.0)
    layer(data_points(layer, 3))
    torch.testing.assert_close(pyro.param("loc").detach(), before)
    assert set(pyro.get_param_store().keys()) == {"loc"}


def test_lift_params_false_reads_the_store_live() -> None:
    layer = build("with_params", lift_params=False)
    assert len(list(layer.parameters())) == 0
    x = data_points(layer, 3)
    before = layer(x)[0]
    with torch.no_grad():
        pyro.param("loc").add_(1.0)
    assert not torch.allclose(layer(x)[0], before)


def test_pyro_module_model_is_a_submodule_and_store_is_untouched() -> None:
    layer = StructuredTransform(zoo.RegressionPrior(), compile=False)
    names = {name for name, _ in layer.named_parameters()}
    assert {"model.scale_unconstrained", "model.net.weight", "model.net.bias"} <= names
    x = data_points(layer, 4)
    noise, logabsdet = layer(x)
    (0.5 * noise.pow(2).sum() - logabsdet.sum()).backward()
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert len(pyro.get_param_store()) == 0


def test_pyro_module_call_inside_model_raises() -> None:
    net = torch.nn.Linear(2, 2)

    def model() -> None:
        pyro.module("net", net)
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("w", dist.Normal(net(z), 1.0).to_event(1))

    with pytest.raises(ValueError, match="pyro.module"):
        StructuredTransform(model, compile=False)


def test_one_model_run_per_pass_and_no_retracing() -> None:
    calls = []

    def counted(origin: torch.Tensor) -> None:
        calls.append(1)
        zoo.hierarchical(origin)

    layer = StructuredTransform(counted, *zoo_arguments("hierarchical"), compile=False)
    calls.clear()
    x = data_points(layer, 5)
    assert len(calls) == 1
    for _ in range(3):
        layer(x)
    assert len(calls) == 4
    compiled = StructuredTransform(counted, *zoo_arguments("hierarchical"), compile="auto")
    compiled(x)  # first call of this shape: capture and probe run the model a few times
    calls.clear()
    for _ in range(3):
        compiled(x)
    assert len(calls) == 0  # captured graph: no Python model run, no re-tracing


# ---------------------------------------------------------------- 14: batch and errors


@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.parametrize("rows", [1, 7])
def test_batch_rows_equal_unbatched_rows(name: str, rows: int) -> None:
    layer = build(name, GatedStructuredTransform, gate="element")
    set_gates(layer, 0.8)
    looped = build(name, GatedStructuredTransform, gate="element", vectorize=False)
    looped.load_state_dict(layer.state_dict())
    x, noise = data_points(layer, rows), torch.randn(rows, layer.features)
    with torch.no_grad():
        for batched, single in zip(layer(x) + layer.inverse(noise), looped(x) + looped.inverse(noise)):
            torch.testing.assert_close(batched, single, rtol=1e-12, atol=1e-12)


def _non_broadcasting(origin: torch.Tensor) -> None:
    x = pyro.sample("x", dist.Normal(origin, 1.0).to_event(1))
    pyro.sample("y", dist.Normal(x[0] + x[1], 1.0))  # indexes what becomes the batch dim


def test_non_broadcasting_model_is_caught_and_row_loop_works() -> None:
    origin = torch.tensor([0.3, -0.4])
    with pytest.raises(ValueError, match="vectorize=False"):
        StructuredTransform(_non_broadcasting, origin, compile=False)
    layer = StructuredTransform(_non_broadcasting, origin, vectorize=False)
    x = torch.tensor([[0.1, 0.2, 0.5], [1.0, -1.0, 0.0]])
    flow_log_prob = layer(x)[1] - 0.5 * layer(x)[0].pow(2).sum(-1) - 1.5 * math.log(2 * math.pi)
    expected = torch.stack([_row_log_joint(origin, row) for row in x])
    torch.testing.assert_close(flow_log_prob, expected, rtol=0, atol=1e-10)


def _row_log_joint(origin: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    return dist.Normal(origin, 1.0).log_prob(row[:2]).sum() + dist.Normal(row[0] + row[1], 1.0).log_prob(
        row[2]
    )


def test_wrong_width_and_non_finite_inputs_raise() -> None:
    layer = build("hierarchical")
    with pytest.raises(ValueError, match=r"inputs.*D = 15"):
        layer(torch.zeros(3, 14))
    with pytest.raises(ValueError, match=r"inputs.*D = 15"):
        layer.inverse(torch.zeros(15))
    bad = torch.zeros(2, 15)
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        layer(bad)
    bad[1, 3] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        layer.inverse(bad)
    with pytest.raises(ValueError, match="context"):
        layer(torch.zeros(2, 15), context=torch.zeros(3, 1))


def test_subsampled_plate_raises() -> None:
    def model() -> None:
        with pyro.plate("data", 10, subsample_size=3):
            pyro.sample("x", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="subsampled plate 'data'"):
        StructuredTransform(model, compile=False)


def test_factor_site_raises_unless_ignored() -> None:
    def model() -> None:
        x = pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.factor("penalty", -x.pow(2).sum(-1))

    with pytest.raises(ValueError, match="factor site 'penalty'"):
        StructuredTransform(model, compile=False)
    layer = StructuredTransform(model, ignore_factors=True, compile=False)
    assert layer.site_names == ("x",)


def test_discrete_and_unsupported_sites_raise_naming_the_site() -> None:
    def discrete() -> None:
        pyro.sample("k", dist.Categorical(torch.ones(3)))

    def gamma() -> None:
        pyro.sample("g", dist.Gamma(2.0, 1.0))

    with pytest.raises(TypeError, match="'k'"):
        StructuredTransform(discrete, compile=False)
    with pytest.raises(UnsupportedSiteError, match="'g'"):
        StructuredTransform(gamma, compile=False)
    layer = StructuredTransform(gamma, approximate="log_moment_match", compile=False)
    assert layer.sites[0].exact is False
    with pytest.raises(ValueError, match="unknown sites"):
        StructuredTransform(gamma, approximate={"h": "log_moment_match"}, compile=False)


def test_value_dependent_sites_raise() -> None:
    def appearing() -> None:
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        if x.item() > 10:  # never when traced (x ~ N(0, 1)); the input below makes it true
            pyro.sample("y", dist.Normal(x, 1.0))

    def vanishing() -> None:
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        if x.item() < 10:
            pyro.sample("y", dist.Normal(x, 1.0))

    layer = StructuredTransform(appearing, vectorize=False)
    with pytest.raises(ValueError, match="latent site 'y' that was not present"):
        layer.inverse(torch.tensor([[20.0]]))
    layer = StructuredTransform(vanishing, vectorize=False)
    with pytest.raises(ValueError, match=r"did not visit the latent sites \['y'\]"):
        layer.inverse(torch.tensor([[20.0, 0.0]]))


def test_bad_options_raise() -> None:
    with pytest.raises(ValueError, match="coordinates"):
        build("mixed", coordinates="latent")
    with pytest.raises(ValueError, match="compile"):
        build("mixed", compile="fast")
    with pytest.raises(TypeError, match="model"):
        StructuredTransform(42)
    with pytest.raises(ValueError, match="max_plate_nesting"):
        build("nested_plates", max_plate_nesting=1)


# ---------------------------------------------------------------- 15: state, compile


def test_torch_save_load_of_module_level_model() -> None:
    layer = build("eight_schools", GatedStructuredTransform)
    set_gates(layer, 0.6)
    x = data_points(layer, 4)
    expected = layer(x)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for a, b in zip(loaded(x), expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["with_params", "nested_plates"])
def test_compiled_passes_match_eager_with_gradients(name: str) -> None:
    eager = build(name, GatedStructuredTransform, gate="element")
    set_gates(eager, 0.6)
    compiled = build(name, GatedStructuredTransform, gate="element", compile="auto")
    compiled.load_state_dict(eager.state_dict())
    x, noise = data_points(eager, 6), torch.randn(6, eager.features)
    results = []
    for layer in (eager, compiled):
        inputs, noise_inputs = x.clone().requires_grad_(), noise.clone().requires_grad_()
        outputs, logabsdet = layer(inputs)
        data, inverse_logabsdet = layer.inverse(noise_inputs)
        loss = 0.5 * outputs.pow(2).sum() - logabsdet.sum() + data.pow(2).sum() + inverse_logabsdet.sum()
        grads = torch.autograd.grad(loss, [inputs, noise_inputs, *layer.parameters()])
        results.append((outputs, logabsdet, data, inverse_logabsdet, *grads))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert {key[0] for key in compiled._captured} == {"forward", "inverse"}
    assert all(value is not None for value in compiled._captured.values())


def test_auto_compile_keeps_root_solving_layers_eager() -> None:
    layer = build("mixed", compile="auto")  # a mixture site: the root finder would be unrolled
    layer(data_points(layer, 3))
    assert layer._captured == {}


@pytest.mark.slow
def test_inductor_compile_matches_eager() -> None:
    eager = build("random_walk", GatedStructuredTransform, small=False)
    compiled = build("random_walk", GatedStructuredTransform, small=False, compile="inductor")
    x = data_points(eager, 64)
    for a, b in zip(compiled(x) + compiled.inverse(x), eager(x) + eager.inverse(x)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert all(value is not None for value in compiled._captured.values())


def _value_dependent(origin: torch.Tensor) -> None:
    x = pyro.sample("x", dist.Normal(origin, 1.0).to_event(1))
    shift = 1.0 if bool((x.sum(-1) > 0).all()) else -1.0  # Python control flow on values: not capturable
    pyro.sample("y", dist.Normal(x + shift, 1.0).to_event(1))


def test_compile_falls_back_to_eager_with_a_warning() -> None:
    origin = torch.tensor([5.0, 5.0])  # the construction check's moderate noise stays on one branch
    layer = StructuredTransform(_value_dependent, origin)
    eager = StructuredTransform(_value_dependent, origin, compile=False)
    # x = origin + noise sums to -0.1 (branch -1); the probe's 0.9 * noise + 0.1 sums to +1.1 (branch +1)
    noise = torch.tensor([[-5.05, -5.05, 0.3, -0.2]])
    # make_fx refuses to read a value during capture; a graph that captured anyway would fail the probe
    with pytest.warns(UserWarning, match="this layer runs it eagerly"):
        captured_result = layer.inverse(noise)
    for a, b in zip(captured_result, eager.inverse(noise)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert layer._captured and all(value is None for value in layer._captured.values())


def test_to_torch_transform_is_the_model_prior() -> None:
    layer = build("eight_schools")
    transform = to_torch_transform(layer)
    base = dist.Normal(torch.zeros(layer.features), 1.0).to_event(1)
    prior = dist.TransformedDistribution(base, [transform])
    x = prior.sample([6])
    log_prob_cached = prior.log_prob(x)  # the (noise, x) pair is cached: no extra pass
    expected = reference_log_joint(zoo.eight_schools, zoo_arguments("eight_schools"), layer.unpack(x))
    torch.testing.assert_close(log_prob_cached, expected, rtol=0, atol=1e-8)
    fresh = x.clone()  # not the cached tensor: log q at an arbitrary point runs nflows' forward
    torch.testing.assert_close(prior.log_prob(fresh), expected, rtol=0, atol=1e-8)
