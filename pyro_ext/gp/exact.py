r"""Exact inference for improper Gaussian processes (a flat prior on the level): :class:`ImproperExactGP`.

An improper GP has covariance :math:`k_c = c + r` with :math:`c \to \infty`, i.e. :math:`f = \beta + f_0`
with a flat prior on :math:`\beta`. With :math:`K = r(X, X) + \sigma^2 I`, :math:`r_* = r(X, x_*)`,
:math:`a = \mathbf 1^\top K^{-1} \mathbf 1`, :math:`\hat\beta = \mathbf 1^\top K^{-1} y / a` and
:math:`g = \mathbf 1^\top K^{-1} r_*`, the exact :math:`c \to \infty` posterior is (ordinary kriging; GPML
eq. 2.42 with :math:`H = \mathbf 1^\top`, :math:`B^{-1} \to 0`)

.. math::

    m(x_*) = \hat\beta + r_*^\top K^{-1} (y - \hat\beta \mathbf 1), \qquad
    \Sigma(x_*, x_*') = r(x_*, x_*') - r_*^\top K^{-1} r_*' + (1 - g(x_*))(1 - g(x_*')) / a,

and the restricted likelihood (Harville's REML; GPML eq. 2.45) is

.. math::

    L = -\tfrac12 (y^\top K^{-1} y - b^2 / a) - \tfrac12 \log|\det K| - \tfrac12 \log a
        - \tfrac{n-1}{2} \log 2\pi, \qquad b = \mathbf 1^\top K^{-1} y.

Both are unchanged by :math:`r \to r + h(x) + h(x') + c_0` for any :math:`h, c_0` (the flat level absorbs
them), so :math:`K` is never factorised: the formulas are applied to a positive definite *representative*
instead, and the result is exact. The kernels need only be conditionally positive definite
(:mod:`pyro_ext.kernels.walk`).

This is the derived form of ``design/kernels.md`` §3 (the paper's own formulas were not available to us).

References: Ambrogioni, *Stationarity without mean reversion in improper Gaussian processes*,
ICML 2024, arXiv:2310.02877; Rasmussen & Williams, *Gaussian Processes for Machine Learning* §2.7.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import gpytorch
import linear_operator
import torch
from gpytorch import settings
from gpytorch.distributions import MultitaskMultivariateNormal, MultivariateNormal
from gpytorch.models import ExactGP
from gpytorch.models.exact_prediction_strategies import DefaultPredictionStrategy
from gpytorch.module import Module
from gpytorch.utils.memoize import cached, clear_cache_hook
from linear_operator import to_linear_operator
from linear_operator.operators import (
    DenseLinearOperator,
    LinearOperator,
    MaskedLinearOperator,
    MatmulLinearOperator,
    RootLinearOperator,
    SumLinearOperator,
)
from linear_operator.utils.errors import NotPSDError
from linear_operator.utils.warnings import NumericalWarning
from torch import Tensor

from pyro_ext.kernels.walk import _WalkKernel

__all__ = [
    "ImproperExactGP",
    "ImproperMultivariateNormal",
    "ImproperPredictionStrategy",
    "RedundantMeanWarning",
    "restricted_log_likelihood",
]

Representative = Literal["anchor", "shift"]

#: on a failed constant shift, multiply it by this, at most this many times (design §3.3)
_SHIFT_GROWTH, _SHIFT_RETRIES = 4.0, 3


class RedundantMeanWarning(UserWarning):
    """A learnable constant mean in an improper GP: the flat level already is one (its gradient is exactly
    0)."""


# ----------------------------------------------------------------------------------------------------
# The restricted likelihood and the improper prior distribution


def _constant_root(reference: Tensor | LinearOperator, shift: Tensor) -> Tensor:
    """sqrt(shift) 1 as a ``... x n x 1`` root, for a shift of the batch shape (or a scalar)."""
    shape = (*reference.shape[:-2], reference.shape[-2], 1)
    ones = torch.ones(shape, dtype=reference.dtype, device=reference.device)
    return ones * shift.to(ones).sqrt().unsqueeze(-1).unsqueeze(-1)


def _with_level_shift(covariance: LinearOperator, shift: Tensor) -> LinearOperator:
    """covariance + shift 1 1^T, kept lazy (a rank-one root)."""
    return SumLinearOperator(covariance, RootLinearOperator(_constant_root(covariance, shift)))


def _dense_plus_low_rank(dense: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """``dense + left @ right`` with one allocation and one pass over the result (addmm in 2-D).

    The representative's low-rank term (rank 1 or 2) costs what one elementwise pass does, instead of a
    product, a sum and their allocations (on a CPU every fresh block-sized tensor costs page faults).
    """
    if dense.dim() == 2 and left.dim() == 2 and right.dim() == 2:
        return torch.addmm(dense, left, right)
    return dense + left @ right


def _to_dense(matrix: Tensor | LinearOperator) -> Tensor:
    """``matrix.to_dense()``, folding a representative block ``Dense + Matmul(left, right)`` in one pass."""
    if isinstance(matrix, Tensor):
        return matrix
    if isinstance(matrix, SumLinearOperator) and len(matrix.linear_ops) == 2:
        dense, low_rank = matrix.linear_ops
        if isinstance(dense, DenseLinearOperator) and isinstance(low_rank, MatmulLinearOperator):
            left, right = low_rank.left_linear_op, low_rank.right_linear_op
            if isinstance(left, DenseLinearOperator) and isinstance(right, DenseLinearOperator):
                return _dense_plus_low_rank(dense.tensor, left.tensor, right.tensor)
    return matrix.to_dense()


def _uses_cholesky(covariance: LinearOperator) -> bool:
    """Whether linear_operator solves with ``covariance`` by a Cholesky factor (as its ``solve`` decides)."""
    size = covariance.size(-1)
    return settings.fast_computations.solves.off() or size <= settings.max_cholesky_size.value()


_CG_FLOOR = 1e-4  # relative residual below which linear_operator's CG cannot go by itself (_refined_solve)


def _refined_solve(matrix: LinearOperator, rhs: Tensor, max_refinements: int = 2) -> Tensor:
    r"""``matrix.solve(rhs)`` refined until the relative residual meets ``eval_cg_tolerance``.

    linear_operator's CG stops updating once :math:`p^\top A p` of its (unit-norm) right-hand side falls under
    1e-10, a floor near a relative residual of 1e-5 whatever tolerance is asked. Iterative refinement,
    :math:`x \leftarrow x + A^{-1}(b - Ax)`, restarts CG on the normalised residual and so multiplies the
    accuracy by that floor each round; the check costs one product with the matrix. Here it matters more than
    for GPyTorch's mean: the level term :math:`u u^\top / a` of the covariance goes through
    :math:`a = 1^\top K^{-1} 1`, which dominates the variance far from the data.

    Only a tolerance below that floor (``< 1e-4``) is refined: above it CG's own stopping rule stands, as in
    GPyTorch, at no extra cost.
    """
    solution = matrix.solve(rhs)
    tolerance = settings.eval_cg_tolerance.value()
    if tolerance >= _CG_FLOOR:
        return solution
    scale = rhs.norm(dim=-2).clamp_min(torch.finfo(rhs.dtype).tiny)
    for _ in range(max_refinements):
        residual = rhs - matrix.matmul(solution)
        if bool(torch.all(residual.norm(dim=-2) <= tolerance * scale)):
            break
        solution = solution + matrix.solve(residual)
    return solution


def _add_constant(matrix: Tensor | LinearOperator, shift: Tensor) -> Tensor | LinearOperator:
    """matrix + shift (every entry; a rectangular block), dense if the matrix is, else a rank-one term."""
    if isinstance(matrix, Tensor):
        return matrix + shift.to(matrix).unsqueeze(-1).unsqueeze(-1)
    rows = _constant_root(matrix, shift)
    columns = torch.ones((*matrix.shape[:-2], 1, matrix.shape[-1]), dtype=rows.dtype, device=rows.device)
    return SumLinearOperator(matrix, MatmulLinearOperator(rows * rows, columns))


def _solve_with_shift_retries(
    covariance: LinearOperator,
    level_shift: Tensor | None,
    compute,
    is_valid,
    what: str,
):
    """``compute(covariance)``; for a shifted representative, retry with the shift grown 4-fold (at most 3
    times) when the matrix is not positive definite. Returns the result and the extra shift that made it work.

    With a shift, the attempts run without GPyTorch's jitter retries: a too-small shift is not a rounding
    problem, and a jittered Cholesky of an indefinite matrix would give a wrong answer instead of a retry.
    """
    if level_shift is None:
        result = compute(covariance)
        if not is_valid(result):
            raise NotPSDError(
                f"the covariance of {what} is not positive definite (1^T K^-1 1 <= 0 or a non-finite "
                "log det): a conditionally positive definite (walk) kernel needs ImproperExactGP's "
                "representative"
            )
        return result, None
    level_shift = torch.as_tensor(level_shift)
    for retry in range(_SHIFT_RETRIES + 1):
        extra = level_shift * (_SHIFT_GROWTH**retry - 1.0) if retry else None
        matrix = covariance if extra is None else _with_level_shift(covariance, extra)
        try:
            with (
                linear_operator.settings.cholesky_jitter(0.0, 0.0, 0.0),
                linear_operator.settings.cholesky_max_tries(1),
                warnings.catch_warnings(),
            ):
                warnings.simplefilter("ignore", NumericalWarning)  # the (zero) jitter retry's notice
                result = compute(matrix)
        except NotPSDError:
            continue
        if is_valid(result):
            return result, extra
    raise NotPSDError(
        f"the shifted covariance representative of {what} is not positive definite even after growing the "
        f"shift {_SHIFT_GROWTH**_SHIFT_RETRIES:.0f}-fold: use representative='anchor' (always positive "
        "definite)"
    )


def _restricted_terms(covariance: LinearOperator, residual: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """q1 = d^T K^-1 d, a = 1^T K^-1 1, b = 1^T K^-1 d and log det K from one inv_quad_logdet call.

    The three right-hand sides d, s1, d + s1 (s = |d| / sqrt(n)) have comparable norms, so one Cholesky or
    one mBCG run serves them all; b comes from the polarisation q3 = q1 + 2 s b + s^2 a.
    """
    n = residual.shape[-1]
    scale = (residual.detach().norm(dim=-1, keepdim=True) / math.sqrt(n)).clamp_min(
        torch.finfo(residual.dtype).tiny
    )
    ones = scale.expand_as(residual)
    rhs = torch.stack([residual, ones, residual + ones], dim=-1)
    inv_quad, logdet = covariance.inv_quad_logdet(inv_quad_rhs=rhs, logdet=True, reduce_inv_quad=False)
    q1, q2, q3 = inv_quad.unbind(-1)
    s = scale.squeeze(-1)
    a = q2 / s.square()
    b = (q3 - q1 - q2) / (2 * s)
    return q1, a, b, logdet


def restricted_log_likelihood(
    covariance: LinearOperator | Tensor, residual: Tensor, *, level_shift: Tensor | float | None = None
) -> Tensor:
    r"""The restricted (REML) log likelihood of an improper GP with a flat prior on the level.

    .. math::

        L = \lim_{c \to \infty} \bigl[\log \mathcal N(y; \mu, K + c \mathbf 1 \mathbf 1^\top)
            + \tfrac12 \log 2\pi c\bigr]
          = -\tfrac12 (d^\top K^{-1} d - b^2 / a) - \tfrac12 \log \det K - \tfrac12 \log a
            - \tfrac{n-1}{2} \log 2\pi

    with :math:`d = y - \mu`, :math:`a = \mathbf 1^\top K^{-1} \mathbf 1`, :math:`b = \mathbf 1^\top K^{-1}
    d`; it equals the contrast form :math:`\log \mathcal N(Q^\top d; 0, Q^\top K Q) - \tfrac12 \log n`. One
    ``inv_quad_logdet`` call with three right-hand sides serves the Cholesky and the CG paths alike.

    :param covariance: a positive definite representative of :math:`K` (``... x n x n``): any
        :math:`K + h \mathbf 1^\top + \mathbf 1 h^\top + c_0 \mathbf 1 \mathbf 1^\top` gives the same
        :math:`L`.
    :param residual: :math:`d = y - \mu` (``... x n``), :math:`n \ge 2`.
    :param level_shift: the constant :math:`c_0` the representative was shifted by, if any: when the shifted
        matrix turns out not positive definite (:math:`a \le 0`), the shift is multiplied by 4 up to three
        times.
    :return: :math:`L` with the batch shape.

    References: Harville (1974), Patterson & Thompson (1971); GPML eq. 2.45 with :math:`H = \mathbf 1^\top`.
    """
    n = residual.shape[-1]
    if n < 2:
        raise ValueError(
            f"the restricted likelihood needs at least 2 observations (one is spent on the level); got n={n}"
        )
    covariance = to_linear_operator(covariance)
    if residual.shape[:-1] != covariance.batch_shape:
        batch_shape = torch.broadcast_shapes(residual.shape[:-1], covariance.batch_shape)
        residual = residual.expand(*batch_shape, n)
        covariance = covariance.expand(*batch_shape, n, n)
    covariance = covariance.evaluate_kernel()
    terms, _ = _solve_with_shift_retries(
        covariance,
        level_shift,
        lambda matrix: _restricted_terms(matrix, residual),
        lambda terms: bool(torch.all(terms[1] > 0) and torch.isfinite(terms[3]).all()),
        "the observations",
    )
    q1, a, b, logdet = terms
    return -0.5 * (q1 - b.square() / a) - 0.5 * logdet - 0.5 * a.log() - 0.5 * (n - 1) * math.log(2 * math.pi)


class ImproperMultivariateNormal(MultivariateNormal):
    r"""The prior of an improper GP on finitely many points: flat in the level, Gaussian in the increments.

    It is built exactly like GPyTorch's :class:`~gpytorch.distributions.MultivariateNormal` (same
    constructor),
    with a positive definite *representative* :math:`K_\mathrm{rep}` as its covariance (for instance the
    covariance of :math:`f(x) - f(x_0)`). Only what is invariant to the representative is meaningful:

    - :meth:`log_prob` is the restricted likelihood :func:`restricted_log_likelihood` (its value does not
      depend on the representative);
    - :attr:`variance` is :math:`+\infty` (the level is unknown);
    - samples have the exact joint law of the increments :math:`f(x_i) - f(x_j)` and an arbitrary level.

    ``GaussianLikelihood.marginal`` rebuilds distributions through ``function_dist.__class__``, so
    ``likelihood(model(x)).log_prob(y)`` is the restricted likelihood of the observations.

    Example::

        >>> prior = model(train_x)  # an ImproperExactGP in train mode
        >>> likelihood(prior).log_prob(train_y)  # REML: n times ImproperMarginalLogLikelihood

    References: arXiv:2310.02877; Harville (1974).
    """

    #: constant the representative was shifted by (representative="shift"), for the automatic retry
    _level_shift: Tensor | None = None

    @property
    def variance(self) -> Tensor:
        return torch.full(
            self._batch_shape + self._event_shape, math.inf, dtype=self.loc.dtype, device=self.loc.device
        )

    def log_prob(self, value: Tensor) -> Tensor:
        if value.shape[-1] < 2:
            raise ValueError(
                "value must hold at least 2 observations for the restricted likelihood; got "
                f"{value.shape[-1]}"
            )
        return restricted_log_likelihood(
            self.lazy_covariance_matrix, value - self.loc, level_shift=self._level_shift
        )


# ----------------------------------------------------------------------------------------------------
# Posterior: the prediction strategy with the rank-one correction


class ImproperPredictionStrategy(DefaultPredictionStrategy):
    r"""GPyTorch's exact prediction strategy, applied to a positive definite representative, plus the exact
    :math:`c \to \infty` correction for the flat level.

    1. One two-column solve :math:`K_\mathrm{rep}^{-1}[y - \mu, \mathbf 1] = [w, v]` gives
       :math:`a = \mathbf 1^\top v` and :math:`\hat\beta = \mathbf 1^\top w / a`.
    2. One two-column product with :math:`K_{*X}` gives :math:`u = \mathbf 1 - K_{*X} v` and the mean
       :math:`m = \mu_* + K_{*X} w + \hat\beta u`.
    3. The covariance is GPyTorch's own (dense, or LOVE with ``fast_pred_var``) on :math:`K_\mathrm{rep}`,
    plus
       :math:`u u^\top / a` as a rank-one root.

    :class:`ImproperExactGP` installs it in place of the :class:`DefaultPredictionStrategy` that ExactGP
    builds.
    """

    @classmethod
    def from_strategy(cls, strategy: DefaultPredictionStrategy) -> ImproperPredictionStrategy:
        """The improper strategy for the same training data and prior as ``strategy``."""
        return cls(
            strategy.train_inputs, strategy.train_prior_dist, strategy.train_labels, strategy.likelihood
        )

    def __init__(self, train_inputs, train_prior_dist, train_labels, likelihood, root=None, inv_root=None):
        if isinstance(train_prior_dist, MultitaskMultivariateNormal):
            raise NotImplementedError("ImproperExactGP does not support multitask models yet")
        super().__init__(
            train_inputs, train_prior_dist, train_labels, likelihood, root=root, inv_root=inv_root
        )
        #: extra constant added to every block after a failed shift (representative="shift" only)
        self._extra_shift: Tensor | None = None

    def get_fantasy_strategy(self, *args, **kwargs):
        raise NotImplementedError("fantasy models of an ImproperExactGP are not supported yet")

    # caches -----------------------------------------------------------------------------------------------
    def _observed(self) -> Tensor | None:
        """The observed-rows mask under observation_nan_policy('mask') when there are NaNs, else None."""
        policy = settings.observation_nan_policy.value()
        has_nan = bool(torch.isnan(self.train_labels).any())
        if policy == "fill":
            raise ValueError(
                "observation_nan_policy('fill') is not supported by ImproperExactGP: use 'mask' (or 'ignore' "
                "when train_targets has no NaN)"
            )
        if not has_nan:
            return None
        if policy == "ignore":
            raise ValueError(
                "train_targets contains NaN: wrap the call in "
                "gpytorch.settings.observation_nan_policy('mask') to leave those observations out"
            )
        return settings.observation_nan_policy._get_observed(self.train_labels, self.train_shape)

    @cached(name="observed_strategy", ignore_args=True)
    def _observed_strategy(self, observed: Tensor) -> ImproperPredictionStrategy:
        """The same strategy on the observed rows only (what 'mask' means: the NaN rows are dropped)."""
        index = observed.nonzero().squeeze(-1)
        prior = self.train_prior_dist
        covariance = MaskedLinearOperator(prior.lazy_covariance_matrix, observed, observed)
        observed_prior = prior.__class__(prior.loc[..., index], covariance)
        observed_prior._level_shift = getattr(prior, "_level_shift", None)
        inputs = [x[..., index, :] for x in self.train_inputs]
        return ImproperPredictionStrategy(
            inputs, observed_prior, self.train_labels[..., index], self.likelihood
        )

    @cached(name="improper_caches")
    def _improper_caches(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """w = K^-1 (y - mu), v = K^-1 1 (one two-column solve), a = 1^T v, beta = 1^T w / a."""
        residual = self.train_labels - self.likelihood(self.train_prior_dist, self.train_inputs).loc
        level_shift = getattr(self.train_prior_dist, "_level_shift", None)
        rhs = torch.stack([residual, torch.ones_like(residual)], dim=-1)
        covariance = self.lik_train_train_covar
        if _uses_cholesky(covariance):
            # The factor is cached on lik_train_train_covar, where the covariance (ours, or LOVE's root)
            # finds it: one Cholesky per training set instead of GPyTorch's two (mean cache, covariance).
            def solve(matrix: LinearOperator) -> Tensor:
                return torch.cholesky_solve(rhs, matrix.cholesky().to_dense())
        else:
            covariance = covariance.evaluate_kernel()  # once: a solve would rebuild a lazy kernel per call

            def solve(matrix: LinearOperator) -> Tensor:
                return _refined_solve(matrix, rhs)

        solution, extra = _solve_with_shift_retries(
            covariance,
            level_shift,
            solve,
            lambda solution: bool(torch.all(solution[..., 1].sum(-1) > 0) and torch.isfinite(solution).all()),
            "the training data",
        )
        if extra is not None:
            self._apply_extra_shift(extra)
        if settings.detach_test_caches.on():
            solution = solution.detach()
        if solution.grad_fn is not None:  # as GPyTorch does: a backward pass invalidates the caches
            solution.grad_fn.register_hook(lambda *args, strategy=self: clear_cache_hook(strategy))
        w, v = solution.unbind(-1)
        a = v.sum(-1)
        return w, v, a, w.sum(-1) / a

    def _apply_extra_shift(self, extra: Tensor) -> None:
        prior = self.train_prior_dist
        shifted = prior.__class__(prior.loc, _with_level_shift(prior.lazy_covariance_matrix, extra))
        shifted._level_shift = getattr(prior, "_level_shift", None)
        self.train_prior_dist = shifted
        self.lik_train_train_covar = self.likelihood(shifted, self.train_inputs).lazy_covariance_matrix
        self._extra_shift = extra

    @property
    def mean_cache(self) -> Tensor:
        return self._improper_caches()[0]

    # prediction -------------------------------------------------------------------------------------------
    def _prepare(self, test_test_covar, test_train_covar):
        """Delegate to the observed-rows strategy under 'mask', else form the caches and apply a grown
        shift."""
        observed = self._observed()
        if observed is not None:
            rows = torch.ones(test_train_covar.shape[-2], dtype=torch.bool, device=observed.device)
            masked = MaskedLinearOperator(to_linear_operator(test_train_covar), rows, observed.reshape(-1))
            return self._observed_strategy(observed), test_test_covar, masked
        self._improper_caches()  # may grow a failed shift, before any covariance cache is formed
        if self._extra_shift is not None:
            if test_test_covar is not None:
                test_test_covar = _add_constant(test_test_covar, self._extra_shift)
            test_train_covar = _add_constant(test_train_covar, self._extra_shift)
        return self, test_test_covar, test_train_covar

    def _mean_and_level_root(self, test_mean: Tensor, test_train_covar) -> tuple[Tensor, Tensor]:
        w, v, a, beta = self._improper_caches()
        product = test_train_covar @ torch.stack([w, v], dim=-1)  # one two-column product with K_*X
        u = 1.0 - product[..., 1]
        mean = test_mean + product[..., 0] + beta.unsqueeze(-1) * u
        return mean, (u / a.sqrt().unsqueeze(-1)).unsqueeze(-1)

    def _covariance(self, test_test_covar, test_train_covar, level_root: Tensor) -> LinearOperator:
        gpytorch_covariance = DefaultPredictionStrategy.exact_predictive_covar
        if settings.skip_posterior_variances.on():
            return gpytorch_covariance(self, test_test_covar, test_train_covar)
        if _uses_cholesky(self.lik_train_train_covar):
            covariance = self._cholesky_predictive_covar(test_test_covar, test_train_covar)
        elif settings.fast_pred_var.off():
            covariance = self._cg_predictive_covar(test_test_covar, test_train_covar)
        else:
            covariance = gpytorch_covariance(self, test_test_covar, test_train_covar)
        return SumLinearOperator(to_linear_operator(covariance), RootLinearOperator(level_root))

    def _cg_predictive_covar(self, test_test_covar, test_train_covar) -> LinearOperator:
        r"""GPyTorch's dense-variance covariance :math:`K_{**} - K_{*X} K^{-1} K_{X*}` on the CG path, with
        the solve refined to ``eval_cg_tolerance`` (:func:`_refined_solve`; GPyTorch's stops at CG's floor).
        """
        train_train_covar = self.lik_train_train_covar.evaluate_kernel()
        if settings.detach_test_caches.on():
            train_train_covar = train_train_covar.detach()
        test_train_covar = _to_dense(test_train_covar)
        correction = _refined_solve(train_train_covar, test_train_covar.mT)
        if isinstance(test_test_covar, Tensor):
            return to_linear_operator(test_test_covar - test_train_covar @ correction)
        return test_test_covar + MatmulLinearOperator(test_train_covar, correction.mul(-1))

    def _cholesky_predictive_covar(self, test_test_covar, test_train_covar) -> LinearOperator:
        r"""GPyTorch's exact covariance :math:`K_{**} - K_{*X} K^{-1} K_{X*}` on the Cholesky path, as
        :math:`K_{**} - V^\top V` with :math:`V = L^{-1} K_{X*}`: one triangular solve with the cached factor
        (GPyTorch's dense path factorises again and solves twice; its LOVE path forms :math:`L^{-1}` and a
        product). The result is exact either way, with or without ``fast_pred_var``.
        """
        factor = self.lik_train_train_covar.cholesky().to_dense()
        if settings.detach_test_caches.on():  # as GPyTorch: gradients reach the test blocks only
            factor = factor.detach()
        root = torch.linalg.solve_triangular(factor, _to_dense(test_train_covar).mT, upper=False)
        if isinstance(test_test_covar, Tensor):
            return to_linear_operator(test_test_covar - root.mT @ root)
        return test_test_covar + MatmulLinearOperator(root.mT, root.mul(-1))

    def exact_prediction(
        self,
        test_mean: Tensor,
        test_test_covar: Tensor | LinearOperator,
        test_train_covar: Tensor | LinearOperator,
    ) -> tuple[Tensor, Tensor | LinearOperator]:
        strategy, test_test_covar, test_train_covar = self._prepare(test_test_covar, test_train_covar)
        if sum(test_train_covar.shape[-2:]) <= settings.max_eager_kernel_size.value():
            test_train_covar = _to_dense(test_train_covar)
            test_test_covar = _to_dense(test_test_covar)
        elif _uses_cholesky(strategy.lik_train_train_covar):  # densified once, for the mean and covariance
            test_train_covar = _to_dense(test_train_covar)
        mean, level_root = strategy._mean_and_level_root(test_mean, test_train_covar)
        return mean, strategy._covariance(test_test_covar, test_train_covar, level_root)

    def exact_predictive_mean(self, test_mean: Tensor, test_train_covar: LinearOperator) -> Tensor:
        r""":math:`m = \mu_* + K_{*X} w + \hat\beta (\mathbf 1 - K_{*X} v)`."""
        strategy, _, test_train_covar = self._prepare(None, test_train_covar)
        return strategy._mean_and_level_root(test_mean, test_train_covar)[0]

    def exact_predictive_covar(
        self, test_test_covar: LinearOperator, test_train_covar: LinearOperator
    ) -> LinearOperator:
        r"""GPyTorch's posterior covariance on the representative plus :math:`u u^\top / a`."""
        strategy, test_test_covar, test_train_covar = self._prepare(test_test_covar, test_train_covar)
        test_mean = torch.zeros(test_train_covar.shape[:-1], dtype=test_train_covar.dtype)
        _, level_root = strategy._mean_and_level_root(test_mean.to(test_train_covar.device), test_train_covar)
        return strategy._covariance(test_test_covar, test_train_covar, level_root)


