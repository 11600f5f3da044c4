"""ImproperMarginalLogLikelihood: the restricted likelihood (design §3.5; §5 checks 9-11, 14)."""

from __future__ import annotations

import copy
import math

import gpytorch
import pytest
import torch
from gp_models import KERNELS, PlainGP, WalkGP, make_likelihood, scaled, walk_data

from pyro_ext.gp import ImproperMarginalLogLikelihood, ImproperMultivariateNormal, restricted_log_likelihood
from pyro_ext.kernels import MaternWalkKernel, SmoothWalkKernel
from pyro_ext.testing.kernels import contrast_log_likelihood

NOISE = 0.05


def restricted(model, x, y):
    """n * mll, i.e. L (plus log priors, if any)."""
    model.train()
    mll = ImproperMarginalLogLikelihood(model.likelihood, model)
    return mll(model(x), y) * len(y)


def raw_gram(model, x):
    with torch.no_grad():
        return model.covar_module(x.unsqueeze(-1)).to_dense() + NOISE * torch.eye(len(x))


# ----------------------------------------------------------------------------------------------------------
# Check 9: REML against the contrast form, the large-c limit, and finite differences


@pytest.mark.parametrize("name", list(KERNELS))
def test_equals_the_contrast_form(name):
    x, y = walk_data(60)
    model = WalkGP(x, y, make_likelihood(NOISE), KERNELS[name]())
    with torch.no_grad():
        value = restricted(model, x, y)
    expected = contrast_log_likelihood(raw_gram(model, x), y)
    assert abs(value - expected).item() <= 1e-9 * abs(expected).item()


def test_is_the_large_constant_limit():
    """log N(y; 0, K + c 11^T) + 1/2 log(2 pi c) -> L at rate 1/c.

    Exactly (det(K + c 11^T) = det K (1 + c a), Sherman-Morrison for the quadratic form), the gap is
    -b^2 / (2 a (1 + c a)) - log(1 + 1 / (c a)) / 2 ~ -(beta^2 + 1/a) / (2c): it grows with the level
    beta = b/a of the data, so the data here are a walk around 0.
    """
    x, y = walk_data(60)
    y = y - 20.0
    model = WalkGP(x, y, make_likelihood(NOISE), KERNELS["smooth"]())
    with torch.no_grad():
        value = restricted(model, x, y)
    gram = raw_gram(model, x)
    solved = torch.linalg.solve(gram, torch.stack([y, torch.ones(len(x))], -1))
    a, b = solved[:, 1].sum(), solved[:, 0].sum()
    largest = (gram - NOISE * torch.eye(len(x))).abs().max()
    gaps = []
    for decade in (3, 4, 5):
        c = largest * 10.0**decade
        proper = torch.distributions.MultivariateNormal(
            torch.zeros(len(x)), gram + c * torch.ones(len(x), len(x))
        )
        gap = (proper.log_prob(y) + 0.5 * torch.log(2 * math.pi * c) - value).item()
        exact_gap = (-(b**2) / (2 * a * (1 + c * a)) - 0.5 * torch.log1p(1 / (c * a))).item()
        # the proper density's Cholesky of K + c 11^T (entries ~c) rounds at ~eps * c * n / noise ~ 1e-7 at
        # 1e5 M
        assert gap == pytest.approx(exact_gap, rel=1e-3, abs=5e-7), decade
        gaps.append(gap)
    assert abs(gaps[-1]) < 1e-4
    assert all(8.0 <= gaps[k] / gaps[k + 1] <= 12.0 for k in range(2)), gaps  # one decade per decade


@pytest.mark.parametrize("representative", ["anchor", "shift"])
def test_gradients_match_finite_differences(representative):
    x, y = walk_data(50)
    model = WalkGP(x, y, make_likelihood(NOISE), KERNELS["walk+periodic"](), representative=representative)
    value = restricted(model, x, y)
    parameters = dict(model.named_parameters())
    gradients = dict(zip(parameters, torch.autograd.grad(value, list(parameters.values()))))
    step = 1e-5  # central differences: truncation ~ step^2 |L'''| ~ 1e-8, rounding ~ eps |L| / step ~ 1e-9
    for name, parameter in parameters.items():
        for index in range(parameter.numel()):
            with torch.no_grad():
                flat = parameter.view(-1)
                flat[index] += step
                upper = restricted(model, x, y)
                flat[index] -= 2 * step
                lower = restricted(model, x, y)
                flat[index] += step
            numeric = (upper - lower) / (2 * step)
            analytic = gradients[name].view(-1)[index]
            assert abs(numeric - analytic).item() <= 1e-6 * max(1.0, abs(analytic).item()), name


# ----------------------------------------------------------------------------------------------------------
# Check 10 (likelihood part): invariance


