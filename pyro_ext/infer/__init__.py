"""Pyro inference: hybrid forward-KL / reverse-KL VI, calibration tools and the delayed-network models.

- :class:`~pyro_ext.infer.hybrid.HybridGuide` and :class:`~pyro_ext.infer.hybrid.HybridELBO`
  (arXiv:2406.02545, with FAVI, arXiv:1805.11542, for the forward-KL stage);
- forward families (:mod:`~pyro_ext.infer.forward_families`), summary networks
  (:mod:`~pyro_ext.infer.summaries`) and stage-2 conditional guides (:mod:`~pyro_ext.infer.conditionals`);
- coverage and simulation-based calibration for any posterior sampler (:mod:`~pyro_ext.infer.calibration`);
- the delayed linear network model, its simulator and baselines (:mod:`~pyro_ext.infer.networks`,
  :mod:`~pyro_ext.infer.network_fits`, :mod:`~pyro_ext.infer.rdcm`).
"""

from pyro_ext.infer.calibration import (
    CoverageResult,
    SBCResult,
    SimulatedDatasets,
    coverage,
    sbc_ranks,
    sbc_uniformity,
    simulate_datasets,
)
from pyro_ext.infer.conditionals import AmortizedConditional, PerSampleConditional, PerSupportConditional
from pyro_ext.infer.forward_families import CategoricalFamily, FlowFamily, MixtureFamily, NormalFamily
from pyro_ext.infer.forward_stage import ForwardPosterior
from pyro_ext.infer.hybrid import ComponentWeights, ForwardFitHistory, HybridELBO, HybridGuide, MixtureMoments
from pyro_ext.infer.network_fits import build_hybrid_guide, fit_hybrid, fit_joint, fit_naive, fit_oracle
from pyro_ext.infer.networks import CouplingPosterior, DelayedLinearNetwork, NetworkSimulation
from pyro_ext.infer.rdcm import fit_rdcm
from pyro_ext.infer.simulation import simulate_prior
from pyro_ext.infer.site_info import SiteInfo
from pyro_ext.infer.summaries import IdentitySummary, MLPSummary, TimeSeriesSummary

__all__ = [
    "AmortizedConditional",
    "CategoricalFamily",
    "ComponentWeights",
    "CouplingPosterior",
    "CoverageResult",
    "DelayedLinearNetwork",
    "FlowFamily",
    "ForwardFitHistory",
    "ForwardPosterior",
    "HybridELBO",
    "HybridGuide",
    "IdentitySummary",
    "MLPSummary",
    "MixtureFamily",
    "MixtureMoments",
    "NetworkSimulation",
    "NormalFamily",
    "PerSampleConditional",
    "PerSupportConditional",
    "SBCResult",
    "SimulatedDatasets",
    "SiteInfo",
    "TimeSeriesSummary",
    "build_hybrid_guide",
    "coverage",
    "fit_hybrid",
    "fit_joint",
    "fit_naive",
    "fit_oracle",
    "fit_rdcm",
    "sbc_ranks",
    "sbc_uniformity",
    "simulate_datasets",
    "simulate_prior",
]
