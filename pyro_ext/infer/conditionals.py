"""Stage-2 conditional guides q_psi(z | h, y_o) of :class:`~pyro_ext.infer.hybrid.HybridGuide`.

The remaining latent sites z are flattened into one unconstrained vector (as in Pyro's
``AutoContinuous``) and given a Gaussian whose parameters depend on the forward sites h:

- :class:`AmortizedConditional` -- one map for every h (design note §2.4):
  :math:`z \\sim \\mathcal N(m + W e(h),\\; L L^\\top)` with ``e(h)`` the standardised h (continuous
  values in unconstrained space, one-hot codes for discrete values; ``encoder="linear"``) or that
  plus a ReLU layer of it (``encoder="mlp"``); ``L`` full or low rank plus diagonal; with
  ``heteroscedastic=True`` the diagonal scale is :math:`\\exp(V e(h))` times a base scale.
- :class:`PerSupportConditional` -- one Gaussian per point of the support kept from q_phi(h | y_o)
  (discrete h), the points weighted by q_phi renormalised.
- :class:`PerSampleConditional` -- one Gaussian per draw of K draws h_k ~ q_phi fixed at the start of
  stage 2 (repeated discrete draws merge with count weights).

A factory ``factory(model) -> AutoGuide`` builds one Pyro autoguide per component on the model
conditioned on that component's h.

These spec objects are what ``HybridGuide(conditional_guide=...)`` accepts besides the strings
``"amortized"``, ``"per_support"``, ``"per_sample"`` and ``"auto"``; the guide turns them into the
``PyroModule`` s below when stage 2 starts, once the data set and q_phi(h | y_o) are known.

References: Ambrogioni et al., arXiv:2406.02545 (the hybrid scheme; this parametrisation is our
reconstruction, see the design note).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints as pyro_constraints
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.nn import PyroModule, PyroParam
from torch.distributions import constraints

from pyro_ext.infer.site_info import SiteInfo

__all__ = [
    "AmortizedConditional",
    "ConditionalSpec",
    "PerSampleConditional",
    "PerSupportConditional",
    "PointMass",
    "resolve_conditional_spec",
]


@dataclass(frozen=True)
class ConditionalSpec:
    """Options shared by the built-in Gaussian conditional guides.

    :param str covariance: ``"full"`` (Cholesky factor) or ``"lowrank"`` (rank ``rank`` plus diagonal).
    :param int rank: rank of the low-rank factor (default ``ceil(sqrt(latent_dim))``).
    """

    covariance: str = "full"
    rank: int | None = None

    def __post_init__(self) -> None:
        if self.covariance not in ("full", "lowrank"):
            raise ValueError(
                f"conditional_guide: covariance must be 'full' or 'lowrank'; got {self.covariance!r}"
            )
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"conditional_guide: rank must be >= 1; got {self.rank}")

    kind = "base"


@dataclass(frozen=True)
class AmortizedConditional(ConditionalSpec):
    """Spec of the amortized conditional guide (the default for continuous forward sites).

    :param str encoder: ``"linear"`` (standardised h) or ``"mlp"`` (standardised h and one ReLU layer of it).
    :param bool heteroscedastic: make the diagonal scale depend on h.
    :param int hidden_features: width of the MLP encoder's hidden layer.

    Example::

        guide = HybridGuide(model, ["d"], conditional_guide=AmortizedConditional(encoder="mlp"))
    """

    encoder: str = "linear"
    heteroscedastic: bool = False
    hidden_features: int = 32
    kind = "amortized"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encoder not in ("linear", "mlp"):
            raise ValueError(f"conditional_guide: encoder must be 'linear' or 'mlp'; got {self.encoder!r}")


@dataclass(frozen=True)
class PerSupportConditional(ConditionalSpec):
    """Spec of one Gaussian per kept support point of q_phi(h | y_o) (the default for discrete h)."""

    kind = "per_support"


@dataclass(frozen=True)
class PerSampleConditional(ConditionalSpec):
    """Spec of one Gaussian per draw h_k ~ q_phi(h | y_o), k = 1..K (``num_conditional_samples``)."""

    kind = "per_sample"


def resolve_conditional_spec(spec: object, all_discrete: bool) -> ConditionalSpec | Callable:
    """A spec object (or a factory) from ``conditional_guide``; ``"auto"`` depends on the forward sites."""
    if isinstance(spec, ConditionalSpec):
        return spec
    if spec == "auto":
        return PerSupportConditional() if all_discrete else AmortizedConditional()
    named = {"amortized": AmortizedConditional, "per_support": PerSupportConditional}
    named["per_sample"] = PerSampleConditional
    if isinstance(spec, str):
        if spec not in named:
            raise ValueError(
                "conditional_guide must be 'auto', 'amortized', 'per_support', 'per_sample', a spec such as "
                f"AmortizedConditional(...), or a factory(model) -> AutoGuide; got {spec!r}"
            )
        return named[spec]()
    if callable(spec):
        return spec
    raise TypeError(
        f"conditional_guide must be a string, a spec or a callable factory; got {type(spec).__name__}"
    )


def _to_batch(tensor: torch.Tensor, batch_shape: Sequence[int], event_dims: int) -> torch.Tensor:
    """Reshape the rows of ``tensor [M, *event]`` (or a shared ``[*event]``) to ``batch_shape``."""
    batch_shape = torch.Size(batch_shape)
    event = tensor.shape[tensor.dim() - event_dims :]
    rows = math.prod(tensor.shape[: tensor.dim() - event_dims])
    if rows == math.prod(batch_shape):
        return tensor.reshape(batch_shape + event)
    if rows == 1:
        return tensor.reshape(event).expand(batch_shape + event)
    raise ValueError(f"cannot arrange {rows} Gaussian rows as batch shape {tuple(batch_shape)}")


class PointMass(TorchDistribution):
    """A point mass at ``value`` that keeps ``value`` 's dtype (Pyro's ``Delta`` takes the log of it).

    ``log_prob`` is 0 at the point and -inf elsewhere, in the default floating dtype.
    """

    arg_constraints: dict = {}
    has_rsample = True

    def __init__(
        self, value: torch.Tensor, event_dim: int = 0, support: constraints.Constraint | None = None
    ):
        self.value = value
        self._support = support or constraints.independent(constraints.real, event_dim)
        batch_shape = value.shape[: value.dim() - event_dim]
        event_shape = value.shape[value.dim() - event_dim :]
        super().__init__(batch_shape, event_shape, validate_args=False)

    @property
    def support(self) -> constraints.Constraint:
        return self._support

    def expand(self, batch_shape: Sequence[int], _instance: object = None) -> PointMass:
        batch_shape = torch.Size(batch_shape)
        return PointMass(
            self.value.expand(batch_shape + self.event_shape), len(self.event_shape), self._support
        )

    def rsample(self, sample_shape: Sequence[int] = ()) -> torch.Tensor:
        return self.value.expand(torch.Size(sample_shape) + self.value.shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        equal = value == self.value
        if len(self.event_shape):
            equal = equal.reshape(equal.shape[: equal.dim() - len(self.event_shape)] + (-1,)).all(-1)
        dtype = self.value.dtype if self.value.is_floating_point() else torch.get_default_dtype()
        zero = torch.zeros((), dtype=dtype, device=equal.device)
        return torch.where(equal, zero, torch.full_like(zero, -math.inf))


# --------------------------------------------------------------------------------------------------
# Gaussian modules
# --------------------------------------------------------------------------------------------------
class _GaussianConditional(PyroModule):
    """Common parts: the latent layout, covariance parametrisation and sampling."""

    def __init__(self, spec: ConditionalSpec, latent_dim: int) -> None:
        super().__init__()
        self.spec = spec
        self.latent_dim = int(latent_dim)
        self.rank = spec.rank or max(1, math.ceil(math.sqrt(self.latent_dim)))

    def _covariance_params(self, batch: tuple[int, ...], init_scale: float, like: torch.Tensor) -> None:
        d = self.latent_dim
        if self.spec.covariance == "full":
            eye = torch.eye(d, dtype=like.dtype, device=like.device) * init_scale
            # event_dim covers the component dimension too: it is not a plate, so Pyro must not check it
            # against the (particle) plates the guide runs in
            self.scale_tril = PyroParam(
                eye.expand(*batch, d, d).clone(), constraints.lower_cholesky, event_dim=2 + len(batch)
            )
        else:
            factor = torch.zeros(*batch, d, self.rank, dtype=like.dtype, device=like.device)
            self.cov_factor = PyroParam(factor, event_dim=2 + len(batch))
            scale = torch.full((*batch, d), init_scale, dtype=like.dtype, device=like.device)
            self.scale = PyroParam(scale, pyro_constraints.softplus_positive, event_dim=1 + len(batch))

    @staticmethod
    def _gather(value: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        return value if index is None else value[index]

    def _make_distribution(
        self,
        loc: torch.Tensor,
        index: torch.Tensor | None,
        log_scale_shift: torch.Tensor | None,
        batch_shape: Sequence[int] | None = None,
    ) -> TorchDistribution:
        """The Gaussian with rows ``[M]`` (or reshaped to ``batch_shape``, one row per element)."""
        dim = self.latent_dim
        if self.spec.covariance == "full":
            scale_tril = self._gather(self.scale_tril, index)
            if log_scale_shift is not None:
                scale_tril = log_scale_shift.exp().unsqueeze(-1) * scale_tril
            if batch_shape is not None:
                loc, scale_tril = _to_batch(loc, batch_shape, 1), _to_batch(scale_tril, batch_shape, 2)
            return dist.MultivariateNormal(loc, scale_tril=scale_tril, validate_args=False)
        cov_factor = self._gather(self.cov_factor, index)
        scale = self._gather(self.scale, index)
        if log_scale_shift is not None:
            scale = scale * log_scale_shift.exp()
        cov_diag = scale.pow(2).expand(loc.shape[:-1] + (dim,))
        if batch_shape is not None:
            loc, cov_diag = _to_batch(loc, batch_shape, 1), _to_batch(cov_diag, batch_shape, 1)
            cov_factor = _to_batch(cov_factor, batch_shape, 2)
        return dist.LowRankMultivariateNormal(
            loc, cov_factor=cov_factor, cov_diag=cov_diag, validate_args=False
        )

    @staticmethod
    def sample_from(distribution: TorchDistribution, generator: torch.Generator | None) -> torch.Tensor:
        """Reparameterised draw from a (batched) Gaussian with an explicit generator."""
        loc = distribution.loc
        if isinstance(distribution, dist.LowRankMultivariateNormal):
            rank = distribution.cov_factor.shape[-1]
            eps_w = torch.randn(
                loc.shape[:-1] + (rank,), generator=generator, dtype=loc.dtype, device=loc.device
            )
            eps_d = torch.randn(loc.shape, generator=generator, dtype=loc.dtype, device=loc.device)
            factor_term = (distribution.cov_factor @ eps_w.unsqueeze(-1)).squeeze(-1)
            return loc + factor_term + distribution.cov_diag.sqrt() * eps_d
        eps = torch.randn(loc.shape, generator=generator, dtype=loc.dtype, device=loc.device)
        return loc + (distribution.scale_tril @ eps.unsqueeze(-1)).squeeze(-1)


class AmortizedGaussianModule(_GaussianConditional):
    """:math:`z \\mid h \\sim \\mathcal N(m + W e(h), \\Sigma(h))`, one parameter set for every h."""

    def __init__(
        self,
        spec: AmortizedConditional,
        forward_sites: Sequence[SiteInfo],
        latent_dim: int,
        init_loc: torch.Tensor,
        init_scale: float,
        encoding_mean: torch.Tensor,
        encoding_scale: torch.Tensor,
        context: torch.Tensor,
    ) -> None:
        super().__init__(spec, latent_dim)
        self.forward_sites = list(forward_sites)
        raw_dim = sum(site.encoding_dim for site in self.forward_sites)
        self.register_buffer("bound_context", context.detach().clone())
        self.register_buffer("encoding_mean", encoding_mean.detach().clone())
        self.register_buffer("encoding_scale", encoding_scale.detach().clone())
        encoded_dim = raw_dim
        if spec.encoder == "mlp":
            hidden = spec.hidden_features
            bound = 1.0 / math.sqrt(max(raw_dim, 1))
            weight = (
                torch.rand(hidden, raw_dim, dtype=init_loc.dtype, device=init_loc.device) * 2 - 1
            ) * bound
            self.encoder_weight = PyroParam(weight, event_dim=2)
            self.encoder_bias = PyroParam(
                torch.zeros(hidden, dtype=init_loc.dtype, device=init_loc.device), event_dim=1
            )
            encoded_dim += hidden
        self.encoded_dim = encoded_dim
        self.loc = PyroParam(init_loc.detach().clone(), event_dim=1)
        self.weight = PyroParam(init_loc.new_zeros(latent_dim, encoded_dim), event_dim=2)
        if spec.heteroscedastic:
            self.scale_weight = PyroParam(init_loc.new_zeros(latent_dim, encoded_dim), event_dim=2)
        self._covariance_params((), init_scale, init_loc)

    def encode(self, forward_values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``e(h)`` ``[M, encoded_dim]`` for forward values ``{site: [M, *shape]}``."""
        dtype = self.encoding_mean.dtype
        raw = torch.cat([site.encode(forward_values[site.name], dtype) for site in self.forward_sites], -1)
        standard = (raw - self.encoding_mean) / self.encoding_scale
        if self.spec.encoder == "mlp":
            hidden = torch.relu(standard @ self.encoder_weight.T + self.encoder_bias)
            return torch.cat([standard, hidden], -1)
        return standard

    def distribution(
        self, forward_values: Mapping[str, torch.Tensor], batch_shape: Sequence[int] | None = None
    ) -> TorchDistribution:
        """q_psi(z | h) for a batch ``{site: [M, *shape]}`` of forward values, batch shape ``[M]``.

        ``batch_shape`` (with ``M`` elements, or any shape if ``M = 1``) reshapes the batch.
        """
        encoded = self.encode(forward_values)
        loc = self.loc + encoded @ self.weight.T
        shift = encoded @ self.scale_weight.T if self.spec.heteroscedastic else None
        return self._make_distribution(loc, None, shift, batch_shape)


