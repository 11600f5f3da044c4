"""Acceptance checks 2 (score), 3 (Jacobian), 11 (conservativeness) and the energies' part of 13 (hygiene)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from pyro_ext.diffusion.energy import (
    ConditionedEnergy,
    EmpiricalEnergy,
    GaussianEnergy,
    GaussianMixtureEnergy,
    ScoreNetEnergy,
)
from pyro_ext.diffusion.schedules import VEVariance, VPLinear
from pyro_ext.testing import ModuleTestMixin

EPS64 = torch.finfo(torch.float64).eps


def reference_energy(patterns, log_weights, schedule, x, t):
    """-log p_t written directly (the test's independent reference): logsumexp of Gaussian log-densities."""
    t = torch.as_tensor(t, dtype=x.dtype)
    alpha, sigma2 = schedule.alpha(t)[..., None], schedule.sigma(t)[..., None] ** 2
    sq = ((x[..., None, :] - alpha[..., None] * patterns) ** 2).sum(-1)
    log_normal = -sq / (2 * sigma2) - 0.5 * patterns.shape[1] * torch.log(2 * math.pi * sigma2)
    return -torch.logsumexp(log_weights + log_normal, -1)


@pytest.fixture
def small():
    """N = 7 patterns in d = 20 (check 2's sizes) with non-uniform weights."""
    patterns = torch.randn(7, 20)
    weights = torch.rand(7) + 0.1
    return patterns, weights


SCHEDULES = {"vp": VPLinear, "ve": lambda: VEVariance(t_max=4.0)}


# ---------------------------------------------------------------------------------------- check 2
@pytest.mark.parametrize("schedule_name", SCHEDULES)
def test_energy_and_score_match_autograd_of_reference(small, schedule_name):
    patterns, weights = small
    schedule = SCHEDULES[schedule_name]()
    energy = EmpiricalEnergy(patterns, schedule, weights)
    t = torch.tensor([0.02, 0.1, 0.3, 0.6, 0.9, 1.0]) * (schedule.t_max if schedule_name == "ve" else 1.0)
    x = schedule.alpha(t)[:, None] * patterns[torch.arange(6) % 7] + schedule.sigma(t)[:, None] * torch.randn(
        6, 20
    )
    x.requires_grad_(True)
    expected = reference_energy(patterns, energy.log_weights, schedule, x, t)
    (grad,) = torch.autograd.grad(expected.sum(), x)
    sigma2 = schedule.sigma(t) ** 2
    with torch.no_grad():
        torch.testing.assert_close(energy.energy(x, t), expected, rtol=1e-12, atol=1e-10)
        # check 2: score = -grad E to 1e-10 / sigma^2 (absolute, per row)
        error = (energy.score(x.detach(), t) + grad).abs().amax(-1)
        assert (error * sigma2 < 1e-10).all(), (error * sigma2).max()
        e, s = energy.energy_and_score(x, t)
        torch.testing.assert_close(e, energy.energy(x, t), rtol=0, atol=0)
        torch.testing.assert_close(s, energy.score(x, t), rtol=0, atol=0)
    # the energy's own autograd gradient is the closed-form score
    (own,) = torch.autograd.grad(energy.energy(x, t).sum(), x)
    torch.testing.assert_close(-own, energy.score(x.detach(), t), rtol=0, atol=0)


def test_chunked_equals_unchunked(small):
    patterns, weights = small
    schedule = VPLinear()
    whole = EmpiricalEnergy(patterns, schedule, weights)
    chunked = EmpiricalEnergy(patterns, schedule, weights, chunk_size=3)
    tiny_budget = EmpiricalEnergy(patterns, schedule, weights, memory_budget=64)  # splits rows and patterns
    x, t = torch.randn(9, 20), torch.rand(9) * 0.9 + 0.05
    for other in (chunked, tiny_budget):
        # check 2: chunk = 3 equals unchunked to 1e-12
        torch.testing.assert_close(other.energy(x, t), whole.energy(x, t), rtol=0, atol=1e-12)
        torch.testing.assert_close(other.score(x, t), whole.score(x, t), rtol=0, atol=1e-12)
        torch.testing.assert_close(
            other.posterior_weights(x, t), whole.posterior_weights(x, t), rtol=0, atol=1e-12
        )
        torch.testing.assert_close(other.score_jacobian(x, t), whole.score_jacobian(x, t), rtol=0, atol=1e-12)
        torch.testing.assert_close(
            other.posterior_topk(x, t, 4)[0], whole.posterior_topk(x, t, 4)[0], rtol=0, atol=1e-12
        )


def test_float32_matches_float64(small):
    patterns, weights = small
    energy64 = EmpiricalEnergy(patterns, VPLinear(), weights)
    energy32 = EmpiricalEnergy(patterns.float(), VPLinear().float(), weights.float())
    t = torch.linspace(0.1, 1.0, 8)
    assert (VPLinear().sigma(t) >= 0.1).all()
    x = torch.randn(8, 20)
    for method in ("energy", "score", "denoise"):
        single = getattr(energy32, method)(x.float(), t.float())
        assert single.dtype == torch.float32
        double = getattr(energy64, method)(x, t)
        # check 2: float32 equals float64 to 1e-4 relative for sigma >= 0.1
        torch.testing.assert_close(single.double(), double, rtol=1e-4, atol=1e-4 * double.abs().max().item())
    # a float64 input to a float32 energy is computed in float32 and returned as float64
    assert energy32.score(x, t).dtype == torch.float64


def test_density_integrates_to_one_in_1d_and_2d():
    schedule = VPLinear()
    t = 0.3  # sigma ~ 0.55: the density is smooth on the grid below
    for d, step in ((1, 0.01), (2, 0.04)):
        energy = EmpiricalEnergy(torch.rand(5, d) * 2 - 1, schedule, torch.rand(5) + 0.5)
        axis = torch.arange(-7.0, 7.0 + step / 2, step)
        grid = torch.stack(torch.meshgrid(*[axis] * d, indexing="ij"), -1).reshape(-1, d)
        # trapezoid rule on a smooth, rapidly decaying integrand: spectrally accurate; tails beyond
        # |x| = 7 (> 10 sigma from every mode) are below 1e-20
        total = torch.exp(-energy.energy(grid, t)).sum() * step**d
        assert abs(float(total) - 1.0) < 1e-8, float(total)


def test_per_sample_times_broadcast(small):
    patterns, weights = small
    energy = EmpiricalEnergy(patterns, VPLinear(), weights)
    x, t = torch.randn(4, 3, 20), torch.rand(3) * 0.8 + 0.1
    batched = energy.energy(x, t)
    assert batched.shape == (4, 3)
    one_by_one = torch.stack(
        [torch.stack([energy.energy(x[i, j], float(t[j])) for j in range(3)]) for i in range(4)]
    )
    torch.testing.assert_close(batched, one_by_one, rtol=1e-13, atol=1e-12)
    # x of shape [d] against a vector of times gives one energy per time
    assert energy.energy(x[0, 0], t).shape == (3,)
    assert energy.score(x[0, 0], t).shape == (3, 20)


def test_refinement_repairs_float32_cancellation():
    # Large pattern norms at small sigma: float32 expanded logits lose ~ eps |x||y| / sigma^2 absolutely.
    schedule = VEVariance()
    patterns = 30.0 * torch.randn(50, 16)
    t = 0.05**2
    x = patterns[:4] + 0.05 * torch.randn(4, 16)
    exact = EmpiricalEnergy(patterns, schedule)
    refined = EmpiricalEnergy(patterns.float(), VEVariance().float())
    raw = EmpiricalEnergy(patterns.float(), VEVariance().float(), refine_topk=0)
    reference = exact.energy(x, t)
    error_refined = (refined.energy(x.float(), t).double() - reference).abs().max()
    error_raw = (raw.energy(x.float(), t).double() - reference).abs().max()
    # estimated logit error u * |x| |y| / sigma^2 ~ 6e-8 * 120 * 120 / 2.5e-3 ~ 0.3; refined rows use direct
    # logits, whose error is u * |x - alpha y|^2 / sigma^2 ~ 1e-6
    assert error_raw > 1e-2
    assert error_refined < 1e-3
    score_error = (refined.score(x.float(), t).double() - exact.score(x, t)).abs().max()
    assert score_error < 1e-3 * exact.score(x, t).abs().max() + 1e-3 / 0.05**2


def test_zero_weights_and_subnormal_guard():
    patterns = torch.randn(6, 3)
    weights = torch.tensor([0.0, 1.0, 0.0, 2.0, 1.0, 0.0])
    energy = EmpiricalEnergy(
        patterns, VPLinear(), weights, chunk_size=2
    )  # the first chunk is half zero-weight
    x = torch.randn(5, 3)
    w = energy.posterior_weights(x, 0.4)
    assert (w[:, weights == 0] == 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(5))
    kept = EmpiricalEnergy(patterns[weights > 0], VPLinear(), weights[weights > 0])
    torch.testing.assert_close(energy.energy(x, 0.4), kept.energy(x, 0.4), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(energy.score(x, 0.4), kept.score(x, 0.4), rtol=1e-13, atol=1e-13)
    # far-apart modes in float32: most probabilities underflow; results stay finite and exact
    far = EmpiricalEnergy(
        (torch.arange(4.0)[:, None] * 10).float().expand(4, 2).contiguous(), VEVariance().float()
    )
    out = far.score(torch.tensor([[0.1, 0.2], [19.0, 21.0]]), 0.01)
    assert torch.isfinite(out).all()


def test_posterior_weights_topk_and_denoise(small):
    patterns, weights = small
    energy = EmpiricalEnergy(patterns, VPLinear(), weights)
    x, t = torch.randn(5, 20), 0.4
    alpha, sigma2 = energy.schedule.alpha(t), energy.schedule.sigma(t) ** 2
    logits = (
        energy.log_weights + alpha / sigma2 * x @ patterns.T - alpha**2 / (2 * sigma2) * (patterns**2).sum(-1)
    )
    expected = torch.softmax(logits, -1)
    torch.testing.assert_close(energy.posterior_weights(x, t), expected, rtol=1e-12, atol=1e-15)
    top_w, top_i = energy.posterior_topk(x, t, 3)
    ref_w, ref_i = expected.topk(3, -1)
    assert torch.equal(top_i, ref_i)
    torch.testing.assert_close(top_w, ref_w, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(energy.denoise(x, t), expected @ patterns, rtol=1e-12, atol=1e-12)
    # Tweedie: denoise = (x + sigma^2 score) / alpha
    torch.testing.assert_close(
        energy.denoise(x, t), (x + sigma2 * energy.score(x, t)) / alpha, rtol=1e-10, atol=1e-12
    )
    assert energy.hopfield_beta(t) == pytest.approx(float(alpha**2 / sigma2))


# ---------------------------------------------------------------------------------------- check 3
@pytest.mark.parametrize("t", [0.02, 0.15, 0.5])
def test_jacobian_matches_finite_differences_and_jacrev(small, t):
    patterns, weights = small
    energy = EmpiricalEnergy(patterns, VPLinear(), weights)
    alpha, sigma = energy.schedule.alpha(t), energy.schedule.sigma(t)
    x = alpha * patterns[:4] + sigma * torch.randn(4, 20)
    jac = energy.score_jacobian(x, t)
    assert torch.equal(jac, jac.transpose(-1, -2))  # check 3: exactly symmetric
    # central differences, h = 1e-6: rounding ~ eps |s| / h ~ 1e-10 / sigma^2, truncation ~ h^2 / sigma^4
    h = 1e-6
    eye = torch.eye(20)
    fd = torch.stack(
        [(energy.score(x + h * eye[j], t) - energy.score(x - h * eye[j], t)) / (2 * h) for j in range(20)], -1
    )
    assert (fd - jac).abs().max() < 1e-7 / sigma**2  # check 3
    ref = torch.func.vmap(
        torch.func.hessian(lambda xi: -reference_energy(patterns, energy.log_weights, energy.schedule, xi, t))
    )(x)
    auto = torch.func.vmap(torch.func.jacrev(lambda xi: energy.score(xi, t)))(x)
    scale = jac.abs().max()
    # check 3: equal to vmap(jacrev(score)) to 1e-12 (relative to the Jacobian's scale 1/sigma^2)
    assert (auto - jac).abs().max() < 1e-12 * scale
    assert (ref - jac).abs().max() < 1e-12 * scale


def test_dense_and_sparse_routes_agree(small):
    patterns, weights = small
    energy = EmpiricalEnergy(patterns, VPLinear(), weights)
    for t in (0.05, 0.3, 0.9):
        x = torch.randn(6, 20)
        dense = energy.score_jacobian(x, t, route="dense")
        sparse = energy.score_jacobian(x, t, route="sparse")
        alpha, sigma2 = energy.schedule.alpha(t), energy.schedule.sigma(t) ** 2
        # the dense route's S2 - m m^T cancels: absolute error ~ N u max|y|^2, scaled by alpha^2 / sigma^4
        bound = 64 * EPS64 * (patterns**2).sum(-1).max() * alpha**2 / sigma2**2
        assert (dense - sparse).abs().max() < bound
        inverse, z = energy.score_jacobian(x, t, structured=True)
        assert z.shape[-2] <= 7
        rebuilt = inverse[:, None, None] * torch.eye(20) + z.transpose(-1, -2) @ z
        torch.testing.assert_close(rebuilt, sparse, rtol=0, atol=1e-10 * float(sparse.abs().max()))


def test_jacobian_routes_with_large_support():
    # N = 200 patterns at large t: supports exceed 64, so auto takes the dense route; forced sparse agrees
    patterns = torch.randn(200, 5)
    energy = EmpiricalEnergy(patterns, VPLinear(), chunk_size=64)
    x, t = torch.randn(3, 5), 0.8
    auto = energy.score_jacobian(x, t)
    sparse = energy.score_jacobian(x, t, route="sparse")
    torch.testing.assert_close(auto, sparse, rtol=1e-10, atol=1e-10)
    ref = torch.func.vmap(torch.func.jacrev(lambda xi: energy.score(xi, t)))(x)
    torch.testing.assert_close(auto, ref, rtol=1e-10, atol=1e-10)
    inverse, z = energy.score_jacobian(x, t, structured=True)
    assert z.shape == (3, 5, 5)  # support > d: the d x d square-root factor
    torch.testing.assert_close(inverse[:, None, None] * torch.eye(5) + z.mT @ z, auto, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------- Gaussian energies
def random_cov(d, rank=None):
    factor = torch.randn(d, rank or d)
    return factor @ factor.T / d + (0.0 if rank else 0.1) * torch.eye(d)


@pytest.mark.parametrize("low_rank", [False, True])
def test_gaussian_energy_is_exact(low_rank):
    d = 5
    mean = torch.randn(d)
    schedule = VPLinear()
    if low_rank:
        factor, values, noise = torch.randn(d, 2), torch.rand(2) + 0.5, 0.05
        cov_arg = (factor, values, noise)
        cov = factor @ torch.diag(values) @ factor.T + noise * torch.eye(d)
    else:
        cov = random_cov(d)
        cov_arg = cov
    energy = GaussianEnergy(mean, cov_arg, schedule)
    torch.testing.assert_close(energy.covariance, cov, rtol=1e-12, atol=1e-12)
    t = torch.tensor([0.1, 0.4, 0.9])
    x = torch.randn(3, d).requires_grad_(True)
    alpha, sigma2 = schedule.alpha(t), schedule.sigma(t) ** 2
    c_t = alpha[:, None, None] ** 2 * cov + sigma2[:, None, None] * torch.eye(d)
    reference = -MultivariateNormal(alpha[:, None] * mean, c_t).log_prob(x)
    (grad,) = torch.autograd.grad(reference.sum(), x)
    x = x.detach()
    torch.testing.assert_close(energy.energy(x, t), reference.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(energy.score(x, t), -grad, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(energy.score_jacobian(x, t), -torch.linalg.inv(c_t), rtol=1e-11, atol=1e-11)
    expected_x0 = (
        mean
        + alpha[:, None] * (cov @ torch.linalg.solve(c_t, (x - alpha[:, None] * mean)[..., None]))[..., 0]
    )
    torch.testing.assert_close(energy.denoise(x, t), expected_x0, rtol=1e-11, atol=1e-11)
    # a scalar t takes the fused single-GEMM path: same as the per-sample path
    torch.testing.assert_close(
        energy.score(x, 0.4), energy.score(x, torch.full((3,), 0.4)), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(energy.score(x[1], 0.4), -grad[1], rtol=1e-11, atol=1e-11)
    marginal = energy.marginal(0.4)
    torch.testing.assert_close(marginal.covariance_matrix, c_t[1], rtol=1e-12, atol=1e-12)
    samples = energy.sample(20000, 0.4, generator=torch.Generator().manual_seed(0))
    # sample covariance: standard error ~ |C| sqrt(2/n) ~ 0.01 |C|
    assert (torch.cov(samples.T) - c_t[1]).abs().max() < 0.05 * c_t[1].abs().max()


def test_gaussian_mixture_energy_is_exact():
    schedule = VPLinear()
    means = torch.randn(3, 2)
    covs = torch.stack([random_cov(2) for _ in range(3)])
    weights = torch.tensor([0.2, 0.5, 0.3])
    energy = GaussianMixtureEnergy(means, covs, weights, schedule)
    t = torch.tensor([0.05, 0.3, 0.7, 1.0])
    x = torch.randn(4, 2).requires_grad_(True)
    alpha, sigma2 = schedule.alpha(t), schedule.sigma(t) ** 2
    comps = MultivariateNormal(
        alpha[:, None, None] * means,
        alpha[:, None, None, None] ** 2 * covs + sigma2[:, None, None, None] * torch.eye(2),
    )
    reference = -torch.logsumexp(weights.log() + comps.log_prob(x[:, None, :]), -1)
    (grad,) = torch.autograd.grad(reference.sum(), x)
    x = x.detach()
    torch.testing.assert_close(energy.energy(x, t), reference.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(energy.score(x, t), -grad, rtol=1e-11, atol=1e-11)
    jac = energy.score_jacobian(x, t)
    auto = torch.func.vmap(torch.func.jacrev(lambda xi, ti: energy.score(xi, ti)))(x, t)
    torch.testing.assert_close(jac, auto, rtol=1e-11, atol=1e-11)
    tweedie = (x + sigma2[:, None] * energy.score(x, t)) / alpha[:, None]
    torch.testing.assert_close(energy.denoise(x, t), tweedie, rtol=1e-10, atol=1e-10)
    isotropic = GaussianMixtureEnergy(means, 0.01, schedule=schedule)
    torch.testing.assert_close(isotropic.covs, 0.01 * torch.eye(2).expand(3, 2, 2))
    samples = energy.sample(40000, 0.3, generator=torch.Generator().manual_seed(1))
    expected_mean = alpha[1] * (weights @ means)
    # standard error of the mean ~ sqrt(var / n) ~ 0.01
    assert (samples.mean(0) - expected_mean).abs().max() < 0.03


# ---------------------------------------------------------------------------------------- conditioning
def test_conditioned_energy_is_the_joint_on_free_coordinates(small):
    patterns, weights = small
    energy = EmpiricalEnergy(patterns, VPLinear(), weights)
    mask = torch.zeros(20, dtype=torch.bool)
    mask[[0, 3, 7]] = True
    value = torch.randn(3)
    conditioned = energy.condition(mask, value)
    assert isinstance(conditioned, ConditionedEnergy) and conditioned.dim == 17 and conditioned.exact
    free = torch.randn(4, 17)
    full = torch.empty(4, 20)
    full[:, mask], full[:, ~mask] = value, free
    torch.testing.assert_close(conditioned.assemble(free), full)
    torch.testing.assert_close(conditioned.energy(free, 0.5), energy.energy(full, 0.5))
    torch.testing.assert_close(conditioned.score(free, 0.5), energy.score(full, 0.5)[:, ~mask])
    jac = conditioned.score_jacobian(free, 0.5)
    torch.testing.assert_close(jac, energy.score_jacobian(full, 0.5)[:, ~mask][:, :, ~mask])
    # a full-length value is accepted (its masked entries are used)
    same = energy.condition(mask, full[0])
    torch.testing.assert_close(same.energy(free, 0.5), conditioned.energy(free, 0.5))


def test_conditional_samples_are_exact():
    schedule = VEVariance()
    patterns = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    energy = EmpiricalEnergy(patterns, schedule)
    mask = torch.tensor([True, False, False])
    conditioned = energy.condition(mask, torch.tensor([0.5]))
    draws = conditioned.sample(40000, 1.0, generator=torch.Generator().manual_seed(0))
    w1 = 1 / (1 + math.exp(-1.0))  # P(i = 1 | x_o = 0.5) = sigmoid(2 * 0.5 / sigma^2)
    # mean of the free coordinates: 2 w1 - 1; standard error ~ sqrt(1 + ...) / 200 ~ 0.007
    assert (draws.mean(0) - (2 * w1 - 1)).abs().max() < 0.03
    gaussian = GaussianEnergy(torch.zeros(3), random_cov(3), VPLinear())
    cond = gaussian.condition(mask, torch.tensor([0.3]))
    samples = cond.sample(40000, 0.5, generator=torch.Generator().manual_seed(2))
    # exactness: the conditional's energy is the joint minus a constant, so the sample mean of the score is 0
    assert cond.score(samples, 0.5).mean(0).abs().max() < 0.05
    mixture = GaussianMixtureEnergy(torch.randn(2, 3), 0.05, schedule=VPLinear())
    samples = mixture.condition(mask, torch.tensor([0.3])).sample(
        20000, 0.3, generator=torch.Generator().manual_seed(3)
    )
    assert mixture.condition(mask, torch.tensor([0.3])).score(samples, 0.3).mean(0).abs().max() < 0.1


# ----------------------------------------------------------------------------------------- check 11
class EnergyMLP(torch.nn.Module):
    def __init__(self, d, hidden=32, scalar=True):
        super().__init__()
        self.dim = d
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(d + 1, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
            torch.nn.Linear(hidden, 1 if scalar else d),
        )  # fmt: skip
        self.scalar = scalar

    def forward(self, x, t):
        out = self.layers(torch.cat([x, t[..., None]], -1))
        return out[..., 0] if self.scalar else out


def test_exact_energies_are_conservative(small):
    patterns, weights = small
    schedule = VPLinear()
    x = torch.randn(4, 20)
    energies = [
        EmpiricalEnergy(patterns, schedule, weights),
        GaussianEnergy(torch.randn(20), random_cov(20), schedule),
        GaussianMixtureEnergy(torch.randn(3, 20), 0.2, schedule=schedule),
    ]
    for exact in energies:
        wrapped = ScoreNetEnergy(exact.score, schedule, "score", dim=20)
        # check 11: asymmetry <= 1e-12 for exact energies (closed form and autograd Jacobian of the score)
        jac = exact.score_jacobian(x, 0.3)
        closed = torch.linalg.matrix_norm(jac - jac.mT) / torch.linalg.matrix_norm(jac)
        assert closed.max() <= 1e-12
        assert wrapped.asymmetry(x, 0.3).max() <= 1e-12
        assert wrapped.asymmetry_hutchinson(x, 0.3).max() <= 1e-12
        assert wrapped.loop_residual(x, 0.3).abs().max() <= 1e-12


def test_energy_mlp_is_conservative():
    net = EnergyMLP(6)
    energy = ScoreNetEnergy(net, VPLinear(), "energy")
    x, t = torch.randn(5, 6), torch.rand(5) * 0.8 + 0.1
    assert energy.asymmetry(x, t).max() <= 1e-10  # check 11
    assert energy.asymmetry_hutchinson(x, t).max() <= 1e-10
    # the score of an energy net is minus its autograd gradient
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(net(xg, t).sum(), xg)
    torch.testing.assert_close(energy.score(x, t), -grad)
    torch.testing.assert_close(energy.energy(x, t), net(x, t))


@pytest.mark.parametrize("reference", [False, True])
def test_line_integral_of_exact_score_matches_energy_differences(small, reference):
    patterns, weights = small
    schedule = VPLinear()
    exact = EmpiricalEnergy(patterns, schedule, weights)
    ref = patterns.mean(0) if reference else None
    line = ScoreNetEnergy(exact.score, schedule, "score", reference=ref, dim=20)
    t = torch.tensor([0.3, 0.5, 0.8, 1.0])
    x = schedule.alpha(t)[:, None] * patterns[:4] + schedule.sigma(t)[:, None] * torch.randn(4, 20)
    start = line.line_start(x, t)
    # check 11: E_line(x) = E(x) - E(x_ref) to 1e-8
    expected = exact.energy(x, t) - exact.energy(start, t)
    torch.testing.assert_close(line.energy(x, t), expected, rtol=0, atol=1e-8)
    # eps parametrisation of the same field integrates to the same energy
    sigma = lambda s: schedule.sigma(s)[..., None]  # noqa: E731
    eps_line = ScoreNetEnergy(
        lambda y, s: -sigma(s) * exact.score(y, s), schedule, "eps", reference=ref, dim=20
    )
    torch.testing.assert_close(eps_line.energy(x, t), expected, rtol=0, atol=1e-8)


def test_untrained_eps_mlp_asymmetry_is_detected():
    torch.manual_seed(0)
    net = EnergyMLP(6, scalar=False)
    energy = ScoreNetEnergy(net, VPLinear(), "eps")
    x, t = torch.randn(8, 6), 0.5
    # check 11: a generic (non-gradient) field has an O(1) asymmetric Jacobian part
    assert energy.asymmetry(x, t).min() > 1e-2
    assert energy.asymmetry_hutchinson(x, t, probes=16).min() > 1e-2
    assert energy.loop_residual(x, t, radius=0.5).abs().max() > 1e-4
    scored = ScoreNetEnergy(net, VPLinear(), "eps", gradient="score")
    with pytest.warns(RuntimeWarning, match="asymmetric"):
        scored.energy(x.requires_grad_(True), t)


def test_score_gradient_mode_returns_minus_score():
    patterns = torch.randn(5, 3)
    exact = EmpiricalEnergy(patterns, VPLinear())
    energy = ScoreNetEnergy(exact.score, VPLinear(), "score", gradient="score", dim=3)
    x = torch.randn(4, 3, requires_grad=True)
    (grad,) = torch.autograd.grad(energy.energy(x, 0.4).sum(), x)
    torch.testing.assert_close(-grad, exact.score(x.detach(), 0.4))
    exact_mode = ScoreNetEnergy(exact.score, VPLinear(), "score", dim=3)
    (grad_exact,) = torch.autograd.grad(exact_mode.energy(x, 0.4).sum(), x)
    # differentiating the 32-node quadrature of a conservative field reproduces the score to ~1e-12
    torch.testing.assert_close(grad_exact, grad, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------------------- check 13
def test_bad_inputs_raise_clear_errors(small):
    patterns, weights = small
    schedule = VPLinear()
    with pytest.raises(ValueError, match="patterns must be finite"):
        EmpiricalEnergy(torch.tensor([[0.0, float("nan")]]), schedule)
    with pytest.raises(ValueError, match=r"patterns must have shape \[N, d\]"):
        EmpiricalEnergy(torch.randn(5), schedule)
    with pytest.raises(TypeError, match="patterns must be a floating-point"):
        EmpiricalEnergy(torch.ones(3, 2, dtype=torch.long), schedule)
    with pytest.raises(ValueError, match="weights must be non-negative"):
        EmpiricalEnergy(patterns, schedule, -weights)
    with pytest.raises(ValueError, match=r"weights must be a tensor of shape \[7\]"):
        EmpiricalEnergy(patterns, schedule, weights[:3])
    with pytest.raises(TypeError, match="schedule must be"):
        EmpiricalEnergy(patterns, "vp")
    energy = EmpiricalEnergy(patterns, schedule, weights)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 20\]"):
        energy.energy(torch.randn(3, 19), 0.5)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        energy.score([0.0] * 20, 0.5)
    with pytest.raises(ValueError, match="t must lie in"):
        energy.score(torch.randn(3, 20), 1.5)
    with pytest.raises(ValueError, match="does not broadcast"):
        energy.score(torch.randn(3, 20), torch.full((4,), 0.5))
    with pytest.raises(ValueError, match=r"sigma\(t\) = 0"):
        energy.energy(torch.randn(3, 20), 0.0)
    with pytest.raises(ValueError, match="route must be"):
        energy.score_jacobian(torch.randn(3, 20), 0.5, route="fast")
    with pytest.raises(ValueError, match="k must be an int"):
        energy.posterior_topk(torch.randn(3, 20), 0.5, 8)
    with pytest.raises(ValueError, match="mask must be a boolean tensor"):
        energy.condition(torch.ones(20), torch.zeros(20))
    with pytest.raises(ValueError, match="value must have shape"):
        energy.condition(torch.arange(20) < 3, torch.zeros(4))
    with pytest.raises(ValueError, match="cov must be positive semi-definite"):
        GaussianEnergy(torch.zeros(2), torch.tensor([[1.0, 0.0], [0.0, -1.0]]), schedule)
    with pytest.raises(ValueError, match="covs must be a float or have shape"):
        GaussianMixtureEnergy(torch.zeros(3, 2), torch.ones(2, 2, 2), schedule=schedule)
    with pytest.raises(ValueError, match="param must be one of"):
        ScoreNetEnergy(lambda x, t: x, schedule, "noise", dim=2)
    with pytest.raises(ValueError, match="pass dim=d"):
        ScoreNetEnergy(lambda x, t: x, schedule, "score")
    bad_net = ScoreNetEnergy(lambda x, t: x[:, :1], schedule, "eps", dim=2)
    with pytest.raises(ValueError, match="must return a tensor of shape"):
        bad_net.score(torch.randn(3, 2), 0.5)
    with pytest.raises(NotImplementedError, match="potential_fn"):
        ScoreNetEnergy(lambda x, t: x, schedule, "score", dim=2).sample(3, 0.5)


def test_generator_reproducibility(small):
    patterns, weights = small
    for energy in (
        EmpiricalEnergy(patterns, VPLinear(), weights),
        GaussianEnergy(torch.zeros(3), random_cov(3), VPLinear()),
        GaussianMixtureEnergy(torch.randn(3, 2), 0.1, schedule=VPLinear()),
    ):
        first = energy.sample((5, 2), torch.tensor([0.2, 0.6]), generator=torch.Generator().manual_seed(7))
        again = energy.sample((5, 2), torch.tensor([0.2, 0.6]), generator=torch.Generator().manual_seed(7))
        other = energy.sample((5, 2), torch.tensor([0.2, 0.6]), generator=torch.Generator().manual_seed(8))
        assert first.shape == (5, 2, 2, energy.dim)
        assert torch.equal(first, again) and not torch.equal(first, other)
    x = torch.randn(4, 6)
    estimate = ScoreNetEnergy(EnergyMLP(6, scalar=False), VPLinear(), "eps")
    a = estimate.asymmetry_hutchinson(x, 0.5, generator=torch.Generator().manual_seed(1))
    b = estimate.asymmetry_hutchinson(x, 0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_empirical_sample_has_the_right_moments():
    patterns = torch.tensor([[2.0, 0.0], [-2.0, 0.0]])
    energy = EmpiricalEnergy(patterns, VPLinear(), torch.tensor([0.25, 0.75]))
    samples = energy.sample(40000, 0.5, generator=torch.Generator().manual_seed(3))
    alpha, sigma2 = energy.schedule.alpha(0.5), energy.schedule.sigma(0.5) ** 2
    expected_mean = alpha * torch.tensor([-1.0, 0.0])
    expected_var = torch.tensor([alpha**2 * 4 * (1 - 0.25) * 0.25 * 4 + sigma2, sigma2])
    # standard errors ~ sqrt(var / n) < 0.01 for the mean, ~ var sqrt(2 / n) < 0.02 for the variance
    assert (samples.mean(0) - expected_mean).abs().max() < 0.04
    assert (samples.var(0) - expected_var).abs().max() < 0.06


# --------------------------------------------------------------------------------- module hygiene
class TestEmpiricalEnergyModule(ModuleTestMixin):
    def make_module(self):
        return EmpiricalEnergy(torch.randn(9, 4), VPLinear(), torch.rand(9) + 0.1, chunk_size=4)

    def make_inputs(self):
        return torch.randn(5, 4), torch.tensor([0.2, 0.3, 0.5, 0.7, 0.9])

    def evaluate(self, module, inputs):
        x, t = inputs
        return module.energy(x, t), module.score(x, t), module.score_jacobian(x, t)


class TestGaussianEnergyModule(ModuleTestMixin):
    def make_module(self):
        return GaussianEnergy(torch.randn(3), random_cov(3), VPLinear())

    def make_inputs(self):
        return torch.randn(5, 3), torch.tensor([0.2, 0.3, 0.5, 0.7, 0.9])

    def evaluate(self, module, inputs):
        x, t = inputs
        return module.energy(x, t), module.score(x, t), module.denoise(x, t)


class TestGaussianMixtureEnergyModule(ModuleTestMixin):
    def make_module(self):
        return GaussianMixtureEnergy(torch.randn(4, 2), torch.rand(4) + 0.1, torch.rand(4) + 0.1, VPLinear())

    def make_inputs(self):
        return torch.randn(5, 2), torch.tensor([0.2, 0.3, 0.5, 0.7, 0.9])

    def evaluate(self, module, inputs):
        x, t = inputs
        return module.energy(x, t), module.score(x, t), module.score_jacobian(x, t)


class TestScoreNetEnergyModule(ModuleTestMixin):
    def make_module(self):
        return ScoreNetEnergy(EnergyMLP(3, scalar=False), VPLinear(), "eps", nodes=8)

    def make_inputs(self):
        return torch.randn(5, 3), torch.tensor([0.2, 0.3, 0.5, 0.7, 0.9])

    def evaluate(self, module, inputs):
        x, t = inputs
        return module.energy(x, t).detach(), module.score(x, t).detach()


def test_float64_energy_with_a_schedule_made_under_float32_default():
    # A schedule built while the default dtype is float32 must not round a float64 computation's constants
    # or times to float32 (its constants are float64 buffers; a float t takes x's dtype).
    patterns, x = torch.randn(6, 3), torch.randn(4, 3)
    expected = EmpiricalEnergy(patterns, VPLinear()).score(x, 0.05)
    torch.set_default_dtype(torch.float32)
    schedule = VPLinear()
    torch.set_default_dtype(torch.float64)
    assert torch.equal(EmpiricalEnergy(patterns, schedule).score(x, 0.05), expected)
