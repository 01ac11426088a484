"""Calibrated structured pruning and whitened low-rank: ``structure: channel`` with
``pruner: wanda`` (activation-aware channel scores) and ``sparsegpt`` (greedy structured OBS
choice, then least-squares refit of the layers reading the cut channels), and
``decomposition: whitened`` (SVD-LLM).

Defining properties on calibration inputs with a realistic structure (correlated features, a
few outlier channels): the model's output error with reconstruction is below the error
without; whitened low-rank's layer-local output error is below svd's at the same rank. Then
what every knob must do: export to ONNX and to the packed format, and rebuild from an empty
calibration with the same shapes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from autocompress.compress import Calibration, apply, bake, input_stats, output_error
from autocompress.compress._plan import LayerPlan, Plan
from autocompress.compress.lowrank import factorize
from autocompress.deploy._packed import load_packed, save_packed
from tests.models import MODELS
from tests.test_prune_transformers import HEADS, SELF, bert, onnx_matches_torch


def correlated(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """``n`` samples of ``d`` correlated features, three of them outliers (10x larger)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen) @ torch.randn(d, d, generator=gen) / d ** 0.5
    x[:, [1, 5, d - 2]] *= 10
    return x


class Net(nn.Module):
    """An MLP ``16 -> 48 -> 32 -> 4``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(),
                                 nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def mlp() -> tuple[nn.Module, torch.Tensor, Calibration]:
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():  # channels of unequal importance: some weights much larger
        for layer in (model.net[0], model.net[2]):
            layer.weight.mul_(torch.rand(layer.weight.shape[0], 1) * 2 + 0.1)
    return model, correlated(4, 16, seed=1), Calibration((correlated(256, 16),))


def channel(sparsity: float, pruner: str) -> LayerPlan:
    return LayerPlan(sparsity=sparsity, structure="channel", pruner=pruner)


def relative_error(model: nn.Module, new: nn.Module, inputs) -> float:
    with torch.no_grad():
        want = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        got = new(**inputs) if isinstance(inputs, dict) else new(inputs)
    return float((got - want).norm() / want.norm())


# --- channels of an MLP ----------------------------------------------------------------------


def mlp_plan(pruner: str) -> Plan:
    return Plan({"net.0": channel(0.5, pruner), "net.2": channel(0.25, pruner)})


def test_reconstruction_lowers_the_output_error_of_channel_pruning() -> None:
    model, x, calibration = mlp()
    held_out = correlated(512, 16, seed=2)
    errors = {p: relative_error(model, apply(model, mlp_plan(p), x, calibration=calibration), held_out)
              for p in ("magnitude", "wanda", "sparsegpt")}
    assert errors["sparsegpt"] < 0.5 * errors["wanda"] < 0.5 * errors["magnitude"], errors


@pytest.mark.parametrize("pruners", [("sparsegpt", "wanda"), ("sparsegpt", "magnitude"),
                                     ("wanda", "sparsegpt"), ("magnitude", "sparsegpt")])
def test_pruners_mix_in_one_plan(pruners: tuple[str, str]) -> None:
    """A refit layer may lose its own outputs to another pruner's entry (and the reverse)."""
    model, x, calibration = mlp()
    plan = Plan({"net.0": channel(0.5, pruners[0]), "net.2": channel(0.25, pruners[1])})
    new = apply(model, plan, x, calibration=calibration)
    assert (new.net[0].out_features, new.net[2].out_features) == (24, 24)
    held_out = correlated(512, 16, seed=2)
    magnitude = apply(model, mlp_plan("magnitude"), x, calibration=calibration)
    assert relative_error(model, new, held_out) < relative_error(model, magnitude, held_out)


def test_every_pruner_cuts_the_same_number_of_channels() -> None:
    model, x, calibration = mlp()
    for pruner in ("magnitude", "wanda", "sparsegpt"):
        for cal in (calibration, Calibration.empty()):
            new = apply(model, mlp_plan(pruner), x, calibration=cal)
            assert (new.net[0].out_features, new.net[2].out_features) == (24, 24)
            assert new.net[2].in_features == 24 and new.net[4].in_features == 24


