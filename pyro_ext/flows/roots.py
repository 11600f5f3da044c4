"""Bracketed, vectorised root finding for monotone elementwise functions, and implicit gradients.

The site bijectors of mixtures (and the gated site maps of the structured layers) invert an increasing
function numerically. :func:`monotone_root` solves ``function(x) = 0`` for every element of a batch at
once by Chandrupatla's method: inverse quadratic interpolation when it is safe, bisection otherwise,
always inside a bracket that contains the root. It runs without gradients; :func:`implicit_step` then
attaches exact first derivatives by the implicit-function theorem, so no gradient flows through the
iterations.

References: Chandrupatla, *A new hybrid quadratic/bisection algorithm for finding the zero of a
nonlinear function without using derivatives*, Advances in Engineering Software 28 (1997);
Silvestri et al., *Embedded-model flows*, arXiv:2110.06021.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch

__all__ = ["expand_bracket", "fixed_root_iterations", "implicit_step", "monotone_root", "tolerance_for"]

_STATE = threading.local()


def default_max_iterations(dtype: torch.dtype) -> int:
    """The iteration cap of the design (P3): 100 in float64, 60 in lower precisions."""
    return 100 if dtype == torch.float64 else 60


def tolerance_for(x: torch.Tensor) -> torch.Tensor:
    """Bracket width at which a root counts as found: :math:`4\\,\\epsilon_{dtype} \\max(1, |x|)`."""
    return 4.0 * torch.finfo(x.dtype).eps * x.abs().clamp(min=1.0)


@contextlib.contextmanager
def fixed_root_iterations(iterations: int | None = None) -> Iterator[None]:
    """Within this context, :func:`monotone_root` runs a fixed number of iterations with no
    data-dependent early exit, as a compiled or traced graph requires. Converged elements stay frozen,
    so the results equal the eager ones.

    :param int iterations: the count; ``None`` uses the dtype's cap (100 in float64, 60 otherwise).

    Example::

        with fixed_root_iterations():
            traced = torch.jit.trace(layer_inverse, (noise,))
    """
    if iterations is not None and iterations < 1:
        raise ValueError(f"iterations must be a positive integer or None; got {iterations}")
    previous = getattr(_STATE, "fixed", False), getattr(_STATE, "iterations", None)
    _STATE.fixed, _STATE.iterations = True, iterations
    try:
        yield
    finally:
        _STATE.fixed, _STATE.iterations = previous


def _capturing() -> bool:
    compiling = getattr(torch.compiler, "is_compiling", lambda: False)()
    return bool(compiling or torch.jit.is_tracing() or getattr(_STATE, "fixed", False))


def monotone_root(
    function: Callable[[torch.Tensor], torch.Tensor],
    lower: torch.Tensor,
    upper: torch.Tensor,
    *,
    tolerance: Callable[[torch.Tensor], torch.Tensor] | float | None = None,
    max_iterations: int | None = None,
    fixed_iterations: int | None = None,
    full_output: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, int, torch.Tensor]:
    r"""Solve ``function(x) = 0`` elementwise for an increasing ``function``, with the root bracketed.

    Chandrupatla's method keeps a bracket :math:`[x_1, x_2]` with residuals of opposite signs and tries
    the point :math:`x_1 + t (x_2 - x_1)`, with :math:`t` from inverse quadratic interpolation when the
    last three points make it safe and :math:`t = 1/2` (bisection) otherwise. As a safeguard beyond the
    original, an element whose bracket has not halved over two iterations is bisected, so the bracket
    shrinks at least geometrically. An element stops when its bracket is narrower than
    ``tolerance(x)`` (default :math:`4\,\epsilon\max(1,|x|)`) or its residual is exactly zero.

    :param callable function: maps a tensor shaped like the bracket to residuals of the same shape,
        increasing elementwise, with no coupling between elements.
    :param torch.Tensor lower: elementwise lower ends, ``function(lower) <= 0``.
    :param torch.Tensor upper: elementwise upper ends, ``function(upper) >= 0`` (broadcast with ``lower``).
        Where rounding puts both ends on one side, the end with the smaller residual is returned.
    :param tolerance: a float (absolute) or a callable ``x -> width``; default :func:`tolerance_for`.
    :param int max_iterations: cap on iterations; default 100 in float64 and 60 otherwise.
    :param int fixed_iterations: run exactly this many iterations with no early exit (for compiled
        graphs); the same happens with the cap as count inside :func:`fixed_root_iterations`, under
        ``torch.compile`` and under ``torch.jit.trace``.
    :param bool full_output: also return the number of iterations run and a boolean tensor of
        converged elements.
    :return: the roots (without gradient; see :func:`implicit_step`), or ``(roots, iterations,
        converged)``.

    Example::

        >>> target = torch.tensor([0.1, 2.0, 30.0])
        >>> monotone_root(lambda x: x**3 - target, torch.zeros(3), torch.full((3,), 4.0))
        tensor([0.4642, 1.2599, 3.1072])
    """
    lower, upper = torch.broadcast_tensors(lower.detach(), upper.detach())
    if not (lower.is_floating_point() and upper.is_floating_point()):
        raise TypeError("lower and upper must be floating-point tensors")
    if max_iterations is None:
        max_iterations = default_max_iterations(lower.dtype)
    if max_iterations < 1:
        raise ValueError(f"max_iterations must be >= 1; got {max_iterations}")
    fixed = fixed_iterations is not None or _capturing()
    if fixed_iterations is None and fixed:
        fixed_iterations = getattr(_STATE, "iterations", None) or max_iterations
    if tolerance is None:
        tolerance_fn = tolerance_for
    elif callable(tolerance):
        tolerance_fn = tolerance
    else:
        width = float(tolerance)
        if not width > 0:
            raise ValueError(f"tolerance must be positive; got {tolerance}")

        def tolerance_fn(x: torch.Tensor, width: float = width) -> torch.Tensor:
            return torch.full_like(x, width)

    with torch.no_grad():
        x1, x2 = lower.clone(), upper.clone()
        f1, f2 = function(x1), function(x2)
        if f1.shape != x1.shape or f2.shape != x2.shape:
            raise ValueError(
                f"function must return residuals shaped like its input {tuple(x1.shape)}; "
                f"got {tuple(f1.shape)}"
            )
        # Ends already on one side (rounding at a degenerate bracket) or exact roots: settle them now.
        same_side = torch.sign(f1) * torch.sign(f2) > 0
        pick_lower = f1.abs() <= f2.abs()
        settled = same_side | (f1 == 0) | (f2 == 0) | (x1 == x2)
        settled_value = torch.where((f1 == 0) | (same_side & pick_lower) | (x1 == x2), x1, x2)
        # The bracket is [x1, x2] (x1 the newest point); x3 is the point dropped last.
        x3, f3 = x2.clone(), f2.clone()
        t = torch.full_like(x1, 0.5)
        done = settled.clone()
        width = (x2 - x1).abs()
        previous_width = width.clone()
        older_width = width.clone()
        iterations = 0
        count = fixed_iterations if fixed else max_iterations
        for _ in range(count):
            if not fixed and bool(done.all()):
                break
            iterations += 1
            x = x1 + t * (x2 - x1)
            f = function(x)
            same = torch.sign(f) == torch.sign(f1)
            new_x3 = torch.where(same, x1, x2)
            new_f3 = torch.where(same, f1, f2)
            new_x2 = torch.where(same, x2, x1)
            new_f2 = torch.where(same, f2, f1)
            keep = done
            x3, f3 = torch.where(keep, x3, new_x3), torch.where(keep, f3, new_f3)
            x2, f2 = torch.where(keep, x2, new_x2), torch.where(keep, f2, new_f2)
            x1, f1 = torch.where(keep, x1, x), torch.where(keep, f1, f)

            best = torch.where(f1.abs() < f2.abs(), x1, x2)
            width = (x2 - x1).abs()
            tol = tolerance_fn(best)
            done = done | (width < tol) | (f1 == 0) | (f2 == 0)

            # Inverse quadratic interpolation through (x1, f1), (x2, f2), (x3, f3) where safe
            # [Chandrupatla 1997, eq. 1 and the validity test of its Fig. 1].
            xi = (x1 - x2) / (x3 - x2)
            phi = (f1 - f2) / (f3 - f2)
            alpha = (x3 - x1) / (x2 - x1)
            quadratic_ok = ((1 - (1 - xi).clamp(min=0).sqrt()) < phi) & (phi < xi.clamp(min=0).sqrt())
            t_quadratic = f1 / (f1 - f2) * f3 / (f3 - f2) - alpha * f1 / (f3 - f1) * f2 / (f2 - f3)
            t_new = torch.where(quadratic_ok & torch.isfinite(t_quadratic), t_quadratic, 0.5)
            # Safeguard: no halving over two iterations -> bisect.
            stalled = width > 0.5 * older_width
            t_new = torch.where(stalled, 0.5, t_new)
            limit = (0.5 * tol / width.clamp(min=torch.finfo(width.dtype).tiny)).clamp(max=0.5)
            t_new = torch.minimum(torch.maximum(t_new, limit), 1 - limit)
            t = torch.where(done, t, t_new)
            older_width, previous_width = previous_width, width

        root = torch.where(f1.abs() < f2.abs(), x1, x2)
        root = torch.where(settled, settled_value, root)
    if full_output:
        return root, iterations, done
    return root


def implicit_step(x0: torch.Tensor, residual: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    r"""Attach implicit-function gradients to a root found without gradients.

    Given a root :math:`x_0` of :math:`r(x, \theta) = 0` and the residual evaluated *differentiably* at
    the detached root, returns a tensor equal to :math:`x_0` whose derivatives are
    :math:`\partial x / \partial\theta = -\partial_\theta r / \partial_x r`:

    .. math::

        x = x_0 - \frac{r(x_0, \theta) - \mathrm{stop}(r(x_0, \theta))}
                        {\mathrm{stop}(\partial_x r(x_0))}.

    :param torch.Tensor x0: the detached root.
    :param torch.Tensor residual: :math:`r(x_0, \theta)`, with a graph to :math:`\theta` (not to ``x0``).
    :param torch.Tensor slope: :math:`\partial_x r` at :math:`x_0` (detached here).
    """
    return x0.detach() - (residual - residual.detach()) / slope.detach()


def expand_bracket(
    function: Callable[[torch.Tensor], torch.Tensor],
    lower: torch.Tensor,
    upper: torch.Tensor,
    *,
    max_expansions: int = 60,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Widen ``[lower, upper]`` elementwise until ``function(lower) <= 0 <= function(upper)``.

    Each end that is on the wrong side (or whose residual is NaN) moves outward by a step that doubles
    every round, starting at ``max(1, upper - lower)``; after ``max_expansions`` rounds the step is
    about :math:`2^{60}` times the initial width. Runs without gradients. ``function`` must be
    increasing, as for :func:`monotone_root`.

    :return: ``(lower, upper)``, the widened bracket.
    """
    with torch.no_grad():
        lower, upper = torch.broadcast_tensors(lower.detach(), upper.detach())
        lower, upper = lower.clone(), upper.clone()
        step = (upper - lower).clamp(min=1.0)
        fixed = _capturing()
        for _ in range(max_expansions):
            move_lower = ~(function(lower) <= 0)
            move_upper = ~(function(upper) >= 0)
            if not fixed and not bool((move_lower | move_upper).any()):
                break
            lower = torch.where(move_lower, lower - step, lower)
            upper = torch.where(move_upper, upper + step, upper)
            step = 2.0 * step
    return lower, upper
