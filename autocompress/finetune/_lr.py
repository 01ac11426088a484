"""The learning rate: its schedule over the steps, the optimizer, and ``lr: auto``."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from autocompress.finetune._config import LR_CANDIDATES, SGD_MOMENTUM, FinetuneConfig

if TYPE_CHECKING:
    from autocompress.tasks import Task

__all__ = ["LrChoice", "choose_lr", "lr_factor", "make_optimizer"]


def lr_factor(config: FinetuneConfig, total: int) -> Callable[[int], float]:
    """The learning rate of step ``s`` (of ``total``) as a fraction of ``config.lr``."""
    warm = round(config.warmup * total)

    def factor(s: int) -> float:
        if s < warm:
            return (s + 1) / (warm + 1)
        if config.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))

    return factor


def make_optimizer(config: FinetuneConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer of ``config`` over ``params`` (``config.lr`` a number: ``auto`` is chosen
    before)."""
    lr = cast(float, config.lr)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM,
                               weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=config.weight_decay)


@dataclass(frozen=True)
class LrChoice:
    """What :func:`choose_lr` found.

    Attributes:
        lr: The chosen peak learning rate.
        scores: The metric after fine-tuning at each candidate (None: the loss diverged).
        seconds: What trying them took.
    """

    lr: float
    scores: dict[float, float | None]
    seconds: float

    def summary(self) -> str:
        """``lr 0.003 (0.0001: 0.91, 0.0003: 0.95, ...)`` for a progress line."""
        tried = ", ".join(f"{lr:g}: {'diverged' if m is None else f'{m:.4f}'}"
                          for lr, m in self.scores.items())
        return f"lr {self.lr:g} ({tried}; {self.seconds:.1f} s)"


def choose_lr(model: nn.Module, task: Task, config: FinetuneConfig,
              teacher: nn.Module | None = None, seed: int = 0,
              candidates: tuple[float, ...] = LR_CANDIDATES) -> LrChoice:
    """The peak learning rate of ``candidates`` after which ``config``'s fine-tuning leaves a
    copy of ``model`` with the best metric (the smaller on ties; ``model`` is not changed).

    Each candidate costs one full fine-tuning (``config.epochs``, the same seed, so the same
    batches), the brute-force version of a learning-rate range test (Smith, 2017): the best
    rate depends on how far compression moved the model (digits, uniform recipes, 2 epochs:
    hypervolume 4.61 at 1e-3, 5.75 at 6e-3) and on how it was trained (a pretrained
    transformer wants 1e-4 or less), so it is measured, not guessed. Each copy trains with
    ``keep_best`` off: its score is what the rate trains to.

    Raises:
        ValueError: Every candidate diverged.
    """
    from autocompress.finetune._loop import DivergedError, finetune  # it calls choose_lr

    start = time.perf_counter()
    scores: dict[float, float | None] = {}
    for lr in candidates:
        trial = copy.deepcopy(model)
        try:
            # The score is the metric this rate trains to: no state kept from before training.
            history = finetune(trial, task, replace(config, lr=lr, keep_best=False),
                               teacher=teacher, seed=seed)
        except DivergedError:
            scores[lr] = None
            continue
        scores[lr] = history[-1] if history else float(task.evaluate(trial))
    finite = [(m, -lr) for lr, m in scores.items() if m is not None]
    if not finite:
        raise ValueError(f"finetune.lr='auto': the loss diverged at every candidate "
                         f"{list(candidates)}; give finetune.lr a number")
    best = -max(finite)[1]
    return LrChoice(best, scores, time.perf_counter() - start)
