"""Walk kernels: closed forms, integral identities, CPD, GPyTorch kernel contract (design §5, checks 1-5)."""

from __future__ import annotations

import math
import unittest

import gpytorch
import pytest
import torch
from gpytorch.test.base_kernel_test_case import BaseKernelTestCase
from scipy import integrate

from pyro_ext.kernels import MaternWalkKernel, SmoothWalkKernel
from pyro_ext.testing.kernels import ConditionallyPositiveDefiniteKernelTestMixin, cpd_spectrum

SQ3, SQ5 = math.sqrt(3.0), math.sqrt(5.0)

#: the j = 1..3 rows of the design note's table (§2.1), written out independently of the general-j code
TABLE = {
    1: lambda t: t - 1 + torch.exp(-t),
    2: lambda t: (2 * SQ3 * t - 3 + (3 + SQ3 * t) * torch.exp(-SQ3 * t)) / 3,
    3: lambda t: (8 * SQ5 * t - 15 + (15 + 7 * SQ5 * t + 5 * t**2) * torch.exp(-SQ5 * t)) / 15,
}
SLOPES = {1: 1.0, 2: 2 / SQ3, 3: 8 / (3 * SQ5)}


def matern_half_integer(u: torch.Tensor, j: int) -> torch.Tensor:
    """Matern nu = j - 1/2 by Rasmussen & Williams eq. (4.16), independent of the kernel's c_m."""
    p = j - 1
    z = math.sqrt(2 * p + 1) * u
    total = sum(
        math.factorial(p + i) / (math.factorial(i) * math.factorial(p - i)) * (2 * z) ** (p - i)
        for i in range(p + 1)
    )
    return torch.exp(-z) * math.factorial(p) / math.factorial(2 * p) * total


def derivative_covariance(kernel, u: torch.Tensor) -> torch.Tensor:
    """k_1(u), the unit covariance of the walk's derivative."""
    if isinstance(kernel, SmoothWalkKernel):
        return torch.exp(-(u**2) / 2)
    return matern_half_integer(u, kernel.j)


def walk_kernels(max_j: int = 8):
    return [SmoothWalkKernel()] + [MaternWalkKernel(j) for j in range(1, max_j + 1)]


def kernel_id(kernel) -> str:
    return repr(kernel).replace(" ", "")


# ----------------------------------------------------------------------------------------------------
# Check 1: closed forms


@pytest.mark.parametrize("method", ["fast", "reference"])
@pytest.mark.parametrize("j", [1, 2, 3])
def test_general_j_matches_the_table(j, method):
    t = torch.linspace(0.0, 50.0, 2001)
    expected = TABLE[j](t)
    actual = MaternWalkKernel(j).semivariogram(t, method=method)
    # relative to the largest entry (§5): the table itself cancels at small t, the code must not be worse
    assert (actual - expected).abs().max() <= 1e-12 * expected.abs().max()
    assert MaternWalkKernel(j).slope == pytest.approx(SLOPES[j], rel=1e-15)


@pytest.mark.parametrize("j", range(1, 13))
def test_slope_closed_form(j):
    expected = math.sqrt(math.pi) * math.gamma(j) / (math.gamma(j - 0.5) * math.sqrt(2 * j - 1))
    assert MaternWalkKernel(j).slope == pytest.approx(expected, rel=1e-13)


@pytest.mark.parametrize("j", range(1, 13))
def test_fast_path_matches_reference_pointwise(j):
    kernel = MaternWalkKernel(j)
    t = torch.cat([torch.logspace(-6, -1, 61), torch.linspace(0.1, 50.0, 500)])
    reference = kernel.semivariogram(t, method="reference")
    fast64 = kernel.semivariogram(t)
    # pointwise relative, including t in [1e-6, 0.1] where the closed form alone cancels
    assert ((fast64 - reference).abs() / reference).max() <= 1e-12
    fast32 = kernel.semivariogram(t.float()).double()
    assert ((fast32 - reference).abs() / reference).max() <= 2e-6


def test_float32_closed_form_alone_would_fail_at_small_t():
    """The reason the fast path has a Taylor branch (design §2.2): j = 3 at t = 1e-4 in float32."""
    t = torch.tensor([1e-4], dtype=torch.float32)
    naive = TABLE[3](t).double()
    reference = MaternWalkKernel(3).semivariogram(t.double(), method="reference")
    assert ((naive - reference).abs() / reference).item() >= 0.5  # all digits lost (here: it rounds to 0)
    fast = MaternWalkKernel(3).semivariogram(t).double()
    assert ((fast - reference).abs() / reference).item() < 2e-6


