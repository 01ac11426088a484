"""The mask pruners (``pruner``: magnitude, wanda, sparsegpt) and ``structure: "2:4"``
(compress/_sparse.py, compress/_sparsegpt.py): their defining properties on small layers with
realistic calibration inputs, exact counts and patterns, regrowth, empty calibration, export
and rebuild, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from autocompress.compress import (
    Calibration,
    LayerPlan,
    Plan,
    PlanError,
    Regrowth,
    apply,
    bake,
    describe_layers,
    find_weight_compression,
    input_stats,
    output_error,
)
from autocompress.compress.prune import MASK_PRUNERS, n_m_mask
from tests.models import MODELS

PRUNERS = ("magnitude", "wanda", "sparsegpt")


def _correlated_inputs(n: int, d: int, seed: int = 0, outliers: int = 4) -> torch.Tensor:
    """Rows ``(n, d)`` as a transformer's activations look: correlated features (a random mix
    of fewer latent factors plus noise) and a few outlier channels 20x larger."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d // 2, d, generator=gen) / (d // 2) ** 0.5
    x = torch.randn(n, d // 2, generator=gen) @ mix + 0.1 * torch.randn(n, d, generator=gen)
    x[:, torch.randperm(d, generator=gen)[:outliers]] *= 20
    return x


def _conv_inputs(n: int, channels: int, seed: int = 0) -> torch.Tensor:
    """Images ``(n, channels, 10, 10)``: correlated channels, two of them 20x larger."""
    x = _correlated_inputs(n * 100, channels, seed, outliers=2)
    return x.reshape(n, 10, 10, channels).permute(0, 3, 1, 2).contiguous()


LAYERS = {
    "linear": (lambda: nn.Linear(64, 32), lambda: _correlated_inputs(1024, 64)),
    "conv2d": (lambda: nn.Conv2d(8, 16, 3, padding=1), lambda: _conv_inputs(16, 8)),
}


def _prune(kind: str, **knobs) -> tuple[float, torch.Tensor]:
    """Layer-local output error (on the calibration inputs) of pruning a seeded ``kind`` layer
    with ``knobs``, and the pruned weight."""
    build, inputs = LAYERS[kind]
    torch.manual_seed(0)
    model, x = nn.Sequential(build()), inputs()
    calibration = Calibration.from_batches([x], samples=len(x))
    stats = input_stats(model, [model[0]], calibration)[model[0]]
    pruned = apply(model, Plan({"0": LayerPlan(**knobs)}), x[:2], calibration=calibration)
    w = pruned[0].weight.detach()
    return output_error(model[0].weight, w, stats), w


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_calibrated_pruners_lose_less_output_than_magnitude(kind: str, sparsity: float) -> None:
    errors = {p: _prune(kind, sparsity=sparsity, pruner=p)[0] for p in PRUNERS}
    assert errors["wanda"] < errors["magnitude"], errors
    assert errors["sparsegpt"] < errors["magnitude"], errors
    assert errors["sparsegpt"] < 0.5 * errors["magnitude"], errors  # compensation: far below


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("pruner", PRUNERS)
def test_every_pruner_prunes_exactly_its_count_or_pattern(kind: str, pruner: str) -> None:
    _, w = _prune(kind, sparsity=0.3, pruner=pruner)
    assert int((w == 0).sum()) == round(0.3 * w.numel())
    _, w = _prune(kind, sparsity=0.5, structure="2:4", pruner=pruner)
    zeros = (w.flatten(1) == 0).reshape(len(w), -1, 4).sum(-1)
    assert (zeros == 2).all()


@pytest.mark.parametrize("kind", list(LAYERS))
def test_2_4_sparsegpt_loses_less_output_than_2_4_magnitude(kind: str) -> None:
    errors = {p: _prune(kind, sparsity=0.5, structure="2:4", pruner=p)[0]
              for p in ("magnitude", "sparsegpt")}
    assert errors["sparsegpt"] < errors["magnitude"], errors


def test_n_m_groups_are_consecutive_columns_and_a_partial_last_group_stays_whole() -> None:
    """A low-rank factor's width need not be a multiple of 4 (``limits`` checks the layer's)."""
    from autocompress.compress._sparse import n_m_keep

    score = torch.tensor([[4.0, 1.0, 3.0, 2.0, 5.0, 6.0, 0.5, 7.0, 0.1, 0.2]])
    kept = n_m_keep(score, 2, 4)
    assert kept.tolist() == [[True, False, True, False, False, True, False, True, True, True]]


def test_sparsegpt_without_pruning_keeps_the_weight() -> None:
    """Nothing pruned, nothing to compensate: the solver returns the weight as it was."""
    from autocompress.compress._sparse import MaskTarget

    layer = nn.Linear(40, 8)
    model = nn.Sequential(layer)
    x = _correlated_inputs(256, 40)
    stats = input_stats(model, [layer], Calibration.from_batches([x]))[layer]
    kept, new = MASK_PRUNERS.get("sparsegpt")(layer.weight.detach().double(), MaskTarget(0.0), stats)
    assert kept.all()
    torch.testing.assert_close(new, layer.weight.detach().double(), atol=1e-12, rtol=0)


def test_regrowth_keeps_2_4_and_calibrated_masks_stay_fixed() -> None:
    model, x = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)), torch.randn(64, 16)
    plan = Plan({"0": LayerPlan(sparsity=0.5, structure="2:4"),
                 "2": LayerPlan(sparsity=0.5, pruner="sparsegpt")})
    pruned = apply(model, plan, x, calibration=Calibration.from_batches([x]))
    magnitude, calibrated = (find_weight_compression(pruned[i]) for i in (0, 2))
    assert magnitude.mask_rule == "2:4" and calibrated.mask_rule is None
    before = calibrated.mask.clone()
    with torch.no_grad():
        for i in (0, 2):
            original = pruned[i].parametrizations.weight.original
            original[~find_weight_compression(pruned[i]).mask] = 100.0  # the pruned grow large
    with Regrowth(pruned) as regrowth:
        assert not calibrated.regrow
        regrowth.refresh()
    mask = magnitude.mask
    assert torch.equal(mask, n_m_mask(pruned[0].parametrizations.weight.original.detach()))
    assert ((~mask).reshape(8, -1, 4).sum(-1) == 2).all()
    assert not mask.equal(n_m_mask(model[0].weight.detach()))  # the grown weights came back
    assert torch.equal(calibrated.mask, before)


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_an_empty_calibration_masks_by_magnitude_with_the_same_counts(pruner: str,
                                                                      structure: str) -> None:
    """Rebuilding a logged trial passes no data: the same masks' structure (the magnitude
    rule's, the same counts), no rule, the weights left to be loaded."""
    model, x = nn.Sequential(nn.Linear(16, 8)), torch.randn(64, 16)
    plan = Plan({"0": LayerPlan(sparsity=0.5, structure=structure, pruner=pruner)})
    empty = apply(model, plan, x, calibration=Calibration.empty())
    calibrated = apply(model, plan, x, calibration=Calibration.from_batches([x]))
    magnitude = apply(model, Plan({"0": LayerPlan(sparsity=0.5, structure=structure)}), x)
    wc = find_weight_compression(empty[0])
    assert torch.equal(wc.mask, find_weight_compression(magnitude[0]).mask)
    assert int(wc.mask.sum()) == int(find_weight_compression(calibrated[0]).mask.sum())
    assert wc.mask_rule is None
    assert torch.equal(empty[0].parametrizations.weight.original, model[0].weight)


