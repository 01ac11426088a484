"""The training loop: fine-tuning a compressed model, optionally distilling from the
uncompressed one."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from autocompress._inputs import run, to_device
from autocompress.compress import Regrowth
from autocompress.finetune._config import AUTO, DEFAULT_LR, FinetuneConfig
from autocompress.finetune._losses import distill_fn
from autocompress.finetune._lr import choose_lr, lr_factor, make_optimizer

if TYPE_CHECKING:
    from autocompress.tasks import Task

__all__ = ["DivergedError", "TrainingStopped", "evaluate", "finetune", "resolve_device",
           "snapshot"]

MAX_REFRESHES = 64  # re-choices of the pruning masks while weights may regrow (finetune.regrow)


class TrainingStopped(Exception):
    """Fine-tuning was stopped early (``finetune(stop=...)``).

    Attributes:
        reason: Why, in words.
        epochs: Epochs done when it stopped (0: before training; 1.5: halfway through the
            second).
        metric: The task metric then.
    """

    def __init__(self, reason: str, epochs: float, metric: float) -> None:
        super().__init__(reason)
        self.reason, self.epochs, self.metric = reason, epochs, metric


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


def resolve_device(device: str) -> torch.device:
    """The torch device of a ``finetune.device`` setting on this machine.

    Raises:
        ValueError: ``cuda`` where torch sees no CUDA device; the message names the key.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"finetune.device='cuda': torch sees no CUDA device here "
                         f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
                         f"allowed here: ['auto', 'cpu']")
    return torch.device(device)


def _steps_per_epoch(loader: Iterable) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:  # an iterable without a length (e.g. a stream)
        return None


def _targets_to(targets: Any, device: torch.device) -> Any:
    """Targets on ``device`` where they are tensors (a tensor, or a tuple or dict of them)."""
    if isinstance(targets, torch.Tensor):
        return targets.to(device, non_blocking=True)
    values = targets.values() if isinstance(targets, Mapping) else (
        targets if isinstance(targets, tuple | list) else ())
    if values and all(isinstance(v, torch.Tensor) for v in values):
        return to_device(targets, device)
    return targets


def finetune(
    model: nn.Module,
    task: Task,
    config: FinetuneConfig,
    teacher: nn.Module | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    seed: int = 0,
    step_gate: Callable[[], contextlib.AbstractContextManager] | None = None,
    stop: Callable[[float, float], str | None] | None = None,
    start_metric: float | None = None,
) -> list[float]:
    """Trains ``model`` in place for ``config.epochs`` epochs; returns the metric after each.

    ``config.epochs == 0`` returns ``[]`` at once: no optimizer, no learning rate chosen, no
    evaluation (the post-training mode). ``config.lr`` None is the task's ``finetune_lr``, or
    :data:`~autocompress.finetune.DEFAULT_LR` where it has none.

    With ``teacher`` and ``config.distill``, the loss is
    ``(1 - alpha) * task_loss + alpha * distill_loss(student_outputs, teacher_outputs)``,
    the distillation loss as :func:`distill_loss_name` picks it; ``kl`` is
    ``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` (Hinton et al., 2015,
    "Distilling the Knowledge in a Neural Network").

    Training (and the metric after each epoch: ``task.evaluate`` sees the model on that
    device) runs on ``config.device``. ``model`` and ``teacher`` end on the CPU, even on an
    error: sizes, latency and export work on CPU models, and the teacher is the task's
    model, shared with the rest of the search.

    Args:
        model: Model to train (compressed or not).
        task: Supplies the data, the loss and the metric.
        config: Epochs, optimizer, schedule, device and distillation settings.
        teacher: The uncompressed model, for distillation.
        on_epoch: Called with ``(epoch, metric)`` after each epoch (e.g. to report progress).
        seed: Seeds the data order and any randomness of the step.
        step_gate: Makes the context every training step and every evaluation runs in (a
            search passes its measurement service's gate, which holds them back while a
            latency is being measured on this machine; see ``autocompress.tune._service``).
        stop: Early stopping (a search's pruning of hopeless trials): called with
            ``(epochs done, metric)`` before training (0), after every epoch but the last
            and, from the second epoch on, halfway through each epoch (1.5, 2.5, ...: the
            metric evaluated there, for this call only; a loader without a length has no
            halfway point); a returned reason ends training with :class:`TrainingStopped`.
        start_metric: The metric of ``model`` as given, if the caller has measured it (a
            search trial does, right after compression): used for ``keep_best`` and the
            ``stop`` check before training instead of evaluating the model again.

    Raises:
        DivergedError: The loss became NaN or infinite.
        TrainingStopped: ``stop`` returned a reason.
        ValueError: ``config.device`` is ``cuda`` and torch sees no CUDA device.
    """
    if not config.epochs:  # post-training mode: nothing to train, nothing to set up
        model.eval()
        return []
    if config.lr is None:
        config = replace(config, lr=getattr(task, "finetune_lr", None) or DEFAULT_LR)
    elif config.lr == AUTO:
        config = replace(config, lr=choose_lr(model, task, config, teacher, seed).lr)
    device = resolve_device(config.device)
    torch.manual_seed(seed)
    # A DataLoader given its own generator (the built-in tasks' are) ignores the global seed
    # and would shuffle differently on every call, depending on what used it before.
    generator = getattr(task.train_loader, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(seed)
    distill = teacher is not None and config.distill and config.alpha > 0
    try:
        model.to(device)
        if distill:
            assert teacher is not None
            teacher.to(device).eval()
        return _train(model, task, config, device, teacher if distill else None, on_epoch,
                      step_gate or contextlib.nullcontext, stop, start_metric)
    finally:
        model.to("cpu")
        if teacher is not None:
            teacher.to("cpu")
        model.eval()


@dataclass
class _Stepper:
    """One training step of ``model``: the forward pass (with distillation from ``teacher``),
    the loss, backward, clipping, the optimizer and the per-step schedule.

    Attributes:
        per_epoch: Steps per epoch, or None for a loader without a length (then the caller
            steps the schedule once per epoch).
    """

    model: nn.Module
    task: Task
    config: FinetuneConfig
    device: torch.device
    teacher: nn.Module | None
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    per_epoch: int | None
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    distill: Callable[[Any, Any], torch.Tensor] | None

    @classmethod
    def build(cls, model: nn.Module, task: Task, config: FinetuneConfig, device: torch.device,
              teacher: nn.Module | None) -> _Stepper:
        """The step of ``config`` for ``model`` on ``device`` (``teacher``: distil from it)."""
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(config, params)
        per_epoch = _steps_per_epoch(task.train_loader)
        # Stepped after every batch; a loader without a length is scheduled by epochs instead.
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_factor(config, max(1, config.epochs * (per_epoch or 1))))
        dtype = None
        if config.amp and device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # fp16 gradients underflow without loss scaling (Micikevicius et al., 2018); bf16 do not.
        scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
        distill = distill_fn(config, task) if teacher is not None else None
        return cls(model, task, config, device, teacher, params, optimizer, scheduler, per_epoch,
                   dtype, scaler, distill)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.dtype)

    def _loss(self, x: Any, y: Any) -> torch.Tensor:
        out = run(self.model, x)
        loss = self.task.loss(out, y)
        if self.distill is not None:
            assert self.teacher is not None
            with torch.no_grad():
                target = run(self.teacher, x)
            alpha = self.config.alpha
            loss = (1 - alpha) * loss + alpha * self.distill(out, target)
        return loss

    def __call__(self, x: Any, y: Any, epoch: int) -> None:
        x, y = to_device(x, self.device), _targets_to(y, self.device)
        with self._autocast():
            loss = self._loss(x, y)
        if not torch.isfinite(loss):
            raise DivergedError(f"loss became {loss.item()} in epoch {epoch}")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)  # so that grad_clip applies to the true gradients
        else:
            loss.backward()
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.per_epoch is not None:
            self.scheduler.step()


