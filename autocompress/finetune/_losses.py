"""Distillation losses: which one a task gets, and the loss functions."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from autocompress.finetune._config import FinetuneConfig

if TYPE_CHECKING:
    from autocompress.tasks import Task

__all__ = ["distill_fn", "distill_loss_name", "output_tensor"]


def distill_loss_name(config: FinetuneConfig, task: Task) -> str:
    """The distillation loss fine-tuning uses on ``task``: ``kl``, ``mse``, ``cosine`` or
    ``task`` (the task's own ``distill_loss``), for the record."""
    if getattr(task, "distill_loss", None) is not None:
        return "task"
    if config.distill_loss != "auto":
        return config.distill_loss
    # KL of softmaxes only makes sense for class logits: those of the default cross-entropy.
    return "kl" if getattr(task, "loss_fn", None) is None else "mse"


def output_tensor(out: Any) -> torch.Tensor:
    """The main tensor of a model's output: the tensor itself, the first element of a tuple
    or list, or the first value of a dict (a Hugging Face ``ModelOutput``: ``logits`` or
    ``last_hidden_state``)."""
    while not isinstance(out, torch.Tensor):
        if isinstance(out, Mapping) and out:
            out = next(iter(out.values()))
        elif isinstance(out, tuple | list) and out:
            out = out[0]
        else:
            raise TypeError(f"cannot distil from a model output of type {type(out).__name__}; "
                            f"give the task a distill_loss(student_outputs, teacher_outputs)")
    return out


def _kl(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` per sample (Hinton et al.,
    2015); the ``T^2`` keeps the soft-target gradients on the scale of the hard-target ones.
    Sequence logits ``(N, L, C)`` count every position as a sample."""
    s, te = student.float().flatten(0, -2), teacher.float().flatten(0, -2)
    soft = F.softmax(te / t, dim=-1)
    return F.kl_div(F.log_softmax(s / t, dim=-1), soft, reduction="batchmean") * t * t


def distill_fn(config: FinetuneConfig, task: Task) -> Callable[[Any, Any], torch.Tensor]:
    name = distill_loss_name(config, task)
    if name == "task":
        return task.distill_loss  # type: ignore[return-value]
    losses: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
        "kl": lambda s, t: _kl(s, t, config.temperature),
        "mse": lambda s, t: F.mse_loss(s.float(), t.float()),
        "cosine": lambda s, t: (1 - F.cosine_similarity(s.float(), t.float(), dim=-1)).mean(),
    }
    loss = losses[name]
    return lambda s, t: loss(output_tensor(s), output_tensor(t))
