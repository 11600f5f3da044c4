"""The Gaussian late-start curve of the diffusion design note (§4.1): a quality benchmark.

Data: the 8-Gaussian ring (radius 1.2, sd 0.1, λ_max ≈ 0.73) under ``VPLinear``, with the exact
``GaussianMixtureEnergy`` score, so that only the sampler's discretisation is measured. Sampler: DDIM(η = 0)
with ``n`` steps on uniform-t and uniform-log-SNR grids. Vanilla starts from N(0, I) at t = 1; gls starts
from the Gaussian fit of the noisy data at the score-critical time t_c ≈ 0.23
(``gaussian_late_start(data, schedule=...)``). Metric: energy distance (V-statistic) to 4000 exact samples
(the Monte Carlo floor is ≈ 0.001), and the sliced 2-Wasserstein distance.

How the harness is used: each row times ``ours`` = the gls run (drawing the start from the fitted Gaussian,
then n steps) against ``anchor`` = the vanilla run with the same number of steps, so ``ratio`` is the late
start's time overhead (≈ 1: the fit is done once, outside). The figures this benchmark exists for are in
``info``: ``ed_vanilla``, ``ed_gls``, ``factor`` = ed_vanilla / ed_gls (bar: ≥ 5 at n ∈ {2, 3, 5}; within
0.002 at n = 50), and the sliced-Wasserstein pair. The full run adds the 64-dimensional ``EmpiricalEnergy``
of sklearn digits (N = 1797), reported as curves only (its exact samples are the training digits).

``python -m benchmarks diffusion_gls [--quick] [--json PATH]``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from benchmarks.harness import Measurement, time_pair
from pyro_ext import datasets
from pyro_ext.diffusion import EmpiricalEnergy, GaussianMixtureEnergy, VPLinear
from pyro_ext.diffusion.geometry import critical_time
from pyro_ext.diffusion.metrics import energy_distance, sliced_wasserstein
from pyro_ext.diffusion.sampling import fit_gaussian, late_start_distribution, sample, time_grid

__all__ = ["run"]

STEPS = (2, 3, 5, 10, 20, 50)
BAR_STEPS = (2, 3, 5)


def ring_energy(schedule: VPLinear) -> GaussianMixtureEnergy:
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    means = 1.2 * torch.stack([angles.cos(), angles.sin()], -1)
    return GaussianMixtureEnergy(means, 0.01, schedule=schedule)


def _curve(
    name: str,
    energy: Any,
    train: torch.Tensor,
    reference: torch.Tensor,
    steps: tuple[int, ...],
    spacings: tuple[str, ...],
    num_samples: int,
    repeats: int,
    bar: bool,
) -> list[Measurement]:
    schedule = energy.schedule
    stats = fit_gaussian(train)
    t_start = critical_time(stats, schedule, "score")
    q = late_start_distribution(stats, schedule, t_start)
    d = train.shape[1]
    rows = []
    outputs: dict[str, torch.Tensor] = {}
    for spacing in spacings:
        for n in steps:
            generator = torch.Generator().manual_seed(n)
            vanilla_init = torch.randn(num_samples, d, generator=generator, dtype=torch.float64)
            gls_grid = time_grid(schedule, n, t_start, spacing)
            vanilla_grid = time_grid(schedule, n, schedule.t_max, spacing)

            def ours(grid: torch.Tensor = gls_grid) -> None:
                outputs["gls"] = sample(energy, q.sample((num_samples,)), grid, "ddim", progress=False)

            def anchor(grid: torch.Tensor = vanilla_grid, init: torch.Tensor = vanilla_init) -> None:
                outputs["vanilla"] = sample(energy, init, grid, "ddim", progress=False)

            m = time_pair(f"{name} {spacing} n={n}", ours, anchor, repeats=repeats, warmup=0)
            ed_vanilla = float(energy_distance(outputs["vanilla"], reference))
            ed_gls = float(energy_distance(outputs["gls"], reference))
            sw_generator = torch.Generator().manual_seed(0)
            m.info.update(
                {
                    "t_start": round(t_start, 4),
                    "ed_vanilla": round(ed_vanilla, 5),
                    "ed_gls": round(ed_gls, 5),
                    "factor": round(ed_vanilla / ed_gls, 1),
                    "sw_vanilla": round(
                        float(sliced_wasserstein(outputs["vanilla"], reference, generator=sw_generator)), 4
                    ),
                    "sw_gls": round(
                        float(sliced_wasserstein(outputs["gls"], reference, generator=sw_generator)), 4
                    ),
                }
            )
            if bar and n in BAR_STEPS:
                m.info["bar"] = "factor >= 5"
            elif bar and n == 50:
                m.info["bar"] = "ed_gls <= ed_vanilla + 0.002"
            rows.append(m)
    return rows


def run(quick: bool = False) -> list[Measurement]:
    """The late-start curve on the ring (and, in full mode, on sklearn digits)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)  # the late start's draws (q.sample) use the global generator
        schedule = VPLinear()
        energy = ring_energy(schedule)
        num_samples = 1000 if quick else 4000
        generator = torch.Generator().manual_seed(0)
        reference = energy.sample(num_samples, 0.0, generator=generator)
        train = energy.sample(20_000, 0.0, generator=generator)
        steps = (2, 5) if quick else STEPS
        rows = _curve(
            "ring",
            energy,
            train,
            reference,
            steps,
            ("uniform", "log_snr"),
            num_samples,
            repeats=1 if quick else 3,
            bar=not quick,  # 1000 quick samples put the Monte Carlo floor at ≈ 0.003: the bar is for 4000
        )
        if not quick:
            digits = datasets.digits(scale="symmetric").images
            digit_energy = EmpiricalEnergy(digits, schedule)
            picks = torch.randint(0, digits.shape[0], (2000,), generator=generator)
            rows += _curve(
                "digits",
                digit_energy,
                digits,
                digits[picks],
                (2, 5, 10, 20),
                ("uniform",),
                2000,
                repeats=1,
                bar=False,
            )
        return rows
    finally:
        torch.set_default_dtype(previous)
