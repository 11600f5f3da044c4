"""ImproperExactGP: the exact c -> infinity posterior (design §3.2-3.4; §5 checks 6-8, 10-13)."""

from __future__ import annotations

import copy
import io
import math

import gpytorch
import pytest
import torch
from gp_models import KERNELS, PlainGP, WalkGP, make_likelihood, scaled, walk_data
from gpytorch.distributions import MultivariateNormal
from linear_operator.utils.errors import NotPSDError

from pyro_ext.gp import (
    ImproperExactGP,
    ImproperMarginalLogLikelihood,
    ImproperMultivariateNormal,
    ImproperPredictionStrategy,
    RedundantMeanWarning,
)
from pyro_ext.kernels import MaternWalkKernel, SmoothWalkKernel
from pyro_ext.testing.kernels import bordered_posterior, kriging_posterior

NOISE = 0.05


def posterior(model, test_x):
    model.eval()
    with torch.no_grad():
        output = model(test_x)
    return output.mean, output.covariance_matrix


def dense_blocks(kernel, x, test_x):
    with torch.no_grad():
        as_matrix = lambda a, b: kernel(a.unsqueeze(-1), b.unsqueeze(-1)).to_dense()  # noqa: E731
        return as_matrix(x, x), as_matrix(x, test_x), as_matrix(test_x, test_x)


def relative_error(actual, expected):
    """Max error relative to the largest entry (design §5)."""
    return ((actual - expected).abs().max() / expected.abs().max()).item()


# ----------------------------------------------------------------------------------------------------------
# Check 6: the documented failure


@pytest.mark.filterwarnings("ignore::gpytorch.utils.warnings.NumericalWarning")  # the jitter retries
def test_plain_exact_gp_with_a_walk_kernel_raises_not_psd():
    x, y = walk_data(40)
    model = PlainGP(x, y, make_likelihood(NOISE), KERNELS["smooth"]())
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    model.train()
    with pytest.raises(NotPSDError):
        mll(model(x), y)


# ----------------------------------------------------------------------------------------------------------
# Check 7: three posteriors agree


@pytest.mark.parametrize("name", list(KERNELS))
def test_three_posteriors_agree(name):
    x, y = walk_data(60)
    span = float(x.max() - x.min())
    test_x = torch.linspace(float(x.min()) - 5 * span, float(x.max()) + 5 * span, 41)
    model = WalkGP(x, y, make_likelihood(NOISE), KERNELS[name]())
    mean, covariance = posterior(model, test_x)
    blocks = dense_blocks(model.covar_module, x, test_x)
    kriging_mean, kriging_covariance = kriging_posterior(*blocks, NOISE, y)
    bordered_mean, bordered_covariance = bordered_posterior(*blocks, NOISE, y)
    assert relative_error(kriging_mean, bordered_mean) < 1e-9  # the two oracles agree first
    assert relative_error(kriging_covariance, bordered_covariance) < 1e-9
    assert relative_error(mean, kriging_mean) < 1e-9
    assert relative_error(covariance, kriging_covariance) < 1e-9


def test_posterior_is_a_proper_multivariate_normal_and_prior_is_improper():
    x, y = walk_data(30)
    model = WalkGP(x, y, make_likelihood(NOISE), KERNELS["smooth"]())
    model.eval()
    with torch.no_grad():
        output = model(torch.linspace(0, 12, 7))
        assert type(output) is MultivariateNormal and torch.isfinite(output.variance).all()
        with gpytorch.settings.prior_mode(True):
            prior = model(torch.linspace(0, 12, 7))
    assert isinstance(prior, ImproperMultivariateNormal)
    assert torch.isinf(prior.variance).all()
    assert isinstance(model.prediction_strategy, ImproperPredictionStrategy)


# ----------------------------------------------------------------------------------------------------------
# Check 8: a large constant kernel in a plain ExactGP converges at O(1/c)


