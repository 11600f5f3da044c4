"""Vectorised prior simulation for amortized inference and calibration.

:func:`simulate_prior` draws ``(latent, observed)`` tuples from a Pyro model's joint prior with one
:class:`~pyro.infer.Predictive` call per chunk on :func:`pyro.poutine.uncondition` of the model (without
``uncondition``, ``Predictive`` would return the observed data instead of simulating them), falls back
to a Python loop with a warning when the model does not broadcast over a leading plate, accepts a
custom ``simulator`` (e.g. one with rejection of unstable draws), and drops and counts draws with
non-finite values.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import Predictive

__all__ = ["SimulationResult", "fork_rng_from", "simulate_prior"]


@dataclass
class SimulationResult:
    """Simulated values ``{site: Tensor[num_kept, *site_shape]}`` and how many draws were dropped."""

    values: dict[str, torch.Tensor]
    num_dropped: int
    vectorized: bool

    @property
    def num_kept(self) -> int:
        return next(iter(self.values.values())).shape[0] if self.values else 0


class fork_rng_from:
    """Context manager: run the body on the global RNG re-seeded from ``generator`` and restore it after.

    Lets routines that only use the global RNG (Pyro's samplers) take a ``generator`` argument
    without disturbing the caller's random stream. With ``generator=None`` it does nothing.
    """

    def __init__(self, generator: torch.Generator | None) -> None:
        self.generator = generator
        self._fork = None

    def __enter__(self) -> None:
        if self.generator is None:
            return
        seed = int(torch.randint(2**62, (), generator=self.generator))
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        self._fork = torch.random.fork_rng(devices=devices)
        self._fork.__enter__()
        torch.manual_seed(seed)

    def __exit__(self, *exc: object) -> None:
        if self._fork is not None:
            self._fork.__exit__(*exc)
            self._fork = None


def _accepts_keyword(fn: Callable, name: str) -> bool:
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _site_shapes(model: Callable, sites: Sequence[str], args: tuple, kwargs: dict) -> dict[str, torch.Size]:
    with poutine.block():
        trace = poutine.trace(poutine.uncondition(model)).get_trace(*args, **kwargs)
    shapes = {}
    for name in sites:
        if name not in trace.nodes or trace.nodes[name]["type"] != "sample":
            raise ValueError(f"sites: {name!r} is not a sample site of the model")
        shapes[name] = trace.nodes[name]["value"].shape
    return shapes


def _check_chunk(chunk: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size], size: int, origin: str):
    out = {}
    for name, shape in shapes.items():
        if name not in chunk:
            raise ValueError(
                f"{origin} returned no values for site {name!r}; it must return every one of {list(shapes)}"
            )
        value = torch.as_tensor(chunk[name])
        if value.numel() != size * math.prod(shape):
            raise ValueError(
                f"{origin} returned shape {tuple(value.shape)} for site {name!r}; expected {(size, *shape)}"
            )
        out[name] = value.reshape(size, *shape)
    return out


def _vectorized_chunk(model, size, sites, args, kwargs):
    predictive = Predictive(
        poutine.uncondition(model), num_samples=size, return_sites=list(sites), parallel=True
    )
    return predictive(*args, **kwargs)


def _sequential_chunk(model, size, sites, args, kwargs):
    draws = {name: [] for name in sites}
    with torch.no_grad(), poutine.block():
        for _ in range(size):
            trace = poutine.trace(poutine.uncondition(model)).get_trace(*args, **kwargs)
            for name in sites:
                draws[name].append(trace.nodes[name]["value"])
    return {name: torch.stack(values) for name, values in draws.items()}


def simulate_prior(
    model: Callable,
    num_samples: int,
    *args,
    sites: Sequence[str],
    chunk_size: int = 4096,
    simulator: Callable | None = None,
    generator: torch.Generator | None = None,
    progress_bar: bool = False,
    **kwargs,
) -> SimulationResult:
    """Draw ``num_samples`` joint prior samples of ``sites`` (latent and observed alike).

    :param model: a Pyro model; its observed sites are simulated through ``poutine.uncondition``.
    :param int num_samples: number of draws requested (non-finite ones are then dropped).
    :param sites: the sites to return.
    :param int chunk_size: draws per vectorised call.
    :param simulator: optional ``simulator(n[, generator=...]) -> dict[str, Tensor[n, ...]]`` used instead
        of the model (it must return every site in ``sites``; ``generator`` is passed if it accepts one).
    :param generator: seeds the draws (the global RNG is left untouched); otherwise the global RNG is used.
    :param bool progress_bar: show a tqdm bar over chunks.
    :returns: the kept draws and the number dropped.

    Example::

        bank = simulate_prior(model, 10_000, sites=["d", "y"])
        bank.values["y"].shape  # (10000, 2)
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int; got {num_samples!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    sites = list(sites)
    shapes = _site_shapes(model, sites, args, kwargs)
    vectorized = True
    warned = False
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in sites}
    from tqdm.auto import tqdm

    bar = tqdm(total=num_samples, disable=not progress_bar, desc="simulating", leave=False)
    remaining = num_samples
    while remaining > 0:
        size = min(chunk_size, remaining)
        if simulator is not None:
            if _accepts_keyword(simulator, "generator"):
                raw = simulator(size, generator=generator)
            else:
                with fork_rng_from(generator):
                    raw = simulator(size)
            chunk = _check_chunk(raw, shapes, size, "simulator")
        else:
            chunk = None
            if vectorized:
                try:
                    with fork_rng_from(generator):
                        chunk = _check_chunk(
                            _vectorized_chunk(model, size, sites, args, kwargs), shapes, size, "Predictive"
                        )
                except (RuntimeError, ValueError, IndexError, NotImplementedError) as error:
                    vectorized = False
                    if not warned:
                        warnings.warn(
                            f"the model could not be simulated vectorised over a leading plate ({error}); "
                            "simulating one draw at a time in a Python loop, which is slow. Annotate batch "
                            "dimensions with pyro.plate or pass simulator=",
                            RuntimeWarning,
                            stacklevel=2,
                        )
                        warned = True
            if chunk is None:
                with fork_rng_from(generator):
                    chunk = _check_chunk(
                        _sequential_chunk(model, size, sites, args, kwargs), shapes, size, "model"
                    )
        for name in sites:
            chunks[name].append(chunk[name].detach())
        remaining -= size
        bar.update(size)
    bar.close()
    values = {name: torch.cat(parts) for name, parts in chunks.items()}
    finite = torch.ones(num_samples, dtype=torch.bool, device=next(iter(values.values())).device)
    for value in values.values():
        if value.is_floating_point() or value.is_complex():
            finite &= torch.isfinite(value.reshape(num_samples, -1)).all(-1)
    num_dropped = int((~finite).sum())
    if num_dropped:
        values = {name: value[finite] for name, value in values.items()}
    return SimulationResult(
        values=values, num_dropped=num_dropped, vectorized=vectorized and simulator is None
    )


def observed_site_names(model: Callable, *args, **kwargs) -> list[str]:
    """Names of the sites a model observes when called with these arguments (program order)."""
    with poutine.block():
        trace = poutine.trace(model).get_trace(*args, **kwargs)
    return [
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and site["is_observed"] and not pyro.poutine.util.site_is_subsample(site)
    ]
