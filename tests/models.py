"""Tiny models and a tiny task for the tests.

Every model family is a ``ModelSpec`` (in ``MODELS``) with ``build(**widths)``, whose keyword
arguments set the output channels of the hidden layers, so the expected architecture after
channel pruning is simply the same family built narrower (see ``ModelSpec.width_of``), and
``example_inputs(batch)``.

``tiny_task`` is also a user task reference: ``"tests.models:tiny_task"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from autocompress.tasks import Task

CLASSES = 4


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Gives every BatchNorm non-trivial affine parameters and running statistics.

    Freshly built BatchNorm layers are the identity in eval mode, which would hide mistakes in
    pruning them or folding them into a conv; some scales are negative on purpose.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                n = mod.num_features
                mod.weight.copy_(torch.randn(n, generator=gen))
                mod.bias.copy_(torch.randn(n, generator=gen) * 0.1)
                mod.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                mod.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    return model.eval()


class MLP(nn.Module):
    """Linear layers only: ``net.0`` (16->h1), ``net.2`` (h1->h2), ``net.4`` (h2->h3), ``net.6``."""

    def __init__(self, h1: int = 32, h2: int = 32, h3: int = 16, inputs: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(inputs, h1), nn.ReLU(),
            nn.Linear(h1, h2), nn.ReLU(),
            nn.Linear(h2, h3), nn.ReLU(),
            nn.Linear(h3, CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Conv1dNet(nn.Module):
    """Two Conv1d + BatchNorm1d blocks, then a Linear on the flattened features.

    Input ``(N, 2, 16)``; ``conv2`` halves the length, so ``head`` sees ``c2 * 8`` features and
    removing one channel of ``conv2`` removes 8 inputs of ``head``.
    """

    def __init__(self, c1: int = 8, c2: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(2, c1, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(c1)
        self.conv2 = nn.Conv1d(c1, c2, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm1d(c2)
        self.head = nn.Linear(c2 * 8, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(x.flatten(1))


class Conv2dNet(nn.Module):
    """Two Conv2d + BatchNorm2d blocks, global average pooling, a Linear head. Input (N,1,8,8)."""

    def __init__(self, c1: int = 8, c2: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(c2)
        self.head = nn.Linear(c2, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))


class ResidualNet(nn.Module):
    """A residual block and a two-branch concatenation. Input (N,1,8,8).

    ``stem`` and ``conv_b`` are coupled by the residual add (both have ``width`` outputs);
    ``branch1`` and ``branch2`` are concatenated before the head, so removing channels of
    ``branch2`` removes head inputs after the ``branch1`` ones.
    """

    def __init__(self, width: int = 8, inner: int = 8, branch1: int = 4, branch2: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(width)
        self.conv_a = nn.Conv2d(width, inner, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(inner)
        self.conv_b = nn.Conv2d(inner, width, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(width)
        self.branch1 = nn.Conv2d(width, branch1, 1)
        self.branch2 = nn.Conv2d(width, branch2, 3, padding=1)
        self.head = nn.Linear(branch1 + branch2, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        y = F.relu(self.bn_a(self.conv_a(x)))
        x = F.relu(x + self.bn_b(self.conv_b(y)))
        x = F.relu(torch.cat([self.branch1(x), self.branch2(x)], dim=1))
        return self.head(x.mean(dim=(2, 3)))


@dataclass(frozen=True)
class ModelSpec:
    """A model family for the tests.

    Attributes:
        name: Short id, used in test ids.
        cls: The model class; its keyword arguments are the widths.
        input_shape: One sample's input shape.
        first: A hidden layer whose output channels feed another compressible layer.
        second: Another hidden layer.
        output: The classifier (its output channels must never be removed).
        width_of: Constructor keyword that sets each hidden layer's output channels; layers
            that must keep the same width (coupled by a residual add) share a keyword.
        folds: ``{BatchNorm: the convolution it is stored folded into}`` (by reading the
            forward: each of these BatchNorms reads only that convolution's output).
    """

    name: str
    cls: type[nn.Module]
    input_shape: tuple[int, ...]
    first: str
    second: str
    output: str
    width_of: dict[str, str] = field(default_factory=dict)
    folds: dict[str, str] = field(default_factory=dict)

    def build(self, seed: int = 0, **widths: int) -> nn.Module:
        """A freshly initialized model (eval mode, randomized BatchNorm), seeded."""
        torch.manual_seed(seed)
        return randomize_batchnorm(self.cls(**widths), seed)

    def example_inputs(self, batch: int = 4, seed: int = 1) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(batch, *self.input_shape, generator=gen)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("mlp", MLP, (16,), "net.0", "net.2", "net.6",
                  {"net.0": "h1", "net.2": "h2", "net.4": "h3"}),
        ModelSpec("conv1d", Conv1dNet, (2, 16), "conv1", "conv2", "head",
                  {"conv1": "c1", "conv2": "c2"}, {"bn1": "conv1", "bn2": "conv2"}),
        ModelSpec("conv2d", Conv2dNet, (1, 8, 8), "conv1", "conv2", "head",
                  {"conv1": "c1", "conv2": "c2"}, {"bn1": "conv1", "bn2": "conv2"}),
        ModelSpec("residual", ResidualNet, (1, 8, 8), "stem", "conv_a", "head",
                  {"stem": "width", "conv_b": "width", "conv_a": "inner",
                   "branch1": "branch1", "branch2": "branch2"},
                  {"stem_bn": "stem", "bn_a": "conv_a", "bn_b": "conv_b"}),
    )
}


def synthetic_classification(n: int, features: int = 16, seed: int = 0
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable problem: the label is the arg-max of a fixed random linear map of x."""
    gen = torch.Generator().manual_seed(seed)
    w_true = torch.randn(features, CLASSES, generator=torch.Generator().manual_seed(1234))
    x = torch.randn(n, features, generator=gen)
    return x, (x @ w_true).argmax(dim=1)


def tiny_task(train: bool = True) -> Task:
    """A 4-class synthetic problem with a small MLP (about a second to build).

    Args:
        train: Train the baseline (default); False leaves it at its random initialization.
    """
    x_train, y_train = synthetic_classification(512, seed=0)
    x_val, y_val = synthetic_classification(256, seed=1)
    train_loader = DataLoader(TensorDataset(x_train, y_train), batch_size=64, shuffle=True,
                              generator=torch.Generator().manual_seed(0))
    val_loader = DataLoader(TensorDataset(x_val, y_val), batch_size=256)
    torch.manual_seed(0)
    model = MLP()
    if train:
        _fit(model, train_loader, epochs=15)
    return Task(model=model, train_loader=train_loader, val_loader=val_loader,
                example_inputs=x_val[:4], name="tiny")


def _fit(model: nn.Module, loader: DataLoader, epochs: int) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    model.eval()


def not_a_task() -> dict:
    """A bad user task: returns a dict, not a Task."""
    return {"model": MLP()}



class GroupedNet(nn.Module):
    """A grouped Conv1d (``conv``, groups=2; low-rank refuses it) and a Linear ``head``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 8, 3, padding=1, groups=2)
        self.head = nn.Linear(8 * 8, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x.view(len(x), 2, 8))).flatten(1))


def grouped_task() -> Task:
    """The tiny problem with :class:`GroupedNet`. Its metric fails for plans that factorize the
    head (a stand-in for a plan that breaks a user's model in the trial); the grouped ``conv``
    refuses ``rank``, so a search never samples that."""
    from autocompress.compress import LowRank
    from autocompress.measure import top1_accuracy

    x_train, y_train = synthetic_classification(512, seed=0)
    x_val, y_val = synthetic_classification(256, seed=1)
    train_loader = DataLoader(TensorDataset(x_train, y_train), batch_size=64, shuffle=True,
                              generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = GroupedNet()
    _fit(model, train_loader, epochs=10)

    def metric(model: nn.Module, loader) -> float:
        if isinstance(getattr(model, "head", None), LowRank):
            raise RuntimeError("this task's metric refuses a factorized head")
        return top1_accuracy(model, loader)

    return Task(model=model, train_loader=train_loader,
                val_loader=DataLoader(TensorDataset(x_val, y_val), batch_size=256),
                example_inputs=x_val[:4], metric=metric, name="grouped")


def crashing_task() -> Task:
    """The tiny task whose metric kills the worker process (``os._exit``) when the last layer
    has 4-bit weights: a stand-in for a segfault or an out-of-memory kill in a trial."""
    import os

    from autocompress.compress import WeightCompression

    def metric(model: nn.Module, loader) -> float:
        bits = [m.bits for m in model.net[6].modules() if isinstance(m, WeightCompression)]
        if 4 in bits:
            os._exit(1)
        from autocompress.measure import top1_accuracy

        return top1_accuracy(model, loader)

    task = tiny_task()
    task.metric = metric
    return task
