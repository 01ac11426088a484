"""GPTQ (``quantizer: gptq``, compress/_gptq.py) and the group-wise formats it stores: the
layer-local output error below round-to-nearest's, the stored weight on its format's grid,
masks, low-rank factors, an empty calibration, export to ONNX and to the packed file, size
accounting and the refusals at resolution."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from autocompress.compress import apply, bake, describe_layers, quantized_weights
from autocompress.compress._calibration import (
    Calibration,
    InputStats,
    input_stats,
    output_error,
)
from autocompress.compress._gptq import gptq_weight
from autocompress.compress._modules import find_weight_compression
from autocompress.compress._plan import LayerPlan, Plan, PlanError
from autocompress.compress.formats import weight_format
from autocompress.deploy._packed import load_packed, save_packed
from autocompress.measure import size_bytes, size_report
from autocompress.measure.size import planned_weight_bytes
from autocompress.onnxgraph import export_onnx


def _features(n: int, d: int, seed: int) -> torch.Tensor:
    """``n`` rows of ``d`` correlated features (a low-rank mix plus noise) with a few outlier
    channels: the structure of real activations, not iid noise."""
    g = torch.Generator().manual_seed(seed)
    k = max(4, d // 8)
    x = torch.randn(n, k, generator=g) @ torch.randn(k, d, generator=g) / math.sqrt(k)
    x = x + 0.3 * torch.randn(n, d, generator=g)
    x[:, torch.randperm(d, generator=g)[:3]] *= 15.0  # outlier channels
    return x


def _linear_case(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(256, 64)), _features(512, 256, seed)


def _conv_case(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A conv of 32 channels, 2x2 kernel (128 input columns), on images whose channels are
    correlated (with outliers) and whose pixels are smooth."""
    torch.manual_seed(seed)
    x = _features(64 * 49, 32, seed).reshape(64, 7, 7, 32).permute(0, 3, 1, 2)
    x = nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    return nn.Sequential(nn.Conv2d(32, 16, 2)), x.contiguous()


CASES = {"linear": _linear_case, "conv": _conv_case}


def _compressed(model: nn.Module, x: torch.Tensor, **knobs) -> nn.Module:
    return apply(model, Plan({"0": LayerPlan(**knobs)}), x[:4], calibration=Calibration((x,)))


def _stats(model: nn.Module, x: torch.Tensor) -> InputStats:
    layer = model.get_submodule("0")
    return input_stats(model, [layer], Calibration((x,)))[layer]


@pytest.mark.parametrize("group_size", [None, 128], ids=["per-channel", "g128"])
@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_gptq_output_error_is_below_round_to_nearest(case: str, bits: int,
                                                      group_size: int | None) -> None:
    model, x = CASES[case]()
    stats, w = _stats(model, x), model[0].weight
    errors = {q: output_error(w, _compressed(model, x, bits=bits, group_size=group_size,
                                             quantizer=q)[0].weight, stats)
              for q in ("rtn", "gptq")}
    assert errors["gptq"] < 0.5 * errors["rtn"], errors


@pytest.mark.parametrize("group_size", [None, 32, 128], ids=["per-channel", "g32", "g128"])
def test_the_stored_weight_is_on_the_formats_grid_without_losing_gptqs_advantage(
        group_size: int | None) -> None:
    model, x = _linear_case(1)
    layer = _compressed(model, x, bits=3, group_size=group_size, quantizer="gptq")[0]
    wc = find_weight_compression(layer)
    stored = layer.parametrizations["weight"].original.detach()
    assert torch.equal(wc.format.fake_quant(stored), stored)  # a fixed point: bake re-derives
    assert torch.equal(layer.weight, stored)
    assert torch.equal(bake(nn.Sequential(layer))[0].weight, stored)
    # What GPTQ computed, before the write-back through fake_quant, is no better.
    stats, w = _stats(model, x), model[0].weight.detach()
    raw = gptq_weight(w, stats.gram, wc.format, None, group_size)
    assert output_error(w, stored, stats) <= 1.01 * output_error(w, raw, stats)


@pytest.mark.parametrize("pruner", ["magnitude", "sparsegpt"])
def test_a_masked_layer_keeps_its_zeros_and_gptq_still_helps(pruner: str) -> None:
    model, x = _linear_case(2)
    stats = _stats(model, x)
    out = {q: _compressed(model, x, sparsity=0.5, pruner=pruner, bits=4, quantizer=q)[0]
           for q in ("rtn", "gptq")}
    mask = find_weight_compression(out["gptq"]).mask
    assert torch.equal(mask, find_weight_compression(out["rtn"]).mask)
    assert not bool(out["gptq"].weight[~mask].any())
    w = model[0].weight
    assert output_error(w, out["gptq"].weight, stats) < output_error(w, out["rtn"].weight, stats)


