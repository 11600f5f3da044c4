"""Flows: any Pyro model as an nflows layer (embedded-model flows).

- :mod:`~pyro_ext.flows.site_bijectors`: noise <-> value maps of single distributions
  (:func:`site_bijector`, :func:`register_site_bijector`, :class:`UnsupportedSiteError`);
- :mod:`~pyro_ext.flows.roots`: the bracketed monotone root finder with implicit gradients;
- :mod:`~pyro_ext.flows.structured`: :class:`StructuredTransform` and :class:`GatedStructuredTransform`,
  nflows transforms built by tracing a Pyro model once;
- :mod:`~pyro_ext.flows.emf`: :func:`emf_flow` (EMF-T/M, GEMF, B-MAF) and :class:`ModelDistribution`;
- :mod:`~pyro_ext.flows.fast_paths`: hand-written layers for common priors (Gaussian chains, a
  hierarchical Gaussian, independent mixtures) that agree with the generic structured layer.

References: Silvestri, Fertig, Moore, Ambrogioni, *Embedded-model flows*, arXiv:2110.06021.
"""

from pyro_ext.flows.emf import ModelDistribution, backbone_flow, emf_flow
from pyro_ext.flows.fast_paths import (
    GaussianChainTransform,
    HierarchicalGaussianTransform,
    IndependentMixtureTransform,
)
from pyro_ext.flows.roots import fixed_root_iterations, implicit_step, monotone_root
from pyro_ext.flows.site_bijectors import (
    SiteBijector,
    UnsupportedSiteError,
    register_site_bijector,
    site_bijector,
)
from pyro_ext.flows.structured import (
    GatedStructuredTransform,
    SiteInfo,
    StructuredTransform,
    to_torch_transform,
)

__all__ = [
    "GatedStructuredTransform",
    "GaussianChainTransform",
    "HierarchicalGaussianTransform",
    "IndependentMixtureTransform",
    "ModelDistribution",
    "SiteBijector",
    "SiteInfo",
    "StructuredTransform",
    "UnsupportedSiteError",
    "backbone_flow",
    "emf_flow",
    "fixed_root_iterations",
    "implicit_step",
    "monotone_root",
    "register_site_bijector",
    "site_bijector",
    "to_torch_transform",
]
