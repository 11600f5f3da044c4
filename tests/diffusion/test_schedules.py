"""Acceptance check 1 (schedules and parametrisations) and the schedules' part of check 13 (hygiene)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from pyro_ext.diffusion.schedules import (
    DDPM,
    PARAMETRISATIONS,
    Cosine,
    ParametrisedScore,
    VEGeometric,
    VEVariance,
    VPLinear,
    convert,
    ddpm_index_to_t,
    t_to_ddpm_index,
)

SCHEDULES = {
    "vp_linear": VPLinear,
    "ddpm": DDPM,
    "cosine": Cosine,
    "ve_geometric": VEGeometric,
    "ve_variance": VEVariance,
}
VP = ("vp_linear", "ddpm", "cosine")


def interior_times(schedule, n=9):
    # DDPM's log alpha_bar is piecewise linear with knots at k/K: finite differences need mid-segment points.
    t = torch.linspace(0.03, 0.97, n) * schedule.t_max
    if isinstance(schedule, DDPM):
        t = (torch.floor(t * schedule.num_steps) + 0.5) / schedule.num_steps
    return t


@pytest.mark.parametrize("name", VP)
def test_vp_alpha2_plus_sigma2_is_one(name):
    schedule = SCHEDULES[name]()
    t = torch.linspace(0.0, schedule.t_max, 101)
    # check 1: alpha^2 + sigma^2 = 1 to 1e-12 for VP schedules
    torch.testing.assert_close(
        schedule.alpha(t) ** 2 + schedule.sigma(t) ** 2, torch.ones(101), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("name", SCHEDULES)
def test_f_and_g2_match_finite_differences(name):
    schedule = SCHEDULES[name]()
    t = interior_times(schedule)
    # central differences: truncation O(h^2 f''') ~ 1e-10 and rounding ~ eps * |value| / h ~ 1e-11 relative
    # (VEVariance reaches t = 97: 1e-16 * 97 / 1e-5 ~ 1e-9), all inside check 1's 1e-6.
    h = 1e-5
    f_fd = (schedule.log_alpha(t + h) - schedule.log_alpha(t - h)) / (2 * h)
    sigma2 = lambda s: schedule.sigma(s) ** 2  # noqa: E731
    g2_fd = (sigma2(t + h) - sigma2(t - h)) / (2 * h) - 2 * schedule.f(t) * sigma2(t)
    scale = schedule.f(t).abs().clamp_min(1.0)  # VE: f = 0 exactly, compare absolutely
    assert ((f_fd - schedule.f(t)).abs() / scale).max() < 1e-6
    assert ((g2_fd - schedule.g2(t)).abs() / schedule.g2(t).abs()).max() < 1e-6


@pytest.mark.parametrize("name", SCHEDULES)
def test_g2_is_minus_sigma2_dlogsnr(name):
    schedule = SCHEDULES[name]()
    t = interior_times(schedule)
    h = 1e-5
    dlog_snr = (schedule.log_snr(t + h) - schedule.log_snr(t - h)) / (2 * h)
    expected = -(schedule.sigma(t) ** 2) * dlog_snr
    assert ((expected - schedule.g2(t)).abs() / schedule.g2(t)).max() < 1e-6


@pytest.mark.parametrize("name", SCHEDULES)
def test_t_of_log_snr_inverts_log_snr(name):
    schedule = SCHEDULES[name]()
    t = torch.linspace(0.01, 1.0, 50) * schedule.t_max
    # check 1: t_of_log_snr o log_snr = id to 1e-8
    torch.testing.assert_close(schedule.t_of_log_snr(schedule.log_snr(t)), t, rtol=0, atol=1e-8)
    # the generic bisection of the base class agrees with the closed form
    base = type(schedule).__mro__[1]
    torch.testing.assert_close(base.t_of_log_snr(schedule, schedule.log_snr(t)), t, rtol=0, atol=1e-8)


@pytest.mark.parametrize("name", SCHEDULES)
def test_log_snr_is_decreasing_and_snr_consistent(name):
    schedule = SCHEDULES[name]()
    t = torch.linspace(0.01, schedule.t_max, 200)
    log_snr = schedule.log_snr(t)
    assert (log_snr.diff() < 0).all()
    expected = schedule.alpha(t) ** 2 / schedule.sigma(t) ** 2
    torch.testing.assert_close(schedule.snr(t), expected, rtol=1e-12, atol=0)


def test_ddpm_knots_equal_cumprod():
    schedule = DDPM()
    expected = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
    j = torch.arange(1000)
    knots = schedule.alpha(schedule.ddpm_index_to_t(j)) ** 2
    # check 1: the knots are the cumulative product; cumsum of log1p vs cumprod differ by ~1000 ulps at most
    torch.testing.assert_close(knots, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(schedule.alphas_cumprod, expected, rtol=1e-12, atol=0)
    assert torch.equal(schedule.t_to_ddpm_index(schedule.ddpm_index_to_t(j)), j)
    assert torch.equal(t_to_ddpm_index(ddpm_index_to_t(j)), j)


def test_ddpm_is_close_to_vp_linear():
    # K beta_j ~ beta(t): the discrete and continuous schedules agree to O(1/K)
    t = torch.linspace(0.0, 1.0, 101)
    assert (DDPM().alpha(t) - VPLinear().alpha(t)).abs().max() < 5e-3


@pytest.mark.parametrize("name", SCHEDULES)
def test_time_out_of_range_raises(name):
    schedule = SCHEDULES[name]()
    for bad in (-0.1, schedule.t_max + 0.5, float("nan")):
        with pytest.raises(ValueError, match="t must lie in"):
            schedule.alpha(torch.tensor([0.5 * schedule.t_max, bad]))
    with pytest.raises(ValueError, match="log_snr must lie in"):
        schedule.t_of_log_snr(schedule.log_snr(schedule.t_max) - 1.0)
    with pytest.raises(TypeError, match="t must be a float or a tensor"):
        schedule.sigma("0.5")


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="beta"):
        VPLinear(1.0, 0.5)
    with pytest.raises(ValueError, match="num_steps"):
        DDPM(num_steps=0)
    with pytest.raises(ValueError, match="t_max"):
        Cosine(t_max=1.0)
    with pytest.raises(ValueError, match="sigma_min"):
        VEGeometric(1.0, 0.5)
    with pytest.raises(ValueError, match="c must be positive"):
        VEVariance(c=-1.0)
    with pytest.raises(ValueError, match="index"):
        ddpm_index_to_t(1000)


@pytest.mark.parametrize("name", SCHEDULES)
def test_float32_and_module_round_trips(name):
    schedule = SCHEDULES[name]()
    t = interior_times(schedule, 11)  # DDPM: f jumps at the knots, where float32 may pick the other side
    expected = torch.stack([schedule.alpha(t), schedule.sigma(t), schedule.f(t), schedule.g2(t)])
    # float32 input: result in float32, equal to float64 to float32 roundoff (a few ulps of ~1e-7)
    single = torch.stack([schedule.alpha(t.float()), schedule.sigma(t.float()), schedule.f(t.float())])
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), expected[:3], rtol=1e-5, atol=1e-6)
    # a float t takes the buffers' dtype: .float() converts the schedule
    assert SCHEDULES[name]().float().alpha(0.5).dtype == torch.float32
    clone = copy.deepcopy(schedule)
    buffer = io.BytesIO()
    torch.save(schedule.state_dict(), buffer)
    buffer.seek(0)
    fresh = SCHEDULES[name]()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    for other in (clone, fresh):
        got = torch.stack([other.alpha(t), other.sigma(t), other.f(t), other.g2(t)])
        assert torch.equal(got, expected)


def test_state_dict_restores_non_default_constants():
    schedule = VPLinear(0.5, 10.0)
    fresh = VPLinear()
    fresh.load_state_dict(schedule.state_dict())
    assert torch.equal(fresh.alpha(torch.tensor([0.3])), schedule.alpha(torch.tensor([0.3])))


# ------------------------------------------------------------------------------- parametrisations
@pytest.mark.parametrize("name", SCHEDULES)
def test_parametrisation_chain_round_trips(name):
    schedule = SCHEDULES[name]()
    x = torch.randn(6, 5)
    t = torch.linspace(0.1, 0.9, 6) * schedule.t_max  # per-sample t
    eps = torch.randn(6, 5)
    chain = ["eps", "x0", "v", "score", "eps"]
    out = eps
    for src, dst in zip(chain[:-1], chain[1:]):
        out = convert(out, x, t, schedule, src, dst)
    # check 1: eps -> x0 -> v -> score -> eps round-trips to 1e-10
    torch.testing.assert_close(out, eps, rtol=0, atol=1e-10)


@pytest.mark.parametrize("src", PARAMETRISATIONS)
@pytest.mark.parametrize("dst", PARAMETRISATIONS)
def test_every_pair_matches_its_definition(src, dst):
    schedule = VPLinear()
    t = torch.tensor([0.2, 0.7])
    alpha, sigma = schedule.alpha(t)[:, None], schedule.sigma(t)[:, None]
    x0, eps = torch.randn(2, 3), torch.randn(2, 3)
    x = alpha * x0 + sigma * eps
    values = {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0, "score": -eps / sigma}
    torch.testing.assert_close(
        convert(values[src], x, t, schedule, src, dst), values[dst], rtol=1e-12, atol=1e-12
    )


def test_division_by_zero_sigma_names_t():
    schedule = VPLinear()
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"sigma\(t\) = 0 at t"):
        convert(torch.randn(2, 3), x, torch.tensor([0.0, 0.5]), schedule, "eps", "score")
    with pytest.raises(ValueError, match=r"sigma\(t\) = 0"):
        convert(torch.randn(2, 3), x, 0.0, schedule, "x0", "eps")
    # conversions that need no division by sigma work at t = 0
    torch.testing.assert_close(convert(x, x, 0.0, schedule, "eps", "x0"), x)


def test_convert_bad_arguments():
    schedule = VPLinear()
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="src must be one of"):
        convert(x, x, 0.5, schedule, "noise", "eps")
    with pytest.raises(ValueError, match="out must have the shape of x"):
        convert(torch.randn(2, 4), x, 0.5, schedule, "eps", "x0")
    with pytest.raises(ValueError, match="does not broadcast"):
        convert(x, x, torch.rand(3) * 0.5, schedule, "eps", "x0")


def test_parametrised_score_reads_all_four():
    schedule = Cosine()
    x0 = torch.randn(5, 3)

    def x0_net(x, t):
        assert t.shape == x.shape[:-1]
        return x0.expand_as(x)

    model = ParametrisedScore(x0_net, schedule, "x0")
    t = 0.4
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    eps = torch.randn(5, 3)
    x = alpha * x0 + sigma * eps
    torch.testing.assert_close(model.x0(x, t), x0)
    torch.testing.assert_close(model.eps(x, t), eps, rtol=0, atol=1e-12)
    torch.testing.assert_close(model.score(x, t), -eps / sigma, rtol=0, atol=1e-12)
    torch.testing.assert_close(model.v(x, t), alpha * eps - sigma * x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(model(x, t), model.score(x, t))
    with pytest.raises(ValueError, match="param must be one of"):
        ParametrisedScore(x0_net, schedule, "noise")
    bad = ParametrisedScore(lambda x, t: x[..., :1], schedule, "eps")
    with pytest.raises(ValueError, match="must return a tensor of shape"):
        bad.score(x, t)


def test_parametrised_score_registers_module():
    net = torch.nn.Linear(3, 3)
    model = ParametrisedScore(lambda x, t: net(x), VPLinear(), "eps")
    assert not list(model.parameters())  # a plain callable is not a submodule
    wrapped = torch.nn.Sequential(net)
    model = ParametrisedScore(lambda *args: wrapped(args[0]), VPLinear(), "eps")
    model2 = ParametrisedScore(_LinearNet(), VPLinear(), "eps")
    assert len(list(model2.parameters())) == 2
    assert math.isfinite(float(model2.score(torch.randn(2, 3), 0.5).detach().sum()))


class _LinearNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 3)

    def forward(self, x, t):
        return self.linear(x) * t[..., None]
