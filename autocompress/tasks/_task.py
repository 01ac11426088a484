"""The Task contract: a trained model, its data, its metric."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from autocompress.measure.metrics import top1_accuracy


@dataclass
class Task:
    """What autocompress needs to know about a user's model.

    Attributes:
        model: The trained fp32 baseline.
        train_loader: Iterable of ``(inputs, targets)`` batches for fine-tuning.
        val_loader: Iterable of ``(inputs, targets)`` batches for the metric.
        example_inputs: One input batch (batch dimension first), for tracing, export, latency.
        metric: ``metric(model, val_loader) -> float``, higher is better (default: top-1).
        loss_fn: ``loss_fn(outputs, targets)`` (default: cross-entropy).
        name: A short name, shown in output and MLflow.
        info: Free-form facts about the task (data sizes, how the baseline was trained).
    """

    model: nn.Module
    train_loader: Iterable
    val_loader: Iterable
    example_inputs: torch.Tensor
    metric: Callable[[nn.Module, Iterable], float] | None = None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    name: str = "task"
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise TypeError(f"Task.model must be an nn.Module, got {type(self.model).__name__}")
        if not isinstance(self.example_inputs, torch.Tensor) or self.example_inputs.dim() < 2:
            raise TypeError("Task.example_inputs must be a tensor with a batch dimension first")
        self.model.eval()

    def evaluate(self, model: nn.Module) -> float:
        """The task metric of ``model`` on the validation data."""
        return float((self.metric or top1_accuracy)(model, self.val_loader))

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (self.loss_fn or F.cross_entropy)(outputs, targets)
