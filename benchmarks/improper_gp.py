"""Improper GP inference: ImproperExactGP + REML against GPyTorch's ExactGP (design/kernels.md §6).

- **P1**, the price of the improper machinery: ImproperExactGP + ImproperMarginalLogLikelihood against a plain
  ExactGP + ExactMarginalLogLikelihood whose prior covariance is the *same* anchored representative (same
  matrix, same CG iterations). Bar: <= 1.2x.
- **P2**, the price of a walk kernel: the same against ExactGP + ScaleKernel(MaternKernel(nu = j - 1/2)) on
  the same data. Bar: <= 1.2x on the Cholesky path; on the CG path the walk Gram matrix is worse conditioned
  (spectrum ~ 1/omega^2), so the ratio is reported with both models' CG iteration counts.

Timed: one REML forward + backward; the posterior mean and variance at 1000 test points, with and without
``fast_pred_var`` (on the CG path only with it: a dense variance needs 1000 CG solves).

``python -m benchmarks improper_gp [--quick]``; quick mode runs n = 500 only. On a CPU the clock is the
process's CPU time (robust to other load on a shared machine; run with ``OMP_NUM_THREADS=1`` for figures that
compare like with like), on a GPU the wall clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack

import gpytorch
import torch
from linear_operator.operators import MatmulLinearOperator, SumLinearOperator
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.harness import Measurement, time_pair
from pyro_ext.gp import ImproperExactGP, ImproperMarginalLogLikelihood
from pyro_ext.kernels import MaternWalkKernel

__all__ = ["run"]

J = 3  # MaternWalkKernel(j=3) against GPyTorch's Matern nu = 2.5
NOISE = 0.05
TEST_POINTS = 1000


class _WalkModel(ImproperExactGP):
    def __init__(self, x, y, likelihood):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ZeroMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(MaternWalkKernel(J))

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


class _AnchoredExactGP(gpytorch.models.ExactGP):
    """A plain ExactGP whose prior covariance is ImproperExactGP's anchored representative (P1's anchor)."""

    def __init__(self, x, y, likelihood):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ZeroMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(MaternWalkKernel(J))

    def forward(self, x):
        anchor = self.train_inputs[0].mean(dim=-2, keepdim=True)
        n = x.shape[-2]
        covariance = self.covar_module(torch.cat([x, anchor], dim=-2))
        column = covariance[..., :, n:].to_dense().detach()
        half = column[..., n:, :] / 2 - column[..., :n, :]
        ones = torch.ones_like(half)
        low_rank = MatmulLinearOperator(torch.cat([half, ones], -1), torch.cat([ones, half], -1).mT)
        return gpytorch.distributions.MultivariateNormal(
            self.mean_module(x), SumLinearOperator(covariance[..., :n, :n], low_rank)
        )


class _MaternExactGP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.MaternKernel(nu=J - 0.5))

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


class _CountGramProducts(TorchDispatchMode):
    """Counts matrix products with an n x n operand: one per CG (mBCG) iteration."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.count = n, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default):
            if any(
                isinstance(a, torch.Tensor) and a.dim() >= 2 and a.shape[-2:] == (self.n, self.n)
                for a in args
            ):
                self.count += 1
        return func(*args, **(kwargs or {}))


