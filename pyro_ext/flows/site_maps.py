r"""The noise :math:`\leftrightarrow` value maps behind :func:`~pyro_ext.flows.site_bijectors.site_bijector`.

Each class is one kind of exact (or explicitly approximate) bijection between standard normal noise and
the values of one distribution; :mod:`pyro_ext.flows.site_bijectors` picks and builds them. They are
public so that a user can return one from a rule registered with
:func:`~pyro_ext.flows.site_bijectors.register_site_bijector`.

Conventions: ``to_value(eps) -> (x, log|det dx/deps|)`` and ``to_noise(x) -> (eps, log|det deps/dx|)``;
``ladj`` is summed over the rightmost :attr:`SiteBijector.event_dim` dimensions of the value and is
returned at the full broadcast shape; parameters broadcast against any extra leading dimensions.

References: Silvestri, Fertig, Moore, Ambrogioni, *Embedded-model flows*, arXiv:2110.06021.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.distributions import Distribution, biject_to, constraints
from torch.distributions import transforms as torch_transforms

from pyro_ext.flows._univariate import UnivariateNumerics
from pyro_ext.flows.roots import expand_bracket, implicit_step, monotone_root

__all__ = [
    "AffineDiagBijector",
    "AffineTrilBijector",
    "IndependentBijector",
    "MixtureBijector",
    "NumericalIcdfBijector",
    "SiteBijector",
    "TransformedBijector",
    "UnconstrainedBijector",
    "UniformBijector",
    "UniformLogitBijector",
    "UnivariateCdfBijector",
]

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_LOG_HALF = -math.log(2.0)


def _log_normal_pdf(eps: torch.Tensor) -> torch.Tensor:
    return -0.5 * eps * eps - _HALF_LOG_2PI


def _sum_rightmost(value: torch.Tensor, dims: int) -> torch.Tensor:
    return value.reshape(value.shape[: value.dim() - dims] + (-1,)).sum(-1) if dims > 0 else value


def _noise_from_log_cdf_sf(log_cdf: torch.Tensor, log_sf: torch.Tensor) -> torch.Tensor:
    """:math:`\\Phi^{-1}(F)` below the median and :math:`-\\Phi^{-1}(S)` above it (both branches finite)."""
    below = log_cdf <= _LOG_HALF
    return torch.where(
        below,
        torch.special.ndtri(torch.exp(log_cdf.clamp(max=_LOG_HALF))),
        -torch.special.ndtri(torch.exp(log_sf.clamp(max=_LOG_HALF))),
    )


# ===================================================================================== base class


class SiteBijector:
    """Base class: a bijection between standard normal noise and one distribution's values.

    Subclasses set :attr:`kind`, :attr:`exact` and :attr:`event_dim` and implement :meth:`to_value` and
    :meth:`to_noise`. Elementwise maps that solve for the value numerically set
    ``numerical = "to_value"`` and implement :meth:`value_bracket`.
    """

    #: Jacobian structure: "affine_diag", "affine_tril", "elementwise" (increasing per element) or
    #: "triangular" (any other triangular map; cannot be gated).
    kind: str = "triangular"
    #: whether the map pushes N(0, I) exactly onto the distribution (numerical maps: up to tolerance).
    exact: bool = True
    #: number of rightmost value dimensions ``ladj`` is summed over (``len(fn.event_shape)``).
    event_dim: int = 0
    #: ``None`` when both directions are closed form; ``"to_value"`` when noise->value is a root solve.
    numerical: str | None = None

    @property
    def leaf(self) -> SiteBijector:
        """This bijector without ``Independent`` wrappers (whose only effect is summing ``ladj``)."""
        return self

    def to_value(self, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise to value: ``(x, log|det dx/deps|)``."""
        raise NotImplementedError

    def to_noise(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Value to noise: ``(eps, log|det deps/dx|)``."""
        raise NotImplementedError

    def value_bracket(self, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Elementwise bounds ``lo <= to_value(eps)[0] <= hi`` without solving (numerical maps only)."""
        raise NotImplementedError(f"{type(self).__name__} solves nothing; use to_value")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, exact={self.exact}, event_dim={self.event_dim})"


