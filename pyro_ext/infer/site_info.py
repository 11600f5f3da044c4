"""What :class:`~pyro_ext.infer.hybrid.HybridGuide` needs to know about one sample site of a model.

A :class:`SiteInfo` is read once from the guide's prototype trace: the value shape (plate dimensions
included), the support, whether the site is discrete, and -- for discrete sites -- the finite set of
values each element can take. The helpers here convert between a site's values and the flat
representations the networks see: unconstrained vectors for continuous sites, category indices and
one-hot codes for discrete ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.distributions import biject_to, constraints
from torch.distributions.constraints import Constraint

__all__ = ["SiteInfo", "finite_support", "site_info_from_trace_site"]


def finite_support(support: Constraint) -> tuple[int, int, bool] | None:
    """``(lower, num_categories, one_hot)`` of a finite discrete support, or ``None`` if not finite.

    Recognises :data:`~torch.distributions.constraints.boolean`, integer intervals and
    :data:`~torch.distributions.constraints.one_hot` (whose last dimension is the category axis),
    also wrapped in :func:`~torch.distributions.constraints.independent`.
    """
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    if support is constraints.boolean:
        return 0, 2, False
    if support is constraints.one_hot:
        return 0, -1, True  # the number of categories is the last dimension of the value
    if isinstance(support, constraints.integer_interval):
        lower, upper = support.lower_bound, support.upper_bound
        if torch.is_tensor(lower) or torch.is_tensor(upper):
            lower_t, upper_t = torch.as_tensor(lower), torch.as_tensor(upper)
            if lower_t.numel() != 1 and lower_t.unique().numel() != 1:
                return None
            if upper_t.numel() != 1 and upper_t.unique().numel() != 1:
                return None
            lower, upper = lower_t.reshape(-1)[0].item(), upper_t.reshape(-1)[0].item()
        return int(lower), int(upper) - int(lower) + 1, False
    return None


@dataclass(frozen=True)
class SiteInfo:
    """Static description of one latent sample site, read from a prototype trace.

    :param str name: the site name.
    :param torch.Size shape: the value shape in the prototype trace (plate dimensions included).
    :param torch.Size batch_shape: the leading part of ``shape`` that belongs to plates.
    :param int event_dim: the distribution's event dimension at the site.
    :param support: the distribution's support.
    :param bool is_discrete: whether the support is discrete.
    :param torch.dtype dtype: the dtype of the prototype value (discrete values keep it).
    :param tuple frames: the vectorised plate frames the site sits in.
    """

    name: str
    shape: torch.Size
    batch_shape: torch.Size
    event_dim: int
    support: Constraint
    is_discrete: bool
    dtype: torch.dtype
    frames: tuple = field(default=(), compare=False)
    lower: int = 0
    num_categories: int = 0
    one_hot: bool = False

    # ----------------------------------------------------------------- continuous sites
    @property
    def bijection(self) -> torch.distributions.Transform:
        """``biject_to(support)``: maps unconstrained reals onto the support."""
        return biject_to(self.support)

    @property
    def unconstrained_shape(self) -> torch.Size:
        if self.is_discrete:
            raise TypeError(f"site {self.name!r} is discrete and has no unconstrained space")
        return torch.Size(self.bijection.inverse_shape(self.shape))

    @property
    def flat_dim(self) -> int:
        """Length of the flattened unconstrained value (continuous) or number of categorical elements."""
        if self.is_discrete:
            return self.num_elements
        return math.prod(self.unconstrained_shape)

    # ------------------------------------------------------------------- discrete sites
    @property
    def num_elements(self) -> int:
        """Number of independent categorical elements in one value of a discrete site."""
        shape = self.shape[:-1] if self.one_hot else self.shape
        return math.prod(shape)

    @property
    def support_size(self) -> int:
        """Number of points in the product support of one value (discrete sites)."""
        return self.num_categories**self.num_elements

    @property
    def encoding_dim(self) -> int:
        """Width of the flat encoding fed to later networks: one-hot codes or unconstrained values."""
        if self.is_discrete:
            return self.num_elements * self.num_categories
        return self.flat_dim

    def to_indices(self, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Category indices ``[N, num_elements]`` of values ``[N, *shape]`` and a validity mask ``[N]``."""
        n = value.shape[0]
        if self.one_hot:
            index = value.argmax(-1).reshape(n, -1)
            valid = ((value == 0) | (value == 1)).reshape(n, -1).all(-1) & (value.sum(-1) == 1).reshape(
                n, -1
            ).all(-1)
        else:
            shifted = value.reshape(n, -1) - self.lower
            rounded = shifted.round() if shifted.is_floating_point() else shifted
            valid = ((rounded == shifted) & (rounded >= 0) & (rounded < self.num_categories)).all(-1)
            index = rounded.long().clamp(0, self.num_categories - 1)
        return index, valid

    def from_indices(self, index: torch.Tensor) -> torch.Tensor:
        """Values ``[N, *shape]`` (prototype dtype) from category indices ``[N, num_elements]``."""
        n = index.shape[0]
        if self.one_hot:
            value = torch.nn.functional.one_hot(index, self.num_categories)
        else:
            value = index + self.lower
        return value.to(self.dtype).reshape(n, *self.shape)

    def encode(self, value: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Flat encoding ``[N, encoding_dim]``: one-hot codes (discrete) or unconstrained values."""
        n = value.shape[0]
        if self.is_discrete:
            index, _ = self.to_indices(value)
            code = torch.nn.functional.one_hot(index, self.num_categories)
            return code.reshape(n, -1).to(dtype or torch.get_default_dtype())
        unconstrained = self.bijection.inv(value)
        return unconstrained.reshape(n, -1).to(dtype or value.dtype)

    def support_points(self) -> torch.Tensor:
        """Every value of the product support, ``[support_size, *shape]`` (discrete sites)."""
        grids = torch.cartesian_prod(*[torch.arange(self.num_categories)] * self.num_elements)
        return self.from_indices(grids.reshape(-1, self.num_elements))


def site_info_from_trace_site(site: dict) -> SiteInfo:
    """Build a :class:`SiteInfo` from a Pyro trace node; raises ``TypeError`` for infinite discrete "
    "supports."""
    fn = site["fn"]
    value = site["value"]
    support = fn.support
    is_discrete = bool(getattr(support, "is_discrete", False))
    event_dim = int(getattr(fn, "event_dim", len(getattr(fn, "event_shape", ()))))
    shape = torch.Size(value.shape)
    batch_shape = shape[: len(shape) - event_dim]
    frames = tuple(frame for frame in site["cond_indep_stack"] if frame.vectorized)
    lower, num_categories, one_hot = 0, 0, False
    if is_discrete:
        finite = finite_support(support)
        if finite is None:
            raise TypeError(
                f"discrete site {site['name']!r} has support {support}, which is not finite; a forward "
                "family needs a finite support (integer_interval, boolean or one_hot)"
            )
        lower, num_categories, one_hot = finite
        if one_hot:
            num_categories = int(shape[-1])
    return SiteInfo(
        name=site["name"],
        shape=shape,
        batch_shape=batch_shape,
        event_dim=event_dim,
        support=support,
        is_discrete=is_discrete,
        dtype=value.dtype,
        frames=frames,
        lower=lower,
        num_categories=num_categories,
        one_hot=one_hot,
    )
