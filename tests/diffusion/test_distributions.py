"""DiffusionEnergy, potential_fn, energy_nuts and the factor pattern; acceptance check 9 (NUTS recovers the
exact mixture weight) and the distributions' part of check 13."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS
from pyro.ops.stats import effective_sample_size

from pyro_ext.diffusion import EmpiricalEnergy, GaussianEnergy, ScoreNetEnergy, VEVariance, VPLinear
from pyro_ext.diffusion.distributions import DiffusionEnergy, energy_nuts, factor_model, potential_fn

#: check 9: y1 = (1, 1, 1, 1), y2 = -y1, VE with sigma^2 = 1, x_{1:2} = (0.3, 0.2) observed:
#: P(1 | x_o) = sigmoid(2 x_o . y_{1,o} / sigma^2) = 1 / (1 + e^-1)
W1 = 1.0 / (1.0 + math.exp(-1.0))
MASK = torch.tensor([True, True, False, False])
VALUE = torch.tensor([0.3, 0.2])


def two_patterns():
    y1 = torch.ones(4)
    return EmpiricalEnergy(torch.stack([y1, -y1]), VEVariance())


def weight_estimate(energy, draws):
    """Mean of P(1 | x) over draws ``[samples, copies, 2]`` and its standard error from the ESS."""
    conditioned = energy.condition(MASK, VALUE)
    w = conditioned.posterior_weights(draws, 1.0)[..., 0]  # [samples, copies]
    ess = effective_sample_size(w.T[:, :, None], chain_dim=0, sample_dim=1).sum()
    return float(w.mean()), float(w.std() / ess.sqrt()), float(ess)


def run_nuts(kernel, warmup, samples, initial_params=None):
    mcmc = MCMC(
        kernel, num_samples=samples, warmup_steps=warmup, initial_params=initial_params, disable_progbar=True
    )
    mcmc.run()
    return mcmc.get_samples()["x"]


# -------------------------------------------------------------------------------------------- check 9
def test_nuts_recovers_exact_weight_fast():
    """Check 9 at reduced length: K independent copies in one chain (their product is the exact target),
    200 warmup and 400 draws; the bar is 4 standard errors from the effective sample size."""
    energy = two_patterns()
    copies = 4
    pyro.set_rng_seed(0)
    draws = run_nuts(
        NUTS(potential_fn=potential_fn(energy, 1.0, condition=(MASK, VALUE))),
        200,
        400,
        {"x": torch.zeros(copies, 2)},
    )
    mean, stderr, _ = weight_estimate(energy, draws)
    assert abs(mean - W1) <= 4 * stderr

    def model():
        with pyro.plate("copies", copies):
            pyro.sample("x", DiffusionEnergy(energy, torch.ones(copies), condition=(MASK, VALUE)))

    pyro.set_rng_seed(1)
    kernel = energy_nuts(model, {"x": torch.zeros(copies, 2)})
    assert kernel._max_plate_nesting == 1  # traced without calling sample()
    draws = run_nuts(kernel, 200, 400)
    mean, stderr, _ = weight_estimate(energy, draws)
    assert abs(mean - W1) <= 4 * stderr


@pytest.mark.slow
@pytest.mark.parametrize("route", ["potential_fn", "energy_nuts"])
def test_nuts_recovers_exact_weight_full(route):
    """Check 9 as specified: one chain, 1000 warmup steps, 4000 draws; |w - 0.7311| <= 0.04 and <= 4 SE."""
    energy = two_patterns()
    pyro.set_rng_seed(2024)
    if route == "potential_fn":
        kernel = NUTS(potential_fn=potential_fn(energy, 1.0, condition=(MASK, VALUE)))
        draws = run_nuts(kernel, 1000, 4000, {"x": torch.zeros(2)})
    else:

        def model():
            pyro.sample("x", DiffusionEnergy(energy, 1.0, condition=(MASK, VALUE)))

        draws = run_nuts(energy_nuts(model, torch.zeros(2)), 1000, 4000)
    mean, stderr, ess = weight_estimate(energy, draws[:, None, :])
    print(f"check 9 ({route}): w1 = {mean:.4f} (exact {W1:.4f}), SE = {stderr:.4f}, ESS = {ess:.0f}")
    assert abs(mean - W1) <= 0.04
    assert abs(mean - W1) <= 4 * stderr


def test_exact_sample_recovers_weight():
    energy = two_patterns()
    distribution = DiffusionEnergy(energy, 1.0, condition=(MASK, VALUE))
    assert distribution.is_normalized
    draws = distribution.sample((40000,))
    w = energy.condition(MASK, VALUE).posterior_weights(draws, 1.0)[:, 0]
    # check 9: exact sample() agrees to 0.01 (w in [0, 1]: standard error <= 0.5 / 200 = 0.0025)
    assert abs(float(w.mean()) - W1) < 0.01


# ---------------------------------------------------------------------------------------- distribution
def test_log_prob_shapes_expand_and_normalisation():
    energy = EmpiricalEnergy(torch.randn(5, 3), VPLinear())
    t = torch.tensor([0.2, 0.5])
    d = DiffusionEnergy(energy, t)
    assert d.batch_shape == (2,) and d.event_shape == (3,)
    x = torch.randn(7, 2, 3)
    torch.testing.assert_close(d.log_prob(x), -energy.energy(x, t))
    hot = DiffusionEnergy(energy, t, temperature=2.0)
    torch.testing.assert_close(hot.log_prob(x), -energy.energy(x, t) / 2)
    assert d.is_normalized and not hot.is_normalized
    wide = DiffusionEnergy(energy, 0.3).expand((4, 2))
    assert wide.batch_shape == (4, 2) and wide.sample().shape == (4, 2, 3)
    torch.testing.assert_close(wide.log_prob(x[:4]), -energy.energy(x[:4], 0.3))
    assert d.sample((6,)).shape == (6, 2, 3)
    assert d.support is dist.constraints.real_vector and not d.has_rsample


def test_unsampleable_energies_point_to_mcmc():
    net_energy = ScoreNetEnergy(lambda x, t: -x, VPLinear(), "score", dim=2)
    d = DiffusionEnergy(net_energy, 0.5)
    assert not d.is_normalized
    with pytest.raises(NotImplementedError, match="energy_nuts"):
        d.sample()
    hot = DiffusionEnergy(EmpiricalEnergy(torch.randn(3, 2), VPLinear()), 0.5, temperature=0.5)
    with pytest.raises(NotImplementedError, match="temperature other than 1"):
        hot.sample()
    with_sampler = DiffusionEnergy(net_energy, 0.5, sampler=lambda shape: torch.zeros(*shape, 2))
    assert torch.equal(with_sampler.sample((3,)), torch.zeros(3, 2))
    bad_sampler = DiffusionEnergy(net_energy, 0.5, sampler=lambda shape: torch.zeros(3))
    with pytest.raises(ValueError, match="sampler"):
        bad_sampler.sample((3,))

    # plain NUTS(model) would call sample() while initialising; energy_nuts does not
    def model():
        pyro.sample("x", DiffusionEnergy(net_energy, 0.5))

    with pytest.raises(NotImplementedError):
        MCMC(NUTS(model), num_samples=2, warmup_steps=2, disable_progbar=True).run()
    draws = run_nuts(energy_nuts(model, torch.zeros(2)), 20, 20)
    assert draws.shape == (20, 2) and torch.isfinite(draws).all()


def test_factor_pattern_has_the_same_density():
    energy = GaussianEnergy(torch.zeros(3), torch.eye(3) * 2.0, VPLinear())
    x = torch.randn(3)

    def sample_model():
        return pyro.sample("x", DiffusionEnergy(energy, 0.4, temperature=1.5))

    def factored():
        return factor_model(energy, 0.4, temperature=1.5)

    logs = []
    for model in (sample_model, factored):
        trace = poutine.trace(poutine.condition(model, {"x": x})).get_trace()
        logs.append(trace.log_prob_sum())
    torch.testing.assert_close(logs[0], logs[1])
    torch.testing.assert_close(logs[0], -energy.energy(x, 0.4) / 1.5)


def test_potential_fn_and_bad_arguments():
    energy = EmpiricalEnergy(torch.randn(4, 3), VPLinear())
    potential = potential_fn(energy, 0.5, site="z", temperature=2.0)
    x = torch.randn(5, 3)
    torch.testing.assert_close(potential({"z": x}), energy.energy(x, 0.5).sum() / 2)
    with pytest.raises(ValueError, match="expected a parameter named 'z'"):
        potential({"x": x})
    with pytest.raises(ValueError, match="temperature must be positive"):
        DiffusionEnergy(energy, 0.5, temperature=0.0)
    with pytest.raises(TypeError, match="energy must be"):
        DiffusionEnergy("energy", 0.5)
    with pytest.raises(ValueError, match="t must lie in"):
        DiffusionEnergy(energy, 2.0)
    with pytest.raises(TypeError, match="condition must be a pair"):
        DiffusionEnergy(energy, 0.5, condition=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="init_strategy"):
        energy_nuts(lambda: None, torch.zeros(3), init_strategy=None)
    with pytest.raises(TypeError, match="init must be"):
        energy_nuts(lambda: None, [0.0, 0.0])
    d = DiffusionEnergy(energy, 0.5, validate_args=True)
    with pytest.raises(ValueError):
        d.log_prob(torch.randn(2, 4))


def test_float32_distribution():
    energy = EmpiricalEnergy(torch.randn(4, 3).float(), VPLinear().float())
    d = DiffusionEnergy(energy, 0.5)
    assert d.sample((2,)).dtype == torch.float32
    assert d.log_prob(torch.randn(2, 3).float()).dtype == torch.float32
