r"""Improper ("walk") kernels: stationary, conditionally positive definite, not mean reverting.

A walk kernel is :math:`r(\mathbf x, \mathbf x') = -\gamma_1(\lVert (\mathbf x - \mathbf x') / \ell \rVert)`
with the semivariogram

.. math::

    \gamma_1(t) = \int_0^t (t - u)\, k_1(u)\, du, \qquad \gamma_1(0) = \gamma_1'(0) = 0,\ \gamma_1'' = k_1,

of a derivative process with unit covariance :math:`k_1` (squared exponential for :class:`SmoothWalkKernel`,
Matérn-:math:`(j - \tfrac12)` for :class:`MaternWalkKernel`). Such a kernel is only conditionally positive
definite (of order 1): it is the covariance of a Gaussian process with a flat (improper) prior on its level,
so its Gram matrix has exactly one negative eigenvalue and it must be used with
:class:`pyro_ext.gp.ImproperExactGP` and :class:`pyro_ext.gp.ImproperMarginalLogLikelihood`.

The parametrisation here is the *derived* form of the design note (``design/kernels.md`` §2): it agrees with
the paper's kernels up to a rescaling of :math:`\ell` and of the amplitude and an additive constant, none of
which changes the model family or the improper posterior.

References: Ambrogioni, *Stationarity without mean reversion in improper Gaussian processes*,
ICML 2024, arXiv:2310.02877.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import torch
from gpytorch.kernels import Kernel
from gpytorch.settings import trace_mode
from torch import Tensor

__all__ = ["MaternWalkKernel", "SmoothWalkKernel"]

Method = Literal["fast", "reference"]


class _WalkKernel(Kernel):
    r"""Shared machinery of the walk kernels: centring, lengthscale, distance, :math:`r = -\gamma_1(t)`.

    Subclasses implement :meth:`semivariogram` (:math:`\gamma_1` of the scaled distance) and :attr:`slope`.
    """

    has_lengthscale = True

    @property
    def is_stationary(self) -> bool:
        # r depends on x - x' only (origin-anchored kernels such as min(s, t) are a different kind)
        return True

    @property
    def slope(self) -> float:
        r"""Long-range slope :math:`s_1`: :math:`\gamma_1(t) = s_1 t - 1 + o(1)` as :math:`t \to \infty`."""
        raise NotImplementedError

    def semivariogram(self, t: Tensor, method: Method = "fast") -> Tensor:
        r""":math:`\gamma_1(t)` at scaled distances :math:`t = \lVert \mathbf x - \mathbf x' \rVert / \ell`.

        :param t: scaled distances (any shape).
        :param method: ``"fast"`` (what the kernel uses; differentiable once in ``t``) or ``"reference"``
            (plain torch operations, differentiable to any order).
        """
        _check_method(method)
        if method == "reference":
            return self._reference(t)
        return _Semivariogram.apply(t, self._value_and_derivative)

    def _reference(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _value_and_derivative(self, t: Tensor, need_derivative: bool) -> tuple[Tensor, Tensor | None]:
        """gamma_1(t) and gamma_1'(t) (None unless needed), accurate to rounding at every t."""
        raise NotImplementedError

    #: the Gram path measures distances in units of lengthscale / _distance_scale (alpha for MaternWalk)
    _distance_scale: float = 1.0

    def _covariance_and_gradient_factor(
        self, distance: Tensor, need_gradient: bool, exact_small: bool
    ) -> tuple[Tensor, Tensor | None, float]:
        """For a Gram matrix: r = -gamma_1(t) and (F, c) with t gamma_1'(t) = c F (so dr/dl = c F / l).

        ``distance`` is :math:`t` times :attr:`_distance_scale`, a fresh tensor the caller gives away (it is
        overwritten): on a CPU every fresh Gram-sized tensor costs page faults, so this works in place.
        ``exact_small=False`` allows skipping a small-distance branch where the distances themselves are less
        accurate than the closed form (GPyTorch's quadratic-expansion distances for x1 == x2).
        """
        raise NotImplementedError

    def __repr__(self) -> str:  # one line: the constraint modules would otherwise print as children
        return f"{type(self).__name__}()"

    def forward(
        self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params
    ) -> Tensor:
        if not (
            x1.requires_grad
            or x2.requires_grad
            or self.lengthscale.size(-1) > 1
            or diag
            or last_dim_is_batch
            or trace_mode.on()
        ):
            # Common case (as GPyTorch's Matern): the lengthscale gradient is formed in the forward pass.
            return _IsotropicWalkCovariance.apply(
                x1,
                x2,
                self.lengthscale,
                self._distance_scale,
                self._covariance_and_gradient_factor,
                lambda a, b: self.covar_dist(a, b, **params),
                torch.is_grad_enabled(),
            )
        # Centre as GPyTorch's Matern does: the distances are then computed from small numbers.
        mean = x1.mean(dim=-2, keepdim=True)
        x1_ = (x1 - mean).div(self.lengthscale)
        x2_ = (x2 - mean).div(self.lengthscale)
        distance = self.covar_dist(x1_, x2_, diag=diag, last_dim_is_batch=last_dim_is_batch, **params)
        return _Semivariogram.apply(distance, self._value_and_derivative).neg()