def test_magnitude_is_unchanged_by_calibration() -> None:
    model, x, calibration = mlp()
    a = apply(model, mlp_plan("magnitude"), x, calibration=calibration)
    b = apply(model, mlp_plan("magnitude"), x, calibration=Calibration.empty())
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_the_refit_only_compares_outputs(monkeypatch) -> None:
    """Undamped, with nothing upstream changed, the refit of the last layer is the
    least-squares solution: its outputs on the calibration inputs are the projection of the
    original outputs on the kept channels."""
    import autocompress.compress._reconstruct as reconstruct

    monkeypatch.setattr(reconstruct, "REFIT_DAMP", 1e-9)
    model, x, calibration = mlp()
    new = apply(model, Plan({"net.2": channel(0.25, "sparsegpt")}), x, calibration=calibration)
    hidden = model.net[:4](calibration.batches[0])
    kept = new.net[:4](calibration.batches[0])
    target = model(calibration.batches[0])
    lsq = torch.linalg.lstsq(torch.cat([kept, torch.ones(len(kept), 1)], 1), target).solution
    best = (torch.cat([kept, torch.ones(len(kept), 1)], 1) @ lsq - target).norm()
    got = (new(calibration.batches[0]) - target).norm()
    assert hidden.shape[1] == 32 and kept.shape[1] == 24
    assert got <= best * 1.05 + 1e-6


@pytest.mark.parametrize("name", ["conv1d", "conv2d", "residual"])
def test_reconstruction_lowers_the_output_error_of_cnn_channel_pruning(name: str) -> None:
    """The next conv (and, through a residual add, every conv reading the cut channels; the
    head after a flatten or a mean) is refit; the pruned widths are those of magnitude."""
    spec = MODELS[name]
    model, x = spec.build(), spec.example_inputs(4)
    plan = {p: Plan({spec.first: channel(0.5, p), spec.second: channel(0.5, p)})
            for p in ("magnitude", "wanda", "sparsegpt")}
    calibration = Calibration((spec.example_inputs(128, seed=2),))
    new = {p: apply(model, plan[p], x, calibration=calibration) for p in plan}
    held_out = spec.example_inputs(256, seed=3)
    errors = {p: relative_error(model, m, held_out) for p, m in new.items()}
    assert errors["sparsegpt"] < errors["magnitude"] and errors["sparsegpt"] < errors["wanda"], errors
    shapes = [{k: v.shape for k, v in m.state_dict().items()} for m in new.values()]
    assert shapes[0] == shapes[1] == shapes[2]


# --- heads and FFN neurons of a tiny BERT ----------------------------------------------------


def bert_plan(pruner: str) -> Plan:
    return Plan({f"{SELF}.query": channel(0.5, pruner),
                 "bert.encoder.layer.1.attention.self.key": channel(0.25, pruner),
                 "bert.encoder.layer.0.intermediate.dense": channel(0.5, pruner),
                 "bert.encoder.layer.1.intermediate.dense": channel(0.5, pruner)})


def bert_calibration(batches: int = 4) -> Calibration:
    gen = torch.Generator().manual_seed(1)
    return Calibration(tuple({"input_ids": torch.randint(1, 100, (16, 10), generator=gen),
                              "attention_mask": torch.ones(16, 10, dtype=torch.long)}
                             for _ in range(batches)))


