r"""Reverse-process samplers on a caller-supplied time grid, and the Gaussian late start.

Time runs forward (``t = 0`` data, ``t = t_max`` noise) with
:math:`x_t = \alpha(t) x_0 + \sigma(t)\varepsilon`. Every sampler takes the initial sample and a
strictly decreasing grid from the caller, so that starting late — from a Gaussian fit of the noisy data
at ``t_start`` instead of pure noise at ``t_max`` — is a drop-in change of ``x_init`` and ``times``:

.. code-block:: python

    x_init, q = gaussian_late_start(data, schedule=schedule, num_samples=1000)   # t_start = critical time
    times = time_grid(schedule, 5, t_start=q.t_start)
    x0 = sample(energy, x_init, times, "ddim")
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyro.distributions as dist
import torch
from torch import Tensor
from tqdm import tqdm  # the text bar: tqdm.auto warns in notebooks without ipywidgets

from pyro_ext.diffusion.geometry import critical_time
from pyro_ext.diffusion.schedules import Schedule

__all__ = [
    "METHODS",
    "SPACINGS",
    "GaussianStats",
    "fit_gaussian",
    "gaussian_late_start",
    "late_start_distribution",
    "sample",
    "time_grid",
]

#: the samplers :func:`sample` knows, and what one interval costs in score evaluations
METHODS = {"euler_maruyama": 1, "pf_euler": 1, "pf_heun": 2, "ddim": 1}
#: the grid spacings :func:`time_grid` knows
SPACINGS = ("uniform", "log_snr", "ddpm_skip")


# ----------------------------------------------------------------------------------------------- helpers


def _as_float(value: Any) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)


def _coef(fn: Callable[[Tensor], Any], t: float) -> float:
    """A schedule coefficient at ``t`` as a Python float, computed in float64 whatever the buffers' dtype."""
    return _as_float(fn(torch.tensor(t, dtype=torch.float64)))


def _resolve_schedule(model: Any, schedule: Schedule | None) -> Schedule:
    if schedule is None:
        schedule = getattr(model, "schedule", None)
    if schedule is None:
        raise TypeError(
            "model has no .schedule attribute; pass the noise schedule explicitly with schedule=..."
        )
    for name in ("alpha", "sigma", "f", "g2", "t_min", "t_max"):
        if not hasattr(schedule, name):
            raise TypeError(
                f"schedule must define {name} (see pyro_ext.diffusion.schedules); got {schedule!r}"
            )
    return schedule


def _resolve_score(model: Any) -> Callable[[Tensor, float], Tensor]:
    score = getattr(model, "score", None)
    if callable(score):
        return score
    if callable(model):
        return model
    raise TypeError(
        "model must have a score(x, t) method (an energy, ParametrisedScore or ScoreNetEnergy) or be a "
        f"callable score(x, t); got {type(model).__name__}"
    )


def _schedule_range(schedule: Schedule) -> tuple[float, float]:
    return _as_float(schedule.t_min), _as_float(schedule.t_max)


def _validate_times(times: Tensor | Sequence[float], schedule: Schedule) -> list[float]:
    """The grid as Python floats (float64) after checking shape, order and range."""
    try:
        grid = torch.as_tensor(times, dtype=torch.float64, device="cpu")
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(
            f"times must be a 1-D tensor or sequence of floats; got {type(times).__name__}"
        ) from error
    if grid.dim() != 1 or grid.numel() < 2:
        raise ValueError(
            "times must be a 1-D grid with at least 2 entries (t_start, ..., t_end); "
            f"got shape {tuple(grid.shape)}"
        )
    if not torch.isfinite(grid).all():
        raise ValueError("times holds non-finite values")
    steps = grid[:-1] - grid[1:]
    if (steps <= 0).any():
        k = int(torch.nonzero(steps <= 0)[0])
        raise ValueError(
            "times must be strictly decreasing, from noise to data (time runs forward: t = 0 is data); "
            f"got times[{k}] = {grid[k].item():.6g} <= times[{k + 1}] = {grid[k + 1].item():.6g}. "
            "Build grids with time_grid(schedule, n, t_start)."
        )
    if grid[-1] < 0:
        raise ValueError(f"times must end at t >= 0; got times[-1] = {grid[-1].item():.6g}")
    t_min, t_max = _schedule_range(schedule)
    # a final step into exactly 0 is always allowed: it is a denoising (x̂0) or drift-only step and
    # never evaluates the schedule at t = 0
    evaluated = grid[:-1] if grid[-1] == 0 else grid
    slack = 1e-12 * max(1.0, abs(t_max))
    if evaluated.max() > t_max + slack or evaluated.min() < t_min - slack:
        bad = evaluated[(evaluated > t_max + slack) | (evaluated < t_min - slack)][0].item()
        raise ValueError(
            f"times holds t = {bad:.6g}, outside the schedule's range [t_min, t_max] = "
            f"[{t_min:.6g}, {t_max:.6g}] (a grid may additionally end at exactly 0)"
        )
    return grid.tolist()


