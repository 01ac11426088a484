"""Fine-tuning a compressed model, optionally distilling from the uncompressed one."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from autocompress.tasks import Task


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning settings.

    Attributes:
        epochs: Passes over the training data (0 = measure right after compression).
        lr: Adam learning rate.
        distill: Distil from the uncompressed model (Hinton et al., 2015).
        temperature: Softmax temperature of the soft targets.
        alpha: Weight of the distillation loss; the task loss gets ``1 - alpha``.
        weight_decay: Adam weight decay.
    """

    epochs: int = 2
    lr: float = 1e-3
    distill: bool = True
    temperature: float = 4.0
    alpha: float = 0.5
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or isinstance(self.epochs, bool) or self.epochs < 0:
            raise ValueError(f"finetune.epochs={self.epochs!r}; allowed: an integer >= 0")
        if not isinstance(self.lr, int | float) or not self.lr > 0:
            raise ValueError(f"finetune.lr={self.lr!r}; allowed: a number > 0")
        if not isinstance(self.distill, bool):
            raise ValueError(f"finetune.distill={self.distill!r}; allowed: true or false")
        if not isinstance(self.temperature, int | float) or not self.temperature > 0:
            raise ValueError(f"finetune.temperature={self.temperature!r}; allowed: a number > 0")
        if not isinstance(self.alpha, int | float) or not 0 <= self.alpha <= 1:
            raise ValueError(f"finetune.alpha={self.alpha!r}; allowed: a number in [0, 1]")
        if not isinstance(self.weight_decay, int | float) or self.weight_decay < 0:
            raise ValueError(f"finetune.weight_decay={self.weight_decay!r}; allowed: a number >= 0")

    def to_dict(self) -> dict:
        return asdict(self)


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


def finetune(
    model: nn.Module,
    task: Task,
    config: FinetuneConfig,
    teacher: nn.Module | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    seed: int = 0,
    step_gate: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> list[float]:
    """Trains ``model`` in place for ``config.epochs`` epochs; returns the metric after each.

    With ``teacher`` and ``config.distill``, the loss is
    ``(1 - alpha) * task_loss + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))``
    (Hinton et al., 2015, "Distilling the Knowledge in a Neural Network"); the ``T^2`` keeps
    the soft-target gradients on the scale of the hard-target ones.

    Args:
        model: Model to train (compressed or not).
        task: Supplies the data, the loss and the metric.
        config: Epochs, learning rate and distillation settings.
        teacher: The uncompressed model, for distillation.
        on_epoch: Called with ``(epoch, metric)`` after each epoch (e.g. to report progress).
        seed: Seeds the data order and any randomness of the step.
        step_gate: Makes the context every training step and every evaluation runs in (a
            search passes its measurement service's gate, which holds them back while a
            latency is being measured on this machine; see ``autocompress.measure.service``).

    Raises:
        DivergedError: The loss became NaN or infinite.
    """
    torch.manual_seed(seed)
    # A DataLoader given its own generator (the built-in tasks' are) ignores the global seed
    # and would shuffle differently on every call, depending on what used it before.
    generator = getattr(task.train_loader, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(config.epochs, 1))
    distill = teacher is not None and config.distill and config.alpha > 0
    if distill:
        teacher.eval()
    t = config.temperature
    gate = step_gate or contextlib.nullcontext

    def step(x: torch.Tensor, y: torch.Tensor, epoch: int) -> None:
        out = model(x)
        loss = task.loss(out, y)
        if distill:
            with torch.no_grad():
                soft = F.softmax(teacher(x) / t, dim=1)
            kd = F.kl_div(F.log_softmax(out / t, dim=1), soft, reduction="batchmean") * t * t
            loss = (1 - config.alpha) * loss + config.alpha * kd
        if not torch.isfinite(loss):
            raise DivergedError(f"loss became {loss.item()} in epoch {epoch}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    history = []
    for epoch in range(config.epochs):
        model.train()
        for x, y in task.train_loader:
            with gate():
                step(x, y, epoch)
        scheduler.step()
        with gate():
            metric = float(task.evaluate(model))
        history.append(metric)
        if on_epoch is not None:
            on_epoch(epoch, metric)
    model.eval()
    return history
