"""Diffusion models as energy-based Pyro models: schedules, exact energies, Pyro distributions, samplers.

A diffusion model's score is the gradient of an energy :math:`E = -\\log p_t`. This part exposes that
energy to Pyro (:class:`DiffusionEnergy`, :func:`potential_fn`, :func:`energy_nuts`), provides exact
energies of diffused empirical and Gaussian data (:class:`EmpiricalEnergy` is a modern Hopfield energy),
turns trained score networks into energies (:class:`ScoreNetEnergy`), and samples the reverse process
with a drop-in Gaussian late start.

References: Ambrogioni, arXiv:2309.17290; Raya & Ambrogioni, arXiv:2305.19693; Ambrogioni, arXiv:2310.17467.
"""

from pyro_ext.diffusion.distributions import DiffusionEnergy, energy_nuts, factor_model, potential_fn
from pyro_ext.diffusion.energy import (
    ConditionedEnergy,
    EmpiricalEnergy,
    Energy,
    GaussianEnergy,
    GaussianMixtureEnergy,
    ScoreNetEnergy,
)
from pyro_ext.diffusion.hopfield import diffusion_bias, hopfield_energy, hopfield_update, retrieve_hopfield
from pyro_ext.diffusion.schedules import (
    DDPM,
    Cosine,
    ParametrisedScore,
    Schedule,
    VEGeometric,
    VEVariance,
    VPLinear,
    convert,
    ddpm_index_to_t,
    t_to_ddpm_index,
)

__all__ = [
    "DDPM",
    "ConditionedEnergy",
    "DiffusionEnergy",
    "EmpiricalEnergy",
    "Energy",
    "GaussianEnergy",
    "GaussianMixtureEnergy",
    "ScoreNetEnergy",
    "Cosine",
    "ParametrisedScore",
    "Schedule",
    "VEGeometric",
    "VEVariance",
    "VPLinear",
    "convert",
    "diffusion_bias",
    "energy_nuts",
    "factor_model",
    "hopfield_energy",
    "hopfield_update",
    "potential_fn",
    "retrieve_hopfield",
    "ddpm_index_to_t",
    "t_to_ddpm_index",
]