class _Semivariogram(torch.autograd.Function):
    """gamma_1(t) with the derivative gamma_1'(t) formed in the forward pass (one product in backward)."""

    @staticmethod
    def forward(ctx, t: Tensor, evaluate) -> Tensor:
        value, derivative = evaluate(t, ctx.needs_input_grad[0])
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(derivative)
        return value

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (derivative,) = ctx.saved_tensors
        return grad_output * derivative, None


class _IsotropicWalkCovariance(torch.autograd.Function):
    """r = -gamma_1(|x1 - x2| / l) for inputs that need no gradient, as GPyTorch's ``MaternCovariance``: the
    factor of dr/dl is formed in the forward pass, so backward is one product and a sum."""

    @staticmethod
    def forward(
        ctx,
        x1: Tensor,
        x2: Tensor,
        lengthscale: Tensor,
        distance_scale: float,
        evaluate,
        dist_func,
        grad_enabled: bool,
    ) -> Tensor:
        # needs_input_grad stays True under torch.no_grad(): predictions would pay for an unused factor
        needs_grad = ctx.needs_input_grad[2] and grad_enabled
        mean = x1.mean(dim=-2, keepdim=True)
        scale = lengthscale.reciprocal() * distance_scale
        # For x1 == x2 GPyTorch forms distances from |x1|^2 + |x2|^2 - 2 x1.x2: at small t their rounding
        # (eps |x|^2 in t^2) is hundreds of times the closed form's (eps B / alpha^2 in gamma_1), so a Taylor
        # fix-up of those entries would not make them any more accurate.
        exact_small = not torch.equal(x1, x2)
        distance = dist_func((x1 - mean).mul(scale), (x2 - mean).mul(scale))
        covariance, factor, constant = evaluate(distance, needs_grad, exact_small)
        if needs_grad:
            ctx.constant = constant
            ctx.save_for_backward(factor, lengthscale)
        return covariance

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        factor, lengthscale = ctx.saved_tensors
        # dr/dl = gamma_1'(t) t / l = constant * factor / l; the scalars go after the reduction
        grad = (grad_output * factor).sum(dim=(-2, -1), keepdim=True).mul_(ctx.constant)
        return None, None, grad.sum_to_size(lengthscale.shape).div(lengthscale), None, None, None, None


