"""Multi-node experiments of design note hybrid_vi.md §4.2: every baseline on simulated networks, scored.

One *cell* is (number of nodes N, series length T, truth kind, HRF or not); in each cell every method fits
every data set and :mod:`benchmarks.hybrid_vi.metrics` pools the scores.  Methods: ``naive``, ``oracle``,
``joint`` (reverse-KL over delays and couplings), ``rdcm`` (regression DCM) and ``hybrid`` (stage 1 fitted
once per network and shared by its data sets).  Fits are appended to a JSON-lines file as they finish, so
a long run can be stopped and resumed (``--results``).

``python -m benchmarks.hybrid_vi.experiments --nodes 5 --steps 300 --truth sparse prior --datasets 50``
runs the N = 5, T = 300 part of the grid; the full §4.2 grid (N in {5, 10}, T in {100, 300, 1000}, with and
without HRF, and ``mds`` data) is the product of these options and takes hours on a laptop.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pyro
import torch

from benchmarks.hybrid_vi.metrics import DatasetScore, pool_scores, score_posterior
from pyro_ext.infer.network_fits import build_hybrid_guide, fit_hybrid, fit_joint, fit_naive, fit_oracle
from pyro_ext.infer.networks import CouplingPosterior, DelayedLinearNetwork
from pyro_ext.infer.rdcm import fit_rdcm

__all__ = ["METHODS", "CellConfig", "format_table", "main", "run_cell"]

METHODS = ("naive", "oracle", "joint", "rdcm", "hybrid")

# stage 1 is amortized: one fit per network serves every cell (truth kind) and data set of that network
_STAGE_ONE: dict[tuple, object] = {}


@dataclass(frozen=True)
class CellConfig:
    """One cell of the grid and the effort spent on it."""

    num_nodes: int = 5
    num_steps: int = 300
    truth: str = "sparse"
    num_datasets: int = 50
    hrf: str | None = None
    max_delay: int = 3
    svi_steps: int = 300
    num_particles: int = 4
    num_simulations: int = 40_000
    num_conditional_samples: int = 16
    seed: int = 0

    @property
    def key(self) -> str:
        return (
            f"N{self.num_nodes}-T{self.num_steps}-{self.truth}-{self.hrf or 'nohrf'}-D{self.max_delay}"
            f"-s{self.svi_steps}-p{self.num_particles}-seed{self.seed}"
        )

    def network(self) -> DelayedLinearNetwork:
        return DelayedLinearNetwork(self.num_nodes, self.num_steps, max_delay=self.max_delay, hrf=self.hrf)


def fit_method(
    method: str,
    net: DelayedLinearNetwork,
    y: torch.Tensor,
    true_delays: torch.Tensor,
    guide_factory: Callable[[], object],
    svi_steps: int,
    num_particles: int = 4,
) -> CouplingPosterior:
    """One method's coupling posterior for one data set (``true_delays``: per-node, TR units)."""
    svi = {"num_steps": svi_steps, "num_particles": num_particles}
    if method == "naive":
        return fit_naive(net, y, **svi)
    if method == "oracle":
        # continuous ("mds") delays are rounded to the model's grid and clipped to its support
        delays = true_delays.round().long()
        if net.delay_mode == "reference":
            delays = (delays - delays[0] + net.max_delay).clamp(0, net.delay_max_value)[1:]
        return fit_oracle(net, y, delays.clamp(0, net.delay_max_value), **svi)
    if method == "joint":
        return fit_joint(net, y, guide="mvn", **svi)
    if method == "rdcm":
        return fit_rdcm(y, tr=net.tr, hrf=None if net.hrf_name == "none" else net.hrf_kernel)
    if method == "hybrid":
        return fit_hybrid(net, y, guide=guide_factory(), **svi)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def _load(path: Path | None) -> dict[tuple[str, int, str], DatasetScore]:
    done: dict[tuple[str, int, str], DatasetScore] = {}
    if path is not None and path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            score = DatasetScore(**record["score"])
            done[(record["cell"], record["dataset"], score.method)] = score
    return done


