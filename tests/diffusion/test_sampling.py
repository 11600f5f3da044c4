"""Samplers, time grids and the Gaussian late start: acceptance checks 7, 8 and the samplers' part of 13."""

from __future__ import annotations

import math

import pytest
import torch

from pyro_ext.diffusion.energy import GaussianEnergy, GaussianMixtureEnergy
from pyro_ext.diffusion.geometry import critical_time
from pyro_ext.diffusion.metrics import energy_distance
from pyro_ext.diffusion.sampling import (
    METHODS,
    GaussianStats,
    fit_gaussian,
    gaussian_late_start,
    late_start_distribution,
    sample,
    time_grid,
)
from pyro_ext.diffusion.schedules import DDPM, Cosine, VEGeometric, VEVariance, VPLinear

# ----------------------------------------------------------------------------------------------- fixtures


def gaussian_problem(d=5, seed=0):
    """Gaussian data N(mu, U diag(lam) U^T) with a random orthonormal U."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    lam = torch.linspace(0.25, 4.0, d)
    mu = torch.randn(d, generator=g)
    return mu, U, lam, (U * lam) @ U.T


def transport(x, mu, U, lam, alpha, sigma, alpha_end=1.0, sigma_end=0.0):
    """Closed-form probability-flow map from (alpha, sigma) to (alpha_end, sigma_end) for Gaussian data.

    Design §8 check 7 gives it into clean data (alpha_end = 1, sigma_end = 0); the probability-flow ODE
    maps N(αμ, α²Σ + σ²I) linearly onto N(α'μ, α'²Σ + σ'²I) along the eigenvectors of Σ.
    """
    gain = torch.sqrt((alpha_end**2 * lam + sigma_end**2) / (alpha**2 * lam + sigma**2))
    return alpha_end * mu + ((x - alpha * mu) @ U * gain) @ U.T


def ring_energy(schedule, radius=1.2, sd=0.1):
    angles = torch.arange(8) * (2 * math.pi / 8)
    means = radius * torch.stack([angles.cos(), angles.sin()], -1)
    return GaussianMixtureEnergy(means, sd**2, schedule=schedule)


class CountingScore:
    """A model wrapper counting score evaluations and the times they were asked at."""

    def __init__(self, energy):
        self.energy, self.schedule, self.times = energy, energy.schedule, []

    def score(self, x, t):
        self.times.append(float(t))
        return self.energy.score(x, t)


# ----------------------------------------------------------------------------------------------- check 7


def test_late_start_distribution_is_exact_for_gaussian_data():
    schedule = VPLinear()
    mu, U, lam, cov = gaussian_problem()
    for t in (0.1, 0.5, 0.9):
        q = late_start_distribution(GaussianStats.from_moments(mu, cov), schedule, t)
        alpha, sigma = float(schedule.alpha(t)), float(schedule.sigma(t))
        torch.testing.assert_close(q.mean, alpha * mu, rtol=0, atol=1e-14)
        torch.testing.assert_close(
            q.covariance_matrix, alpha**2 * cov + sigma**2 * torch.eye(5), rtol=0, atol=1e-12
        )
        assert q.t_start == t
        # it is the exact marginal of the diffused data (GaussianEnergy, independent code)
        marginal = GaussianEnergy(mu, cov, schedule).marginal(t)
        torch.testing.assert_close(q.covariance_matrix, marginal.covariance_matrix, rtol=0, atol=1e-12)


def test_fit_gaussian_on_1e5_samples_is_within_3_percent():
    mu, U, lam, cov = gaussian_problem()
    g = torch.Generator().manual_seed(1)
    data = mu + (torch.randn(100_000, 5, generator=g) * lam.sqrt()) @ U.T
    stats = fit_gaussian(data)
    # the sample covariance's relative Frobenius error is ~ sqrt(2/n)·(tr Σ²)^½/‖Σ‖_F ≈ 0.5 % at n = 1e5
    assert torch.linalg.norm(stats.covariance_matrix() - cov) / torch.linalg.norm(cov) < 0.03
    assert torch.linalg.norm(stats.mean - mu) / torch.linalg.norm(mu) < 0.03
    assert stats.top_eigenvalue == pytest.approx(4.0, rel=0.03)


def exact_ppca_data(n, d, k, noise, seed=0):
    """Data whose sample covariance is exactly U diag(lam) U^T + noise·I (whitened, then coloured)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(d, k, generator=g))
    lam = torch.linspace(1.0, 3.0, k)
    cov = (U * lam) @ U.T + noise * torch.eye(d)
    z = torch.randn(n, d, generator=g)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(z.T @ z / (n - 1))).T  # sample covariance exactly I
    return z @ torch.linalg.cholesky(cov).T + 0.5, cov


