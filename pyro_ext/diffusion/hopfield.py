r"""Modern Hopfield networks and their identity with the exact diffusion energy.

The modern Hopfield energy and update of Ramsauer et al. are

.. math::

    E_H(\xi; \beta) = -\beta^{-1}\operatorname{logsumexp}_i(\beta y_i^T\xi + b_i) + \tfrac12\|\xi\|^2,
    \qquad \xi \leftarrow \sum_i \operatorname{softmax}_i(\beta Y\xi + b)\, y_i,

with an optional per-memory bias :math:`b` (0 in Ramsauer et al.). With :math:`\xi = x/\alpha`,
:math:`\beta = \alpha^2/\sigma^2` (the SNR) and :math:`b_i = \log\pi_i - \tfrac\beta2\|y_i\|^2`, the
logits are those of :class:`~pyro_ext.diffusion.energy.EmpiricalEnergy`, so (derived form, §2.3 of the
design note):

- for equal-norm patterns and uniform weights, :math:`(\sigma^2/\alpha^2)E = E_H + \text{const}`;
- one Hopfield update with that bias returns exactly the denoiser :math:`m(x) = E[x_0 \mid x_t = x]`,
  i.e. one Tweedie step (a DDIM step from ``t`` to 0).

That diffusion models are such associative memories, with the noise variance as temperature, is the thesis
of Ambrogioni's "In search of dispersed memories".

References: Ramsauer et al., arXiv:2008.02217; Ambrogioni, arXiv:2309.17290.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from pyro_ext.diffusion._validation import check_finite, check_vector
from pyro_ext.diffusion.energy.base import Energy

__all__ = [
    "CapacityTable",
    "capacity",
    "capacity_experiment",
    "diffusion_bias",
    "hopfield_energy",
    "hopfield_update",
    "retrieve_diffusion",
    "retrieve_hopfield",
]


def _check(xi: Tensor, patterns: Tensor, beta: float | Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    if not isinstance(patterns, Tensor) or patterns.dim() < 2 or not patterns.is_floating_point():
        raise ValueError(
            "patterns must be a floating tensor of shape [N, d] (or [..., N, d], one set per state)"
        )
    check_finite(patterns, "patterns")
    xi = check_vector(xi, patterns.shape[-1], "xi")
    beta = torch.as_tensor(beta, dtype=xi.dtype, device=xi.device)
    if not bool((beta > 0).all()) or not bool(torch.isfinite(beta).all()):
        raise ValueError(f"beta must be positive and finite; got {beta.tolist()}")
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape[-1:] != patterns.shape[-2:-1]):
        raise ValueError(f"bias must be a tensor of shape [..., {patterns.shape[-2]}] (one per pattern)")
    return xi, beta


def _logits(xi: Tensor, patterns: Tensor, beta: Tensor, bias: Tensor | None) -> Tensor:
    overlaps = (patterns.to(xi.dtype) @ xi[..., None])[..., 0]  # [..., N]; patterns [N, d] or [..., N, d]
    logits = beta[..., None] * overlaps
    return logits if bias is None else logits + bias.to(xi.dtype)


def hopfield_energy(xi: Tensor, patterns: Tensor, beta: float | Tensor, bias: Tensor | None = None) -> Tensor:
    r"""Modern Hopfield energy :math:`-\beta^{-1}\log\sum_i e^{\beta y_i^T\xi + b_i} + \tfrac12\|\xi\|^2`.

    :param Tensor xi: states, ``[..., d]``.
    :param Tensor patterns: stored memories :math:`y_i`, ``[N, d]`` (or ``[..., N, d]``: one set per state).
    :param beta: inverse temperature(s), a float or a tensor broadcasting against ``xi.shape[:-1]``.
    :param Tensor bias: optional per-memory bias :math:`b`, ``[..., N]``.
    :returns: ``[...]``.

    Example::

        >>> patterns = torch.sign(torch.randn(10, 64))
        >>> hopfield_energy(patterns[0], patterns, beta=0.5).shape
        torch.Size([])

    References: Ramsauer et al., arXiv:2008.02217.
    """
    xi, beta = _check(xi, patterns, beta, bias)
    lse = torch.logsumexp(_logits(xi, patterns, beta, bias), -1)
    return -lse / beta + 0.5 * (xi**2).sum(-1)


def hopfield_update(xi: Tensor, patterns: Tensor, beta: float | Tensor, bias: Tensor | None = None) -> Tensor:
    r"""One modern Hopfield update :math:`\xi \leftarrow Y^T\operatorname{softmax}(\beta Y\xi + b)`.

    With ``beta = schedule.snr(t)``, ``xi = x / alpha(t)`` and ``bias = diffusion_bias(...)`` this is
    exactly ``EmpiricalEnergy.denoise(x, t)``.

    :param Tensor xi: states, ``[..., d]``.
    :param Tensor patterns: ``[N, d]`` (or ``[..., N, d]``: one set per state).
    :param beta: inverse temperature(s).
    :param Tensor bias: optional per-memory bias, ``[..., N]``.
    :returns: the updated states, ``[..., d]``.

    Example::

        >>> patterns = torch.sign(torch.randn(10, 64))
        >>> cue = patterns[3] * torch.where(torch.rand(64) < 0.1, -1.0, 1.0)
        >>> bool((hopfield_update(cue, patterns, 1.0).sign() == patterns[3]).all())
        True

    References: Ramsauer et al., arXiv:2008.02217.
    """
    xi, beta = _check(xi, patterns, beta, bias)
    weights = torch.softmax(_logits(xi, patterns, beta, bias), -1)
    return (weights[..., None, :] @ patterns.to(xi.dtype))[..., 0, :]


def diffusion_bias(patterns: Tensor, beta: float | Tensor, log_weights: Tensor | None = None) -> Tensor:
    r"""The bias :math:`b_i = \log\pi_i - \tfrac\beta2\|y_i\|^2` that makes the Hopfield update the denoiser.

    For equal-norm patterns and uniform weights it is constant and may be dropped.

    :returns: ``[..., N]`` for ``beta`` of shape ``[...]``.
    """
    beta = torch.as_tensor(beta, dtype=patterns.dtype, device=patterns.device)
    bias = -0.5 * beta[..., None] * (patterns**2).sum(-1)
    return bias if log_weights is None else bias + log_weights.to(patterns.dtype)


def retrieve_hopfield(
    cue: Tensor,
    patterns: Tensor,
    beta: float | Tensor,
    *,
    bias: Tensor | None = None,
    max_steps: int = 100,
    tol: float = 1e-10,
) -> Tensor:
    r"""Iterate :func:`hopfield_update` from ``cue`` to a fixed point (associative recall).

    Stops when no state moves by more than ``tol`` (max-norm) or after ``max_steps`` updates.

    :param Tensor cue: ``[..., d]``, e.g. a stored pattern with some bits flipped.
    :param Tensor patterns: ``[N, d]``.
    :param beta: inverse temperature(s); :math:`\beta = 1/\sigma^2(t_0)` matches a diffusion started at
        noise level :math:`\sigma^2(t_0)` (VE).
    :param Tensor bias: optional per-memory bias.
    :param int max_steps: update limit.
    :param float tol: convergence tolerance.
    :returns: the retrieved states, ``[..., d]`` (take ``sign`` for binary memories).

    Example::

        >>> patterns = torch.sign(torch.randn(16, 32))
        >>> flipped = patterns[0] * torch.where(torch.arange(32) < 6, -1.0, 1.0)
        >>> bool((retrieve_hopfield(flipped, patterns, beta=1 / 0.8).sign() == patterns[0]).all())
        True

    References: Ramsauer et al., arXiv:2008.02217; Ambrogioni, arXiv:2309.17290.
    """
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive integer; got {max_steps!r}")
    xi, beta = _check(cue, patterns, beta, bias)
    for _ in range(max_steps):
        new = hopfield_update(xi, patterns, beta, bias)
        moved = (new - xi).abs().max() if new.numel() else torch.zeros(())
        xi = new
        if float(moved) <= tol:
            break
    return xi


# ------------------------------------------------------------------------------------------- retrieval
def _ddim_to_zero(
    x: Tensor, times: Sequence[float], schedule_alpha_sigma: Callable[[float], tuple[float, float]], denoise
) -> Tensor:
    """Deterministic DDIM (eta = 0) along ``times`` (decreasing), then the x0 step into 0."""
    for t, t_next in zip(times[:-1], times[1:]):
        alpha, sigma = schedule_alpha_sigma(t)
        alpha_next, sigma_next = schedule_alpha_sigma(t_next)
        x0_hat = denoise(x, t)
        eps_hat = (x - alpha * x0_hat) / sigma
        x = alpha_next * x0_hat + sigma_next * eps_hat
    return denoise(x, times[-1])


def retrieve_diffusion(cue: Tensor, energy: Energy, t0: float, times: Sequence[float] | Tensor) -> Tensor:
    r"""Associative recall by the deterministic reverse process: DDIM (:math:`\eta = 0`) from ``cue``.

    The cue is treated as :math:`x_{t_0}`; DDIM steps along ``times`` (strictly decreasing, starting at
    ``t0``) use the energy's denoiser, and a final :math:`\hat x_0` step returns the retrieved memory. A
    single-element grid ``[t0]`` is one Tweedie step, identical to one Hopfield update (§2.3).

    :param Tensor cue: ``[..., d]``.
    :param Energy energy: any energy (its ``denoise`` is used; exact for :class:`EmpiricalEnergy`).
    :param float t0: the start time, e.g. with :math:`\sigma^2(t_0) = \|cue - y\|^2/d`.
    :param times: the grid, ``times[0] == t0``.
    :returns: ``[..., d]`` (take ``sign`` for binary memories).

    Example::

        >>> from pyro_ext.diffusion import EmpiricalEnergy, VEVariance
        >>> patterns = torch.sign(torch.randn(16, 32))
        >>> energy = EmpiricalEnergy(patterns, VEVariance())
        >>> cue = patterns[0] * torch.where(torch.arange(32) < 6, -1.0, 1.0)
        >>> times = (0.8 * torch.logspace(0, -3, 20)).tolist()
        >>> bool((retrieve_diffusion(cue, energy, 0.8, times).sign() == patterns[0]).all())
        True

    References: Ambrogioni, arXiv:2309.17290; Song et al. (DDIM), arXiv:2010.02502.
    """
    if not isinstance(energy, Energy):
        raise TypeError(f"energy must be a pyro_ext.diffusion Energy; got {type(energy).__name__}")
    grid = [float(v) for v in (times.tolist() if isinstance(times, Tensor) else times)]
    if not grid or abs(grid[0] - float(t0)) > 1e-12 * max(1.0, abs(float(t0))):
        raise ValueError(f"times must start at t0 = {t0}; got {grid[:1]}")
    if any(b >= a for a, b in zip(grid[:-1], grid[1:])) or grid[-1] <= 0:
        raise ValueError("times must be strictly decreasing and positive (the x0 step into 0 is added)")
    schedule = energy.schedule

    def alpha_sigma(t: float) -> tuple[float, float]:
        t64 = torch.tensor(t, dtype=torch.float64)
        return float(schedule.alpha(t64)), float(schedule.sigma(t64))

    return _ddim_to_zero(cue, grid, alpha_sigma, energy.denoise)


# ----------------------------------------------------------------------------------------- capacity
@dataclass
class CapacityTable:
    """Success rates of recall by method, data dimension and number of stored patterns.

    ``success[method][d]`` is a list aligned with ``n_patterns[d]``; ``correct`` holds the per-trial
    outcomes (bool tensors ``[trials]``) for trial-by-trial comparisons.
    """

    rho: float
    trials: int
    n_patterns: dict[int, list[int]] = field(default_factory=dict)
    success: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    correct: dict[str, dict[int, list[Tensor]]] = field(default_factory=dict)

    def stderr(self, method: str, d: int) -> list[float]:
        r"""Binomial standard errors :math:`\sqrt{p(1-p)/n}` of the success rates."""
        return [math.sqrt(max(p * (1 - p), 0.0) / self.trials) for p in self.success[method][d]]


METHODS = ("diffusion", "hopfield", "diffusion_1step", "hopfield_1step")


def capacity_experiment(
    dims: Sequence[int],
    n_patterns: Sequence[int] | dict[int, Sequence[int]],
    rho: float = 0.2,
    trials: int = 300,
    score: Callable[[Tensor], Callable[[Tensor, Tensor], Tensor]] | None = None,
    *,
    steps: int = 20,
    hopfield_steps: int = 100,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> CapacityTable:
    r"""Recall of corrupted binary memories by diffusion and by modern Hopfield networks (§5 protocol).

    For every dimension ``d`` and number of patterns ``N``: ``trials`` times, draw ``N`` Rademacher patterns,
    flip :math:`\lfloor\rho d\rfloor` random bits of the first one to make the cue, and recall it by

    - ``"diffusion"``: DDIM (:math:`\eta = 0`) under :class:`~pyro_ext.diffusion.VEVariance` from
      :math:`\sigma^2(t_0) = 4\rho` (the cue's squared distance per coordinate), ``steps`` geometric steps
      to :math:`4\rho \cdot 10^{-3}`, then the :math:`\hat x_0` step;
    - ``"hopfield"``: iterated Hopfield updates at :math:`\beta_H = 1/\sigma^2(t_0)`;
    - ``"diffusion_1step"`` / ``"hopfield_1step"``: one Tweedie step / one Hopfield update (equal, §2.3).

    Success means ``sign(x)`` equals the stored pattern. The exact denoiser of the diffused patterns is one
    Hopfield update (equal norms, VE), so the exact score needs no energy object per trial.

    :param dims: data dimensions.
    :param n_patterns: numbers of stored patterns (a list for every ``d``, or a dict per ``d``).
    :param float rho: fraction of flipped bits.
    :param int trials: trials per ``(d, N)``.
    :param score: ``None`` for the exact score; otherwise a factory ``score(patterns [N, d]) ->
        callable(x, t) -> score`` (e.g. training a network on the patterns). The factory is called once per
        ``(d, N)`` with one shared pattern set; trials then differ in the cue only.
    :param int steps: DDIM steps.
    :param int hopfield_steps: maximum Hopfield iterations.
    :param generator: for reproducibility.
    :param bool progress: show a progress bar.
    :returns: a :class:`CapacityTable`.

    Example::

        >>> table = capacity_experiment([16], [4, 64], trials=50, progress=False)
        >>> table.success["diffusion"][16][0]
        1.0

    References: Ambrogioni, arXiv:2309.17290; Ramsauer et al., arXiv:2008.02217.
    """
    if not 0 < rho < 0.5:
        raise ValueError(f"rho must lie in (0, 0.5); got {rho}")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be a positive integer; got {trials!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps!r}")
    grids = {d: list(n_patterns[d] if isinstance(n_patterns, dict) else n_patterns) for d in dims}
    table = CapacityTable(rho=rho, trials=trials, n_patterns=grids)
    for method in METHODS:
        table.success[method] = {d: [] for d in dims}
        table.correct[method] = {d: [] for d in dims}
    sigma2_0 = 4.0 * rho
    times = (sigma2_0 * torch.logspace(0, -3, steps, dtype=torch.float64)).tolist()  # VEVariance: t = sigma^2
    dtype = torch.get_default_dtype()
    jobs = [(d, n) for d in dims for n in grids[d]]
    for d, n in tqdm(jobs, disable=not progress, desc="capacity"):
        if n < 1 or d < 1:
            raise ValueError(f"dims and n_patterns must be positive; got d={d}, N={n}")
        flips = int(math.floor(rho * d))
        shape = (trials, n, d) if score is None else (n, d)
        patterns = torch.randint(0, 2, shape, generator=generator).to(dtype) * 2 - 1
        targets = torch.randint(0, n, (trials,), generator=generator)
        stored = patterns[torch.arange(trials), targets] if score is None else patterns[targets]
        order = torch.rand(trials, d, generator=generator).argsort(-1)[:, :flips]
        signs = torch.ones(trials, d, dtype=dtype).scatter_(1, order, -1.0)
        cue = stored * signs
        if score is None:

            def denoise(x: Tensor, t: float, patterns: Tensor = patterns) -> Tensor:
                return hopfield_update(x, patterns, 1.0 / t)

        else:
            score_fn = score(patterns)

            def denoise(x: Tensor, t: float, score_fn=score_fn) -> Tensor:
                return x + t * score_fn(x, torch.full(x.shape[:-1], t, dtype=x.dtype))

        outcomes = {
            "diffusion": _ddim_to_zero(cue, times, lambda t: (1.0, math.sqrt(t)), denoise),
            "diffusion_1step": denoise(cue, sigma2_0),
            "hopfield": retrieve_hopfield(cue, patterns, 1.0 / sigma2_0, max_steps=hopfield_steps),
            "hopfield_1step": hopfield_update(cue, patterns, 1.0 / sigma2_0),
        }
        for method, x in outcomes.items():
            correct = (torch.sign(x) == stored).all(-1)
            table.correct[method][d].append(correct)
            table.success[method][d].append(float(correct.to(dtype).mean()))
    return table


def capacity(table: CapacityTable, threshold: float = 0.9) -> dict[str, dict[int, int]]:
    """The capacity :math:`N_c(d)`: the largest tested ``N`` whose success rate is at least ``threshold``.

    :returns: ``{method: {d: N_c}}`` (0 where no tested ``N`` reaches the threshold).
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must lie in (0, 1]; got {threshold}")
    result: dict[str, dict[int, int]] = {}
    for method, by_dim in table.success.items():
        result[method] = {}
        for d, rates in by_dim.items():
            passing = [n for n, rate in zip(table.n_patterns[d], rates) if rate >= threshold]
            result[method][d] = max(passing) if passing else 0
    return result
