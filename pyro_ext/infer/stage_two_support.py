"""Which forward values stage 2 conditions on: the components of a component conditional guide.

- ``per_support`` (discrete h): every point of the joint support of q_phi(h | y_o) -- enumerated exactly up to
  4096 points, else discovered from 8192 draws and scored exactly -- with q_phi above ``support_threshold``,
  weighted by q_phi renormalised over the kept points. The dropped mass is reported, with a warning above
  1% (it shrinks the between-component variance; design note §4.1).
- ``per_sample``: K draws h_k ~ q_phi(h | y_o), fixed at the start of stage 2, weight 1/K each; repeated
  discrete draws merge with count weights (design note §2.4).

References: Ambrogioni, Rouillard, Wassermann, arXiv:2406.02545.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import torch

from pyro_ext.infer.forward_stage import ForwardStage, joint_support_points

__all__ = ["select_components"]

#: joint discrete supports up to this size are enumerated exactly
MAX_ENUMERATED_SUPPORT = 4096
#: draws used to discover the support of q_phi when it is too large to enumerate
SUPPORT_DISCOVERY_DRAWS = 8192
#: dropped q_phi mass above which per_support warns (design note §4.1)
DROPPED_MASS_WARNING = 0.01


def unique_rows(
    draws: Mapping[str, torch.Tensor], names: list[str]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The distinct joint values among draws ``{site: [M, *shape]}`` and how often each occurs."""
    flat = torch.cat([draws[name].reshape(draws[name].shape[0], -1).double() for name in names], -1)
    unique, inverse, counts = torch.unique(flat, dim=0, return_inverse=True, return_counts=True)
    first = torch.zeros(unique.shape[0], dtype=torch.long, device=flat.device)
    first.scatter_(0, inverse, torch.arange(flat.shape[0], device=flat.device))
    return {name: draws[name][first] for name in names}, counts


def select_components(
    stage: ForwardStage,
    context: torch.Tensor,
    *,
    per_sample: bool,
    num_samples: int,
    support_threshold: float,
    generator: torch.Generator | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, float]:
    """Component values ``{site: [S, *shape]}``, log weights ``[S]`` and the q_phi mass left out.

    :param ForwardStage stage: the fitted, frozen stage 1.
    :param context: the data set's summary ``[1, C]``.
    :param bool per_sample: K draws instead of support points.
    :param int num_samples: K.
    :param float support_threshold: support points need q_phi above it.
    """
    sites = stage.sites
    names = [site.name for site in sites]
    all_discrete = all(site.is_discrete for site in sites)
    if per_sample:
        with torch.no_grad():
            draws = stage.sample(context.expand(num_samples, -1), generator)
        if all_discrete:
            values, counts = unique_rows(draws, names)
            return values, (counts.to(stage.dtype) / num_samples).log(), 0.0
        log_weights = torch.full(
            (num_samples,), -math.log(num_samples), dtype=context.dtype, device=context.device
        )
        return draws, log_weights, 0.0
    total = math.prod(site.support_size for site in sites)
    with torch.no_grad():
        if total <= MAX_ENUMERATED_SUPPORT:
            points = {name: value.to(stage.device) for name, value in joint_support_points(sites).items()}
        else:
            points, _ = unique_rows(
                stage.sample(context.expand(SUPPORT_DISCOVERY_DRAWS, -1), generator), names
            )
        count = next(iter(points.values())).shape[0]
        log_q = stage.log_prob(points, context.expand(count, -1))
    keep = log_q > math.log(support_threshold) if support_threshold > 0 else torch.isfinite(log_q)
    if not keep.any():
        keep = log_q == log_q.max()
    kept_mass = float(log_q[keep].exp().sum().clamp(max=1.0))
    dropped = 1.0 - kept_mass
    if dropped > DROPPED_MASS_WARNING:
        warnings.warn(
            f"per_support: the kept support points ({int(keep.sum())}) hold {kept_mass:.3f} of q_phi's mass; "
            f"{dropped:.3f} is dropped, which shrinks the between-component variance. Lower "
            "support_threshold or use conditional_guide='per_sample'",
            UserWarning,
            stacklevel=5,
        )
    values = {name: value[keep] for name, value in points.items()}
    return values, log_q[keep] - torch.logsumexp(log_q[keep], 0), dropped