class SmoothWalkKernel(_WalkKernel):
    r"""The smooth walk kernel: a walk whose derivative is a squared-exponential process.

    .. math::

        r(\mathbf x, \mathbf x') = -\gamma_1(t), \quad t = \lVert (\mathbf x - \mathbf x') / \ell \rVert,
        \quad
        \gamma_1(t) = \sqrt{\pi/2}\; t\, \mathrm{erf}(t/\sqrt 2) + \mathrm{expm1}(-t^2/2).

    Samples are infinitely mean-square differentiable; at long range
    :math:`\gamma_1(t) = \sqrt{\pi/2}\, t - 1 + o(1)`, so :math:`\mathrm{Var}[f(x + h) - f(x)] \approx
    2\theta \sqrt{\pi/2}\, |h| / \ell` with :math:`\theta` the ``ScaleKernel`` outputscale. The prior variance
    sits in the flat level, so :math:`r(\mathbf x, \mathbf x) = 0`.

    The kernel is only conditionally positive definite: use it with :class:`pyro_ext.gp.ImproperExactGP`
    (a plain :class:`~gpytorch.models.ExactGP` raises ``NotPSDError``). Sums with positive definite kernels
    and positive scaling keep it valid; products with a walk factor are rejected by ``ImproperExactGP``.

    :param ard_num_dims: one lengthscale per input dimension if set.
    :param batch_shape: batch shape of the lengthscale.
    :param active_dims: input dimensions the kernel acts on.
    :param lengthscale_prior: prior on the lengthscale.
    :param lengthscale_constraint: constraint on the lengthscale (default ``Positive``).

    Example::

        >>> covar_module = gpytorch.kernels.ScaleKernel(SmoothWalkKernel())
        >>> covar = covar_module(torch.linspace(0, 10, 20))  # 20 x 20, zero diagonal, one negative eigenvalue

    References: Ambrogioni, *Stationarity without mean reversion in improper Gaussian processes*,
    ICML 2024, arXiv:2310.02877 (kernel in the derived parametrisation of ``design/kernels.md`` §2.1).
    """

    @property
    def slope(self) -> float:
        return math.sqrt(math.pi / 2)

    def _reference(self, t: Tensor) -> Tensor:
        # expm1 keeps the closed form accurate at small t (the two terms cancel to t^2/2: one bit lost)
        return t.mul(math.sqrt(math.pi / 2)).mul(torch.erf(t.mul(math.sqrt(0.5)))) + torch.expm1(
            t.square().mul(-0.5)
        )

    def _value_and_derivative(self, t: Tensor, need_derivative: bool) -> tuple[Tensor, Tensor | None]:
        # gamma_1' = sqrt(pi/2) erf(t / sqrt 2): the t e^{-t^2/2} terms of the two parts cancel
        erf = t.mul(math.sqrt(0.5)).erf_()
        value = t.mul(erf).mul_(math.sqrt(math.pi / 2))
        value.add_(t.square().mul_(-0.5).expm1_())
        return value, (erf.mul_(math.sqrt(math.pi / 2)) if need_derivative else None)

    def _covariance_and_gradient_factor(
        self, t: Tensor, need_gradient: bool, exact_small: bool
    ) -> tuple[Tensor, Tensor | None, float]:
        # t gamma_1'(t) = sqrt(pi/2) t erf(t / sqrt 2) = sqrt(pi/2) F with F = t erf(t / sqrt 2)
        factor = t.mul(math.sqrt(0.5)).erf_().mul_(t)
        covariance = factor.mul(-math.sqrt(math.pi / 2))
        covariance.sub_(t.square_().mul_(-0.5).expm1_())  # t is spent here
        return covariance, (factor if need_gradient else None), math.sqrt(math.pi / 2)


class MaternWalkKernel(_WalkKernel):
    r"""The Matérn walk kernel of order :math:`j`: a walk whose derivative is a Matérn-:math:`(j - \tfrac12)`
    process, exactly :math:`j` times mean-square differentiable.

    With :math:`p = j - 1`, :math:`\alpha = \sqrt{2j - 1}` and :math:`z = \alpha u`, the derivative covariance
    is GPyTorch's Matérn with :math:`\nu = j - \tfrac12`,
    :math:`k_1(u) = e^{-z} \sum_{m \le p} c_m z^m`,
    :math:`c_m = \frac{p!\,(2p - m)!\,2^m}{(2p)!\,(p - m)!\,m!}`, and with :math:`P` the regularised lower
    incomplete gamma function and :math:`z = \alpha t`,

    .. math::

        \gamma_1(t) = \alpha^{-2} \sum_{m \le p} c_m\, m!\, \bigl[z P(m+1, z) - (m+1) P(m+2, z)\bigr]
                    = \alpha^{-2} \bigl[A z - B + e^{-z} q(z)\bigr],

    :math:`A = 4^p (p!)^2 / (2p)!`, :math:`B = 2j - 1`,
    :math:`q(z) = \sum_m c_m m! \sum_{i \le m} (m + 1 - i) z^i / i!`; the long-range slope is
    :math:`s_1 = A / \alpha`. The spectral density of :math:`f` is :math:`\propto \omega^{-2}(\alpha^2 +
    \omega^2)^{-j}`: a random walk at low frequencies with the local smoothness of
    Matérn-:math:`(j + \tfrac12)`.
    For :math:`j = 1`, :math:`\gamma_1(t) = t - 1 + e^{-t}` (integrated Ornstein–Uhlenbeck).

    The closed form cancels at small :math:`t` (in float32 it is off by 2000% for :math:`j = 3` at
    :math:`t = 10^{-4}`), so the fast path evaluates :math:`e^{-z} q(z)` by Horner's rule above a switch
    point and a Taylor series (coefficients in exact rationals, per :math:`j`) below it; the reference path
    (``method="reference"``) uses :func:`torch.special.gammainc`.

    :param int j: order, any integer :math:`\ge 1` (structural, not a parameter).
    :param kwargs: as for any GPyTorch kernel with a lengthscale (``ard_num_dims``, ``batch_shape``,
        ``active_dims``, ``lengthscale_prior``, ``lengthscale_constraint``).

    Example::

        >>> covar_module = gpytorch.kernels.ScaleKernel(MaternWalkKernel(j=3, ard_num_dims=2))
        >>> covar_module.base_kernel.semivariogram(torch.tensor([0.0, 1.0, 10.0]))

    References: Ambrogioni, *Stationarity without mean reversion in improper Gaussian processes*,
    ICML 2024, arXiv:2310.02877 (kernel in the derived parametrisation of ``design/kernels.md`` §2.1).
    """

    def __init__(self, j: int = 2, **kwargs) -> None:
        if isinstance(j, bool) or not isinstance(j, int):
            raise TypeError(
                f"j must be a positive int (the walk's order); got {j!r} of type {type(j).__name__}"
            )
        if j < 1:
            raise ValueError(f"j must be a positive int (the walk's order), j >= 1; got j={j}")
        super().__init__(**kwargs)
        self.j = j
        self._series = _matern_walk_series(j)

    @property
    def slope(self) -> float:
        return self._series.slope

    def _reference(self, t: Tensor) -> Tensor:
        return self._series.reference(t)

    def _value_and_derivative(self, t: Tensor, need_derivative: bool) -> tuple[Tensor, Tensor | None]:
        return self._series.value_and_derivative(t, need_derivative)

    @property
    def _distance_scale(self) -> float:
        return self._series.alpha

    def _covariance_and_gradient_factor(
        self, z: Tensor, need_gradient: bool, exact_small: bool
    ) -> tuple[Tensor, Tensor | None, float]:
        return self._series.covariance_and_gradient_factor(z, need_gradient, exact_small)

    def __repr__(self) -> str:  # nn.Module's repr shows no constructor arguments; j is structural
        return f"{type(self).__name__}(j={self.j})"