def test_reconstruction_lowers_the_output_error_of_head_and_ffn_pruning() -> None:
    model, x = bert()
    calibration = bert_calibration()
    held_out = bert_calibration(1).batches[0]
    errors = {p: relative_error(model, apply(model, bert_plan(p), x, calibration=calibration), held_out)
              for p in ("magnitude", "wanda", "sparsegpt")}
    assert errors["sparsegpt"] < errors["wanda"] and errors["sparsegpt"] < errors["magnitude"], errors
    new = apply(model, bert_plan("sparsegpt"), x, calibration=calibration)
    heads = [new.bert.encoder.layer[i].attention.self.num_attention_heads for i in (0, 1)]
    assert heads == [HEADS // 2, HEADS - 1]


def test_reconstructed_bert_exports_to_onnx(tmp_path: Path) -> None:
    """(The packed format does not take Hugging Face models, which torch.fx cannot trace; the
    MLP below checks it.)"""
    model, x = bert()
    onnx_matches_torch(apply(model, bert_plan("sparsegpt"), x, calibration=bert_calibration()), x, tmp_path)


def test_reconstructed_mlp_exports_to_onnx_and_packed(tmp_path: Path) -> None:
    model, x, calibration = mlp()
    new = apply(model, mlp_plan("sparsegpt"), x, calibration=calibration)
    onnx_matches_torch(new, x, tmp_path)
    info = save_packed(new, tmp_path / "m.acpk")
    torch.testing.assert_close(load_packed(info.path)(x), bake(new)(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_rebuild_from_an_empty_calibration_gives_the_same_model(pruner: str) -> None:
    model, x = bert()
    plan = bert_plan(pruner)
    new = apply(model, plan, x, calibration=bert_calibration())
    rebuilt = apply(model, plan, x, calibration=Calibration.empty())
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in new.state_dict().items()}
    rebuilt.load_state_dict(new.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(**x), new(**x))


# --- whitened low-rank -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_whitened_lowrank_errs_less_than_svd_on_the_calibration_inputs(kind: str) -> None:
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = nn.Linear(24, 32), correlated(512, 24)
    else:
        layer = nn.Conv2d(6, 16, 3, padding=1)
        x = correlated(64 * 36, 6).view(64, 6, 6, 6)
        x = x.permute(0, 3, 1, 2).contiguous()
    stats = input_stats(layer, [layer], Calibration((x,)))[layer]
    for fraction in (0.25, 0.5):
        svd = factorize(layer, fraction, "svd")
        whitened = factorize(layer, fraction, "whitened", stats=stats)
        assert [f.weight.shape for f in svd] == [f.weight.shape for f in whitened]
        w = layer.weight.flatten(1)
        err = {k: output_error(w, (f[1].weight.flatten(1) @ f[0].weight.flatten(1)), stats)
               for k, f in (("svd", svd), ("whitened", whitened))}
        assert err["whitened"] < err["svd"], err
    full = factorize(layer, 1.0, "whitened", stats=stats)
    torch.testing.assert_close(full(x), layer(x), atol=1e-4, rtol=1e-4)


def test_whitened_lowrank_in_a_model_exports_and_rebuilds(tmp_path: Path) -> None:
    model, x, calibration = mlp()
    plan = Plan({"net.0": LayerPlan(rank=0.5, decomposition="whitened"),
                 "net.2": channel(0.25, "sparsegpt")})
    new = apply(model, plan, x, calibration=calibration)
    svd = apply(model, Plan({"net.0": LayerPlan(rank=0.5),
                             "net.2": channel(0.25, "sparsegpt")}), x, calibration=calibration)
    held_out = correlated(512, 16, seed=2)
    assert relative_error(model, new, held_out) < relative_error(model, svd, held_out)
    onnx_matches_torch(new, x, tmp_path)
    info = save_packed(new, tmp_path / "m.acpk")
    torch.testing.assert_close(load_packed(info.path)(x), bake(new)(x), atol=1e-5, rtol=0)
    rebuilt = apply(model, plan, x, calibration=Calibration.empty())
    rebuilt.load_state_dict(new.state_dict())
    torch.testing.assert_close(rebuilt(x), new(x))


def test_whitened_is_refused_where_inputs_cannot_be_weighed() -> None:
    from autocompress.compress._plan import PlanError

    class Embed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.head = nn.Embedding(10, 8), nn.Linear(8, 2)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(ids).mean(1))

    ids = torch.randint(0, 10, (2, 5))
    with pytest.raises(PlanError, match="embed.*decomposition='whitened'.*token indices"):
        apply(Embed(), Plan({"embed": LayerPlan(rank=0.5, decomposition="whitened")}), ids)
    new = apply(Embed(), Plan({"head": LayerPlan(rank=0.5, decomposition="whitened")}), ids)
    assert new(ids).shape == (2, 2)


def test_the_refit_is_the_same_with_or_without_cached_targets(monkeypatch) -> None:
    """The uncut model's outputs are kept from one pass while they fit; past the budget each
    refit reruns it: the same refit either way."""
    import autocompress.compress._reconstruct as reconstruct

    model, x = bert()
    cached = apply(model, bert_plan("sparsegpt"), x, calibration=bert_calibration())
    monkeypatch.setattr(reconstruct, "CACHE_BYTES", 0)
    rerun = apply(model, bert_plan("sparsegpt"), x, calibration=bert_calibration())
    for (name, a), b in zip(cached.state_dict().items(), rerun.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_channels_of_a_whitened_factorization_are_pruned_and_refit() -> None:
    """Low-rank first, then the channels of its last factor, the consumer refit."""
    model, x, calibration = mlp()
    both = {"sparsity": 0.5, "structure": "channel", "rank": 0.5}
    new = apply(model, Plan({"net.0": LayerPlan(**both, decomposition="whitened", pruner="sparsegpt")}),
                x, calibration=calibration)
    plain = apply(model, Plan({"net.0": LayerPlan(**both)}), x, calibration=calibration)
    assert new.net[0][1].out_features == plain.net[0][1].out_features == 24
    held_out = correlated(512, 16, seed=2)
    assert relative_error(model, new, held_out) < relative_error(model, plain, held_out)
