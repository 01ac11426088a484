"""One compress -> fine-tune -> measure cycle (``autocompress trial``), and the search trial that
runs it on any backend (:func:`search_trial`)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from autocompress.compress import DEFAULT_SAMPLES, Calibration, Plan, apply
from autocompress.compress.quantize import calibrate
from autocompress.config import Experiment, ResolvedSpace
from autocompress.finetune import DivergedError, FinetuneConfig, evaluate, finetune, snapshot
from autocompress.measure import Metrics, Target, measure
from autocompress.measure.metrics import Measurer
from autocompress.tasks import Task
from autocompress.tune._events import EpochReport, TrialFinished, TrialPruned


@dataclass
class TrialResult:
    """What one trial produced.

    Attributes:
        plan: The plan that was applied.
        model: The compressed, fine-tuned model (parametrized: masks and fake-quant live).
        metrics: Its measured metrics.
        history: The task metric after each fine-tuning epoch.
        seconds: Wall time of compress + fine-tune + measure.
        finetune_seconds: Wall time of the fine-tuning.
        post_training: The task metric right after compression, before fine-tuning (the same
            evaluation as ``metrics.accuracy``, which is never below it).
        restored: Fine-tuning ended below ``post_training`` (or its loss diverged) and the
            post-training weights were put back.
    """

    plan: Plan
    model: nn.Module
    metrics: Metrics
    history: list[float] = field(default_factory=list)
    seconds: float = 0.0
    finetune_seconds: float = 0.0
    post_training: float = math.nan
    restored: bool = False

    def trial_metrics(self) -> dict[str, float]:
        """The metric registry's ``trial`` metrics of this trial."""
        final = self.metrics.accuracy if self.metrics is not None else math.nan
        return {"trial_seconds": self.seconds, "finetune_seconds": self.finetune_seconds,
                "accuracy_post_training": self.post_training,
                "finetune_gain": final - self.post_training}


def run_trial(
    task: Task,
    plan: Plan,
    finetune_config: FinetuneConfig,
    target: Target,
    on_epoch: Callable[[int, float], None] | None = None,
    seed: int = 0,
    measurer: Measurer | None = None,
    step_gate: Callable[[], AbstractContextManager] | None = None,
    stop: Callable[[float, float], str | None] | None = None,
    on_post_training: Callable[[float], None] | None = None,
    calibration_samples: int = DEFAULT_SAMPLES,
) -> TrialResult:
    """Compresses ``task.model`` by ``plan``, measures the task metric (the post-training
    metric, passed to ``on_post_training``), fine-tunes it (distilling from the original if
    configured) and measures it on ``target`` (with ``measurer``, see
    :func:`autocompress.measure.measure`; ``step_gate``: see :func:`finetune`). ``task.model``
    is left untouched. ``stop``: see :func:`finetune` (raises ``TrainingStopped``; its check
    before training sees the post-training metric). A plan with calibrated knobs calibrates on
    ``calibration_samples`` training samples.

    The result's accuracy is never below the post-training metric: if the fine-tuned model
    measures worse (``keep_best`` off, or a model trained on a GPU that evaluates a little
    differently on the CPU) or its loss diverged, the post-training weights are restored and
    measured. Both metrics are ``task.evaluate`` of the CPU model, the same evaluation. With
    ``finetune_config.epochs`` 0 the model is measured once: its accuracy is the post-training
    metric.
    """
    start = time.perf_counter()
    calibration = (Calibration.from_task(task, calibration_samples) if plan.needs_calibration
                   else None)
    model = apply(task.model, plan, task.example_inputs, calibration=calibration)
    calibrate(model, task.calibration_batches())
    if not finetune_config.epochs:  # post-training mode: one measurement, nothing else
        metrics = measure(model, task, target, measurer)
        return TrialResult(plan, model, metrics, [], time.perf_counter() - start, 0.0,
                           metrics.accuracy)
    post = evaluate(model, task, step_gate)
    if on_post_training is not None:
        on_post_training(post)
    compressed = snapshot(model)
    tuning = time.perf_counter()
    try:
        history = finetune(model, task, finetune_config, teacher=task.model, on_epoch=on_epoch,
                           seed=seed, step_gate=step_gate, stop=stop, start_metric=post)
    except DivergedError:  # the loss became NaN: the weights may be too; compression alone stands
        history = None
    tuned = time.perf_counter()
    metrics = None if history is None else measure(model, task, target, measurer)
    restored = metrics is None or metrics.accuracy < post
    if metrics is None or restored:
        model.load_state_dict(compressed)
        metrics = measure(model, task, target, measurer)
    return TrialResult(plan, model, metrics, history or [], time.perf_counter() - start,
                       tuned - tuning, post, restored)


