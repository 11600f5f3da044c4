"""Sample-based distances between two point clouds, for judging samplers against exact samples."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["energy_distance", "sliced_wasserstein"]


def _check_pair(x: Tensor, y: Tensor) -> None:
    for name, value in (("x", x), ("y", y)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a tensor of shape [n, d]; got {type(value).__name__}")
        if value.dim() != 2 or value.shape[0] < 2:
            raise ValueError(f"{name} must have shape [n, d] with n >= 2; got {tuple(value.shape)}")
        if not torch.isfinite(value).all():
            raise ValueError(f"{name} holds non-finite values (NaN or inf)")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension d; got {x.shape[1]} and {y.shape[1]}")


def _mean_distance(a: Tensor, b: Tensor, chunk_size: int, exclude_diagonal: bool) -> Tensor:
    total = a.new_zeros(())
    for start in range(0, a.shape[0], chunk_size):
        total = total + torch.cdist(a[start : start + chunk_size], b).sum()
    pairs = a.shape[0] * (b.shape[0] - 1) if exclude_diagonal else a.shape[0] * b.shape[0]
    return total / pairs


def energy_distance(x: Tensor, y: Tensor, *, unbiased: bool = False, chunk_size: int = 1024) -> Tensor:
    r"""The (squared) energy distance between the samples ``x`` and ``y``.

    .. math::

        \mathcal{E}(P, Q) = 2\,\mathbb{E}\|X - Y\| - \mathbb{E}\|X - X'\| - \mathbb{E}\|Y - Y'\|,

    which is zero if and only if :math:`P = Q`. The default V-statistic (every pair, including
    :math:`X = X'`) is non-negative and biased upwards by about
    :math:`(1/n + 1/m)\,\mathbb{E}\|X - X'\|`; this is the Monte Carlo floor a perfect sampler reaches
    (≈ 0.001 for 4000 against 4000 points of a unit-scale 2-D distribution). ``unbiased=True`` uses the
    U-statistics for the within-sample terms instead (mean zero for :math:`P = Q`, may be negative).

    :param Tensor x: samples of shape ``[n, d]``.
    :param Tensor y: samples of shape ``[m, d]``.
    :param bool unbiased: U-statistics for the within-sample terms.
    :param int chunk_size: rows per distance block (memory is ``chunk_size × max(n, m)``).
    :returns: a 0-d float64 tensor.

    Example::

        >>> x, y = torch.randn(500, 2), torch.randn(500, 2) + 1.0
        >>> bool(energy_distance(x, y) > energy_distance(x, torch.randn(500, 2)))
        True

    References: Székely & Rizzo, "Energy statistics: a class of statistics based on distances" (2013).
    """
    _check_pair(x, y)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer; got {chunk_size}")
    # float64 whatever the inputs: cdist's matmul route loses ~1e-7·|x|² to cancellation in float32, which
    # is not small against the distances between close points that the floor is made of
    x, y = x.to(torch.float64), y.to(device=x.device, dtype=torch.float64)
    cross = _mean_distance(x, y, chunk_size, exclude_diagonal=False)
    within_x = _mean_distance(x, x, chunk_size, exclude_diagonal=unbiased)
    within_y = _mean_distance(y, y, chunk_size, exclude_diagonal=unbiased)
    return 2.0 * cross - within_x - within_y


def sliced_wasserstein(
    x: Tensor, y: Tensor, *, num_projections: int = 256, generator: torch.Generator | None = None
) -> Tensor:
    r"""The sliced 2-Wasserstein distance between two samples of equal size.

    .. math::

        SW_2(P, Q) = \Big(\mathbb{E}_{\theta \sim U(S^{d-1})}\,
        W_2^2(\theta^\top P, \theta^\top Q)\Big)^{1/2},

    with the one-dimensional :math:`W_2` of each projection computed by sorting, and the expectation
    taken over ``num_projections`` random directions.

    :param Tensor x: samples of shape ``[n, d]``.
    :param Tensor y: samples of shape ``[n, d]`` (the same ``n``).
    :param int num_projections: random directions.
    :param torch.Generator generator: source of the directions (the global one if ``None``).
    :returns: a 0-d tensor.

    Example::

        >>> bool(sliced_wasserstein(torch.randn(1000, 3), torch.randn(1000, 3) + 2.0) > 1.0)
        True

    References: Bonneel, Rabin, Peyré & Pfister, "Sliced and Radon Wasserstein barycenters of
    measures" (2015).
    """
    _check_pair(x, y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same number of samples; got {x.shape[0]} and {y.shape[0]}")
    if num_projections < 1:
        raise ValueError(f"num_projections must be a positive integer; got {num_projections}")
    y = y.to(x)
    device = generator.device if generator is not None else x.device
    directions = torch.randn(x.shape[1], num_projections, generator=generator, device=device, dtype=x.dtype)
    directions = directions.to(x.device)
    directions = directions / directions.norm(dim=0, keepdim=True)
    projected_x = (x @ directions).sort(dim=0).values
    projected_y = (y @ directions).sort(dim=0).values
    return (projected_x - projected_y).pow(2).mean().sqrt()