def test_does_not_depend_on_the_representative_or_an_offset():
    x, y = walk_data(60)
    span = float(x.max() - x.min())
    kernel = KERNELS["walk+periodic"]()
    reference = restricted(WalkGP(x, y, make_likelihood(NOISE), kernel), x, y).item()
    with torch.no_grad():
        gram = raw_gram(WalkGP(x, y, make_likelihood(NOISE), kernel), x)
    threshold = (-1.0 / torch.linalg.solve(gram, torch.ones(len(x))).sum()).item()
    largest = (gram - NOISE * torch.eye(len(x))).abs().max().item()
    variants = [
        {"anchor": x[3:4].unsqueeze(-1)},
        {"anchor": torch.tensor([[float(x.max()) + 10 * span]])},
        {"representative": "shift"},
        {"representative": "shift", "shift": 1.5 * threshold},
        {"representative": "shift", "shift": 2 * largest},
        {"representative": "shift", "shift": 100 * largest},
        {"representative": "shift", "shift": threshold / 10},  # too small: grown 16-fold, then fine
    ]
    for options in variants:
        value = restricted(
            WalkGP(x, y, make_likelihood(NOISE), copy.deepcopy(kernel), **options), x, y
        ).item()
        assert value == pytest.approx(reference, rel=1e-9, abs=0), options
    offset = restricted(WalkGP(x, y + 7.0, make_likelihood(NOISE), copy.deepcopy(kernel)), x, y + 7.0).item()
    assert offset == pytest.approx(reference, rel=1e-9, abs=0)


# ----------------------------------------------------------------------------------------------------------
# Check 11 (likelihood part): interop with GPyTorch


def test_likelihood_of_the_prior_is_the_restricted_likelihood_and_priors_add():
    x, y = walk_data(40)
    kernel = gpytorch.kernels.ScaleKernel(
        MaternWalkKernel(2, lengthscale_prior=gpytorch.priors.GammaPrior(2.0, 2.0)),
        outputscale_prior=gpytorch.priors.GammaPrior(2.0, 1.0),
    )
    model = WalkGP(x, y, make_likelihood(NOISE), kernel)
    model.train()
    prior = model(x)
    assert isinstance(prior, ImproperMultivariateNormal)
    marginal = model.likelihood(prior)
    assert isinstance(marginal, ImproperMultivariateNormal)
    log_priors = sum(p.log_prob(closure(module)).sum() for _, module, p, closure, _ in model.named_priors())
    mll = ImproperMarginalLogLikelihood(model.likelihood, model)(prior, y)
    torch.testing.assert_close(marginal.log_prob(y), mll * len(y) - log_priors, rtol=1e-12, atol=0)


def test_same_scale_as_exact_marginal_log_likelihood_for_a_proper_kernel():
    """With a PD kernel in a plain ExactGP it is ordinary-kriging REML, per data point like ExactMLL."""
    x, y = walk_data(40)
    kernel = scaled(gpytorch.kernels.RBFKernel(), 2.0, 1.5)
    model = PlainGP(x, y, make_likelihood(NOISE), kernel)
    model.train()
    reml = ImproperMarginalLogLikelihood(model.likelihood, model)(model(x), y)
    expected = contrast_log_likelihood(raw_gram(model, x), y) / len(y)
    torch.testing.assert_close(reml, expected, rtol=1e-10, atol=0)
    ml2 = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)(model(x), y - y.mean())
    assert abs(reml - ml2).item() < 1.0  # same order: per-point log densities, not a sum


def test_mask_policy_equals_dropping_the_missing_rows():
    x, y = walk_data(50)
    missing = torch.zeros(50, dtype=torch.bool)
    missing[[0, 11, 12, 49]] = True
    kernel = KERNELS["smooth"]()
    dropped = WalkGP(x[~missing], y[~missing], make_likelihood(NOISE), kernel)
    expected = restricted(dropped, x[~missing], y[~missing])
    model = WalkGP(x, y.masked_fill(missing, math.nan), make_likelihood(NOISE), copy.deepcopy(kernel))
    model.train()
    mll = ImproperMarginalLogLikelihood(model.likelihood, model)
    with gpytorch.settings.observation_nan_policy("mask"):
        value = mll(model(x), model.train_targets) * 50  # ExactMLL's convention: divided by all n
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=0)


def test_float32_smoke():
    x, y = walk_data(60)
    model = WalkGP(x, y, make_likelihood(NOISE), KERNELS["matern3"]())
    value = restricted(model, x, y).item()
    model32 = copy.deepcopy(model).float()
    model32.set_train_data(x.float(), y.float(), strict=False)
    value32 = restricted(model32, x.float(), y.float())
    assert value32.dtype == torch.float32
    # float32 Cholesky of a matrix with condition number ~1e4 (walk Gram, noise 0.05): ~1e-3 relative
    assert value32.item() == pytest.approx(value, rel=1e-3)


