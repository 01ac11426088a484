"""The Task contract: a trained model, its data, its metric.

Imports neither torch nor ONNX when imported (a test checks it): the user's model brings
torch; the default metric and loss are imported when first used.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

CALIBRATION_BATCHES = 8  # batches whose activation ranges calibrate act_bits: 8


@dataclass
class Task:
    """What autocompress needs to know about a user's model.

    Attributes:
        model: The trained fp32 baseline.
        train_loader: Iterable of ``(inputs, targets)`` batches for fine-tuning.
        val_loader: Iterable of ``(inputs, targets)`` batches for the metric.
        example_inputs: One input batch (batch dimension first), for tracing, export, latency:
            a tensor, a tuple of tensors (positional arguments of ``forward``) or a dict of
            tensors (keyword arguments). Batches of the loaders are ``(inputs, targets)`` with
            ``inputs`` of the same form.
        metric: ``metric(model, val_loader) -> float``, higher is better (default: top-1).
        loss_fn: ``loss_fn(outputs, targets)`` (default: cross-entropy).
        distill_loss: ``distill_loss(student_outputs, teacher_outputs) -> loss`` for
            distillation, or None for the experiment's ``finetune.distill_loss``.
        name: A short name, shown in output and MLflow.
        info: Free-form facts about the task (data sizes, how the baseline was trained).
        finetune_lr: The peak learning rate that suits fine-tuning this model after
            compression, or None: an experiment that sets no ``finetune.lr`` uses it (else
            ``autocompress.finetune.DEFAULT_LR``). A pretrained model wants a small one (the
            built-in ``minilm`` task gives one, measured); a small model trained from scratch
            takes the default.
    """

    model: nn.Module
    train_loader: Iterable
    val_loader: Iterable
    example_inputs: Any  # a tensor, a tuple or a dict of tensors (autocompress._inputs)
    metric: Callable[[nn.Module, Iterable], float] | None = None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    name: str = "task"
    info: dict = field(default_factory=dict)
    distill_loss: Callable[[Any, Any], torch.Tensor] | None = None
    finetune_lr: float | None = None

    def __post_init__(self) -> None:
        from torch import nn

        from autocompress._inputs import check_inputs

        if not isinstance(self.model, nn.Module):
            raise TypeError(f"Task.model must be an nn.Module, got {type(self.model).__name__}")
        check_inputs(self.example_inputs, "Task.example_inputs")
        lr = self.finetune_lr
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, int | float)
                               or not 0 < lr < float("inf")):
            raise ValueError(f"Task.finetune_lr={lr!r}; allowed: a number > 0 or None")
        self.model.eval()

    def evaluate(self, model: nn.Module) -> float:
        """The task metric of ``model`` on the validation data."""
        from autocompress.measure import top1_accuracy

        return float((self.metric or top1_accuracy)(model, self.val_loader))

    def calibration_batches(self, count: int = CALIBRATION_BATCHES) -> Iterator[Any]:
        """The inputs of the first ``count`` training batches: what static activation ranges
        (``act_bits: 8``) are calibrated on, before fine-tuning and for the deployed graph.
        Lazy: nothing is read until it is iterated, so a model without static quantizers
        costs nothing (:func:`autocompress.compress.quantize.calibrate` looks first)."""
        for inputs, *_ in itertools.islice(self.train_loader, count):
            yield inputs

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``loss_fn(outputs, targets)``, cross-entropy by default."""
        import torch.nn.functional as F

        return (self.loss_fn or F.cross_entropy)(outputs, targets)