PRUNE_MARGIN = 3.0  # how many times the allowed drop a trial may still lose before training
RECOVERY_MARGIN = 1.5  # how many times the largest recovery seen a trial may still need
MIN_RECOVERIES = 3  # finished trials before their recoveries tighten the rule


def prune_reason(baseline: float, metric: float, max_drop: float | None, done: float,
                 epochs: int, recovery: float | None = None) -> str | None:
    """Why a trial cannot meet the accuracy constraint, or None (multi-fidelity pruning).

    A trial is stopped when, after ``done`` of ``epochs`` fine-tuning epochs (1.5: halfway
    through the second, see :func:`autocompress.finetune.finetune`), it loses more than
    ``max_drop * (1 + PRUNE_MARGIN * (epochs - done) / epochs)``: after the first of two
    epochs 2.5x the allowed drop, halfway through the second 1.75x. Once the search has seen
    trials finish (``recovery``: the most any of them gained from epoch ``done`` to the end,
    see :class:`RecoveryBook`), the bound is also at most ``max_drop + max(RECOVERY_MARGIN x
    recovery, max_drop / 4)``: a trial that would need 1.5x the best recovery seen (among
    trials that were below the constraint there too) is stopped.

    Before the first epoch (``done`` 0: the post-training metric, right after compression)
    only that learned bound applies, and only once :data:`MIN_RECOVERIES` finished trials
    have shown how much fine-tuning recovers from there: a model right after compression is
    often near chance and one epoch of distillation brings it back (on digits, 8-bit
    80%-sparse weights go from 0.5 to 0.98), so without that evidence nothing is stopped
    there; with it, a trial whose post-training drop is beyond any recovery seen pays for no
    training at all. Never on the last epoch (the trial then finishes, infeasible or not),
    never without a constraint.
    """
    if max_drop is None or done >= epochs or (done == 0 and recovery is None):
        return None
    allowed = max_drop * (1 + PRUNE_MARGIN * (epochs - done) / epochs) if done else math.inf
    learned = ""
    if recovery is not None:
        bound = max_drop + max(RECOVERY_MARGIN * recovery, max_drop / 4)
        if bound < allowed:
            allowed, learned = bound, f"; finished trials gained at most {recovery:.3f} from here"
    drop = baseline - metric
    if drop <= allowed:
        return None
    where = "right after compression" if done == 0 else f"after {done:g} of {epochs} epochs"
    return (f"accuracy {metric:.4f} {where} is {drop:.3f} below the baseline, more than the "
            f"{allowed:.3f} it may still lose there (max_accuracy_drop {max_drop}{learned})")


class RecoveryBook:
    """What finished trials gained from each epoch to the end: how much a trial that is still
    below the constraint after epoch k (0: right after compression, the post-training metric)
    can hope to recover (the search keeps one, as a Ray actor on the driver's node, for all
    its trials).

    Only trials that were themselves below the constraint after epoch k count for epoch k: a
    trial that was never far from the baseline has nothing to recover, and its small gain says
    nothing about a heavily compressed one (a search's first, mild trials would otherwise
    stop the heavy ones: on digits, 75% of the channels pruned is 20 pt down after the first
    of two epochs and ends 2 pt down)."""

    def __init__(self) -> None:
        self.gains: dict[float, list[float]] = {}

    def record(self, checks: Mapping[float, float], final: float, floor: float) -> None:
        """A finished trial: its metric at each check (``{epochs done: metric}``, as
        ``finetune`` passed them to ``stop``; 0: the post-training metric), its final metric,
        and the constraint's floor (baseline metric - max drop)."""
        for done, metric in checks.items():
            if metric < floor:
                self.gains.setdefault(done, []).append(final - metric)

    def largest(self, done: float) -> float | None:
        """The most a finished trial that was below the floor after epoch ``done`` gained from
        there to the end, or None before :data:`MIN_RECOVERIES` such trials have finished."""
        gains = self.gains.get(done, [])
        return max(gains) if len(gains) >= MIN_RECOVERIES else None


