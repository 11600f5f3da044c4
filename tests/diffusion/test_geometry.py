"""Critical times, fixed points and score-Jacobian spectra: acceptance check 5 (critical-time part) and 6."""

from __future__ import annotations

import math

import pytest
import torch

from pyro_ext.diffusion.energy import EmpiricalEnergy, GaussianEnergy, GaussianMixtureEnergy
from pyro_ext.diffusion.geometry import (
    critical_time,
    estimate_manifold_dim,
    fixed_point,
    jacobian_spectrum,
    order_parameter,
    phase_boundaries,
    schedule_kind,
    score_jacobian,
    spectral_gaps,
    spectrum_over_time,
)
from pyro_ext.diffusion.sampling import fit_gaussian
from pyro_ext.diffusion.schedules import DDPM, Cosine, Schedule, VEGeometric, VEVariance, VPLinear

ALPHA_C_SDE = math.sqrt(math.sqrt(2.0) - 1.0)  # Raya & Ambrogioni, Eqs. 8-10


def two_deltas(schedule):
    return EmpiricalEnergy(torch.tensor([[-1.0], [1.0]]), schedule)


def curvature_at_centre(energy, t, kappa):
    """Autograd second derivative at 0 of u = f x²/2 − (g²/κ) log p_t (κ = 1: SDE); κ = 0: of E itself."""
    schedule = energy.schedule

    def potential(x):
        e = energy.energy(x[None], t)[0]  # E = −log p_t
        if kappa == 0:
            return e
        return 0.5 * schedule.f(t) * x.pow(2).sum() + schedule.g2(t) / kappa * e

    return float(torch.func.hessian(potential)(torch.zeros(1))[0, 0])


def sign_change(fn, lo, hi, tol=1e-13):
    """Bisection for the sign change of fn on [lo, hi] (fn(lo) < 0 < fn(hi) or the reverse)."""
    f_lo = fn(lo)
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if (fn(mid) > 0) == (f_lo > 0):
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# ----------------------------------------------------------------------------------------------- check 5


def test_two_delta_sde_curvature_changes_sign_at_the_closed_form():
    """Check 5: the SDE potential's curvature at 0 changes sign at alpha = sqrt(sqrt 2 − 1) (to 1e-6)."""
    schedule = VPLinear()
    energy = two_deltas(schedule)
    # the curvature is −β(t)[½ + (2α² − 1)/(1 − α²)²] (Eq. 9 of the paper) at every t
    for t in (0.1, 0.3, 0.6):
        a2 = float(schedule.alpha(t)) ** 2
        closed = -float(schedule.g2(t)) * (0.5 + (2 * a2 - 1) / (1 - a2) ** 2)
        assert curvature_at_centre(energy, t, 1) == pytest.approx(closed, rel=1e-9)
    # |dα/dt| < 1 here, so a bracket of 1e-10 in t pins α(t_c) far inside 1e-6
    t_c = sign_change(lambda t: curvature_at_centre(energy, t, 1), 0.2, 0.4, tol=1e-10)
    assert abs(float(schedule.alpha(t_c)) - ALPHA_C_SDE) < 1e-6
    assert critical_time(1.0, schedule, "sde") == pytest.approx(t_c, abs=1e-9)
    # λ_max of the data ±1 is 1, whether given as a number, a spectrum or fitted statistics
    stats = fit_gaussian(torch.tensor([[-1.0], [1.0]] * 50))
    assert critical_time(stats, schedule, "sde") == pytest.approx(
        critical_time(torch.tensor([1.0 * 100 / 99]), schedule, "sde"), abs=1e-12
    )


def test_two_delta_score_criterion_is_alpha_squared_one_half():
    schedule = VPLinear()
    energy = two_deltas(schedule)
    # −E'' at 0 = −1/σ² + α²/σ⁴ · Var = 0 where α² = σ² = ½
    t_c = sign_change(lambda t: curvature_at_centre(energy, t, 0), 0.2, 0.4, tol=1e-10)
    assert float(schedule.alpha(t_c)) ** 2 == pytest.approx(0.5, abs=1e-9)
    assert critical_time(1.0, schedule, "score") == pytest.approx(t_c, abs=1e-9)


