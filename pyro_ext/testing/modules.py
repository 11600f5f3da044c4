"""Checks every trainable pyro_ext object must pass, whatever part it belongs to."""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch

__all__ = ["ModuleTestMixin", "assert_trees_close", "to_dtype_device"]


def to_dtype_device(
    tree: Any, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> Any:
    """Move every floating-point tensor in a nested tuple/list/dict to ``dtype`` and ``device``."""
    if isinstance(tree, torch.Tensor):
        target_dtype = dtype if (dtype is not None and tree.is_floating_point()) else tree.dtype
        return tree.to(device=device if device is not None else tree.device, dtype=target_dtype)
    if isinstance(tree, dict):
        return {key: to_dtype_device(value, dtype, device) for key, value in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(to_dtype_device(value, dtype, device) for value in tree)
    return tree


def assert_trees_close(actual: Any, expected: Any, *, rtol: float = 0.0, atol: float = 0.0) -> None:
    """Assert two nested structures of tensors are equal up to the given tolerances."""
    if isinstance(expected, torch.Tensor):
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
    elif isinstance(expected, dict):
        assert set(actual) == set(expected)
        for key in expected:
            assert_trees_close(actual[key], expected[key], rtol=rtol, atol=atol)
    elif isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_trees_close(a, e, rtol=rtol, atol=atol)
    else:
        assert actual == expected


class ModuleTestMixin:
    """Mix into a pytest test class for any :class:`torch.nn.Module` pyro_ext exposes.

    Subclasses implement :meth:`make_module` (a fresh module with *randomised* parameters, so that
    a round trip that forgets a parameter cannot pass by accident), :meth:`make_inputs` and
    :meth:`evaluate` (a deterministic function of the module and inputs returning a tensor or a
    nested structure of tensors).
    """

    #: tolerance of the float32 run against the float64 run, relative; float32 has eps ~ 1.2e-7,
    #: and a few hundred roundings in a typical forward pass stay well inside 1e-4.
    float32_rtol: float = 1e-4

    def make_module(self) -> torch.nn.Module:
        raise NotImplementedError

    def make_inputs(self) -> Any:
        raise NotImplementedError

    def evaluate(self, module: torch.nn.Module, inputs: Any) -> Any:
        raise NotImplementedError

    def test_state_dict_round_trip(self) -> None:
        module = self.make_module()
        inputs = self.make_inputs()
        expected = self.evaluate(module, inputs)
        buffer = io.BytesIO()
        torch.save(module.state_dict(), buffer)
        buffer.seek(0)
        torch.manual_seed(12345)  # a fresh module gets different random parameters
        fresh = self.make_module()
        fresh.load_state_dict(torch.load(buffer, weights_only=True))
        assert_trees_close(self.evaluate(fresh, inputs), expected)

    def test_deepcopy_is_independent(self) -> None:
        module = self.make_module()
        inputs = self.make_inputs()
        clone = copy.deepcopy(module)
        assert_trees_close(self.evaluate(clone, inputs), self.evaluate(module, inputs))
        for parameter in clone.parameters():
            with torch.no_grad():
                parameter.add_(1.0)
        for (name, original), (_, copied) in zip(module.named_parameters(), clone.named_parameters()):
            assert not torch.equal(original, copied), f"parameter {name} is shared between copies"

    def test_float32_matches_float64(self) -> None:
        module = self.make_module().double()
        inputs = to_dtype_device(self.make_inputs(), torch.float64)
        expected = self.evaluate(module, inputs)
        actual = self.evaluate(module.float(), to_dtype_device(inputs, torch.float32))
        assert_trees_close(
            to_dtype_device(actual, torch.float64),
            expected,
            rtol=self.float32_rtol,
            atol=self.float32_rtol,
        )

    @pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="no CUDA device here: this checks placement on a GPU, which CPU-only CI cannot run",
    )
    def test_cuda_matches_cpu(self) -> None:
        module = self.make_module()
        inputs = self.make_inputs()
        expected = self.evaluate(module, inputs)
        actual = self.evaluate(module.cuda(), to_dtype_device(inputs, device="cuda"))
        assert_trees_close(to_dtype_device(actual, device="cpu"), expected, rtol=1e-6, atol=1e-8)
