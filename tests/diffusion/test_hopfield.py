"""Acceptance check 4: the exact diffusion energy is a modern Hopfield energy, and one Hopfield update is the
denoiser."""

from __future__ import annotations

import pytest
import torch

from pyro_ext.diffusion import EmpiricalEnergy, VEVariance, VPLinear
from pyro_ext.diffusion.hopfield import (
    capacity,
    capacity_experiment,
    diffusion_bias,
    hopfield_energy,
    hopfield_update,
    retrieve_diffusion,
    retrieve_hopfield,
)


def rademacher(n, d):
    return torch.randint(0, 2, (n, d)).double() * 2 - 1


def test_scaled_energy_is_hopfield_energy_plus_constant():
    patterns = rademacher(10, 64)
    schedule = VEVariance()
    t = 3.0  # sigma^2 = 3
    energy = EmpiricalEnergy(patterns, schedule)
    x = torch.cat([patterns[:5] + 3**0.5 * torch.randn(5, 64), 4 * torch.randn(5, 64)])
    difference = 3.0 * energy.energy(x, t) - hopfield_energy(x, patterns, beta=1 / 3.0)
    # check 4: sigma^2 E - E_H(.; 1/sigma^2) is constant to 1e-10 (equal norms, uniform weights)
    assert (difference - difference[0]).abs().max() < 1e-10


@pytest.mark.parametrize("schedule", [VPLinear(), VEVariance()], ids=["vp", "ve"])
def test_hopfield_update_is_the_denoiser(schedule):
    patterns = rademacher(10, 64)
    energy = EmpiricalEnergy(patterns, schedule)
    t = torch.tensor([0.05, 0.3, 0.6, 0.9]) * (1.0 if isinstance(schedule, VPLinear) else 5.0)
    alpha, sigma = schedule.alpha(t)[:, None], schedule.sigma(t)[:, None]
    x = alpha * patterns[:4] + sigma * torch.randn(4, 64)
    # check 4: hopfield_update(x / alpha, SNR) = denoise(x) to 1e-12 (equal norms: the bias is constant)
    update = hopfield_update(x / alpha, patterns, schedule.snr(t))
    torch.testing.assert_close(update, energy.denoise(x, t), rtol=0, atol=1e-12)


def test_bias_makes_the_update_exact_for_unequal_norms_and_weights():
    patterns = torch.randn(12, 8)
    weights = torch.rand(12) + 0.1
    schedule = VPLinear()
    energy = EmpiricalEnergy(patterns, schedule, weights)
    t = 0.4
    x = torch.randn(6, 8)
    beta = schedule.snr(t)
    bias = diffusion_bias(patterns, beta, energy.log_weights)
    update = hopfield_update(x / schedule.alpha(t), patterns, beta, bias)
    torch.testing.assert_close(update, energy.denoise(x, t), rtol=0, atol=1e-12)
    # and sigma^2/alpha^2 E = E_H(x / alpha; SNR, b) + const
    scaled = energy.energy(x, t) / beta
    difference = scaled - hopfield_energy(x / schedule.alpha(t), patterns, beta, bias)
    assert (difference - difference[0]).abs().max() < 1e-10


def test_retrieval_recovers_a_corrupted_memory():
    patterns = rademacher(16, 32)
    flips = torch.ones(32)
    flips[:6] = -1  # rho = 6/32 ~ 0.19
    cue = patterns[:4] * flips
    retrieved = retrieve_hopfield(cue, patterns, beta=1 / 0.8)
    assert torch.equal(retrieved.sign(), patterns[:4])
    # a fixed point: one more update does not move it
    torch.testing.assert_close(hopfield_update(retrieved, patterns, 1 / 0.8), retrieved, rtol=0, atol=1e-9)


