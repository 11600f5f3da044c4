r"""Diffusion energies as Pyro distributions and MCMC potentials.

A diffusion energy :math:`E(x, t) = -\log p_t(x)` becomes a prior or likelihood of a Pyro model in three
equivalent ways:

1. ``pyro.sample("x", DiffusionEnergy(energy, t))`` — a :class:`~pyro.distributions.TorchDistribution`
   whose ``log_prob`` is :math:`-E/T`;
2. the *factor pattern*, the same density written with an improper flat site and a factor::

       x = pyro.sample("x", dist.ImproperUniform(constraints.real, (), (d,)))
       pyro.factor("diffusion_energy", -energy.energy(x, t) / temperature)

3. no model at all: ``NUTS(potential_fn=potential_fn(energy, t))``.

**Pyro pitfall.** ``NUTS(model)`` traces the model before ``initial_params`` apply — once to guess the plate
nesting and once in the default ``init_to_uniform``, which calls ``fn.sample()``. An energy that cannot be
sampled exactly (a trained network, a temperature other than 1) then raises. :func:`energy_nuts` sets
``max_plate_nesting`` and ``init_strategy=init_to_value(...)`` so that ``sample()`` is never called.

**In-painting and associative recall** are posterior inference: ``DiffusionEnergy(energy, t,
condition=(mask, value))`` is the energy of the free coordinates given the observed ones. NUTS does not
hop between distant modes; use a moderate ``t``, several chains, or lower ``t`` progressively.

References: Ambrogioni, arXiv:2309.17290 and arXiv:2310.17467; pyro-ppl/pyro issue #3211.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import pyro
import torch
from pyro import poutine
from pyro.distributions import TorchDistribution, constraints
from pyro.infer import NUTS
from pyro.infer.autoguide.initialization import InitMessenger, init_to_value
from torch import Tensor

from pyro_ext.diffusion.energy.base import Energy
from pyro_ext.diffusion.schedules import TimeLike

__all__ = ["DiffusionEnergy", "energy_nuts", "factor_model", "potential_fn"]


def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a positive float; got {type(temperature).__name__}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be positive and finite; got {temperature}")
    return float(temperature)


def _conditioned(energy: Energy, condition: tuple[Tensor, Tensor] | None) -> Energy:
    if not isinstance(energy, Energy):
        raise TypeError(f"energy must be a pyro_ext.diffusion Energy; got {type(energy).__name__}")
    if condition is None:
        return energy
    if not (isinstance(condition, (tuple, list)) and len(condition) == 2):
        raise TypeError("condition must be a pair (mask, value)")
    return energy.condition(*condition)


class DiffusionEnergy(TorchDistribution):
    r"""The (unnormalised) distribution :math:`\propto \exp(-E(x, t)/T)` of a diffusion energy.

    - ``log_prob(x) = -energy(x, t) / temperature``, broadcast over ``sample_shape + batch_shape``;
    - ``batch_shape`` is the shape of ``t``, ``event_shape`` is ``[d]`` (the free coordinates when
      conditioned);
    - :attr:`is_normalized` is True only for an exact energy at temperature 1;
    - :meth:`sample` is exact for an exact energy at temperature 1; otherwise it calls ``sampler(shape)``
      (for instance a reverse-process run from ``t_max`` to ``t`` returning ``shape + [d]``), or raises
      ``NotImplementedError`` pointing to :func:`potential_fn` and :func:`energy_nuts`.

    :param Energy energy: the energy.
    :param t: the diffusion time, a float or a tensor (its shape is the batch shape).
    :param float temperature: :math:`T > 0`.
    :param condition: ``(mask, value)``: condition on the observed coordinates ``mask`` (see
        :meth:`Energy.condition`).
    :param sampler: optional ``callable(shape) -> Tensor`` used by :meth:`sample` when it cannot be exact.

    Example::

        >>> import pyro
        >>> from pyro_ext.diffusion import EmpiricalEnergy, VEVariance
        >>> energy = EmpiricalEnergy(torch.randn(10, 4), VEVariance())
        >>> def model():
        ...     return pyro.sample("x", DiffusionEnergy(energy, 1.0))
        >>> kernel = energy_nuts(model, {"x": torch.zeros(4)})

    References: Ambrogioni, arXiv:2309.17290.
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = False

    def __init__(
        self,
        energy: Energy,
        t: TimeLike,
        temperature: float = 1.0,
        *,
        condition: tuple[Tensor, Tensor] | None = None,
        sampler: Callable[[torch.Size], Tensor] | None = None,
        validate_args: bool | None = None,
    ) -> None:
        energy = _conditioned(energy, condition)
        if sampler is not None and not callable(sampler):
            raise TypeError(f"sampler must be callable as sampler(shape); got {type(sampler).__name__}")
        self.energy = energy
        self.t = energy._time(t)
        self.temperature = _check_temperature(temperature)
        self.sampler = sampler
        super().__init__(self.t.shape, torch.Size([energy.dim]), validate_args=validate_args)

    @property
    def is_normalized(self) -> bool:
        """True if ``log_prob`` is a normalised log-density (an exact energy at temperature 1)."""
        return bool(self.energy.exact) and self.temperature == 1.0

    def expand(self, batch_shape: torch.Size, _instance: DiffusionEnergy | None = None) -> DiffusionEnergy:
        new = self._get_checked_instance(DiffusionEnergy, _instance)
        batch_shape = torch.Size(batch_shape)
        new.energy = self.energy
        new.t = self.t.expand(batch_shape)
        new.temperature = self.temperature
        new.sampler = self.sampler
        super(DiffusionEnergy, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value: Tensor) -> Tensor:
        """:math:`-E(x, t)/T`, shape ``value.shape[:-1]`` broadcast with the batch shape."""
        if self._validate_args:
            self._validate_sample(value)
        return -self.energy.energy(value, self.t) / self.temperature

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape
        if self.is_normalized:
            try:
                with torch.no_grad():
                    return self.energy.sample(sample_shape, self.t)
            except NotImplementedError:
                if self.sampler is None:
                    raise
        if self.sampler is not None:
            draws = self.sampler(shape)
            if not isinstance(draws, Tensor) or draws.shape != shape + self.event_shape:
                raise ValueError(
                    f"sampler(shape) must return a tensor of shape {tuple(shape + self.event_shape)}; got "
                    f"{tuple(draws.shape) if isinstance(draws, Tensor) else type(draws).__name__}"
                )
            return draws
        reason = (
            "a temperature other than 1" if self.energy.exact else f"{type(self.energy).__name__} energies"
        )
        raise NotImplementedError(
            f"DiffusionEnergy cannot sample exactly for {reason}. Pass sampler=callable(shape) (e.g. a "
            "reverse-process run), or use the energy in MCMC: NUTS(potential_fn=pyro_ext.diffusion."
            "potential_fn(energy, t)), or pyro_ext.diffusion.energy_nuts(model, init), which sets "
            "init_to_value and max_plate_nesting so that Pyro never calls sample()."
        )

    def extra_repr(self) -> str:  # pragma: no cover - cosmetic
        return f"energy={type(self.energy).__name__}, temperature={self.temperature:g}"