def test_ppca_equals_full_fit_on_exact_ppca_data():
    data, cov = exact_ppca_data(500, 8, 3, noise=0.2)
    full, ppca = fit_gaussian(data), fit_gaussian(data, rank=3)
    assert not full.is_low_rank and ppca.is_low_rank and ppca.rank == 3
    torch.testing.assert_close(full.covariance_matrix(), cov, rtol=0, atol=1e-12)
    torch.testing.assert_close(ppca.covariance_matrix(), cov, rtol=0, atol=1e-12)
    assert float(ppca.noise_variance) == pytest.approx(0.2, abs=1e-12)
    schedule = VPLinear()
    q_full = late_start_distribution(full, schedule, 0.3)
    q_ppca = late_start_distribution(ppca, schedule, 0.3)
    assert type(q_ppca).__name__ == "LowRankMultivariateNormal"
    torch.testing.assert_close(q_ppca.covariance_matrix, q_full.covariance_matrix, rtol=0, atol=1e-12)
    torch.testing.assert_close(q_ppca.mean, q_full.mean, rtol=0, atol=1e-14)
    x = torch.randn(10, 8)
    torch.testing.assert_close(q_ppca.log_prob(x), q_full.log_prob(x), rtol=0, atol=1e-10)


def test_pf_heun_matches_closed_form_transport_and_is_second_order():
    """Check 7: from t_s = 0.5 the error is <= 2e-3 at 100 steps and falls 3-5x per doubling (order 2)."""
    schedule = VPLinear()
    mu, U, lam, cov = gaussian_problem()
    energy = GaussianEnergy(mu, cov, schedule)
    t_start = 0.5
    q = late_start_distribution(GaussianStats.from_moments(mu, cov), schedule, t_start)
    x = q.sample((256,))
    exact = transport(x, mu, U, lam, float(schedule.alpha(t_start)), float(schedule.sigma(t_start)))
    errors = []
    for n in (50, 100, 200):
        out = sample(energy, x, time_grid(schedule, n, t_start), "pf_heun", progress=False)
        errors.append(float((out - exact).norm(dim=-1).max()))
    assert errors[1] <= 2e-3
    for coarse, fine in zip(errors, errors[1:]):
        assert 3.0 <= coarse / fine <= 5.0, errors


@pytest.mark.parametrize("schedule_cls", [VPLinear, VEGeometric])
@pytest.mark.parametrize("method", ["pf_euler", "ddim", "pf_heun"])
def test_deterministic_samplers_converge_to_the_transport(method, schedule_cls):
    """Euler and DDIM(0) halve their error per doubling of the steps (order 1), Heun quarters it (order 2)."""
    schedule = schedule_cls()
    mu, U, lam, cov = gaussian_problem()
    energy = GaussianEnergy(mu, cov, schedule)
    x = late_start_distribution(GaussianStats.from_moments(mu, cov), schedule, 0.5).sample((128,))
    # DDIM ends at the denoised x̂0; the SDE/ODE steps at the schedule's t = 0 marginal (VEGeometric:
    # sigma(0) = sigma_min)
    end = (1.0, 0.0) if method == "ddim" else (float(schedule.alpha(0.0)), float(schedule.sigma(0.0)))
    exact = transport(x, mu, U, lam, float(schedule.alpha(0.5)), float(schedule.sigma(0.5)), *end)
    errors = [
        float(
            (sample(energy, x, time_grid(schedule, n, 0.5), method, progress=False) - exact)
            .norm(dim=-1)
            .max()
        )
        for n in (100, 200, 400)
    ]
    # order p: ratio 2^p per doubling; the bounds allow the next-order remainder
    low, high = (1.6, 2.5) if method != "pf_heun" else (3.0, 5.0)
    for coarse, fine in zip(errors, errors[1:]):
        assert low <= coarse / fine <= high, errors
    assert errors[-1] < 2e-2