@pytest.mark.parametrize("j", [12, 40])
def test_float32_is_finite_and_linear_far_away(j):
    kernel = MaternWalkKernel(j)
    t = torch.tensor([1e-3, 1.0, 100.0, 1e4], dtype=torch.float32)
    value = kernel.semivariogram(t)
    assert torch.isfinite(value).all()
    reference = kernel.semivariogram(t.double(), method="reference")
    assert ((value.double() - reference).abs() / reference).max() <= 2e-6
    assert value[-1].item() == pytest.approx(kernel.slope * 1e4 - 1, rel=1e-6)


# ----------------------------------------------------------------------------------------------------
# Check 2: integral identities


@pytest.mark.parametrize("kernel", walk_kernels(8), ids=kernel_id)
def test_second_derivative_is_the_derivative_covariance(kernel):
    t = torch.tensor([0.05, 0.3, 1.0, 3.0, 10.0])
    h = 1e-3
    second = (kernel.semivariogram(t + h) - 2 * kernel.semivariogram(t) + kernel.semivariogram(t - h)) / h**2
    # central difference: truncation h^2/12 |k_1''| <= 1e-7, rounding 4 eps gamma / h^2 <= 1e-8 here
    torch.testing.assert_close(second, derivative_covariance(kernel, t), atol=1e-6, rtol=0)


