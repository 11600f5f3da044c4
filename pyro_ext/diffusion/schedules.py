r"""Noise schedules of diffusion models and the conversions between network parametrisations.

Time runs forward, from data (:math:`t = 0`) to noise:

.. math::

    x_t = \alpha(t)\, x_0 + \sigma(t)\, \varepsilon, \qquad \varepsilon \sim \mathcal N(0, I).

A :class:`Schedule` is an :class:`torch.nn.Module` whose constants are buffers, so that ``.to(device)``,
``.double()`` and ``state_dict`` work as for any module. Every method takes ``t`` as a Python float or a
tensor; a float is computed in the dtype and on the device of the schedule's buffers, a tensor in its own
dtype and on its own device, and the result has the shape of ``t``.

References: Song et al., score SDE, arXiv:2011.13456; Ho et al., DDPM, arXiv:2006.11239; Nichol & Dhariwal,
arXiv:2102.09672; Kingma et al., VDM, arXiv:2107.00630; Salimans & Ho, arXiv:2202.00512.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from pyro_ext.diffusion._validation import checked_times, times_checked, under_functorch

__all__ = [
    "DDPM",
    "PARAMETRISATIONS",
    "Cosine",
    "ParametrisedScore",
    "Schedule",
    "VEGeometric",
    "VEVariance",
    "VPLinear",
    "broadcast_time",
    "convert",
    "ddpm_index_to_t",
    "t_to_ddpm_index",
]

#: The network outputs :func:`convert` understands.
PARAMETRISATIONS = ("eps", "x0", "v", "score")

TimeLike = float | int | Tensor


class Schedule(nn.Module):
    r"""Base class of a noise schedule :math:`(\alpha(t), \sigma(t))` on :math:`[t_{min}, t_{max}]`.

    Subclasses implement :meth:`log_alpha`, :meth:`log_sigma2`, :meth:`f` and :meth:`g2`; the base class
    derives

    .. math::

        \mathrm{SNR}(t) = \frac{\alpha^2}{\sigma^2}, \qquad
        f(t) = \frac{d \log\alpha}{dt}, \qquad
        g^2(t) = \frac{d\sigma^2}{dt} - 2 f \sigma^2 = -\sigma^2 \frac{d \log \mathrm{SNR}}{dt},

    so that the forward SDE is :math:`dx = f x\, dt + g\, dW` (Kingma et al., VDM). :meth:`t_of_log_snr`
    inverts :meth:`log_snr` by bisection unless a subclass has a closed form.

    :param float t_min: smallest valid time.
    :param float t_max: largest valid time.
    """

    def __init__(self, t_min: float = 0.0, t_max: float = 1.0) -> None:
        super().__init__()
        if not (math.isfinite(t_min) and math.isfinite(t_max) and t_min < t_max):
            raise ValueError(f"need finite t_min < t_max; got t_min={t_min}, t_max={t_max}")
        self._t_min = float(t_min)
        self._t_max = float(t_max)
        # Holds the dtype and device of a float ``t`` even for schedules with no other constant.
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    @property
    def t_min(self) -> float:
        """Smallest valid time."""
        return self._t_min

    @property
    def t_max(self) -> float:
        """Largest valid time."""
        return self._t_max

    def extra_repr(self) -> str:
        return f"t_min={self.t_min:g}, t_max={self.t_max:g}"

    # ----------------------------------------------------------------------------------------- time
    def as_time(
        self,
        t: TimeLike,
        *,
        check: bool = True,
        name: str = "t",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """``t`` as a floating tensor, range-checked.

        A float becomes a tensor of ``dtype`` (default: the buffers' dtype) on ``device``, so that a float64
        computation never sees a float32-rounded time.

        :param t: a float or a tensor of times.
        :param bool check: raise ``ValueError`` if a time lies outside ``[t_min, t_max]`` or is NaN.
        :param str name: the argument name used in the error message.
        :param dtype: dtype for a float or integer ``t``.
        :param device: device for a float ``t``.
        """
        dtype = dtype or self._anchor.dtype
        if isinstance(t, Tensor):
            if not t.is_floating_point():
                t = t.to(dtype)
        elif isinstance(t, (float, int)) and not isinstance(t, bool):
            t = torch.tensor(
                float(t), dtype=dtype, device=device if device is not None else self._anchor.device
            )
        else:
            raise TypeError(f"{name} must be a float or a tensor; got {type(t).__name__}")
        if check:
            self.check_time(t, name)
        return t

    def check_time(self, t: Tensor, name: str = "t") -> None:
        """Raise ``ValueError`` naming ``name`` if any time is NaN or outside ``[t_min, t_max]``."""
        if under_functorch(t) or t.numel() == 0 or times_checked():
            return
        bad = torch.isnan(t) | (t < self.t_min) | (t > self.t_max)
        if bool(bad.any()):
            raise ValueError(
                f"{name} must lie in [t_min, t_max] = [{self.t_min:g}, {self.t_max:g}] for "
                f"{type(self).__name__}; got {int(bad.sum())} value(s) outside it "
                f"(min {float(t.min()):g}, max {float(t.max()):g}; NaN counts as outside)"
            )

    # --------------------------------------------------------------------------- to be implemented
    def log_alpha(self, t: TimeLike) -> Tensor:
        r""":math:`\log\alpha(t)`."""
        raise NotImplementedError

    def log_sigma2(self, t: TimeLike) -> Tensor:
        r""":math:`\log\sigma^2(t)` (:math:`-\infty` where the schedule is noise-free)."""
        raise NotImplementedError

    def f(self, t: TimeLike) -> Tensor:
        r"""Drift coefficient :math:`f(t) = d\log\alpha/dt`."""
        raise NotImplementedError

    def g2(self, t: TimeLike) -> Tensor:
        r"""Squared diffusion coefficient :math:`g^2(t) = d\sigma^2/dt - 2f\sigma^2`."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------- derived
    def alpha(self, t: TimeLike) -> Tensor:
        r"""Signal scale :math:`\alpha(t)`."""
        return self.log_alpha(t).exp()

    def sigma(self, t: TimeLike) -> Tensor:
        r"""Noise scale :math:`\sigma(t)`."""
        return (0.5 * self.log_sigma2(t)).exp()

    def log_snr(self, t: TimeLike) -> Tensor:
        r"""Log signal-to-noise ratio :math:`\log(\alpha^2/\sigma^2)`, decreasing in ``t``."""
        t = self.as_time(t)
        return 2.0 * self.log_alpha(t) - self.log_sigma2(t)

    def snr(self, t: TimeLike) -> Tensor:
        r"""Signal-to-noise ratio :math:`\alpha^2/\sigma^2` (the Hopfield inverse temperature)."""
        return self.log_snr(t).exp()

    def t_of_log_snr(self, log_snr: TimeLike) -> Tensor:
        """The time at which :meth:`log_snr` equals ``log_snr`` (bisection; subclasses override it).

        :raises ValueError: if the value is not reached on ``[t_min, t_max]``.
        """
        target = self.as_time(log_snr, check=False, name="log_snr")
        lo = torch.full_like(target, self.t_min)
        hi = torch.full_like(target, self.t_max)
        for _ in range(200 if target.dtype == torch.float64 else 100):
            mid = 0.5 * (lo + hi)
            above = self.log_snr(mid) > target  # log-SNR decreases in t: the root lies right of mid
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        t = 0.5 * (lo + hi)
        self._check_reached(target, t)
        return t

    def _check_reached(self, log_snr: Tensor, t: Tensor) -> None:
        if under_functorch(log_snr):
            return
        l_lo, l_hi = self.log_snr(self.t_max), self.log_snr(self.t_min)
        bad = torch.isnan(log_snr) | (log_snr < l_lo) | (log_snr > l_hi)
        if bool(bad.any()):
            raise ValueError(
                f"log_snr must lie in [{float(l_lo):g}, {float(l_hi):g}], the range of {type(self).__name__} "
                f"on [t_min, t_max]; got {int(bad.sum())} value(s) outside it"
            )

    def _clamp_time(self, t: Tensor) -> Tensor:
        # Closed-form inverses can overshoot the range by a few ulps; the range check is done on log_snr.
        return t.clamp(self.t_min, self.t_max)

    def _const(self, name: str, like: Tensor) -> Tensor:
        return getattr(self, name).to(dtype=like.dtype, device=like.device)


def _constant(value: float) -> Tensor:
    # Constants are kept in float64 whatever the default dtype, so that a float64 computation never sees a
    # float32-rounded beta; every method casts them to the dtype of ``t`` (``.float()`` converts them).
    return torch.tensor(float(value), dtype=torch.float64)


def _vp_log_sigma2(log_alpha: Tensor) -> Tensor:
    # sigma^2 = 1 - alpha^2 = -expm1(2 log alpha), accurate as alpha -> 1.
    return torch.log(-torch.expm1(2.0 * log_alpha))


class VPLinear(Schedule):
    r"""Variance-preserving schedule with a linear :math:`\beta(t) = \beta_0 + t(\beta_1 - \beta_0)`.

    .. math::

        \alpha(t) = \exp\!\big(-\tfrac14 t^2 (\beta_1 - \beta_0) - \tfrac12 t \beta_0\big), \quad
        \sigma = \sqrt{1 - \alpha^2}, \quad f = -\beta(t)/2, \quad g^2 = \beta(t).

    :param float beta_min: :math:`\beta_0`.
    :param float beta_max: :math:`\beta_1`.

    Example::

        >>> schedule = VPLinear()
        >>> schedule.alpha(0.5) ** 2 + schedule.sigma(0.5) ** 2
        tensor(1.)

    References: Song et al., arXiv:2011.13456.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        super().__init__(0.0, 1.0)
        if not (0.0 <= beta_min and beta_min <= beta_max and beta_max > 0 and math.isfinite(beta_max)):
            raise ValueError(f"need 0 <= beta_min <= beta_max, beta_max > 0; got {beta_min}, {beta_max}")
        self.register_buffer("beta_min", _constant(beta_min))
        self.register_buffer("beta_max", _constant(beta_max))

    def beta(self, t: TimeLike) -> Tensor:
        r""":math:`\beta(t) = \beta_0 + t(\beta_1 - \beta_0)`."""
        t = self.as_time(t)
        b0, b1 = self._const("beta_min", t), self._const("beta_max", t)
        return b0 + t * (b1 - b0)

    def log_alpha(self, t: TimeLike) -> Tensor:
        t = self.as_time(t)
        b0, b1 = self._const("beta_min", t), self._const("beta_max", t)
        return -0.25 * t**2 * (b1 - b0) - 0.5 * t * b0

    def log_sigma2(self, t: TimeLike) -> Tensor:
        return _vp_log_sigma2(self.log_alpha(t))

    def f(self, t: TimeLike) -> Tensor:
        return -0.5 * self.beta(t)

    def g2(self, t: TimeLike) -> Tensor:
        return self.beta(t)

    def t_of_log_snr(self, log_snr: TimeLike) -> Tensor:
        l = self.as_time(log_snr, check=False, name="log_snr")
        self._check_reached(l, l)
        b0, b1 = self._const("beta_min", l), self._const("beta_max", l)
        # alpha^2 = sigmoid(l): (b1-b0) t^2 / 2 + b0 t = c with c = softplus(-l) >= 0;
        # the root in the cancellation-free form 2c / (b0 + sqrt(b0^2 + 2 (b1-b0) c)).
        c = torch.nn.functional.softplus(-l)
        return self._clamp_time(2.0 * c / (b0 + torch.sqrt(b0**2 + 2.0 * (b1 - b0) * c)))

    def extra_repr(self) -> str:
        return f"beta_min={float(self.beta_min):g}, beta_max={float(self.beta_max):g}"


def ddpm_index_to_t(index: int | Tensor, num_steps: int = 1000) -> Tensor:
    r"""Time of DDPM code's 0-based step ``j``: :math:`t = (j + 1)/K` (generative step :math:`K-1-j`)."""
    index = torch.as_tensor(index)
    if not under_functorch(index) and bool(((index < 0) | (index >= num_steps)).any()):
        raise ValueError(f"index must lie in [0, {num_steps - 1}]; got {index.tolist()}")
    return (index.to(torch.get_default_dtype()) + 1.0) / num_steps


def t_to_ddpm_index(t: float | Tensor, num_steps: int = 1000) -> Tensor:
    """Inverse of :func:`ddpm_index_to_t`, rounded to the nearest step (a ``long`` tensor)."""
    t = torch.as_tensor(t)
    index = torch.round(t * num_steps - 1.0).long()
    if not under_functorch(index) and bool(((index < 0) | (index >= num_steps)).any()):
        raise ValueError(
            f"t must lie in [1/K, 1] = [{1 / num_steps:g}, 1] to map to a DDPM step; got {t.tolist()}"
        )
    return index


class DDPM(Schedule):
    r"""The discrete DDPM schedule of Ho et al. in continuous time.

    With :math:`\beta_i` = ``linspace(beta_start, beta_end, K)``, :math:`\bar\alpha(k/K) = \prod_{i \le k}
    (1 - \beta_i)` at the knots and :math:`\log\bar\alpha` linear between them;
    :math:`\alpha = \sqrt{\bar\alpha}`, :math:`\sigma = \sqrt{1-\bar\alpha}`. DDPM code's 0-based step ``j``
    sits at :math:`t = (j+1)/K`
    (:meth:`ddpm_index_to_t`). Since :math:`K\beta_j \approx \beta(t)`, this is close to :class:`VPLinear`.

    :param int num_steps: :math:`K`.
    :param float beta_start: first :math:`\beta`.
    :param float beta_end: last :math:`\beta`.

    Example::

        >>> schedule = DDPM()
        >>> round(float(schedule.alpha(schedule.ddpm_index_to_t(0)) ** 2), 6)  # 1 - beta_0
        0.9999

    References: Ho et al., arXiv:2006.11239.
    """

    def __init__(self, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> None:
        super().__init__(0.0, 1.0)
        if int(num_steps) != num_steps or num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer; got {num_steps}")
        if not (0.0 < beta_start <= beta_end < 1.0):
            raise ValueError(f"need 0 < beta_start <= beta_end < 1; got {beta_start}, {beta_end}")
        self.num_steps = int(num_steps)
        betas = torch.linspace(beta_start, beta_end, self.num_steps, dtype=torch.float64)
        knots = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(torch.log1p(-betas), 0)])
        self.register_buffer("betas", betas)
        #: log alpha_bar at t = k/K, k = 0..K (length K + 1, first entry 0).
        self.register_buffer("log_alpha_bar_knots", knots)

    @property
    def alphas_cumprod(self) -> Tensor:
        r""":math:`\bar\alpha` at DDPM code's steps :math:`j = 0..K-1`."""
        return self.log_alpha_bar_knots[1:].exp()

    def ddpm_index_to_t(self, index: int | Tensor) -> Tensor:
        """:math:`t = (j+1)/K` of DDPM code's 0-based step ``j``, in this schedule's dtype."""
        return ddpm_index_to_t(index, self.num_steps).to(self._anchor.dtype)

    def t_to_ddpm_index(self, t: TimeLike) -> Tensor:
        """Nearest DDPM step ``j`` of time ``t`` (inverse of :meth:`ddpm_index_to_t`)."""
        return t_to_ddpm_index(self.as_time(t), self.num_steps)

    def _segment(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # (log alpha_bar at the segment's left knot, the segment's log(1 - beta), position in the segment)
        u = t * self.num_steps
        k = torch.floor(u).long().clamp(0, self.num_steps - 1)
        knots = self._const("log_alpha_bar_knots", t)
        log1m_betas = torch.log1p(-self._const("betas", t))
        return knots[k], log1m_betas[k], u - k.to(t.dtype)

    def log_alpha(self, t: TimeLike) -> Tensor:
        t = self.as_time(t)
        left, step, frac = self._segment(t)
        return 0.5 * (left + frac * step)

    def log_sigma2(self, t: TimeLike) -> Tensor:
        return _vp_log_sigma2(self.log_alpha(t))

    def f(self, t: TimeLike) -> Tensor:
        # log alpha_bar is piecewise linear; at a knot the right-hand segment's slope is used.
        t = self.as_time(t)
        _, step, _ = self._segment(t)
        return 0.5 * self.num_steps * step

    def g2(self, t: TimeLike) -> Tensor:
        # For any VP schedule sigma^2 = 1 - alpha^2, so g2 = d sigma^2/dt - 2 f sigma^2 = -2 f.
        return -2.0 * self.f(t)

    def t_of_log_snr(self, log_snr: TimeLike) -> Tensor:
        l = self.as_time(log_snr, check=False, name="log_snr")
        self._check_reached(l, l)
        knots = self._const("log_alpha_bar_knots", l)
        target = torch.nn.functional.logsigmoid(l)  # log alpha_bar
        # knots decrease; search the increasing -knots for -target.
        idx = torch.searchsorted(-knots, (-target).contiguous().reshape(-1)).reshape(target.shape)
        k = (idx - 1).clamp(0, self.num_steps - 1)
        lo, hi = knots[k], knots[k + 1]
        frac = (target - lo) / (hi - lo)
        return self._clamp_time((k.to(l.dtype) + frac) / self.num_steps)

    def extra_repr(self) -> str:
        beta_start, beta_end = float(self.betas[0]), float(self.betas[-1])
        return f"num_steps={self.num_steps}, beta_start={beta_start:g}, beta_end={beta_end:g}"


class Cosine(Schedule):
    r"""The cosine schedule of Nichol & Dhariwal.

    .. math::

        \alpha(t) = \frac{\cos(\tfrac\pi2 \tfrac{t+s}{1+s})}{\cos(\tfrac\pi2 \tfrac{s}{1+s})}, \qquad
        \sigma = \sqrt{1-\alpha^2}, \qquad f = -\frac{\pi}{2(1+s)}\tan\!\big(\tfrac\pi2 \tfrac{t+s}{1+s}\big).

    ``t_max`` defaults to :math:`1 - 10^{-3}` since :math:`\alpha(1) = 0`.

    :param float s: offset :math:`s`.
    :param float t_max: largest valid time (< 1).

    Example::

        >>> float(Cosine().alpha(0.0))
        1.0

    References: Nichol & Dhariwal, arXiv:2102.09672.
    """

    def __init__(self, s: float = 0.008, t_max: float = 1.0 - 1e-3) -> None:
        if not (0.0 < t_max < 1.0):
            raise ValueError(f"t_max must lie in (0, 1) since alpha(1) = 0; got {t_max}")
        if not s > 0:
            raise ValueError(f"s must be positive; got {s}")
        super().__init__(0.0, t_max)
        self.register_buffer("s", _constant(s))

    def _phase(self, t: Tensor) -> Tensor:
        s = self._const("s", t)
        return 0.5 * math.pi * (t + s) / (1.0 + s)

    def log_alpha(self, t: TimeLike) -> Tensor:
        t = self.as_time(t)
        return torch.log(torch.cos(self._phase(t)) / torch.cos(self._phase(torch.zeros_like(t))))

    def log_sigma2(self, t: TimeLike) -> Tensor:
        return _vp_log_sigma2(self.log_alpha(t))

    def f(self, t: TimeLike) -> Tensor:
        t = self.as_time(t)
        s = self._const("s", t)
        return -0.5 * math.pi / (1.0 + s) * torch.tan(self._phase(t))

    def g2(self, t: TimeLike) -> Tensor:
        return -2.0 * self.f(t)

    def t_of_log_snr(self, log_snr: TimeLike) -> Tensor:
        l = self.as_time(log_snr, check=False, name="log_snr")
        self._check_reached(l, l)
        s = self._const("s", l)
        alpha = torch.sigmoid(l).sqrt()
        phase = torch.acos(alpha * torch.cos(self._phase(torch.zeros_like(l))))
        return self._clamp_time(phase * 2.0 * (1.0 + s) / math.pi - s)

    def extra_repr(self) -> str:
        return f"s={float(self.s):g}, t_max={self.t_max:g}"


class VEGeometric(Schedule):
    r"""Variance-exploding schedule, :math:`\sigma(t) = \sigma_{min}(\sigma_{max}/\sigma_{min})^t`.

    :math:`\alpha = 1`, :math:`f = 0` and :math:`g^2 = 2\sigma^2\log(\sigma_{max}/\sigma_{min})`.

    :param float sigma_min: :math:`\sigma(0)`.
    :param float sigma_max: :math:`\sigma(1)`.

    Example::

        >>> round(float(VEGeometric().sigma(1.0)), 3)
        50.0

    References: Song et al., arXiv:2011.13456.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0) -> None:
        super().__init__(0.0, 1.0)
        if not (0.0 < sigma_min < sigma_max and math.isfinite(sigma_max)):
            raise ValueError(f"need 0 < sigma_min < sigma_max; got {sigma_min}, {sigma_max}")
        self.register_buffer("sigma_min", _constant(sigma_min))
        self.register_buffer("sigma_max", _constant(sigma_max))

    def _log_ratio(self, like: Tensor) -> Tensor:
        return torch.log(self._const("sigma_max", like) / self._const("sigma_min", like))

    def log_alpha(self, t: TimeLike) -> Tensor:
        return torch.zeros_like(self.as_time(t))

    def log_sigma2(self, t: TimeLike) -> Tensor:
        t = self.as_time(t)
        return 2.0 * (torch.log(self._const("sigma_min", t)) + t * self._log_ratio(t))

    def f(self, t: TimeLike) -> Tensor:
        return torch.zeros_like(self.as_time(t))

    def g2(self, t: TimeLike) -> Tensor:
        t = self.as_time(t)
        return 2.0 * self._log_ratio(t) * self.log_sigma2(t).exp()

    def t_of_log_snr(self, log_snr: TimeLike) -> Tensor:
        l = self.as_time(log_snr, check=False, name="log_snr")
        self._check_reached(l, l)
        return self._clamp_time((-0.5 * l - torch.log(self._const("sigma_min", l))) / self._log_ratio(l))

    def extra_repr(self) -> str:
        return f"sigma_min={float(self.sigma_min):g}, sigma_max={float(self.sigma_max):g}"


class VEVariance(Schedule):
    r"""Variance-exploding schedule whose time is the noise variance, :math:`\sigma^2 = c\,t`.

    This is the "time = noise variance" convention of the theory papers; :math:`\alpha = 1`, :math:`f = 0`
    and :math:`g^2 = c`.

    :param float c: variance per unit time.
    :param float t_max: largest valid time (the variance :math:`c\,t_{max}` of the prior).

    Example::

        >>> float(VEVariance().sigma(4.0))
        2.0

    References: Ambrogioni, arXiv:2309.17290.
    """

    def __init__(self, c: float = 1.0, t_max: float = 100.0) -> None:
        super().__init__(0.0, t_max)
        if not (c > 0 and math.isfinite(c)):
            raise ValueError(f"c must be positive and finite; got {c}")
        self.register_buffer("c", _constant(c))

    def log_alpha(self, t: TimeLike) -> Tensor:
        return torch.zeros_like(self.as_time(t))

    def log_sigma2(self, t: TimeLike) -> Tensor:
        t = self.as_time(t)
        return torch.log(self._const("c", t) * t)

    def f(self, t: TimeLike) -> Tensor:
        return torch.zeros_like(self.as_time(t))

    def g2(self, t: TimeLike) -> Tensor:
        t = self.as_time(t)
        return self._const("c", t).expand_as(t).clone()

    def t_of_log_snr(self, log_snr: TimeLike) -> Tensor:
        l = self.as_time(log_snr, check=False, name="log_snr")
        self._check_reached(l, l)
        return self._clamp_time(torch.exp(-l) / self._const("c", l))

    def extra_repr(self) -> str:
        return f"c={float(self.c):g}, t_max={self.t_max:g}"


# ------------------------------------------------------------------------------------ parametrisations
def broadcast_time(
    schedule: Schedule, x: Tensor, t: TimeLike, *, name: str = "t", expand: bool = False
) -> tuple[Tensor, Tensor]:
    """Range-check ``t`` and broadcast it against ``x.shape[:-1]``; returns ``(x, t)``.

    ``t`` takes ``x``'s dtype and device, and ``x`` is expanded (not copied) to the common batch shape.
    ``t`` keeps its own shape (it broadcasts against the batch), so that schedule coefficients of a scalar
    time are computed once rather than once per sample; ``expand=True`` expands it to the batch shape too
    (what a network taking one time per sample needs).
    """
    t = schedule.as_time(t, name=name, dtype=x.dtype, device=x.device)
    t = t.to(dtype=x.dtype, device=x.device)
    try:
        batch = torch.broadcast_shapes(t.shape, x.shape[:-1])
    except RuntimeError:
        raise ValueError(
            f"{name} of shape {tuple(t.shape)} does not broadcast against the batch shape "
            f"{tuple(x.shape[:-1])} of x (shape {tuple(x.shape)}); pass a float, a tensor of shape "
            "x.shape[:-1], or one that broadcasts against it"
        ) from None
    return x.expand(*batch, x.shape[-1]), (t.expand(batch) if expand else t)


def _nonzero(value: Tensor, what: str, src: str, dst: str, t: Tensor) -> Tensor:
    if not under_functorch(value) and bool((value == 0).any()):
        raise ValueError(
            f"cannot convert {src} to {dst}: {what}(t) = 0 at t = {t[value == 0].unique().tolist()[:5]}; "
            f"choose t where {what} > 0 (for VP schedules sigma(0) = 0)"
        )
    return value


def convert(out: Tensor, x: Tensor, t: TimeLike, schedule: Schedule, src: str, dst: str) -> Tensor:
    r"""Convert a network output between the ``"eps"``, ``"x0"``, ``"v"`` and ``"score"`` parametrisations.

    With :math:`v = \alpha\varepsilon - \sigma x_0` (Salimans & Ho):

    .. math::

        \hat x_0 = \frac{x - \sigma\hat\varepsilon}{\alpha}, \quad s = -\frac{\hat\varepsilon}{\sigma}, \quad
        \hat\varepsilon = \frac{x - \alpha\hat x_0}{\sigma}, \quad
        \hat x_0 = \frac{\alpha x - \sigma\hat v}{\alpha^2+\sigma^2}, \quad
        \hat\varepsilon = \frac{\sigma x + \alpha\hat v}{\alpha^2+\sigma^2}, \quad
        \hat x_0 = \frac{x + \sigma^2 s}{\alpha}.

    :param Tensor out: the network output, shape ``[..., d]``.
    :param Tensor x: the noisy input :math:`x_t`, shape ``[..., d]``.
    :param t: time, a float or a tensor broadcasting against ``x.shape[:-1]``.
    :param Schedule schedule: the noise schedule.
    :param str src: parametrisation of ``out``.
    :param str dst: wanted parametrisation.
    :raises ValueError: when a division by :math:`\alpha(t) = 0` or :math:`\sigma(t) = 0` would be needed.

    Example::

        >>> schedule = VPLinear()
        >>> x, eps = torch.randn(4, 2), torch.randn(4, 2)
        >>> score = convert(eps, x, 0.5, schedule, "eps", "score")  # -eps / sigma

    References: Salimans & Ho, arXiv:2202.00512.
    """
    for name, value in (("src", src), ("dst", dst)):
        if value not in PARAMETRISATIONS:
            raise ValueError(f"{name} must be one of {PARAMETRISATIONS}; got {value!r}")
    if out.shape[-1:] != x.shape[-1:]:
        raise ValueError(f"out must have the shape of x, [..., {x.shape[-1]}]; got {tuple(out.shape)}")
    if src == dst:
        return out
    x, t = broadcast_time(schedule, x, t)
    with checked_times():
        alpha, sigma = schedule.alpha(t)[..., None], schedule.sigma(t)[..., None]

    def need_alpha() -> Tensor:
        return _nonzero(alpha, "alpha", src, dst, t[..., None].expand_as(alpha))

    def need_sigma() -> Tensor:
        return _nonzero(sigma, "sigma", src, dst, t[..., None].expand_as(sigma))

    # Each branch uses only the divisions the pair (src, dst) needs.
    if dst == "score":
        if src == "eps":
            return -out / need_sigma()
        if src == "x0":
            return (alpha * out - x) / need_sigma() ** 2
        eps = (sigma * x + alpha * out) / (alpha**2 + sigma**2)  # src == "v"
        return -eps / need_sigma()
    if dst == "eps":
        if src == "score":
            return -sigma * out
        if src == "x0":
            return (x - alpha * out) / need_sigma()
        return (sigma * x + alpha * out) / (alpha**2 + sigma**2)
    if dst == "x0":
        if src == "score":
            return (x + sigma**2 * out) / need_alpha()
        if src == "eps":
            return (x - sigma * out) / need_alpha()
        return (alpha * x - sigma * out) / (alpha**2 + sigma**2)
    # dst == "v" = alpha eps - sigma x0
    if src == "eps":
        return ((alpha**2 + sigma**2) * out - sigma * x) / need_alpha()
    if src == "x0":
        return (alpha * x - (alpha**2 + sigma**2) * out) / need_sigma()
    eps = -sigma * out  # src == "score"
    return ((alpha**2 + sigma**2) * eps - sigma * x) / need_alpha()


class ParametrisedScore(nn.Module):
    r"""A network ``net(x, t)`` trained in one parametrisation, readable in all four.

    ``net`` is called with ``x`` of shape ``[..., d]`` and ``t`` a tensor of shape ``x.shape[:-1]`` (already
    broadcast, in ``x``'s dtype and on its device) and returns ``[..., d]`` in the parametrisation ``param``.

    :param net: the network (an :class:`~torch.nn.Module` is registered as a submodule).
    :param Schedule schedule: the noise schedule it was trained with.
    :param str param: one of ``"eps"``, ``"x0"``, ``"v"``, ``"score"``.

    Example::

        >>> net = lambda x, t: torch.zeros_like(x)  # an "eps" network that predicts no noise
        >>> model = ParametrisedScore(net, VPLinear(), "eps")
        >>> model.score(torch.randn(3, 2), 0.5).abs().max()
        tensor(0.)

    References: Salimans & Ho, arXiv:2202.00512.
    """

    def __init__(self, net: Callable[[Tensor, Tensor], Tensor], schedule: Schedule, param: str) -> None:
        super().__init__()
        if param not in PARAMETRISATIONS:
            raise ValueError(f"param must be one of {PARAMETRISATIONS}; got {param!r}")
        if not callable(net):
            raise TypeError(f"net must be callable as net(x, t); got {type(net).__name__}")
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a Schedule; got {type(schedule).__name__}")
        self.net = net
        self.schedule = schedule
        self.param = param

    def output(self, x: Tensor, t: TimeLike) -> Tensor:
        """The raw network output (in ``self.param``)."""
        if not isinstance(x, Tensor) or x.dim() == 0:
            raise TypeError(f"x must be a tensor of shape [..., d]; got {type(x).__name__}")
        x, t = broadcast_time(self.schedule, x, t, expand=True)
        out = self.net(x, t)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            raise ValueError(
                f"net(x, t) must return a tensor of shape {tuple(x.shape)} (the shape of x); got "
                f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}"
            )
        return out

    def as_param(self, x: Tensor, t: TimeLike, dst: str) -> Tensor:
        """The network output converted to ``dst``."""
        return convert(self.output(x, t), x, t, self.schedule, self.param, dst)

    def score(self, x: Tensor, t: TimeLike) -> Tensor:
        r"""Score :math:`\nabla_x \log p_t(x)`."""
        return self.as_param(x, t, "score")

    def eps(self, x: Tensor, t: TimeLike) -> Tensor:
        r"""Noise prediction :math:`\hat\varepsilon`."""
        return self.as_param(x, t, "eps")

    def x0(self, x: Tensor, t: TimeLike) -> Tensor:
        r"""Denoiser :math:`\hat x_0 = E[x_0 \mid x_t = x]`."""
        return self.as_param(x, t, "x0")

    def v(self, x: Tensor, t: TimeLike) -> Tensor:
        r"""Velocity :math:`\hat v = \alpha\hat\varepsilon - \sigma\hat x_0`."""
        return self.as_param(x, t, "v")

    def denoise(self, x: Tensor, t: TimeLike) -> Tensor:
        """Alias of :meth:`x0`, the name the energies use."""
        return self.x0(x, t)

    def forward(self, x: Tensor, t: TimeLike) -> Tensor:
        """The score."""
        return self.score(x, t)

    def extra_repr(self) -> str:
        return f"param={self.param!r}"
