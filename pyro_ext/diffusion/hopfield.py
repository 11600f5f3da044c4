r"""Modern Hopfield networks and their identity with the exact diffusion energy.

The modern Hopfield energy and update of Ramsauer et al. are

.. math::

    E_H(\xi; \beta) = -\beta^{-1}\operatorname{logsumexp}_i(\beta y_i^T\xi + b_i) + \tfrac12\|\xi\|^2,
    \qquad \xi \leftarrow \sum_i \operatorname{softmax}_i(\beta Y\xi + b)\, y_i,

with an optional per-memory bias :math:`b` (0 in Ramsauer et al.). With :math:`\xi = x/\alpha`,
:math:`\beta = \alpha^2/\sigma^2` (the SNR) and :math:`b_i = \log\pi_i - \tfrac\beta2\|y_i\|^2`, the
logits are those of :class:`~pyro_ext.diffusion.energy.EmpiricalEnergy`, so (derived form, §2.3 of the
design note):

- for equal-norm patterns and uniform weights, :math:`(\sigma^2/\alpha^2)E = E_H + \text{const}`;
- one Hopfield update with that bias returns exactly the denoiser :math:`m(x) = E[x_0 \mid x_t = x]`,
  i.e. one Tweedie step (a DDIM step from ``t`` to 0).

That diffusion models are such associative memories, with the noise variance as temperature, is the thesis
of Ambrogioni's "In search of dispersed memories".

References: Ramsauer et al., arXiv:2008.02217; Ambrogioni, arXiv:2309.17290.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pyro_ext.diffusion._validation import check_finite, check_vector

__all__ = ["diffusion_bias", "hopfield_energy", "hopfield_update", "retrieve_hopfield"]


def _check(xi: Tensor, patterns: Tensor, beta: float | Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    if not isinstance(patterns, Tensor) or patterns.dim() != 2 or not patterns.is_floating_point():
        raise ValueError("patterns must be a floating tensor of shape [N, d]")
    check_finite(patterns, "patterns")
    xi = check_vector(xi, patterns.shape[1], "xi")
    beta = torch.as_tensor(beta, dtype=xi.dtype, device=xi.device)
    if not bool((beta > 0).all()) or not bool(torch.isfinite(beta).all()):
        raise ValueError(f"beta must be positive and finite; got {beta.tolist()}")
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape[-1:] != patterns.shape[:1]):
        raise ValueError(f"bias must be a tensor of shape [..., {patterns.shape[0]}] (one per pattern)")
    return xi, beta


def _logits(xi: Tensor, patterns: Tensor, beta: Tensor, bias: Tensor | None) -> Tensor:
    logits = beta[..., None] * (xi @ patterns.to(xi.dtype).T)
    return logits if bias is None else logits + bias.to(xi.dtype)


def hopfield_energy(xi: Tensor, patterns: Tensor, beta: float | Tensor, bias: Tensor | None = None) -> Tensor:
    r"""Modern Hopfield energy :math:`-\beta^{-1}\log\sum_i e^{\beta y_i^T\xi + b_i} + \tfrac12\|\xi\|^2`.

    :param Tensor xi: states, ``[..., d]``.
    :param Tensor patterns: stored memories :math:`y_i`, ``[N, d]``.
    :param beta: inverse temperature(s), a float or a tensor broadcasting against ``xi.shape[:-1]``.
    :param Tensor bias: optional per-memory bias :math:`b`, ``[..., N]``.
    :returns: ``[...]``.

    Example::

        >>> patterns = torch.sign(torch.randn(10, 64))
        >>> hopfield_energy(patterns[0], patterns, beta=0.5).shape
        torch.Size([])

    References: Ramsauer et al., arXiv:2008.02217.
    """
    xi, beta = _check(xi, patterns, beta, bias)
    lse = torch.logsumexp(_logits(xi, patterns, beta, bias), -1)
    return -lse / beta + 0.5 * (xi**2).sum(-1)


def hopfield_update(xi: Tensor, patterns: Tensor, beta: float | Tensor, bias: Tensor | None = None) -> Tensor:
    r"""One modern Hopfield update :math:`\xi \leftarrow Y^T\operatorname{softmax}(\beta Y\xi + b)`.

    With ``beta = schedule.snr(t)``, ``xi = x / alpha(t)`` and ``bias = diffusion_bias(...)`` this is
    exactly ``EmpiricalEnergy.denoise(x, t)``.

    :param Tensor xi: states, ``[..., d]``.
    :param Tensor patterns: ``[N, d]``.
    :param beta: inverse temperature(s).
    :param Tensor bias: optional per-memory bias, ``[..., N]``.
    :returns: the updated states, ``[..., d]``.

    Example::

        >>> patterns = torch.sign(torch.randn(10, 64))
        >>> cue = patterns[3] * torch.where(torch.rand(64) < 0.1, -1.0, 1.0)
        >>> bool((hopfield_update(cue, patterns, 1.0).sign() == patterns[3]).all())
        True

    References: Ramsauer et al., arXiv:2008.02217.
    """
    xi, beta = _check(xi, patterns, beta, bias)
    return torch.softmax(_logits(xi, patterns, beta, bias), -1) @ patterns.to(xi.dtype)


def diffusion_bias(patterns: Tensor, beta: float | Tensor, log_weights: Tensor | None = None) -> Tensor:
    r"""The bias :math:`b_i = \log\pi_i - \tfrac\beta2\|y_i\|^2` that makes the Hopfield update the denoiser.

    For equal-norm patterns and uniform weights it is constant and may be dropped.

    :returns: ``[..., N]`` for ``beta`` of shape ``[...]``.
    """
    beta = torch.as_tensor(beta, dtype=patterns.dtype, device=patterns.device)
    bias = -0.5 * beta[..., None] * (patterns**2).sum(-1)
    return bias if log_weights is None else bias + log_weights.to(patterns.dtype)


def retrieve_hopfield(
    cue: Tensor,
    patterns: Tensor,
    beta: float | Tensor,
    *,
    bias: Tensor | None = None,
    max_steps: int = 100,
    tol: float = 1e-10,
) -> Tensor:
    r"""Iterate :func:`hopfield_update` from ``cue`` to a fixed point (associative recall).

    Stops when no state moves by more than ``tol`` (max-norm) or after ``max_steps`` updates.

    :param Tensor cue: ``[..., d]``, e.g. a stored pattern with some bits flipped.
    :param Tensor patterns: ``[N, d]``.
    :param beta: inverse temperature(s); :math:`\beta = 1/\sigma^2(t_0)` matches a diffusion started at
        noise level :math:`\sigma^2(t_0)` (VE).
    :param Tensor bias: optional per-memory bias.
    :param int max_steps: update limit.
    :param float tol: convergence tolerance.
    :returns: the retrieved states, ``[..., d]`` (take ``sign`` for binary memories).

    Example::

        >>> patterns = torch.sign(torch.randn(16, 32))
        >>> flipped = patterns[0] * torch.where(torch.arange(32) < 6, -1.0, 1.0)
        >>> bool((retrieve_hopfield(flipped, patterns, beta=1 / 0.8).sign() == patterns[0]).all())
        True

    References: Ramsauer et al., arXiv:2008.02217; Ambrogioni, arXiv:2309.17290.
    """
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive integer; got {max_steps!r}")
    xi, beta = _check(cue, patterns, beta, bias)
    for _ in range(max_steps):
        new = hopfield_update(xi, patterns, beta, bias)
        moved = (new - xi).abs().max() if new.numel() else torch.zeros(())
        xi = new
        if float(moved) <= tol:
            break
    return xi