def _check_method(method: str) -> None:
    if method not in ("fast", "reference"):
        raise ValueError(f"method must be 'fast' or 'reference'; got {method!r}")


# ----------------------------------------------------------------------------------------------------
# Matern walk series: coefficients in exact rationals, computed once per j


def _horner_(coefficients: tuple[float, ...], z: Tensor) -> Tensor:
    """sum_i coefficients[i] z^i (ascending order) into one fresh tensor, one fused pass per degree."""
    if len(coefficients) == 1:
        return torch.full_like(z, coefficients[0])
    result = torch.add(z.new_tensor(coefficients[-2]), z, alpha=coefficients[-1])
    for coefficient in coefficients[-3::-1]:
        torch.addcmul(z.new_tensor(coefficient), result, z, out=result)
    return result


@dataclass(frozen=True)
class _TaylorBranch:
    """Below ``switch``: gamma_1 = alpha^-2 z^2 sum_n c_n z^n, gamma_1' = alpha^-1 z sum_n (n+2) c_n z^n."""

    switch: float
    coefficients: tuple[float, ...]

    @property
    def derivative_coefficients(self) -> tuple[float, ...]:
        return tuple((n + 2) * c for n, c in enumerate(self.coefficients))


@dataclass(frozen=True)
class _MaternWalkSeries:
    j: int
    alpha: float
    slope_term: float  # A
    offset: float  # B
    tail: tuple[float, ...]  # q(z), ascending
    tail_derivative: tuple[float, ...]  # q'(z) - q(z), ascending
    gamma_weights: tuple[float, ...]  # c_m m!, for the gammainc reference
    cutoff: float  # e^{-z} q(z) is below 1e-18 (A z - B) beyond this z
    taylor64: _TaylorBranch
    taylor32: _TaylorBranch

    @property
    def slope(self) -> float:
        return self.slope_term / self.alpha

    def reference(self, t: Tensor) -> Tensor:
        z = t.mul(self.alpha)
        total = torch.zeros_like(z)
        for m, weight in enumerate(self.gamma_weights):
            lower = torch.special.gammainc(z.new_tensor(m + 1.0), z)
            upper = torch.special.gammainc(z.new_tensor(m + 2.0), z)
            total = total + weight * (z * lower - (m + 1) * upper)
        return total / self.alpha**2

    def _branch(self, dtype: torch.dtype) -> tuple[_TaylorBranch, torch.dtype]:
        branch = self.taylor64 if dtype == torch.float64 else self.taylor32
        # e^{-z} q(z) stays finite in float32 only while e^{z} does (z < 88); large j need a wider range
        work_dtype = torch.float64 if (dtype != torch.float64 and self.cutoff > 80.0) else dtype
        return branch, work_dtype

    def value_and_derivative(self, t: Tensor, need_derivative: bool) -> tuple[Tensor, Tensor | None]:
        """gamma_1(t), and gamma_1'(t) if asked for, both accurate to rounding at every t."""
        branch, work_dtype = self._branch(t.dtype)
        alpha = self.alpha
        z = t.to(work_dtype).mul(alpha)
        # Closed form above the switch, with z clamped into its branch so that no entry yields inf or NaN.
        # Beyond `cutoff`, e^{-z} q(z) < 1e-18 (A z - B): clamping z there changes nothing that rounds.
        decay_z = z.clamp(min=branch.switch, max=self.cutoff)
        decay = decay_z.neg().exp_()
        value = _horner_(self.tail, decay_z).mul_(decay)
        value.add_(z.clamp(min=branch.switch), alpha=self.slope_term).sub_(self.offset).div_(alpha**2)
        derivative = None
        if need_derivative:
            # gamma_1' = alpha^-1 [A + e^{-z} (q'(z) - q(z))]
            derivative = _horner_(self.tail_derivative, decay_z).mul_(decay).add_(self.slope_term).div_(alpha)
        small = z < branch.switch
        if small.any():  # the Taylor branch only where needed: it is a long polynomial
            z_small = z[small]
            value.masked_scatter_(small, z_small.square() * _horner_(branch.coefficients, z_small) / alpha**2)
            if need_derivative:
                series = _horner_(branch.derivative_coefficients, z_small)
                derivative.masked_scatter_(small, z_small * series / alpha)
        if work_dtype != t.dtype:
            value = value.to(t.dtype)
            derivative = derivative.to(t.dtype) if derivative is not None else None
        return value, derivative

    def covariance_and_gradient_factor(
        self, z: Tensor, need_gradient: bool, exact_small: bool = True
    ) -> tuple[Tensor, Tensor | None, float]:
        """r = -gamma_1(t) and F with t gamma_1'(t) = F / alpha^2, from z = alpha t, overwriting ``z``.

        The value takes the Taylor branch below the switch (if ``exact_small``). F does not: there the closed
        form's absolute error (rounding times B) is multiplied by z, so the lengthscale gradient it feeds is
        exact to rounding.
        """
        branch, work_dtype = self._branch(z.dtype)
        alpha2 = self.alpha**2
        out_dtype = z.dtype
        z = z.contiguous() if work_dtype == z.dtype else z.to(work_dtype).contiguous()
        if (
            exact_small
        ):  # the Taylor branch only where needed (a long polynomial): its entries, picked out first
            small = (z < branch.switch).view(-1).nonzero().squeeze(-1)
            z_small = z.view(-1).index_select(0, small)
        # The closed form is finite at every z >= 0 (it only loses digits below the switch), so only the
        # cutoff clamp is needed; F must see the true z. Gram-sized allocations are few on purpose.
        decay = z.clamp(max=self.cutoff)
        # r = e^{-z} (-q(z) / alpha^2) - (A / alpha^2) z + B / alpha^2: signs, scales folded into coefficients
        tail = _horner_(tuple(-c / alpha2 for c in self.tail), decay) if len(self.tail) > 1 else None
        factor = _horner_(self.tail_derivative, decay) if need_gradient and len(self.tail) > 1 else None
        decay.neg_().exp_()
        if need_gradient:  # F = z [A + e^{-z} (q' - q)(z)]
            if factor is None:  # j = 1: q' - q is the constant -q_0
                factor = torch.add(z.new_tensor(self.slope_term), decay, alpha=self.tail_derivative[0])
            else:
                torch.addcmul(z.new_tensor(self.slope_term), factor, decay, out=factor)
            factor.mul_(z)
        covariance = torch.add(z.new_tensor(self.offset / alpha2), z, alpha=-self.slope_term / alpha2, out=z)
        if tail is None:  # j = 1: q is the constant q_0
            covariance.add_(decay, alpha=-self.tail[0] / alpha2)
        else:
            torch.addcmul(covariance, tail, decay, out=covariance)
        if exact_small:
            taylor = _horner_(tuple(-c / alpha2 for c in branch.coefficients), z_small).mul_(z_small.square())
            covariance.view(-1).index_copy_(0, small, taylor)
        if work_dtype != out_dtype:
            covariance = covariance.to(out_dtype)
            factor = factor.to(out_dtype) if factor is not None else None
        return covariance, factor, 1.0 / alpha2