# ----------------------------------------------------------------------------------------------------
# The model


def _is_walk(module: torch.nn.Module) -> bool:
    return isinstance(module, _WalkKernel)


def check_kernel_structure(model: torch.nn.Module) -> None:
    """Raise if the model's kernels are not a valid improper (CPD) covariance or are not supported.

    Positive scaling and sums keep conditional positive definiteness; a product with a walk factor does not
    (in general), and is refused with a ``ValueError``. KISS-GP and multitask kernels raise
    ``NotImplementedError``.
    """
    products = (gpytorch.kernels.ProductKernel, gpytorch.kernels.ProductStructureKernel)
    interpolated = (gpytorch.kernels.GridInterpolationKernel, gpytorch.kernels.InducingPointKernel)
    multitask = (gpytorch.kernels.MultitaskKernel, gpytorch.kernels.LCMKernel)
    for name, module in model.named_modules():
        if isinstance(module, products) and any(_is_walk(child) for child in module.modules()):
            raise ValueError(
                f"the kernel {name or 'of the model'} ({type(module).__name__}) multiplies a walk kernel by "
                "another kernel: such products are not conditionally positive definite in general. Use sums "
                "of (scaled) walk and positive definite kernels instead."
            )
        if isinstance(module, interpolated):
            raise NotImplementedError(
                f"{type(module).__name__} (KISS-GP / inducing points) is not supported by ImproperExactGP yet"
            )
        if isinstance(module, multitask):
            raise NotImplementedError("multitask kernels are not supported by ImproperExactGP yet")