def _data(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A rough walk on [0, n / 20] (20 points per unit lengthscale) and test points beyond both ends."""
    generator = torch.Generator().manual_seed(n)
    span = n / 20
    x = torch.rand(n, generator=generator, dtype=torch.float64) * span
    y = torch.cumsum(torch.randn(n, generator=generator, dtype=torch.float64), 0) * 0.2
    test_x = torch.linspace(-0.1 * span, 1.1 * span, TEST_POINTS, dtype=torch.float64)
    return x.to(dtype), y.to(dtype), test_x.to(dtype)


def _build(model_class, x, y, dtype):
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = model_class(x, y, likelihood).to(dtype)
    likelihood.noise = NOISE
    if isinstance(model, ImproperExactGP):
        mll = ImproperMarginalLogLikelihood(likelihood, model)
    else:
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    return model, mll


def _reml_step(model, mll, x, y) -> Callable[[], None]:
    def step() -> None:
        model.train()
        model.zero_grad()
        (-mll(model(x), y)).backward()

    return step


def _prediction(model, test_x, fast: bool) -> Callable[[], None]:
    def predict() -> None:
        model.train()  # drop the caches: time building them too
        model.eval()
        with torch.no_grad(), ExitStack() as stack:
            if fast:
                stack.enter_context(gpytorch.settings.fast_pred_var())
            output = model(test_x)
            output.mean, output.variance  # noqa: B018 - force both

    return predict


class _Counted:
    """Calls ``fn`` under a product counter (CG path only) and keeps the mean count per call."""

    def __init__(self, fn: Callable[[], None], n: int | None) -> None:
        self.fn, self.n, self.calls, self.products = fn, n, 0, 0

    def __call__(self) -> None:
        if self.n is None:
            self.fn()
            return
        counter = _CountGramProducts(self.n)
        with counter:
            self.fn()
        self.calls += 1
        self.products += counter.count

    @property
    def per_call(self) -> int:
        return round(self.products / max(self.calls, 1))


def run(quick: bool = False) -> list[Measurement]:
    """P1 and P2 at n in {500, 2000} (Cholesky) and {10^4, 2 10^4} (CG); quick: n = 500.

    On a CPU the CG sizes are cut to what fits in minutes: float64 only, with predictions at 10^4 and
    without at 2 10^4 (LOVE's 100 Lanczos products plus the mean solve take minutes per call there).
    2 10^4 needs ~14 GB of memory (a float64 Gram matrix is 3.2 GB, and a kernel evaluation holds four).
    float32 is left out on a CPU: at 2 10^4 points over 1000 lengthscales the walk's anchored Gram matrix
    (entries ~10^3, noise 0.05) is beyond float32 CG, which stops at 1000 iterations unconverged. On a GPU
    both dtypes and the predictions run.
    """
    cholesky_sizes = [500] if quick else [500, 2000]
    measurements: list[Measurement] = []
    # GPyTorch's Matern evaluates exp(-sqrt(5) d) down to float32 denormals far from the diagonal, which x86
    # CPUs process ~100x slower (n = 2000 float32: 17 s instead of 0.4 s). Flushing them to zero measures the
    # algorithms, not that hardware quirk (the walk kernels clamp before exp and never produce denormals).
    flush = torch.set_flush_denormal(True)
    try:
        measurements += _run_sizes(quick, cholesky_sizes)
    finally:
        if flush:
            torch.set_flush_denormal(False)
    return measurements


def _run_sizes(quick: bool, cholesky_sizes: list[int]) -> list[Measurement]:
    measurements: list[Measurement] = []
    for n in cholesky_sizes:
        for dtype in (torch.float64, torch.float32):
            measurements += _compare(n, dtype, path="cholesky", repeats=5 if n <= 500 else 3)
    if quick:
        return measurements
    _compare(300, torch.float64, path="cg", repeats=1)  # compiles linear_operator's scripted CG: not timed
    gpu = torch.cuda.is_available()
    for n, dtypes, predictions in (
        (10_000, (torch.float64, torch.float32) if gpu else (torch.float64,), True),
        (20_000, (torch.float64, torch.float32) if gpu else (torch.float64,), gpu),
    ):
        for dtype in dtypes:
            measurements += _compare(n, dtype, path="cg", repeats=1, predictions=predictions)
    return measurements


def _timer() -> float:
    return time.perf_counter() if torch.cuda.is_available() else time.process_time()


def _compare(
    n: int, dtype: torch.dtype, path: str, repeats: int, predictions: bool = True
) -> list[Measurement]:
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    x, y, test_x = (tensor.to(device) for tensor in _data(n, dtype))
    walk, walk_mll = _build(_WalkModel, x, y, dtype)
    anchored, anchored_mll = _build(_AnchoredExactGP, x, y, dtype)
    matern, matern_mll = _build(_MaternExactGP, x, y, dtype)
    for model in (walk, anchored, matern):
        model.to(device)
        model.covar_module.outputscale = 1.0
        model.covar_module.base_kernel.lengthscale = 1.0
    settings = ExitStack()
    if path == "cholesky":
        settings.enter_context(gpytorch.settings.max_cholesky_size(10**9))
    else:
        settings.enter_context(gpytorch.settings.max_cholesky_size(0))
    tag = f"n={n} {str(dtype).replace('torch.', '')} {path}"
    count = n if path == "cg" else None  # on the CG path, count the n x n products (= CG iterations)
    warmup = 1 if path == "cholesky" else 0
    results = []
    with settings:
        tasks = {
            "reml fwd+bwd": {
                name: _reml_step(model, mll, x, y)
                for name, model, mll in (
                    ("walk", walk, walk_mll),
                    ("anchored", anchored, anchored_mll),
                    ("matern", matern, matern_mll),
                )
            }
        }
        for fast in ((False, True) if path == "cholesky" else (True,)) if predictions else ():
            label = "predict fast_pred_var" if fast else "predict dense var"
            tasks[label] = {
                name: _prediction(model, test_x, fast)
                for name, model in (("walk", walk), ("anchored", anchored), ("matern", matern))
            }
        for label, functions in tasks.items():
            counted = {name: _Counted(fn, count) for name, fn in functions.items()}
            pairs = [("P1", "anchored"), ("P2", "matern")]
            timed = [
                (
                    problem,
                    time_pair(
                        f"{problem} {label} {tag}",
                        counted["walk"],
                        counted[anchor],
                        repeats=repeats,
                        warmup=warmup,
                        timer=_timer,
                        info={"path": path},
                    ),
                )
                for problem, anchor in pairs
            ]
            for problem, measurement in timed:
                if count is not None:
                    anchor = dict(pairs)[problem]
                    measurement.info |= {
                        "cg_ours": counted["walk"].per_call,
                        "cg_anchor": counted[anchor].per_call,
                    }
                results.append(measurement)
    for m in results:
        print(
            f"  {m.name}: ours {1e3 * m.ours_s:.1f} ms, anchor {1e3 * m.anchor_s:.1f} ms, "
            f"ratio {m.ratio:.3f} {m.info}",
            flush=True,
        )
    return results
