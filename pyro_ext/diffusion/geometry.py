r"""Geometry of the generative dynamics: critical times, fixed points and score-Jacobian spectra.

At a symmetric centre of the data (uniform posterior weights) the log-density of the noisy data has Hessian
:math:`\nabla^2\log p_t = -I/\sigma^2 + (\alpha^2/\sigma^4)\Sigma`, with Σ the data covariance. The generative
dynamics descend the potentials

.. math::

    u_{\mathrm{SDE}} = \tfrac12 f\|x\|^2 - g^2\log p_t, \qquad
    u_{\mathrm{ODE}} = \tfrac12 f\|x\|^2 - \tfrac12 g^2\log p_t,

so along an eigen-direction λ of Σ the centre turns unstable (the first symmetry breaking) when

.. math::

    \frac{\alpha^2\lambda}{\sigma^4} - \frac1{\sigma^2} > \kappa\,\frac{f}{g^2},

with κ = 1 (reverse SDE, the criterion of Raya & Ambrogioni), κ = 2 (probability-flow ODE) or κ = 0 (the
score / self-consistency criterion :math:`\mathrm{SNR} = 1/\lambda`). These forms are derived in the design
note (``design/diffusion.md`` §6.1) and exact for equal-norm discrete or spherical data; elsewhere they are a
heuristic for the first bifurcation (for Gaussian data nothing bifurcates).

References: Raya & Ambrogioni, arXiv:2305.19693; Ambrogioni, arXiv:2310.17467;
Ventura et al., arXiv:2410.05898.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pyro_ext.diffusion.schedules import Schedule

__all__ = [
    "CRITERIA",
    "ManifoldDimension",
    "Spectrum",
    "critical_time",
    "estimate_manifold_dim",
    "fixed_point",
    "jacobian_spectrum",
    "order_parameter",
    "phase_boundaries",
    "schedule_kind",
    "score_jacobian",
    "spectral_gaps",
    "spectrum_over_time",
]

#: κ of each criterion in :math:`\alpha^2\lambda/\sigma^4 - 1/\sigma^2 > \kappa f/g^2`
CRITERIA = {"score": 0, "sde": 1, "ode": 2}


def _as_float(value: Any) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)


def _coef(fn: Callable[[Tensor], Any], t: float) -> float:
    return _as_float(fn(torch.tensor(t, dtype=torch.float64)))


def _check_criterion(criterion: str) -> int:
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(map(repr, CRITERIA))}; got {criterion!r}")
    return CRITERIA[criterion]


def schedule_kind(schedule: Schedule) -> str:
    """``"vp"`` if :math:`\\alpha^2 + \\sigma^2 = 1`, ``"ve"`` if :math:`\\alpha = 1`, else ``"general"``.

    Decided numerically on 17 interior times, so that any schedule object with ``alpha`` and ``sigma`` is
    classified, not only the classes of :mod:`~pyro_ext.diffusion.schedules`.
    """
    t_min, t_max = _as_float(schedule.t_min), _as_float(schedule.t_max)
    times = torch.linspace(t_min, t_max, 19, dtype=torch.float64)[1:-1]
    alpha = schedule.alpha(times).to(torch.float64)
    sigma = schedule.sigma(times).to(torch.float64)
    if torch.allclose(alpha, torch.ones_like(alpha), rtol=0.0, atol=1e-10):
        return "ve"
    if torch.allclose(alpha**2 + sigma**2, torch.ones_like(alpha), rtol=0.0, atol=1e-9):
        return "vp"
    return "general"


def _top_eigenvalue(spectrum_or_stats: Any) -> float:
    top = getattr(spectrum_or_stats, "top_eigenvalue", None)  # GaussianStats
    if top is not None:
        value = _as_float(top)
    elif isinstance(spectrum_or_stats, (int, float)) and not isinstance(spectrum_or_stats, bool):
        value = float(spectrum_or_stats)
    elif (
        isinstance(spectrum_or_stats, Tensor)
        and spectrum_or_stats.dim() <= 1
        and spectrum_or_stats.numel() > 0
    ):
        value = _as_float(spectrum_or_stats.max())
    else:
        raise TypeError(
            "spectrum_or_stats must be the data covariance's eigenvalues (a float or a 1-D tensor) or "
            f"GaussianStats from fit_gaussian(data); got {type(spectrum_or_stats).__name__}"
            + (f" of shape {tuple(spectrum_or_stats.shape)}" if isinstance(spectrum_or_stats, Tensor) else "")
        )
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(
            f"the top eigenvalue of the data covariance must be positive and finite; got {value}"
        )
    return value


def _time_of_log_snr(schedule: Schedule, log_snr: float, what: str) -> float:
    t_min, t_max = _as_float(schedule.t_min), _as_float(schedule.t_max)
    lo, hi = _coef(schedule.log_snr, t_max), _coef(schedule.log_snr, t_min)
    if not lo <= log_snr <= hi:
        raise ValueError(
            f"{what}: the critical log-SNR {log_snr:.6g} lies outside the schedule's range "
            f"[{lo:.6g}, {hi:.6g}] on [t_min, t_max] = [{t_min:g}, {t_max:g}]"
            + (
                " — the centre is still unstable at t_max: the schedule's noise does not reach the data "
                "scale; use a larger t_max/sigma_max or pass t_start explicitly"
                if log_snr < lo
                else " — the centre is stable down to t_min"
            )
        )
    return _coef(schedule.t_of_log_snr, log_snr)


def critical_time(spectrum_or_stats: Any, schedule: Schedule, criterion: str = "score") -> float:
    r"""The time of the first symmetry breaking: where the central fixed point turns unstable.

    With :math:`\lambda = \lambda_{\max}(\Sigma)` the centre is unstable for :math:`t < t_c`, where

    ================ ================================= ===============================================
    criterion        VE (:math:`\alpha = 1`)           VP (:math:`\alpha^2 + \sigma^2 = 1`)
    ================ ================================= ===============================================
    ``"score"``      :math:`\sigma_c^2 = \lambda`      :math:`\alpha_c^2 = 1/(1 + \lambda)`
    ``"sde"``        :math:`\sigma_c^2 = \lambda`      :math:`\alpha_c^2 = \sqrt{\lambda^2 + 1} - \lambda`
    ``"ode"``        :math:`\sigma_c^2 = \lambda`      :math:`\alpha_c^2 = 1 - \lambda` (none for λ ≥ 1)
    ================ ================================= ===============================================

    (score: :math:`\mathrm{SNR}(t_c) = 1/\lambda` for every schedule). These closed forms are mapped to
    time by ``schedule.t_of_log_snr``; other schedules solve
    :math:`\alpha^2\lambda - \sigma^2 - \kappa\sigma^4 f/g^2 = 0` by bisection. For two deltas at ±1 under
    a VP schedule the SDE value :math:`\alpha_c = \sqrt{\sqrt2 - 1}` is Eq. 8–10 of Raya & Ambrogioni; the
    other entries are derived in the design note (§6.1).

    :param spectrum_or_stats: the data covariance's eigenvalues (float or 1-D tensor; the largest is used)
        or :class:`~pyro_ext.diffusion.sampling.GaussianStats`.
    :param schedule: the noise schedule.
    :param str criterion: ``"score"``, ``"sde"`` or ``"ode"``.
    :returns: :math:`t_c` as a float.
    :raises ValueError: if the criterion is not crossed inside ``[t_min, t_max]``.

    Example::

        >>> critical_time(1.0, VPLinear(), "sde")  # two deltas at ±1: alpha_c^2 = sqrt(2) - 1
        0.2929...

    References: Raya & Ambrogioni, "Spontaneous symmetry breaking in generative diffusion models",
    arXiv:2305.19693.
    """
    kappa = _check_criterion(criterion)
    lam = _top_eigenvalue(spectrum_or_stats)
    kind = schedule_kind(schedule) if kappa else "ve"  # κ = 0 reads SNR = 1/λ for any schedule
    what = f"critical_time(criterion={criterion!r}, lambda_max={lam:.6g})"
    if kind == "ve":
        return _time_of_log_snr(schedule, -math.log(lam), what)
    if kind == "vp":
        if kappa == 1:
            a = 1.0 / (math.sqrt(lam * lam + 1.0) + lam)  # = sqrt(λ² + 1) - λ without cancellation
        elif lam >= 1.0:
            raise ValueError(
                f"{what}: for a VP schedule the probability-flow centre is unstable at every t when "
                "lambda_max >= 1 (alpha_c^2 = 1 - lambda_max <= 0); use criterion='sde' or 'score'"
            )
        else:
            a = 1.0 - lam
        return _time_of_log_snr(schedule, math.log(a) - math.log1p(-a), what)
    return _bisect_critical_time(schedule, lam, kappa, what)


def _bisect_critical_time(schedule: Schedule, lam: float, kappa: int, what: str) -> float:
    def margin(t: float) -> float:  # α²λ − σ² − κσ⁴ f/g²: > 0 where the centre is unstable
        alpha2, sigma2 = _coef(schedule.alpha, t) ** 2, _coef(schedule.sigma, t) ** 2
        return alpha2 * lam - sigma2 - kappa * sigma2**2 * _coef(schedule.f, t) / _coef(schedule.g2, t)

    lo, hi = _as_float(schedule.t_min), _as_float(schedule.t_max)
    start = margin(lo)
    if math.isfinite(start) and start <= 0.0:
        raise ValueError(f"{what}: the centre is already stable at t_min = {lo:g}; there is no critical time")
    if margin(hi) > 0.0:
        raise ValueError(
            f"{what}: the centre is still unstable at t_max = {hi:g}; the schedule's noise does not reach "
            "the data scale (use a larger t_max or pass the start time explicitly)"
        )
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if margin(mid) > 0.0 else (lo, mid)
    return 0.5 * (lo + hi)


# ----------------------------------------------------------------------------------------------- fixed points


def _resolve_schedule(model: Any, schedule: Schedule | None) -> Schedule:
    schedule = getattr(model, "schedule", None) if schedule is None else schedule
    if schedule is None:
        raise TypeError("model has no .schedule attribute; pass schedule=...")
    return schedule


def fixed_point(
    model: Any,
    x_init: Tensor,
    t: float,
    criterion: str = "score",
    *,
    schedule: Schedule | None = None,
    damping: float = 0.5,
    tol: float = 1e-12,
    max_iter: int = 10_000,
) -> Tensor:
    r"""A stationary point of the generative dynamics at time ``t``, by damped fixed-point iteration.

    With the denoiser :math:`\hat x_0(x) = (x + \sigma^2 s(x))/\alpha`, the stationarity conditions of
    :math:`u_{\mathrm{SDE}}` / :math:`u_{\mathrm{ODE}}` and the score's zero (κ = 1, 2, 0) all read

    .. math::

        x = \frac{g^2}{\kappa f \sigma^2 + g^2}\,\alpha\,\hat x_0(x)

    (derived form). For two deltas at ±1 and a VP schedule the SDE case is
    :math:`(1+\alpha^2)x^* = 2\alpha\tanh(\alpha x^*/(1-\alpha^2))` (Raya & Ambrogioni, Eq. 10).
    The iteration is :math:`x \leftarrow (1-\gamma)x + \gamma\,G(x)` with damping γ; it finds the stable
    fixed point in the basin of ``x_init``.

    :param model: anything with ``score(x, t)``.
    :param Tensor x_init: starting points ``[..., d]``.
    :param float t: the time.
    :param str criterion: ``"score"``, ``"sde"`` or ``"ode"``.
    :param schedule: the noise schedule (``model.schedule`` if omitted).
    :param float damping: γ in (0, 1].
    :param float tol: stop when no coordinate moves by more than ``tol · (1 + |x|)``.
    :param int max_iter: iteration cap (a ``RuntimeWarning`` says if it was hit).
    :returns: the fixed points, shape of ``x_init``.

    Example::

        >>> energy = EmpiricalEnergy(torch.tensor([[-1.0], [1.0]]), VPLinear())
        >>> t = float(energy.schedule.t_of_log_snr(math.log(0.64 / 0.36)))  # alpha = 0.8
        >>> fixed_point(energy, torch.ones(1), t, "sde")  # ≈ 0.947

    References: Raya & Ambrogioni, arXiv:2305.19693.
    """
    kappa = _check_criterion(criterion)
    schedule = _resolve_schedule(model, schedule)
    if not 0.0 < damping <= 1.0:
        raise ValueError(f"damping must lie in (0, 1]; got {damping}")
    t = _as_float(t)
    alpha, sigma = _coef(schedule.alpha, t), _coef(schedule.sigma, t)
    if alpha <= 0.0 or sigma <= 0.0:
        raise ValueError(
            f"fixed_point needs alpha(t) > 0 and sigma(t) > 0; got alpha={alpha}, sigma={sigma} at t={t}"
        )
    g2 = _coef(schedule.g2, t)
    gain = 1.0 if kappa == 0 else g2 / (kappa * _coef(schedule.f, t) * sigma**2 + g2)
    x = x_init.detach().clone()
    for _ in range(max_iter):
        with torch.enable_grad():  # energy-parametrised networks differentiate inside score()
            s = model.score(x, t).detach()
        target = gain * (x + sigma**2 * s)  # = gain · α · x̂0(x)
        step = damping * (target - x)
        x = x + step
        if bool((step.abs() <= tol * (1.0 + x.abs())).all()):
            return x
    warnings.warn(
        f"fixed_point did not converge in {max_iter} iterations (largest step "
        f"{float(step.abs().max()):.3g}); increase max_iter or damping",
        RuntimeWarning,
        stacklevel=2,
    )
    return x


def order_parameter(
    model: Any,
    t: float,
    criterion: str = "score",
    *,
    direction: Tensor | None = None,
    center: Tensor | None = None,
    schedule: Schedule | None = None,
    **kwargs: Any,
) -> float:
    r"""The order parameter of the first symmetry breaking: the stable fixed point's offset from the centre.

    Starts :func:`fixed_point` one noisy standard deviation along the top principal direction ``u`` of
    the data (from ``model.patterns`` if not given) and returns :math:`u^\top(x^* - \alpha c)`, with ``c``
    the data mean. It is ≈ 0 above the critical time and grows as :math:`\sqrt{t_c - t}` below it
    (mean-field exponent β = ½; derived for two deltas in the design note §6.2).

    :param model: anything with ``score(x, t)``.
    :param float t: the time.
    :param str criterion: ``"score"``, ``"sde"`` or ``"ode"``.
    :param Tensor direction: unit vector ``[d]``; the top principal direction of ``model.patterns`` if
        omitted.
    :param Tensor center: the data mean ``[d]``; the mean of ``model.patterns`` (or 0) if omitted.
    :param kwargs: passed to :func:`fixed_point`.

    Example::

        >>> energy = EmpiricalEnergy(torch.tensor([[-1.0], [1.0]]), VEVariance())
        >>> order_parameter(energy, 0.5)  # T = 0.5 below T_c = 1: ≈ sqrt(3 (1 - 0.5)) for small 1 - τ

    References: Ambrogioni, "The statistical thermodynamics of generative diffusion models", arXiv:2310.17467.
    """
    schedule = _resolve_schedule(model, schedule)
    patterns = getattr(model, "patterns", None)
    if direction is None or center is None:
        if patterns is None:
            raise TypeError("model has no .patterns; pass direction= and center=")
        mean = patterns.mean(0)
        if center is None:
            center = mean
        if direction is None:
            _, _, vh = torch.linalg.svd(patterns - mean, full_matrices=False)
            direction = vh[0]
    direction = direction / direction.norm()
    center = center.to(direction)
    t = _as_float(t)
    alpha, sigma = _coef(schedule.alpha, t), _coef(schedule.sigma, t)
    spread = float((((patterns - center) @ direction) ** 2).mean().sqrt()) if patterns is not None else 1.0
    x_init = alpha * center + direction * math.sqrt(alpha**2 * spread**2 + sigma**2)
    x_star = fixed_point(model, x_init, t, criterion, schedule=schedule, **kwargs)
    return float((x_star - alpha * center) @ direction)


# ----------------------------------------------------------------------------------------------- spectra


def score_jacobian(
    model: Any,
    x: Tensor,
    t: float | Tensor,
    method: str = "auto",
    *,
    chunk_size: int | None = None,
) -> Tensor:
    r"""The score Jacobian :math:`J = \nabla_x s(x, t) = -\nabla^2 E`, shape ``[..., d, d]``.

    - ``"closed_form"``: ``model.score_jacobian(x, t)`` (the exact energies' GEMM route);
    - ``"autograd"``: ``torch.func.vmap(jacrev(score))`` for any score, or
      :math:`-\mathrm{vmap}(\mathrm{hessian}(E))` for energy-parametrised networks
      (``model.param == "energy"``);
    - ``"auto"``: the closed form for exact energies (``model.exact``), autograd otherwise.

    :param model: anything with ``score(x, t)``.
    :param Tensor x: points ``[..., d]``.
    :param t: a float or a tensor broadcasting against ``x.shape[:-1]``.
    :param str method: ``"auto"``, ``"closed_form"`` or ``"autograd"``.
    :param int chunk_size: samples per ``vmap`` chunk (memory), autograd only.

    Example::

        >>> J = score_jacobian(energy, torch.randn(64, 2), 0.3)  # [64, 2, 2]

    References: Ventura, Achilli, Silvestri, Lucibello & Ambrogioni, arXiv:2410.05898.
    """
    if method not in ("auto", "closed_form", "autograd"):
        raise ValueError(f"method must be 'auto', 'closed_form' or 'autograd'; got {method!r}")
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise TypeError(f"x must be a tensor of shape [..., d]; got {type(x).__name__}")
    closed_form = getattr(model, "score_jacobian", None)
    if method == "auto":
        method = "closed_form" if (callable(closed_form) and getattr(model, "exact", False)) else "autograd"
    if method == "closed_form":
        if not callable(closed_form):
            raise TypeError(
                f"{type(model).__name__} has no closed-form score_jacobian; use method='autograd'"
            )
        return closed_form(x, t)
    batch, d = x.shape[:-1], x.shape[-1]
    t_tensor = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    try:
        t_flat = t_tensor.expand(batch).reshape(-1)
    except RuntimeError:
        raise ValueError(
            f"t of shape {tuple(t_tensor.shape)} does not broadcast against {tuple(batch)}"
        ) from None
    x_flat = x.detach().reshape(-1, d)
    if getattr(model, "param", None) == "energy" and callable(getattr(model, "energy", None)):

        def energy_single(xi: Tensor, ti: Tensor) -> Tensor:
            return model.energy(xi, ti)

        jac = -torch.func.vmap(torch.func.hessian(energy_single), in_dims=(0, 0), chunk_size=chunk_size)(
            x_flat, t_flat
        )
    else:

        def score_single(xi: Tensor, ti: Tensor) -> Tensor:
            return model.score(xi, ti)

        jac = torch.func.vmap(torch.func.jacrev(score_single), in_dims=(0, 0), chunk_size=chunk_size)(
            x_flat, t_flat
        )
    return jac.reshape(*batch, d, d)


@dataclass(frozen=True)
class Spectrum:
    r"""Per-sample spectra of score Jacobians, sorted in decreasing order (of magnitude for ``"eig"``).

    :ivar values: ``[..., d]`` spectra.
    :ivar mean: ``[d]`` mean over the samples.
    :ivar quantiles: ``[3, d]``: the 10 %, 50 % and 90 % quantiles over the samples.
    :ivar asymmetry: ``[...]`` :math:`\|J - J^\top\|_F/\|J\|_F` (0 for a conservative score).
    """

    values: Tensor
    mean: Tensor
    quantiles: Tensor
    asymmetry: Tensor


def jacobian_spectrum(
    J: Tensor, kind: str = "eig", normalize: str | None = "sigma2", *, sigma2: float | Tensor | None = None
) -> Spectrum:
    r"""Sorted spectra of score Jacobians.

    ``kind="eig"`` takes the eigenvalues of the symmetric part :math:`\tfrac12(J + J^\top)` (what the theory
    uses) and sorts them by decreasing magnitude; ``kind="svd"`` takes singular values (what the paper
    uses for trained networks). ``normalize="sigma2"`` returns :math:`\nu = \sigma^2|\lambda|`, which is 1
    along normal directions and :math:`\sigma^2/(\alpha^2\lambda_i + \sigma^2)` along tangent ones for the
    linear-manifold model; ``"max"`` divides by the largest magnitude per sample.

    :param Tensor J: Jacobians ``[..., d, d]``.
    :param str kind: ``"eig"`` or ``"svd"``.
    :param normalize: ``"sigma2"``, ``"max"`` or ``None``.
    :param sigma2: :math:`\sigma^2(t)` (float or tensor broadcasting against ``J.shape[:-2]``), for
        ``normalize="sigma2"``.

    Example::

        >>> spectrum = jacobian_spectrum(J, sigma2=float(schedule.sigma(t)) ** 2)
        >>> spectrum.values[:, 0]  # ≈ 1: the normal directions

    References: Ventura et al., arXiv:2410.05898.
    """
    if kind not in ("eig", "svd"):
        raise ValueError(f"kind must be 'eig' or 'svd'; got {kind!r}")
    if normalize not in ("sigma2", "max", None):
        raise ValueError(f"normalize must be 'sigma2', 'max' or None; got {normalize!r}")
    if not isinstance(J, Tensor) or J.dim() < 2 or J.shape[-1] != J.shape[-2]:
        raise ValueError(f"J must be a tensor of square matrices [..., d, d]; got {getattr(J, 'shape', J)}")
    asymmetry = torch.linalg.matrix_norm(J - J.mT) / torch.linalg.matrix_norm(J).clamp_min(
        torch.finfo(J.dtype).tiny
    )
    if kind == "eig":
        values = torch.linalg.eigvalsh(0.5 * (J + J.mT))
        order = values.abs().argsort(dim=-1, descending=True)
        values = values.gather(-1, order)
    else:
        values = torch.linalg.svdvals(J)
    if normalize == "sigma2":
        if sigma2 is None:
            raise ValueError("normalize='sigma2' needs sigma2 = schedule.sigma(t) ** 2")
        values = torch.as_tensor(sigma2, dtype=values.dtype, device=values.device)[..., None] * values.abs()
    elif normalize == "max":
        values = values.abs() / values.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(values.dtype).tiny)
    flat = values.reshape(-1, values.shape[-1])
    levels = torch.tensor([0.1, 0.5, 0.9], dtype=values.dtype, device=values.device)
    return Spectrum(values, flat.mean(0), torch.quantile(flat, levels, dim=0), asymmetry)


def _magnitudes(spectrum: Spectrum | Tensor) -> Tensor:
    values = spectrum.values if isinstance(spectrum, Spectrum) else spectrum
    if not isinstance(values, Tensor) or values.dim() < 1 or values.shape[-1] < 2:
        raise ValueError("spectrum must be a Spectrum or a tensor [..., d] with d >= 2")
    values = values.abs().sort(dim=-1, descending=True).values
    return values.clamp_min(torch.finfo(values.dtype).tiny)


def spectral_gaps(spectrum: Spectrum | Tensor, top: int = 3) -> tuple[Tensor, Tensor]:
    r"""The ``top`` largest log-drops :math:`\log(\nu_k/\nu_{k+1})` of spectra sorted by decreasing magnitude.

    :param spectrum: a :class:`Spectrum` or a tensor ``[..., d]``.
    :param int top: how many gaps.
    :returns: ``(sizes, positions)``, each ``[..., top]``: a gap at position ``k`` lies between the ``k``-th
        and ``(k+1)``-th values (1-based ``k``: ``k`` values lie above it).
    """
    logs = _magnitudes(spectrum).log()
    drops = logs[..., :-1] - logs[..., 1:]
    top = min(top, drops.shape[-1])
    sizes, index = drops.topk(top, dim=-1)
    return sizes, index + 1


@dataclass(frozen=True)
class ManifoldDimension:
    """Per-sample manifold-dimension estimates.

    :ivar dim: ``[...]`` the estimate (0 where no gap was found).
    :ivar gap: ``[...]`` the largest log-drop found.
    :ivar found: ``[...]`` whether that drop reached ``min_gap``.
    """

    dim: Tensor
    gap: Tensor
    found: Tensor


def estimate_manifold_dim(spectrum: Spectrum | Tensor, min_gap: float = 4.0) -> ManifoldDimension:
    r"""Manifold dimension from the largest gap of normalised spectra :math:`\nu = \sigma^2|\lambda|`.

    Sorting ν in decreasing order puts the ``d - m`` normal directions (ν ≈ 1) first and the ``m`` tangent
    ones after; with the largest drop after position ``k`` the estimate is ``d - k``. A drop counts if
    :math:`\nu_k/\nu_{k+1} \ge` ``min_gap`` (a factor; the design's "log-drop above min_gap" is read as
    :math:`\log(\nu_k/\nu_{k+1}) \ge \log(\text{min\_gap})`); without one the estimate is 0 and ``found`` is
    False — the spectrum shows no manifold (trivial phase).

    :param spectrum: a :class:`Spectrum` (normalised with ``"sigma2"``) or a tensor ``[..., d]``.
    :param float min_gap: smallest ratio that counts as a gap (> 1).

    Example::

        >>> spectrum = jacobian_spectrum(score_jacobian(energy, x_t, t), sigma2=sigma2)
        >>> estimate_manifold_dim(spectrum).dim  # the number of tangent directions

    References: Ventura et al., arXiv:2410.05898; Stanczuk et al., arXiv:2212.12611.
    """
    if not min_gap > 1.0:
        raise ValueError(f"min_gap is a ratio and must exceed 1; got {min_gap}")
    sizes, positions = spectral_gaps(spectrum, top=1)
    gap, k = sizes[..., 0], positions[..., 0]
    d = _magnitudes(spectrum).shape[-1]
    found = gap >= math.log(min_gap)
    return ManifoldDimension(torch.where(found, d - k, torch.zeros_like(k)), gap, found)


def spectrum_over_time(
    model: Any,
    x0: Tensor,
    times: Sequence[float] | Tensor,
    *,
    schedule: Schedule | None = None,
    kind: str = "eig",
    method: str = "auto",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Normalised spectra :math:`\nu = \sigma^2|\lambda|` of the score Jacobian along the forward process.

    At each time the points are :math:`x_t = \alpha x_0 + \sigma\varepsilon` (one ε for all times).

    :param model: anything with ``score(x, t)``.
    :param Tensor x0: clean points ``[B, d]``.
    :param times: the times to sweep.
    :param schedule: the noise schedule (``model.schedule`` if omitted).
    :param str kind: ``"eig"`` or ``"svd"``.
    :param str method: see :func:`score_jacobian`.
    :param torch.Generator generator: source of ε (one draw, reused at every time).
    :returns: ``[len(times), B, d]``, each row sorted by decreasing ν.
    """
    schedule = _resolve_schedule(model, schedule)
    device = generator.device if generator is not None else x0.device
    eps = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype).to(x0.device)
    rows = []
    for t in torch.as_tensor(times, dtype=torch.float64).tolist():
        alpha, sigma = _coef(schedule.alpha, t), _coef(schedule.sigma, t)
        J = score_jacobian(model, alpha * x0 + sigma * eps, t, method)
        rows.append(jacobian_spectrum(J, kind, "sigma2", sigma2=sigma**2).values)
    return torch.stack(rows)


