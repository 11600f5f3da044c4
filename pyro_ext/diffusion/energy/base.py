r"""The energy protocol every diffusion energy follows, and conditioning on observed coordinates.

An energy of a diffusion model at time :math:`t` is :math:`E(x, t) = -\log p_t(x)` up to a constant
(exactly :math:`-\log p_t` when :attr:`Energy.exact`), with score :math:`s = -\nabla_x E`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pyro_ext.diffusion._validation import check_finite, check_vector, checked_times, under_functorch
from pyro_ext.diffusion.schedules import Schedule, TimeLike, broadcast_time

__all__ = ["ConditionedEnergy", "Energy", "sample_shape_of"]


def sample_shape_of(n: int | Sequence[int] | torch.Size) -> torch.Size:
    """``n`` (an int or a shape) as a :class:`torch.Size`, with a clear error for anything else."""
    if isinstance(n, bool):
        raise TypeError(f"n must be an int or a shape; got {n!r}")
    if isinstance(n, int):
        if n < 0:
            raise ValueError(f"n must be >= 0; got {n}")
        return torch.Size([n])
    try:
        shape = torch.Size(n)
    except TypeError:
        raise TypeError(f"n must be an int or a shape (tuple of ints); got {type(n).__name__}") from None
    if any(size < 0 for size in shape):
        raise ValueError(f"n must have non-negative sizes; got {tuple(shape)}")
    return shape


class Energy(nn.Module):
    r"""Base class of the diffusion energies: :meth:`energy`, :meth:`score`, :meth:`denoise` and
    :meth:`score_jacobian`, each taking ``(x, t)``, and the flag :attr:`exact`.

    ``x`` has shape ``[..., d]`` and ``t`` is a float or a tensor that broadcasts against ``x.shape[:-1]``
    (per-sample times). Computations happen in the dtype of the energy's buffers (``.float()`` /
    ``.double()`` switch it); results come back in ``x``'s dtype.

    Subclasses implement :meth:`energy` and :meth:`score` at least; the defaults here derive
    :meth:`denoise` by Tweedie's formula :math:`\hat x_0 = (x + \sigma^2 s)/\alpha` and
    :meth:`score_jacobian` by ``torch.func.vmap(torch.func.jacrev(score))``.

    :param Schedule schedule: the noise schedule.
    :param int dim: the data dimension :math:`d`.
    """

    #: True if :meth:`energy` is exactly :math:`-\log p_t` (normalised) and :meth:`sample` is exact.
    exact: bool = False

    def __init__(self, schedule: Schedule, dim: int) -> None:
        super().__init__()
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a pyro_ext.diffusion Schedule; got {type(schedule).__name__}")
        if int(dim) != dim or dim < 1:
            raise ValueError(f"dim must be a positive integer; got {dim}")
        self.schedule = schedule
        self.dim = int(dim)
        self.register_buffer("_dtype_anchor", torch.zeros(()), persistent=False)

    # ----------------------------------------------------------------------------------- helpers
    @property
    def dtype(self) -> torch.dtype:
        """The dtype computations happen in."""
        return self._dtype_anchor.dtype

    @property
    def device(self) -> torch.device:
        """The device of the energy's buffers."""
        return self._dtype_anchor.device

    #: whether :meth:`_prepare` expands ``t`` to the batch shape (networks need one time per sample;
    #: closed forms compute the schedule once for a scalar ``t``)
    _expand_time: bool = False

    def _prepare(self, x: Tensor, t: TimeLike, name: str = "x") -> tuple[Tensor, Tensor]:
        """Check ``x``, move it to the energy's dtype, range-check ``t``; ``x`` is broadcast to the batch
        shape, ``t`` keeps a shape that broadcasts against it (or is expanded, see ``_expand_time``)."""
        x = check_vector(x, self.dim, name)
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        return broadcast_time(self.schedule, x, t, expand=self._expand_time)

    def _time(self, t: TimeLike) -> Tensor:
        """``t`` range-checked, as a tensor in the energy's dtype and on its device."""
        return self.schedule.as_time(t, dtype=self.dtype, device=self.device).to(
            dtype=self.dtype, device=self.device
        )

    def _coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        r""":math:`(\alpha(t), \sigma^2(t))`, refusing :math:`\sigma = 0` where an energy has no density."""
        with checked_times():  # t comes from _prepare or as_time: checked once already
            alpha, sigma2 = self.schedule.alpha(t), self.schedule.sigma(t) ** 2
        if not under_functorch(sigma2) and bool((sigma2 == 0).any()):
            raise ValueError(
                f"t = {t[sigma2 == 0].unique().tolist()[:5]} has sigma(t) = 0, where {type(self).__name__} "
                "has no density; use t > 0 (the data distribution itself is not a density here)"
            )
        return alpha, sigma2

    # ---------------------------------------------------------------------------------- protocol
    def energy(self, x: Tensor, t: TimeLike) -> Tensor:
        """The energy :math:`E(x, t)`, shape ``broadcast(x.shape[:-1], t.shape)``."""
        raise NotImplementedError

    def score(self, x: Tensor, t: TimeLike) -> Tensor:
        r"""The score :math:`-\nabla_x E(x, t)`, shape of the broadcast ``x``."""
        raise NotImplementedError

    def forward(self, x: Tensor, t: TimeLike) -> Tensor:
        """The energy."""
        return self.energy(x, t)

    def log_prob(self, x: Tensor, t: TimeLike) -> Tensor:
        """:math:`-E(x, t)`: :math:`\\log p_t(x)` for an exact energy, up to a constant otherwise."""
        return -self.energy(x, t)

    def energy_and_score(self, x: Tensor, t: TimeLike) -> tuple[Tensor, Tensor]:
        """Energy and score together (one pass where the subclass can share the work)."""
        return self.energy(x, t), self.score(x, t)

    def denoise(self, x: Tensor, t: TimeLike) -> Tensor:
        r"""The denoiser :math:`E[x_0 \mid x_t = x] = (x + \sigma^2 s)/\alpha` (Tweedie's formula)."""
        x, t = self._prepare(x, t)
        alpha, sigma2 = self.schedule.alpha(t)[..., None], self.schedule.sigma(t)[..., None] ** 2
        return (x + sigma2 * self.score(x, t)) / alpha

    def score_jacobian(self, x: Tensor, t: TimeLike) -> Tensor:
        r"""The Jacobian :math:`\partial s/\partial x = -\nabla^2 E`, shape ``[..., d, d]``.

        The default differentiates :meth:`score` with ``torch.func.vmap(torch.func.jacrev(...))``.
        """
        x, t = self._prepare(x, t)
        batch = x.shape[:-1]
        flat_x, flat_t = x.reshape(-1, self.dim), t.expand(batch).reshape(-1)

        def single(xi: Tensor, ti: Tensor) -> Tensor:
            return self.score(xi, ti)

        jac = torch.func.vmap(torch.func.jacrev(single), in_dims=(0, 0))(flat_x, flat_t)
        return jac.reshape(*batch, self.dim, self.dim)

    def sample(
        self, n: int | Sequence[int], t: TimeLike, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """Exact samples of :math:`p_t`, shape ``[*n, *t.shape, d]``; only exact energies implement it."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot sample p_t exactly. Run a reverse-process sampler "
            "(pyro_ext.diffusion.sampling.sample), or use the energy in MCMC: NUTS(potential_fn="
            "pyro_ext.diffusion.potential_fn(energy, t)) or pyro_ext.diffusion.energy_nuts(model, init) "
            "(which sets init_to_value so that Pyro never calls sample())."
        )

    def condition(self, mask: Tensor, value: Tensor) -> ConditionedEnergy:
        r"""The energy over the free coordinates with the masked ones fixed to ``value``.

        :math:`E_c(x_f, t) = E([x_o, x_f], t)`, which is :math:`-\log p_t(x_f \mid x_o)` up to the constant
        :math:`-\log p_t(x_o)`. ``mask`` is a boolean tensor of shape ``[d]`` (True = observed); ``value``
        has shape ``[..., n_observed]`` or ``[..., d]`` (then only its masked entries are used).
        """
        return ConditionedEnergy(self, mask, value)

    def _conditional_sample(
        self,
        mask: Tensor,
        value: Tensor,
        n: torch.Size,
        t: TimeLike,
        generator: torch.Generator | None,
    ) -> Tensor:
        raise NotImplementedError(
            f"{type(self).__name__} has no exact conditional sampler; use the conditioned energy in MCMC "
            "(pyro_ext.diffusion.potential_fn / energy_nuts)."
        )


class ConditionedEnergy(Energy):
    r"""An energy over the free coordinates of ``base`` with the observed ones fixed (in-painting, recall).

    .. math::

        E_c(x_f, t) = E_{base}([x_o, x_f], t), \qquad s_c = s_{base}([x_o, x_f], t)_f.

    Made by :meth:`Energy.condition`. The free coordinates keep their order; :meth:`assemble` puts them
    back with the observed ones into full vectors. Exact bases with a conditional sampler
    (:class:`EmpiricalEnergy`, :class:`GaussianEnergy`, :class:`GaussianMixtureEnergy`) sample exactly.

    :param Energy base: the energy of the full vector.
    :param Tensor mask: boolean, shape ``[d]``, True where observed.
    :param Tensor value: observed values, shape ``[..., n_observed]`` or ``[..., d]``.
    """

    def __init__(self, base: Energy, mask: Tensor, value: Tensor) -> None:
        if not isinstance(base, Energy):
            raise TypeError(f"base must be an Energy; got {type(base).__name__}")
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != (base.dim,):
            raise ValueError(
                f"mask must be a boolean tensor of shape [{base.dim}] (True = observed); got "
                f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}"
                + (f" of dtype {mask.dtype}" if isinstance(mask, Tensor) else "")
            )
        n_obs = int(mask.sum())
        if n_obs == 0 or n_obs == base.dim:
            raise ValueError(f"mask must observe some but not all of the {base.dim} coordinates; got {n_obs}")
        if not isinstance(value, Tensor) or not value.is_floating_point() or value.dim() == 0:
            raise TypeError("value must be a floating tensor of shape [..., n_observed] or [..., d]")
        if value.shape[-1] == base.dim and n_obs != base.dim:
            value = value[..., mask.to(value.device)]
        if value.shape[-1] != n_obs:
            raise ValueError(
                f"value must have shape [..., {n_obs}] (the observed coordinates) or [..., {base.dim}]; "
                f"got {tuple(value.shape)}"
            )
        check_finite(value, "value")
        super().__init__(base.schedule, base.dim - n_obs)
        self.base = base
        self.exact = base.exact
        mask = mask.to(base.device)
        observed, free = torch.nonzero(mask).flatten(), torch.nonzero(~mask).flatten()
        self.register_buffer("mask", mask)
        self.register_buffer("observed_index", observed)
        self.register_buffer("free_index", free)
        self.register_buffer("inverse_permutation", torch.argsort(torch.cat([observed, free])))
        self.register_buffer("value", value.to(device=base.device, dtype=base.dtype))
        self._dtype_anchor = self._dtype_anchor.to(base.dtype)

    def assemble(self, x_free: Tensor) -> Tensor:
        """Full vectors ``[..., d]`` from free coordinates ``[..., d_free]`` and the observed ``value``."""
        x_free = check_vector(x_free, self.dim, "x")
        value = self.value.to(x_free.dtype)
        batch = torch.broadcast_shapes(x_free.shape[:-1], value.shape[:-1])
        joined = torch.cat([value.expand(*batch, -1), x_free.expand(*batch, -1)], dim=-1)
        return joined[..., self.inverse_permutation]

    def energy(self, x: Tensor, t: TimeLike) -> Tensor:
        return self.base.energy(self.assemble(x), t)

    def score(self, x: Tensor, t: TimeLike) -> Tensor:
        return self.base.score(self.assemble(x), t)[..., self.free_index]

    def energy_and_score(self, x: Tensor, t: TimeLike) -> tuple[Tensor, Tensor]:
        energy, score = self.base.energy_and_score(self.assemble(x), t)
        return energy, score[..., self.free_index]

    def denoise(self, x: Tensor, t: TimeLike) -> Tensor:
        r"""The free coordinates of :math:`E[x_0 \mid x_t = [x_o, x_f]]`."""
        return self.base.denoise(self.assemble(x), t)[..., self.free_index]

    def score_jacobian(self, x: Tensor, t: TimeLike) -> Tensor:
        jac = self.base.score_jacobian(self.assemble(x), t)
        return jac[..., self.free_index, :][..., self.free_index]

    def posterior_weights(self, x: Tensor, t: TimeLike) -> Tensor:
        """The base's posterior weights at the assembled vectors (if the base has them)."""
        return self.base.posterior_weights(self.assemble(x), t)

    def sample(
        self, n: int | Sequence[int], t: TimeLike, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """Exact samples of :math:`p_t(x_f \\mid x_o)`, shape ``[*n, *batch, d_free]``."""
        return self.base._conditional_sample(self.mask, self.value, sample_shape_of(n), t, generator)

    def extra_repr(self) -> str:
        return f"observed={self.observed_index.numel()}, free={self.dim}"