# ===================================================================================== affine maps


class AffineDiagBijector(SiteBijector):
    r""":math:`x = \mu + \sigma \odot \varepsilon` with :math:`\sigma > 0` (kind ``"affine_diag"``).

    :param torch.Tensor loc: :math:`\mu`, broadcastable against the value.
    :param torch.Tensor scale: :math:`\sigma`, positive, broadcastable against the value.
    """

    kind = "affine_diag"

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, exact: bool = True) -> None:
        self.loc, self.scale, self.exact = loc, scale, exact

    def to_value(self, eps):
        x = self.loc + self.scale * eps
        return x, torch.log(self.scale).expand(x.shape)

    def to_noise(self, x):
        eps = (x - self.loc) / self.scale
        return eps, -torch.log(self.scale).expand(eps.shape)


class AffineTrilBijector(SiteBijector):
    r""":math:`x = \mu + L\varepsilon` with lower-triangular :math:`L`, positive diagonal (``"affine_tril"``).

    :param torch.Tensor loc: :math:`\mu`, shape ``[..., d]``.
    :param torch.Tensor scale_tril: :math:`L`, shape ``[..., d, d]``.
    """

    kind = "affine_tril"
    event_dim = 1

    def __init__(self, loc: torch.Tensor, scale_tril: torch.Tensor, exact: bool = True) -> None:
        self.loc, self.scale_tril, self.exact = loc, scale_tril, exact

    def _log_diagonal(self) -> torch.Tensor:
        return torch.log(self.scale_tril.diagonal(dim1=-2, dim2=-1)).sum(-1)

    def to_value(self, eps):
        x = self.loc + torch.matmul(self.scale_tril, eps.unsqueeze(-1)).squeeze(-1)
        return x, self._log_diagonal().expand(x.shape[:-1])

    def to_noise(self, x):
        centred = (x - self.loc).unsqueeze(-1)
        scale_tril = self.scale_tril.expand(centred.shape[:-2] + self.scale_tril.shape[-2:])
        eps = torch.linalg.solve_triangular(scale_tril, centred, upper=False).squeeze(-1)
        return eps, -self._log_diagonal().expand(eps.shape[:-1])


# ===================================================================================== univariate maps


class UniformBijector(SiteBijector):
    r""":math:`x = a + (b - a)\Phi(\varepsilon)`; above the median, :math:`x = b - (b - a)\Phi(-\varepsilon)`.

    Kind ``"elementwise"``, with
    :math:`\log|\partial x/\partial\varepsilon| = \log(b - a) + \log\phi(\varepsilon)`.
    """

    kind = "elementwise"

    def __init__(self, low: torch.Tensor, high: torch.Tensor) -> None:
        self.low, self.high = low, high

    def to_value(self, eps):
        width = self.high - self.low
        x = torch.where(
            eps <= 0,
            self.low + width * torch.special.ndtr(eps.clamp(max=0.0)),
            self.high - width * torch.special.ndtr(-eps.clamp(min=0.0)),
        )
        return x, torch.log(width) + _log_normal_pdf(eps)

    def to_noise(self, x):
        width = self.high - self.low
        below = (x - self.low) / width
        above = (self.high - x) / width
        eps = torch.where(
            below <= 0.5,
            torch.special.ndtri(below.clamp(max=0.5)),
            -torch.special.ndtri(above.clamp(max=0.5)),
        )
        return eps, -torch.log(width) - _log_normal_pdf(eps)


class UniformLogitBijector(SiteBijector):
    r"""A uniform site in unconstrained coordinates: :math:`y = \mathrm{logit}\,\Phi(\varepsilon)
    = \log\Phi(\varepsilon) - \log\Phi(-\varepsilon)`, independent of the bounds."""

    kind = "elementwise"

    @staticmethod
    def _log_derivative(eps: torch.Tensor) -> torch.Tensor:
        return _log_normal_pdf(eps) - torch.special.log_ndtr(eps) - torch.special.log_ndtr(-eps)

    def to_value(self, eps):
        y = torch.special.log_ndtr(eps) - torch.special.log_ndtr(-eps)
        return y, self._log_derivative(eps)

    def to_noise(self, y):
        eps = torch.where(
            y <= 0,
            torch.special.ndtri(torch.sigmoid(y.clamp(max=0.0))),
            -torch.special.ndtri(torch.sigmoid(-y.clamp(min=0.0))),
        )
        return eps, -self._log_derivative(eps)


