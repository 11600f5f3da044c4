r"""The exact energy of a diffused empirical distribution (a modern Hopfield energy), streamed for large N.

Patterns :math:`y_1..y_N` with weights :math:`\pi_i` diffuse to
:math:`p_t(x) = \sum_i \pi_i\, \mathcal N(x; \alpha y_i, \sigma^2 I)`. With the logits

.. math::

    \ell_i = \log\pi_i + \frac{\alpha}{\sigma^2} x\cdot y_i - \frac{\alpha^2}{2\sigma^2}\|y_i\|^2,

the energy, posterior weights, denoiser, score and score Jacobian are (the derived forms of the design
note, §2.1)

.. math::

    E = \frac{\|x\|^2}{2\sigma^2} - \operatorname{logsumexp}_i \ell_i + \frac d2 \log(2\pi\sigma^2), \quad
    w = \operatorname{softmax}\ell, \quad m = \sum_i w_i y_i, \quad s = \frac{\alpha m - x}{\sigma^2}, \quad
    J = -\frac{I}{\sigma^2} + \frac{\alpha^2}{\sigma^4}\operatorname{Cov}_w[y].
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from pyro_ext.diffusion._validation import check_finite, under_functorch
from pyro_ext.diffusion.energy.base import Energy, sample_shape_of
from pyro_ext.diffusion.schedules import Schedule, TimeLike

__all__ = ["EmpiricalEnergy"]

#: rows whose posterior support (w_i > threshold * max w) holds at most this many patterns take the
#: sparse (gathered, centred) Jacobian route in ``route="auto"``.
SPARSE_SUPPORT_MAX = 64
#: refine the top logits of a row when the estimated absolute logit error exceeds this.
REFINE_TOLERANCE = 1e-3


@dataclass
class _Stats:
    """Per-row results of one streamed evaluation (rows flattened to ``[B]``)."""

    lse: Tensor  # logsumexp of the direct logits l'_i = log pi_i - |x - alpha y_i|^2 / (2 sigma^2)
    quad: Tensor  # |x|^2 / (2 sigma^2): expanded logit = direct logit + quad
    max_logit: Tensor  # max expanded logit (as streamed)
    mean: Tensor | None  # m = E[x0 | x]
    top_index: Tensor | None  # [B, k] indices of the largest logits, descending
    top_logit: Tensor | None  # [B, k] their direct logits (recomputed directly in refined rows)
    total: Tensor  # streamed sum of exp(expanded logit - max_logit)
    weighted: Tensor | None  # streamed sum of exp(expanded logit - max_logit) * y_i
    probs: Tensor | None = None  # [B, N] exp(expanded logit - max_logit) when all patterns fit one chunk


def _support_threshold(dtype: torch.dtype) -> float:
    return 1e-8 if dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-16


def _triu_indices(d: int, device: torch.device) -> tuple[Tensor, Tensor]:
    rows, cols = torch.triu_indices(d, d, device=device)
    return rows, cols


def _packed_positions(d: int, device: torch.device) -> Tensor:
    """For each entry (i, j) of a d x d matrix, row-major, its index in the packed upper triangle."""
    rows, cols = _triu_indices(d, device)
    positions = torch.empty(d, d, dtype=torch.long, device=device)
    index = torch.arange(rows.numel(), device=device)
    positions[rows, cols] = index
    positions[cols, rows] = index
    return positions.flatten()


class EmpiricalEnergy(Energy):
    r"""Exact energy of the diffused empirical distribution of ``patterns`` under ``schedule``.

    Evaluation streams the patterns in chunks whose ``B x chunk`` logits fit ``memory_budget`` bytes and
    combines them by a running log-sum-exp, so that the cost is two GEMMs (``X Y^T`` for the logits,
    ``P Y`` for the mean) plus :math:`O(BN)` elementwise work, at any ``N``. Probabilities below
    ``tiny * e^10`` are clamped there (the *subnormal guard*: subnormal arithmetic is ~20x slower on CPU;
    the bias this adds is below ``N * 1e-34`` relative in float32). The logits' absolute error from the
    expanded form is about :math:`u(\alpha\|x\|\|y\|_{max} + \tfrac12\alpha^2\|y\|^2_{max})/\sigma^2`; rows
    where it exceeds ``1e-3`` get their top ``refine_topk`` logits recomputed directly as
    :math:`\log\pi_i - \|x - \alpha y_i\|^2/(2\sigma^2)`, and their energy is assembled without the
    cancelling term :math:`\|x\|^2/(2\sigma^2)`.

    :meth:`energy` is differentiable in ``x`` (the gradient is the closed-form score, computed in the same
    pass); under :mod:`torch.func` transforms a plain out-of-place path is used so that ``vmap(jacrev(...))``
    and ``hessian`` work.

    :param Tensor patterns: ``[N, d]`` stored patterns :math:`y_i` (finite).
    :param Schedule schedule: the noise schedule.
    :param Tensor weights: ``[N]`` non-negative pattern weights :math:`\pi_i` (normalised here); uniform if
        omitted.
    :param int memory_budget: bytes the logits of one chunk may take (default 256 MiB).
    :param int refine_topk: how many top logits a badly conditioned row recomputes directly.
    :param int chunk_size: force this many patterns per chunk (for tests and benchmarks).

    Example::

        >>> from pyro_ext.diffusion import VPLinear
        >>> energy = EmpiricalEnergy(torch.randn(100, 2), VPLinear())
        >>> x = torch.randn(8, 2)
        >>> e, s = energy.energy_and_score(x, 0.3)
        >>> w = energy.posterior_weights(x, 0.3)  # [8, 100], rows sum to 1

    References: Ambrogioni, arXiv:2309.17290; Ramsauer et al., arXiv:2008.02217.
    """

    exact = True

    def __init__(
        self,
        patterns: Tensor,
        schedule: Schedule,
        weights: Tensor | None = None,
        *,
        memory_budget: int = 2**28,
        refine_topk: int = 16,
        chunk_size: int | None = None,
    ) -> None:
        if not isinstance(patterns, Tensor) or not patterns.is_floating_point():
            raise TypeError("patterns must be a floating-point tensor of shape [N, d]")
        if patterns.dim() != 2 or patterns.shape[0] < 1 or patterns.shape[1] < 1:
            raise ValueError(f"patterns must have shape [N, d] with N, d >= 1; got {tuple(patterns.shape)}")
        check_finite(patterns, "patterns")
        super().__init__(schedule, patterns.shape[1])
        n = patterns.shape[0]
        if weights is None:
            log_weights = torch.full((n,), -math.log(n), dtype=patterns.dtype, device=patterns.device)
        else:
            if not isinstance(weights, Tensor) or weights.shape != (n,):
                raise ValueError(
                    f"weights must be a tensor of shape [{n}] (one per pattern); got "
                    f"{tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__}"
                )
            check_finite(weights, "weights")
            if bool((weights < 0).any()) or not bool(weights.sum() > 0):
                raise ValueError("weights must be non-negative with a positive sum")
            weights = weights.to(dtype=patterns.dtype, device=patterns.device)
            log_weights = torch.log(weights) - torch.log(weights.sum())
        if int(memory_budget) < 1:
            raise ValueError(f"memory_budget must be a positive number of bytes; got {memory_budget}")
        if int(refine_topk) < 0:
            raise ValueError(f"refine_topk must be >= 0; got {refine_topk}")
        if chunk_size is not None and int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be a positive integer or None; got {chunk_size}")
        self.memory_budget = int(memory_budget)
        self.refine_topk = int(refine_topk)
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.register_buffer("patterns", patterns.detach().clone())
        self.register_buffer("log_weights", log_weights)
        self.register_buffer("squared_norms", (patterns.detach() ** 2).sum(-1))
        # packed upper triangles of y y^T for the dense Jacobian route, built on first use
        self.register_buffer("_packed_outer", None, persistent=False)
        self._dtype_anchor = self._dtype_anchor.to(patterns.dtype)

    @property
    def num_patterns(self) -> int:
        """:math:`N`."""
        return self.patterns.shape[0]

    @property
    def weights(self) -> Tensor:
        r"""The normalised pattern weights :math:`\pi`."""
        return self.log_weights.exp()

    def _apply(self, fn, recurse=True):
        # A dtype/device change invalidates the packed outer-product cache.
        self._packed_outer = None
        return super()._apply(fn, recurse)

    def hopfield_beta(self, t: TimeLike) -> Tensor:
        r"""Hopfield inverse temperature :math:`\beta_H = \alpha^2/\sigma^2 = \mathrm{SNR}(t)` (§2.3)."""
        return self.schedule.snr(t)

    # ------------------------------------------------------------------------------ streaming core
    def _chunks(self, rows: int) -> Iterator[tuple[int, int]]:
        n = self.num_patterns
        if self.chunk_size is not None:
            size = self.chunk_size
        else:
            size = self.memory_budget // max(1, rows * self.patterns.element_size())
        size = int(max(1, min(n, size)))
        for start in range(0, n, size):
            yield start, min(n, start + size)

    def _row_blocks(self, rows: int) -> Iterator[slice]:
        # When even a 1024-pattern chunk of all rows would exceed the budget, split the rows too.
        width = min(self.num_patterns, 1024 if self.chunk_size is None else self.chunk_size)
        block = max(1, self.memory_budget // max(1, width * self.patterns.element_size()))
        if self.chunk_size is not None or block >= rows:
            yield slice(0, rows)
            return
        for start in range(0, rows, block):
            yield slice(start, min(rows, start + block))

    def _logits(self, x: Tensor, a: Tensor, c: Tensor, start: int, end: int, scalar: bool) -> Tensor:
        """Expanded logits ``[B, n]`` of patterns ``start:end`` (a fresh tensor, safe to modify in place)."""
        y = self.patterns[start:end]
        if scalar:
            bias = self.log_weights[start:end] - c * self.squared_norms[start:end]
            return torch.addmm(bias, x, y.T, alpha=float(a))
        logits = torch.addmm(self.log_weights[start:end], x * a[:, None], y.T)
        return logits.addr_(c, self.squared_norms[start:end], alpha=-1.0)

    def _logits_pure(self, x: Tensor, a: Tensor, c: Tensor, start: int, end: int) -> Tensor:
        """Out-of-place expanded logits (autograd- and vmap-friendly)."""
        y = self.patterns[start:end]
        a, c = a.reshape(-1, 1), c.reshape(-1, 1)
        return self.log_weights[start:end] + a * (x @ y.T) - c * self.squared_norms[start:end]

    def _stream(
        self,
        x: Tensor,
        alpha: Tensor,
        sigma2: Tensor,
        scalar: bool,
        need_mean: bool,
        topk: int,
        keep_probs: bool = False,
    ) -> _Stats:
        """Streamed logsumexp, mean and top-k over all patterns for rows ``x`` ``[B, d]`` (no autograd)."""
        rows, dtype = x.shape[0], x.dtype
        a, c = alpha / sigma2, alpha**2 / (2.0 * sigma2)
        guard = math.log(torch.finfo(dtype).tiny) + 10.0  # subnormal guard (see the class docstring)
        lowest = torch.finfo(dtype).min
        running_max = total = weighted = None
        top_val = top_idx = None
        for start, end in self._chunks(rows):
            logits = self._logits(x, a, c, start, end, scalar)
            if topk:
                k = min(topk, end - start)
                val, idx = logits.topk(k, dim=1)
                idx = idx + start
                if top_val is not None:
                    val, pos = torch.cat([top_val, val], 1).topk(min(topk, top_val.shape[1] + k), dim=1)
                    idx = torch.cat([top_idx, idx], 1).gather(1, pos)
                top_val, top_idx = val, idx
            chunk_max = logits.amax(1)
            new_max = chunk_max if running_max is None else torch.maximum(running_max, chunk_max)
            shift = new_max.clamp_min(lowest)  # all -inf so far (zero weights): keep finite
            probs = logits.sub_(shift[:, None]).clamp_min_(guard).exp_()
            y = self.patterns[start:end]
            if running_max is None:  # first chunk: nothing to rescale (saves passes when N fits one chunk)
                total = probs.sum(1)
                weighted = probs @ y if need_mean else None
            else:
                rescale = torch.exp(running_max - shift)
                total = torch.addcmul(probs.sum(1), total, rescale)
                if need_mean:
                    weighted = torch.addmm(weighted * rescale[:, None], probs, y)
            running_max = new_max
        shift = running_max.clamp_min(lowest)
        quad = (x**2).sum(-1) / (2.0 * sigma2)
        stats = _Stats(
            lse=shift + torch.log(total) - quad,
            quad=quad,
            max_logit=shift,
            mean=None if weighted is None else weighted / total[:, None],
            top_index=top_idx,
            top_logit=None if top_val is None else top_val - quad[:, None],
            total=total,
            weighted=weighted,
            probs=probs if keep_probs and probs.shape[1] == self.num_patterns else None,
        )
        return stats

    def _refine_rows(self, x: Tensor, alpha: Tensor, sigma2: Tensor) -> Tensor:
        """Rows whose expanded logits carry an absolute error above ``REFINE_TOLERANCE``."""
        if self.refine_topk == 0:
            return torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        roundoff = torch.finfo(x.dtype).eps
        if x.is_cuda and x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
            warnings.warn(
                "TF32 matmuls are on (torch.backends.cuda.matmul.allow_tf32): EmpiricalEnergy's logits carry "
                "~1e-3 relative error; turn TF32 off for accurate energies",
                RuntimeWarning,
                stacklevel=4,
            )
            roundoff = 2.0**-11
        y_max = self.squared_norms.max().sqrt()
        error = roundoff * (alpha * x.norm(dim=-1) * y_max + 0.5 * alpha**2 * y_max**2) / sigma2
        return error > REFINE_TOLERANCE

    def _refine(self, x: Tensor, alpha: Tensor, sigma2: Tensor, stats: _Stats, rows: Tensor) -> None:
        """Recompute the top logits of ``rows`` directly and re-assemble their lse and mean in place."""
        if stats.top_index is None:
            return
        xr, ar, s2r = x[rows], alpha[rows], sigma2[rows]
        idx = stats.top_index[rows]
        y = self.patterns[idx]  # [R, k, d]
        direct = self.log_weights[idx] - ((xr[:, None, :] - ar[:, None, None] * y) ** 2).sum(-1) / (
            2 * s2r[:, None]
        )
        quad, shift = stats.quad[rows], stats.max_logit[rows]
        expanded = stats.top_logit[rows] + quad[:, None]
        guard = math.log(torch.finfo(x.dtype).tiny) + 10.0
        streamed = torch.exp((expanded - shift[:, None]).clamp_min(guard))  # what the stream summed for them
        # The stream summed exp(expanded - shift) over all patterns; take the top ones out (their expanded
        # logits are the inaccurate ones) and put them back in the direct frame (expanded = direct + quad).
        rest_total = (stats.total[rows] - streamed.sum(1)).clamp_min(0.0)
        rest_log = shift - quad + torch.log(rest_total)  # log of the rest's sum in the direct frame
        new_max = torch.maximum(direct.amax(1), rest_log)
        top_p = torch.exp(direct - new_max[:, None])
        rest_scale = torch.exp(shift - quad - new_max)  # stream frame -> new frame
        new_total = top_p.sum(1) + rest_scale * rest_total
        stats.lse[rows] = new_max + torch.log(new_total)
        stats.top_logit[rows] = direct
        if stats.mean is not None and stats.weighted is not None:
            rest_weighted = stats.weighted[rows] - torch.einsum("rk,rkd->rd", streamed, y)
            new_weighted = torch.einsum("rk,rkd->rd", top_p, y) + rest_scale[:, None] * rest_weighted
            stats.mean[rows] = new_weighted / new_total[:, None]

    def _evaluate(
        self, x: Tensor, t: Tensor, *, need_mean: bool, topk: int = 0, keep_probs: bool = False
    ) -> tuple[_Stats, Tensor, Tensor]:
        """Streamed statistics of flattened rows ``x [B, d]`` at times ``t [B]``, with refinement."""
        scalar = t.dim() == 0
        t_rows = t if scalar else t.reshape(-1)
        alpha, sigma2 = self._coefficients(t_rows)
        alpha_rows, sigma2_rows = alpha.expand(x.shape[0]), sigma2.expand(x.shape[0])
        refine = self._refine_rows(x, alpha_rows, sigma2_rows)
        any_refine = bool(refine.any())
        k = max(topk, self.refine_topk if any_refine else 0)
        parts = []
        for rows in self._row_blocks(x.shape[0]):
            a_b, s_b = (alpha, sigma2) if scalar else (alpha[rows], sigma2[rows])
            parts.append(self._stream(x[rows], a_b, s_b, scalar, need_mean or any_refine, k, keep_probs))
        if len(parts) == 1:
            stats = parts[0]
        else:
            stats = _Stats(
                **{
                    name: None
                    if getattr(parts[0], name) is None
                    else torch.cat([getattr(p, name) for p in parts])
                    for name in _Stats.__dataclass_fields__
                }
            )
        if any_refine:
            self._refine(x, alpha_rows, sigma2_rows, stats, refine)
            stats.probs = None  # the streamed top probabilities were replaced
        return stats, alpha_rows, sigma2_rows

    def _evaluate_pure(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(lse of direct logits, mean)`` by out-of-place ops (differentiable, vmap-friendly, unrefined)."""
        alpha, sigma2 = self._coefficients(t)
        a, c = alpha / sigma2, alpha**2 / (2.0 * sigma2)
        lse = mean = None
        for start, end in self._chunks(x.shape[0]):
            logits = self._logits_pure(x, a, c, start, end)
            chunk_lse = torch.logsumexp(logits, -1)
            chunk_mean = torch.softmax(logits, -1) @ self.patterns[start:end]
            if lse is None:
                lse, mean = chunk_lse, chunk_mean
            else:
                new = torch.logaddexp(lse, chunk_lse)
                mean = torch.exp(lse - new)[:, None] * mean + torch.exp(chunk_lse - new)[:, None] * chunk_mean
                lse = new
        quad = (x**2).sum(-1) / (2.0 * sigma2)
        return lse - quad, mean

    # --------------------------------------------------------------------------------- public API
    def _flat(self, x: Tensor, t: TimeLike) -> tuple[Tensor, Tensor, Tensor, torch.Size]:
        x, t = self._prepare(x, t)
        batch = x.shape[:-1]
        flat_t = t.reshape(()) if t.numel() == 1 else t.expand(batch).reshape(-1)
        return x, x.reshape(-1, self.dim), flat_t, batch

    def _log_normaliser(self, sigma2: Tensor) -> Tensor:
        return 0.5 * self.dim * torch.log(2 * math.pi * sigma2)

    def energy(self, x: Tensor, t: TimeLike) -> Tensor:
        r"""Exact :math:`-\log p_t(x)`; differentiable in ``x`` (not in ``t``)."""
        out_dtype = x.dtype if isinstance(x, Tensor) else None
        x, flat, flat_t, batch = self._flat(x, t)
        if isinstance(t, Tensor) and t.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                "EmpiricalEnergy.energy is differentiable in x only; pass t without requires_grad"
            )
        if under_functorch(flat, flat_t):
            lse, _ = self._evaluate_pure(flat, flat_t.expand(flat.shape[0]))
            sigma2 = self.schedule.sigma(flat_t.expand(flat.shape[0])) ** 2
            return (-lse + self._log_normaliser(sigma2)).reshape(batch).to(out_dtype)
        energy = _StreamedEnergy.apply(x, self, flat_t)
        return energy.to(out_dtype)

    def _energy_and_score_nograd(
        self, flat: Tensor, flat_t: Tensor, need_score: bool
    ) -> tuple[Tensor, Tensor | None]:
        stats, alpha, sigma2 = self._evaluate(flat, flat_t, need_mean=need_score)
        energy = -stats.lse + self._log_normaliser(sigma2)
        score = None if not need_score else (alpha[:, None] * stats.mean - flat) / sigma2[:, None]
        return energy, score

    def score(self, x: Tensor, t: TimeLike) -> Tensor:
        r"""Closed-form score :math:`(\alpha m - x)/\sigma^2`."""
        out_dtype = x.dtype if isinstance(x, Tensor) else None
        x, flat, flat_t, batch = self._flat(x, t)
        if under_functorch(flat, flat_t) or (torch.is_grad_enabled() and x.requires_grad):
            rows_t = flat_t.expand(flat.shape[0])
            _, mean = self._evaluate_pure(flat, rows_t)
            alpha, sigma2 = self._coefficients(rows_t)
            score = (alpha[:, None] * mean - flat) / sigma2[:, None]
        else:
            _, score = self._energy_and_score_nograd(flat, flat_t, True)
        return score.reshape(*batch, self.dim).to(out_dtype)

    def energy_and_score(self, x: Tensor, t: TimeLike) -> tuple[Tensor, Tensor]:
        """Energy and score from one streamed pass (no autograd graph)."""
        out_dtype = x.dtype if isinstance(x, Tensor) else None
        _, flat, flat_t, batch = self._flat(x, t)
        with torch.no_grad():
            energy, score = self._energy_and_score_nograd(flat, flat_t, True)
        return energy.reshape(batch).to(out_dtype), score.reshape(*batch, self.dim).to(out_dtype)

    def denoise(self, x: Tensor, t: TimeLike) -> Tensor:
        r"""The posterior mean :math:`m(x) = E[x_0 \mid x_t = x] = \sum_i w_i y_i`."""
        out_dtype = x.dtype if isinstance(x, Tensor) else None
        x, flat, flat_t, batch = self._flat(x, t)
        if under_functorch(flat, flat_t) or (torch.is_grad_enabled() and x.requires_grad):
            mean = self._evaluate_pure(flat, flat_t.expand(flat.shape[0]))[1]
        else:
            mean = self._evaluate(flat, flat_t, need_mean=True)[0].mean
        return mean.reshape(*batch, self.dim).to(out_dtype)

    def posterior_weights(self, x: Tensor, t: TimeLike) -> Tensor:
        r"""Posterior pattern probabilities :math:`w_i = P(i \mid x_t = x)`, shape ``[..., N]``."""
        out_dtype = x.dtype if isinstance(x, Tensor) else None
        x, flat, flat_t, batch = self._flat(x, t)
        with torch.no_grad():
            stats, alpha, sigma2 = self._evaluate(flat, flat_t, need_mean=False)
            weights = torch.cat(list(self._weight_chunks(flat, flat_t, stats, alpha, sigma2)), dim=1)
        return weights.reshape(*batch, self.num_patterns).to(out_dtype)

    def posterior_topk(self, x: Tensor, t: TimeLike, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` largest posterior weights and their pattern indices, each ``[..., k]``, descending."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_patterns:
            raise ValueError(f"k must be an int in [1, N = {self.num_patterns}]; got {k!r}")
        out_dtype = x.dtype if isinstance(x, Tensor) else None
        x, flat, flat_t, batch = self._flat(x, t)
        with torch.no_grad():
            stats, _, _ = self._evaluate(flat, flat_t, need_mean=False, topk=k)
            logits, index = stats.top_logit[:, :k], stats.top_index[:, :k]
            order = logits.argsort(dim=1, descending=True)  # refinement may reorder near-ties
            weights = torch.exp(logits.gather(1, order) - stats.lse[:, None])
            index = index.gather(1, order)
        return weights.reshape(*batch, k).to(out_dtype), index.reshape(*batch, k)

    def _weight_chunks(
        self, flat: Tensor, flat_t: Tensor, stats: _Stats, alpha: Tensor, sigma2: Tensor
    ) -> Iterator[Tensor]:
        """Normalised posterior weights chunk by chunk; refined rows get their recomputed top weights."""
        scalar = flat_t.dim() == 0
        a_s, s_s = (alpha[:1].reshape(()), sigma2[:1].reshape(())) if scalar else (alpha, sigma2)
        a, c = a_s / s_s, a_s**2 / (2 * s_s)
        shift = (stats.lse + stats.quad)[:, None]
        for start, end in self._chunks(flat.shape[0]):
            weights = self._logits(flat, a, c, start, end, scalar).sub_(shift).exp_()
            if stats.top_index is not None:
                inside = (stats.top_index >= start) & (stats.top_index < end)
                rows, cols = torch.nonzero(inside, as_tuple=True)
                weights[rows, stats.top_index[rows, cols] - start] = torch.exp(
                    stats.top_logit[rows, cols] - stats.lse[rows]
                )
            yield weights

    # ---------------------------------------------------------------------------------- Jacobian
    def _packed(self, start: int, end: int) -> Tensor:
        """Packed upper triangles of :math:`y_i y_i^T` for patterns ``start:end``, cached when it fits."""
        d = self.dim
        rows, cols = _triu_indices(d, self.patterns.device)
        size = self.num_patterns * (d * (d + 1) // 2) * self.patterns.element_size()
        if size <= self.memory_budget:
            if self._packed_outer is None:
                self._packed_outer = self.patterns[:, rows] * self.patterns[:, cols]
            return self._packed_outer[start:end]
        y = self.patterns[start:end]
        return y[:, rows] * y[:, cols]

    def score_jacobian(
        self, x: Tensor, t: TimeLike, *, structured: bool = False, route: str = "auto"
    ) -> Tensor | tuple[Tensor, Tensor]:
        r"""Closed-form score Jacobian :math:`J = -I/\sigma^2 + (\alpha^2/\sigma^4)\operatorname{Cov}_w[y]`.

        Two exact routes: *dense* forms the second moments by one GEMM with the packed upper triangles of
        :math:`y_i y_i^T` (then :math:`\operatorname{Cov} = S_2 - m m^T`); *sparse* gathers the rows'
        posterior support (:math:`w_i > 10^{-16}\max w`, :math:`10^{-8}` in float32) and forms the centred,
        weighted Gram matrix, free of the cancellation in :math:`S_2 - mm^T` at small :math:`\sigma`.
        ``route="auto"`` takes the sparse route for rows whose support holds at most 64 patterns.

        :param x: points, ``[..., d]``.
        :param t: times broadcasting against ``x.shape[:-1]``.
        :param bool structured: return ``(-1/sigma^2, Z)`` with :math:`J = -I/\sigma^2 + Z^T Z` and
            :math:`Z = (\alpha/\sigma^2)\operatorname{diag}(\sqrt w)(Y_S - m)` (``[..., k, d]``, zero-padded
            rows), so that spectra come from a ``k x k`` Gram matrix. When some support exceeds ``d``, ``Z``
            is the ``d x d`` symmetric square root factor of the covariance instead.
        :param str route: ``"auto"``, ``"dense"`` or ``"sparse"``.
        :returns: ``[..., d, d]``, or the pair above.
        """
        if route not in ("auto", "dense", "sparse"):
            raise ValueError(f"route must be 'auto', 'dense' or 'sparse'; got {route!r}")
        out_dtype = x.dtype if isinstance(x, Tensor) else None
        x, flat, flat_t, batch = self._flat(x, t)
        if under_functorch(flat, flat_t):
            return super().score_jacobian(x, t)
        with torch.no_grad():
            cov, z, alpha, sigma2 = self._covariance(flat, flat_t, route, structured)
        d = self.dim
        if structured:
            inv = -1.0 / sigma2
            return inv.reshape(batch).to(out_dtype), z.reshape(*batch, z.shape[-2], d).to(out_dtype)
        coef = (alpha**2 / sigma2**2)[:, None, None]
        jac = coef * cov
        jac.diagonal(dim1=-2, dim2=-1).sub_((1.0 / sigma2)[:, None])
        return jac.reshape(*batch, d, d).to(out_dtype)

    def _covariance(
        self, flat: Tensor, flat_t: Tensor, route: str, structured: bool
    ) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor]:
        """Posterior covariances ``[B, d, d]`` (or the structured factor ``Z``) of flattened rows."""
        d, rows_n = self.dim, flat.shape[0]
        stats, alpha, sigma2 = self._evaluate(flat, flat_t, need_mean=True, keep_probs=True)
        mean = stats.mean
        threshold = _support_threshold(flat.dtype)
        keep = min(self.num_patterns, SPARSE_SUPPORT_MAX + 1)
        if stats.probs is not None:
            # All patterns in one chunk and nothing refined: the stream's probabilities (max 1 per row)
            # are the unnormalised weights, so no second pass over the patterns is needed.
            counts = (stats.probs > threshold).sum(1)
            weights = stats.probs.div_(stats.total[:, None])
            cached, top_w, top_i = [weights], None, None
        else:
            counts, top_w, top_i = self._support_stream(flat, flat_t, stats, alpha, sigma2, route, keep)
            cached = []
        if route == "sparse":
            sparse = torch.ones(rows_n, dtype=torch.bool, device=flat.device)
            if top_w is not None and int(counts.max()) > top_w.shape[1]:  # more support than kept
                return self._covariance_with_keep(flat, flat_t, int(counts.max()), structured)
        elif route == "dense":
            sparse = torch.zeros(rows_n, dtype=torch.bool, device=flat.device)
        else:
            sparse = counts <= SPARSE_SUPPORT_MAX
        any_sparse = bool(sparse.any())
        k_sparse = int(counts[sparse].max()) if any_sparse else 0
        if any_sparse:
            if top_w is None:
                top_w, top_i = cached[0][sparse].topk(k_sparse, dim=1)
            else:
                top_w, top_i = top_w[sparse, :k_sparse], top_i[sparse, :k_sparse]
            z = self._support_factor(mean[sparse], top_w, top_i, counts[sparse])
            if structured and bool(sparse.all()) and k_sparse <= d:
                return None, z * (alpha / sigma2)[:, None, None], alpha, sigma2
        dense = ~sparse
        if not any_sparse:
            cov = self._dense_covariance(flat, flat_t, stats, alpha, sigma2, None, cached)
        else:
            cov = torch.empty(rows_n, d, d, dtype=flat.dtype, device=flat.device)
            cov[sparse] = z.transpose(-1, -2) @ z
            if bool(dense.any()):
                cov[dense] = self._dense_covariance(flat, flat_t, stats, alpha, sigma2, dense, cached)
        if not structured:
            return cov, None, alpha, sigma2
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        z = eigenvalues.clamp_min(0.0).sqrt()[:, :, None] * eigenvectors.transpose(-1, -2)
        return None, z * (alpha / sigma2)[:, None, None], alpha, sigma2

    def _support_stream(
        self,
        flat: Tensor,
        flat_t: Tensor,
        stats: _Stats,
        alpha: Tensor,
        sigma2: Tensor,
        route: str,
        keep: int,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Second streamed pass: support sizes and (unless dense) the ``keep`` top weights with indices."""
        threshold = _support_threshold(flat.dtype)
        max_weight = torch.exp(stats.max_logit - stats.quad - stats.lse)
        if stats.top_logit is not None:  # refined rows: their top weight was recomputed
            max_weight = torch.maximum(max_weight, torch.exp(stats.top_logit[:, 0] - stats.lse))
        counts = torch.zeros(flat.shape[0], dtype=torch.long, device=flat.device)
        top_w = top_i = None
        for (start, end), weights in zip(
            self._chunks(flat.shape[0]), self._weight_chunks(flat, flat_t, stats, alpha, sigma2)
        ):
            counts += (weights > threshold * max_weight[:, None]).sum(1)
            if route != "dense":
                k = min(keep, end - start)
                val, idx = weights.topk(k, dim=1)
                idx = idx + start
                if top_w is not None:
                    val, pos = torch.cat([top_w, val], 1).topk(min(keep, top_w.shape[1] + k), dim=1)
                    idx = torch.cat([top_i, idx], 1).gather(1, pos)
                top_w, top_i = val, idx
        return counts, top_w, top_i

    def _covariance_with_keep(
        self, flat: Tensor, flat_t: Tensor, keep: int, structured: bool
    ) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor]:
        # Forced sparse route with supports larger than first kept: gather `keep` per row.
        stats, alpha, sigma2 = self._evaluate(flat, flat_t, need_mean=True)
        weights = torch.cat(list(self._weight_chunks(flat, flat_t, stats, alpha, sigma2)), dim=1)
        top_w, top_i = weights.topk(keep, dim=1)
        counts = torch.full((flat.shape[0],), keep, dtype=torch.long, device=flat.device)
        z = self._support_factor(stats.mean, top_w, top_i, counts)
        if structured:
            return None, z * (alpha / sigma2)[:, None, None], alpha, sigma2
        return z.transpose(-1, -2) @ z, None, alpha, sigma2

    def _support_factor(self, mean: Tensor, top_w: Tensor, top_i: Tensor, counts: Tensor) -> Tensor:
        r""":math:`\operatorname{diag}(\sqrt w)(Y_S - m)`, ``[R, k, d]``; rows past a row's support are 0."""
        k = top_w.shape[1]
        inside = torch.arange(k, device=top_w.device)[None, :] < counts[:, None]
        weights = torch.where(inside, top_w, torch.zeros_like(top_w))
        centred = self.patterns[top_i] - mean[:, None, :]
        return weights.sqrt()[:, :, None] * centred

    def _dense_covariance(
        self,
        flat: Tensor,
        flat_t: Tensor,
        stats: _Stats,
        alpha: Tensor,
        sigma2: Tensor,
        rows: Tensor | None,
        cached: list[Tensor],
    ) -> Tensor:
        """:math:`S_2 - m m^T` by the GEMM with the packed outer products, for the selected rows."""
        d = self.dim
        second = None
        chunks = cached if cached else self._weight_chunks(flat, flat_t, stats, alpha, sigma2)
        for (start, end), weights in zip(self._chunks(flat.shape[0]), chunks):
            part = (weights if rows is None else weights[rows]) @ self._packed(start, end)
            second = part if second is None else second + part
        full = second.index_select(1, _packed_positions(d, flat.device)).view(-1, d, d)
        mean = stats.mean if rows is None else stats.mean[rows]
        return full - mean[:, :, None] * mean[:, None, :]

    # ----------------------------------------------------------------------------------- sampling
    def sample(
        self, n: int | Sequence[int], t: TimeLike, *, generator: torch.Generator | None = None
    ) -> Tensor:
        r"""Exact samples of :math:`p_t`: :math:`i \sim \pi`, then :math:`\alpha y_i + \sigma\varepsilon`.

        :param n: number of samples, or a sample shape.
        :param t: a float or a tensor of times (its shape is the batch shape).
        :param generator: a :class:`torch.Generator` for reproducibility.
        :returns: ``[*n, *t.shape, d]``.
        """
        shape = sample_shape_of(n)
        t = self._time(t)
        total = shape.numel() * t.numel()
        index = torch.multinomial(self.weights, max(total, 1), replacement=True, generator=generator)[:total]
        out_shape = (*shape, *t.shape, self.dim)
        noise = torch.randn(out_shape, dtype=self.dtype, device=self.device, generator=generator)
        alpha, sigma = self.schedule.alpha(t)[..., None], self.schedule.sigma(t)[..., None]
        return alpha * self.patterns[index].reshape(out_shape) + sigma * noise

    def _conditional_sample(
        self, mask: Tensor, value: Tensor, n: torch.Size, t: TimeLike, generator: torch.Generator | None
    ) -> Tensor:
        r"""Exact :math:`p_t(x_f \mid x_o)` (§3 of the design note, derived form).

        :math:`P(i\mid x_o) \propto \pi_i \exp(-\|x_o - \alpha y_{i,o}\|^2/2\sigma^2)`, then
        :math:`x_f = \alpha y_{i,f} + \sigma\varepsilon`.
        """
        value = value.to(self.dtype)
        t = self._time(t)
        alpha, sigma2 = self._coefficients(t)
        batch = torch.broadcast_shapes(t.shape, value.shape[:-1])
        y_obs, y_free = self.patterns[:, mask], self.patterns[:, ~mask]
        alpha_b, sigma2_b = alpha.expand(batch).reshape(-1), sigma2.expand(batch).reshape(-1)
        obs = value.expand(*batch, -1).reshape(-1, value.shape[-1])
        sq = ((obs[:, None, :] - alpha_b[:, None, None] * y_obs) ** 2).sum(-1)
        logits = self.log_weights - sq / (2 * sigma2_b[:, None])
        probs = torch.softmax(logits, -1)
        m = n.numel()
        index = torch.multinomial(probs, max(m, 1), replacement=True, generator=generator)[:, :m]  # [Bt, m]
        free = alpha_b[:, None, None] * y_free[index] + sigma2_b.sqrt()[:, None, None] * torch.randn(
            index.shape[0], m, y_free.shape[1], dtype=self.dtype, device=self.device, generator=generator
        )
        return free.transpose(0, 1).reshape(*n, *batch, y_free.shape[1])

    def extra_repr(self) -> str:
        return f"num_patterns={self.num_patterns}, dim={self.dim}, memory_budget={self.memory_budget}"


class _StreamedEnergy(torch.autograd.Function):
    """Streamed energy whose gradient in ``x`` is minus the closed-form score from the same pass."""

    @staticmethod
    def forward(ctx, x: Tensor, energy: EmpiricalEnergy, flat_t: Tensor) -> Tensor:
        flat = x.reshape(-1, energy.dim)
        need_score = ctx.needs_input_grad[0]
        value, score = energy._energy_and_score_nograd(flat, flat_t, need_score)
        if need_score:
            ctx.save_for_backward(score.reshape(x.shape))
        return value.reshape(x.shape[:-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (score,) = ctx.saved_tensors
        return -grad[..., None] * score, None, None