def test_large_constant_kernel_converges_like_one_over_c():
    x, y = walk_data(60)
    test_x = torch.linspace(-10.0, 25.0, 30)
    walk = KERNELS["matern3"]()
    improper = WalkGP(x, y, make_likelihood(NOISE), walk)
    mean, covariance = posterior(improper, test_x)
    with torch.no_grad():
        largest = walk(x.unsqueeze(-1)).to_dense().abs().max().item()
    errors = []
    for decade in (2, 3, 4):
        constant = gpytorch.kernels.ConstantKernel()
        constant.constant = torch.tensor(largest * 10.0**decade)
        oracle = PlainGP(x, y, make_likelihood(NOISE), copy.deepcopy(walk) + constant)
        oracle_mean, oracle_covariance = posterior(oracle, test_x)
        errors.append(
            max((oracle_mean - mean).abs().max().item(), (oracle_covariance - covariance).abs().max().item())
        )
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(8.0 <= ratio <= 12.0 for ratio in ratios), (errors, ratios)


# ----------------------------------------------------------------------------------------------------------
# Check 10 (posterior part): invariance to the representative and to a constant offset of y


def _exact_shift_threshold(model, x):
    """c* = -1 / 1^T (R + s^2 I)^-1 1: R + s^2 I + c 11^T is positive definite exactly for c > c*."""
    with torch.no_grad():
        matrix = model.covar_module(x.unsqueeze(-1)).to_dense() + NOISE * torch.eye(len(x))
        a = torch.linalg.solve(matrix, torch.ones(len(x))).sum()
    assert a < 0  # one negative eigenvalue: R + s^2 I alone is indefinite
    return (-1.0 / a).item()


def test_results_do_not_depend_on_the_representative():
    x, y = walk_data(60)
    span = float(x.max() - x.min())
    test_x = torch.linspace(-20.0, 30.0, 25)
    reference = WalkGP(x, y, make_likelihood(NOISE), KERNELS["walk+periodic"]())
    expected_mean, expected_covariance = posterior(reference, test_x)
    with torch.no_grad():
        largest = reference.covar_module(x.unsqueeze(-1)).to_dense().abs().max().item()
    threshold = _exact_shift_threshold(reference, x)
    variants = [
        {"anchor": x[7:8].unsqueeze(-1)},  # a data point
        {"anchor": torch.tensor([[float(x.max()) + 10 * span]])},  # ten spans away
        {"representative": "shift"},  # the automatic rule
        {"representative": "shift", "shift": 1.5 * threshold},
        {"representative": "shift", "shift": 2 * largest},
        {"representative": "shift", "shift": 100 * largest},
    ]
    for options in variants:
        model = WalkGP(x, y, make_likelihood(NOISE), copy.deepcopy(reference.covar_module), **options)
        mean, covariance = posterior(model, test_x)
        assert mean.shape == expected_mean.shape and covariance.shape == expected_covariance.shape
        assert relative_error(mean, expected_mean) < 1e-9, options
        assert relative_error(covariance, expected_covariance) < 1e-9, options


def test_a_failed_shift_grows_until_it_works():
    x, y = walk_data(60)
    test_x = torch.linspace(-5.0, 15.0, 11)
    reference = WalkGP(x, y, make_likelihood(NOISE), KERNELS["smooth"]())
    expected_mean, expected_covariance = posterior(reference, test_x)
    threshold = _exact_shift_threshold(reference, x)
    too_small = WalkGP(
        x, y, make_likelihood(NOISE), KERNELS["smooth"](), representative="shift", shift=threshold / 10
    )
    mean, covariance = posterior(too_small, test_x)  # 4 x 4 = 16 > 10: the second retry works
    assert relative_error(mean, expected_mean) < 1e-9
    assert relative_error(covariance, expected_covariance) < 1e-9
    hopeless = WalkGP(
        x, y, make_likelihood(NOISE), KERNELS["smooth"](), representative="shift", shift=threshold / 1000
    )
    with pytest.raises(NotPSDError, match="anchor"):
        posterior(hopeless, test_x)