def _train(model: nn.Module, task: Task, config: FinetuneConfig, device: torch.device,
           teacher: nn.Module | None, on_epoch: Callable[[int, float], None] | None,
           gate: Callable[[], contextlib.AbstractContextManager],
           stop: Callable[[float, float], str | None] | None = None,
           start_metric: float | None = None) -> list[float]:
    step = _Stepper.build(model, task, config, device, teacher)
    per_epoch = step.per_epoch

    def check(done: float, metric: float) -> None:
        reason = stop(done, metric) if stop is not None and done < config.epochs else None
        if reason:
            raise TrainingStopped(reason, done, metric)

    history = []
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    if config.keep_best or stop is not None:
        before = evaluate(model, task, gate) if start_metric is None else start_metric
        check(0, before)
        if config.keep_best:
            best = (before, snapshot(model))
    with Regrowth(model) as regrowth:
        # Masks may change for the first ``regrow`` of the steps (of the epochs, for a loader
        # without a length), then stay fixed so that the kept weights settle.
        # At most MAX_REFRESHES re-choices (each one a top-k over every masked weight).
        window = config.regrow * config.epochs * (per_epoch or 1)
        every = max(1, math.ceil(window / MAX_REFRESHES)) if per_epoch else 1
        steps = 0
        # Halfway through every epoch after the first, ``stop`` sees the metric too: the last
        # epoch's changes are smaller (the rate decays), so a trial that is still far below
        # the constraint there will end below it (on mnist1d, 2 epochs, the metric after the
        # first epoch does not tell the trials that end 4 pt down from those that end 7 pt
        # down).
        halfway = (per_epoch or 0) // 2 if stop is not None and (per_epoch or 0) >= 2 else None
        for epoch in range(config.epochs):
            model.train()
            for i, (x, y) in enumerate(task.train_loader):
                with gate():
                    if (steps if per_epoch else epoch) >= window:
                        regrowth.stop()
                    step(x, y, epoch)
                    if steps % every == every - 1:
                        regrowth.refresh()
                steps += 1
                if epoch and i + 1 == halfway:
                    metric = evaluate(model, task, gate)
                    model.train()
                    check(epoch + 0.5, metric)
            if per_epoch is None:
                step.scheduler.step()
            history.append(evaluate(model, task, gate))
            if best is not None and history[-1] > best[0]:
                best = (history[-1], snapshot(model))
            if on_epoch is not None:
                on_epoch(epoch, history[-1])
            check(epoch + 1, history[-1])
    if best is not None and best[0] > history[-1]:
        model.load_state_dict(best[1])
    return history


def evaluate(model: nn.Module, task: Task,
             gate: Callable[[], contextlib.AbstractContextManager] | None = None) -> float:
    """The task metric of ``model`` (``task.evaluate``, the evaluation a trial's measured
    ``accuracy`` is), inside ``gate`` (see :func:`finetune`'s ``step_gate``), the random state
    put back afterwards (a data loader draws its seed from it): evaluating, as often as the
    caller asks, does not change the training."""
    with (gate or contextlib.nullcontext)(), torch.random.fork_rng(devices=_cuda_devices(model)):
        return float(task.evaluate(model))


def _cuda_devices(model: nn.Module) -> list[torch.device]:
    return list({p.device for p in model.parameters() if p.device.type == "cuda"})


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``model``'s state (weights, masks, quantizer ranges) for ``load_state_dict``."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
