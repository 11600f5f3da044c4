"""Tail-accurate cdf, survival function and quantiles of univariate distributions, in log space.

:class:`UnivariateNumerics` is what the inverse-cdf site bijectors and the mixture root finder need of
a univariate distribution: :math:`\\log F(x)`, :math:`\\log S(x)` (with :math:`S = 1 - F`) and the
quantile function addressed by :math:`\\log p` below the median and by :math:`\\log(1-p)` above it.
Working with the survival function above the median keeps the maps accurate far into the upper tail
(about :math:`|\\varepsilon| \\le 30` in float64 for the closed forms below); the generic fallback
forms :math:`S = 1 - F` from ``fn.cdf`` and is therefore limited to about :math:`|\\varepsilon| \\lesssim 8`.

This is a private helper of :mod:`pyro_ext.flows.site_bijectors`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro.distributions as dist
import torch
from torch.distributions import Distribution, TransformedDistribution

__all__ = ["UnivariateNumerics", "log1mexp", "log_sigmoid", "register_numerics", "univariate_numerics"]

_LOG_HALF = -math.log(2.0)
_LOG_PI = math.log(math.pi)


def log_sigmoid(z: torch.Tensor) -> torch.Tensor:
    r""":math:`\log\sigma(z) = \min(z, 0) - \log(1 + e^{-|z|})`, exact to rounding.

    Used instead of ``F.logsigmoid``, whose CPU kernel takes milliseconds per call on small tensors when
    the intra-op thread pool is contended (torch 2.13; measured 23 ms vs 2 us on a loaded 2-core machine).
    """
    return torch.clamp(z, max=0.0) - torch.log1p(torch.exp(-z.abs()))


def log1mexp(log_p: torch.Tensor) -> torch.Tensor:
    """:math:`\\log(1 - e^{a})` for :math:`a \\le 0`, accurate at both ends (Maechler's switch)."""
    return torch.where(
        log_p > _LOG_HALF,
        torch.log(-torch.expm1(log_p.clamp(max=0.0))),
        torch.log1p(-torch.exp(log_p.clamp(max=_LOG_HALF))),
    )


class UnivariateNumerics:
    """The generic fallback: ``fn.cdf`` and ``fn.icdf`` with :math:`S = 1 - F`.

    Subclasses override the four log-space methods with closed forms that stay accurate in the tails.
    Every method broadcasts its argument against the distribution's batch shape.
    """

    #: whether the quantile methods exist (the generic class needs a working ``fn.icdf``).
    has_quantile: bool = True

    def __init__(self, fn: Distribution) -> None:
        self.fn = fn

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn.log_prob(x)

    def log_cdf(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(self.fn.cdf(x))

    def log_sf(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log1p(-self.fn.cdf(x))

    def quantile_log_cdf(self, log_p: torch.Tensor) -> torch.Tensor:
        """:math:`F^{-1}(e^{\\log p})`."""
        return self.fn.icdf(torch.exp(log_p))

    def quantile_log_sf(self, log_q: torch.Tensor) -> torch.Tensor:
        """:math:`F^{-1}(1 - e^{\\log q})`, i.e. :math:`S^{-1}(e^{\\log q})`."""
        return self.fn.icdf(-torch.expm1(log_q))


class _CdfOnly(UnivariateNumerics):
    has_quantile = False

    def quantile_log_cdf(self, log_p: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self.fn).__name__} has no icdf")

    quantile_log_sf = quantile_log_cdf


class _NormalNumerics(UnivariateNumerics):
    def log_cdf(self, x):
        return torch.special.log_ndtr((x - self.fn.loc) / self.fn.scale)

    def log_sf(self, x):
        return torch.special.log_ndtr((self.fn.loc - x) / self.fn.scale)

    def quantile_log_cdf(self, log_p):
        return self.fn.loc + self.fn.scale * torch.special.ndtri(torch.exp(log_p))

    def quantile_log_sf(self, log_q):
        return self.fn.loc - self.fn.scale * torch.special.ndtri(torch.exp(log_q))


class _LogNormalNumerics(UnivariateNumerics):
    def log_cdf(self, x):
        return torch.special.log_ndtr((torch.log(x) - self.fn.loc) / self.fn.scale)

    def log_sf(self, x):
        return torch.special.log_ndtr((self.fn.loc - torch.log(x)) / self.fn.scale)

    def quantile_log_cdf(self, log_p):
        return torch.exp(self.fn.loc + self.fn.scale * torch.special.ndtri(torch.exp(log_p)))

    def quantile_log_sf(self, log_q):
        return torch.exp(self.fn.loc - self.fn.scale * torch.special.ndtri(torch.exp(log_q)))


class _UniformNumerics(UnivariateNumerics):
    def log_cdf(self, x):
        return torch.log((x - self.fn.low) / (self.fn.high - self.fn.low))

    def log_sf(self, x):
        return torch.log((self.fn.high - x) / (self.fn.high - self.fn.low))

    def quantile_log_cdf(self, log_p):
        return self.fn.low + (self.fn.high - self.fn.low) * torch.exp(log_p)

    def quantile_log_sf(self, log_q):
        return self.fn.high - (self.fn.high - self.fn.low) * torch.exp(log_q)


class _ExponentialNumerics(UnivariateNumerics):
    def log_cdf(self, x):
        return log1mexp(-self.fn.rate * x)

    def log_sf(self, x):
        return -self.fn.rate * x

    def quantile_log_cdf(self, log_p):
        return -log1mexp(log_p) / self.fn.rate

    def quantile_log_sf(self, log_q):
        return -log_q / self.fn.rate


class _LaplaceNumerics(UnivariateNumerics):
    @staticmethod
    def _log_cdf_standard(z):
        # z < 0: F = e^z / 2;  z >= 0: F = 1 - e^{-z} / 2.
        return torch.where(
            z < 0, z.clamp(max=0.0) + _LOG_HALF, torch.log1p(-0.5 * torch.exp(-z.clamp(min=0.0)))
        )

    @staticmethod
    def _quantile_standard(log_p):
        # p <= 1/2: z = log 2p;  p > 1/2: z = -log(2 (1 - p)).
        return torch.where(
            log_p <= _LOG_HALF,
            log_p.clamp(max=_LOG_HALF) - _LOG_HALF,
            -(log1mexp(log_p.clamp(min=_LOG_HALF)) - _LOG_HALF),
        )

    def log_cdf(self, x):
        return self._log_cdf_standard((x - self.fn.loc) / self.fn.scale)

    def log_sf(self, x):
        return self._log_cdf_standard((self.fn.loc - x) / self.fn.scale)

    def quantile_log_cdf(self, log_p):
        return self.fn.loc + self.fn.scale * self._quantile_standard(log_p)

    def quantile_log_sf(self, log_q):
        return self.fn.loc - self.fn.scale * self._quantile_standard(log_q)


class _CauchyNumerics(UnivariateNumerics):
    # F(z) = atan2(1, -z) / pi is accurate in the lower tail; S(z) = F(-z).
    @staticmethod
    def _quantile_standard(log_p):
        p = torch.exp(log_p.clamp(max=_LOG_HALF))
        one_minus_p = torch.exp(log1mexp(log_p.clamp(min=_LOG_HALF)))
        return torch.where(
            log_p <= _LOG_HALF, -1.0 / torch.tan(math.pi * p), 1.0 / torch.tan(math.pi * one_minus_p)
        )

    def log_cdf(self, x):
        z = (x - self.fn.loc) / self.fn.scale
        return torch.log(torch.atan2(torch.ones_like(z), -z)) - _LOG_PI

    def log_sf(self, x):
        z = (x - self.fn.loc) / self.fn.scale
        return torch.log(torch.atan2(torch.ones_like(z), z)) - _LOG_PI

    def quantile_log_cdf(self, log_p):
        return self.fn.loc + self.fn.scale * self._quantile_standard(log_p)

    def quantile_log_sf(self, log_q):
        return self.fn.loc - self.fn.scale * self._quantile_standard(log_q)


class _HalfCauchyNumerics(UnivariateNumerics):
    # F(x) = (2/pi) atan2(x, s), S(x) = (2/pi) atan2(s, x): both accurate where they are small.
    def log_cdf(self, x):
        return torch.log(torch.atan2(x, self.fn.scale * torch.ones_like(x))) + math.log(2.0) - _LOG_PI

    def log_sf(self, x):
        return torch.log(torch.atan2(self.fn.scale * torch.ones_like(x), x)) + math.log(2.0) - _LOG_PI

    def _quantile(self, log_small, small_is_cdf):
        small = torch.exp(log_small.clamp(max=_LOG_HALF))
        large_complement = torch.exp(log1mexp(log_small.clamp(min=_LOG_HALF)))
        tan_small = torch.tan(0.5 * math.pi * small)
        tan_complement = torch.tan(0.5 * math.pi * large_complement)
        if small_is_cdf:  # x = s tan(pi p / 2) = s / tan(pi (1 - p) / 2)
            return self.fn.scale * torch.where(log_small <= _LOG_HALF, tan_small, 1.0 / tan_complement)
        return self.fn.scale * torch.where(log_small <= _LOG_HALF, 1.0 / tan_small, tan_complement)

    def quantile_log_cdf(self, log_p):
        return self._quantile(log_p, small_is_cdf=True)

    def quantile_log_sf(self, log_q):
        return self._quantile(log_q, small_is_cdf=False)


class _HalfNormalNumerics(UnivariateNumerics):
    # F(x) = erf(x / (s sqrt 2)), S(x) = 2 Phi(-x / s).
    def log_cdf(self, x):
        return torch.log(torch.erf(x / (self.fn.scale * math.sqrt(2.0))))

    def log_sf(self, x):
        return math.log(2.0) + torch.special.log_ndtr(-x / self.fn.scale)

    def _from_log_cdf(self, log_p):
        return self.fn.scale * math.sqrt(2.0) * torch.erfinv(torch.exp(log_p))

    def _from_log_sf(self, log_q):
        return -self.fn.scale * torch.special.ndtri(torch.exp(log_q - math.log(2.0)))

    def quantile_log_cdf(self, log_p):
        return torch.where(
            log_p <= _LOG_HALF,
            self._from_log_cdf(log_p.clamp(max=_LOG_HALF)),
            self._from_log_sf(log1mexp(log_p.clamp(min=_LOG_HALF))),
        )

    def quantile_log_sf(self, log_q):
        return torch.where(
            log_q <= _LOG_HALF,
            self._from_log_sf(log_q.clamp(max=_LOG_HALF)),
            self._from_log_cdf(log1mexp(log_q.clamp(min=_LOG_HALF))),
        )


class _LogisticNumerics(UnivariateNumerics):
    def log_cdf(self, x):
        return log_sigmoid((x - self.fn.loc) / self.fn.scale)

    def log_sf(self, x):
        return log_sigmoid((self.fn.loc - x) / self.fn.scale)

    def quantile_log_cdf(self, log_p):
        return self.fn.loc + self.fn.scale * (log_p - log1mexp(log_p))

    def quantile_log_sf(self, log_q):
        return self.fn.loc - self.fn.scale * (log_q - log1mexp(log_q))


class _GumbelNumerics(UnivariateNumerics):
    # F = exp(-exp(-z)): log F = -exp(-z), log S = log(1 - exp(log F)).
    def log_cdf(self, x):
        return -torch.exp(-(x - self.fn.loc) / self.fn.scale)

    def log_sf(self, x):
        return log1mexp(self.log_cdf(x))

    def quantile_log_cdf(self, log_p):
        return self.fn.loc - self.fn.scale * torch.log(-log_p)

    def quantile_log_sf(self, log_q):
        return self.fn.loc - self.fn.scale * torch.log(-log1mexp(log_q))


class _GammaNumerics(_CdfOnly):
    # Regularised incomplete gamma functions: P for the cdf, Q = 1 - P computed directly for the sf.
    def log_cdf(self, x):
        return torch.log(torch.special.gammainc(self.fn.concentration, self.fn.rate * x))

    def log_sf(self, x):
        return torch.log(torch.special.gammaincc(self.fn.concentration, self.fn.rate * x))


_REGISTRY: dict[type, Callable[[Distribution], UnivariateNumerics]] = {
    dist.Gamma: _GammaNumerics,
    dist.Normal: _NormalNumerics,
    dist.LogNormal: _LogNormalNumerics,
    dist.Uniform: _UniformNumerics,
    dist.Exponential: _ExponentialNumerics,
    dist.Laplace: _LaplaceNumerics,
    dist.Cauchy: _CauchyNumerics,
    dist.HalfCauchy: _HalfCauchyNumerics,
    dist.HalfNormal: _HalfNormalNumerics,
    dist.Logistic: _LogisticNumerics,
    dist.Gumbel: _GumbelNumerics,
}
# Register the torch base classes (pyro's classes subclass them), so plain torch distributions match too.
for _pyro_type, _numerics in list(_REGISTRY.items()):
    for _base in _pyro_type.__mro__[1:]:
        if _base.__module__.startswith("torch.distributions") and _base not in (
            Distribution,
            TransformedDistribution,
        ):
            _REGISTRY.setdefault(_base, _numerics)
            break

_WORKS_BY_TYPE: dict[tuple[type, bool], bool] = {}


def register_numerics(dist_type: type, factory: Callable[[Distribution], UnivariateNumerics]) -> None:
    """Register tail-accurate numerics for a univariate distribution type (subclasses match too)."""
    _REGISTRY[dist_type] = factory


def _probe(fn: Distribution, need_icdf: bool) -> bool:
    try:
        with torch.no_grad():
            probe = torch.full(fn.batch_shape, 0.5, dtype=_dtype_of(fn))
            if need_icdf:
                x = fn.icdf(probe)
            else:
                x = fn.mean if torch.isfinite(fn.mean).all() else fn.sample()
            fn.cdf(x)
    except NotImplementedError:
        return False
    return True


def _dtype_of(fn: Distribution) -> torch.dtype:
    for value in vars(fn).values():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.dtype
    return torch.get_default_dtype()


def univariate_numerics(fn: Distribution, need_icdf: bool = True) -> UnivariateNumerics | None:
    """Numerics for a univariate ``fn``, or ``None`` when it has no working ``cdf`` (and ``icdf``).

    A registered closed form (found by MRO walk) wins; otherwise ``fn.cdf``/``fn.icdf`` are probed once
    per type (per instance for types that inherit :class:`TransformedDistribution`'s generic cdf,
    whose availability depends on the transforms).
    """
    if fn.event_shape != torch.Size():
        return None
    for klass in type(fn).__mro__:
        factory = _REGISTRY.get(klass)
        if factory is not None:
            numerics = factory(fn)
            return numerics if numerics.has_quantile or not need_icdf else None
    cls = type(fn)
    inherits_generic = isinstance(fn, TransformedDistribution) and (
        cls.cdf is TransformedDistribution.cdf or cls.icdf is TransformedDistribution.icdf
    )
    if inherits_generic:
        works_full = _probe(fn, True)
        works = works_full or (not need_icdf and _probe(fn, False))
    else:
        if (cls, True) not in _WORKS_BY_TYPE:
            _WORKS_BY_TYPE[(cls, True)] = _probe(fn, True)
        works_full = _WORKS_BY_TYPE[(cls, True)]
        if not need_icdf and not works_full:
            if (cls, False) not in _WORKS_BY_TYPE:
                _WORKS_BY_TYPE[(cls, False)] = _probe(fn, False)
            works = _WORKS_BY_TYPE[(cls, False)]
        else:
            works = works_full
    if works_full:
        return UnivariateNumerics(fn)
    if works:
        return _CdfOnly(fn)
    return None