class UnivariateCdfBijector(SiteBijector):
    r"""The inverse-cdf rule :math:`x = F^{-1}(\Phi(\varepsilon))` for a univariate distribution.

    Below the median it uses :math:`\log\Phi(\varepsilon)` and :math:`F^{-1}`, above it
    :math:`\log\Phi(-\varepsilon)` and the survival quantile, so that closed-form numerics stay accurate in
    both tails. :math:`\log|\partial x/\partial\varepsilon| = \log\phi(\varepsilon) - \log p(x)`.

    :param UnivariateNumerics numerics: the distribution's log-space cdf, survival function and quantiles.
    """

    kind = "elementwise"

    def __init__(self, numerics: UnivariateNumerics) -> None:
        self.numerics = numerics

    def to_value(self, eps):
        lower = self.numerics.quantile_log_cdf(torch.special.log_ndtr(eps.clamp(max=0.0)))
        upper = self.numerics.quantile_log_sf(torch.special.log_ndtr(-eps.clamp(min=0.0)))
        x = torch.where(eps <= 0, lower, upper)
        return x, _log_normal_pdf(eps) - self.numerics.log_prob(x)

    def to_noise(self, x):
        eps = _noise_from_log_cdf_sf(self.numerics.log_cdf(x), self.numerics.log_sf(x))
        return eps, self.numerics.log_prob(x) - _log_normal_pdf(eps)


