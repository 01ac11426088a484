"""The built-in ``mnist1d`` task: MNIST-1D generated locally and the paper's CNN."""

from __future__ import annotations

import sys

import numpy as np
import torch
from torch import nn

from autocompress.tasks._builtin import build
from autocompress.tasks._registry import register_task
from autocompress.tasks._task import Task


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
    return build("mnist1d", seed, MNIST1DCNN(), data, epochs=60, lr=5e-3, batch_size=100,
                 code=sys.modules[__name__])
