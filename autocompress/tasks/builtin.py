"""Built-in tasks whose data ships or is generated locally: ``digits`` and ``mnist1d``."""

from __future__ import annotations

import sys

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from autocompress.finetune import FinetuneConfig, finetune
from autocompress.tasks._registry import cached_baseline, register_task
from autocompress.tasks._task import Task


def _loaders(x_train, y_train, x_val, y_val, seed: int, batch_size: int):
    gen = torch.Generator().manual_seed(seed)
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=batch_size, shuffle=True,
                       generator=gen)
    val = DataLoader(TensorDataset(x_val, y_val), batch_size=512)
    return train, val


def _build(name: str, seed: int, model: nn.Module, data, epochs: int, lr: float,
           batch_size: int) -> Task:
    torch.manual_seed(seed)
    train, val = _loaders(*data, seed=seed, batch_size=batch_size)
    task = Task(model=model, train_loader=train, val_loader=val, example_inputs=data[2][:1],
                name=name)

    def fit(m: nn.Module) -> None:
        print(f"autocompress: training the {name} baseline ({epochs} epochs, once; cached)",
              file=sys.stderr)
        finetune(m, task, FinetuneConfig(epochs=epochs, lr=lr, distill=False), seed=seed)

    task.model, cached = cached_baseline(name, seed, model, fit, sys.modules[__name__])
    task.info = {"train_samples": len(data[0]), "val_samples": len(data[2]),
                 "baseline_epochs": epochs, "baseline_cached": cached}
    return task


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 digits: three conv blocks with BatchNorm, then an MLP head."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 4, 128), nn.ReLU(), nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_task("digits")
def digits(seed: int = 0) -> Task:
    """scikit-learn's 8x8 digits (1,797 images), inputs ``(N, 1, 8, 8)`` scaled to [0, 1].

    A fixed stratified 80/20 split (independent of ``seed``); ``seed`` seeds the baseline.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    xt, xv, yt, yv = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    data = (torch.from_numpy(xt), torch.from_numpy(yt), torch.from_numpy(xv), torch.from_numpy(yv))
    torch.manual_seed(seed)
    return _build("digits", seed, DigitsCNN(), data, epochs=30, lr=2e-3, batch_size=64)


class MNIST1DCNN(nn.Module):
    """The MNIST-1D paper's CNN (Greydanus & Kobak, 2020) with wider layers and BatchNorm."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, width, 5, stride=2, padding=1), nn.BatchNorm1d(width), nn.ReLU(),
            nn.Conv1d(width, width, 3, stride=2, padding=1), nn.BatchNorm1d(width), nn.ReLU(),
            nn.Conv1d(width, width, 3, stride=2, padding=1), nn.BatchNorm1d(width), nn.ReLU(),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(width * 5, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_task("mnist1d")
def mnist1d(seed: int = 0) -> Task:
    """MNIST-1D generated locally with ``mnist1d.data.make_dataset`` (never downloaded).

    4,000 training and 1,000 test sequences of length 40, inputs ``(N, 1, 40)``.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    state = np.random.get_state()  # make_dataset reseeds numpy's global generator
    try:
        raw = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(state)

    def tensor(a, dtype):
        return torch.as_tensor(np.asarray(a), dtype=dtype)

    data = (tensor(raw["x"], torch.float32)[:, None], tensor(raw["y"], torch.long),
            tensor(raw["x_test"], torch.float32)[:, None], tensor(raw["y_test"], torch.long))
    torch.manual_seed(seed)
    return _build("mnist1d", seed, MNIST1DCNN(), data, epochs=60, lr=5e-3, batch_size=100)
