r"""The restricted marginal likelihood of an improper GP: :class:`ImproperMarginalLogLikelihood`."""

from __future__ import annotations

from typing import Any

import torch
from gpytorch import settings
from gpytorch.distributions import MultitaskMultivariateNormal, MultivariateNormal
from gpytorch.mlls import ExactMarginalLogLikelihood
from linear_operator.operators import MaskedLinearOperator
from torch import Tensor

from pyro_ext.gp.exact import ImproperExactGP, contains_walk_kernel, restricted_log_likelihood

__all__ = ["ImproperMarginalLogLikelihood"]


class ImproperMarginalLogLikelihood(ExactMarginalLogLikelihood):
    r"""The restricted (REML) log likelihood of an :class:`~pyro_ext.gp.ImproperExactGP`, per data point.

    A drop-in replacement for :class:`gpytorch.mlls.ExactMarginalLogLikelihood`, on the same scale:
    ``(L + log priors) / n`` with

    .. math::

        L = \lim_{c \to \infty}\bigl[\log \mathcal N(y; \mu, K + c \mathbf 1 \mathbf 1^\top)
            + \tfrac12 \log 2\pi c\bigr]
          = -\tfrac12 (d^\top K^{-1} d - b^2/a) - \tfrac12 \log\det K - \tfrac12 \log a
            - \tfrac{n-1}{2} \log 2\pi,

    :math:`d = y - \mu`, :math:`a = \mathbf 1^\top K^{-1} \mathbf 1`, :math:`b = \mathbf 1^\top K^{-1} d`
    (GPML eq. 2.45 with :math:`H = \mathbf 1^\top`). It is the likelihood of the :math:`n - 1` contrasts of
    :math:`y`, invariant to a constant offset of :math:`y`; unlike ML-II with a ``ConstantMean`` (the profile
    likelihood) it keeps the :math:`-\tfrac12 \log a` term that accounts for the unknown level. It is computed
    from one ``inv_quad_logdet`` call with three right-hand sides, so the Cholesky and the CG (mBCG) paths
    cost what ExactMarginalLogLikelihood's do.

    With a plain :class:`~gpytorch.models.ExactGP` and a positive definite kernel it is ordinary-kriging
    REML. A walk (improper) kernel inside a plain ExactGP is refused: its prior covariance is not positive
    definite, so that model would fail (or, under CG, silently return nonsense).

    Above ``max_cholesky_size`` (CG and stochastic Lanczos quadrature), walk Gram matrices (spectrum
    :math:`\propto 1/\omega^2`) are worse conditioned than a Matérn's; the design note measured GPyTorch's
    defaults a few percent off at n = 2500 over 50 lengthscales, and errors <= 4e-4 with float64,
    ``gpytorch.settings.cg_tolerance(0.01)``, ``max_lanczos_quadrature_iterations(100)`` and
    ``num_trace_samples(30)``: use those to report :math:`L` there. The anchored representative (the
    default) is the better conditioned one.

    :param ~gpytorch.likelihoods.GaussianLikelihood likelihood: the model's Gaussian likelihood.
    :param ~gpytorch.models.ExactGP model: the GP, usually an :class:`~pyro_ext.gp.ImproperExactGP`.

    Example::

        >>> mll = ImproperMarginalLogLikelihood(likelihood, model)
        >>> model.train(); likelihood.train()
        >>> loss = -mll(model(train_x), train_y)
        >>> loss.backward()

    References: Harville (1974); Patterson & Thompson (1971); Ambrogioni, arXiv:2310.02877.
    """

    def __init__(self, likelihood, model) -> None:
        super().__init__(likelihood, model)
        if not isinstance(model, ImproperExactGP) and contains_walk_kernel(model):
            raise ValueError(
                f"model ({type(model).__name__}) is a plain ExactGP with a walk (improper) kernel, whose "
                "prior covariance is not positive definite: subclass pyro_ext.gp.ImproperExactGP instead of "
                "gpytorch.models.ExactGP"
            )

    def forward(
        self, function_dist: MultivariateNormal, target: Tensor, *params: Any, **kwargs: Any
    ) -> Tensor:
        r"""``(L + log priors) / n`` for the prior ``function_dist`` at the training inputs and ``target``.

        :param function_dist: the model's output at the training inputs (train mode).
        :param target: the training targets (``... x n``), NaN for missing ones under
            ``gpytorch.settings.observation_nan_policy('mask')``.
        :return: one value per batch element.
        """
        if isinstance(function_dist, MultitaskMultivariateNormal):
            raise NotImplementedError("ImproperMarginalLogLikelihood does not support multitask models yet")
        if not isinstance(function_dist, MultivariateNormal):
            raise RuntimeError("ImproperMarginalLogLikelihood can only operate on Gaussian random variables")
        if not isinstance(target, Tensor):
            raise TypeError(f"target must be a tensor; got {type(target).__name__}")
        if target.shape[-1] != function_dist.event_shape[-1]:
            raise ValueError(
                f"target has {target.shape[-1]} observations but the model's output has "
                f"{function_dist.event_shape[-1]} points"
            )
        output = self.likelihood(function_dist, *params, **kwargs)
        mean, covariance = output.loc, output.lazy_covariance_matrix
        policy = settings.observation_nan_policy.value()
        if policy == "fill":
            raise ValueError(
                "observation_nan_policy('fill') is not supported by ImproperMarginalLogLikelihood"
            )
        if policy == "mask":
            observed = settings.observation_nan_policy._get_observed(target, output.event_shape)
            observed = observed.reshape(-1)
            mean = mean[..., observed]
            covariance = MaskedLinearOperator(covariance, observed, observed)
            target = target[..., observed]
        elif torch.isnan(target).any():
            raise ValueError(
                "target contains NaN: wrap the call in gpytorch.settings.observation_nan_policy('mask') to "
                "leave those observations out"
            )
        if target.shape[-1] < 2:
            raise ValueError(
                "target must hold at least 2 (observed) points for the restricted likelihood, which spends "
                "one on "
                f"the unknown level; got {target.shape[-1]}"
            )
        result = restricted_log_likelihood(
            covariance, target - mean, level_shift=getattr(function_dist, "_level_shift", None)
        )
        result = self._add_other_terms(result, params)
        return result.div_(function_dist.event_shape.numel())