def run_cell(
    config: CellConfig,
    methods: Sequence[str] = METHODS,
    *,
    results: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, float]]:
    """Fit and score every method on ``config.num_datasets`` data sets: ``{method: pooled metrics}``."""
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    net = config.network()
    data = net.simulate(
        config.num_datasets, config.truth, generator=torch.Generator().manual_seed(config.seed)
    )
    done = _load(results)
    network_key = (
        config.num_nodes,
        config.num_steps,
        config.hrf,
        config.max_delay,
        config.num_simulations,
        config.seed,
    )

    def guide_factory():
        guide = _STAGE_ONE.get(network_key)
        if guide is None:
            start = time.perf_counter()
            small = net.num_delay_configurations <= 64
            guide = build_hybrid_guide(
                net,
                config.num_simulations,
                conditional_guide="per_support" if small else "per_sample",
                num_conditional_samples=config.num_conditional_samples,
                generator=torch.Generator().manual_seed(config.seed + 1),
            )
            _STAGE_ONE[network_key] = guide
            log(f"  [{config.key}] hybrid stage 1: {time.perf_counter() - start:.0f} s")
        return guide

    scores: dict[str, list[DatasetScore]] = {method: [] for method in methods}
    for index in range(config.num_datasets):
        for method in methods:
            if (config.key, index, method) in done:
                scores[method].append(done[(config.key, index, method)])
                continue
            pyro.set_rng_seed(config.seed * 100_003 + index)
            start = time.perf_counter()
            posterior = fit_method(
                method,
                net,
                data.y[index],
                data.delays[index],
                guide_factory,
                config.svi_steps,
                config.num_particles,
            )
            elapsed = time.perf_counter() - start
            score = score_posterior(posterior, data.coupling[index], config.truth, elapsed)
            score.method = method
            scores[method].append(score)
            if results is not None:
                with results.open("a") as handle:
                    record = {"cell": config.key, "dataset": index, "score": asdict(score)}
                    handle.write(json.dumps(record) + "\n")
            log(f"  [{config.key}] data set {index} {method}: {elapsed:.1f} s")
    return {method: pool_scores(values) for method, values in scores.items()}


def format_table(rows: Iterable[tuple[str, str, dict[str, float]]]) -> str:
    """Markdown table of ``(cell, method, pooled metrics)`` rows."""
    columns = ["auc", "wrong_sign", "reversed", "false_positive", "coverage90", "rmse", "seconds"]
    lines = [
        "| cell | method | n | " + " | ".join(columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for cell, method, metrics in rows:
        cells = [
            "–" if isinstance(metrics[c], float) and math.isnan(metrics[c]) else f"{metrics[c]:.3f}"
            for c in columns
        ]
        lines.append(f"| {cell} | {method} | {metrics['datasets']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hybrid_vi.experiments", description=__doc__)
    parser.add_argument("--nodes", type=int, nargs="+", default=[5])
    parser.add_argument("--steps", type=int, nargs="+", default=[300], help="series lengths T")
    parser.add_argument("--truth", nargs="+", default=["sparse", "prior"], choices=["sparse", "prior", "mds"])
    parser.add_argument("--hrf", nargs="+", default=["none"], choices=["none", "canonical"])
    parser.add_argument("--datasets", type=int, default=50)
    parser.add_argument("--svi-steps", type=int, default=300)
    parser.add_argument("--particles", type=int, default=4, help="ELBO particles of every SVI fit")
    parser.add_argument("--simulations", type=int, default=40_000)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--results", type=Path, default=None, help="JSON-lines file (resumes if it exists)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = []
    for n in args.nodes:
        for t_len in args.steps:
            for hrf in args.hrf:
                for truth in args.truth:
                    config = CellConfig(
                        n,
                        t_len,
                        truth,
                        args.datasets,
                        None if hrf == "none" else hrf,
                        svi_steps=args.svi_steps,
                        num_particles=args.particles,
                        num_simulations=args.simulations,
                        seed=args.seed,
                    )
                    pooled = run_cell(config, args.methods, results=args.results)
                    rows.extend((config.key, method, metrics) for method, metrics in pooled.items())
                    print(format_table(rows[-len(pooled) :]), flush=True)
    print("\n" + format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
