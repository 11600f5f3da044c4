"""Acceptance check 13 of design note hybrid_vi.md: the baseline table at N = 5, T = 300.

``python -m benchmarks.hybrid_vi.baseline_table [--datasets 50] [--svi-steps 300] [--particles 4]``
(``--results FILE`` appends every fit as a JSON line and resumes from it.)

Fits naive, oracle, joint reverse-KL, rDCM and hybrid to ``"sparse"`` data sets (edge detection, wrong
signs, reversed edges) and to ``"prior"`` data sets (coverage of 90% intervals), prints the table and the
check's gates, which order the methods only:

- hybrid reversed-edge and wrong-sign rates <= those of naive, joint and rDCM (sparse truths);
- hybrid coverage90 on prior truths >= 0.8 and >= joint's and naive's;
- oracle AUC >= hybrid AUC - 0.01 (sparse truths).

Stage 1 of the hybrid is fitted once and shared by both cells.  Exit status 0 when every gate holds.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

from benchmarks.hybrid_vi.experiments import METHODS, CellConfig, format_table, run_cell

__all__ = ["gates", "main"]


def gates(sparse: dict[str, dict[str, float]], prior: dict[str, dict[str, float]]) -> list[tuple[str, bool]]:
    """The check's orderings as ``(description, holds)``; a ``nan`` rate (nothing to count) holds."""

    def at_most(a: float, b: float) -> bool:
        return math.isnan(a) or math.isnan(b) or a <= b + 1e-12

    out = []
    hybrid = sparse["hybrid"]
    for rival in ("naive", "joint", "rdcm"):
        for metric in ("reversed", "wrong_sign"):
            out.append(
                (
                    f"hybrid {metric} {hybrid[metric]:.3f} <= {rival} {sparse[rival][metric]:.3f}",
                    at_most(hybrid[metric], sparse[rival][metric]),
                )
            )
    cover = prior["hybrid"]["coverage90"]
    out.append((f"hybrid coverage90 (prior) {cover:.3f} >= 0.8", cover >= 0.8))
    for rival in ("joint", "naive"):
        out.append(
            (
                f"hybrid coverage90 (prior) {cover:.3f} >= {rival} {prior[rival]['coverage90']:.3f}",
                cover >= prior[rival]["coverage90"] - 1e-12,
            )
        )
    oracle_auc, hybrid_auc = sparse["oracle"]["auc"], hybrid["auc"]
    out.append(
        (
            f"oracle AUC {oracle_auc:.3f} >= hybrid AUC {hybrid_auc:.3f} - 0.01",
            oracle_auc >= hybrid_auc - 0.01,
        )
    )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.hybrid_vi.baseline_table", description=__doc__
    )
    parser.add_argument("--datasets", type=int, default=50, help="data sets per truth kind")
    parser.add_argument("--svi-steps", type=int, default=300)
    parser.add_argument("--particles", type=int, default=4, help="ELBO particles of every SVI fit")
    parser.add_argument("--simulations", type=int, default=40_000)
    parser.add_argument("--results", type=Path, default=None, help="JSON-lines file (resumes if it exists)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pooled = {}
    for truth in ("sparse", "prior"):
        config = CellConfig(
            5,
            300,
            truth,
            args.datasets,
            svi_steps=args.svi_steps,
            num_particles=args.particles,
            num_simulations=args.simulations,
            seed=args.seed,
        )
        pooled[truth] = run_cell(config, METHODS, results=args.results)
    rows = [(truth, method, metrics) for truth, cell in pooled.items() for method, metrics in cell.items()]
    print("\nCheck 13, N = 5, T = 300, D = 3 (reference delays), no HRF\n")
    print(format_table(rows))
    print()
    results = gates(pooled["sparse"], pooled["prior"])
    for description, holds in results:
        print(f"  [{'pass' if holds else 'FAIL'}] {description}")
    return 0 if all(holds for _, holds in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
