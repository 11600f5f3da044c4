"""Calibration of posterior samplers: interval coverage and simulation-based calibration (SBC).

Everything here takes a *posterior sampler* ``fit_fn(observed) -> {site: Tensor[S, *site_shape]}``
(``observed`` is one data set, ``{observed site: Tensor}``), so ``HybridGuide`` and any baseline are
measured the same way:

- :func:`simulate_datasets` -- ground truth and data from the model's prior in one vectorised call;
- :func:`coverage` -- the share of true values inside central posterior intervals, with its binomial
  standard error;
- :func:`sbc_ranks` / :func:`sbc_uniformity` -- SBC ranks (Talts et al. 2018, arXiv:1804.06788) with random
  tie-breaking for discrete sites, and a chi-squared test of their uniformity.

Example::

    datasets = simulate_datasets(model, 50, y_template, generator=torch.Generator().manual_seed(0))
    result = coverage(lambda observed: my_sampler(observed["y"]), datasets, sites=["a"])
    result.coverage[0.9], result.standard_error[0.9]

References: Talts et al., arXiv:1804.06788 (SBC); Ambrogioni et al., arXiv:2406.02545 (the coverage
protocol of the hybrid-VI design note).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from pyro_ext.infer.simulation import observed_site_names, simulate_prior

__all__ = [
    "CoverageResult",
    "SBCResult",
    "SBCUniformity",
    "SimulatedDatasets",
    "coverage",
    "rank_statistics",
    "sbc_ranks",
    "sbc_uniformity",
    "simulate_datasets",
]


@dataclass
class SimulatedDatasets:
    """Prior draws: true latent values ``truth[site]`` and data ``observed[site]``, leading dim = data set."""

    truth: dict[str, torch.Tensor]
    observed: dict[str, torch.Tensor]
    num_dropped: int = 0

    def __len__(self) -> int:
        return next(iter(self.observed.values())).shape[0]

    def __getitem__(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return (
            {name: value[index] for name, value in self.truth.items()},
            {name: value[index] for name, value in self.observed.items()},
        )

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
        for index in range(len(self)):
            yield self[index]


def simulate_datasets(
    model: Callable,
    num_datasets: int,
    *args,
    observed_sites: Sequence[str] | None = None,
    latent_sites: Sequence[str] | None = None,
    simulator: Callable | None = None,
    generator: torch.Generator | None = None,
    **kwargs,
) -> SimulatedDatasets:
    """Simulate ``num_datasets`` (truth, data) pairs from the model's prior, vectorised.

    :param model: a Pyro model; called with ``*args, **kwargs`` (pass the data so that the observed sites
        are known, or name them with ``observed_sites``).
    :param int num_datasets: number of data sets.
    :param observed_sites: the data sites (default: those the model observes with these arguments).
    :param latent_sites: the latent sites to record (default: every other sample site).
    :param simulator: optional custom prior sampler (see :func:`~pyro_ext.infer.simulation.simulate_prior`).
    :param generator: seeds the draws.

    Example::

        datasets = simulate_datasets(model, 100, y_template, generator=torch.Generator().manual_seed(0))
        truth, observed = datasets[0]
    """
    import pyro.poutine as poutine

    if observed_sites is None:
        observed_sites = observed_site_names(model, *args, **kwargs)
        if not observed_sites:
            raise ValueError(
                "simulate_datasets: the model observes no site with these arguments; pass the data or "
                "observed_sites=[...]"
            )
    observed_sites = list(observed_sites)
    if latent_sites is None:
        with poutine.block():
            trace = poutine.trace(poutine.uncondition(model)).get_trace(*args, **kwargs)
        latent_sites = [
            name
            for name, site in trace.nodes.items()
            if site["type"] == "sample"
            and name not in observed_sites
            and not name.startswith("_")
            and type(site["fn"]).__name__ != "_Subsample"
        ]
    result = simulate_prior(
        model,
        num_datasets,
        *args,
        sites=list(latent_sites) + observed_sites,
        simulator=simulator,
        generator=generator,
        **kwargs,
    )
    return SimulatedDatasets(
        truth={name: result.values[name] for name in latent_sites},
        observed={name: result.values[name] for name in observed_sites},
        num_dropped=result.num_dropped,
    )


@dataclass
class CoverageResult:
    """Coverage of central intervals at each level, pooled over sites, elements and data sets.

    ``standard_error`` is the binomial one, sqrt(p (1 - p) / n), which treats the n covered/not-covered
    indicators as independent (elements of one data set are not, so it is a lower bound).
    """

    coverage: dict[float, float]
    standard_error: dict[float, float]
    mean_width: dict[float, float]
    per_site: dict[str, dict[float, float]]
    covered: dict[float, torch.Tensor] = field(repr=False)
    num_datasets: int = 0


def _central_interval(draws: torch.Tensor, level: float) -> tuple[torch.Tensor, torch.Tensor]:
    draws = draws.reshape(draws.shape[0], -1).to(torch.float64)
    probs = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64, device=draws.device)
    bounds = torch.quantile(draws, probs, dim=0)
    return bounds[0], bounds[1]


def _check_draws(draws: Mapping[str, torch.Tensor], sites: Sequence[str], truth: Mapping[str, torch.Tensor]):
    for name in sites:
        if name not in draws:
            raise ValueError(f"fit_fn returned no draws for site {name!r}; it returned {sorted(draws)}")
        value = draws[name]
        if value.shape[1:] != truth[name].shape:
            raise ValueError(
                f"fit_fn returned draws of shape {tuple(value.shape)} for site {name!r}; expected "
                f"[S, *{tuple(truth[name].shape)}]"
            )


def _element_masks(
    masks: Mapping[str, torch.Tensor] | None, sites: Sequence[str], datasets: SimulatedDatasets
) -> dict[str, torch.Tensor | None]:
    out: dict[str, torch.Tensor | None] = {name: None for name in sites}
    for name, mask in (masks or {}).items():
        if name not in out:
            raise ValueError(f"masks: {name!r} is not one of the scored sites {list(sites)}")
        mask = torch.as_tensor(mask, dtype=torch.bool)
        shape = datasets.truth[name].shape[1:]
        if mask.shape != shape:
            raise ValueError(
                f"masks[{name!r}] has shape {tuple(mask.shape)}; the site's shape is {tuple(shape)}"
            )
        if not mask.any():
            raise ValueError(f"masks[{name!r}] selects no element")
        out[name] = mask.reshape(-1)
    return out


def coverage(
    fit_fn: Callable[[dict[str, torch.Tensor]], Mapping[str, torch.Tensor]],
    datasets: SimulatedDatasets,
    sites: Sequence[str],
    levels: Sequence[float] = (0.5, 0.9, 0.95),
    progress_bar: bool = False,
    masks: Mapping[str, torch.Tensor] | None = None,
) -> CoverageResult:
    """Share of true values inside the sampler's central posterior intervals.

    :param fit_fn: ``fit_fn(observed) -> {site: Tensor[S, *site_shape]}`` posterior draws for one data set.
    :param SimulatedDatasets datasets: truth and data, e.g. from :func:`simulate_datasets`.
    :param sites: the latent sites scored (all their elements).
    :param levels: central interval probabilities.
    :param masks: optional boolean masks ``{site: Tensor[*site_shape]}`` selecting the elements scored
        (e.g. the off-diagonal entries of a coupling matrix whose diagonal is structurally zero).
    :returns: :class:`CoverageResult`.

    Example::

        def fit_fn(observed):
            guide.reset_conditional()
            ...  # stage 2 on observed["y"]
            return guide.sample_posterior(1000, observed["y"])

        coverage(fit_fn, datasets, sites=["coupling"], levels=(0.9,)).coverage[0.9]
    """
    levels = [float(level) for level in levels]
    if not all(0 < level < 1 for level in levels):
        raise ValueError(f"levels must lie in (0, 1); got {levels}")
    sites = list(sites)
    missing = [name for name in sites if name not in datasets.truth]
    if missing:
        raise ValueError(
            f"sites {missing} have no ground truth in datasets (it holds {sorted(datasets.truth)})"
        )
    selected = _element_masks(masks, sites, datasets)
    from tqdm.auto import tqdm

    covered: dict[float, list[torch.Tensor]] = {level: [] for level in levels}
    site_covered: dict[str, dict[float, list[torch.Tensor]]] = {
        name: {lv: [] for lv in levels} for name in sites
    }
    widths: dict[float, list[torch.Tensor]] = {level: [] for level in levels}
    for truth, observed in tqdm(datasets, total=len(datasets), disable=not progress_bar, desc="coverage"):
        draws = fit_fn(observed)
        _check_draws(draws, sites, truth)
        for level in levels:
            row, width = [], []
            for name in sites:
                lower, upper = _central_interval(draws[name], level)
                true = truth[name].reshape(-1).to(torch.float64)
                if selected[name] is not None:
                    lower, upper, true = lower[selected[name]], upper[selected[name]], true[selected[name]]
                inside = (lower <= true) & (true <= upper)
                site_covered[name][level].append(inside)
                row.append(inside)
                width.append(upper - lower)
            covered[level].append(torch.cat(row))
            widths[level].append(torch.cat(width))
    stacked = {level: torch.stack(rows) for level, rows in covered.items()}
    rates = {level: float(value.double().mean()) for level, value in stacked.items()}
    errors = {level: math.sqrt(max(p * (1 - p), 0.0) / stacked[level].numel()) for level, p in rates.items()}
    mean_width = {level: float(torch.cat(values).mean()) for level, values in widths.items()}
    per_site = {
        name: {level: float(torch.cat(values).double().mean()) for level, values in by_level.items()}
        for name, by_level in site_covered.items()
    }
    return CoverageResult(rates, errors, mean_width, per_site, stacked, len(datasets))


def rank_statistics(
    truth: torch.Tensor, draws: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """SBC ranks of ``truth [N, *shape]`` among ``draws [L, N, *shape]``: integers in ``0..L``, ``[N, E]``.

    rank = #{draws < truth} + U, with U uniform on ``0..#{draws == truth}`` (random tie-breaking, which keeps
    the ranks of a calibrated discrete posterior uniform).
    """
    num_draws, count = draws.shape[0], truth.shape[0]
    truth = truth.reshape(count, -1)
    draws = draws.reshape(num_draws, count, -1)
    less = (draws < truth).sum(0)
    ties = (draws == truth).sum(0)
    uniform = torch.rand(ties.shape, generator=generator, dtype=torch.float64).to(ties.device)
    return less + torch.floor(uniform * (ties + 1)).long()


def sbc_ranks(
    fit_fn: Callable[[dict[str, torch.Tensor]], Mapping[str, torch.Tensor]],
    datasets: SimulatedDatasets,
    sites: Sequence[str],
    num_posterior_samples: int = 99,
    generator: torch.Generator | None = None,
    progress_bar: bool = False,
    masks: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """SBC ranks ``{site: LongTensor[N, E]}`` in ``0..num_posterior_samples`` of each true value.

    ``masks`` selects elements as in :func:`coverage` (``E`` is then the number selected).

    Example::

        ranks = sbc_ranks(fit_fn, datasets, sites=["d"], num_posterior_samples=99)
        sbc_uniformity(ranks, 99).p_value

    References: Talts et al., arXiv:1804.06788.

    ``fit_fn`` must return at least ``num_posterior_samples`` draws (the first ones are used; they should be
    independent, e.g. thinned MCMC).
    """
    from tqdm.auto import tqdm

    sites = list(sites)
    selected = _element_masks(masks, sites, datasets)
    ranks: dict[str, list[torch.Tensor]] = {name: [] for name in sites}
    for truth, observed in tqdm(datasets, total=len(datasets), disable=not progress_bar, desc="sbc"):
        draws = fit_fn(observed)
        _check_draws(draws, sites, truth)
        for name in sites:
            value = draws[name]
            if value.shape[0] < num_posterior_samples:
                raise ValueError(
                    f"fit_fn returned {value.shape[0]} draws for site {name!r}; sbc_ranks needs "
                    f"num_posterior_samples={num_posterior_samples}"
                )
            rank = rank_statistics(
                truth[name].unsqueeze(0), value[:num_posterior_samples].unsqueeze(1), generator
            )[0]
            ranks[name].append(rank if selected[name] is None else rank[selected[name]])
    return {name: torch.stack(values) for name, values in ranks.items()}


@dataclass
class SBCUniformity:
    """Chi-squared test of uniform SBC ranks: statistic, degrees of freedom, p-value and the histogram."""

    statistic: float
    degrees_of_freedom: int
    p_value: float
    histogram: torch.Tensor
    num_bins: int


@dataclass
class SBCResult:
    """SBC ranks per site and the uniformity test of all of them pooled."""

    ranks: dict[str, torch.Tensor]
    uniformity: SBCUniformity

    @property
    def p_value(self) -> float:
        return self.uniformity.p_value


def _default_bins(num_values: int, count: int) -> int:
    """The most bins (<= 20) that split the rank values evenly with >= 5 expected counts each."""
    best = 1
    for bins in range(2, 21):
        if num_values % bins == 0 and count / bins >= 5:
            best = bins
    return best


def sbc_uniformity(
    ranks: Mapping[str, torch.Tensor] | torch.Tensor, num_posterior_samples: int, num_bins: int | None = None
) -> SBCUniformity:
    """Pearson chi-squared test that pooled ranks in ``0..num_posterior_samples`` are uniform.

    :param ranks: ranks from :func:`sbc_ranks` (a dict, pooled) or one tensor.
    :param int num_posterior_samples: L; ranks take the L + 1 values ``0..L``.
    :param int num_bins: histogram bins (default: the most, up to 20, that divide L + 1 evenly and keep at
        least 5 expected counts per bin).
    :returns: :class:`SBCUniformity`; the p-value is the chi-squared survival function with
        ``num_bins - 1`` degrees of freedom (``torch.special.gammaincc``).

    .. math::
        \\chi^2 = \\sum_{b=1}^{B} \\frac{(n_b - N / B)^2}{N / B}, \\qquad
        p = Q\\big(\\tfrac{B-1}{2}, \\tfrac{\\chi^2}{2}\\big)

    References: Talts et al., arXiv:1804.06788.
    """
    if isinstance(ranks, Mapping):
        pooled = torch.cat([value.reshape(-1) for value in ranks.values()])
    else:
        pooled = torch.as_tensor(ranks).reshape(-1)
    num_values = num_posterior_samples + 1
    if pooled.numel() == 0:
        raise ValueError("sbc_uniformity needs at least one rank")
    if (pooled < 0).any() or (pooled > num_posterior_samples).any():
        raise ValueError(f"ranks must lie in 0..{num_posterior_samples}")
    bins = num_bins or _default_bins(num_values, pooled.numel())
    if num_values % bins:
        raise ValueError(f"num_bins={bins} must divide the {num_values} rank values evenly")
    histogram = torch.bincount(pooled.long() // (num_values // bins), minlength=bins).to(torch.float64)
    expected = pooled.numel() / bins
    statistic = float(((histogram - expected) ** 2 / expected).sum())
    dof = bins - 1
    if dof == 0:
        p_value = 1.0
    else:
        p_value = float(
            torch.special.gammaincc(
                torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(statistic / 2, dtype=torch.float64)
            )
        )
    return SBCUniformity(statistic, dof, p_value, histogram, bins)