@pytest.mark.parametrize("nu", [0.5, 1.5, 2.5])
def test_derivative_covariance_is_gpytorchs_matern(nu):
    """The oracle above agrees with GPyTorch's Matern (and so the kernel's k_1 is GPyTorch's)."""
    u = torch.linspace(0.0, 8.0, 50)
    gpytorch_matern = gpytorch.kernels.MaternKernel(nu=nu)
    gpytorch_matern.lengthscale = 1.0
    with torch.no_grad():
        expected = gpytorch_matern(torch.zeros(1, 1), u.unsqueeze(-1)).to_dense().squeeze(0)
    torch.testing.assert_close(matern_half_integer(u, int(nu + 0.5)), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kernel", walk_kernels(8), ids=kernel_id)
def test_value_and_slope_at_zero(kernel):
    t = torch.zeros(1, requires_grad=True)
    value = kernel.semivariogram(t)
    (gradient,) = torch.autograd.grad(value.sum(), t)
    assert value.item() == 0.0
    assert gradient.item() == 0.0


@pytest.mark.parametrize("kernel", walk_kernels(8), ids=kernel_id)
def test_long_range_asymptote(kernel):
    # gamma_1(t) = s_1 t - 1 + exponentially small terms
    far = 12.0 if isinstance(kernel, SmoothWalkKernel) else 60.0
    value = kernel.semivariogram(torch.tensor([far])).item()
    assert abs(value - (kernel.slope * far - 1.0)) <= 1e-10


@pytest.mark.parametrize("kernel", walk_kernels(8), ids=kernel_id)
def test_quadrature_of_the_defining_integral(kernel):
    for t in (0.2, 1.0, 4.0, 15.0):

        def integrand(u, t=t):
            return (t - u) * derivative_covariance(kernel, torch.tensor(u)).item()

        expected, error = integrate.quad(integrand, 0.0, t, epsabs=1e-13, epsrel=1e-13, limit=200)
        assert error < 1e-11
        assert abs(kernel.semivariogram(torch.tensor(t)).item() - expected) <= 1e-10


# ----------------------------------------------------------------------------------------------------
# Check 3: bad j


@pytest.mark.parametrize("j", [0, -1, 1.5, True, "2", None])
def test_bad_j_is_a_clear_error(j):
    error = ValueError if isinstance(j, int) and not isinstance(j, bool) else TypeError
    with pytest.raises(error, match=r"\bj\b"):
        MaternWalkKernel(j)


def test_bad_method_is_a_clear_error():
    with pytest.raises(ValueError, match="method"):
        MaternWalkKernel(2).semivariogram(torch.ones(2), method="exact")


# ----------------------------------------------------------------------------------------------------
# Check 4 (and 5's extras): CPD in every dimension, diag, pickle, state_dict, float32, CUDA


class TestSmoothWalkCPD(ConditionallyPositiveDefiniteKernelTestMixin):
    def make_kernel(self, **kwargs):
        return SmoothWalkKernel(**kwargs)


class TestMaternWalk1CPD(ConditionallyPositiveDefiniteKernelTestMixin):
    def make_kernel(self, **kwargs):
        return MaternWalkKernel(1, **kwargs)


class TestMaternWalk2CPD(ConditionallyPositiveDefiniteKernelTestMixin):
    def make_kernel(self, **kwargs):
        return MaternWalkKernel(2, **kwargs)


class TestMaternWalk3CPD(ConditionallyPositiveDefiniteKernelTestMixin):
    def make_kernel(self, **kwargs):
        return MaternWalkKernel(3, **kwargs)


class TestMaternWalk5CPD(ConditionallyPositiveDefiniteKernelTestMixin):
    def make_kernel(self, **kwargs):
        return MaternWalkKernel(5, **kwargs)


class TestScaledMaternWalk3CPD(ConditionallyPositiveDefiniteKernelTestMixin):
    cpd_dimensions = (1, 3)  # the outputscale changes nothing the unscaled checks did not cover

    def make_kernel(self, **kwargs):
        return gpytorch.kernels.ScaleKernel(MaternWalkKernel(3, **kwargs))


def test_cube_is_the_negative_control():
    """-|h|^3 is not CPD of order 1 (|h|^beta is conditionally negative definite only for beta <= 2)."""
    generator = torch.Generator().manual_seed(1)
    worst = []
    for dimension in (1, 2, 3, 5, 10):
        points = torch.randn(120, dimension, generator=generator, dtype=torch.float64) * 3.0
        gram = -(torch.cdist(points, points) ** 3)
        contrast, _ = cpd_spectrum(gram)
        worst.append((contrast.min() / gram.abs().max()).item())
    assert max(worst) < -0.1  # the check's threshold is -1e-12; this fails it by eleven orders


def test_sum_with_a_periodic_kernel_stays_cpd():
    kernel = gpytorch.kernels.ScaleKernel(SmoothWalkKernel()) + gpytorch.kernels.ScaleKernel(
        gpytorch.kernels.PeriodicKernel()
    )
    x = torch.linspace(0, 20, 150).unsqueeze(-1)
    with torch.no_grad():
        gram = kernel(x).to_dense()
    contrast, _ = cpd_spectrum(gram)
    assert contrast.min() >= -1e-12 * gram.abs().max()


# ----------------------------------------------------------------------------------------------------
# Check 5: GPyTorch's own kernel test case


class TestSmoothWalkBaseKernel(BaseKernelTestCase, unittest.TestCase):
    def create_kernel_no_ard(self, **kwargs):
        return SmoothWalkKernel(**kwargs)

    def create_kernel_ard(self, num_dims, **kwargs):
        return SmoothWalkKernel(ard_num_dims=num_dims, **kwargs)


class _MaternWalkBaseKernel(BaseKernelTestCase):
    j = 2

    def create_kernel_no_ard(self, **kwargs):
        return MaternWalkKernel(self.j, **kwargs)

    def create_kernel_ard(self, num_dims, **kwargs):
        return MaternWalkKernel(self.j, ard_num_dims=num_dims, **kwargs)


class TestMaternWalk1BaseKernel(_MaternWalkBaseKernel, unittest.TestCase):
    j = 1


class TestMaternWalk2BaseKernel(_MaternWalkBaseKernel, unittest.TestCase):
    j = 2


class TestMaternWalk3BaseKernel(_MaternWalkBaseKernel, unittest.TestCase):
    j = 3


class TestMaternWalk5BaseKernel(_MaternWalkBaseKernel, unittest.TestCase):
    j = 5


class TestScaledMaternWalk3BaseKernel(BaseKernelTestCase, unittest.TestCase):
    def create_kernel_no_ard(self, **kwargs):
        batch_shape = kwargs.get("batch_shape", torch.Size())
        return gpytorch.kernels.ScaleKernel(MaternWalkKernel(3, **kwargs), batch_shape=batch_shape)

    def create_kernel_ard(self, num_dims, **kwargs):
        batch_shape = kwargs.get("batch_shape", torch.Size())
        return gpytorch.kernels.ScaleKernel(
            MaternWalkKernel(3, ard_num_dims=num_dims, **kwargs), batch_shape=batch_shape
        )


# ----------------------------------------------------------------------------------------------------
# The rest of the kernel contract (§2.3)


@pytest.mark.parametrize(
    "kernel", [SmoothWalkKernel(), MaternWalkKernel(1), MaternWalkKernel(3)], ids=kernel_id
)
def test_fast_gram_path_matches_generic_path(kernel):
    """Inputs without gradients take the fused path (lengthscale gradient formed in the forward pass);
    inputs with gradients take plain autograd through the distance. Both must give the same r and dr/dl."""
    kernel.lengthscale = 0.7
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(80, 1, generator=generator) * 20
    weights = torch.randn(80, 80, generator=generator)
    kernel.zero_grad()
    fast = kernel(x).to_dense()
    (fast * weights).sum().backward()
    fast_grad = kernel.raw_lengthscale.grad.clone()
    kernel.zero_grad()
    generic = kernel(x.clone().requires_grad_(True)).to_dense()
    (generic * weights).sum().backward()
    torch.testing.assert_close(fast, generic, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast_grad, kernel.raw_lengthscale.grad, rtol=1e-11, atol=0)


@pytest.mark.parametrize(
    "kernel", [SmoothWalkKernel(), MaternWalkKernel(2), MaternWalkKernel(5)], ids=kernel_id
)
def test_gram_matches_semivariogram_at_tiny_distances(kernel):
    """Near-coincident pairs take the Taylor branch inside the Gram matrix too."""
    kernel.lengthscale = 1.3
    x1 = torch.tensor([[0.0], [1.0], [2.0]])
    gaps = torch.tensor([1e-6, 1e-4, 1e-2, 0.3, 3.0])
    x2 = (x1 + gaps).reshape(-1, 1)[: len(gaps)]
    with torch.no_grad():
        gram = kernel(x1, x2).to_dense()
        expected = -kernel.semivariogram(torch.cdist(x1, x2) / 1.3, method="reference")
    assert ((gram - expected).abs() / expected.abs()).max() <= 1e-9  # cdist rounding of |x1 - x2| at 1e-6


def test_ard_with_equal_lengthscales_is_isotropic():
    x = torch.randn(30, 3)
    iso = MaternWalkKernel(3)
    iso.lengthscale = 0.8
    ard = MaternWalkKernel(3, ard_num_dims=3)
    ard.lengthscale = torch.full((1, 3), 0.8)
    with torch.no_grad():
        torch.testing.assert_close(ard(x).to_dense(), iso(x).to_dense(), rtol=1e-12, atol=1e-12)


def test_ard_scales_each_dimension():
    x = torch.randn(20, 2)
    ard = SmoothWalkKernel(ard_num_dims=2)
    ard.lengthscale = torch.tensor([[0.5, 2.0]])
    iso = SmoothWalkKernel()
    iso.lengthscale = 1.0
    with torch.no_grad():
        torch.testing.assert_close(
            ard(x).to_dense(), iso(x / torch.tensor([0.5, 2.0])).to_dense(), rtol=1e-12, atol=1e-12
        )


def test_priors_and_constraints():
    prior = gpytorch.priors.GammaPrior(2.0, 1.0)
    constraint = gpytorch.constraints.Interval(0.1, 5.0)
    kernel = MaternWalkKernel(2, lengthscale_prior=prior, lengthscale_constraint=constraint)
    names = [name for name, *_ in kernel.named_priors()]
    assert names == ["lengthscale_prior"]
    kernel.raw_lengthscale.data.fill_(50.0)
    assert 0.1 <= kernel.lengthscale.item() <= 5.0
    scaled = gpytorch.kernels.ScaleKernel(
        SmoothWalkKernel(), outputscale_prior=gpytorch.priors.GammaPrior(2, 1)
    )
    assert [name for name, *_ in scaled.named_priors()] == ["outputscale_prior"]


def test_batch_shape_gives_one_lengthscale_per_batch():
    kernel = MaternWalkKernel(2, batch_shape=torch.Size([3]))
    kernel.lengthscale = torch.tensor([0.5, 1.0, 2.0]).view(3, 1, 1)
    x = torch.randn(3, 10, 1)
    with torch.no_grad():
        batched = kernel(x).to_dense()
        for b, scale in enumerate([0.5, 1.0, 2.0]):
            single = MaternWalkKernel(2)
            single.lengthscale = scale
            torch.testing.assert_close(batched[b], single(x[b]).to_dense(), rtol=1e-12, atol=1e-12)


def test_active_dims():
    x = torch.randn(15, 4)
    kernel = SmoothWalkKernel(active_dims=[1, 3])
    with torch.no_grad():
        torch.testing.assert_close(kernel(x).to_dense(), SmoothWalkKernel()(x[:, [1, 3]]).to_dense())


def test_last_dim_is_batch_is_passed_through():
    x = torch.randn(12, 3)
    kernel = MaternWalkKernel(3)
    with pytest.warns(DeprecationWarning, match="last_dim_is_batch"):
        per_dimension = kernel(x, last_dim_is_batch=True).to_dense()
    assert per_dimension.shape == (3, 12, 12)
    with torch.no_grad():
        for d in range(3):
            torch.testing.assert_close(per_dimension[d], kernel(x[:, d : d + 1]).to_dense())


def test_structural_flags_and_repr():
    kernel = MaternWalkKernel(4)
    assert kernel.is_stationary and kernel.has_lengthscale
    assert repr(kernel) == "MaternWalkKernel(j=4)"
    assert SmoothWalkKernel().slope == pytest.approx(math.sqrt(math.pi / 2))


def test_state_dict_keeps_j_structural():
    kernel = MaternWalkKernel(5)
    assert {key.split(".")[0] for key in kernel.state_dict()} == {
        "raw_lengthscale",
        "raw_lengthscale_constraint",
    }
    with pytest.raises(RuntimeError):  # a state_dict cannot silently turn a j=5 kernel into another one
        MaternWalkKernel(5, ard_num_dims=2).load_state_dict(kernel.state_dict())
