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
from pyro_ext.diffusion.geometry import (
    critical_time,
    estimate_manifold_dim,
    fixed_point,
    jacobian_spectrum,
    order_parameter,
    phase_boundaries,
    score_jacobian,
    spectral_gaps,
    spectrum_over_time,
)
from pyro_ext.diffusion.hopfield import (
    CapacityTable,
    capacity,
    capacity_experiment,
    diffusion_bias,
    hopfield_energy,
    hopfield_update,
    retrieve_diffusion,
    retrieve_hopfield,
)
from pyro_ext.diffusion.metrics import energy_distance, sliced_wasserstein
from pyro_ext.diffusion.sampling import (
    GaussianStats,
    fit_gaussian,
    gaussian_late_start,
    late_start_distribution,
    sample,
    time_grid,
)
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
from pyro_ext.diffusion.training import FourierTime, MLPScore, train_dsm

__all__ = [
    "CapacityTable",
    "ConditionedEnergy",
    "Cosine",
    "DDPM",
    "DiffusionEnergy",
    "EmpiricalEnergy",
    "Energy",
    "FourierTime",
    "GaussianEnergy",
    "GaussianMixtureEnergy",
    "GaussianStats",
    "MLPScore",
    "ParametrisedScore",
    "Schedule",
    "ScoreNetEnergy",
    "VEGeometric",
    "VEVariance",
    "VPLinear",
    "capacity",
    "capacity_experiment",
    "convert",
    "critical_time",
    "ddpm_index_to_t",
    "diffusion_bias",
    "energy_distance",
    "energy_nuts",
    "estimate_manifold_dim",
    "factor_model",
    "fit_gaussian",
    "fixed_point",
    "gaussian_late_start",
    "hopfield_energy",
    "hopfield_update",
    "jacobian_spectrum",
    "late_start_distribution",
    "order_parameter",
    "phase_boundaries",
    "potential_fn",
    "retrieve_diffusion",
    "retrieve_hopfield",
    "sample",
    "score_jacobian",
    "sliced_wasserstein",
    "spectral_gaps",
    "spectrum_over_time",
    "t_to_ddpm_index",
    "time_grid",
    "train_dsm",
]
