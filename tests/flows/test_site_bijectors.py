"""Site bijectors (design/flows.md §1): acceptance checks 1-5 and the dispatch rules.

Checks (§6): 1 site round trip, 2 site density, 3 site log-det against autograd, 4 implicit gradients of
the mixture (and numerical-icdf) inverses, 5 unsupported and discrete sites, approximations.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pyro.distributions as dist
import pytest
import torch
from torch.distributions import biject_to, constraints
from torch.distributions import transforms as T

from pyro_ext.flows.roots import expand_bracket, fixed_root_iterations, implicit_step, monotone_root
from pyro_ext.flows.site_bijectors import (
    APPROXIMATIONS,
    AffineDiagBijector,
    SiteBijector,
    UnsupportedSiteError,
    register_site_bijector,
    site_bijector,
)

LOG_2PI = math.log(2 * math.pi)
FLOAT64_EPS = torch.finfo(torch.float64).eps


def _log_normal(eps: torch.Tensor, event_dim: int) -> torch.Tensor:
    log_density = -0.5 * eps**2 - 0.5 * LOG_2PI
    return log_density.reshape(log_density.shape[: log_density.dim() - event_dim] + (-1,)).sum(-1)


def _mixture(components: dist.Distribution, logits: torch.Tensor) -> dist.MixtureSameFamily:
    return dist.MixtureSameFamily(dist.Categorical(logits=logits), components)


@dataclass
class Case:
    """One rule under test: a distribution factory, options, the noise range and the density tolerance."""

    name: str
    make: Callable[[], dist.Distribution]
    eps_max: float = 6.0  # check 1: |eps| <= 6, <= 5 for the generic cdf rule (S = 1 - F in float64)
    approximate: str | None = None
    kind: str | None = None  # expected kind in value coordinates
    unconstrained_kind: str | None = None
    density_atol: float = 1e-10  # check 2: 1e-10, mixtures 1e-9 (root tolerance propagated through log p)
    generic_cdf: bool = False  # the generic rule forms S = 1 - F (see _rounding_allowance)

    def __str__(self) -> str:
        return self.name


def _tril() -> torch.Tensor:
    covariance = torch.tensor([[2.0, 0.5, 0.1], [0.5, 1.0, 0.2], [0.1, 0.2, 0.5]])
    return torch.linalg.cholesky(covariance)


CASES = [
    Case(
        "normal", lambda: dist.Normal(torch.tensor([0.5, -1.0]), torch.tensor([2.0, 0.3])), kind="affine_diag"
    ),
    Case(
        "mvn",
        lambda: dist.MultivariateNormal(torch.tensor([1.0, -2.0, 0.5]), scale_tril=_tril()),
        kind="affine_tril",
        unconstrained_kind="affine_tril",
    ),
    Case(
        "low_rank_mvn",
        lambda: dist.LowRankMultivariateNormal(
            torch.tensor([0.0, 1.0, 2.0]), torch.tensor([[1.0], [0.5], [-0.3]]), torch.tensor([0.5, 1.0, 2.0])
        ),
        kind="affine_tril",
    ),
    Case(
        "uniform",
        lambda: dist.Uniform(torch.tensor([-1.0, 2.0]), torch.tensor([3.0, 2.5])),
        kind="elementwise",
    ),
    Case("exponential", lambda: dist.Exponential(torch.tensor([0.5, 3.0])), kind="elementwise"),
    Case("laplace", lambda: dist.Laplace(torch.tensor([0.5, -1.0]), torch.tensor([2.0, 0.3]))),
    Case("cauchy", lambda: dist.Cauchy(torch.tensor([0.5, -1.0]), torch.tensor([2.0, 0.3]))),
    Case("half_normal", lambda: dist.HalfNormal(torch.tensor([2.0, 0.3]))),
    Case("half_cauchy", lambda: dist.HalfCauchy(torch.tensor([2.0, 0.3]))),
    Case("logistic", lambda: dist.Logistic(torch.tensor([0.5, -1.0]), torch.tensor([2.0, 0.3]))),
    Case("gumbel", lambda: dist.Gumbel(torch.tensor([0.5, -1.0]), torch.tensor([2.0, 0.3]))),
    # The generic cdf/icdf rule (no closed-form tails registered): |eps| <= 5.
    Case(
        "generic_soft_laplace",
        lambda: dist.SoftLaplace(torch.tensor([0.5, -1.0]), torch.tensor([2.0, 0.3])),
        5.0,
        generic_cdf=True,
    ),
    Case(
        "generic_pareto",
        lambda: dist.GeneralizedPareto(0.0, torch.tensor([1.0, 2.0]), 0.2),
        5.0,
        generic_cdf=True,
    ),
    # TransformedDistribution recursion.
    Case(
        "log_normal", lambda: dist.LogNormal(torch.tensor([0.0, 1.0]), 0.5), unconstrained_kind="affine_diag"
    ),
    Case("weibull", lambda: dist.Weibull(torch.tensor([1.0, 2.0]), torch.tensor([1.5, 0.7]))),
    Case(
        "transformed_decreasing",
        lambda: dist.TransformedDistribution(
            dist.Normal(torch.tensor([0.0, 1.0]), 0.5), [T.AffineTransform(1.0, -2.0), T.ExpTransform()]
        ),
        kind="elementwise",
    ),
    Case(
        "transformed_affine",
        lambda: dist.TransformedDistribution(
            dist.Normal(torch.tensor([0.0, 1.0]), 0.5), [T.AffineTransform(1.0, -2.0)]
        ),
        kind="affine_diag",
    ),
    Case(
        "transformed_mvn",
        lambda: dist.TransformedDistribution(
            dist.MultivariateNormal(torch.zeros(3), scale_tril=_tril()), [T.ExpTransform()]
        ),
        kind="triangular",
    ),
    # Wrappers.
    Case("independent", lambda: dist.Exponential(torch.tensor([0.5, 3.0])).to_event(1), kind="elementwise"),
    Case("expanded", lambda: dist.LogNormal(torch.tensor([[0.0], [1.0]]), 0.5).expand([2, 3]).to_event(1)),
    Case("masked", lambda: dist.HalfCauchy(torch.tensor([2.0, 0.3])).mask(torch.tensor([True, False]))),
    # 1-D mixtures.
    Case(
        "mixture_normal",
        lambda: _mixture(
            dist.Normal(torch.tensor([-3.0, -1.0, 0.0, 2.0, 5.0]), torch.tensor([0.3, 1.0, 0.5, 2.0, 0.2])),
            torch.tensor([0.1, -0.5, 1.0, 0.3, -1.0]),
        ),
        kind="elementwise",
        density_atol=1e-9,
    ),
    Case(
        "mixture_batched_laplace",
        lambda: _mixture(
            dist.Laplace(torch.tensor([[-2.0, 0.0, 3.0], [1.0, 1.0, 1.5]]), torch.tensor([[0.5, 1.0, 0.3]])),
            torch.tensor([[0.0, 1.0, -1.0], [0.2, 0.1, 0.0]]),
        ),
        density_atol=1e-9,
    ),
    Case(
        "mixture_gamma_no_quantiles",
        lambda: _mixture(
            dist.Gamma(torch.tensor([0.5, 2.0, 9.0]), torch.tensor([1.0, 0.5, 3.0])), torch.zeros(3)
        ),
        density_atol=1e-9,
    ),
    # Approximations (check 5) and the numerical inverse cdf.
    Case(
        "gamma_numerical_icdf",
        lambda: dist.Gamma(torch.tensor([0.5, 4.0]), 2.0),
        approximate="numerical_icdf",
    ),
    Case(
        "gamma_log_moment_match",
        lambda: dist.Gamma(torch.tensor([0.5, 4.0]), 2.0),
        approximate="log_moment_match",
        unconstrained_kind="affine_diag",
    ),
    Case(
        "chi2_log_moment_match", lambda: dist.Chi2(torch.tensor([3.0, 10.0])), approximate="log_moment_match"
    ),
    Case(
        "inverse_gamma_log_moment_match",
        lambda: dist.InverseGamma(torch.tensor([3.0, 1.5]), 2.0),
        approximate="log_moment_match",
    ),
    Case(
        "beta_logit_moment_match",
        lambda: dist.Beta(torch.tensor([2.0, 0.7]), torch.tensor([3.0, 5.0])),
        approximate="logit_moment_match",
        unconstrained_kind="affine_diag",
    ),
]


def _noise(fn: dist.Distribution, eps_max: float, points: int = 1000) -> torch.Tensor:
    """``points`` noise values spread evenly over [-eps_max, eps_max], shaped ``[n] + batch + event``."""
    shape = fn.batch_shape + fn.event_shape
    per_sample = max(1, shape.numel())
    grid = torch.linspace(-eps_max, eps_max, points)
    samples = -(-points // per_sample)
    permuted = grid[torch.randperm(points)]
    padded = torch.cat([permuted, grid[: samples * per_sample - points]])
    return padded.reshape((samples,) + shape)


def _rounding_allowance(
    bijector: SiteBijector, eps: torch.Tensor, x: torch.Tensor, generic_cdf: bool = False
) -> tuple[torch.Tensor, ...]:
    """How far an eps -> x -> eps round trip may drift because of unavoidable roundings.

    - x itself is rounded to the nearest double. Near a finite upper bound (Uniform,
      x = b - (b - a) Phi(-eps)) a one-ulp change of x moves eps by ulp(x) |d eps/dx|, about 2e-8 at
      eps = 6: no implementation can beat this. We allow 4 ulp(x) |d eps/dx|; for every unbounded map
      here that is below 1e-12.
    - The generic cdf rule forms 1 - F (and the distribution's own icdf forms 1 - p): each rounding of a
      probability near 1 is an absolute error ulp(1) = 2.2e-16, i.e. |d eps| = ulp(1) / phi(eps),
      7e-11 at |eps| = 5 (this is why the design limits that rule to |eps| <= 5). We allow 4 of them.

    The log-det sum is log phi(eps) - log phi(eps') for the inverse-cdf rules (both log p(x) terms cancel)
    and ladj(eps) - ladj(eps') for closed forms, so its tolerance gets (|eps| + |d ladj/d eps|) times the
    eps allowance.
    """
    if bijector.event_dim != 0 or bijector.kind not in ("elementwise", "affine_diag"):
        return torch.zeros_like(eps), torch.zeros_like(eps)
    eps = eps.detach().requires_grad_(True)
    value, ladj = bijector.to_value(eps)
    if ladj.requires_grad:
        (slope_ladj,) = torch.autograd.grad(ladj.sum(), eps)
    else:  # an affine map: constant log-det
        slope_ladj = torch.zeros_like(eps)
    _, noise_ladj = bijector.to_noise(x)
    allowance = 4 * FLOAT64_EPS * x.abs().clamp(min=torch.finfo(x.dtype).tiny) * noise_ladj.exp()
    if generic_cdf:
        allowance = allowance + 4 * FLOAT64_EPS * torch.exp(-_log_normal(eps.detach(), 0))
    return allowance.detach(), ((slope_ladj.abs() + eps.abs()) * allowance).detach()


def _log_abs_det(transform: T.Transform, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T(y), log|T'(y)|)``, elementwise. torch's SigmoidTransform log-det uses softplus, which is linear
    beyond 20 and so drops terms ~e^{-20} = 2e-9; the reference here uses
    log sigmoid(z) = min(z, 0) - log1p(exp(-|z|)), exact to rounding."""
    if isinstance(transform, T.ComposeTransform):
        total = torch.zeros_like(y)
        for part in transform.parts:
            y, term = _log_abs_det(part, y)
            total = total + term
        return y, total
    if isinstance(transform, T.SigmoidTransform):
        log_sigmoid = lambda z: torch.clamp(z, max=0) - torch.log1p(torch.exp(-z.abs()))  # noqa: E731
        return transform(y), log_sigmoid(y) + log_sigmoid(-y)
    x = transform(y)
    return x, transform.log_abs_det_jacobian(y, x)


def _unconstrained_log_prob(fn: dist.Distribution, y: torch.Tensor) -> torch.Tensor:
    """Density of y = T^{-1}(x), x ~ fn, T = biject_to(fn.support)."""
    support = fn.support
    if isinstance(support, getattr(constraints, "MixtureSameFamilyConstraint", ())):
        support = support.base_constraint
    if isinstance(support, constraints.interval) and bool(
        torch.isinf(torch.as_tensor(support.upper_bound)).all()
    ):
        support = constraints.greater_than(support.lower_bound)  # GeneralizedPareto's [0, inf) "interval"
    transform = biject_to(support)
    if isinstance(transform, T.IndependentTransform):
        x, log_det = _log_abs_det(transform.base_transform, y)
        log_det = log_det.reshape(
            log_det.shape[: log_det.dim() - transform.reinterpreted_batch_ndims] + (-1,)
        )
        return fn.log_prob(x) + log_det.sum(-1)
    x, log_det = _log_abs_det(transform, y)
    return fn.log_prob(x) + log_det


def _base_log_prob(fn: dist.Distribution, x: torch.Tensor) -> torch.Tensor:
    # A mask changes log_prob, not the map: compare with the unmasked distribution.
    while isinstance(fn, dist.MaskedDistribution):
        fn = fn.base_dist
    return fn.log_prob(x)


@pytest.fixture(params=["value", "unconstrained"])
def coordinates(request) -> str:
    return request.param


# ================================================================================== check 1: round trip


@pytest.mark.parametrize("case", CASES, ids=str)
def test_site_round_trip(case: Case, coordinates: str) -> None:
    fn = case.make()
    bijector = site_bijector(fn, coordinates, case.approximate)
    eps = _noise(fn, case.eps_max)
    x, ladj_value = bijector.to_value(eps)
    assert x.shape == eps.shape and x.dtype == eps.dtype
    assert ladj_value.shape == eps.shape[: eps.dim() - bijector.event_dim]
    eps_back, ladj_noise = bijector.to_noise(x)
    eps_allowance, ladj_allowance = _rounding_allowance(bijector, eps, x, case.generic_cdf)
    # eps -> x -> eps, and the two log-dets cancel (1e-10, plus the rounding of x near a finite bound).
    assert ((eps_back - eps).abs() <= 1e-10 + eps_allowance).all(), (eps_back - eps).abs().max()
    ladj_allowance = (
        ladj_allowance.reshape(ladj_value.shape + (-1,)).sum(-1) if bijector.event_dim else ladj_allowance
    )
    assert ((ladj_value + ladj_noise).abs() <= 1e-10 + ladj_allowance).all(), (
        (ladj_value + ladj_noise).abs().max()
    )
    # x -> eps -> x, relative for x.
    x_back, _ = bijector.to_value(eps_back)
    torch.testing.assert_close(x_back, x, rtol=1e-10, atol=1e-10)
    noise_of_x_back, ladj_back = bijector.to_noise(x_back)
    torch.testing.assert_close(
        ladj_back + bijector.to_value(noise_of_x_back)[1], torch.zeros_like(ladj_back), rtol=0, atol=1e-10
    )


@pytest.mark.parametrize("case", CASES, ids=str)
def test_kinds_and_flags(case: Case, coordinates: str) -> None:
    fn = case.make()
    bijector = site_bijector(fn, coordinates, case.approximate)
    assert bijector.kind in ("affine_diag", "affine_tril", "elementwise", "triangular")
    assert bijector.exact is (case.approximate in (None, "numerical_icdf"))
    assert bijector.event_dim == len(fn.event_shape)
    assert bijector.leaf.event_dim <= bijector.event_dim
    expected = case.kind if coordinates == "value" else case.unconstrained_kind
    if expected is not None:
        assert bijector.kind == expected
    if bijector.numerical == "to_value":
        eps = _noise(fn, case.eps_max, 50)
        lower, upper = bijector.leaf.value_bracket(eps)
        x, _ = bijector.to_value(eps)
        assert (lower <= x).all() and (x <= upper).all()


# ================================================================================== check 2: density


@pytest.mark.parametrize("case", [c for c in CASES if c.approximate in (None, "numerical_icdf")], ids=str)
def test_site_density(case: Case, coordinates: str) -> None:
    fn = case.make()
    bijector = site_bijector(fn, coordinates, case.approximate)
    eps = _noise(fn, case.eps_max)
    x, ladj = bijector.to_value(eps)
    model_density = _log_normal(eps, bijector.event_dim) - ladj
    if coordinates == "value":
        expected = _base_log_prob(fn, x)
    else:
        base = fn.base_dist if isinstance(fn, dist.MaskedDistribution) else fn
        expected = _unconstrained_log_prob(base, x)
    torch.testing.assert_close(model_density, expected, rtol=0.0, atol=case.density_atol)


def test_approximations_are_not_the_density() -> None:
    # log_moment_match is a lognormal fit: its density differs from the Gamma's (so exact=False is honest).
    fn = dist.Gamma(torch.tensor(0.5), 2.0)
    bijector = site_bijector(fn, approximate="log_moment_match")
    eps = torch.linspace(-3, 3, 101)
    x, ladj = bijector.to_value(eps)
    assert ((_log_normal(eps, 0) - ladj) - fn.log_prob(x)).abs().max() > 0.1


# ================================================================================== check 3: log-det


def _jacobian_logdet(function: Callable[[torch.Tensor], torch.Tensor], point: torch.Tensor) -> torch.Tensor:
    jacobian = torch.autograd.functional.jacobian(function, point)
    return torch.linalg.slogdet(jacobian.reshape(point.numel(), point.numel()))[1]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_site_logdet_matches_autograd(case: Case, coordinates: str) -> None:
    fn = case.make()
    size = (fn.batch_shape + fn.event_shape).numel()
    assert size <= 6
    bijector = site_bijector(fn, coordinates, case.approximate)
    for eps in _noise(fn, min(case.eps_max, 4.0), 5 * size):
        x, ladj = bijector.to_value(eps)
        expected = _jacobian_logdet(lambda e: bijector.to_value(e)[0], eps)
        torch.testing.assert_close(ladj.sum(), expected, rtol=0.0, atol=1e-8)
        _, ladj_noise = bijector.to_noise(x)
        expected_noise = _jacobian_logdet(lambda v: bijector.to_noise(v)[0], x.detach())
        torch.testing.assert_close(ladj_noise.sum(), expected_noise, rtol=0.0, atol=1e-8)


# ================================================================================== check 4: gradients


def test_mixture_inverse_gradcheck() -> None:
    def to_value(eps, logits, locs, scales):
        return site_bijector(_mixture(dist.Normal(locs, scales), logits)).to_value(eps)

    eps = torch.tensor([-4.0, -1.5, -0.2, 0.0, 0.7, 3.0], requires_grad=True)
    logits = torch.randn(6, 3, requires_grad=True)
    locs = (3 * torch.randn(6, 3)).requires_grad_()
    scales = (torch.rand(6, 3) + 0.3).requires_grad_()
    # atol 1e-6 (design): finite differences of a root solved to 4 ulp are good to ~1e-9.
    assert torch.autograd.gradcheck(to_value, (eps, logits, locs, scales), atol=1e-6)


def test_mixture_without_quantiles_gradcheck() -> None:
    def to_value(eps, rates):
        return site_bijector(
            _mixture(dist.Gamma(torch.tensor([0.5, 2.0, 9.0]), rates), torch.zeros(3))
        ).to_value(eps)

    eps = torch.tensor([-2.0, 0.3, 2.5], requires_grad=True)
    rates = torch.tensor([1.0, 0.5, 3.0], requires_grad=True)
    assert torch.autograd.gradcheck(to_value, (eps, rates), atol=1e-6)


def test_numerical_icdf_gradcheck() -> None:
    # Gamma's cdf is differentiable in the rate (not the concentration): gradients w.r.t. eps and rate.
    def to_value(eps, rate):
        return site_bijector(
            dist.Gamma(torch.tensor([0.5, 4.0]), rate), approximate="numerical_icdf"
        ).to_value(eps)

    eps = torch.tensor([-1.3, 2.2], requires_grad=True)
    rate = torch.tensor([2.0, 0.7], requires_grad=True)
    assert torch.autograd.gradcheck(to_value, (eps, rate), atol=1e-6)


def test_mixture_implicit_derivative_is_density_ratio() -> None:
    fn = _mixture(dist.Normal(torch.tensor([-2.0, 1.0, 4.0]), torch.tensor([0.5, 1.0, 0.3])), torch.zeros(3))
    eps = torch.linspace(-5, 5, 21, requires_grad=True)
    x, _ = site_bijector(fn).to_value(eps)
    (slope,) = torch.autograd.grad(x.sum(), eps)
    expected = torch.exp(_log_normal(eps.detach(), 0) - fn.log_prob(x.detach()))  # dx/deps = phi(eps)/p(x)
    torch.testing.assert_close(slope, expected, rtol=1e-10, atol=0.0)


def test_closed_form_maps_gradcheck() -> None:
    def maps(eps, loc, scale):
        fns = [
            dist.Normal(loc, scale),
            dist.Laplace(loc, scale),
            dist.LogNormal(loc, scale),
            dist.Uniform(loc, loc + scale),
        ]
        outputs = []
        for fn in fns:
            x, ladj = site_bijector(fn).to_value(eps)
            outputs += [x, ladj, site_bijector(fn).to_noise(x)[1]]
        return tuple(outputs)

    eps = torch.tensor([-2.0, 0.5, 3.0], requires_grad=True)
    loc = torch.tensor([0.1, -0.3, 1.0], requires_grad=True)
    scale = torch.tensor([0.5, 1.5, 2.0], requires_grad=True)
    assert torch.autograd.gradcheck(maps, (eps, loc, scale), atol=1e-6)


# ================================================================================== check 5: unsupported


def test_gamma_without_approximation_raises_unsupported_naming_site_and_remedies() -> None:
    with pytest.raises(UnsupportedSiteError) as info:
        site_bijector(dist.Gamma(2.0, 3.0), name="precision")
    message = str(info.value)
    assert isinstance(info.value, TypeError)
    assert "'precision'" in message and "Gamma" in message
    assert "register_site_bijector" in message and "approximate='log_moment_match'" in message
    assert "reparameterise" in message
    assert info.value.site == "precision"


@pytest.mark.parametrize(
    "fn",
    [
        dist.StudentT(3.0),
        dist.Beta(2.0, 2.0),
        dist.Dirichlet(torch.ones(3)),
        dist.LKJCholesky(3, 1.0),
        dist.InverseGamma(2.0, 1.0),
        _mixture(dist.MultivariateNormal(torch.zeros(2, 3), torch.eye(3)), torch.zeros(2)),
        dist.LogisticNormal(torch.zeros(2), torch.ones(2)),  # StickBreaking changes the shape
    ],
    ids=lambda fn: type(fn).__name__,
)
def test_continuous_without_map_raises_unsupported(fn: dist.Distribution) -> None:
    with pytest.raises(UnsupportedSiteError, match="Remedies"):
        site_bijector(fn, name="z")


@pytest.mark.parametrize(
    "fn",
    [
        dist.Poisson(3.0),
        dist.Bernoulli(0.3),
        dist.Categorical(logits=torch.zeros(4)),
        dist.Bernoulli(torch.full((3,), 0.3)).to_event(1),
        dist.Binomial(10, 0.2),
    ],
    ids=lambda fn: type(fn).__name__,
)
def test_discrete_site_raises_type_error(fn: dist.Distribution) -> None:
    with pytest.raises(TypeError, match="discrete") as info:
        site_bijector(fn, name="k")
    assert not isinstance(info.value, UnsupportedSiteError)
    assert "'k'" in str(info.value) and "enumerat" in str(info.value).lower()


def test_approximation_that_does_not_apply_raises() -> None:
    with pytest.raises(UnsupportedSiteError, match="does not apply"):
        site_bijector(dist.Beta(2.0, 2.0), approximate="log_moment_match", name="p")


def test_exact_map_wins_over_requested_approximation() -> None:
    for name in APPROXIMATIONS:
        bijector = site_bijector(dist.LogNormal(0.0, 1.0), approximate=name)
        assert bijector.exact


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="coordinates"):
        site_bijector(dist.Normal(0.0, 1.0), coordinates="constrained")
    with pytest.raises(ValueError, match="approximate"):
        site_bijector(dist.Gamma(1.0, 1.0), approximate="laplace")
    with pytest.raises(TypeError, match="fn must be"):
        site_bijector(torch.zeros(3))
    with pytest.raises(TypeError, match="dist_type"):
        register_site_bijector(int)


# ================================================================================== dispatch and wrappers


class _ShiftedExponential(dist.TorchDistribution):
    """A user distribution with no cdf: exact through a registered rule only."""

    arg_constraints = {"rate": constraints.positive}
    support = constraints.greater_than(1.0)

    def __init__(self, rate):
        self.rate = torch.as_tensor(rate)
        super().__init__(self.rate.shape)

    def log_prob(self, value):
        return torch.log(self.rate) - self.rate * (value - 1.0)


def test_registered_rule_is_used_and_gets_unconstrained_coordinates() -> None:
    fn = _ShiftedExponential(torch.tensor([0.5, 2.0]))
    with pytest.raises(UnsupportedSiteError):
        site_bijector(fn)
    from pyro_ext.flows.site_bijectors import TransformedBijector

    @register_site_bijector(_ShiftedExponential)
    def _(fn):
        return TransformedBijector(
            site_bijector(dist.Exponential(fn.rate)), [T.AffineTransform(1.0, 1.0)], event_dim=0
        )

    try:
        eps = torch.linspace(-5, 5, 11).unsqueeze(-1).expand(11, 2)
        x, ladj = site_bijector(fn).to_value(eps)
        torch.testing.assert_close(_log_normal(eps, 0) - ladj, fn.log_prob(x), rtol=0, atol=1e-10)
        y, _ = site_bijector(fn, "unconstrained").to_value(eps)
        torch.testing.assert_close(y, torch.log(x - 1.0), rtol=1e-10, atol=1e-10)
    finally:
        from pyro_ext.flows import site_bijectors

        site_bijectors._RULES.pop(_ShiftedExponential)
        site_bijectors._LOOKUP_CACHE.clear()


def test_registration_follows_mro() -> None:
    class MyNormal(dist.Normal):
        pass

    class Subclass(MyNormal):
        pass

    assert site_bijector(Subclass(0.0, 1.0)).kind == "affine_diag"  # inherits Normal's rule
    register_site_bijector(MyNormal, lambda fn: AffineDiagBijector(fn.loc, 2 * fn.scale))
    try:
        x, _ = site_bijector(Subclass(0.0, 1.0)).to_value(torch.ones(1))
        assert x.item() == 2.0  # the more specific rule wins
        assert site_bijector(dist.Normal(0.0, 1.0)).to_value(torch.ones(1))[0].item() == 1.0
    finally:
        from pyro_ext.flows import site_bijectors

        site_bijectors._RULES.pop(MyNormal)
        site_bijectors._LOOKUP_CACHE.clear()


def test_wrappers_sum_and_expose_leaf() -> None:
    fn = dist.Normal(torch.zeros(3), torch.tensor([1.0, 2.0, 3.0])).to_event(1)
    bijector = site_bijector(fn)
    assert bijector.event_dim == 1 and bijector.leaf.event_dim == 0
    assert isinstance(bijector.leaf, AffineDiagBijector)
    eps = torch.randn(4, 3)
    _, ladj = bijector.to_value(eps)
    _, leaf_ladj = bijector.leaf.to_value(eps)
    assert ladj.shape == (4,) and leaf_ladj.shape == (4, 3)
    torch.testing.assert_close(ladj, leaf_ladj.sum(-1))


def test_parameters_broadcast_against_extra_batch_dims() -> None:
    # A structured layer passes noise [B, 1, N] for a site whose distribution has batch shape [N].
    fn = _mixture(dist.Normal(torch.randn(4, 3), 1.0), torch.zeros(4, 3))
    bijector = site_bijector(fn)
    eps = torch.randn(5, 1, 4)
    x, ladj = bijector.to_value(eps)
    assert x.shape == ladj.shape == (5, 1, 4)
    for row in range(5):
        x_row, _ = bijector.to_value(eps[row, 0])
        torch.testing.assert_close(x[row, 0], x_row, rtol=1e-12, atol=1e-12)
    mvn = dist.MultivariateNormal(torch.zeros(2, 3), scale_tril=_tril())
    eps = torch.randn(5, 1, 2, 3)
    x, ladj = site_bijector(mvn).to_value(eps)
    assert x.shape == (5, 1, 2, 3) and ladj.shape == (5, 1, 2)
    torch.testing.assert_close(site_bijector(mvn).to_noise(x)[0], eps)


@pytest.mark.parametrize("eps_value", [-30.0, -20.0, 20.0, 30.0])
def test_normal_and_mixture_tails_stay_accurate(eps_value: float) -> None:
    # §1.2: in float64, Normal and mixture maps stay accurate for |eps| up to ~30 (survival branch above
    # the median, log-space residuals). Round trip to 1e-8: ndtri of probabilities ~1e-197 keeps ~10 digits.
    eps = torch.tensor([eps_value])
    for fn in [
        dist.Normal(1.0, 2.0),
        _mixture(dist.Normal(torch.tensor([-1.0, 3.0]), torch.tensor([0.5, 2.0])), torch.zeros(2)),
        dist.Exponential(2.0),
    ]:
        bijector = site_bijector(fn)
        x, ladj = bijector.to_value(eps)
        assert torch.isfinite(x).all() and torch.isfinite(ladj).all()
        eps_back, _ = bijector.to_noise(x)
        torch.testing.assert_close(eps_back, eps, rtol=0, atol=1e-8)


# ================================================================================== root finding (P3)


@pytest.mark.parametrize("dtype, cap", [(torch.float64, 100), (torch.float32, 60)])
def test_mixture_root_iterations_within_cap(dtype: torch.dtype, cap: int) -> None:
    fn = _mixture(
        dist.Normal((4 * torch.randn(500, 100)).to(dtype), (torch.rand(500, 100) + 0.05).to(dtype)),
        torch.randn(500, 100).to(dtype),
    )
    bijector = site_bijector(fn)
    eps = (3 * torch.randn(500)).to(dtype)
    lower, upper = bijector.value_bracket(eps)
    _, iterations, converged = monotone_root(
        lambda x: bijector._residual(x, eps), lower, upper, full_output=True
    )
    assert converged.all() and iterations <= cap


def test_monotone_root_solves_hard_monotone_functions() -> None:
    target = torch.linspace(-100, 100, 2001)
    for function in [
        lambda x: torch.sinh(x) + x - target,
        lambda x: (x - target / 100) ** 3,  # triple root: bisection-like convergence
        lambda x: torch.atan(1e6 * (x - target / 100)),  # nearly a step
    ]:
        root, iterations, converged = monotone_root(
            function, torch.full_like(target, -10.0), torch.full_like(target, 10.0), full_output=True
        )
        assert converged.all() and iterations <= 100
        residual_at = function(root)
        upper = function(root + 8 * FLOAT64_EPS * root.abs().clamp(min=1))
        lower = function(root - 8 * FLOAT64_EPS * root.abs().clamp(min=1))
        assert ((lower <= 0) & (upper >= 0)).all()  # a sign change within a few ulps
        assert torch.isfinite(residual_at).all()


def test_monotone_root_fixed_iterations_match_eager() -> None:
    target = torch.linspace(-5, 5, 101)
    function = lambda x: x**3 + x - target  # noqa: E731
    eager = monotone_root(function, torch.full_like(target, -3.0), torch.full_like(target, 3.0))
    fixed = monotone_root(
        function, torch.full_like(target, -3.0), torch.full_like(target, 3.0), fixed_iterations=100
    )
    with fixed_root_iterations(100):
        in_context = monotone_root(function, torch.full_like(target, -3.0), torch.full_like(target, 3.0))
    torch.testing.assert_close(fixed, eager, rtol=0, atol=0)
    torch.testing.assert_close(in_context, eager, rtol=0, atol=0)


def test_monotone_root_degenerate_and_bad_brackets() -> None:
    zero = torch.zeros(3)
    root = monotone_root(lambda x: x - 1.0, torch.ones(3), torch.ones(3))
    torch.testing.assert_close(root, torch.ones(3))
    with pytest.raises(ValueError, match="max_iterations"):
        monotone_root(lambda x: x, zero - 1, zero + 1, max_iterations=0)
    with pytest.raises(ValueError, match="shaped like"):
        monotone_root(lambda x: x.sum(), zero - 1, zero + 1)
    with pytest.raises(ValueError, match="iterations"):
        with fixed_root_iterations(0):
            pass


def test_expand_bracket_and_implicit_step() -> None:
    target = torch.tensor([-1e6, -3.0, 0.5, 1e9])
    lower, upper = expand_bracket(lambda x: x - target, torch.full_like(target, -1.0), torch.ones(4))
    assert (lower <= target).all() and (upper >= target).all()
    theta = torch.tensor([2.0, 3.0], requires_grad=True)
    x0 = monotone_root(lambda x: x**3 - theta.detach(), torch.zeros(2), torch.full((2,), 2.0))
    x = implicit_step(x0, x0**3 - theta, 3 * x0**2)
    (gradient,) = torch.autograd.grad(x.sum(), theta)
    torch.testing.assert_close(gradient, 1 / (3 * theta.detach() ** (2 / 3)))  # d theta^(1/3) / d theta


# ================================================================================== float32, CUDA


@pytest.mark.parametrize(
    "case",
    [
        c
        for c in CASES
        if c.name
        in ("normal", "mvn", "uniform", "exponential", "mixture_normal", "log_normal", "gamma_numerical_icdf")
    ],
    ids=str,
)
def test_float32_matches_float64(case: Case) -> None:
    fn64 = case.make()
    eps = _noise(fn64, 4.0, 200)
    x64, ladj64 = site_bijector(fn64, approximate=case.approximate).to_value(eps)
    torch.set_default_dtype(torch.float32)  # the conftest fixture restores float64
    fn32 = case.make()
    x32, ladj32 = site_bijector(fn32, approximate=case.approximate).to_value(eps.float())
    assert x32.dtype == torch.float32 and ladj32.dtype == torch.float32
    # float32 eps ~1.2e-7; quantiles at |eps| = 4 amplify it by |x p(x)|^{-1} ~ 1e2.
    torch.testing.assert_close(x32.double(), x64, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ladj32.double(), ladj64, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device here: this checks placement on a GPU, which CPU-only CI cannot run",
)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cuda_matches_cpu(case: Case) -> None:
    fn = case.make()
    eps = _noise(fn, 4.0, 100)
    x, ladj = site_bijector(fn, approximate=case.approximate).to_value(eps)
    torch.set_default_device("cuda")
    try:
        fn_cuda = case.make()
    finally:
        torch.set_default_device("cpu")
    x_cuda, ladj_cuda = site_bijector(fn_cuda, approximate=case.approximate).to_value(eps.cuda())
    assert x_cuda.is_cuda
    torch.testing.assert_close(x_cuda.cpu(), x, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(ladj_cuda.cpu(), ladj, rtol=1e-8, atol=1e-8)


def test_mixture_map_traces_with_fixed_iterations() -> None:
    # Compiled use (§2.7): under torch.jit.trace the root finder runs a fixed number of iterations, so the
    # captured graph reproduces the eager map on noise it was not traced with.
    locs, scales = torch.tensor([-3.0, 0.0, 2.5]), torch.tensor([0.4, 1.0, 0.7])
    bijector = site_bijector(_mixture(dist.Normal(locs, scales), torch.tensor([0.3, 0.0, -0.5])))
    # 40 iterations: this bracket converges in ~12 (the cap of 100 would only make the graph longer).
    with warnings.catch_warnings(), fixed_root_iterations(40):
        warnings.simplefilter("ignore")  # tracer warnings about Python values read off tensors
        traced = torch.jit.trace(lambda eps: bijector.to_value(eps), (torch.randn(50),), check_trace=False)
    fresh = 2 * torch.randn(50)
    for actual, expected in zip(traced(fresh), bijector.to_value(fresh)):
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
