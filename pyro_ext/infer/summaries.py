"""Summary (embedding) networks s_eta(y) for the forward-KL stage of ``HybridGuide``.

A summary network has two parts, so that the simulation bank can store compact features rather than
raw data (at N = 50 nodes and T = 300 steps the raw series of 10^5 simulations would not fit in memory):

- :meth:`SummaryNetwork.features` -- a fixed, parameter-free map from the observed sites
  ``dict[str, Tensor[B, ...]]`` to features ``[B, F]``; computed once per simulation;
- :meth:`SummaryNetwork.forward` -- the trainable map ``[B, F] -> [B, C]``, trained jointly with the
  forward density in stage 1 and frozen afterwards. Standardisation statistics of the features are
  buffers set from the simulation bank.

Built-ins (design note §2.2): ``"identity"`` (flatten, standardise), ``"mlp"`` (flatten, standardise,
2 x 256 ReLU, 64 outputs; at most 4096 observed numbers) and ``"timeseries"`` (series ``[..., T, N]``
-> normalised auto- and cross-correlations at lags -8..8 -> the same MLP). Any ``nn.Module`` taking
the observed dict and returning ``[B, C]`` works as well (:class:`ModuleSummary` wraps it).

References: Ambrogioni et al., arXiv:2406.02545; Ambrogioni et al., arXiv:1805.11542.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

__all__ = [
    "IdentitySummary",
    "MLPSummary",
    "ModuleSummary",
    "SummaryNetwork",
    "TimeSeriesSummary",
    "build_summary",
]

#: the largest flattened observation the default MLP summary accepts (design note §2.2)
MAX_MLP_INPUTS = 4096


class SummaryNetwork(nn.Module):
    """Base class: fixed features, standardisation buffers, trainable embedding.

    :param dict observed_shapes: shape of one data set's value at each observed site, in order.
    """

    def __init__(self, observed_shapes: Mapping[str, torch.Size]) -> None:
        super().__init__()
        self.observed_shapes = {name: torch.Size(shape) for name, shape in observed_shapes.items()}
        self.in_features = self._feature_dim()
        self.register_buffer("feature_shift", torch.zeros(self.in_features))
        self.register_buffer("feature_scale", torch.ones(self.in_features))

    out_features: int

    def _feature_dim(self) -> int:
        return sum(math.prod(shape) for shape in self.observed_shapes.values())

    def features(self, observed: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Fixed features ``[B, F]`` of a batch of observed data sets (flattened and concatenated)."""
        first = next(iter(self.observed_shapes))
        batch = observed[first].shape[0]
        return torch.cat([observed[name].reshape(batch, -1) for name in self.observed_shapes], -1)

    def set_statistics(self, features: torch.Tensor) -> None:
        """Standardisation buffers from the simulation bank's features ``[M, F]``."""
        scale = features.std(0)
        self.feature_shift.copy_(features.mean(0))
        self.feature_scale.copy_(torch.where(scale > 1e-8, scale, torch.ones_like(scale)))

    def standardise(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.feature_shift) / self.feature_scale


class IdentitySummary(SummaryNetwork):
    """The standardised flattened observations themselves (a sufficient summary, untrained)."""

    def __init__(self, observed_shapes: Mapping[str, torch.Size]) -> None:
        super().__init__(observed_shapes)
        self.out_features = self.in_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.standardise(features)


def _summary_mlp(in_features: int, hidden_features: int, out_features: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_features, hidden_features),
        nn.ReLU(),
        nn.Linear(hidden_features, hidden_features),
        nn.ReLU(),
        nn.Linear(hidden_features, out_features),
    )