class ComponentGaussianModule(_GaussianConditional):
    """One Gaussian per component (kept support point or fixed draw of h), gathered by index."""

    def __init__(
        self,
        spec: ConditionalSpec,
        forward_sites: Sequence[SiteInfo],
        latent_dim: int,
        init_loc: torch.Tensor,
        init_scale: float,
        component_values: Mapping[str, torch.Tensor],
        log_weights: torch.Tensor,
        context: torch.Tensor,
    ) -> None:
        super().__init__(spec, latent_dim)
        self.forward_sites = list(forward_sites)
        self.num_components = int(log_weights.shape[0])
        self.register_buffer("bound_context", context.detach().clone())
        self.register_buffer("log_weights", log_weights.detach().clone())
        for index, site in enumerate(self.forward_sites):
            self.register_buffer(f"component_values_{index}", component_values[site.name].detach().clone())
        self.loc = PyroParam(init_loc.detach().expand(self.num_components, latent_dim).clone(), event_dim=2)
        self._covariance_params((self.num_components,), init_scale, init_loc)

    def component_values(self) -> dict[str, torch.Tensor]:
        return {
            site.name: getattr(self, f"component_values_{i}") for i, site in enumerate(self.forward_sites)
        }

    def distribution(
        self, index: torch.Tensor, batch_shape: Sequence[int] | None = None
    ) -> TorchDistribution:
        """q_psi(z | h_c) for component indices ``[M]``, batch shape ``[M]`` (or ``batch_shape``)."""
        return self._make_distribution(self.loc[index], index, None, batch_shape)