def test_one_ddim_step_to_zero_scales_the_variance_along_lambda():
    """Check 7: x̂0 = μ + αΣC⁻¹(x − αμ), so Var along λ becomes λ · α²λ/(α²λ + σ²)."""
    schedule = VPLinear()
    mu, U, lam, cov = gaussian_problem()
    energy = GaussianEnergy(mu, cov, schedule)
    t = 0.4
    alpha, sigma = float(schedule.alpha(t)), float(schedule.sigma(t))
    x = torch.randn(64, 5)
    out = sample(energy, x, [t, 0.0], "ddim", progress=False)
    gain = U @ torch.diag(alpha * lam / (alpha**2 * lam + sigma**2)) @ U.T
    torch.testing.assert_close(out, mu + (x - alpha * mu) @ gain.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(out, energy.denoise(x, t), rtol=0, atol=1e-12)
    marginal_cov = alpha**2 * cov + sigma**2 * torch.eye(5)
    expected = (U * (lam * alpha**2 * lam / (alpha**2 * lam + sigma**2))) @ U.T
    torch.testing.assert_close(gain @ marginal_cov @ gain.T, expected, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------- samplers


@pytest.mark.parametrize("method, eta, n_steps", [("euler_maruyama", 0.0, 400), ("ddim", 1.0, 400)])
@pytest.mark.parametrize("schedule_cls", [VPLinear, VEGeometric])
def test_stochastic_samplers_reproduce_gaussian_moments(method, eta, n_steps, schedule_cls):
    """Samples from the exact score of N(μ, Σ) have mean μ and covariance Σ (VP and VE)."""
    schedule = schedule_cls()
    mu = torch.tensor([0.5, -1.0])
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.8]])
    energy = GaussianEnergy(mu, cov, schedule)
    g = torch.Generator().manual_seed(3)
    t_start = schedule.t_max
    x_init = energy.sample(20_000, t_start, generator=g)
    out = sample(
        energy, x_init, time_grid(schedule, n_steps, t_start), method, eta=eta, generator=g, progress=False
    )
    # Monte Carlo: the mean's standard error is sqrt(Σ_ii/n) <= 0.007 and the covariance's
    # ~ sqrt(2/n)·Σ_ii <= 0.01; the O(h) discretisation bias is ~0.01 at 400 steps. 0.06 is > 4 s.e. + bias
    torch.testing.assert_close(out.mean(0), mu, rtol=0, atol=0.06)
    torch.testing.assert_close(torch.cov(out.T), cov, rtol=0, atol=0.06)


def test_final_step_into_zero_never_evaluates_the_score_at_zero():
    schedule = VPLinear()
    energy = GaussianEnergy(torch.zeros(2), torch.eye(2) * 0.5, schedule)
    x = torch.randn(16, 2)
    for method in METHODS:
        model = CountingScore(energy)
        sample(model, x, time_grid(schedule, 4, 0.8), method, progress=False)
        assert 0.0 not in model.times
        # one evaluation per interval, Heun two except on the final step into 0
        expected = 4 if method != "pf_heun" else 7
        assert len(model.times) == expected, (method, model.times)


