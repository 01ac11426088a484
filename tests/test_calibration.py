"""Calibration data and per-layer input statistics (compress/_calibration.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autocompress.compress import (
    Calibration,
    LayerPlan,
    Plan,
    calibration_problem,
    input_rows,
    input_stats,
    output_error,
    weight_matrix,
)


def test_from_batches_takes_exactly_the_samples_asked_for():
    batches = [torch.randn(10, 3) for _ in range(5)]
    cal = Calibration.from_batches(batches, 25)
    assert cal.samples == 25
    assert [b.shape[0] for b in cal.batches] == [10, 10, 5]
    assert torch.equal(cal.batches[2], batches[2][:5])
    assert Calibration.from_batches(batches, 1000).samples == 50
    assert Calibration.empty().is_empty and not cal.is_empty


def test_from_batches_cuts_dict_batches():
    batches = [{"ids": torch.arange(8).view(4, 2), "mask": torch.ones(4, 2)}] * 2
    cal = Calibration.from_batches(batches, 6)
    assert cal.samples == 6 and cal.batches[1]["ids"].shape == (2, 2)


@pytest.mark.parametrize("layer, shape", [
    (nn.Linear(6, 4), (5, 7, 6)),
    (nn.Conv2d(3, 4, 3, stride=2, padding=1), (2, 3, 7, 7)),
    (nn.Conv2d(3, 4, 3, padding="same", dilation=2), (2, 3, 6, 6)),
    (nn.Conv1d(3, 5, 3, stride=2, padding=1), (2, 3, 9)),
])
def test_input_rows_times_the_weight_matrix_is_the_layer(layer: nn.Module, shape: tuple) -> None:
    x = torch.randn(shape)
    rows = input_rows(layer, x)
    out = layer(x)
    expected = out.movedim(1, -1).reshape(-1, out.shape[1]) if not isinstance(
        layer, nn.Linear) else out.reshape(-1, out.shape[-1])
    got = rows @ weight_matrix(layer).T + layer.bias
    assert torch.allclose(got, expected, atol=1e-5)


def test_input_stats_are_the_gram_matrix_of_every_input_row():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    batches = [torch.randn(4, 5) for _ in range(3)]
    stats = input_stats(model, [model[0], model[2]], Calibration(tuple(batches)))
    x = torch.cat(batches).double()
    assert torch.allclose(stats[model[0]].gram, x.T @ x)
    assert stats[model[0]].rows == 12
    hidden = torch.relu(model[0](torch.cat(batches))).double()
    assert torch.allclose(stats[model[2]].gram, hidden.T @ hidden, atol=1e-6)
    assert torch.allclose(stats[model[2]].norms.double(), hidden.norm(dim=0), atol=1e-5)
    assert torch.allclose(stats[model[2]].mean_abs.double(), hidden.abs().mean(0), atol=1e-6)
    assert torch.allclose(stats[model[2]].absmax.double(), hidden.abs().amax(0), atol=1e-6)
    assert model.training  # put back as it was


def test_output_error_is_the_relative_error_of_the_layer_outputs():
    torch.manual_seed(0)
    layer = nn.Linear(6, 4, bias=False)
    batch = torch.randn(50, 6)
    stats = input_stats(layer, [layer], Calibration((batch,)))[layer]
    w = weight_matrix(layer)
    new = w + 0.1 * torch.randn_like(w)
    exact = ((batch @ (new - w).T).pow(2).sum() / (batch @ w.T).pow(2).sum()).item()
    assert output_error(w, new, stats) == pytest.approx(exact, rel=1e-6)
    assert output_error(w, w, stats) == 0.0


def test_layers_without_an_input_matrix_are_refused_with_the_reason():
    assert "token indices" in calibration_problem(nn.Embedding(10, 4))
    assert "groups=4" in calibration_problem(nn.Conv2d(4, 4, 3, groups=4))
    assert calibration_problem(nn.Conv2d(4, 4, 3)) is None
    with pytest.raises(ValueError, match="token indices"):
        emb = nn.Embedding(10, 4)
        input_stats(emb, [emb], Calibration((torch.zeros(2, 3, dtype=torch.long),)))
    with pytest.raises(ValueError, match="empty Calibration"):
        input_stats(nn.Linear(2, 2), [], Calibration.empty())


def test_a_plan_says_whether_it_needs_calibration():
    assert not Plan({"fc": LayerPlan(bits=4, sparsity=0.5)}).needs_calibration
    assert Plan({"fc": LayerPlan(bits=4, quantizer="gptq")}).needs_calibration
    assert Plan({"fc": LayerPlan(sparsity=0.5, pruner="wanda")}).needs_calibration
    # A calibrated knob that changes nothing (no sparsity) needs nothing.
    assert not Plan({"fc": LayerPlan(pruner="wanda")}).needs_calibration


def test_a_calibration_too_small_for_a_layer_refuses_its_calibrated_knobs():
    from autocompress.compress import describe_layers

    model = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    layers = {la.name: la for la in describe_layers(model, torch.randn(2, 784))}
    reasons = {(r.knob, r.value): r.reason for r in layers["0"].refusals}
    assert "256 input rows for 784 inputs" in reasons[("quantizer", "gptq")]
    assert "calibration_samples to 784" in reasons[("pruner", "wanda")]
    assert ("decomposition", "whitened") in reasons
    assert not any(r.knob == "quantizer" for r in layers["2"].refusals)
    enough = describe_layers(model, torch.randn(2, 784), calibration_samples=1000)
    assert not any(r.knob == "quantizer" for r in enough[0].refusals)
