"""Checks every nflows-style transform must pass: invertibility, log-determinants, batching, state.

A transform here follows nflows: ``forward(inputs, context=None)`` maps data to noise and returns
``(outputs, logabsdet)`` with ``logabsdet`` of shape ``[batch]``; ``inverse`` maps noise to data.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable

import pytest
import torch

__all__ = ["TransformTestMixin", "jacobian_slogdet"]


def jacobian_slogdet(
    function: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sign, log|det J|)`` of the autograd Jacobian of ``function`` at each row of ``inputs``.

    :param function: maps one row ``[D]`` to one row ``[D]``.
    :param torch.Tensor inputs: ``[B, D]``.
    :return: two tensors of shape ``[B]``.
    """
    signs, logdets = [], []
    for row in inputs:
        jacobian = torch.autograd.functional.jacobian(function, row.detach().clone())
        sign, logdet = torch.linalg.slogdet(jacobian.reshape(row.numel(), row.numel()))
        signs.append(sign)
        logdets.append(logdet)
    return torch.stack(signs), torch.stack(logdets)


class TransformTestMixin:
    """Mix into a pytest test class for any nflows-style :class:`~nflows.transforms.base.Transform`.

    Subclasses implement :meth:`make_transform` and :meth:`make_inputs` (a ``[B, D]`` batch of
    points in the transform's *data* domain, ``B >= 2``), and may override :meth:`make_noise`
    (points in the noise domain; standard normal by default), :meth:`make_context` (``None`` by
    default, else a ``[B, C]`` context) and :meth:`perturb_parameters`.

    The checks, each a test method:

    - both round trips, ``inverse(forward(x)) = x`` and ``forward(inverse(z)) = z``, with the two
      log-determinants summing to zero;
    - ``logabsdet`` of both directions against ``slogdet`` of the autograd Jacobian, row by row;
    - each row of a batch equals the same row passed alone;
    - shapes, finiteness and finite gradients of every parameter;
    - ``state_dict`` saved and loaded into a fresh transform gives identical outputs; a deep copy
      is independent of the original;
    - float32 agrees with float64; CUDA agrees with CPU (skipped with a reason without CUDA).

    Tolerances are class attributes so that a transform with a numerical inverse (root finding)
    can state its own, with a comment saying where the figure comes from.

    Example::

        class TestMyLayer(TransformTestMixin):
            def make_transform(self):
                return MyLayer(features=3)

            def make_inputs(self):
                return torch.randn(5, 3)
    """

    #: round trips in float64: a closed-form inverse loses a few ulps per operation.
    round_trip_atol: float = 1e-10
    #: log-determinant against autograd's Jacobian: the Jacobian itself is exact to rounding, and the
    #: LU in ``slogdet`` adds O(D * eps * cond) error; 1e-8 covers condition numbers up to ~1e4.
    logabsdet_atol: float = 1e-8
    #: a batched row against the same row alone: same arithmetic, so only reduction-order rounding.
    batch_atol: float = 1e-12
    #: float32 against float64, relative and absolute: float32 eps ~ 1.2e-7 times a few hundred ops.
    float32_rtol: float = 1e-4
    #: rows on which the Jacobian check runs (each costs D backward passes).
    jacobian_rows: int = 3

    # ----------------------------------------------------------------- factories to override

    def make_transform(self) -> torch.nn.Module:
        raise NotImplementedError

    def make_inputs(self) -> torch.Tensor:
        raise NotImplementedError

    def make_noise(self) -> torch.Tensor:
        """Points in the noise domain, shaped like ``forward``'s outputs (standard normal)."""
        transform = self._fresh_transform()
        inputs = self.make_inputs()
        with torch.no_grad():
            outputs, _ = transform(inputs, context=self.make_context())
        return torch.randn_like(outputs)

    def make_context(self) -> torch.Tensor | None:
        return None

    def perturb_parameters(self, transform: torch.nn.Module) -> None:
        """Move every parameter away from its initial value, so that a state round trip that forgets
        a parameter cannot pass because the fresh transform happens to start from the same values."""
        generator = torch.Generator().manual_seed(2024)
        with torch.no_grad():
            for parameter in transform.parameters():
                if parameter.is_floating_point():
                    noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
                    parameter.add_(0.01 * noise.to(parameter.device))

    # ----------------------------------------------------------------- helpers

    def _fresh_transform(self) -> torch.nn.Module:
        # eval(): data-dependent initialisations (ActNorm) and batch statistics would break round trips.
        return self.make_transform().eval()

    @staticmethod
    def _row_context(context: torch.Tensor | None, index: int) -> torch.Tensor | None:
        return None if context is None else context[index : index + 1]

    # ----------------------------------------------------------------- checks

    def test_shapes_and_finite(self) -> None:
        transform = self._fresh_transform()
        inputs = self.make_inputs()
        assert inputs.dim() >= 2 and inputs.shape[0] >= 2, "make_inputs must return a batch of >= 2 rows"
        outputs, logabsdet = transform(inputs, context=self.make_context())
        assert outputs.shape[0] == inputs.shape[0]
        assert logabsdet.shape == (inputs.shape[0],), (
            f"logabsdet must be [batch]; got {tuple(logabsdet.shape)}"
        )
        assert torch.isfinite(outputs).all() and torch.isfinite(logabsdet).all()
        assert outputs.dtype == inputs.dtype and logabsdet.dtype == inputs.dtype

    def test_round_trip_data_to_noise_to_data(self) -> None:
        transform = self._fresh_transform()
        inputs, context = self.make_inputs(), self.make_context()
        with torch.no_grad():
            noise, forward_logabsdet = transform(inputs, context=context)
            recovered, inverse_logabsdet = transform.inverse(noise, context=context)
        torch.testing.assert_close(recovered, inputs, rtol=self.round_trip_atol, atol=self.round_trip_atol)
        torch.testing.assert_close(
            forward_logabsdet + inverse_logabsdet,
            torch.zeros_like(forward_logabsdet),
            rtol=0.0,
            atol=self.round_trip_atol,
        )

    def test_round_trip_noise_to_data_to_noise(self) -> None:
        transform = self._fresh_transform()
        noise, context = self.make_noise(), self.make_context()
        with torch.no_grad():
            data, inverse_logabsdet = transform.inverse(noise, context=context)
            recovered, forward_logabsdet = transform(data, context=context)
        torch.testing.assert_close(recovered, noise, rtol=self.round_trip_atol, atol=self.round_trip_atol)
        torch.testing.assert_close(
            forward_logabsdet + inverse_logabsdet,
            torch.zeros_like(forward_logabsdet),
            rtol=0.0,
            atol=self.round_trip_atol,
        )

    def test_forward_logabsdet_matches_autograd_jacobian(self) -> None:
        transform = self._fresh_transform()
        inputs, context = self.make_inputs()[: self.jacobian_rows], self.make_context()
        context = None if context is None else context[: self.jacobian_rows]
        _, logabsdet = transform(inputs, context=context)
        for index in range(inputs.shape[0]):
            row_context = self._row_context(context, index)

            def function(row: torch.Tensor, row_context=row_context) -> torch.Tensor:
                return transform(row.unsqueeze(0), context=row_context)[0].reshape(-1)

            _, expected = jacobian_slogdet(function, inputs[index : index + 1].reshape(1, -1))
            torch.testing.assert_close(
                logabsdet[index].detach(), expected[0], rtol=0.0, atol=self.logabsdet_atol
            )

    def test_inverse_logabsdet_matches_autograd_jacobian(self) -> None:
        transform = self._fresh_transform()
        noise, context = self.make_noise()[: self.jacobian_rows], self.make_context()
        context = None if context is None else context[: self.jacobian_rows]
        _, logabsdet = transform.inverse(noise, context=context)
        for index in range(noise.shape[0]):
            row_context = self._row_context(context, index)

            def function(row: torch.Tensor, row_context=row_context) -> torch.Tensor:
                return transform.inverse(row.unsqueeze(0), context=row_context)[0].reshape(-1)

            _, expected = jacobian_slogdet(function, noise[index : index + 1].reshape(1, -1))
            torch.testing.assert_close(
                logabsdet[index].detach(), expected[0], rtol=0.0, atol=self.logabsdet_atol
            )

    def test_batch_rows_match_unbatched(self) -> None:
        transform = self._fresh_transform()
        inputs, noise, context = self.make_inputs(), self.make_noise(), self.make_context()
        with torch.no_grad():
            batch_outputs, batch_logabsdet = transform(inputs, context=context)
            batch_data, batch_inverse_logabsdet = transform.inverse(noise, context=context)
            for index in range(inputs.shape[0]):
                row_context = self._row_context(context, index)
                outputs, logabsdet = transform(inputs[index : index + 1], context=row_context)
                tol = dict(rtol=self.batch_atol, atol=self.batch_atol)
                torch.testing.assert_close(outputs[0], batch_outputs[index], **tol)
                torch.testing.assert_close(logabsdet[0], batch_logabsdet[index], **tol)
            for index in range(noise.shape[0]):
                row_context = self._row_context(context, index)
                data, logabsdet = transform.inverse(noise[index : index + 1], context=row_context)
                tol = dict(rtol=self.batch_atol, atol=self.batch_atol)
                torch.testing.assert_close(data[0], batch_data[index], **tol)
                torch.testing.assert_close(logabsdet[0], batch_inverse_logabsdet[index], **tol)

    def test_parameters_get_finite_gradients(self) -> None:
        transform = self._fresh_transform()
        inputs, context = self.make_inputs(), self.make_context()
        outputs, logabsdet = transform(inputs, context=context)
        loss = 0.5 * outputs.pow(2).sum() - logabsdet.sum()  # a flow's negative log-likelihood
        parameters = [p for p in transform.parameters() if p.requires_grad]
        if not parameters:
            return
        gradients = torch.autograd.grad(loss, parameters, allow_unused=True)
        for (name, _), gradient in zip(
            [(n, p) for n, p in transform.named_parameters() if p.requires_grad], gradients
        ):
            if gradient is not None:
                assert torch.isfinite(gradient).all(), f"non-finite gradient for parameter {name}"

    def test_state_dict_round_trip(self) -> None:
        transform = self._fresh_transform()
        self.perturb_parameters(transform)
        inputs, noise, context = self.make_inputs(), self.make_noise(), self.make_context()
        with torch.no_grad():
            expected_forward = transform(inputs, context=context)
            expected_inverse = transform.inverse(noise, context=context)
        buffer = io.BytesIO()
        torch.save(transform.state_dict(), buffer)
        buffer.seek(0)
        torch.manual_seed(12345)  # a fresh transform may get different random parameters
        fresh = self._fresh_transform()
        fresh.load_state_dict(torch.load(buffer, weights_only=True))
        with torch.no_grad():
            actual_forward = fresh(inputs, context=context)
            actual_inverse = fresh.inverse(noise, context=context)
        for actual, expected in zip(actual_forward + actual_inverse, expected_forward + expected_inverse):
            torch.testing.assert_close(actual, expected, rtol=0.0, atol=0.0)

    def test_deepcopy_is_independent(self) -> None:
        transform = self._fresh_transform()
        inputs, context = self.make_inputs(), self.make_context()
        clone = copy.deepcopy(transform)
        with torch.no_grad():
            torch.testing.assert_close(clone(inputs, context=context), transform(inputs, context=context))
            for parameter in clone.parameters():
                parameter.add_(0.5)
        for (name, original), (_, copied) in zip(transform.named_parameters(), clone.named_parameters()):
            assert not torch.equal(original, copied), f"parameter {name} is shared between copies"

    def test_float32_matches_float64(self) -> None:
        transform = self._fresh_transform().double()
        inputs, noise, context = self.make_inputs(), self.make_noise(), self.make_context()
        inputs, noise = inputs.double(), noise.double()
        context64 = None if context is None else context.double()
        with torch.no_grad():
            expected = transform(inputs, context=context64) + transform.inverse(noise, context=context64)
            transform = transform.float()
            context32 = None if context is None else context.float()
            actual = transform(inputs.float(), context=context32) + transform.inverse(
                noise.float(), context=context32
            )
        for value in actual:
            assert value.dtype == torch.float32
        for value, reference in zip(actual, expected):
            torch.testing.assert_close(
                value.double(), reference, rtol=self.float32_rtol, atol=self.float32_rtol
            )

    @pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="no CUDA device here: this checks placement on a GPU, which CPU-only CI cannot run",
    )
    def test_cuda_matches_cpu(self) -> None:
        transform = self._fresh_transform()
        inputs, noise, context = self.make_inputs(), self.make_noise(), self.make_context()
        with torch.no_grad():
            expected = transform(inputs, context=context) + transform.inverse(noise, context=context)
            transform = transform.cuda()
            context_cuda = None if context is None else context.cuda()
            actual = transform(inputs.cuda(), context=context_cuda) + transform.inverse(
                noise.cuda(), context=context_cuda
            )
        for value, reference in zip(actual, expected):
            assert value.is_cuda
            torch.testing.assert_close(value.cpu(), reference, rtol=1e-6, atol=1e-8)
