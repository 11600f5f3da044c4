"""Stage 1 of ``HybridGuide``: the amortized forward density q_phi(h | s_eta(y)) over all forward sites.

:class:`ForwardStage` chains one conditional density per forward site -- discrete sites first, then
continuous ones, each in program order -- so that the joint is

.. math::
    q_\\phi(h \\mid y) = \\prod_k q_{\\phi_k}\\big(h_k \\mid s_\\eta(y) \\oplus \\mathrm{enc}(h_{<k})\\big),

where ``enc`` is the one-hot code of a discrete site and the unconstrained value of a continuous one.
Every factor is a proper density at its site's name, which is what lets each forward site be emitted
as an ordinary ``pyro.sample`` statement that Pyro's ``CSIS`` can score (design note, pitfall 1).
With mixed sites the flow's context is the summary and the one-hot codes of the discrete values
(design note §2.2).

:class:`ForwardSiteDistribution` wraps one factor as a ``TorchDistribution`` whose batch shape comes
from the context, so plates (Predictive's particle plate included) expand it.

References: Ambrogioni et al., arXiv:2406.02545; Ambrogioni et al., arXiv:1805.11542.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch import nn

from pyro_ext.infer.forward_families import ConditionalFlow, ConditionalNormal, resolve_family, sample_density
from pyro_ext.infer.site_info import SiteInfo
from pyro_ext.infer.summaries import SummaryNetwork

__all__ = ["ForwardPosterior", "ForwardSiteDistribution", "ForwardStage"]


class ForwardStage(nn.Module):
    """Summary network plus the chain of per-site conditional densities.

    :param SummaryNetwork summary: the summary network s_eta.
    :param sites: forward sites in chain order (discrete first).
    :param family: the ``forward_family`` spec (string, callable or dict per site).
    """

    def __init__(self, summary: SummaryNetwork, sites: Sequence[SiteInfo], family: object) -> None:
        super().__init__()
        self.summary = summary
        self.sites = list(sites)
        self.densities = nn.ModuleList()
        width = summary.out_features
        for site in self.sites:
            self.densities.append(resolve_family(family, width, site))
            width += site.encoding_dim
        self.register_buffer("fitted", torch.tensor(False))

    @property
    def dtype(self) -> torch.dtype:
        return self.summary.feature_shift.dtype

    @property
    def device(self) -> torch.device:
        return self.summary.feature_shift.device

    def set_memoize(self, enabled: bool) -> None:
        """Let the (frozen) densities cache their network outputs for a repeated context."""
        for density in self.densities:
            if hasattr(density, "set_memoize"):
                density.set_memoize(enabled)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """Summary ``[N, C]`` of fixed features ``[N, F]``."""
        return self.summary(features.to(self.dtype))

    def set_statistics(self, features: torch.Tensor, values: Mapping[str, torch.Tensor]) -> None:
        self.summary.set_statistics(features.to(self.dtype))
        for site, density in zip(self.sites, self.densities):
            if hasattr(density, "set_statistics"):
                density.set_statistics(values[site.name])

    def _extend(self, context: torch.Tensor, site: SiteInfo, value: torch.Tensor) -> torch.Tensor:
        return torch.cat([context, site.encode(value, context.dtype)], -1)

    def log_prob(self, values: Mapping[str, torch.Tensor], context: torch.Tensor) -> torch.Tensor:
        """``log q(h | context)`` ``[N]`` for values ``{site: [N, *shape]}`` and context ``[N, C]``."""
        total = 0.0
        for site, density in zip(self.sites, self.densities):
            value = values[site.name]
            total = total + density.log_prob(value, context)
            context = self._extend(context, site, value)
        return total

    def sample(
        self, context: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """One joint draw ``{site: [N, *shape]}`` per context row ``[N, C]``."""
        values = {}
        for site, density in zip(self.sites, self.densities):
            value = sample_density(density, torch.Size(), context, generator)
            values[site.name] = value
            context = self._extend(context, site, value)
        return values

    def contexts(self, values: Mapping[str, torch.Tensor], context: torch.Tensor) -> list[torch.Tensor]:
        """The context each factor sees, ``[N, C_k]``, given values ``{site: [N, *shape]}``."""
        out = []
        for site in self.sites:
            out.append(context)
            context = self._extend(context, site, values[site.name])
        return out


class ForwardSiteDistribution(TorchDistribution):
    """One factor q(h_k | context) as a Pyro distribution at the site's name.

    Its batch shape is ``outer_shape + site.batch_shape`` (``outer_shape`` carries particle plates); the
    event shape is the site's event shape. For a site inside plates the factor is a joint density over
    the whole value, so ``log_prob`` spreads it evenly over the plate elements: the sum, which is all an
    ELBO or ``CSIS`` uses, is exact.

    :param density: the factor's conditional density module.
    :param SiteInfo site: the forward site.
    :param torch.Tensor context: ``[M, C]`` with ``M = 1`` (shared) or ``M = prod(outer_shape)``.
    :param torch.Size outer_shape: particle batch shape.
    """

    arg_constraints: dict = {}

    def __init__(
        self,
        density: nn.Module,
        site: SiteInfo,
        context: torch.Tensor,
        outer_shape: Sequence[int] = (),
        generator: torch.Generator | None = None,
    ) -> None:
        self.density = density
        self.site = site
        self.context = context
        self.outer_shape = torch.Size(outer_shape)
        self.generator = generator
        self.has_rsample = isinstance(density, (ConditionalFlow, ConditionalNormal))
        batch_shape = self.outer_shape + site.batch_shape
        event_shape = site.shape[len(site.batch_shape) :]
        super().__init__(batch_shape, event_shape, validate_args=False)

    @property
    def support(self):
        return self.site.support

    def expand(self, batch_shape: Sequence[int], _instance: object = None) -> ForwardSiteDistribution:
        batch_shape = torch.Size(batch_shape)
        site_batch = self.site.batch_shape
        if batch_shape[len(batch_shape) - len(site_batch) :] != site_batch:
            raise ValueError(
                f"cannot expand forward site {self.site.name!r} with plate shape {tuple(site_batch)} to "
                f"batch shape {tuple(batch_shape)}"
            )
        outer = batch_shape[: len(batch_shape) - len(site_batch)]
        if self.context.shape[0] != 1 and math.prod(outer) != self.context.shape[0]:
            raise ValueError(
                f"cannot expand forward site {self.site.name!r} with {self.context.shape[0]} contexts to "
                f"batch shape {tuple(batch_shape)}"
            )
        return ForwardSiteDistribution(self.density, self.site, self.context, outer, self.generator)

    def rsample(self, sample_shape: Sequence[int] = ()) -> torch.Tensor:
        sample_shape = torch.Size(sample_shape)
        num_outer = math.prod(self.outer_shape)
        rows = self.context.shape[0]
        if rows == 1:
            draws = sample_density(
                self.density, torch.Size([math.prod(sample_shape) * num_outer]), self.context, self.generator
            )
        else:
            draws = sample_density(
                self.density, torch.Size([math.prod(sample_shape)]), self.context, self.generator
            )
        return draws.reshape(sample_shape + self.outer_shape + self.site.shape)

    def sample(self, sample_shape: Sequence[int] = ()) -> torch.Tensor:
        if self.has_rsample:
            return self.rsample(sample_shape)
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        site_dims = len(self.site.shape)
        lead = value.shape[: value.dim() - site_dims]
        flat = value.reshape(-1, *self.site.shape)
        rows = self.context.shape[0]
        if rows == 1:
            context = self.context.expand(flat.shape[0], -1)
        elif flat.shape[0] % rows == 0:
            context = self.context.repeat(flat.shape[0] // rows, 1)
        else:
            raise ValueError(
                f"value of shape {tuple(value.shape)} does not match the {rows} contexts of forward site "
                f"{self.site.name!r}"
            )
        log_prob = self.density.log_prob(flat, context).reshape(lead)
        num_plate = math.prod(self.site.batch_shape)
        if num_plate > 1 or len(self.site.batch_shape):
            log_prob = log_prob.reshape(lead + (1,) * len(self.site.batch_shape))
            log_prob = log_prob.expand(lead + self.site.batch_shape) / num_plate
        return log_prob


class ForwardPosterior:
    """q_phi(h | y) for one data set (or a batch of them) as a joint distribution over the forward sites.

    Values are dictionaries ``{site: Tensor}``: one draw of every forward site (a single site's value
    is ``draws[name]``).

    :param ForwardStage stage: the fitted stage 1.
    :param torch.Tensor context: ``[B, C]`` summaries.
    :param bool batched: whether draws carry the data-set dimension ``B`` (else ``B = 1`` is dropped).
    """

    def __init__(self, stage: ForwardStage, context: torch.Tensor, batched: bool = False) -> None:
        self.stage = stage
        self.context = context
        self.batched = batched

    @property
    def site_names(self) -> list[str]:
        return [site.name for site in self.stage.sites]

    def sample(
        self, sample_shape: Sequence[int] = (), generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Draws ``{site: [*sample_shape, (B,) *site_shape]}``."""
        sample_shape = torch.Size(sample_shape)
        rows = self.context.shape[0]
        with torch.no_grad():
            draws = self.stage.sample(self.context.repeat(math.prod(sample_shape), 1), generator)
        batch = (rows,) if self.batched else ()
        return {
            site.name: draws[site.name].reshape(sample_shape + batch + site.shape)
            for site in self.stage.sites
        }

    def log_prob(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``log q(h | y)`` of values ``{site: [..., (B,) *site_shape]}``, shape ``[...(, B)]``."""
        first = self.stage.sites[0]
        lead = values[first.name].shape[: values[first.name].dim() - len(first.shape)]
        flat = {site.name: values[site.name].reshape(-1, *site.shape) for site in self.stage.sites}
        count = next(iter(flat.values())).shape[0]
        rows = self.context.shape[0]
        if count % rows:
            raise ValueError(f"values with leading shape {tuple(lead)} do not match {rows} data sets")
        with torch.no_grad():
            return self.stage.log_prob(flat, self.context.repeat(count // rows, 1)).reshape(lead)

    def support(
        self, threshold: float = 0.0, max_points: int = 4096
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Every point of the joint discrete support with its probability (discrete forward sites only).

        :returns: ``({site: [S, *shape]}, probs [S] or [B, S])``, points with probability above
            ``threshold`` in at least one data set.
        """
        sites = self.stage.sites
        if not all(site.is_discrete for site in sites):
            raise TypeError("support() needs every forward site to be discrete")
        total = math.prod(site.support_size for site in sites)
        if total > max_points:
            raise ValueError(f"the joint support has {total} points (> max_points={max_points})")
        points = {name: value.to(self.context.device) for name, value in joint_support_points(sites).items()}
        rows = self.context.shape[0]
        with torch.no_grad():
            repeated = {name: value.repeat_interleave(rows, 0) for name, value in points.items()}
            log_q = self.stage.log_prob(repeated, self.context.repeat(total, 1)).reshape(total, rows).T
        probs = log_q.exp()
        keep = (probs > threshold).any(0)
        points = {name: value[keep] for name, value in points.items()}
        probs = probs[:, keep]
        return points, probs if self.batched else probs[0]

    def mean_and_variance(
        self, num_samples: int = 4000, generator: torch.Generator | None = None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Monte Carlo mean and variance of each forward site (constrained space)."""
        draws = self.sample((num_samples,), generator)
        out = {}
        for name, value in draws.items():
            value = value.to(self.context.dtype)
            out[name] = (value.mean(0), value.var(0))
        return out


def joint_support_points(sites: Sequence[SiteInfo]) -> dict[str, torch.Tensor]:
    """The product support of several discrete sites, ``{site: [S, *shape]}`` (first site slowest)."""
    per_site = [site.support_points() for site in sites]
    sizes = [points.shape[0] for points in per_site]
    total = math.prod(sizes)
    grids = torch.cartesian_prod(*[torch.arange(size) for size in sizes]).reshape(total, len(sites))
    return {site.name: points[grids[:, k]] for k, (site, points) in enumerate(zip(sites, per_site))}
