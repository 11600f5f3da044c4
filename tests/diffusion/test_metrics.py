"""Sample distances used to judge the samplers."""

from __future__ import annotations

import pytest
import torch

from pyro_ext.diffusion.metrics import energy_distance, sliced_wasserstein


def direct_energy_distance(x, y, unbiased):
    def mean_dist(a, b, drop_diagonal):
        d = torch.cdist(a, b)
        n = a.shape[0] * (b.shape[0] - 1) if drop_diagonal else d.numel()
        return d.sum() / n

    return 2 * mean_dist(x, y, False) - mean_dist(x, x, unbiased) - mean_dist(y, y, unbiased)


@pytest.mark.parametrize("unbiased", [False, True])
def test_energy_distance_matches_the_definition_and_chunking(unbiased):
    x, y = torch.randn(57, 3), torch.randn(41, 3) + 0.3
    expected = direct_energy_distance(x, y, unbiased)
    for chunk in (1, 7, 1000):
        torch.testing.assert_close(energy_distance(x, y, unbiased=unbiased, chunk_size=chunk), expected)
    torch.testing.assert_close(energy_distance(y, x, unbiased=unbiased), expected)  # symmetric


def test_energy_distance_is_computed_in_float64():
    x, y = torch.randn(300, 2), torch.randn(300, 2) + 0.1
    distance = energy_distance(x.float(), y.float())
    assert distance.dtype == torch.float64
    torch.testing.assert_close(
        distance, energy_distance(x.float().double(), y.float().double()), rtol=0, atol=0
    )


def test_energy_distance_separates_distributions():
    g = torch.Generator().manual_seed(0)
    x, same, shifted = (torch.randn(2000, 2, generator=g) for _ in range(3))
    same_distance = float(energy_distance(x, same))
    # the V-statistic floor is ≈ (1/n + 1/m) E|X − X'| = 2/2000 · √π ≈ 0.0018 for standard 2-D normals
    assert 0.0 < same_distance < 0.004
    assert float(energy_distance(x, shifted + 0.5)) > 10 * same_distance
    assert abs(float(energy_distance(x, same, unbiased=True))) < 0.003
    assert float(energy_distance(x, x)) == pytest.approx(0.0, abs=1e-12)


def test_sliced_wasserstein_in_one_dimension_is_the_sorted_w2():
    x, y = torch.randn(300, 1), torch.randn(300, 1) * 2 + 1
    expected = (x.sort(0).values - y.sort(0).values).pow(2).mean().sqrt()
    torch.testing.assert_close(sliced_wasserstein(x, y, num_projections=3), expected)
    # a shift by v moves every sorted projection by exactly θ·v, so SW² is the mean of (θ·v)² over the
    # directions, E = |v|²/d; (θ·v)² has relative sd 1 in d = 4, so 2000 directions give SW a 1.1 % sd
    g = torch.Generator().manual_seed(0)
    base = torch.randn(300, 4, generator=g)
    shift = torch.tensor([2.0, 0.0, 0.0, 0.0])
    sw = float(sliced_wasserstein(base, base + shift, num_projections=2000, generator=g))
    assert sw == pytest.approx(2.0 / 2.0, rel=0.05)


def test_bad_inputs():
    with pytest.raises(ValueError, match="same dimension"):
        energy_distance(torch.randn(5, 2), torch.randn(5, 3))
    with pytest.raises(ValueError, match="shape"):
        energy_distance(torch.randn(5), torch.randn(5, 1))
    with pytest.raises(ValueError, match="non-finite"):
        energy_distance(torch.full((5, 2), float("nan")), torch.randn(5, 2))
    with pytest.raises(TypeError, match="tensor"):
        energy_distance([[0.0, 1.0]], torch.randn(5, 2))
    with pytest.raises(ValueError, match="same number"):
        sliced_wasserstein(torch.randn(5, 2), torch.randn(6, 2))
