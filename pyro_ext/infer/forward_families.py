"""Conditional density families for the forward-KL stage of :class:`~pyro_ext.infer.hybrid.HybridGuide`.

Each family is a factory ``family(context_features, site) -> module``; the module is a *proper*
conditional density ``q(value | context)`` of one site with

- ``log_prob(value, context) -> Tensor[N]`` for ``value: Tensor[N, *site.shape]`` and
  ``context: Tensor[N, context_features]``;
- ``sample(sample_shape, context, generator=None) -> Tensor[*sample_shape, N, *site.shape]``.

Forward KL (the negative log likelihood of simulated values) is infinite wherever ``q = 0 < p``, so
every family here puts positive density on the whole support of its site: continuous families live in
the unconstrained space of ``biject_to(site.support)`` and add that bijection's log-determinant;
categorical families put a softmax over every point of a finite support.

=================  ===========  ==========================================================================
family             sites        density
=================  ===========  ==========================================================================
:class:`FlowFamily`  continuous  conditional masked autoregressive flow (affine or rational-quadratic
                                 spline layers, reverse permutations, standard normal base), nflows
:class:`NormalFamily`  continuous  conditional full-rank Gaussian (an MLP gives loc and Cholesky factor)
:class:`MixtureFamily`  continuous  K-component full-rank Gaussian mixture density network
:class:`CategoricalFamily`  discrete  joint softmax over the product support, an autoregressive MADE on
                                 one-hot codes, or a mean-field product of categoricals
=================  ===========  ==========================================================================

The continuous families standardise the unconstrained values with buffers set from the simulation
bank (:meth:`ConditionalDensity.set_statistics`), so the networks see unit-scale targets whatever
the prior's scale.

References: Ambrogioni et al., arXiv:1805.11542 (FAVI); Papamakarios et al., arXiv:1705.07057 (MAF);
Durkan et al., arXiv:1906.04032 (neural spline flows).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from nflows.transforms import (
    CompositeTransform,
    MaskedAffineAutoregressiveTransform,
    MaskedPiecewiseRationalQuadraticAutoregressiveTransform,
    ReversePermutation,
)
from torch import nn

from pyro_ext.infer.site_info import SiteInfo

__all__ = [
    "CategoricalFamily",
    "ConditionalDensity",
    "FlowFamily",
    "MixtureFamily",
    "NormalFamily",
    "check_density_module",
    "resolve_family",
    "sample_density",
]

_LOG_TWO_PI = math.log(2 * math.pi)
#: softplus(x + _SOFTPLUS_ONE) = 1 at x = 0: zero-initialised networks start at unit scale.
_SOFTPLUS_ONE = math.log(math.e - 1)
#: the largest product support a joint softmax enumerates (design note §2.2)
MAX_JOINT_SUPPORT = 4096


class _ContextNet(nn.Module):
    """ReLU MLP plus a linear skip from its input, both starting at zero output.

    A fresh density is then its base density for every context, and the linear part -- which alone is
    exact for linear-Gaussian models -- is learned quickly while the MLP fits what is left.
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: int, num_hidden_layers: int):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(num_hidden_layers):
            layers += [nn.Linear(width, hidden_features), nn.ReLU()]
            width = hidden_features
        layers.append(nn.Linear(width, out_features))
        self.mlp = nn.Sequential(*layers)
        self.skip = nn.Linear(in_features, out_features)
        for layer in (self.mlp[-1], self.skip):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def output_bias(self) -> torch.Tensor:
        return self.skip.bias

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.mlp(inputs) + self.skip(inputs)


def _mlp(in_features: int, hidden_features: int, out_features: int, num_hidden_layers: int) -> _ContextNet:
    return _ContextNet(in_features, hidden_features, out_features, num_hidden_layers)


def _tril_from_vector(vector: torch.Tensor, dim: int) -> torch.Tensor:
    """Lower-triangular factor with softplus diagonal from ``[..., dim (dim + 1) / 2]`` raw entries."""
    rows, cols = torch.tril_indices(dim, dim, device=vector.device)
    tril = vector.new_zeros(vector.shape[:-1] + (dim, dim))
    tril[..., rows, cols] = vector
    diagonal = nn.functional.softplus(tril.diagonal(dim1=-2, dim2=-1) + _SOFTPLUS_ONE) + 1e-6
    return tril.tril(-1) + torch.diag_embed(diagonal)


