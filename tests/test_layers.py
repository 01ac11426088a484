"""Finding compressible layers: names, types, shapes, params, MACs, the output layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autocompress.compress._layers import count_macs, find_layers
from tests.models import MODELS


class Mixed(nn.Module):
    """Every layer kind, with MACs worked out by hand in ``EXPECTED``.

    The head is defined first but runs last: the output layer is found by execution order.
    """

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(20, 10)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.grouped = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2, bias=False)
        self.conv1d = nn.Conv1d(8, 4, 3)
        self.seq = nn.Linear(4, 5)
        self.shared = nn.Linear(20, 20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.grouped(torch.relu(self.bn(self.conv(x))))  # (N, 8, 4, 4)
        x = self.conv1d(x.flatten(2))  # (N, 4, 14)
        x = self.seq(x.transpose(1, 2)).flatten(1)[:, :20]  # (N, 14, 5) -> (N, 20)
        x = self.shared(torch.relu(self.shared(x)))  # the same layer runs twice
        return self.head(x)


EXPECTED = [
    # name, type, weight shape, params, MACs per sample
    ("head", "Linear", (10, 20), 200 + 10, 10 * 20),
    # 4 x 8 x 8 outputs, each 1 x 3 x 3 MACs
    ("conv", "Conv2d", (4, 1, 3, 3), 36 + 4, 4 * 8 * 8 * 9),
    # groups=2: each output sees 4 / 2 input channels; 8 x 4 x 4 outputs
    ("grouped", "Conv2d", (8, 2, 3, 3), 144, 8 * 4 * 4 * 2 * 9),
    # length 16 -> 14 with kernel 3 and no padding
    ("conv1d", "Conv1d", (4, 8, 3), 96 + 4, 4 * 14 * 8 * 3),
    # a Linear on a sequence: 14 positions x 5 outputs x 4 inputs
    ("seq", "Linear", (5, 4), 20 + 5, 14 * 5 * 4),
    ("shared", "Linear", (20, 20), 400 + 20, 2 * 20 * 20),
]


@pytest.mark.parametrize("batch", [1, 3])
def test_find_layers_hand_computed(batch: int) -> None:
    torch.manual_seed(0)
    layers = find_layers(Mixed(), torch.randn(batch, 1, 8, 8))
    got = [(la.name, la.type, la.shape, la.params, la.macs) for la in layers]
    assert got == EXPECTED
    assert [la.name for la in layers if la.is_output] == ["head"]


def test_count_macs_skips_nothing_that_runs() -> None:
    torch.manual_seed(0)
    macs = count_macs(Mixed(), torch.randn(2, 1, 8, 8))
    assert macs == {name: m for name, _, _, _, m in EXPECTED}


def test_to_dict_is_the_cli_shape() -> None:
    layer = find_layers(Mixed(), torch.randn(1, 1, 8, 8))[1]
    assert layer.to_dict() == {"name": "conv", "type": "Conv2d", "shape": [4, 1, 3, 3],
                               "params": 40, "macs": 2304, "is_output": False}


def test_find_layers_leaves_the_model_as_it_was() -> None:
    torch.manual_seed(0)
    model = Mixed().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    find_layers(model, torch.randn(4, 1, 8, 8) * 5)
    assert model.training and model.bn.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed (BatchNorm must not see the pass)"
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("name", list(MODELS))
def test_test_models_classifier_is_the_output(name: str) -> None:
    spec = MODELS[name]
    layers = find_layers(spec.build(), spec.example_inputs())
    assert [la.name for la in layers if la.is_output] == [spec.output]
    assert {spec.first, spec.second} <= {la.name for la in layers}
    assert all(la.macs > 0 for la in layers)
