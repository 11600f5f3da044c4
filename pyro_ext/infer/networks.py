r"""Delayed linear networks: a Pyro model of directional couplings seen through unknown delays.

:class:`DelayedLinearNetwork` is the application model of the hybrid forward-KL / reverse-KL scheme
(:class:`~pyro_ext.infer.hybrid.HybridGuide`): a latent VAR(1) over ``N`` nodes whose couplings ``C`` are
the quantity of interest, observed through per-node measurement delays ``delta`` (and optionally a
haemodynamic response), which make the direction of a coupling ambiguous.  It is a callable Pyro model
``net(y=None)``, simulates prior-predictive data sets vectorised over data sets (:meth:`simulate`), and its
posterior over ``C`` from any method is summarised by a :class:`CouplingPosterior` (see
:mod:`pyro_ext.infer.network_fits` and :mod:`pyro_ext.infer.rdcm` for the fits).

The paper's text was not available: the model below is the reconstruction of §3 of
``design/hybrid_vi.md`` and is implemented as written there.

References: arXiv:2406.02545 (Ambrogioni, Rouillard, Wassermann 2024); arXiv:1805.11542 (FAVI).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyro_ext.infer.network_distributions import (
    VAR1,
    DelayDistribution,
    DelayedObservationHMM,
    OffDiagonalMatrix,
    stationary_covariance,
)

__all__ = [
    "CouplingPosterior",
    "DelayedLinearNetwork",
    "NetworkSimulation",
    "canonical_hrf",
    "spectral_radius",
]

# Prior draws with a less stable transition are rejected by the simulator (design §3.1).
PRIOR_MAX_SPECTRAL_RADIUS = 0.95
# "sparse" truths are rescaled to at most this spectral radius (design §3.2).
SPARSE_MAX_SPECTRAL_RADIUS = 0.9
# The simulator runs this many data sets at a time (bounds its temporaries; outputs are preallocated).
SIMULATION_CHUNK = 8192


def canonical_hrf(
    tr: float = 1.0,
    duration: float = 32.0,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    r"""The canonical double-gamma haemodynamic response sampled every ``tr`` seconds, unit sum.

    .. math:: h(t) = \frac{t^5 e^{-t}}{5!} - \frac{t^{15} e^{-t}}{6 \cdot 15!}, \qquad t = l \cdot
        \mathrm{TR},\ l = 0, \dots, \lceil \mathrm{duration}/\mathrm{TR} \rceil - 1.

    :param float tr: sampling interval in seconds.
    :param float duration: support in seconds (the response is negligible after 32 s).
    :return: ``[L]`` with ``sum = 1``.
    """
    if not tr > 0:
        raise ValueError(f"tr must be > 0 seconds; got {tr!r}")
    if not duration >= tr:
        raise ValueError(f"duration must be >= tr; got duration={duration!r}, tr={tr!r}")
    length = math.ceil(duration / tr - 1e-9)
    t = torch.arange(length, dtype=torch.float64) * tr
    # log-space gamma densities avoid overflow of t^15 / 15! at long durations
    peak = torch.exp(5 * torch.log(t.clamp_min(1e-300)) - t - math.lgamma(6)).masked_fill(t == 0, 0.0)
    undershoot = torch.exp(15 * torch.log(t.clamp_min(1e-300)) - t - math.lgamma(16)).masked_fill(t == 0, 0.0)
    h = peak - undershoot / 6
    return (h / h.sum()).to(dtype=dtype or torch.get_default_dtype(), device=device)


def spectral_radius(matrix: torch.Tensor) -> torch.Tensor:
    """Largest eigenvalue modulus of each square matrix in a batch ``[..., n, n] -> [...]``."""
    return torch.linalg.eigvals(matrix).abs().amax(-1)


@dataclass
class NetworkSimulation:
    """Data sets simulated by :meth:`DelayedLinearNetwork.simulate`, with their ground truth.

    :ivar y: observations ``[n, T, N]``.
    :ivar coupling: true ``C`` ``[n, N, N]`` (zero diagonal).
    :ivar delay: the ``"delay"`` site's value ``[n, N-1]`` (reference mode) or ``[n, N]`` (long; float TR
        units for ``"mds"`` data, whose delays are continuous).
    :ivar delays: every node's delay ``[n, N]`` in TR units.
    :ivar obs_scale: observation noise sd ``[n, N]``.
    :ivar states: the latent path ``[n, T + W - 1, N]`` (VAR truths only; ``None`` for ``"mds"``).
    """

    y: torch.Tensor
    coupling: torch.Tensor
    delay: torch.Tensor
    delays: torch.Tensor
    obs_scale: torch.Tensor
    states: torch.Tensor | None = None
    truth: str = "prior"

    def __len__(self) -> int:
        return self.y.shape[0]

    def __getitem__(self, index: int | slice | torch.Tensor) -> NetworkSimulation:
        """Index the data sets (an int drops the leading dim: ``sim[0].y`` is ``[T, N]``)."""

        def pick(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor[index]

        return NetworkSimulation(
            pick(self.y),
            pick(self.coupling),
            pick(self.delay),
            pick(self.delays),
            pick(self.obs_scale),
            pick(self.states),
            self.truth,
        )

    def sites(self, *, include_states: bool = False) -> dict[str, torch.Tensor]:
        """The simulation as ``{site name: [n, ...]}``, the form a stage-1 simulator returns."""
        out = {"delay": self.delay, "coupling": self.coupling, "obs_scale": self.obs_scale, "y": self.y}
        if include_states and self.states is not None:
            out["x"] = self.states
        return out


@dataclass
class CouplingPosterior:
    r"""Posterior draws of a coupling matrix from any method, and the summaries every method shares.

    :ivar draws: ``[S, N, N]`` draws of ``C`` (the diagonal is zero and never declared).
    :ivar method: a label (``"naive"``, ``"hybrid"``, ...).
    :ivar extras: method-specific diagnostics (e.g. ``delay_probs``, ``free_energy``, ``elbo``).

    Example::

        >>> post = CouplingPosterior(torch.randn(1000, 2, 2) * 0.1 + torch.tensor([[0, 0.0], [0.4, 0]]))
        >>> post.declared(0.95)  # only C[1, 0] (0 -> 1) has an interval excluding 0
    """

    draws: torch.Tensor
    method: str = ""
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        draws = self.draws
        if not isinstance(draws, torch.Tensor) or draws.dim() != 3 or draws.shape[-1] != draws.shape[-2]:
            shape = tuple(draws.shape) if isinstance(draws, torch.Tensor) else type(draws).__name__
            raise ValueError(f"draws must be a tensor [S, N, N]; got {shape}")
        if draws.shape[0] < 2:
            raise ValueError(f"draws needs at least 2 samples; got {draws.shape[0]}")
        if not torch.isfinite(draws).all():
            raise ValueError("draws contain non-finite values")
        n = draws.shape[-1]
        off = 1 - torch.eye(n, dtype=draws.dtype, device=draws.device)
        self.draws = draws.detach() * off

    @property
    def num_nodes(self) -> int:
        return self.draws.shape[-1]

    @property
    def mean(self) -> torch.Tensor:
        return self.draws.mean(0)

    @property
    def sd(self) -> torch.Tensor:
        return self.draws.std(0)

    def interval(self, level: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
        """Central ``level`` interval, elementwise quantiles: ``(lower, upper)``, each ``[N, N]``."""
        if not 0 < level < 1:
            raise ValueError(f"level must lie in (0, 1); got {level!r}")
        q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=self.draws.dtype, device=self.draws.device)
        lower, upper = torch.quantile(self.draws, q, dim=0)
        return lower, upper

    def prob_positive(self) -> torch.Tensor:
        """:math:`P(C_{ij} > 0)` per entry (0 on the diagonal)."""
        return (self.draws > 0).to(self.draws.dtype).mean(0)

    def declared(self, level: float = 0.95) -> torch.Tensor:
        """Boolean ``[N, N]``: the central ``level`` interval excludes 0 (an edge is declared)."""
        return self.declared_sign(level) != 0

    def declared_sign(self, level: float = 0.95) -> torch.Tensor:
        """``+1`` / ``-1`` where the central interval lies above / below 0, else ``0`` (long ``[N, N]``)."""
        lower, upper = self.interval(level)
        sign = (lower > 0).long() - (upper < 0).long()
        return sign * (1 - torch.eye(self.num_nodes, dtype=torch.long, device=sign.device))

    def covers(self, truth: torch.Tensor, level: float = 0.9) -> torch.Tensor:
        """Boolean ``[N, N]``: the central interval contains the true coupling (diagonal: True)."""
        lower, upper = self.interval(level)
        return (lower <= truth) & (truth <= upper)

    def summary(self, level: float = 0.95) -> str:
        """A text table ``C[i, j] mean [lower, upper]`` of the off-diagonal entries."""
        lower, upper = self.interval(level)
        lines = [f"{self.method or 'posterior'}: mean [{level:.0%} interval]"]
        for i in range(self.num_nodes):
            for j in range(self.num_nodes):
                if i != j:
                    flag = "  declared" if (lower[i, j] > 0) or (upper[i, j] < 0) else ""
                    lines.append(
                        f"  C[{i},{j}] ({j}->{i}) {self.mean[i, j]:+.3f} "
                        f"[{lower[i, j]:+.3f}, {upper[i, j]:+.3f}]{flag}"
                    )
        return "\n".join(lines)


class DelayedLinearNetwork(nn.Module):
    r"""A linear network of ``N`` nodes observed through unknown per-node delays, as a Pyro model.

    .. math::
        x_t &= A x_{t-1} + \varepsilon_t, \quad A = a_0 I + C,\
        \varepsilon_t \sim \mathcal{N}(0, \sigma_x^2 I)\\
        y_i(t) &= \sum_{l<L} g(l)\, x_i(t - \delta_i - l) + \eta_i(t), \quad
        \eta_i(t) \sim \mathcal{N}(0, \sigma_{y,i}^2)

    :math:`C_{ij}` is the effect of node ``j`` on node ``i`` (so ``C[1, 0]`` is the arrow ``0 -> 1``), ``g``
    the HRF (a unit impulse by default).  Sites, in program order: ``"delay"`` (discrete; the forward site
    of the hybrid scheme), ``"coupling"`` (``[N, N]``, zero diagonal, :class:`OffDiagonalMatrix`),
    ``"obs_scale"`` (only when learned), ``"x"`` (only with ``integrate_states=False``), observed ``"y"``
    ``[T, N]``.  Everything broadcasts over leading batch dims of the latent values (a batch of delay
    configurations evaluates as one batched Kalman filter), so the model runs under
    ``Predictive(parallel=True)``, enumeration and per-component batching.

    **Delays.** ``delay_mode="reference"`` (default) pins node 0 at ``D = max_delay`` and gives each other
    node :math:`\delta_i \in \{0..2D\}` uniformly (site shape ``[N-1]``): no unidentified common offset.
    ``"absolute"``: :math:`\delta_i \in \{0..D\}` for every node (site shape ``[N]``).

    **Integrated states** (default): :class:`DelayedObservationHMM`, Pyro's ``GaussianHMM`` in float64
    with a stationary initial law by doubling.  ``state_layout="lagged"`` is the design's construction
    (state :math:`(x_t, \dots, x_{t-W+1})`, :math:`W = \max\delta + L`, delays by one-hot indexing of
    the observation matrix); ``"shifted"`` (default, [pyro_ext]) reads each node's series
    :math:`\delta_i` steps later instead, the same law with an :math:`NL`-dimensional state: exact
    without an HRF (no jittered shift rows) and about :math:`(2D+1)^3` times cheaper per step.
    **Explicit states** (``integrate_states=False``): site ``"x"`` ``[T + W - 1, N]`` with a stationary
    :class:`VAR1` law, ``y`` Normal given ``x`` (for large ``N`` or long HRFs; a mean-field guide
    over ``(x, C)`` under-disperses ``C``, use a low-rank joint one).

    **Priors** (design §3.1): ``coupling_prior="normal"``: :math:`C_{ij} \sim \mathcal{N}(0, s_C^2)`,
    :math:`s_C = \min(0.2, 0.3/\sqrt{N-1})`; ``"uniform"``: :math:`\mathcal{U}(-0.45, 0.45)`
    (``coupling_scale`` overrides ``s_C`` or the half-width).  ``obs_scale`` a float fixes
    :math:`\sigma_y`; ``"lognormal"`` makes it a site, :math:`\mathrm{LogNormal}(\log 0.3, 0.5)` per node.
    The density omits the stability indicator :math:`\rho(A) < 0.95` that :meth:`simulate` enforces by
    rejection: exact up to a constant while the posterior mass outside the stable set is negligible.

    The model and its parts are the reconstruction of design note §3 (the paper's text was unavailable).

    :param int num_nodes: ``N >= 2``.
    :param int num_steps: ``T``, the length of ``y``.
    :param int max_delay: ``D``.
    :param str delay_mode: ``"reference"`` or ``"absolute"``.
    :param hrf: ``None`` (unit impulse), ``"canonical"`` (double gamma at ``tr``) or a 1-D tensor ``g``.
    :param bool integrate_states: Kalman-integrated (``True``) or explicit ``"x"`` site.
    :param str coupling_prior: ``"normal"`` or ``"uniform"``.
    :param float coupling_scale: override of the prior scale / half-width.
    :param obs_scale: fixed :math:`\sigma_y` (float) or ``"lognormal"``.
    :param float self_coupling: :math:`a_0`.
    :param float state_scale: :math:`\sigma_x`.
    :param float tr: repetition time in seconds (HRF sampling, rDCM scale, ``"mds"`` micro-time).
    :param float hrf_duration: seconds of canonical HRF kept.
    :param float shift_jitter: variance on the lagged-state shift rows of the Kalman filter.
    :param str state_layout: ``"shifted"`` (default) or ``"lagged"``, see above.

    Example::

        >>> net = DelayedLinearNetwork(2, 300, max_delay=3, delay_mode="absolute", coupling_prior="uniform")
        >>> data = net.simulate(1, truth={"coupling": torch.tensor([[0.0, 0.0], [0.4, 0.0]]),
        ...                               "delay": torch.tensor([2, 0])})
        >>> trace = pyro.poutine.trace(net).get_trace(data.y[0])
        >>> trace.log_prob_sum()

    References: arXiv:2406.02545; arXiv:1805.11542.
    """

    hrf_kernel: torch.Tensor
    obs_scale_value: torch.Tensor
    coupling_scale_value: torch.Tensor

    def __init__(
        self,
        num_nodes: int,
        num_steps: int,
        max_delay: int = 3,
        delay_mode: Literal["reference", "absolute"] = "reference",
        hrf: None | Literal["canonical"] | torch.Tensor = None,
        integrate_states: bool = True,
        *,
        coupling_prior: Literal["normal", "uniform"] = "normal",
        coupling_scale: float | None = None,
        obs_scale: float | Literal["lognormal"] = 0.3,
        self_coupling: float = 0.5,
        state_scale: float = 1.0,
        tr: float = 1.0,
        hrf_duration: float = 32.0,
        shift_jitter: float = 1e-6,
        state_layout: Literal["shifted", "lagged"] = "shifted",
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("num_nodes", num_nodes, 2),
            ("num_steps", num_steps, 2),
            ("max_delay", max_delay, 0),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}; got {value!r}")
        if delay_mode not in ("reference", "absolute"):
            raise ValueError(f"delay_mode must be 'reference' or 'absolute'; got {delay_mode!r}")
        if coupling_prior not in ("normal", "uniform"):
            raise ValueError(f"coupling_prior must be 'normal' or 'uniform'; got {coupling_prior!r}")
        for name, value in (("self_coupling", self_coupling), ("state_scale", state_scale), ("tr", tr)):
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise TypeError(f"{name} must be a finite number; got {value!r}")
        if not state_scale > 0 or not tr > 0 or not shift_jitter > 0:
            raise ValueError("state_scale, tr and shift_jitter must be > 0")
        if state_layout not in ("shifted", "lagged"):
            raise ValueError(f"state_layout must be 'shifted' or 'lagged'; got {state_layout!r}")
        self.state_layout = state_layout
        self.num_nodes = num_nodes
        self.num_steps = num_steps
        self.max_delay = max_delay
        self.delay_mode = delay_mode
        self.integrate_states = bool(integrate_states)
        self.coupling_prior_family = coupling_prior
        self.self_coupling = float(self_coupling)
        self.state_scale = float(state_scale)
        self.tr = float(tr)
        self.shift_jitter = float(shift_jitter)

        if hrf is None:
            kernel = torch.ones(1)
            self.hrf_name = "none"
        elif isinstance(hrf, str):
            if hrf != "canonical":
                raise ValueError(f"hrf must be None, 'canonical' or a 1-D tensor; got {hrf!r}")
            kernel = canonical_hrf(tr, hrf_duration)
            self.hrf_name = "canonical"
        elif isinstance(hrf, torch.Tensor):
            if hrf.dim() != 1 or hrf.numel() < 1 or not torch.isfinite(hrf).all():
                raise ValueError(f"hrf must be a finite 1-D tensor; got shape {tuple(hrf.shape)}")
            kernel = hrf.detach().clone()
            self.hrf_name = "custom"
        else:
            raise TypeError(f"hrf must be None, 'canonical' or a 1-D tensor; got {type(hrf).__name__}")
        self.register_buffer("hrf_kernel", kernel.to(torch.get_default_dtype()))

        if coupling_scale is None:
            coupling_scale = min(0.2, 0.3 / math.sqrt(num_nodes - 1)) if coupling_prior == "normal" else 0.45
        if not coupling_scale > 0:
            raise ValueError(f"coupling_scale must be > 0; got {coupling_scale!r}")
        self.register_buffer("coupling_scale_value", torch.tensor(float(coupling_scale)))

        if isinstance(obs_scale, str):
            if obs_scale != "lognormal":
                raise ValueError(f"obs_scale must be a positive float or 'lognormal'; got {obs_scale!r}")
            self.learn_obs_scale = True
            obs_scale = 0.3  # the prior's median
        else:
            if not (isinstance(obs_scale, (int, float)) and obs_scale > 0):
                raise ValueError(f"obs_scale must be a positive float or 'lognormal'; got {obs_scale!r}")
            self.learn_obs_scale = False
        self.register_buffer("obs_scale_value", torch.tensor(float(obs_scale)))

    # ------------------------------------------------------------------ structure
    @property
    def dtype(self) -> torch.dtype:
        return self.hrf_kernel.dtype

    @property
    def device(self) -> torch.device:
        return self.hrf_kernel.device

    @property
    def hrf_length(self) -> int:
        """``L``, the number of HRF taps (1 without an HRF)."""
        return self.hrf_kernel.shape[0]

    @property
    def num_free_delays(self) -> int:
        """Size of the ``"delay"`` site: ``N - 1`` (reference) or ``N`` (absolute)."""
        return self.num_nodes - 1 if self.delay_mode == "reference" else self.num_nodes

    @property
    def delay_max_value(self) -> int:
        """Largest value of one entry of the ``"delay"`` site: ``2D`` (reference) or ``D``."""
        return 2 * self.max_delay if self.delay_mode == "reference" else self.max_delay

    @property
    def num_delay_configurations(self) -> int:
        return (self.delay_max_value + 1) ** self.num_free_delays

    @property
    def window(self) -> int:
        """``W = max delay + L``: how many lagged states one observation can reach."""
        return self.delay_max_value + self.hrf_length

    @property
    def hidden_dim(self) -> int:
        """Size of the Kalman filter's state: ``N W`` (lagged layout) or ``N L`` (shifted layout)."""
        return self.num_nodes * (self.window if self.state_layout == "lagged" else self.hrf_length)

    def delay_configurations(self) -> torch.Tensor:
        """Every value of the ``"delay"`` site, ``[K, num_free_delays]`` (the enumeration order)."""
        return self.delay_prior().enumerate_support(expand=False).reshape(-1, self.num_free_delays)

    def equal_delays(self) -> torch.Tensor:
        """The ``"delay"`` value giving every node the same delay (the naive, fixed-HRF assumption)."""
        value = self.max_delay if self.delay_mode == "reference" else 0
        return torch.full((self.num_free_delays,), value, dtype=torch.long, device=self.device)

    def full_delays(self, delay: torch.Tensor) -> torch.Tensor:
        """Every node's delay ``[..., N]`` from the ``"delay"`` site's value ``[..., num_free_delays]``."""
        if delay.shape[-1:] != (self.num_free_delays,):
            raise ValueError(f"delay must end in {self.num_free_delays}; got shape {tuple(delay.shape)}")
        if self.delay_mode == "absolute":
            return delay
        reference = torch.full_like(delay[..., :1], self.max_delay)
        return torch.cat([reference, delay], dim=-1)

    def site_delay(self, delays: torch.Tensor) -> torch.Tensor:
        """The ``"delay"`` site's value from per-node delays ``[..., N]`` (inverse of :meth:`full_delays`).

        In reference mode delays are shifted so node 0 sits at ``D``; the others must then lie in
        ``0..2D``.  A value already of the site's shape is checked and returned.
        """
        delays = torch.as_tensor(delays, device=self.device)
        if self.delay_mode == "reference" and delays.shape[-1:] == (self.num_nodes,):
            delays = delays[..., 1:] - delays[..., :1] + self.max_delay
        if delays.shape[-1:] != (self.num_free_delays,):
            raise ValueError(
                f"delays must end in {self.num_nodes} (per node) or {self.num_free_delays} (site value); "
                f"got shape {tuple(delays.shape)}"
            )
        if delays.is_floating_point():
            if not torch.equal(delays, delays.round()):
                raise ValueError("delays must be whole numbers of TR for this model")
            delays = delays.round().long()
        if ((delays < 0) | (delays > self.delay_max_value)).any():
            raise ValueError(
                f"delays lie outside the model's support 0..{self.delay_max_value} ({self.delay_mode} mode)"
            )
        return delays.long()

    # ------------------------------------------------------------------ priors and likelihood parts
    def delay_prior(self) -> DelayDistribution:
        return DelayDistribution(
            self.num_free_delays, self.delay_max_value, dtype=self.dtype, device=self.device
        )

    def coupling_prior(self) -> OffDiagonalMatrix:
        scale = self.coupling_scale_value
        if self.coupling_prior_family == "normal":
            base = dist.Normal(torch.zeros_like(scale), scale)
        else:
            base = dist.Uniform(-scale, scale)
        return OffDiagonalMatrix(base, self.num_nodes)

    def obs_scale_prior(self) -> dist.TorchDistribution:
        loc = torch.full((self.num_nodes,), math.log(0.3), dtype=self.dtype, device=self.device)
        return dist.LogNormal(loc, 0.5).to_event(1)

    def transition_matrix(self, coupling: torch.Tensor) -> torch.Tensor:
        """``A = a_0 I + C`` (the diagonal of ``C`` is ignored), ``[..., N, N]``."""
        eye = torch.eye(self.num_nodes, dtype=coupling.dtype, device=coupling.device)
        return self.self_coupling * eye + coupling * (1 - eye)

    def likelihood(
        self, coupling: torch.Tensor, delay: torch.Tensor, obs_scale: torch.Tensor | None = None
    ) -> DelayedObservationHMM:
        """The integrated-state law of ``y`` given the latent values (batched over their leading dims)."""
        return DelayedObservationHMM(
            self.transition_matrix(coupling),
            self.full_delays(delay),
            self.hrf_kernel,
            self._obs_scale(obs_scale),
            self.state_scale,
            self.num_steps,
            self.delay_max_value,
            jitter=self.shift_jitter,
            layout=self.state_layout,
        )

    def observe_states(self, states: torch.Tensor, delays: torch.Tensor) -> torch.Tensor:
        r"""Noise-free observations :math:`\sum_l g(l) x_i(t - \delta_i - l)`, ``[T, N]``, from the states.

        ``states[..., k, :]`` is :math:`x_{k - W + 1}`, so row ``W - 1`` is time 0.
        """
        n, t_len, w = self.num_nodes, self.num_steps, self.window
        if states.shape[-2:] != (t_len + w - 1, n):
            raise ValueError(f"states must end in ({t_len + w - 1}, {n}); got {tuple(states.shape)}")
        time = torch.arange(t_len, device=states.device)
        lags = torch.arange(self.hrf_length, device=states.device)
        # index[..., t, i, l] = t + W - 1 - delta_i - l
        index = time[:, None, None] + (w - 1) - delays.long()[..., None, :, None] - lags
        batch = torch.broadcast_shapes(states.shape[:-2], index.shape[:-3])
        index = index.expand(batch + index.shape[-3:])
        source = states.expand(batch + states.shape[-2:])
        # gather over time for every (node, lag): move nodes to the front of the gathered dims
        flat_index = index.permute(*range(len(batch)), -2, -3, -1).reshape(
            batch + (n, t_len * self.hrf_length)
        )
        gathered = torch.gather(source.mT, -1, flat_index).reshape(batch + (n, t_len, self.hrf_length))
        return (gathered * self.hrf_kernel).sum(-1).mT

    def _obs_scale(self, obs_scale: torch.Tensor | None) -> torch.Tensor:
        if obs_scale is None:
            return self.obs_scale_value.expand(self.num_nodes)
        return obs_scale

    def check_data(self, y: torch.Tensor, name: str = "y") -> torch.Tensor:
        """Validate observations ``[T, N]`` (finite, floating) and move them to the model's dtype/device."""
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [T, N]; got {type(y).__name__}")
        if y.shape != (self.num_steps, self.num_nodes):
            raise ValueError(
                f"{name} must have shape [T, N] = [{self.num_steps}, {self.num_nodes}]; got {tuple(y.shape)}"
            )
        if not y.is_floating_point():
            raise TypeError(f"{name} must be floating point; got {y.dtype}")
        if not torch.isfinite(y).all():
            raise ValueError(f"{name} contains non-finite values (NaN or inf)")
        return y.to(dtype=self.dtype, device=self.device)

    # ------------------------------------------------------------------ the model
    def forward(self, y: torch.Tensor | None = None) -> torch.Tensor:
        """The Pyro model; ``y`` ``[T, N]`` observed or ``None`` (simulate)."""
        if y is not None:
            y = self.check_data(y)
        delay = pyro.sample("delay", self.delay_prior())
        coupling = pyro.sample("coupling", self.coupling_prior())
        obs_scale = pyro.sample("obs_scale", self.obs_scale_prior()) if self.learn_obs_scale else None
        if self.integrate_states:
            return pyro.sample("y", self.likelihood(coupling, delay, obs_scale), obs=y)
        states = pyro.sample(
            "x",
            VAR1(self.transition_matrix(coupling), self.state_scale, self.num_steps + self.window - 1),
        )
        loc = self.observe_states(states, self.full_delays(delay))
        scale = self._obs_scale(obs_scale)[..., None, :]
        return pyro.sample("y", dist.Normal(loc, scale).to_event(2), obs=y)

    # ------------------------------------------------------------------ dense reference (checks)
    def covariance(
        self,
        coupling: torch.Tensor,
        delay: torch.Tensor,
        obs_scale: torch.Tensor | None = None,
        *,
        exact: bool = False,
    ) -> torch.Tensor:
        r"""Dense ``Cov(vec y)`` ``[T N, T N]`` (time-major), float64, for checks on small models.

        ``exact=False``: from the stationary covariance :math:`P` of the Kalman filter's state (its layout,
        shift jitter included), exactly the law the filter evaluates:
        :math:`\mathrm{Cov}(y_a, y_b) = o_a M^{\tau_a - \tau_b} P o_b^\top + \sigma_a^2 1_{a=b}` where
        observation ``a`` reads state step :math:`\tau_a` through row :math:`o_a`.  ``exact=True``: from the
        VAR autocovariances :math:`\Gamma(h) = A^h \Gamma_0` (no jitter), the model itself.
        Costs :math:`O((TN)^2)` memory; unbatched.
        """
        n, t_len = self.num_nodes, self.num_steps
        obs_scale = self._obs_scale(obs_scale).double()
        delays = self.full_delays(delay).long()
        time = torch.arange(t_len, device=delays.device)
        if not exact:
            law = self.likelihood(coupling.double(), delay, obs_scale)
            m, p, o = law.companion(), law.initial_covariance(), law.observation_matrix()
            if self.state_layout == "lagged":
                step = time[:, None].expand(t_len, n)
            else:
                step = (
                    time[:, None] + self.delay_max_value - delays
                )  # y_i(t) is read at filter step t + D' - d_i
            span = int(step.max() - step.min()) + 1
            powers = [p]
            for _ in range(1, span):
                powers.append(m @ powers[-1])
            r = o @ torch.stack(powers) @ o.mT  # r[k] = O M^k P O^T
            lag = step[:, :, None, None] - step[None, None, :, :]  # [T, N, T, N]
            rows = torch.arange(n, device=delays.device)
            i, j = rows[None, :, None, None], rows[None, None, None, :]
            cov = torch.where(lag >= 0, r[lag.clamp_min(0), i, j], r[(-lag).clamp_min(0), j, i])
        else:
            a = self.transition_matrix(coupling.double())
            eye = torch.eye(n, dtype=torch.float64, device=a.device)
            gammas = [stationary_covariance(a, self.state_scale**2 * eye)]
            length = self.hrf_length
            max_lag = t_len + self.delay_max_value + length
            for _ in range(max_lag):
                gammas.append(a @ gammas[-1])
            gamma = torch.stack(gammas)  # gamma[h] = Cov(x_{t+h}, x_t)
            g = self.hrf_kernel.double()
            lags = torch.arange(length, device=delays.device)
            # source time of y_i(t) through tap l: t - d_i - l, shape [T, N, L]
            source = time[:, None, None] - delays[None, :, None] - lags
            h = source[:, :, :, None, None, None] - source[None, None, None, :, :, :]  # [T,N,L,T,N,L]
            rows = torch.arange(n, device=delays.device)
            i, j = rows[None, :, None, None, None, None], rows[None, None, None, None, :, None]
            terms = torch.where(h >= 0, gamma[h.clamp_min(0), i, j], gamma[(-h).clamp_min(0), j, i])
            weights = g[None, None, :, None, None, None] * g[None, None, None, None, None, :]
            cov = (terms * weights).sum((2, 5))
        cov = cov.reshape(t_len * n, t_len * n)
        return cov + torch.diag(obs_scale.repeat(t_len) ** 2)

    # ------------------------------------------------------------------ simulation
    def simulate(
        self,
        num_datasets: int,
        truth: Literal["prior", "sparse", "mds"] | Mapping[str, torch.Tensor] = "prior",
        *,
        burn_in: int = 100,
        generator: torch.Generator | None = None,
        micro_steps: int = 16,
        max_rejection_rounds: int = 1000,
        keep_states: bool = True,
    ) -> NetworkSimulation:
        r"""Simulate ``num_datasets`` data sets at once (vectorised over data sets; loops over time only).

        * ``"prior"``: the model's prior, with draws of :math:`\rho(A) \ge 0.95` rejected (redrawn).
        * ``"sparse"``: each off-diagonal edge present with probability :math:`\min(1, 2/(N-1))`,
          magnitude :math:`\mathcal{U}(0.2, 0.45)`, random sign; ``C`` shrunk (bisection on a common factor)
          until :math:`\rho(A) \le 0.9`; delays from the prior.
        * ``"mds"`` (misspecification test): a sparse ``C`` as above, the continuous-time system
          :math:`dx = A_c x\,dt + \sigma_x dW` with :math:`A_c = (A - I)/\mathrm{TR}` by Euler at
          ``TR / micro_steps``, the canonical HRF at micro-time (when the model has an HRF), continuous
          delays in seconds (uniform over the model's delay range), downsampled to TR.
        * a mapping with any of ``"coupling"`` (``[N, N]`` or ``[n, N, N]``), ``"delay"`` (site value or
          per-node delays), ``"obs_scale"``; missing entries are drawn from the prior.

        VAR truths start from the exact stationary law and then run ``burn_in`` steps.

        :param int num_datasets: ``n``.
        :param truth: see above.
        :param int burn_in: steps discarded before the window.
        :param torch.Generator generator: source of randomness (default: torch's global one).
        :param int micro_steps: Euler steps per TR for ``"mds"``.
        :param int max_rejection_rounds: redraws of unstable prior couplings before giving up.
        :param bool keep_states: return the latent paths (``False`` saves memory for large banks).
        :return: :class:`NetworkSimulation` with ``y [n, T, N]`` and the truth.
        """
        if not isinstance(num_datasets, int) or num_datasets < 1:
            raise ValueError(f"num_datasets must be an int >= 1; got {num_datasets!r}")
        if not isinstance(burn_in, int) or burn_in < 0:
            raise ValueError(f"burn_in must be an int >= 0; got {burn_in!r}")
        n_sets, n = num_datasets, self.num_nodes
        options = {"dtype": self.dtype, "device": self.device}
        given: Mapping[str, torch.Tensor] = {}
        if isinstance(truth, Mapping):
            unknown = set(truth) - {"coupling", "delay", "obs_scale"}
            if unknown:
                raise ValueError(f"truth has unknown keys {sorted(unknown)}; use coupling, delay, obs_scale")
            given, label = truth, "given"
        elif truth in ("prior", "sparse", "mds"):
            label = truth
        else:
            raise ValueError(f"truth must be 'prior', 'sparse', 'mds' or a dict of sites; got {truth!r}")

        # couplings
        if "coupling" in given:
            coupling = torch.as_tensor(given["coupling"], **options)
            if coupling.shape[-2:] != (n, n) or coupling.dim() not in (2, 3):
                raise ValueError(
                    f"truth['coupling'] must be [N, N] or [n, N, N]; got {tuple(coupling.shape)}"
                )
            coupling = (coupling * (1 - torch.eye(n, **options))).expand(n_sets, n, n).clone()
            if not torch.isfinite(coupling).all():
                raise ValueError("truth['coupling'] contains non-finite values")
            if (spectral_radius(self.transition_matrix(coupling)) >= 1).any():
                raise ValueError("truth['coupling'] gives an unstable network (spectral radius of A >= 1)")
        elif label in ("sparse", "mds"):
            coupling = self._sparse_coupling(n_sets, generator)
        else:
            coupling = self._prior_coupling(n_sets, generator, max_rejection_rounds)

        # observation noise
        if "obs_scale" in given:
            obs_scale = torch.as_tensor(given["obs_scale"], **options).expand(n_sets, n).clone()
            if not (obs_scale > 0).all():
                raise ValueError("truth['obs_scale'] must be positive")
        elif self.learn_obs_scale:
            z = torch.randn(n_sets, n, generator=generator, **options)
            obs_scale = torch.exp(math.log(0.3) + 0.5 * z)
        else:
            obs_scale = self.obs_scale_value.expand(n_sets, n).clone()

        if label == "mds":
            return self._simulate_mds(coupling, obs_scale, burn_in, micro_steps, generator)

        # delays
        if "delay" in given:
            delay = self.site_delay(given["delay"]).expand(n_sets, self.num_free_delays).clone()
        else:
            delay = torch.randint(
                0,
                self.delay_max_value + 1,
                (n_sets, self.num_free_delays),
                generator=generator,
                device=self.device,
            )
        delays = self.full_delays(delay)

        # states: stationary start, burn-in, then the T + W - 1 steps the observations reach; in chunks of
        # data sets so that temporaries stay bounded for 10^5 simulations
        transition = self.transition_matrix(coupling)
        eye = torch.eye(n, **options)
        chol = torch.linalg.cholesky(stationary_covariance(transition, self.state_scale**2 * eye))
        length = self.num_steps + self.window - 1
        y = torch.empty(n_sets, self.num_steps, n, **options)
        states = torch.empty(n_sets, length, n, **options) if keep_states else None
        for begin in range(0, n_sets, SIMULATION_CHUNK):
            rows = slice(begin, min(begin + SIMULATION_CHUNK, n_sets))
            a, count = transition[rows], rows.stop - rows.start
            x = (chol[rows] @ torch.randn(count, n, 1, generator=generator, **options)).squeeze(-1)
            path = torch.empty(count, length, n, **options)
            for t in range(burn_in + length):
                noise = torch.randn(count, n, generator=generator, **options)
                x = (a @ x[..., None]).squeeze(-1) + self.state_scale * noise
                if t >= burn_in:
                    path[:, t - burn_in] = x
            clean = self.observe_states(path, delays[rows])
            y[rows] = clean + obs_scale[rows, None, :] * torch.randn(
                clean.shape, generator=generator, **options
            )
            if states is not None:
                states[rows] = path
        return NetworkSimulation(y, coupling, delay, delays, obs_scale, states, label)

    def simulate_sites(
        self, num_samples: int, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Prior simulator for hybrid stage 1: ``{site: [num_samples, ...]}`` (stability rejection on)."""
        return self.simulate(num_samples, "prior", generator=generator, keep_states=False).sites()

    def _prior_coupling(
        self, n_sets: int, generator: torch.Generator | None, max_rounds: int
    ) -> torch.Tensor:
        n = self.num_nodes
        options = {"dtype": self.dtype, "device": self.device}
        scale = self.coupling_scale_value
        coupling = torch.zeros(n_sets, n, n, **options)
        todo = torch.ones(n_sets, dtype=torch.bool, device=self.device)
        off = 1 - torch.eye(n, **options)
        for _ in range(max_rounds):
            k = int(todo.sum())
            if k == 0:
                return coupling
            if self.coupling_prior_family == "normal":
                draw = scale * torch.randn(k, n, n, generator=generator, **options)
            else:
                draw = scale * (2 * torch.rand(k, n, n, generator=generator, **options) - 1)
            coupling[todo] = draw * off
            radius = spectral_radius(self.transition_matrix(coupling))
            todo = radius >= PRIOR_MAX_SPECTRAL_RADIUS
        raise RuntimeError(
            f"could not draw stable couplings (rho(A) < {PRIOR_MAX_SPECTRAL_RADIUS}) in {max_rounds} rounds; "
            "the coupling prior is too wide for this network"
        )

    def _sparse_coupling(self, n_sets: int, generator: torch.Generator | None) -> torch.Tensor:
        n = self.num_nodes
        options = {"dtype": self.dtype, "device": self.device}
        off = 1 - torch.eye(n, **options)
        present = torch.rand(n_sets, n, n, generator=generator, **options) < min(1.0, 2.0 / (n - 1))
        magnitude = 0.2 + 0.25 * torch.rand(n_sets, n, n, generator=generator, **options)
        sign = torch.where(torch.rand(n_sets, n, n, generator=generator, **options) < 0.5, -1.0, 1.0)
        coupling = present * magnitude * sign * off
        radius = spectral_radius(self.transition_matrix(coupling))
        too_large = radius > SPARSE_MAX_SPECTRAL_RADIUS
        if too_large.any():
            # rho(a0 I + s C) <= 0.9 holds on an interval [0, s*] (0.5 < 0.9 at s = 0): bisect for s*.
            low = torch.zeros(int(too_large.sum()), **options)
            high = torch.ones_like(low)
            sub = coupling[too_large]
            for _ in range(50):
                mid = (low + high) / 2
                ok = (
                    spectral_radius(self.transition_matrix(sub * mid[:, None, None]))
                    <= SPARSE_MAX_SPECTRAL_RADIUS
                )
                low = torch.where(ok, mid, low)
                high = torch.where(ok, high, mid)
            coupling[too_large] = sub * low[:, None, None]
        return coupling

    def _simulate_mds(
        self,
        coupling: torch.Tensor,
        obs_scale: torch.Tensor,
        burn_in: int,
        micro_steps: int,
        generator: torch.Generator | None,
    ) -> NetworkSimulation:
        if not isinstance(micro_steps, int) or micro_steps < 1:
            raise ValueError(f"micro_steps must be an int >= 1; got {micro_steps!r}")
        n_sets, n = coupling.shape[0], self.num_nodes
        options = {"dtype": self.dtype, "device": self.device}
        dt = self.tr / micro_steps
        eye = torch.eye(n, **options)
        drift = (self.transition_matrix(coupling) - eye) / self.tr  # A_c, per second
        # continuous delays in seconds over the model's range, rounded to the micro grid
        if self.delay_mode == "reference":
            free = torch.rand(n_sets, n - 1, generator=generator, **options) * (2 * self.max_delay * self.tr)
            seconds = torch.cat([torch.full((n_sets, 1), self.max_delay * self.tr, **options), free], dim=1)
        else:
            seconds = torch.rand(n_sets, n, generator=generator, **options) * (self.max_delay * self.tr)
        shift = torch.round(seconds / dt).long()  # micro steps
        kernel = canonical_hrf(dt, 32.0, **options) if self.hrf_name != "none" else torch.ones(1, **options)
        lead = int(shift.max()) + kernel.shape[0]
        total = (burn_in + self.num_steps) * micro_steps + lead
        x = torch.zeros(n_sets, n, **options)
        noise = torch.randn(n_sets, total, n, generator=generator, **options) * (
            self.state_scale * math.sqrt(dt / self.tr)
        )
        path = []
        for t in range(total):
            x = x + dt * (drift @ x[..., None]).squeeze(-1) + noise[:, t]
            path.append(x)
        micro = torch.stack(path, dim=1)  # [n, total, N]
        if kernel.shape[0] > 1:  # causal convolution with the micro-time HRF
            signal = micro.mT.reshape(n_sets * n, 1, total)
            padded = torch.nn.functional.pad(signal, (kernel.shape[0] - 1, 0))
            micro = (
                torch.nn.functional.conv1d(padded, kernel.flip(0)[None, None]).reshape(n_sets, n, total).mT
            )
        sample_at = (burn_in + torch.arange(self.num_steps, device=self.device)) * micro_steps + lead  # [T]
        index = sample_at[None, :, None] - shift[:, None, :]  # [n, T, N]
        clean = torch.gather(micro, 1, index)
        y = clean + obs_scale[:, None, :] * torch.randn(clean.shape, generator=generator, **options)
        delays = seconds / self.tr
        delay = delays[:, 1:] - delays[:, :1] + self.max_delay if self.delay_mode == "reference" else delays
        return NetworkSimulation(y, coupling, delay, delays, obs_scale, None, "mds")

    def extra_repr(self) -> str:
        return (
            f"num_nodes={self.num_nodes}, num_steps={self.num_steps}, max_delay={self.max_delay}, "
            f"delay_mode={self.delay_mode!r}, hrf={self.hrf_name!r}, "
            f"integrate_states={self.integrate_states}, state_layout={self.state_layout!r}"
        )
