"""Scores of coupling posteriors against ground truth (design note hybrid_vi.md §4.2), pooled over data sets.

All scores use the off-diagonal entries only.  ``C[i, j]`` is the arrow ``j -> i``.

- ``auc``: ROC-AUC of edge detection, scored by ``max(P(C > 0), P(C < 0))``; positives are the true edges
  (``C != 0`` for sparse truths, ``|C| > 0.15`` for prior truths, where no coupling is exactly 0);
- ``wrong_sign``: share of true edges with ``|C| > 0.15`` whose 95% interval excludes 0 on the wrong side;
- ``reversed``: share of one-directional true pairs (``i -> j`` only) where ``j -> i`` is declared at 95%
  (sparse truths only);
- ``false_positive``: share of true zeros declared at 95% (sparse truths only);
- ``coverage90``: share of true couplings inside the central 90% interval (reported for every truth;
  the design gates it on prior truths);
- ``rmse``: root mean squared error of the posterior mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from pyro_ext.infer.networks import CouplingPosterior

__all__ = ["DatasetScore", "pool_scores", "roc_auc", "score_posterior"]

STRONG_EDGE = 0.15


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Mann-Whitney ROC-AUC (ties count one half); ``nan`` without both classes."""
    scores, labels = scores.double().reshape(-1), labels.bool().reshape(-1)
    positives, negatives = scores[labels], scores[~labels]
    if len(positives) == 0 or len(negatives) == 0:
        return math.nan
    greater = (positives[:, None] > negatives[None, :]).double().sum()
    ties = (positives[:, None] == negatives[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (len(positives) * len(negatives)))


@dataclass
class DatasetScore:
    """Per-data-set raw counts, so cells pool exactly (not averages of averages)."""

    method: str
    truth_kind: str
    detection_scores: list[float] = field(default_factory=list)
    edge_labels: list[bool] = field(default_factory=list)
    strong_edges: int = 0
    wrong_sign: int = 0
    one_way_pairs: int = 0
    reversed: int = 0
    zeros: int = 0
    false_positives: int = 0
    entries: int = 0
    covered90: int = 0
    squared_error: float = 0.0
    seconds: float = 0.0


def score_posterior(
    posterior: CouplingPosterior, truth: torch.Tensor, truth_kind: str, seconds: float = 0.0
) -> DatasetScore:
    """Counts of one fit against its true coupling ``[N, N]`` (``truth_kind``: ``"sparse"``, ``"prior"``,
    ``"mds"`` or ``"given"``; only exact-zero truths score reversals and false positives)."""
    n = posterior.num_nodes
    off = ~torch.eye(n, dtype=torch.bool)
    truth = truth.to(posterior.draws.dtype)
    p_positive = posterior.prob_positive()
    p_negative = (posterior.draws < 0).to(truth.dtype).mean(0)
    detection = torch.maximum(p_positive, p_negative)
    exact_zeros = truth_kind in ("sparse", "mds")
    edges = (truth != 0) if exact_zeros else (truth.abs() > STRONG_EDGE)
    sign = posterior.declared_sign(0.95)
    score = DatasetScore(posterior.method, truth_kind, seconds=seconds)
    score.detection_scores = detection[off].tolist()
    score.edge_labels = edges[off].tolist()
    strong = off & (truth.abs() > STRONG_EDGE)
    score.strong_edges = int(strong.sum())
    score.wrong_sign = int(((sign != 0) & (sign != truth.sign().long()) & strong).sum())
    if exact_zeros:
        present = truth != 0
        one_way = present.mT & ~present & off  # true i -> j (C[j, i] != 0) but not j -> i (C[i, j] == 0)
        score.one_way_pairs = int(one_way.sum())
        score.reversed = int(((sign != 0) & one_way).sum())
        zeros = off & ~present
        score.zeros = int(zeros.sum())
        score.false_positives = int(((sign != 0) & zeros).sum())
    score.entries = int(off.sum())
    score.covered90 = int((posterior.covers(truth, 0.9) & off).sum())
    score.squared_error = float(((posterior.mean - truth)[off] ** 2).sum())
    return score


def _ratio(numerator: int | float, denominator: int | float) -> float:
    return numerator / denominator if denominator else math.nan


def pool_scores(scores: Sequence[DatasetScore]) -> dict[str, float]:
    """Pooled metrics of a method over data sets (see the module docstring)."""
    detection = torch.tensor([s for score in scores for s in score.detection_scores])
    labels = torch.tensor([s for score in scores for s in score.edge_labels])
    total = lambda attribute: sum(getattr(score, attribute) for score in scores)  # noqa: E731
    return {
        "datasets": len(scores),
        "auc": roc_auc(detection, labels) if len(labels) else math.nan,
        "wrong_sign": _ratio(total("wrong_sign"), total("strong_edges")),
        "reversed": _ratio(total("reversed"), total("one_way_pairs")),
        "false_positive": _ratio(total("false_positives"), total("zeros")),
        "coverage90": _ratio(total("covered90"), total("entries")),
        "rmse": math.sqrt(_ratio(total("squared_error"), total("entries"))),
        "seconds": _ratio(total("seconds"), len(scores)),
    }