def test_ddpm_critical_steps():
    """Check 5: DDPM steps j = 292 (SDE) and 258 (score) for λ = 1, and the design's table for larger λ."""
    schedule = DDPM()
    steps = {
        lam: [int(schedule.t_to_ddpm_index(critical_time(lam, schedule, c))) for c in ("score", "sde")]
        for lam in (1.0, 10.0, 100.0, 1000.0)
    }
    assert steps == {1.0: [258, 292], 10.0: [484, 542], 100.0: [674, 722], 1000.0: [825, 866]}


@pytest.mark.parametrize("alpha, expected", [(0.8, 0.947), (0.9, 0.994)])
def test_two_delta_sde_fixed_points(alpha, expected):
    """Check 5: (1 + α²)x* = 2α tanh(αx*/(1 − α²)) has x* = 0.947 and 0.994 at α = 0.8 and 0.9 (±1e-3)."""
    schedule = VPLinear()
    energy = two_deltas(schedule)
    t = float(schedule.t_of_log_snr(math.log(alpha**2 / (1 - alpha**2))))
    x_star = float(fixed_point(energy, torch.ones(1), t, "sde"))
    assert x_star == pytest.approx(expected, abs=1e-3)
    residual = (1 + alpha**2) * x_star - 2 * alpha * math.tanh(alpha * x_star / (1 - alpha**2))
    assert abs(residual) < 1e-10
    # the centre is a fixed point too, unstable below t_c
    assert float(fixed_point(energy, torch.zeros(1), t, "sde")) == 0.0


def test_fixed_points_are_stationary_points_of_each_potential():
    """At the returned point the drift of the SDE / ODE / score dynamics vanishes."""
    schedule = VPLinear()
    energy = GaussianMixtureEnergy(torch.tensor([[-1.0, 0.5], [1.0, -0.2]]), 0.05, schedule=schedule)
    t = 0.15
    f, g2 = float(schedule.f(t)), float(schedule.g2(t))
    for criterion, scale in (("sde", 1.0), ("ode", 0.5)):
        x = fixed_point(energy, torch.tensor([[0.9, -0.1], [-0.8, 0.4]]), t, criterion)
        drift = f * x - scale * g2 * energy.score(x, t)
        assert float(drift.abs().max()) < 1e-9
    x = fixed_point(energy, torch.tensor([[0.9, -0.1]]), t, "score")
    assert float(energy.score(x, t).abs().max()) < 1e-9


def test_ve_order_parameter_follows_mean_field():
    """Two deltas ±1 under VEVariance: T_c = 1 and x* ≈ √(3(1 − τ)) just below it (β = ½), 0 above."""
    energy = two_deltas(VEVariance())
    assert critical_time(1.0, energy.schedule) == pytest.approx(1.0, rel=1e-12)
    for tau in (0.98, 0.99):
        x_star = order_parameter(energy, tau, damping=1.0, tol=1e-14, max_iter=200_000)
        # the expansion x = tanh(x/τ) gives x*² = 3(1 − τ) + O((1 − τ)²): 3 % relative at these τ
        assert x_star == pytest.approx(math.sqrt(3 * (1 - tau)), rel=0.03)
        assert math.tanh(x_star / tau) == pytest.approx(x_star, abs=1e-10)
    assert abs(order_parameter(energy, 1.2, damping=1.0, max_iter=200_000)) < 1e-6