def test_low_rank_factors_are_both_rounded_by_gptq() -> None:
    model, x = _linear_case(3)
    knobs = {"bits": 4, "rank": 0.5, "group_size": 32}
    gptq, rtn = (_compressed(model, x, quantizer=q, **knobs) for q in ("gptq", "rtn"))
    for i in range(2):  # factors (32, 256) and (64, 32): the second one's input is the rank
        leaf, plain = gptq[0][i], rtn[0][i]
        stored = leaf.parametrizations["weight"].original.detach()
        assert torch.equal(find_weight_compression(leaf).format.fake_quant(stored), stored)
        assert not torch.equal(leaf.weight, plain.weight)
    y = model(x)
    assert (gptq(x) - y).pow(2).mean() < (rtn(x) - y).pow(2).mean()


def test_an_empty_calibration_sets_up_the_structure_only() -> None:
    model, x = _conv_case()
    plan = Plan({"0": LayerPlan(bits=4, group_size=128, quantizer="gptq")})
    built = apply(model, plan, x[:4], calibration=Calibration.empty())
    layer = built[0]
    assert torch.equal(layer.parametrizations["weight"].original, model[0].weight)
    assert find_weight_compression(layer).format.name == "int4-g128"


def test_too_little_calibration_still_runs_and_logs_a_warning(caplog) -> None:
    model, x = _linear_case(4)
    with caplog.at_level("WARNING", logger="autocompress.compress._gptq"):
        _compressed(model, x[:16], bits=4, quantizer="gptq")  # 16 rows < 256 columns
    assert "calibration smaller than the input width" in caplog.text
    assert "0: 16 rows for 256 inputs" in caplog.text


