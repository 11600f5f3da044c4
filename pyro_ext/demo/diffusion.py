"""Demo section: diffusion energies — late-start sampling, associative recall, and a trained energy net."""

from __future__ import annotations

import math

import torch

from pyro_ext import datasets
from pyro_ext.demo._runner import DemoContext
from pyro_ext.diffusion import EmpiricalEnergy, GaussianMixtureEnergy, ScoreNetEnergy, VPLinear
from pyro_ext.diffusion.metrics import energy_distance
from pyro_ext.diffusion.sampling import gaussian_late_start, sample, time_grid
from pyro_ext.diffusion.training import MLPScore, train_dsm

TITLE = "Diffusion models as energies: Gaussian late start, associative recall, energy-parametrised training"
ORDER = 40


def run(context: DemoContext) -> None:
    import matplotlib.pyplot as plt

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        generator = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        schedule = VPLinear()

        # 1. few-step DDIM on the 8-Gaussian ring with the exact score: vanilla against the late start
        angles = torch.arange(8) * (2 * math.pi / 8)
        ring = GaussianMixtureEnergy(
            1.2 * torch.stack([angles.cos(), angles.sin()], -1), 0.01, schedule=schedule
        )
        n_eval = 1000 if context.smoke else 4000
        reference = ring.sample(n_eval, 0.0, generator=generator)
        train = ring.sample(20_000, 0.0, generator=generator)
        steps = (2, 3, 5) if context.smoke else (2, 3, 5, 10, 20, 50)
        curve, shown = [], {}
        for n in steps:
            vanilla = sample(
                ring,
                torch.randn(n_eval, 2, generator=generator),
                time_grid(schedule, n),
                "ddim",
                progress=False,
            )
            x_init, q = gaussian_late_start(train, schedule=schedule, num_samples=n_eval, generator=generator)
            late = sample(ring, x_init, time_grid(schedule, n, q.t_start), "ddim", progress=False)
            curve.append(
                (float(energy_distance(vanilla, reference)), float(energy_distance(late, reference)))
            )
            if n == 3:
                shown = {"vanilla": vanilla, "late start": late}
        context.report("late-start time t_c", float(q.t_start))
        for n, (ed_vanilla, ed_late) in zip(steps, curve):
            context.report(
                f"ring energy distance, {n} DDIM steps (vanilla -> late start)",
                f"{ed_vanilla:.4f} -> {ed_late:.4f} ({ed_vanilla / ed_late:.0f}x)",
            )

        # 2. associative recall: the exact energy of the digits is a modern Hopfield energy; the posterior
        #    over stored digits given the top half of a stored digit singles it out
        digits = datasets.digits(scale="symmetric").images
        memory_top = EmpiricalEnergy(digits[:, :32], schedule)
        t_recall = float(schedule.t_of_log_snr(torch.tensor(math.log(1 / 0.3**2))))
        alpha = float(schedule.alpha(t_recall))
        probes = torch.randperm(digits.shape[0], generator=generator)[: 20 if context.smoke else 200]
        weights = memory_top.posterior_weights(alpha * digits[probes, :32], t_recall)
        recalled = float((weights.argmax(-1) == probes).double().mean())
        context.report("digits recalled from their top half (exact posterior, sigma/alpha = 0.3)", recalled)
        cue = digits[probes[0]]
        completion = weights[0] @ digits  # E[x0 | top half] = sum_i P(i | top half) y_i, exactly

        # 3. an energy-parametrised MLP trained by denoising score matching, sampled with DDIM
        train_steps = 60 if context.smoke else 3000
        net = MLPScore(2, hidden=64, param="energy")
        train_dsm(net, train, schedule, steps=train_steps, generator=generator, progress=False)
        learned = ScoreNetEnergy(net, schedule, "energy")
        x_init, q = gaussian_late_start(train, schedule=schedule, num_samples=n_eval, generator=generator)
        x = sample(learned, x_init, time_grid(schedule, 20, q.t_start), "ddim", progress=False)
        context.report(
            f"energy-MLP after {train_steps} steps, 20 late-start DDIM steps: energy distance",
            float(energy_distance(x, reference)),
        )

        figure, axes = plt.subplots(
            1, 5, figsize=(17, 3.4), gridspec_kw={"width_ratios": [1.4, 1, 1, 1, 0.8]}
        )
        curve_t = torch.tensor(curve)
        axes[0].plot(steps, curve_t[:, 0], "o-", label="vanilla (N(0, I) at t = 1)")
        axes[0].plot(steps, curve_t[:, 1], "s-", label=f"late start (t_c = {q.t_start:.2f})")
        axes[0].set(
            xscale="log",
            yscale="log",
            xlabel="DDIM steps",
            ylabel="energy distance",
            title="8-Gaussian ring, exact score",
        )
        axes[0].set_xticks(steps, [str(n) for n in steps], minor=False)
        axes[0].set_xticks([], minor=True)
        axes[0].legend(fontsize=8)
        for ax, (name, points) in zip(axes[1:3], shown.items()):
            ax.scatter(*points.T, s=1, alpha=0.4)
            ax.set(title=f"{name}, 3 steps", xlim=(-2, 2), ylim=(-2, 2), aspect="equal")
        axes[3].scatter(*x.T, s=1, alpha=0.4)
        axes[3].set(title=f"energy-MLP ({train_steps} steps)", xlim=(-2, 2), ylim=(-2, 2), aspect="equal")
        pair = torch.cat(
            [torch.cat([cue[:32], torch.full((32,), -1.0)]).reshape(8, 8), completion.reshape(8, 8)], 1
        )
        axes[4].imshow(pair, cmap="gray_r", vmin=-1, vmax=1)
        axes[4].set(title="recall: cue | completion", xticks=[], yticks=[])
        context.savefig(figure, "late_start_and_recall")
    finally:
        torch.set_default_dtype(previous)
