r"""Exact energies of diffused Gaussian data and of small Gaussian mixtures.

Data :math:`x_0 \sim \mathcal N(\mu, \Sigma)` diffuses to :math:`p_t = \mathcal N(\alpha\mu, \alpha^2\Sigma +
\sigma^2 I)`, so energy, score (:math:`-C_t^{-1}(x - \alpha\mu)`), denoiser and Jacobian
(:math:`-C_t^{-1}`) are closed-form. Both classes keep the eigendecomposition of :math:`\Sigma` as buffers,
so that every time :math:`t` costs no new factorisation: :math:`C_t = V\operatorname{diag}(\alpha^2\lambda +
c)V^T + c(I - VV^T)` with :math:`c = \alpha^2 s^2 + \sigma^2` (:math:`s^2 = 0` for a full covariance).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.distributions import LowRankMultivariateNormal, MultivariateNormal

from pyro_ext.diffusion._validation import check_finite, under_functorch
from pyro_ext.diffusion.energy.base import Energy, sample_shape_of
from pyro_ext.diffusion.schedules import Schedule, TimeLike

__all__ = ["GaussianEnergy", "GaussianMixtureEnergy"]


def _psd_eigh(cov: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """Eigenvalues (clamped at 0) and eigenvectors of a symmetric PSD matrix, or a clear error."""
    if not torch.allclose(
        cov, cov.transpose(-1, -2), rtol=1e-10, atol=1e-12 * float(cov.abs().max().clamp_min(1))
    ):
        raise ValueError(f"{name} must be symmetric")
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    scale = eigenvalues.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(cov.dtype).tiny)
    tolerance = 1e-8 if cov.dtype == torch.float64 else 1e-5
    if bool((eigenvalues < -tolerance * scale).any()):
        raise ValueError(
            f"{name} must be positive semi-definite; its smallest eigenvalue is "
            f"{float(eigenvalues.min()):.3g}"
        )
    return eigenvalues.clamp_min(0.0), eigenvectors


def _condition_gaussian(
    mean: Tensor, cov: Tensor, mask: Tensor, value: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Condition :math:`\mathcal N(\text{mean}, \text{cov})` (batched ``[..., d]``, ``[..., d, d]``).

    Returns the log-density of the observed coordinates at ``value`` and the conditional mean and
    covariance of the free ones.
    """
    obs, free = mask, ~mask
    c_oo = cov[..., obs, :][..., :, obs]
    c_fo = cov[..., free, :][..., :, obs]
    c_ff = cov[..., free, :][..., :, free]
    chol = torch.linalg.cholesky(c_oo)
    residual = (value - mean[..., obs])[..., None]
    solved = torch.cholesky_solve(residual, chol)
    k = int(obs.sum())
    log_marginal = (
        -0.5 * (residual * solved).sum((-1, -2))
        - torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        - 0.5 * k * math.log(2 * math.pi)
    )
    cond_mean = mean[..., free] + (c_fo @ solved)[..., 0]
    cond_cov = c_ff - c_fo @ torch.cholesky_solve(c_fo.transpose(-1, -2), chol)
    return log_marginal, cond_mean, 0.5 * (cond_cov + cond_cov.transpose(-1, -2))