def test_critical_time_closed_forms_for_ve_and_cosine():
    lam = 0.7
    for schedule in (VEVariance(), VEGeometric()):
        for criterion in ("score", "sde", "ode"):  # f = 0: every criterion reads σ_c² = λ
            t = critical_time(lam, schedule, criterion)
            assert float(schedule.sigma(t)) ** 2 == pytest.approx(lam, rel=1e-10)
    cosine = Cosine()
    assert float(cosine.alpha(critical_time(lam, cosine, "score"))) ** 2 == pytest.approx(
        1 / (1 + lam), rel=1e-9
    )
    a2 = float(cosine.alpha(critical_time(lam, cosine, "sde"))) ** 2
    assert a2 == pytest.approx(math.sqrt(lam**2 + 1) - lam, rel=1e-9)
    assert float(cosine.alpha(critical_time(lam, cosine, "ode"))) ** 2 == pytest.approx(1 - lam, rel=1e-9)


class ExpSchedule(Schedule):
    """Neither VP nor VE: α = exp(−t), σ² = t (for the bisection path)."""

    def __init__(self):
        super().__init__(0.0, 10.0)

    def log_alpha(self, t):
        return -self.as_time(t)

    def log_sigma2(self, t):
        return torch.log(self.as_time(t))

    def f(self, t):
        return -torch.ones_like(self.as_time(t))

    def g2(self, t):
        t = self.as_time(t)
        return 1.0 + 2.0 * t  # dσ²/dt − 2fσ²


@pytest.mark.parametrize("criterion, kappa", [("sde", 1), ("ode", 2)])
def test_critical_time_by_bisection_matches_the_autograd_curvature(criterion, kappa):
    schedule = ExpSchedule()
    assert schedule_kind(schedule) == "general"
    energy = two_deltas(schedule)
    t_bisect = sign_change(lambda t: curvature_at_centre(energy, t, kappa), 0.05, 9.0, tol=1e-12)
    assert critical_time(1.0, schedule, criterion) == pytest.approx(t_bisect, abs=1e-9)


def test_schedule_kinds():
    assert [schedule_kind(s) for s in (VPLinear(), DDPM(), Cosine(), VEGeometric(), VEVariance())] == [
        "vp",
        "vp",
        "vp",
        "ve",
        "ve",
    ]


def test_critical_time_bad_input():
    schedule = VPLinear()
    with pytest.raises(ValueError, match="criterion"):
        critical_time(1.0, schedule, "free_energy")
    with pytest.raises(ValueError, match="positive"):
        critical_time(0.0, schedule)
    with pytest.raises(ValueError, match="positive"):
        critical_time(float("nan"), schedule)
    with pytest.raises(TypeError, match="eigenvalues"):
        critical_time(torch.eye(2), schedule)
    with pytest.raises(ValueError, match="unstable at every t"):
        critical_time(2.0, schedule, "ode")
    with pytest.raises(ValueError, match="still unstable at t_max"):
        critical_time(1e6, VEGeometric())  # sigma_max² = 2500 < λ


# ----------------------------------------------------------------------------------------------- check 6


def linear_manifold(d=32, m=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, m, generator=g))
    scales = torch.linspace(0.5, 2.0, m)
    return Q, scales**2  # x0 = Q diag(scales) z: covariance Q diag(scales²) Qᵀ