def test_final_steps_into_zero_are_denoising_and_drift_only():
    schedule = VPLinear()
    energy = GaussianEnergy(torch.zeros(2), torch.eye(2) * 0.5, schedule)
    x, t = torch.randn(16, 2), 0.3
    torch.testing.assert_close(
        sample(energy, x, [t, 0.0], "ddim", eta=1.0, progress=False), energy.denoise(x, t)
    )
    h, f, g2 = t, float(schedule.f(t)), float(schedule.g2(t))
    s = energy.score(x, t)
    em = sample(
        energy, x, [t, 0.0], "euler_maruyama", generator=torch.Generator().manual_seed(0), progress=False
    )
    torch.testing.assert_close(em, x - h * (f * x - g2 * s), rtol=0, atol=1e-14)  # no noise added
    heun = sample(energy, x, [t, 0.0], "pf_heun", progress=False)
    torch.testing.assert_close(heun, x - h * (f * x - 0.5 * g2 * s), rtol=0, atol=1e-14)


def test_ddim_step_formula_on_a_ve_schedule():
    """One DDIM(η) step matches the formula of design §4 with α = 1 (VE)."""
    schedule = VEVariance()
    energy = GaussianEnergy(torch.zeros(3), torch.eye(3), schedule)
    x = torch.randn(8, 3) * 2.0
    t, t_next, eta = 4.0, 1.0, 0.7
    g = torch.Generator().manual_seed(5)
    out = sample(energy, x, [t, t_next], "ddim", eta=eta, generator=g, progress=False)
    z = torch.randn(8, 3, generator=torch.Generator().manual_seed(5))
    s = energy.score(x, t)
    var, var_next = 4.0, 1.0
    c2 = eta**2 * (var_next / var) * (var - var_next)
    expected = (x + var * s) + math.sqrt(var_next - c2) * (-math.sqrt(var) * s) + math.sqrt(c2) * z
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_trajectory_holds_every_state():
    schedule = VPLinear()
    energy = GaussianEnergy(torch.zeros(2), torch.eye(2), schedule)
    x = torch.randn(10, 2)
    times = time_grid(schedule, 6)
    out, path = sample(energy, x, times, "ddim", return_trajectory=True, progress=False)
    assert path.shape == (7, 10, 2)
    torch.testing.assert_close(path[0], x, rtol=0, atol=0)
    torch.testing.assert_close(path[-1], out, rtol=0, atol=0)


def test_a_callable_score_with_an_explicit_schedule():
    schedule = VPLinear()
    energy = GaussianEnergy(torch.zeros(2), torch.eye(2), schedule)
    x = torch.randn(10, 2)
    times = time_grid(schedule, 5)
    expected = sample(energy, x, times, "pf_euler", progress=False)
    torch.testing.assert_close(
        sample(energy.score, x, times, "pf_euler", schedule=schedule, progress=False), expected
    )


@pytest.mark.parametrize("method, eta", [("euler_maruyama", 0.0), ("ddim", 1.0), ("ddim", 0.5)])
def test_the_same_generator_gives_the_same_samples(method, eta):
    schedule = VPLinear()
    energy = ring_energy(schedule)
    x = torch.randn(50, 2)
    times = time_grid(schedule, 10)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return sample(energy, x, times, method, eta=eta, generator=g, progress=False)

    torch.testing.assert_close(run(0), run(0), rtol=0, atol=0)
    assert not torch.equal(run(0), run(1))
    torch.manual_seed(7)  # without a generator the global one is used
    first = sample(energy, x, times, method, eta=eta, progress=False)
    torch.manual_seed(7)
    torch.testing.assert_close(
        sample(energy, x, times, method, eta=eta, progress=False), first, rtol=0, atol=0
    )


