"""Fine-tuning a compressed model, optionally distilling from the uncompressed one."""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from autocompress._inputs import run, to_device
from autocompress.compress._modules import Regrowth

if TYPE_CHECKING:
    from autocompress.tasks import Task

__all__ = ["AUTO", "DEVICES", "DISTILL_LOSSES", "LR_CANDIDATES", "OPTIMIZERS", "SCHEDULES",
           "DivergedError", "FinetuneConfig", "LrChoice", "choose_lr", "distill_loss_name",
           "finetune", "output_tensor", "resolve_device"]

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "constant")
DEVICES = ("auto", "cpu", "cuda")
DISTILL_LOSSES = ("auto", "kl", "mse", "cosine")
SGD_MOMENTUM = 0.9
AUTO = "auto"
# ``lr: auto`` tries these peak learning rates (half-decades around Adam's usual 1e-3).
LR_CANDIDATES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
MAX_REFRESHES = 64  # re-choices of the pruning masks while weights may regrow (finetune.regrow)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning settings.

    Attributes:
        epochs: Passes over the training data (0 = measure right after compression).
        lr: Peak learning rate, or ``"auto"``: the best of :data:`LR_CANDIDATES` for this
            model, chosen by :func:`choose_lr` (a search chooses once, before its trials, on a
            calibration plan; a lone ``finetune`` call on the model it is given).
        distill: Distil from the uncompressed model (Hinton et al., 2015).
        temperature: Softmax temperature of the soft targets (``distill_loss: kl``).
        alpha: Weight of the distillation loss; the task loss gets ``1 - alpha``.
        weight_decay: Weight decay of the optimizer (decoupled for ``adamw``).
        optimizer: ``adam``, ``adamw`` or ``sgd`` (momentum 0.9).
        schedule: Learning rate after the warm-up, per step: ``cosine`` (annealed to zero
            over the remaining steps) or ``constant``.
        warmup: Fraction of all steps in ``[0, 1)`` with a linear warm-up to ``lr``.
        grad_clip: Largest gradient norm (the gradients are scaled down to it), or None.
        device: Where to train: ``auto`` (CUDA when torch sees a CUDA device, else the CPU),
            ``cpu`` or ``cuda``.
        amp: Mixed precision on CUDA (bf16 where the GPU has it, else fp16 with a gradient
            scaler); ignored on the CPU.
        distill_loss: ``kl`` (softmax KL with ``temperature``, for logits), ``mse``, ``cosine``
            (1 - cosine similarity along the last dimension, for embeddings) or ``auto``:
            ``kl`` for a task with the default cross-entropy loss, else ``mse``. A task's own
            ``Task.distill_loss`` overrides it.
        regrow: Fraction of all steps in ``[0, 1]`` at the start of training during which
            pruned weights may grow back: the gradient reaches them and after every step each
            unstructured mask is re-chosen from the weights' magnitudes, keeping its count
            (dynamic pruning with feedback, Lin et al., 2020); the masks are then fixed for
            the rest. 0 keeps the masks chosen at compression. Measured on digits after 2
            epochs (uniform recipes, ``bench/README.md``): 90% sparsity at 4-8 bits went from
            0.76-0.78 to 0.89-0.92 accuracy, 50-75% unchanged within noise.
        keep_best: Evaluate before training too and end with the weights of the best
            evaluation (before training or after an epoch), so fine-tuning never leaves a
            model worse than compression alone (a mildly compressed pretrained model can lose
            fidelity to a step size that a heavily pruned one needs).
    """

    epochs: int = 2
    lr: float | str = 1e-3
    distill: bool = True
    temperature: float = 4.0
    alpha: float = 0.5
    weight_decay: float = 0.0
    optimizer: str = "adam"
    schedule: str = "cosine"
    warmup: float = 0.0
    grad_clip: float | None = None
    device: str = "auto"
    amp: bool = False
    distill_loss: str = "auto"
    regrow: float = 0.5
    keep_best: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or isinstance(self.epochs, bool) or self.epochs < 0:
            raise ValueError(f"finetune.epochs={self.epochs!r}; allowed: an integer >= 0")
        if self.lr != AUTO and (not _number(self.lr) or not 0 < self.lr < math.inf):
            raise ValueError(f"finetune.lr={self.lr!r}; allowed: a number > 0 or {AUTO!r}")
        if not isinstance(self.distill, bool):
            raise ValueError(f"finetune.distill={self.distill!r}; allowed: true or false")
        if not _number(self.temperature) or not 0 < self.temperature < math.inf:
            raise ValueError(f"finetune.temperature={self.temperature!r}; allowed: a number > 0")
        if not _number(self.alpha) or not 0 <= self.alpha <= 1:
            raise ValueError(f"finetune.alpha={self.alpha!r}; allowed: a number in [0, 1]")
        if not _number(self.weight_decay) or not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"finetune.weight_decay={self.weight_decay!r}; allowed: a number >= 0")
        for key, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES),
                             ("device", DEVICES), ("distill_loss", DISTILL_LOSSES)):
            value = getattr(self, key)
            if value not in allowed:
                raise ValueError(f"finetune.{key}={value!r}; allowed: {list(allowed)}")
        if not _number(self.regrow) or not 0 <= self.regrow <= 1:
            raise ValueError(f"finetune.regrow={self.regrow!r}; allowed: a number in [0, 1]")
        if not _number(self.warmup) or not 0 <= self.warmup < 1:
            raise ValueError(f"finetune.warmup={self.warmup!r}; allowed: a number in [0, 1)")
        if self.grad_clip is not None and (not _number(self.grad_clip)
                                           or not 0 < self.grad_clip < math.inf):
            raise ValueError(f"finetune.grad_clip={self.grad_clip!r}; allowed: a number > 0 or null")
        for key in ("amp", "keep_best"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"finetune.{key}={getattr(self, key)!r}; allowed: true or false")

    def to_dict(self) -> dict:
        return asdict(self)


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


def _distill_fn(config: FinetuneConfig, task: Task) -> Callable[[Any, Any], torch.Tensor]:
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


def _lr_factor(config: FinetuneConfig, total: int) -> Callable[[int], float]:
    """The learning rate of step ``s`` (of ``total``) as a fraction of ``config.lr``."""
    warm = round(config.warmup * total)

    def factor(s: int) -> float:
        if s < warm:
            return (s + 1) / (warm + 1)
        if config.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))

    return factor


def _optimizer(config: FinetuneConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=SGD_MOMENTUM,
                               weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


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
) -> list[float]:
    """Trains ``model`` in place for ``config.epochs`` epochs; returns the metric after each.

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

    Raises:
        DivergedError: The loss became NaN or infinite.
        TrainingStopped: ``stop`` returned a reason.
        ValueError: ``config.device`` is ``cuda`` and torch sees no CUDA device.
    """
    if config.lr == AUTO:  # without epochs no step is taken: any rate will do
        lr = choose_lr(model, task, config, teacher, seed).lr if config.epochs else LR_CANDIDATES[0]
        config = replace(config, lr=lr)
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
                      step_gate or contextlib.nullcontext, stop)
    finally:
        model.to("cpu")
        if teacher is not None:
            teacher.to("cpu")
        model.eval()


def _train(model: nn.Module, task: Task, config: FinetuneConfig, device: torch.device,
           teacher: nn.Module | None, on_epoch: Callable[[int, float], None] | None,
           gate: Callable[[], contextlib.AbstractContextManager],
           stop: Callable[[float, float], str | None] | None = None) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(config, params)
    per_epoch = _steps_per_epoch(task.train_loader)
    # Stepped after every batch; a loader without a length is scheduled by epochs instead.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_factor(config, max(1, config.epochs * (per_epoch or 1))))
    cuda = device.type == "cuda"
    dtype = None
    if config.amp and cuda:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # fp16 gradients underflow without loss scaling (Micikevicius et al., 2018); bf16 do not.
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    distill_fn = _distill_fn(config, task) if teacher is not None else None

    def autocast() -> contextlib.AbstractContextManager:
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=dtype)

    def step(x: Any, y: Any, epoch: int) -> None:
        x, y = to_device(x, device), _targets_to(y, device)
        with autocast():
            out = run(model, x)
            loss = task.loss(out, y)
            if distill_fn is not None:
                assert teacher is not None
                with torch.no_grad():
                    target = run(teacher, x)
                loss = (1 - config.alpha) * loss + config.alpha * distill_fn(out, target)
        if not torch.isfinite(loss):
            raise DivergedError(f"loss became {loss.item()} in epoch {epoch}")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # so that grad_clip applies to the true gradients
        else:
            loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if per_epoch is not None:
            scheduler.step()

    def check(done: float, metric: float) -> None:
        reason = stop(done, metric) if stop is not None and done < config.epochs else None
        if reason:
            raise TrainingStopped(reason, done, metric)

    history = []
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    if config.epochs and (config.keep_best or stop is not None):
        before = _evaluate(model, task, gate)
        check(0, before)
        if config.keep_best:
            best = (before, _snapshot(model))
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
        halfway = per_epoch // 2 if stop is not None and (per_epoch or 0) >= 2 else None
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
                    metric = _evaluate(model, task, gate)
                    model.train()
                    check(epoch + 0.5, metric)
            if per_epoch is None:
                scheduler.step()
            history.append(_evaluate(model, task, gate))
            if best is not None and history[-1] > best[0]:
                best = (history[-1], _snapshot(model))
            if on_epoch is not None:
                on_epoch(epoch, history[-1])
            check(epoch + 1, history[-1])
    if best is not None and best[0] > history[-1]:
        model.load_state_dict(best[1])
    return history


def _evaluate(model: nn.Module, task: Task,
              gate: Callable[[], contextlib.AbstractContextManager]) -> float:
    """The task metric, the random state put back afterwards (a data loader draws its seed
    from it): evaluating, as often as the caller asks, does not change the training."""
    with gate(), torch.random.fork_rng(devices=_cuda_devices(model)):
        return float(task.evaluate(model))


def _cuda_devices(model: nn.Module) -> list[torch.device]:
    return list({p.device for p in model.parameters() if p.device.type == "cuda"})


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
    transformer wants 1e-4 or less), so it is measured, not guessed.

    Raises:
        ValueError: Every candidate diverged.
    """
    start = time.perf_counter()
    scores: dict[float, float | None] = {}
    for lr in candidates:
        trial = copy.deepcopy(model)
        try:
            history = finetune(trial, task, replace(config, lr=lr), teacher=teacher, seed=seed)
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


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
