"""Hybrid forward-KL / reverse-KL variational inference: :class:`HybridGuide` and :class:`HybridELBO`.

The latent sites of a Pyro model split into *forward sites* h (nuisance or measurement parameters whose
posterior may be flat or multimodal, discrete or continuous) and the remaining sites z (nearly Gaussian
given h). The guide factorises as

.. math::
    q(h, z \\mid y) = q_\\phi(h \\mid s_\\eta(y))\\, q_\\psi(z \\mid h, y),

and is fitted in two stages (design note §1, a reconstruction of arXiv:2406.02545 from its abstract
and a third-party summary -- the paper's own text was not available; the forms below are the derived
ones and are implemented as written there):

1. **forward KL, amortized** (:meth:`HybridGuide.fit_forward`): simulate ``(h, z, y)`` from the prior
   and minimise :math:`\\mathbb E_{p(h,z,y)}[-\\log q_\\phi(h \\mid s_\\eta(y))]`. The optimum is the
   *marginal* posterior p(h | s(y)) (the FAVI / neural-posterior-estimation property); the loss is
   infinite where q = 0 < p, so it covers every mode. One fit serves every data set.
2. **reverse KL, conditional** (:class:`HybridELBO` or ``Trace_ELBO``): with q_phi frozen, maximise
   :math:`L_2(\\psi) = \\mathbb E_{q_\\phi(h \\mid y_o)} \\mathbb E_{q_\\psi(z \\mid h, y_o)}
   [\\log p(y_o, z \\mid h) - \\log q_\\psi(z \\mid h, y_o)]`, which fits each conditional.

The posterior of z is then the mixture :math:`\\sum_c w_c\\, q_\\psi(z \\mid h_c)`, whose covariance is
never below the average conditional covariance (law of total variance): where plausible h imply
different z, its intervals widen instead of picking one.

Example::

    guide = HybridGuide(model, forward_sites=["delay"])
    guide.fit_forward(50_000, y)                       # stage 1 (only y's shape is used)
    svi = SVI(model, guide, Adam({"lr": 1e-2}), HybridELBO(num_particles=4))
    for _ in range(2000):
        svi.step(y)                                    # stage 2 on the observed data
    draws = guide.sample_posterior(4000, y)

References: Ambrogioni, Rouillard, Wassermann, arXiv:2406.02545; Ambrogioni et al., arXiv:1805.11542
(FAVI, the forward-KL stage).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.infer import ELBO
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.initialization import InitMessenger, init_to_median
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from pyro.util import check_model_guide_match

from pyro_ext.infer.calibration import SBCResult, sbc_uniformity
from pyro_ext.infer.conditionals import (
    AmortizedConditional,
    AmortizedGaussianModule,
    ComponentGaussianModule,
    ConditionalSpec,
    FactoryComponentsModule,
    PerSampleConditional,
    PerSupportConditional,
    PointMass,
    resolve_conditional_spec,
)
from pyro_ext.infer.forward_families import validate_family_spec
from pyro_ext.infer.forward_stage import (
    ForwardPosterior,
    ForwardSiteDistribution,
    ForwardStage,
    joint_support_points,
)
from pyro_ext.infer.simulation import fork_rng_from, simulate_prior
from pyro_ext.infer.site_info import SiteInfo, site_info_from_trace_site
from pyro_ext.infer.summaries import build_summary

__all__ = ["ComponentWeights", "ForwardFitHistory", "HybridELBO", "HybridGuide", "MixtureMoments"]

#: joint discrete supports up to this size are enumerated exactly when stage 2 picks its components
MAX_ENUMERATED_SUPPORT = 4096
#: draws used to discover the support of q_phi when it is too large to enumerate
SUPPORT_DISCOVERY_DRAWS = 8192
#: dropped q_phi mass above which per_support warns (design note §4.1)
DROPPED_MASS_WARNING = 0.01


@dataclass
class ForwardFitHistory:
    """What :meth:`HybridGuide.fit_forward` returns: per-epoch mean NLLs and bookkeeping."""

    train_nll: list[float] = field(default_factory=list)
    validation_nll: list[float] = field(default_factory=list)
    best_epoch: int = -1
    num_simulations: int = 0
    num_dropped: int = 0
    vectorized: bool = True

    @property
    def best_validation_nll(self) -> float:
        return self.validation_nll[self.best_epoch]


@dataclass
class ComponentWeights:
    """Mixture components of stage 2: their forward values ``{site: [S, *shape]}`` and weights ``[S]``."""

    values: dict[str, torch.Tensor]
    weights: torch.Tensor
    log_evidence: torch.Tensor | None = None


@dataclass
class MixtureMoments:
    """Moments of the remaining sites z (flattened, unconstrained) under the stage-2 mixture.

    ``covariance = within + between`` (law of total variance, design note §1.4), where ``within`` is
    the weighted average of the component covariances and ``between`` the covariance of the component
    means. ``covariance`` is computed from the second moment, independently of the split.
    """

    mean: torch.Tensor
    covariance: torch.Tensor
    within: torch.Tensor
    between: torch.Tensor
    slices: dict[str, slice]
    shapes: dict[str, torch.Size]

    def site(self, name: str) -> MixtureMoments:
        """The block of one site (``mean`` reshaped to its unconstrained shape)."""
        index = self.slices[name]
        return MixtureMoments(
            mean=self.mean[index].reshape(self.shapes[name]),
            covariance=self.covariance[index, index],
            within=self.within[index, index],
            between=self.between[index, index],
            slices={name: slice(0, index.stop - index.start)},
            shapes={name: self.shapes[name]},
        )


def _tensor_key(args: tuple, kwargs: dict) -> tuple:
    """Identity-and-version key of the arguments (tensors inside dicts and lists included)."""
    key = []

    def visit(obj: Any) -> None:
        if torch.is_tensor(obj):
            key.append(("t", id(obj), obj._version))
        elif isinstance(obj, Mapping):
            for name in sorted(obj, key=str):
                key.append(("k", str(name)))
                visit(obj[name])
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                visit(item)
        else:
            key.append(("o", id(obj)))

    visit(args)
    visit(kwargs)
    return tuple(key)


def _reshape_gaussian(distribution: Any, batch_shape: torch.Size) -> Any:
    """The same (batched) Gaussian with batch shape ``batch_shape`` (one row per batch element)."""
    loc = distribution.loc
    dim = loc.shape[-1]
    rows = math.prod(loc.shape[:-1])
    target = math.prod(batch_shape)

    def fit(tensor: torch.Tensor, event: tuple[int, ...]) -> torch.Tensor:
        count = math.prod(tensor.shape[: tensor.dim() - len(event)])
        if count == target:
            return tensor.reshape(batch_shape + event)
        if count == 1:
            return tensor.reshape(event).expand(batch_shape + event)
        raise ValueError(f"cannot reshape a Gaussian with {rows} rows to batch shape {tuple(batch_shape)}")

    if isinstance(distribution, dist.LowRankMultivariateNormal):
        rank = distribution.cov_factor.shape[-1]
        return dist.LowRankMultivariateNormal(
            fit(loc, (dim,)),
            cov_factor=fit(distribution.cov_factor, (dim, rank)),
            cov_diag=fit(distribution.cov_diag, (dim,)),
            validate_args=False,
        )
    return dist.MultivariateNormal(
        fit(loc, (dim,)), scale_tril=fit(distribution.scale_tril, (dim, dim)), validate_args=False
    )


class HybridGuide(AutoGuide):
    """Hybrid forward-KL / reverse-KL guide q_phi(h | s(y)) q_psi(z | h, y) for any Pyro model.

    The construction follows the design note's reconstruction of arXiv:2406.02545 (see the module
    docstring): stage 1 (:meth:`fit_forward`) fits q_phi by forward KL on prior simulations, stage 2
    (SVI with :class:`HybridELBO` or ``Trace_ELBO``) fits q_psi by reverse KL with q_phi frozen.

    .. math::
        q(z \\mid y_o) = \\sum_{c} w_c\\, q_\\psi(z \\mid h_c), \\qquad
        \\mathrm{Cov}_q[z] = \\mathbb E_{q_\\phi}[\\mathrm{Cov}_\\psi(z \\mid h)]
        + \\mathrm{Cov}_{q_\\phi}[\\mathbb E_\\psi(z \\mid h)].

    :param callable model: a Pyro model; its observed sites carry the data.
    :param forward_sites: names of the latent sites fitted by forward KL (h).
    :param summary_net: ``None`` (= ``"mlp"``), ``"identity"``, ``"mlp"``, ``"timeseries"`` or an
        ``nn.Module`` mapping ``dict[str, Tensor[B, ...]]`` (the observed sites) to ``Tensor[B, C]``.
    :param forward_family: ``"auto"`` (``"flow"`` for continuous, ``"categorical"`` for discrete sites),
        ``"flow"``, ``"normal"``, ``"mixture"``, ``"categorical"``, a callable
        ``family(context_features, site_info) -> module`` with ``log_prob(value, context)`` and
        ``sample(sample_shape, context)``, or a dict of these per site.
    :param conditional_guide: ``"auto"`` (``"per_support"`` if every forward site is discrete, else
        ``"amortized"``), ``"amortized"``, ``"per_support"``, ``"per_sample"``, a spec
        (:class:`~pyro_ext.infer.conditionals.AmortizedConditional` etc.) or a factory
        ``factory(model) -> AutoGuide`` building one autoguide per component.
    :param observed_sites: the sites whose values are the data (None: those the model observes), a list
        of names, or an accessor ``accessor(*args, **kwargs) -> dict[str, Tensor]``.
    :param int num_conditional_samples: K for ``"per_sample"``.
    :param float support_threshold: ``"per_support"`` keeps support points with q_phi(h | y_o) above it.
    :param callable init_loc_fn: initial location of z (as in Pyro's autoguides).
    :param float init_scale: initial scale of q_psi.
    :param generator: seeds what the guide draws on its own (per-sample components, support
        discovery, encoder statistics); otherwise the global RNG is used.
    :param create_plates: as in :class:`~pyro.infer.autoguide.AutoGuide`.
    :param str name: prefix of the guide's parameters in Pyro's param store (default ``"HybridGuide"``);
        give guides that live side by side different names.

    Example::

        guide = HybridGuide(model, forward_sites=["d"], forward_family="normal")
        history = guide.fit_forward(20_000, y, batch_size=1000, progress_bar=False)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), HybridELBO(num_particles=4))
        for _ in range(1000):
            svi.step(y)
        guide.quantiles([0.05, 0.5, 0.95], y)

    References: arXiv:2406.02545 (hybrid scheme), arXiv:1805.11542 (FAVI).
    """

    def __init__(
        self,
        model: Callable,
        forward_sites: Sequence[str],
        *,
        summary_net: object = None,
        forward_family: object = "auto",
        conditional_guide: object = "auto",
        observed_sites: Sequence[str] | Callable | None = None,
        num_conditional_samples: int = 16,
        support_threshold: float = 1e-3,
        init_loc_fn: Callable = init_to_median,
        init_scale: float = 0.1,
        generator: torch.Generator | None = None,
        create_plates: Callable | None = None,
        name: str | None = None,
    ) -> None:
        if isinstance(forward_sites, str):
            forward_sites = [forward_sites]
        if not isinstance(forward_sites, Sequence) or not forward_sites:
            raise ValueError(f"forward_sites must be a non-empty list of site names; got {forward_sites!r}")
        if not all(isinstance(name, str) for name in forward_sites):
            raise TypeError(f"forward_sites must contain site names (str); got {forward_sites!r}")
        if len(set(forward_sites)) != len(forward_sites):
            raise ValueError(f"forward_sites contains duplicates: {forward_sites!r}")
        validate_family_spec(forward_family)
        if not (
            isinstance(conditional_guide, (str, ConditionalSpec))
            or (callable(conditional_guide) and not isinstance(conditional_guide, torch.nn.Module))
        ):
            raise TypeError(
                "conditional_guide must be 'auto', 'amortized', 'per_support', 'per_sample', a spec or a "
                f"factory(model) -> AutoGuide; got {type(conditional_guide).__name__}"
            )
        if isinstance(conditional_guide, str):
            resolve_conditional_spec(conditional_guide, all_discrete=False)  # validates the name
        if summary_net is not None and not isinstance(summary_net, (str, torch.nn.Module)):
            raise TypeError(
                "summary_net must be None, 'identity', 'mlp', 'timeseries' or an nn.Module; got "
                f"{type(summary_net).__name__}"
            )
        if isinstance(summary_net, str) and summary_net not in ("identity", "mlp", "timeseries"):
            raise ValueError(
                f"summary_net must be 'identity', 'mlp', 'timeseries' or an nn.Module; got {summary_net!r}"
            )
        if observed_sites is not None and not callable(observed_sites):
            if isinstance(observed_sites, str):
                observed_sites = [observed_sites]
            if not all(isinstance(name, str) for name in observed_sites):
                raise TypeError(f"observed_sites must be site names or an accessor; got {observed_sites!r}")
            observed_sites = list(observed_sites)
        if not isinstance(num_conditional_samples, int) or num_conditional_samples < 1:
            raise ValueError(
                f"num_conditional_samples must be a positive int; got {num_conditional_samples!r}"
            )
        if not 0.0 <= float(support_threshold) < 1.0:
            raise ValueError(f"support_threshold must lie in [0, 1); got {support_threshold!r}")
        if not init_scale > 0:
            raise ValueError(f"init_scale must be positive; got {init_scale!r}")
        if name is not None and (not isinstance(name, str) or not name or "$$$" in name):
            raise ValueError(f"name must be a non-empty string without '$$$'; got {name!r}")
        super().__init__(model, create_plates=create_plates)
        if name is not None:
            self._pyro_name = name  # prefix of this guide's parameters in Pyro's param store
        self.forward_site_names = list(forward_sites)
        self._summary_spec = summary_net
        self._family_spec = forward_family
        self._conditional_spec = conditional_guide
        self._observed_spec = observed_sites
        self.num_conditional_samples = num_conditional_samples
        self.support_threshold = float(support_threshold)
        self.init_loc_fn = init_loc_fn
        self.init_scale = float(init_scale)
        self.generator = generator
        self._observed_cache: tuple | None = None
        self._context_cache: tuple | None = None
        self.conditional = None
        self._num_dropped_mass = 0.0

    # ================================================================================== prototype
    @property
    def forward_stage(self) -> ForwardStage:
        """Stage 1 (summary network and forward densities); ``None`` before :meth:`setup`."""
        return self._modules.get("forward")

    @property
    def latent_site_names(self) -> list[str]:
        """The remaining sites z, fitted in stage 2."""
        return [site.name for site in self._latent_sites]

    @property
    def observed_site_names(self) -> list[str]:
        return list(self._observed_shapes)

    @property
    def aux_component_name(self) -> str:
        return f"_{self._pyro_name}_component"

    @property
    def aux_latent_name(self) -> str:
        return f"_{self._pyro_name}_latent"

    def setup(self, *args, **kwargs) -> HybridGuide:
        """Trace the model with these arguments and build stage 1 (before :meth:`load_state_dict`)."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        return self

    def _setup_prototype(self, *args, **kwargs) -> None:
        forward_names = set(self.forward_site_names)
        init_loc_fn = self.init_loc_fn

        def init_fn(site: dict) -> torch.Tensor:
            # forward and discrete sites only need a valid value of the right shape: a prior draw
            if site["name"] in forward_names or getattr(site["fn"].support, "is_discrete", False):
                return site["fn"].sample().detach()
            return init_loc_fn(site)

        model = InitMessenger(init_fn)(self.model)
        with torch.no_grad():
            trace = poutine.block(poutine.trace(model).get_trace)(*args, **kwargs)
        trace = prune_subsample_sites(trace)
        sample_sites = {
            name: site
            for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site_is_subsample(site)
        }
        for name, site in sample_sites.items():
            for frame in site["cond_indep_stack"]:
                if not frame.vectorized:
                    raise NotImplementedError(
                        f"HybridGuide does not support sequential pyro.plate (site {name!r})"
                    )
        observed_in_trace = [name for name, site in sample_sites.items() if site["is_observed"]]
        latent_in_trace = [name for name, site in sample_sites.items() if not site["is_observed"]]

        # the data sites
        spec = self._observed_spec
        if spec is None:
            observed_names = observed_in_trace
            observations = kwargs.get("observations")
            if isinstance(observations, Mapping):
                observed_names = [name for name in sample_sites if name in observations] or observed_names
        elif callable(spec):
            observed_names = list(spec(*args, **kwargs))
        else:
            observed_names = list(spec)
        for name in observed_names:
            if name not in sample_sites:
                raise ValueError(
                    f"observed_sites: {name!r} is not a sample site of the model; sample sites are "
                    f"{sorted(sample_sites)}"
                )
        if not observed_names:
            raise ValueError(
                "the model observes no site with these arguments: pass the data (only its shape is used by "
                "fit_forward) or name the data sites with observed_sites=[...]"
            )

        # the forward sites
        for name in self.forward_site_names:
            if name not in sample_sites:
                raise ValueError(
                    f"forward_sites: {name!r} is not a sample site of the model; latent sites are "
                    f"{latent_in_trace}"
                )
            if name in observed_names:
                raise ValueError(f"forward_sites: {name!r} is an observed site; forward sites must be latent")
        forward_infos = []
        for name in self.forward_site_names:
            site = sample_sites[name]
            for frame in site["cond_indep_stack"]:
                if frame.vectorized and frame.full_size is not None and frame.size != frame.full_size:
                    raise ValueError(
                        f"forward_sites: {name!r} sits in a subsampled plate, which is not supported"
                    )
            forward_infos.append(site_info_from_trace_site(site))
        forward_infos.sort(key=lambda info: not info.is_discrete)  # discrete block first (stable order)

        # the remaining latent sites
        latent_infos = []
        for name in latent_in_trace:
            if name in self.forward_site_names or name in observed_names:
                continue
            site = sample_sites[name]
            if getattr(site["fn"].support, "is_discrete", False):
                raise ValueError(
                    f"latent site {name!r} is discrete: add it to forward_sites (stage 2 guides are Gaussian)"
                )
            latent_infos.append(site_info_from_trace_site(site))

        self.prototype_trace = trace
        self._forward_sites: list[SiteInfo] = forward_infos
        self._latent_sites: list[SiteInfo] = latent_infos
        self._observed_shapes = {name: sample_sites[name]["value"].shape for name in observed_names}
        self._site_order = list(sample_sites)
        dims = [
            -frame.dim
            for site in sample_sites.values()
            for frame in site["cond_indep_stack"]
            if frame.vectorized
        ]
        self._max_plate_nesting = max(dims, default=0)
        self._prototype_frames = {}
        for info in forward_infos + latent_infos:
            for frame in info.frames:
                self._prototype_frames[frame.name] = frame

        # flattened unconstrained layout of z (as AutoContinuous)
        slices, start, init = {}, 0, []
        for info in latent_infos:
            size = info.flat_dim
            slices[info.name] = slice(start, start + size)
            start += size
            value = sample_sites[info.name]["value"].detach()
            init.append(info.bijection.inv(value).reshape(-1))
        self._latent_slices = slices
        self._latent_dim = start
        dtype = torch.get_default_dtype()
        self._init_latent = torch.cat(init).to(dtype) if init else torch.zeros(0, dtype=dtype)

        if self.forward_stage is None:
            summary = build_summary(self._summary_spec, self._observed_shapes)
            self._modules["forward"] = ForwardStage(summary, forward_infos, self._family_spec)
        self._conditional_kind = resolve_conditional_spec(
            self._conditional_spec, all_discrete=all(info.is_discrete for info in forward_infos)
        )
        kind = getattr(self._conditional_kind, "kind", "factory")
        if kind == "factory":
            self._check_factory(sample_sites)
        if kind == "per_support" and not all(info.is_discrete for info in forward_infos):
            raise ValueError(
                "conditional_guide='per_support' needs discrete forward sites; use 'per_sample' or "
                "'amortized' "
                f"for continuous ones ({[i.name for i in forward_infos if not i.is_discrete]})"
            )

    def _check_factory(self, sample_sites: Mapping[str, dict]) -> None:
        """A messenger guide reads h with ``upstream_value``: h must come before every z in the model."""
        from pyro.infer.autoguide import AutoMessenger

        factory = self._conditional_kind
        is_messenger = isinstance(factory, type) and issubclass(factory, AutoMessenger)
        if not is_messenger and not isinstance(factory, type):
            is_messenger = isinstance(factory(self.model), AutoMessenger)
        if not is_messenger:
            return
        order = list(sample_sites)
        last_forward = max(order.index(name) for name in self.forward_site_names)
        early = [site.name for site in self._latent_sites if order.index(site.name) < last_forward]
        if early:
            raise ValueError(
                "conditional_guide: a messenger guide sees only sites sampled before the current "
                "one, but the "
                f"model samples {early} before the forward sites {self.forward_site_names}; reorder "
                "the model or "
                "use a non-messenger conditional guide"
            )

    # ================================================================================== data access
    def _observed_values(self, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        """The data set the guide is called on, ``{observed site: Tensor[*site_shape]}`` (validated)."""
        observations = kwargs.get("observations")
        if isinstance(observations, Mapping) and all(name in observations for name in self._observed_shapes):
            values = {name: observations[name] for name in self._observed_shapes}
        elif callable(self._observed_spec):
            values = dict(self._observed_spec(*args, **kwargs))
        else:
            key = _tensor_key(args, kwargs)
            if self._observed_cache is not None and self._observed_cache[0] == key:
                return self._observed_cache[2]
            # the run samples the latent sites from the prior: keep it off the caller's random stream, so
            # that a guide call draws the same values whether or not the data were cached
            devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
            with torch.no_grad(), poutine.block(), torch.random.fork_rng(devices=devices):
                trace = poutine.trace(self.model).get_trace(*args, **kwargs)
            values = {}
            for name in self._observed_shapes:
                site = trace.nodes.get(name)
                if site is None or site["type"] != "sample":
                    raise ValueError(
                        f"observed site {name!r} is missing from the model run with these arguments"
                    )
                if not site["is_observed"] and self._observed_spec is None:
                    raise ValueError(
                        f"observed site {name!r} has no data in the arguments the guide was called with "
                        "(the model sampled it): pass the observed data"
                    )
                values[name] = site["value"]
            values = self._validate_observed(values)
            # keep the arguments alive so that their ids cannot be reused while the cache holds them
            self._observed_cache = (key, (args, kwargs), values)
            return values
        return self._validate_observed(values)

    def _validate_observed(self, values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, shape in self._observed_shapes.items():
            if name not in values or values[name] is None:
                raise ValueError(f"observed data for site {name!r} is missing")
            value = torch.as_tensor(values[name])
            if value.shape != shape:
                raise ValueError(
                    f"observed data for site {name!r} has shape {tuple(value.shape)}; the model expects "
                    f"{tuple(shape)}"
                )
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise ValueError(f"observed data for site {name!r} contains non-finite values")
            out[name] = value.detach()
        return out

    def _features(self, observed: Mapping[str, torch.Tensor], batched: bool = False) -> torch.Tensor:
        stage = self.forward_stage
        if not batched:
            observed = {name: value.unsqueeze(0) for name, value in observed.items()}
        observed = {name: value.to(device=stage.device) for name, value in observed.items()}
        return stage.summary.features(
            {
                name: value.to(stage.dtype) if value.is_floating_point() else value
                for name, value in observed.items()
            }
        )

    def _context(self, observed: Mapping[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return self.forward_stage.embed(self._features(observed))

    def _dataset_context(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The summary ``[1, C]`` of the data in these arguments, cached with the observed values."""
        observed = self._observed_values(args, kwargs)
        cached = self._context_cache
        if cached is not None and cached[0] is observed:
            return cached[1]
        context = self._context(observed)
        self._context_cache = (observed, context)
        return context

    # ================================================================================== stage 1
    def _check_stage_one(self, purpose: str) -> None:
        stage = self.forward_stage
        if stage is None or not bool(stage.fitted):
            raise ValueError(
                f"{purpose} before fit_forward: stage 1 (the forward-KL fit of "
                f"{self.forward_site_names}) must "
                "be fitted first; call guide.fit_forward(num_simulations, *args)"
            )
        if stage.training or any(p.requires_grad for p in stage.parameters()):
            raise ValueError(
                f"{purpose}: stage 1 is not frozen (some of its weights require grad or it is in training "
                "mode); call guide.freeze_forward()"
            )

    def freeze_forward(self) -> None:
        """Freeze stage 1: ``requires_grad_(False)``, ``eval()`` and mark it fitted (design note, pitfall 4).

        :meth:`fit_forward` calls this itself; call it after training :meth:`forward_guide` with ``CSIS``.
        """
        stage = self.forward_stage
        if stage is None:
            raise ValueError("freeze_forward before setup: call guide.setup(*args) or fit_forward first")
        stage.requires_grad_(False)
        stage.eval()
        stage.fitted.fill_(True)
        self._observed_cache = self._context_cache = None

    def _unfreeze_forward(self) -> None:
        stage = self.forward_stage
        stage.requires_grad_(True)
        stage.train()
        stage.fitted.fill_(False)

    def fit_forward(
        self,
        num_simulations: int,
        *args,
        batch_size: int = 512,
        max_epochs: int = 200,
        lr: float = 1e-3,
        validation_fraction: float = 0.1,
        patience: int = 10,
        online: bool = False,
        simulator: Callable | None = None,
        progress_bar: bool = True,
        generator: torch.Generator | None = None,
        chunk_size: int = 4096,
        weight_decay: float = 0.0,
        **kwargs,
    ) -> ForwardFitHistory:
        """Stage 1: fit q_phi(h | s(y)) by forward KL on prior simulations, then freeze it.

        Minimises :math:`L_1 = \\mathbb E_{p(h, z, y)}[-\\log q_\\phi(h \\mid s_\\eta(y))]` with Adam on a
        bank of ``num_simulations`` vectorised prior draws (``Predictive(poutine.uncondition(model),
        parallel=True)`` in chunks; a Python loop with a warning if the model does not vectorise);
        z is drawn but not stored. Early stopping on a validation split restores the best weights.

        :param int num_simulations: prior draws (``online=True``: draws per epoch).
        :param args: model arguments (observed data only give shapes; simulation replaces them).
        :param int batch_size: minibatch size.
        :param int max_epochs: passes over the bank.
        :param float lr: Adam learning rate.
        :param float validation_fraction: share of the bank held out for early stopping.
        :param int patience: epochs without validation improvement before stopping.
        :param bool online: draw fresh simulations for every step (the CSIS regime).
        :param simulator: ``simulator(n[, generator=...]) -> dict[str, Tensor[n, ...]]`` replacing the
            model's prior (must return every forward and observed site).
        :param bool progress_bar: show a tqdm bar over epochs.
        :param generator: seeds simulation, split, shuffling (the global RNG is left untouched).
        :returns: :class:`ForwardFitHistory` with per-epoch training and validation NLL.
        """
        if not isinstance(num_simulations, int) or num_simulations < 2:
            raise ValueError(f"num_simulations must be an int >= 2; got {num_simulations!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
        if not isinstance(max_epochs, int) or max_epochs < 1:
            raise ValueError(f"max_epochs must be a positive int; got {max_epochs!r}")
        if not lr > 0:
            raise ValueError(f"lr must be positive; got {lr!r}")
        if not 0.0 < validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must lie in (0, 1); got {validation_fraction!r}")
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be a positive int; got {patience!r}")
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        stage = self.forward_stage
        if bool(stage.fitted):
            if self.conditional is not None:
                warnings.warn(
                    "refitting stage 1 resets stage 2 (reset_conditional)", UserWarning, stacklevel=2
                )
            self.reset_conditional()
        self._unfreeze_forward()
        self._observed_cache = self._context_cache = None
        sites = [site.name for site in self._forward_sites] + list(self._observed_shapes)

        def draw(count: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], int, bool]:
            result = simulate_prior(
                self.model,
                count,
                *args,
                sites=sites,
                chunk_size=chunk_size,
                simulator=simulator,
                generator=generator,
                **kwargs,
            )
            observed = {name: result.values[name] for name in self._observed_shapes}
            with torch.no_grad():
                features = torch.cat(
                    [
                        self._features({n: v[i : i + chunk_size] for n, v in observed.items()}, batched=True)
                        for i in range(0, result.num_kept, chunk_size)
                    ]
                )
            forward = {site.name: result.values[site.name].to(stage.device) for site in self._forward_sites}
            return features, forward, result.num_dropped, result.vectorized

        history = ForwardFitHistory()
        features, values, dropped, vectorized = draw(num_simulations)
        history.num_dropped, history.vectorized = dropped, vectorized
        if dropped:
            warnings.warn(
                f"fit_forward dropped {dropped} of {num_simulations} simulations with non-finite values",
                RuntimeWarning,
                stacklevel=2,
            )
        total = features.shape[0]
        if total < 2:
            raise ValueError(f"only {total} finite simulations were left; cannot fit stage 1")
        order = torch.randperm(total, generator=generator).to(features.device)
        num_validation = max(1, int(round(validation_fraction * total)))
        validation_index, train_index = order[:num_validation], order[num_validation:]
        if train_index.numel() == 0:
            raise ValueError("validation_fraction leaves no training simulations")
        stage.set_statistics(features[train_index], {n: v[train_index] for n, v in values.items()})
        history.num_simulations = total

        def nll(index: torch.Tensor, feats: torch.Tensor, vals: Mapping[str, torch.Tensor]) -> torch.Tensor:
            context = stage.embed(feats[index])
            return -stage.log_prob({n: v[index] for n, v in vals.items()}, context).mean()

        parameters = [p for p in stage.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay, foreach=True)
        # halving the step size when the validation loss stalls lets the fit settle instead of jittering
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=0.5, patience=max(1, patience // 5), threshold=1e-4
        )
        best_state, best_value, stale = None, math.inf, 0
        num_train = train_index.numel()
        steps_per_epoch = max(1, math.ceil(num_train / batch_size))
        # Polyak (exponential moving) average of the weights over about one epoch: SGD noise in the
        # weights would otherwise dominate the error of a near-converged fit; validation, early stopping
        # and the returned weights all use the average.
        ema_decay = min(0.999, max(0.9, 1.0 - 1.0 / steps_per_epoch))
        averaged = [p.detach().clone() for p in parameters]
        from tqdm.auto import tqdm

        bar = tqdm(range(max_epochs), disable=not progress_bar, desc="fit_forward")
        for epoch in bar:
            stage.train()
            permutation = train_index[torch.randperm(num_train, generator=generator).to(train_index.device)]
            running = 0.0
            for step in range(steps_per_epoch):
                if online:
                    feats, vals, _, _ = draw(batch_size)
                    batch = torch.arange(feats.shape[0], device=feats.device)
                else:
                    feats, vals = features, values
                    batch = permutation[step * batch_size : (step + 1) * batch_size]
                loss = nll(batch, feats, vals)
                if not torch.isfinite(loss):
                    raise RuntimeError(
                        f"fit_forward: the stage-1 loss became {loss.item()} at epoch {epoch}; lower "
                        "lr or check "
                        "the forward family"
                    )
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    torch._foreach_lerp_(averaged, [p.detach() for p in parameters], 1.0 - ema_decay)
                running += loss.item()
            stage.eval()
            current = [p.detach().clone() for p in parameters]
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in parameters], averaged)
                value = torch.cat(
                    [
                        -stage.log_prob(
                            {n: v[chunk] for n, v in values.items()}, stage.embed(features[chunk])
                        )
                        for chunk in validation_index.split(4096)
                    ]
                ).mean()
            history.train_nll.append(running / steps_per_epoch)
            history.validation_nll.append(value.item())
            bar.set_postfix(train=f"{history.train_nll[-1]:.4f}", validation=f"{value.item():.4f}")
            scheduler.step(value.item())
            if best_state is None or value.item() < best_value - 1e-6 * max(1.0, abs(best_value)):
                best_value, stale, history.best_epoch = value.item(), 0, epoch
                best_state = {k: v.detach().clone() for k, v in stage.state_dict().items()}
            else:
                stale += 1
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in parameters], current)
            if stale >= patience:
                break
        bar.close()
        if best_state is not None:
            stage.load_state_dict(best_state)
        self.freeze_forward()
        return history

    def forward_guide(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """A guide over the forward sites only, with proper densities at the site names.

        Usable with Pyro's ``CSIS`` (which passes ``observations=``): its loss is the stage-1 loss. While
        stage 1 is not frozen its weights are registered with ``pyro.module`` so ``CSIS`` can train
        them; call :meth:`freeze_forward` afterwards. ``CSIS`` warns "Found vars in model but not
        guide" for z at each step (design note, pitfall 2): expected, as z is not scored in stage 1.
        """
        model_kwargs = self._model_kwargs(kwargs)
        if self.prototype_trace is None:
            self._setup_prototype(*args, **model_kwargs)
        stage = self.forward_stage
        frozen = not any(p.requires_grad for p in stage.parameters())
        if not frozen:
            pyro.module(f"{self._pyro_name}.forward", stage)
        observed = self._observed_values(args, kwargs)
        with torch.no_grad() if frozen else contextlib.nullcontext():
            context = stage.embed(self._features(observed))
        plates = self._create_plates(*args, **model_kwargs)
        values, _ = self._emit_forward_chain(context, plates)
        return values

    def _model_kwargs(self, kwargs: dict) -> dict:
        """``kwargs`` without CSIS's ``observations=`` unless the model itself takes it."""
        if "observations" not in kwargs:
            return kwargs
        import inspect

        try:
            parameters = inspect.signature(self.model).parameters
        except (TypeError, ValueError):
            return kwargs
        takes = "observations" in parameters or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
        )
        return kwargs if takes else {k: v for k, v in kwargs.items() if k != "observations"}

    def forward_posterior(self, *args, **kwargs) -> ForwardPosterior:
        """q_phi(h | y_o) for the data in these model arguments (one network pass)."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        self._check_stage_one("forward_posterior")
        return ForwardPosterior(self.forward_stage, self._dataset_context(args, kwargs))

    def forward_posterior_batch(self, observed: Mapping[str, torch.Tensor]) -> ForwardPosterior:
        """q_phi(h | y_b) for a batch of data sets ``{observed site: Tensor[B, *site_shape]}``."""
        self._check_stage_one("forward_posterior_batch")
        if set(observed) != set(self._observed_shapes):
            raise ValueError(
                f"observed must hold exactly the observed sites {list(self._observed_shapes)}; got "
                f"{sorted(observed)}"
            )
        batch = None
        for name, shape in self._observed_shapes.items():
            value = torch.as_tensor(observed[name])
            if value.shape[1:] != shape or (batch is not None and value.shape[0] != batch):
                raise ValueError(
                    f"observed[{name!r}] has shape {tuple(value.shape)}; expected [B, "
                    f"*{tuple(shape)}] with one B"
                )
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise ValueError(f"observed[{name!r}] contains non-finite values")
            batch = value.shape[0]
        with torch.no_grad():
            context = self.forward_stage.embed(self._features(observed, batched=True))
        return ForwardPosterior(self.forward_stage, context, batched=True)

    def check_forward_calibration(
        self,
        num_datasets: int,
        *args,
        num_posterior_samples: int = 99,
        simulator: Callable | None = None,
        generator: torch.Generator | None = None,
        **kwargs,
    ) -> SBCResult:
        """Stage-1 simulation-based calibration (Talts et al. 2018), cheap thanks to amortization.

        Draws ``num_datasets`` fresh prior simulations, ranks each true forward value among
        ``num_posterior_samples`` draws of q_phi (random tie-breaking for discrete values) and tests
        the ranks for uniformity with a chi-squared test.
        """
        self._check_stage_one("check_forward_calibration")
        sites = [site.name for site in self._forward_sites] + list(self._observed_shapes)
        result = simulate_prior(
            self.model, num_datasets, *args, sites=sites, simulator=simulator, generator=generator, **kwargs
        )
        observed = {name: result.values[name] for name in self._observed_shapes}
        draws = self.forward_posterior_batch(observed).sample((num_posterior_samples,), generator=generator)
        from pyro_ext.infer.calibration import rank_statistics

        ranks = {
            site.name: rank_statistics(result.values[site.name], draws[site.name], generator=generator)
            for site in self._forward_sites
        }
        return SBCResult(ranks=ranks, uniformity=sbc_uniformity(ranks, num_posterior_samples))

    def forward_state_dict(self) -> dict[str, torch.Tensor]:
        """The stage-1 entries of :meth:`state_dict` (``forward.*``), to share a trained stage 1."""
        return {k: v for k, v in self.state_dict().items() if k.startswith("forward.")}

    def load_forward_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a stage 1 saved by :meth:`forward_state_dict` (after :meth:`setup`) and freeze it."""
        if self.forward_stage is None:
            raise ValueError("load_forward_state_dict before setup: call guide.setup(*args, **kwargs) first")
        stripped = {k[len("forward.") :]: v for k, v in state_dict.items() if k.startswith("forward.")}
        self.reset_conditional()
        self.forward_stage.load_state_dict(stripped)
        self.freeze_forward()

    # ================================================================================== stage 2 state
    def reset_conditional(self) -> None:
        """Forget stage 2 (for a new data set); stage 1 is kept."""
        if self.conditional is not None:
            prefix = f"{self._pyro_name}.conditional."
            store = pyro.get_param_store()
            for name in list(store.keys()):
                if name.startswith(prefix):
                    del store[name]
            del self.conditional
        self.conditional = None
        self._num_dropped_mass = 0.0

    @property
    def dropped_mass(self) -> float:
        """q_phi mass of the support points stage 2 dropped (``per_support``)."""
        return self._num_dropped_mass

    def _draw_generator(self) -> torch.Generator | None:
        return self.generator

    def _select_components(self, context: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Component values ``{site: [S, *shape]}`` and log weights ``[S]`` for a component guide."""
        stage = self.forward_stage
        spec = self._conditional_kind
        kind = getattr(spec, "kind", None)
        sites = self._forward_sites
        all_discrete = all(site.is_discrete for site in sites)
        if kind == "per_sample" or (kind is None and not all_discrete):
            count = self.num_conditional_samples
            with torch.no_grad():
                draws = stage.sample(context.expand(count, -1), self._draw_generator())
            if all_discrete:
                return self._merge_duplicates(draws, count)
            log_weights = torch.full((count,), -math.log(count), dtype=context.dtype, device=context.device)
            return draws, log_weights
        # per support point
        total = math.prod(site.support_size for site in sites)
        with torch.no_grad():
            if total <= MAX_ENUMERATED_SUPPORT:
                points = {n: v.to(stage.device) for n, v in joint_support_points(sites).items()}
            else:
                draws = stage.sample(context.expand(SUPPORT_DISCOVERY_DRAWS, -1), self._draw_generator())
                points, _ = self._unique_rows(draws)
            count = next(iter(points.values())).shape[0]
            log_q = stage.log_prob(points, context.expand(count, -1))
        keep = (
            log_q > math.log(self.support_threshold) if self.support_threshold > 0 else torch.isfinite(log_q)
        )
        if not keep.any():
            keep = log_q == log_q.max()
        kept_mass = log_q[keep].exp().sum().clamp(max=1.0)
        self._num_dropped_mass = float(1.0 - kept_mass)
        if self._num_dropped_mass > DROPPED_MASS_WARNING:
            warnings.warn(
                f"per_support: the kept support points ({int(keep.sum())}) hold {float(kept_mass):.3f} of "
                f"q_phi's mass; {self._num_dropped_mass:.3f} is dropped, which shrinks the between-component "
                "variance. Lower support_threshold or use conditional_guide='per_sample'",
                UserWarning,
                stacklevel=4,
            )
        values = {name: value[keep] for name, value in points.items()}
        log_weights = log_q[keep] - torch.logsumexp(log_q[keep], 0)
        return values, log_weights

    def _unique_rows(self, draws: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        sites = self._forward_sites
        flat = torch.cat(
            [draws[site.name].reshape(draws[site.name].shape[0], -1).double() for site in sites], -1
        )
        unique, inverse, counts = torch.unique(flat, dim=0, return_inverse=True, return_counts=True)
        first = torch.zeros(unique.shape[0], dtype=torch.long, device=flat.device)
        first.scatter_(0, inverse, torch.arange(flat.shape[0], device=flat.device))
        return {site.name: draws[site.name][first] for site in sites}, counts

    def _merge_duplicates(self, draws: Mapping[str, torch.Tensor], count: int):
        values, counts = self._unique_rows(draws)
        dtype = self.forward_stage.dtype
        return values, (counts.to(dtype) / count).log()

    def _bind(self, context: torch.Tensor) -> None:
        """Start stage 2 for this data set (lazily, at the first call) or check it is the bound one."""
        if self.conditional is not None:
            if not torch.equal(self.conditional.bound_context, context.reshape(-1)):
                raise ValueError(
                    "the guide's stage 2 is fitted to another data set; call "
                    "guide.reset_conditional() to start "
                    "stage 2 on this one (stage 1 is kept)"
                )
            return
        # binding draws from q_phi (encoder statistics, per-sample components): keep that off the caller's
        # random stream so that a query draws the same values whether or not it is the first call
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            self.conditional = self._new_conditional(context)

    def _new_conditional(self, context: torch.Tensor, num_components: int | None = None):
        """Build the stage-2 module; ``num_components`` given: placeholders for :meth:`load_state_dict`."""
        spec = self._conditional_kind
        stage = self.forward_stage
        init_loc = self._init_latent.to(dtype=stage.dtype, device=stage.device)
        flat_context = context.reshape(-1)
        if isinstance(spec, AmortizedConditional):
            raw_dim = sum(site.encoding_dim for site in self._forward_sites)
            if num_components is None:
                with torch.no_grad():
                    draws = stage.sample(context.expand(2048, -1), self._draw_generator())
                    raw = torch.cat(
                        [site.encode(draws[site.name], stage.dtype) for site in self._forward_sites], -1
                    )
                mean, scale = raw.mean(0), raw.std(0)
                scale = torch.where(scale > 1e-6, scale, torch.ones_like(scale))
            else:
                mean, scale = init_loc.new_zeros(raw_dim), init_loc.new_ones(raw_dim)
            return AmortizedGaussianModule(
                spec,
                self._forward_sites,
                self._latent_dim,
                init_loc,
                self.init_scale,
                mean,
                scale,
                flat_context,
            )
        if num_components is None:
            values, log_weights = self._select_components(context)
        else:
            values = {
                site.name: torch.zeros(num_components, *site.shape, dtype=site.dtype, device=stage.device)
                for site in self._forward_sites
            }
            log_weights = init_loc.new_zeros(num_components)
        if isinstance(spec, (PerSupportConditional, PerSampleConditional)):
            return ComponentGaussianModule(
                spec,
                self._forward_sites,
                self._latent_dim,
                init_loc,
                self.init_scale,
                values,
                log_weights,
                flat_context,
            )
        return FactoryComponentsModule(
            spec, self.model, self._forward_sites, values, log_weights, flat_context
        )

    def _prepare(self, args: tuple, kwargs: dict, purpose: str) -> torch.Tensor:
        """Set up, check stage 1, read the data, bind stage 2; returns the data set's summary ``[1, C]``."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        self._check_stage_one(purpose)
        context = self._dataset_context(args, kwargs)
        self._bind(context)
        return context

    @property
    def uses_components(self) -> bool:
        return isinstance(self.conditional, (ComponentGaussianModule, FactoryComponentsModule))

    # ================================================================================== emission
    def _plate_stack(self, plates: Mapping[str, Any], site: SiteInfo) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for frame in site.frames:
            stack.enter_context(plates[frame.name])
        return stack

    @staticmethod
    def _value_shape(outer: torch.Size, site: SiteInfo, shape: torch.Size) -> torch.Size:
        """Shape of a site's value (or unconstrained value) under a particle batch ``outer``.

        ``outer`` has ``max_plate_nesting + 1`` dims (``[P, 1, ..., 1]``); a site inside plates drops as
        many trailing ones as it has plate dims.
        """
        if not len(outer):
            return torch.Size(shape)
        keep = len(outer) - len(site.batch_shape)
        return torch.Size(outer[:keep]) + torch.Size(shape)

    def _emit_forward_chain(self, context: torch.Tensor, plates: Mapping[str, Any]):
        """Sample every forward site from q_phi at its name; returns the values and the particle shape."""
        stage = self.forward_stage
        values, outer = {}, torch.Size()
        for site, density in zip(self._forward_sites, stage.densities):
            site_outer = torch.Size()
            if context.shape[0] > 1:  # later sites: one context per particle
                site_outer = torch.Size(outer[: len(outer) - len(site.batch_shape)])
            distribution = ForwardSiteDistribution(density, site, context, site_outer)
            with self._plate_stack(plates, site):
                value = pyro.sample(site.name, distribution)
            values[site.name] = value
            lead = torch.Size(value.shape[: value.dim() - len(site.shape)])
            full = lead + torch.Size([1] * len(site.batch_shape))
            if not len(outer) and math.prod(full) > 1:
                outer = full
            flat = value.reshape(-1, *site.shape)
            if flat.shape[0] > 1 and context.shape[0] == 1:
                context = context.expand(flat.shape[0], -1)
            context = torch.cat([context, site.encode(flat, context.dtype)], -1)
        return values, outer

    def _emit_components(self, plates: Mapping[str, Any]):
        """Sample a component index (auxiliary) and put each forward site at that component's value."""
        module = self.conditional
        index = pyro.sample(
            self.aux_component_name, dist.Categorical(logits=module.log_weights), infer={"is_auxiliary": True}
        )
        outer = index.shape if index.numel() > 1 else torch.Size()
        flat_index = index.reshape(-1).long()
        values = {}
        for site, (name, points) in zip(self._forward_sites, module.component_values().items()):
            value = points[flat_index].reshape(self._value_shape(outer, site, site.shape))
            with self._plate_stack(plates, site):
                values[name] = pyro.sample(name, PointMass(value, site.event_dim, site.support))
        return values, outer, flat_index

    def _emit_latent(self, distribution: Any, outer: torch.Size, plates: Mapping[str, Any]) -> dict:
        """Sample the flat unconstrained z (auxiliary) and put each remaining site at its value (Delta)."""
        if not self._latent_sites:
            return {}
        distribution = _reshape_gaussian(distribution, outer)
        latent = pyro.sample(self.aux_latent_name, distribution, infer={"is_auxiliary": True})
        values = {}
        for site in self._latent_sites:
            unconstrained = latent[..., self._latent_slices[site.name]]
            unconstrained = unconstrained.reshape(self._value_shape(outer, site, site.unconstrained_shape))
            bijection = site.bijection
            value = bijection(unconstrained)
            log_density = bijection.inv.log_abs_det_jacobian(value, unconstrained)
            extra = log_density.dim() - value.dim() + site.event_dim
            if extra > 0:
                log_density = log_density.reshape(log_density.shape[: log_density.dim() - extra] + (-1,)).sum(
                    -1
                )
            with self._plate_stack(plates, site):
                values[site.name] = pyro.sample(
                    site.name, dist.Delta(value, log_density=log_density, event_dim=site.event_dim)
                )
        return values

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Sample every latent site: h from q_phi(h | y_o) (or a stage-2 component), z from q_psi(z | h)."""
        context = self._prepare(args, kwargs, "calling the guide (stage 2, Predictive)")
        plates = self._create_plates(*args, **kwargs)
        module = self.conditional
        if isinstance(module, AmortizedGaussianModule):
            values, outer = self._emit_forward_chain(context, plates)
            flat = {site.name: values[site.name].reshape(-1, *site.shape) for site in self._forward_sites}
            values.update(self._emit_latent(module.distribution(flat), outer, plates))
            return values
        values, outer, flat_index = self._emit_components(plates)
        if isinstance(module, ComponentGaussianModule):
            values.update(self._emit_latent(module.distribution(flat_index), outer, plates))
            return values
        if flat_index.numel() > 1 and not bool((flat_index == flat_index[0]).all()):
            raise ValueError(
                "a factory conditional guide cannot mix components within one vectorised call "
                "(Predictive with "
                "parallel=True); use parallel=False or sample_posterior"
            )
        component = module.component(int(flat_index[0]))
        # a messenger guide re-runs the (conditioned) model: keep its observed and conditioned sites out
        hide_observed = poutine.block(component, hide_fn=lambda msg: msg.get("is_observed", False))
        result = hide_observed(*args, **kwargs)
        if isinstance(result, Mapping):
            values.update({name: result[name] for name in self.latent_site_names if name in result})
        return values

    # ================================================================================== queries
    def components(self, *args, **kwargs) -> ComponentWeights:
        """Stage-2 components and their q_phi weights (component guides only)."""
        self._prepare(args, kwargs, "components")
        if not self.uses_components:
            raise ValueError("components() needs a per_support, per_sample or factory conditional guide")
        module = self.conditional
        return ComponentWeights(module.component_values(), module.log_weights.exp())

    def conditional_distribution(self, forward_values: Mapping[str, torch.Tensor], *args, **kwargs):
        """q_psi(z | h) over the flattened unconstrained z for forward values ``{site: [M, *shape]}``.

        For component guides each value must be one of the components.
        """
        self._prepare(args, kwargs, "conditional_distribution")
        module = self.conditional
        values = {site.name: torch.as_tensor(forward_values[site.name]) for site in self._forward_sites}
        if isinstance(module, AmortizedGaussianModule):
            return module.distribution(values)
        if isinstance(module, FactoryComponentsModule):
            raise ValueError("conditional_distribution needs a built-in Gaussian conditional guide")
        return module.distribution(self._component_index(values))

    def _component_index(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        points = self.conditional.component_values()
        match = None
        for site in self._forward_sites:
            value = values[site.name].reshape(-1, 1, *site.shape).to(points[site.name].dtype)
            equal = (value == points[site.name].unsqueeze(0)).reshape(
                value.shape[0], points[site.name].shape[0], -1
            )
            equal = equal.all(-1)
            match = equal if match is None else match & equal
        if not bool(match.any(-1).all()):
            raise ValueError("some forward values are not components of the stage-2 guide")
        return match.float().argmax(-1)

    def _stratified_index(self, num_samples: int, weights: torch.Tensor, generator) -> torch.Tensor:
        """Stratified resampling: each index ~ weights marginally, counts within one of n w_c."""
        u = (
            torch.arange(num_samples, dtype=weights.dtype, device=weights.device)
            + torch.rand(num_samples, generator=generator, dtype=weights.dtype).to(weights.device)
        ) / num_samples
        cumulative = weights.cumsum(0)
        cumulative = cumulative / cumulative[-1]
        index = torch.searchsorted(cumulative, u).clamp(max=weights.shape[0] - 1)
        return index[torch.randperm(num_samples, generator=generator).to(index.device)]

    def _unpack_latent(self, latent: torch.Tensor) -> dict[str, torch.Tensor]:
        n = latent.shape[0]
        out = {}
        for site in self._latent_sites:
            unconstrained = latent[:, self._latent_slices[site.name]].reshape(n, *site.unconstrained_shape)
            out[site.name] = site.bijection(unconstrained)
        return out

    def sample_posterior(
        self,
        num_samples: int,
        *args,
        return_states: bool = False,
        generator: torch.Generator | None = None,
        component_weights: torch.Tensor | None = None,
        **kwargs,
    ) -> dict[str, torch.Tensor]:
        """Exact draws from the stage-2 mixture: ``{site: Tensor[num_samples, *site_shape]}``.

        Component guides are sampled stratified over components (counts within one of
        ``num_samples * w_c``, order shuffled); the amortized guide draws h ~ q_phi, then z ~ q_psi(z | h).

        :param int num_samples: number of draws.
        :param bool return_states: also draw the hidden states of every observed site whose distribution
            has ``rsample_posterior`` (e.g. ``GaussianHMM``), under ``"<site>_states"``.
        :param generator: seeds the draws.
        :param component_weights: replace the q_phi weights of a component guide (e.g. by
            :meth:`evidence_weights`' diagnostic weights).
        """
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int; got {num_samples!r}")
        context = self._prepare(args, kwargs, "sample_posterior")
        module = self.conditional
        with torch.no_grad():
            if isinstance(module, AmortizedGaussianModule):
                if component_weights is not None:
                    raise ValueError("component_weights needs a component conditional guide")
                forward = self.forward_stage.sample(context.expand(num_samples, -1), generator)
                latent = (
                    module.sample_from(module.distribution(forward), generator)
                    if self._latent_sites
                    else None
                )
                draws = dict(forward)
                if latent is not None:
                    draws.update(self._unpack_latent(latent))
            else:
                weights = (
                    module.log_weights.exp()
                    if component_weights is None
                    else torch.as_tensor(component_weights)
                )
                if weights.shape != module.log_weights.shape or (weights < 0).any() or not weights.sum() > 0:
                    raise ValueError(
                        f"component_weights must be {module.num_components} non-negative numbers with "
                        "a positive sum"
                    )
                index = self._stratified_index(num_samples, weights.to(module.log_weights), generator)
                draws = {name: points[index] for name, points in module.component_values().items()}
                if isinstance(module, ComponentGaussianModule):
                    if self._latent_sites:
                        latent = module.sample_from(module.distribution(index), generator)
                        draws.update(self._unpack_latent(latent))
                else:
                    draws.update(self._sample_factory_components(module, index, args, kwargs, generator))
        if return_states:
            draws.update(self._sample_states(draws, args, kwargs, generator))
        return draws

    def _sample_factory_components(self, module, index, args, kwargs, generator) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        names = self.latent_site_names
        for name in names:
            info = next(site for site in self._latent_sites if site.name == name)
            out[name] = torch.zeros(index.shape[0], *info.shape, dtype=info.dtype, device=index.device)
        with fork_rng_from(generator):
            for component in index.unique().tolist():
                rows = (index == component).nonzero().squeeze(-1)
                guide = module.component(component)
                for row in rows.tolist():
                    with poutine.block():
                        trace = poutine.trace(guide).get_trace(*args, **kwargs)
                    for name in names:
                        out[name][row] = trace.nodes[name]["value"]
        return out

    def _sample_states(self, draws, args, kwargs, generator) -> dict[str, torch.Tensor]:
        """Hidden states of observed ``GaussianHMM``-like sites given each draw (vectorised)."""
        num = next(iter(draws.values())).shape[0]
        mpn = self._max_plate_nesting
        reshaped = {}
        for site in self._forward_sites + self._latent_sites:
            value = draws[site.name]
            reshaped[site.name] = value.reshape((num,) + (1,) * (mpn - len(site.batch_shape)) + site.shape)
        with torch.no_grad(), poutine.block(), fork_rng_from(generator):
            with pyro.plate("_hybrid_states", num, dim=-mpn - 1):
                trace = poutine.trace(poutine.condition(self.model, reshaped)).get_trace(*args, **kwargs)
            out = {}
            for name in self._observed_shapes:
                site = trace.nodes[name]
                if hasattr(site["fn"], "rsample_posterior"):
                    states = site["fn"].rsample_posterior(site["value"])
                    out[f"{name}_states"] = states.reshape(num, *states.shape[-2:])
        if not out:
            raise ValueError("return_states: no observed site has a distribution with rsample_posterior")
        return out

    def quantiles(
        self,
        quantiles: Sequence[float] | torch.Tensor,
        *args,
        num_samples: int = 4000,
        generator: torch.Generator | None = None,
        **kwargs,
    ) -> dict[str, torch.Tensor]:
        """Elementwise Monte Carlo quantiles ``{site: [len(quantiles), *shape]}`` of the mixture.

        Discrete (forward) sites report their most probable value for every quantile.
        """
        stage_dtype = (
            self.forward_stage.dtype if self.forward_stage is not None else torch.get_default_dtype()
        )
        levels = torch.as_tensor(quantiles, dtype=stage_dtype).reshape(-1)
        if not ((levels >= 0) & (levels <= 1)).all():
            raise ValueError(f"quantiles must lie in [0, 1]; got {levels.tolist()}")
        draws = self.sample_posterior(num_samples, *args, generator=generator, **kwargs)
        out = {}
        for site in self._forward_sites + self._latent_sites:
            value = draws[site.name]
            if site.is_discrete:
                flat = value.reshape(value.shape[0], -1)
                unique, counts = torch.unique(flat, dim=0, return_counts=True)
                mode = unique[counts.argmax()].reshape(site.shape)
                out[site.name] = mode.expand(levels.shape[0], *site.shape).clone()
            else:
                out[site.name] = torch.quantile(value.to(levels.dtype), levels.to(value.device), dim=0).to(
                    value.dtype
                )
        return out

    def median(self, *args, num_samples: int = 4000, generator: torch.Generator | None = None, **kwargs):
        """Elementwise Monte Carlo median of every latent site (the 0.5 quantile)."""
        result = self.quantiles([0.5], *args, num_samples=num_samples, generator=generator, **kwargs)
        return {name: value[0] for name, value in result.items()}

    def moments(self, *args, num_samples: int = 4000, generator: torch.Generator | None = None, **kwargs):
        """Mean, total, within- and between-component covariance of z (flat, unconstrained), analytic.

        Component guides: exact from the components' Gaussian moments. Amortized guide: the conditional
        moments are exact, the expectation over q_phi uses ``num_samples`` draws of h.
        """
        context = self._prepare(args, kwargs, "moments")
        module = self.conditional
        with torch.no_grad():
            if isinstance(module, AmortizedGaussianModule):
                forward = self.forward_stage.sample(context.expand(num_samples, -1), generator)
                components = module.distribution(forward)
                weights = torch.full((num_samples,), 1.0 / num_samples, dtype=components.loc.dtype)
            elif isinstance(module, ComponentGaussianModule):
                components = module.distribution(torch.arange(module.num_components))
                weights = module.log_weights.exp()
            else:
                raise ValueError("moments() needs a built-in Gaussian conditional guide")
            means = components.loc
            covariances = components.covariance_matrix.expand(means.shape[0], -1, -1)
            weights = weights.to(means)
            mean = (weights.unsqueeze(-1) * means).sum(0)
            within = (weights[:, None, None] * covariances).sum(0)
            centred = means - mean
            between = (weights[:, None, None] * centred.unsqueeze(-1) * centred.unsqueeze(-2)).sum(0)
            second = (weights[:, None, None] * (covariances + means.unsqueeze(-1) * means.unsqueeze(-2))).sum(
                0
            )
            covariance = second - mean.unsqueeze(-1) * mean.unsqueeze(-2)
        shapes = {site.name: site.unconstrained_shape for site in self._latent_sites}
        return MixtureMoments(mean, covariance, within, between, dict(self._latent_slices), shapes)

    def evidence_weights(
        self, *args, num_particles: int = 64, vectorize_particles: bool = True, **kwargs
    ) -> ComponentWeights:
        """Diagnostic weights w_c ∝ p(h_c) exp(ELBO_c) (per_support) or that over q_phi(h_c) (per_sample).

        These approximate p(h | y_o) by the components' ELBOs; they can be sharper than q_phi and
        came close to a confident wrong answer in a prototype run, so they are a diagnostic, not the
        default (design note §1.4, caveat 2). Pass them to :meth:`sample_posterior` as
        ``component_weights`` for the evidence-weighted mixture.
        """
        context = self._prepare(args, kwargs, "evidence_weights")
        if not self.uses_components:
            raise ValueError("evidence_weights needs a per_support, per_sample or factory conditional guide")
        elbo = HybridELBO(num_particles=num_particles, vectorize_particles=vectorize_particles)
        with torch.no_grad():
            elbo.loss(self.model, self, *args, **kwargs)
        module = self.conditional
        log_evidence = elbo.last_component_log_prior + elbo.last_component_elbos
        log_w = log_evidence.clone()
        if not all(site.is_discrete for site in self._forward_sites):
            # components are draws h_k ~ q_phi: importance weights p(h_k) exp(ELBO_k) / q_phi(h_k)
            with torch.no_grad():
                log_q = self.forward_stage.log_prob(
                    module.component_values(), context.expand(module.num_components, -1)
                )
            log_w = log_w - log_q
        weights = (log_w - torch.logsumexp(log_w, 0)).exp()
        return ComponentWeights(module.component_values(), weights, log_evidence)

    # ================================================================================== persistence
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load a state saved by :meth:`state_dict` (call :meth:`setup` with the model arguments first).

        Allocates the stage-2 module to the saved number of components, loads, freezes stage 1 if the
        saved one was fitted, and removes this guide's stale stage-2 entries from Pyro's param store.
        """
        if self.forward_stage is None:
            raise ValueError(
                "load_state_dict before setup: call guide.setup(*args, **kwargs) with the model "
                "arguments first"
            )
        self.reset_conditional()
        if any(key.startswith("conditional.") for key in state_dict):
            context = state_dict["conditional.bound_context"].reshape(1, -1)
            count = (
                state_dict["conditional.log_weights"].shape[0]
                if "conditional.log_weights" in state_dict
                else 1
            )
            self.conditional = self._new_conditional(
                context.to(self.forward_stage.dtype), num_components=count
            )
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if bool(self.forward_stage.fitted):
            self.freeze_forward()
        if self.conditional is not None:
            prefix = f"{self._pyro_name}.conditional."
            store = pyro.get_param_store()
            for name in list(store.keys()):
                if name.startswith(prefix):
                    del store[name]
        self._observed_cache = self._context_cache = None
        return result


class HybridELBO(ELBO):
    """Stage-2 objective of :class:`HybridGuide`: minus the weighted conditional ELBOs.

    .. math::
        -L_2(\\psi) = -\\sum_c w_c\\, \\mathbb E_{q_\\psi(z \\mid h_c)}
        \\big[\\log p(y_o, z \\mid h_c) - \\log q_\\psi(z \\mid h_c)\\big]

    summed exactly over the components of a ``per_support``/``per_sample``/factory guide, or averaged over
    fresh h ~ q_phi for the amortized guide (``num_particles`` draws). The constant log p(h_c) and
    log q_phi(h_c) are left out (recorded in :attr:`last_component_log_prior`). With
    ``vectorize_particles=True`` all components and particles run in one vectorised trace (the model
    must broadcast over a leading batch dimension of h); factory guides batch particles only.
    ``Trace_ELBO`` gives the same psi-gradient (q_phi is frozen) from one sampled component.

    :param int num_particles: particles per component (amortized: draws of h).
    :param bool vectorize_particles: one vectorised trace instead of a Python loop.
    :param int max_plate_nesting: the model's plate nesting (default: read from the guide's prototype).

    Attributes after each call: :attr:`last_component_elbos` ``[S]`` (ELBO_c estimates) and
    :attr:`last_component_log_prior` ``[S]`` (log p(h_c)).

    References: arXiv:2406.02545 (derived form, see the design note §1.3).
    """

    def __init__(
        self, num_particles: int = 1, vectorize_particles: bool = False, max_plate_nesting: int | None = None
    ) -> None:
        if not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"num_particles must be a positive int; got {num_particles!r}")
        super().__init__(num_particles=num_particles, vectorize_particles=False)
        self.vectorize_particles = bool(vectorize_particles)
        self._max_plate_nesting = max_plate_nesting
        self.last_component_elbos: torch.Tensor | None = None
        self.last_component_log_prior: torch.Tensor | None = None

    @staticmethod
    def _check_guide(guide: Any) -> HybridGuide:
        if not isinstance(guide, HybridGuide):
            raise TypeError(f"HybridELBO needs a HybridGuide; got {type(guide).__name__}")
        return guide

    @staticmethod
    def _reduce(log_prob: torch.Tensor, size: int | None, nesting: int) -> torch.Tensor:
        """Sum a site's log prob to one value per particle (``size`` particles), or to a scalar."""
        if size is None:
            return log_prob.sum()
        if log_prob.dim() <= nesting:  # the site does not vary over particles
            return log_prob.sum().expand(size)
        lead = log_prob.shape[: log_prob.dim() - nesting]
        per_particle = log_prob.reshape(math.prod(lead), -1).sum(-1)
        if per_particle.shape[0] == size:
            return per_particle
        if per_particle.shape[0] == 1:
            return per_particle.expand(size)
        raise ValueError(
            f"a site's log_prob of shape {tuple(log_prob.shape)} does not match {size} particles"
        )

    def _run(self, model, guide: HybridGuide, args, kwargs, condition: dict, size: int | None, nesting: int):
        def vectorize(fn: Callable) -> Callable:
            if size is None:
                return fn

            def vectorized(*args, **kwargs):
                # the plate sits inside replay/condition so that it broadcasts the model's distributions
                with pyro.plate("_hybrid_elbo_particles", size, dim=-nesting - 1):
                    return fn(*args, **kwargs)

            return vectorized

        guide_fn = vectorize(guide)
        if condition:
            guide_fn = poutine.condition(guide_fn, data=condition)
        guide_trace = poutine.trace(guide_fn).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(vectorize(model), trace=guide_trace)).get_trace(
            *args, **kwargs
        )
        if is_validation_enabled():
            check_model_guide_match(model_trace, guide_trace, nesting + (1 if size is not None else 0))
        guide_trace = prune_subsample_sites(guide_trace)
        model_trace = prune_subsample_sites(model_trace)
        forward_names = set(guide.forward_site_names)
        skip = forward_names | {guide.aux_component_name}
        model_trace.compute_log_prob()
        guide_trace.compute_log_prob(site_filter=lambda name, site: name not in skip)
        elbo, log_prior = 0.0, 0.0
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            reduced = self._reduce(site["log_prob"], size, nesting)
            if name in forward_names:
                log_prior = log_prior + reduced
            else:
                elbo = elbo + reduced
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample" and name not in skip and not site["is_observed"]:
                elbo = elbo - self._reduce(site["log_prob"], size, nesting)
        return elbo, log_prior

    def _component_elbos(self, model, guide: HybridGuide, args, kwargs):
        guide._prepare(args, kwargs, "HybridELBO")
        nesting = self._max_plate_nesting if self._max_plate_nesting is not None else guide._max_plate_nesting
        particles = self.num_particles
        module = guide.conditional
        if isinstance(module, AmortizedGaussianModule):
            if self.vectorize_particles:
                elbo, log_prior = self._run(model, guide, args, kwargs, {}, particles, nesting)
                elbo, log_prior = elbo.mean(), torch.as_tensor(log_prior).mean()
            else:
                runs = [self._run(model, guide, args, kwargs, {}, None, nesting) for _ in range(particles)]
                elbo = sum(r[0] for r in runs) / particles
                log_prior = sum(torch.as_tensor(r[1]) for r in runs) / particles
            return elbo.reshape(1), torch.as_tensor(log_prior).reshape(1), elbo.new_ones(1)
        count = module.num_components
        aux = guide.aux_component_name
        weights = module.log_weights.exp()
        device = module.log_weights.device
        if self.vectorize_particles and isinstance(module, ComponentGaussianModule):
            size = count * particles
            index = torch.arange(count, device=device).repeat_interleave(particles)
            condition = {aux: index.reshape((size,) + (1,) * nesting)}
            elbo, log_prior = self._run(model, guide, args, kwargs, condition, size, nesting)
            elbos = elbo.reshape(count, particles).mean(-1)
            log_priors = torch.as_tensor(log_prior).expand(size).reshape(count, particles).mean(-1)
            return elbos, log_priors, weights
        elbos, log_priors = [], []
        for component in range(count):
            if self.vectorize_particles:
                condition = {aux: torch.full((particles,) + (1,) * nesting, component, device=device)}
                elbo, log_prior = self._run(model, guide, args, kwargs, condition, particles, nesting)
                elbos.append(elbo.mean())
                log_priors.append(torch.as_tensor(log_prior).mean())
            else:
                condition = {aux: torch.tensor(component, device=device)}
                runs = [
                    self._run(model, guide, args, kwargs, condition, None, nesting) for _ in range(particles)
                ]
                elbos.append(sum(r[0] for r in runs) / particles)
                log_priors.append(sum(torch.as_tensor(r[1]) for r in runs) / particles)
        return torch.stack(elbos), torch.stack(log_priors), weights

    def _get_trace(self, model, guide, args, kwargs):
        """One (model, guide) trace pair of a single particle, as other ELBOs provide."""
        guide = self._check_guide(guide)
        guide._prepare(args, kwargs, "HybridELBO")
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        return model_trace, guide_trace

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        guide = self._check_guide(guide)
        elbos, log_priors, weights = self._component_elbos(model, guide, args, kwargs)
        self.last_component_elbos = elbos.detach()
        self.last_component_log_prior = log_priors.detach()
        return -(weights.to(elbos) * elbos).sum()

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return torch_item(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return torch_item(loss)