def test_offset_of_the_targets_moves_the_mean_by_the_offset():
    x, y = walk_data(50)
    test_x = torch.linspace(-5.0, 15.0, 21)
    base_mean, base_covariance = posterior(WalkGP(x, y, make_likelihood(NOISE), KERNELS["matern1"]()), test_x)
    mean, covariance = posterior(WalkGP(x, y + 7.0, make_likelihood(NOISE), KERNELS["matern1"]()), test_x)
    torch.testing.assert_close(mean, base_mean + 7.0, rtol=0, atol=1e-9 * base_mean.abs().max().item())
    torch.testing.assert_close(
        covariance, base_covariance, rtol=0, atol=1e-9 * base_covariance.abs().max().item()
    )


# ----------------------------------------------------------------------------------------------------------
# Check 11 (posterior part): CG, fast_pred_var, batches, NaN masking, float32


def _cg_data(n=300):
    return walk_data(n, span=10.0, seed=3)


# linear_operator's CG stops updating near a relative residual of ~1e-5, whatever the tolerance asks (and
# warns that it did not converge); the improper caches and the dense-variance covariance refine past it.
@pytest.mark.filterwarnings("ignore:CG terminated:gpytorch.utils.warnings.NumericalWarning")
def test_cg_matches_cholesky():
    x, y = _cg_data()
    test_x = torch.linspace(-5.0, 15.0, 40)
    model = WalkGP(x, y, make_likelihood(NOISE), KERNELS["matern3"]())
    chol_mean, chol_covariance = posterior(model, test_x)
    model.train()
    with (
        gpytorch.settings.max_cholesky_size(0),
        gpytorch.settings.eval_cg_tolerance(1e-8),
        gpytorch.settings.min_preconditioning_size(0),
        gpytorch.settings.max_preconditioner_size(50),
    ):
        cg_mean, cg_covariance = posterior(model, test_x)
    # design check 11: CG at eval tolerance 1e-8 matches Cholesky to 1e-6 (the Cholesky side is exact to
    # ~cond(K) * 1e-16, far below it)
    assert relative_error(cg_mean, chol_mean) < 1e-6
    assert relative_error(cg_covariance, chol_covariance) < 1e-6


def test_fast_pred_var_matches():
    x, y = _cg_data()
    test_x = torch.linspace(-5.0, 15.0, 40)
    model = WalkGP(x, y, make_likelihood(NOISE), KERNELS["smooth"]())
    _, covariance = posterior(model, test_x)
    model.train()
    with gpytorch.settings.max_cholesky_size(0), gpytorch.settings.fast_pred_var():
        _, fast_covariance = posterior(model, test_x)
    # LOVE's Lanczos root (rank <= 100) of a well-conditioned 300 x 300 matrix: 1e-3 as in the design
    assert relative_error(fast_covariance.diagonal(), covariance.diagonal()) < 1e-3


def test_skip_posterior_variances_keeps_the_mean():
    x, y = walk_data(40)
    test_x = torch.linspace(-5.0, 15.0, 9)
    model = WalkGP(x, y, make_likelihood(NOISE), KERNELS["smooth"]())
    mean, _ = posterior(model, test_x)
    model.train()
    model.eval()
    with gpytorch.settings.skip_posterior_variances(), torch.no_grad():
        output = model(test_x)
    torch.testing.assert_close(output.mean, mean)
    assert output.lazy_covariance_matrix.to_dense().abs().max() == 0