def _closed_form_condition(series_terms: dict, z: float) -> float:
    """Sum of |terms| / value for the closed form A z - B + e^{-z} q(z) (a rounding-error amplification)."""
    a, b, tail, value = series_terms["A"], series_terms["B"], series_terms["q"], series_terms["G"](z)
    magnitude = a * z + b + math.exp(-z) * sum(c * z**i for i, c in enumerate(tail))
    return magnitude / value


@functools.cache
def _matern_walk_series(j: int) -> _MaternWalkSeries:
    p = j - 1
    f = math.factorial
    c = [Fraction(f(p) * f(2 * p - m) * 2**m, f(2 * p) * f(p - m) * f(m)) for m in range(p + 1)]
    a = sum(c[m] * f(m) for m in range(p + 1))
    b = sum(c[m] * f(m) * (m + 1) for m in range(p + 1))
    q = [sum(c[m] * f(m) * (m + 1 - i) for m in range(i, p + 1)) / f(i) for i in range(p + 1)]
    # Taylor series of G(z) = alpha^2 gamma_1 = sum_n kappa_n z^{n+2} / ((n+1)(n+2)), where
    # kappa_n are the Taylor coefficients of k_1 = e^{-z} sum_m c_m z^m.
    max_terms = 160
    kappa = [
        sum(c[m] * Fraction((-1) ** (n - m), f(n - m)) for m in range(min(n, p) + 1))
        for n in range(max_terms)
    ]
    taylor = [kappa[n] / ((n + 1) * (n + 2)) for n in range(max_terms)]
    taylor_f = [float(x) for x in taylor]
    a_f, b_f, q_f = float(a), float(b), tuple(float(x) for x in q)

    def g_float64(z: float) -> float:
        # accurate enough to choose switch points: Taylor (well conditioned) up to 1.5, closed form beyond
        if z < 1.5:
            return sum(cn * z ** (n + 2) for n, cn in enumerate(taylor_f))
        return a_f * z - b_f + math.exp(-z) * sum(cq * z**i for i, cq in enumerate(q_f))

    def taylor_condition(z: float) -> float:
        return sum(abs(cn) * z ** (n + 2) for n, cn in enumerate(taylor_f)) / g_float64(z)

    terms = {"A": a_f, "B": b_f, "q": q_f, "G": g_float64}

    def branch(switch: float, eps: float) -> _TaylorBranch:
        # keep terms until the remainder is below eps/10 of the smallest G(z)/z^2 on (0, switch]
        floor = g_float64(switch) / switch**2
        for count in range(1, max_terms):
            remainder = sum(abs(cn) * switch**n for n, cn in enumerate(taylor_f[count:], start=count))
            if remainder < 0.1 * eps * floor:
                return _TaylorBranch(switch, tuple(taylor_f[:count]))
        raise RuntimeError(f"Taylor series for j={j} did not converge at z={switch}")  # pragma: no cover

    # float64: switch at z = 1 (the closed form loses at most ~log10(cond) < 3 digits there for j <= 100);
    # float32: move the switch to where the closed form's amplification matches the series', since
    # float32 cannot afford the closed form's cancellation just above z = 1 for larger j.
    # (an amplification of 6 keeps float32 within ~1e-6 relative; measured <= 6e-7 for j <= 40).
    grid = [0.5 + 0.25 * k for k in range(1, 400)]
    switch32 = next(
        (z for z in grid if _closed_form_condition(terms, z) <= max(taylor_condition(z), 6.0)), grid[-1]
    )
    # beyond `cutoff`, e^{-z} q(z) < 1e-18 (A z - B): drop it (and never evaluate q at huge z)
    cutoff = next(
        float(z)
        for z in range(2, 100000)
        if math.exp(-z) * sum(cq * float(z) ** i for i, cq in enumerate(q_f)) < 1e-18 * (a_f * z - b_f)
    )
    return _MaternWalkSeries(
        j=j,
        alpha=math.sqrt(2 * j - 1),
        slope_term=a_f,
        offset=b_f,
        tail=q_f,
        tail_derivative=tuple(
            float((i + 1) * q[i + 1] - q[i]) if i < p else float(-q[i]) for i in range(p + 1)
        ),
        gamma_weights=tuple(float(c[m] * f(m)) for m in range(p + 1)),
        cutoff=cutoff,
        taylor64=branch(1.0, 2.0**-52),
        taylor32=branch(switch32, 2.0**-23),
    )