def contains_walk_kernel(model: torch.nn.Module) -> bool:
    """Whether any submodule of ``model`` is a walk (improper) kernel."""
    return any(_is_walk(module) for module in model.modules())


def _validate_training_data(train_inputs, train_targets) -> None:
    if train_inputs is None:
        if train_targets is not None:
            raise ValueError("train_targets was given without train_inputs")
        return
    inputs = (train_inputs,) if isinstance(train_inputs, Tensor) else tuple(train_inputs)
    if not all(isinstance(x, Tensor) for x in inputs):
        raise TypeError("train_inputs must be a tensor or a sequence of tensors")
    if not isinstance(train_targets, Tensor):
        raise TypeError(f"train_targets must be a tensor; got {type(train_targets).__name__}")
    for index, x in enumerate(inputs):
        if not torch.isfinite(x).all():
            raise ValueError(f"train_inputs[{index}] contains non-finite values (NaN or inf)")
        n = x.shape[-2] if x.dim() > 1 else x.shape[-1]
        if n != train_targets.shape[-1]:
            raise ValueError(
                f"train_targets has {train_targets.shape[-1]} observations but train_inputs[{index}] has {n} "
                f"points (shapes {tuple(train_targets.shape)} and {tuple(x.shape)})"
            )
    if torch.isinf(train_targets).any():
        raise ValueError(
            "train_targets contains infinite values (NaN marks a missing observation; inf does not)"
        )