class ConditionalDensity(nn.Module):
    """Base class of the built-in forward densities ``q(value | context)`` of one site.

    :param int context_features: width of the context vector.
    :param SiteInfo site: the site the density is over.
    """

    def __init__(self, context_features: int, site: SiteInfo) -> None:
        super().__init__()
        self.context_features = int(context_features)
        self.site = site

    def set_statistics(self, values: torch.Tensor) -> None:
        """Set standardisation buffers from simulated values ``[M, *site.shape]`` (no-op by default)."""

    def set_memoize(self, enabled: bool) -> None:
        """Cache the network outputs of the last context tensor (only valid while the weights are frozen).

        Stage 2 draws from q_phi(h | y_o) at every step with the same context; a frozen density need not
        recompute its network for it.
        """
        self.__dict__["_memoize"] = bool(enabled)
        self.__dict__["_memo"] = None

    def _memoized(self, context: torch.Tensor, compute) -> Any:
        if not self.__dict__.get("_memoize", False):
            return compute(context)
        memo = self.__dict__.get("_memo")
        if memo is not None and memo[0] is context and memo[1] == context._version:
            return memo[2]
        outputs = compute(context)
        self.__dict__["_memo"] = (context, context._version, outputs)
        return outputs

    def log_prob(self, value: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sample(
        self, sample_shape: torch.Size, context: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def _repeat_context(sample_shape: torch.Size, context: torch.Tensor) -> tuple[int, torch.Tensor]:
        num = math.prod(sample_shape)
        return num, context.repeat(num, 1)


# --------------------------------------------------------------------------------------------------
# continuous families
# --------------------------------------------------------------------------------------------------
class _UnconstrainedDensity(ConditionalDensity):
    """Shared plumbing: constrained value <-> standardised flat unconstrained vector, with log-dets."""

    def __init__(self, context_features: int, site: SiteInfo) -> None:
        super().__init__(context_features, site)
        if site.is_discrete:
            raise TypeError(
                f"forward_family: {type(self).__name__} is a continuous family but site {site.name!r} is "
                f"discrete (support {site.support}); use 'categorical'"
            )
        self.dim = site.flat_dim
        self.register_buffer("shift", torch.zeros(self.dim))
        self.register_buffer("scale", torch.ones(self.dim))

    def set_statistics(self, values: torch.Tensor) -> None:
        unconstrained = self.site.bijection.inv(values).reshape(values.shape[0], -1).to(self.shift)
        finite = torch.isfinite(unconstrained).all(-1)
        unconstrained = unconstrained[finite]
        if unconstrained.shape[0] < 2:
            return
        scale = unconstrained.std(0)
        self.shift.copy_(unconstrained.mean(0))
        self.scale.copy_(torch.where(scale > 1e-8, scale, torch.ones_like(scale)))

    def _standardise(self, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised flat unconstrained ``[N, dim]`` and the log-det of value -> standardised."""
        n = value.shape[0]
        bijection = self.site.bijection
        unconstrained = bijection.inv(value)
        log_det = bijection.log_abs_det_jacobian(unconstrained, value)  # log |d value / d unconstrained|
        log_det = log_det.reshape(n, -1).sum(-1) if log_det.numel() > 1 else log_det.reshape(()).expand(n)
        standard = (unconstrained.reshape(n, -1) - self.shift) / self.scale
        return standard, -log_det - self.scale.log().sum()

    def _unstandardise(self, standard: torch.Tensor) -> torch.Tensor:
        n = standard.shape[0]
        unconstrained = (standard * self.scale + self.shift).reshape(n, *self.site.unconstrained_shape)
        return self.site.bijection(unconstrained)


class ConditionalFlow(_UnconstrainedDensity):
    """Conditional masked autoregressive flow on the standardised unconstrained value (nflows layers).

    .. math::
        \\log q(h \\mid c) = \\log \\mathcal N(f_c(u); 0, I) + \\log |\\det \\partial f_c / \\partial u|
        - \\textstyle\\sum \\log \\sigma - \\log |\\det \\partial h / \\partial u|,
        \\qquad u = (T^{-1}(h) - \\mu) / \\sigma.

    With a single feature the MADE sees no input, only the context: a conditional location-scale (or
    spline) map of a standard normal, which is what a one-dimensional site needs.
    """

    def __init__(
        self,
        context_features: int,
        site: SiteInfo,
        num_layers: int = 3,
        hidden_features: int = 32,
        transform: str = "affine",
        num_bins: int = 8,
        tail_bound: float = 5.0,
        num_blocks: int = 2,
    ) -> None:
        super().__init__(context_features, site)
        layers: list[nn.Module] = []
        for _ in range(num_layers):
            if transform == "affine":
                layer = MaskedAffineAutoregressiveTransform(
                    features=self.dim,
                    hidden_features=hidden_features,
                    context_features=context_features,
                    num_blocks=num_blocks,
                )
            elif transform == "spline":
                layer = MaskedPiecewiseRationalQuadraticAutoregressiveTransform(
                    features=self.dim,
                    hidden_features=hidden_features,
                    context_features=context_features,
                    num_bins=num_bins,
                    tails="linear",
                    tail_bound=tail_bound,
                    num_blocks=num_blocks,
                )
            else:
                raise ValueError(f"transform must be 'affine' or 'spline'; got {transform!r}")
            layers.append(layer)
            if self.dim > 1:
                layers.append(ReversePermutation(self.dim))
        self.transform = CompositeTransform(layers)

    def log_prob(self, value: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        standard, log_det = self._standardise(value)
        noise, flow_log_det = self.transform(standard, context=context)
        base = -0.5 * noise.pow(2).sum(-1) - 0.5 * self.dim * _LOG_TWO_PI
        return base + flow_log_det + log_det

    def sample(
        self, sample_shape: torch.Size, context: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        num, repeated = self._repeat_context(sample_shape, context)
        noise = torch.randn(
            repeated.shape[0], self.dim, generator=generator, dtype=context.dtype, device=context.device
        )
        standard, _ = self.transform.inverse(noise, context=repeated)
        value = self._unstandardise(standard)
        return value.reshape(*sample_shape, context.shape[0], *self.site.shape)


class ConditionalNormal(_UnconstrainedDensity):
    """Conditional full-rank Gaussian: an MLP maps the context to a location and a Cholesky factor."""

    def __init__(
        self, context_features: int, site: SiteInfo, hidden_features: int = 64, num_hidden_layers: int = 2
    ) -> None:
        super().__init__(context_features, site)
        self.num_tril = self.dim * (self.dim + 1) // 2
        self.net = _mlp(context_features, hidden_features, self.dim + self.num_tril, num_hidden_layers)

    def _network_outputs(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._memoized(context, self._compute_outputs)

    def _compute_outputs(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(context)
        return out[..., : self.dim], _tril_from_vector(out[..., self.dim :], self.dim)

    def log_prob(self, value: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        standard, log_det = self._standardise(value)
        loc, scale_tril = self._network_outputs(context)
        white = torch.linalg.solve_triangular(scale_tril, (standard - loc).unsqueeze(-1), upper=False)
        log_norm = scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        return -0.5 * white.squeeze(-1).pow(2).sum(-1) - log_norm - 0.5 * self.dim * _LOG_TWO_PI + log_det

    def sample(
        self, sample_shape: torch.Size, context: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        num = math.prod(sample_shape)
        loc, scale_tril = self._network_outputs(context)  # once per context row, not per draw
        noise = torch.randn((num,) + loc.shape, generator=generator, dtype=loc.dtype, device=loc.device)
        standard = (loc + (scale_tril @ noise.unsqueeze(-1)).squeeze(-1)).reshape(-1, self.dim)
        return self._unstandardise(standard).reshape(*sample_shape, context.shape[0], *self.site.shape)

    def moments(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and covariance of the *unconstrained* value for each context row (exact)."""
        loc, scale_tril = self._network_outputs(context)
        mean = loc * self.scale + self.shift
        scaled = scale_tril * self.scale.unsqueeze(-1)
        return mean, scaled @ scaled.transpose(-1, -2)


class ConditionalMixture(_UnconstrainedDensity):
    """K-component full-rank Gaussian mixture density network (Bishop 1994) in unconstrained space."""

    def __init__(
        self,
        context_features: int,
        site: SiteInfo,
        num_components: int = 5,
        hidden_features: int = 64,
        num_hidden_layers: int = 2,
    ) -> None:
        super().__init__(context_features, site)
        self.num_components = int(num_components)
        self.num_tril = self.dim * (self.dim + 1) // 2
        width = self.num_components * (1 + self.dim + self.num_tril)
        self.net = _mlp(context_features, hidden_features, width, num_hidden_layers)
        with torch.no_grad():  # identical components would stay identical: spread the initial locations
            locs = self.net.output_bias[self.num_components : self.num_components * (1 + self.dim)]
            locs.copy_(torch.randn(locs.shape))

    def _network_outputs(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._memoized(context, self._compute_outputs)

    def _compute_outputs(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k, d = self.num_components, self.dim
        out = self.net(context)
        logits = out[..., :k].log_softmax(-1)
        locs = out[..., k : k * (1 + d)].reshape(*out.shape[:-1], k, d)
        trils = _tril_from_vector(out[..., k * (1 + d) :].reshape(*out.shape[:-1], k, self.num_tril), d)
        return logits, locs, trils

    def log_prob(self, value: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        standard, log_det = self._standardise(value)
        logits, locs, trils = self._network_outputs(context)
        diff = (standard.unsqueeze(-2) - locs).unsqueeze(-1)
        white = torch.linalg.solve_triangular(trils, diff, upper=False).squeeze(-1)
        log_norm = trils.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        component = -0.5 * white.pow(2).sum(-1) - log_norm - 0.5 * self.dim * _LOG_TWO_PI
        return torch.logsumexp(logits + component, -1) + log_det

    def sample(
        self, sample_shape: torch.Size, context: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        num = math.prod(sample_shape)
        logits, locs, trils = self._network_outputs(context)  # once per context row, not per draw
        index = torch.multinomial(logits.exp(), num, replacement=True, generator=generator).T.reshape(-1)
        rows = torch.arange(context.shape[0], device=index.device).repeat(num)
        noise = torch.randn(
            index.shape[0], self.dim, generator=generator, dtype=locs.dtype, device=locs.device
        )
        standard = locs[rows, index] + (trils[rows, index] @ noise.unsqueeze(-1)).squeeze(-1)
        return self._unstandardise(standard).reshape(*sample_shape, context.shape[0], *self.site.shape)


# --------------------------------------------------------------------------------------------------
# categorical families
# --------------------------------------------------------------------------------------------------
class _CategoricalDensity(ConditionalDensity):
    def __init__(self, context_features: int, site: SiteInfo) -> None:
        super().__init__(context_features, site)
        if not site.is_discrete:
            raise TypeError(
                f"forward_family: {type(self).__name__} is a categorical family but site {site.name!r} is "
                f"continuous (support {site.support}); use 'flow', 'normal' or 'mixture'"
            )
        self.num_elements = site.num_elements
        self.num_categories = site.num_categories

    def _masked(self, log_prob: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return torch.where(valid, log_prob, torch.full_like(log_prob, -math.inf))

    def _draw(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One category per row of ``logits [M, K]``."""
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


class JointCategorical(_CategoricalDensity):
    """A softmax over every point of the site's product support (at most 4096 points)."""

    def __init__(
        self, context_features: int, site: SiteInfo, hidden_features: int = 64, num_hidden_layers: int = 2
    ) -> None:
        super().__init__(context_features, site)
        self.support_size = site.support_size
        if self.support_size > MAX_JOINT_SUPPORT:
            raise ValueError(
                f"forward_family: a joint categorical over site {site.name!r} needs {self.support_size} "
                f"outputs (> {MAX_JOINT_SUPPORT}); use structure='autoregressive' or 'mean_field'"
            )
        self.net = _mlp(context_features, hidden_features, self.support_size, num_hidden_layers)
        strides = self.num_categories ** torch.arange(self.num_elements - 1, -1, -1)
        self.register_buffer("strides", strides, persistent=False)

    def log_prob(self, value: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        index, valid = self.site.to_indices(value)
        flat = (index * self.strides).sum(-1)
        log_probs = self.net(context).log_softmax(-1)
        return self._masked(log_probs.gather(-1, flat.unsqueeze(-1)).squeeze(-1), valid)

    def sample(
        self, sample_shape: torch.Size, context: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        num = math.prod(sample_shape)
        probs = self._memoized(context, lambda c: self.net(c).softmax(-1))  # once per context row
        flat = torch.multinomial(probs, num, replacement=True, generator=generator).T.reshape(-1)
        index = torch.div(flat.unsqueeze(-1), self.strides, rounding_mode="floor") % self.num_categories
        return self.site.from_indices(index).reshape(*sample_shape, context.shape[0], *self.site.shape)

    def all_log_probs(self, context: torch.Tensor) -> torch.Tensor:
        """``log q`` of every support point (in :meth:`SiteInfo.support_points` order), ``[N, support]``."""
        return self.net(context).log_softmax(-1)


class MeanFieldCategorical(_CategoricalDensity):
    """Independent categoricals per element; its forward-KL optimum is the exact marginals p(h_i | s(y))."""

    def __init__(
        self, context_features: int, site: SiteInfo, hidden_features: int = 64, num_hidden_layers: int = 2
    ) -> None:
        super().__init__(context_features, site)
        width = self.num_elements * self.num_categories
        self.net = _mlp(context_features, hidden_features, width, num_hidden_layers)

    def _logits(self, context: torch.Tensor) -> torch.Tensor:
        out = self.net(context)
        return out.reshape(*out.shape[:-1], self.num_elements, self.num_categories).log_softmax(-1)

    def log_prob(self, value: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        index, valid = self.site.to_indices(value)
        picked = self._logits(context).gather(-1, index.unsqueeze(-1)).squeeze(-1)
        return self._masked(picked.sum(-1), valid)

    def sample(
        self, sample_shape: torch.Size, context: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        num = math.prod(sample_shape)
        logits = self._memoized(context, self._logits)  # [N, E, K], once per context row
        probs = logits.exp().reshape(-1, self.num_categories)
        index = torch.multinomial(probs, num, replacement=True, generator=generator)  # [N E, num]
        index = index.T.reshape(num * context.shape[0], self.num_elements)
        return self.site.from_indices(index).reshape(*sample_shape, context.shape[0], *self.site.shape)


class _MaskedLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor) -> None:
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask.to(self.weight.dtype), persistent=False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(inputs, self.weight * self.mask, self.bias)


class AutoregressiveCategorical(_CategoricalDensity):
    """Autoregressive categorical: a MADE over one-hot codes, q(h) = prod_i q(h_i | h_<i, context).

    Element ``i``'s one-hot block has degree ``i + 1``; hidden units have degrees ``0 .. E - 1``
    (degree-0 units see only the context); element ``i``'s logits read hidden units of degree
    ``<= i``, so they depend on elements ``< i`` only. The context feeds every first-layer unit.
    """

    def __init__(
        self, context_features: int, site: SiteInfo, hidden_features: int = 64, num_hidden_layers: int = 2
    ) -> None:
        super().__init__(context_features, site)
        e, k = self.num_elements, self.num_categories
        hidden_features = max(hidden_features, e)
        input_degrees = torch.arange(1, e + 1).repeat_interleave(k)
        hidden_degrees = torch.arange(hidden_features) % e
        output_degrees = torch.arange(e).repeat_interleave(k)
        self.input_layer = _MaskedLinear(
            e * k, hidden_features, hidden_degrees.unsqueeze(-1) >= input_degrees.unsqueeze(0)
        )
        self.context_layer = nn.Linear(context_features, hidden_features)
        hidden_mask = hidden_degrees.unsqueeze(-1) >= hidden_degrees.unsqueeze(0)
        self.hidden_layers = nn.ModuleList(
            _MaskedLinear(hidden_features, hidden_features, hidden_mask) for _ in range(num_hidden_layers - 1)
        )
        self.output_layer = _MaskedLinear(
            hidden_features, e * k, output_degrees.unsqueeze(-1) >= hidden_degrees.unsqueeze(0)
        )
        nn.init.zeros_(self.output_layer.weight)
        nn.init.zeros_(self.output_layer.bias)
        self.context_output = nn.Linear(context_features, e * k)

    def _logits(self, one_hot: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.input_layer(one_hot) + self.context_layer(context))
        for layer in self.hidden_layers:
            hidden = torch.relu(layer(hidden))
        out = self.output_layer(hidden) + self.context_output(context)
        return out.reshape(*out.shape[:-1], self.num_elements, self.num_categories).log_softmax(-1)

    def log_prob(self, value: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        index, valid = self.site.to_indices(value)
        one_hot = nn.functional.one_hot(index, self.num_categories).reshape(index.shape[0], -1).to(context)
        picked = self._logits(one_hot, context).gather(-1, index.unsqueeze(-1)).squeeze(-1)
        return self._masked(picked.sum(-1), valid)

    def sample(
        self, sample_shape: torch.Size, context: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        num, repeated = self._repeat_context(sample_shape, context)
        rows = repeated.shape[0]
        e, k = self.num_elements, self.num_categories
        index = torch.zeros(rows, e, dtype=torch.long, device=context.device)
        one_hot = repeated.new_zeros(rows, e * k)
        for element in range(e):
            logits = self._logits(one_hot, repeated)[:, element]
            index[:, element] = self._draw(logits, generator)
            one_hot[:, element * k : (element + 1) * k] = nn.functional.one_hot(index[:, element], k)
        return self.site.from_indices(index).reshape(*sample_shape, context.shape[0], *self.site.shape)


# --------------------------------------------------------------------------------------------------
# family factories
# --------------------------------------------------------------------------------------------------
class FlowFamily:
    """Factory of :class:`ConditionalFlow` densities (the default for continuous forward sites).

    :param int num_layers: autoregressive layers (each followed by a reverse permutation).
    :param int hidden_features: width of each MADE.
    :param str transform: ``"affine"`` (MAF) or ``"spline"`` (rational-quadratic, linear tails).
    :param int num_bins: spline bins.
    :param float tail_bound: spline interval in standardised units.

    Example::

        guide = HybridGuide(model, ["scale"], forward_family=FlowFamily(transform="spline"))

    References: arXiv:1705.07057 (MAF); arXiv:1906.04032 (neural spline flows).
    """

    def __init__(
        self,
        num_layers: int = 3,
        hidden_features: int = 32,
        transform: str = "affine",
        num_bins: int = 8,
        tail_bound: float = 5.0,
    ) -> None:
        if transform not in ("affine", "spline"):
            raise ValueError(f"transform must be 'affine' or 'spline'; got {transform!r}")
        self.options = dict(
            num_layers=num_layers,
            hidden_features=hidden_features,
            transform=transform,
            num_bins=num_bins,
            tail_bound=tail_bound,
        )

    def __call__(self, context_features: int, site: SiteInfo) -> ConditionalFlow:
        return ConditionalFlow(context_features, site, **self.options)


class NormalFamily:
    """Factory of :class:`ConditionalNormal` densities (full-rank Gaussian in unconstrained space).

    :param int hidden_features: width of the MLP from the context to the location and Cholesky factor.
    :param int num_hidden_layers: its depth (a linear skip connection is always present).

    Example::

        guide = HybridGuide(model, ["d"], forward_family=NormalFamily(hidden_features=16))

    References: arXiv:1805.11542 (FAVI).
    """

    def __init__(self, hidden_features: int = 64, num_hidden_layers: int = 2) -> None:
        self.options = dict(hidden_features=hidden_features, num_hidden_layers=num_hidden_layers)

    def __call__(self, context_features: int, site: SiteInfo) -> ConditionalNormal:
        return ConditionalNormal(context_features, site, **self.options)


class MixtureFamily:
    """Factory of :class:`ConditionalMixture` densities (mixture density network, Bishop 1994).

    :param int num_components: Gaussian components K (full covariance each).

    Example::

        guide = HybridGuide(model, ["offset"], forward_family=MixtureFamily(num_components=3))

    References: arXiv:1805.11542 (FAVI).
    """

    def __init__(
        self, num_components: int = 5, hidden_features: int = 64, num_hidden_layers: int = 2
    ) -> None:
        if num_components < 1:
            raise ValueError(f"num_components must be >= 1; got {num_components}")
        self.options = dict(
            num_components=num_components,
            hidden_features=hidden_features,
            num_hidden_layers=num_hidden_layers,
        )

    def __call__(self, context_features: int, site: SiteInfo) -> ConditionalMixture:
        return ConditionalMixture(context_features, site, **self.options)


class CategoricalFamily:
    """Factory of categorical densities for discrete sites with finite support.

    :param str structure: ``"auto"`` (joint if the product support has at most 4096 points, else
        autoregressive), ``"joint"``, ``"autoregressive"`` or ``"mean_field"``.

    Example::

        guide = HybridGuide(net, ["delay"], forward_family=CategoricalFamily("mean_field"))

    References: arXiv:2406.02545; Germain et al., arXiv:1502.03509 (MADE).
    """

    _STRUCTURES = ("auto", "joint", "autoregressive", "mean_field")

    def __init__(
        self, structure: str = "auto", hidden_features: int = 64, num_hidden_layers: int = 2
    ) -> None:
        if structure not in self._STRUCTURES:
            raise ValueError(f"structure must be one of {self._STRUCTURES}; got {structure!r}")
        self.structure = structure
        self.options = dict(hidden_features=hidden_features, num_hidden_layers=num_hidden_layers)

    def __call__(self, context_features: int, site: SiteInfo) -> ConditionalDensity:
        structure = self.structure
        if structure == "auto" and site.is_discrete:
            structure = "joint" if site.support_size <= MAX_JOINT_SUPPORT else "autoregressive"
        cls = {
            "auto": JointCategorical,
            "joint": JointCategorical,
            "autoregressive": AutoregressiveCategorical,
        }
        cls["mean_field"] = MeanFieldCategorical
        return cls[structure](context_features, site, **self.options)


_NAMED_FAMILIES: dict[str, Callable[[], Callable[[int, SiteInfo], nn.Module]]] = {
    "flow": FlowFamily,
    "normal": NormalFamily,
    "mixture": MixtureFamily,
    "categorical": CategoricalFamily,
}


def _is_improper_spec(spec: Any) -> str | None:
    """Why ``spec`` cannot be a forward family (a Delta, an autoguide, a bare distribution), or None."""
    from pyro.distributions import Delta, ImproperUniform
    from pyro.infer.autoguide import AutoGuide

    if inspect.isclass(spec):
        if issubclass(spec, AutoGuide):
            return (
                f"{spec.__name__} is an autoguide: autoguides emit Delta sites at the model's names, whose "
                "forward-KL (CSIS) loss is infinite; a forward family must be a proper density"
            )
        if issubclass(spec, (Delta, ImproperUniform)):
            return (
                f"{spec.__name__} is not a proper density; forward KL needs one (flow, mixture, categorical)"
            )
        if issubclass(spec, torch.distributions.Distribution):
            return (
                f"{spec.__name__} is a distribution class, not a family factory "
                "family(context_features, site) -> module"
            )
    if isinstance(spec, (torch.distributions.Distribution, nn.Module)):
        return (
            f"got an instance of {type(spec).__name__}; pass a factory family(context_features, site) "
            "-> module "
            "or one of " + ", ".join(repr(k) for k in _NAMED_FAMILIES)
        )
    return None


def validate_family_spec(spec: Any) -> None:
    """Raise ``ValueError``/``TypeError`` (naming ``forward_family``) for a spec that cannot work."""
    if isinstance(spec, dict):
        for value in spec.values():
            validate_family_spec(value)
        return
    if isinstance(spec, str):
        if spec != "auto" and spec not in _NAMED_FAMILIES:
            raise ValueError(
                f"forward_family must be 'auto', one of {sorted(_NAMED_FAMILIES)}, a callable "
                f"family(context_features, site) or a dict of those per site; got {spec!r}"
            )
        return
    reason = _is_improper_spec(spec)
    if reason is not None:
        raise ValueError(f"forward_family: {reason}")
    if not callable(spec):
        raise TypeError(f"forward_family must be a string, a callable or a dict; got {type(spec).__name__}")


def resolve_family(spec: Any, context_features: int, site: SiteInfo) -> nn.Module:
    """Build the density module of ``site`` from a family spec and check it is a proper density."""
    if isinstance(spec, dict):
        spec = spec.get(site.name, "auto")
    validate_family_spec(spec)
    if spec == "auto":
        spec = "categorical" if site.is_discrete else "flow"
    if isinstance(spec, str):
        if spec == "categorical" and not site.is_discrete:
            raise TypeError(
                f"forward_family='categorical' on continuous site {site.name!r} (support {site.support}); "
                "use 'flow', 'normal' or 'mixture'"
            )
        if spec != "categorical" and site.is_discrete:
            raise TypeError(
                f"forward_family={spec!r} is a continuous family but site {site.name!r} is discrete "
                f"(support {site.support}); use 'categorical'"
            )
        spec = _NAMED_FAMILIES[spec]()
    module = spec(context_features, site)
    check_density_module(module, context_features, site)
    return module


def sample_density(
    module: nn.Module, sample_shape: torch.Size, context: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """Call ``module.sample(sample_shape, context)``, passing ``generator`` if the module accepts it."""
    accepts = getattr(module, "_accepts_generator", None)
    if accepts is None:
        try:
            parameters = inspect.signature(module.sample).parameters
            accepts = "generator" in parameters or any(
                p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
            )
        except (TypeError, ValueError):
            accepts = False
        try:
            module._accepts_generator = accepts
        except AttributeError:
            pass
    if accepts:
        return module.sample(sample_shape, context, generator=generator)
    if generator is not None:
        with torch.random.fork_rng(devices=[] if context.device.type == "cpu" else [context.device]):
            torch.manual_seed(int(torch.randint(2**62, (), generator=generator)))
            return module.sample(sample_shape, context)
    return module.sample(sample_shape, context)


def check_density_module(module: Any, context_features: int, site: SiteInfo) -> None:
    """Probe a family's module: it must sample the site's shape and give finite log densities."""
    from pyro.distributions import Delta

    if isinstance(module, Delta) or not (hasattr(module, "log_prob") and hasattr(module, "sample")):
        raise ValueError(
            f"forward_family returned {type(module).__name__} for site {site.name!r}; it must be a "
            "module with "
            "log_prob(value, context) and sample(sample_shape, context) giving a proper density"
        )
    parameters = list(module.parameters()) + list(module.buffers()) if isinstance(module, nn.Module) else []
    dtype = next((p.dtype for p in parameters if p.is_floating_point()), torch.get_default_dtype())
    device = parameters[0].device if parameters else None
    context = torch.zeros(3, context_features, dtype=dtype, device=device)
    with torch.no_grad():
        value = sample_density(module, torch.Size(), context, None)
        if tuple(value.shape) != (3, *site.shape):
            raise ValueError(
                f"forward_family's module for site {site.name!r} sampled shape {tuple(value.shape)}; "
                "expected "
                f"{(3, *site.shape)} for 3 contexts"
            )
        log_prob = module.log_prob(value, context)
    if tuple(log_prob.shape) != (3,) or not torch.isfinite(log_prob).all():
        raise ValueError(
            f"forward_family's module for site {site.name!r} is not a proper density: log_prob of its own "
            f"samples is {log_prob.tolist() if log_prob.numel() < 10 else log_prob.shape}"
        )
