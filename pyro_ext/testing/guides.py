"""Checks every Pyro guide pyro_ext exposes must pass (``HybridGuide`` now, ``AutoEMF`` later).

Subclass :class:`GuideTestMixin` in a pytest class and implement :meth:`~GuideTestMixin.make_model`,
:meth:`~GuideTestMixin.make_guide` and :meth:`~GuideTestMixin.model_args`; the mixin then checks that
an SVI step runs and changes the guide's parameters, that ``Predictive`` (sequential and vectorised)
returns every latent site with the right shape, that ``state_dict`` round-trips (same draws under the
same seed), that ``quantiles`` are monotone and ``median`` equals the 0.5 quantile, float32, and CUDA
when available.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO

__all__ = ["GuideTestMixin"]


class GuideTestMixin:
    """Mix into a pytest test class for a Pyro guide (an ``AutoGuide``-like ``PyroModule``).

    Required hooks:

    - :meth:`make_model` -- the Pyro model;
    - :meth:`make_guide` -- a guide for it, ready for SVI (e.g. with any pre-training done);
    - :meth:`model_args` -- ``(args, kwargs)`` for model, guide and ``Predictive``.

    Optional hooks: :meth:`make_elbo` (default ``Trace_ELBO()``), :meth:`prepare_for_loading` (what a
    fresh guide needs before ``load_state_dict``; default: one call of the guide), :attr:`num_svi_steps`.
    Monte Carlo queries are compared under equal seeds, so ``median``/``quantiles`` may be sampled.
    """

    num_svi_steps: int = 3
    num_predictive_samples: int = 5
    quantile_levels: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9)

    def make_model(self) -> Callable:
        raise NotImplementedError

    def make_guide(self, model: Callable) -> Any:
        raise NotImplementedError

    def model_args(self) -> tuple[tuple, dict]:
        return (), {}

    def make_elbo(self) -> Any:
        return Trace_ELBO()

    def prepare_for_loading(self, guide: Any) -> None:
        """Make a fresh guide ready for ``load_state_dict`` (default: run it once)."""
        args, kwargs = self.model_args()
        with poutine.block(), torch.no_grad():
            guide(*args, **kwargs)

    # ------------------------------------------------------------------------------------- helpers
    def _latent_shapes(self, model: Callable) -> dict[str, torch.Size]:
        args, kwargs = self.model_args()
        with poutine.block():
            trace = poutine.trace(model).get_trace(*args, **kwargs)
        return {
            name: site["value"].shape
            for name, site in trace.nodes.items()
            if site["type"] == "sample"
            and not site["is_observed"]
            and type(site["fn"]).__name__ != "_Subsample"
        }

    def _trainable(self) -> tuple[Callable, Any]:
        model = self.make_model()
        guide = self.make_guide(model)
        return model, guide

    # --------------------------------------------------------------------------------------- checks
    def test_svi_step_runs(self) -> None:
        model, guide = self._trainable()
        args, kwargs = self.model_args()
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), self.make_elbo())
        losses = [svi.step(*args, **kwargs) for _ in range(self.num_svi_steps)]
        assert all(math.isfinite(loss) for loss in losses), losses
        params = dict(pyro.get_param_store().items())
        assert params, "the SVI steps registered no parameters"
        before = {name: value.detach().clone() for name, value in params.items()}
        svi.step(*args, **kwargs)
        changed = [
            name for name, value in pyro.get_param_store().items() if not torch.equal(value, before[name])
        ]
        assert changed, "an SVI step changed no parameter"

    @pytest.mark.parametrize("parallel", [False, True])
    def test_predictive_shapes(self, parallel: bool) -> None:
        model, guide = self._trainable()
        args, kwargs = self.model_args()
        shapes = self._latent_shapes(model)
        num = self.num_predictive_samples
        samples = Predictive(model, guide=guide, num_samples=num, parallel=parallel)(*args, **kwargs)
        for name, shape in shapes.items():
            assert name in samples, f"Predictive returned no {name!r}"
            value = samples[name]
            # Predictive pads sites outside plates with singleton dims up to the model's plate nesting
            assert value.shape[0] == num and value.numel() == num * math.prod(shape), (
                name,
                value.shape,
                shape,
            )
            assert torch.isfinite(value.double()).all(), name

    def test_state_dict_round_trip(self) -> None:
        model, guide = self._trainable()
        args, kwargs = self.model_args()
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), self.make_elbo())
        for _ in range(self.num_svi_steps):
            svi.step(*args, **kwargs)
        torch.manual_seed(0)
        expected = guide.median(*args, **kwargs)
        buffer = io.BytesIO()
        torch.save(guide.state_dict(), buffer)
        buffer.seek(0)
        pyro.clear_param_store()  # the param store would otherwise hand the old tensors to the new guide
        torch.manual_seed(12345)
        fresh = self.make_guide(self.make_model())
        self.prepare_for_loading(fresh)
        fresh.load_state_dict(torch.load(buffer, weights_only=True))
        torch.manual_seed(0)
        actual = fresh.median(*args, **kwargs)
        assert set(actual) == set(expected)
        for name in expected:
            torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0)

    def test_quantiles_monotone(self) -> None:
        model, guide = self._trainable()
        args, kwargs = self.model_args()
        quantiles = guide.quantiles(list(self.quantile_levels), *args, **kwargs)
        shapes = self._latent_shapes(model)
        assert set(shapes) <= set(quantiles)
        for name, value in quantiles.items():
            assert value.shape[0] == len(self.quantile_levels)
            assert (value[1:] >= value[:-1]).all(), f"quantiles of {name!r} decrease"

    def test_median_is_half_quantile(self) -> None:
        _, guide = self._trainable()
        args, kwargs = self.model_args()
        torch.manual_seed(3)
        median = guide.median(*args, **kwargs)
        torch.manual_seed(3)
        half = guide.quantiles([0.5], *args, **kwargs)
        for name, value in median.items():
            torch.testing.assert_close(value, half[name][0], rtol=0, atol=0)

    def test_float32(self) -> None:
        dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            model, guide = self._trainable()
            args, kwargs = self.model_args()
            svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), self.make_elbo())
            loss = svi.step(*args, **kwargs)
            assert math.isfinite(loss)
            samples = Predictive(model, guide=guide, num_samples=3)(*args, **kwargs)
            for name in self._latent_shapes(model):
                if samples[name].is_floating_point():
                    assert samples[name].dtype == torch.float32, name
        finally:
            torch.set_default_dtype(dtype)

    @pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="no CUDA device here: this checks placement on a GPU, which CPU-only CI cannot run",
    )
    def test_cuda(self) -> None:
        torch.set_default_device("cuda")
        try:
            model, guide = self._trainable()
            args, kwargs = self.model_args()
            svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), self.make_elbo())
            assert math.isfinite(svi.step(*args, **kwargs))
            samples = Predictive(model, guide=guide, num_samples=3)(*args, **kwargs)
            assert all(value.is_cuda for value in samples.values())
        finally:
            torch.set_default_device("cpu")
