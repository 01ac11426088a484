"""The built-in ``digits_resnet`` task: scikit-learn's 8x8 digits and a tiny ResNet.

The same data, split, metric and example inputs as ``digits``; the model has what ``digits``'
plain conv stack lacks: residual blocks, so that channel pruning meets convs coupled by a
residual add, and bias-free convs each followed by a BatchNorm (folded into the conv on export).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from autocompress.tasks._builtin import build, sklearn_digits
from autocompress.tasks._registry import register_task
from autocompress.tasks._task import Task


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers and a residual add; a 1x1 conv+BN shortcut when the shape
    changes (He et al., 2016)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class DigitsResNet(nn.Module):
    """A 3x3 conv+BN stem, an identity-shortcut block at 8x8, a strided block with a 1x1
    shortcut to 4x4, global average pooling and a Linear head (7 convs and 1 linear)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.layers = nn.Sequential(BasicBlock(width, width), BasicBlock(width, 2 * width, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


@register_task("digits_resnet")
def digits_resnet(seed: int = 0) -> Task:
    """scikit-learn's 8x8 digits as in ``digits`` (inputs ``(N, 1, 8, 8)`` in [0, 1], the same
    fixed stratified 80/20 split); ``seed`` seeds the baseline."""
    torch.manual_seed(seed)
    return build("digits_resnet", seed, DigitsResNet(), sklearn_digits(), epochs=20, lr=5e-3,
                 batch_size=64, code=sys.modules[__name__])
