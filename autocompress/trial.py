"""One compress -> fine-tune -> measure cycle, shared by ``autocompress trial`` and the search."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from torch import nn

from autocompress.compress import apply
from autocompress.finetune import FinetuneConfig, finetune
from autocompress.measure import Metrics, Target, measure
from autocompress.measure.metrics import Measurer
from autocompress.plan import Plan
from autocompress.tasks import Task


@dataclass
class TrialResult:
    """What one trial produced.

    Attributes:
        plan: The plan that was applied.
        model: The compressed, fine-tuned model (parametrized: masks and fake-quant live).
        metrics: Its measured metrics.
        history: The task metric after each fine-tuning epoch.
        seconds: Wall time of compress + fine-tune + measure.
    """

    plan: Plan
    model: nn.Module
    metrics: Metrics
    history: list[float] = field(default_factory=list)
    seconds: float = 0.0


def run_trial(
    task: Task,
    plan: Plan,
    finetune_config: FinetuneConfig,
    target: Target,
    on_epoch: Callable[[int, float], None] | None = None,
    seed: int = 0,
    measurer: Measurer | None = None,
    step_gate: Callable[[], AbstractContextManager] | None = None,
) -> TrialResult:
    """Compresses ``task.model`` by ``plan``, fine-tunes it (distilling from the original if
    configured) and measures it on ``target`` (with ``measurer``, see
    :func:`autocompress.measure.measure`; ``step_gate``: see :func:`finetune`). ``task.model``
    is left untouched."""
    start = time.perf_counter()
    model = apply(task.model, plan, task.example_inputs)
    history = finetune(model, task, finetune_config, teacher=task.model, on_epoch=on_epoch,
                       seed=seed, step_gate=step_gate)
    metrics = measure(model, task, target, measurer)
    return TrialResult(plan, model, metrics, history, time.perf_counter() - start)
