r"""Hand-written structured layers for common priors: the fast paths of embedded-model flows.

Each class is an nflows ``Transform`` (``forward`` = data -> noise) equal, up to rounding, to the
generic :class:`~pyro_ext.flows.structured.StructuredTransform` (or its gated version) built from the
Pyro model that :meth:`pyro_model` returns, with the parameters that :attr:`parameter_map` names. They
skip tracing and effect handlers, and vectorise what the generic layer runs site by site:

- :class:`GaussianChainTransform` — continuity (order 1) and smoothness (order 2) priors of time
  series: :math:`x_t \sim \mathcal N(x_{t-1}, \mathrm{diag}\, s^2)` or
  :math:`x_t \sim \mathcal N(2x_{t-1} - x_{t-2}, \mathrm{diag}\, s^2)`;
- :class:`HierarchicalGaussianTransform` — a group mean and members around it,
  :math:`x_0 \sim \mathcal N(0, s_0^2)`, :math:`x_j \sim \mathcal N(x_0, s_1^2)`;
- :class:`IndependentMixtureTransform` — a 1-D Gaussian mixture per dimension (the multimodal prior).

*Gates* (``gated=True``) mix each site's map with the identity, as in
:class:`~pyro_ext.flows.structured.GatedStructuredTransform`: with :math:`\lambda = \mathrm{sigmoid}(\tau w)`,
:math:`u = \lambda f(\varepsilon) + (1 - \lambda)\varepsilon`. For a Gaussian site with mean :math:`\mu`
and scale :math:`\sigma` this is affine, :math:`\varepsilon = (u - \lambda\mu)/(\lambda\sigma + 1 - \lambda)`;
for the mixture it takes one bracketed root solve per direction.

References: Silvestri, Fertig, Moore, Ambrogioni, *Embedded-model flows*, arXiv:2110.06021 (the
continuity, smoothness, hierarchical and multimodal priors of its experiments).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from nflows.transforms.base import Transform
from pyro.distributions import constraints
from torch import Tensor, nn

from pyro_ext.flows._univariate import log_sigmoid, univariate_numerics
from pyro_ext.flows.roots import implicit_step, monotone_root
from pyro_ext.flows.site_maps import MixtureBijector

__all__ = ["GaussianChainTransform", "HierarchicalGaussianTransform", "IndependentMixtureTransform"]

GateKind = Literal["site", "element"]


def _inverse_softplus(value: float | Tensor) -> Tensor:
    value = torch.as_tensor(value, dtype=torch.get_default_dtype())
    return value + torch.log(-torch.expm1(-value))


class _FastPath(Transform):
    """Shared argument checks, gate bookkeeping and the bridge to the generic layer."""

    features: int

    def _setup_gates(self, gated: bool, gate: GateKind, gate_init: float, gate_temperature: float) -> None:
        if gate not in ("site", "element"):
            raise ValueError(f"gate must be 'site' or 'element', got {gate!r}")
        if not 0.0 < float(gate_init) < 1.0:
            raise ValueError(f"gate_init must lie in (0, 1), got {gate_init!r}")
        if not float(gate_temperature) > 0.0:
            raise ValueError(f"gate_temperature must be positive, got {gate_temperature!r}")
        self.gated = bool(gated)
        self.gate = gate
        self.gate_init = float(gate_init)
        self.gate_temperature = float(gate_temperature)
        self._initial_gate_logit = math.log(self.gate_init / (1.0 - self.gate_init)) / self.gate_temperature

    def _gate_parameter(self, site_shape: tuple[int, ...], sites: int | None = None) -> nn.Parameter:
        shape = () if self.gate == "site" else site_shape
        if sites is not None:
            shape = (sites, *shape)
        return nn.Parameter(torch.full(shape, self._initial_gate_logit))

    def _log_gates(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        scaled = self.gate_temperature * logits
        return log_sigmoid(scaled), log_sigmoid(-scaled)

    def _check_inputs(self, inputs: Tensor) -> None:
        if not isinstance(inputs, Tensor) or inputs.dim() != 2 or inputs.shape[-1] != self.features:
            shape = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
            raise ValueError(f"inputs must have shape [batch, {self.features}]; got {shape}")
        if not torch.isfinite(inputs).all():
            raise ValueError("inputs contain non-finite values (NaN or inf)")

    # -- the generic counterpart ---------------------------------------------------------------------

    def pyro_model(self) -> Any:
        """The Pyro model this layer is the structured layer of, with the current parameter values as
        the initial values of its ``pyro.param`` statements (a picklable callable)."""
        raise NotImplementedError

    @property
    def parameter_map(self) -> dict[str, list[str]]:
        """``{own parameter name: [generic parameter names]}``: stacking the generic layer's parameters
        (``named_parameters()`` of the layer built by :meth:`to_generic`) along a new first dim (or
        taking the single one) gives this layer's parameter; the parametrisations are the same
        (``softplus_positive`` scales, gate logits :math:`w`), so values and gradients correspond."""
        raise NotImplementedError

    def to_generic(self, **options: Any) -> Transform:
        """The generic (gated) structured layer of :meth:`pyro_model`, with this layer's parameters.

        :param options: further keyword arguments of the generic layer (``compile``, ``vectorize``...).
        """
        from pyro_ext.flows.structured import GatedStructuredTransform, StructuredTransform

        if self.gated:
            generic = GatedStructuredTransform(
                self.pyro_model(),
                gate=self.gate,
                gate_init=self.gate_init,
                gate_temperature=self.gate_temperature,
                **options,
            )
        else:
            generic = StructuredTransform(self.pyro_model(), **options)
        self.copy_parameters_to(generic)
        return generic.to(self._reference().dtype)

    def copy_parameters_to(self, generic: nn.Module) -> None:
        """Write this layer's parameters into the generic layer, following :attr:`parameter_map`."""
        targets = dict(generic.named_parameters())
        own = dict(self.named_parameters())
        with torch.no_grad():
            for name, generic_names in self.parameter_map.items():
                missing = [n for n in generic_names if n not in targets]
                if missing:
                    raise ValueError(
                        f"the generic layer has no parameters {missing}; it has {sorted(targets)}"
                    )
                pieces = own[name] if len(generic_names) == 1 else own[name].unbind(0)
                if len(generic_names) == 1:
                    pieces = [pieces]
                for generic_name, piece in zip(generic_names, pieces):
                    targets[generic_name].copy_(piece)

    def generic_view(self, generic: nn.Module, gradients: bool = False) -> dict[str, Tensor]:
        """The generic layer's parameters (or their ``.grad``) assembled in this layer's shapes."""
        targets = dict(generic.named_parameters())
        view = {}
        for name, generic_names in self.parameter_map.items():
            tensors = [targets[n].grad if gradients else targets[n] for n in generic_names]
            view[name] = tensors[0] if len(tensors) == 1 else torch.stack(tensors)
        return view

    def _reference(self) -> Tensor:
        for tensor in list(self.parameters()) + list(self.buffers()):
            if tensor.is_floating_point():
                return tensor
        return torch.empty(0)


