r"""Checks every conditionally positive definite (improper, "walk") GPyTorch kernel must pass.

A kernel :math:`r` is conditionally positive definite of order 1 (CPD) when
:math:`\sum_{ij} a_i a_j r(x_i, x_j) \ge 0` whenever :math:`\sum_i a_i = 0`. Its Gram matrix :math:`R`
restricted to :math:`\mathbf 1^\perp` is then positive semi-definite: with :math:`Q` an orthonormal basis of
:math:`\mathbf 1^\perp` (:func:`contrast_basis`), :math:`Q^\top R Q \succeq 0`. A walk kernel also has a
zero diagonal, so :math:`\operatorname{tr} R = 0` and :math:`R` has exactly one negative eigenvalue.

GPyTorch's own :class:`gpytorch.test.base_kernel_test_case.BaseKernelTestCase` covers the batch, ARD,
``active_dims`` and indexing contract; this mixin adds what is particular to CPD kernels, plus the
:class:`~pyro_ext.testing.modules.ModuleTestMixin` round trips.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch
from torch import Tensor

from pyro_ext.testing.modules import ModuleTestMixin

__all__ = [
    "ConditionallyPositiveDefiniteKernelTestMixin",
    "bordered_posterior",
    "contrast_basis",
    "contrast_log_likelihood",
    "cpd_spectrum",
    "kriging_posterior",
]


def contrast_basis(
    n: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> Tensor:
    r"""An orthonormal basis :math:`Q \in \mathbb R^{n \times (n-1)}` of :math:`\mathbf 1^\perp`.

    The last :math:`n - 1` columns of the Householder reflector :math:`I - 2 w w^\top / (w^\top w)` with
    :math:`w = \mathbf 1 + \sqrt n\, e_1`: the reflector maps :math:`e_1` to :math:`-\mathbf 1/\sqrt n`, so
    its other columns are orthonormal and orthogonal to :math:`\mathbf 1`.
    """
    if n < 2:
        raise ValueError(f"n must be at least 2 for a contrast basis; got n={n}")
    w = torch.ones(n, dtype=dtype, device=device)
    w[0] += n**0.5
    reflector = torch.eye(n, dtype=dtype, device=device) - 2.0 * torch.outer(w, w) / w.dot(w)
    return reflector[:, 1:]


def cpd_spectrum(gram: Tensor) -> tuple[Tensor, Tensor]:
    r"""Eigenvalues of :math:`Q^\top R Q` (the contrast block) and of :math:`R` itself, both ascending."""
    n = gram.shape[-1]
    basis = contrast_basis(n, dtype=gram.dtype, device=gram.device)
    contrast = basis.mT @ gram @ basis
    symmetrise = lambda matrix: (matrix + matrix.mT) / 2  # noqa: E731 - rounding leaves it slightly asymmetric
    return torch.linalg.eigvalsh(symmetrise(contrast)), torch.linalg.eigvalsh(symmetrise(gram))


class ConditionallyPositiveDefiniteKernelTestMixin(ModuleTestMixin):
    """Mix into a pytest test class for a CPD (walk) kernel.

    Subclasses implement :meth:`make_kernel` (``**kwargs`` are GPyTorch kernel keyword arguments such as
    ``ard_num_dims``); the mixin randomises the lengthscale for the round-trip checks.

    Tolerances: ``M = max|R|``; a CPD kernel's contrast block has eigenvalues >= 0, and rounding moves them by
    about ``n * eps * M``, so ``-1e-12 * M`` bounds them in float64 for the 120-point sets used here.
    """

    #: input dimensions the CPD check runs in, point sets per dimension and points per set
    cpd_dimensions: tuple[int, ...] = (1, 2, 3, 5, 10)
    cpd_sets: int = 5
    cpd_points: int = 120
    #: eigenvalues of the contrast block may dip below zero by rounding only: this many times M
    cpd_rtol: float = 1e-12
    #: R's one negative eigenvalue is clearly negative (about -n mean(gamma)); others are above -this * M
    negative_rtol: float = 1e-10

    def make_kernel(self, **kwargs: Any) -> torch.nn.Module:
        raise NotImplementedError

    # ModuleTestMixin hooks -------------------------------------------------------------------------------
    def make_module(self) -> torch.nn.Module:
        kernel = self.make_kernel(ard_num_dims=2)
        for name, _ in list(kernel.named_parameters()):
            if name.endswith("raw_lengthscale") or name.endswith("raw_outputscale"):
                owner = kernel
                *path, leaf = name.split(".")
                for part in path:
                    owner = getattr(owner, part)
                value = torch.empty_like(getattr(owner, leaf[4:])).uniform_(0.5, 2.0)
                setattr(owner, leaf[4:], value)
        return kernel

    def make_inputs(self) -> Tensor:
        generator = torch.Generator().manual_seed(0)
        return torch.rand(25, 2, generator=generator, dtype=torch.float64) * 6.0

    def evaluate(self, module: torch.nn.Module, inputs: Tensor) -> Tensor:
        return module(inputs).to_dense()

    # CPD checks ------------------------------------------------------------------------------------------
    def _random_ard_kernel(self, dimension: int, generator: torch.Generator) -> torch.nn.Module:
        kernel = self.make_kernel(ard_num_dims=dimension).double()
        lengthscale = torch.empty(1, dimension, dtype=torch.float64).uniform_(0.3, 3.0, generator=generator)
        base = kernel.base_kernel if hasattr(kernel, "base_kernel") else kernel
        base.lengthscale = lengthscale
        return kernel

    def test_conditionally_positive_definite(self) -> None:
        generator = torch.Generator().manual_seed(1)
        for dimension in self.cpd_dimensions:
            for _ in range(self.cpd_sets):
                kernel = self._random_ard_kernel(dimension, generator)
                points = (
                    torch.randn(self.cpd_points, dimension, generator=generator, dtype=torch.float64) * 3.0
                )
                with torch.no_grad():
                    gram = kernel(points).to_dense()
                scale = gram.abs().max()
                contrast, full = cpd_spectrum(gram)
                assert contrast.min() >= -self.cpd_rtol * scale, (
                    f"d={dimension}: contrast block eigenvalue {contrast.min():.3e} < -{self.cpd_rtol} M "
                    f"(M={scale:.3e}): not conditionally positive definite"
                )
                negative = int((full < -self.negative_rtol * scale).sum())
                assert negative == 1, f"d={dimension}: {negative} negative eigenvalues, expected exactly one"

    def test_zero_diagonal_and_diag_mode(self) -> None:
        kernel = self.make_module().double()
        x = self.make_inputs()
        with torch.no_grad():
            full = kernel(x).to_dense()
            assert torch.equal(kernel(x, diag=True), torch.zeros(x.shape[0], dtype=x.dtype))
            torch.testing.assert_close(full.diagonal(), torch.zeros_like(full.diagonal()), atol=1e-12, rtol=0)
            # diag with x1 != x2 is elementwise
            y = x.flip(0)
            torch.testing.assert_close(kernel(x, y, diag=True), kernel(x, y).to_dense().diagonal())

    def test_pickle_round_trip(self) -> None:
        kernel = self.make_module()
        clone = pickle.loads(pickle.dumps(kernel))
        x = self.make_inputs()
        torch.testing.assert_close(self.evaluate(clone, x), self.evaluate(kernel, x))

    def test_gradients_finite_at_coincident_points(self) -> None:
        kernel = self.make_module().double()
        x = self.make_inputs()
        x = torch.cat([x, x[:3]]).requires_grad_(True)  # exact duplicates: zero distances off the diagonal
        gram = kernel(x).to_dense()
        gram.sum().backward()
        assert torch.isfinite(x.grad).all()
        assert all(torch.isfinite(p.grad).all() for p in kernel.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------------------------------
# Dense oracles for improper (flat-level) GP inference, written as directly from the formulas as possible


def kriging_posterior(
    train_train: Tensor, train_test: Tensor, test_test: Tensor, noise: float | Tensor, targets: Tensor
) -> tuple[Tensor, Tensor]:
    r"""The :math:`c \to \infty` posterior in the :math:`K^{-1}` form (ordinary kriging; GPML eq. 2.42).

    :math:`m = \hat\beta + r_*^\top K^{-1}(y - \hat\beta \mathbf 1)`,
    :math:`\Sigma = r_{**} - r_*^\top K^{-1} r_* + (1 - g)(1 - g)^\top / a` with :math:`K = R + \sigma^2 I`
    (indefinite for a walk kernel: only its inverse is used, via a dense LU solve).
    """
    n = train_train.shape[-1]
    matrix = train_train + noise * torch.eye(n, dtype=train_train.dtype)
    ones = torch.ones(n, dtype=train_train.dtype)
    solved = torch.linalg.solve(matrix, torch.cat([targets[:, None], ones[:, None], train_test], dim=1))
    k_inv_y, k_inv_1, k_inv_cross = solved[:, 0], solved[:, 1], solved[:, 2:]
    a = ones @ k_inv_1
    beta = (ones @ k_inv_y) / a
    mean = beta + train_test.mT @ (k_inv_y - beta * k_inv_1)
    g = ones @ k_inv_cross
    covariance = test_test - train_test.mT @ k_inv_cross + torch.outer(1 - g, 1 - g) / a
    return mean, covariance


def bordered_posterior(
    train_train: Tensor, train_test: Tensor, test_test: Tensor, noise: float | Tensor, targets: Tensor
) -> tuple[Tensor, Tensor]:
    r"""The same posterior from the bordered (kriging) system
    :math:`[K\ \mathbf 1; \mathbf 1^\top\ 0] [\lambda; \mu] = [r_*; 1]`: :math:`m = \lambda^\top y`,
    :math:`\Sigma = r_{**} - \lambda^\top r_* - \mu`."""
    n, m = train_test.shape
    dtype = train_train.dtype
    bordered = torch.zeros(n + 1, n + 1, dtype=dtype)
    bordered[:n, :n] = train_train + noise * torch.eye(n, dtype=dtype)
    bordered[:n, n] = 1.0
    bordered[n, :n] = 1.0
    rhs = torch.cat([train_test, torch.ones(1, m, dtype=dtype)], dim=0)
    solution = torch.linalg.solve(bordered, rhs)
    weights, multiplier = solution[:n], solution[n]
    mean = weights.mT @ targets
    covariance = test_test - weights.mT @ train_test - multiplier.unsqueeze(0)
    return mean, (covariance + covariance.mT) / 2


def contrast_log_likelihood(covariance: Tensor, targets: Tensor) -> Tensor:
    r"""The restricted likelihood in contrast form: :math:`\log \mathcal N(Q^\top y; 0, Q^\top K Q) - \tfrac12
    \log n`, with :math:`Q` from :func:`contrast_basis` (:math:`Q^\top K Q` is positive definite)."""
    n = targets.shape[-1]
    basis = contrast_basis(n, dtype=covariance.dtype)
    contrast_covariance = basis.mT @ covariance @ basis
    contrast_covariance = (contrast_covariance + contrast_covariance.mT) / 2
    distribution = torch.distributions.MultivariateNormal(
        torch.zeros(n - 1, dtype=covariance.dtype), contrast_covariance
    )
    return distribution.log_prob(basis.mT @ targets) - 0.5 * torch.log(
        torch.tensor(float(n), dtype=covariance.dtype)
    )
