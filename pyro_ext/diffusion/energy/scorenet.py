r"""Energies of trained networks: energy-parametrised nets, and line integrals of score-type nets.

A network trained in the ``"eps"``, ``"x0"``, ``"v"`` or ``"score"`` parametrisation gives a score field but
no energy. Its energy relative to a reference point is the line integral

.. math::

    E(x) = -\int_0^1 s\big(x_{ref} + \tau(x - x_{ref})\big)\cdot(x - x_{ref})\, d\tau, \qquad E(x_{ref}) := 0,

evaluated by Gauss–Legendre quadrature. It equals :math:`-\log p_t(x) + \log p_t(x_{ref})` only if the
field is conservative; :meth:`ScoreNetEnergy.asymmetry`, :meth:`~ScoreNetEnergy.asymmetry_hutchinson` and
:meth:`~ScoreNetEnergy.loop_residual` measure how far it is from that.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from pyro_ext.diffusion._validation import under_functorch
from pyro_ext.diffusion.energy.base import Energy
from pyro_ext.diffusion.schedules import PARAMETRISATIONS, Schedule, TimeLike, convert

__all__ = ["ScoreNetEnergy"]

#: ``gradient="score"`` warns when the estimated asymmetry of the score Jacobian exceeds this.
ASYMMETRY_WARNING = 1e-2


class ScoreNetEnergy(Energy):
    r"""An energy from a network ``net(x, t)``.

    - ``param="energy"``: the network returns a scalar :math:`E_\theta(x, t)` per sample (shape ``[...]`` or
      ``[..., 1]``); the score is :math:`-\nabla_x E_\theta` by autograd and the Jacobian :math:`-\nabla^2
      E_\theta` (symmetric by construction).
    - ``param`` in ``"eps"``, ``"x0"``, ``"v"``, ``"score"``: the network returns ``[..., d]``; the score
      comes from :func:`~pyro_ext.diffusion.schedules.convert` and the energy from the line integral
      above from :math:`x_{ref}` (the origin, or :math:`\alpha(t)\mu` if ``reference=mu``), with ``nodes``
      Gauss–Legendre nodes. Energies at different ``t`` differ by unknown constants.

    For HMC, ``gradient="exact"`` differentiates through the quadrature, so NUTS targets
    :math:`\exp(-E_{line})` exactly; ``gradient="score"`` is a :class:`torch.autograd.Function` whose
    backward returns :math:`-s(x)` (cheaper, consistent only for a conservative field; it warns on the
    first call when the Hutchinson asymmetry estimate exceeds 1e-2). The net is called with ``x`` of shape
    ``[B, d]`` and ``t`` of shape ``[B]`` (flattened, in ``x``'s dtype).

    :param net: the network (an :class:`~torch.nn.Module` is registered as a submodule).
    :param Schedule schedule: the schedule it was trained with.
    :param str param: ``"energy"``, ``"eps"``, ``"x0"``, ``"v"`` or ``"score"``.
    :param Tensor reference: ``[d]`` data mean :math:`\mu`; the line integrals start at :math:`\alpha\mu`.
    :param int nodes: Gauss–Legendre nodes (32 integrate the exact score to ~1e-15).
    :param str gradient: ``"exact"`` or ``"score"``.
    :param int dim: data dimension; inferred from ``reference`` if omitted, required otherwise.

    Example::

        >>> from pyro_ext.diffusion import VPLinear
        >>> energy = ScoreNetEnergy(lambda x, t: x, VPLinear(), "score", dim=2)
        >>> energy.energy(torch.tensor([3.0, 4.0]), 0.5)  # -int s.dx for s = x: -|x|^2 / 2
        tensor(-12.5000)

    References: Ambrogioni, arXiv:2310.17467; pyro-ppl/pyro issue #3211 (the score as a potential gradient).
    """

    exact = False
    _expand_time = True  # the network takes one time per sample

    def __init__(
        self,
        net: Callable[[Tensor, Tensor], Tensor],
        schedule: Schedule,
        param: str,
        *,
        reference: Tensor | None = None,
        nodes: int = 32,
        gradient: str = "exact",
        dim: int | None = None,
    ) -> None:
        if param not in ("energy", *PARAMETRISATIONS):
            raise ValueError(f"param must be one of {('energy', *PARAMETRISATIONS)}; got {param!r}")
        if gradient not in ("exact", "score"):
            raise ValueError(f"gradient must be 'exact' or 'score'; got {gradient!r}")
        if not callable(net):
            raise TypeError(f"net must be callable as net(x, t); got {type(net).__name__}")
        if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
            raise ValueError(f"nodes must be a positive integer; got {nodes!r}")
        if reference is not None:
            if not isinstance(reference, Tensor) or reference.dim() != 1:
                raise ValueError("reference must be a tensor of shape [d] (the data mean)")
            if dim is not None and dim != reference.shape[0]:
                raise ValueError(f"dim = {dim} disagrees with reference of shape {tuple(reference.shape)}")
            dim = reference.shape[0]
        if dim is None:
            dim = _infer_dim(net)
        super().__init__(schedule, dim)
        self.net = net
        self.param = param
        self.gradient = gradient
        self.nodes = nodes
        self._checked_asymmetry = False
        points, weights = np.polynomial.legendre.leggauss(nodes)
        dtype = torch.get_default_dtype()
        self.register_buffer("quadrature_points", torch.as_tensor(0.5 * (points + 1.0), dtype=dtype))
        self.register_buffer("quadrature_weights", torch.as_tensor(0.5 * weights, dtype=dtype))
        self.register_buffer("reference", None if reference is None else reference.detach().clone().to(dtype))
        self._dtype_anchor = self._dtype_anchor.to(dtype)

    # --------------------------------------------------------------------------------- network
    def _call_net(self, x: Tensor, t: Tensor) -> Tensor:
        """Call the network on flattened ``[B, d]`` / ``[B]`` inputs and check its output."""
        batch = x.shape[:-1]
        flat_x, flat_t = x.reshape(-1, self.dim), t.reshape(-1)
        out = self.net(flat_x, flat_t)
        if self.param == "energy":
            if not isinstance(out, Tensor) or out.shape not in ((flat_x.shape[0],), (flat_x.shape[0], 1)):
                raise ValueError(
                    f"an energy net must return one scalar per sample, shape [{flat_x.shape[0]}] or "
                    f"[{flat_x.shape[0]}, 1]; got "
                    f"{tuple(out.shape) if isinstance(out, Tensor) else type(out)}"
                )
            return out.reshape(batch)
        if not isinstance(out, Tensor) or out.shape != flat_x.shape:
            raise ValueError(
                f"net(x, t) must return a tensor of shape {tuple(flat_x.shape)} (the shape of x) for "
                f"param={self.param!r}; got {tuple(out.shape) if isinstance(out, Tensor) else type(out)}"
            )
        return out.reshape(x.shape)

    def _score(self, x: Tensor, t: Tensor) -> Tensor:
        """Score at prepared ``x``, ``t`` (graph kept when ``x`` requires grad)."""
        if self.param != "energy":
            return convert(self._call_net(x, t), x, t, self.schedule, self.param, "score")
        if under_functorch(x, t):
            return -torch.func.grad(lambda y: self._call_net(y, t).sum())(x)
        create_graph = torch.is_grad_enabled() and x.requires_grad
        with torch.enable_grad():
            inputs = x if x.requires_grad else x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self._call_net(inputs, t).sum(), inputs, create_graph=create_graph)
        return -grad

    # -------------------------------------------------------------------------------- protocol
    def score(self, x: Tensor, t: TimeLike) -> Tensor:
        out_dtype = x.dtype if isinstance(x, Tensor) else None
        x, t = self._prepare(x, t)
        return self._score(x, t).to(out_dtype)

    def denoise(self, x: Tensor, t: TimeLike) -> Tensor:
        r""":math:`\hat x_0`, converted from the network output (Tweedie's formula for an energy net)."""
        if self.param in ("energy", "score"):
            return super().denoise(x, t)
        out_dtype = x.dtype if isinstance(x, Tensor) else None
        x, t = self._prepare(x, t)
        return convert(self._call_net(x, t), x, t, self.schedule, self.param, "x0").to(out_dtype)

    def line_start(self, x: Tensor, t: Tensor) -> Tensor:
        r"""The start :math:`x_{ref}` of the line integrals (0, or :math:`\alpha(t)\mu`) like ``x``."""
        if self.reference is None:
            return torch.zeros_like(x)
        return self.schedule.alpha(t)[..., None] * self.reference.to(x.dtype)

    def _line_energy(self, x: Tensor, t: Tensor) -> Tensor:
        start = self.line_start(x, t)
        delta = x - start
        tau = self.quadrature_points.to(x.dtype).reshape(-1, *([1] * x.dim()))
        points = start + tau * delta  # [nodes, ..., d]
        times = t.expand(self.nodes, *t.shape)
        score = self._score(points, times)
        weights = self.quadrature_weights.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        return -(weights * (score * delta).sum(-1)).sum(0)

    def energy(self, x: Tensor, t: TimeLike) -> Tensor:
        r""":math:`E_\theta(x, t)`, or the line-integral energy with :math:`E(x_{ref}) = 0`."""
        out_dtype = x.dtype if isinstance(x, Tensor) else None
        x, t = self._prepare(x, t)
        if self.param == "energy":
            return self._call_net(x, t).to(out_dtype)
        if self.gradient == "score" and not under_functorch(x, t):
            if not self._checked_asymmetry:
                self._checked_asymmetry = True
                rows = x.reshape(-1, self.dim)[:16].detach()
                estimate = self.asymmetry_hutchinson(rows, t.reshape(-1)[:16], probes=4)
                if float(estimate.max()) > ASYMMETRY_WARNING:
                    warnings.warn(
                        f"ScoreNetEnergy(gradient='score'): the score's Jacobian is asymmetric (estimated "
                        f"{float(estimate.max()):.3g} > {ASYMMETRY_WARNING:g}); the gradient -score is then "
                        "not the gradient of the line-integral energy and HMC targets no density. Use "
                        "gradient='exact'.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            return _ScoreGradientEnergy.apply(x, self, t).to(out_dtype)
        return self._line_energy(x, t).to(out_dtype)

    # ---------------------------------------------------------------------- conservativeness tests
    def asymmetry(self, x: Tensor, t: TimeLike) -> Tensor:
        r"""Relative asymmetry :math:`\|J - J^T\|_F / \|J\|_F` of the score Jacobian, per sample ``[...]``."""
        jac = self.score_jacobian(x, t)
        return torch.linalg.matrix_norm(jac - jac.transpose(-1, -2)) / torch.linalg.matrix_norm(jac)

    def asymmetry_hutchinson(
        self, x: Tensor, t: TimeLike, *, probes: int = 8, generator: torch.Generator | None = None
    ) -> Tensor:
        r"""Stochastic estimate of :meth:`asymmetry` with no full Jacobian.

        For Gaussian probes :math:`u, v`, :math:`E(u^TJv - v^TJu)^2 = \|J - J^T\|_F^2` and
        :math:`E(u^TJv)^2 = \|J\|_F^2`; each probe costs one ``jvp`` and one ``vjp`` of the score.

        :returns: ``[...]``, the square root of the ratio of the two averages.
        """
        x, t = self._prepare(x, t)
        x = x.detach()

        def field(y: Tensor) -> Tensor:
            return self._score(y, t)

        _, vjp_fn = torch.func.vjp(field, x)
        num = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
        den = torch.zeros_like(num)
        for _ in range(probes):
            u = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
            v = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
            jv = torch.func.jvp(field, (x,), (v,))[1]
            (vj,) = vjp_fn(v)
            forward, backward = (u * jv).sum(-1), (vj * u).sum(-1)
            num = num + (forward - backward) ** 2
            den = den + forward**2
        return (num / den).sqrt().detach()

    def loop_residual(
        self,
        x: Tensor,
        t: TimeLike,
        *,
        radius: float | None = None,
        points: int = 64,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        r""":math:`\oint s\cdot dl \,/\, \oint |s|\,|dl|` on a random circle around each ``x``.

        The circle lies in a random 2-plane; ``radius`` defaults to :math:`0.1\,\sigma(t)`. The trapezoid
        rule on the periodic integrand converges geometrically in ``points``.

        :returns: ``[...]``, 0 for a conservative field.
        """
        x, t = self._prepare(x, t)
        x = x.detach()
        if radius is None:
            radius_t = 0.1 * self.schedule.sigma(t)[..., None]
        else:
            radius_t = torch.as_tensor(float(radius), dtype=x.dtype, device=x.device)
        basis = torch.randn(*x.shape, 2, dtype=x.dtype, device=x.device, generator=generator)
        basis, _ = torch.linalg.qr(basis)  # [..., d, 2], orthonormal
        u, v = basis[..., 0], basis[..., 1]
        theta = torch.arange(points, dtype=x.dtype, device=x.device) * (2 * math.pi / points)
        cos, sin = theta.cos().reshape(-1, *([1] * x.dim())), theta.sin().reshape(-1, *([1] * x.dim()))
        where = x + radius_t * (cos * u + sin * v)  # [points, ..., d]
        tangent = radius_t * (-sin * u + cos * v)
        with torch.no_grad():
            score = self._score(where, t.expand(points, *t.shape))
        circulation = (score * tangent).sum(-1).sum(0)
        magnitude = (score.norm(dim=-1) * tangent.norm(dim=-1)).sum(0)
        return circulation / magnitude

    def extra_repr(self) -> str:
        return f"param={self.param!r}, dim={self.dim}, nodes={self.nodes}, gradient={self.gradient!r}"


def _infer_dim(net: object) -> int:
    for module in getattr(net, "modules", lambda: [])():
        for attr in ("dim", "d", "data_dim"):
            value = getattr(module, attr, None)
            if isinstance(value, int) and value > 0:
                return value
    raise ValueError("could not infer the data dimension from net; pass dim=d (or reference=mean)")


class _ScoreGradientEnergy(torch.autograd.Function):
    """Line-integral energy whose backward returns minus the score (pyro-ppl/pyro #3211)."""

    @staticmethod
    def forward(ctx, x: Tensor, energy: ScoreNetEnergy, t: Tensor) -> Tensor:
        with torch.no_grad():
            value = energy._line_energy(x, t)
        ctx.energy = energy
        ctx.save_for_backward(x, t)
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        x, t = ctx.saved_tensors
        with torch.no_grad():
            score = ctx.energy._score(x, t)
        return -grad[..., None] * score, None, None