def potential_fn(
    energy: Energy,
    t: TimeLike,
    site: str = "x",
    temperature: float = 1.0,
    condition: tuple[Tensor, Tensor] | None = None,
) -> Callable[[Mapping[str, Tensor]], Tensor]:
    r"""A potential ``params -> sum(energy(params[site], t)) / T`` for ``NUTS(potential_fn=...)``.

    :param Energy energy: the energy.
    :param t: the diffusion time (float or tensor broadcasting against the site's batch shape).
    :param str site: the key of ``params`` holding ``x``.
    :param float temperature: :math:`T > 0`.
    :param condition: ``(mask, value)``: the potential of the free coordinates.

    Example::

        >>> from pyro.infer import MCMC, NUTS
        >>> from pyro_ext.diffusion import EmpiricalEnergy, VEVariance
        >>> energy = EmpiricalEnergy(torch.randn(10, 4), VEVariance())
        >>> kernel = NUTS(potential_fn=potential_fn(energy, 1.0))
        >>> mcmc = MCMC(kernel, num_samples=100, warmup_steps=100, initial_params={"x": torch.zeros(4)})

    References: Ambrogioni, arXiv:2310.17467.
    """
    energy = _conditioned(energy, condition)
    temperature = _check_temperature(temperature)
    t = energy._time(t)

    def potential(params: Mapping[str, Tensor]) -> Tensor:
        if site not in params:
            raise ValueError(f"potential_fn expected a parameter named {site!r}; got {sorted(params)}")
        return energy.energy(params[site], t).sum() / temperature

    return potential