def _log_space_residual(
    log_cdf: torch.Tensor, log_sf: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Increasing residual of :math:`F(x) = \Phi(\varepsilon)` in log space, and which branch it used.

    Below the median: :math:`\log F(x) - \log\Phi(\varepsilon)`; above it:
    :math:`\log\Phi(-\varepsilon) - \log S(x)`.
    """
    below = eps <= 0
    residual = torch.where(
        below,
        log_cdf - torch.special.log_ndtr(eps.clamp(max=0.0)),
        torch.special.log_ndtr(-eps.clamp(min=0.0)) - log_sf,
    )
    return residual, below


class _NumericalInverseCdf(SiteBijector):
    r"""Shared machinery of maps that solve :math:`F(x) = \Phi(\varepsilon)` for the value.

    Subclasses provide :meth:`_log_cdf_sf` and :meth:`_log_prob`. Without component quantiles the
    solve runs in the unconstrained coordinate :math:`y` (:math:`x = T(y)`,
    :math:`T` = ``biject_to(support)``) inside a bracket widened by doubling.
    """

    kind = "elementwise"
    numerical = "to_value"
    transform: torch_transforms.Transform

    def _log_cdf_sf(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _log_prob(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _quantile_bracket(self, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None

    def _residual(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        log_cdf, log_sf = self._log_cdf_sf(x)
        return _log_space_residual(log_cdf, log_sf, eps)[0]

    def _unconstrained_bracket(self, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return expand_bracket(
            lambda y: self._residual(self.transform(y), eps), -torch.ones_like(eps), torch.ones_like(eps)
        )

    def value_bracket(self, eps):
        with torch.no_grad():
            eps = eps.detach()
            bracket = self._quantile_bracket(eps)
            if bracket is not None:
                return bracket
            lower, upper = self._unconstrained_bracket(eps)
            return self.transform(lower), self.transform(upper)

    def _solve(self, eps: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            bracket = self._quantile_bracket(eps)
            if bracket is not None:
                return monotone_root(lambda x: self._residual(x, eps), *bracket)
            lower, upper = self._unconstrained_bracket(eps)
            y = monotone_root(lambda y: self._residual(self.transform(y), eps), lower, upper)
            return self.transform(y)

    def to_value(self, eps):
        x0 = self._solve(eps.detach())
        log_cdf, log_sf = self._log_cdf_sf(x0)
        residual, below = _log_space_residual(log_cdf, log_sf, eps)
        # d residual / dx: p/F below the median, p/S above it.
        slope = torch.exp(self._log_prob(x0) - torch.where(below, log_cdf, log_sf))
        x = implicit_step(x0, residual, slope)
        return x, _log_normal_pdf(eps) - self._log_prob(x)

    def to_noise(self, x):
        log_cdf, log_sf = self._log_cdf_sf(x)
        eps = _noise_from_log_cdf_sf(log_cdf, log_sf)
        return eps, self._log_prob(x) - _log_normal_pdf(eps)


class MixtureBijector(_NumericalInverseCdf):
    r"""A 1-D mixture :math:`p(x) = \sum_k w_k p_k(x)` by its inverse cdf, solved numerically.

    Value to noise is closed form, :math:`\varepsilon = \Phi^{-1}(F_\mathrm{mix}(x))` (survival
    function above the median). Noise to value solves :math:`F_\mathrm{mix}(x) = \Phi(\varepsilon)` with
    a log-space residual by :func:`~pyro_ext.flows.roots.monotone_root` inside the bracket
    :math:`[\min_k F_k^{-1}(\Phi(\varepsilon)), \max_k F_k^{-1}(\Phi(\varepsilon))]`, valid because
    :math:`F_\mathrm{mix}` is a convex combination of the :math:`F_k` (components without quantiles:
    a bracket widened by doubling). Gradients with respect to the noise and the mixture's parameters
    come from one implicit-function step, giving :math:`\partial x/\partial\varepsilon =
    \phi(\varepsilon)/p_\mathrm{mix}(x)` and :math:`\partial x/\partial\theta =
    -\partial_\theta F_\mathrm{mix}(x)/p_\mathrm{mix}(x)`.

    :param fn: a :class:`~torch.distributions.MixtureSameFamily` with univariate components.
    :param UnivariateNumerics components: numerics of ``fn.component_distribution`` (batch ``[..., K]``).
    """

    def __init__(self, fn: torch.distributions.MixtureSameFamily, components: UnivariateNumerics) -> None:
        self.fn = fn
        self.components = components
        self.log_weights = torch.log_softmax(fn.mixture_distribution.logits, dim=-1)
        self.transform = biject_to(fn.component_distribution.support)

    def _log_cdf_sf(self, x):
        padded = x.unsqueeze(-1)
        log_cdf = torch.logsumexp(self.log_weights + self.components.log_cdf(padded), dim=-1)
        log_sf = torch.logsumexp(self.log_weights + self.components.log_sf(padded), dim=-1)
        return log_cdf, log_sf

    def _log_prob(self, x):
        return torch.logsumexp(self.log_weights + self.components.log_prob(x.unsqueeze(-1)), dim=-1)

    def _quantile_bracket(self, eps):
        if not self.components.has_quantile:
            return None
        padded = eps.unsqueeze(-1)
        lower_tail = self.components.quantile_log_cdf(torch.special.log_ndtr(padded.clamp(max=0.0)))
        upper_tail = self.components.quantile_log_sf(torch.special.log_ndtr(-padded.clamp(min=0.0)))
        quantiles = torch.where(padded <= 0, lower_tail, upper_tail)
        return quantiles.min(-1).values, quantiles.max(-1).values


class NumericalIcdfBijector(_NumericalInverseCdf):
    r"""The inverse-cdf rule for a univariate distribution with a ``cdf`` but no ``icdf``.

    Noise to value solves :math:`F(T(y)) = \Phi(\varepsilon)` in the unconstrained coordinate
    :math:`y` inside a bracket widened by doubling, with the log-space residual and implicit gradients
    of :class:`MixtureBijector`. Exact up to the root tolerance; parameter gradients exist where torch
    differentiates ``fn.cdf`` (not Gamma's concentration).
    """

    def __init__(
        self, fn: Distribution, numerics: UnivariateNumerics, support: constraints.Constraint | None = None
    ) -> None:
        self.fn = fn
        self.numerics = numerics
        self.transform = biject_to(fn.support if support is None else support)

    def _log_cdf_sf(self, x):
        return self.numerics.log_cdf(x), self.numerics.log_sf(x)

    def _log_prob(self, x):
        return self.numerics.log_prob(x)


# ===================================================================================== composite maps


def _unwrap_independent(transform: torch_transforms.Transform) -> torch_transforms.Transform:
    while isinstance(transform, torch_transforms.IndependentTransform):
        transform = transform.base_transform
    return transform


def _is_elementwise(transform: torch_transforms.Transform) -> bool:
    base = _unwrap_independent(transform)
    if isinstance(base, torch_transforms.ComposeTransform):
        return all(_is_elementwise(part) for part in base.parts)
    return base.domain.event_dim == 0 and base.codomain.event_dim == 0


def _flatten(transform: torch_transforms.Transform) -> list[torch_transforms.Transform]:
    """Parts of a (composed) transform, without identities (``AffineTransform(0, 1)`` included)."""
    if isinstance(transform, torch_transforms.ComposeTransform):
        return [piece for part in transform.parts for piece in _flatten(part)]
    if isinstance(transform, torch_transforms.IndependentTransform):
        inner = _flatten(transform.base_transform)
        return [] if not inner else [transform]
    if isinstance(transform, torch_transforms.AffineTransform):
        loc, scale = torch.as_tensor(transform.loc), torch.as_tensor(transform.scale)
        if (
            not loc.requires_grad
            and not scale.requires_grad
            and bool((loc == 0).all() and (scale == 1).all())
        ):
            return []
    return [transform]


def _is_identity(transform: torch_transforms.Transform) -> bool:
    return not _flatten(transform)


def _sign(transforms: list[torch_transforms.Transform]) -> Any:
    """Product of the transforms' signs (1, -1 or a tensor); ``None`` when some sign is unknown."""
    sign: Any = 1
    for transform in transforms:
        try:
            part = _unwrap_independent(transform).sign
        except NotImplementedError:
            return None
        sign = sign * part
    return sign


class TransformedBijector(SiteBijector):
    r"""A base bijector followed by torch transforms,
    :math:`x = T_k \circ \dots \circ T_1 (f_\mathrm{base}(s\varepsilon))`.

    The sign :math:`s \in \{-1, 1\}` (per element) flips the noise where the elementwise transforms
    decrease, so that an elementwise composite stays increasing; since :math:`\mathcal N(0, 1)` is
    symmetric, the flip keeps the map exact. ``ladj`` adds each transform's log-Jacobian, summed as in
    :class:`~torch.distributions.TransformedDistribution.log_prob`.

    :param SiteBijector base: the base distribution's bijector.
    :param list transforms: bijective, shape-preserving torch transforms.
    :param int event_dim: the transformed distribution's ``len(event_shape)``.
    """

    def __init__(
        self,
        base: SiteBijector,
        transforms: list[torch_transforms.Transform],
        event_dim: int,
        exact: bool | None = None,
    ) -> None:
        self.base = base
        self.transforms = list(transforms)
        self.event_dim = event_dim
        self.exact = base.exact if exact is None else exact
        elementwise = base.kind in ("affine_diag", "elementwise") and all(map(_is_elementwise, transforms))
        sign = _sign(self.transforms) if elementwise else 1
        self.sign = 1 if sign is None else sign
        self.kind = "elementwise" if elementwise and sign is not None else "triangular"
        self.numerical = base.numerical

    def _noise_sign(self, eps: torch.Tensor) -> torch.Tensor:
        if isinstance(self.sign, torch.Tensor):
            return eps * self.sign.to(eps.dtype)
        return eps if self.sign > 0 else -eps

    def _add_log_det(self, total, transform, y, x):
        term = transform.log_abs_det_jacobian(y, x)
        return total + _sum_rightmost(term, self.event_dim - transform.codomain.event_dim)

    def to_value(self, eps):
        y, ladj = self.base.to_value(self._noise_sign(eps))
        ladj = _sum_rightmost(ladj, self.event_dim - self.base.event_dim)
        for transform in self.transforms:
            x = transform(y)
            ladj = self._add_log_det(ladj, transform, y, x)
            y = x
        return y, ladj

    def to_noise(self, x):
        ladj = None
        for transform in reversed(self.transforms):
            y = transform.inv(x)
            term = -_sum_rightmost(
                transform.log_abs_det_jacobian(y, x), self.event_dim - transform.codomain.event_dim
            )
            ladj = term if ladj is None else ladj + term
            x = y
        eps, base_ladj = self.base.to_noise(x)
        base_ladj = _sum_rightmost(base_ladj, self.event_dim - self.base.event_dim)
        ladj = base_ladj if ladj is None else ladj + base_ladj
        return self._noise_sign(eps), ladj

    def value_bracket(self, eps):
        lower, upper = self.base.value_bracket(self._noise_sign(eps))
        for transform in self.transforms:
            lower, upper = transform(lower), transform(upper)
        return torch.minimum(lower, upper), torch.maximum(lower, upper)


class UnconstrainedBijector(SiteBijector):
    r"""A bijector seen in unconstrained coordinates: :math:`\tilde f(\varepsilon) = T^{-1}(f(s\varepsilon))`.

    :math:`T` = ``biject_to(fn.support)``; :math:`s = \mathrm{sign}(T)` keeps :math:`\tilde f` increasing
    when :math:`T` decreases (e.g. ``less_than`` supports).
    """

    def __init__(self, inner: SiteBijector, transform: torch_transforms.Transform) -> None:
        self.inner = inner
        self.transform = transform
        self.exact = inner.exact
        self.event_dim = inner.event_dim
        self.numerical = inner.numerical
        sign = _sign([transform]) if _is_elementwise(transform) else None
        self.sign = 1 if sign is None else sign
        elementwise = inner.kind in ("affine_diag", "elementwise") and sign is not None
        self.kind = "elementwise" if elementwise else "triangular"

    def _noise_sign(self, eps):
        if isinstance(self.sign, torch.Tensor):
            return eps * self.sign.to(eps.dtype)
        return eps if self.sign > 0 else -eps

    def _log_det(self, y, x):
        term = self.transform.log_abs_det_jacobian(y, x)
        return _sum_rightmost(term, self.event_dim - self.transform.codomain.event_dim)

    def to_value(self, eps):
        x, ladj = self.inner.to_value(self._noise_sign(eps))
        y = self.transform.inv(x)
        return y, ladj - self._log_det(y, x)

    def to_noise(self, y):
        x = self.transform(y)
        eps, ladj = self.inner.to_noise(x)
        return self._noise_sign(eps), ladj + self._log_det(y, x)

    def value_bracket(self, eps):
        lower, upper = self.inner.value_bracket(self._noise_sign(eps))
        lower, upper = self.transform.inv(lower), self.transform.inv(upper)
        return torch.minimum(lower, upper), torch.maximum(lower, upper)


class IndependentBijector(SiteBijector):
    """``Independent(fn, n)``: the base map, with ``ladj`` summed over the ``n`` reinterpreted dims."""

    def __init__(self, base: SiteBijector, reinterpreted_batch_ndims: int) -> None:
        self.base = base
        self.reinterpreted_batch_ndims = reinterpreted_batch_ndims
        self.event_dim = base.event_dim + reinterpreted_batch_ndims
        self.kind, self.exact, self.numerical = base.kind, base.exact, base.numerical

    @property
    def leaf(self) -> SiteBijector:
        return self.base.leaf

    def to_value(self, eps):
        x, ladj = self.base.to_value(eps)
        return x, _sum_rightmost(ladj, self.reinterpreted_batch_ndims)

    def to_noise(self, x):
        eps, ladj = self.base.to_noise(x)
        return eps, _sum_rightmost(ladj, self.reinterpreted_batch_ndims)

    def value_bracket(self, eps):
        return self.base.value_bracket(eps)