def test_manifold_dimension_from_closed_form_and_black_box_spectra():
    """Check 6: d = 32, m = 5 linear manifold under VP."""
    d, m = 32, 5
    Q, lam = linear_manifold(d, m)
    schedule = VPLinear()
    energy = GaussianEnergy(torch.zeros(d), (Q, lam, 0.0), schedule)
    g = torch.Generator().manual_seed(1)
    x0 = (torch.randn(256, m, generator=g) * lam.sqrt()) @ Q.T

    def at_ratio(ratio):  # the time where σ²/α² = ratio
        t = float(schedule.t_of_log_snr(-math.log(ratio)))
        alpha, sigma = float(schedule.alpha(t)), float(schedule.sigma(t))
        return t, alpha * x0 + sigma * torch.randn(256, d, generator=g), sigma**2

    t, x, s2 = at_ratio(1e-3 * float(lam.min()))
    closed = jacobian_spectrum(score_jacobian(energy, x, t, "closed_form"), sigma2=s2)
    black_box = jacobian_spectrum(score_jacobian(_BlackBox(energy), x, t, "autograd"), sigma2=s2)
    torch.testing.assert_close(black_box.values, closed.values, rtol=0, atol=1e-8)
    assert float(closed.asymmetry.max()) < 1e-12
    assert torch.equal(estimate_manifold_dim(closed).dim, torch.full((256,), m))
    assert torch.equal(estimate_manifold_dim(black_box).dim, torch.full((256,), m))
    # trivial phase: every ν = 1 ± 1e-2 and no gap
    t, x, s2 = at_ratio(100 * float(lam.max()))
    trivial = jacobian_spectrum(score_jacobian(energy, x, t), sigma2=s2)
    torch.testing.assert_close(trivial.values, torch.ones_like(trivial.values), rtol=0, atol=1e-2)
    estimate = estimate_manifold_dim(trivial)
    assert not bool(estimate.found.any()) and bool((estimate.dim == 0).all())
    # at σ²/α² = λ_i the tangent ν_i is ½ (ν = σ²/(α²λ_i + σ²))
    for i in range(m):
        t, x, s2 = at_ratio(float(lam[i]))
        nu = jacobian_spectrum(score_jacobian(energy, x[:4], t), sigma2=s2).values
        assert bool(((nu - 0.5).abs() < 1e-10).any(dim=-1).all())


class _BlackBox:
    """The score as an opaque callable (no closed-form Jacobian, no .exact)."""

    def __init__(self, energy):
        self.energy, self.schedule = energy, energy.schedule

    def score(self, x, t):
        return self.energy.score(x, t)


def test_phase_boundaries_are_where_snr_meets_the_extreme_eigenvalues():
    schedule = VPLinear()
    lam = torch.tensor([0.25, 1.0, 4.0])
    upper, lower = phase_boundaries(lam, schedule)
    assert upper == pytest.approx(critical_time(lam, schedule, "score"), abs=1e-14)
    assert float(schedule.snr(lower)) == pytest.approx(4.0, rel=1e-10) and upper > lower
    with pytest.raises(ValueError, match="positive"):
        phase_boundaries(torch.tensor([0.0, 1.0]), schedule)


def test_spectral_gaps_and_spectrum_over_time():
    spectrum = torch.tensor([[1.0, 0.99, 0.01, 0.009, 1e-4]])
    sizes, positions = spectral_gaps(spectrum, top=2)
    assert positions.tolist() == [[2, 4]]
    torch.testing.assert_close(sizes, torch.tensor([[math.log(99.0), math.log(90.0)]]))
    assert int(estimate_manifold_dim(spectrum).dim) == 3
    d, m = 6, 2
    Q, lam = linear_manifold(d, m)
    energy = GaussianEnergy(torch.zeros(d), (Q, lam, 0.0), VPLinear())
    x0 = (torch.randn(8, m) * lam.sqrt()) @ Q.T
    sweep = spectrum_over_time(energy, x0, [0.9, 0.05, 0.001], generator=torch.Generator().manual_seed(0))
    assert sweep.shape == (3, 8, d)
    # normal ν are 1 at every t; the tangent ones fall as t → 0
    torch.testing.assert_close(sweep[..., : d - m], torch.ones(3, 8, d - m), rtol=0, atol=1e-10)
    assert bool((sweep[2, :, d - m :] < sweep[1, :, d - m :]).all())


def test_energy_parametrised_networks_use_the_hessian():
    """For param="energy" the Jacobian is −hessian(E): exactly symmetric."""

    class QuadraticEnergy:
        param = "energy"
        schedule = VPLinear()
        A = torch.tensor([[2.0, 0.5], [0.5, 1.0]])

        def energy(self, x, t):
            return 0.5 * (x @ self.A * x).sum(-1) * (1 + torch.as_tensor(t))

        def score(self, x, t):
            return -(x @ self.A) * (1 + torch.as_tensor(t))

    J = score_jacobian(QuadraticEnergy(), torch.randn(3, 2), 0.5)
    torch.testing.assert_close(J, -1.5 * QuadraticEnergy.A.expand(3, 2, 2), rtol=0, atol=1e-14)