class FactoryComponentsModule(PyroModule):
    """One user autoguide per component, each built by ``factory(conditioned_model)``."""

    def __init__(
        self,
        factory: Callable,
        model: Callable,
        forward_sites: Sequence[SiteInfo],
        component_values: Mapping[str, torch.Tensor],
        log_weights: torch.Tensor,
        context: torch.Tensor,
    ) -> None:
        super().__init__()
        self.forward_sites = list(forward_sites)
        self.num_components = int(log_weights.shape[0])
        self.register_buffer("bound_context", context.detach().clone())
        self.register_buffer("log_weights", log_weights.detach().clone())
        for index, site in enumerate(self.forward_sites):
            self.register_buffer(f"component_values_{index}", component_values[site.name].detach().clone())
        values = self.component_values()
        for component in range(self.num_components):
            data = {name: value[component] for name, value in values.items()}
            guide = factory(pyro.poutine.condition(model, data=data))
            from pyro.infer.autoguide import AutoGuide, AutoMessenger

            if not isinstance(guide, (AutoGuide, AutoMessenger)):
                raise TypeError(
                    "conditional_guide: a factory must return a pyro AutoGuide or AutoMessenger (e.g. "
                    "AutoNormal, AutoMultivariateNormal, AutoNormalMessenger); it returned "
                    f"{type(guide).__name__}"
                )

            setattr(self, f"component_{component}", guide)

    def component_values(self) -> dict[str, torch.Tensor]:
        return {
            site.name: getattr(self, f"component_values_{i}") for i, site in enumerate(self.forward_sites)
        }

    def component(self, index: int) -> Callable:
        return getattr(self, f"component_{index}")
