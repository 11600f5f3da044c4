"""Coverage and SBC tools (design note §2.6) on samplers whose calibration is known exactly."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_ext.infer import coverage, sbc_ranks, sbc_uniformity, simulate_datasets
from pyro_ext.infer.calibration import rank_statistics


def conjugate_model(y=None):
    d = pyro.sample("d", dist.Normal(torch.tensor(0.0), 1.0))
    a = pyro.sample("a", dist.Normal(torch.tensor(0.0), 1.0))
    with pyro.plate("obs", 2):
        return pyro.sample("y", dist.Normal(a + d, 0.5), obs=y)


def exact_sampler(scale: float = 1.0, num: int = 400):
    """Exact posterior of (a, d) given y (a and d are exchangeable): a Gaussian with known covariance.

    With ``scale != 1`` the spread is wrong by that factor, an over- or under-confident sampler.
    """
    prior = torch.eye(2)
    design = torch.ones(2, 2)  # y_i = a + d + noise
    precision = prior + design.T @ design / 0.25
    covariance = torch.linalg.inv(precision)

    def fit(observed):
        y = observed["y"]
        mean = covariance @ (design.T @ y / 0.25)
        draws = dist.MultivariateNormal(mean, covariance * scale**2).sample((num,))
        return {"a": draws[:, 0], "d": draws[:, 1]}

    return fit


@pytest.fixture(scope="module")
def datasets():
    return simulate_datasets(conjugate_model, 300, torch.zeros(2), generator=torch.Generator().manual_seed(0))


def test_simulate_datasets_shapes_and_reproducibility(datasets):
    assert len(datasets) == 300 and datasets.num_dropped == 0
    assert set(datasets.truth) == {"a", "d"} and datasets.observed["y"].shape == (300, 2)
    again = simulate_datasets(
        conjugate_model, 300, torch.zeros(2), generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(again.observed["y"], datasets.observed["y"])
    truth, observed = datasets[3]
    assert truth["a"].shape == () and observed["y"].shape == (2,)
    # the data really come from the prior: Var(y_i) = 1 + 1 + 0.25; SE of a variance from 600 draws ~ 6 %
    assert abs(datasets.observed["y"].var().item() / 2.25 - 1) < 0.2
    with pytest.raises(ValueError, match="observes no site"):
        simulate_datasets(conjugate_model, 3)
    named = simulate_datasets(conjugate_model, 3, observed_sites=["y"])
    assert named.observed["y"].shape == (3, 2)


def test_coverage_of_the_exact_posterior_is_nominal(datasets):
    pyro.set_rng_seed(1)
    result = coverage(exact_sampler(), datasets, sites=["a", "d"], levels=(0.5, 0.9))
    for level in (0.5, 0.9):
        # 600 indicators; binomial SE at 0.9 is 0.012 (pairs a, d within a data set are correlated, so
        # allow 4 SE)
        assert abs(result.coverage[level] - level) < 4 * result.standard_error[level] + 0.01
    assert result.covered[0.9].shape == (300, 2)
    assert result.per_site["a"][0.9] > 0.8 and result.mean_width[0.9] > result.mean_width[0.5]


def test_masks_select_elements():
    def vector_model(y=None):
        c = pyro.sample("c", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        return pyro.sample("y", dist.Normal(c, 1.0).to_event(1), obs=y)

    data = simulate_datasets(vector_model, 20, torch.zeros(3), generator=torch.Generator().manual_seed(1))

    def sampler(observed):  # right on elements 0 and 1, absurdly wrong on element 2
        draws = dist.Normal(observed["y"] / 2, math.sqrt(0.5)).sample((200,))
        draws[:, 2] = 100.0
        return {"c": draws}

    mask = torch.tensor([True, True, False])
    result = coverage(sampler, data, sites=["c"], levels=(0.9,), masks={"c": mask})
    assert result.covered[0.9].shape == (20, 2) and result.coverage[0.9] > 0.7
    assert coverage(sampler, data, sites=["c"], levels=(0.9,)).coverage[0.9] < 0.7
    ranks = sbc_ranks(sampler, data, sites=["c"], num_posterior_samples=99, masks={"c": mask})
    assert ranks["c"].shape == (20, 2)
    with pytest.raises(ValueError, match="shape"):
        coverage(sampler, data, sites=["c"], masks={"c": torch.ones(2, dtype=torch.bool)})


@pytest.mark.parametrize("scale, direction", [(0.5, -1), (2.0, 1)])
def test_coverage_detects_miscalibration(datasets, scale, direction):
    result = coverage(exact_sampler(scale), datasets, sites=["a"], levels=(0.9,))
    # 90% interval of a sampler with sd scaled by s covers with probability 2 Phi(1.645 s) - 1
    expected = math.erf(1.6449 * scale / math.sqrt(2))
    assert abs(result.coverage[0.9] - expected) < 0.06
    assert direction * (result.coverage[0.9] - 0.9) > 0


def test_sbc_ranks_uniform_for_the_exact_posterior(datasets):
    pyro.set_rng_seed(2)
    ranks = sbc_ranks(exact_sampler(num=99), datasets, sites=["a", "d"], num_posterior_samples=99)
    assert ranks["a"].shape == (300, 1) and ranks["a"].min() >= 0 and ranks["a"].max() <= 99
    assert sbc_uniformity(ranks, 99).p_value > 0.01


def test_sbc_detects_overconfidence(datasets):
    pyro.set_rng_seed(3)
    ranks = sbc_ranks(exact_sampler(0.5, num=99), datasets, sites=["a", "d"], num_posterior_samples=99)
    result = sbc_uniformity(ranks, 99)
    assert result.p_value < 1e-6  # U-shaped histogram
    assert result.histogram[0] + result.histogram[-1] > 4 * result.histogram.mean()


def test_rank_statistics_breaks_ties_at_random():
    truth = torch.ones(20_000, dtype=torch.long)
    draws = torch.ones(4, 20_000, dtype=torch.long)  # every draw ties with the truth
    ranks = rank_statistics(truth, draws, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(ranks.reshape(-1), minlength=5).double()
    # uniform on 0..4: 4000 each, SE sqrt(4000 * 0.8) = 57
    assert (counts - 4000).abs().max() < 300


def test_sbc_uniformity_chi_squared_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    ranks = torch.randint(0, 100, (1000,), generator=torch.Generator().manual_seed(4))
    result = sbc_uniformity(ranks, 99, num_bins=10)
    statistic, p_value = scipy_stats.chisquare(result.histogram.numpy())
    assert abs(result.statistic - statistic) < 1e-9
    assert abs(result.p_value - p_value) < 1e-9
    with pytest.raises(ValueError, match="divide"):
        sbc_uniformity(ranks, 99, num_bins=7)
    with pytest.raises(ValueError, match="0..99"):
        sbc_uniformity(torch.tensor([100]), 99)


def test_bad_sampler_output_raises(datasets):
    with pytest.raises(ValueError, match="no draws for site 'a'"):
        coverage(lambda observed: {"d": torch.zeros(10)}, datasets, sites=["a"])
    with pytest.raises(ValueError, match="shape"):
        coverage(lambda observed: {"a": torch.zeros(10, 3)}, datasets, sites=["a"])
    with pytest.raises(ValueError, match="ground truth"):
        coverage(lambda observed: {}, datasets, sites=["b"])
    with pytest.raises(ValueError, match="levels"):
        coverage(exact_sampler(), datasets, sites=["a"], levels=(1.5,))
    with pytest.raises(ValueError, match="num_posterior_samples"):
        sbc_ranks(exact_sampler(num=10), datasets, sites=["a"], num_posterior_samples=99)
