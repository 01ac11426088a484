"""BatchNorm folding: which BatchNorms are stored inside their convolution, and that the folded
model computes what the unfolded one does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autocompress.compress import apply
from autocompress.compress._bake import bake
from autocompress.compress._fold import Fold, find_folds, fold_into
from autocompress.compress._plan import LayerPlan, Plan
from autocompress.deploy._packed import load_packed, save_packed
from autocompress.measure import count_params, size_bytes
from tests import real_models
from tests.models import MODELS, randomize_batchnorm

CONV_FAMILIES = [name for name, spec in MODELS.items() if spec.folds]


@pytest.mark.parametrize("name", CONV_FAMILIES)
def test_every_batchnorm_after_a_conv_is_found(name: str) -> None:
    spec = MODELS[name]
    assert set(find_folds(spec.build())) == {Fold(c, bn) for bn, c in spec.folds.items()}


@pytest.mark.parametrize("knobs", [
    {}, {"bits": 4}, {"bits": 3, "scheme": "pow2"}, {"sparsity": 0.6, "bits": 5},
    {"sparsity": 0.5, "structure": "channel", "bits": 8}, {"rank": 0.5, "bits": 6},
    {"sparsity": 0.7},
], ids=["fp32", "4bit", "pow2", "sparse-5bit", "channel-8bit", "rank-6bit", "sparse-fp32"])
@pytest.mark.parametrize("name", CONV_FAMILIES)
def test_folded_model_computes_the_same_and_is_stored_so(name: str, knobs: dict,
                                                         tmp_path: Path) -> None:
    spec = MODELS[name]
    x = spec.example_inputs(8)
    new = apply(spec.build(), Plan({spec.first: LayerPlan(**knobs), spec.second: LayerPlan(**knobs)})
                if knobs else Plan({}), x)
    folds = find_folds(new)
    assert len(folds) == len(spec.folds)
    folded = bake(new)
    fold_into(folded, folds)
    for fold in folds:
        assert isinstance(folded.get_submodule(fold.batchnorm), nn.Identity)
    torch.testing.assert_close(folded(x), bake(new)(x), atol=1e-5, rtol=1e-5)
    info = save_packed(new, tmp_path / "m.acpk")
    assert info.payload_bytes == size_bytes(new)
    loaded = load_packed(info.path)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in loaded.modules())
    torch.testing.assert_close(loaded(x), bake(new)(x), atol=1e-5, rtol=1e-5)


def test_a_folded_batchnorm_costs_nothing_and_a_missing_bias_is_added() -> None:
    model = randomize_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)), 0)
    with torch.no_grad():
        model[0].weight.fill_(0.5)
    # the conv's 4 x 27 fp32 weight, plus the bias that carries the shift (4 fp32)
    assert size_bytes(model.eval()) == 4 * 4 * 27 + 4 * 4
    assert count_params(model) == (4 * 27 + 4, 4 * 27 + 4)


@pytest.mark.parametrize("knobs", [{}, {"bits": 4}], ids=["fp32", "4bit"])
def test_a_batchnorm_after_a_conv_subclass_is_folded_into_the_instance(knobs: dict) -> None:
    """timm's Conv2dSame pads in its forward: the folded weight and bias go into the instance,
    which keeps padding as it did (unevenly, see ``real_models.same_cnn``)."""
    model, x = real_models.same_cnn()
    randomize_batchnorm(model)
    new = apply(model, Plan({"stem": LayerPlan(**knobs), "conv": LayerPlan(**knobs)}), x)
    folds = find_folds(new)
    assert folds == [Fold("stem", "bn1"), Fold("conv", "bn2")]
    folded = bake(new)
    fold_into(folded, folds)
    assert isinstance(folded.bn1, nn.Identity) and isinstance(folded.bn2, nn.Identity)
    assert type(folded.stem) is real_models.Conv2dSame and folded.stem.name == "stem"
    torch.testing.assert_close(folded(x), bake(new)(x), atol=1e-5, rtol=1e-5)
    if not knobs:  # stored as convs with a bias and the head; the BatchNorms cost nothing
        assert size_bytes(new) == 4 * (8 * 3 * 9 + 8 + 12 * 8 * 12 + 12 + 12 * 3 + 3)


class _BatchNormReLU(nn.BatchNorm2d):
    """A BatchNorm subclass that does more than normalize (as timm's BatchNormAct2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x))


class _TwoReaders(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y  # the conv's output is read twice: folding would change y


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # control flow on a value: torch.fx cannot trace it
            x = -x
        return self.bn(self.conv(x))


@pytest.mark.parametrize("model", [
    nn.Sequential(nn.Conv2d(1, 4, 3), _BatchNormReLU(4)),
    nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)),  # features on the last dimension
    nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)),
    _TwoReaders(),
    _Untraceable(),
    nn.Sequential(real_models.StdConv2d(1, 4, 3), nn.BatchNorm2d(4)),  # would undo the scale
], ids=["batchnorm-subclass", "linear", "no-running-stats", "two-readers", "untraceable",
        "weight-standardizing-conv"])
def test_what_is_not_certain_is_not_folded(model: nn.Module) -> None:
    assert find_folds(model.eval()) == []


def test_not_into_16_bit_float_weights() -> None:
    spec = MODELS["conv2d"]
    new = apply(spec.build(), Plan({"conv1": LayerPlan(bits="fp16")}), spec.example_inputs())
    assert find_folds(new) == [Fold("conv2", "bn2")]