@pytest.mark.parametrize("pruner", PRUNERS)
def test_low_rank_factors_are_pruned_each_in_one_calibration_pass(pruner: str,
                                                                  monkeypatch) -> None:
    from autocompress.compress import _sparse

    passes = []
    real = _sparse.input_stats
    monkeypatch.setattr(_sparse, "input_stats", lambda *a: passes.append(a) or real(*a))
    spec = MODELS["mlp"]
    x = spec.example_inputs(64)
    plan = Plan({"net.0": LayerPlan(sparsity=0.5, pruner=pruner),
                 "net.2": LayerPlan(sparsity=0.5, structure="2:4", rank=0.5, pruner=pruner)})
    pruned = apply(spec.build(), plan, x, calibration=Calibration.from_batches([x]))
    assert len(passes) == (pruner != "magnitude")
    for leaf in (pruned.net[0], *pruned.net[2]):
        assert float((leaf.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.07)


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
@pytest.mark.parametrize("pruner", PRUNERS)
def test_each_pruner_exports_and_rebuilds_from_its_logged_weights(pruner: str, structure: str,
                                                                  tmp_path: Path) -> None:
    """A tiny model pruned (with 4- and 8-bit weights and a low-rank layer) exports to ONNX and
    to the packed format with its outputs, and rebuilding it as a logged trial is
    (``apply(plan, Calibration.empty())``, then the baked weights) gives the same model."""
    from autocompress.deploy._artifacts import _OnnxModule
    from autocompress.deploy._packed import load_packed, save_packed
    from autocompress.deploy._rebuild import load_baked_state
    from autocompress.measure import size_bytes
    from autocompress.onnxgraph import export_onnx

    spec = MODELS["mlp"]
    baseline, x = spec.build(), spec.example_inputs(64)
    knobs = {"sparsity": 0.5, "structure": structure, "pruner": pruner}
    plan = Plan({"net.0": LayerPlan(**knobs, bits=8), "net.2": LayerPlan(**knobs, rank=0.5),
                 "net.4": LayerPlan(**knobs, bits=4)})
    trial = apply(baseline, plan, x[:4], calibration=Calibration.from_batches([x]))
    expected = bake(trial)(x)
    onnx = _OnnxModule(export_onnx(trial, x[:4], tmp_path / "m.onnx"))
    torch.testing.assert_close(onnx(x), expected, atol=1e-4, rtol=0)
    packed = load_packed(save_packed(trial, tmp_path / "m.acpk").path)
    torch.testing.assert_close(packed(x), expected, atol=1e-5, rtol=0)

    rebuilt = apply(baseline, plan, x[:4], calibration=Calibration.empty())
    load_baked_state(rebuilt, bake(trial).state_dict(), plan)
    torch.testing.assert_close(rebuilt(x), trial(x), atol=1e-6, rtol=0)
    assert size_bytes(rebuilt) == size_bytes(trial)


def test_refusals_show_in_describe_layers_and_refuse_the_plan() -> None:
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randint(0, 10, (2, 5))
    refusals = {la.name: {(r.knob, r.value): r.reason for r in la.refusals}
                for la in describe_layers(model, x)}
    for pruner in ("wanda", "sparsegpt"):
        assert "token indices" in refusals["0"][("pruner", pruner)]
    assert ("pruner", "magnitude") not in refusals["0"]
    assert "input width 6 is not a multiple of 4" in refusals["3"][("structure", "2:4")]
    assert ("structure", "2:4") not in refusals["1"]
    with pytest.raises(PlanError, match="token indices"):
        apply(model, Plan({"0": LayerPlan(sparsity=0.5, pruner="wanda")}), x)
    with pytest.raises(PlanError, match="not a multiple of 4"):
        apply(model, Plan({"3": LayerPlan(sparsity=0.5, structure="2:4")}), x)