# =========================================================================================== chains


class _ChainModel:
    """``x_0 (, x_1) ~ N(0, I)``, then ``x_t ~ N(x_{t-1}, s^2)`` or ``N(2 x_{t-1} - x_{t-2}, s^2)``."""

    def __init__(self, steps: int, dim: int, order: int, scale: Tensor) -> None:
        self.steps, self.dim, self.order, self.scale = steps, dim, order, scale

    def __call__(self) -> None:
        scale = pyro.param("scale", self.scale, constraint=constraints.softplus_positive)
        zeros = scale.new_zeros(self.dim)
        history = []
        for t in range(self.steps):
            if t < self.order:
                fn = dist.Normal(zeros, 1.0).to_event(1)
            elif self.order == 1:
                fn = dist.Normal(history[-1], scale).to_event(1)
            else:
                fn = dist.Normal(2 * history[-1] - history[-2], scale).to_event(1)
            history.append(pyro.sample(f"x_{t}", fn))


class GaussianChainTransform(_FastPath):
    r"""Continuity (``order=1``) or smoothness (``order=2``) prior of a ``d``-dimensional series of
    length ``T`` as a structured layer.

    .. math::

        x_0 \sim \mathcal N(0, I),\; x_t \sim \mathcal N(x_{t-1}, \mathrm{diag}\,s^2) \quad (\text{order } 1),
        \qquad
        x_0, x_1 \sim \mathcal N(0, I),\; x_t \sim \mathcal N(2x_{t-1} - x_{t-2}, \mathrm{diag}\,s^2)
        \quad (\text{order } 2),

    with :math:`s = \mathrm{softplus}(\cdot)` initialised at ``init_scale``. Data are ``[B, T d]``,
    time-major (the layout of the generic layer's sites ``x_0 ... x_{T-1}``). The ungated inverse is a
    cumulative sum (order 2: of cumulative sums); the gated forward is
    :math:`\varepsilon_t = (x_t - \lambda_t \mu_t)/(\lambda_t s + 1 - \lambda_t)` with :math:`\mu_t` the
    conditional mean, and the gated inverse runs the recursion over time.

    :param int steps: :math:`T \ge 1`.
    :param int dim: :math:`d \ge 1`.
    :param int order: 1 (continuity) or 2 (smoothness).
    :param bool gated: mix each site with the identity through a learned gate.
    :param str gate: ``"site"`` (one gate per time step) or ``"element"`` (one per coordinate).
    :param float gate_init: initial :math:`\lambda`.
    :param float gate_temperature: :math:`\tau`.
    :param float init_scale: initial :math:`s`.

    Example::

        layer = GaussianChainTransform(30, 3, order=1, gated=True)
        flow = Flow(CompositeTransform([layer, MaskedAffineAutoregressiveTransform(90, 512)]),
                    StandardNormal([90]))

    References: arXiv:2110.06021 (continuity and smoothness priors).
    """

    def __init__(
        self,
        steps: int,
        dim: int,
        order: int = 1,
        *,
        gated: bool = False,
        gate: GateKind = "site",
        gate_init: float = 0.999,
        gate_temperature: float = 100.0,
        init_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if order not in (1, 2):
            raise ValueError(f"order must be 1 (continuity) or 2 (smoothness), got {order!r}")
        if not float(init_scale) > 0:
            raise ValueError(f"init_scale must be positive, got {init_scale!r}")
        self.steps, self.dim, self.order = steps, dim, order
        self.features = steps * dim
        self.raw_scale = nn.Parameter(_inverse_softplus(init_scale).expand(dim).clone())
        self._setup_gates(gated, gate, gate_init, gate_temperature)
        if self.gated:
            self.gate_logits = self._gate_parameter((dim,), sites=steps)

    @property
    def scale(self) -> Tensor:
        """:math:`s`, shape ``[d]``."""
        return F.softplus(self.raw_scale)

    def _scales(self) -> Tensor:
        """Per-step scales ``[T, d]``: 1 for the first ``order`` steps, :math:`s` after."""
        scale = self.scale
        ones = scale.new_ones(min(self.order, self.steps), self.dim)
        return torch.cat([ones, scale.expand(self.steps - ones.shape[0], self.dim)])

    def _means(self, x: Tensor) -> Tensor:
        """Conditional means ``[B, T, d]`` read from the data (all steps at once)."""
        means = torch.zeros_like(x)
        if self.order == 1:
            means[:, 1:] = x[:, :-1]
        else:
            means[:, 2:] = 2 * x[:, 1:-1] - x[:, :-2]
        return means

    def _gate_terms(self, scales: Tensor) -> tuple[Tensor, Tensor]:
        """``(lambda [T, d or 1], log(lambda s + 1 - lambda) [T, d])``."""
        logits = self.gate_logits if self.gate == "element" else self.gate_logits.unsqueeze(-1)
        log_gate, log_one_minus_gate = self._log_gates(logits)
        return log_gate.exp(), torch.logaddexp(log_gate + scales.log(), log_one_minus_gate)

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check_inputs(inputs)
        x = inputs.reshape(-1, self.steps, self.dim)
        scales = self._scales()
        if self.gated:
            gate, log_slope = self._gate_terms(scales)
            noise = (x - gate * self._means(x)) * torch.exp(-log_slope)
        else:
            log_slope = scales.log()
            noise = (x - self._means(x)) / scales
        logabsdet = (-log_slope.sum()).expand(inputs.shape[0])
        return noise.reshape(inputs.shape), logabsdet

    def inverse(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check_inputs(inputs)
        noise = inputs.reshape(-1, self.steps, self.dim)
        scales = self._scales()
        if self.gated:
            gate, log_slope = self._gate_terms(scales)
            gate = gate.expand(self.steps, self.dim)
            innovations = noise * log_slope.exp()
            values = []
            for t in range(self.steps):
                if t < self.order:
                    mean = torch.zeros_like(innovations[:, t])
                elif self.order == 1:
                    mean = values[-1]
                else:
                    mean = 2 * values[-1] - values[-2]
                values.append(gate[t] * mean + innovations[:, t])
            x = torch.stack(values, dim=1)
        else:
            log_slope = scales.log()
            innovations = noise * scales
            if self.order == 1:
                x = innovations.cumsum(dim=1)
            else:
                # Differences d_t = x_t - x_{t-1} follow d_t = d_{t-1} + s eps_t from d_1 = x_1 - x_0.
                first = innovations[:, :1]
                steps = innovations[:, 1:].clone()
                steps[:, :1] = steps[:, :1] - first
                x = torch.cat([first, first + steps.cumsum(dim=1).cumsum(dim=1)], dim=1)
        logabsdet = log_slope.sum().expand(inputs.shape[0])
        return x.reshape(inputs.shape), logabsdet

    def pyro_model(self) -> _ChainModel:
        return _ChainModel(self.steps, self.dim, self.order, self.scale.detach().clone())

    @property
    def parameter_map(self) -> dict[str, list[str]]:
        mapping = {"raw_scale": ["unconstrained_params.scale"]}
        if self.gated:
            mapping["gate_logits"] = [f"gate_logits.x_{t}" for t in range(self.steps)]
        return mapping

    def extra_repr(self) -> str:
        return f"steps={self.steps}, dim={self.dim}, order={self.order}, gated={self.gated}"


# =========================================================================================== hierarchy


class _HierarchyModel:
    """``mean ~ N(0, s_0^2)``; in a plate of ``groups - 1``: ``members ~ N(mean, s_1^2)``."""

    def __init__(self, groups: int, dim: int, root_scale: Tensor | None, member_scale: Tensor | None) -> None:
        self.groups, self.dim = groups, dim
        self.root_scale, self.member_scale = root_scale, member_scale

    def __call__(self) -> None:
        if self.root_scale is not None:
            root_scale = pyro.param("root_scale", self.root_scale, constraint=constraints.softplus_positive)
            member_scale = pyro.param(
                "member_scale", self.member_scale, constraint=constraints.softplus_positive
            )
            zeros = root_scale.new_zeros(self.dim)
        else:
            root_scale = member_scale = 1.0
            zeros = torch.zeros(self.dim)
        mean = pyro.sample("mean", dist.Normal(zeros, root_scale).to_event(1))
        with pyro.plate("members_plate", self.groups - 1):
            pyro.sample("members", dist.Normal(mean, member_scale).to_event(1))


class HierarchicalGaussianTransform(_FastPath):
    r"""A hierarchical Gaussian prior over ``L`` blocks of ``D`` features: a group mean and ``L - 1``
    members drawn around it,

    .. math:: x_0 \sim \mathcal N(0, \mathrm{diag}\,s_0^2), \qquad
              x_j \sim \mathcal N(x_0, \mathrm{diag}\,s_1^2), \quad j = 1, \dots, L - 1,

    with :math:`s_0 = s_1 = 1` unless ``trainable_scales`` (then softplus-parametrised vectors initialised
    at 1). Data are ``[B, L D]``, block 0 the mean (the layout of the generic layer's sites ``mean`` and
    ``members``, the latter in a plate). Both directions are one vectorised affine map.

    :param int groups: :math:`L \ge 2` blocks, including the mean.
    :param int dim: :math:`D \ge 1` features per block.
    :param bool trainable_scales: learn :math:`s_0` and :math:`s_1`.
    :param bool gated: gate the two sites (``"site"``: one gate each; ``"element"``: one per feature).

    Example::

        layer = HierarchicalGaussianTransform(20, 64, gated=True)   # digits groups: [mean, 19 members]

    References: arXiv:2110.06021 (hierarchical prior of the grouped-data experiments).
    """

    def __init__(
        self,
        groups: int,
        dim: int,
        *,
        trainable_scales: bool = False,
        gated: bool = False,
        gate: GateKind = "site",
        gate_init: float = 0.999,
        gate_temperature: float = 100.0,
    ) -> None:
        super().__init__()
        if not isinstance(groups, int) or groups < 2:
            raise ValueError(f"groups must be an int >= 2 (the mean and at least one member), got {groups!r}")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.groups, self.dim = groups, dim
        self.features = groups * dim
        self.trainable_scales = bool(trainable_scales)
        if self.trainable_scales:
            self.raw_root_scale = nn.Parameter(_inverse_softplus(1.0).expand(dim).clone())
            self.raw_member_scale = nn.Parameter(_inverse_softplus(1.0).expand(dim).clone())
        else:
            self.register_buffer("_unit", torch.ones(()), persistent=False)
        self._setup_gates(gated, gate, gate_init, gate_temperature)
        if self.gated:
            self.gate_logits = nn.ParameterDict(
                {"mean": self._gate_parameter((dim,)), "members": self._gate_parameter((groups - 1, dim))}
            )

    def _scales(self) -> tuple[Tensor, Tensor]:
        if self.trainable_scales:
            return F.softplus(self.raw_root_scale), F.softplus(self.raw_member_scale)
        return self._unit, self._unit

    def _slopes(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """``((lambda_0, log slope_0), (lambda_1, log slope_1))``; ungated: lambda = 1."""
        root_scale, member_scale = self._scales()
        if not self.gated:
            one = root_scale.new_ones(())
            return (one, root_scale.log()), (one, member_scale.log())
        terms = []
        for key, scale in (("mean", root_scale), ("members", member_scale)):
            log_gate, log_one_minus_gate = self._log_gates(self.gate_logits[key])
            terms.append((log_gate.exp(), torch.logaddexp(log_gate + scale.log(), log_one_minus_gate)))
        return terms[0], terms[1]

    def _log_det(self, root_log_slope: Tensor, member_log_slope: Tensor) -> Tensor:
        root = root_log_slope.expand(self.dim).sum()
        members = member_log_slope.expand(self.groups - 1, self.dim).sum()
        return root + members

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check_inputs(inputs)
        x = inputs.reshape(-1, self.groups, self.dim)
        (_, root_log_slope), (member_gate, member_log_slope) = self._slopes()
        mean, members = x[:, :1], x[:, 1:]
        noise = torch.cat(
            [
                mean * torch.exp(-root_log_slope),
                (members - member_gate * mean) * torch.exp(-member_log_slope),
            ],
            dim=1,
        )
        logabsdet = (-self._log_det(root_log_slope, member_log_slope)).expand(inputs.shape[0])
        return noise.reshape(inputs.shape), logabsdet

    def inverse(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check_inputs(inputs)
        noise = inputs.reshape(-1, self.groups, self.dim)
        (_, root_log_slope), (member_gate, member_log_slope) = self._slopes()
        mean = noise[:, :1] * root_log_slope.exp()
        members = member_gate * mean + noise[:, 1:] * member_log_slope.exp()
        logabsdet = self._log_det(root_log_slope, member_log_slope).expand(inputs.shape[0])
        return torch.cat([mean, members], dim=1).reshape(inputs.shape), logabsdet

    def pyro_model(self) -> _HierarchyModel:
        if self.trainable_scales:
            root_scale, member_scale = (s.detach().clone() for s in self._scales())
            return _HierarchyModel(self.groups, self.dim, root_scale, member_scale)
        return _HierarchyModel(self.groups, self.dim, None, None)

    @property
    def parameter_map(self) -> dict[str, list[str]]:
        mapping = {}
        if self.trainable_scales:
            mapping["raw_root_scale"] = ["unconstrained_params.root_scale"]
            mapping["raw_member_scale"] = ["unconstrained_params.member_scale"]
        if self.gated:
            mapping["gate_logits.mean"] = ["gate_logits.mean"]
            mapping["gate_logits.members"] = ["gate_logits.members"]
        return mapping

    def extra_repr(self) -> str:
        scales = "trainable" if self.trainable_scales else "fixed"
        return f"groups={self.groups}, dim={self.dim}, scales={scales}, gated={self.gated}"


# =========================================================================================== mixtures


class _MixtureModel:
    """``x ~ prod_d MixtureSameFamily(Categorical(logits_d), Normal(locs_d, scales_d))``."""

    def __init__(self, logits: Tensor, locs: Tensor, scales: Tensor) -> None:
        self.logits, self.locs, self.scales = logits, locs, scales

    def __call__(self) -> None:
        logits = pyro.param("logits", self.logits)
        locs = pyro.param("locs", self.locs)
        scales = pyro.param("scales", self.scales, constraint=constraints.softplus_positive)
        mixture = dist.MixtureSameFamily(dist.Categorical(logits=logits), dist.Normal(locs, scales))
        pyro.sample("x", mixture.to_event(1))


class IndependentMixtureTransform(_FastPath):
    r"""A ``K``-component 1-D Gaussian mixture for each of ``D`` dimensions as a structured layer (the
    multimodal prior of EMF's 2-D toys).

    .. math:: x_d \sim \sum_k \mathrm{softmax}(a_d)_k\, \mathcal N(m_{dk}, s_{dk}^2),

    initialised with uniform logits, locations ``linspace(-radius, radius, K)`` and scales ``init_scale``
    (softplus-parametrised). ``forward`` is the closed-form :math:`\Phi^{-1}(F(x))`; ``inverse`` solves
    :math:`F(x) = \Phi(\varepsilon)` per element (bracketed Chandrupatla, implicit gradients). Gated,
    ``inverse`` applies the gate after that one solve and ``forward`` solves
    :math:`\lambda y + (1-\lambda) f^{-1}(y) = u` for :math:`y = f(\varepsilon)` once (never nested).

    :param int dim: :math:`D`.
    :param int components: :math:`K` (100 in EMF's toys).
    :param float radius: half-width of the initial locations (4 for EMF's toys).
    :param float init_scale: initial component scale.
    :param bool gated: gate the site (EMF runs mixtures ungated).

    Example::

        layer = IndependentMixtureTransform(2, components=100)

    References: arXiv:2110.06021 (multimodal prior, 100 components).
    """

    def __init__(
        self,
        dim: int,
        components: int = 100,
        *,
        radius: float = 4.0,
        init_scale: float = 3.0,
        gated: bool = False,
        gate: GateKind = "site",
        gate_init: float = 0.999,
        gate_temperature: float = 100.0,
    ) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not isinstance(components, int) or components < 1:
            raise ValueError(f"components must be a positive int, got {components!r}")
        if not float(init_scale) > 0:
            raise ValueError(f"init_scale must be positive, got {init_scale!r}")
        self.dim, self.components = dim, components
        self.features = dim
        self.logits = nn.Parameter(torch.zeros(dim, components))
        locs = torch.linspace(-float(radius), float(radius), components)
        self.locs = nn.Parameter(locs.expand(dim, components).clone())
        self.raw_scales = nn.Parameter(_inverse_softplus(init_scale).expand(dim, components).clone())
        self._setup_gates(gated, gate, gate_init, gate_temperature)
        if self.gated:
            self.gate_logits = self._gate_parameter((dim,))

    def _bijector(self) -> MixtureBijector:
        mixture = dist.MixtureSameFamily(
            dist.Categorical(logits=self.logits), dist.Normal(self.locs, F.softplus(self.raw_scales))
        )
        return MixtureBijector(mixture, univariate_numerics(mixture.component_distribution))

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check_inputs(inputs)
        bijector = self._bijector()
        if not self.gated:
            noise, ladj = bijector.to_noise(inputs)
            return noise, ladj.sum(-1)
        log_gate, log_one_minus_gate = self._log_gates(self.gate_logits)
        gate, one_minus_gate = log_gate.exp(), log_one_minus_gate.exp()
        # Solve lambda y + (1 - lambda) f^{-1}(y) = u for y = f(eps); eps lies between f^{-1}(u) and u.
        with torch.no_grad():
            u, gate_d, one_minus_gate_d = inputs.detach(), gate.detach(), one_minus_gate.detach()
            anchor, _ = bijector.to_noise(u)
            lower, _ = bijector.value_bracket(torch.minimum(anchor, u))
            _, upper = bijector.value_bracket(torch.maximum(anchor, u))
            root = monotone_root(
                lambda y: gate_d * y + one_minus_gate_d * bijector.to_noise(y)[0] - u, lower, upper
            )
        noise_at_root, log_inverse_slope = bijector.to_noise(root)
        residual = gate * root + one_minus_gate * noise_at_root - inputs
        y = implicit_step(root, residual, gate + one_minus_gate * log_inverse_slope.exp())
        noise, log_inverse_slope = bijector.to_noise(y)
        # du/deps = lambda f'(eps) + 1 - lambda, with f'(eps) = 1 / (f^{-1})'(y).
        ladj = -torch.logaddexp(log_gate - log_inverse_slope, log_one_minus_gate)
        return noise, ladj.expand(inputs.shape).sum(-1)

    def inverse(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check_inputs(inputs)
        value, ladj = self._bijector().to_value(inputs)
        if not self.gated:
            return value, ladj.sum(-1)
        log_gate, log_one_minus_gate = self._log_gates(self.gate_logits)
        u = log_gate.exp() * value + log_one_minus_gate.exp() * inputs
        ladj = torch.logaddexp(log_gate + ladj, log_one_minus_gate)
        return u, ladj.expand(inputs.shape).sum(-1)

    def pyro_model(self) -> _MixtureModel:
        return _MixtureModel(
            self.logits.detach().clone(),
            self.locs.detach().clone(),
            F.softplus(self.raw_scales).detach().clone(),
        )

    @property
    def parameter_map(self) -> dict[str, list[str]]:
        mapping = {
            "logits": ["unconstrained_params.logits"],
            "locs": ["unconstrained_params.locs"],
            "raw_scales": ["unconstrained_params.scales"],
        }
        if self.gated:
            mapping["gate_logits"] = ["gate_logits.x"]
        return mapping

    def extra_repr(self) -> str:
        return f"dim={self.dim}, components={self.components}, gated={self.gated}"
