"""Distributions behind :class:`~pyro_ext.infer.networks.DelayedLinearNetwork`.

* :class:`OffDiagonalMatrix` — a coupling matrix whose diagonal is structurally zero; its support has a
  bijection from ``R^{N(N-1)}`` so every autoguide handles it in unconstrained space.
* :class:`DelayDistribution` — a joint categorical over delay vectors in ``{0..m}^d``, uniform or with
  logits over the product support; it enumerates its support, so ``TraceEnum_ELBO`` can sum over it.
* :class:`VAR1` — a stationary first-order vector autoregression over a whole time window, with a
  time-vectorised ``log_prob`` (the explicit-state model).
* :class:`DelayedObservationHMM` — the integrated-state likelihood: a Pyro
  :class:`~pyro.distributions.GaussianHMM` over lagged states, evaluated in float64 and cast back.
* :func:`stationary_covariance` — the discrete Lyapunov solution by doubling.

References: arXiv:2406.02545 (the delayed linear network; §3 of ``design/hybrid_vi.md`` reconstructs it).
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from pyro.distributions import TorchDistribution, constraints
from torch.distributions import biject_to, transform_to
from torch.distributions.transforms import ComposeTransform, IndependentTransform, Transform

__all__ = [
    "DelayDistribution",
    "DelayedObservationHMM",
    "OffDiagonalMatrix",
    "VAR1",
    "stationary_covariance",
    "zero_diagonal",
]

# Above this many points a delay distribution refuses to enumerate its support (memory, not math).
MAX_ENUMERATED_CONFIGURATIONS = 2**16


def stationary_covariance(
    transition: torch.Tensor,
    noise_covariance: torch.Tensor,
    *,
    max_doublings: int = 20,
    blowup: float = 1e6,
) -> torch.Tensor:
    r"""Stationary covariance :math:`P = \sum_{k\ge0} M^k Q (M^k)^\top` of :math:`s_t = M s_{t-1} + e_t`.

    Doubling: :math:`P \leftarrow P + M_j P M_j^\top`, :math:`M_{j+1} = M_j^2` sums :math:`2^j` terms
    after :math:`j` steps, so :math:`\rho(M) = 0.95` needs 10 steps to reach float64 precision.
    Batches converge independently.  Where :math:`\rho(M) \ge 1` no stationary law exists: that element
    stops doubling before :math:`P` would exceed ``blowup`` times the largest noise variance, leaving a
    finite, still positive-definite (huge) initial covariance, a proper but arbitrary initial law; nothing
    overflows, so gradients stay finite.  (A stable element reaches that size only for
    :math:`\rho(M) > 1 - 10^{-6}`.)

    :param torch.Tensor transition: ``M``, shape ``[..., n, n]`` (column convention ``s_t = M s_{t-1}``).
    :param torch.Tensor noise_covariance: ``Q``, shape broadcastable to ``[..., n, n]``.
    :param int max_doublings: at most this many doubling steps (``2**20`` terms).
    :param float blowup: relative size at which an element is declared non-stationary and frozen.
    :return: ``P`` of shape ``broadcast[..., n, n]``.
    """
    if transition.shape[-1] != transition.shape[-2]:
        raise ValueError(f"transition must be square in its last two dims; got {tuple(transition.shape)}")
    shape = torch.broadcast_shapes(transition.shape, noise_covariance.shape)
    power = transition.expand(shape)
    covariance = noise_covariance.expand(shape)
    eps = torch.finfo(transition.dtype).eps
    limit = blowup * float(noise_covariance.detach().abs().max())
    for _ in range(max_doublings):
        increment = power @ covariance @ power.mT
        with torch.no_grad():
            size = increment.abs().amax((-2, -1))
            grown = (covariance + increment).abs().amax((-2, -1))
            too_big = (grown > limit) | ~torch.isfinite(grown)
            converged = size <= eps * grown
            keep = (~too_big).to(covariance.dtype)[..., None, None]
        # Frozen elements neither add this increment nor double further: multiplying by 0 (rather than
        # masking with where) keeps any huge value out of the graph, so the backward pass stays finite.
        covariance = covariance + increment * keep
        if bool((too_big | converged).all()):
            break
        power = (power @ power) * keep
        power = power * (power.detach().abs().amax((-2, -1)) <= limit).to(power.dtype)[..., None, None]
    return covariance


# ---------------------------------------------------------------------------------------------------
# Coupling matrices with a structurally zero diagonal
# ---------------------------------------------------------------------------------------------------


class _ZeroDiagonal(constraints.Constraint):
    """Square matrices whose diagonal is zero and whose off-diagonal entries satisfy ``base``."""

    event_dim = 2

    def __init__(self, base: constraints.Constraint = constraints.real) -> None:
        if base.event_dim != 0:
            raise ValueError(f"base must be an elementwise constraint; got event_dim={base.event_dim}")
        self.base = base
        super().__init__()

    def check(self, value: torch.Tensor) -> torch.Tensor:
        n = value.shape[-1]
        off = ~torch.eye(n, dtype=torch.bool, device=value.device)
        diagonal_zero = (value.diagonal(dim1=-2, dim2=-1) == 0).all(-1)
        base_ok = (self.base.check(value) | ~off).all(-1).all(-1)
        return diagonal_zero & base_ok

    def __repr__(self) -> str:
        return f"ZeroDiagonal({self.base!r})"


def zero_diagonal(base: constraints.Constraint = constraints.real) -> constraints.Constraint:
    """The support of :class:`OffDiagonalMatrix`: square matrices, zero diagonal, entries in ``base``."""
    return _ZeroDiagonal(base)


def _off_diagonal_index(n: int, device: torch.device | None = None) -> torch.Tensor:
    """Flat indices (row-major) of the off-diagonal entries of an ``n x n`` matrix."""
    flat = torch.arange(n * n, device=device)
    return flat[flat // n != flat % n]


class OffDiagonalEmbedding(Transform):
    """``R^{n(n-1)} -> `` zero-diagonal ``n x n`` matrices, row-major; volume preserving."""

    domain = constraints.independent(constraints.real, 1)
    codomain = zero_diagonal()
    bijective = True

    def __init__(self, num_nodes: int, cache_size: int = 0) -> None:
        self.num_nodes = num_nodes
        super().__init__(cache_size=cache_size)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OffDiagonalEmbedding) and other.num_nodes == self.num_nodes

    def __hash__(self) -> int:
        return hash((type(self), self.num_nodes))

    def with_cache(self, cache_size: int = 1) -> OffDiagonalEmbedding:
        return self if self._cache_size == cache_size else OffDiagonalEmbedding(self.num_nodes, cache_size)

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        n = self.num_nodes
        flat = x.new_zeros(x.shape[:-1] + (n * n,))
        flat = flat.index_copy(-1, _off_diagonal_index(n, x.device), x)
        return flat.reshape(x.shape[:-1] + (n, n))

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        n = self.num_nodes
        return y.reshape(y.shape[:-2] + (n * n,)).index_select(-1, _off_diagonal_index(n, y.device))

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[:-1])

    def forward_shape(self, shape: torch.Size) -> torch.Size:
        n = self.num_nodes
        if shape[-1:] != (n * (n - 1),):
            raise ValueError(f"expected a last dim of {n * (n - 1)}; got shape {tuple(shape)}")
        return shape[:-1] + (n, n)

    def inverse_shape(self, shape: torch.Size) -> torch.Size:
        return shape[:-2] + (self.num_nodes * (self.num_nodes - 1),)


@biject_to.register(_ZeroDiagonal)
@transform_to.register(_ZeroDiagonal)
def _biject_to_zero_diagonal(constraint: _ZeroDiagonal) -> Transform:
    # The number of nodes is unknown until a value arrives, so the transform reads it lazily.
    return _LazyZeroDiagonalTransform(constraint.base)


class _LazyZeroDiagonalTransform(Transform):
    """``biject_to(zero_diagonal(base))``: elementwise ``biject_to(base)``, then the embedding.

    The matrix size is read from the value (inverse) or the vector length (forward), so one
    registered factory serves every size.
    """

    domain = constraints.independent(constraints.real, 1)
    bijective = True

    def __init__(self, base: constraints.Constraint, cache_size: int = 0) -> None:
        self.base = base
        super().__init__(cache_size=cache_size)

    @property
    def codomain(self) -> constraints.Constraint:  # type: ignore[override]
        return zero_diagonal(self.base)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _LazyZeroDiagonalTransform) and repr(other.base) == repr(self.base)

    def __hash__(self) -> int:
        return hash((type(self), repr(self.base)))

    def with_cache(self, cache_size: int = 1) -> _LazyZeroDiagonalTransform:
        return self if self._cache_size == cache_size else _LazyZeroDiagonalTransform(self.base, cache_size)

    @staticmethod
    def _nodes_from_length(length: int) -> int:
        n = int(round((1 + math.sqrt(1 + 4 * length)) / 2))
        if n * (n - 1) != length:
            raise ValueError(f"a vector of length {length} is not the off-diagonal of a square matrix")
        return n

    def _compose(self, n: int) -> Transform:
        return ComposeTransform([IndependentTransform(biject_to(self.base), 1), OffDiagonalEmbedding(n)])

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return self._compose(self._nodes_from_length(x.shape[-1]))(x)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self._compose(y.shape[-1]).inv(y)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._compose(y.shape[-1]).log_abs_det_jacobian(x, y)

    def forward_shape(self, shape: torch.Size) -> torch.Size:
        n = self._nodes_from_length(shape[-1])
        return shape[:-1] + (n, n)

    def inverse_shape(self, shape: torch.Size) -> torch.Size:
        return shape[:-2] + (shape[-1] * (shape[-1] - 1),)


class OffDiagonalMatrix(TorchDistribution):
    r"""Independent univariate draws on the off-diagonal of an ``N x N`` matrix; the diagonal is 0.

    .. math:: p(C) = \prod_{i \ne j} p_0(C_{ij}), \qquad C_{ii} = 0.

    The support is :func:`zero_diagonal`, with a registered bijection from ``R^{N(N-1)}``, so
    ``AutoNormal``, ``AutoMultivariateNormal`` and ``HybridGuide`` fit only the ``N(N-1)`` free entries
    (masking the diagonal's density instead would leave its guide entropy unbounded).

    :param base: a univariate distribution with ``batch_shape == ()`` (``Normal(0, s)``,
        ``Uniform(-a, a)``, ...).
    :param int num_nodes: ``N >= 2``.

    Example::

        >>> prior = OffDiagonalMatrix(dist.Normal(0.0, 0.2), 3)
        >>> prior.sample().diagonal().abs().sum().item()
        0.0
    """

    arg_constraints: dict = {}
    has_rsample = True

    def __init__(self, base: TorchDistribution, num_nodes: int, validate_args: bool | None = None) -> None:
        if not isinstance(num_nodes, int) or num_nodes < 2:
            raise ValueError(f"num_nodes must be an int >= 2; got {num_nodes!r}")
        if base.batch_shape != () or base.event_shape != ():
            raise ValueError(
                "base must be a univariate distribution with batch_shape () and event_shape (); got "
                f"batch_shape {tuple(base.batch_shape)}, event_shape {tuple(base.event_shape)}"
            )
        self.base = base
        self.num_nodes = num_nodes
        super().__init__(torch.Size(), torch.Size((num_nodes, num_nodes)), validate_args=validate_args)

    @constraints.dependent_property(is_discrete=False, event_dim=2)
    def support(self) -> constraints.Constraint:
        return zero_diagonal(self.base.support)

    def expand(self, batch_shape, _instance=None):
        return super().expand(batch_shape, _instance)

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        n = self.num_nodes
        shape = torch.Size(sample_shape) + self.batch_shape + (n * (n - 1),)
        draws = self.base.rsample(shape) if self.base.has_rsample else self.base.sample(shape)
        return OffDiagonalEmbedding(n)(draws)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        off = OffDiagonalEmbedding(self.num_nodes).inv(value)
        return self.base.log_prob(off).sum(-1)

    @property
    def mean(self) -> torch.Tensor:
        return OffDiagonalEmbedding(self.num_nodes)(
            self.base.mean.expand(self.batch_shape + (self.num_nodes * (self.num_nodes - 1),))
        )

    @property
    def variance(self) -> torch.Tensor:
        return OffDiagonalEmbedding(self.num_nodes)(
            self.base.variance.expand(self.batch_shape + (self.num_nodes * (self.num_nodes - 1),))
        )


# ---------------------------------------------------------------------------------------------------
# Delays
# ---------------------------------------------------------------------------------------------------


class DelayDistribution(TorchDistribution):
    r"""A joint categorical over delay vectors :math:`\delta \in \{0, \dots, m\}^d`.

    Uniform (``logits=None``; the model's prior, no table of size :math:`(m+1)^d` is built) or with
    ``logits`` over the product support in mixed-radix order (first delay most significant), which is
    the order of :meth:`enumerate_support` and of :func:`delay_configurations`.

    :param int num_delays: ``d``, the event size.
    :param int max_value: ``m``; each delay lies in ``{0..m}``.
    :param torch.Tensor logits: optional ``[..., (m+1)**d]``.
    """

    arg_constraints: dict = {}
    has_enumerate_support = True

    def __init__(
        self,
        num_delays: int,
        max_value: int,
        logits: torch.Tensor | None = None,
        validate_args: bool | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        batch_shape: torch.Size | tuple[int, ...] = (),
    ) -> None:
        if not isinstance(num_delays, int) or num_delays < 1:
            raise ValueError(f"num_delays must be an int >= 1; got {num_delays!r}")
        if not isinstance(max_value, int) or max_value < 0:
            raise ValueError(f"max_value must be an int >= 0; got {max_value!r}")
        self.num_delays = num_delays
        self.max_value = max_value
        self.num_configurations = (max_value + 1) ** num_delays
        batch_shape = torch.Size(batch_shape)
        if logits is not None:
            if logits.shape[-1:] != (self.num_configurations,):
                raise ValueError(
                    f"logits must end in {self.num_configurations} (= {max_value + 1}**{num_delays}); "
                    f"got shape {tuple(logits.shape)}"
                )
            logits = logits - logits.logsumexp(-1, keepdim=True)
            batch_shape = torch.broadcast_shapes(batch_shape, logits.shape[:-1])
            logits = logits.expand(batch_shape + logits.shape[-1:])
        self.logits = logits
        # Where the uniform prior's log-densities and draws live (a logits table carries its own).
        self._dtype = logits.dtype if logits is not None else (dtype or torch.get_default_dtype())
        self._device = logits.device if logits is not None else torch.device(device or "cpu")
        super().__init__(batch_shape, torch.Size((num_delays,)), validate_args=validate_args)

    @constraints.dependent_property(is_discrete=True, event_dim=1)
    def support(self) -> constraints.Constraint:
        return constraints.independent(constraints.integer_interval(0, self.max_value), 1)

    def _radix(self, device: torch.device | None) -> torch.Tensor:
        exponents = torch.arange(self.num_delays - 1, -1, -1, device=device)
        return (self.max_value + 1) ** exponents

    def configuration_index(self, value: torch.Tensor) -> torch.Tensor:
        """Mixed-radix index of each delay vector ``[..., d] -> [...]`` (long)."""
        return (value.long() * self._radix(value.device)).sum(-1)

    def configurations_from_index(self, index: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`configuration_index`: ``[...] -> [..., d]`` (long)."""
        return (index.long().unsqueeze(-1) // self._radix(index.device)) % (self.max_value + 1)

    @property
    def probs(self) -> torch.Tensor:
        if self.logits is None:
            raise ValueError("a uniform DelayDistribution holds no probability table")
        return self.logits.exp()

    def expand(self, batch_shape, _instance=None):
        # Not Pyro's ExpandedDistribution: its enumerate_support drops event dims.
        batch_shape = torch.Size(batch_shape)
        logits = None if self.logits is None else self.logits.expand(batch_shape + (self.num_configurations,))
        return DelayDistribution(
            self.num_delays,
            self.max_value,
            logits,
            validate_args=False,
            dtype=self._dtype,
            device=self._device,
            batch_shape=batch_shape,
        )

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape
        if self.logits is None:
            return torch.randint(0, self.max_value + 1, shape + self.event_shape, device=self._device)
        index = torch.distributions.Categorical(logits=self.logits).sample(sample_shape)
        return self.configurations_from_index(index)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        if self.logits is None:
            inside = ((value >= 0) & (value <= self.max_value)).all(-1)
            log_p = -self.num_delays * math.log(self.max_value + 1)
            shape = torch.broadcast_shapes(inside.shape, self.batch_shape)
            result = torch.full(shape, log_p, dtype=self._dtype, device=value.device)
            return result.masked_fill(~inside, -math.inf)
        index = self.configuration_index(value.clamp(0, self.max_value))
        logits, index = torch.broadcast_tensors(self.logits, index.unsqueeze(-1))
        return logits.gather(-1, index[..., :1]).squeeze(-1)

    def enumerate_support(self, expand: bool = True) -> torch.Tensor:
        if self.num_configurations > MAX_ENUMERATED_CONFIGURATIONS:
            raise ValueError(
                f"{self.num_configurations} delay configurations are too many to enumerate "
                f"(limit {MAX_ENUMERATED_CONFIGURATIONS}); use a mean-field delay guide instead"
            )
        values = self.configurations_from_index(torch.arange(self.num_configurations, device=self._device))
        values = values.reshape((self.num_configurations,) + (1,) * len(self.batch_shape) + self.event_shape)
        if expand:
            values = values.expand((self.num_configurations,) + self.batch_shape + self.event_shape)
        return values

    def entropy(self) -> torch.Tensor:
        if self.logits is None:
            entropy = self.num_delays * math.log(self.max_value + 1)
            return torch.full(self.batch_shape, entropy, dtype=self._dtype, device=self._device)
        return -(self.logits.exp() * self.logits).sum(-1)


# ---------------------------------------------------------------------------------------------------
# States
# ---------------------------------------------------------------------------------------------------


class VAR1(TorchDistribution):
    r"""A stationary VAR(1) path :math:`x_0, \dots, x_{T-1} \in \mathbb{R}^N`, as one event ``[T, N]``.

    .. math::
        x_0 \sim \mathcal{N}(0, \Gamma_0), \quad x_t = A x_{t-1} + \varepsilon_t, \quad
        \varepsilon_t \sim \mathcal{N}(0, \sigma^2 I), \qquad \Gamma_0 = A \Gamma_0 A^\top + \sigma^2 I.

    ``log_prob`` is vectorised over time (one batched residual, no loop); sampling loops over time.
    ``A`` may carry batch dims.  Where :math:`\rho(A) \ge 1`, :math:`\Gamma_0` is the finite truncation
    of :func:`stationary_covariance`.

    :param torch.Tensor transition: ``A``, ``[..., N, N]``.
    :param noise_scale: :math:`\sigma` (float or tensor broadcastable to ``[...]``).
    :param int num_steps: ``T``.
    """

    arg_constraints: dict = {}
    support = constraints.independent(constraints.real, 2)
    has_rsample = True

    def __init__(
        self,
        transition: torch.Tensor,
        noise_scale: float | torch.Tensor,
        num_steps: int,
        validate_args: bool | None = None,
    ) -> None:
        if transition.dim() < 2 or transition.shape[-1] != transition.shape[-2]:
            raise ValueError(f"transition must be [..., N, N]; got {tuple(transition.shape)}")
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1; got {num_steps!r}")
        self.transition = transition
        self.noise_scale = torch.as_tensor(noise_scale, dtype=transition.dtype, device=transition.device)
        self.num_steps = num_steps
        n = transition.shape[-1]
        batch_shape = torch.broadcast_shapes(transition.shape[:-2], self.noise_scale.shape)
        super().__init__(batch_shape, torch.Size((num_steps, n)), validate_args=validate_args)

    @property
    def initial_covariance(self) -> torch.Tensor:
        n = self.transition.shape[-1]
        eye = torch.eye(n, dtype=self.transition.dtype, device=self.transition.device)
        return stationary_covariance(self.transition, self.noise_scale[..., None, None] ** 2 * eye)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        n = self.transition.shape[-1]
        return VAR1(
            self.transition.expand(batch_shape + (n, n)),
            self.noise_scale.expand(batch_shape),
            self.num_steps,
            validate_args=False,
        )

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        initial = dist.MultivariateNormal(
            torch.zeros_like(value[..., 0, :]), covariance_matrix=self.initial_covariance
        )
        result = initial.log_prob(value[..., 0, :])
        if self.num_steps > 1:
            # Row-vector form: x_t = x_{t-1} A^T + eps_t, for all t at once.
            predicted = value[..., :-1, :] @ self.transition.mT
            residual = value[..., 1:, :] - predicted
            scale = self.noise_scale[..., None, None]
            step = dist.Normal(torch.zeros_like(scale), scale).log_prob(residual)
            result = result + step.sum((-2, -1))
        return result

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape
        n = self.transition.shape[-1]
        chol = torch.linalg.cholesky(self.initial_covariance)
        noise = torch.randn(
            shape + (self.num_steps, n), dtype=self.transition.dtype, device=self.transition.device
        )
        x = (chol @ noise[..., 0, :, None]).squeeze(-1)
        path = [x]
        scale = self.noise_scale[..., None]
        for t in range(1, self.num_steps):
            x = (self.transition @ x[..., None]).squeeze(-1) + scale * noise[..., t, :]
            path.append(x)
        return torch.stack(path, dim=-2)


class DelayedObservationHMM(TorchDistribution):
    r"""The integrated-state likelihood :math:`p(y \mid A, \delta, \sigma_y)` of a delayed linear network.

    .. math:: x_t = A x_{t-1} + \varepsilon_t, \qquad
        y_i(t) = \textstyle\sum_{l<L} g(l)\, x_i(t - \delta_i - l) + \eta_i(t).

    Evaluated exactly (up to the shift jitter below) by Pyro's :class:`~pyro.distributions.GaussianHMM`,
    which takes row-vector matrices (so transposes are passed), **in float64**, cast back to the inputs'
    dtype (in float32 the jittered shift rows make the Cholesky fall back repeatedly; design pitfall 7).
    Two state layouts:

    * ``"lagged"`` (design note §3.1): :math:`s_t = (x_t, \dots, x_{t-W+1}) \in \mathbb{R}^{NW}`,
      :math:`W = \delta_{\max} + L`, companion transition ``M`` (``A`` on top, identity shifts below),
      :math:`O[i, (\delta_i + l)N + i] = g(l)`.
    * ``"shifted"`` (default, [pyro_ext]): node ``i``'s series is read :math:`\delta_i` steps later, so
      the filter runs on :math:`\tau = -\delta_{\max}, \dots, T-1` with state
      :math:`(x_\tau, \dots, x_{\tau-L+1}) \in \mathbb{R}^{NL}` and sees
      :math:`v_{\tau,i} = y_i(\tau + \delta_i)` where :math:`0 \le \tau + \delta_i < T`.  The
      :math:`N\delta_{\max}` unobserved slots get a zero observation row and value 0; their constant
      density :math:`\mathcal{N}(0; 0, \sigma_{y,i}^2)` is subtracted.  The same law with an
      :math:`L`- instead of :math:`(\delta_{\max} + L)`-block state: without an HRF no shift rows, no
      jitter, and ~:math:`(2D+1)^3` times fewer flops per step.

    Both use transition noise :math:`\mathrm{diag}(\sigma_x^2 I_N, \epsilon I, \dots)` (the shift rows
    need :math:`\epsilon` = ``jitter`` for a proper Gaussian factor; it perturbs the law by
    :math:`O(\epsilon)` and the float64 information-form filter loses :math:`O(u/\epsilon)` accuracy,
    :math:`u \approx 10^{-16}`) and the stationary initial law of the state (:func:`stationary_covariance`).
    Everything broadcasts over leading batch dims of ``transition``, ``delays`` and ``obs_scale``.

    :param torch.Tensor transition: ``A``, ``[..., N, N]``.
    :param torch.Tensor delays: per-node delays, ``[..., N]`` (long), in ``0..max_delay``.
    :param torch.Tensor hrf: ``g``, ``[L]``.
    :param torch.Tensor obs_scale: :math:`\sigma_y`, ``[..., N]``.
    :param float state_scale: :math:`\sigma_x`.
    :param int num_steps: ``T``.
    :param int max_delay: :math:`\delta_{\max}`, the largest delay the model allows (fixes the shapes).
    :param float jitter: :math:`\epsilon`.
    :param str layout: ``"shifted"`` or ``"lagged"``.
    """

    arg_constraints: dict = {}
    support = constraints.independent(constraints.real, 2)
    has_rsample = True

    def __init__(
        self,
        transition: torch.Tensor,
        delays: torch.Tensor,
        hrf: torch.Tensor,
        obs_scale: torch.Tensor,
        state_scale: float,
        num_steps: int,
        max_delay: int,
        jitter: float = 1e-6,
        layout: str = "shifted",
        validate_args: bool | None = None,
    ) -> None:
        n = transition.shape[-1]
        if transition.dim() < 2 or transition.shape[-2] != n:
            raise ValueError(f"transition must be [..., N, N]; got {tuple(transition.shape)}")
        if delays.shape[-1:] != (n,):
            raise ValueError(f"delays must be [..., {n}]; got {tuple(delays.shape)}")
        if obs_scale.shape[-1:] != (n,):
            raise ValueError(f"obs_scale must be [..., {n}]; got {tuple(obs_scale.shape)}")
        if layout not in ("shifted", "lagged"):
            raise ValueError(f"layout must be 'shifted' or 'lagged'; got {layout!r}")
        self.transition = transition
        self.delays = delays.long()
        self.hrf = hrf
        self.obs_scale = obs_scale
        self.state_scale = float(state_scale)
        self.num_steps = int(num_steps)
        self.max_delay = int(max_delay)
        self.jitter = float(jitter)
        self.layout = layout
        batch_shape = torch.broadcast_shapes(transition.shape[:-2], delays.shape[:-1], obs_scale.shape[:-1])
        self._hmm_cache: dist.GaussianHMM | None = None
        super().__init__(batch_shape, torch.Size((num_steps, n)), validate_args=validate_args)

    # ------------------------------------------------------------------ state space
    @property
    def num_nodes(self) -> int:
        return self.transition.shape[-1]

    @property
    def window(self) -> int:
        """Number of lag blocks in the state: ``max_delay + L`` (lagged) or ``L`` (shifted)."""
        length = self.hrf.shape[0]
        return self.max_delay + length if self.layout == "lagged" else length

    @property
    def num_filter_steps(self) -> int:
        """Length of the filtered sequence: ``T`` (lagged) or ``T + max_delay`` (shifted)."""
        return self.num_steps if self.layout == "lagged" else self.num_steps + self.max_delay

    def companion(self) -> torch.Tensor:
        """The state transition ``M`` (column convention), ``[..., NW, NW]``, float64."""
        a = self.transition.double()
        n, w = self.num_nodes, self.window
        m = a.new_zeros(a.shape[:-2] + (n * w, n * w))
        m[..., :n, :n] = a
        if w > 1:
            m[..., n:, :-n] = torch.eye(n * (w - 1), dtype=a.dtype, device=a.device)
        return m

    def state_noise_variance(self) -> torch.Tensor:
        """Diagonal of the state transition noise covariance, ``[NW]``, float64."""
        n, w = self.num_nodes, self.window
        variance = torch.full((n * w,), self.jitter, dtype=torch.float64, device=self.transition.device)
        variance[:n] = self.state_scale**2
        return variance

    def initial_covariance(self) -> torch.Tensor:
        """Stationary covariance of the state, ``[..., NW, NW]``, float64."""
        return stationary_covariance(self.companion(), torch.diag(self.state_noise_variance()))

    def observation_matrix(self) -> torch.Tensor:
        """``O`` (column convention) ``[..., N, NW]``, float64: ``O[i, (d_i + l) N + i] = g(l)``.

        ``d_i = delta_i`` in the lagged layout and ``0`` in the shifted one (the shift moves the data).
        """
        n, w = self.num_nodes, self.window
        device = self.transition.device
        offsets = self.delays if self.layout == "lagged" else torch.zeros_like(self.delays)
        lags = torch.arange(self.hrf.shape[0], device=device)
        column = (offsets[..., :, None] + lags) * n + torch.arange(n, device=device)[:, None]  # [..., N, L]
        one_hot = torch.nn.functional.one_hot(column, n * w).double()
        return (self.hrf.double()[:, None] * one_hot).sum(-2)

    def _shift_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Shifted layout: for filter step ``k`` (time ``k - max_delay``) and node ``i``, the data row
        ``t = k - max_delay + delta_i`` it reads (clamped) and whether that row exists; ``[..., T', N]``."""
        steps = torch.arange(self.num_filter_steps, device=self.delays.device)
        rows = steps[:, None] - self.max_delay + self.delays[..., None, :]
        observed = (rows >= 0) & (rows < self.num_steps)
        return rows.clamp(0, self.num_steps - 1), observed

    def _to_filter_values(self, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Data ``[..., T, N]`` as the filter's observations ``[..., T', N]`` (and the observed mask)."""
        if self.layout == "lagged":
            return value, None
        rows, observed = self._shift_index()
        batch = torch.broadcast_shapes(value.shape[:-2], rows.shape[:-2])
        source = value.expand(batch + value.shape[-2:])
        shifted = torch.gather(source, -2, rows.expand(batch + rows.shape[-2:]))
        return shifted * observed, observed

    @property
    def hmm(self) -> dist.GaussianHMM:
        """The float64 :class:`~pyro.distributions.GaussianHMM` (built once per distribution)."""
        if self._hmm_cache is None:
            companion = self.companion()
            hidden = companion.shape[-1]
            noise_variance = self.state_noise_variance()
            initial = dist.MultivariateNormal(
                companion.new_zeros(hidden),
                covariance_matrix=stationary_covariance(companion, torch.diag(noise_variance)),
            )
            noise = dist.Normal(companion.new_zeros(hidden), noise_variance.sqrt()).to_event(1)
            observation = self.observation_matrix().mT  # [..., NW, N]
            if self.layout == "shifted":
                # unobserved slots: zero observation column, so the state does not reach them
                _, observed = self._shift_index()
                observation = observation.unsqueeze(-3) * observed.unsqueeze(-2).double()  # [..., T', NW, N]
            else:
                observation = observation.unsqueeze(-3)  # GaussianHMM reads the last batch dim as time
            obs_scale = self.obs_scale.double()[..., None, :]
            obs_noise = dist.Normal(torch.zeros_like(obs_scale), obs_scale).to_event(1)
            self._hmm_cache = dist.GaussianHMM(
                initial,
                companion.mT.unsqueeze(-3),
                noise,
                observation,
                obs_noise,
                duration=self.num_filter_steps,
                validate_args=False,
            )
        return self._hmm_cache

    # ------------------------------------------------------------------ distribution API
    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        n = self.num_nodes
        return DelayedObservationHMM(
            self.transition.expand(batch_shape + (n, n)),
            self.delays.expand(batch_shape + (n,)),
            self.hrf,
            self.obs_scale.expand(batch_shape + (n,)),
            self.state_scale,
            self.num_steps,
            self.max_delay,
            self.jitter,
            self.layout,
            validate_args=False,
        )

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        values, observed = self._to_filter_values(value.double())
        result = self.hmm.log_prob(values)
        if observed is not None:
            # remove the unobserved slots' density N(0; 0, sigma_i^2) = -log(sigma_i) - log(2 pi) / 2
            missing = (~observed).double()
            log_density_at_zero = -self.obs_scale.double().log() - 0.5 * math.log(2 * math.pi)
            result = result - (missing * log_density_at_zero[..., None, :]).sum((-2, -1))
        return result.to(value.dtype)

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        draws = self.hmm.rsample(torch.Size(sample_shape))
        if self.layout == "shifted":
            # y_i(t) sits at filter step t + max_delay - delta_i
            times = torch.arange(self.num_steps, device=draws.device)
            steps = times[:, None] + self.max_delay - self.delays[..., None, :]
            batch = torch.broadcast_shapes(draws.shape[:-2], steps.shape[:-2])
            draws = torch.gather(
                draws.expand(batch + draws.shape[-2:]), -2, steps.expand(batch + steps.shape[-2:])
            )
        return draws.to(self.transition.dtype)

    def rsample_posterior(
        self, value: torch.Tensor, sample_shape: torch.Size | tuple[int, ...] = ()
    ) -> torch.Tensor:
        r"""Draws of the latent path given ``y``: ``sample_shape + batch + [T + W - 1, N]``.

        Rows are times :math:`-W+1, \dots, T-1` with :math:`W = \delta_{\max} + L`, the layout of the
        explicit-state model's ``"x"`` site.
        """
        values, _ = self._to_filter_values(value.double())
        states = self.hmm.rsample_posterior(values, torch.Size(sample_shape))  # [..., T', NW]
        n, w = self.num_nodes, self.window
        first = states[..., 0, :].reshape(states.shape[:-2] + (w, n)).flip(-2)  # oldest lag first
        path = torch.cat([first, states[..., 1:, :n]], dim=-2)
        return path.to(value.dtype)