class _Tiny(nn.Module):
    """A conv (+ BatchNorm, folded on export) and two Linears, GPTQ-able at every group size
    (input widths 32, 64, 128)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 2)
        self.bn = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.conv(x)).relu().flatten(1)
        return self.fc2(self.fc1(h).relu())


def _tiny_gptq(sparse: bool = False) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = _Tiny().eval()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    model.bn.running_var.uniform_(0.5, 2.0)
    x = _features(64 * 25, 8, 0).reshape(64, 5, 5, 8).permute(0, 3, 1, 2).contiguous()
    return apply(model, _tiny_plan(sparse), x[:4], calibration=Calibration((x,))), x


def _tiny_plan(sparse: bool = False) -> Plan:
    """Every GPTQ case: a conv (BatchNorm folded), 3 bits with a mask, low-rank factors (the
    second one's 5 input columns: one short group). Grouped throughout: ONNX Runtime fuses a
    per-channel int8 DequantizeLinear into the MatMul of a bias-free Linear with activations
    quantized on the fly (about 1e-3 off the torch outputs, as on main for RTN)."""
    return Plan({"conv": LayerPlan(bits=4, group_size=32, quantizer="gptq"),
                 "fc1": LayerPlan(bits=3, group_size=128, quantizer="gptq",
                                  sparsity=0.5 if sparse else 0.0),
                 "fc2": LayerPlan(bits=4, group_size=32, quantizer="gptq", rank=0.5)})


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_a_gptq_model_exports_to_onnx_with_its_outputs_and_small(sparse: bool,
                                                                 tmp_path: Path) -> None:
    model, x = _tiny_gptq(sparse)
    # The standard-op form (exact codes x scales); MatMulNBits' int8 compute: tests/test_nbits.py.
    path = export_onnx(model, x[:4], tmp_path / "m.onnx", contrib_ops=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), atol=1e-4, rtol=1e-4)
    inits = {i.name for i in onnx.load(str(path)).graph.initializer}
    assert sum(name.endswith("_codes") for name in inits) == 4  # conv, fc1, fc2's two factors
    fp32 = export_onnx(bake(model), x[:4], tmp_path / "fp32.onnx")
    assert path.stat().st_size < 0.5 * fp32.stat().st_size


def test_a_gptq_model_round_trips_through_the_packed_file(tmp_path: Path) -> None:
    model, x = _tiny_gptq(sparse=True)
    info = save_packed(model, tmp_path / "m.acpk")
    assert info.payload_bytes == size_bytes(model)
    with torch.no_grad():
        torch.testing.assert_close(load_packed(info.path)(x), bake(model)(x), atol=1e-5, rtol=0)
    assert info.path.read_bytes()[4] == 6  # group-wise weights: packed format version 6


def test_rebuilding_from_baked_weights_gives_the_same_codes_and_group_scales() -> None:
    from autocompress.deploy._rebuild import load_baked_state

    model, x = _tiny_gptq()
    plan = _tiny_plan()
    baseline = _Tiny().eval()
    rebuilt = apply(baseline, plan, x[:4], calibration=Calibration.empty())
    load_baked_state(rebuilt, bake(model).state_dict(), plan)
    for name, (q, scale) in quantized_weights(model).items():
        q2, scale2 = quantized_weights(rebuilt)[name]
        np.testing.assert_array_equal(q2, q)
        np.testing.assert_array_equal(scale2, scale)


@pytest.mark.parametrize(("shape", "group_size"), [((64, 256), 128), ((16, 8, 2, 2), 32),
                                                   ((10, 96), 32), ((10, 80), None)])
def test_stored_bytes_count_codes_and_group_scales(shape: tuple[int, ...],
                                                   group_size: int | None) -> None:
    layer = nn.Linear(shape[1], shape[0]) if len(shape) == 2 else nn.Conv2d(8, 16, 2)
    model = apply(nn.Sequential(layer), Plan({"0": LayerPlan(bits=3, group_size=group_size)}),
                  torch.randn(2, *(shape[1:2] if len(shape) == 2 else (8, 4, 4))))
    (row,) = [r for r in size_report(model) if r.name == "0.weight"]
    d = math.prod(shape[1:])
    groups = math.ceil(d / group_size) if group_size else 1
    assert row.scales == shape[0] * groups
    assert row.bytes == math.ceil(math.prod(shape) * 3 / 8) + 4 * shape[0] * groups
    assert planned_weight_bytes(shape, LayerPlan(bits=3, group_size=group_size)) == row.bytes


def test_planned_bytes_of_grouped_low_rank_factors_count_short_groups() -> None:
    # rank 0.3 of (64, 256): r = 19; factors (19, 256) with 2 groups per row and (64, 19)
    # with one short group per row.
    fmt = weight_format(4, "uniform", 128)
    expected = fmt.stored_bytes((19, 256)) + fmt.stored_bytes((64, 19))
    assert fmt.scales((64, 19)) == 64
    assert planned_weight_bytes((64, 256), LayerPlan(bits=4, group_size=128, rank=0.3)) == expected


class _WithEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 96)
        self.fc = nn.Linear(96, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(ids).mean(1))


def test_plans_the_layers_cannot_take_are_refused_at_resolution() -> None:
    model, ids = _WithEmbedding(), torch.randint(0, 50, (2, 5))
    refused = {la.name: {(r.knob, r.value) for r in la.refusals}
               for la in describe_layers(model, ids)}
    assert ("quantizer", "gptq") in refused["emb"]
    # 96 columns: 1.5 groups of 64 (a short last group, stored as such) but not one of 128
    assert ("group_size", 128) in refused["fc"] and ("group_size", 64) not in refused["fc"]
    assert ("group_size", 32) not in refused["fc"] and ("quantizer", "gptq") not in refused["fc"]
    with pytest.raises(PlanError, match="gptq"):
        apply(model, Plan({"emb": LayerPlan(bits=4, quantizer="gptq")}), ids)
    with pytest.raises(PlanError, match="smaller than 128"):
        apply(model, Plan({"fc": LayerPlan(bits=4, group_size=128)}), ids)


@pytest.mark.slow
def test_a_searched_gptq_trial_exports_verified_to_onnx_and_packed(tmp_path: Path,
                                                                   monkeypatch) -> None:
    """A 2-trial serial search on ``tests.models:tiny_task`` whose every layer is GPTQ-rounded
    (group-wise where the width allows), no fine-tune; each trial exports to ONNX and to the
    packed file through the verifier (the metric re-measured on the artifact = the logged
    one)."""
    import yaml

    from autocompress import cli
    from autocompress.deploy._export import export_run
    from autocompress.tracking import read_front

    root = Path(__file__).resolve().parents[1]
    space = {"version": 1, "layers": [
        {"types": ["Linear"], "knobs": {"bits": [3, 4], "quantizer": ["gptq"]}},
        {"match": "re:net\\.[24]$", "knobs": {"bits": [3], "quantizer": ["gptq"],
                                             "group_size": [32]}}]}
    exp = {"name": "gptq-e2e", "task": "tests.models:tiny_task", "search_space": space,
           "objectives": [{"metric": "accuracy", "mode": "max"},
                          {"metric": "size_bytes", "mode": "min"}],
           "target": {"runtime": "onnxruntime", "threads": 1, "batch_size": 1, "warmup": 1,
                      "min_runs": 3, "max_runs": 5, "budget_s": 0.02},
           "search": {"sampler": "random", "trials": 2, "seed": 0, "backend": "serial",
                      "calibration_samples": 64},
           "finetune": {"epochs": 0}}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(root))
    assert cli.main(["search", str(tmp_path / "exp.yaml"), "--tracking-uri", uri]) == 0
    front = read_front(uri, "gptq-e2e")
    assert front and all(row["plan"]["layers"]["net.2"]["quantizer"] == "gptq" for row in front)
    row = front[0]
    assert row["plan"]["layers"]["net.2"]["group_size"] == 32
    for fmt in ("onnx", "packed"):
        result = export_run(row["run_id"], fmt, tmp_path / fmt, uri)
        assert result["accuracy"] == pytest.approx(row["accuracy"], abs=result["tolerance"])
        assert result["size_bytes"] == row["size_bytes"]
