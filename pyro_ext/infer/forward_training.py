"""The training loop of stage 1: forward KL (negative log likelihood of simulated h) with early stopping.

Adam on minibatches of the simulation bank, the step size halved when the validation loss stalls,
Polyak (exponential moving) averaging of the weights over about one epoch, early stopping after
``patience`` epochs without improvement of the validation NLL, and the best averaged weights restored.
``online`` training draws a fresh batch of simulations for every step (the CSIS regime).

References: Ambrogioni et al., arXiv:1805.11542 (FAVI); Papamakarios & Murray 2016 (neural posterior
estimation).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from pyro_ext.infer.forward_stage import ForwardStage

__all__ = ["ForwardFitHistory", "train_forward_stage"]


@dataclass
class ForwardFitHistory:
    """What :meth:`HybridGuide.fit_forward` returns: per-epoch mean NLLs and bookkeeping."""

    train_nll: list[float] = field(default_factory=list)
    validation_nll: list[float] = field(default_factory=list)
    best_epoch: int = -1
    num_simulations: int = 0
    num_dropped: int = 0
    vectorized: bool = True

    @property
    def best_validation_nll(self) -> float:
        return self.validation_nll[self.best_epoch]


def train_forward_stage(
    stage: ForwardStage,
    features: torch.Tensor,
    values: Mapping[str, torch.Tensor],
    train_index: torch.Tensor,
    validation_index: torch.Tensor,
    history: ForwardFitHistory,
    *,
    batch_size: int,
    max_epochs: int,
    lr: float,
    patience: int,
    weight_decay: float = 0.0,
    online_draw: Callable[[int], tuple[torch.Tensor, dict[str, torch.Tensor]]] | None = None,
    progress_bar: bool = True,
    generator: torch.Generator | None = None,
) -> ForwardFitHistory:
    """Minimise the stage-1 NLL of ``values`` given ``features``; fills ``history`` and returns it.

    :param ForwardStage stage: summary network and forward densities (trainable).
    :param features: fixed summary features of the bank, ``[M, F]``.
    :param values: the bank's forward values ``{site: [M, *shape]}``.
    :param train_index: rows used for training.
    :param validation_index: rows used for early stopping.
    :param online_draw: if given, ``online_draw(batch_size) -> (features, values)`` supplies every step's
        batch (fresh simulations); the bank is then only used for validation.
    """
    online = online_draw is not None

    def draw(count: int):
        features, values = online_draw(count)
        return features, values, None, None

    def nll(index: torch.Tensor, feats: torch.Tensor, vals: Mapping[str, torch.Tensor]) -> torch.Tensor:
        context = stage.embed(feats[index])
        return -stage.log_prob({n: v[index] for n, v in vals.items()}, context).mean()

    parameters = [p for p in stage.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay, foreach=True)
    # halving the step size when the validation loss stalls lets the fit settle instead of jittering
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=0.5, patience=max(1, patience // 5), threshold=1e-4
    )
    best_state, best_value, stale = None, math.inf, 0
    num_train = train_index.numel()
    steps_per_epoch = max(1, math.ceil(num_train / batch_size))
    # Polyak (exponential moving) average of the weights over about one epoch: SGD noise in the
    # weights would otherwise dominate the error of a near-converged fit; validation, early stopping
    # and the returned weights all use the average.
    ema_decay = min(0.999, max(0.9, 1.0 - 1.0 / steps_per_epoch))
    averaged = [p.detach().clone() for p in parameters]
    from tqdm.auto import tqdm

    bar = tqdm(range(max_epochs), disable=not progress_bar, desc="fit_forward")
    for epoch in bar:
        stage.train()
        permutation = train_index[torch.randperm(num_train, generator=generator).to(train_index.device)]
        running = 0.0
        for step in range(steps_per_epoch):
            if online:
                feats, vals, _, _ = draw(batch_size)
                batch = torch.arange(feats.shape[0], device=feats.device)
            else:
                feats, vals = features, values
                batch = permutation[step * batch_size : (step + 1) * batch_size]
            loss = nll(batch, feats, vals)
            if not torch.isfinite(loss):
                raise RuntimeError(
                    f"fit_forward: the stage-1 loss became {loss.item()} at epoch {epoch}; lower "
                    "lr or check "
                    "the forward family"
                )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                torch._foreach_lerp_(averaged, [p.detach() for p in parameters], 1.0 - ema_decay)
            running += loss.item()
        stage.eval()
        current = [p.detach().clone() for p in parameters]
        with torch.no_grad():
            torch._foreach_copy_([p.data for p in parameters], averaged)
            value = torch.cat(
                [
                    -stage.log_prob({n: v[chunk] for n, v in values.items()}, stage.embed(features[chunk]))
                    for chunk in validation_index.split(4096)
                ]
            ).mean()
        history.train_nll.append(running / steps_per_epoch)
        history.validation_nll.append(value.item())
        bar.set_postfix(train=f"{history.train_nll[-1]:.4f}", validation=f"{value.item():.4f}")
        scheduler.step(value.item())
        if best_state is None or value.item() < best_value - 1e-6 * max(1.0, abs(best_value)):
            best_value, stale, history.best_epoch = value.item(), 0, epoch
            best_state = {k: v.detach().clone() for k, v in stage.state_dict().items()}
        else:
            stale += 1
        with torch.no_grad():
            torch._foreach_copy_([p.data for p in parameters], current)
        if stale >= patience:
            break
    bar.close()
    if best_state is not None:
        stage.load_state_dict(best_state)
    return history