@dataclass
class TrialContext:
    """What a search trial gets from its backend.

    Attributes:
        report: Takes an :class:`~autocompress.tune._events.EpochReport` after each epoch.
        measurer: Times the model (the search's measurement service).
        recovery: The search's :class:`RecoveryBook` (or a stand-in with its methods).
        step_gate: See :func:`~autocompress.finetune.finetune`; None: no gate.
        node: Where the trial runs, for the record.
    """

    report: Callable[[EpochReport], None]
    measurer: Measurer | None
    recovery: Any
    step_gate: Callable[[], AbstractContextManager] | None = None
    node: str = ""


def search_trial(params: Mapping[str, Any], ctx: TrialContext, *, task: Any,
                 space: ResolvedSpace, exp: Experiment,
                 baseline: dict[str, float]) -> TrialFinished | TrialPruned:
    """One trial of a search, on any backend: plan -> compress -> post-training metric (the
    first :class:`EpochReport`, epoch 0, when the trial fine-tunes) -> fine-tune (an
    :class:`EpochReport` per epoch) -> measure.

    A trial that finishes tells the search's :class:`RecoveryBook` (``ctx.recovery``) how much
    it gained after each epoch; a running one asks it before deciding to stop. Its artifacts
    (plan, weights, metrics) travel in the returned :class:`TrialFinished`.
    """
    import io

    import torch

    from autocompress.compress import bake
    from autocompress.finetune import TrainingStopped
    from autocompress.measure import relative_metrics

    plan = space.plan_from_params(params)

    def on_epoch(epoch: int, metric: float) -> None:
        ctx.report(EpochReport(epoch + 1, metric, ctx.node))

    finetune_config = exp.finetune
    if finetune_config.device == "auto" and not exp.search.gpus_per_trial > 0:
        # A trial that reserved no GPU trains on the CPU, whether or not Ray hides the GPUs.
        finetune_config = replace(finetune_config, device="cpu")
    max_drop, epochs = exp.constraints.max_accuracy_drop, exp.finetune.epochs
    checks: dict[float, float] = {}  # what the recovery book learns from, if it finishes

    def stop(done: float, metric: float) -> str | None:
        checks[done] = metric
        if done >= epochs:
            return None
        return prune_reason(baseline["accuracy"], metric, max_drop, done, epochs,
                            ctx.recovery.largest(done))

    try:
        # Without a constraint nothing is stopped: no checks (each one evaluates the model).
        result = run_trial(task, plan, finetune_config, exp.target, on_epoch=on_epoch,
                           seed=exp.search.seed or 0, measurer=ctx.measurer,
                           step_gate=ctx.step_gate, stop=stop if max_drop is not None else None,
                           on_post_training=lambda m: ctx.report(EpochReport(0, m, ctx.node)),
                           calibration_samples=exp.search.calibration_samples)
    except TrainingStopped as stopped:
        return TrialPruned(stopped.reason, stopped.epochs, stopped.metric, plan.summary(), ctx.node)
    metrics = result.metrics.to_dict()
    if max_drop is not None:
        ctx.recovery.record(checks, metrics["accuracy"], baseline["accuracy"] - max_drop)
    relative = relative_metrics(metrics, baseline)
    weights = io.BytesIO()
    torch.save(bake(result.model).state_dict(), weights)
    files = {"plan.json": plan.to_json(indent=2).encode(), "model.pt": weights.getvalue(),
             "metrics.json": json.dumps({**metrics, **relative}, indent=2).encode()}
    latency = result.metrics.latency.to_dict() if result.metrics.latency else {}
    return TrialFinished({**metrics, **relative, **result.trial_metrics(),
                          "epochs": len(result.history)}, plan.summary(), ctx.node, latency, files)
