"""Embedded-model flows: a structured layer inside a MAF or NSF stack, and a Pyro model as a base density.

:func:`emf_flow` places a :class:`~pyro_ext.flows.structured.StructuredTransform` (or its gated version)
on the data side of an autoregressive stack (EMF-T / GEMF-T), in its middle (EMF-M / GEMF-M), or on the
noise side, where it turns the base distribution into the model (B-MAF). :class:`ModelDistribution` is
that last case as an nflows ``Distribution``: the Pyro model's log joint and ancestral samples.

References: Silvestri, Fertig, Moore, Ambrogioni, *Embedded-model flows*, arXiv:2110.06021.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from nflows.distributions.base import Distribution
from nflows.distributions.normal import StandardNormal
from nflows.flows.base import Flow
from nflows.transforms.autoregressive import (
    MaskedAffineAutoregressiveTransform,
    MaskedPiecewiseRationalQuadraticAutoregressiveTransform,
)
from nflows.transforms.base import CompositeTransform, Transform
from nflows.transforms.normalization import ActNorm
from nflows.transforms.permutations import ReversePermutation
from nflows.utils import torchutils
from torch import Tensor

from pyro_ext.flows.structured import SiteInfo, StructuredTransform, _ModelProgram, _support_transform

__all__ = ["ModelDistribution", "backbone_flow", "emf_flow"]

Position = Literal["top", "middle", "bottom"]
Backbone = Literal["maf", "nsf"]


class ModelDistribution(_ModelProgram, Distribution):
    r"""A Pyro model as an nflows base ``Distribution`` over its packed latent sites.

    ``log_prob(x)`` is the model's log joint density of its latent sites at ``unpack(x)``, computed by
    Pyro's own ``log_prob`` of each site's conditional,

    .. math:: \log p(x) = \sum_j \log p_j(x_j \mid \pi_j),

    and ``sample(n)`` draws ancestrally with each distribution's own sampler. Observed and deterministic
    sites are constants. Sites need no noise<->value map here (a Gamma site is fine), but must be
    continuous. The layout, batch handling, lifted parameters and ``context_to_kwargs`` are those of
    :class:`~pyro_ext.flows.structured.StructuredTransform`; built from a structured layer, the
    distribution shares its model, parameters and layout.

    :param model: a Pyro model, or a :class:`~pyro_ext.flows.structured.StructuredTransform` to share.
    :param args: model arguments (not allowed with a structured layer).
    :param str coordinates: ``"value"`` or ``"unconstrained"`` (the density of
        ``biject_to(support)^{-1}`` of the values, with its Jacobian); ignored with a structured layer,
        whose coordinates are used.
    :param bool lift_params: see :class:`~pyro_ext.flows.structured.StructuredTransform`.
    :param context_to_kwargs: see :class:`~pyro_ext.flows.structured.StructuredTransform`.
    :param max_plate_nesting: see :class:`~pyro_ext.flows.structured.StructuredTransform`.
    :param bool ignore_factors: see :class:`~pyro_ext.flows.structured.StructuredTransform`.
    :param kwargs: model keyword arguments (not allowed with a structured layer).

    Example::

        base = ModelDistribution(random_walk)
        flow = Flow(MaskedAffineAutoregressiveTransform(base.features, 64), base)   # B-MAF
        flow.log_prob(x)

    References: arXiv:2110.06021.
    """

    def __init__(
        self,
        model: Callable[..., Any] | StructuredTransform,
        *args: Any,
        coordinates: Literal["value", "unconstrained"] = "value",
        lift_params: bool = True,
        context_to_kwargs: Callable[[Tensor], Mapping[str, Any]] | None = None,
        max_plate_nesting: int | None = None,
        ignore_factors: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if isinstance(model, StructuredTransform):
            if args or kwargs:
                raise ValueError("model arguments cannot be given with a structured layer; it has its own")
            self.structured = model
            self.coordinates = model.coordinates
            self.features = model.features
            return
        if coordinates not in ("value", "unconstrained"):
            raise ValueError(f"coordinates must be 'value' or 'unconstrained', got {coordinates!r}")
        self.structured = None
        self.coordinates = coordinates
        self._build_program(
            model,
            args,
            kwargs,
            lift_params=lift_params,
            context_to_kwargs=context_to_kwargs,
            max_plate_nesting=max_plate_nesting,
            ignore_factors=ignore_factors,
        )

    @property
    def _program(self) -> _ModelProgram:
        return self if self.structured is None else self.structured

    @property
    def sites(self) -> tuple[SiteInfo, ...]:
        return self._program._sites

    def pack(self, values: Mapping[str, Tensor]) -> Tensor:
        return _ModelProgram.pack(self._program, values)

    def unpack(self, inputs: Tensor) -> dict[str, Tensor]:
        return _ModelProgram.unpack(self._program, inputs)

    def _log_prob(self, inputs: Tensor, context: Tensor | None) -> Tensor:
        program = self._program
        program._check_width(inputs)
        program._check_finite(inputs)
        return _ModelProgram.model_log_prob(program, inputs, context).to(inputs.dtype)

    def _sample(self, num_samples: int, context: Tensor | None) -> Tensor:
        program = self._program
        if context is None:
            batch = num_samples
        else:
            batch = context.shape[0] * num_samples
            context = torchutils.repeat_rows(context, num_reps=num_samples)
        unconstrained = self.coordinates == "unconstrained"
        drawn: dict[str, Tensor] = {}

        def visit(info: SiteInfo, fn: Any) -> Tensor:
            target = torch.Size([batch, *([1] * info.pad), *info.batch_shape])
            batch_shape = torch.broadcast_shapes(fn.batch_shape, target)
            site_fn = fn if fn.batch_shape == batch_shape else fn.expand(batch_shape)
            value = site_fn.rsample() if site_fn.has_rsample else site_fn.sample()
            drawn[info.name] = value
            if unconstrained:
                transform = _support_transform(fn)
                if transform is not None:
                    drawn[info.name] = transform.inv(value)
            return value

        program._run_pass(visit, context)
        samples = torch.cat([drawn[s.name].reshape(batch, s.numel) for s in program.sites], dim=-1)
        if context is not None:
            samples = torchutils.split_leading_dim(samples, [-1, num_samples])
        return samples

    def extra_repr(self) -> str:
        return f"features={self.features}, coordinates={self.coordinates!r}"


def _backbone_layer(
    backbone: str,
    features: int,
    hidden_features: int,
    num_bins: int,
    tail_bound: float,
    context_features: int | None,
) -> Transform:
    if backbone == "maf":
        # num_blocks=1 without residual blocks: two hidden layers of hidden_features (the EMF backbone).
        return MaskedAffineAutoregressiveTransform(
            features=features,
            hidden_features=hidden_features,
            context_features=context_features,
            num_blocks=1,
            use_residual_blocks=False,
        )
    return MaskedPiecewiseRationalQuadraticAutoregressiveTransform(
        features=features,
        hidden_features=hidden_features,
        context_features=context_features,
        num_bins=num_bins,
        tails="linear",
        tail_bound=tail_bound,
        num_blocks=1,
        use_residual_blocks=False,
    )


def _backbone_blocks(
    features: int,
    backbone: str,
    num_layers: int,
    hidden_features: int,
    num_bins: int,
    tail_bound: float,
    actnorm: bool,
    context_features: int | None,
) -> list[list[Transform]]:
    if backbone not in ("maf", "nsf"):
        raise ValueError(f"backbone must be 'maf' or 'nsf', got {backbone!r}")
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    if not isinstance(hidden_features, int) or hidden_features < 1:
        raise ValueError(f"hidden_features must be a positive int, got {hidden_features!r}")
    if backbone == "nsf" and (not isinstance(num_bins, int) or num_bins < 1 or not tail_bound > 0):
        raise ValueError(
            f"num_bins must be a positive int and tail_bound positive, got {num_bins}, {tail_bound}"
        )
    blocks: list[list[Transform]] = []
    for index in range(num_layers):
        block: list[Transform] = [] if index == 0 else [ReversePermutation(features)]
        if actnorm:
            block.append(ActNorm(features))
        block.append(
            _backbone_layer(backbone, features, hidden_features, num_bins, tail_bound, context_features)
        )
        blocks.append(block)
    return blocks


def backbone_flow(
    features: int,
    backbone: Backbone = "maf",
    num_layers: int = 2,
    hidden_features: int = 512,
    num_bins: int = 32,
    tail_bound: float = 5.0,
    actnorm: bool = False,
    context_features: int | None = None,
) -> Flow:
    """The baseline at equal backbone: :func:`emf_flow`'s stack without the structured layer,
    ``[B_1, R, B_2, ...]`` on a standard normal (MAF, MAF-L with more layers, or NSF).

    :param int features: the data width ``D``.
    :param backbone: see :func:`emf_flow` (and the remaining options).

    Example::

        maf = backbone_flow(layer.features, hidden_features=256)
        emf = emf_flow(layer, hidden_features=256)    # the same backbone plus the model

    References: arXiv:2110.06021 (the MAF / NSF baselines of the EMF experiments).
    """
    if not isinstance(features, int) or features < 1:
        raise ValueError(f"features must be a positive int, got {features!r}")
    blocks = _backbone_blocks(
        features, backbone, num_layers, hidden_features, num_bins, tail_bound, actnorm, context_features
    )
    return Flow(CompositeTransform([t for block in blocks for t in block]), StandardNormal([features]))


def emf_flow(
    structured: Transform,
    position: Position = "top",
    backbone: Backbone = "maf",
    num_layers: int = 2,
    hidden_features: int = 512,
    num_bins: int = 32,
    tail_bound: float = 5.0,
    actnorm: bool = False,
    context_features: int | None = None,
) -> Flow:
    r"""An embedded-model flow: a structured layer placed in a MAF or NSF stack, on a standard normal.

    Lists run from the data side to the noise side (``R`` = ``ReversePermutation``, ``B_i`` = backbone
    layers):

    - ``"top"``: ``[S, B_1, R, B_2, ...]`` (EMF-T / GEMF-T): the flow's last, generative step is the model;
    - ``"middle"``: ``[B_1, S, R, B_2, ...]`` (EMF-M / GEMF-M; ``S`` after the first half of the layers);
    - ``"bottom"``: ``[B_1, R, B_2, ..., S]`` (B-MAF): the same density as the backbone over
      :class:`ModelDistribution`, the model as base distribution.

    The data follow ``structured.pack``'s layout, and the MADE degrees follow that same order.

    :param structured: a :class:`~pyro_ext.flows.structured.StructuredTransform` or
        :class:`~pyro_ext.flows.structured.GatedStructuredTransform` (gated for Gaussian priors, ungated
        for mixtures, as in the original experiments), or any transform with a ``features`` attribute.
    :param str position: ``"top"``, ``"middle"`` or ``"bottom"``.
    :param str backbone: ``"maf"`` (``MaskedAffineAutoregressiveTransform`` with two hidden layers) or
        ``"nsf"`` (``MaskedPiecewiseRationalQuadraticAutoregressiveTransform``, linear tails).
    :param int num_layers: number of backbone layers.
    :param int hidden_features: width of the MADE hidden layers.
    :param int num_bins: spline bins (NSF).
    :param float tail_bound: spline interval half-width (NSF).
    :param bool actnorm: put an ``ActNorm`` before each backbone layer.
    :param context_features: width of a context fed to the backbone layers (``None``: unconditional).
    :return: ``Flow(CompositeTransform(layers), StandardNormal([D]))``.

    Example::

        layer = GatedStructuredTransform(random_walk)
        flow = emf_flow(layer, position="top", backbone="maf", hidden_features=256)
        loss = -flow.log_prob(batch).mean()

    References: arXiv:2110.06021 (EMF-T, EMF-M, GEMF, B-MAF).
    """
    features = getattr(structured, "features", None)
    if not isinstance(structured, Transform) or not isinstance(features, int):
        raise TypeError(
            "structured must be an nflows Transform with an int `features` (e.g. StructuredTransform)"
        )
    if position not in ("top", "middle", "bottom"):
        raise ValueError(f"position must be 'top', 'middle' or 'bottom', got {position!r}")
    blocks = _backbone_blocks(
        features, backbone, num_layers, hidden_features, num_bins, tail_bound, actnorm, context_features
    )
    if position == "top":
        split = 0
    elif position == "middle":
        split = max(1, num_layers // 2)
    else:
        split = num_layers
    layers: list[Transform] = [t for block in blocks[:split] for t in block]
    layers.append(structured)
    layers.extend(t for block in blocks[split:] for t in block)
    return Flow(CompositeTransform(layers), StandardNormal([features]))
