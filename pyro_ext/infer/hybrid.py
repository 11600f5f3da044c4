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
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.initialization import InitMessenger, init_to_median
from pyro.poutine.util import prune_subsample_sites, site_is_subsample

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
from pyro_ext.infer.forward_stage import ForwardSiteDistribution, ForwardStage
from pyro_ext.infer.forward_training import ForwardFitHistory, train_forward_stage
from pyro_ext.infer.hybrid_elbo import HybridELBO
from pyro_ext.infer.hybrid_queries import ComponentWeights, HybridQueries, MixtureMoments
from pyro_ext.infer.simulation import simulate_prior
from pyro_ext.infer.site_info import SiteInfo, site_info_from_trace_site
from pyro_ext.infer.stage_two_support import select_components
from pyro_ext.infer.summaries import build_summary

__all__ = ["ComponentWeights", "ForwardFitHistory", "HybridELBO", "HybridGuide", "MixtureMoments"]


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


class HybridGuide(HybridQueries, AutoGuide):
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
        parameters = self.__dict__.get("_stage_parameters")
        if parameters is None:  # collected once: walking the module tree on every SVI step is slow
            parameters = self.__dict__["_stage_parameters"] = list(stage.parameters())
        if stage.training or any(p.requires_grad for p in parameters):
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
        stage.set_memoize(True)
        self.__dict__["_stage_parameters"] = list(stage.parameters())
        self._observed_cache = self._context_cache = None

    def _unfreeze_forward(self) -> None:
        stage = self.forward_stage
        stage.requires_grad_(True)
        stage.train()
        stage.fitted.fill_(False)
        stage.set_memoize(False)

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

        online_draw = (lambda count: draw(count)[:2]) if online else None
        train_forward_stage(
            stage,
            features,
            values,
            train_index,
            validation_index,
            history,
            batch_size=batch_size,
            max_epochs=max_epochs,
            lr=lr,
            patience=patience,
            weight_decay=weight_decay,
            online_draw=online_draw,
            progress_bar=progress_bar,
            generator=generator,
        )
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
            self._drop_conditional_params()
            del self.conditional
        self.conditional = None

    def _drop_conditional_params(self) -> None:
        """Remove stage 2's entries from Pyro's param store (they would shadow fresh or loaded values)."""
        prefix = f"{self._pyro_name}.conditional."
        store = pyro.get_param_store()
        for name in list(store.keys()):
            if name.startswith(prefix):
                del store[name]
        self._num_dropped_mass = 0.0

    @property
    def dropped_mass(self) -> float:
        """q_phi mass of the support points stage 2 dropped (``per_support``)."""
        return self._num_dropped_mass

    def _draw_generator(self) -> torch.Generator | None:
        return self.generator

    def _select_components(self, context: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Component values ``{site: [S, *shape]}`` and log weights ``[S]`` for a component guide."""
        kind = getattr(self._conditional_kind, "kind", None)
        all_discrete = all(site.is_discrete for site in self._forward_sites)
        per_sample = kind == "per_sample" or (kind is None and not all_discrete)
        values, log_weights, dropped = select_components(
            self.forward_stage,
            context,
            per_sample=per_sample,
            num_samples=self.num_conditional_samples,
            support_threshold=self.support_threshold,
            generator=self._draw_generator(),
        )
        self._num_dropped_mass = dropped
        return values, log_weights

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
            if site is self._forward_sites[-1]:
                break  # no later factor needs the context
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
            values.update(self._emit_latent(module.distribution(flat, outer), outer, plates))
            return values
        values, outer, flat_index = self._emit_components(plates)
        if isinstance(module, ComponentGaussianModule):
            values.update(self._emit_latent(module.distribution(flat_index, outer), outer, plates))
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
        if any(re.match(r"conditional\.component_\d+\.", key) for key in state_dict):
            raise NotImplementedError(
                "load_state_dict cannot rebuild a factory conditional guide (its autoguides create their "
                "parameters lazily); save and load those with pyro.get_param_store().save / .load instead"
            )
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
            self._drop_conditional_params()
        self._observed_cache = self._context_cache = None
        return result