class MLPSummary(SummaryNetwork):
    """Standardised flattened observations through a 2-hidden-layer ReLU MLP (256 wide, 64 outputs).

    :param dict observed_shapes: shape of one data set at each observed site.
    :param int hidden_features: hidden width.
    :param int out_features: summary width C.

    Example::

        summary = MLPSummary({"y": torch.Size([2])})
        summary(summary.features({"y": torch.randn(5, 2)})).shape  # (5, 64)

    References: arXiv:2406.02545 (summary network s_eta).
    """

    def __init__(
        self, observed_shapes: Mapping[str, torch.Size], hidden_features: int = 256, out_features: int = 64
    ) -> None:
        super().__init__(observed_shapes)
        if self.in_features > MAX_MLP_INPUTS:
            raise ValueError(
                f"summary_net='mlp' takes at most {MAX_MLP_INPUTS} observed numbers; the observed sites hold "
                f"{self.in_features}. Use summary_net='timeseries' for [..., T, N] series or pass an "
                "nn.Module"
            )
        self.out_features = int(out_features)
        self.net = _summary_mlp(self.in_features, hidden_features, out_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(self.standardise(features))


class TimeSeriesSummary(SummaryNetwork):
    """Normalised lagged auto- and cross-correlations of ``[..., T, N]`` series, then an MLP.

    Each series is centred and scaled over time; for every pair ``i < j`` the features hold
    :math:`\\hat\\rho_{ij}(k) = \\frac{1}{T - |k|} \\sum_t x_i(t) x_j(t + k)` at lags
    ``k = -L..L`` and for every node the autocorrelations at ``k = 1..L`` (``L = min(8, T - 1)``),
    the information a measurement delay leaves in second-order statistics. For two nodes and
    ``L = 8`` these are the 33 numbers of the design note's §4.1.

    :param dict observed_shapes: each observed site must have at least two dimensions ``[..., T, N]``.
    :param int max_lag: largest lag L.

    Example::

        summary = TimeSeriesSummary({"y": torch.Size([300, 2])})
        summary.in_features  # 33

    References: arXiv:2406.02545 (time-shifted signals).
    """

    def __init__(
        self,
        observed_shapes: Mapping[str, torch.Size],
        max_lag: int = 8,
        hidden_features: int = 256,
        out_features: int = 64,
    ) -> None:
        for name, shape in observed_shapes.items():
            if len(shape) < 2:
                raise ValueError(
                    f"summary_net='timeseries' needs observed sites shaped [..., T, N]; site {name!r} has "
                    f"shape {tuple(shape)}"
                )
        self.max_lag = int(max_lag)
        super().__init__(observed_shapes)
        self.out_features = int(out_features)
        self.net = _summary_mlp(self.in_features, hidden_features, out_features)

    def _lags(self, steps: int) -> int:
        return max(0, min(self.max_lag, steps - 1))

    def _feature_dim(self) -> int:
        total = 0
        for shape in self.observed_shapes.values():
            steps, nodes = shape[-2], shape[-1]
            lag = self._lags(steps)
            per_series = nodes * (nodes - 1) // 2 * (2 * lag + 1) + nodes * lag
            total += math.prod(shape[:-2]) * per_series
        return total

    def features(self, observed: Mapping[str, torch.Tensor]) -> torch.Tensor:
        pieces = []
        for name, shape in self.observed_shapes.items():
            value = observed[name]
            batch = value.shape[0]
            steps, nodes = shape[-2], shape[-1]
            series = value.reshape(batch, -1, steps, nodes)
            series = series - series.mean(-2, keepdim=True)
            series = series / series.std(-2, keepdim=True).clamp_min(1e-8)
            lag = self._lags(steps)
            rows, cols = torch.triu_indices(nodes, nodes, offset=1, device=value.device)
            forward_lags, backward_lags, auto = [], [], []
            for k in range(lag + 1):
                product = series[..., : steps - k, :].transpose(-1, -2) @ series[..., k:, :] / (steps - k)
                forward_lags.append(product[..., rows, cols])  # x_i(t) x_j(t + k)
                if k > 0:
                    backward_lags.append(product[..., cols, rows])  # x_j(t) x_i(t + k): lag -k of (i, j)
                    auto.append(product.diagonal(dim1=-2, dim2=-1))
            cross = torch.stack(backward_lags[::-1] + forward_lags, -1)  # [B, R, pairs, 2L + 1]
            parts = [cross.reshape(batch, -1)]
            if auto:
                parts.append(torch.stack(auto, -1).reshape(batch, -1))
            pieces.append(torch.cat(parts, -1))
        return torch.cat(pieces, -1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(self.standardise(features))


class ModuleSummary(SummaryNetwork):
    """Wraps a user's ``nn.Module`` mapping ``dict[str, Tensor[B, ...]] -> Tensor[B, C]``.

    The bank stores the flattened observations; the module receives them unflattened, in their
    original shapes, and does its own normalisation.
    """

    def __init__(self, observed_shapes: Mapping[str, torch.Size], module: nn.Module) -> None:
        super().__init__(observed_shapes)
        self.module = module
        probe = {
            name: torch.zeros(2, *shape, dtype=self._dtype(), device=self.feature_shift.device)
            for name, shape in self.observed_shapes.items()
        }
        with torch.no_grad():
            out = module(probe)
        if not torch.is_tensor(out) or out.dim() != 2 or out.shape[0] != 2:
            raise ValueError(
                "summary_net: a custom module must map dict[str, Tensor[B, ...]] to Tensor[B, C]; "
                "for a batch "
                f"of 2 it returned {type(out).__name__} of shape {getattr(out, 'shape', None)}"
            )
        self.out_features = int(out.shape[1])

    def _dtype(self) -> torch.dtype:
        for parameter in self.module.parameters():
            if parameter.is_floating_point():
                return parameter.dtype
        return torch.get_default_dtype()

    def set_statistics(self, features: torch.Tensor) -> None:
        """Custom modules normalise their inputs themselves: the buffers stay at zero and one."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch = features.shape[0]
        observed, start = {}, 0
        for name, shape in self.observed_shapes.items():
            size = math.prod(shape)
            observed[name] = features[:, start : start + size].reshape(batch, *shape)
            start += size
        return self.module(observed)


def build_summary(spec: object, observed_shapes: Mapping[str, torch.Size]) -> SummaryNetwork:
    """Summary network from ``summary_net`` (None, ``"identity"``, ``"mlp"``, ``"timeseries"`` or a "
    "module)."""
    if spec is None:
        spec = "mlp"
    if isinstance(spec, SummaryNetwork):
        return spec
    if isinstance(spec, nn.Module):
        return ModuleSummary(observed_shapes, spec)
    if spec == "identity":
        return IdentitySummary(observed_shapes)
    if spec == "mlp":
        return MLPSummary(observed_shapes)
    if spec == "timeseries":
        return TimeSeriesSummary(observed_shapes)
    raise ValueError(
        "summary_net must be None, 'identity', 'mlp', 'timeseries' or an nn.Module mapping "
        f"dict[str, Tensor[B, ...]] -> Tensor[B, C]; got {spec!r}"
    )
