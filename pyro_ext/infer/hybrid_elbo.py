"""Stage 2 of the hybrid scheme: :class:`HybridELBO`, the weighted sum of conditional ELBOs.

For a component guide (``per_support``, ``per_sample`` or a factory) the loss sums the components exactly,
each weighted by q_phi; for the amortized guide it averages over fresh h ~ q_phi. The terms log p(h_c)
and log q_phi(h_c), constant in psi, are left out (design note §1.3 and §2.4, a reconstruction of
arXiv:2406.02545 implemented as written there).

References: Ambrogioni, Rouillard, Wassermann, arXiv:2406.02545.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import ELBO
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.poutine.util import site_is_subsample
from pyro.util import check_model_guide_match

from pyro_ext.infer.conditionals import AmortizedGaussianModule, ComponentGaussianModule

__all__ = ["HybridELBO"]


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

    Example::

        elbo = HybridELBO(num_particles=4, vectorize_particles=True)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
        svi.step(y)
        elbo.last_component_elbos  # one estimate per kept delay configuration

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
    def _check_guide(guide: Any) -> Any:
        from pyro_ext.infer.hybrid import HybridGuide  # the guide module imports this one

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

    def _run(self, model, guide: Any, args, kwargs, condition: dict, size: int | None, nesting: int):
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
        forward_names = set(guide.forward_site_names)
        skip = forward_names | {guide.aux_component_name}
        model_trace.compute_log_prob()
        guide_trace.compute_log_prob(site_filter=lambda name, site: name not in skip)
        elbo, log_prior = 0.0, 0.0
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            reduced = self._reduce(site["log_prob"], size, nesting)
            if name in forward_names:
                log_prior = log_prior + reduced
            else:
                elbo = elbo + reduced
        for name, site in guide_trace.nodes.items():
            if (
                site["type"] == "sample"
                and name not in skip
                and not site["is_observed"]
                and not site_is_subsample(site)
            ):
                elbo = elbo - self._reduce(site["log_prob"], size, nesting)
        return elbo, log_prior

    def _component_elbos(self, model, guide: Any, args, kwargs):
        guide._prepare(args, kwargs, "HybridELBO")
        nesting = self._max_plate_nesting if self._max_plate_nesting is not None else guide._max_plate_nesting
        particles = self.num_particles
        module = guide.conditional
        if isinstance(module, AmortizedGaussianModule):
            if self.vectorize_particles and particles > 1:
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
        if self.vectorize_particles and isinstance(module, ComponentGaussianModule) and count * particles > 1:
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