class _ImproperPriorLayer(Module):
    """Sits between ExactGP and gpytorch.Module in the MRO: every prior ``forward`` returns (train, joint
    train+test, prior mode) becomes an :class:`ImproperMultivariateNormal` over the same representative."""

    def _reference_points(self, inputs: Sequence[Tensor]) -> list[Tensor]:
        """Per input tensor, the points appended to the forward call: x0 (anchor) or (x_lo, x_hi) (shift)."""
        base = list(self.train_inputs) if self.train_inputs is not None else list(inputs)
        if self.representative == "anchor":
            if self._anchor is not None:
                return [a.to(x) for a, x in zip(self._anchor, base)]
            return [x.detach().mean(dim=-2, keepdim=True) for x in base]
        return [
            torch.cat([x.detach().amin(-2, keepdim=True), x.detach().amax(-2, keepdim=True)], -2)
            for x in base
        ]

    def __call__(self, *inputs: Tensor, **kwargs: Any) -> MultivariateNormal:
        check_kernel_structure(self)
        self._warn_constant_mean_once()
        inputs = [x.unsqueeze(-1) if x.dim() == 1 else x for x in inputs]
        references = self._reference_points(inputs)
        extended = []
        for x, reference in zip(inputs, references):
            batch_shape = torch.broadcast_shapes(x.shape[:-2], reference.shape[:-2])
            extended.append(
                torch.cat(
                    [
                        x.expand(*batch_shape, *x.shape[-2:]),
                        reference.expand(*batch_shape, *reference.shape[-2:]),
                    ],
                    dim=-2,
                )
            )
        output = super().__call__(*extended, **kwargs)
        if isinstance(output, MultitaskMultivariateNormal):
            raise NotImplementedError("ImproperExactGP does not support multitask models yet")
        if not isinstance(output, MultivariateNormal):
            raise RuntimeError("ImproperExactGP.forward must return a MultivariateNormal")
        n = inputs[0].shape[-2]
        covariance = output.lazy_covariance_matrix
        main = covariance[..., :n, :n]
        # The representative's terms carry no gradient: L and the posterior do not depend on them at all.
        if self.representative == "anchor":
            column = covariance[..., :, n:].to_dense().detach()  # one kernel call: r(x, x0) and r(x0, x0)
            cross, level = column[..., :n, :], column[..., n:, :]
            half = level / 2 - cross  # K_a = R + half 1^T + 1 half^T: the covariance of f(x) - f(x0)
            ones = torch.ones_like(half)
            left, right = torch.cat([half, ones], -1), torch.cat([ones, half], -1).mT
            low_rank = MatmulLinearOperator(left, right)
            level_shift = None
        else:
            if self.shift is not None:
                level_shift = torch.as_tensor(self.shift, dtype=main.dtype, device=main.device)
            else:  # auto rule: twice |r| between the training box's corners
                level_shift = 2 * covariance[..., n : n + 1, n + 1 : n + 2].to_dense().detach().abs().squeeze(
                    -1
                )
                level_shift = level_shift.squeeze(-1)
            left = _constant_root(main, level_shift)
            right = left.mT
            low_rank = RootLinearOperator(left)
        on_training_inputs = self.training or (
            self.train_inputs is not None
            and len(inputs) == len(self.train_inputs)
            and all(x.shape == t.shape and torch.equal(x, t) for x, t in zip(inputs, self.train_inputs))
        )
        if on_training_inputs and n <= settings.max_cholesky_size.value():
            # The Cholesky path densifies it anyway: one dense matrix spares linear_operator's bookkeeping
            representative = to_linear_operator(_dense_plus_low_rank(main.to_dense(), left, right))
        else:
            representative = SumLinearOperator(main, low_rank)
        prior = ImproperMultivariateNormal(output.loc[..., :n], representative)
        prior._level_shift = level_shift  # lets the likelihood and the posterior grow a failed shift
        return prior

    def _warn_constant_mean_once(self) -> None:
        if self._warned_constant_mean:
            return
        if any(isinstance(module, gpytorch.means.ConstantMean) for module in self.modules()):
            self._warned_constant_mean = True
            warnings.warn(
                "a ConstantMean in an ImproperExactGP is redundant: the flat prior on the level already is "
                "a free "
                "constant, so its gradient is exactly 0 and it stays where it was initialised. Use ZeroMean.",
                RedundantMeanWarning,
                stacklevel=3,
            )


