"""P1 and P2 of the diffusion design note (§9): EmpiricalEnergy against its anchors.

- **P1** ``EmpiricalEnergy.score`` at (B, N, d) = (256, 60000, 784) against the two bare matmuls of the
  same shapes and dtype (``X @ Y.T`` and ``W @ Y``), the least work the score needs. Bar: efficiency
  ``t_matmuls / t_score >= 0.6`` on CPU in float32 and float64, ``>= 0.5`` with forced 8-way chunking.
- **P2** the closed-form score Jacobian against ``vmap(jacrev(-grad E))`` of the same energy written in
  plain torch, at (64, 1797, 64) on sklearn digits, float64. Bar: speed-up ``>= 10``, minimum of 5 runs.

The harness's ``ratio`` is ours / anchor (time); ``info`` carries the efficiency or speed-up and the bar.
``python -m benchmarks diffusion_energy [--quick]``.
"""

from __future__ import annotations

import time

import torch

from benchmarks.harness import Measurement, time_pair
from pyro_ext.diffusion import EmpiricalEnergy, VPLinear

__all__ = ["run"]


def _p1(batch: int, n: int, d: int, dtype: torch.dtype, chunks: int, repeats: int) -> Measurement:
    generator = torch.Generator().manual_seed(0)
    patterns = torch.rand(n, d, generator=generator, dtype=dtype)  # MNIST-like: pixels in [0, 1]
    schedule = VPLinear().to(dtype)
    t = 0.5
    chunk_size = None if chunks == 1 else -(-n // chunks)
    energy = EmpiricalEnergy(patterns, schedule, chunk_size=chunk_size)
    alpha, sigma = float(schedule.alpha(torch.tensor(t, dtype=dtype))), float(schedule.sigma(torch.tensor(t)))
    x = alpha * patterns[:batch] + sigma * torch.randn(batch, d, generator=generator, dtype=dtype)
    weights = torch.softmax(torch.randn(batch, n, generator=generator, dtype=dtype), -1)

    def ours():
        return energy.score(x, t)

    def anchor():
        return x @ patterns.T, weights @ patterns

    m = time_pair(
        f"P1 score {str(dtype).removeprefix('torch.')} chunks={chunks}",
        ours,
        anchor,
        repeats=repeats,
        info={"B,N,d": f"{batch},{n},{d}", "t": t},
    )
    flops = 4 * batch * n * d
    m.info.update(
        {
            "efficiency": round(m.anchor_s / m.ours_s, 3),
            "bar": 0.6 if chunks == 1 else 0.5,
            "TFLOP/s": round(flops / m.ours_s / 1e12, 3),
        }
    )
    return m


def _digits(quick: bool) -> torch.Tensor:
    try:
        from pyro_ext.datasets import digits

        return digits(scale="unit").images.to(torch.float64)
    except (ImportError, ModuleNotFoundError):  # scikit-learn absent: same shape, random pixels
        return torch.rand(1797, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _p2(batch: int, quick: bool, t: float, repeats: int) -> Measurement:
    patterns = _digits(quick)
    schedule = VPLinear()
    energy = EmpiricalEnergy(patterns, schedule)
    time64 = torch.tensor(t, dtype=torch.float64)  # the energy computes alpha, sigma in x's dtype
    alpha, sigma = float(schedule.alpha(time64)), float(schedule.sigma(time64))
    generator = torch.Generator().manual_seed(2)
    x = alpha * patterns[:batch] + sigma * torch.randn(batch, patterns.shape[1], generator=generator)
    a, c = alpha / sigma**2, alpha**2 / (2 * sigma**2)
    log_weights, norms = energy.log_weights, (patterns**2).sum(-1)

    def plain_energy(xi: torch.Tensor) -> torch.Tensor:
        return (xi @ xi) / (2 * sigma**2) - torch.logsumexp(log_weights + a * (patterns @ xi) - c * norms, 0)

    def score(xi: torch.Tensor) -> torch.Tensor:
        return -torch.func.grad(plain_energy)(xi)

    autograd_jacobian = torch.func.vmap(torch.func.jacrev(score))

    def ours():
        return energy.score_jacobian(x, t)

    def anchor():
        return autograd_jacobian(x)

    error = float((ours() - anchor()).abs().max() / anchor().abs().max())
    supports = (
        energy.posterior_weights(x, t) > 1e-16 * energy.posterior_weights(x, t).amax(-1, keepdim=True)
    ).sum(-1)
    route = "sparse" if int(supports.max()) <= 64 else ("dense" if int(supports.min()) > 64 else "mixed")
    # interleaved runs, minimum of each (the design note's "minimum of 5 runs")
    ours(), anchor()
    ours_times, anchor_times = [], []
    for _ in range(repeats):
        for fn, times in ((ours, ours_times), (anchor, anchor_times)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    m = Measurement(
        f"P2 jacobian t={t}",
        min(ours_times),
        min(anchor_times),
        repeats,
        {
            "B,N,d": f"{batch},{patterns.shape[0]},{patterns.shape[1]}",
            "route": route,
            "rel_error": f"{error:.1e}",
        },
    )
    m.info.update({"speedup": round(m.anchor_s / m.ours_s, 1), "bar": 10})
    return m


def run(quick: bool = False) -> list[Measurement]:
    """P1 (float32, float64, forced 8-way chunking) and P2 (dense-route and sparse-route times)."""
    if quick:
        sizes, repeats = (64, 6000, 784), 3
    else:
        sizes, repeats = (256, 60000, 784), 5
    results = [
        _p1(*sizes, torch.float32, 1, repeats),
        _p1(*sizes, torch.float64, 1, repeats),
        _p1(*sizes, torch.float32, 8, repeats),
        _p1(*sizes, torch.float64, 8, repeats),
    ]
    batch = 16 if quick else 64
    results.append(_p2(batch, quick, 0.5, 5))
    results.append(_p2(batch, quick, 0.05, 5))
    return results