@pytest.mark.parametrize("method", list(METHODS))
def test_float32_matches_float64(method):
    schedule = VPLinear()
    energy = ring_energy(schedule)
    x = torch.randn(64, 2)
    times = time_grid(schedule, 20, 0.6)
    eta = 1.0 if method == "ddim" else 0.0
    out64 = sample(
        energy, x, times, method, eta=eta, generator=torch.Generator().manual_seed(0), progress=False
    )
    energy32 = ring_energy(schedule).float()
    out32 = sample(
        energy32,
        x.float(),
        times,
        method,
        eta=eta,
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    assert out32.dtype == torch.float32
    # float32 roundoff (~1e-7) amplified by at most a few over 20 contracting steps
    torch.testing.assert_close(out32.double(), out64, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device here: this checks placement on a GPU, which CPU-only CI cannot run",
)
def test_cuda_matches_cpu():
    schedule = VPLinear()
    energy = ring_energy(schedule)
    x = torch.randn(64, 2)
    times = time_grid(schedule, 20)
    expected = sample(energy, x, times, "pf_heun", progress=False)
    actual = sample(energy.cuda(), x.cuda(), times, "pf_heun", progress=False)
    assert actual.device.type == "cuda"
    torch.testing.assert_close(actual.cpu(), expected, rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def small_energy():
    return GaussianEnergy(torch.zeros(2), torch.eye(2), VPLinear())


@pytest.mark.parametrize(
    "times, match",
    [
        ([0.0, 0.5, 1.0], "strictly decreasing"),
        ([1.0, 0.5, 0.5, 0.0], "strictly decreasing"),
        ([1.0], "at least 2"),
        ([[1.0, 0.0]], "1-D grid"),
        ([1.0, float("nan"), 0.0], "non-finite"),
        ([1.5, 0.5, 0.0], "outside the schedule's range"),
        ([1.0, -0.1], "t >= 0"),
    ],
)
def test_bad_grids_are_clear_errors(small_energy, times, match):
    with pytest.raises(ValueError, match=match):
        sample(small_energy, torch.randn(4, 2), times, "ddim", progress=False)


def test_grid_may_end_at_zero_below_t_min():
    """A schedule whose t_min > 0 still accepts a final step into exactly 0 (never evaluated)."""
    schedule = VEGeometric()
    energy = GaussianEnergy(torch.zeros(2), torch.eye(2), schedule)
    out = sample(energy, torch.randn(4, 2), [0.5, 0.2, 0.0], "pf_euler", progress=False)
    assert out.shape == (4, 2)


def test_bad_arguments_are_clear_errors(small_energy):
    x = torch.randn(4, 2)
    times = [1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="method must be one of"):
        sample(small_energy, x, times, "rk4", progress=False)
    with pytest.raises(ValueError, match="eta must lie in"):
        sample(small_energy, x, times, "ddim", eta=1.5, progress=False)
    with pytest.raises(ValueError, match="eta is a DDIM parameter"):
        sample(small_energy, x, times, "pf_euler", eta=0.5, progress=False)
    with pytest.raises(ValueError, match="x_init|shape"):
        sample(small_energy, torch.randn(4, 3), times, "ddim", progress=False)
    with pytest.raises(ValueError, match="non-finite"):
        sample(small_energy, torch.full((4, 2), float("nan")), times, "ddim", progress=False)
    with pytest.raises(TypeError, match="x_init must be a tensor"):
        sample(small_energy, [[0.0, 0.0]], times, "ddim", progress=False)
    with pytest.raises(TypeError, match="schedule"):
        sample(lambda x, t: -x, x, times, "ddim", progress=False)
    with pytest.raises(TypeError, match="score"):
        sample(object(), x, times, "ddim", schedule=VPLinear(), progress=False)


def test_a_score_of_the_wrong_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="returned"):
        sample(
            lambda x, t: x[..., :1],
            torch.randn(4, 2),
            [1.0, 0.0],
            "ddim",
            schedule=VPLinear(),
            progress=False,
        )


def test_a_non_finite_score_is_reported_not_propagated():
    with pytest.raises(FloatingPointError, match="non-finite"):
        sample(
            lambda x, t: x * float("inf"),
            torch.randn(4, 2),
            [1.0, 0.5, 0.0],
            "pf_euler",
            schedule=VPLinear(),
            progress=False,
        )


# ----------------------------------------------------------------------------------------------- grids


@pytest.mark.parametrize("schedule_cls", [VPLinear, DDPM, Cosine, VEGeometric, VEVariance])
@pytest.mark.parametrize("spacing", ["uniform", "log_snr", "ddpm_skip"])
def test_time_grids_are_strictly_decreasing_from_t_start_to_zero(schedule_cls, spacing):
    schedule = schedule_cls()
    for n, t_start in ((1, None), (2, None), (7, 0.5 * schedule.t_max)):
        grid = time_grid(schedule, n, t_start, spacing)
        assert grid.shape == (n + 1,) and grid.dtype == torch.float64
        assert grid[-1] == 0.0 and bool((grid[:-1] > grid[1:]).all())
        if spacing != "ddpm_skip":
            assert float(grid[0]) == (schedule.t_max if t_start is None else t_start)


def test_log_snr_grid_is_equally_spaced_in_log_snr():
    schedule = VPLinear()
    grid = time_grid(schedule, 6, 0.9, "log_snr")
    lams = schedule.log_snr(grid[:-1])
    steps = lams[1:] - lams[:-1]
    torch.testing.assert_close(steps, steps.mean().expand(5), rtol=1e-9, atol=0)
    # the (replaced) end point sits where alpha²/sigma² = 1e3
    assert float(lams[0] + 6 * steps.mean()) == pytest.approx(math.log(1e3), rel=1e-9)


def test_ddpm_skip_reproduces_the_official_grids():
    schedule = DDPM()
    # vanilla DDIM "uniform skip" (arange(0, 1000, 100)): steps 900, 800, ..., 0, then x̂0
    vanilla = time_grid(schedule, 10, (1000 - 100 + 1) / 1000, "ddpm_skip")
    expected = torch.tensor([(j + 1) / 1000 for j in range(900, -1, -100)] + [0.0], dtype=torch.float64)
    torch.testing.assert_close(vanilla, expected, rtol=0, atol=1e-15)
    # late start at step 300: linspace(0, 300, 5) as integers
    late = time_grid(schedule, 5, 301 / 1000, "ddpm_skip")
    steps = [int(round(float(t) * 1000 - 1)) for t in late[:-1]]
    assert steps == [300, 225, 150, 75, 0]


def test_bad_grid_arguments_are_clear_errors():
    schedule = VPLinear()
    with pytest.raises(ValueError, match="spacing"):
        time_grid(schedule, 5, spacing="quadratic")
    with pytest.raises(ValueError, match="positive integer"):
        time_grid(schedule, 0)
    with pytest.raises(ValueError, match="t_start"):
        time_grid(schedule, 5, 1.5)
    with pytest.raises(ValueError, match="t_start"):
        time_grid(schedule, 5, 0.0)
    with pytest.raises(ValueError, match="do not fit"):
        time_grid(DDPM(), 10, 0.005, "ddpm_skip")
    with pytest.raises(ValueError, match="t_end"):
        time_grid(schedule, 5, 0.5, "log_snr", t_end=0.7)


# ----------------------------------------------------------------------------------------------- gls


def test_gaussian_late_start_defaults_to_the_score_critical_time():
    schedule = VPLinear()
    g = torch.Generator().manual_seed(0)
    data = ring_energy(schedule).sample(5000, 0.0, generator=g)
    x_init, q = gaussian_late_start(data, schedule=schedule, num_samples=300, generator=g)
    assert x_init.shape == (300, 2)
    assert q.t_start == pytest.approx(critical_time(fit_gaussian(data), schedule, "score"), abs=0)
    # the ring's covariance is (r²/2 + sd²) I = 0.73 I: alpha_c² = 1/(1 + 0.73), t_c ≈ 0.23 (design §4.1)
    assert q.t_start == pytest.approx(0.23, abs=0.005)
    assert float(schedule.alpha(q.t_start)) ** 2 == pytest.approx(1 / (1 + fit_gaussian(data).top_eigenvalue))


def test_gaussian_late_start_from_moments_and_low_rank():
    schedule = VPLinear()
    mu, U, lam, cov = gaussian_problem()
    x_a, q_a = gaussian_late_start(
        mean=mu,
        cov=cov,
        schedule=schedule,
        t_start=0.4,
        num_samples=20_000,
        generator=torch.Generator().manual_seed(0),
    )
    x_b, _ = gaussian_late_start(
        mean=mu,
        cov=cov,
        schedule=schedule,
        t_start=0.4,
        num_samples=20_000,
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(x_a, x_b, rtol=0, atol=0)  # the generator decides the draws
    # the draws follow q: sample covariance error ~ sqrt(2/n)·max C_ii ≈ 0.01·2; 0.1 is > 4 s.e.
    torch.testing.assert_close(torch.cov(x_a.T), q_a.covariance_matrix, rtol=0, atol=0.1)
    x_c, q_c = gaussian_late_start(
        mean=mu, cov=cov, schedule=schedule, t_start=0.4, num_samples=20_000, rank=2
    )
    assert type(q_c).__name__ == "LowRankMultivariateNormal" and q_c.cov_factor.shape == (5, 2)
    torch.testing.assert_close(torch.cov(x_c.T), q_c.covariance_matrix, rtol=0, atol=0.1)


def test_gaussian_late_start_bad_arguments():
    schedule = VPLinear()
    data = torch.randn(100, 2)
    with pytest.raises(ValueError, match="either data"):
        gaussian_late_start(data, mean=torch.zeros(2), cov=torch.eye(2), schedule=schedule, num_samples=5)
    with pytest.raises(ValueError, match="both mean and cov"):
        gaussian_late_start(mean=torch.zeros(2), schedule=schedule, num_samples=5)
    with pytest.raises(ValueError, match="num_samples"):
        gaussian_late_start(data, schedule=schedule, num_samples=0)
    with pytest.raises(ValueError, match="rank"):
        gaussian_late_start(data, schedule=schedule, num_samples=5, rank=3)
    with pytest.raises(ValueError, match="shape"):
        gaussian_late_start(mean=torch.zeros(2), cov=torch.eye(3), schedule=schedule, num_samples=5)
    with pytest.raises(ValueError, match="non-finite"):
        fit_gaussian(torch.tensor([[0.0, 1.0], [float("nan"), 2.0]]))
    with pytest.raises(ValueError, match="n >= 2"):
        fit_gaussian(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="t_start"):
        late_start_distribution(fit_gaussian(data), schedule, 2.0)
    with pytest.raises(ValueError, match="positive semi-definite"):
        GaussianStats.from_moments(torch.zeros(2), torch.diag(torch.tensor([1.0, -1.0])))
    # a VE schedule whose noise never reaches the data scale has no critical time
    with pytest.raises(ValueError, match="still unstable at t_max"):
        gaussian_late_start(data * 100, schedule=VEGeometric(sigma_max=5.0), num_samples=5)


def gls_curve(spacing, steps, num_samples=4000, seed=0):
    """Energy distances of vanilla and gls DDIM on the 8-Gaussian ring (design §4.1, check 8)."""
    schedule = VPLinear()
    energy = ring_energy(schedule)
    g = torch.Generator().manual_seed(seed)
    reference = energy.sample(num_samples, 0.0, generator=g)
    train = energy.sample(20_000, 0.0, generator=g)
    rows = {}
    for n in steps:
        vanilla_init = torch.randn(num_samples, 2, generator=g)
        vanilla = sample(energy, vanilla_init, time_grid(schedule, n, 1.0, spacing), "ddim", progress=False)
        gls_init, q = gaussian_late_start(train, schedule=schedule, num_samples=num_samples, generator=g)
        gls = sample(energy, gls_init, time_grid(schedule, n, q.t_start, spacing), "ddim", progress=False)
        rows[n] = (float(energy_distance(vanilla, reference)), float(energy_distance(gls, reference)))
    return rows


@pytest.mark.parametrize("spacing", ["uniform", "log_snr"])
def test_gaussian_late_start_beats_vanilla_at_few_steps(spacing):
    """Check 8: >= 5x lower energy distance at n in {2, 3, 5}; within 0.002 of vanilla or better at n = 50."""
    rows = gls_curve(spacing, (2, 3, 5, 50))
    for n in (2, 3, 5):
        vanilla, gls = rows[n]
        assert vanilla >= 5.0 * gls, (n, rows)
    vanilla, gls = rows[50]
    assert gls <= vanilla + 0.002, rows
