r"""Noise :math:`\leftrightarrow` value maps of single distributions: the building block of EMF layers.

A *site bijector* of a distribution :math:`p` is a bijection :math:`f` with :math:`f(\varepsilon) \sim p`
when :math:`\varepsilon \sim \mathcal N(0, I)`, together with its log-Jacobian. A structured layer
(:mod:`pyro_ext.flows.structured`) chains one per sample site of a Pyro model, so that the layer pushes
standard normal noise exactly onto the model's joint.

.. code-block:: python

    bij = site_bijector(fn, coordinates="value", approximate=None)
    x, ladj = bij.to_value(eps)    # ladj = log|det dx/deps|
    eps, ladj = bij.to_noise(x)    # ladj = log|det deps/dx|
    bij.kind                       # "affine_diag" | "affine_tril" | "elementwise" | "triangular"
    bij.exact                      # pushes N(0, I) exactly onto fn (numerical maps: up to root tolerance)

**Shapes.** Noise has the value's shape. ``ladj`` has the shape of ``fn.log_prob(x)``: one entry per
element for a univariate ``fn``, summed over the event for multivariate and ``Independent`` ones.
Parameters broadcast against noise and values with extra leading (batch) dimensions. Bijectors are
stateless and cheap; rebuild one from each call's distribution.

**Dispatch**, first match wins: (1) a rule registered for the distribution's type or a base class
(:func:`register_site_bijector`, in the manner of ``biject_to.register``); (2) a
:class:`~torch.distributions.TransformedDistribution` with bijective, shape-preserving transforms,
recursively; (3) a univariate distribution with a working ``cdf`` and ``icdf``; (4) a requested
approximation (``approximate=``); (5) otherwise :class:`UnsupportedSiteError`. Discrete distributions
raise :class:`TypeError` first.

**Exact maps.**

.. math::

    \text{Normal:}\; x = \mu + \sigma\varepsilon, \qquad
    \text{MVN:}\; x = \mu + L\varepsilon, \qquad
    \text{Uniform:}\; x = a + (b - a)\,\Phi(\varepsilon), \qquad
    \text{cdf rule:}\; x = F^{-1}(\Phi(\varepsilon)),

with :math:`\log|\det \partial x/\partial\varepsilon| = \log\phi(\varepsilon) - \log p(x)` for the
cdf rule; transformed distributions compose the parts; 1-D mixtures solve
:math:`\Phi^{-1}(F_\mathrm{mix}(x)) = \varepsilon` by :func:`~pyro_ext.flows.roots.monotone_root` with
implicit-function gradients. Above the median the maps use survival functions
(:math:`\varepsilon = -\Phi^{-1}(S(x))`), and root residuals are computed in log space.

**Coordinates.** ``coordinates="unconstrained"`` returns :math:`\tilde f = T^{-1}\circ f` with
:math:`T` = ``biject_to(fn.support)``, a map :math:`\mathbb R \to \mathbb R`; a
``TransformedDistribution`` that ends in :math:`T` gives :math:`\tilde f = f_\mathrm{base}`, so a
LogNormal site is affine there.

**Approximations** (opt-in, ``exact=False``): ``"log_moment_match"`` (Gamma, Chi2, InverseGamma:
:math:`x = e^{m + s\varepsilon}` with the moments of :math:`\log x`), ``"logit_moment_match"``
(Beta: :math:`x = \mathrm{sigmoid}(m + s\varepsilon)`) and ``"numerical_icdf"`` (a ``cdf`` but no
``icdf``; solved numerically, exact up to the root tolerance, so its ``exact`` flag stays ``True``).

Example::

    >>> bij = site_bijector(dist.LogNormal(0.0, 0.5))
    >>> x, ladj = bij.to_value(torch.randn(4))
    >>> eps, _ = bij.to_noise(x)
    >>> site_bijector(dist.LogNormal(0.0, 0.5), coordinates="unconstrained").kind
    'affine_diag'

References: Silvestri, Fertig, Moore, Ambrogioni, *Embedded-model flows*, arXiv:2110.06021.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from torch.distributions import Distribution, TransformedDistribution, biject_to, constraints
from torch.distributions import transforms as torch_transforms

from pyro_ext.flows._univariate import univariate_numerics
from pyro_ext.flows.roots import monotone_root
from pyro_ext.flows.site_maps import (
    AffineDiagBijector,
    AffineTrilBijector,
    IndependentBijector,
    MixtureBijector,
    NumericalIcdfBijector,
    SiteBijector,
    TransformedBijector,
    UnconstrainedBijector,
    UniformBijector,
    UniformLogitBijector,
    UnivariateCdfBijector,
    _flatten,
    _is_identity,
)

__all__ = [
    "APPROXIMATIONS",
    "KINDS",
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
    "UnsupportedSiteError",
    "monotone_root",
    "register_site_bijector",
    "site_bijector",
]

KINDS = ("affine_diag", "affine_tril", "elementwise", "triangular")
APPROXIMATIONS = ("log_moment_match", "logit_moment_match", "numerical_icdf")
COORDINATES = ("value", "unconstrained")


class UnsupportedSiteError(TypeError):
    """A continuous distribution with no exact noise<->value map (and no requested approximation).

    :ivar str site: the site name (``None`` when not given).
    :ivar distribution: the offending distribution.
    """

    def __init__(self, message: str, site: str | None = None, distribution: Distribution | None = None):
        super().__init__(message)
        self.site = site
        self.distribution = distribution


# ===================================================================================== dispatch


@dataclass(frozen=True)
class _Request:
    coordinates: str
    approximate: str | None
    name: str | None


_Factory = Callable[..., SiteBijector]
_RULES: dict[type, tuple[_Factory, bool]] = {}
_LOOKUP_CACHE: dict[type, tuple[_Factory, bool] | None] = {}


def register_site_bijector(
    dist_type: type, factory: Callable[[Distribution], SiteBijector] | None = None
) -> Any:
    """Register an exact noise<->value map for a distribution type (and its subclasses).

    The factory takes the distribution and returns a :class:`SiteBijector` in *value* coordinates;
    unconstrained coordinates are derived from it. A rule registered for a subclass wins over one for
    a base class (MRO walk), and registered rules win over the built-in fallbacks. Usable as a decorator.

    :param type dist_type: a subclass of :class:`torch.distributions.Distribution`.
    :param callable factory: ``fn -> SiteBijector``; omit to use as a decorator.

    Example::

        @register_site_bijector(MyShiftedExponential)
        def _(fn):
            return TransformedBijector(site_bijector(dist.Exponential(fn.rate)),
                                       [AffineTransform(fn.shift, 1.0)], event_dim=0)
    """
    if not (isinstance(dist_type, type) and issubclass(dist_type, Distribution)):
        raise TypeError(f"dist_type must be a torch Distribution subclass; got {dist_type!r}")

    def decorator(function: Callable[[Distribution], SiteBijector]) -> Callable[[Distribution], SiteBijector]:
        if not callable(function):
            raise TypeError(f"factory must be callable; got {function!r}")
        _RULES[dist_type] = (function, False)
        _LOOKUP_CACHE.clear()
        return function

    return decorator if factory is None else decorator(factory)


def _register_builtin(*dist_types: type) -> Callable[[_Factory], _Factory]:
    def decorator(function: _Factory) -> _Factory:
        for dist_type in dist_types:
            _RULES[dist_type] = (function, True)
        _LOOKUP_CACHE.clear()
        return function

    return decorator


def _lookup(dist_type: type) -> tuple[_Factory, bool] | None:
    try:
        return _LOOKUP_CACHE[dist_type]
    except KeyError:
        pass
    rule = None
    for klass in dist_type.__mro__:
        if klass in _RULES:
            rule = _RULES[klass]
            break
    _LOOKUP_CACHE[dist_type] = rule
    return rule


def _describe(fn: Distribution) -> str:
    return f"{type(fn).__name__}(batch_shape={tuple(fn.batch_shape)}, event_shape={tuple(fn.event_shape)})"


def _site_label(name: str | None) -> str:
    return f"site {name!r}" if name is not None else "this site"


def _support(fn: Distribution) -> constraints.Constraint | None:
    try:
        support = fn.support
    except NotImplementedError:
        return None
    # torch >= 2.6 wraps a mixture's support; the bijection to it is the components' one.
    mixture_constraint = getattr(constraints, "MixtureSameFamilyConstraint", None)
    if mixture_constraint is not None and isinstance(support, mixture_constraint):
        support = support.base_constraint
    return _open_ended(support)


def _open_ended(support: constraints.Constraint) -> constraints.Constraint:
    """An interval with an infinite end (e.g. GeneralizedPareto's) as the half-line or line it is.

    ``biject_to`` maps any interval through a sigmoid, which breaks when a bound is infinite.
    """
    if not isinstance(support, (constraints.interval, constraints.half_open_interval)):
        return support
    lower = torch.as_tensor(support.lower_bound)
    upper = torch.as_tensor(support.upper_bound)
    lower_infinite, upper_infinite = bool(torch.isinf(lower).all()), bool(torch.isinf(upper).all())
    if lower_infinite and upper_infinite:
        return constraints.real
    if upper_infinite and not torch.isinf(lower).any():
        return constraints.greater_than(support.lower_bound)
    if lower_infinite and not torch.isinf(upper).any():
        return constraints.less_than(support.upper_bound)
    return support


def _support_is_real(support: constraints.Constraint | None) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return isinstance(support, type(constraints.real))


def _reject_discrete(fn: Distribution, request: _Request) -> None:
    support = _support(fn)
    if support is not None and support.is_discrete:
        raise TypeError(
            f"{_site_label(request.name)} has the discrete distribution {_describe(fn)}; a flow layer maps "
            "continuous values only. Enumerate it (config_enumerate with TraceEnum_ELBO), marginalise it out "
            "of the model, or condition on it (observe it, or poutine.condition)."
        )


def _suggested_approximations(fn: Distribution) -> list[str]:
    suggestions = []
    if isinstance(fn, torch.distributions.Gamma) or (
        isinstance(fn, TransformedDistribution) and isinstance(fn.base_dist, torch.distributions.Gamma)
    ):
        suggestions.append("log_moment_match")
    if isinstance(fn, torch.distributions.Beta) or (
        isinstance(fn, TransformedDistribution) and isinstance(fn.base_dist, torch.distributions.Beta)
    ):
        suggestions.append("logit_moment_match")
    if univariate_numerics(fn, need_icdf=False) is not None:
        suggestions.append("numerical_icdf")
    return suggestions


def _unsupported(fn: Distribution, request: _Request, reason: str = "") -> UnsupportedSiteError:
    notes = {
        "log_moment_match": "a lognormal fit, exact=False",
        "logit_moment_match": "a logit-normal fit, exact=False",
        "numerical_icdf": "its cdf inverted numerically",
    }
    suggestions = _suggested_approximations(fn)
    approx = (
        " or ".join(f"{s!r} ({notes[s]})" for s in suggestions)
        if suggestions
        else "one of " + ", ".join(map(repr, APPROXIMATIONS)) + " where it applies (none applies here)"
    )
    detail = f" ({reason})" if reason else ""
    message = (
        f"{_site_label(request.name)} has the distribution {_describe(fn)}, for which there is no exact "
        f"noise<->value map{detail}. Remedies: (1) register an exact map with "
        f"@pyro_ext.flows.site_bijectors.register_site_bijector({type(fn).__name__}); "
        f"(2) pass approximate={approx}; "
        "(3) reparameterise the site, e.g. sample a Normal and push it through a transform "
        "(TransformedDistribution or pyro.deterministic)."
    )
    return UnsupportedSiteError(message, site=request.name, distribution=fn)


def _in_coordinates(bijector: SiteBijector, fn: Distribution, request: _Request) -> SiteBijector:
    if request.coordinates == "value":
        return bijector
    support = _support(fn)
    if support is None or _support_is_real(support):
        return bijector
    transform = biject_to(support)
    if _is_identity(transform):
        return bijector
    return UnconstrainedBijector(bijector, transform)


def _dispatch(fn: Distribution, request: _Request) -> SiteBijector:
    if not isinstance(fn, Distribution):
        raise TypeError(f"fn must be a torch.distributions.Distribution; got {type(fn).__name__}")
    rule = _lookup(type(fn))
    if rule is not None and rule[1]:
        # Built-in rules cover continuous families, and wrappers dispatch (and so check) their base:
        # skipping the support check here keeps the per-site cost of a structured pass low.
        return rule[0](fn, request)
    _reject_discrete(fn, request)
    if rule is not None:
        factory, _ = rule
        bijector = factory(fn)
        if not isinstance(bijector, SiteBijector):
            raise TypeError(
                f"the site bijector registered for {type(fn).__name__} returned {type(bijector).__name__}, "
                "not a SiteBijector"
            )
        return _in_coordinates(bijector, fn, request)
    base_error: UnsupportedSiteError | None = None
    if isinstance(fn, TransformedDistribution):
        try:
            bijector = _transformed(fn, request)
        except UnsupportedSiteError as error:
            base_error = error
        else:
            if bijector is not None:
                return bijector
    numerics = univariate_numerics(fn)
    if numerics is not None:
        return _in_coordinates(UnivariateCdfBijector(numerics), fn, request)
    if request.approximate is not None:
        bijector = _approximation(fn, request)
        if bijector is not None:
            return bijector
        raise _unsupported(fn, request, f"approximate={request.approximate!r} does not apply to it")
    if base_error is not None:
        reason = f"its base distribution {type(fn.base_dist).__name__} has none"
        raise _unsupported(fn, request, reason) from base_error
    raise _unsupported(fn, request)


def _transformed(fn: TransformedDistribution, request: _Request) -> SiteBijector | None:
    """Recurse into a TransformedDistribution; ``None`` if a transform is no shape-preserving bijection."""
    base_shape = fn.base_dist.batch_shape + fn.base_dist.event_shape
    for transform in fn.transforms:
        if not transform.bijective:
            return None
        try:
            if tuple(transform.forward_shape(base_shape)) != tuple(base_shape):
                return None
        except (NotImplementedError, ValueError):
            return None
    event_dim = len(fn.event_shape)
    value_request = _Request("value", request.approximate, request.name)
    transforms = [piece for transform in fn.transforms for piece in _flatten(transform)]
    if request.coordinates == "unconstrained":
        support = _support(fn)
        if support is not None and not _support_is_real(support):
            support_parts = _flatten(biject_to(support))
            tail = len(support_parts)
            if (
                tail
                and len(transforms) >= tail
                and all(_same_transform(a, b) for a, b in zip(transforms[-tail:], support_parts))
            ):
                # f~ = T^{-1} o f = the remaining parts after the base: no T^{-1} round trip needed.
                remaining = transforms[:-tail]
                base = _dispatch(fn.base_dist, value_request)
                return _compose(base, remaining, event_dim)
    base = _dispatch(fn.base_dist, value_request)
    return _in_coordinates(_compose(base, transforms, event_dim), fn, request)


def _same_transform(a: torch_transforms.Transform, b: torch_transforms.Transform) -> bool:
    try:
        return bool(a == b)
    except (RuntimeError, TypeError):
        return False


def _compose(
    base: SiteBijector, transforms: list[torch_transforms.Transform], event_dim: int
) -> SiteBijector:
    """The base followed by ``transforms``, folding elementwise affine transforms of an affine_diag base."""
    if not transforms:
        if base.event_dim != event_dim:
            return IndependentBijector(base, event_dim - base.event_dim)
        return base
    leaf = base.leaf
    if isinstance(leaf, AffineDiagBijector) and all(
        isinstance(t, torch_transforms.AffineTransform) and t.event_dim == 0 for t in transforms
    ):
        loc, scale = leaf.loc, leaf.scale
        for transform in transforms:
            loc = transform.loc + transform.scale * loc
            scale = transform.scale * scale
        folded = AffineDiagBijector(loc, torch.abs(torch.as_tensor(scale)), exact=leaf.exact)
        extra = event_dim
        return IndependentBijector(folded, extra) if extra else folded
    return TransformedBijector(base, transforms, event_dim)


# ----------------------------------------------------------------------------------- built-in rules


@_register_builtin(torch.distributions.Normal)
def _normal(fn: dist.Normal, request: _Request) -> SiteBijector:
    return AffineDiagBijector(fn.loc, fn.scale)


@_register_builtin(torch.distributions.MultivariateNormal)
def _multivariate_normal(fn: dist.MultivariateNormal, request: _Request) -> SiteBijector:
    return AffineTrilBijector(fn.loc, fn._unbroadcasted_scale_tril)


@_register_builtin(torch.distributions.LowRankMultivariateNormal)
def _low_rank_multivariate_normal(fn: dist.LowRankMultivariateNormal, request: _Request) -> SiteBijector:
    return AffineTrilBijector(fn.loc, fn.scale_tril)


@_register_builtin(torch.distributions.Uniform)
def _uniform(fn: dist.Uniform, request: _Request) -> SiteBijector:
    if request.coordinates == "unconstrained":
        return UniformLogitBijector()
    return UniformBijector(fn.low, fn.high)


@_register_builtin(torch.distributions.Gumbel)
def _gumbel(fn: dist.Gumbel, request: _Request) -> SiteBijector:
    # A TransformedDistribution of a Uniform through two logs: accurate only near the median. Its
    # closed-form cdf keeps both tails accurate.
    return UnivariateCdfBijector(univariate_numerics(fn))


@_register_builtin(torch.distributions.Independent)
def _independent(fn: torch.distributions.Independent, request: _Request) -> SiteBijector:
    return IndependentBijector(_dispatch(fn.base_dist, request), fn.reinterpreted_batch_ndims)


@_register_builtin(MaskedDistribution)
def _masked(fn: MaskedDistribution, request: _Request) -> SiteBijector:
    # A mask changes log_prob, not the bijection.
    return _dispatch(fn.base_dist, request)


@_register_builtin(ExpandedDistribution)
def _expanded(fn: ExpandedDistribution, request: _Request) -> SiteBijector:
    # The base's parameters broadcast against the expanded noise.
    return _dispatch(fn.base_dist, request)


@_register_builtin(torch.distributions.MixtureSameFamily)
def _mixture(fn: torch.distributions.MixtureSameFamily, request: _Request) -> SiteBijector:
    _reject_discrete(fn, request)
    components = fn.component_distribution
    if components.event_shape != torch.Size():
        raise _unsupported(fn, request, "multivariate mixtures have no elementwise inverse cdf")
    numerics = univariate_numerics(components, need_icdf=False)
    if numerics is None:
        reason = f"its components {type(components).__name__} have no working cdf"
        raise _unsupported(fn, request, reason)
    return _in_coordinates(MixtureBijector(fn, numerics), fn, request)


# ----------------------------------------------------------------------------------- approximations


def _approximation(fn: Distribution, request: _Request) -> SiteBijector | None:
    method = request.approximate
    if method == "log_moment_match" and isinstance(fn, torch.distributions.Gamma):
        alpha, beta = fn.concentration, fn.rate
        loc = torch.digamma(alpha) - torch.log(beta)
        scale = torch.polygamma(1, alpha).sqrt()
        return _moment_matched(fn, loc, scale, torch_transforms.ExpTransform(), request)
    if method == "logit_moment_match" and isinstance(fn, torch.distributions.Beta):
        alpha, beta = fn.concentration1, fn.concentration0
        loc = torch.digamma(alpha) - torch.digamma(beta)
        scale = (torch.polygamma(1, alpha) + torch.polygamma(1, beta)).sqrt()
        return _moment_matched(fn, loc, scale, torch_transforms.SigmoidTransform(), request)
    if method == "numerical_icdf":
        numerics = univariate_numerics(fn, need_icdf=False)
        if numerics is not None:
            return _in_coordinates(NumericalIcdfBijector(fn, numerics, _support(fn)), fn, request)
    return None


def _moment_matched(
    fn: Distribution,
    loc: torch.Tensor,
    scale: torch.Tensor,
    link: torch_transforms.Transform,
    request: _Request,
) -> SiteBijector:
    affine = AffineDiagBijector(loc, scale, exact=False)
    if request.coordinates == "unconstrained" and _flatten(biject_to(fn.support)) == [link]:
        return affine  # exp / sigmoid is the support's own bijection: affine in unconstrained coordinates
    composite = TransformedBijector(affine, [link], event_dim=0, exact=False)
    return _in_coordinates(composite, fn, request)


# ===================================================================================== public entry


def site_bijector(
    fn: Distribution,
    coordinates: str = "value",
    approximate: str | None = None,
    *,
    name: str | None = None,
) -> SiteBijector:
    """The noise<->value bijector of one distribution (see the module docstring for the rules).

    :param fn: a torch or Pyro distribution, possibly batched, wrapped (``Independent``, expanded,
        masked) or transformed.
    :param str coordinates: ``"value"`` (maps onto ``fn``'s support) or ``"unconstrained"``
        (:math:`T^{-1}\\circ f` with :math:`T` = ``biject_to(fn.support)``).
    :param str approximate: ``None`` or one of :data:`APPROXIMATIONS`, used only when no exact map exists.
    :param str name: the site's name, for error messages.
    :raises TypeError: for a discrete distribution.
    :raises UnsupportedSiteError: (a ``TypeError``) for a continuous distribution with no map.
    :raises ValueError: for an unknown ``coordinates`` or ``approximate``.

    Example::

        >>> bij = site_bijector(dist.MixtureSameFamily(dist.Categorical(logits=torch.zeros(3)),
        ...                                            dist.Normal(torch.tensor([-2.0, 0.0, 2.0]), 0.5)))
        >>> x, ladj = bij.to_value(torch.randn(10))
    """
    if coordinates not in COORDINATES:
        raise ValueError(f"coordinates must be one of {COORDINATES}; got {coordinates!r}")
    if approximate is not None and approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be None or one of {APPROXIMATIONS}; got {approximate!r}")
    return _dispatch(fn, _Request(coordinates, approximate, name))