def _randn(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normals shaped like ``like``, drawn in float64 so that one seed gives the same noise in
    every dtype (and on the generator's device, so a CPU generator also drives a CUDA run)."""
    device = generator.device if generator is not None else like.device
    noise = torch.randn(like.shape, generator=generator, device=device, dtype=torch.float64)
    return noise.to(device=like.device, dtype=like.dtype)


class _ScoreEvaluator:
    """Calls the score, checks its shape and finiteness, and counts evaluations."""

    def __init__(self, score: Callable[[Tensor, float], Tensor]) -> None:
        self.score = score
        self.calls = 0

    def __call__(self, x: Tensor, t: float) -> Tensor:
        value = self.score(x, t)
        self.calls += 1
        if not isinstance(value, Tensor) or value.shape != x.shape:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"the model's score returned {shape} for x of shape {tuple(x.shape)}; x_init must have the "
                "model's event shape [..., d]"
            )
        return value.detach()


# ----------------------------------------------------------------------------------------------- samplers


def _step(
    method: str,
    score: _ScoreEvaluator,
    schedule: Schedule,
    x: Tensor,
    t: float,
    t_next: float,
    eta: float,
    generator: torch.Generator | None,
) -> Tensor:
    h = t - t_next
    into_zero = t_next == 0.0
    s = score(x, t)
    if method == "ddim":
        alpha, sigma = _coef(schedule.alpha, t), _coef(schedule.sigma, t)
        if alpha <= 0.0 or sigma <= 0.0:
            raise ValueError(
                f"DDIM needs alpha(t) > 0 and sigma(t) > 0; got {alpha=}, {sigma=} at t = {t:.6g}"
            )
        x0_hat = (x + sigma**2 * s) / alpha  # Tweedie
        if into_zero:
            return x0_hat
        eps_hat = -sigma * s
        alpha_next, sigma_next = _coef(schedule.alpha, t_next), _coef(schedule.sigma, t_next)
        c2 = eta**2 * (sigma_next**2 / sigma**2) * (sigma**2 - alpha**2 * sigma_next**2 / alpha_next**2)
        c2 = min(max(c2, 0.0), sigma_next**2)  # roundoff only: 0 <= c² <= σ'² holds for 0 <= η <= 1
        x_next = alpha_next * x0_hat + math.sqrt(sigma_next**2 - c2) * eps_hat
        if c2 > 0.0:
            x_next = x_next + math.sqrt(c2) * _randn(x, generator)
        return x_next
    f, g2 = _coef(schedule.f, t), _coef(schedule.g2, t)
    if method == "euler_maruyama":
        x_next = x - h * (f * x - g2 * s)
        if not into_zero:  # the step into 0 is drift-only: no noise is left to add at the data end
            x_next = x_next + math.sqrt(g2 * h) * _randn(x, generator)
        return x_next
    drift = f * x - 0.5 * g2 * s  # probability-flow ODE dx/dt = f x - ½ g² s
    x_euler = x - h * drift
    if method == "pf_euler" or into_zero:  # Heun skips its corrector on a final step into 0 (score singular)
        return x_euler
    f_next, g2_next = _coef(schedule.f, t_next), _coef(schedule.g2, t_next)
    drift_next = f_next * x_euler - 0.5 * g2_next * score(x_euler, t_next)
    return x - 0.5 * h * (drift + drift_next)


def sample(
    model: Any,
    x_init: Tensor,
    times: Tensor | Sequence[float],
    method: str = "euler_maruyama",
    *,
    schedule: Schedule | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
    progress: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Run the reverse (generative) process from ``x_init`` at ``times[0]`` down the grid ``times``.

    With :math:`h = t_k - t_{k+1}`, :math:`s = s(x, t_k)` and primes marking values at :math:`t_{k+1}`:

    - ``"euler_maruyama"``, the reverse SDE:
      :math:`x \leftarrow x - h(f x - g^2 s) + \sqrt{g^2 h}\, z`;
    - ``"pf_euler"`` / ``"pf_heun"``, the probability-flow ODE :math:`\dot x = f x - \tfrac12 g^2 s`
      with Euler or Heun (trapezoidal corrector, two score evaluations per interval);
    - ``"ddim"``, DDIM(η): :math:`\hat x_0 = (x + \sigma^2 s)/\alpha`, :math:`\hat\varepsilon = -\sigma s`,

      .. math::

          c^2 = \eta^2 \frac{\sigma'^2}{\sigma^2}
          \Big(\sigma^2 - \frac{\alpha^2\sigma'^2}{\alpha'^2}\Big),\qquad
          x' = \alpha'\hat x_0 + \sqrt{\sigma'^2 - c^2}\,\hat\varepsilon + c z,

      which is deterministic for η = 0, the ancestral DDPM step for η = 1, and holds for VE schedules too.

    A grid that ends at exactly ``t = 0`` finishes with a step that never evaluates the score at 0
    (where it is singular): DDIM returns the denoised :math:`\hat x_0`, Euler–Maruyama takes a drift-only
    step and Heun skips its corrector. (The SDE and ODE steps therefore end at the schedule's own
    ``t = 0`` marginal, which for :class:`~pyro_ext.diffusion.schedules.VEGeometric` still holds the noise
    :math:`\sigma(0) = \sigma_{\min}`; DDIM removes it.)

    :param model: anything with ``score(x, t)`` (an energy of :mod:`~pyro_ext.diffusion.energy`, a
        ``ParametrisedScore``, a ``ScoreNetEnergy``) or a callable ``score(x, t)``.
    :param Tensor x_init: the sample at ``times[0]``, shape ``[..., d]``; its dtype and device are used.
    :param times: a strictly decreasing 1-D grid inside ``[schedule.t_min, schedule.t_max]``, optionally
        ending at 0; see :func:`time_grid`.
    :param str method: ``"euler_maruyama"``, ``"pf_euler"``, ``"pf_heun"`` or ``"ddim"``.
    :param schedule: the noise schedule; ``model.schedule`` if omitted.
    :param float eta: DDIM stochasticity in ``[0, 1]`` (only for ``method="ddim"``).
    :param torch.Generator generator: source of the noise (the global generator if ``None``).
    :param bool return_trajectory: also return every state, shape ``[len(times), *x_init.shape]``.
    :param bool progress: show a progress bar.
    :returns: the sample at ``times[-1]`` (and the trajectory if asked for).

    Example::

        >>> from pyro_ext.diffusion import EmpiricalEnergy, VPLinear
        >>> energy = EmpiricalEnergy(torch.tensor([[-1.0], [1.0]]), VPLinear())
        >>> times = time_grid(energy.schedule, 50)
        >>> x0 = sample(energy, torch.randn(1000, 1), times, "ddim", progress=False)

    References: Song et al., score SDE, arXiv:2011.13456; Song, Meng & Ermon, DDIM, arXiv:2010.02502;
    Karras et al. (Heun), arXiv:2206.00364.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")
    if not isinstance(x_init, Tensor):
        raise TypeError(f"x_init must be a tensor of shape [..., d]; got {type(x_init).__name__}")
    if x_init.dim() < 1 or not x_init.is_floating_point():
        raise ValueError(
            f"x_init must be a floating-point tensor of shape [..., d]; got {tuple(x_init.shape)}"
        )
    if not torch.isfinite(x_init).all():
        raise ValueError("x_init holds non-finite values")
    eta = float(eta)
    if method == "ddim":
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must lie in [0, 1] (0: deterministic DDIM, 1: ancestral DDPM); got {eta}")
    elif eta != 0.0:
        raise ValueError(f"eta is a DDIM parameter; method={method!r} takes none (got eta={eta})")
    schedule = _resolve_schedule(model, schedule)
    score = _ScoreEvaluator(_resolve_score(model))
    grid = _validate_times(times, schedule)

    x = x_init.detach()
    trajectory = [x] if return_trajectory else None
    steps = tqdm(range(len(grid) - 1), desc=f"sample ({method})", disable=not progress, leave=False)
    for k in steps:
        x = _step(method, score, schedule, x, grid[k], grid[k + 1], eta, generator).detach()
        if not torch.isfinite(x).all():
            raise FloatingPointError(
                f"the {method} step from t = {grid[k]:.6g} to t = {grid[k + 1]:.6g} produced non-finite "
                "values; the score is non-finite there (is sigma(t) = 0 inside the grid? end the grid at 0)"
            )
        if trajectory is not None:
            trajectory.append(x)
    if trajectory is not None:
        return x, torch.stack(trajectory)
    return x


# ----------------------------------------------------------------------------------------------- grids


def _ddpm_steps(schedule: Schedule, num_train_steps: int | None) -> int:
    if num_train_steps is None:
        for name in ("K", "num_steps", "num_timesteps"):
            value = getattr(schedule, name, None)
            if isinstance(value, int):
                return value
        return 1000
    if not isinstance(num_train_steps, int) or num_train_steps < 1:
        raise ValueError(f"num_train_steps must be a positive integer; got {num_train_steps!r}")
    return num_train_steps


def time_grid(
    schedule: Schedule,
    n: int,
    t_start: float | None = None,
    spacing: str = "uniform",
    *,
    t_end: float | None = None,
    num_train_steps: int | None = None,
) -> Tensor:
    r"""A strictly decreasing grid of ``n + 1`` times from ``t_start`` to 0, for ``n`` sampler steps.

    - ``"uniform"``: equal steps in ``t``.
    - ``"log_snr"``: :math:`t_k = t(\lambda_k)` with :math:`\lambda_k` equally spaced from
      :math:`\lambda(t_{\mathrm{start}})` to :math:`\lambda(t_{\mathrm{end}})` for ``k < n``; the last
      point is replaced by 0, so that the final step is the denoising step of the sampler. By default
      :math:`\lambda(t_{\mathrm{end}}) = \min(\lambda(t_{\min}), \log 10^3)`, a noise-to-signal ratio
      σ/α ≈ 0.03, which suits data of unit scale (a smaller end point spends few-step grids on noise
      levels where nothing changes: on the 8-Gaussian ring, σ/α = 0.01 left 3-step DDIM 2× worse).
    - ``"ddpm_skip"``: the integer grids of DDPM code, with step ``j`` at ``t = (j + 1)/K``:
      ``j = floor(linspace(0, j_start, n))`` from the step of ``t_start`` down to ``j = 0``, then 0 —
      the grid the official late-start code uses. Its vanilla "uniform skip" (``arange(0, K, K // n)``)
      is ``time_grid(schedule, n, (K - K // n + 1) / K, "ddpm_skip")``.

    :param schedule: the noise schedule.
    :param int n: number of steps (intervals), ≥ 1.
    :param float t_start: the first time; ``schedule.t_max`` if omitted.
    :param str spacing: ``"uniform"``, ``"log_snr"`` or ``"ddpm_skip"``.
    :param float t_end: the end of the log-SNR spacing (``"log_snr"`` only).
    :param int num_train_steps: ``K`` of ``"ddpm_skip"``; the schedule's ``K`` or 1000 if omitted.
    :returns: a float64 tensor of shape ``[n + 1]`` with ``times[0] = t_start`` and ``times[-1] = 0``.

    Example::

        >>> time_grid(VPLinear(), 4)
        tensor([1.0000, 0.7500, 0.5000, 0.2500, 0.0000], dtype=torch.float64)

    References: Song, Meng & Ermon (DDIM), arXiv:2010.02502; Raya & Ambrogioni, arXiv:2305.19693.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {', '.join(map(repr, SPACINGS))}; got {spacing!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (the number of steps) must be a positive integer; got {n!r}")
    t_min, t_max = _schedule_range(schedule)
    t_start = t_max if t_start is None else _as_float(t_start)
    if not (math.isfinite(t_start) and 0.0 < t_start and t_min <= t_start <= t_max):
        raise ValueError(
            f"t_start must lie in the schedule's range [{t_min:.6g}, {t_max:.6g}] and be > 0; got {t_start}"
        )
    if spacing == "uniform":
        return torch.linspace(t_start, 0.0, n + 1, dtype=torch.float64)
    if spacing == "ddpm_skip":
        K = _ddpm_steps(schedule, num_train_steps)
        j_start = min(max(round(t_start * K - 1), 0), K - 1)
        if n > j_start + 1:
            raise ValueError(
                f"ddpm_skip: n = {n} steps do not fit between DDPM step {j_start} "
                f"(t_start = {t_start:.6g}) and 0; use n <= {j_start + 1} or spacing='uniform'"
            )
        js = torch.linspace(0, j_start, n, dtype=torch.float64).floor().flip(0)
        return torch.cat([(js + 1.0) / K, js.new_zeros(1)])
    # log-SNR spacing
    lam_start = _coef(schedule.log_snr, t_start)
    if t_end is None:
        lam_end = min(_coef(schedule.log_snr, t_min), math.log(1e3))
    else:
        t_end = _as_float(t_end)
        if not t_min <= t_end < t_start:
            raise ValueError(
                f"t_end must lie in [t_min, t_start) = [{t_min:.6g}, {t_start:.6g}); got {t_end}"
            )
        lam_end = _coef(schedule.log_snr, t_end)
    if not lam_end > lam_start:
        raise ValueError(
            f"log_snr spacing needs log_snr(t_end) > log_snr(t_start); got {lam_end:.4g} <= {lam_start:.4g} "
            "(t_start is already almost noise-free: use spacing='uniform' or a smaller t_end)"
        )
    lams = torch.linspace(lam_start, lam_end, n + 1, dtype=torch.float64)[1:n]
    inner = [_coef(schedule.t_of_log_snr, lam) for lam in lams.tolist()]
    grid = torch.tensor([t_start, *inner, 0.0], dtype=torch.float64)
    if ((grid[:-1] - grid[1:]) <= 0).any():
        raise ValueError(
            f"log_snr grid with n = {n} is not strictly decreasing; use fewer steps or 'uniform'"
        )
    return grid


# ----------------------------------------------------------------------------------------------- late start


@dataclass(frozen=True)
class GaussianStats:
    r"""Mean and (possibly low-rank plus isotropic) covariance of a data set.

    :math:`\Sigma = U \operatorname{diag}(\lambda - s^2) U^\top + s^2 I` with ``eigenvalues`` λ (decreasing,
    the top-k eigenvalues of Σ), ``eigenvectors`` U (``[d, k]``) and ``noise_variance`` :math:`s^2`. For a
    full-rank fit ``k = d`` and ``covariance`` holds Σ itself (:math:`s^2 = 0`).
    """

    mean: Tensor
    eigenvalues: Tensor
    eigenvectors: Tensor
    noise_variance: Tensor
    covariance: Tensor | None = None

    @property
    def dim(self) -> int:
        return self.mean.shape[-1]

    @property
    def rank(self) -> int:
        return self.eigenvalues.shape[-1]

    @property
    def is_low_rank(self) -> bool:
        return self.covariance is None

    @property
    def top_eigenvalue(self) -> float:
        """:math:`\\lambda_{\\max}(\\Sigma)`, which sets the critical time of the late start."""
        return float(self.eigenvalues[0])

    def covariance_matrix(self) -> Tensor:
        """Σ as a dense ``[d, d]`` matrix."""
        if self.covariance is not None:
            return self.covariance
        U = self.eigenvectors
        eye = torch.eye(self.dim, dtype=U.dtype, device=U.device)
        return (U * (self.eigenvalues - self.noise_variance)) @ U.T + self.noise_variance * eye

    @classmethod
    def from_moments(cls, mean: Tensor, cov: Tensor, rank: int | None = None) -> GaussianStats:
        """Statistics from a given mean and covariance; ``rank`` truncates Σ to its PPCA form."""
        mean, cov = torch.as_tensor(mean), torch.as_tensor(cov)
        if mean.dim() != 1:
            raise ValueError(f"mean must have shape [d]; got {tuple(mean.shape)}")
        d = mean.shape[0]
        if cov.shape != (d, d):
            raise ValueError(f"cov must have shape [d, d] = [{d}, {d}] to match mean; got {tuple(cov.shape)}")
        if not (torch.isfinite(mean).all() and torch.isfinite(cov).all()):
            raise ValueError("mean and cov must be finite")
        cov = cov.to(mean)
        if not torch.allclose(cov, cov.T, rtol=1e-6, atol=1e-10 * max(float(cov.abs().max()), 1.0)):
            raise ValueError("cov must be symmetric")
        cov = 0.5 * (cov + cov.T)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
        if eigenvalues[-1] < -1e-8 * max(float(eigenvalues[0]), 1e-300):
            raise ValueError(
                f"cov must be positive semi-definite; its smallest eigenvalue is {eigenvalues[-1]:.3g}"
            )
        eigenvalues = eigenvalues.clamp_min(0.0)
        if rank is None or rank == d:
            return cls(mean, eigenvalues, eigenvectors, mean.new_zeros(()), cov)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= d:
            raise ValueError(f"rank must be an integer in [1, d] = [1, {d}] or None (full); got {rank!r}")
        # Tipping & Bishop's maximum-likelihood PPCA: s² is the mean discarded eigenvalue, and the top
        # eigenvalues of Σ are kept exactly (the factor carries λ_i − s²)
        noise = eigenvalues[rank:].mean()
        return cls(mean, eigenvalues[:rank], eigenvectors[:, :rank], noise, None)


def fit_gaussian(data: Tensor, rank: int | None = None) -> GaussianStats:
    r"""Mean and covariance of ``data``, full or probabilistic-PCA.

    The full fit is the sample mean and the unbiased sample covariance. With ``rank=k`` the covariance is
    replaced by its maximum-likelihood PPCA form :math:`U_k\operatorname{diag}(\lambda_{1..k} - s^2)U_k^\top
    + s^2 I` with :math:`s^2` the mean of the discarded eigenvalues; this keeps memory at ``O(dk)`` for the
    late start and is exact on data whose covariance has that form.

    :param Tensor data: samples of shape ``[n, d]`` (``n ≥ 2``).
    :param int rank: number of principal directions kept, or ``None`` for the full covariance.
    :returns: :class:`GaussianStats`.

    Example::

        >>> stats = fit_gaussian(torch.randn(1000, 3) * torch.tensor([3.0, 1.0, 0.5]), rank=1)
        >>> stats.top_eigenvalue  # ≈ 9

    References: Tipping & Bishop, "Probabilistic principal component analysis" (1999).
    """
    if not isinstance(data, Tensor):
        raise TypeError(f"data must be a tensor of shape [n, d]; got {type(data).__name__}")
    if data.dim() != 2 or data.shape[0] < 2:
        raise ValueError(f"data must have shape [n, d] with n >= 2; got {tuple(data.shape)}")
    if not data.is_floating_point():
        data = data.to(torch.get_default_dtype())
    if not torch.isfinite(data).all():
        raise ValueError("data holds non-finite values")
    mean = data.mean(0)
    centred = data - mean
    cov = centred.T @ centred / (data.shape[0] - 1)
    return GaussianStats.from_moments(mean, cov, rank)


def late_start_distribution(
    stats: GaussianStats, schedule: Schedule, t_start: float
) -> dist.MultivariateNormal | dist.LowRankMultivariateNormal:
    r"""The Gaussian approximation of the noisy data at ``t_start``.

    For data with mean μ and covariance Σ, :math:`x_t = \alpha x_0 + \sigma\varepsilon` has mean
    :math:`\alpha\mu` and covariance :math:`\alpha^2\Sigma + \sigma^2 I` exactly, so

    .. math::

        q = \mathcal N(\alpha\mu,\ \alpha^2\Sigma + \sigma^2 I)
        \quad\text{or, for PPCA stats,}\quad
        \mathcal N\big(\alpha\mu,\ \alpha^2 U(\Lambda - s^2)U^\top + (\alpha^2 s^2 + \sigma^2) I\big)

    (a ``LowRankMultivariateNormal``). This equals in expectation the official code's mean and covariance
    of noised training data, without the sampling noise. The returned distribution carries ``t_start``.

    :param GaussianStats stats: from :func:`fit_gaussian` or :meth:`GaussianStats.from_moments`.
    :param schedule: the noise schedule.
    :param float t_start: the start time, inside the schedule's range.
    :returns: a Pyro ``MultivariateNormal`` or ``LowRankMultivariateNormal`` with attribute ``t_start``.

    Example::

        >>> q = late_start_distribution(fit_gaussian(data), VPLinear(), 0.3)
        >>> x_init = q.sample((1000,))

    References: Raya & Ambrogioni, "Spontaneous symmetry breaking in generative diffusion models",
    arXiv:2305.19693.
    """
    if not isinstance(stats, GaussianStats):
        raise TypeError(f"stats must be GaussianStats (from fit_gaussian); got {type(stats).__name__}")
    t_min, t_max = _schedule_range(schedule)
    t_start = _as_float(t_start)
    if not (math.isfinite(t_start) and t_min <= t_start <= t_max):
        raise ValueError(
            f"t_start must lie in the schedule's range [{t_min:.6g}, {t_max:.6g}]; got {t_start}"
        )
    alpha, sigma = _coef(schedule.alpha, t_start), _coef(schedule.sigma, t_start)
    loc = alpha * stats.mean
    if stats.is_low_rank:
        factor = alpha * stats.eigenvectors * (stats.eigenvalues - stats.noise_variance).clamp_min(0.0).sqrt()
        diag = (alpha**2 * stats.noise_variance + sigma**2) * torch.ones_like(stats.mean)
        q = dist.LowRankMultivariateNormal(loc, factor, diag)
    else:
        eye = torch.eye(stats.dim, dtype=stats.mean.dtype, device=stats.mean.device)
        q = dist.MultivariateNormal(loc, covariance_matrix=alpha**2 * stats.covariance + sigma**2 * eye)
    q.t_start = t_start
    return q


def _sample_gaussian(
    q: dist.MultivariateNormal | dist.LowRankMultivariateNormal, n: int, generator: torch.Generator | None
) -> Tensor:
    """Reparametrised draws that honour ``generator`` (torch distributions do not take one)."""
    loc = q.loc
    shape = (n, loc.shape[-1])
    if isinstance(q, dist.LowRankMultivariateNormal):
        rank = q.cov_factor.shape[-1]
        z_factor = _randn(loc.new_empty(n, rank), generator)
        z_diag = _randn(loc.new_empty(shape), generator)
        return loc + z_factor @ q.cov_factor.T + z_diag * q.cov_diag.sqrt()
    return loc + _randn(loc.new_empty(shape), generator) @ q.scale_tril.T


def gaussian_late_start(
    data: Tensor | None = None,
    *,
    mean: Tensor | None = None,
    cov: Tensor | None = None,
    schedule: Schedule,
    t_start: float | None = None,
    num_samples: int,
    rank: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dist.MultivariateNormal | dist.LowRankMultivariateNormal]:
    r"""Initial samples for a late start: draws from the Gaussian fit of the noisy data at ``t_start``.

    Before the first symmetry-breaking (critical) time the generative dynamics only fluctuate around a
    central fixed point and the noisy marginal is nearly Gaussian, so sampling may start there from
    :math:`\mathcal N(\alpha\mu, \alpha^2\Sigma + \sigma^2 I)` (see :func:`late_start_distribution`) and
    spend its few steps where the distribution takes shape. By default ``t_start`` is the score-criterion
    critical time :math:`\mathrm{SNR}(t_c) = 1/\lambda_{\max}(\Sigma)` of
    :func:`~pyro_ext.diffusion.geometry.critical_time`.

    :param Tensor data: training data ``[n, d]``; or give ``mean`` and ``cov`` instead.
    :param Tensor mean: data mean ``[d]`` (with ``cov``, instead of ``data``).
    :param Tensor cov: data covariance ``[d, d]``.
    :param schedule: the noise schedule.
    :param float t_start: the start time; the score-critical time if omitted.
    :param int num_samples: number of initial samples.
    :param int rank: PPCA rank of the covariance (``None``: full).
    :param torch.Generator generator: source of the draws.
    :returns: ``(x_init, q)``: samples ``[num_samples, d]`` and the distribution (``q.t_start`` is the
        start time to begin the grid at).

    Example::

        >>> x_init, q = gaussian_late_start(data, schedule=VPLinear(), num_samples=2000)
        >>> x0 = sample(energy, x_init, time_grid(energy.schedule, 5, q.t_start), "ddim")

    References: Raya & Ambrogioni, arXiv:2305.19693 (official code:
    gabrielraya/symmetry_breaking_diffusion_models).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer; got {num_samples!r}")
    if data is not None:
        if mean is not None or cov is not None:
            raise ValueError("pass either data or (mean, cov), not both")
        stats = fit_gaussian(data, rank)
    else:
        if mean is None or cov is None:
            raise ValueError("pass data, or both mean and cov")
        stats = GaussianStats.from_moments(mean, cov, rank)
    if t_start is None:
        t_start = critical_time(stats, schedule, "score")
    q = late_start_distribution(stats, schedule, t_start)
    return _sample_gaussian(q, num_samples, generator), q
