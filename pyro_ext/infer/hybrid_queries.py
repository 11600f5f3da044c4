"""Posterior queries of :class:`~pyro_ext.infer.hybrid.HybridGuide` (a mixin, to keep modules short).

Stage 1: :meth:`~HybridQueries.forward_posterior`, :meth:`~HybridQueries.forward_posterior_batch`,
:meth:`~HybridQueries.check_forward_calibration`. Stage 2 (the mixture
:math:`q(z \\mid y_o) = \\sum_c w_c\\, q_\\psi(z \\mid h_c)`): exact draws, Monte Carlo quantiles and
median, analytic moments split by the law of total variance, components and evidence weights.

References: Ambrogioni, Rouillard, Wassermann, arXiv:2406.02545 (design note §1.4, §2.5).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import pyro
import pyro.poutine as poutine
import torch

from pyro_ext.infer.calibration import SBCResult, rank_statistics, sbc_uniformity
from pyro_ext.infer.conditionals import (
    AmortizedGaussianModule,
    ComponentGaussianModule,
    FactoryComponentsModule,
)
from pyro_ext.infer.forward_stage import ForwardPosterior
from pyro_ext.infer.hybrid_elbo import HybridELBO
from pyro_ext.infer.simulation import fork_rng_from, simulate_prior

__all__ = ["ComponentWeights", "HybridQueries", "MixtureMoments"]


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


class HybridQueries:
    """Query methods of :class:`~pyro_ext.infer.hybrid.HybridGuide`; relies on the guide's internals."""

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

        ranks = {
            site.name: rank_statistics(result.values[site.name], draws[site.name], generator=generator)
            for site in self._forward_sites
        }
        return SBCResult(ranks=ranks, uniformity=sbc_uniformity(ranks, num_posterior_samples))

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
        with torch.no_grad():
            return self._conditional_distribution(forward_values)

    def _conditional_distribution(self, forward_values: Mapping[str, torch.Tensor]):
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