def test_lazy_and_eager_kernels_and_detached_caches_agree():
    x, y = walk_data(40)
    test_x = torch.linspace(-5.0, 15.0, 9)
    model = WalkGP(x, y, make_likelihood(NOISE), KERNELS["walk+periodic"]())
    mean, covariance = posterior(model, test_x)
    for setting in (
        gpytorch.settings.lazily_evaluate_kernels(False),
        gpytorch.settings.detach_test_caches(False),
    ):
        model.train()
        with setting:
            other_mean, other_covariance = posterior(model, test_x)
        torch.testing.assert_close(other_mean, mean, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(other_covariance, covariance, rtol=1e-10, atol=1e-10)


def test_batch_of_three_equals_three_models():
    xs, ys = zip(*(walk_data(40, seed=seed) for seed in range(3)))
    x, y = torch.stack(xs).unsqueeze(-1), torch.stack(ys)
    lengthscales = torch.tensor([0.5, 1.0, 2.0])
    kernel = gpytorch.kernels.ScaleKernel(
        SmoothWalkKernel(batch_shape=torch.Size([3])), batch_shape=torch.Size([3])
    )
    kernel.base_kernel.lengthscale = lengthscales.view(3, 1, 1)
    kernel.outputscale = torch.tensor([1.0, 2.0, 0.5])
    likelihood = gpytorch.likelihoods.GaussianLikelihood(batch_shape=torch.Size([3]))
    likelihood.noise = NOISE
    batch = WalkGP(x, y, likelihood, kernel)
    test_x = torch.linspace(-5.0, 15.0, 11)
    batch_mean, batch_covariance = posterior(batch, test_x.expand(3, -1).unsqueeze(-1))
    batch.train()
    batch_mll = ImproperMarginalLogLikelihood(batch.likelihood, batch)(batch(x), y)
    assert batch_mll.shape == (3,)
    for b in range(3):
        single_kernel = scaled(SmoothWalkKernel(), [1.0, 2.0, 0.5][b], lengthscales[b].item())
        single = WalkGP(xs[b], ys[b], make_likelihood(NOISE), single_kernel)
        mean, covariance = posterior(single, test_x)
        torch.testing.assert_close(batch_mean[b], mean, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(batch_covariance[b], covariance, rtol=1e-10, atol=1e-10)
        single.train()
        mll = ImproperMarginalLogLikelihood(single.likelihood, single)(single(xs[b]), ys[b])
        torch.testing.assert_close(batch_mll[b], mll, rtol=1e-12, atol=0)


def test_mask_policy_equals_dropping_the_missing_rows():
    x, y = walk_data(50)
    missing = torch.zeros(50, dtype=torch.bool)
    missing[[3, 17, 18, 40]] = True
    y_nan = y.masked_fill(missing, math.nan)
    test_x = torch.linspace(-5.0, 15.0, 13)
    dropped = WalkGP(x[~missing], y[~missing], make_likelihood(NOISE), KERNELS["matern3"]())
    expected_mean, expected_covariance = posterior(dropped, test_x)
    model = WalkGP(x, y_nan, make_likelihood(NOISE), KERNELS["matern3"]())
    with gpytorch.settings.observation_nan_policy("mask"):
        mean, covariance = posterior(model, test_x)
    torch.testing.assert_close(mean, expected_mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(covariance, expected_covariance, rtol=1e-10, atol=1e-10)


def test_nan_targets_need_the_mask_policy():
    x, y = walk_data(30)
    y[5] = math.nan
    model = WalkGP(x, y, make_likelihood(NOISE), KERNELS["smooth"]())
    with pytest.raises(ValueError, match="observation_nan_policy"):
        posterior(model, torch.linspace(0, 1, 3))
    model.train()
    with gpytorch.settings.observation_nan_policy("fill"), pytest.raises(ValueError, match="fill"):
        posterior(model, torch.linspace(0, 1, 3))


def test_float32_smoke():
    x, y = walk_data(60)
    test_x = torch.linspace(-5.0, 15.0, 11)
    model = WalkGP(x, y, make_likelihood(NOISE), KERNELS["smooth"]())
    mean, covariance = posterior(model, test_x)
    model32 = copy.deepcopy(model).float()
    model32.set_train_data(x.float(), y.float(), strict=False)
    mean32, covariance32 = posterior(model32, test_x.float())
    assert mean32.dtype == torch.float32
    # float32 solves with a condition number ~1e3 lose about 1e-4 relative
    assert relative_error(mean32.double(), mean) < 1e-3
    assert relative_error(covariance32.double(), covariance) < 1e-3


# ----------------------------------------------------------------------------------------------------------
# Check 12: far field


@pytest.mark.parametrize("name", ["smooth", "matern1", "matern3"])
def test_variance_grows_linearly_far_away_and_the_mean_settles(name):
    x, y = walk_data(60)
    kernel = KERNELS[name]()
    model = WalkGP(x, y, make_likelihood(NOISE), kernel)
    lengthscale = kernel.base_kernel.lengthscale.item()
    theta = kernel.outputscale.item()
    far = float(x.max()) + torch.tensor([40.0, 80.0]) * lengthscale
    mean, covariance = posterior(model, far)
    variance = covariance.diagonal()
    slope = (variance[1] - variance[0]) / (40 * lengthscale)
    assert slope.item() == pytest.approx(2 * theta * kernel.base_kernel.slope / lengthscale, rel=1e-6)
    assert abs(mean[1] - mean[0]).item() < 1e-8


# ----------------------------------------------------------------------------------------------------------
# Check 13: calibration


@pytest.mark.parametrize(
    "kernel_factory", [SmoothWalkKernel, lambda: MaternWalkKernel(2)], ids=["smooth", "matern2"]
)
def test_coverage_is_calibrated(kernel_factory):
    """Data sets drawn from the anchored prior, predicted with the true hyperparameters (one batch model).

    The design asks for 200 data sets; 1000 cost little batched and make the band [0.92, 0.98] four
    standard errors wide (sqrt(0.95 * 0.05 / 1000) = 0.007) instead of two, so the check cannot fail by
    chance.
    """
    datasets, n, noise = 1000, 50, 0.01
    generator = torch.Generator().manual_seed(13)
    x = torch.rand(datasets, n, 1, generator=generator) * 10
    interior = torch.linspace(0.5, 9.5, 10)
    beyond = 10.0 + torch.tensor([1.0, 10.0, 50.0])
    test_x = torch.cat([interior, beyond]).view(1, -1, 1).expand(datasets, -1, -1)
    kernel = scaled(kernel_factory(), 1.0, 1.0)
    with torch.no_grad():
        everything = torch.cat([x, test_x, torch.zeros(datasets, 1, 1)], dim=-2)  # anchor x0 = 0, last
        gram = kernel(everything).to_dense()
        cross, level = gram[..., :-1, -1:], gram[..., -1:, -1:]
        anchored = gram[..., :-1, :-1] - cross - cross.mT + level  # Cov[f(x) - f(0)]
        jitter = 1e-9 * anchored.diagonal(dim1=-2, dim2=-1).mean(-1).view(-1, 1, 1)
        root = torch.linalg.cholesky(anchored + jitter * torch.eye(anchored.shape[-1]))
        f = (root @ torch.randn(datasets, anchored.shape[-1], 1, generator=generator)).squeeze(-1)
        y = f[:, :n] + math.sqrt(noise) * torch.randn(datasets, n, generator=generator)
    model = WalkGP(x, y, make_likelihood(noise), kernel)
    model.eval()
    with torch.no_grad():
        output = model(test_x)
        covered = ((f[:, n:] - output.mean).abs() <= 1.959964 * output.stddev).double()
    interior_coverage = covered[:, : len(interior)].mean().item()
    assert 0.92 <= interior_coverage <= 0.98
    for column, distance in enumerate([1, 10, 50], start=len(interior)):
        coverage = covered[:, column].mean().item()
        assert 0.92 <= coverage <= 0.98, f"coverage {coverage:.3f} at {distance} lengthscales beyond the data"


# ----------------------------------------------------------------------------------------------------------
# Prior samples: exact increments


def test_prior_samples_have_the_increments_law():
    model = WalkGP(None, None, make_likelihood(NOISE), KERNELS["matern1"]())
    model.eval()
    points = torch.tensor([0.0, 0.5, 3.0, 10.0])
    with torch.no_grad(), gpytorch.settings.prior_mode(True):
        samples = model(points).sample(torch.Size([8000]))
    increments = samples[:, 1:] - samples[:, :1]
    kernel = model.covar_module
    with torch.no_grad():
        gram = kernel(points.unsqueeze(-1)).to_dense()
    expected = gram[1:, 1:] - gram[1:, :1] - gram[:1, 1:] + gram[0, 0]  # Cov[f(x_i) - f(x_0)]
    empirical = torch.cov(increments.T)
    # the sample covariance of 8000 draws has relative standard error sqrt(2/8000) = 1.6%: allow 5 of them
    assert (
        (empirical - expected).abs() / expected.diagonal().sqrt().outer(expected.diagonal().sqrt())
    ).max() < 0.08


# ----------------------------------------------------------------------------------------------------------
# Caches, saving and loading


def test_caches_are_cleared_on_train_and_set_train_data():
    x, y = walk_data(40)
    test_x = torch.linspace(0, 12, 5)
    model = WalkGP(x, y, make_likelihood(NOISE), KERNELS["smooth"]())
    mean, _ = posterior(model, test_x)
    assert model.prediction_strategy is not None
    model.train()
    assert model.prediction_strategy is None
    model.set_train_data(x, y + 1.0)
    shifted_mean, _ = posterior(model, test_x)
    torch.testing.assert_close(shifted_mean, mean + 1.0)
    model.set_train_data(x, y + 2.0)
    assert model.prediction_strategy is None


def test_state_dict_round_trip_and_deepcopy():
    x, y = walk_data(40)
    test_x = torch.linspace(-3, 13, 7)
    model = WalkGP(x, y, make_likelihood(NOISE), KERNELS["walk+periodic"]())
    mean, covariance = posterior(model, test_x)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = WalkGP(x, y, make_likelihood(0.5), KERNELS["walk+periodic"]())
    fresh.covar_module.kernels[0].outputscale = 9.0
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    loaded_mean, loaded_covariance = posterior(fresh, test_x)
    assert torch.equal(loaded_mean, mean) and torch.equal(loaded_covariance, covariance)
    clone_mean, _ = posterior(copy.deepcopy(model), test_x)
    assert torch.equal(clone_mean, mean)


# ----------------------------------------------------------------------------------------------------------
# Bad input and unsupported features


def test_product_with_a_walk_factor_is_refused():
    x, y = walk_data(20)
    kernel = scaled(SmoothWalkKernel()) * gpytorch.kernels.PeriodicKernel()
    model = WalkGP(x, y, make_likelihood(NOISE), kernel)
    with pytest.raises(ValueError, match="multiplies a walk kernel"):
        model(x)


def test_products_of_positive_definite_kernels_are_fine():
    x, y = walk_data(20)
    product = gpytorch.kernels.ScaleKernel(gpytorch.kernels.PeriodicKernel() * gpytorch.kernels.RBFKernel())
    model = WalkGP(x, y, make_likelihood(NOISE), scaled(SmoothWalkKernel()) + product)
    mean, _ = posterior(model, torch.linspace(0, 1, 3))
    assert torch.isfinite(mean).all()


def test_unsupported_features_raise_not_implemented():
    x, y = walk_data(20)
    grid = gpytorch.kernels.GridInterpolationKernel(SmoothWalkKernel(), grid_size=50, num_dims=1)
    with pytest.raises(NotImplementedError, match="KISS-GP"):
        WalkGP(x, y, make_likelihood(NOISE), grid)(x)
    model = WalkGP(x, y, make_likelihood(NOISE), KERNELS["smooth"]())
    posterior(model, torch.linspace(0, 1, 3))
    with pytest.raises(NotImplementedError, match="fantasy"):
        model.get_fantasy_model(torch.tensor([[1.0]]), torch.tensor([1.0]))

    class Multitask(ImproperExactGP):
        def __init__(self):
            super().__init__(x, torch.stack([y, y], -1).T[0], gpytorch.likelihoods.GaussianLikelihood())
            self.covar_module = gpytorch.kernels.MultitaskKernel(SmoothWalkKernel(), num_tasks=2)

        def forward(self, inputs):
            return gpytorch.distributions.MultitaskMultivariateNormal(
                torch.zeros(inputs.shape[-2], 2), self.covar_module(inputs)
            )

    with pytest.raises(NotImplementedError, match="multitask"):
        Multitask()(x)


def test_constant_mean_warns_once_and_has_zero_gradient():
    x, y = walk_data(30)
    model = WalkGP(x, y, make_likelihood(NOISE), KERNELS["smooth"](), mean=gpytorch.means.ConstantMean())
    mll = ImproperMarginalLogLikelihood(model.likelihood, model)
    model.train()
    with pytest.warns(RedundantMeanWarning, match="ZeroMean"):
        loss = -mll(model(x), y)
    loss.backward()
    assert abs(model.mean_module.raw_constant.grad.item()) < 1e-10
    mll(model(x), y)  # no second warning (warnings are errors in this suite)


@pytest.mark.parametrize(
    ("inputs", "targets", "message"),
    [
        (torch.tensor([0.0, math.inf, 2.0]), torch.zeros(3), "train_inputs"),
        (torch.tensor([0.0, math.nan, 2.0]), torch.zeros(3), "train_inputs"),
        (torch.tensor([0.0, 1.0, 2.0]), torch.tensor([0.0, math.inf, 1.0]), "train_targets"),
        (torch.tensor([0.0, 1.0, 2.0]), torch.zeros(4), "train_targets"),
        (torch.zeros(3, 2), torch.zeros(2), "train_targets"),
    ],
)
def test_bad_training_data_is_a_clear_error(inputs, targets, message):
    with pytest.raises(ValueError, match=message):
        WalkGP(inputs, targets, make_likelihood(NOISE), KERNELS["smooth"]())


def test_set_train_data_is_validated():
    x, y = walk_data(10)
    model = WalkGP(x, y, make_likelihood(NOISE), KERNELS["smooth"]())
    with pytest.raises(ValueError, match="train_targets"):
        model.set_train_data(targets=y.masked_fill(y > 0, math.inf))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"representative": "exact"}, "representative"),
        ({"representative": "shift", "shift": -1.0}, "shift"),
        ({"representative": "shift", "shift": math.inf}, "shift"),
        ({"shift": 2.0}, "shift"),
        ({"representative": "shift", "anchor": torch.zeros(1, 1)}, "anchor"),
        ({"anchor": torch.tensor([[math.nan]])}, "anchor"),
        ({"anchor": torch.zeros(2, 1)}, "anchor"),
    ],
)
def test_bad_options_are_clear_errors(options, message):
    x, y = walk_data(10)
    with pytest.raises(ValueError, match=message):
        WalkGP(x, y, make_likelihood(NOISE), KERNELS["smooth"](), **options)


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device here: this checks placement on a GPU, which CPU-only CI cannot run",
)
def test_cuda_matches_cpu():
    x, y = walk_data(50)
    test_x = torch.linspace(-5.0, 15.0, 11)
    model = WalkGP(x, y, make_likelihood(NOISE), KERNELS["walk+periodic"]())
    mean, covariance = posterior(model, test_x)
    model.train()
    model = model.cuda()
    model.set_train_data(x.cuda(), y.cuda(), strict=False)
    cuda_mean, cuda_covariance = posterior(model, test_x.cuda())
    assert relative_error(cuda_mean.cpu(), mean) < 1e-9
    assert relative_error(cuda_covariance.cpu(), covariance) < 1e-9
    model.train()
    value = ImproperMarginalLogLikelihood(model.likelihood, model)(model(x.cuda()), y.cuda())
    assert torch.isfinite(value)
