"""Argument checks shared by the diffusion modules (private).

Checks that need a Python ``bool`` of a tensor (``(t < 0).any()``) cannot run under
:func:`torch.func.vmap`; they are skipped there, so that scores stay usable inside ``vmap(jacrev(...))``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["check_finite", "check_vector", "checked_times", "times_checked", "under_functorch"]

_STATE = threading.local()


@contextlib.contextmanager
def checked_times() -> Iterator[None]:
    """Within this block, times were already range-checked: schedules skip their repeated checks.

    Energies check ``t`` once on entry and then call several schedule methods on it; each check costs
    a device synchronisation, and in MCMC the energy is called thousands of times.
    """
    depth = getattr(_STATE, "depth", 0)
    _STATE.depth = depth + 1
    try:
        yield
    finally:
        _STATE.depth = depth


def times_checked() -> bool:
    """True inside :func:`checked_times`."""
    return getattr(_STATE, "depth", 0) > 0


def under_functorch(*tensors: Tensor) -> bool:
    """True if any tensor is wrapped by a :mod:`torch.func` transform (``vmap``, ``grad``, ``jacrev``)."""
    return any(
        isinstance(tensor, Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(tensor)
        for tensor in tensors
    )


def check_finite(tensor: Tensor, name: str) -> None:
    """Raise a ``ValueError`` naming ``name`` if ``tensor`` holds a NaN or an infinity."""
    if under_functorch(tensor):
        return
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{name} must be finite; it holds {bad} non-finite value(s) (NaN or inf)")


def check_vector(x: object, dim: int, name: str = "x") -> Tensor:
    """Check that ``x`` is a floating tensor whose last dimension is ``dim``; return it."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [..., {dim}]; got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got dtype {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != dim:
        raise ValueError(
            f"{name} must have shape [..., {dim}] (last dimension = data dimension); got {tuple(x.shape)}"
        )
    return x