def test_hopfield_bad_inputs():
    patterns = rademacher(4, 8)
    with pytest.raises(ValueError, match="beta must be positive"):
        hopfield_update(patterns[0], patterns, 0.0)
    with pytest.raises(ValueError, match=r"xi must have shape \[\.\.\., 8\]"):
        hopfield_energy(torch.zeros(7), patterns, 1.0)
    with pytest.raises(ValueError, match="patterns must be finite"):
        hopfield_update(patterns[0], patterns * float("nan"), 1.0)
    with pytest.raises(ValueError, match="bias must be"):
        hopfield_update(patterns[0], patterns, 1.0, bias=torch.zeros(3))
    with pytest.raises(ValueError, match="max_steps"):
        retrieve_hopfield(patterns[0], patterns, 1.0, max_steps=0)
    single = hopfield_update(patterns[0].float(), patterns.float(), 1.0)
    assert single.dtype == torch.float32


def test_retrieve_diffusion_with_the_exact_energy():
    patterns = rademacher(16, 32)
    energy = EmpiricalEnergy(patterns, VEVariance())
    flips = torch.ones(32)
    flips[:6] = -1
    cue = patterns[:4] * flips
    times = (0.8 * torch.logspace(0, -3, 20)).tolist()
    assert torch.equal(retrieve_diffusion(cue, energy, 0.8, times).sign(), patterns[:4])
    # a one-point grid is one Tweedie step = one Hopfield update at beta = 1 / sigma^2 (check 10's identity)
    torch.testing.assert_close(
        retrieve_diffusion(cue, energy, 0.8, [0.8]),
        hopfield_update(cue, patterns, 1 / 0.8),
        rtol=0,
        atol=1e-12,
    )
    with pytest.raises(ValueError, match="times must start at t0"):
        retrieve_diffusion(cue, energy, 0.8, [0.5, 0.1])
    with pytest.raises(ValueError, match="strictly decreasing"):
        retrieve_diffusion(cue, energy, 0.8, [0.8, 0.9])


def check_capacity_table(table, dims):
    """Check 10's conditions on a capacity table."""
    for d in dims:
        for method in ("diffusion", "hopfield"):
            rates, errors = table.success[method][d], table.stderr(method, d)
            for i in range(1, len(rates)):
                # success never rises with N by more than 3 standard errors
                assert rates[i] <= rates[i - 1] + 3 * max(errors[i], errors[i - 1], 1 / table.trials)
        for a, b in zip(table.success["diffusion"][d], table.success["hopfield"][d]):
            assert abs(a - b) <= 0.03  # diffusion and iterated Hopfield differ by <= 0.03 at every N
        # single-step diffusion and Hopfield are identical trial by trial (the identity of section 2.3)
        for a, b in zip(table.correct["diffusion_1step"][d], table.correct["hopfield_1step"][d]):
            assert torch.equal(a, b)
    n_c = capacity(table)
    assert n_c["diffusion"] == n_c["hopfield"]
    return n_c


def test_capacity_experiment_small():
    table = capacity_experiment(
        [16], [4, 16, 64], trials=100, generator=torch.Generator().manual_seed(0), progress=False
    )
    n_c = check_capacity_table(table, [16])
    assert n_c["diffusion"][16] in (4, 16)
    assert table.success["diffusion"][16][-1] < 0.9  # 64 patterns in 16 dimensions are past capacity


@pytest.mark.slow
def test_capacity_grows_with_dimension():
    """Check 10: d in {16, 24, 32}, N on a log2 grid, 300 trials each."""
    dims = [16, 24, 32]
    grid = [2**k for k in range(1, 11)]
    table = capacity_experiment(
        dims, grid, trials=300, generator=torch.Generator().manual_seed(0), progress=False
    )
    n_c = check_capacity_table(table, dims)
    print("check 10: N_c =", n_c)
    assert n_c["diffusion"][16] < n_c["diffusion"][24] < n_c["diffusion"][32]


def test_capacity_bad_arguments():
    with pytest.raises(ValueError, match="rho must lie"):
        capacity_experiment([8], [2], rho=0.6, progress=False)
    with pytest.raises(ValueError, match="trials must be"):
        capacity_experiment([8], [2], trials=0, progress=False)
    table = capacity_experiment([8], [2], trials=5, progress=False)
    with pytest.raises(ValueError, match="threshold"):
        capacity(table, threshold=0.0)