def phase_boundaries(spectrum: Tensor | Sequence[float], schedule: Schedule) -> tuple[float, float]:
    r"""The trivial / coverage and coverage / consolidation boundary times of the linear-manifold model.

    For data on a linear manifold with covariance eigenvalues λ (the tangent ones), a tangent
    :math:`\nu_i = \sigma^2/(\alpha^2\lambda_i + \sigma^2)` crosses ½ at
    :math:`\sigma^2/\alpha^2 = \lambda_i`:
    the first (I → II) at :math:`\lambda_{\max}` — the score-critical time — and the last (II → III) at
    :math:`\lambda_{\min}` (derived form, design note §6.4).

    :param spectrum: the positive covariance eigenvalues (tangent directions) of the data.
    :param schedule: the noise schedule.
    :returns: ``(t_trivial_to_coverage, t_coverage_to_consolidation)``, the first larger.
    """
    values = torch.as_tensor(spectrum, dtype=torch.float64).reshape(-1)
    if values.numel() == 0 or not bool((values > 0).all()) or not bool(torch.isfinite(values).all()):
        raise ValueError("spectrum must hold the positive, finite covariance eigenvalues of the manifold")
    upper = _time_of_log_snr(schedule, -math.log(float(values.max())), "phase_boundaries (lambda_max)")
    lower = _time_of_log_snr(schedule, -math.log(float(values.min())), "phase_boundaries (lambda_min)")
    return upper, lower