def _plate_nesting(model: Callable, init: Mapping[str, Tensor], args: tuple, kwargs: dict) -> int:
    """Deepest plate nesting of ``model``, traced with ``init`` values so that no ``sample()`` is called."""
    with poutine.block():
        trace = poutine.trace(InitMessenger(init_to_value(values=dict(init)))(model)).get_trace(
            *args, **kwargs
        )
    dims = [
        frame.dim
        for node in trace.nodes.values()
        if node["type"] == "sample"
        for frame in node["cond_indep_stack"]
        if frame.vectorized
    ]
    return -min(dims) if dims else 0


def energy_nuts(
    model: Callable,
    init: Mapping[str, Tensor] | Tensor,
    *,
    max_plate_nesting: int | None = None,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    **nuts_kwargs,
) -> NUTS:
    """A :class:`pyro.infer.NUTS` kernel for a model with an energy site that cannot be sampled.

    Sets ``init_strategy=init_to_value(values=init)`` and ``max_plate_nesting`` (found by tracing the model
    with the initial values, unless given), the two things that otherwise make Pyro call the site's
    ``sample()`` before MCMC starts.

    :param model: the Pyro model.
    :param init: initial values by site name (a tensor means ``{"x": init}``).
    :param int max_plate_nesting: if omitted, traced from ``model(*model_args, **model_kwargs)``.
    :param nuts_kwargs: passed to :class:`~pyro.infer.NUTS` (``step_size``, ``target_accept_prob``, ...).

    Example::

        >>> from pyro.infer import MCMC
        >>> from pyro_ext.diffusion import ScoreNetEnergy, VPLinear
        >>> energy = ScoreNetEnergy(lambda x, t: -x, VPLinear(), "score", dim=2)
        >>> def model():
        ...     pyro.sample("x", DiffusionEnergy(energy, 0.5))
        >>> mcmc = MCMC(energy_nuts(model, torch.zeros(2)), num_samples=50, warmup_steps=50)

    References: pyro-ppl/pyro issue #3211.
    """
    if isinstance(init, Tensor):
        init = {"x": init}
    if not isinstance(init, Mapping) or not all(isinstance(v, Tensor) for v in init.values()):
        raise TypeError("init must be a tensor or a mapping from site names to tensors")
    if "init_strategy" in nuts_kwargs:
        raise ValueError("energy_nuts sets init_strategy itself (init_to_value); pass the values as init")
    if max_plate_nesting is None:
        max_plate_nesting = _plate_nesting(model, init, tuple(model_args), dict(model_kwargs or {}))
    return NUTS(
        model,
        init_strategy=init_to_value(values=dict(init)),
        max_plate_nesting=max_plate_nesting,
        **nuts_kwargs,
    )


# The factor pattern of the module docstring, importable for tests and tutorials.
def factor_model(energy: Energy, t: TimeLike, temperature: float = 1.0, name: str = "x") -> Tensor:
    """Sample site ``name`` with the energy's density, written as an improper flat site plus a factor."""
    x = pyro.sample(name, pyro.distributions.ImproperUniform(constraints.real, (), (energy.dim,)))
    pyro.factor(f"{name}_diffusion_energy", -energy.energy(x, t) / temperature)
    return x
