r"""Diffusion energies :math:`E(x, t) = -\log p_t(x)` (up to a constant) with their scores, denoisers and
score Jacobians: exact ones for empirical, Gaussian and Gaussian-mixture data, and energies of trained
networks.

All follow the protocol of :class:`Energy`: ``energy``, ``score``, ``denoise``, ``score_jacobian`` taking
``(x, t)`` with per-sample ``t``, the flag ``exact``, ``condition(mask, value)`` and (exact ones) ``sample``.
"""

from pyro_ext.diffusion.energy.base import ConditionedEnergy, Energy
from pyro_ext.diffusion.energy.empirical import EmpiricalEnergy
from pyro_ext.diffusion.energy.gaussian import GaussianEnergy, GaussianMixtureEnergy
from pyro_ext.diffusion.energy.scorenet import ScoreNetEnergy

__all__ = [
    "ConditionedEnergy",
    "EmpiricalEnergy",
    "Energy",
    "GaussianEnergy",
    "GaussianMixtureEnergy",
    "ScoreNetEnergy",
]
