"""What the built-in tasks share: loaders and a baseline trained once and cached."""

from __future__ import annotations

import sys
from types import ModuleType

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from autocompress.finetune import FinetuneConfig, finetune
from autocompress.tasks._registry import cached_baseline
from autocompress.tasks._task import Task


def baseline_training(epochs: int, lr: float) -> FinetuneConfig:
    """How a built-in task's baseline is trained from scratch: plain Adam, no warm-up, no
    clipping, the last epoch's weights (not the fine-tuning defaults, which suit compressed
    pretrained models and would change every cached baseline; keeping the best epoch would
    also choose on the validation data)."""
    return FinetuneConfig(epochs=epochs, lr=lr, distill=False, optimizer="adam", warmup=0.0,
                          grad_clip=None, keep_best=False)


def sklearn_digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits (1,797 images) as ``(x_train, y_train, x_val, y_val)``:
    inputs ``(N, 1, 8, 8)`` float32 scaled to [0, 1] (pixels / 16), int64 labels, a fixed
    stratified 80/20 split (the same for every seed and every task that uses it)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    xt, xv, yt, yv = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    return torch.from_numpy(xt), torch.from_numpy(yt), torch.from_numpy(xv), torch.from_numpy(yv)


def loaders(x_train, y_train, x_val, y_val, seed: int, batch_size: int):
    gen = torch.Generator().manual_seed(seed)
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=batch_size, shuffle=True,
                       generator=gen)
    val = DataLoader(TensorDataset(x_val, y_val), batch_size=512)
    return train, val


def build(name: str, seed: int, model: nn.Module, data, epochs: int, lr: float,
          batch_size: int, code: ModuleType) -> Task:
    """The task of ``model`` on ``data`` (train x, y, validation x, y), its baseline trained
    for ``epochs`` once and cached under a hash of ``code`` (the task's own module), so that
    editing one task does not retrain the others."""
    torch.manual_seed(seed)
    x_train, y_train, x_val, y_val = data
    train, val = loaders(x_train, y_train, x_val, y_val, seed=seed, batch_size=batch_size)
    task = Task(model=model, train_loader=train, val_loader=val, example_inputs=data[2][:1],
                name=name)

    def fit(m: nn.Module) -> None:
        print(f"autocompress: training the {name} baseline ({epochs} epochs, once; cached)",
              file=sys.stderr)
        finetune(m, task, baseline_training(epochs=epochs, lr=lr), seed=seed)

    task.model, cached = cached_baseline(name, seed, model, fit, code)
    task.info = {"train_samples": len(data[0]), "val_samples": len(data[2]),
                 "baseline_epochs": epochs, "baseline_cached": cached}
    return task