class GaussianEnergy(Energy):
    r"""Exact energy of Gaussian data :math:`\mathcal N(\mu, \Sigma)` diffused by ``schedule``.

    .. math::

        p_t = \mathcal N(\alpha\mu, C_t), \quad C_t = \alpha^2\Sigma + \sigma^2 I, \quad
        s = -C_t^{-1}(x - \alpha\mu), \quad J = -C_t^{-1}, \quad
        E[x_0 \mid x_t] = \mu + \alpha\Sigma C_t^{-1}(x - \alpha\mu).

    ``cov`` is a full ``[d, d]`` covariance, or a low-rank triple ``(U, Lambda, s2)`` meaning
    :math:`\Sigma = U\operatorname{diag}(\Lambda)U^T + s^2 I` (``U`` need not be orthonormal). With
    :math:`s^2 = 0` and ``k < d`` the data lie on a linear manifold (§6.4 of the design note): the
    normal eigenvalues of :math:`J` are :math:`-1/\sigma^2`, the tangent ones :math:`-1/(\alpha^2\lambda_i +
    \sigma^2)`.

    :param Tensor mean: ``[d]``.
    :param cov: ``[d, d]`` tensor, or ``(U [d, k], Lambda [k], s2 float)``.
    :param Schedule schedule: the noise schedule.

    Example::

        >>> from pyro_ext.diffusion import VPLinear
        >>> energy = GaussianEnergy(torch.zeros(2), torch.eye(2), VPLinear())
        >>> energy.score(torch.ones(2), 0.5)  # VP keeps N(0, I) fixed: score = -x
        tensor([-1., -1.])

    References: Ventura et al., arXiv:2410.05898; Raya & Ambrogioni, arXiv:2305.19693.
    """

    exact = True

    def __init__(self, mean: Tensor, cov: Tensor | tuple[Tensor, Tensor, float], schedule: Schedule) -> None:
        if not isinstance(mean, Tensor) or mean.dim() != 1 or not mean.is_floating_point():
            raise ValueError("mean must be a floating tensor of shape [d]")
        check_finite(mean, "mean")
        d = mean.shape[0]
        super().__init__(schedule, d)
        if isinstance(cov, Tensor):
            if cov.shape != (d, d):
                raise ValueError(f"cov must have shape [{d}, {d}]; got {tuple(cov.shape)}")
            check_finite(cov, "cov")
            eigenvalues, eigenvectors = _psd_eigh(cov.to(mean.dtype), "cov")
            noise = 0.0
        elif isinstance(cov, (tuple, list)) and len(cov) == 3:
            factor, values, noise = cov
            if not isinstance(factor, Tensor) or factor.dim() != 2 or factor.shape[0] != d:
                raise ValueError(f"the low-rank factor U must have shape [{d}, k]")
            values = torch.as_tensor(values, dtype=mean.dtype, device=mean.device)
            if values.shape != (factor.shape[1],):
                raise ValueError(f"Lambda must have shape [{factor.shape[1]}] (one per column of U)")
            check_finite(factor, "U")
            check_finite(values, "Lambda")
            if bool((values < 0).any()):
                raise ValueError("Lambda must be non-negative")
            noise = float(noise)
            if not (noise >= 0 and math.isfinite(noise)):
                raise ValueError(f"s2 must be a non-negative float; got {noise}")
            # U diag(Lambda) U^T = P S^2 P^T from the SVD of U sqrt(Lambda): orthonormal directions.
            left, singular, _ = torch.linalg.svd(factor.to(mean.dtype) * values.sqrt(), full_matrices=False)
            eigenvalues, eigenvectors = singular**2, left
        else:
            raise TypeError("cov must be a [d, d] tensor or a tuple (U, Lambda, s2)")
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("eigenvalues", eigenvalues.detach())
        self.register_buffer("eigenvectors", eigenvectors.detach())
        self.register_buffer("noise", torch.tensor(noise, dtype=mean.dtype, device=mean.device))
        self._dtype_anchor = self._dtype_anchor.to(mean.dtype)

    @property
    def full_rank(self) -> bool:
        """True if the eigenvectors span the space (a full covariance)."""
        return self.eigenvectors.shape[1] == self.dim

    @property
    def covariance(self) -> Tensor:
        r"""The data covariance :math:`\Sigma`, ``[d, d]``."""
        v = self.eigenvectors
        cov = (v * self.eigenvalues) @ v.T
        return cov + self.noise * torch.eye(self.dim, dtype=cov.dtype, device=cov.device)

    def _parts(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]:
        """``(alpha, z, perp, denom, c)``: the residual in the eigenbasis and its orthogonal complement
        (``None`` for a full covariance)."""
        alpha, sigma2 = self._coefficients(t)
        alpha, sigma2 = alpha[..., None], sigma2[..., None]
        c = alpha**2 * self.noise + sigma2
        residual = x - alpha * self.mean
        z = residual @ self.eigenvectors
        perp = None if self.full_rank else residual - z @ self.eigenvectors.T
        return alpha, z, perp, alpha**2 * self.eigenvalues + c, c

    def energy(self, x: Tensor, t: TimeLike) -> Tensor:
        r"""Exact :math:`-\log \mathcal N(x; \alpha\mu, C_t)`."""
        out_dtype = x.dtype if isinstance(x, Tensor) else None
        x, t = self._prepare(x, t)
        _, z, perp, denom, c = self._parts(x, t)
        quad = (z**2 / denom).sum(-1)
        logdet = torch.log(denom).sum(-1)
        if not self.full_rank:
            quad = quad + (perp**2).sum(-1) / c[..., 0]
            logdet = logdet + (self.dim - denom.shape[-1]) * torch.log(c[..., 0])
        return (0.5 * (quad + logdet + self.dim * math.log(2 * math.pi))).to(out_dtype)

    def _precision(self, t: Tensor) -> Tensor:
        """:math:`C_t^{-1}` (``[*t.shape, d, d]``) from the eigendecomposition."""
        alpha, sigma2 = self._coefficients(t)
        alpha, sigma2 = alpha[..., None], sigma2[..., None]
        c = alpha**2 * self.noise + sigma2
        v = self.eigenvectors
        precision = torch.einsum("ir,...r,jr->...ij", v, 1.0 / (alpha**2 * self.eigenvalues + c), v)
        if not self.full_rank:
            projector = torch.eye(self.dim, dtype=v.dtype, device=v.device) - v @ v.T
            precision = precision + projector / c[..., None]
        return precision

    def score(self, x: Tensor, t: TimeLike) -> Tensor:
        out_dtype = x.dtype if isinstance(x, Tensor) else None
        x, t = self._prepare(x, t)
        if t.dim() == 0 and not under_functorch(x, t):
            # one time for all samples: s = -C^{-1}(x - alpha mu) is one fused GEMM with a d x d matrix
            # (samplers call this hundreds of times on large batches)
            precision = self._precision(t)
            bias = -(self.schedule.alpha(t) * self.mean) @ precision
            flat = torch.addmm(bias, x.reshape(-1, self.dim), precision, alpha=-1.0, beta=-1.0)
            return flat.reshape(x.shape).to(out_dtype)
        _, z, perp, denom, c = self._parts(x, t)
        score = -(z / denom) @ self.eigenvectors.T
        if not self.full_rank:
            score = score - perp / c
        return score.to(out_dtype)

    def denoise(self, x: Tensor, t: TimeLike) -> Tensor:
        out_dtype = x.dtype if isinstance(x, Tensor) else None
        x, t = self._prepare(x, t)
        alpha, z, perp, denom, c = self._parts(x, t)
        # Sigma has eigenvalues lambda + s2 along V and s2 on the complement
        shrunk = ((self.eigenvalues + self.noise) * z / denom) @ self.eigenvectors.T
        if not self.full_rank:
            shrunk = shrunk + self.noise * perp / c
        return (self.mean + alpha * shrunk).to(out_dtype)

    def score_jacobian(self, x: Tensor, t: TimeLike) -> Tensor:
        r""":math:`-C_t^{-1}`, broadcast to ``[..., d, d]`` (it does not depend on ``x``)."""
        out_dtype = x.dtype if isinstance(x, Tensor) else None
        x, t = self._prepare(x, t)
        jac = -self._precision(t)
        return jac.expand(*x.shape[:-1], self.dim, self.dim).to(out_dtype)

    def marginal(self, t: TimeLike) -> MultivariateNormal | LowRankMultivariateNormal:
        r"""The torch distribution :math:`\mathcal N(\alpha\mu, C_t)` at a scalar ``t``.

        A :class:`~torch.distributions.LowRankMultivariateNormal` for a low-rank :math:`\Sigma`.
        """
        t = self._time(t)
        if t.dim() != 0:
            raise ValueError(f"t must be a scalar for marginal(); got shape {tuple(t.shape)}")
        alpha, sigma2 = self._coefficients(t)
        loc = alpha * self.mean
        if self.full_rank:
            cov = (self.eigenvectors * (alpha**2 * self.eigenvalues + sigma2)) @ self.eigenvectors.T
            return MultivariateNormal(loc, covariance_matrix=0.5 * (cov + cov.T))
        factor = alpha * self.eigenvectors * self.eigenvalues.sqrt()
        diag = (alpha**2 * self.noise + sigma2).expand(self.dim)
        return LowRankMultivariateNormal(loc, factor, diag)

    def _marginal_cov(self, t: Tensor) -> Tensor:
        alpha, sigma2 = self._coefficients(t)
        alpha, sigma2 = alpha[..., None, None], sigma2[..., None, None]
        return alpha**2 * self.covariance + sigma2 * torch.eye(self.dim, dtype=self.dtype, device=self.device)

    def sample(
        self, n: int | Sequence[int], t: TimeLike, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """Exact samples, ``[*n, *t.shape, d]``: :math:`x_0 \\sim \\mathcal N(\\mu, \\Sigma)`, then noise."""
        shape = sample_shape_of(n)
        t = self._time(t)
        out = (*shape, *t.shape)
        options = {"dtype": self.dtype, "device": self.device, "generator": generator}
        x0 = self.mean + (
            torch.randn(*out, self.eigenvalues.shape[0], **options) * self.eigenvalues.sqrt()
        ) @ (self.eigenvectors.T)
        if not self.full_rank:
            x0 = x0 + self.noise.sqrt() * torch.randn(*out, self.dim, **options)
        alpha, sigma = self.schedule.alpha(t)[..., None], self.schedule.sigma(t)[..., None]
        return alpha * x0 + sigma * torch.randn(*out, self.dim, **options)

    def _conditional_sample(
        self, mask: Tensor, value: Tensor, n: torch.Size, t: TimeLike, generator: torch.Generator | None
    ) -> Tensor:
        t = self._time(t)
        alpha = self.schedule.alpha(t)[..., None]
        _, cond_mean, cond_cov = _condition_gaussian(
            alpha * self.mean, self._marginal_cov(t), mask, value.to(self.dtype)
        )
        chol = torch.linalg.cholesky(cond_cov)
        noise = torch.randn(*n, *cond_mean.shape, dtype=self.dtype, device=self.device, generator=generator)
        return cond_mean + (chol @ noise[..., None])[..., 0]

    def extra_repr(self) -> str:
        rank = "full" if self.full_rank else f"rank={self.eigenvalues.shape[0]}, s2={float(self.noise):g}"
        return f"dim={self.dim}, {rank}"


class GaussianMixtureEnergy(Energy):
    r"""Exact energy of a mixture of Gaussians :math:`\sum_k \pi_k \mathcal N(\mu_k, \Sigma_k)` diffused by
    ``schedule`` (for a small number of components :math:`K`).

    .. math::

        p_t = \sum_k \pi_k \mathcal N(\alpha\mu_k, C_k), \quad C_k = \alpha^2\Sigma_k + \sigma^2 I, \quad
        s = \sum_k w_k g_k, \quad J = \sum_k w_k(-C_k^{-1} + g_k g_k^T) - s s^T,

    with :math:`g_k = -C_k^{-1}(x - \alpha\mu_k)` and :math:`w` the posterior component weights.

    :param Tensor means: ``[K, d]``.
    :param covs: ``[K, d, d]`` full, ``[K, d]`` diagonal, ``[K]`` isotropic variances, or a float shared
        isotropic variance.
    :param Tensor weights: ``[K]`` non-negative (normalised here); uniform if omitted.
    :param Schedule schedule: the noise schedule.

    Example::

        >>> from pyro_ext.diffusion import VPLinear
        >>> angles = torch.arange(8) * (2 * torch.pi / 8)
        >>> ring = 1.2 * torch.stack([angles.cos(), angles.sin()], -1)
        >>> energy = GaussianMixtureEnergy(ring, 0.01, schedule=VPLinear())
        >>> x = energy.sample(1000, 0.0 + 1e-3)

    References: Raya & Ambrogioni, arXiv:2305.19693.
    """

    exact = True

    def __init__(
        self,
        means: Tensor,
        covs: Tensor | float,
        weights: Tensor | None = None,
        schedule: Schedule | None = None,
    ) -> None:
        if schedule is None:
            raise TypeError("schedule is required: GaussianMixtureEnergy(means, covs, weights, schedule)")
        if not isinstance(means, Tensor) or means.dim() != 2 or not means.is_floating_point():
            raise ValueError("means must be a floating tensor of shape [K, d]")
        check_finite(means, "means")
        k, d = means.shape
        super().__init__(schedule, d)
        covs = torch.as_tensor(covs, dtype=means.dtype, device=means.device)
        eye = torch.eye(d, dtype=means.dtype, device=means.device)
        if covs.dim() == 0 or covs.shape == (k,):
            full = covs.reshape(-1, 1, 1) * eye.expand(k, d, d)
        elif covs.shape == (k, d):
            full = torch.diag_embed(covs)
        elif covs.shape == (k, d, d):
            full = covs
        else:
            raise ValueError(
                f"covs must be a float or have shape [{k}], [{k}, {d}] or [{k}, {d}, {d}]; "
                f"got {tuple(covs.shape)}"
            )
        check_finite(full, "covs")
        eigenvalues, eigenvectors = _psd_eigh(full, "covs")
        if weights is None:
            log_weights = torch.full((k,), -math.log(k), dtype=means.dtype, device=means.device)
        else:
            weights = torch.as_tensor(weights, dtype=means.dtype, device=means.device)
            if weights.shape != (k,):
                raise ValueError(f"weights must have shape [{k}]; got {tuple(weights.shape)}")
            check_finite(weights, "weights")
            if bool((weights < 0).any()) or not bool(weights.sum() > 0):
                raise ValueError("weights must be non-negative with a positive sum")
            log_weights = torch.log(weights) - torch.log(weights.sum())
        self.register_buffer("means", means.detach().clone())
        self.register_buffer("log_weights", log_weights)
        self.register_buffer("eigenvalues", eigenvalues.detach())
        self.register_buffer("eigenvectors", eigenvectors.detach())
        self._dtype_anchor = self._dtype_anchor.to(means.dtype)

    @property
    def num_components(self) -> int:
        """:math:`K`."""
        return self.means.shape[0]

    @property
    def covs(self) -> Tensor:
        r"""The component covariances :math:`\Sigma_k`, ``[K, d, d]``."""
        v = self.eigenvectors
        return (v * self.eigenvalues[:, None, :]) @ v.transpose(-1, -2)

    def _components(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(alpha, z, denom, logits)`` per component: residuals in each eigenbasis and log(pi_k N_k)."""
        alpha, sigma2 = self._coefficients(t)
        alpha, sigma2 = alpha[..., None, None], sigma2[..., None, None]
        residual = x[..., None, :] - alpha * self.means  # [..., K, d]
        z = torch.einsum("...kd,kde->...ke", residual, self.eigenvectors)
        denom = alpha**2 * self.eigenvalues + sigma2
        log_normal = -0.5 * (
            (z**2 / denom).sum(-1) + torch.log(denom).sum(-1) + self.dim * math.log(2 * math.pi)
        )
        return alpha, z, denom, self.log_weights + log_normal

    def energy(self, x: Tensor, t: TimeLike) -> Tensor:
        out_dtype = x.dtype if isinstance(x, Tensor) else None
        x, t = self._prepare(x, t)
        return (-torch.logsumexp(self._components(x, t)[3], -1)).to(out_dtype)

    def posterior_weights(self, x: Tensor, t: TimeLike) -> Tensor:
        """Posterior component probabilities, ``[..., K]``."""
        out_dtype = x.dtype if isinstance(x, Tensor) else None
        x, t = self._prepare(x, t)
        return torch.softmax(self._components(x, t)[3], -1).to(out_dtype)

    def _component_scores(self, z: Tensor, denom: Tensor) -> Tensor:
        return -torch.einsum("...ke,kde->...kd", z / denom, self.eigenvectors)

    def score(self, x: Tensor, t: TimeLike) -> Tensor:
        out_dtype = x.dtype if isinstance(x, Tensor) else None
        x, t = self._prepare(x, t)
        _, z, denom, logits = self._components(x, t)
        weights = torch.softmax(logits, -1)
        return (weights[..., None] * self._component_scores(z, denom)).sum(-2).to(out_dtype)

    def energy_and_score(self, x: Tensor, t: TimeLike) -> tuple[Tensor, Tensor]:
        out_dtype = x.dtype if isinstance(x, Tensor) else None
        x, t = self._prepare(x, t)
        _, z, denom, logits = self._components(x, t)
        weights = torch.softmax(logits, -1)
        score = (weights[..., None] * self._component_scores(z, denom)).sum(-2)
        return (-torch.logsumexp(logits, -1)).to(out_dtype), score.to(out_dtype)

    def denoise(self, x: Tensor, t: TimeLike) -> Tensor:
        r""":math:`\sum_k w_k(\mu_k + \alpha\Sigma_k C_k^{-1}(x - \alpha\mu_k))`."""
        out_dtype = x.dtype if isinstance(x, Tensor) else None
        x, t = self._prepare(x, t)
        alpha, z, denom, logits = self._components(x, t)
        weights = torch.softmax(logits, -1)
        shrunk = torch.einsum("...ke,kde->...kd", self.eigenvalues * z / denom, self.eigenvectors)
        return (weights[..., None] * (self.means + alpha * shrunk)).sum(-2).to(out_dtype)

    def score_jacobian(self, x: Tensor, t: TimeLike) -> Tensor:
        out_dtype = x.dtype if isinstance(x, Tensor) else None
        x, t = self._prepare(x, t)
        _, z, denom, logits = self._components(x, t)
        weights = torch.softmax(logits, -1)
        g = self._component_scores(z, denom)  # [..., K, d]
        score = (weights[..., None] * g).sum(-2)
        precision = torch.einsum("kir,...kr,kjr->...kij", self.eigenvectors, 1.0 / denom, self.eigenvectors)
        per_component = -precision + g[..., :, None] * g[..., None, :]
        jac = (weights[..., None, None] * per_component).sum(-3) - score[..., :, None] * score[..., None, :]
        return jac.to(out_dtype)

    def sample(
        self, n: int | Sequence[int], t: TimeLike, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """Exact samples, ``[*n, *t.shape, d]``."""
        shape = sample_shape_of(n)
        t = self._time(t)
        out = (*shape, *t.shape)
        total = math.prod(out)
        options = {"dtype": self.dtype, "device": self.device, "generator": generator}
        index = torch.multinomial(
            self.log_weights.exp(), max(total, 1), replacement=True, generator=generator
        )
        index = index[:total].reshape(out)
        xi = torch.randn(*out, self.dim, **options) * self.eigenvalues[index].sqrt()
        x0 = self.means[index] + torch.einsum("...e,...de->...d", xi, self.eigenvectors[index])
        alpha, sigma = self.schedule.alpha(t)[..., None], self.schedule.sigma(t)[..., None]
        return alpha * x0 + sigma * torch.randn(*out, self.dim, **options)

    def _conditional_sample(
        self, mask: Tensor, value: Tensor, n: torch.Size, t: TimeLike, generator: torch.Generator | None
    ) -> Tensor:
        t = self._time(t)
        alpha, sigma2 = self._coefficients(t)
        alpha, sigma2 = alpha[..., None, None], sigma2[..., None, None]
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        cov = alpha[..., None] ** 2 * self.covs + sigma2[..., None] * eye  # [..., K, d, d]
        value = value.to(self.dtype)[..., None, :]
        log_marginal, cond_mean, cond_cov = _condition_gaussian(alpha * self.means, cov, mask, value)
        probs = torch.softmax(self.log_weights + log_marginal, -1)  # [..., K]
        batch = probs.shape[:-1]
        flat = probs.reshape(-1, self.num_components)
        m = n.numel()
        index = torch.multinomial(flat, max(m, 1), replacement=True, generator=generator)[:, :m]  # [B, m]
        chol = torch.linalg.cholesky(cond_cov).expand(*batch, *cond_cov.shape[-3:])
        chol = chol.reshape(-1, *chol.shape[-3:])
        mean = cond_mean.expand(*batch, *cond_mean.shape[-2:]).reshape(-1, *cond_mean.shape[-2:])
        rows = torch.arange(flat.shape[0], device=self.device)[:, None]
        noise = torch.randn(
            flat.shape[0], m, mean.shape[-1], dtype=self.dtype, device=self.device, generator=generator
        )
        draws = mean[rows, index] + (chol[rows, index] @ noise[..., None])[..., 0]  # [B, m, d_free]
        return draws.transpose(0, 1).reshape(*n, *batch, mean.shape[-1])

    def extra_repr(self) -> str:
        return f"num_components={self.num_components}, dim={self.dim}"