# ----------------------------------------------------------------------------------------------------------
# Check 14: a REML fit recovers the hyperparameters


def _anchored_walk(kernel, x, noise, generator):
    """f from the anchored prior (f(x0) = 0 at the first input) plus noise, for a batch of inputs."""
    with torch.no_grad():
        gram = kernel(x).to_dense()
        anchored = gram - gram[..., :, :1] - gram[..., :1, :] + gram[..., :1, :1]
        anchored = anchored[..., 1:, 1:]  # f(x0) = 0 exactly: drop it, then put it back
        jitter = 1e-10 * anchored.diagonal(dim1=-2, dim2=-1).amax(-1)[..., None, None]
        root = torch.linalg.cholesky(anchored + jitter * torch.eye(anchored.shape[-1]))
        f = (root @ torch.randn(*anchored.shape[:-1], 1, generator=generator)).squeeze(-1)
        f = torch.cat([torch.zeros(*f.shape[:-1], 1), f], -1)
    return f + math.sqrt(noise) * torch.randn(f.shape, generator=generator)


FITS = {
    "smooth": (SmoothWalkKernel, 0.15),
    "matern1": (lambda **kw: MaternWalkKernel(1, **kw), 0.25),
    "matern2": (lambda **kw: MaternWalkKernel(2, **kw), 0.15),
    "matern3": (lambda **kw: MaternWalkKernel(3, **kw), 0.15),
}


@pytest.mark.parametrize("name", list(FITS))
def test_reml_fit_recovers_lengthscale_and_noise(name):
    """n = 400 on [0, 80], l = theta = 1, noise 0.01, seeds 0-4, L-BFGS from (theta, l, noise) = (0.5, 2,
    0.05).

    Observed medians (l, noise): smooth (0.993, 0.0097), j=1 (0.945, 0.0102), j=2 (1.012, 0.0101),
    j=3 (1.032, 0.0099).
    """
    factory, lengthscale_tolerance = FITS[name]
    n, noise = 400, 0.01
    lengthscales, noises = [], []
    for seed in range(5):
        generator = torch.Generator().manual_seed(seed)
        x = torch.sort(torch.rand(n, 1, generator=generator) * 80, dim=0).values
        y = _anchored_walk(scaled(factory(), 1.0, 1.0), x, noise, generator)
        kernel = scaled(factory(), 0.5, 2.0)
        model = WalkGP(x, y, make_likelihood(0.05), kernel)
        mll = ImproperMarginalLogLikelihood(model.likelihood, model)
        model.train()
        optimizer = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

        def closure(optimizer=optimizer, model=model, mll=mll, x=x, y=y):
            optimizer.zero_grad()
            loss = -mll(model(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)
        lengthscales.append(kernel.base_kernel.lengthscale.item())
        noises.append(model.likelihood.noise.item())
    lengthscale = torch.tensor(lengthscales).median().item()
    noise_estimate = torch.tensor(noises).median().item()
    print(f"{name}: median lengthscale {lengthscale:.3f}, median noise {noise_estimate:.5f}")
    assert abs(lengthscale - 1.0) <= lengthscale_tolerance, lengthscale
    assert abs(noise_estimate / noise - 1.0) <= 0.2, noise_estimate


# ----------------------------------------------------------------------------------------------------------
# Bad input


def test_walk_kernel_in_a_plain_exact_gp_is_refused():
    x, y = walk_data(20)
    model = PlainGP(x, y, make_likelihood(NOISE), KERNELS["smooth"]())
    with pytest.raises(ValueError, match="ImproperExactGP"):
        ImproperMarginalLogLikelihood(model.likelihood, model)


def test_fewer_than_two_points_is_a_clear_error():
    x, y = walk_data(1)
    model = WalkGP(x, y, make_likelihood(NOISE), KERNELS["smooth"]())
    with pytest.raises(ValueError, match="at least 2"):
        restricted(model, x, y)
    with pytest.raises(ValueError, match="at least 2"):
        restricted_log_likelihood(torch.eye(1), torch.zeros(1))


def test_nan_targets_and_fill_policy_are_clear_errors():
    x, y = walk_data(20)
    y[3] = math.nan
    model = WalkGP(x, y, make_likelihood(NOISE), KERNELS["smooth"]())
    with pytest.raises(ValueError, match="observation_nan_policy"):
        restricted(model, x, y)
    with gpytorch.settings.observation_nan_policy("fill"), pytest.raises(ValueError, match="fill"):
        restricted(model, x, y)


def test_mismatched_target_is_a_clear_error():
    x, y = walk_data(20)
    model = WalkGP(x, y, make_likelihood(NOISE), KERNELS["smooth"]())
    model.train()
    mll = ImproperMarginalLogLikelihood(model.likelihood, model)
    with pytest.raises(ValueError, match="target"):
        mll(model(x), y[:-1])
