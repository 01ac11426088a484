"""Fine-tuning settings (torch-free: reading an experiment file does not import torch)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, cast

__all__ = ["AUTO", "DEFAULT_LR", "DEVICES", "DISTILL_LOSSES", "LR_CANDIDATES", "OPTIMIZERS",
           "SCHEDULES", "SGD_MOMENTUM", "FinetuneConfig"]

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "constant")
DEVICES = ("auto", "cpu", "cuda")
DISTILL_LOSSES = ("auto", "kl", "mse", "cosine")
SGD_MOMENTUM = 0.9
AUTO = "auto"
# ``lr: auto`` tries these peak learning rates: half-decades from the 1e-5 to 1e-4 a pretrained
# transformer wants up to the 1e-2 a heavily compressed small CNN may need.
LR_CANDIDATES = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
# The learning rate of a task that suggests none (``Task.finetune_lr``) when ``lr`` is not set:
# Adam's usual step size, what the small CNNs trained from scratch have been tuned with.
DEFAULT_LR = 1e-3


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning settings.

    The defaults suit a pretrained model as well as a small one trained from scratch: AdamW,
    a linear warm-up over the first 10% of the steps, gradients clipped to norm 1 and the best
    state kept (a search also restores the post-training weights if fine-tuning ends below
    them, see :func:`autocompress.tune.run_trial`), at the task's own learning rate
    (``Task.finetune_lr``) or :data:`DEFAULT_LR`. The old defaults (Adam, 1e-3, no warm-up,
    no clipping, keep_best off) took all-MiniLM-L6-v2 with 8-bit weights from 0.9995 cosine
    fidelity to 0.864 in one epoch.

    Attributes:
        epochs: Passes over the training data. 0 is the post-training mode: the model is
            measured right after compression; no optimizer is built, no learning rate is
            chosen and nothing is evaluated twice.
        lr: Peak learning rate; ``"auto"``: the best of :data:`LR_CANDIDATES` for this
            model, chosen by :func:`choose_lr` (a search chooses once, before its trials, on a
            calibration plan; a lone ``finetune`` call on the model it is given); None (the
            default): the task's ``Task.finetune_lr`` where it gives one, else
            :data:`DEFAULT_LR`. A task's hint is the default rather than ``auto`` because
            of what ``auto`` costs: seven fine-tunings per search, 12.7 s on digits (3
            epochs) and 4.1 s on mnist1d (2 epochs), but 30-55 s per epoch of all-MiniLM-L6-v2
            on a quiet 2-core machine (up to 4 min on a busy one): 4 min or more per search.
            For MiniLM the rates trade off (one epoch, AdamW, warm-up 0.1, clipping 1.0,
            cosine fidelity before -> after at 1e-5 / 3e-5 / 1e-4 / 3e-4 / 1e-3): 8-bit
            weights 0.9996 -> 0.998 / 0.996 / 0.991 / 0.971 / 0.889 (kept at 0.9996 by
            ``keep_best``), 50% unstructured magnitude pruning 0.711 -> 0.797 / 0.847 / 0.872
            / 0.882 / 0.837, 4-bit weights 0.907 -> 0.952 at 1e-4, 0.942 at 3e-4: 1e-4
            (``minilm``'s ``finetune_lr``).
        distill: Distil from the uncompressed model (Hinton et al., 2015).
        temperature: Softmax temperature of the soft targets (``distill_loss: kl``).
        alpha: Weight of the distillation loss; the task loss gets ``1 - alpha``.
        weight_decay: Weight decay of the optimizer (decoupled for ``adamw``).
        optimizer: ``adam``, ``adamw`` (the default; Loshchilov & Hutter, 2019) or ``sgd``
            (momentum 0.9).
        schedule: Learning rate after the warm-up, per step: ``cosine`` (annealed to zero
            over the remaining steps) or ``constant``.
        warmup: Fraction of all steps in ``[0, 1)`` with a linear warm-up to ``lr`` (a
            pretrained model's first steps at the full rate, with Adam's moments still
            empty, are the ones that wreck it).
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
    lr: float | str | None = None
    distill: bool = True
    temperature: float = 4.0
    alpha: float = 0.5
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    schedule: str = "cosine"
    warmup: float = 0.1
    grad_clip: float | None = 1.0
    device: str = "auto"
    amp: bool = False
    distill_loss: str = "auto"
    regrow: float = 0.5
    keep_best: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or isinstance(self.epochs, bool) or self.epochs < 0:
            raise ValueError(f"finetune.epochs={self.epochs!r}; allowed: an integer >= 0")
        if self.lr not in (AUTO, None) and (not _number(self.lr)
                                            or not 0 < cast(float, self.lr) < math.inf):
            raise ValueError(f"finetune.lr={self.lr!r}; allowed: a number > 0 or {AUTO!r}, or "
                             f"null for the task's own (else {DEFAULT_LR:g})")
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