class ImproperExactGP(ExactGP, _ImproperPriorLayer):
    r"""Exact GP regression with an improper (flat) prior on the level: a drop-in replacement for
    :class:`gpytorch.models.ExactGP` that makes walk kernels usable.

    Subclass it exactly as ExactGP (``forward`` returns a ``MultivariateNormal`` of a mean and a kernel),
    usually
    with ``ZeroMean``; train it with :class:`pyro_ext.gp.ImproperMarginalLogLikelihood`. Predictions are the
    exact :math:`c \to \infty` posterior of :math:`f = \beta + f_0`, :math:`\beta` flat (module docstring):
    they stay exact for kernels that are only conditionally positive definite (:class:`~pyro_ext.kernels.
    SmoothWalkKernel`, :class:`~pyro_ext.kernels.MaternWalkKernel`, and their positive sums with positive
    definite kernels), and for positive definite kernels they are ordinary kriging.

    Every prior is represented by a positive definite matrix :math:`K_\mathrm{rep}` that differs from
    :math:`r(X, X)` by :math:`h(x) + h(x') + c_0`, which changes no result:

    - ``"anchor"`` (default): :math:`K_a(x, x') = r(x, x') - r(x, x_0) - r(x_0, x') + r(x_0, x_0)`, the
      covariance of :math:`f(x) - f(x_0)`, with :math:`x_0` the training centroid; positive semi-definite by
      conditional positive definiteness, best conditioned;
    - ``"shift"``: :math:`K_0 = r(X, X) + c_0 \mathbf 1 \mathbf 1^\top`, :math:`c_0` given or
      :math:`2 |r(x_\mathrm{lo}, x_\mathrm{hi})|` over the training box's corners; :math:`a_0 > 0` checks it
      exactly, and a failed :math:`c_0` is multiplied by 4 up to three times.

    Supported as in ExactGP: Cholesky and CG/LOVE (``max_cholesky_size``, ``fast_pred_var``,
    ``cholesky_jitter``, ``detach_test_caches``, ``skip_posterior_variances``, ``lazily_evaluate_kernels``),
    batch models, ``observation_nan_policy`` "ignore" and "mask" ("fill" raises). Not yet: fantasy models,
    multitask models, KISS-GP (``NotImplementedError``).

    :param train_inputs: ``(... x) n x d`` training inputs (or a sequence of them), finite.
    :param train_targets: ``(... x) n`` targets (NaN marks a missing one under
        ``observation_nan_policy('mask')``).
    :param likelihood: a Gaussian likelihood.
    :param representative: ``"anchor"`` or ``"shift"``.
    :param shift: a fixed :math:`c_0 > 0` for ``representative="shift"`` (default: the automatic rule).
    :param anchor: the anchor :math:`x_0` (``... x 1 x d``, or one per input tensor) for
        ``representative="anchor"`` (default: the training centroid).

    Example::

        >>> class GP(ImproperExactGP):
        ...     def __init__(self, x, y, likelihood):
        ...         super().__init__(x, y, likelihood)
        ...         self.mean_module = gpytorch.means.ZeroMean()
        ...         self.covar_module = gpytorch.kernels.ScaleKernel(SmoothWalkKernel())
        ...     def forward(self, x):
        ...         mean, covar = self.mean_module(x), self.covar_module(x)
        ...         return gpytorch.distributions.MultivariateNormal(mean, covar)
        >>> model = GP(train_x, train_y, gpytorch.likelihoods.GaussianLikelihood())
        >>> mll = ImproperMarginalLogLikelihood(model.likelihood, model)

    References: Ambrogioni, *Stationarity without mean reversion in improper Gaussian processes*,
    ICML 2024, arXiv:2310.02877.
    """

    def __init__(
        self,
        train_inputs: Tensor | Iterable[Tensor] | None,
        train_targets: Tensor | None,
        likelihood: gpytorch.likelihoods.GaussianLikelihood,
        *,
        representative: Representative = "anchor",
        shift: float | None = None,
        anchor: Tensor | Sequence[Tensor] | None = None,
    ) -> None:
        if representative not in ("anchor", "shift"):
            raise ValueError(f"representative must be 'anchor' or 'shift'; got {representative!r}")
        if shift is not None:
            if representative != "shift":
                raise ValueError("shift is only used with representative='shift'")
            if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not (0 < shift < math.inf):
                raise ValueError(f"shift must be a positive finite number; got {shift!r}")
        if anchor is not None:
            if representative != "anchor":
                raise ValueError("anchor is only used with representative='anchor'")
            anchor = (anchor,) if isinstance(anchor, Tensor) else tuple(anchor)
            anchor = tuple(a.view(1, -1) if a.dim() == 1 else a for a in anchor)  # a point (d,) is (1, d)
            if any(a.dim() < 2 or a.shape[-2] != 1 for a in anchor):
                raise ValueError(
                    "anchor must be one point per input tensor, of shape (d,) or (..., 1, d); got shapes "
                    f"{[tuple(a.shape) for a in anchor]}"
                )
            if not all(torch.isfinite(a).all() for a in anchor):
                raise ValueError("anchor must be finite")
        _validate_training_data(train_inputs, train_targets)
        super().__init__(train_inputs, train_targets, likelihood)
        self.representative = representative
        self.shift = float(shift) if shift is not None else None
        self._anchor = anchor
        self._warned_constant_mean = False

    # ExactGP assigns a DefaultPredictionStrategy to this attribute; it becomes the improper one on the way
    # in.
    @property
    def prediction_strategy(self) -> ImproperPredictionStrategy | None:
        return self.__dict__.get("_prediction_strategy")

    @prediction_strategy.setter
    def prediction_strategy(self, strategy: DefaultPredictionStrategy | None) -> None:
        if strategy is not None and not isinstance(strategy, ImproperPredictionStrategy):
            if type(strategy) is not DefaultPredictionStrategy:
                raise NotImplementedError(
                    f"{type(strategy).__name__} (from the kernel) is not supported by ImproperExactGP yet"
                )
            strategy = ImproperPredictionStrategy.from_strategy(strategy)
        self.__dict__["_prediction_strategy"] = strategy

    def set_train_data(self, inputs=None, targets=None, strict: bool = True) -> None:
        _validate_training_data(
            inputs if inputs is not None else self.train_inputs,
            targets if targets is not None else self.train_targets,
        )
        super().set_train_data(inputs, targets, strict)

    def get_fantasy_model(self, inputs, targets, **kwargs):
        raise NotImplementedError("fantasy models of an ImproperExactGP are not supported yet")

    def _get_test_prior_mean_and_covariances(self, train_inputs, test_inputs, **kwargs):
        results = super()._get_test_prior_mean_and_covariances(train_inputs, test_inputs, **kwargs)
        *values, posterior_class = results
        # the posterior is proper: a plain MultivariateNormal (finite variances)
        if issubclass(posterior_class, ImproperMultivariateNormal):
            posterior_class = MultivariateNormal
        return (*values, posterior_class)
