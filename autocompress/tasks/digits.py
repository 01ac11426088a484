"""The built-in ``digits`` task: scikit-learn's 8x8 digits and a small CNN."""

from __future__ import annotations

import sys

import torch
from torch import nn

from autocompress.tasks._builtin import build, sklearn_digits
from autocompress.tasks._registry import register_task
from autocompress.tasks._task import Task


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
    torch.manual_seed(seed)
    return build("digits", seed, DigitsCNN(), sklearn_digits(), epochs=30, lr=2e-3, batch_size=64,
                 code=sys.modules[__name__])
